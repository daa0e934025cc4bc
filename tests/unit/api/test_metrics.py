"""``/metrics`` is public: a scrape's cost must not grow with how often it
comes, and an anonymous one must not show who runs what.

The real app creates services for two tenants (deploy/local/tenants.toml)
through a slurmrestd stand-in on 127.0.0.1 that keeps the jobs submitted
and lists them back as 24.11 does (tests/fixtures/slurmrestd).
"""

from __future__ import annotations

import asyncio
import copy
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
from litestar import Litestar

from gateway.app import create_app
from tests.support.app import TENANTS, app_client, stub_settings
from tests.support.http_stub import Seen, http_stub, response
from tests.support.recorded import recorded_body

TEAM_A = {"Authorization": "Bearer sgw_local-team-a-key"}  # deploy/local/tenants.toml
TEAM_B = {"Authorization": "Bearer sgw_local-team-b-key"}
ADMIN = {"Authorization": "Bearer sgw_local-admin-key"}
CREATE = {"recipe_name": "testing/http"}


class Slurmrestd:
    """Keeps what is submitted (and the comments written on it) and lists it."""

    def __init__(self) -> None:
        self.jobs: dict[int, dict[str, Any]] = {}
        self.listing = recorded_body("jobs_list")
        self.template = self.listing["jobs"][0]

    async def __call__(self, seen: Seen, writer: asyncio.StreamWriter) -> None:
        path = seen.path.split("?")[0]
        if path.endswith("/job/submit"):
            job_id = 1000 + len(self.jobs)
            job = copy.deepcopy(self.template)
            job.update(
                job_id=job_id,
                user_name=seen.headers["x-slurm-user-name"],
                name=json.loads(seen.body)["job"]["name"],
                comment=json.loads(seen.body)["job"].get("comment", ""),
                job_state=["PENDING"],
            )
            self.jobs[job_id] = job
            answer = recorded_body("submit")
            answer["job_id"] = job_id
            writer.write(response(200, answer))
        elif path.rsplit("/", 1)[-1].isdigit() and seen.method == "POST":
            self.jobs[int(path.rsplit("/", 1)[-1])]["comment"] = json.loads(seen.body)["comment"]
            writer.write(response(200, recorded_body("update_comment")))
        elif path.endswith("/jobs"):
            writer.write(response(200, {**self.listing, "jobs": list(self.jobs.values())}))
        else:
            writer.write(response(200, recorded_body("ping")))


@asynccontextmanager
async def gateway(tmp_path: Path) -> AsyncIterator[tuple[Litestar, httpx.AsyncClient]]:
    async with http_stub(Slurmrestd()) as stub:
        settings = stub_settings(tmp_path, stub.url, auth_file=TENANTS, job_dir="/home/{user}")
        app = create_app(settings)
        async with app_client(app) as client:
            yield app, client


async def create_services(api: httpx.AsyncClient) -> None:
    for who in (TEAM_A, TEAM_A, TEAM_B):
        made = await api.post("/api/v1/services", json=CREATE, headers=who)
        assert made.status_code == 201, made.text


def services_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "_services{" in line]


async def test_scrapes_of_one_view_generation_count_the_jobs_once(tmp_path: Path) -> None:
    async with gateway(tmp_path) as (app, api):
        await create_services(api)
        services = app.state.provided.services
        recounts = 0
        count = services.counts

        def counting() -> dict[tuple[str, str, str], int]:
            nonlocal recounts
            recounts += 1
            return count()  # type: ignore[no-any-return]

        services.counts = counting
        generations = set()
        started = time.perf_counter()
        for _ in range(100):
            generations.add(services.view.generation)
            scrape = await api.get("/metrics")
            assert scrape.status_code == 200
        seconds = time.perf_counter() - started
        generations.add(services.view.generation)
    print(
        f"\n100 scrapes over {len(generations)} view generation(s): jobs recounted "
        f"{recounts} time(s); {seconds * 10:.2f} ms a scrape"
    )
    assert recounts == len(generations) <= 3, (recounts, generations)
    assert 'gateway_services{recipe="testing/http",status="pending"} 3.0' in scrape.text


async def test_an_anonymous_scrape_shows_no_tenant(tmp_path: Path) -> None:
    async with gateway(tmp_path) as (_, api):
        await create_services(api)
        anonymous = await api.get("/metrics")
        admin = await api.get("/metrics", headers=ADMIN)
        tenant = await api.get("/metrics", headers=TEAM_A)
        wrong = await api.get("/metrics", headers={"Authorization": "Bearer sgw_made-up"})
    assert anonymous.status_code == 200
    for name in ("team-a", "team-b", "gwteam", "tenant="):
        assert name not in anonymous.text, name
    # The totals are still there, for everyone.
    assert services_lines(anonymous.text) == [
        'gateway_services{recipe="testing/http",status="pending"} 3.0'
    ]
    # An admin sees who runs what.
    assert admin.status_code == 200
    assert services_lines(admin.text) == [
        'gateway_services{recipe="testing/http",status="pending"} 3.0',
        'gateway_tenant_services{recipe="testing/http",status="pending",tenant="team-a"} 2.0',
        'gateway_tenant_services{recipe="testing/http",status="pending",tenant="team-b"} 1.0',
    ]
    # A tenant is no admin; credentials that do not check out are refused as anywhere.
    assert (tenant.status_code, wrong.status_code) == (403, 401)
    print(f"\nanonymous scrape: {services_lines(anonymous.text)}")

"""Without client authentication (``make run``), a web page the user opens
must not reach the gateway: not by a cross-site ``text/plain`` POST (no
preflight), nor by a name rebound to 127.0.0.1 (DNS rebinding).

The app is the one the server runs (``served(create_app(...))``), in front of
a real slurmrestd stand-in on 127.0.0.1 that records what reaches it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest

from gateway.app import create_app, served
from tests.support.app import TENANTS, app_client, stub_settings
from tests.support.http_stub import Seen, Stub, http_stub
from tests.support.recorded import recorded_response

PAGE = "https://attacker.example"
CREATE = b'{"recipe_name": "inference/vllm"}'
TEAM_A = {"Authorization": "Bearer sgw_local-team-a-key"}  # deploy/local/tenants.toml


async def answer(seen: Seen, writer: asyncio.StreamWriter) -> None:
    if seen.path.endswith("/job/submit"):
        body = recorded_response("submit")
    elif "/jobs" in seen.path:
        body = recorded_response("jobs_list")
    else:
        body = recorded_response("ping")
    writer.write(body)


@asynccontextmanager
async def gateway(tmp_path: Path, **env: str) -> AsyncIterator[tuple[httpx.AsyncClient, Stub]]:
    async with http_stub(answer) as stub:
        settings = stub_settings(tmp_path, stub.url, **env)
        app = create_app(settings)
        async with app_client(
            app,
            served(app, settings),
            base_url="http://127.0.0.1:8001",
            client=("127.0.0.1", 50000),
        ) as client:
            yield client, stub


def submitted(stub: Stub) -> int:
    return sum(s.path.endswith("/job/submit") for s in stub.seen)


async def test_a_cross_site_text_plain_post_creates_no_job(tmp_path: Path) -> None:
    async with gateway(tmp_path) as (api, stub):
        # What <form enctype="text/plain"> or fetch(..., {mode: "no-cors"}) sends.
        for origin in ({"Origin": PAGE}, {}):  # a page may also suppress Origin
            refused = await api.post(
                "/api/v1/services",
                content=CREATE,
                headers={"Content-Type": "text/plain", **origin},
            )
            assert refused.status_code in (403, 415), refused.text
            assert refused.headers["content-type"] == "application/problem+json"
        no_type = await api.post("/api/v1/services", content=CREATE)
        form = await api.post(
            "/api/v1/services",
            content=CREATE,
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        # The prompt fast path and the /v1 relay answer before Litestar's handlers.
        prompt = await api.post(
            "/api/v1/vllm/12/prompt",
            content=b'{"prompt": "hi"}',
            headers={"Content-Type": "text/plain"},
        )
        chat = await api.post(
            "/v1/chat/completions",
            content=b'{"model": "m", "messages": []}',
            headers={"Content-Type": "text/plain;charset=UTF-8"},
        )
        statuses = [r.status_code for r in (no_type, form, prompt, chat)]
        assert statuses == [415] * 4, statuses
        assert "Content-Type" in form.json()["detail"]
        assert submitted(stub) == 0
        # The same POST as JSON from the machine (curl, a page of localhost) goes through.
        made = await api.post(
            "/api/v1/services",
            content=CREATE,
            headers={"Content-Type": "application/json", "Origin": "http://localhost:3000"},
        )
        assert made.status_code not in (403, 415, 421), made.text
        assert submitted(stub) == 1
    print(f"\ncross-site POSTs refused: text/plain {refused.status_code}, "
          f"form {form.status_code}; JSON from localhost: {made.status_code}")  # fmt: skip


@pytest.mark.parametrize(
    "origin", [PAGE, "null", "http://localhost.attacker.example", "http://127.0.0.1.nip.io:8001"]
)
async def test_a_foreign_origin_is_refused(tmp_path: Path, origin: str) -> None:
    async with gateway(tmp_path) as (api, stub):
        json_post = await api.post(
            "/api/v1/services", content=CREATE,
            headers={"Content-Type": "application/json", "Origin": origin},
        )  # fmt: skip
        preflight = await api.options("/api/v1/services", headers={"Origin": origin})
        read = await api.get("/api/v1/services", headers={"Origin": origin})
    assert [json_post.status_code, preflight.status_code, read.status_code] == [403] * 3
    assert "Origin" in json_post.json()["detail"]
    assert submitted(stub) == 0


@pytest.mark.parametrize(
    "host", ["attacker.example", "attacker.example:8001", "127.0.0.1.nip.io:8001", "10.0.0.5"]
)
async def test_a_rebound_name_gets_no_answer(tmp_path: Path, host: str) -> None:
    async with gateway(tmp_path) as (api, stub):
        listing = await api.get("/api/v1/services", headers={"Host": host})
        created = await api.post(
            "/api/v1/services", content=CREATE,
            headers={"Host": host, "Content-Type": "application/json"},
        )  # fmt: skip
        unknown = await api.get("/api/v1/nothing-here", headers={"Host": host})
        # Local probes still get their answers, whatever name they use.
        health = await api.get("/api/v1/health", headers={"Host": host})
        ready = await api.get("/api/v1/ready", params={"slurm": "false"}, headers={"Host": host})
    assert [listing.status_code, created.status_code, unknown.status_code] == [421] * 3
    assert "Host" in listing.json()["detail"]
    assert submitted(stub) == 0
    assert [health.status_code, ready.status_code] == [200, 200]
    print(f"\nHost {host}: listing {listing.status_code}, create {created.status_code}")


@pytest.mark.parametrize(
    "host", ["localhost", "localhost:8001", "LOCALHOST:8001", "127.0.0.1", "[::1]", "[::1]:8001"]
)
async def test_loopback_names_are_answered(tmp_path: Path, host: str) -> None:
    async with gateway(tmp_path) as (api, _):
        listing = await api.get("/api/v1/services", headers={"Host": host})
    assert listing.status_code == 200, listing.text


async def test_with_authentication_nothing_of_this_applies(tmp_path: Path) -> None:
    async with gateway(tmp_path, auth_file=TENANTS, host="127.0.0.1") as (api, _):
        foreign = await api.get(
            "/api/v1/recipes", headers={"Host": "gateway.example.org", "Origin": PAGE, **TEAM_A}
        )
        plain = await api.post(
            "/api/v1/services",
            content=b"not json",
            headers={"Content-Type": "text/plain", **TEAM_A},
        )
    assert foreign.status_code == 200
    assert plain.status_code == 400  # Litestar's own answer to a body it cannot read


async def test_an_exposed_unauthenticated_gateway_keeps_the_origin_and_type_checks(
    tmp_path: Path,
) -> None:
    exposed = {"host": "0.0.0.0", "allow_unauthenticated": "true"}  # noqa: S104
    async with gateway(tmp_path, **exposed) as (api, _):
        by_name = await api.get("/api/v1/recipes", headers={"Host": "gateway.example.org"})
        plain = await api.post(
            "/api/v1/services", content=CREATE, headers={"Content-Type": "text/plain"}
        )
        foreign = await api.get("/api/v1/recipes", headers={"Origin": PAGE})
    assert [by_name.status_code, plain.status_code, foreign.status_code] == [200, 415, 403]

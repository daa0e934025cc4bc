"""``idle_stop_minutes`` on ``POST /api/v1/services``, through the real app over
the in-memory scheduler: what is refused and how, what the job is given
(environment, never script text), what the service shows, how an idempotent
replay compares it, and how a service that stopped itself reads."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.app import create_app
from gateway.core import jobscript
from gateway.slurm import JobState
from gateway.testing.scheduler import FakeScheduler
from gateway.upstream.probe import HealthProber
from tests.support.app import app_client, stub_settings
from tests.support.services import CODEC, fake_manager

SERVICES = "/api/v1/services"
STUB = "testing/openai-stub"  # service kind "vllm"
REASON = "stopped itself after 1 min without a request"


@asynccontextmanager
async def gateway(tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, FakeScheduler]]:
    """The app without authentication, its Slurm the in-memory scheduler."""
    services, fake = fake_manager(first_id=70)
    app = create_app(stub_settings(tmp_path))
    async with app_client(app) as client:
        app.state.provided.services = services
        yield client, fake
    assert isinstance(services.prober, HealthProber)
    await services.prober.aclose()


def without_meta(script: str) -> list[str]:
    return [line for line in script.splitlines() if not line.startswith("GW_META=")]


def fields(response: httpx.Response) -> list[str]:
    return [e["field"] for e in response.json().get("errors", [])]


async def test_a_bad_idle_stop_is_422_naming_the_field(tmp_path: Path) -> None:
    async with gateway(tmp_path) as (client, fake):
        for value in (0, -5, 10081, 1.5, "30", True, [1]):
            body: dict[str, Any] = {"recipe_name": STUB, "idle_stop_minutes": value}
            response = await client.post(SERVICES, json=body)
            assert response.status_code == 422, (value, response.text)
            assert fields(response) == ["idle_stop_minutes"], (value, response.json())
        assert fake.submitted == []
        # null: not asked, as when absent.
        body = {"recipe_name": STUB, "idle_stop_minutes": None}
        response = await client.post(SERVICES, json=body)
    assert response.status_code == 201, response.text
    assert response.json()["idle_stop_minutes"] is None


async def test_a_recipe_that_reports_no_load_cannot_stop_when_idle(tmp_path: Path) -> None:
    async with gateway(tmp_path) as (client, fake):
        response = await client.post(
            SERVICES, json={"recipe_name": "testing/http", "idle_stop_minutes": 5}
        )
    assert response.status_code == 422, response.text
    problem = response.json()
    assert fields(response) == ["idle_stop_minutes"]
    assert problem["detail"].startswith(
        "idle_stop_minutes: the recipe's service kind (http) cannot report idleness"
    ), problem
    assert fake.submitted == []


async def test_the_job_gets_the_seconds_as_environment_and_the_service_shows_the_minutes(
    tmp_path: Path,
) -> None:
    async with gateway(tmp_path) as (client, fake):
        created = await client.post(SERVICES, json={"recipe_name": STUB, "idle_stop_minutes": 4321})
        assert created.status_code == 201, created.text
        assert created.json()["idle_stop_minutes"] == 4321
        shown = await client.get(f"{SERVICES}/{created.json()['id']}")
        plain = await client.post(SERVICES, json={"recipe_name": STUB})
    assert shown.json()["idle_stop_minutes"] == 4321
    assert plain.json()["idle_stop_minutes"] is None
    (_, asked), (_, not_asked) = fake.submitted
    assert asked.environment[jobscript.IDLE_VARIABLE] == str(4321 * 60)
    # A value of the request is data: in the environment, never in the script.
    assert "4321" not in asked.script and str(4321 * 60) not in asked.script
    # The same script but for the metadata (its own for each service).
    assert without_meta(asked.script) == without_meta(not_asked.script)
    assert jobscript.IDLE_VARIABLE not in not_asked.environment


async def test_a_replay_with_another_idle_stop_is_another_request(tmp_path: Path) -> None:
    async with gateway(tmp_path) as (client, fake):
        key = {"Idempotency-Key": "idle-run-1"}
        body = {"recipe_name": STUB, "idle_stop_minutes": 10}
        first = await client.post(SERVICES, json=body, headers=key)
        same = await client.post(SERVICES, json=body, headers=key)
        other = await client.post(SERVICES, json={**body, "idle_stop_minutes": 11}, headers=key)
        none = await client.post(SERVICES, json={"recipe_name": STUB}, headers=key)
    assert first.status_code == 201, first.text
    assert same.status_code == 201 and same.headers["Idempotent-Replayed"] == "true"
    assert same.json()["id"] == first.json()["id"]
    for changed in (other, none):
        assert changed.status_code == 422, changed.text
        assert fields(changed) == ["Idempotency-Key"]
    assert len(fake.submitted) == 1


@pytest.mark.parametrize(
    ("state", "status", "reason"),
    [
        # Stopping its server: it takes no more requests from then on.
        (JobState.RUNNING, "completed", REASON),
        (JobState.COMPLETED, "completed", REASON),
        # Stopped by its owner while it stopped itself: Slurm's say stands.
        (JobState.CANCELLED, "cancelled", "stopped"),
    ],
)
async def test_a_service_that_stopped_itself_reads_completed_with_why(
    tmp_path: Path, state: JobState, status: str, reason: str
) -> None:
    async with gateway(tmp_path) as (client, fake):
        created = await client.post(SERVICES, json={"recipe_name": STUB, "idle_stop_minutes": 1})
        job_id = int(created.json()["id"])
        # What the job's trap publishes (jobscript.py, gw_idle_stopped).
        said = f"{fake.jobs[job_id].comment}|phase=completed|endpoint=node1:8000|reason={REASON}"
        ended = datetime.now(tz=UTC) if state is not JobState.RUNNING else None
        fake.advance(job_id, state, comment=said, end_time=ended, batch_host="node1", nodes="node1")
        shown = (await client.get(f"{SERVICES}/{job_id}")).json()
    assert (shown["status"], shown["status_reason"]) == (status, reason), shown
    assert shown["endpoint"] is None  # no longer routed to


def test_the_digest_of_a_request_without_the_field_is_as_before() -> None:
    """Replicas mid-upgrade agree on an Idempotency-Key's request (digests
    taken before the field existed)."""
    from gateway.core.model import CreateRequest

    plain = CreateRequest(recipe_name="inference/vllm")
    full = CreateRequest(
        recipe_name="inference/vllm",
        environment={"VLLM_MODEL": "gpt2", "A": "b"},
        resources={"nodes": 1, "gpu": None},
        shared=True,
    )
    assert (plain.digest(), full.digest()) == ("c64a8f9f067bf35217", "9d1d4a3f25ac6542c2")
    asked = CreateRequest(recipe_name="inference/vllm", idle_stop_minutes=5)
    assert asked.digest() != plain.digest()
    assert CODEC.job_tag  # the codec the in-memory scheduler's jobs are made under

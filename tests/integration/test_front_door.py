"""The OpenAI front door (/v1) on a real cluster, in front of OpenAI-shaped stubs.

Services of tests/recipes/testing/openai-stub run as Slurm jobs on c2411
(Slurm 24.11) behind one gateway with deploy/local/tenants.toml. What a user
of /v1 would notice: a model served by two services spreads over both; a
service stopped, or killed behind the gateway's back, under load costs no
request (beyond one in flight on it); errors come in OpenAI's shape; tenants
see their own models and those an admin shared, nothing else.

The real vLLM behind /v1, with OpenAI's SDK, is tests/integration/test_openai_vllm.py.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.testing.clusters import LocalCluster
from tests.conftest import poll
from tests.integration.conftest import CLUSTERS, TIMINGS
from tests.integration.gateway_process import GatewayProcess

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = "c2411"
TEAM_A = {"Authorization": "Bearer sgw_local-team-a-key"}  # tenant team-a, gwuser
TEAM_B = {"Authorization": "Bearer sgw_local-team-b-key"}  # tenant team-b, gwteam
ADMIN = {"Authorization": "Bearer sgw_local-admin-key"}  # tenant ops
MODEL = "fd-pair"


def chat(model: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4,
        **extra,
    }


@pytest.fixture(scope="module")
def stub_cluster() -> LocalCluster:
    found = [c for c in CLUSTERS if c.name == CLUSTER]
    if not found:
        raise pytest.UsageError(
            f"cluster {CLUSTER} is not up; run `bash deploy/local/cluster.sh up`"
        )
    return found[0]


@pytest.fixture(scope="module")
def gateway(stub_cluster: LocalCluster) -> Iterator[GatewayProcess]:
    with GatewayProcess(
        stub_cluster, GATEWAY_AUTH_FILE=str(ROOT / "deploy" / "local" / "tenants.toml")
    ) as process:
        yield process


@pytest.fixture
async def api(gateway: GatewayProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30, headers=TEAM_A) as client:
        yield client


class Services:
    """Stubs started for a test, stopped at its end whatever happens."""

    def __init__(self, gateway: GatewayProcess) -> None:
        self.gateway = gateway
        self.ids: list[tuple[str, dict[str, str]]] = []

    async def start(
        self,
        model: str,
        who: dict[str, str] = TEAM_A,
        *,
        shared: bool = False,
        headers: dict[str, str] | None = None,
        **env: str,
    ) -> str:
        body: dict[str, Any] = {
            "recipe_name": "testing/openai-stub",
            "config": {"environment": {"VLLM_MODEL": model, **env}},
        }
        if shared:
            body["shared"] = True
        async with httpx.AsyncClient(base_url=self.gateway.url, timeout=30) as client:
            created = await client.post(
                "/api/v1/services", json=body, headers={**who, **(headers or {})}
            )
        assert created.status_code == 201, created.text
        sid: str = created.json()["id"]
        self.ids.append((sid, who))
        return sid

    async def running(self, *ids: str) -> None:
        async with httpx.AsyncClient(base_url=self.gateway.url, timeout=30, headers=ADMIN) as c:
            for sid in ids:
                await poll(
                    lambda sid=sid: c.get(f"/api/v1/services/{sid}/status"),  # type: ignore[misc]
                    lambda r: r.json()["status"] == "running",
                    timeout=90,
                    what=f"service {sid} running",
                )

    async def stop_all(self) -> None:
        async with httpx.AsyncClient(base_url=self.gateway.url, timeout=30, headers=ADMIN) as c:
            for sid, _ in self.ids:
                await c.delete(f"/api/v1/services/{sid}")


@pytest.fixture
async def services(gateway: GatewayProcess) -> AsyncIterator[Services]:
    started = Services(gateway)
    try:
        yield started
    finally:
        await started.stop_all()


@pytest.fixture(scope="module")
def pair(gateway: GatewayProcess) -> Iterator[list[str]]:
    """Two running stubs of one model, for the module's read-only tests."""
    started = Services(gateway)

    async def up() -> list[str]:
        ids = [await started.start(MODEL), await started.start(MODEL)]
        await started.running(*ids)
        return ids

    try:
        yield asyncio.run(up())
    finally:
        asyncio.run(started.stop_all())


async def slurm(cluster: LocalCluster, *command: str) -> None:
    """A Slurm command as root on the cluster (what its admin or another replica does)."""
    await asyncio.to_thread(
        subprocess.run, ["chroot", cluster.chroot, *command], check=True, capture_output=True
    )


def error_of(response: httpx.Response) -> dict[str, Any]:
    """OpenAI's error shape, checked: {"error": {message, type, param, code}}."""
    assert response.headers["content-type"].startswith("application/json"), response.text
    body: dict[str, Any] = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"], body
    error: dict[str, Any] = body["error"]
    return error


# -- one model, two services ------------------------------------------------------


async def test_two_services_of_one_model_share_its_requests(
    api: httpx.AsyncClient, pair: list[str]
) -> None:
    models = await poll(
        lambda: api.get("/v1/models"),
        lambda r: any(m["id"] == MODEL and m["services"] == 2 for m in r.json()["data"]),
        what="the model listed with both services",
    )
    card = next(m for m in models.json()["data"] if m["id"] == MODEL)
    assert card["object"] == "model"
    assert card["owned_by"] == "team-a"
    assert card["max_model_len"] == 2048  # as the stub's /v1/models reports it
    assert models.json()["object"] == "list"
    one = await api.get(f"/v1/models/{MODEL}")
    assert one.status_code == 200
    assert one.json()["id"] == MODEL

    seen: Counter[str] = Counter()
    for _ in range(20):
        answer = await api.post("/v1/chat/completions", json=chat(MODEL))
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["content"] == " tok" * 4
        seen[answer.headers["x-gateway-service-id"]] += 1
    print(f"/v1 over two services of {MODEL}: {dict(seen)}")
    assert set(seen) == set(pair)
    assert min(seen.values()) >= 5, seen

    plain = await api.post(
        "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 3}
    )
    assert plain.status_code == 200, plain.text
    assert plain.json()["choices"][0]["text"] == " tok" * 3
    async with api.stream("POST", "/v1/chat/completions", json=chat(MODEL, stream=True)) as stream:
        assert stream.status_code == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
        text = (await stream.aread()).decode()
    assert text.rstrip().endswith("data: [DONE]"), text
    assert text.count('"delta"') == 4
    embedded = await api.post("/v1/embeddings", json={"model": MODEL, "input": "hi"})
    assert embedded.status_code == 200, embedded.text
    assert embedded.json()["data"][0]["embedding"] == [0.25, -0.5, 1.0]


async def test_the_body_reaches_the_service_as_sent(
    api: httpx.AsyncClient, pair: list[str]
) -> None:
    # Fields the gateway does not know (vLLM's extensions) pass; a stream with
    # usage asked for ends with the usage event.
    body = chat(MODEL, stream=True, stream_options={"include_usage": True}, top_k=5)
    async with api.stream("POST", "/v1/chat/completions", json=body) as stream:
        text = (await stream.aread()).decode()
    assert '"usage"' in text, text


# -- errors -------------------------------------------------------------------------


async def test_errors_come_in_openais_shape(
    gateway: GatewayProcess, api: httpx.AsyncClient, pair: list[str]
) -> None:
    not_json = await api.post(
        "/v1/chat/completions", content=b"{nope", headers={"Content-Type": "application/json"}
    )
    assert not_json.status_code == 400
    assert error_of(not_json)["type"] == "invalid_request_error"

    no_model = await api.post("/v1/chat/completions", json={"messages": []})
    assert no_model.status_code == 400
    assert error_of(no_model)["param"] == "model"

    unknown = await api.post("/v1/chat/completions", json=chat("no-such-model"))
    assert unknown.status_code == 404
    error = error_of(unknown)
    assert error["code"] == "model_not_found"
    assert MODEL in error["message"], error  # what the caller can use instead
    assert (await api.get("/v1/models/no-such-model")).status_code == 404

    async with httpx.AsyncClient(base_url=gateway.url) as anonymous:
        refused = await anonymous.get("/v1/models")
        wrong = await anonymous.post(
            "/v1/chat/completions", json=chat(MODEL), headers={"Authorization": "Bearer sgw_x"}
        )
    assert refused.status_code == 401
    assert refused.headers["www-authenticate"].startswith("Bearer")
    assert error_of(refused)["type"] == "authentication_error"
    assert wrong.status_code == 401
    assert error_of(wrong)["type"] == "authentication_error"


async def test_a_model_still_pending_is_503_with_retry_after(
    api: httpx.AsyncClient, services: Services, stub_cluster: LocalCluster
) -> None:
    # A keyed create waits 3 s before it may start: time to hold it in Slurm.
    sid = await services.start("fd-pending", headers={"Idempotency-Key": f"fd-{time.time()}"})
    await slurm(stub_cluster, "scontrol", "hold", sid)
    answer = await api.post("/v1/chat/completions", json=chat("fd-pending"))
    assert answer.status_code == 503, answer.text
    assert answer.headers["retry-after"] == "5"
    error = error_of(answer)
    assert error["code"] == "model_not_ready"
    assert f"service {sid} is pending" in error["message"]
    # Not listed until it runs.
    models = (await api.get("/v1/models")).json()["data"]
    assert "fd-pending" not in [m["id"] for m in models]


# -- tenants ------------------------------------------------------------------------


async def test_tenants_see_their_models_and_shared_ones(
    gateway: GatewayProcess, api: httpx.AsyncClient, pair: list[str], services: Services
) -> None:
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30, headers=TEAM_B) as team_b:
        listed = [m["id"] for m in (await team_b.get("/v1/models")).json()["data"]]
        assert MODEL not in listed
        foreign = await team_b.post("/v1/chat/completions", json=chat(MODEL))
        assert foreign.status_code == 404
        # The same answer as for a model nobody serves: nothing of team-a's shows.
        assert "no model is served for you" in error_of(foreign)["message"]

        # Only an admin offers a service to everyone.
        refused = await api.post(
            "/api/v1/services", json={"recipe_name": "testing/openai-stub", "shared": True}
        )
        assert refused.status_code == 403, refused.text
        assert "shared" in refused.json()["detail"]

        sid = await services.start("fd-shared", ADMIN, shared=True)
        await services.running(sid)
        got = await api.get(f"/api/v1/services/{sid}", headers=ADMIN)
        assert got.json()["shared"] is True
        shared_models = await poll(
            lambda: team_b.get("/v1/models"),
            lambda r: "fd-shared" in [m["id"] for m in r.json()["data"]],
            what="the shared model listed for team-b",
        )
        card = next(m for m in shared_models.json()["data"] if m["id"] == "fd-shared")
        assert card["owned_by"] == "ops"
        answer = await team_b.post("/v1/chat/completions", json=chat("fd-shared"))
        assert answer.status_code == 200, answer.text
        assert answer.headers["x-gateway-service-id"] == sid
        # Shared for prompts through /v1 only: not to read, log or stop.
        assert (await team_b.get(f"/api/v1/services/{sid}")).status_code == 404
        assert (await team_b.get(f"/api/v1/services/{sid}/logs")).status_code == 404
        assert (await team_b.delete(f"/api/v1/services/{sid}")).status_code == 404
        still = await api.get(f"/api/v1/services/{sid}/status", headers=ADMIN)
        assert still.json()["status"] == "running"


# -- services leaving under load ----------------------------------------------------


class Load:
    """Clients sending requests for one model in a loop until told to stop."""

    def __init__(self, api: httpx.AsyncClient, model: str, clients: int = 4) -> None:
        self.api = api
        self.model = model
        self.clients = clients
        # (service id or None on failure, started, ended, status or error)
        self.done: list[tuple[str | None, float, float, str]] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def _client(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                answer = await self.api.post("/v1/chat/completions", json=chat(self.model))
            except httpx.HTTPError as exc:
                self.done.append((None, started, time.monotonic(), repr(exc)))
                continue
            if answer.status_code == 200:
                sid = answer.headers["x-gateway-service-id"]
                self.done.append((sid, started, time.monotonic(), "200"))
            else:
                self.done.append((None, started, time.monotonic(), answer.text[:200]))

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._client()) for _ in range(self.clients)]

    async def finish(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def until(self, count: int) -> None:
        """Until ``count`` more requests were answered."""
        target = len(self.done) + count
        await poll(lambda: _now(len(self.done)), lambda n: n >= target, interval=0.05, timeout=60)

    @property
    def failures(self) -> list[str]:
        return [outcome for sid, _, _, outcome in self.done if sid is None]


async def _now(value: int) -> int:
    return value


async def test_a_service_stopped_under_load_costs_no_request(
    api: httpx.AsyncClient, services: Services
) -> None:
    first = await services.start("fd-stop")
    second = await services.start("fd-stop")
    await services.running(first, second)
    await poll(
        lambda: api.get("/v1/models/fd-stop"),
        lambda r: r.status_code == 200 and r.json()["services"] == 2,
        what="both services routable",
    )
    load = Load(api, "fd-stop")
    load.start()
    try:
        await load.until(200)
        stopped = await api.delete(f"/api/v1/services/{first}")
        stop_answered = time.monotonic()
        assert stopped.status_code == 200, stopped.text
        await load.until(200)
    finally:
        await load.finish()
    before = Counter(sid for sid, _, end, _ in load.done if sid and end < stop_answered)
    after = Counter(sid for sid, start, _, _ in load.done if sid and start > stop_answered)
    line = (
        f"/v1 stop under load: {len(load.done)} requests by 4 clients, "
        f"{len(load.failures)} failed; per service before the stop {dict(before)}, "
        f"after {dict(after)}"
    )
    print(line)
    TIMINGS.append(line)
    assert set(before) == {first, second}
    assert first not in after, after
    assert len(load.failures) <= 1, load.failures


async def test_a_service_killed_behind_the_gateways_back_costs_at_most_those_in_flight(
    api: httpx.AsyncClient, services: Services, stub_cluster: LocalCluster
) -> None:
    first = await services.start("fd-kill")
    second = await services.start("fd-kill")
    await services.running(first, second)
    await poll(
        lambda: api.get("/v1/models/fd-kill"),
        lambda r: r.status_code == 200 and r.json()["services"] == 2,
        what="both services routable",
    )
    load = Load(api, "fd-kill")
    load.start()
    try:
        await load.until(200)
        # As another replica or the job's owner might: the stub dies at once
        # (its port refuses), the job ends, this gateway is not told.
        await slurm(stub_cluster, "scancel", "--batch", "--signal=KILL", first)
        killed = time.monotonic()
        await load.until(100)
        # Once the gateway's view has the job ended, nothing more goes there.
        await poll(
            lambda: api.get(f"/api/v1/services/{first}/status", headers=ADMIN),
            lambda r: r.json()["status"] != "running",
            what="the killed service no longer running",
        )
        known = time.monotonic()
        await load.until(100)
    finally:
        await load.finish()
    last = max((end for sid, _, end, _ in load.done if sid == first), default=killed)
    later = [sid for sid, start, _, _ in load.done if sid and start > known]
    line = (
        f"/v1 service killed outside the gateway: {len(load.done)} requests, "
        f"{len(load.failures)} failed; the killed one's last answer "
        f"{max(0.0, last - killed) * 1000:.0f} ms after the kill; the gateway saw the job "
        f"end {known - killed:.1f} s after it"
    )
    print(line)
    TIMINGS.append(line)
    assert later and first not in later
    # A request in flight on the stub when it died may fail; no other.
    assert len(load.failures) <= load.clients, load.failures

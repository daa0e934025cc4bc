"""Faults injected on the real daemons, each undone by its test.

For each: what the API answers while the fault lasts, what it answers after,
and that no service was lost or mislabelled. Every line of the table goes to
the test summary (FAULTS). Slurm's own restarts come from deploy/local/cluster.sh.

The services are the OpenAI-shaped stub (tests/recipes/testing/openai-stub):
it starts in a second, so the faults, not vLLM's start, take the time.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import httpx
import pytest

from gateway.testing.clusters import LocalCluster
from tests.support.clusters import CLUSTERS, cluster_up, fault_line
from tests.support.gateway_process import GatewayProcess, serving
from tests.support.live_services import prompt, running_stub
from tests.support.polling import poll

# Faults that need one cluster only run on this one (every version is covered
# by the slurmctld fault, where the daemons differ most).
ONE = next((c for c in CLUSTERS if c.name == "c2411"), CLUSTERS[0] if CLUSTERS else None)
One = tuple[LocalCluster, httpx.AsyncClient]  # ONE and a client of a gateway of it


@pytest.fixture
async def api(gateway: GatewayProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=gateway.url, timeout=60) as client, cleaned(client):
        yield client


@asynccontextmanager
async def cleaned(api: httpx.AsyncClient) -> AsyncIterator[None]:
    """Stops, after the test, every service it left running, whether it failed
    or a create answered 503 and was carried out once Slurm came back."""
    listed = await api.get("/api/v1/services")
    assert listed.status_code == 200, listed.text
    existing = {s["id"] for s in listed.json()}
    try:
        yield
    finally:
        now = await poll(
            lambda: api.get("/api/v1/services"),
            lambda r: r.status_code == 200,
            timeout=60,
            what="the services listed after the fault",
        )
        for service in now.json():
            if service["id"] not in existing and service["ended_at"] is None:
                await api.delete(f"/api/v1/services/{service['id']}")


def scontrol(cluster: LocalCluster, *args: str) -> None:
    """scontrol as root (the cluster's administrator) inside the chroot."""
    subprocess.run(
        ["chroot", cluster.chroot, "/usr/bin/env", "-i", "PATH=/usr/bin:/usr/sbin",
         "scontrol", *args],
        check=True, timeout=30, capture_output=True,
    )  # fmt: skip


async def running_service(api: httpx.AsyncClient) -> dict[str, Any]:
    """A running stub service, as the API describes it before the fault."""
    sid = await running_stub(api)
    body: dict[str, Any] = (await api.get(f"/api/v1/services/{sid}")).json()
    return body


async def answer(call: Awaitable[httpx.Response]) -> str:
    """``503`` or ``503 Retry-After=5`` or ``error: ReadError``, for the table."""
    try:
        response = await call
    except httpx.HTTPError as exc:
        return f"error: {type(exc).__name__}"
    retry = response.headers.get("retry-after")
    return f"{response.status_code}" + (f" Retry-After={retry}" if retry else "")


async def intact(api: httpx.AsyncClient, before: dict[str, Any]) -> list[str]:
    """What differs from before the fault: the service must be listed again as
    it was (running, same node and endpoint) and take prompts."""
    sid = before["id"]
    now = await poll(
        lambda: api.get(f"/api/v1/services/{sid}"),
        lambda r: r.status_code == 200 and r.json()["status"] == "running",
        timeout=60,
        what=f"service {sid} running again",
    )
    problems = [
        f"{k}: {before[k]} -> {now.json()[k]}"
        for k in ("node", "endpoint", "created_at")
        if now.json()[k] != before[k]
    ]
    if sid not in {s["id"] for s in (await api.get("/api/v1/services")).json()}:
        problems.append("not listed")
    answered = await prompt(api, sid)
    if answered.status_code != 200:
        problems.append(f"prompt {answered.status_code}: {answered.text[:200]}")
    return problems


INTACT = "status running, listed, prompt 200, stop 200"  # after most faults


async def closed(
    api: httpx.AsyncClient,
    cluster: LocalCluster,
    before: dict[str, Any],
    fault: str,
    during: str,
    after: str = INTACT,
) -> None:
    """The fault is over: the service must be intact; its row goes in the
    table; then it is stopped."""  # fmt: skip
    lost = await intact(api, before)
    fault_line(cluster, fault, during, after, len(lost))
    assert not lost, lost
    await stopped(api, before["id"])


async def stopped(api: httpx.AsyncClient, sid: str) -> None:
    response = await api.delete(f"/api/v1/services/{sid}")
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "cancelled", response.text


STALE = 4.0  # GATEWAY_VIEW_MAX_STALE_SECONDS of the gateways here
SAVED = 6.0


@pytest.fixture
def gateway(cluster: LocalCluster) -> Iterator[GatewayProcess]:
    with GatewayProcess(cluster, GATEWAY_VIEW_MAX_STALE_SECONDS=str(STALE)) as process:
        yield process


async def answers_of(checks: dict[str, Awaitable[httpx.Response]]) -> dict[str, str]:
    got = await asyncio.gather(*map(answer, checks.values()))
    return dict(zip(checks, got, strict=True))


def table(answers: dict[str, str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in answers.items())


async def test_slurmctld_killed(
    cluster: LocalCluster, gateway: GatewayProcess, api: httpx.AsyncClient
) -> None:
    before = await running_service(api)
    sid = before["id"]
    # slurmctld writes its state at most SAVE_MAX_WAIT (5 s) after a change; a
    # job killed sooner comes back PENDING and Slurm starts it again.
    await asyncio.sleep(SAVED)
    for pid in cluster.daemon_pids("slurmctld"):
        os.kill(pid, signal.SIGKILL)
    down_at = time.monotonic()
    try:
        # At once: reads and prompts from the view; what needs slurmctld is a
        # 503 with Retry-After, whatever the slurmrestd release makes of it.
        early = await answers_of(
            {
                "prompt": prompt(api, sid),
                "list": api.get("/api/v1/services"),
                "create": api.post("/api/v1/services", json={"recipe_name": "testing/openai-stub"}),
                "stop": api.delete(f"/api/v1/services/{sid}"),
                "ready": api.get("/api/v1/ready"),
            }
        )
        # Past the view's staleness bound, reads are 503 too.
        await asyncio.sleep(max(0.0, STALE + 1 - (time.monotonic() - down_at)))
        late = await answers_of(
            {"list": api.get("/api/v1/services"), "status": api.get(f"/api/v1/services/{sid}")}
        )
    finally:
        await cluster_up(cluster)
    assert early["prompt"] == "200", early
    assert early["list"] == "200", early
    for name in ("create", "stop"):
        assert early[name].startswith("503 Retry-After="), early
    assert early["ready"] == "503", early
    for name in ("list", "status"):
        assert late[name].startswith("503 Retry-After="), late
    await closed(
        api, cluster, before, "slurmctld killed (SIGKILL), then restarted",
        f"{table(early)}; after {STALE:g} s: {table(late)}",
    )  # fmt: skip


# -- faults on one cluster ---------------------------------------------------------


@pytest.fixture
async def one() -> AsyncIterator[One]:
    assert ONE is not None
    async with serving(ONE, GATEWAY_VIEW_MAX_STALE_SECONDS=str(STALE)) as api, cleaned(api):
        yield ONE, api


@pytest.fixture
async def before(one: One) -> dict[str, Any]:
    """A running service on ONE, as the API describes it before the fault."""
    return await running_service(one[1])


async def test_slurmd_killed(one: One, before: dict[str, Any]) -> None:
    cluster, api = one
    sid = before["id"]
    for pid in cluster.daemon_pids("slurmd"):
        os.kill(pid, signal.SIGKILL)
    try:
        # The job's processes outlive slurmd (slurmstepd holds them), and
        # slurmctld only notices after SlurmdTimeout: the service goes on.
        during = await answers_of(
            {
                "status": api.get(f"/api/v1/services/{sid}/status"),
                "prompt": prompt(api, sid),
                "list": api.get("/api/v1/services"),
                "ready": api.get("/api/v1/ready"),
            }
        )
        state = (await api.get(f"/api/v1/services/{sid}/status")).json()["status"]
    finally:
        await cluster_up(cluster)
    assert set(during.values()) == {"200"}, during
    assert state == "running"
    await closed(
        api, cluster, before, "slurmd killed (SIGKILL), then restarted",
        f"{table(during)}, status `{state}`",
    )  # fmt: skip


async def test_node_drained(one: One, before: dict[str, Any]) -> None:
    cluster, api = one
    sid = before["id"]
    node = before["node"]
    scontrol(cluster, "update", f"nodename={node}", "state=drain", "reason=gw-fault-test")
    try:
        created = await api.post("/api/v1/services", json={"recipe_name": "testing/openai-stub"})
        assert created.status_code == 201, created.text
        queued = created.json()["id"]
        # Slurm says ReqNodeNotAvail; the gateway adds which node and why.
        waiting = await poll(
            lambda: api.get(f"/api/v1/services/{queued}/status"),
            # "draining": the first service still runs there.
            lambda r: f"node {node} draining (gw-fault-test)" in r.json()["status_reason"],
            timeout=60,  # the node listing is renewed every 30 s, in the background
            what="a pending reason naming the drained node",
        )
        pending = waiting.json()
        assert pending["status"] == "pending", pending
        running_prompt = (await prompt(api, sid)).status_code
    finally:
        scontrol(cluster, "update", f"nodename={node}", "state=resume")
    assert running_prompt == 200
    await poll(
        lambda: api.get(f"/api/v1/services/{queued}/status"),
        lambda r: r.json()["status"] == "running",
        timeout=60,
        what="the queued service running once the node is back",
    )
    await stopped(api, queued)
    await closed(
        api, cluster, before, "node drained, then resumed",
        f"running service: prompt 200; new service: pending, \"{pending['status_reason']}\"",
        "new service running; the first intact",
    )  # fmt: skip


async def test_gateway_killed_mid_stream(one: One) -> None:
    cluster, api = one
    created = await api.post(
        "/api/v1/services",
        json={
            "recipe_name": "testing/openai-stub",
            "config": {"environment": {"STUB_CHUNK_DELAY_MS": "100"}},
        },
    )
    assert created.status_code == 201, created.text
    sid = created.json()["id"]
    victim = GatewayProcess(cluster)
    await asyncio.to_thread(victim.start)
    try:
        async with httpx.AsyncClient(base_url=victim.url, timeout=60) as doomed:
            for replica in (doomed, api):
                await poll(
                    partial(replica.get, f"/api/v1/services/{sid}/status"),
                    lambda r: r.json()["status"] == "running",
                    timeout=60,
                )
            before = (await api.get(f"/api/v1/services/{sid}")).json()
            body = {"prompt": "hi", "max_tokens": 40, "stream": True}
            received = 0

            async def read_until_killed() -> None:
                nonlocal received
                async with doomed.stream("POST", f"/api/v1/vllm/{sid}/prompt", json=body) as s:
                    assert s.status_code == 200
                    async for _ in s.aiter_lines():
                        received += 1
                        if received == 6:
                            assert victim.process is not None
                            victim.process.kill()

            with pytest.raises(httpx.TransportError) as cut:
                await read_until_killed()
    finally:
        await asyncio.to_thread(victim.stop)
    # The other replica never noticed: same service, streams to the end.
    during = await answers_of({"status": api.get(f"/api/v1/services/{sid}/status")})
    streamed = await prompt(api, sid, stream=True)
    assert streamed.status_code == 200
    await closed(
        api, cluster, before, "a replica killed (SIGKILL) mid-stream, another replica serving",
        f"client of the killed replica: {type(cut.value).__name__} after {received} lines; "
        f"other replica: {table(during)}, stream 200 to [DONE]",
    )  # fmt: skip


async def test_comment_overwritten_by_its_owner(one: One, before: dict[str, Any]) -> None:
    cluster, api = one
    sid = before["id"]
    await asyncio.to_thread(
        cluster.run_as, cluster.user, "scontrol", "update", f"jobid={sid}",
        "comment=phase=running|endpoint=evil.example:80",
    )  # fmt: skip
    # Still the gateway's (its user, its output file), but nothing the comment
    # held is trusted now: no endpoint, no prompts, and it says why.
    now = await poll(
        lambda: api.get(f"/api/v1/services/{sid}"),
        lambda r: r.status_code != 200 or r.json()["status"] != "running",
        timeout=15,
        what="the gateway noticing the overwritten comment",
    )
    assert now.status_code == 200, now.text
    service = now.json()
    assert service["status"] == "failed", service
    assert "overwritten" in service["status_reason"]
    assert service["endpoint"] is None
    assert service["slurm_state"] == "RUNNING"
    assert service["recipe_name"] == before["recipe_name"]
    listed = {s["id"] for s in (await api.get("/api/v1/services")).json()}
    refused = await prompt(api, sid)
    assert refused.status_code == 409, refused.text
    assert "overwritten" in refused.text
    logs = await api.get(f"/api/v1/services/{sid}/logs")
    assert logs.status_code == 200, logs.text
    first = await api.delete(f"/api/v1/services/{sid}")
    assert first.status_code == 200, first.text
    assert first.json()["status"] == "cancelled"
    fault_line(
        cluster, "job comment overwritten by its owner (scontrol update)",
        f"listed: {sid in listed}, status `failed` (\"overwritten...\"), endpoint none, "
        f"prompt {refused.status_code}, logs {logs.status_code}",
        "stop 200, cancelled", 0 if sid in listed else 1,
    )  # fmt: skip
    assert sid in listed

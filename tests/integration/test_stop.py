"""DELETE is safe to repeat: clients stop services in cleanup paths and retry
on timeouts. Whatever a service became (running, failed, completed, cancelled,
timed out), each DELETE answers 200 with its final state; only an unknown id
is 404. One test over every cluster at once, so that the time limit (Slurm's
smallest is a minute) is waited for once.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx

from gateway.testing.clusters import LocalCluster
from tests.support.clusters import CLUSTERS, TIMINGS, fault_line
from tests.support.containers import cold_and_warm
from tests.support.gateway_process import serving
from tests.support.live_services import Services

TIME_LIMIT_WAIT = 180.0  # a one-minute limit, slurmctld's check interval and KillWait


async def delete_twice(api: httpx.AsyncClient, sid: str, final: str) -> list[dict[str, Any]]:
    answers = []
    for _ in range(2):
        response = await api.delete(f"/api/v1/services/{sid}")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        assert body["id"] == sid
        assert body["status"] == final, body
        answers.append(body)
    return answers


async def walk(cluster: LocalCluster) -> str:
    async with serving(cluster) as api:
        services = Services(api)
        try:
            return await stop_each_kind(cluster, api, services)
        finally:
            await services.cleanup()


async def stop_each_kind(cluster: LocalCluster, api: httpx.AsyncClient, services: Services) -> str:
    timed = await services.create(
        {"recipe_name": "testing/http", "config": {"resources": {"time_limit": 1}}}
    )
    started = time.monotonic()
    running = await services.http()
    failed = await services.http(PORT="1")  # port 1 cannot be bound
    completed = await services.http(RUN_SECONDS="1")

    await services.wait(running["id"], "running")
    first, again = await delete_twice(api, running["id"], "cancelled")
    assert first["message"] == f"Service {running['id']} stopped successfully"
    assert "already ended" in again["message"]

    ended = await services.wait(failed["id"], "failed", "completed", "cancelled", "timeout")
    assert ended["status"] == "failed", ended
    assert "port 1" in ended["status_reason"]
    await delete_twice(api, failed["id"], "failed")

    ended = await services.wait(completed["id"], "completed", "failed", "cancelled", "timeout")
    assert ended["status"] == "completed", ended
    await delete_twice(api, completed["id"], "completed")
    assert (await services.status(completed["id"]))["status"] == "completed"

    assert (await services.status(timed["id"]))["status"] in (
        "pending",
        "building",
        "starting",
        "running",
    )
    ended = await services.wait(
        timed["id"], "timeout", "failed", "cancelled", "completed", timeout=TIME_LIMIT_WAIT
    )
    assert ended["status"] == "timeout", ended
    took = time.monotonic() - started
    await delete_twice(api, timed["id"], "timeout")

    unknown = await api.delete("/api/v1/services/987654321")
    assert unknown.status_code == 404, unknown.text
    await metrics_count_this(api)
    fault_line(
        cluster, "a job reaches its time limit (1 minute)",
        "status running until the limit",
        f"status `timeout` after {took:.0f} s (\"{ended['status_reason']}\"), stop 200 twice", 0,
    )  # fmt: skip
    return f"{cluster.name}: a 1-minute limit ended `timeout` after {took:.0f} s"


def value(text: str, prefix: str) -> float:
    """The sum of the samples of ``text`` whose line starts with ``prefix``."""
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix)
    )


async def metrics_count_this(api: httpx.AsyncClient) -> None:
    """What this walk did shows in /metrics: requests by route, slurmrestd
    calls by operation, services by recipe and status."""
    text = (await api.get("/metrics")).text
    deletes = 'gateway_http_request_duration_seconds_count{method="DELETE",'
    assert value(text, deletes + 'path="/api/v1/services/{service_id}",status="200"}') >= 8
    assert value(text, deletes + 'path="/api/v1/services/{service_id}",status="404"}') >= 1
    slurm = "gateway_slurm_request_duration_seconds_count"
    assert value(text, f'{slurm}{{operation="submit",outcome="ok"}}') >= 4
    assert value(text, f'{slurm}{{operation="cancel",outcome="ok"}}') >= 1
    assert value(text, f'{slurm}{{operation="list_jobs",outcome="ok"}}') >= 1
    assert value(text, 'gateway_services{recipe="testing/http",status="timeout"}') >= 1


async def test_delete_is_safe_to_repeat_whatever_the_service_became(tmp_path: Path) -> None:
    # Beside the walks, which wait for a time limit: vLLM in Apptainer, which
    # waits on a conversion and vLLM's starts (tests/support/containers.py).
    *lines, containers = await asyncio.gather(*(walk(c) for c in CLUSTERS), cold_and_warm(tmp_path))
    TIMINGS.append("stop twice: 200 with the final state each time; " + "; ".join(lines))
    TIMINGS.append(containers)

"""Idle stop on a real cluster (run by tests/integration/test_elastic.py
beside the elastic deployments, as both wait on idle windows): a service
created with ``idle_stop_minutes`` stops itself once its server has had no
request for that long, and ends ``completed`` saying why; one that keeps
getting requests runs on.

Two services of tests/recipes/testing/openai-stub (its /metrics has vLLM's
names) behind one gateway process, both with idle_stop_minutes=1 (the least a
request may ask; the job polls every 10 s). One is left alone, the other gets
a prompt every 5 s. Both are stopped at the end.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx

from gateway.testing.clusters import LocalCluster
from tests.support.gateway_process import GatewayProcess
from tests.support.live_services import Services, prompt
from tests.support.polling import poll

REASON = "stopped itself after 1 min without a request"
# One idle minute, a 10 s poll, the gateway's view and the server's stop.
IDLE_DEADLINE = 90.0
BUSY_SECONDS = 90.0
PROMPT_EVERY = 5.0


def stub(name: str) -> dict[str, Any]:
    return {
        "recipe_name": "testing/openai-stub",
        "config": {"environment": {"VLLM_SERVED_MODEL_NAME": name}},
        "idle_stop_minutes": 1,
    }


async def idle_stop(cluster: LocalCluster) -> str:
    """The scenario; its summary line."""
    gateway = GatewayProcess(cluster)
    await asyncio.to_thread(gateway.start)  # the other scenarios go on meanwhile
    try:
        async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as api:
            services = Services(api)
            try:
                return await _scenario(services, cluster.name)
            finally:
                await services.cleanup()
    finally:
        await asyncio.to_thread(gateway.stop)


async def _scenario(services: Services, cluster: str) -> str:
    idle = await services.create(stub("idle-alone"))
    busy = await services.create(stub("idle-busy"))
    assert idle["idle_stop_minutes"] == busy["idle_stop_minutes"] == 1
    await asyncio.gather(
        services.wait(idle["id"], "running", timeout=90),
        services.wait(busy["id"], "running", timeout=90),
    )
    started = time.monotonic()

    async def keep_busy() -> int:
        answered = 0
        while time.monotonic() - started < BUSY_SECONDS:
            response = await prompt(services.api, busy["id"])
            assert response.status_code == 200, response.text
            answered += 1
            await asyncio.sleep(PROMPT_EVERY)
        return answered

    async def idle_ends() -> tuple[dict[str, Any], float]:
        ended = await services.wait(idle["id"], "completed", timeout=IDLE_DEADLINE)
        return ended, time.monotonic() - started

    answered, (ended, took) = await asyncio.gather(keep_busy(), idle_ends())
    assert ended["status_reason"] == REASON, ended
    # The job itself ended, and well: Slurm says COMPLETED (exit 0), not cancelled.
    final = await poll(
        lambda: services.status(idle["id"]),
        lambda s: s["slurm_state"] == "COMPLETED",
        timeout=30,
        what=f"service {idle['id']}'s job ended",
    )
    assert (final["status"], final["status_reason"]) == ("completed", REASON), final
    still = await services.status(busy["id"])
    assert still["status"] == "running", still
    return (
        f"idle stop on {cluster}: the idle service ended completed ({REASON!r}) within "
        f"{took:.0f} s of running; the busy one answered {answered} prompts in "
        f"{BUSY_SECONDS:.0f} s and still runs"
    )

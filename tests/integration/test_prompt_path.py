"""The prompt path leans on the job view, not on Slurm: a running service keeps
answering while slurmrestd is down (for the view's staleness bound), nothing
needs a restart when it is back, and a stopped service stops taking prompts at
once on the replica that stopped it and within the view's bound on the others.

The upstream is the OpenAI-shaped stub recipe (tests/recipes/testing/openai-stub),
which answers like vLLM's OpenAI server.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from gateway.testing.clusters import LocalCluster
from tests.support.clusters import TIMINGS, cluster_up, fault_line
from tests.support.gateway_process import GatewayProcess
from tests.support.live_services import prompt, running_stub
from tests.support.polling import poll

ROOT = Path(__file__).resolve().parents[2]
STALE = 6.0  # GATEWAY_VIEW_MAX_STALE_SECONDS for these gateways
BOUND = 5.0  # refresh interval (1 s) plus a listing, with room for this machine


@pytest.fixture
def gateway(cluster: LocalCluster) -> Iterator[GatewayProcess]:
    with GatewayProcess(cluster, GATEWAY_VIEW_MAX_STALE_SECONDS=str(STALE)) as process:
        yield process


@pytest.fixture
async def api(gateway: GatewayProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:
        yield client


async def test_prompts_go_on_while_slurmrestd_is_down_and_stop_with_the_service(
    cluster: LocalCluster, gateway: GatewayProcess, api: httpx.AsyncClient
) -> None:
    sid = await running_stub(api)
    assert (await prompt(api, sid)).status_code == 200
    # What the fast path hands to the route keeps the route's answers.
    path = f"/api/v1/vllm/{sid}/prompt"
    empty = await api.post(path, json={"prompt": ""})
    assert empty.status_code == 422, empty.text
    assert [e["field"] for e in empty.json()["errors"]] == ["prompt"]
    unknown = await api.post(path, json={"prompt": "hi", "colour": "red"})
    assert unknown.status_code in (400, 422), unknown.text
    assert "colour" in unknown.text
    garbled = await api.post(
        path, content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert garbled.status_code == 400, garbled.text
    missing = await api.post("/api/v1/vllm/999999999/prompt", json={"prompt": "hi"})
    assert missing.status_code == 404, missing.text

    pids = cluster.daemon_pids("slurmrestd")
    assert pids, "no slurmrestd to stop"
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    down_at = time.monotonic()
    try:
        await poll(
            lambda: api.get("/api/v1/ready"), lambda r: r.status_code == 503, timeout=15
        )  # fmt: skip
        # For the staleness bound, both kinds of prompt still reach the service.
        answered = 0
        while time.monotonic() - down_at < STALE - 0.5:
            for stream in (False, True):
                response = await prompt(api, sid, stream)
                assert response.status_code == 200, response.text
                answered += 1
            await asyncio.sleep(0.2)
        # Past the bound, what needs Slurm says to come back later.
        await asyncio.sleep(max(0.0, STALE + 1 - (time.monotonic() - down_at)))
        listed = await api.get("/api/v1/services")
        late = f"{listed.status_code} Retry-After={listed.headers.get('retry-after')}"
        assert late == "503 Retry-After=5", late
    finally:
        await cluster_up(cluster)
    TIMINGS.append(
        f"prompt path on {cluster.name}: {answered} prompts answered while slurmrestd "
        f"was down ({STALE:g} s staleness bound)"
    )
    fault_line(
        cluster, "slurmrestd killed (SIGTERM), then restarted",
        f"ready 503; {answered} prompts 200 within the {STALE:g} s staleness bound; "
        f"then reads {late}",
        "ready 200, status running, prompt 200, no gateway restart", 0,
    )  # fmt: skip
    # Back without a gateway restart: reads and prompts work again.
    await poll(lambda: api.get("/api/v1/ready"), lambda r: r.status_code == 200, timeout=30)
    await poll(
        lambda: api.get(f"/api/v1/services/{sid}/status"),
        lambda r: r.status_code == 200 and r.json()["status"] == "running",
        timeout=30,
    )
    assert (await prompt(api, sid, stream=True)).status_code == 200
    # Every one of those prompts is counted, with the tokens the stub reported.
    metrics = (await api.get("/metrics")).text
    counted = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("gateway_prompt")
    }
    assert counted['gateway_prompts_total{outcome="ok",stream="true"}'] >= answered / 2
    assert counted['gateway_prompts_total{outcome="ok",stream="false"}'] >= answered / 2
    assert counted['gateway_prompt_first_byte_seconds_count{stream="true"}'] >= answered / 2
    # 4 tokens a prompt, streams included (the stub sends usage, as vLLM does when asked)
    assert counted['gateway_prompt_tokens_total{kind="completion"}'] >= 4 * answered

    # A stop: the replica that stopped it refuses prompts at once, another
    # replica within the bound.
    with GatewayProcess(cluster) as second:
        async with httpx.AsyncClient(base_url=second.url, timeout=30) as other:
            assert (await prompt(other, sid)).status_code == 200
            stopped = await api.delete(f"/api/v1/services/{sid}")
            assert stopped.json()["status"] == "cancelled", stopped.text
            t0 = time.monotonic()
            refused = await prompt(api, sid)
            assert refused.status_code == 409, refused.text
            assert refused.json()["service_status"] == "cancelled"
            await poll(
                lambda: prompt(other, sid),
                lambda r: r.status_code == 409,
                timeout=BOUND,
                interval=0.05,
            )
            TIMINGS.append(
                f"prompt path on {cluster.name}: another replica refused prompts to a "
                f"stopped service after {time.monotonic() - t0:.2f} s"
            )

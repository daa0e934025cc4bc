"""An elastic deployment of the real vLLM on c2205, started from zero by
the first requests: without waiting, 503 with Retry-After; with
``Prefer: wait``, the first token once it answers; the next request to the
same replica. (The scenarios with the stub run beside the other
deployments': tests/integration/test_deployments.py.)"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from gateway.testing.clusters import LocalCluster
from tests.support.clusters import NO_VLLM, TIMINGS, VLLM_CLUSTERS
from tests.support.deployments import TEAM_A, Fleet
from tests.support.elastic import chat, elastic, unique

pytestmark = pytest.mark.skipif(not VLLM_CLUSTERS, reason=NO_VLLM)


async def vllm_from_zero(cluster: LocalCluster, folder: Path) -> str:
    model, name = f"zero-{cluster.name}", unique("zero")
    fleet = Fleet(cluster, folder, 1)
    await fleet.start()
    client = fleet.clients[0]
    try:
        fleet.declare(
            elastic(
                name, "inference/vllm", model, low=0, high=1, tenant=None, idle_seconds=600,
                env={"VLLM_CPU_OMP_THREADS_BIND": "nobind"},
            )
        )  # fmt: skip
        await fleet.until(name, "declared at zero", lambda d: d.get("state") == "ready")
        refused = await client.post("/v1/chat/completions", json=chat(model), headers=TEAM_A)
        assert refused.status_code == 503, refused.text
        retry = refused.headers["retry-after"]
        # Waiting mode: the same request, held until vLLM answers.
        began = time.monotonic()
        first_token = None
        headers = {**TEAM_A, "Prefer": "wait=400"}
        async with client.stream(
            "POST", "/v1/chat/completions", json=chat(model, stream=True), headers=headers,
            timeout=450,
        ) as answer:  # fmt: skip
            assert answer.status_code == 200, await answer.aread()
            first_service = answer.headers["x-gateway-service-id"]
            async for line in answer.aiter_lines():
                if first_token is None and '"content"' in line:
                    first_token = time.monotonic() - began
        second = await client.post("/v1/chat/completions", json=chat(model), headers=TEAM_A)
        assert second.status_code == 200, second.text
        assert second.headers["x-gateway-service-id"] == first_service
        assert first_token is not None
        return (
            f"vLLM from zero on {cluster.name}: without waiting 503 Retry-After {retry} s; "
            f"with Prefer: wait, first token after {first_token:.1f} s; the next request "
            f"served by the same replica ({first_service})"
        )
    finally:
        await fleet.close()


async def test_a_vllm_deployment_at_zero_starts_on_the_first_request(tmp_path: Path) -> None:
    line = await vllm_from_zero(VLLM_CLUSTERS[0], tmp_path)
    print(line)
    TIMINGS.append(line)

"""Latency of a small prompt through the gateway against the same request sent
straight to vLLM, measured side by side in one run.

Starts a gateway process on the local cluster (or uses --gateway), starts one
vLLM service through it, then alternates the two kinds of request so both see
the same machine state, and prints medians, 90th percentiles and their ratio.

    python bench/prompt_latency.py [--requests 40] [--max-tokens 16]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.testing.clusters import LocalCluster, discover, upstream_key  # noqa: E402
from tests.support.gateway_process import GatewayProcess  # noqa: E402


async def wait_running(api: httpx.AsyncClient, sid: str, limit: float) -> dict[str, Any]:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        status: dict[str, Any] = (await api.get(f"/api/v1/services/{sid}/status")).json()
        if status["status"] == "running":
            return status
        if status["status"] in ("failed", "cancelled", "completed", "timeout"):
            raise SystemExit(f"service {sid} ended: {status['status_reason']}")
        await asyncio.sleep(1)
    raise SystemExit(f"service {sid} not running after {limit}s")


def summary(name: str, seconds: list[float]) -> tuple[float, float]:
    ms = sorted(s * 1000 for s in seconds)
    median = statistics.median(ms)
    p90 = ms[int(0.9 * (len(ms) - 1))]
    print(f"{name:>10}: median {median:7.1f} ms   p90 {p90:7.1f} ms   n={len(ms)}")
    return median, p90


async def run(
    gateway_url: str,
    requests: int,
    max_tokens: int,
    cluster: LocalCluster,
    gateway_env: Mapping[str, str],
) -> None:
    async with httpx.AsyncClient(base_url=gateway_url, timeout=300) as api:
        body = {"recipe_name": "inference/vllm"}
        created = (await api.post("/api/v1/services", json=body)).json()
        sid = created["id"]
        try:
            status = await wait_running(api, sid, 600)
            endpoint = status["endpoint"]
            model = created["config"]["environment"]["VLLM_MODEL"]
            prompt = {"prompt": "Say hello", "max_tokens": max_tokens, "temperature": 0}
            direct_body = {
                "model": model,
                "messages": [{"role": "user", "content": "Say hello"}],
                "max_tokens": max_tokens,
                "temperature": 0,
            }
            # vLLM wants the service's key, which only the gateway's secret derives.
            key = await upstream_key(cluster, gateway_env, int(sid))
            headers = {"Authorization": f"Bearer {key}"}
            async with httpx.AsyncClient(timeout=300, headers=headers) as vllm:
                # Warm both paths (first requests compile and fill caches).
                for _ in range(3):
                    await api.post(f"/api/v1/vllm/{sid}/prompt", json=prompt)
                    await vllm.post(f"{endpoint}/v1/chat/completions", json=direct_body)
                via_gateway: list[float] = []
                direct: list[float] = []
                for _ in range(requests):
                    t0 = time.perf_counter()
                    r = await api.post(f"/api/v1/vllm/{sid}/prompt", json=prompt)
                    via_gateway.append(time.perf_counter() - t0)
                    r.raise_for_status()
                    t0 = time.perf_counter()
                    r = await vllm.post(f"{endpoint}/v1/chat/completions", json=direct_body)
                    direct.append(time.perf_counter() - t0)
                    r.raise_for_status()
            print(f"{requests} prompts of {max_tokens} tokens, alternating, model {model}")
            d_median, d_p90 = summary("direct", direct)
            g_median, g_p90 = summary("gateway", via_gateway)
            print(
                f"     ratio: median {g_median / d_median:.3f}   p90 {g_p90 / d_p90:.3f}"
                f"   (gateway / direct; added median {g_median - d_median:.1f} ms)"
            )
        finally:
            await api.delete(f"/api/v1/services/{sid}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--cluster", default="c2205", help="local cluster of the gateway")
    parser.add_argument("--gateway", help="URL of a running gateway instead of starting one")
    args = parser.parse_args()
    cluster = next((c for c in discover() if c.name == args.cluster), None)
    if cluster is None:
        raise SystemExit(f"no local cluster {args.cluster}; run `make cluster`")
    if args.gateway:
        # A running gateway: its GATEWAY_* settings must be in this environment.
        asyncio.run(run(args.gateway, args.requests, args.max_tokens, cluster, os.environ))
        return 0
    with GatewayProcess(cluster) as gateway:
        asyncio.run(run(gateway.url, args.requests, args.max_tokens, cluster, gateway.env))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Health probes: many services at once stay bounded and are not failed by the bound."""

from __future__ import annotations

import asyncio

import httpx
from pytest_httpx import HTTPXMock

from gateway.upstream.probe import HealthProber


async def test_many_probes_queue_for_slots_and_all_pass(httpx_mock: HTTPXMock) -> None:
    in_flight = 0
    most = 0

    async def slow(request: httpx.Request) -> httpx.Response:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        await asyncio.sleep(0.05)
        in_flight -= 1
        return httpx.Response(200)

    httpx_mock.add_callback(slow, is_reusable=True)
    # Each probe may take 0.3 s; 100 of them, 8 at a time, take longer than
    # that in all: waiting for a slot must not count against a probe.
    prober = HealthProber(timeout=0.3, ttl=5, max_concurrent=8)
    try:
        results = await asyncio.gather(
            *(prober.healthy(f"http://10.0.0.{i}:8000/health") for i in range(100))
        )
    finally:
        await prober.aclose()
    assert all(results)
    assert most == 8

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
    prober = HealthProber(
        timeout=0.3, ttl=5, max_concurrent=8, transport=httpx.AsyncHTTPTransport()
    )
    try:
        results = await asyncio.gather(
            *(prober.healthy(f"http://10.0.0.{i}:8000/health") for i in range(100))
        )
    finally:
        await prober.aclose()
    assert all(results)
    assert most == 8


async def test_an_expired_answer_is_given_at_once_while_a_new_probe_runs(
    httpx_mock: HTTPXMock,
) -> None:
    calls = 0

    async def answer(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.3 if calls > 1 else 0)
        return httpx.Response(200 if calls == 1 else 503)

    httpx_mock.add_callback(answer, is_reusable=True)
    prober = HealthProber(timeout=1, ttl=0.1, transport=httpx.AsyncHTTPTransport())
    url = "http://10.0.0.1:8000/health"
    try:
        assert await prober.healthy(url)
        await asyncio.sleep(0.15)  # expired, but recent
        t0 = asyncio.get_running_loop().time()
        assert await prober.healthy(url), "the stale answer was not given"
        assert asyncio.get_running_loop().time() - t0 < 0.1, "the caller waited for the probe"
        await asyncio.sleep(0.4)  # the background probe has finished by now
        assert not await prober.healthy(url), "the new answer was not kept"
        await asyncio.sleep(0.5)  # too old to give out: the caller waits for a probe
        assert not await prober.healthy(url)
        assert calls == 3
    finally:
        await prober.aclose()

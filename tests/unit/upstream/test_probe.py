"""Health probes: many services at once stay bounded and are not failed by the
bound; a recent answer is given at once while a new probe runs."""

from __future__ import annotations

import asyncio

from gateway.upstream.probe import HealthProber
from tests.support.http_stub import Overlap, Seen, http_stub, response


async def test_many_probes_queue_for_slots_and_all_pass() -> None:
    overlap = Overlap()
    async with http_stub(overlap.answer(0.05)) as stub:
        # Each probe may take 0.3 s; 100 of them, 8 at a time, take longer than
        # that in all: waiting for a slot must not count against a probe.
        prober = HealthProber(timeout=0.3, ttl=5, max_concurrent=8)
        try:
            results = await asyncio.gather(
                *(prober.healthy(f"{stub.url}/health/{i}") for i in range(100))
            )
        finally:
            await prober.aclose()
    assert all(results)
    assert overlap.most == 8


async def test_an_expired_answer_is_given_at_once_while_a_new_probe_runs() -> None:
    calls = 0

    async def answer(seen: Seen, writer: asyncio.StreamWriter) -> None:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.3 if calls > 1 else 0)
        writer.write(response(200 if calls == 1 else 503))

    async with http_stub(answer) as stub:
        prober = HealthProber(timeout=1, ttl=0.1)
        url = f"{stub.url}/health"
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

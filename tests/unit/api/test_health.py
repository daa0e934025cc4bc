"""/api/v1/ready is public: the Slurm ping behind it is shared, one a second."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from litestar.datastructures import State

from gateway.api import health
from gateway.slurm import PingResult, SlurmUnavailable


class CountingSlurm:
    def __init__(self, fail: bool = False) -> None:
        self.pings = 0
        self.fail = fail

    async def ping(self) -> list[PingResult]:
        self.pings += 1
        await asyncio.sleep(0.05)
        if self.fail:
            raise SlurmUnavailable("slurmctld down")
        return [PingResult(hostname="c", responding=True, slurm_release="24.11", api_version="x")]


async def test_many_readiness_checks_cost_one_ping_a_second(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [1000.0]
    monkeypatch.setattr(health, "_clock", lambda: clock[0])
    state, slurm = State(), CountingSlurm()
    fake: Any = slurm
    answers = await asyncio.gather(*(health._shared_ping(state, fake) for _ in range(200)))
    assert slurm.pings == 1 and all(a[0].responding for a in answers)
    clock[0] += 0.5
    await health._shared_ping(state, fake)
    assert slurm.pings == 1
    clock[0] += 0.6
    await health._shared_ping(state, fake)
    assert slurm.pings == 2


async def test_a_failed_ping_is_shared_and_asked_again_a_second_later(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [1000.0]
    monkeypatch.setattr(health, "_clock", lambda: clock[0])
    state, slurm = State(), CountingSlurm(fail=True)
    fake: Any = slurm
    answers = await asyncio.gather(
        *(health._shared_ping(state, fake) for _ in range(20)), return_exceptions=True
    )
    assert slurm.pings == 1 and all(isinstance(a, SlurmUnavailable) for a in answers)
    slurm.fail = False
    clock[0] += 1.0
    assert (await health._shared_ping(state, fake))[0].responding
    assert slurm.pings == 2

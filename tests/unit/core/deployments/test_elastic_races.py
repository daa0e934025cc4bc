"""Races between gateway replicas and the clock of elastic deployments,
found in review (each failed before its fix): a replica woken for a request
is not scaled back to zero on arrival; a replica still reading the old file
does not undo a raised max_replicas; a scale-down late in a job's limit is
still on record, so the slot is not refilled."""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime
from pathlib import Path

from gateway.core.model import Service
from gateway.core.routing import ModelNotReady, ModelRouter
from gateway.slurm import JobState
from tests.unit.core.deployments.test_elastic import (
    TEAM_A,
    Loads,
    alive,
    file,
    gateway,
    rounds,
)


# Finding: the idle clock of a min_replicas=0 deployment runs while the woken
# job waits in Slurm's queue / starts; the moment it first answers it is scaled
# back to zero (before the request that woke it is served).
async def test_woken_replica_is_scaled_to_zero_as_soon_as_it_answers(tmp_path: Path) -> None:
    (tmp_path / "deployments.toml").write_text(
        file(min_replicas=0, max_replicas=1, idle_seconds=60, scale_down_seconds=30)
    )
    clock, loads = [1_000_000.0], Loads()
    g, fake = gateway(tmp_path, clock, loads)

    async def one_round() -> None:
        await g.services.view.fresh(g.services.view.clock())
        await g.reconcile()
        clock[0] += 2

    await one_round()
    router = ModelRouter(g.services, on_demand=g.elastic)
    with contextlib.suppress(ModelNotReady):
        await router.pick(TEAM_A, "tiny")
    await one_round()
    (job,) = alive(fake)
    # The job waits 90 s in Slurm's queue (busy cluster); clients keep retrying.
    for _ in range(45):
        with contextlib.suppress(ModelNotReady):
            await router.pick(TEAM_A, "tiny")
        await one_round()
    fake.advance(job, JobState.RUNNING, start_time=datetime.fromtimestamp(clock[0], UTC))
    await one_round()  # it answers for the first time: load 0 (the client is about to send)
    await one_round()
    limit = fake.jobs[job].time_limit_minutes
    status = await g.get("m", TEAM_A)
    print("limit", limit, "decisions", [d.reason for d in status.scaling.decisions])
    assert fake.count("shorten") == 0, (
        "the replica woken for a request was scaled to zero on arrival"
    )


# Finding: a raised max_replicas read by one gateway replica while another
# still reads the old file (ConfigMap propagation: up to a minute or more):
# the lagging one scales the new replica down at once (no grace for "over
# max_replicas"), the first one refills the slot, and so on: a job per cycle.
async def test_lagging_replica_undoes_a_raised_max(tmp_path: Path) -> None:
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    a_dir.mkdir(), b_dir.mkdir()
    old = file(max_replicas=2, scale_up_seconds=4, scale_down_seconds=30)
    (a_dir / "deployments.toml").write_text(old)
    (b_dir / "deployments.toml").write_text(old)
    clock, loads = [1_000_000.0], Loads()
    first, fake = gateway(a_dir, clock, loads)
    second = gateway(b_dir, clock, loads, fake)[0]
    first.elastic.grace = second.elastic.grace = 120
    await rounds(clock, fake, first, second, n=3)
    (one,) = alive(fake)
    loads.by_job[one] = 100  # far over the target: wants max
    await rounds(clock, fake, first, second, n=8)
    for j in alive(fake):
        loads.by_job[j] = 100
    assert len(alive(fake)) == 2
    base_submits, base_shortens = len(fake.submitted), fake.count("shorten")
    # The operator raises max to 3; only replica A has the new file so far.
    (a_dir / "deployments.toml").write_text(
        file(max_replicas=3, scale_up_seconds=4, scale_down_seconds=30)
    )
    for _ in range(30):  # 60 s of ConfigMap lag
        await rounds(clock, fake, first, second, n=1)
        for j in alive(fake):
            loads.by_job.setdefault(j, 100)
    extra_submits = len(fake.submitted) - base_submits
    extra_shortens = fake.count("shorten") - base_shortens
    print(f"\nin 60 s of lag: {extra_submits} submissions, {extra_shortens} scale-downs")
    assert extra_submits <= 1 and extra_shortens == 0


# Finding: a scale-down of a job whose limit is already within drain+margin
# (rounded up to a minute) of its end skips the shorten (plan._leave), so the job
# is stopped with nothing on record; size() then still counts its slot, and the
# next round whose decision is None (a failed /metrics read, or load in the band)
# resubmits it as 'replace'.
def text() -> str:
    return (
        '[deployments.m]\nrecipe_name = "testing/openai-stub"\ntenant = "team-a"\n'
        "min_replicas = 1\nmax_replicas = 2\ntarget_load = 4\nscale_up_seconds = 4\n"
        "scale_down_seconds = 6\nlead_seconds = 0\n"
        '[deployments.m.config.environment]\nVLLM_SERVED_MODEL_NAME = "tiny"\n'
        "[deployments.m.config.resources]\ntime_limit = 2\n"
    )


class Flaky(Loads):
    fail = False

    async def __call__(self, service: Service) -> tuple[float, float]:
        if self.fail:
            raise TimeoutError
        return await super().__call__(service)


async def test_stop_without_record_is_refilled(tmp_path: Path) -> None:
    (tmp_path / "deployments.toml").write_text(text())
    clock, loads = [1_000_000.0], Flaky()
    g, fake = gateway(tmp_path, clock, loads)
    await rounds(clock, fake, g, n=2)
    (one,) = alive(fake)
    loads.by_job[one] = 20
    await rounds(clock, fake, g, n=5)
    assert len(alive(fake)) == 2
    second = max(alive(fake))
    await rounds(clock, fake, g, n=15)  # the new replica runs ~30 s
    loads.by_job = {j: 0.1 for j in alive(fake)}
    await rounds(clock, fake, g, n=12)  # scale down, drain 10 s, stop
    print(
        "\nshortens", fake.count("shorten"), "state", fake.jobs[second].state, "alive", alive(fake)
    )
    before = len(fake.submitted)
    loads.fail = True  # one replica's /metrics times out for a few rounds
    await rounds(clock, fake, g, n=3)
    print("submitted after the read failures:", len(fake.submitted) - before)
    assert len(fake.submitted) == before

"""The shared job view: what it asks of Slurm, and what readers see."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

import pytest

from gateway.core.jobview import JobView
from gateway.slurm import JobInfo, JobList, JobState, SlurmUnavailable
from tests.support.polling import poll

STAMP = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


def job(job_id: int, state: JobState = JobState.RUNNING) -> JobInfo:
    return JobInfo(job_id=job_id, name="j", user_name="gwuser", state=state)


class FakeSlurm:
    """Answers job listings from ``self.jobs``; records when and with what
    ``changed_since`` each listing was asked for."""

    def __init__(self, *jobs: JobInfo) -> None:
        self.jobs = list(jobs)
        self.calls: list[tuple[float, datetime | None]] = []
        self.changed = True
        self.fail: Exception | None = None
        self.delay = 0.0

    async def list_jobs(self, changed_since: datetime | None = None) -> JobList:
        self.calls.append((time.monotonic(), changed_since))
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail is not None:
            raise self.fail
        if changed_since is not None and not self.changed:
            return JobList(jobs=(), unchanged=True)
        return JobList(jobs=tuple(self.jobs), last_update=STAMP)


def view_of(slurm: FakeSlurm, **options: float) -> JobView:
    settings = {"interval": 0.2, "min_gap": 0.05, **options}
    return JobView(slurm, **settings)  # type: ignore[arg-type]


async def test_concurrent_readers_share_one_listing() -> None:
    slurm = FakeSlurm(job(1), job(2))
    slurm.delay = 0.05
    view = view_of(slurm)
    results = await asyncio.gather(*(view.jobs() for _ in range(100)))
    assert all(sorted(j.job_id for j in r) == [1, 2] for r in results)
    assert len(slurm.calls) == 1
    # Within the refresh interval, reads cost Slurm nothing.
    for _ in range(100):
        assert await view.job(2) is not None
    assert len(slurm.calls) == 1


async def test_unknown_ids_cost_at_most_one_listing_per_min_gap() -> None:
    slurm = FakeSlurm(job(1))
    view = view_of(slurm, min_gap=0.1, interval=1.0)
    await view.jobs()
    started = time.monotonic()
    # 200 lookups of ids Slurm does not hold, in waves.
    for _ in range(4):
        found = await asyncio.gather(*(view.job(1000 + i) for i in range(50)))
        assert found == [None] * 50
    elapsed = time.monotonic() - started
    listings = len(slurm.calls) - 1
    assert 1 <= listings <= 1 + elapsed / 0.1
    gaps = [b[0] - a[0] for a, b in zip(slurm.calls, slurm.calls[1:], strict=False)]
    assert min(gaps) >= 0.1 * 0.95


async def test_a_job_submitted_elsewhere_is_found_by_a_fresh_listing() -> None:
    slurm = FakeSlurm(job(1))
    view = view_of(slurm, interval=5.0)
    await view.jobs()
    slurm.jobs.append(job(2))  # submitted through another replica
    found = await view.job(2)
    assert found is not None and found.job_id == 2


async def test_local_writes_show_at_once_and_newer_listings_win() -> None:
    slurm = FakeSlurm(job(1))
    slurm.delay = 0.1
    view = view_of(slurm, interval=5.0)
    await view.jobs()
    # A listing starts, then this replica creates job 2 before it answers.
    listing = asyncio.create_task(view.fresh(time.monotonic()))
    await asyncio.sleep(0.02)
    view.put(job(2, JobState.PENDING))
    await listing
    assert {j.job_id for j in await view.jobs()} == {1, 2}, "an older listing dropped a new job"
    # A listing that started after the write is Slurm's word.
    slurm.jobs.append(job(2, JobState.RUNNING))
    await view.fresh(time.monotonic())
    assert (await view.job(2)) == job(2, JobState.RUNNING)


async def test_deltas_use_slurms_mark_and_a_full_listing_comes_back_regularly() -> None:
    slurm = FakeSlurm(job(1))
    view = view_of(slurm, resync=0.3)
    await view.fresh(time.monotonic())
    slurm.changed = False
    await view.fresh(time.monotonic())
    assert slurm.calls[0][1] is None
    assert slurm.calls[1][1] == STAMP
    assert [j.job_id for j in await view.jobs()] == [1], "an unchanged answer emptied the view"
    await asyncio.sleep(0.3)
    await view.fresh(time.monotonic())
    assert slurm.calls[-1][1] is None, "no full listing after the resync period"


async def test_a_job_slurm_forgot_leaves_the_view() -> None:
    slurm = FakeSlurm(job(1), job(2))
    view = view_of(slurm)
    await view.jobs()
    slurm.jobs = [job(2)]
    await view.fresh(time.monotonic())
    assert await view.job(1) is None


async def test_the_loop_refreshes_while_used_and_rests_when_idle() -> None:
    slurm = FakeSlurm(job(1))
    view = view_of(slurm, interval=0.1, min_gap=0.05, idle_after=0.3)
    view.start()
    try:
        await view.jobs()

        async def listings() -> int:
            return len(slurm.calls)

        await poll(listings, lambda n: n >= 3, timeout=5)
        # Nobody reads: after idle_after the loop stops listing.
        await asyncio.sleep(0.5)
        resting = len(slurm.calls)
        await asyncio.sleep(0.4)
        assert len(slurm.calls) == resting
        # The first read after the rest waits for a fresh listing.
        slurm.jobs = [job(1), job(3)]
        assert await view.job(3) is not None
        assert len(slurm.calls) == resting + 1
    finally:
        await view.close()


async def test_failures_are_reported_once_the_view_is_too_old() -> None:
    slurm = FakeSlurm(job(1))
    slurm.fail = SlurmUnavailable("slurmrestd is down")
    view = view_of(slurm, interval=0.1, max_stale=0.5)
    with pytest.raises(SlurmUnavailable):
        await view.jobs()  # nothing to show yet
    slurm.fail = None
    assert [j.job_id for j in await recovered(view)] == [1]
    slurm.fail = SlurmUnavailable("slurmrestd is down")
    await asyncio.sleep(0.25)
    assert [j.job_id for j in await view.jobs()] == [1], "a short outage failed reads"
    await asyncio.sleep(0.4)
    with pytest.raises(SlurmUnavailable):
        await view.jobs()
    slurm.fail = None
    assert [j.job_id for j in await recovered(view)] == [1], "the view did not recover"


async def recovered(view: JobView, within: float = 2.0) -> list[JobInfo]:
    """The view's jobs once reads stop failing (after the back-off)."""
    deadline = time.monotonic() + within
    while True:
        try:
            return await view.jobs()
        except SlurmUnavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.02)


async def test_failed_listings_back_off_and_reads_fail_fast_meanwhile() -> None:
    slurm = FakeSlurm(job(1))
    view = view_of(slurm, interval=0.1, min_gap=0.02, max_stale=0.1, max_backoff=0.8)
    view.start()
    try:
        await view.jobs()
        slurm.fail = SlurmUnavailable("slurmrestd is down")
        await asyncio.sleep(0.15)
        slurm.calls.clear()
        failed = 0
        t0 = time.monotonic()
        while time.monotonic() - t0 < 1.5:  # a reader that never lets up
            try:
                await view.job(99)
            except SlurmUnavailable:
                failed += 1
            await asyncio.sleep(0.01)
        # Unthrottled: one listing per min_gap, 75. Backing off 0.2, 0.4, 0.8, 0.8 s: a few.
        assert len(slurm.calls) <= 6, slurm.calls
        assert failed > 50, "reads waited for listings instead of failing fast"
        slurm.fail = None
        assert [j.job_id for j in await recovered(view, within=1.0)] == [1]
    finally:
        await view.close()


async def test_waiting_for_a_job_to_end_shares_listings() -> None:
    slurm = FakeSlurm(job(1), job(2))
    view = view_of(slurm, min_gap=0.05)
    await view.jobs()

    async def end_later() -> None:
        await asyncio.sleep(0.2)
        slurm.jobs = [job(1, JobState.CANCELLED), job(2, JobState.CANCELLED)]

    ender = asyncio.create_task(end_later())
    ended = await asyncio.gather(
        *(
            view.wait_for(i, lambda j: j is None or j.state.is_terminal, within=5)
            for i in (1, 2) * 10
        )
    )
    await ender
    assert all(j is not None and j.state is JobState.CANCELLED for j in ended)
    # Twenty waiters, about one listing per min_gap: not one per waiter and step.
    assert len(slurm.calls) <= 1 + 0.3 / 0.05 + 2


async def test_a_local_write_that_hid_a_listed_state_makes_the_next_listing_full() -> None:
    slurm = FakeSlurm(job(1))
    slurm.delay = 0.1
    view = view_of(slurm)
    await view.jobs()
    # A create lands while a listing that already saw the job running is packed.
    listing = asyncio.create_task(view.fresh(view.clock()))
    await asyncio.sleep(0.05)
    slurm.jobs = [job(1), job(2)]
    view.put(job(2, JobState.PENDING))
    await listing
    slurm.changed = False  # a quiet cluster from now on
    slurm.calls.clear()
    await view.fresh(view.clock())
    assert slurm.calls[0][1] is None, "the next listing was a delta a quiet cluster ignores"
    assert (await view.job(2)) == job(2)


async def test_waiting_for_a_job_keeps_its_deadline_and_answers_when_listings_fail() -> None:
    slurm = FakeSlurm(job(1))
    view = view_of(slurm)
    await view.jobs()
    slurm.delay = 1.0
    t0 = time.monotonic()
    assert await view.wait_for(1, lambda j: False, within=0.3) == job(1)
    assert time.monotonic() - t0 < 0.6, "a slow listing held the caller past its deadline"
    slurm.delay = 0.0
    slurm.fail = SlurmUnavailable("slurmrestd is down")
    await asyncio.sleep(1.0)  # the slow listing ends, failing
    t0 = time.monotonic()
    assert await view.wait_for(1, lambda j: False, within=5) == job(1)
    assert time.monotonic() - t0 < 0.5

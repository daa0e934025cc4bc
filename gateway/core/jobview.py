"""One shared view of Slurm's jobs per gateway replica.

Every read of services (list, get, status, logs, the prompt path's lookup) is
answered from this view, so what the gateway asks of slurmctld does not grow
with the number of clients or polls:

* while the gateway is in use, one job listing (one ``REQUEST_JOB_INFO`` RPC)
  every ``interval`` seconds, sent with slurmrestd's ``update_time`` so that a
  quiet cluster answers "unchanged" without packing every job;
* listings a read needs sooner (an id the view does not know yet, a stop
  waiting for the job to end, the first read after an idle spell) share the
  next listing, and no listing starts less than ``min_gap`` seconds after the
  previous one: at most ``1 / min_gap`` listings per second, whatever happens;
* a listing that takes longer than half the interval (slurmrestd takes seconds
  for 10,000 jobs) spaces the loop's next one by twice its duration;
* after failed listings the loop backs off (doubling up to ``max_backoff``),
  and meanwhile reads that need a listing get the last error at once instead
  of queueing more listings on a slurmrestd that is struggling;
* nobody reading for ``idle_after`` seconds: no listings at all.

Slurm stays the record. A new or restarted replica builds its view with its
first listing; replicas never talk to each other. A replica shows what another
replica did within ``interval`` seconds plus one listing's time (which grows
with the queue: seconds for 10,000 jobs); what it did itself (create, stop)
shows at once. Listings that fail for ``max_stale`` seconds turn reads into
errors rather than old answers. Every ``resync`` seconds the listing is a
full one, whatever ``update_time`` says, so no delta can hide a change for long.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import math
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import structlog

from gateway.core.scheduler import Scheduler
from gateway.slurm import JobInfo, SlurmError

log = structlog.get_logger(__name__)

# Slurm's update_time is in whole seconds and compared against slurmctld's
# clock; without Slurm's own last_update (v0.0.38) our clock stands in, moved
# back by this much against skew.
_CLOCK_MARGIN = timedelta(seconds=2)


class _Entry:
    """A job record and the (monotonic) time at which it was true."""

    __slots__ = ("job", "seen")

    def __init__(self, job: JobInfo, seen: float) -> None:
        self.job = job
        self.seen = seen


class JobView:
    def __init__(
        self,
        slurm: Scheduler,
        *,
        interval: float = 1.0,
        min_gap: float = 0.25,
        idle_after: float = 30.0,
        resync: float = 60.0,
        max_stale: float = 30.0,
        max_backoff: float = 8.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if min_gap <= 0 or interval < min_gap:
            raise ValueError("need 0 < min_gap <= interval")
        self.slurm = slurm
        self.interval = interval
        self.min_gap = min_gap
        self.idle_after = idle_after
        self.resync = resync
        self.max_stale = max_stale
        self.max_backoff = max_backoff
        self.clock = clock
        self._jobs: dict[int, _Entry] = {}
        # Changes whenever the set of jobs or a job's record may have changed:
        # what is derived from all jobs at once is recomputed only then.
        self.generation = 0
        self._listed_at: float | None = None  # start of the newest listing applied
        self._last_start = -math.inf
        self._last_duration = 0.0
        self._last_full = -math.inf
        self._since: datetime | None = None
        self._last_read = -math.inf
        self._inflight: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._loop: asyncio.Task[None] | None = None
        self._unreadable = 0
        self._failures = 0
        self._last_error: SlurmError | None = None

    # -- lifecycle ------------------------------------------------------------

    def start(self) -> None:
        if self._loop is None:
            self._loop = asyncio.create_task(self._run(), name="job-view")

    async def close(self) -> None:
        for task in (self._loop, self._inflight):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._loop = None

    async def _run(self) -> None:
        while True:
            now = self.clock()
            if now - self._last_read > self.idle_after:
                # Idle: no listings until somebody reads again.
                self._wake.clear()
                await self._wake.wait()
                continue
            # A slow listing (a big queue) spaces the next one as far out: the
            # loop keeps slurmrestd busy half of the time at most.
            delay = self._last_start + max(self._backoff(), 2 * self._last_duration) - now
            if delay > 0:
                await asyncio.sleep(delay)
                continue
            try:
                await self.fresh(now)
            except SlurmError:
                pass  # logged by _list; reads report it once the view is too old
            except Exception:  # never let the loop die
                log.exception("job_view_refresh_failed")
                await asyncio.sleep(self.interval)

    # -- reads ----------------------------------------------------------------

    async def jobs(self) -> list[JobInfo]:
        """Every job Slurm holds, as of at most ``interval`` seconds ago."""
        await self._ready()
        return [entry.job for entry in self._jobs.values()]

    async def jobs_ready(self) -> None:
        """What ``jobs()`` waits for, without copying the jobs: read them
        with ``snapshot()`` next."""
        await self._ready()

    def snapshot(self) -> list[JobInfo]:
        """The jobs as last listed, however old: this neither waits nor counts
        as a read (a metrics scrape must not keep the view listing)."""
        return [entry.job for entry in self._jobs.values()]

    async def job(self, job_id: int) -> JobInfo | None:
        """The job, or None when Slurm does not hold it (checked with a fresh
        listing: it may have been submitted through another replica)."""
        await self._ready()
        entry = self._jobs.get(job_id)
        if entry is None:
            await self.fresh(self.clock())
            entry = self._jobs.get(job_id)
        return entry.job if entry else None

    def peek(self, job_id: int) -> JobInfo | None:
        """The job as last listed or put, with no wait and no listing."""
        entry = self._jobs.get(job_id)
        return entry.job if entry else None

    async def wait_for(
        self, job_id: int, done: Callable[[JobInfo | None], bool], within: float
    ) -> JobInfo | None:
        """The job once ``done(job)`` holds (None: Slurm forgot it), or as it is at
        the deadline. Waiters share listings."""
        deadline = self.clock() + within
        while True:
            left = deadline - self.clock()
            failed = False
            try:
                # A listing already under way may outlast the deadline: stop
                # waiting for it then (it goes on, shielded, for the others).
                await asyncio.wait_for(self.fresh(self.clock()), max(left, 0.0))
            except TimeoutError:
                pass
            except SlurmError:
                failed = True  # the caller's action is done: answer with the view
            entry = self._jobs.get(job_id)
            job = entry.job if entry else None
            if failed or done(job) or self.clock() >= deadline:
                return job

    def put(self, job: JobInfo) -> None:
        """What this replica just did to a job (created, stopped): shown at once,
        until a listing that started later says otherwise."""
        self._jobs[job.job_id] = _Entry(job, self.clock())
        self.generation += 1

    @property
    def age(self) -> float | None:
        """Seconds since the newest listing applied started (None: none yet)."""
        return None if self._listed_at is None else self.clock() - self._listed_at

    async def _ready(self) -> None:
        now = self.clock()
        idle = now - self._last_read > self.idle_after
        self._last_read = now
        if idle:
            self._wake.set()
        age = self.age
        if age is None or age > self.max_stale:
            # Nothing listed yet, or listings kept failing: a reader gets either
            # a fresh view or the error.
            await self.fresh(now)
        elif idle and age > self.interval:
            # The first read after an idle spell waits for a listing. While in
            # use the loop keeps listing, and a slow listing (thousands of jobs
            # take slurmrestd seconds) is waited for by the loop, not readers.
            try:
                await self.fresh(now)
            except SlurmError:
                log.warning("job_view_stale", age_s=round(age, 1))

    # -- listings -------------------------------------------------------------

    async def fresh(self, after: float) -> None:
        """Return once a listing that started at or after ``after`` is applied.

        Concurrent callers share one listing; none starts sooner than
        ``min_gap``, or the previous listing's duration, after the previous
        start. A failed listing raises to every caller waiting for it.
        """
        while self._listed_at is None or self._listed_at < after:
            inflight = self._inflight
            if inflight is None or inflight.done():
                if self._last_error is not None and (
                    self.clock() < self._last_start + self._backoff()
                ):
                    raise self._last_error
                # Never back to back either: after a listing that took L seconds
                # the next waits L (slurmrestd stays free half of the time).
                gap = max(self.min_gap, self._last_duration)
                wait = self._last_start + gap - self.clock()
                if wait > 0:
                    await asyncio.sleep(wait)
                    continue
                # A fresh context: shared work carries no one request's id.
                inflight = self._inflight = asyncio.create_task(
                    self._list(), context=contextvars.Context()
                )
                # Its waiters may all be gone (cancelled) when it fails.
                inflight.add_done_callback(_retrieve)
            await asyncio.shield(inflight)

    async def _list(self) -> None:
        started = self.clock()
        self._last_start = started
        full = self._since is None or started - self._last_full >= self.resync
        wall = datetime.now(tz=UTC)
        try:
            listing = await self.slurm.list_jobs(None if full else self._since)
        except SlurmError as exc:
            self._failures += 1
            self._last_error = exc
            log.warning("job_view_listing_failed", error=str(exc)[:300], failures=self._failures)
            raise
        finally:
            # A failed listing (a timeout) spaces the next one as much as a slow one.
            self._last_duration = self.clock() - started
        self._failures = 0
        self._last_error = None
        if not listing.unchanged:
            if listing.unreadable != self._unreadable:
                self._unreadable = listing.unreadable
                if listing.unreadable:
                    log.warning("jobs_unreadable", count=listing.unreadable)
            fresh: dict[int, _Entry] = {}
            overridden = False
            for job in listing.jobs:
                known = self._jobs.get(job.job_id)
                # A local write newer than this listing's start wins.
                if known and known.seen > started:
                    fresh[job.job_id] = known
                    overridden = overridden or known.job.state is not job.state
                else:
                    fresh[job.job_id] = _Entry(job, started)
            for job_id, known in self._jobs.items():
                if job_id not in fresh and known.seen > started:
                    fresh[job_id] = known  # created here while the listing ran
            self._jobs = fresh
            self.generation += 1
            if full:
                self._last_full = started
            # Slurm's pack time when it sends one; "unchanged" keeps the old mark.
            # A local write that hid a different listed state may be older than
            # Slurm's record after all (a job that started at once): the next
            # listing is a full one, which a quiet cluster cannot answer
            # "unchanged" to.
            self._since = None if overridden else listing.last_update or (wall - _CLOCK_MARGIN)
        if self._listed_at is None or started > self._listed_at:
            self._listed_at = started

    def _backoff(self) -> float:
        """The loop's interval, doubled for each listing failed in a row."""
        if not self._failures:
            return self.interval
        return min(self.max_backoff, self.interval * (1 << min(self._failures, 16)))


def _retrieve(task: asyncio.Task[None]) -> None:
    """Mark a listing's failure as seen: _list logged it already."""
    if not task.cancelled():
        task.exception()

"""What one deployment needs next, decided from its jobs alone.

Pure: the reconciler hands in the deployment as declared, every job of it in
the view (ended ones too, while Slurm keeps them) with its status, and the
time. Every gateway replica sees the same jobs and so decides the same; what
two of them submit at once carries one idempotency key, and Slurm's lowest job
id stands (core/creating.py).

A deployment has ``replicas`` slots. Each slot holds one job, and for a while
two: a successor submitted ``lead`` seconds before the job's time limit, or a
job of a new generation in a rolling update (one slot at a time). The older
job takes no new requests once its successor answers its health check, and is
stopped ``drain`` seconds later, or ``margin`` seconds before its limit if
that is sooner. A successor still queued leaves the older job serving to its
end. A slot whose job failed gets a new one after a backoff that doubles with
each failure in a row; submissions are bounded per minute whatever happens.

How many slots are wanted is the file's ``replicas``, or for an elastic
deployment the count autoscale.py decides. A slot over it leaves: its job's
time limit is lowered first (a scale-down every replica sees in the job, and
that Slurm enforces should no replica stop it), then it drains and stops. A
slot is free again only once its job left this way; a job that failed or was
cancelled by someone else is replaced.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from gateway.core.deployments.spec import Deployment
from gateway.core.metadata import Placement
from gateway.core.status import ServiceStatus

ACTIVE = (ServiceStatus.PENDING, ServiceStatus.BUILDING, ServiceStatus.STARTING)


@dataclass(frozen=True, slots=True)
class Timing:
    # Seconds before a job's time limit its successor is submitted (None: the
    # deployment's observed start-up time twice over plus ``margin``).
    lead: float | None = None
    drain: float = 30.0
    # A job whose successor answers is stopped at least this long before its limit.
    margin: float = 15.0
    backoff: float = 10.0
    # Below Slurm's default MinJobAge (300 s): the failed job that the wait
    # counts from must still be listed when it ends.
    backoff_max: float = 240.0
    per_minute: int = 6
    # A change of the file (a removal, fewer replicas, a new generation) takes
    # effect once this replica has read it this long: other replicas read a
    # ConfigMap's new version up to a minute or so later, and must not undo it.
    grace: float = 120.0


@dataclass(frozen=True, slots=True)
class Replica:
    """One job of the deployment, as the plan needs it (times in epoch seconds)."""

    job_id: int
    placement: Placement
    status: ServiceStatus
    reason: str
    submitted: float | None = None
    # Start plus time limit, once it runs.
    ends: float | None = None
    ended: float | None = None
    started: float | None = None
    # Its time limit now.
    minutes: int | None = None
    # Scaled down: its limit was lowered to end it soon (``leaving``).
    leaving: bool = False

    @property
    def alive(self) -> bool:
        return not self.status.is_terminal


@dataclass(frozen=True, slots=True)
class Submit:
    slot: int
    after: int
    attempt: int
    why: str
    reason: str

    def placement(self, deployment: Deployment) -> Placement:
        return Placement(
            deployment=deployment.name,
            generation=deployment.generation,
            slot=self.slot,
            after=self.after,
            attempt=self.attempt,
            why=self.why,
            minutes=deployment.resources.time_limit_minutes,
        )

    def key(self, deployment: Deployment) -> str:
        """The same for every replica that decides this submission."""
        return f"deployment\0{deployment.name}\0{deployment.generation}\0{self.slot}\0{self.after}"


@dataclass(frozen=True, slots=True)
class Stop:
    job_id: int
    reason: str


@dataclass(frozen=True, slots=True)
class Shorten:
    """Lower a leaving job's limit to ``minutes``: the scale-down, on record."""

    job_id: int
    minutes: int
    reason: str


@dataclass(frozen=True, slots=True)
class Planned:
    """The next thing the deployment waits for, and when it is due (None: on an event)."""

    action: str
    reason: str
    at: float | None = None


@dataclass(slots=True)
class Plan:
    submits: list[Submit] = field(default_factory=list)
    shortens: list[Shorten] = field(default_factory=list)
    stops: list[Stop] = field(default_factory=list)
    # Jobs that take no new requests (their successor answers, or they are unneeded).
    draining: set[int] = field(default_factory=set)
    waiting: list[Planned] = field(default_factory=list)
    degraded: str | None = None

    @property
    def next(self) -> Planned | None:
        due = [p for p in self.waiting if p.at is not None]
        if due:
            return min(due, key=lambda p: p.at or 0.0)
        return self.waiting[0] if self.waiting else None


def plan(
    deployment: Deployment | None,
    replicas: Iterable[Replica],
    now: float,
    timing: Timing,
    *,
    marks: dict[int, float],
    lead: float,
    read_for: float = float("inf"),
    want: int | None = None,
    grow: str = "new",
) -> Plan:
    """``deployment`` None: it was removed from the file, its jobs leave.
    ``marks`` holds when this replica first saw a job become unneeded (it is
    updated here, and forgets the jobs that no longer are): the drain counts
    from then. ``lead`` is the successor lead time in seconds; ``read_for``
    how long this replica has read the declaration as it is now. ``want``:
    the slots wanted (default the declared count); ``grow`` is why slots
    past the current count are filled ("scale", "demand")."""
    out = Plan()
    jobs = sorted(replicas, key=lambda r: r.job_id)
    for job in jobs:
        if job.alive and job.leaving:
            _drain(out, job, now, timing, marks, "the deployment scaled down")
    alive = [r for r in jobs if r.alive and not r.leaving]
    change_due = now + timing.grace - read_for
    if deployment is None:
        if alive and now < change_due:
            out.waiting.append(Planned("stop", "removed from the file: drains then", change_due))
        else:
            for job in alive:
                _drain(out, job, now, timing, marks, "the deployment was removed")
        _forget_marks(marks, jobs, out)
        return out
    if want is None:
        want = deployment.maximum
    slots: dict[int, list[Replica]] = {}
    for job in jobs:
        slots.setdefault(job.placement.slot, []).append(job)
    now_size = size(jobs)
    for slot, held in slots.items():
        if slot >= want and any(job.alive and not job.leaving for job in held):
            if now < change_due:
                out.waiting.append(Planned("stop", f"slot {slot} over replicas={want}", change_due))
                continue
            for job in held:
                if job.alive and not job.leaving:
                    why = f"slot {slot} is over replicas={want}"
                    _leave(out, job, now, timing, why)
                    _drain(out, job, now, timing, marks, why)
    budget = timing.per_minute - _recent_submissions(jobs, now)
    # A rolling update takes one slot at a time, once every slot runs one job.
    settled = all(_settled(slots.get(slot, [])) for slot in range(want))
    old = [s for s in range(want) if _old(slots.get(s, []), deployment.generation)]
    rolling = old[0] if settled and old and now >= change_due else None
    for slot in range(want):
        held = slots.get(slot, [])
        why = grow if slot >= now_size else "new"
        submit = _slot(out, deployment, slot, held, now, timing, marks, lead, slot == rolling, why)
        if submit is None:
            continue
        if budget <= 0:
            recent = [r.submitted for r in jobs if r.submitted and now - r.submitted < 60]
            first = min(recent, default=now)
            out.waiting.append(
                Planned(
                    "submit",
                    f"slot {slot}: at most {timing.per_minute} submissions a minute",
                    max(now, first + 60),
                )
            )
            continue
        budget -= 1
        out.submits.append(submit)
    _forget_marks(marks, jobs, out)
    return out


def _slot(
    out: Plan,
    deployment: Deployment,
    slot: int,
    held: list[Replica],
    now: float,
    timing: Timing,
    marks: dict[int, float],
    lead: float,
    may_roll: bool,
    grow: str = "new",
) -> Submit | None:
    latest = held[-1].job_id if held else 0
    if not held or held[-1].leaving:
        # Never used, or scaled down since (its job leaves on its own).
        return Submit(slot, latest, 0, grow, f"slot {slot} has no replica")
    held = [r for r in held if not r.leaving]
    live = [r for r in held if r.alive]
    if not live:
        last = held[-1]
        attempt = last.placement.attempt + 1 if last.status is ServiceStatus.FAILED else 0
        reason = f"slot {slot}: replica {last.job_id} ended {last.status.value} ({last.reason})"
        return _after_backoff(out, slot, last, attempt, "replace", reason, latest, now, timing)
    newest, older = live[-1], live[:-1]
    if older:
        if newest.status is ServiceStatus.RUNNING:
            for job in older:
                _drain(out, job, now, timing, marks, f"its successor {newest.job_id} answers")
        else:
            out.waiting.append(
                Planned(
                    "handover",
                    f"slot {slot}: successor {newest.job_id} is {newest.status.value} "
                    f"({newest.reason}); replica {older[-1].job_id} serves until then",
                )
            )
        return None
    # One job alive: the newest in the slot may be a successor that failed.
    failed = held[-1] if held[-1] is not newest else None
    attempt = (
        failed.placement.attempt + 1 if failed and failed.status is ServiceStatus.FAILED else 0
    )
    old = newest.placement.generation != deployment.generation
    if old and may_roll:
        reason = f"slot {slot}: rolling {newest.job_id} to generation {deployment.generation}"
        if failed is not None and failed.status is ServiceStatus.FAILED:
            reason += f"; generation's last try {failed.job_id} failed ({failed.reason})"
        return _after_backoff(out, slot, failed, attempt, "roll", reason, latest, now, timing)
    if newest.ends is None:
        if old:
            out.waiting.append(Planned("roll", f"slot {slot}: waits its turn (one at a time)"))
        return None
    # Its limit comes first whatever the roll's turn: the successor is of the
    # declared generation.
    due = newest.ends - lead
    if now < due and old:
        out.waiting.append(Planned("roll", f"slot {slot}: waits its turn (one at a time)"))
        return None
    if now < due:
        out.waiting.append(
            Planned("walltime", f"slot {slot}: successor of {newest.job_id} before its limit", due)
        )
        return None
    reason = f"slot {slot}: replica {newest.job_id} reaches its time limit"
    return _after_backoff(out, slot, failed, attempt, "walltime", reason, latest, now, timing)


def _after_backoff(
    out: Plan,
    slot: int,
    failed: Replica | None,
    attempt: int,
    why: str,
    reason: str,
    latest: int,
    now: float,
    timing: Timing,
) -> Submit | None:
    if attempt and failed is not None:
        wait = min(timing.backoff * 2 ** (attempt - 1), timing.backoff_max)
        at = (failed.ended or now) + wait
        out.degraded = (
            f"slot {slot}: {attempt} failure(s) in a row, the last: replica {failed.job_id} "
            f"({failed.reason})"
        )
        if now < at:
            out.waiting.append(Planned(why, f"{reason}; backoff {wait:.0f} s", at))
            return None
    return Submit(slot, latest, attempt, why, reason)


def _drain(
    out: Plan, job: Replica, now: float, timing: Timing, marks: dict[int, float], why: str
) -> None:
    out.draining.add(job.job_id)
    since = marks.setdefault(job.job_id, now)
    at = since + timing.drain
    if job.ends is not None:
        at = min(at, job.ends - timing.margin)
    if now >= at:
        out.stops.append(Stop(job.job_id, f"{why}; drained"))
    else:
        out.waiting.append(Planned("stop", f"replica {job.job_id}: {why}; draining", at))


def leaving(
    submitted_minutes: int,
    minutes: int | None,
    *,
    ended: bool,
    ends: float | None,
    now: float,
    timing: Timing,
) -> bool:
    """Whether a job's limit was lowered by a scale-down (``_leave``): lower
    than it was submitted with, and, while it lives, to end it within the
    drain (a pending one: to a minute). A limit a site caps at submission, or
    an admin lowers for maintenance, ends it later than that: the job serves
    to its end, and is replaced before it, like any other."""
    if not submitted_minutes or minutes is None or minutes >= submitted_minutes:
        return False
    if ended:
        return True
    if ends is None:
        return minutes <= 1
    return ends - now <= timing.drain + timing.margin + 120


def _leave(out: Plan, job: Replica, now: float, timing: Timing, why: str) -> None:
    """Its limit lowered to its drain and margin from now (whole minutes);
    one in its limit's last minutes loses a minute all the same, so that the
    scale-down is on record for every replica."""
    if job.started is None:
        minutes = 1
    else:
        elapsed = now - job.started
        minutes = max(1, math.ceil((elapsed + timing.drain + timing.margin) / 60))
        if job.minutes is not None and minutes >= job.minutes:
            minutes = job.minutes - 1
            if minutes * 60 <= elapsed:
                return  # Slurm ends it within the minute anyway
    if job.minutes is None or minutes < job.minutes:
        out.shortens.append(Shorten(job.job_id, minutes, why))


def size(jobs: list[Replica]) -> int:
    """The count a deployment runs now: one past the highest slot held by a
    job that has not left (an ended one too: it is to be replaced)."""
    last: dict[int, Replica] = {}
    for job in sorted(jobs, key=lambda r: r.job_id):
        last[job.placement.slot] = job
    return max((slot for slot, job in last.items() if not job.leaving), default=-1) + 1


def _forget_marks(marks: dict[int, float], jobs: list[Replica], out: Plan) -> None:
    """A job of the deployment no longer unneeded: its next drain counts anew."""
    for job in jobs:
        if job.job_id not in out.draining:
            marks.pop(job.job_id, None)


def _settled(held: list[Replica]) -> bool:
    live = [r for r in held if r.alive]
    return len(live) == 1 and live[0].status is ServiceStatus.RUNNING


def _old(held: list[Replica], generation: str) -> bool:
    live = [r for r in held if r.alive]
    return len(live) == 1 and live[0].placement.generation != generation


def _recent_submissions(jobs: list[Replica], now: float) -> int:
    """Submissions decided in the last minute: twins of one decision count once."""
    return len(
        {
            (r.placement.slot, r.placement.after, r.placement.generation)
            for r in jobs
            if r.submitted is not None and now - r.submitted < 60
        }
    )


def lead_time(timing: Timing, startup: float | None, limit_seconds: float | None) -> float:
    """How long before a job's limit its successor is submitted."""
    if timing.lead is not None:
        # Never so long that a successor is due as soon as its predecessor runs.
        if limit_seconds:
            return min(timing.lead, max(limit_seconds - 4 * timing.margin, limit_seconds / 2))
        return timing.lead
    # A minute at least: a start-up seen once says little of a busy node's next.
    guess = max(2 * (startup if startup is not None else 60.0) + timing.margin, 60.0)
    if limit_seconds:
        # Never more than half the job's life: a successor is not a second replica.
        guess = min(guess, limit_seconds / 2)
    return guess

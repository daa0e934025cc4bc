"""A deployment's status as the API shows it, rebuilt from its jobs each round."""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec

from gateway.core.deployments.plan import Plan, Replica
from gateway.core.deployments.spec import Deployment
from gateway.core.model import Service
from gateway.core.status import ServiceStatus

RECENT_ACTIONS = 10


class Action(msgspec.Struct, frozen=True, kw_only=True):
    at: datetime | None
    action: str
    reason: str
    service_id: str | None = None


class Counts(msgspec.Struct, frozen=True, kw_only=True):
    wanted: int
    running: int
    starting: int
    pending: int


class Member(msgspec.Struct, frozen=True, kw_only=True):
    """One replica: an ordinary service, with its place in the deployment."""

    service_id: str
    slot: int
    generation: str
    status: ServiceStatus
    status_reason: str
    slurm_reason: str
    node: str | None
    # Until Slurm's time limit ends it (None until it runs).
    time_left_seconds: int | None
    # It takes no new requests: its successor answers, or it is no longer needed.
    draining: bool
    # Why it was submitted: new, replace, walltime, roll, scale or demand.
    submitted_for: str
    submitted_at: datetime | None = None
    # Requests running and waiting at its server, as last read (elastic only).
    load: float | None = None
    # Scaled down: it drains and stops.
    leaving: bool = False


class Scaling(msgspec.Struct, frozen=True, kw_only=True):
    """An elastic deployment's bounds, its load and this replica's decisions."""

    min_replicas: int
    max_replicas: int
    target_load: float
    # Mean of the running replicas that reported (None: none did yet).
    load_per_replica: float | None
    reason: str
    idle_seconds: float | None
    # This gateway replica's decisions, newest last (each replica makes its own,
    # from the same numbers).
    decisions: list[Action]


class DeploymentStatus(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    # ready, progressing, degraded, invalid, or removing (gone from the file).
    state: str
    reason: str
    recipe_name: str | None
    environment: dict[str, str]
    resources: dict[str, str | int | None]
    tenant: str | None
    shared: bool
    generation: str | None
    replicas: Counts
    members: list[Member]
    next_action: Action | None
    recent_actions: list[Action]
    # Why the declared version is not in force (file and line, field, reason).
    error: str | None = None
    scaling: Scaling | None = None
    # The name /v1 requests use for it.
    model: str | None = None


def status(
    name: str,
    *,
    listed: bool,
    owner: str | None,
    declared: Deployment | None,
    in_force: Deployment | None,
    built: list[tuple[Replica, Service]],
    done: Plan,
    error: str | None,
    errors: list[Action],
    now: float,
    want: int | None = None,
    scaling: Scaling | None = None,
    loads: dict[int, float] | None = None,
) -> DeploymentStatus:
    shown = in_force or declared
    live = [(r, s) for r, s in built if r.alive]
    generation = shown.generation if shown else None
    wanted = want if want is not None else shown.replicas if shown else 0
    counts = Counts(
        wanted=wanted if shown and in_force else 0,
        running=sum(1 for r, _ in live if r.status is ServiceStatus.RUNNING),
        starting=sum(
            1 for r, _ in live if r.status in (ServiceStatus.BUILDING, ServiceStatus.STARTING)
        ),
        pending=sum(1 for r, _ in live if r.status is ServiceStatus.PENDING),
    )
    state, reason = _state(listed, shown, in_force, live, counts, done, error)
    planned = done.next
    return DeploymentStatus(
        name=name,
        state=state,
        reason=reason,
        recipe_name=shown.spec.recipe_name if shown else None,
        environment=dict(shown.environment) if shown else {},
        resources=shown.resources.as_config() if shown else {},
        # A deployment that never checked out is its declared owner's to see.
        tenant=shown.spec.tenant if shown else (owner if listed else _tenant_of(built)),
        shared=shown.shared if shown else False,
        generation=generation,
        replicas=counts,
        members=[_member(r, s, done, now, loads or {}) for r, s in live],
        next_action=Action(
            at=utc(planned.at) if planned.at is not None else None,
            action=planned.action,
            reason=planned.reason,
        )
        if planned
        else None,
        recent_actions=_recent(built, errors),
        error=error,
        scaling=scaling,
        model=shown.served if shown else None,
    )


def _state(
    listed: bool,
    shown: Deployment | None,
    in_force: Deployment | None,
    live: list[tuple[Replica, Service]],
    counts: Counts,
    done: Plan,
    error: str | None,
) -> tuple[str, str]:
    if shown is None and listed:
        return "invalid", error or "the declaration does not check out"
    if shown is None:
        return "removing", "not in the deployments file: its replicas drain and stop"
    if in_force is None:
        return "invalid", error or "the declared version does not check out"
    if done.degraded:
        return "degraded", done.degraded
    old = [r for r, _ in live if r.placement.generation != in_force.generation]
    if old:
        return "progressing", f"rolling update to generation {in_force.generation}"
    staying = [r for r, _ in live if not r.leaving]
    if counts.wanted == 0 and not staying:
        return "ready", "scaled to zero: the next request starts a replica"
    if counts.running >= counts.wanted and len(staying) == counts.wanted:
        return "ready", f"{counts.running} of {counts.wanted} replicas answer"
    pending = [s for r, s in live if r.status is ServiceStatus.PENDING]
    if pending and counts.running < counts.wanted:
        return "progressing", f"waiting for Slurm: {pending[0].status_reason}"
    return "progressing", f"{counts.running} of {counts.wanted} replicas answer"


def _member(
    replica: Replica, service: Service, done: Plan, now: float, loads: dict[int, float]
) -> Member:
    left = int(replica.ends - now) if replica.ends is not None else None
    return Member(
        service_id=service.id,
        slot=replica.placement.slot,
        generation=replica.placement.generation,
        status=replica.status,
        status_reason=replica.reason,
        slurm_reason=service.slurm_reason,
        node=service.node,
        time_left_seconds=max(0, left) if left is not None else None,
        draining=replica.job_id in done.draining,
        submitted_for=replica.placement.why,
        submitted_at=utc(replica.submitted) if replica.submitted else None,
        load=loads.get(replica.job_id),
        leaving=replica.leaving,
    )


def _recent(built: list[tuple[Replica, Service]], errors: list[Action]) -> list[Action]:
    """What was done, from the jobs themselves: submissions and ends."""
    actions = list(errors)
    for replica, service in built:
        placement = replica.placement
        actions.append(
            Action(
                at=utc(replica.submitted) if replica.submitted else None,
                action=f"submit.{placement.why}",
                reason=f"slot {placement.slot}, generation {placement.generation}"
                + (f", attempt {placement.attempt + 1}" if placement.attempt else ""),
                service_id=service.id,
            )
        )
        if replica.ended is not None:
            actions.append(
                Action(
                    at=utc(replica.ended),
                    action=f"end.{replica.status.value}",
                    reason=replica.reason,
                    service_id=service.id,
                )
            )
    actions.sort(key=lambda a: a.at or datetime.min.replace(tzinfo=UTC), reverse=True)
    return actions[:RECENT_ACTIONS]


def _tenant_of(built: list[tuple[Replica, Service]]) -> str | None:
    return next((s.tenant for _, s in built if s.tenant), None)


def utc(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, tz=UTC)

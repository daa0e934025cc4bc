"""A service's public status, from Slurm's job state, what the job reported
about itself, and whether its endpoint answers."""

from __future__ import annotations

import enum

from gateway.core.metadata import Reported
from gateway.slurm import JobInfo, JobState


class ServiceStatus(enum.StrEnum):
    PENDING = "pending"
    BUILDING = "building"
    STARTING = "starting"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMEOUT = "timeout"

    @property
    def is_terminal(self) -> bool:
        return self in _TERMINAL


_TERMINAL = frozenset(
    {ServiceStatus.COMPLETED, ServiceStatus.FAILED, ServiceStatus.CANCELLED, ServiceStatus.TIMEOUT}
)

_FROM_TERMINAL_JOB = {
    JobState.COMPLETED: ServiceStatus.COMPLETED,
    JobState.CANCELLED: ServiceStatus.CANCELLED,
    JobState.TIMEOUT: ServiceStatus.TIMEOUT,
    JobState.DEADLINE: ServiceStatus.TIMEOUT,
}


def derive(job: JobInfo, reported: Reported, healthy: bool | None) -> tuple[ServiceStatus, str]:
    """The status and a human reason for it.

    ``healthy`` is the gateway's own probe of the published endpoint (None when
    none was made): only a service that answers is ``running``.
    """
    state = job.state
    if state is JobState.PENDING:
        # Slurm says "None" until its scheduler has looked at the job.
        return ServiceStatus.PENDING, _slurm_reason(job) or "queued; not yet considered by Slurm"
    if state.is_terminal:
        if reported.phase == "failed" and state is not JobState.CANCELLED:
            return ServiceStatus.FAILED, reported.reason or "the service reported a failure"
        if reported.phase == "completed" and state is JobState.COMPLETED:
            # It stopped itself (idle stop): the reason says why.
            return ServiceStatus.COMPLETED, reported.reason or "the service exited normally"
        status = _FROM_TERMINAL_JOB.get(state, ServiceStatus.FAILED)
        return status, _terminal_reason(job, status)
    # RUNNING or SUSPENDED: the job is on a node; its own phase says how far it got.
    if reported.phase == "failed":
        return ServiceStatus.FAILED, reported.reason or "the service reported a failure"
    if reported.phase == "completed":
        # It stopped itself and is ending (its server is being stopped): like a
        # failure, it takes no more requests from the moment it says so.
        return ServiceStatus.COMPLETED, reported.reason or "the service is ending"
    if reported.phase in ("starting", "running") and reported.endpoint:
        if healthy:
            return ServiceStatus.RUNNING, "the service answers its health check"
        return ServiceStatus.STARTING, reported.reason or "waiting for the health check to pass"
    if reported.phase in ("starting", "running"):
        # No usable endpoint yet (or the one published was refused: the reason says).
        return ServiceStatus.STARTING, reported.reason or "the service is starting"
    return ServiceStatus.BUILDING, reported.reason or "preparing the service environment"


def _slurm_reason(job: JobInfo) -> str:
    reason = job.state_reason if job.state_reason not in ("", "None") else ""
    if job.state_description:
        return f"{reason}: {job.state_description}" if reason else job.state_description
    return reason


def _terminal_reason(job: JobInfo, status: ServiceStatus) -> str:
    exit_ = job.exit
    if status is ServiceStatus.COMPLETED:
        return "the service exited normally"
    if status is ServiceStatus.CANCELLED:
        return "stopped"
    if status is ServiceStatus.TIMEOUT:
        return "the job reached its time limit"
    parts = [job.state.value]
    if exit_ is not None and exit_.return_code is not None:
        parts.append(f"exit code {exit_.return_code}")
    if exit_ is not None and exit_.signal is not None:
        parts.append(f"signal {exit_.signal}")
    reason = _slurm_reason(job)
    if reason:
        parts.append(reason)
    return ", ".join(parts)

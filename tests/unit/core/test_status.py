"""How Slurm's job state, the job's own report and the health probe combine."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.core.metadata import Endpoint, Reported
from gateway.core.status import ServiceStatus, derive
from gateway.slurm import JobExit, JobInfo, JobState

S = ServiceStatus
UP = Reported(phase="running", endpoint=Endpoint("node1", 8000))


def job(state: JobState, **fields: Any) -> JobInfo:
    return JobInfo(job_id=1, name="vllm-1", user_name="gwuser", state=state, **fields)


@pytest.mark.parametrize(
    ("info", "reported", "healthy", "status", "reason"),
    [
        (job(JobState.PENDING, state_reason="None"), Reported(), None, S.PENDING, "queued"),
        (job(JobState.PENDING, state_reason="Resources"), Reported(), None, S.PENDING, "Resources"),
        (
            job(JobState.PENDING, state_reason="Priority", state_description="behind 3 jobs"),
            Reported(),
            None,
            S.PENDING,
            "Priority: behind 3 jobs",
        ),
        (job(JobState.RUNNING), Reported(), None, S.BUILDING, "preparing"),
        (
            job(JobState.RUNNING),
            Reported(phase="building", reason="pulling image"),
            None,
            S.BUILDING,
            "pulling image",
        ),
        (job(JobState.RUNNING), Reported(phase="starting"), None, S.STARTING, "starting"),
        # A running phase whose endpoint was refused says why, and is not running.
        (
            job(JobState.RUNNING),
            Reported(phase="running", reason="the job published x:1, which is not on its node"),
            None,
            S.STARTING,
            "not on its node",
        ),
        (job(JobState.RUNNING), UP, False, S.STARTING, "health check"),
        (job(JobState.RUNNING), UP, True, S.RUNNING, "answers"),
        (
            job(JobState.RUNNING),
            Reported(phase="failed", reason="model not found"),
            None,
            S.FAILED,
            "model not found",
        ),
        (job(JobState.COMPLETED), UP, None, S.COMPLETED, "exited normally"),
        (job(JobState.CANCELLED), UP, None, S.CANCELLED, "stopped"),
        (job(JobState.TIMEOUT), UP, None, S.TIMEOUT, "time limit"),
        (
            job(JobState.FAILED, exit=JobExit(return_code=3)),
            UP,
            None,
            S.FAILED,
            "FAILED, exit code 3",
        ),
        (
            job(JobState.NODE_FAIL, state_reason="NodeDown"),
            UP,
            None,
            S.FAILED,
            "NodeDown",
        ),
        # A job that failed itself and then ended keeps its own reason ...
        (
            job(JobState.FAILED, exit=JobExit(return_code=1)),
            Reported(phase="failed", reason="port 8001 is not free"),
            None,
            S.FAILED,
            "port 8001 is not free",
        ),
        # ... unless a user stopped it: then it is cancelled.
        (
            job(JobState.CANCELLED),
            Reported(phase="failed", reason="late"),
            None,
            S.CANCELLED,
            "stopped",
        ),
    ],
)
def test_status(
    info: JobInfo, reported: Reported, healthy: bool | None, status: ServiceStatus, reason: str
) -> None:
    got, why = derive(info, reported, healthy)
    assert got is status
    assert reason in why


def test_terminal_states_are_the_four_of_the_api() -> None:
    assert {s.value for s in ServiceStatus if s.is_terminal} == {
        "completed",
        "failed",
        "cancelled",
        "timeout",
    }

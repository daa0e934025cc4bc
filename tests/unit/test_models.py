from __future__ import annotations

import pytest

from gateway.slurm.models import JobExit, JobInfo, JobState, expand_output_path

JOB = JobInfo(
    job_id=42,
    name="svc",
    user_name="gwuser",
    state=JobState.RUNNING,
    batch_host="node1",
    working_directory="/home/gwuser",
)


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("/tmp/x-%j.out", "/tmp/x-42.out"),
        ("/tmp/%x-%u-%N.%5j", "/tmp/svc-gwuser-node1.00042"),
        ("out-%j.log", "/home/gwuser/out-42.log"),
        ("", "/home/gwuser/slurm-42.out"),
        ("/tmp/100%%-%A_%a", "/tmp/100%-42_0"),
        ("/tmp/plain.out", "/tmp/plain.out"),
        ("/tmp/odd-%q", "/tmp/odd-%q"),
    ],
)
def test_expand_output_path(pattern: str, expected: str) -> None:
    assert expand_output_path(pattern, JOB) == expected


@pytest.mark.parametrize(
    ("words", "state", "flags"),
    [
        ("RUNNING", JobState.RUNNING, ()),
        (["PENDING", "REQUEUED"], JobState.PENDING, ("REQUEUED",)),
        (["COMPLETING", "CANCELLED"], JobState.CANCELLED, ("COMPLETING",)),
        (["SOMETHING_NEW"], JobState.UNKNOWN, ("SOMETHING_NEW",)),
        ("COMPLETING", JobState.RUNNING, ("COMPLETING",)),
        ("REQUEUE_HOLD", JobState.PENDING, ("REQUEUE_HOLD",)),
    ],
)
def test_state_words(words: list[str] | str, state: JobState, flags: tuple[str, ...]) -> None:
    assert JobState.parse(words) == (state, flags)


def test_wait_status() -> None:
    assert JobExit.from_wait_status(768) == JobExit(return_code=3)
    assert JobExit.from_wait_status(9) == JobExit(signal=9)
    assert JobExit.from_wait_status(0) == JobExit(return_code=0)

from __future__ import annotations

import pytest

from gateway.slurm.models import (
    JobExit,
    JobInfo,
    JobState,
    check_node_name,
    expand_output_path,
)

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
        # The word alone cannot say how the job ended; the v0.0.39 adapter
        # derives the base state from the exit code.
        ("COMPLETING", JobState.UNKNOWN, ("COMPLETING",)),
        ("REQUEUE_HOLD", JobState.PENDING, ("REQUEUE_HOLD",)),
    ],
)
def test_state_words(words: list[str] | str, state: JobState, flags: tuple[str, ...]) -> None:
    assert JobState.parse(words) == (state, flags)


def test_wait_status() -> None:
    assert JobExit.from_wait_status(768) == JobExit(return_code=3)
    assert JobExit.from_wait_status(9) == JobExit(signal=9)
    assert JobExit.from_wait_status(0) == JobExit(return_code=0)


def test_job_info_user_id_defaults_to_unknown() -> None:
    assert JOB.user_id is None


@pytest.mark.parametrize("name", ["n1", "c2205-n1", "gpu-01.rack_2", "N", "x" * 255, "..."])
def test_node_names_accepted(name: str) -> None:
    assert check_node_name(name) == name


@pytest.mark.parametrize(
    "name",
    ["", ".", "..", "a/b", "../etc", "n 1", "n1\n", "n1?x", "n1#x", "n1%2F", "nöde", "x" * 256],
)
def test_node_names_refused(name: str) -> None:
    with pytest.raises(ValueError, match="invalid node name"):
        check_node_name(name)

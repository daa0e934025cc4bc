"""A job that v0.0.38/39 report as bare ``COMPLETING`` (v0_0_39.py), and the
``COMPLETING`` flag beside a base state that v0.0.40 and later send."""

from __future__ import annotations

import json

import pytest

from gateway.slurm import JobExit, JobState
from gateway.slurm.adapters import adapter_for
from tests.support.recorded import FIXTURES


def _completing_38(exit_code: int) -> tuple[bytes, int]:
    """The recorded finished v0.0.38 job, as it reads while still completing."""
    data = json.loads((FIXTURES / "22.05.8" / "v0.0.38" / "job_finished.json").read_text())
    body = json.loads(data["body"])
    body["jobs"][0].update(job_state="COMPLETING", exit_code=exit_code)
    return json.dumps(body).encode(), data["meta"]["job_id"]


def _completing_39(exit_code: int) -> tuple[bytes, int]:
    job = {
        "job_id": 77,
        "name": "fx",
        "user_name": "gwuser",
        "user_id": 5000,
        "job_state": "COMPLETING",
        "state_reason": "None",
        "submit_time": 1795738390,
        "start_time": 1795738391,
        "end_time": 1795738404,
        "exit_code": {"set": True, "infinite": False, "number": exit_code},
        "standard_output": "/tmp/fx-77.out",
    }
    return json.dumps({"jobs": [job], "errors": [], "warnings": []}).encode(), 77


COMPLETING_CASES = [
    # raw waitpid status, base state, exit
    (0, JobState.COMPLETED, JobExit(return_code=0)),
    (3 << 8, JobState.FAILED, JobExit(return_code=3)),
    (143 << 8, JobState.CANCELLED, JobExit(return_code=143)),  # the script's TERM trap
    (9, JobState.CANCELLED, JobExit(signal=9)),
    (15, JobState.CANCELLED, JobExit(signal=15)),
    (6, JobState.FAILED, JobExit(signal=6)),  # SIGABRT
    (10, JobState.FAILED, JobExit(signal=10)),  # SIGUSR1 the job did not trap
]


@pytest.mark.parametrize("version", ["v0.0.38", "v0.0.39"])
@pytest.mark.parametrize(("status", "state", "ended"), COMPLETING_CASES)
def test_bare_completing_is_a_terminal_job(
    version: str, status: int, state: JobState, ended: JobExit
) -> None:
    body, job_id = (_completing_38 if version == "v0.0.38" else _completing_39)(status)
    adapter = adapter_for(version)
    job = adapter.parse_job(200, body, job_id)
    assert job.state is state
    assert job.state.is_terminal
    assert job.state_flags == ("COMPLETING",)
    assert job.exit == ended
    assert job.end_time is not None and job.start_time is not None
    assert job.end_time >= job.start_time
    listed = adapter.parse_jobs(200, body).jobs
    assert [(j.state, j.state_flags, j.exit) for j in listed] == [(state, ("COMPLETING",), ended)]


@pytest.mark.parametrize("version", ["v0.0.38", "v0.0.39"])
@pytest.mark.parametrize("status", [0, 143 << 8, 15])
def test_a_job_at_its_time_limit_is_a_timeout_before_its_exit_code_arrives(
    version: str, status: int
) -> None:
    """22.05 at a one-minute limit: COMPLETING with code 0 for a second, then
    the trap's 143, then TIMEOUT. The first reading once said "completed"."""
    body, job_id = (_completing_38 if version == "v0.0.38" else _completing_39)(status)
    data = json.loads(body)
    data["jobs"][0]["state_reason"] = "TimeLimit"
    job = adapter_for(version).parse_job(200, json.dumps(data).encode(), job_id)
    assert (job.state, job.state_flags) == (JobState.TIMEOUT, ("COMPLETING",))


def test_other_single_words_of_v0_0_38_keep_their_meaning() -> None:
    body, job_id = _completing_38(0)
    data = json.loads(body)
    data["jobs"][0]["job_state"] = "REQUEUED"
    job = adapter_for("v0.0.38").parse_job(200, json.dumps(data).encode(), job_id)
    assert (job.state, job.state_flags, job.exit) == (JobState.PENDING, ("REQUEUED",), None)


@pytest.mark.parametrize("version", ["v0.0.40", "v0.0.41", "v0.0.42"])
@pytest.mark.parametrize("words", [["CANCELLED", "COMPLETING"], ["COMPLETING", "CANCELLED"]])
def test_completing_flag_with_base_state_on_v0_0_40_and_later(
    version: str, words: list[str]
) -> None:
    data = json.loads((FIXTURES / "24.11.5" / version / "job_cancelled.json").read_text())
    body = json.loads(data["body"])
    body["jobs"][0]["job_state"] = words
    job = adapter_for(version).parse_job(200, json.dumps(body).encode(), data["meta"]["job_id"])
    assert job.state is JobState.CANCELLED
    assert job.state_flags == ("COMPLETING",)
    assert job.exit == JobExit(signal=15)

"""slurmrestd v0.0.39 (Slurm 23.02, 23.11, 24.05), the first data_parser version.

Differs from v0.0.40:

* job record: ``job_state`` is one string, times are plain epoch integers and
  ``exit_code`` is ``{set, infinite, number}`` holding the raw waitpid status
  (exit 3 arrives as 768);
* that one string is the flag alone while one is set, and a job that has
  ended but whose processes are still being cleaned up is just
  ``"COMPLETING"`` (v0.0.40+ send ``["CANCELLED", "COMPLETING"]``). Such a
  job is terminal, and we derive its base state and keep ``COMPLETING`` in
  ``state_flags``: the reason ``TimeLimit`` or a run of its whole time limit
  is TIMEOUT (its exit code still reads 0 then); otherwise return code 0 is
  COMPLETED, SIGKILL or SIGTERM (9, 15, or 137, 143 from a shell) CANCELLED,
  anything else FAILED. A cancel also reads 0 until its script's code
  arrives (during the epilog, seen on 22.05): that short window says
  COMPLETED, and the flag tells callers to look again once it clears, as a
  stop does. (A requeue can be COMPLETING too; the one word cannot tell.)
* submit: ``script`` is top level (``job.script`` is ignored when both exist);
  ``environment`` is the ``["K=V"]`` list, as later;
* ``update_time`` takes epoch seconds.

Not checked against a live 23.x daemon here (no such Debian release).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar

from gateway.slurm.adapters import current
from gateway.slurm.adapters.base import NoVal, number
from gateway.slurm.adapters.v0_0_40 import V0040
from gateway.slurm.models import JobExit, JobState, JobSubmission

# Signals with which a cancel (scancel, DELETE job) ends a job.
_CANCEL_SIGNALS = frozenset({9, 15})
# The same signals as a shell's exit code: the job script traps TERM as 143.
_CANCEL_RETURN_CODES = frozenset({128 + 9, 128 + 15})


class Job(current.Job, frozen=True):
    exit_code: NoVal | int | None = None  # type: ignore[assignment]


class V0039(V0040):
    version: ClassVar[str] = "v0.0.39"
    job_model: ClassVar[type[current.Job]] = Job

    def update_time_param(self, since: datetime) -> dict[str, str]:
        return {"update_time": str(int(since.timestamp()))}

    def submit_body(self, job: JobSubmission) -> dict[str, Any]:
        return {"script": job.script, "job": self.job_description(job)}

    def job_state(self, job: current.Job) -> tuple[JobState, tuple[str, ...]]:
        state, flags = super().job_state(job)
        words = [job.job_state] if isinstance(job.job_state, str) else job.job_state
        if [w.upper() for w in words] == ["COMPLETING"]:
            state = self.completing_base_state(job)
        return state, flags

    def completing_base_state(self, job: current.Job) -> JobState:
        """How a job reported as bare "COMPLETING" ended.

        Slurm marks a job COMPLETING at its time limit or cancel before its
        script's exit code arrives (it reads 0 meanwhile), so the reason and
        the times come first; the code decides only the rest.
        """
        start, end, limit = number(job.start_time), number(job.end_time), number(job.time_limit)
        ran_out = bool(start and end and limit and end - start >= limit * 60)
        if job.state_reason == "TimeLimit" or ran_out:
            return JobState.TIMEOUT
        status = number(job.exit_code) if isinstance(job, Job) else None
        ended = JobExit.from_wait_status(status) if status is not None else None
        if ended is not None and ended.return_code == 0 and ended.signal is None:
            return JobState.COMPLETED
        if ended is not None and (
            ended.signal in _CANCEL_SIGNALS or ended.return_code in _CANCEL_RETURN_CODES
        ):
            return JobState.CANCELLED
        return JobState.FAILED

    def job_exit(self, job: current.Job, state: JobState) -> JobExit | None:
        status = number(job.exit_code) if isinstance(job, Job) else None
        if not state.is_terminal or status is None:
            return None
        return JobExit.from_wait_status(status)

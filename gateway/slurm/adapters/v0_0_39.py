"""slurmrestd v0.0.39 (Slurm 23.02, 23.11, 24.05), the first data_parser version.

Differs from v0.0.40:

* job record: ``job_state`` is one string, times are plain epoch integers and
  ``exit_code`` is ``{set, infinite, number}`` holding the raw waitpid status
  (exit 3 arrives as 768);
* that one string is the flag alone while one is set, and a job that has
  ended but whose processes are still being cleaned up is just
  ``"COMPLETING"`` (v0.0.40+ send ``["CANCELLED", "COMPLETING"]``). Such a
  job is terminal: it has its end time and exit code, and we derive its base
  state from the exit code and keep ``COMPLETING`` in ``state_flags``: return
  code 0 and no signal is COMPLETED, SIGKILL (9) or SIGTERM (15) is
  CANCELLED (TIMEOUT when it ran for its whole time limit), anything else
  FAILED. (A requeue can be COMPLETING too; the one word cannot tell, and the
  flag tells callers to look again once it clears.)
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
        """How a job reported as bare "COMPLETING" ended, from its exit code."""
        status = number(job.exit_code) if isinstance(job, Job) else None
        ended = JobExit.from_wait_status(status) if status is not None else None
        if ended is not None and ended.return_code == 0 and ended.signal is None:
            return JobState.COMPLETED
        if ended is not None and ended.signal in _CANCEL_SIGNALS:
            # Slurm also signals a job at its time limit: tell that apart by the times.
            start, end, limit = number(job.start_time), number(job.end_time), number(job.time_limit)
            if start and end and limit and end - start >= limit * 60:
                return JobState.TIMEOUT
            return JobState.CANCELLED
        return JobState.FAILED

    def job_exit(self, job: current.Job, state: JobState) -> JobExit | None:
        status = number(job.exit_code) if isinstance(job, Job) else None
        if not state.is_terminal or status is None:
            return None
        return JobExit.from_wait_status(status)

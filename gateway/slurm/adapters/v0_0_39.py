"""slurmrestd v0.0.39 (Slurm 23.02, 23.11, 24.05), the first data_parser version.

Differs from v0.0.40:

* job record: ``job_state`` is one string, times are plain epoch integers and
  ``exit_code`` is ``{set, infinite, number}`` holding the raw waitpid status
  (exit 3 arrives as 768);
* submit: ``script`` is top level (``job.script`` is ignored when both exist);
  ``environment`` is the ``["K=V"]`` list, as later;
* ``update_time`` takes epoch seconds.

Not checked against a live 23.x daemon here (no such Debian release).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar

import msgspec

from gateway.slurm.adapters import v0_0_44 as newer
from gateway.slurm.adapters.base import NoVal, number
from gateway.slurm.adapters.v0_0_40 import V0040
from gateway.slurm.models import JobExit, JobState, JobSubmission


class Job(newer.Job, frozen=True):
    exit_code: NoVal | int | None = None  # type: ignore[assignment]


class JobsResponse(newer.JobsResponse, frozen=True):
    jobs: list[Job] = msgspec.field(default_factory=list)  # type: ignore[assignment]


class V0039(V0040):
    version: ClassVar[str] = "v0.0.39"

    def update_time_param(self, since: datetime) -> dict[str, str]:
        return {"update_time": str(int(since.timestamp()))}

    def submit_body(self, job: JobSubmission) -> dict[str, Any]:
        return {"script": job.script, "job": self.job_description(job)}

    def jobs_response_model(self) -> type[newer.JobsResponse]:
        return JobsResponse

    def job_exit(self, job: newer.Job, state: JobState) -> JobExit | None:
        status = number(job.exit_code) if isinstance(job, Job) else None
        if not state.is_terminal or status is None:
            return None
        return JobExit.from_wait_status(status)

"""slurmrestd v0.0.38 (Slurm 21.08, 22.05, 23.02), the oldest version spoken.

Differs from v0.0.39:

* submit: ``job`` keys are sbatch's long options parsed one by one (an unknown
  key is an error): ``environment`` must be a ``{"K": "V"}`` dictionary,
  ``nodes`` is the node-count string, GPUs go in ``gpus_per_node``, and
  integers are plain; the answer has no ``warnings``;
* job record: every integer is plain (``exit_code`` is the raw waitpid
  status), and ``standard_output`` is the unexpanded pattern (``%j``);
* ``errors[]`` entries may be ``{error, error_code}``;
* ping: ``pings[{hostname, ping: "UP", status, mode}]``, release under
  ``meta.Slurm``;
* ``update_time`` is epoch seconds and "nothing changed" is HTTP 304 with an
  empty body;
* a bad or expired token is HTTP 500 with error -1 "Unspecified error" (ping:
  "slurmctld config is unable to load"; get job: "Unable to find JobId=N") or,
  on submit, 5005 "Zero Bytes were transmitted or received", rather than an
  authentication error;
* the job listing has no ``last_update``;
* node lookup: an unknown name is HTTP 500 with ``errors[{error: "Invalid
  node name specified", errno: 2018}]`` (the number under ``errno``, read by
  the shared ``ErrorEntry``), where v0.0.39+ answer 200 and error 0; the
  inherited ``parse_node`` maps both to ``SlurmNodeNotFound``. The node
  record's ``name``, ``hostname`` and ``address`` are the same strings.

Checked live on Slurm 22.05.8.
"""

from __future__ import annotations

from typing import Any, ClassVar

import msgspec

from gateway.slurm.adapters import current
from gateway.slurm.adapters.base import FALLBACK_ENVIRONMENT, JobList
from gateway.slurm.adapters.v0_0_39 import V0039
from gateway.slurm.errors import SlurmAuthError, SlurmError, SlurmErrorDetail
from gateway.slurm.models import JobSubmission, PingResult

_ZERO_BYTES = 5005  # SLURM_PROTOCOL_SOCKET_ZERO_BYTES_SENT
# A "refused token" answered this late was slurmrestd retrying to reach slurmctld.
OUTAGE_SECONDS = 2.0


class Ping(msgspec.Struct, frozen=True):
    hostname: str = ""
    ping: str = ""
    status: int | None = None


class SlurmMeta(msgspec.Struct, frozen=True, rename={"slurm": "Slurm"}):
    slurm: current.SlurmMeta = current.SlurmMeta()


class PingResponse(msgspec.Struct, frozen=True):
    pings: list[Ping] = []
    meta: SlurmMeta = SlurmMeta()


class V0038(V0039):
    version: ClassVar[str] = "v0.0.38"

    def submit_body(self, job: JobSubmission) -> dict[str, Any]:
        desc: dict[str, Any] = {
            "name": job.name,
            "current_working_directory": job.working_directory,
            "environment": dict(job.environment or FALLBACK_ENVIRONMENT),
            "nodes": str(job.nodes),
        }
        optional: dict[str, Any] = {
            **self.plain_fields(job),
            "memory_per_node": job.memory_per_node_mb,
            "time_limit": job.time_limit_minutes,
            "comment": job.comment,
            "gpus_per_node": str(job.gpus_per_node) if job.gpus_per_node else None,
            # 22.05 parses it as a time string only; "uts<epoch>" is epoch seconds.
            "begin_time": self.begin_value(job.begin_time) if job.begin_time is not None else None,
        }
        desc.update({k: v for k, v in optional.items() if v is not None})
        return {"script": job.script, "job": desc}

    def begin_value(self, begin: int) -> Any:
        return f"uts{begin}"

    def limit_value(self, minutes: int) -> Any:
        return minutes

    def parse_jobs(self, status: int, content: bytes) -> JobList:
        if status == 304:
            return JobList(jobs=(), last_update=None, unchanged=True)
        # Only 304 means unchanged here: a 200 never carries last_update, and
        # an empty list is a queue that emptied.
        return msgspec.structs.replace(super().parse_jobs(status, content), unchanged=False)

    def parse_ping(self, status: int, content: bytes) -> list[PingResult]:
        self.check(status, content, what="ping")
        body = self.decode(PingResponse, content, "ping")
        return [
            PingResult(
                hostname=p.hostname,
                responding=p.ping == "UP",
                slurm_release=body.meta.slurm.release,
                api_version=self.version,
            )
            for p in body.pings
        ]

    def outage_behind(self, error: SlurmError, elapsed: float) -> bool | None:
        if isinstance(error, SlurmAuthError):
            return elapsed >= OUTAGE_SECONDS
        return super().outage_behind(error, elapsed)

    def error_for(
        self,
        status: int,
        details: tuple[SlurmErrorDetail, ...],
        *,
        what: str,
        body_readable: bool = True,
    ) -> SlurmError:
        # 22.05 reports slurmctld's refusal of a token as error -1 "Unspecified
        # error" (or 5005 "Zero Bytes were transmitted" on submit); a real
        # failure of the request carries its own number (2017, 2000...).
        if (
            status == 500
            and details
            and all(
                (d.error_number == -1 and d.error == "Unspecified error")
                or d.error_number == _ZERO_BYTES
                for d in details
            )
        ):
            return SlurmAuthError(
                f"slurmrestd {self.version}: {what} failed (HTTP 500): slurmctld refused "
                "the request; on Slurm 22.05 this means the token was rejected "
                "(expired, forged or for another user)",
                status_code=status,
                errors=details,
            )
        return super().error_for(status, details, what=what, body_readable=body_readable)

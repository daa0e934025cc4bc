"""The adapter for the newest slurmrestd shapes, named by no version.

The version modules subclass :class:`CurrentAdapter`: the newest one only
names its version, each older one overrides what its version does otherwise.
A new slurmrestd version that changes a shape changes it here, and the
version before it takes the old shape back in its own module.

Shapes, from Slurm's data_parser v0.0.45 as served by Slurm 26.05.5:

* submit: ``{"job": {..., "script": ..., "environment": ["K=V"]}}``; integers
  that may be unset are ``{set, infinite, number}`` objects;
* job record: ``job_state`` is a list (base state plus flags), times, limits
  and counts are ``{set, infinite, number}``, ``exit_code`` is
  ``{status[], return_code, signal{id, name}}``; ``standard_output`` is the raw
  pattern and ``stdout_expanded``/``stderr_expanded`` carry the paths;
* cancel answers ``status[]`` per job, whose errors count even with HTTP 200;
* ``update_time`` takes epoch seconds;
* ping: ``pings[{hostname, responding, latency, primary, status}]``;
* node (``GET node/{name}``): ``nodes[{name, hostname, address, ...}]``; an
  unknown name is HTTP 200 with ``errors[{error_number: 0, description:
  "Failure to query node NAME"}]`` and no ``nodes``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar

import msgspec

from gateway.slurm.adapters.base import (
    FALLBACK_ENVIRONMENT,
    Adapter,
    ErrorEntry,
    JobList,
    NoVal,
    WarningEntry,
    number,
    timestamp,
)
from gateway.slurm.errors import (
    ESLURM_ALREADY_DONE,
    ESLURM_INVALID_NODE_NAME,
    SlurmErrorDetail,
    SlurmNodeNotFound,
    SlurmRequestRejected,
    SlurmUnexpectedResponse,
)
from gateway.slurm.models import (
    JobExit,
    JobInfo,
    JobState,
    JobSubmission,
    NodeInfo,
    PingResult,
    SubmitResult,
    expand_output_path,
)

# What ``errors[]`` holds for a node name Slurm does not know: error 0 "No
# error" ("Failure to query node NAME", v0.0.39+) or 2018 "Invalid node name
# specified" (v0.0.38).
_UNKNOWN_NODE_ERRORS = frozenset({0, ESLURM_INVALID_NODE_NAME})

# -- wire shapes ---------------------------------------------------------------


class Signal(msgspec.Struct, frozen=True):
    id: NoVal = NoVal()
    name: str = ""


class ExitCode(msgspec.Struct, frozen=True):
    status: list[str] = []
    return_code: NoVal = NoVal()
    signal: Signal = Signal()


class Job(msgspec.Struct, frozen=True):
    job_id: int
    name: str = ""
    user_name: str = ""
    user_id: NoVal | int | None = None
    job_state: list[str] | str = []
    state_reason: str = ""
    state_description: str = ""
    partition: str = ""
    nodes: str = ""
    batch_host: str = ""
    node_count: NoVal | int | None = None
    cpus: NoVal | int | None = None
    memory_per_node: NoVal | int | None = None
    time_limit: NoVal | int | None = None
    submit_time: NoVal | int | None = None
    start_time: NoVal | int | None = None
    end_time: NoVal | int | None = None
    exit_code: ExitCode | None = None
    comment: str = ""
    current_working_directory: str = ""
    standard_output: str = ""
    standard_error: str = ""
    stdout_expanded: str = ""
    stderr_expanded: str = ""


class Version(msgspec.Struct, frozen=True):
    major: str | int = ""
    minor: str | int = ""
    micro: str | int = ""


class SlurmMeta(msgspec.Struct, frozen=True):
    release: str = ""
    version: Version = Version()


class Meta(msgspec.Struct, frozen=True):
    slurm: SlurmMeta = SlurmMeta()


class JobsResponse(msgspec.Struct, frozen=True):
    """Each job is kept raw and read on its own: any cluster user's job is in
    a listing, and one that cannot be read must not fail the others."""

    jobs: list[msgspec.Raw] = []
    last_update: NoVal | int | None = None
    errors: list[ErrorEntry] = []
    warnings: list[WarningEntry] = []


class SubmitResponse(msgspec.Struct, frozen=True):
    job_id: int | None = None
    errors: list[ErrorEntry] = []
    warnings: list[WarningEntry] = []


class Ping(msgspec.Struct, frozen=True):
    hostname: str = ""
    responding: bool | None = None
    latency: int | None = None


class PingResponse(msgspec.Struct, frozen=True):
    pings: list[Ping] = []
    meta: Meta = Meta()


class Node(msgspec.Struct, frozen=True):
    name: str = ""
    hostname: str = ""
    address: str = ""
    # A list of words since v0.0.39; v0.0.38 has one word here and the rest
    # in ``state_flags``.
    state: list[str] | str = []
    state_flags: list[str] | None = None
    reason: str = ""

    def info(self) -> NodeInfo:
        words = [self.state] if isinstance(self.state, str) else list(self.state)
        words += self.state_flags or []
        return NodeInfo(
            name=self.name,
            hostname=self.hostname,
            address=self.address,
            state=tuple(w.upper() for w in words if w),
            reason=self.reason,
        )


class NodesResponse(msgspec.Struct, frozen=True):
    nodes: list[Node] = []


class CancelError(msgspec.Struct, frozen=True):
    string: str = ""
    code: int = 0
    message: str = ""


class CancelStatus(msgspec.Struct, frozen=True):
    error: CancelError = CancelError()
    job_id: NoVal | int | None = None


class CancelResponse(msgspec.Struct, frozen=True):
    status: list[CancelStatus] = []


# -- adapter -------------------------------------------------------------------


class CurrentAdapter(Adapter):
    """Every request and answer in the newest shapes; ``version`` comes from
    the subclass (v0_0_45.py)."""

    job_model: ClassVar[type[Job]] = Job
    ping_model: ClassVar[type[PingResponse]] = PingResponse

    # requests

    def update_time_param(self, since: datetime) -> dict[str, str]:
        return {"update_time": str(int(since.timestamp()))}

    def submit_body(self, job: JobSubmission) -> dict[str, Any]:
        desc = self.job_description(job)
        desc["script"] = job.script
        return {"job": desc}

    def job_description(self, job: JobSubmission) -> dict[str, Any]:
        desc: dict[str, Any] = {
            "name": job.name,
            "current_working_directory": job.working_directory,
            "environment": self.environment(job.environment),
            "minimum_nodes": job.nodes,
            "maximum_nodes": job.nodes,
        }
        optional = {**self.plain_fields(job), "comment": job.comment}
        desc.update({k: v for k, v in optional.items() if v is not None})
        if job.memory_per_node_mb is not None:
            desc["memory_per_node"] = self.integer(job.memory_per_node_mb)
        if job.time_limit_minutes is not None:
            desc["time_limit"] = self.integer(job.time_limit_minutes)
        if job.gpus_per_node:
            desc["tres_per_node"] = f"gres/gpu:{job.gpus_per_node}"
        if job.begin_time is not None:
            desc["begin_time"] = self.integer(job.begin_time)
        return desc

    def plain_fields(self, job: JobSubmission) -> dict[str, Any]:
        """Fields every version takes as they are, sent only when set."""
        return {
            "partition": job.partition,
            "account": job.account,
            "standard_output": job.standard_output,
            "standard_error": job.standard_error,
            "cpus_per_task": job.cpus_per_task,
        }

    def environment(self, env: dict[str, str]) -> Any:
        return [f"{k}={v}" for k, v in (env or FALLBACK_ENVIRONMENT).items()]

    def begin_value(self, begin: int) -> Any:
        return self.integer(begin)

    def limit_value(self, minutes: int) -> Any:
        return self.integer(minutes)

    def integer(self, value: int) -> Any:
        return {"set": True, "infinite": False, "number": value}

    # responses

    def parse_submit(self, status: int, content: bytes) -> SubmitResult:
        envelope = self.check(status, content, what="submit job")
        body = self.decode(SubmitResponse, content, "submit job")
        if body.job_id is None:
            raise self.error_for(status, (), what="submit job (no job_id in the answer)")
        return SubmitResult(job_id=body.job_id, warnings=self.warnings_of(envelope))

    def parse_job(self, status: int, content: bytes, job_id: int) -> JobInfo:
        what = f"get job {job_id}"
        self.check(status, content, what=what)
        body = self.decode(JobsResponse, content, what)
        for raw in body.jobs:
            try:
                job = self.job_info(msgspec.json.decode(raw, type=self.job_model))
            except (msgspec.ValidationError, msgspec.DecodeError, ValueError) as exc:
                raise SlurmUnexpectedResponse(
                    f"slurmrestd {self.version} sent a job we cannot read for {what}: {exc}"
                ) from None
            if job.job_id == job_id:
                return job
        raise self.error_for(
            404,
            (SlurmErrorDetail(error_number=2017, error="Invalid job id specified"),),
            what=f"get job {job_id}",
        )

    def parse_jobs(self, status: int, content: bytes) -> JobList:
        self.check(status, content, what="list jobs")
        body = self.decode(JobsResponse, content, "list jobs")
        jobs: list[JobInfo] = []
        unreadable = 0
        for raw in body.jobs:
            try:
                jobs.append(self.job_info(msgspec.json.decode(raw, type=self.job_model)))
            except (msgspec.ValidationError, msgspec.DecodeError, ValueError):
                unreadable += 1  # a job with data we cannot read: no service of ours
        last_update = timestamp(body.last_update)
        return JobList(
            jobs=tuple(jobs),
            last_update=last_update,
            unchanged=not body.jobs and not last_update,
            unreadable=unreadable,
        )

    def job_info(self, job: Job) -> JobInfo:
        state, flags = self.job_state(job)
        info = JobInfo(
            job_id=job.job_id,
            name=job.name,
            user_name=job.user_name,
            user_id=number(job.user_id),
            state=state,
            state_flags=flags,
            state_reason=job.state_reason,
            state_description=job.state_description,
            partition=job.partition,
            nodes=job.nodes,
            batch_host=job.batch_host,
            node_count=number(job.node_count),
            cpus=number(job.cpus),
            memory_per_node_mb=number(job.memory_per_node),
            time_limit_minutes=number(job.time_limit),
            submit_time=timestamp(job.submit_time),
            start_time=timestamp(job.start_time),
            end_time=timestamp(job.end_time),
            exit=self.job_exit(job, state),
            comment=job.comment,
            working_directory=job.current_working_directory,
        )
        return self.with_output_paths(info, job)

    def job_state(self, job: Job) -> tuple[JobState, tuple[str, ...]]:
        return JobState.parse(job.job_state)

    def job_exit(self, job: Job, state: JobState) -> JobExit | None:
        if not state.is_terminal or job.exit_code is None:
            return None
        code = job.exit_code
        signal = number(code.signal.id)
        if signal:
            return JobExit(return_code=None, signal=signal)
        return JobExit(return_code=number(code.return_code), signal=None)

    def with_output_paths(self, info: JobInfo, job: Job) -> JobInfo:
        stdout = job.stdout_expanded or expand_output_path(job.standard_output, info)
        # Slurm writes stderr to the stdout file unless told otherwise.
        stderr = job.stderr_expanded or (
            expand_output_path(job.standard_error, info) if job.standard_error else stdout
        )
        return msgspec.structs.replace(info, standard_output=stdout, standard_error=stderr)

    def parse_ping(self, status: int, content: bytes) -> list[PingResult]:
        self.check(status, content, what="ping")
        body = self.decode(self.ping_model, content, "ping")
        release = body.meta.slurm.release
        return [
            PingResult(
                hostname=p.hostname,
                responding=self.responding(p),
                slurm_release=release,
                api_version=self.version,
                latency_us=p.latency,
            )
            for p in body.pings
        ]

    def responding(self, ping: Ping) -> bool:
        return ping.responding is True

    def parse_node(self, status: int, content: bytes, name: str) -> NodeInfo:
        what = f"get node {name}"
        try:
            self.check(status, content, what=what)
        except SlurmRequestRejected as exc:
            if exc.errors and all(e.error_number in _UNKNOWN_NODE_ERRORS for e in exc.errors):
                raise self.node_not_found(name, status, exc.errors) from None
            raise
        body = self.decode(NodesResponse, content, what)
        # The record of that name; else the one record Slurm matched to it.
        found = [n for n in body.nodes if n.name == name]
        if not found and len(body.nodes) == 1:
            found = body.nodes
        if not found:
            raise self.node_not_found(name, status, ())
        return found[0].info()

    def parse_nodes(self, status: int, content: bytes) -> list[NodeInfo]:
        what = "list nodes"
        self.check(status, content, what=what)
        return [n.info() for n in self.decode(NodesResponse, content, what).nodes]

    def node_not_found(
        self, name: str, status: int, details: tuple[SlurmErrorDetail, ...]
    ) -> SlurmNodeNotFound:
        return SlurmNodeNotFound(
            f"slurmrestd {self.version}: Slurm knows no node {name!r}",
            status_code=status,
            errors=details,
        )

    def parse_cancel(self, status: int, content: bytes, job_id: int) -> None:
        what = f"cancel job {job_id}"
        self.check(status, content, what=what)
        body = self.decode(CancelResponse, content, what)
        failures = tuple(
            SlurmErrorDetail(error_number=s.error.code, error=s.error.string)
            for s in body.status
            if s.error.code and s.error.code != ESLURM_ALREADY_DONE
        )
        if failures:
            raise self.error_for(status, failures, what=what)

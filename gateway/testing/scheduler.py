"""An in-memory scheduler for the core's tests: what Slurm would hold, no HTTP.

Jobs are ``JobInfo`` records you put, change (``advance``) or purge; a submit
takes the next job id; every call is recorded (``calls``, with the user it
acted as); ``fail`` makes the next calls of one operation raise.
"""

from __future__ import annotations

import itertools
from collections import deque
from datetime import UTC, datetime
from typing import Any

import msgspec

from gateway.core.scheduler import Scheduler
from gateway.slurm import (
    Credentials,
    FixedCredentials,
    JobInfo,
    JobList,
    JobState,
    JobSubmission,
    NodeInfo,
    SlurmJobNotFound,
    SlurmNodeNotFound,
    SubmitResult,
    TokenProvider,
)


class Call(msgspec.Struct, frozen=True):
    """One call the core made: the operation, its arguments, and as whom."""

    op: str
    args: tuple[Any, ...]
    user: str


class _State:
    def __init__(self, user: str, first_id: int) -> None:
        self.user = user
        self.jobs: dict[int, JobInfo] = {}
        self.nodes: dict[str, NodeInfo] = {}
        self.ids = itertools.count(first_id)
        self.calls: list[Call] = []
        self.submitted: list[tuple[int, JobSubmission]] = []
        self.failures: dict[str, deque[BaseException | None]] = {}
        self.always: dict[str, BaseException] = {}
        self.cancel_purges = False


class FakeScheduler:
    """Satisfies :class:`gateway.core.scheduler.Scheduler`; views made by
    ``as_user``/``with_tokens`` share its jobs and record their own user."""

    def __init__(self, user: str = "gwuser", *, first_id: int = 1) -> None:
        self._state = _State(user, first_id)
        self._tokens: TokenProvider | None = None

    # -- setting up -----------------------------------------------------------

    @property
    def jobs(self) -> dict[int, JobInfo]:
        return self._state.jobs

    @property
    def calls(self) -> list[Call]:
        return self._state.calls

    @property
    def submitted(self) -> list[tuple[int, JobSubmission]]:
        """Job id -> what was submitted for it, in order."""
        return self._state.submitted

    @property
    def cancel_purges(self) -> bool:
        """A cancelled job is gone at once (as after MinJobAge), not CANCELLED."""
        return self._state.cancel_purges

    @cancel_purges.setter
    def cancel_purges(self, value: bool) -> None:
        self._state.cancel_purges = value

    def put(self, *jobs: JobInfo) -> None:
        for job in jobs:
            self._state.jobs[job.job_id] = job

    def advance(self, job_id: int, state: JobState, **fields: Any) -> JobInfo:
        """The job moved on (RUNNING, COMPLETED...), with any other fields."""
        now = datetime.now(tz=UTC)
        job = self._state.jobs[job_id]
        if state is JobState.RUNNING and job.start_time is None:
            fields.setdefault("start_time", now)
        if state.is_terminal and job.end_time is None:
            fields.setdefault("end_time", now)
        job = self._state.jobs[job_id] = msgspec.structs.replace(job, state=state, **fields)
        return job

    def purge(self, job_id: int) -> None:
        self._state.jobs.pop(job_id, None)

    def add_node(self, node: NodeInfo) -> None:
        self._state.nodes[node.name] = node

    def fail(self, op: str, error: BaseException, *, times: int | None = 1) -> None:
        """The next ``times`` calls of ``op`` raise ``error`` (None: all of them)."""
        if times is None:
            self._state.always[op] = error
        else:
            self._state.failures.setdefault(op, deque()).extend([error] * times)

    def heal(self, op: str) -> None:
        self._state.always.pop(op, None)
        self._state.failures.pop(op, None)

    def count(self, op: str) -> int:
        return sum(1 for call in self._state.calls if call.op == op)

    def comment_updates(self) -> dict[int, str]:
        """Job id -> the last comment written to it through ``update_comment``."""
        return {c.args[0]: c.args[1] for c in self._state.calls if c.op == "update_comment"}

    # -- Scheduler ------------------------------------------------------------

    def as_user(self, credentials: Credentials) -> FakeScheduler:
        return self.with_tokens(FixedCredentials(credentials))

    def with_tokens(self, tokens: TokenProvider) -> FakeScheduler:
        view = object.__new__(FakeScheduler)
        view._state = self._state
        view._tokens = tokens
        return view

    async def user_name(self) -> str:
        if self._tokens is None:
            return self._state.user
        return (await self._tokens.credentials()).user_name

    async def list_jobs(self, changed_since: datetime | None = None) -> JobList:
        await self._call("list_jobs", changed_since)
        return JobList(jobs=tuple(self._state.jobs.values()))

    async def get_job(self, job_id: int) -> JobInfo:
        await self._call("get_job", job_id)
        return self._job(job_id)

    async def submit(self, job: JobSubmission) -> SubmitResult:
        user = await self._call("submit", job)
        job_id = next(self._state.ids)
        self._state.submitted.append((job_id, job))
        self._state.jobs[job_id] = JobInfo(
            job_id=job_id,
            name=job.name,
            user_name=user,
            state=JobState.PENDING,
            partition=job.partition or "",
            submit_time=datetime.now(tz=UTC),
            time_limit_minutes=job.time_limit_minutes,
            comment=job.comment or "",
            working_directory=job.working_directory,
            standard_output=(job.standard_output or "").replace("%j", str(job_id)),
            standard_error=(job.standard_error or "").replace("%j", str(job_id)),
        )
        return SubmitResult(job_id=job_id)

    async def update_comment(self, job_id: int, comment: str) -> None:
        await self._call("update_comment", job_id, comment)
        job = self._job(job_id)
        self._state.jobs[job_id] = msgspec.structs.replace(job, comment=comment)

    async def release(self, job_id: int) -> None:
        await self._call("release", job_id)
        self._job(job_id)

    async def shorten(self, job_id: int, minutes: int) -> None:
        await self._call("shorten", job_id, minutes)
        job = self._job(job_id)
        self._state.jobs[job_id] = msgspec.structs.replace(job, time_limit_minutes=minutes)

    async def cancel(self, job_id: int, signal: str | None = None) -> None:
        await self._call("cancel", job_id)
        job = self._job(job_id)
        if self._state.cancel_purges:
            self.purge(job_id)
        elif not job.state.is_terminal:
            self.advance(job_id, JobState.CANCELLED)

    async def get_node(self, name: str) -> NodeInfo:
        await self._call("get_node", name)
        node = self._state.nodes.get(name)
        if node is None:
            raise SlurmNodeNotFound(f"no node {name}", status_code=404)
        return node

    async def list_nodes(self) -> list[NodeInfo]:
        await self._call("list_nodes")
        return list(self._state.nodes.values())

    # -- inside ---------------------------------------------------------------

    async def _call(self, op: str, *args: Any) -> str:
        user = await self.user_name()
        self._state.calls.append(Call(op, args, user))
        always = self._state.always.get(op)
        if always is not None:
            raise always
        queued = self._state.failures.get(op)
        if queued:
            error = queued.popleft()
            if error is not None:
                raise error
        return user

    def _job(self, job_id: int) -> JobInfo:
        job = self._state.jobs.get(job_id)
        if job is None:
            raise SlurmJobNotFound(f"no job {job_id}", status_code=404)
        return job


def _fake_is_a_scheduler(fake: FakeScheduler) -> Scheduler:
    return fake  # mypy checks that the fake has every call the core makes

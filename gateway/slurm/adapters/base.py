"""What every version adapter shares: the request plan, error mapping, decoding.

An adapter is pure translation. It never does I/O: it says which request to
send (:class:`Request`) and turns a status code plus body bytes into
version-independent models or a typed :class:`~gateway.slurm.errors.SlurmError`.
That keeps every adapter testable against recorded responses alone.
"""

from __future__ import annotations

import abc
from datetime import UTC, datetime
from typing import Any, ClassVar, TypeVar

import msgspec

from gateway.slurm.errors import (
    ESLURM_INVALID_JOB_ID,
    SLURM_PROTOCOL_AUTHENTICATION_ERROR,
    SlurmAuthError,
    SlurmError,
    SlurmErrorDetail,
    SlurmJobNotFound,
    SlurmRequestRejected,
    SlurmUnavailable,
    SlurmUnexpectedResponse,
)
from gateway.slurm.models import (
    JobInfo,
    JobSubmission,
    NodeInfo,
    PingResult,
    SubmitResult,
    check_node_name,
)

T = TypeVar("T")

# Slurm refuses a batch job without environment (22.05: "environment must be
# set"; 24.11: error 2019 writing it), so a job given none gets this.
FALLBACK_ENVIRONMENT = {"PATH": "/usr/local/bin:/usr/bin:/bin"}


class Request(msgspec.Struct, frozen=True, kw_only=True):
    method: str
    path: str
    params: dict[str, str] = msgspec.field(default_factory=dict)
    body: dict[str, Any] | None = None


class JobList(msgspec.Struct, frozen=True, kw_only=True):
    """Answer of a job listing. ``unchanged`` is True when ``changed_since`` was
    given and Slurm reported no change (v0.0.38: 304; v0.0.42: empty + warning)."""

    jobs: tuple[JobInfo, ...]
    last_update: datetime | None = None
    unchanged: bool = False
    # Jobs Slurm listed whose data could not be read (left out).
    unreadable: int = 0


class NoVal(msgspec.Struct, frozen=True):
    """Slurm's ``{set, infinite, number}`` integer (v0.0.39+)."""

    set: bool = False
    infinite: bool = False
    number: int = 0


def number(value: NoVal | int | None) -> int | None:
    """An integer field that may be plain (older versions) or a NoVal."""
    if value is None:
        return None
    if isinstance(value, int):
        return value
    if not value.set or value.infinite:
        return None
    return value.number


def timestamp(value: NoVal | int | None) -> datetime | None:
    seconds = number(value)
    if not seconds:  # Slurm uses 0 for "not yet"
        return None
    try:
        return datetime.fromtimestamp(seconds, tz=UTC)
    except (ValueError, OverflowError, OSError):
        return None  # a begin time thousands of years ahead, which anyone can ask for


class ErrorEntry(msgspec.Struct, frozen=True):
    """Every shape of ``errors[]``: v0.0.38's {error, error_code} (its node
    lookup: {error, errno}) and the {description, error_number, error, source}
    of everything since."""

    error: str = ""
    error_code: int | None = None
    errno: int | None = None
    error_number: int | None = None
    description: str = ""
    source: str = ""

    def detail(self) -> SlurmErrorDetail:
        num = next(
            (n for n in (self.error_number, self.error_code, self.errno) if n is not None), None
        )
        return SlurmErrorDetail(
            error_number=num if num is not None else -1,
            error=self.error,
            description=self.description,
            source=self.source,
        )


class WarningEntry(msgspec.Struct, frozen=True):
    description: str = ""
    source: str = ""


class Envelope(msgspec.Struct, frozen=True):
    """The part of every body that says whether the call worked."""

    errors: list[ErrorEntry] = []
    warnings: list[WarningEntry] = []


# Slurm's communication failures: slurmrestd is up but cannot talk to slurmctld.
EPERM = 1
_COMMUNICATION_ERRORS = frozenset(range(1000, 1100)) | frozenset(range(1800, 1900))


class Adapter(abc.ABC):
    """One slurmrestd API version.

    Subclasses form a chain from the newest version down; each one overrides
    only what differs from its newer neighbour and says so in its docstring.
    """

    version: ClassVar[str]

    # -- paths ---------------------------------------------------------------

    def path(self, suffix: str) -> str:
        return f"/slurm/{self.version}/{suffix}"

    def ping_request(self) -> Request:
        return Request(method="GET", path=self.path("ping"))

    def get_job_request(self, job_id: int) -> Request:
        return Request(method="GET", path=self.path(f"job/{job_id}"))

    def list_jobs_request(self, changed_since: datetime | None) -> Request:
        params = {} if changed_since is None else self.update_time_param(changed_since)
        return Request(method="GET", path=self.path("jobs"), params=params)

    def get_node_request(self, name: str) -> Request:
        """Raises ValueError for a name that is not a safe path segment."""
        return Request(method="GET", path=self.path(f"node/{check_node_name(name)}"))

    def list_nodes_request(self) -> Request:
        return Request(method="GET", path=self.path("nodes"))

    def cancel_request(self, job_id: int, signal: str | None) -> Request:
        params = {"signal": signal} if signal else {}
        return Request(method="DELETE", path=self.path(f"job/{job_id}"), params=params)

    def update_comment_request(self, job_id: int, comment: str) -> Request:
        return Request(method="POST", path=self.path(f"job/{job_id}"), body={"comment": comment})

    def release_request(self, job_id: int, begin: int) -> Request:
        """A held job may start at ``begin`` (now): slurmctld schedules at once."""
        body = {"begin_time": self.begin_value(begin)}
        return Request(method="POST", path=self.path(f"job/{job_id}"), body=body)

    def begin_value(self, begin: int) -> Any:
        return begin

    def shorten_request(self, job_id: int, minutes: int) -> Request:
        """A lower time limit (any user may lower their own job's)."""
        body = {"time_limit": self.limit_value(minutes)}
        return Request(method="POST", path=self.path(f"job/{job_id}"), body=body)

    def limit_value(self, minutes: int) -> Any:
        return minutes

    def submit_request(self, job: JobSubmission) -> Request:
        return Request(method="POST", path=self.path("job/submit"), body=self.submit_body(job))

    # -- version specific ----------------------------------------------------

    @abc.abstractmethod
    def update_time_param(self, since: datetime) -> dict[str, str]: ...

    @abc.abstractmethod
    def submit_body(self, job: JobSubmission) -> dict[str, Any]: ...

    @abc.abstractmethod
    def parse_submit(self, status: int, content: bytes) -> SubmitResult: ...

    @abc.abstractmethod
    def parse_job(self, status: int, content: bytes, job_id: int) -> JobInfo: ...

    @abc.abstractmethod
    def parse_jobs(self, status: int, content: bytes) -> JobList: ...

    @abc.abstractmethod
    def parse_ping(self, status: int, content: bytes) -> list[PingResult]: ...

    @abc.abstractmethod
    def parse_node(self, status: int, content: bytes, name: str) -> NodeInfo: ...

    @abc.abstractmethod
    def parse_nodes(self, status: int, content: bytes) -> list[NodeInfo]: ...

    def parse_cancel(self, status: int, content: bytes, job_id: int) -> None:
        self.check(status, content, what=f"cancel job {job_id}")

    def parse_update(self, status: int, content: bytes, job_id: int) -> None:
        self.check(status, content, what=f"update job {job_id}")

    def outage_behind(self, error: SlurmError, elapsed: float) -> bool | None:
        """Whether a refusal may really be slurmctld being unreachable.

        True: it is; False: it is not; None: ask the controller (a ping).
        24.11 and 26.05 answer a cancel sent to an unreachable slurmctld with
        EPERM ("Operation not permitted", HTTP 500 or 403), as if the job
        were someone else's.
        """
        return None if EPERM in error.error_numbers else False

    # -- shared machinery ----------------------------------------------------

    def decode(self, model: type[T], content: bytes, what: str) -> T:
        try:
            return msgspec.json.decode(content, type=model)
        except (msgspec.ValidationError, msgspec.DecodeError, ValueError) as exc:
            raise SlurmUnexpectedResponse(
                f"slurmrestd {self.version} sent a body we cannot read for {what}: {exc}"
            ) from None

    def check(self, status: int, content: bytes, *, what: str) -> Envelope:
        """Raise the typed error for a failed call; return the envelope otherwise.

        slurmrestd can report failure in ``errors[]`` with HTTP 200, and success
        bodies are always JSON, so both the status and the body are checked.
        """
        envelope: Envelope | None = None
        if content.strip():
            try:
                envelope = msgspec.json.decode(content, type=Envelope)
            except (msgspec.ValidationError, msgspec.DecodeError, ValueError):
                envelope = None
        details = tuple(e.detail() for e in envelope.errors) if envelope else ()
        if status < 300 and envelope is not None and not details:
            return envelope
        raise self.error_for(status, details, what=what, body_readable=envelope is not None)

    def error_for(
        self,
        status: int,
        details: tuple[SlurmErrorDetail, ...],
        *,
        what: str,
        body_readable: bool = True,
    ) -> SlurmError:
        numbers = {d.error_number for d in details}
        message = f"slurmrestd {self.version}: {what} failed (HTTP {status})"
        cls: type[SlurmError]
        if status in (401, 403, 511) or SLURM_PROTOCOL_AUTHENTICATION_ERROR in numbers:
            cls = SlurmAuthError
        elif ESLURM_INVALID_JOB_ID in numbers:
            cls = SlurmJobNotFound
        elif status in (502, 503, 504) or numbers & _COMMUNICATION_ERRORS:
            cls = SlurmUnavailable
        elif details:
            cls = SlurmRequestRejected
        elif not body_readable and status < 300:
            cls = SlurmUnexpectedResponse
            message = f"slurmrestd {self.version}: {what} answered a body that is not JSON"
        else:
            cls = SlurmUnexpectedResponse
        return cls(message, status_code=status, errors=details)

    @staticmethod
    def warnings_of(envelope: Envelope) -> tuple[str, ...]:
        return tuple(w.description for w in envelope.warnings if w.description)

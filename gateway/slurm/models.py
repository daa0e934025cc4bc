"""Version-independent view of slurmrestd objects.

Every adapter translates its API version's bodies to and from these Structs, so
nothing outside ``gateway.slurm.adapters`` ever sees a version-specific shape.
"""

from __future__ import annotations

import enum
import re
from datetime import datetime

import msgspec


class JobState(enum.StrEnum):
    """Slurm's base job state (``JOB_STATE_BASE``); flags are kept apart."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUSPENDED = "SUSPENDED"
    COMPLETED = "COMPLETED"
    CANCELLED = "CANCELLED"
    FAILED = "FAILED"
    TIMEOUT = "TIMEOUT"
    NODE_FAIL = "NODE_FAIL"
    PREEMPTED = "PREEMPTED"
    BOOT_FAIL = "BOOT_FAIL"
    DEADLINE = "DEADLINE"
    OUT_OF_MEMORY = "OUT_OF_MEMORY"
    UNKNOWN = "UNKNOWN"

    @property
    def is_terminal(self) -> bool:
        return self not in _ACTIVE_STATES

    @classmethod
    def parse(cls, names: list[str] | str) -> tuple[JobState, tuple[str, ...]]:
        """Split Slurm's state words into the base state and the remaining flags.

        v0.0.38/39 send one word ("RUNNING"); v0.0.40+ a list of the base state
        plus flags (["PENDING", "REQUEUED"]) in no guaranteed order.
        """
        words = [names] if isinstance(names, str) else list(names)
        base = cls.UNKNOWN
        flags: list[str] = []
        for word in words:
            upper = word.upper()
            if base is cls.UNKNOWN and upper in cls.__members__:
                base = cls[upper]
            else:
                flags.append(upper)
        if base is cls.UNKNOWN:
            # v0.0.38/39 name only the flag while one is set ("REQUEUED").
            for flag in flags:
                if flag in _BASE_OF_FLAG:
                    base = _BASE_OF_FLAG[flag]
                    break
        return base, tuple(flags)


_ACTIVE_STATES = frozenset({JobState.PENDING, JobState.RUNNING, JobState.SUSPENDED})

# The base state implied by a flag when Slurm sends the flag alone. A bare
# "COMPLETING" is absent on purpose: the job has ended, and only its exit code
# tells how (the v0.0.39 adapter derives the base state from it), so the word
# alone gives UNKNOWN.
_BASE_OF_FLAG = {
    "CONFIGURING": JobState.RUNNING,
    "SIGNALING": JobState.RUNNING,
    "STAGE_OUT": JobState.RUNNING,
    "RESIZING": JobState.RUNNING,
    "STOPPED": JobState.RUNNING,
    "POWER_UP_NODE": JobState.RUNNING,
    "REQUEUED": JobState.PENDING,
    "REQUEUE_HOLD": JobState.PENDING,
    "REQUEUE_FED": JobState.PENDING,
    "RESV_DEL_HOLD": JobState.PENDING,
    "REVOKED": JobState.CANCELLED,
    "SPECIAL_EXIT": JobState.FAILED,
}


class JobSubmission(msgspec.Struct, frozen=True, kw_only=True):
    """A batch job as the gateway wants it; adapters map it to a submit body."""

    script: str
    name: str
    working_directory: str
    environment: dict[str, str] = msgspec.field(default_factory=dict)
    partition: str | None = None
    account: str | None = None
    standard_output: str | None = None
    standard_error: str | None = None
    nodes: int = 1
    cpus_per_task: int | None = None
    memory_per_node_mb: int | None = None
    time_limit_minutes: int | None = None
    gpus_per_node: int | None = None
    comment: str | None = None
    # Not before this time (seconds since the epoch): a hold the gateway can
    # act within (cancel a duplicate) before the job could start.
    begin_time: int | None = None


class SubmitResult(msgspec.Struct, frozen=True, kw_only=True):
    job_id: int
    warnings: tuple[str, ...] = ()


class JobExit(msgspec.Struct, frozen=True, kw_only=True):
    """How a finished job ended: its return code, or the signal that ended it."""

    return_code: int | None = None
    signal: int | None = None

    @classmethod
    def from_wait_status(cls, status: int) -> JobExit:
        # v0.0.38/39 send the raw waitpid() status: exit 3 arrives as 768.
        if status & 0x7F:
            return cls(return_code=None, signal=status & 0x7F)
        return cls(return_code=(status >> 8) & 0xFF, signal=None)


class JobInfo(msgspec.Struct, frozen=True, kw_only=True):
    job_id: int
    name: str
    user_name: str
    user_id: int | None = None  # numeric uid of user_name
    state: JobState
    state_flags: tuple[str, ...] = ()
    state_reason: str = ""
    state_description: str = ""
    partition: str = ""
    nodes: str = ""
    batch_host: str = ""
    node_count: int | None = None
    cpus: int | None = None
    memory_per_node_mb: int | None = None
    time_limit_minutes: int | None = None
    submit_time: datetime | None = None
    start_time: datetime | None = None
    end_time: datetime | None = None
    exit: JobExit | None = None
    comment: str = ""
    working_directory: str = ""
    standard_output: str = ""
    standard_error: str = ""


class PingResult(msgspec.Struct, frozen=True, kw_only=True):
    """One controller's answer; ``responding`` is False when slurmctld is down
    or the request's credentials were refused (v0.0.42 answers 200 then)."""

    hostname: str
    responding: bool
    slurm_release: str
    api_version: str
    latency_us: int | None = None


class NodeInfo(msgspec.Struct, frozen=True, kw_only=True):
    """The names of one node (Slurm's NodeName, NodeHostname and NodeAddr) and
    its state: base state and flags, upper case (``("IDLE", "DRAIN")``)."""

    name: str
    hostname: str
    address: str
    state: tuple[str, ...] = ()
    reason: str = ""

    @property
    def unavailable(self) -> str | None:
        """``drained``, ``draining``, ``down``... when jobs cannot start on it."""
        flags = set(self.state)
        if "DOWN" in flags or "NOT_RESPONDING" in flags:
            return "down"
        if "DRAIN" in flags:
            busy = flags & {"ALLOCATED", "MIXED", "COMPLETING"}
            return "draining" if busy else "drained"
        for word in ("FAIL", "MAINTENANCE", "POWERED_DOWN", "POWER_DOWN", "REBOOT_REQUESTED"):
            if word in flags:
                return word.lower().replace("_", " ")
        return None


_NODE_NAME = re.compile(r"[A-Za-z0-9._-]{1,255}")


def check_node_name(name: str) -> str:
    """Return ``name`` if it is safe as one URL path segment, else raise ValueError.

    Allowed: 1 to 255 of ``A-Z a-z 0-9 . _ -``, except the dot segments ``.``
    and ``..`` (which a URL resolves to another path).
    """
    if not _NODE_NAME.fullmatch(name) or name in (".", ".."):
        raise ValueError(f"invalid node name {name[:80]!r}: expected 1 to 255 of A-Z a-z 0-9 . _ -")
    return name


def expand_output_path(pattern: str, job: JobInfo) -> str:
    """Expand the filename pattern of sbatch's --output for one job.

    v0.0.38 returns the raw pattern (``/tmp/x-%j.out``); v0.0.39 to v0.0.42 already
    expand it. An empty pattern means Slurm's default ``slurm-%j.out`` in the
    working directory.
    """
    if not pattern:
        pattern = "slurm-%j.out"
    if not pattern.startswith("/") and job.working_directory:
        pattern = job.working_directory.rstrip("/") + "/" + pattern
    if "%" not in pattern:
        return pattern
    node = job.batch_host or (job.nodes.split(",")[0] if job.nodes else "")
    values = {
        "%": "%",
        "j": str(job.job_id),
        "J": str(job.job_id),
        "A": str(job.job_id),
        "a": "0",
        "u": job.user_name,
        "x": job.name,
        "N": node,
        "n": "0",
        "t": "0",
    }
    out: list[str] = []
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if char != "%" or i + 1 >= len(pattern):
            out.append(char)
            i += 1
            continue
        # Slurm allows a zero-padding width between % and the letter (%5j).
        j = i + 1
        while j < len(pattern) and pattern[j] in "0123456789":  # isdigit() takes '²'
            j += 1
        # Slurm caps the width at 10; anyone's job can ask for 50000000.
        width = min(int(pattern[i + 1 : j]), 10) if j > i + 1 else 0
        letter = pattern[j] if j < len(pattern) else ""
        if letter in values:
            value = values[letter]
            out.append(value.zfill(width) if letter != "%" else value)
            i = j + 1
        else:
            out.append(char)
            i += 1
    return "".join(out)

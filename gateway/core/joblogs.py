"""Reading a service's log files without trusting what the job says about them.

The gateway may run as a user that can read much more than the job's user
(root, in a pod with the cluster's file systems mounted), and Slurm reports
whatever output path the job's submitter chose. So a log is read only from
the file the gateway itself named at submission, in the job directory it was
given, opened without following a symbolic link and without blocking (a FIFO
would hang a worker thread), and only when it is a regular file owned by the
job's user. Anything else answers with a reason and no content.

The files may be read through another path on the gateway's host than on the
cluster (``path_map``: a mount of the cluster's file systems).

Following a log as it is written (logfollow.py) opens it with the same
checks (``open_checked``); how many follows a process serves is bounded here
(``Followers``).
"""

from __future__ import annotations

import asyncio
import errno
import os
import stat
from pathlib import Path

import msgspec

from gateway.core import metadata
from gateway.core.errors import Conflict, GatewayError, NotFound, QuotaExceeded
from gateway.core.model import Logs, job_dir_for, job_name_of
from gateway.slurm import JobInfo, JobState


class LogFile(msgspec.Struct, frozen=True, kw_only=True):
    text: str = ""
    truncated: bool = False
    missing: bool = False
    # Why the file was not read; None when it was read or is missing.
    refused: str | None = None


def open_checked(
    directory: Path, name: str, *, uid: int | None
) -> tuple[int, os.stat_result] | LogFile:
    """``directory/name`` opened for reading with its status, when it is a
    regular file of the job's user with no other link; else why not (a
    LogFile: missing or refused). ``name`` is a single path component the
    gateway chose. The caller closes the descriptor."""
    if "/" in name or name in ("", ".", ".."):
        raise ValueError(f"not a file name: {name!r}")
    try:
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return LogFile(missing=True)
    try:
        try:
            fd = os.open(
                name,
                os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC,
                dir_fd=dir_fd,
            )
        except FileNotFoundError:
            return LogFile(missing=True)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return LogFile(refused=f"{name} is a symbolic link; not followed")
            return LogFile(refused=f"{name} cannot be opened: {exc.strerror}")
    finally:
        os.close(dir_fd)
    info = os.fstat(fd)
    refused = None
    if not stat.S_ISREG(info.st_mode):
        refused = f"{name} is not a regular file"
    elif uid is None or info.st_uid != uid:
        refused = f"{name} is not owned by the job's user"
    elif info.st_nlink != 1:
        # A hard link to someone else's file of the same owner.
        refused = f"{name} has other hard links; not read"
    if refused is not None:
        os.close(fd)
        return LogFile(refused=refused)
    return fd, info


def read_tail(
    directory: Path, name: str, *, uid: int | None, lines: int | None, max_bytes: int
) -> LogFile:
    """The last ``lines`` lines (all if None) of ``directory/name``, at most
    ``max_bytes``. ``name`` is a single path component the gateway chose."""
    opened = open_checked(directory, name, uid=uid)
    if isinstance(opened, LogFile):
        return opened
    fd, info = opened
    with os.fdopen(fd, "rb") as f:
        start = max(0, info.st_size - max_bytes)
        f.seek(start)
        data = f.read(max_bytes)
    truncated = start > 0
    if truncated:
        # Drop the partial first line.
        data = data.split(b"\n", 1)[1] if b"\n" in data else data
    text = data.decode("utf-8", errors="replace")
    if lines is not None:
        parts = text.splitlines(keepends=True)
        if len(parts) > lines:
            truncated = True
            text = "".join(parts[-lines:]) if lines else ""
    return LogFile(text=text, truncated=truncated)


# Log follows (logfollow.py) one gateway process serves at once: each holds a
# connection and polls two files, so a tenant cannot take them all.
FOLLOWERS_PER_TENANT = 8
FOLLOWERS_TOTAL = 256
FOLLOWERS_RETRY_AFTER_SECONDS = 30


class TooManyFollowers(QuotaExceeded):
    """The caller's tenant follows as many logs as it may at once (429)."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail, limit="log_followers")
        self.headers = {"Retry-After": str(FOLLOWERS_RETRY_AFTER_SECONDS)}


class FollowersFull(GatewayError):
    """The gateway process follows as many logs as it will at once (503)."""

    status_code = 503
    title = "Too many log followers"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.headers = {"Retry-After": str(FOLLOWERS_RETRY_AFTER_SECONDS)}


class Followers:
    """The log follows under way in this process, by tenant, within bounds."""

    def __init__(
        self, per_tenant: int = FOLLOWERS_PER_TENANT, total: int = FOLLOWERS_TOTAL
    ) -> None:
        self.per_tenant = per_tenant
        self.total = total
        self.by_tenant: dict[str, int] = {}

    def admit(self, tenant: str) -> FollowSlot:
        """A slot for one follow of ``tenant``'s, or 429 (the tenant's bound) or 503."""
        held = self.by_tenant.get(tenant, 0)
        if held >= self.per_tenant:
            raise TooManyFollowers(
                f"tenant {tenant} already follows {held} logs on this gateway process, "
                f"the most it may at once ({self.per_tenant}); end one, or retry later"
            )
        if sum(self.by_tenant.values()) >= self.total:
            raise FollowersFull(
                f"this gateway process follows the most logs it will at once ({self.total}); "
                "retry later"
            )
        self.by_tenant[tenant] = held + 1
        return FollowSlot(self, tenant)

    def held(self, tenant: str | None = None) -> int:
        if tenant is None:
            return sum(self.by_tenant.values())
        return self.by_tenant.get(tenant, 0)


class FollowSlot:
    """One follow's place, given back once (by the follow's end, or when a
    follow that never started is dropped)."""

    __slots__ = ("followers", "tenant")

    def __init__(self, followers: Followers | None, tenant: str) -> None:
        self.followers = followers
        self.tenant = tenant

    def release(self) -> None:
        followers, self.followers = self.followers, None
        if followers is None:
            return
        left = followers.by_tenant.get(self.tenant, 0) - 1
        if left > 0:
            followers.by_tenant[self.tenant] = left
        else:
            followers.by_tenant.pop(self.tenant, None)

    def __del__(self) -> None:
        self.release()


class LogReader:
    """A service's logs: the job's output and error files, as the gateway named them."""

    def __init__(
        self,
        *,
        job_tag: str,
        job_dir: str,
        path_map: list[tuple[str, str]],
        max_bytes: int,
    ) -> None:
        self.job_tag = job_tag
        self.job_dir = job_dir
        self.path_map = path_map
        self.max_bytes = max_bytes
        self.followers = Followers()

    async def logs(
        self, service_id: str, job: JobInfo, meta: metadata.ServiceMeta, *, tail: int | None
    ) -> Logs:
        if job.state is JobState.PENDING:
            raise Conflict(f"service {service_id} is pending: it has not started, so no logs yet")
        stdout = await self._log_file(job, meta, "out", job.standard_output, tail)
        stderr: LogFile | None = None
        if job.standard_error and job.standard_error != job.standard_output:
            stderr = await self._log_file(job, meta, "err", job.standard_error, tail)
        files = [f for f in (stdout, stderr) if f is not None]
        if all(f.missing for f in files):
            job_dir = job_dir_for(self.job_dir, job.user_name)
            raise NotFound(
                f"no log file of service {service_id} at {job_dir} yet "
                f"(looked at {self.local_path(job_dir)} on the gateway host)"
            )
        refused = "; ".join(f.refused for f in files if f.refused)
        return Logs(
            stdout=stdout.text,
            stderr=stderr.text if stderr is not None and not stderr.missing else None,
            truncated=any(f.truncated for f in files),
            reason=refused or None,
        )

    async def _log_file(
        self,
        job: JobInfo,
        meta: metadata.ServiceMeta,
        suffix: str,
        reported: str,
        tail: int | None,
    ) -> LogFile:
        directory, name, refused = self.located(job, meta, suffix, reported)
        if refused is not None:
            return LogFile(refused=refused)
        return await asyncio.to_thread(
            read_tail, directory, name, uid=job.user_id, lines=tail, max_bytes=self.max_bytes
        )

    def located(
        self, job: JobInfo, meta: metadata.ServiceMeta, suffix: str, reported: str
    ) -> tuple[Path, str, str | None]:
        """The job's log file of ``suffix``: its folder on this host and the
        name the gateway chose, and why it must not be read (Slurm reports
        the job's output elsewhere) or None."""
        name = f"{job_name_of(meta.recipe, self.job_tag)}-{job.job_id}.{suffix}"
        job_dir = job_dir_for(self.job_dir, job.user_name).rstrip("/")
        expected = f"{job_dir}/{name}"
        refused = None
        if reported != expected:
            shown = reported[:200].encode("unicode_escape").decode("ascii")
            refused = (
                f"Slurm reports the job's output at '{shown}', not in the file "
                f"the gateway chose ({expected}); not read"
            )
        return self.local_path(job_dir or "/"), name, refused

    def local_path(self, cluster_path: str) -> Path:
        """Where ``cluster_path`` is on the gateway's host."""
        for remote, local in self.path_map:
            if cluster_path == remote or cluster_path.startswith(remote.rstrip("/") + "/"):
                rest = cluster_path[len(remote.rstrip("/")) :].lstrip("/")
                return Path(local) / rest
        return Path(cluster_path)

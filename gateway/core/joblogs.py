"""Reading a service's log files without trusting what the job says about them.

The gateway may run as a user that can read much more than the job's user
(root, in a pod with the cluster's file systems mounted), and Slurm reports
whatever output path the job's submitter chose. So a log is read only from
the file the gateway itself named at submission, in the job directory it was
given, opened without following a symbolic link and without blocking (a FIFO
would hang a worker thread), and only when it is a regular file owned by the
job's user. Anything else answers with a reason and no content.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import msgspec


class LogFile(msgspec.Struct, frozen=True, kw_only=True):
    text: str = ""
    truncated: bool = False
    missing: bool = False
    # Why the file was not read; None when it was read or is missing.
    refused: str | None = None


def read_tail(
    directory: Path, name: str, *, uid: int | None, lines: int | None, max_bytes: int
) -> LogFile:
    """The last ``lines`` lines (all if None) of ``directory/name``, at most
    ``max_bytes``. ``name`` is a single path component the gateway chose."""
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
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return LogFile(refused=f"{name} is not a regular file")
        if uid is None or info.st_uid != uid:
            return LogFile(refused=f"{name} is not owned by the job's user")
        if info.st_nlink != 1:
            # A hard link to someone else's file of the same owner.
            return LogFile(refused=f"{name} has other hard links; not read")
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

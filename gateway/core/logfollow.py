"""Following a service's logs: its lines as they are written, until its job ends.

A follow reads the same files as ``logs`` does, with the same checks
(joblogs.py): the file the gateway named, opened without following a link,
a regular file of the job's user with no other link. It opens them again on
every poll, once per ``FOLLOW_POLL_SECONDS``, in a worker thread, and reads
only what was written since the last poll (at most the log byte cap per poll;
more at once is read on without waiting). A file that shrank or was replaced
is read again from its start, and a ``reset`` event says so (one truncated
and written past its old size within one poll looks like one appended to).

Whether the job still runs comes from the replica's shared job view (which a
follow keeps in use, so it keeps listing), never from a Slurm call of its
own. While the job is pending the follow waits; once Slurm's record says the
job ended (its output closed), the files are read to their end and an ``end``
event gives the service's final status. Every ``HEARTBEAT_SECONDS`` without
an event a comment goes out, so that proxies keep the connection.

How many follows one gateway process serves at once is bounded, per tenant
and in all (joblogs.Followers). A client that leaves ends its follow: the
generator is closed at its next wait and holds nothing after.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import msgspec

from gateway.core import metadata
from gateway.core.joblogs import FollowSlot, LogFile, LogReader, open_checked
from gateway.core.jobview import JobView
from gateway.core.status import derive
from gateway.slurm import JobInfo, JobState, SlurmError

FOLLOW_POLL_SECONDS = 0.5
# Polls of followed files run here, not in the loop's default executor: a slow
# or hung file system then holds these threads, not those Slurm answers are
# parsed in (the job view would stall with it).
_POLLS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="log-follow")
HEARTBEAT_SECONDS = 15.0
# A longer line goes out in pieces of this size (no event holds more).
MAX_LINE_BYTES = 64 * 1024

# Server-Sent Events end a line at CR, LF or CRLF: a log line is cut at each.
_BREAK = re.compile(rb"\r\n|\r|\n")


class LogEvent(msgspec.Struct, frozen=True):
    """One event of a follow: ``stdout`` or ``stderr`` (one line, without its
    line break), ``reset``, ``error`` or ``end`` (JSON), or a heartbeat (no
    event name: a comment)."""

    event: str
    data: str


# The service's status and its reason, for a job record.
StatusOf = Callable[[JobInfo], Awaitable[tuple[str, str]]]


class _Read(msgspec.Struct, frozen=True):
    data: bytes = b""
    offset: int = 0
    ident: tuple[int, int] | None = None
    reset: bool = False  # read again from the start: the file shrank or was replaced
    skipped: bool = False  # began past the start (the byte cap): the first line is partial
    full: bool = False  # as much as one poll reads: there may be more
    missing: bool = False
    refused: str | None = None


def read_new(
    directory: Path,
    name: str,
    *,
    uid: int | None,
    offset: int | None,
    ident: tuple[int, int] | None,
    max_bytes: int,
) -> _Read:
    """What ``directory/name`` holds past ``offset`` (None: its last
    ``max_bytes``), at most ``max_bytes``, with the same checks as ``read_tail``."""
    opened = open_checked(directory, name, uid=uid)
    if isinstance(opened, LogFile):
        return _Read(missing=opened.missing, refused=opened.refused)
    fd, info = opened
    now = (info.st_dev, info.st_ino)
    reset = offset is not None and (now != ident or info.st_size < offset)
    skipped = False
    if offset is None:
        offset = max(0, info.st_size - max_bytes)
        skipped = offset > 0
    elif reset:
        offset = 0
    with os.fdopen(fd, "rb") as f:
        f.seek(offset)
        data = f.read(max_bytes)
    return _Read(
        data=data,
        offset=offset + len(data),
        ident=now,
        reset=reset,
        skipped=skipped,
        full=len(data) >= max_bytes,
    )


@dataclass
class _File:
    stream: str  # stdout or stderr
    directory: Path
    name: str
    refused: str | None = None
    offset: int | None = None
    ident: tuple[int, int] | None = None
    pending: bytes = b""  # a line not yet ended
    done: bool = False  # refused: not read again


async def follow(
    reader: LogReader,
    job: JobInfo,
    meta: metadata.ServiceMeta,
    *,
    view: JobView,
    status: StatusOf,
    slot: FollowSlot,
    tail: int | None,
    stopping: Callable[[], bool] = lambda: False,
) -> AsyncGenerator[LogEvent, None]:
    """The events of one follow of ``job``'s logs; ``slot`` is given back at
    its end. ``tail``: begin with the last lines written (at most the byte cap)
    instead of all of them; ``stopping``: the gateway is stopping, end now."""
    try:
        yield LogEvent("", f"following the logs of service {job.job_id}")
        beat = time.monotonic()
        files: list[_File] | None = None
        last = job
        while True:
            current = view.peek(job.job_id)
            if current is None:  # purged: it ended, however (as stopping one does)
                current = msgspec.structs.replace(
                    last,
                    state=JobState.CANCELLED if not last.state.is_terminal else last.state,
                    end_time=last.end_time or datetime.now(tz=UTC),
                )
            last = current
            ended = current.state.is_terminal and "COMPLETING" not in current.state_flags
            more = False
            if current.state is not JobState.PENDING:
                if files is None:
                    files = _files(reader, current, meta)
                reads = await asyncio.get_running_loop().run_in_executor(
                    _POLLS, _read_all, files, current.user_id, reader.max_bytes
                )
                for file, read in zip(files, reads, strict=True):
                    for event in _events(file, read, tail, flush=ended and not read.full):
                        yield event
                        beat = time.monotonic()
                    more = more or read.full
                if all(f.done for f in files):
                    yield await _end(current, status, "no log file of the service can be read")
                    return
            if ended and not more:
                yield await _end(current, status, None)
                return
            if stopping():
                yield await _end(current, status, "the gateway is stopping: follow again")
                return
            if time.monotonic() - beat >= HEARTBEAT_SECONDS:
                yield LogEvent("", "waiting" if files is None else "following")
                beat = time.monotonic()
            if more:
                continue
            await asyncio.sleep(FOLLOW_POLL_SECONDS)
            # A read: the view goes on listing. Slurm unreachable: the job as
            # last listed, and again after the next poll.
            with contextlib.suppress(SlurmError):
                await view.jobs_ready()
    finally:
        slot.release()


def _files(reader: LogReader, job: JobInfo, meta: metadata.ServiceMeta) -> list[_File]:
    wanted = [("stdout", "out", job.standard_output)]
    if job.standard_error and job.standard_error != job.standard_output:
        wanted.append(("stderr", "err", job.standard_error))
    files = []
    for stream, suffix, reported in wanted:
        directory, name, refused = reader.located(job, meta, suffix, reported)
        files.append(_File(stream, directory, name, refused=refused))
    return files


def _read_all(files: list[_File], uid: int | None, max_bytes: int) -> list[_Read]:
    """One poll of every file (in a worker thread)."""
    return [
        _Read(refused=f.refused)
        if f.refused or f.done
        else read_new(
            f.directory, f.name, uid=uid, offset=f.offset, ident=f.ident, max_bytes=max_bytes
        )
        for f in files
    ]


def _events(file: _File, read: _Read, tail: int | None, *, flush: bool) -> list[LogEvent]:
    """The events of one read of ``file``, its state moved past it."""
    if file.done:
        return []
    if read.refused is not None:
        file.done = True
        return [LogEvent("error", json.dumps({"stream": file.stream, "reason": read.refused}))]
    if read.missing:
        return []
    events = []
    first = file.offset is None
    if read.reset:
        file.pending = b""
        reason = f"{file.name} was replaced or shrank; read again from its start"
        events.append(LogEvent("reset", json.dumps({"stream": file.stream, "reason": reason})))
    file.offset, file.ident = read.offset, read.ident
    data = file.pending + read.data
    if read.skipped:
        # The cap cut the first line: it begins after the first line break.
        found = _BREAK.search(data)
        data = data[found.end() :] if found else b""
    lines, file.pending = _split(data, flush=flush)
    if first and tail is not None:
        lines = lines[-tail:] if tail else []
    events.extend(LogEvent(file.stream, line) for line in lines)
    return events


def _split(data: bytes, *, flush: bool) -> tuple[list[str], bytes]:
    """The ended lines of ``data`` (decoded, without their breaks) and what
    is left of a line not yet ended (nothing with ``flush``: the file is
    complete). A line longer than MAX_LINE_BYTES goes out in pieces."""
    # A CR at the very end may be half of a CRLF still being written.
    end = len(data) if flush else max(data.rfind(b"\n"), data.rfind(b"\r", 0, len(data) - 1)) + 1
    parts = _BREAK.split(data[:end])
    if parts[-1] == b"":
        parts.pop()  # what follows the last break
    rest = data[end:]
    while len(rest) > MAX_LINE_BYTES:
        cut = _cut(rest)
        parts.append(rest[:cut])
        rest = rest[cut:]
    lines = []
    for part in parts:
        while len(part) > MAX_LINE_BYTES:
            cut = _cut(part)
            lines.append(part[:cut].decode("utf-8", errors="replace"))
            part = part[cut:]
        lines.append(part.decode("utf-8", errors="replace"))
    return lines, rest


def _cut(data: bytes) -> int:
    """Where to cut a piece of MAX_LINE_BYTES at most off ``data``: not
    inside a UTF-8 character (unless it is no UTF-8)."""
    for cut in range(MAX_LINE_BYTES, MAX_LINE_BYTES - 4, -1):
        if data[cut] & 0xC0 != 0x80:
            return cut
    return MAX_LINE_BYTES


async def _end(job: JobInfo, status: StatusOf, why: str | None) -> LogEvent:
    """The ``end`` event: the service's status and its reason (``why``
    when the follow ends before the job does)."""
    try:
        now, reason = await status(job)
    except Exception:  # the stream still ends as documented: Slurm's say alone
        derived, reason = derive(job, metadata.Reported(), None)
        now = derived.value
    return LogEvent("end", json.dumps({"status": now, "reason": why or reason}))

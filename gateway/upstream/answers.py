"""Reading what a service answers: whole (within a limit and the memory
budget) or piece by piece as it arrives, with its failures as the gateway's.

Each reader takes the request's deadline (loop time): a piece that arrives
after it ends the answer with a timeout, so an upstream that trickles a byte
at a time cannot hold it longer; one that sends nothing meets the pool's
per-read timeout.)"""

from __future__ import annotations

import contextlib
import math
from collections.abc import AsyncGenerator
from typing import Any, NamedTuple

import msgspec

from gateway.upstream.limits import Lease
from gateway.upstream.pool import Response

# The most a model list, a probe's answer or an error answer may take.
SMALL_ANSWER = 1024 * 1024


class UpstreamError(Exception):
    """vLLM answered with an error; ``status`` and ``message`` are vLLM's."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class UpstreamUnavailable(Exception):
    """vLLM could not be reached or did not answer in time; ``unsent``: no
    connection was made, so the request may go to another server."""

    def __init__(self, message: str, *, timeout: bool = False, unsent: bool = False) -> None:
        super().__init__(message)
        self.timeout = timeout
        self.unsent = unsent


class _ErrorBody(msgspec.Struct, frozen=True):
    message: str | None = None
    error: Any = None


class Opened(NamedTuple):
    """An answer with its body still to be read, and the request's deadline."""

    response: Response
    deadline: float = math.inf


async def iter_chunks(
    response: Response, deadline: float = math.inf
) -> AsyncGenerator[bytes, None]:
    """The answer's body as it arrives. Closing the iterator (a client that
    went away) closes the upstream connection, which makes vLLM abort."""
    loop = response.loop
    try:
        while chunk := await response.read(deadline):
            if loop.time() > deadline:
                raise TimeoutError
            yield chunk
    except TimeoutError:
        raise UpstreamUnavailable("vLLM's answer ran out of time", timeout=True) from None
    except OSError as exc:
        raise UpstreamUnavailable(f"the stream from vLLM broke off: {type(exc).__name__}") from None
    finally:
        # Kept alive only if the answer ended; an unfinished one is closed,
        # which ends the upstream request (vLLM aborts on the disconnect).
        # Synchronous, so a cancelled client cannot interrupt it.
        response.release()


async def iter_answer(
    response: Response, limit: int, deadline: float = math.inf
) -> AsyncGenerator[bytes, None]:
    """A whole (not streamed) answer's body as it arrives, refused past
    ``limit`` bytes; released for reuse once read whole, else closed."""
    loop = response.loop
    size = 0
    whole = False
    try:
        while chunk := await response.read(deadline):
            if loop.time() > deadline:
                raise TimeoutError
            size += len(chunk)
            if size > limit:
                # Not the URL: a tenant of a shared service is not told where it runs.
                raise UpstreamError(502, f"vLLM answered more than {limit} bytes")
            yield chunk
        whole = True
    except TimeoutError:
        raise UpstreamUnavailable("vLLM did not answer in time", timeout=True) from None
    except OSError as exc:
        raise UpstreamUnavailable(f"vLLM is unreachable: {type(exc).__name__}") from None
    finally:
        if whole:
            response.release()
        else:
            response.close()


class Answer(NamedTuple):
    status: int
    content: bytes | bytearray


async def read_all(
    response: Response,
    limit: int = SMALL_ANSWER,
    lease: Lease | None = None,
    deadline: float = math.inf,
) -> Answer:
    """``response`` read whole and released, refused past ``limit`` bytes.
    Its bytes are taken from the memory budget on ``lease`` twice over (the
    answer, then what is decoded from it)."""
    content: bytes | bytearray = b""
    # Closed here, not when collected: a refused lease must end the request.
    async with contextlib.aclosing(iter_answer(response, limit, deadline)) as chunks:
        async for chunk in chunks:
            if lease is not None:
                lease.take(2 * len(chunk))
            if not content:
                content = chunk  # most answers come in one piece: not copied
            else:
                # One buffer, not pieces joined at the end (twice the answer).
                if isinstance(content, bytes):
                    content = bytearray(content)
                content += chunk
    return Answer(response.status, content)


def message_of(content: bytes | bytearray, status: int) -> str:
    try:
        body = msgspec.json.decode(content, type=_ErrorBody)
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError):
        return content[:500].decode("utf-8", errors="replace") or f"HTTP {status}"
    if isinstance(body.error, dict) and body.error.get("message"):
        return str(body.error["message"])[:500]
    return (body.message or (str(body.error) if body.error else f"HTTP {status}"))[:500]


class _UpstreamError(msgspec.Struct):
    type: str | None = None


class _UpstreamErrorBody(msgspec.Struct):
    error: _UpstreamError | str | None = None
    type: str | None = None  # vLLM before 0.6 put it at the top


_read_error = msgspec.json.Decoder(_UpstreamErrorBody).decode


def error_kind(content: bytes | bytearray) -> str | None:
    """The ``type`` of vLLM's error answer, where it says one."""
    try:
        body = _read_error(content)
    except msgspec.DecodeError:
        return None
    if isinstance(body.error, _UpstreamError):
        return body.error.type
    return body.type

"""ASGI helpers of the data path: a request body read under the memory budget,
an answer written whole or chunk by chunk, and a Litestar stream that closes
its source.

The data path answers in front of Litestar's handlers (prompts.py,
frontdoor.py), so it reads bodies and writes answers on the ASGI connection
itself; what the handlers answer as streams is a :class:`ClosingStream`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

import anyio
from litestar.response import Stream
from litestar.response.base import ASGIResponse
from litestar.response.streaming import ASGIStreamingResponse
from litestar.types import (
    HTTPRequestEvent,
    HTTPResponseBodyEvent,
    HTTPResponseStartEvent,
    Receive,
    ReceiveMessage,
    Scope,
    Send,
)

from gateway.upstream.limits import Lease

# Litestar's request_max_body_size: a body past it goes to the handler, which
# answers 413; read here up to it, so that what is held is on the budget.
MAX_BODY = 10_000_000
JSON = (b"content-type", b"application/json")
SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),  # as Litestar's Stream sends it
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


async def read_body(
    receive: Receive,
    scope: Scope,
    limit: int = MAX_BODY,
    lease: Lease | None = None,
    weight: int = 1,
) -> tuple[bytes | bytearray, bool]:
    """The request body, and whether it is all of it (not past ``limit``),
    ``weight`` times its size taken from the memory budget on ``lease``
    (OverBudget past it).

    Most bodies come in one piece, taken as it is. One in pieces goes into one
    buffer (pieces joined, or a buffer grown, took up to three times the body),
    made at once at its declared size (Content-Length), which is taken from
    the budget before more of it is read."""
    message = await receive()
    if message["type"] != "http.request":
        return b"", False  # a disconnect: the handler sees it too
    first = message.get("body", b"")
    if lease is not None:
        lease.take(weight * len(first))
    if not message.get("more_body", False) or len(first) > limit:
        return first, len(first) <= limit
    size = taken = len(first)
    declared = _declared_length(scope)
    if declared is None or not size < declared <= limit:
        declared = size
    elif lease is not None:
        lease.take(weight * (declared - size))
        taken = declared
    body = bytearray(declared)
    body[:size] = first
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return body[:size], False
        chunk = message.get("body", b"")
        if lease is not None and size + len(chunk) > taken:
            lease.take(weight * (size + len(chunk) - taken))
            taken = size + len(chunk)
        # In place while the buffer has room; past it, the buffer grows.
        body[size : size + len(chunk)] = chunk
        size += len(chunk)
        if size > limit:
            return body, False
        if not message.get("more_body", False):
            del body[size:]  # if less came than was declared
            return body, True


def header(scope: Scope, name: bytes) -> bytes | None:
    """The first value of the request's header ``name`` (lower case)."""
    for key, value in scope["headers"]:
        if key == name:
            return value
    return None


def _declared_length(scope: Scope) -> int | None:
    value = header(scope, b"content-length")
    return int(value) if value is not None and value.isdigit() else None


def replaying(body: bytes | bytearray, whole: bool, receive: Receive) -> Receive:
    """``receive`` with what was read from it given back first."""
    given = False

    async def replay() -> ReceiveMessage:
        nonlocal given
        if not given:
            given = True
            first: HTTPRequestEvent = {
                "type": "http.request",
                "body": bytes(body),
                "more_body": not whole,
            }
            return first
        return await receive()

    return replay


async def send_whole(
    send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes
) -> None:
    """An answer in one piece."""
    start: HTTPResponseStartEvent = {
        "type": "http.response.start",
        "status": status,
        "headers": headers,
    }
    await send(start)
    end: HTTPResponseBodyEvent = {"type": "http.response.body", "body": body, "more_body": False}
    await send(end)


async def send_stream(
    body: AsyncGenerator[bytes, None],
    chunks: AsyncGenerator[bytes, None],
    receive: Receive,
    send: Send,
    headers: list[tuple[bytes, bytes]],
    status: int = 200,
) -> None:
    """``body`` (the relay of the upstream's ``chunks``) written chunk by chunk
    as it comes; a client that goes away closes the upstream at once (vLLM
    then aborts the request)."""

    async def pump() -> None:
        start: HTTPResponseStartEvent = {
            "type": "http.response.start",
            "status": status,
            "headers": headers,
        }
        await send(start)
        async for chunk in body:
            more: HTTPResponseBodyEvent = {
                "type": "http.response.body",
                "body": chunk,
                "more_body": True,
            }
            await send(more)
        end: HTTPResponseBodyEvent = {"type": "http.response.body", "body": b"", "more_body": False}
        await send(end)

    async def gone() -> None:
        # The body was read whole: what comes next is the client leaving.
        while (await receive())["type"] != "http.disconnect":
            pass

    pumping = asyncio.ensure_future(pump())
    watching = asyncio.ensure_future(gone())
    try:
        await asyncio.wait((pumping, watching), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (pumping, watching):
            task.cancel()
        await asyncio.gather(pumping, watching, return_exceptions=True)
        await body.aclose()
        await chunks.aclose()  # also when the relay never started
    if pumping.done() and not pumping.cancelled() and pumping.exception() is not None:
        # Not a client that left: a failure the relay did not turn into an
        # error event. Raised, so that it is logged and the connection ends.
        raise pumping.exception()  # type: ignore[misc]


# -- A streamed response (of a handler) that always closes its source ---------------
#
# When a client goes away, Litestar cancels the task that iterates the stream.
# If that happens while a chunk is being sent, the source async generator is
# left suspended at its ``yield`` and is only closed whenever it is garbage
# collected, so an upstream connection behind it stays open and vLLM goes on
# generating for nobody. This response closes the source as soon as sending
# ends, however it ends. A Litestar workaround: it can go once Litestar's
# ASGIStreamingResponse closes its iterator itself when sending ends.


class _ClosingASGIStreamingResponse(ASGIStreamingResponse):
    __slots__ = ()

    async def send_body(self, send: Send, receive: Receive) -> None:
        try:
            await super().send_body(send, receive)
        finally:
            source = self.iterator
            if isinstance(source, AsyncGenerator):
                with anyio.CancelScope(shield=True):
                    await source.aclose()


class ClosingStream(Stream):
    """``Stream`` over an async generator that is closed when sending ends."""

    def __init__(self, source: AsyncGenerator[bytes, None], **kwargs: Any) -> None:
        super().__init__(source, **kwargs)

    def to_asgi_response(self, *args: Any, **kwargs: Any) -> ASGIResponse:
        response = super().to_asgi_response(*args, **kwargs)
        if type(response) is ASGIStreamingResponse:
            # Same slots, one more behaviour: swapping the class is enough.
            response.__class__ = _ClosingASGIStreamingResponse
        return response


# The largest body a request may hold while it waits for a model to start.
WAIT_BODY_MAX = 256 * 1024


def prefer_wait(scope: Scope) -> float:
    """Seconds the client will wait for a model to start: RFC 7240's
    ``Prefer: wait=N`` (0 when absent or unreadable)."""
    for name, value in scope["headers"]:
        if name == b"prefer":
            for part in value.split(b","):
                token, _, number = part.strip().partition(b"=")
                if token.strip().lower() == b"wait":
                    try:
                        return max(0.0, min(float(number.strip(b' "')), 3600.0))
                    except ValueError:
                        return 0.0
    return 0.0

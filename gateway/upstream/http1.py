"""One kept-alive HTTP/1.1 connection to a service, on asyncio's protocol API
with httptools' (C) parser, and the answer read from it.

The data path's client: aiohttp's was half of a proxied request's CPU (py-spy
under wrk, bench/proxy.py), mostly its request and response objects. Here a
request is one write of bytes and an answer is its status, two headers and
the body's pieces as they arrive; nothing else is built. Reading stops while
more than ``HIGH_WATER`` bytes wait for a slow reader (a client that reads a
stream slowly holds that much of it here, no more).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import cast

import httptools

HIGH_WATER = 256 * 1024


class Disconnected(ConnectionError):
    """The service closed the connection, or sent what is not HTTP, before
    the answer ended."""


class Connection(asyncio.Protocol):
    """A connection, a request at a time; ``on_free`` is told once it is
    reusable (``reuse``) or closed."""

    def __init__(self, key: str, on_free: Callable[[Connection, bool], None]) -> None:
        self.key = key
        self.idle_since = 0.0
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._on_free = on_free
        self._parser = httptools.HttpResponseParser(self)
        self.loop = asyncio.get_running_loop()
        self._waiter: asyncio.Future[None] | None = None
        self._drained: asyncio.Future[None] | None = None
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.content_type = ""
        self.content_length: int | None = None
        self._chunked = False
        self._headers_done = False
        self._keep_alive = False
        self._complete = False
        self._error: BaseException | None = None
        self._pieces: deque[bytes] = deque()
        self._buffered = 0
        self._paused = False

    # -- asyncio's callbacks ----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport's subclasses.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(Disconnected(f"the answer is not HTTP/1.1: {exc}"))
            self.close()

    def eof_received(self) -> bool:
        return False  # the transport closes; connection_lost says the rest

    def connection_lost(self, exc: Exception | None) -> None:
        if self._headers_done and not self._complete and self._to_eof():
            self._complete = True  # a body that ends with the connection
        elif not self._complete:
            self._fail(Disconnected("the service closed the connection"))
        self._wake()
        self._wake_writer()
        self.close()

    def pause_writing(self) -> None:
        self._drained = self.loop.create_future()

    def resume_writing(self) -> None:
        self._wake_writer()

    # -- httptools' callbacks -----------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"content-type":
            self.content_type = value.partition(b";")[0].strip().lower().decode("latin-1")
        elif name == b"content-length":
            self.content_length = int(value) if value.isdigit() else None
        elif name == b"transfer-encoding":
            self._chunked = b"chunked" in value.lower()

    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()
        if 100 <= self.status < 200:
            self.content_type, self.content_length = "", None  # an interim answer
            return
        self._headers_done = True
        # Read here: llhttp's answer is not kept past the message's end.
        self._keep_alive = self._parser.should_keep_alive()
        self._wake()

    def on_body(self, body: bytes) -> None:
        self._pieces.append(body)
        self._buffered += len(body)
        if self._buffered > HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._headers_done:
            self._complete = True
            self._wake()

    # -- the caller's side ----------------------------------------------------------

    async def send(self, head: bytes, body: bytes | bytearray | None) -> None:
        """The request written: ``head`` (request line and headers), then ``body``."""
        transport = self.transport
        assert transport is not None
        if not body:
            transport.write(head)
        elif len(body) <= 64 * 1024:
            transport.write(head + body)  # one write, one packet
        else:
            # In pieces, each once the last is sent: the transport would copy
            # what the socket does not take at once, all of a large body.
            transport.write(head)
            view = memoryview(body)
            for start in range(0, len(view), 64 * 1024):
                if self._drained is not None:
                    await self._drained
                if self.closed:
                    raise Disconnected("the service closed the connection")
                transport.write(view[start : start + 64 * 1024])

    async def headers(self, idle: float, deadline: float) -> None:
        """Until the answer's status and headers have come: TimeoutError at
        ``deadline`` (loop time), or when nothing comes for ``idle`` seconds."""
        while not self._headers_done:
            await self._wait(min(self.loop.time() + idle, deadline))

    async def read(self, idle: float, deadline: float) -> bytes:
        """The body's next pieces (all that has come, joined), b"" at its end;
        TimeoutError when nothing comes for ``idle`` seconds, or at ``deadline``."""
        while not self._pieces:
            if self._complete:
                return b""
            await self._wait(min(self.loop.time() + idle, deadline))
        if len(self._pieces) == 1:
            data = self._pieces.popleft()
        else:
            data = b"".join(self._pieces)
            self._pieces.clear()
        self._buffered = 0
        if self._paused and self.transport is not None and not self.closed:
            self._paused = False
            self.transport.resume_reading()
        return data

    def release(self) -> None:
        """Done with the answer: the connection is reused if the answer ended
        and the service keeps it alive, else closed."""
        if self.closed:
            return
        if self._complete and not self._pieces and self._keep_alive:
            self._reset()
            self.idle_since = self.loop.time()
            self._on_free(self, True)
        else:
            self.close()

    def close(self) -> None:
        """Closed at once: a service sees an unfinished request end (vLLM aborts it)."""
        if self.closed:
            return
        self.closed = True
        if self.transport is not None:
            self.transport.close()
        self._on_free(self, False)

    # -- waiting ---------------------------------------------------------------------

    async def _wait(self, until: float) -> None:
        if self._error is not None:
            raise self._error
        if self.closed:
            raise Disconnected("the connection was closed")
        waiter = self._waiter = self.loop.create_future()
        timer = self.loop.call_at(until, self._time_out, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None

    @staticmethod
    def _time_out(waiter: asyncio.Future[None]) -> None:
        if not waiter.done():
            waiter.set_exception(TimeoutError())

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            if self._error is not None:
                waiter.set_exception(self._error)
            else:
                waiter.set_result(None)

    def _wake_writer(self) -> None:
        drained, self._drained = self._drained, None
        if drained is not None and not drained.done():
            drained.set_result(None)

    def _fail(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        self._wake()

    def _to_eof(self) -> bool:
        return self.content_length is None and not self._chunked

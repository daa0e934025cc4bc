"""uvicorn's HTTP/1.1 protocol, with an answer's head written with its body.

uvicorn writes the status line and headers at ``http.response.start`` and the
body apart; under uvloop each write is a system call of its own, a twentieth
of a proxied request's CPU under py-spy (bench/RESULTS.md). Here the head is
held until the body's first piece, or until the end of the loop's turn when
that piece is not ready yet (a stream waiting for its first token), so an
answer in one piece costs one write.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class _HeadWithBody:
    """The transport one request's answer is written to: its first write
    (the head) waits for the next one, or for the loop's turn to end."""

    __slots__ = ("_first", "_held", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._first = True
        self._held: bytes | None = None

    def write(self, data: bytes) -> None:
        if self._first:
            self._first = False
            self._held = data
            self._loop.call_soon(self.flush)
            return
        held = self._held
        if held is None:
            self._transport.write(data)
        else:
            self._held = None
            self._transport.writelines((held, data))  # one writev

    def flush(self) -> None:
        held, self._held = self._held, None
        if held is not None and not self._transport.is_closing():
            self._transport.write(held)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class HeadWithBody(HttpToolsProtocol):
    """uvicorn's httptools protocol whose requests' answers are written
    through ``_HeadWithBody`` (``uvicorn.Config(http=HeadWithBody)``)."""

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        # The request's cycle is made there; its task has not run yet.
        cycle = self.cycle
        if cycle is not None and not isinstance(cycle.transport, _HeadWithBody):
            cycle.transport = _HeadWithBody(self.transport, self.loop)  # type: ignore[assignment]

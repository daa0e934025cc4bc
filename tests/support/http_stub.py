"""A real HTTP/1.1 server on localhost whose answers a test writes byte by byte,
for the failures a real upstream cannot be made to produce on demand."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Seen:
    method: str
    path: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


Answer = Callable[[Seen, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class Stub:
    url: str
    port: int = 0
    seen: list[Seen] = field(default_factory=list)
    connections: int = 0  # accepted so far

    def paths(self) -> list[str]:
        return [s.path for s in self.seen]


def response(status: int, body: Any = b"", content_type: str = "application/json") -> bytes:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return (
        f"HTTP/1.1 {status} X\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    ).encode() + data


@asynccontextmanager
async def http_stub(answer: Answer, host: str = "127.0.0.1") -> AsyncIterator[Stub]:
    stub = Stub("")

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stub.connections += 1
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode().split("\r\n")
                method, path = lines[0].split(" ")[:2]
                length = next(
                    (int(x.split(":")[1]) for x in lines if x.lower().startswith("content-length")),
                    0,
                )
                headers = dict(
                    (k.strip().lower(), v.strip())
                    for k, v in (x.split(":", 1) for x in lines[1:] if ":" in x)
                )
                seen = Seen(method, path, await reader.readexactly(length), headers)
                stub.seen.append(seen)
                await answer(seen, writer)
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, host, 0)
    stub.port = server.sockets[0].getsockname()[1]
    stub.url = f"http://{host}:{stub.port}"
    try:
        yield stub
    finally:
        server.close()


def chunked(pieces: list[bytes], go_on: list[asyncio.Event], content_type: str) -> Answer:
    """An answer sent chunked, each piece once its event is set."""

    async def answer(seen: Seen, writer: asyncio.StreamWriter) -> None:
        writer.write(
            f"HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\n".encode()
            + b"Transfer-Encoding: chunked\r\n\r\n"
        )
        for piece, may in zip(pieces, go_on, strict=True):
            await may.wait()
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await writer.drain()
        writer.write(b"0\r\n\r\n")

    return answer


class Overlap:
    """Answers that take ``delay`` seconds, counting how many were in flight at most."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.most = 0

    def answer(self, delay: float, status: int = 200) -> Answer:
        async def answer(seen: Seen, writer: asyncio.StreamWriter) -> None:
            self.in_flight += 1
            self.most = max(self.most, self.in_flight)
            await asyncio.sleep(delay)
            self.in_flight -= 1
            writer.write(response(status))

        return answer

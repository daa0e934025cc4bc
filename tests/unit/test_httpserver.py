"""The HTTP server's protocol (gateway/httpserver.py): an answer in one piece
is one write, head and body; a stream's head goes out before its first piece
is ready."""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.config import Config
from uvicorn.server import ServerState

from gateway.httpserver import HeadWithBody
from tests.support.polling import poll

REQUEST = b"POST /v1/completions HTTP/1.1\r\nHost: gw\r\nContent-Length: 2\r\n\r\n{}"


class Recorded(asyncio.Transport):
    """A transport that keeps what each write call was given."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: Any) -> None:
        self.writes.append(bytes(data))

    def writelines(self, list_of_data: Any) -> None:
        self.writes.append(b"".join(list_of_data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 8001)}.get(
            name, default
        )

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def served(app: Any, request: bytes = REQUEST) -> Recorded:
    config = Config(app=app, http=HeadWithBody, lifespan="off", log_config=None)
    protocol = HeadWithBody(config, ServerState(), {})
    transport = Recorded()
    protocol.connection_made(transport)
    protocol.data_received(request)
    return transport


async def writes(transport: Recorded, count: int) -> list[bytes]:
    async def seen() -> list[bytes]:
        return transport.writes

    return await poll(seen, lambda w: len(w) >= count, timeout=5, interval=0.01, what="writes")


async def test_an_answer_in_one_piece_is_one_write() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]}
        )
        await send({"type": "http.response.body", "body": b"ok"})

    transport = await served(app)
    await writes(transport, 1)
    await asyncio.sleep(0.05)  # a second write would have come by now
    assert len(transport.writes) == 1
    assert transport.writes[0].startswith(b"HTTP/1.1 200 OK\r\n")
    assert transport.writes[0].endswith(b"\r\n\r\nok")


async def test_a_streams_head_is_not_held_for_its_first_piece() -> None:
    first = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await first.wait()  # a model still reading the prompt
        await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    transport = await served(app)
    await writes(transport, 1)
    assert transport.writes[0].startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"transfer-encoding: chunked" in transport.writes[0]
    first.set()
    await writes(transport, 3)
    assert transport.writes[1:] == [b"9\r\ndata: 1\n\n\r\n", b"0\r\n\r\n"]

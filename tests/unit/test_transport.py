"""The aiohttp-backed transport against real sockets that misbehave: each
failure reaches SlurmClient as the error it is, with the message a user reads."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import httpx
import pytest

from gateway.slurm import SlurmClient, SlurmUnavailable
from gateway.slurm.tokens import MintedTokens
from gateway.transport import Outbound

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], object]


@asynccontextmanager
async def server(handle: Handler) -> AsyncIterator[str]:
    async def wrapped(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await handle(reader, writer)  # type: ignore[misc]
        finally:
            writer.close()

    srv = await asyncio.start_server(wrapped, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.close()


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            await reader.readexactly(int(line.split(b":")[1]))
    return head


def client(url: str) -> SlurmClient:
    return SlurmClient(url, MintedTokens(b"k" * 32, "gwuser"), api_version="v0.0.42", timeout=0.5)


async def test_silent_server_is_a_timeout() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await reader.read()  # until the client gives up and hangs up

    async with server(silent) as url, client(url) as slurm:
        with pytest.raises(
            SlurmUnavailable, match=r"did not answer GET /slurm/v0\.0\.42/ping in time"
        ):
            await slurm.get_job(7)


@pytest.mark.parametrize(
    "answer",
    [b"", b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"jobs"', b"garbage\r\n\r\n"],
    ids=["closed-without-answer", "closed-mid-body", "not-http"],
)
async def test_broken_answers_are_unreachable_not_timeouts(answer: bytes) -> None:
    async def broken(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer)
        await writer.drain()

    async with server(broken) as url, client(url) as slurm:
        with pytest.raises(
            SlurmUnavailable, match=r"is unreachable: (ReadError|RemoteProtocolError)"
        ):
            await slurm.get_job(7)


async def test_keeps_one_connection_and_sends_what_httpx_would() -> None:
    heads: list[bytes] = []
    connections = 0

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        while True:
            try:
                heads.append(await read_request(reader))
            except asyncio.IncompleteReadError:
                return
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    async with server(answer) as url:
        out = Outbound(url, timeout=1, connect_timeout=1, max_connections=4)
        try:
            for n in range(3):
                got = await out.request(
                    "POST", f"/p/{n}", params={"a": "b c"}, content=b"{}", headers={"X-T": "1"}
                )
                assert (got.status_code, got.content) == (200, b"ok")
        finally:
            await out.aclose()
    assert connections == 1
    # The first POST learns, with one GET, that the server ends answers cleanly.
    assert [h.split(b" ", 2)[:2] for h in heads] == [
        [b"GET", b"/"], [b"POST", b"/p/0?a=b+c"], [b"POST", b"/p/1?a=b+c"], [b"POST", b"/p/2?a=b+c"]
    ]  # fmt: skip
    lowered = heads[-1].lower()
    assert b"x-t: 1\r\n" in lowered
    assert b"content-length: 2\r\n" in lowered
    assert b"accept-encoding" not in lowered


async def test_an_httpx_transport_can_stand_in() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=request.url.path.encode())

    out = Outbound(
        "http://stub", timeout=1, connect_timeout=1, max_connections=1,
        transport=httpx.MockTransport(answer),
    )  # fmt: skip
    assert (await out.request("GET", "/x")).content == b"/x"


async def test_answer_followed_by_bytes_after_close_is_read_as_slurmrestd_2605_sends_it() -> None:
    body = b'{"errors": [{"error": "Invalid job id specified"}]}'
    seen = 0

    async def doubled(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal seen
        await read_request(reader)
        seen += 1
        writer.write(
            b"HTTP/1.1 404 NOT FOUND\r\nConnection: Close\r\nContent-Length: %d\r\n"
            b"Content-Type: application/json\r\n\r\n%s"
            b"HTTP/1.1 404 NOT FOUND\r\nConnection: Close\r\nContent-Length: 24\r\n"
            b"Content-Type: text/plain\r\n\r\nInvalid job id specified" % (len(body), body)
        )
        await writer.drain()

    async with server(doubled) as url:
        out = Outbound(url, timeout=1, connect_timeout=1, max_connections=4)
        try:
            got = await out.request("GET", "/slurm/v0.0.45/job/99")
        finally:
            await out.aclose()
    assert (got.status_code, got.content) == (404, body)
    assert seen == 2  # once refused by aiohttp, once read by h11


async def test_a_post_to_such_a_server_is_sent_once_through_h11() -> None:
    posts = 0

    async def doubled(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal posts
        head = await read_request(reader)
        posts += head.startswith(b"POST ")
        writer.write(
            b"HTTP/1.1 500 ERROR\r\nConnection: Close\r\nContent-Length: 2\r\n\r\n{}"
            b"HTTP/1.1 500 ERROR\r\nConnection: Close\r\nContent-Length: 1\r\n\r\nx"
        )
        await writer.drain()

    async with server(doubled) as url:
        out = Outbound(url, timeout=1, connect_timeout=1, max_connections=4)
        try:
            for _ in range(2):
                got = await out.request("POST", "/slurm/v0.0.45/job/submit", content=b"{}")
                assert (got.status_code, got.content) == (500, b"{}")
        finally:
            await out.aclose()
    assert posts == 2  # once each: never repeated

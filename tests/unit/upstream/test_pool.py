"""The data path's own HTTP/1.1 client (gateway/upstream/pool.py, http1.py)
against a real socket: connections kept alive and bounded, answers in every
framing, and the failures a service can cause."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from gateway.upstream import pool as pool_module
from gateway.upstream.http1 import HIGH_WATER
from gateway.upstream.pool import Pool, Response, TransportFailure
from tests.support.http_stub import Overlap, Seen, http_stub, response


def new_pool(**kwargs: float) -> Pool:
    settings: dict[str, float] = {"timeout": 5, "connect_timeout": 1, "max_connections": 8}
    return Pool(**(settings | kwargs))  # type: ignore[arg-type]


async def body_of(answer: Response) -> bytes:
    data = b""
    while piece := await answer.read():
        data += piece
    answer.release()
    return data


async def ok(seen: Seen, writer: asyncio.StreamWriter) -> None:
    writer.write(response(200, {"path": seen.path, "size": len(seen.body)}))


async def test_a_service_gets_one_connection_kept_alive_for_its_requests() -> None:
    async with http_stub(ok) as stub:
        pool = new_pool()
        for n in range(20):
            answer = await pool.open("POST", f"{stub.url}/v1/x?n={n}", content=b"{}")
            assert answer.status == 200
            assert answer.content_type == "application/json"
            assert await body_of(answer) == b'{"path": "/v1/x?n=%d", "size": 2}' % n
        await pool.aclose()
    assert stub.connections == 1
    assert stub.seen[0].headers["host"] == f"127.0.0.1:{stub.port}"
    assert stub.seen[0].headers["content-length"] == "2"


async def test_a_connection_idle_past_the_reuse_limit_is_not_sent_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A service closes idle connections (vLLM's uvicorn after 5 s): a request
    # written as it does is lost, so an old one is replaced instead.
    monkeypatch.setattr(pool_module, "IDLE_REUSE", 0.1)
    async with http_stub(ok) as stub:
        pool = new_pool()
        await body_of(await pool.open("GET", stub.url))
        await body_of(await pool.open("GET", stub.url))
        await asyncio.sleep(0.2)
        await body_of(await pool.open("GET", stub.url))
        await pool.aclose()
    assert stub.connections == 2


async def test_requests_past_the_bound_per_service_wait_for_a_connection() -> None:
    overlap = Overlap()
    async with http_stub(overlap.answer(0.05)) as stub:
        pool = new_pool(max_per_host=2)

        async def one() -> int:
            answer = await pool.open("GET", stub.url)
            await body_of(answer)
            return answer.status

        statuses = await asyncio.gather(*(one() for _ in range(10)))
        await pool.aclose()
    assert statuses == [200] * 10
    assert overlap.most == 2
    assert stub.connections == 2


async def test_a_wait_for_a_connection_is_bounded_and_nothing_is_sent() -> None:
    release = asyncio.Event()

    async def stuck(seen: Seen, writer: asyncio.StreamWriter) -> None:
        await release.wait()
        writer.write(response(200))

    async with http_stub(stuck) as stub:
        pool = new_pool(max_per_host=1, connect_timeout=0.1, wait=0.1)
        first = asyncio.create_task(pool.open("GET", stub.url))
        await asyncio.sleep(0.05)
        with pytest.raises(TransportFailure) as failure:
            await pool.open("GET", stub.url)
        release.set()
        await body_of(await first)
        await pool.aclose()
    assert (failure.value.timeout, failure.value.unsent) == (True, True)
    assert len(stub.seen) == 1


async def test_a_large_body_arrives_whole() -> None:
    body = bytes(range(256)) * 8192  # 2 MiB, sent in pieces
    async with http_stub(ok) as stub:
        pool = new_pool()
        await body_of(await pool.open("POST", stub.url, content=body))
        await pool.aclose()
    assert stub.seen[0].body == body


async def test_chunked_and_connection_ended_answers_are_read_whole() -> None:
    async def chunked(seen: Seen, writer: asyncio.StreamWriter) -> None:
        if seen.path == "/chunked":
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            writer.write(b"3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n")
        else:  # no length: the body ends with the connection
            writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end")
            await writer.drain()
            writer.close()

    async with http_stub(chunked) as stub:
        pool = new_pool()
        assert await body_of(await pool.open("GET", f"{stub.url}/chunked")) == b"abcdefg"
        ended = await pool.open("GET", f"{stub.url}/eof")
        assert ended.content_length is None
        assert await body_of(ended) == b"until the end"
        assert await body_of(await pool.open("GET", f"{stub.url}/chunked")) == b"abcdefg"
        await pool.aclose()
    assert stub.connections == 2


async def test_what_is_not_http_or_ends_early_is_a_failure() -> None:
    async def garbage(seen: Seen, writer: asyncio.StreamWriter) -> None:
        if seen.path == "/garbage":
            writer.write(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort")
            await writer.drain()
            writer.close()

    async with http_stub(garbage) as stub:
        pool = new_pool()
        with pytest.raises(TransportFailure) as failure:
            await pool.open("GET", f"{stub.url}/garbage")
        assert failure.value.unsent is False
        short = await pool.open("GET", f"{stub.url}/short")
        assert await short.read() == b"short"
        with pytest.raises(ConnectionError):
            await short.read()
        await pool.aclose()


async def test_a_refused_connection_is_unsent_and_a_silent_service_times_out() -> None:
    pool = new_pool(timeout=0.2)
    async with http_stub(ok) as stub:
        port = stub.port
    with pytest.raises(TransportFailure) as refused:
        await pool.open("GET", f"http://127.0.0.1:{port}/")
    assert (refused.value.timeout, refused.value.unsent) == (False, True)

    async def silent(seen: Seen, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(5)

    async with http_stub(silent) as stub:
        with pytest.raises(TransportFailure) as slow:
            await pool.open("GET", stub.url)
        await pool.aclose()
    assert (slow.value.timeout, slow.value.unsent) == (True, False)


async def test_a_slow_reader_holds_a_bounded_part_of_a_large_answer() -> None:
    big = b"x" * (32 * 1024 * 1024)

    async def flood(seen: Seen, writer: asyncio.StreamWriter) -> None:
        writer.write(response(200, big, "application/octet-stream"))
        with contextlib.suppress(ConnectionError):
            await writer.drain()

    async with http_stub(flood) as stub:
        pool = new_pool()
        answer = await pool.open("GET", stub.url)
        await asyncio.sleep(0.5)  # nothing read: the client stops reading the socket
        first = await answer.read()
        assert len(first) <= HIGH_WATER + 256 * 1024
        size = len(first)
        while piece := await answer.read():
            size += len(piece)
        answer.release()
        await pool.aclose()
    assert size == len(big)


async def test_a_header_with_a_line_break_is_never_sent() -> None:
    async with http_stub(ok) as stub:
        pool = new_pool()
        with pytest.raises(TransportFailure) as failure:
            await pool.open("GET", stub.url, headers={"Authorization": "Bearer k\r\nX-Evil: 1"})
        await pool.aclose()
    assert failure.value.unsent
    assert stub.seen == []

"""Reading an answer's body as it arrives (gateway/upstream/answers.py): a
stream read to its end leaves its connection for the next request; one left
unfinished closes it, which is how vLLM learns to abort."""

from __future__ import annotations

import asyncio

from gateway.upstream.answers import iter_chunks
from gateway.upstream.pool import Pool
from tests.support.http_stub import chunked, http_stub

PIECES = [b"data: 1\n\n", b"data: 2\n\n", b"data: [DONE]\n\n"]


def released() -> list[asyncio.Event]:
    events = [asyncio.Event() for _ in PIECES]
    for event in events:
        event.set()
    return events


async def test_streams_read_to_their_end_share_one_kept_alive_connection() -> None:
    answer = chunked(PIECES, released(), "text/event-stream")
    async with http_stub(answer) as stub:
        pool = Pool(timeout=5, connect_timeout=1, max_connections=8)
        for _ in range(3):
            response = await pool.open("POST", f"{stub.url}/v1/completions", content=b"{}")
            assert b"".join([chunk async for chunk in iter_chunks(response)]) == b"".join(PIECES)
        await pool.aclose()
    # Before, each stream's connection was closed at its end: one per stream.
    assert stub.connections == 1


async def test_a_stream_left_unfinished_closes_its_connection() -> None:
    go_on = [asyncio.Event() for _ in PIECES]
    go_on[0].set()
    async with http_stub(chunked(PIECES, go_on, "text/event-stream")) as stub:
        pool = Pool(timeout=5, connect_timeout=1, max_connections=8)
        response = await pool.open("POST", f"{stub.url}/v1/completions", content=b"{}")
        chunks = iter_chunks(response)
        assert await anext(chunks) == PIECES[0]
        await chunks.aclose()  # the client went away: the service must see it
        for event in go_on:
            event.set()
        response = await pool.open("POST", f"{stub.url}/v1/completions", content=b"{}")
        assert b"".join([chunk async for chunk in iter_chunks(response)]) == b"".join(PIECES)
        await pool.aclose()
    assert stub.connections == 2

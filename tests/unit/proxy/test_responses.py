"""Stored responses' routes (gateway/proxy/responses.py) against real sockets:
the request reaches the service its id names, with its query; a gone or
unreachable holder is a clear 404 or 502, never a crash."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from gateway.core.errors import UpstreamFailed
from gateway.proxy.response_ids import ResponseNotFound, new_id
from gateway.proxy.responses import relay_stored
from tests.support.front_door import closed_port
from tests.support.http_stub import Seen, http_stub, response
from tests.unit.proxy.test_frontdoor import CALLER, Client, answering, door
from tests.unit.proxy.test_sse import tokens


def scope(response_id: str, method: str = "GET", query: bytes = b"") -> Any:
    return {
        "type": "http",
        "method": method,
        "path": f"/root/v1/responses/{response_id}",
        "path_params": {"response_id": response_id},
        "query_string": query,
        "headers": [],
        "user": CALLER,
    }


async def test_the_holder_gets_the_request_by_the_ids_path_and_its_query() -> None:
    stored = {"id": "x", "object": "response", "model": "m"}
    async with (
        http_stub(answering(200, stored)) as other,
        http_stub(answering(200, stored)) as up,
        door(other.url, up.url) as front,
    ):
        response_id = new_id("2")
        got, cancelled = Client(), Client()
        await relay_stored(front, scope(response_id, query=b"stream=0"), got.receive, got.send)
        cancel = scope(response_id, "POST")
        await relay_stored(front, cancel, cancelled.receive, cancelled.send)
    assert got.status == cancelled.status == 200
    assert [s.path for s in up.seen] == [
        f"/v1/responses/{response_id}?stream=0",
        f"/v1/responses/{response_id}/cancel",
    ]
    assert [s.method for s in up.seen] == ["GET", "POST"]
    assert not other.seen


async def test_a_stored_responses_tokens_are_not_counted_again_when_it_is_fetched() -> None:
    # Counted when it was made; fetched or replayed as a stream, it is the same answer.
    usage = {"input_tokens": 1000, "output_tokens": 10}
    stored = {"id": "x", "object": "response", "usage": usage}
    replay = (
        b'event: response.completed\ndata: {"type":"response.completed","response":'
        + json.dumps(stored).encode()
        + b"}\n\n"
    )

    async def answer(seen: Seen, writer: asyncio.StreamWriter) -> None:
        if "stream=true" in seen.path:
            writer.write(response(200, replay, "text/event-stream"))
        else:
            writer.write(response(200, stored))

    async with http_stub(answer) as up, door(up.url) as front:
        response_id = new_id("1")
        before = tokens()
        for query in (b"", b"stream=true", b"stream=true"):
            client = Client()
            await relay_stored(front, scope(response_id, query=query), client.receive, client.send)
            assert client.status == 200
        assert len(up.seen) == 3
        assert tokens() == before


async def test_a_gone_holder_is_a_404_and_an_unreachable_one_a_502() -> None:
    async with door(closed_port()) as front:
        client = Client()
        with pytest.raises(ResponseNotFound) as gone:
            await relay_stored(front, scope(new_id("7")), client.receive, client.send)
        assert gone.value.status_code == 404 and gone.value.param == "response_id"
        assert "service 7" in gone.value.detail
        with pytest.raises(ResponseNotFound):
            await relay_stored(front, scope("resp_made-elsewhere"), client.receive, client.send)
        with pytest.raises(UpstreamFailed) as unreachable:
            await relay_stored(front, scope(new_id("1")), client.receive, client.send)
    assert unreachable.value.status_code == 502

"""The front door's relay (gateway/proxy/frontdoor.py) in front of real upstream
servers on 127.0.0.1: the body goes as it came, the answer comes back."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, cast

import msgspec
import pytest
from litestar.types import Message, ReceiveMessage

from gateway.core.errors import UpstreamFailed
from gateway.core.principal import anonymous
from gateway.metrics import PROMPT_TOKENS, series
from gateway.proxy.frontdoor import FrontDoor, RequestBody, UpstreamAnswer
from gateway.upstream.vllm import VllmClient
from tests.support.front_door import closed_port
from tests.support.http_stub import Seen, http_stub, response
from tests.support.polling import poll
from tests.support.services import router, service

CALLER = anonymous("gwuser")


async def _value(value: int) -> int:
    return value


class Client:
    """An ASGI client's side: what the relay sent back."""

    def __init__(self) -> None:
        self.messages: list[Message] = []

    async def receive(self) -> ReceiveMessage:
        await asyncio.Event().wait()  # the body was read already; never leaves
        raise AssertionError

    async def send(self, message: Message) -> None:
        self.messages.append(message)

    @property
    def status(self) -> int:
        return int(cast(dict[str, Any], self.messages[0])["status"])

    @property
    def headers(self) -> dict[bytes, bytes]:
        return dict(cast(dict[str, Any], self.messages[0])["headers"])

    @property
    def body(self) -> bytes:
        return b"".join(cast(dict[str, Any], m).get("body", b"") for m in self.messages[1:])


async def relay(door: FrontDoor, body: bytes, path: str = "/v1/chat/completions") -> Client:
    client = Client()
    lease = door.vllm.limits.lease()
    try:
        await door.forward(CALLER, "m", path, RequestBody(body), lease, client.receive, client.send)
    finally:
        lease.close()
    return client


@contextlib.asynccontextmanager
async def door(*urls: str) -> Any:
    vllm = VllmClient(timeout=5, connect_timeout=1)
    try:
        services = [service(str(i + 1), url=url) for i, url in enumerate(urls)]
        yield FrontDoor(router=router(*services), vllm=vllm)
    finally:
        await vllm.aclose()


def answering(status: int, body: Any, content_type: str = "application/json") -> Any:
    async def answer(seen: Seen, writer: asyncio.StreamWriter) -> None:
        writer.write(response(status, body, content_type))

    return answer


COMPLETION = {"object": "chat.completion", "usage": {"prompt_tokens": 3, "completion_tokens": 5}}


async def test_the_body_goes_byte_for_byte_and_the_answer_comes_back() -> None:
    body = '{"top_k": 5, "model":"m",  "messages":[{"content":"héllo ☃"}], "z": null}'.encode()
    async with http_stub(answering(200, COMPLETION)) as up, door(up.url) as d:
        before = series(PROMPT_TOKENS, "completion")._value.get()
        client = await relay(d, body)
    assert up.seen[0].body == body
    assert up.seen[0].path == "/v1/chat/completions"
    assert up.seen[0].headers["authorization"] == "Bearer key"  # the service's, not the caller's
    assert client.status == 200
    assert msgspec.json.decode(client.body) == COMPLETION
    assert client.headers[b"x-gateway-service-id"] == b"1"
    assert series(PROMPT_TOKENS, "completion")._value.get() == before + 5


async def test_a_refused_connection_is_retried_once_on_another_service() -> None:
    async with http_stub(answering(200, COMPLETION)) as up, door(closed_port(), up.url) as d:
        answers = [await relay(d, b'{"model": "m"}') for _ in range(4)]
    assert [c.status for c in answers] == [200] * 4
    assert {c.headers[b"x-gateway-service-id"] for c in answers} == {b"2"}
    assert len(up.seen) == 4


async def test_two_refusals_are_a_502() -> None:
    async with door(closed_port(), closed_port()) as d:
        with pytest.raises(UpstreamFailed) as raised:
            await relay(d, b'{"model": "m"}')
    assert raised.value.status_code == 502
    assert "unreachable" in raised.value.detail


@pytest.mark.parametrize(
    ("status", "body", "expected", "message"),
    [
        (400, {"error": {"message": "max_tokens is too large", "type": "BadRequestError"}}, 400,
         "max_tokens is too large"),
        (422, {"object": "error", "message": "bad field", "type": "invalid"}, 422, "bad field"),
        (401, {"error": "Unauthorized"}, 502, "Unauthorized"),
        (500, b"Internal Server Error", 500, "Internal Server Error"),
    ],
)  # fmt: skip
async def test_vllms_errors_pass_with_its_status_and_message(
    status: int, body: Any, expected: int, message: str
) -> None:
    async with http_stub(answering(status, body)) as up, door(up.url) as d:
        with pytest.raises(UpstreamAnswer) as raised:
            await relay(d, b'{"model": "m"}')
    assert raised.value.status_code == expected
    assert raised.value.detail == message


async def test_a_stream_is_relayed_chunk_by_chunk() -> None:
    chunks = [b'data: {"n": 1}\n\n', b'data: {"n": 2}\n\n', b"data: [DONE]\n\n"]
    go_on = asyncio.Event()

    async def stream(seen: Seen, writer: asyncio.StreamWriter) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        for i, chunk in enumerate(chunks):
            writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            await writer.drain()
            if i == 0:
                await go_on.wait()  # the first chunk must reach the client alone
        writer.write(b"0\r\n\r\n")

    async with http_stub(stream) as up, door(up.url) as d:
        client = Client()
        task = asyncio.create_task(
            d.forward(
                CALLER,
                "m",
                "/v1/chat/completions",
                RequestBody(b'{"model":"m"}'),
                d.vllm.limits.lease(),
                client.receive,
                client.send,
            )
        )
        await poll(lambda: _value(len(client.messages)), lambda n: n >= 2, interval=0.01)
        assert cast(dict[str, Any], client.messages[1])["body"] == chunks[0]
        go_on.set()
        await asyncio.wait_for(task, 5)
    assert client.headers[b"content-type"].startswith(b"text/event-stream")
    assert client.body == b"".join(chunks)


async def test_the_upstream_is_asked_at_the_path_of_the_route() -> None:
    async with http_stub(answering(200, {"object": "list", "data": []})) as up, door(up.url) as d:
        await relay(d, b'{"model":"m","input":"x"}', "/v1/embeddings")
    assert up.paths() == ["/v1/embeddings"]

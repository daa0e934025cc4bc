"""The vLLM proxy against failures a real vLLM cannot be made to produce on
demand, served by a real socket that misbehaves (tests/support/http_stub.py)."""

from __future__ import annotations

import asyncio
import contextlib
import time

import msgspec
import pytest

from gateway.api.usage import SseUsage
from gateway.api.vllm import _stream
from gateway.core.errors import UpstreamFailed
from gateway.core.services import Upstream
from gateway.requestid import REQUEST_ID
from gateway.upstream.answers import UpstreamError
from gateway.upstream.probe import HealthProber
from gateway.upstream.vllm import Prompt, VllmClient
from tests.support.http_stub import Seen, http_stub, response

PROMPT = Prompt(prompt="hi", model="m", max_tokens=8)


async def body_of(stream: object) -> bytes:
    chunks = [c async for c in stream.iterator]  # type: ignore[attr-defined]
    return b"".join(c if isinstance(c, bytes) else c.encode() for c in chunks)


async def test_upstream_dying_mid_stream_ends_with_an_error_event() -> None:
    async def one_chunk_then_gone(seen: Seen, writer: asyncio.StreamWriter) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        event = b'data: {"choices": [{"delta": {"content": "Hel"}}]}\n\n'
        writer.write(b"%x\r\n%s\r\n" % (len(event), event))
        await writer.drain()
        writer.transport.abort()  # no closing chunk: the body is incomplete

    async with http_stub(one_chunk_then_gone) as stub:
        vllm = VllmClient()
        response_ = await _stream(vllm, "7", Upstream(stub.url, "k"), PROMPT)
        body = await body_of(response_)
        await vllm.aclose()
    assert body.startswith(b'data: {"choices"')
    assert b"event: error\ndata: " in body
    assert b"broke off" in body


async def test_refusal_before_the_stream_is_a_502() -> None:
    async def refuse(seen: Seen, writer: asyncio.StreamWriter) -> None:
        error = {"error": {"message": "max_tokens is too large", "type": "BadRequestError"}}
        writer.write(response(400, error))

    async with http_stub(refuse) as stub:
        vllm = VllmClient()
        with pytest.raises(UpstreamFailed, match="max_tokens is too large"):
            await _stream(vllm, "7", Upstream(stub.url, "k"), PROMPT)
        await vllm.aclose()


async def test_model_without_chat_template_falls_back_once() -> None:
    no_template = {
        "error": {
            "message": "Cannot use chat template functions because "
            "tokenizer.chat_template is not set",
            "type": "BadRequestError",
        }
    }
    completion = {
        "model": "m",
        "choices": [{"text": " there", "finish_reason": "length"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 8, "total_tokens": 9},
    }

    async def answer(seen: Seen, writer: asyncio.StreamWriter) -> None:
        chat = seen.path == "/v1/chat/completions"
        writer.write(response(400, no_template) if chat else response(200, completion))

    async with http_stub(answer) as stub:
        vllm = VllmClient()
        first = await vllm.complete(stub.url, PROMPT)
        second = await vllm.complete(stub.url, PROMPT)
        await vllm.aclose()
    assert (first.api, first.text, first.usage.total_tokens) == ("completions", " there", 9)
    assert second.api == "completions"
    # The chat API was tried once, then remembered as unusable for this model.
    assert stub.paths() == ["/v1/chat/completions", "/v1/completions", "/v1/completions"]


async def test_vllm_timeout_is_a_504() -> None:
    async def silent(seen: Seen, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(5)

    async with http_stub(silent) as stub:
        vllm = VllmClient(timeout=0.3)
        with pytest.raises(Exception, match="did not answer in time") as info:
            await _stream(vllm, "7", Upstream(stub.url, "k"), PROMPT)
        await vllm.aclose()
    assert getattr(info.value, "status_code", None) == 504


async def test_a_huge_or_garbled_model_list_is_refused_not_held() -> None:
    answers = iter(
        [
            response(200, b"[" * (2 * 1024 * 1024)),
            response(200, b'{"data": [{"id": "\xff"}]}'),
            response(200, b""),  # /health
            response(500, b"\xff\xfe"),
        ]
    )

    async def answer(seen: Seen, writer: asyncio.StreamWriter) -> None:
        writer.write(next(answers))

    async with http_stub(answer) as stub:
        vllm = VllmClient()
        with pytest.raises(UpstreamError, match="more than"):
            await vllm.models(stub.url)
        with pytest.raises(UpstreamError, match="not a model list"):
            await vllm.models(stub.url)
        assert await vllm.ready(stub.url, "m") is False
        await vllm.aclose()


async def test_a_trickling_endpoint_cannot_hold_a_probe() -> None:
    # One byte every 0.2 s never trips a per-read timeout.
    async def trickle(seen: Seen, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
        with contextlib.suppress(ConnectionError):
            for _ in range(1000):
                writer.write(b"x")
                await writer.drain()
                await asyncio.sleep(0.2)

    async with http_stub(trickle) as stub:
        prober = HealthProber(timeout=0.5, ttl=5)
        started = time.monotonic()
        ready = await prober.vllm_ready(stub.url, "m", "k")
        took = time.monotonic() - started
        await prober.aclose()
    assert ready is False
    assert took < 3, took


def test_the_upstream_key_cannot_be_serialised() -> None:
    upstream = Upstream("http://node1:8000", "the-key")
    assert "the-key" not in repr(upstream)
    with pytest.raises(TypeError):
        msgspec.json.encode(upstream)


async def test_the_request_id_goes_with_the_prompt() -> None:
    completion = {
        "model": "m",
        "choices": [{"message": {"content": "hi"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }

    async def answer(seen: Seen, writer: asyncio.StreamWriter) -> None:
        writer.write(response(200, completion))

    async with http_stub(answer) as stub:
        vllm = VllmClient()
        token = REQUEST_ID.set("trace-42")
        try:
            await vllm.complete(stub.url, PROMPT)
        finally:
            REQUEST_ID.reset(token)
        await vllm.complete(stub.url, PROMPT)
        await vllm.aclose()
    assert stub.seen[0].headers.get("x-request-id", "").startswith("trace-42-")
    assert "x-request-id" not in stub.seen[1].headers


def _completion_tokens() -> float:
    from prometheus_client import REGISTRY

    value = REGISTRY.get_sample_value("gateway_prompt_tokens_total", {"kind": "completion"})
    return value or 0.0


@pytest.mark.parametrize("cut", [5, 40, 70, 100])
def test_usage_is_counted_when_a_read_ends_inside_its_event(cut: int) -> None:
    last = (
        b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":7,'
        b'"total_tokens":10}}\n\ndata: [DONE]\n\n'
    )
    stream = b'data: {"choices":[{"text":" tok"}]}\n\n' + last
    split = len(stream) - len(last) + cut
    before = _completion_tokens()
    reader = SseUsage()
    for read in (stream[:split], stream[split:]):
        reader.feed(read)
    assert _completion_tokens() == before + 7


def test_a_stream_with_no_event_end_holds_a_bounded_remainder() -> None:
    reader = SseUsage()
    for _ in range(100):
        reader.feed(b"x" * 4096)  # a hostile upstream that never ends an event
    assert len(reader._held) <= SseUsage.LIMIT
    assert reader.copied <= SseUsage.LIMIT

"""The vLLM client (gateway/upstream/vllm.py) against failures a real vLLM
cannot be made to produce on demand, served by a real socket that misbehaves
(tests/support/http_stub.py)."""

from __future__ import annotations

import asyncio
import contextlib
import time

import msgspec
import pytest

from gateway.core.services import Upstream
from gateway.requestid import REQUEST_ID
from gateway.upstream.answers import UpstreamError
from gateway.upstream.probe import HealthProber
from gateway.upstream.vllm import Prompt, VllmClient
from tests.support.http_stub import Seen, http_stub, response

PROMPT = Prompt(prompt="hi", model="m", max_tokens=8)


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

"""The vLLM proxy against failures a real vLLM cannot be made to produce on demand."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import httpx
import msgspec
import pytest
from pytest_httpx import HTTPXMock

from gateway.api.vllm import _stream
from gateway.core.errors import UpstreamFailed
from gateway.core.services import Upstream
from gateway.upstream.probe import HealthProber
from gateway.upstream.vllm import Prompt, UpstreamError, VllmClient

ENDPOINT = "http://node1:8000"
PROMPT = Prompt(prompt="hi", model="m", max_tokens=8)
UPSTREAM = Upstream(ENDPOINT, "service-key")


class BreaksAfterOneChunk(httpx.AsyncByteStream):
    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield b'data: {"choices": [{"delta": {"content": "Hel"}}]}\n\n'
        raise httpx.RemoteProtocolError("peer closed connection without sending complete body")


async def body_of(stream: object) -> bytes:
    chunks = [c async for c in stream.iterator]  # type: ignore[attr-defined]
    return b"".join(c if isinstance(c, bytes) else c.encode() for c in chunks)


async def test_upstream_dying_mid_stream_ends_with_an_error_event(
    httpx_mock: HTTPXMock,
) -> None:
    httpx_mock.add_response(
        url=f"{ENDPOINT}/v1/chat/completions",
        stream=BreaksAfterOneChunk(),
        headers={"content-type": "text/event-stream"},
    )
    vllm = VllmClient(transport=httpx.AsyncHTTPTransport())
    response = await _stream(vllm, "7", UPSTREAM, PROMPT)
    body = await body_of(response)
    assert body.startswith(b'data: {"choices"')
    assert b"event: error\ndata: " in body
    assert b"broke off" in body
    await vllm.aclose()


async def test_refusal_before_the_stream_is_a_502(httpx_mock: HTTPXMock) -> None:
    httpx_mock.add_response(
        url=f"{ENDPOINT}/v1/chat/completions",
        status_code=400,
        json={"error": {"message": "max_tokens is too large", "type": "BadRequestError"}},
    )
    vllm = VllmClient(transport=httpx.AsyncHTTPTransport())
    with pytest.raises(UpstreamFailed, match="max_tokens is too large"):
        await _stream(vllm, "7", UPSTREAM, PROMPT)
    await vllm.aclose()


async def test_model_without_chat_template_falls_back_once(httpx_mock: HTTPXMock) -> None:
    no_template = {
        "error": {
            "message": "Cannot use chat template functions because "
            "tokenizer.chat_template is not set",
            "type": "BadRequestError",
        }
    }
    httpx_mock.add_response(
        url=f"{ENDPOINT}/v1/chat/completions", status_code=400, json=no_template
    )
    completion = {
        "model": "m",
        "choices": [{"text": " there", "finish_reason": "length"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 8, "total_tokens": 9},
    }
    httpx_mock.add_response(url=f"{ENDPOINT}/v1/completions", json=completion, is_reusable=True)
    vllm = VllmClient(transport=httpx.AsyncHTTPTransport())
    first = await vllm.complete(ENDPOINT, PROMPT)
    second = await vllm.complete(ENDPOINT, PROMPT)
    assert (first.api, first.text, first.usage.total_tokens) == ("completions", " there", 9)
    assert second.api == "completions"
    # The chat API was tried once, then remembered as unusable for this model.
    assert len(httpx_mock.get_requests(url=f"{ENDPOINT}/v1/chat/completions")) == 1
    await vllm.aclose()


async def test_vllm_timeout_is_a_504(httpx_mock: HTTPXMock) -> None:
    httpx_mock.add_exception(httpx.ReadTimeout("slow"))
    vllm = VllmClient(transport=httpx.AsyncHTTPTransport())
    with pytest.raises(Exception, match="did not answer in time") as info:
        await _stream(vllm, "7", UPSTREAM, PROMPT)
    assert getattr(info.value, "status_code", None) == 504
    await vllm.aclose()


async def test_a_huge_or_garbled_model_list_is_refused_not_held(httpx_mock: HTTPXMock) -> None:
    vllm = VllmClient(transport=httpx.AsyncHTTPTransport())
    httpx_mock.add_response(url=f"{ENDPOINT}/v1/models", content=b"[" * (2 * 1024 * 1024))
    with pytest.raises(UpstreamError, match="more than"):
        await vllm.models(ENDPOINT)
    httpx_mock.add_response(url=f"{ENDPOINT}/v1/models", content=b'{"data": [{"id": "\xff"}]}')
    with pytest.raises(UpstreamError, match="not a model list"):
        await vllm.models(ENDPOINT)
    httpx_mock.add_response(url=f"{ENDPOINT}/health")
    httpx_mock.add_response(url=f"{ENDPOINT}/v1/models", status_code=500, content=b"\xff\xfe")
    assert await vllm.ready(ENDPOINT, "m") is False
    await vllm.aclose()


async def test_a_trickling_endpoint_cannot_hold_a_probe() -> None:
    # One byte every 0.2 s never trips httpx's per-read timeout.
    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
        with contextlib.suppress(ConnectionError):
            for _ in range(1000):
                writer.write(b"x")
                await writer.drain()
                await asyncio.sleep(0.2)

    server = await asyncio.start_server(trickle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    prober = HealthProber(timeout=0.5, ttl=5, transport=httpx.AsyncHTTPTransport())
    started = time.monotonic()
    ready = await prober.vllm_ready(f"http://127.0.0.1:{port}", "m", "k")
    took = time.monotonic() - started
    await prober.aclose()
    server.close()
    assert ready is False
    assert took < 3, took


def test_the_upstream_key_cannot_be_serialised() -> None:
    upstream = Upstream("http://node1:8000", "the-key")
    assert "the-key" not in repr(upstream)
    with pytest.raises(TypeError):
        msgspec.json.encode(upstream)

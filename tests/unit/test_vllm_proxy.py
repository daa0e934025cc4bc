"""The vLLM proxy against failures a real vLLM cannot be made to produce on demand."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from pytest_httpx import HTTPXMock

from gateway.api.vllm import _stream
from gateway.core.errors import UpstreamFailed
from gateway.core.services import Upstream
from gateway.upstream.vllm import Prompt, VllmClient

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
    vllm = VllmClient()
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
    vllm = VllmClient()
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
    vllm = VllmClient()
    first = await vllm.complete(ENDPOINT, PROMPT)
    second = await vllm.complete(ENDPOINT, PROMPT)
    assert (first.api, first.text, first.usage.total_tokens) == ("completions", " there", 9)
    assert second.api == "completions"
    # The chat API was tried once, then remembered as unusable for this model.
    assert len(httpx_mock.get_requests(url=f"{ENDPOINT}/v1/chat/completions")) == 1
    await vllm.aclose()


async def test_vllm_timeout_is_a_504(httpx_mock: HTTPXMock) -> None:
    httpx_mock.add_exception(httpx.ReadTimeout("slow"))
    vllm = VllmClient()
    with pytest.raises(Exception, match="did not answer in time") as info:
        await _stream(vllm, "7", UPSTREAM, PROMPT)
    assert getattr(info.value, "status_code", None) == 504
    await vllm.aclose()

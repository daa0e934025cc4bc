"""The prompt path (gateway/proxy/prompts.py) against failures a real vLLM
cannot be made to produce on demand, served by a real socket that misbehaves
(tests/support/http_stub.py)."""

from __future__ import annotations

import asyncio

import pytest

from gateway.core.errors import UpstreamFailed
from gateway.core.services import Upstream
from gateway.proxy.prompts import sse_response
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
        response_ = await sse_response(vllm, "7", Upstream(stub.url, "k"), PROMPT)
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
            await sse_response(vllm, "7", Upstream(stub.url, "k"), PROMPT)
        await vllm.aclose()


async def test_vllm_timeout_is_a_504() -> None:
    async def silent(seen: Seen, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(5)

    async with http_stub(silent) as stub:
        vllm = VllmClient(timeout=0.3)
        with pytest.raises(Exception, match="did not answer in time") as info:
            await sse_response(vllm, "7", Upstream(stub.url, "k"), PROMPT)
        await vllm.aclose()
    assert getattr(info.value, "status_code", None) == 504

"""The prompt path's core, shared by the route and its fast path (fastpath.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass

import anyio
import msgspec

from gateway.api.schemas import PromptRequest, PromptResponse, UsageResponse
from gateway.core.errors import UpstreamFailed, UpstreamTimeout
from gateway.core.services import Service, ServiceManager, Upstream, served_model
from gateway.metrics import PROMPT_FIRST_BYTE, PROMPT_TOKENS, PROMPTS, series
from gateway.upstream.vllm import Prompt, UpstreamError, UpstreamUnavailable, VllmClient


@dataclass(frozen=True, slots=True)
class Prompting:
    """What the prompt path needs, as one dependency: Litestar resolves two
    or more independent ones in an anyio task group, about a tenth of the
    CPU of a proxied prompt."""

    services: ServiceManager
    vllm: VllmClient


def prompt_of(service: Service, data: PromptRequest) -> Prompt:
    return Prompt(
        prompt=data.prompt,
        model=data.model or served_model(service.config.environment),
        max_tokens=data.max_tokens,
        temperature=data.temperature,
        top_p=data.top_p,
        stop=data.stop,
    )


async def complete(
    vllm: VllmClient, service_id: str, service: Service, data: PromptRequest
) -> PromptResponse:
    """A prompt's whole answer (the route and its fast path share this)."""
    upstream = upstream_of(service)
    started = time.perf_counter()
    try:
        done = await vllm.complete(upstream.url, prompt_of(service, data), upstream.key)
    except (UpstreamError, UpstreamUnavailable) as exc:
        series(PROMPTS, "false", _outcome(exc)).inc()
        raise upstream_failure(service_id, exc) from None
    series(PROMPT_FIRST_BYTE, "false").observe(time.perf_counter() - started)
    series(PROMPTS, "false", "ok").inc()
    _count_tokens(done.usage.prompt_tokens, done.usage.completion_tokens)
    return PromptResponse(
        success=True,
        response=done.text,
        model=done.model,
        finish_reason=done.finish_reason,
        usage=UsageResponse(
            prompt_tokens=done.usage.prompt_tokens,
            completion_tokens=done.usage.completion_tokens,
            total_tokens=done.usage.total_tokens,
        ),
        service_id=service_id,
        endpoint=upstream.url,
        endpoint_used=done.api,
    )


def upstream_of(service: Service) -> Upstream:
    assert service.upstream is not None  # running() guarantees it
    return service.upstream


def upstream_failure(service_id: str, exc: Exception) -> Exception:
    if isinstance(exc, UpstreamUnavailable) and exc.timeout:
        return UpstreamTimeout(f"vLLM of service {service_id} did not answer in time")
    if isinstance(exc, UpstreamError):
        return UpstreamFailed(f"vLLM of service {service_id} answered {exc.status}: {exc.message}")
    return UpstreamFailed(f"vLLM of service {service_id}: {exc}")


async def open_stream(
    vllm: VllmClient, service_id: str, upstream: Upstream, request: Prompt
) -> tuple[bytes, AsyncGenerator[bytes, None]]:
    """The upstream stream, opened before anything is answered so that a
    refusal is a proper HTTP error; its first chunk, and the rest."""
    started = time.perf_counter()
    chunks = vllm.stream(upstream.url, request, upstream.key)
    try:
        first = await anext(chunks)
    except StopAsyncIteration:
        first = b""
    except (UpstreamError, UpstreamUnavailable) as exc:
        await chunks.aclose()
        series(PROMPTS, "true", _outcome(exc)).inc()
        raise upstream_failure(service_id, exc) from None
    series(PROMPT_FIRST_BYTE, "true").observe(time.perf_counter() - started)
    return first, chunks


async def relay(first: bytes, chunks: AsyncGenerator[bytes, None]) -> AsyncGenerator[bytes, None]:
    """The chunks as they come; a failure after the headers ends the stream
    with an error event. Closing it closes the upstream (vLLM then aborts)."""
    outcome = "client_gone"  # unless the stream ends
    usage = _UsageReader()
    try:
        yield first
        usage.feed(first)
        async for chunk in chunks:
            yield chunk
            usage.feed(chunk)
            # When vLLM is ahead of us every read returns at once and this
            # loop never lets the event loop run, so nobody would notice a
            # client that went away until vLLM had finished. Yield to it.
            await asyncio.sleep(0)
        outcome = "ok"
    except (UpstreamError, UpstreamUnavailable) as exc:
        outcome = _outcome(exc)
        error = {"error": {"message": str(exc), "type": "upstream_error"}}
        yield b"event: error\ndata: " + msgspec.json.encode(error) + b"\n\n"
    finally:
        series(PROMPTS, "true", outcome).inc()
        # Shielded: after a client left this runs in a cancelled anyio scope
        # (Litestar's streaming), where an await would be cancelled at once.
        with anyio.CancelScope(shield=True):
            await chunks.aclose()


def _outcome(exc: Exception) -> str:
    if isinstance(exc, UpstreamUnavailable):
        return "timeout" if exc.timeout else "unreachable"
    return "upstream_error"


def _count_tokens(prompt: int | None, completion: int | None) -> None:
    if prompt:
        series(PROMPT_TOKENS, "prompt").inc(prompt)
    if completion:
        series(PROMPT_TOKENS, "completion").inc(completion)


class _Usage(msgspec.Struct):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


class _UsageChunk(msgspec.Struct):
    usage: _Usage | None = None


_read_usage = msgspec.json.Decoder(_UsageChunk).decode


def count_usage(answer: bytes) -> None:
    """Tokens of a whole OpenAI answer (its top-level ``usage``), if it has one."""
    if b'"usage"' not in answer:
        return
    try:
        usage = _read_usage(answer).usage
    except msgspec.DecodeError:  # ValidationError included
        return
    if usage is not None:
        _count_tokens(usage.prompt_tokens, usage.completion_tokens)


class _UsageReader:
    """Reads usage from whole events only: a read may end inside one (seen
    when vLLM's last event crosses a TCP segment), so a partial event waits
    for the next read. Events end with a blank line; almost every read ends
    with one, so the usual cost is one ``endswith``."""

    LIMIT = 1 << 16  # a partial event longer than any usage event is dropped

    __slots__ = ("_partial",)

    def __init__(self) -> None:
        self._partial = b""

    def feed(self, chunk: bytes) -> None:
        if self._partial:
            chunk, self._partial = self._partial + chunk, b""
        if not chunk.endswith(b"\n\n"):
            cut = chunk.rfind(b"\n\n") + 2 if b"\n\n" in chunk else 0
            if len(chunk) - cut <= self.LIMIT:
                self._partial = chunk[cut:]
            chunk = chunk[:cut]
        _usage_in(chunk)


def _usage_in(chunk: bytes) -> None:
    """Tokens from the chunk that reports usage (vLLM sends it last, when
    asked to); other chunks cost one substring search."""
    if b'"usage":{' not in chunk and b'"usage": {' not in chunk:
        return
    for event in chunk.split(b"\n\n"):
        count_usage(event.partition(b"data: ")[2])

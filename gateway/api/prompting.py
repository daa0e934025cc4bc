"""The prompt path's core, shared by the route and its fast path (fastpath.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass

import anyio
import msgspec

from gateway.api.schemas import PromptRequest, PromptResponse, UsageResponse
from gateway.api.usage import SseUsage, count_tokens
from gateway.core.errors import UpstreamFailed, UpstreamTimeout
from gateway.core.services import Service, ServiceManager, Upstream, served_model
from gateway.metrics import PROMPT_FIRST_BYTE, PROMPTS, series
from gateway.upstream.answers import UpstreamError, UpstreamUnavailable
from gateway.upstream.limits import Lease
from gateway.upstream.vllm import Prompt, VllmClient


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
    vllm: VllmClient,
    service_id: str,
    service: Service,
    data: PromptRequest,
    lease: Lease,
    tenant: str | None,
) -> PromptResponse:
    """A prompt's whole answer (the route and its fast path share this); its
    bytes stay on ``lease`` until the caller closes it, once it has answered."""
    upstream = upstream_of(service)
    started = time.perf_counter()
    try:
        done = await vllm.complete(
            upstream.url,
            prompt_of(service, data),
            upstream.key,
            service=service_id,
            lease=lease,
            tenant=tenant,
        )
    except (UpstreamError, UpstreamUnavailable) as exc:
        series(PROMPTS, "false", _outcome(exc)).inc()
        raise upstream_failure(service_id, exc) from None
    series(PROMPT_FIRST_BYTE, "false").observe(time.perf_counter() - started)
    series(PROMPTS, "false", "ok").inc()
    count_tokens(done.usage.prompt_tokens, done.usage.completion_tokens)
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
    vllm: VllmClient,
    service_id: str,
    upstream: Upstream,
    request: Prompt,
    lease: Lease,
    tenant: str | None,
) -> tuple[bytes, AsyncGenerator[bytes, None]]:
    """The upstream stream, opened before anything is answered so that a
    refusal is a proper HTTP error; its first chunk, and the rest. The
    stream's slot is on ``lease``, given back when the stream ends."""
    started = time.perf_counter()
    chunks = vllm.stream(
        upstream.url, request, upstream.key, service=service_id, lease=lease, tenant=tenant
    )
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


async def relay(
    first: bytes, chunks: AsyncGenerator[bytes, None], lease: Lease | None = None
) -> AsyncGenerator[bytes, None]:
    """The chunks as they come; a failure after the headers ends the stream
    with an error event. Closing it closes the upstream (vLLM then aborts),
    and ``lease`` if given."""
    outcome = "client_gone"  # unless the stream ends
    usage = SseUsage()
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
        if lease is not None:
            lease.close()


def _outcome(exc: Exception) -> str:
    if isinstance(exc, UpstreamUnavailable):
        return "timeout" if exc.timeout else "unreachable"
    return "upstream_error"

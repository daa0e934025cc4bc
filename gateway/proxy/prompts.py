"""The prompt path (``POST /api/v1/vllm/{service_id}/prompt``), shared by the
route's handler and its fast path.

The fast path answers the route's common case in front of Litestar's handler.
A proxied prompt spent about a quarter of its CPU in the handler machinery
(kwargs and dependency resolution, the signature model, response building):
py-spy under wrk, see bench/proxy.py. It runs after Litestar's routing and
exception handling (middleware.py). A well-formed prompt to a running service
it answers itself, with the same decoding (msgspec, ``PromptRequest``) and the
same core calls as the handler; streams are written chunk by chunk. Everything
else (a body that does not decode, a service that is not running) goes to the
handler with the body replayed, so each answer and error keeps one shape and
one place; failures once the upstream was asked are raised for Litestar's
exception handlers, never retried. The body is read under the replica's memory
budget (gateway/upstream/limits.py), and held on the request's lease until the
answer is sent.

Authentication is app middleware, so it has run by the time the fast path
does; a guard on the route would not have (route middleware runs before guards).
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass

import msgspec
from litestar.types import ASGIApp, Receive, Scope, Send

from gateway.core.errors import GatewayError, UpstreamFailed, UpstreamTimeout
from gateway.core.principal import Principal
from gateway.core.services import Service, ServiceManager, Upstream
from gateway.metrics import PROMPT_FIRST_BYTE, PROMPTS, series
from gateway.proxy.asgi import (
    JSON,
    MAX_BODY,
    SSE_HEADERS,
    ClosingStream,
    read_body,
    replaying,
    send_stream,
    send_whole,
)
from gateway.proxy.sse import count_tokens, outcome, relay
from gateway.proxy.wire import PromptRequest, PromptResponse, UsageResponse
from gateway.slurm import SlurmError
from gateway.upstream.answers import UpstreamError, UpstreamUnavailable
from gateway.upstream.limits import Lease, tenant_of
from gateway.upstream.vllm import Prompt, VllmClient


@dataclass(frozen=True, slots=True)
class Prompting:
    """What the prompt path needs, as one dependency: Litestar resolves two
    or more independent ones in an anyio task group, about a tenth of the
    CPU of a proxied prompt."""

    services: ServiceManager
    vllm: VllmClient

    async def models(self, service_id: str, principal: Principal) -> tuple[str, list[str]]:
        """The endpoint of a running vLLM service of the caller's, and its models."""
        service = await self.services.running(service_id, principal, kind="vllm")
        upstream = upstream_of(service)
        try:
            return upstream.url, await self.vllm.models(upstream.url, upstream.key)
        except (UpstreamError, UpstreamUnavailable) as exc:
            raise upstream_failure(service_id, exc) from None

    async def answer(
        self, service_id: str, principal: Principal, data: PromptRequest
    ) -> PromptResponse | ClosingStream:
        """The handler's answer: what the fast path passed on (mostly requests
        it refuses), so each refusal has one place."""
        service = await self.services.running(service_id, principal, kind="vllm")
        tenant = tenant_of(principal)
        if data.stream:
            request = prompt_of(service, data)
            return await sse_response(self.vllm, service_id, upstream_of(service), request, tenant)
        lease = self.vllm.limits.lease()
        try:
            return await complete(self.vllm, service_id, service, data, lease, tenant)
        finally:
            lease.close()


async def sse_response(
    vllm: VllmClient,
    service_id: str,
    upstream: Upstream,
    request: Prompt,
    tenant: str | None = None,
) -> ClosingStream:
    """The handler's streamed answer, on a lease of its own given back when
    the stream ends."""
    lease = vllm.limits.lease()
    try:
        first, chunks = await open_stream(vllm, service_id, upstream, request, lease, tenant)
    except BaseException:
        lease.close()
        raise
    return ClosingStream(
        relay(first, chunks, lease),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def prompt_of(service: Service, data: PromptRequest) -> Prompt:
    return Prompt(
        prompt=data.prompt,
        model=data.model or service.served_model,
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
        series(PROMPTS, "false", outcome(exc)).inc()
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
        series(PROMPTS, "true", outcome(exc)).inc()
        raise upstream_failure(service_id, exc) from None
    series(PROMPT_FIRST_BYTE, "true").observe(time.perf_counter() - started)
    return first, chunks


# -- The fast path ------------------------------------------------------------------


async def fast_path(
    prompting: Prompting, app: ASGIApp, scope: Scope, receive: Receive, send: Send
) -> None:
    """The prompt answered here if it can be, else by ``app`` (the handler)."""
    lease = prompting.vllm.limits.lease()
    try:
        await _answer(app, prompting, lease, scope, receive, send)
    finally:
        lease.close()


async def _answer(
    app: ASGIApp, prompting: Prompting, lease: Lease, scope: Scope, receive: Receive, send: Send
) -> None:
    # Twice the body: the bytes, and the prompt decoded from them.
    body, complete_body = await read_body(receive, scope, MAX_BODY, lease, weight=2)
    replay = replaying(body, complete_body, receive)
    if not complete_body:
        await app(scope, replay, send)
        return
    try:
        data = msgspec.json.decode(body, type=PromptRequest)
    except msgspec.MsgspecError:
        await app(scope, replay, send)  # the handler names the bad field
        return
    service_id = str(scope["path_params"]["service_id"])
    try:
        # The caller authenticated already (app middleware, outside this
        # one); it sees only its own services here as in the handler.
        service = await prompting.services.running(service_id, scope["user"], kind="vllm")
    except (GatewayError, SlurmError):
        await app(scope, replay, send)  # no side effect yet: the handler says why
        return
    tenant = tenant_of(scope["user"])
    if data.stream:
        upstream = upstream_of(service)
        # A refusal before the first chunk raises here, for Litestar's handlers.
        first, chunks = await open_stream(
            prompting.vllm, service_id, upstream, prompt_of(service, data), lease, tenant
        )
        await send_stream(relay(first, chunks), chunks, receive, send, SSE_HEADERS)
        return
    done = await complete(prompting.vllm, service_id, service, data, lease, tenant)
    answer = msgspec.json.encode(done)
    headers = [JSON, (b"content-length", str(len(answer)).encode())]
    await send_whole(send, 200, headers, answer)

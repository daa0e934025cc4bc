"""The prompt path's core, shared by the route and its fast path (fastpath.py)."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.api.schemas import PromptRequest, PromptResponse, UsageResponse
from gateway.core.errors import UpstreamFailed, UpstreamTimeout
from gateway.core.services import Service, ServiceManager, Upstream
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
        model=data.model or service.config.environment.get("VLLM_MODEL") or "",
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
    try:
        done = await vllm.complete(upstream.url, prompt_of(service, data), upstream.key)
    except (UpstreamError, UpstreamUnavailable) as exc:
        raise upstream_failure(service_id, exc) from None
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

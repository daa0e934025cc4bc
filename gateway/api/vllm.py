"""``/api/v1/vllm``: running vLLM services, their models, prompts (streamed or not)."""

from __future__ import annotations

from typing import Annotated

from litestar import Controller, get, post
from litestar.di import NamedDependency
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import Example
from litestar.params import Body
from litestar.response import Response, Stream

from gateway.api.errors import EventStreamOperation, problem_responses
from gateway.api.fastpath import prompt_fast_path
from gateway.api.prompting import (
    Prompting,
    complete,
    open_stream,
    prompt_of,
    relay,
    upstream_failure,
    upstream_of,
)
from gateway.api.schemas import (
    ModelsResponse,
    ProblemResponse,
    PromptRequest,
    PromptResponse,
    VllmServiceResponse,
    VllmServicesResponse,
)
from gateway.api.services import ServiceId
from gateway.api.streaming import ClosingStream
from gateway.core.principal import Principal
from gateway.core.services import ServiceManager, Upstream
from gateway.core.status import ServiceStatus
from gateway.upstream.answers import UpstreamError, UpstreamUnavailable
from gateway.upstream.limits import tenant_of
from gateway.upstream.vllm import Prompt, VllmClient

_PROMPT_EXAMPLES = [
    Example(
        summary="A prompt",
        value={"prompt": "Tell me a joke about programming", "max_tokens": 100},
    ),
    Example(
        summary="With options",
        value={
            "prompt": "Write a short haiku about AI",
            "model": "gpt2",
            "max_tokens": 64,
            "temperature": 0.7,
        },
    ),
    Example(summary="Streamed", value={"prompt": "Count to five", "stream": True}),
]


# The data path's own refusals (gateway/upstream/limits.py), with Retry-After.
_OVERLOADED = {
    code: ResponseSpec(
        ProblemResponse,
        description=meaning,
        media_type="application/problem+json",
        generate_examples=False,
    )
    for code, meaning in {
        429: "The caller's tenant has GATEWAY_VLLM_MAX_PER_TENANT prompts in flight on this "
        "replica; retry after Retry-After seconds",
        503: "Slurm is unreachable, or the service has GATEWAY_VLLM_MAX_PER_SERVICE prompts in "
        "flight, or the gateway's memory budget for bodies and answers is spent; retry after "
        "Retry-After seconds",
    }.items()
}


class VllmController(Controller):
    path = "/api/v1/vllm"
    tags = ("vllm",)

    @get(
        "/services",
        operation_id="listVllmServices",
        responses=problem_responses(502, 503),
        summary="Running vLLM services",
    )
    async def list_vllm(
        self, services: NamedDependency[ServiceManager], principal: NamedDependency[Principal]
    ) -> VllmServicesResponse:
        running = [
            s
            for s in await services.list(principal)
            if s.kind == "vllm" and s.status is ServiceStatus.RUNNING
        ]
        return VllmServicesResponse(
            vllm_services=[
                VllmServiceResponse(
                    id=s.id,
                    name=s.name,
                    recipe_name=s.recipe_name,
                    status=s.status,
                    endpoint=s.endpoint,
                    model=s.config.environment.get("VLLM_MODEL"),
                    node=s.node,
                )
                for s in running
            ]
        )

    @get(
        "/{service_id:str}/models",
        operation_id="listVllmModels",
        responses=problem_responses(400, 404, 409, 502, 503, 504),
        summary="Models vLLM serves",
    )
    async def models(
        self,
        prompting: NamedDependency[Prompting],
        principal: NamedDependency[Principal],
        service_id: ServiceId,
    ) -> ModelsResponse:
        vllm = prompting.vllm
        service = await prompting.services.running(service_id, principal, kind="vllm")
        upstream = upstream_of(service)
        endpoint = upstream.url
        try:
            models = await vllm.models(endpoint, upstream.key)
        except (UpstreamError, UpstreamUnavailable) as exc:
            raise upstream_failure(service_id, exc) from None
        return ModelsResponse(service_id=service_id, endpoint=endpoint, models=models)

    @post(
        "/{service_id:str}/prompt",
        operation_id="promptVllm",
        summary="Send a prompt; with stream=true the answer is Server-Sent Events",
        description="Uses the chat API when the model has a chat template, the completions "
        "API otherwise. A service that is not running answers 409 with its status.",
        status_code=200,
        responses={
            **problem_responses(400, 404, 409, 422, 502, 503, 504),
            **_OVERLOADED,
            200: ResponseSpec(
                PromptResponse,
                generate_examples=False,
                description="The completion, or with stream=true a text/event-stream of "
                "vLLM's chunks ending in `data: [DONE]`",
            ),
        },
        operation_class=EventStreamOperation,  # adds the text/event-stream 200 answer
        middleware=[prompt_fast_path],
    )
    async def prompt(
        self,
        prompting: NamedDependency[Prompting],
        principal: NamedDependency[Principal],
        service_id: ServiceId,
        data: Annotated[PromptRequest, Body(examples=_PROMPT_EXAMPLES)],
    ) -> Response[PromptResponse] | Stream:
        # What the fast path (fastpath.py) passed on: mostly requests it refuses.
        service = await prompting.services.running(service_id, principal, kind="vllm")
        tenant = tenant_of(principal)
        if data.stream:
            upstream = upstream_of(service)
            request = prompt_of(service, data)
            return await _stream(prompting.vllm, service_id, upstream, request, tenant)
        lease = prompting.vllm.limits.lease()
        try:
            done = await complete(prompting.vllm, service_id, service, data, lease, tenant)
            return Response(done)
        finally:
            lease.close()


async def _stream(
    vllm: VllmClient,
    service_id: str,
    upstream: Upstream,
    request: Prompt,
    tenant: str | None = None,
) -> ClosingStream:
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

"""``/api/v1/vllm``: running vLLM services, their models, prompts (streamed or not)."""

from __future__ import annotations

from typing import Annotated

from litestar import Controller, get, post
from litestar.di import NamedDependency
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import Example
from litestar.params import Body
from litestar.response import Response, Stream

from gateway.api.openapi import EventStreamOperation, problem_responses
from gateway.api.schemas import (
    ModelsResponse,
    ProblemResponse,
    PromptRequest,
    PromptResponse,
    VllmServiceResponse,
    VllmServicesResponse,
)
from gateway.api.services import ServiceId
from gateway.core.principal import Principal
from gateway.core.services import ServiceManager
from gateway.core.status import ServiceStatus
from gateway.proxy.middleware import PROMPT
from gateway.proxy.prompts import Prompting

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
                    model=s.model,
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
        endpoint, models = await prompting.models(service_id, principal)
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
        opt={PROMPT: True},  # answered by the data path's fast path first
    )
    async def prompt(
        self,
        prompting: NamedDependency[Prompting],
        principal: NamedDependency[Principal],
        service_id: ServiceId,
        data: Annotated[PromptRequest, Body(examples=_PROMPT_EXAMPLES)],
    ) -> Response[PromptResponse] | Stream:
        # What the fast path (gateway/proxy/prompts.py) passed on: mostly requests it refuses.
        answer = await prompting.answer(service_id, principal, data)
        return answer if isinstance(answer, Stream) else Response(answer)

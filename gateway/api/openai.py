"""``/v1``: an OpenAI-compatible front door, routed by model across running services.

Point any OpenAI client at ``http://gateway:8001/v1`` with an API key of the
gateway: ``/v1/models`` lists the models of the running vLLM services the
caller may use (its own tenant's, and those an admin shared), and each
completion goes to a service of its ``model`` (gateway/core/routing.py).
Errors come in OpenAI's shape, which its SDKs turn into their exceptions.
"""

from __future__ import annotations

import asyncio
from typing import Annotated

import msgspec
from litestar import Controller, get, post
from litestar.di import NamedDependency
from litestar.enums import RequestEncodingType
from litestar.exceptions import HTTPException, ValidationException
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import Operation
from litestar.params import Body, PathParameter, QueryParameter
from litestar.plugins.problem_details import ProblemDetailsException
from litestar.types import ExceptionHandlersMap

from gateway.api.openai_errors import openai_error
from gateway.api.openai_schemas import (
    MODEL_MAX_LENGTH,
    AudioAnswer,
    AudioRequest,
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    OpenAIAnswer,
    OpenAIError,
    OpenAIModel,
    OpenAIModelList,
    ResponseRequest,
)
from gateway.api.openapi import EventStreamOperation
from gateway.core.deployments.spec import Deployment
from gateway.core.errors import GatewayError
from gateway.core.principal import Principal
from gateway.core.routing import ModelNotFound
from gateway.core.services import Service
from gateway.proxy.frontdoor import FrontDoor
from gateway.proxy.middleware import RELAY, STORED
from gateway.slurm import SlurmError

_MEANINGS = {
    400: "The body is not JSON or has no `model`, or one over "
    f"{MODEL_MAX_LENGTH} characters (`param`: model), a parameter cannot be read, or vLLM "
    "refused the request (its message)",
    401: "No credentials, or credentials that do not check out",
    403: "Authenticated, but not allowed",
    404: "No running or starting service the caller may use serves this model "
    "(`code`: model_not_found; the message lists those that do)",
    413: "The body is over 32 MiB",
    422: "vLLM refused the request (its status and message)",
    429: "The caller's tenant has GATEWAY_VLLM_MAX_PER_TENANT requests in flight on this "
    "replica (`code`: tenant_over_share; see Retry-After), or vLLM is overloaded (its status "
    "and message)",
    500: "vLLM failed (its status and message), or the gateway did (logged)",
    502: "The service could not be reached, broke off, or answered with an error that is "
    "not the request's (vLLM's 400, 404, 422, 429, 500 and 503 are passed on as they are)",
    503: "The model's services are still starting, the service has "
    "GATEWAY_VLLM_MAX_PER_SERVICE requests in flight (`code`: upstream_full), the gateway's "
    "memory budget for bodies and answers is spent (`code`: memory_budget), Slurm is "
    "unreachable (each with Retry-After), or vLLM answered 503",
    504: "The service did not answer in time (a whole answer within GATEWAY_VLLM_TIMEOUT; a "
    "stream's first chunk and each gap too, and all of it within GATEWAY_VLLM_STREAM_TIMEOUT)",
}


def _errors(*codes: int, shape: type[msgspec.Struct] = OpenAIError) -> dict[int, ResponseSpec]:
    return {
        code: ResponseSpec(shape, description=_MEANINGS[code], generate_examples=False)
        for code in sorted({*codes, 401, 403})
    }


# Each type the app maps to problem details (problems.plugin()) is mapped here
# too: the most specific class in an exception's MRO wins, at any layer.
OPENAI_HANDLERS: ExceptionHandlersMap = {
    cls: openai_error
    for cls in (
        GatewayError,
        SlurmError,
        ValidationException,
        HTTPException,
        ProblemDetailsException,
        Exception,
    )
}


def relayed_route(
    path: str,
    operation_id: str,
    summary: str,
    *,
    stream: bool,
    upstream: str | None = None,
    answer: type[msgspec.Struct] = OpenAIAnswer,
    errors: type[msgspec.Struct] = OpenAIError,
) -> post:
    """A POST the data path answers (gateway/proxy/middleware.py), relayed to
    ``upstream`` (``/v1`` + ``path`` by default) of a service of the body's
    model; documented as vLLM's answer."""
    return post(
        path,
        operation_id=operation_id,
        summary=summary,
        status_code=200,
        responses={
            **_errors(400, 404, 413, 422, 429, 500, 502, 503, 504, shape=errors),
            200: ResponseSpec(answer, description="vLLM's answer", generate_examples=False),
        },
        # The JSON answer or a text/event-stream one.
        operation_class=EventStreamOperation if stream else Operation,
        opt={RELAY: upstream or f"/v1{path}"},
    )


class OpenAIController(Controller):
    path = "/v1"
    tags = ("openai",)
    exception_handlers = OPENAI_HANDLERS

    @get(
        "/models",
        operation_id="listOpenAIModels",
        summary="Models of the running vLLM services the caller may use",
        responses=_errors(503),
    )
    async def list_models(
        self, front_door: NamedDependency[FrontDoor], principal: NamedDependency[Principal]
    ) -> OpenAIModelList:
        models = await front_door.router.models(principal)
        cards = await asyncio.gather(
            *(_card(front_door, name, services) for name, services in sorted(models.items()))
        )
        asleep = front_door.router.asleep(principal)
        cards.extend(_asleep(name, d) for name, d in sorted(asleep.items()) if name not in models)
        return OpenAIModelList(data=list(cards))

    @get(
        "/models/{model:path}",
        operation_id="getOpenAIModel",
        summary="One model, if a running service the caller may use serves it",
        responses=_errors(400, 404, 503),
    )
    async def get_model(
        self,
        front_door: NamedDependency[FrontDoor],
        principal: NamedDependency[Principal],
        model: Annotated[str, PathParameter(description="the model's name (it may hold /)")],
    ) -> OpenAIModel:
        name = model.lstrip("/")
        models = await front_door.router.models(principal)
        if name not in models:
            asleep = front_door.router.asleep(principal)
            if name in asleep:
                return _asleep(name, asleep[name])
            raise ModelNotFound(name, sorted({*models, *asleep}))
        return await _card(front_door, name, models[name])

    @relayed_route(
        "/chat/completions",
        "createChatCompletion",
        "A chat completion from a service of the model (streamed with stream=true)",
        stream=True,
    )
    async def chat_completions(
        self, data: Annotated[ChatCompletionRequest, Body()]
    ) -> OpenAIAnswer:
        raise relayed()

    @relayed_route(
        "/completions",
        "createCompletion",
        "A completion from a service of the model (streamed with stream=true)",
        stream=True,
    )
    async def completions(self, data: Annotated[CompletionRequest, Body()]) -> OpenAIAnswer:
        raise relayed()

    @relayed_route(
        "/responses",
        "createResponse",
        "A response (OpenAI's Responses API) from a service of the model, or of the "
        "service holding `previous_response_id` (streamed with stream=true)",
        stream=True,
    )
    async def create_response(self, data: Annotated[ResponseRequest, Body()]) -> OpenAIAnswer:
        raise relayed()

    @get(
        "/responses/{response_id:str}",
        operation_id="getResponse",
        summary="A stored response, from the service that holds it (streamed with stream=true)",
        responses=_errors(400, 404, 429, 500, 502, 503, 504),
        operation_class=EventStreamOperation,
        opt={STORED: True},
    )
    async def get_response(
        self,
        response_id: Annotated[str, PathParameter(description="the id the response came with")],
        stream: Annotated[
            bool, QueryParameter(description="the response's events as server-sent events")
        ] = False,
        starting_after: Annotated[
            int | None, QueryParameter(description="with stream: the events after this one")
        ] = None,
    ) -> OpenAIAnswer:
        raise relayed()

    @post(
        "/responses/{response_id:str}/cancel",
        operation_id="cancelResponse",
        summary="Cancel a response made in the background, at the service that holds it",
        status_code=200,
        responses=_errors(400, 404, 429, 500, 502, 503, 504),
        opt={STORED: True},
    )
    async def cancel_response(
        self,
        response_id: Annotated[str, PathParameter(description="the id the response came with")],
    ) -> OpenAIAnswer:
        raise relayed()

    @relayed_route(
        "/audio/transcriptions",
        "createTranscription",
        "The text of an audio file, from a service of the model (a form; streamed with "
        "stream=true)",
        stream=True,
        answer=AudioAnswer,
    )
    async def transcriptions(
        self, data: Annotated[AudioRequest, Body(media_type=RequestEncodingType.MULTI_PART)]
    ) -> AudioAnswer:
        raise relayed()

    @relayed_route(
        "/audio/translations",
        "createTranslation",
        "An audio file's text in English, from a service of the model (a form)",
        stream=True,
        answer=AudioAnswer,
    )
    async def translations(
        self, data: Annotated[AudioRequest, Body(media_type=RequestEncodingType.MULTI_PART)]
    ) -> AudioAnswer:
        raise relayed()

    @relayed_route(
        "/embeddings", "createEmbedding", "Embeddings from a service of the model", stream=False
    )
    async def embeddings(self, data: Annotated[EmbeddingRequest, Body()]) -> OpenAIAnswer:
        raise relayed()


def relayed() -> Exception:
    # The data path (gateway/proxy/frontdoor.py) answers every request: these handlers
    # exist for the OpenAPI document only.
    return RuntimeError("answered by the relay middleware, which did not run")


def _asleep(name: str, deployment: Deployment) -> OpenAIModel:
    adapter = name != deployment.served
    return OpenAIModel(
        id=name,
        created=0,
        owned_by=deployment.spec.tenant or "shared",
        root=deployment.adapters.get(name) if adapter else deployment.loaded,
        parent=deployment.served if adapter else None,
        max_model_len=None,
        services=0,
        scaled_to_zero=True,
    )


async def _card(front_door: FrontDoor, name: str, services: list[Service]) -> OpenAIModel:
    first = min(services, key=lambda s: int(s.id))
    adapter = name != first.served_model
    return OpenAIModel(
        id=name,
        created=int(first.created_at.timestamp()),
        owned_by=first.tenant or first.owner,
        root=first.adapters.get(name) if adapter else first.model,
        parent=first.served_model if adapter else None,
        max_model_len=await front_door.max_model_len(first),
        services=len(services),
    )

"""Wire types of the OpenAI front door (/v1), in OpenAI's own shapes.

The request types document the operations; the relay (gateway/proxy/frontdoor.py) reads only
``model`` and passes every body on as it came, so fields vLLM adds (and ones
OpenAI adds later) work without a change here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

import msgspec
from litestar.datastructures import UploadFile
from litestar.params import KwargDefinition
from msgspec import Meta

# The longest model name a request may send (the prompt route's too): a name
# is a key the gateway remembers things under, so it is bounded.
from gateway.proxy.wire import MODEL_MAX_LENGTH as MODEL_MAX_LENGTH

ModelName = Annotated[
    str,
    Meta(
        min_length=1,
        description="a model as GET /v1/models lists it: the served name of running services",
        examples=["Qwen/Qwen2.5-0.5B-Instruct"],
    ),
]
RequestedModel = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=MODEL_MAX_LENGTH,
        description="a model as GET /v1/models lists it: the served name of running services",
        examples=["Qwen/Qwen2.5-0.5B-Instruct"],
    ),
]
_PASSED_ON = "Every other field of OpenAI's API (or vLLM's extensions) is passed to vLLM as sent."


class OpenAIModel(msgspec.Struct, kw_only=True):
    id: ModelName
    object: Literal["model"] = "model"
    created: Annotated[int, Meta(description="when its first service was created (Unix time)")]
    owned_by: Annotated[str, Meta(description="the tenant (or Slurm user) that runs it")]
    root: Annotated[
        str | None,
        Meta(description="the model vLLM loaded (VLLM_MODEL); for a LoRA adapter, its path"),
    ]
    parent: Annotated[
        str | None,
        Meta(description="for a LoRA adapter, the model it adapts (its name on /v1); else null"),
    ]
    max_model_len: Annotated[
        int | None, Meta(description="the longest context, where vLLM reports it")
    ]
    services: Annotated[int, Meta(description="how many running services serve it")] = 1
    scaled_to_zero: Annotated[
        bool,
        Meta(
            description="a deployment of it runs no replica now: the first request starts one "
            "(503 model_not_ready with Retry-After, or send `Prefer: wait=<seconds>`)"
        ),
    ] = False


class OpenAIModelList(msgspec.Struct, kw_only=True):
    object: Literal["list"] = "list"
    data: list[OpenAIModel]


class OpenAIErrorDetail(msgspec.Struct, kw_only=True):
    message: str
    type: Annotated[
        str,
        Meta(
            examples=["invalid_request_error"],
            description="invalid_request_error, authentication_error, permission_error, "
            "rate_limit_error, service_unavailable_error, server_error, or vLLM's own",
        ),
    ]
    param: Annotated[str | None, Meta(description="the request field at fault")]
    code: Annotated[
        str | None, Meta(examples=["model_not_found"], description="a machine-readable reason")
    ]


class OpenAIError(msgspec.Struct, kw_only=True):
    """Every error of /v1, as OpenAI's SDKs read them."""

    error: OpenAIErrorDetail


class ChatCompletionRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=False):
    __doc__ = f"OpenAI's chat completion request. {_PASSED_ON}"

    model: RequestedModel
    messages: list[dict[str, Any]]
    stream: Annotated[bool, Meta(description="answer with Server-Sent Events")] = False
    max_tokens: int | None = None
    temperature: float | None = None


class CompletionRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=False):
    __doc__ = f"OpenAI's (legacy) completion request. {_PASSED_ON}"

    model: RequestedModel
    prompt: Annotated[str | list[Any], Meta(description="text, texts, or token ids")]
    stream: Annotated[bool, Meta(description="answer with Server-Sent Events")] = False
    max_tokens: int | None = None
    temperature: float | None = None


class EmbeddingRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=False):
    __doc__ = f"OpenAI's embedding request (the service must run an embedding model). {_PASSED_ON}"

    model: RequestedModel
    input: Annotated[str | list[Any], Meta(description="text, texts, or token ids")]


class ResponseRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=False):
    __doc__ = (
        "OpenAI's Responses API request. The gateway names the response "
        "(`resp_<service id>_<hex>`, vLLM's `request_id`, which it sets), so that "
        "`previous_response_id` and GET /v1/responses/{id} reach the service that "
        f"holds it. {_PASSED_ON}"
    )

    model: RequestedModel
    input: Annotated[str | list[Any], Meta(description="text, or a list of input items")]
    previous_response_id: str | None = None
    stream: bool | None = None
    store: Annotated[
        bool | None,
        Meta(
            description="kept for GET /v1/responses/{id} and `previous_response_id`, where "
            "the service's vLLM keeps responses (the recipe's VLLM_ENABLE_RESPONSES_API_STORE)"
        ),
    ] = None


@dataclass
class AudioRequest:
    """OpenAI's transcription or translation request, as multipart/form-data
    (up to the front door's 32 MiB in all). The gateway reads ``model`` and
    ``stream``; the form goes to vLLM as sent, with every other field."""

    file: UploadFile
    # (Litestar reads a dataclass field's bounds from its KwargDefinition.)
    model: Annotated[
        str,
        KwargDefinition(
            min_length=1,
            max_length=MODEL_MAX_LENGTH,
            description="a model as GET /v1/models lists it, served by a speech model",
        ),
    ]
    language: str | None = None
    prompt: str | None = None
    response_format: str | None = None
    temperature: float | None = None
    stream: bool | None = None


class AudioAnswer(msgspec.Struct, kw_only=True, forbid_unknown_fields=False):
    """vLLM's answer as it sent it: the text (or, with ``response_format``
    text, srt or vtt, the text itself; a stream of events with stream=true)."""

    text: str | None = None


class OpenAIAnswer(msgspec.Struct, kw_only=True, forbid_unknown_fields=False):
    """vLLM's answer as it sent it (OpenAI's shape for the operation)."""

    id: str | None = None
    object: str
    model: str | None = None

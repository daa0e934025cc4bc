"""Anthropic's Messages API (``/v1/messages``), relayed by ``model`` like the
OpenAI front door: for Anthropic's SDKs and the tools built on them, pointed
at the gateway's root with an API key of the gateway (sent as ``X-Api-Key``,
as they send it, or as a bearer token). vLLM serves the API itself; the
gateway routes it, passes ``anthropic-version`` and ``anthropic-beta`` on,
and answers its own errors in Anthropic's shape, which those SDKs read.
"""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Controller, Request, Response, post
from litestar.params import Body
from litestar.types import ExceptionHandlersMap

from gateway.api.anthropic_schemas import (
    AnthropicAnswer,
    AnthropicError,
    AnthropicErrorDetail,
    CountTokensRequest,
    MessagesRequest,
)
from gateway.api.openai import OPENAI_HANDLERS, relayed, relayed_route
from gateway.api.openai_errors import openai_error

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}


def anthropic_error(request: Request[Any, Any, Any], exc: Exception) -> Response[AnthropicError]:
    """Any failure on these routes, as ``{"type": "error", "error": {type, message}}``:
    the same status, message and headers as the OpenAI front door's answer."""
    openai = openai_error(request, exc)
    status = openai.status_code or 500
    detail = AnthropicErrorDetail(
        type=_TYPES.get(status, "api_error"), message=openai.content.error.message
    )
    return Response(
        AnthropicError(error=detail), status_code=status, headers=dict(openai.headers) or None
    )


# Where /v1 answers in OpenAI's shape, these answer in Anthropic's.
_HANDLERS: ExceptionHandlersMap = {cls: anthropic_error for cls in OPENAI_HANDLERS}


def _route(path: str, operation_id: str, summary: str, *, stream: bool) -> post:
    """Relayed to the same path of a service of the body's model."""
    return relayed_route(
        path,
        operation_id,
        summary,
        stream=stream,
        upstream=f"/v1/messages{path.rstrip('/')}",
        answer=AnthropicAnswer,
        errors=AnthropicError,
    )


class AnthropicController(Controller):
    path = "/v1/messages"
    tags = ("anthropic",)
    exception_handlers = _HANDLERS

    @_route(
        "/",
        "createMessage",
        "A message from a service of the model, in Anthropic's API (streamed with stream=true)",
        stream=True,
    )
    async def create_message(self, data: Annotated[MessagesRequest, Body()]) -> AnthropicAnswer:
        raise relayed()

    @_route(
        "/count_tokens",
        "countMessageTokens",
        "The input tokens of a message, counted by a service of the model",
        stream=False,
    )
    async def count_tokens(self, data: Annotated[CountTokensRequest, Body()]) -> AnthropicAnswer:
        raise relayed()

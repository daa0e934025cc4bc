"""Wire types of Anthropic's Messages API (gateway/api/anthropic.py). As on
/v1, the relay reads only ``model`` (and ``stream``); the rest goes to vLLM
as sent."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from gateway.api.openai_schemas import RequestedModel

_PASSED_ON = "Every other field of Anthropic's API is passed to vLLM as sent."


class MessagesRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=False):
    __doc__ = f"Anthropic's messages request. {_PASSED_ON}"

    model: RequestedModel
    messages: list[dict[str, Any]]
    max_tokens: Annotated[int, Meta(ge=1)]
    system: str | list[Any] | None = None
    stream: bool | None = None


class CountTokensRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=False):
    __doc__ = f"The messages whose input tokens to count. {_PASSED_ON}"

    model: RequestedModel
    messages: list[dict[str, Any]]
    system: str | list[Any] | None = None


class AnthropicAnswer(msgspec.Struct, kw_only=True, forbid_unknown_fields=False):
    """vLLM's answer as it sent it, in Anthropic's shape (a message, its
    events, or ``input_tokens``)."""

    id: str | None = None
    type: str | None = None
    model: str | None = None


class AnthropicErrorDetail(msgspec.Struct, kw_only=True):
    type: Annotated[str, Meta(examples=["authentication_error", "not_found_error"])]
    message: str


class AnthropicError(msgspec.Struct, kw_only=True):
    """Anthropic's error shape, which its SDKs turn into their exceptions."""

    type: Literal["error"] = "error"
    error: AnthropicErrorDetail

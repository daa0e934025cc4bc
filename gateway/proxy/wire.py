"""The prompt route's body and answer, read and written by the data path itself.

api/schemas.py documents them under these names (the OpenAPI document is made
from these classes): they live here so that the prompt path decodes a body
exactly as the route's handler does, without importing the HTTP layer. No
docstrings on the structs: they would become the document's descriptions.
"""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta

# The longest model name either route takes (a name is matched, never stored).
MODEL_MAX_LENGTH = 512


class PromptRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    prompt: Annotated[str, Meta(min_length=1, max_length=1_000_000)]
    model: (
        Annotated[
            str, Meta(max_length=MODEL_MAX_LENGTH, description="defaults to the service's model")
        ]
        | None
    ) = None
    max_tokens: Annotated[int, Meta(ge=1, le=1_000_000)] = 150
    temperature: Annotated[float, Meta(ge=0, le=2)] = 0.7
    top_p: Annotated[float, Meta(gt=0, le=1)] | None = None
    stop: list[str] | None = None
    stream: Annotated[
        bool, Meta(description="answer with Server-Sent Events as vLLM produces them")
    ] = False


class UsageResponse(msgspec.Struct, kw_only=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class PromptResponse(msgspec.Struct, kw_only=True):
    success: bool
    response: Annotated[str, Meta(description="the generated text")]
    model: str
    finish_reason: str | None
    usage: UsageResponse
    service_id: str
    endpoint: str
    endpoint_used: Annotated[str, Meta(description="chat or completions")]

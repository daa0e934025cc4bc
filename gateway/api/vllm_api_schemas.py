"""Wire types of vLLM's APIs beyond OpenAI's (gateway/api/vllm_apis.py).

Like the /v1 types, they document the operations: the relay reads only
``model`` and passes each body on as it came, so what vLLM accepts (and adds
later) works without a change here.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from msgspec import Meta

from gateway.api.openai_schemas import RequestedModel

_PASSED_ON = "Every other field vLLM accepts is passed to it as sent."
Texts = Annotated[str | list[Any], Meta(description="a text, or a list of texts or token ids")]


class TokenizeRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=False):
    __doc__ = f"Text (``prompt``) or a chat (``messages``) to the model's token ids. {_PASSED_ON}"

    model: RequestedModel
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None


class DetokenizeRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=False):
    __doc__ = f"Token ids of the model back to text. {_PASSED_ON}"

    model: RequestedModel
    tokens: list[Annotated[int, Meta(ge=0)]]


class ScoreRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=False):
    __doc__ = (
        "Scores of pairs (a cross-encoder, or an embedding model's similarity): "
        f"``queries`` and ``documents`` (or vLLM's ``data_1`` and ``data_2``). {_PASSED_ON}"
    )

    model: RequestedModel
    queries: Texts | None = None
    documents: Texts | None = None


class RerankRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=False):
    __doc__ = f"Documents ordered by relevance to a query (Jina's and Cohere's shape). {_PASSED_ON}"

    model: RequestedModel
    query: Annotated[str | Any, Meta(description="the query")]
    documents: Annotated[list[Any], Meta(description="texts, or documents with their text")]
    top_n: Annotated[int, Meta(ge=0)] | None = None


class CohereEmbedRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=False):
    __doc__ = f"Cohere's embed request (the service must run an embedding model). {_PASSED_ON}"

    model: RequestedModel
    texts: list[str] | None = None
    input_type: str | None = None
    embedding_types: list[str] | None = None


class PoolingRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=False):
    __doc__ = (
        "Pooled hidden states (``/pooling``) or class probabilities (``/classify``) of "
        f"the inputs, from a service running a pooling model. {_PASSED_ON}"
    )

    model: RequestedModel
    input: Texts | None = None


class VllmAnswer(msgspec.Struct, kw_only=True, forbid_unknown_fields=False):
    """vLLM's answer as it sent it, in the shape of the operation (its
    documentation, and Jina's or Cohere's for rerank and embed)."""

    id: str | None = None
    model: str | None = None

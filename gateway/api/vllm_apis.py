"""vLLM's own APIs beyond OpenAI's, relayed by ``model`` exactly as /v1 is:
tokenizing, scoring and reranking (Jina's and Cohere's shapes), Cohere's
embed, pooling and classification.

Their paths are vLLM's, so a client given the gateway's root as its base URL
finds each where vLLM serves it. Errors come in OpenAI's shape, as vLLM's do.

vLLM's management routes (sleep and wake, weights, profiling, cache resets,
pause, LoRA loading, collective RPC, scaling) have no route here: they answer
404 whatever a service would do with them.
"""

from __future__ import annotations

from typing import Annotated

from litestar import Controller, post
from litestar.params import Body

from gateway.api.openai import OPENAI_HANDLERS, relayed, relayed_route
from gateway.api.vllm_api_schemas import (
    CohereEmbedRequest,
    DetokenizeRequest,
    PoolingRequest,
    RerankRequest,
    ScoreRequest,
    TokenizeRequest,
    VllmAnswer,
)

_RERANK = "Documents ordered by relevance to the query, from a service of the model"
_SCORE = "Scores of text pairs, from a service of the model"


def _route(path: str, operation_id: str, summary: str) -> post:
    """Relayed to the same path of a service of the body's model."""
    return relayed_route(
        path, operation_id, summary, stream=False, upstream=path, answer=VllmAnswer
    )


class VllmApisController(Controller):
    path = "/"
    tags = ("vllm",)
    exception_handlers = OPENAI_HANDLERS

    @_route("/tokenize", "tokenize", "Token ids of a text or chat, from a service of the model")
    async def tokenize(self, data: Annotated[TokenizeRequest, Body()]) -> VllmAnswer:
        raise relayed()

    @_route("/detokenize", "detokenize", "The text of token ids, from a service of the model")
    async def detokenize(self, data: Annotated[DetokenizeRequest, Body()]) -> VllmAnswer:
        raise relayed()

    @_route("/score", "score", _SCORE)
    async def score(self, data: Annotated[ScoreRequest, Body()]) -> VllmAnswer:
        raise relayed()

    @_route("/v1/score", "scoreV1", _SCORE)
    async def score_v1(self, data: Annotated[ScoreRequest, Body()]) -> VllmAnswer:
        raise relayed()

    @_route("/rerank", "rerank", _RERANK)
    async def rerank(self, data: Annotated[RerankRequest, Body()]) -> VllmAnswer:
        raise relayed()

    @_route("/v1/rerank", "rerankV1", _RERANK)
    async def rerank_v1(self, data: Annotated[RerankRequest, Body()]) -> VllmAnswer:
        raise relayed()

    @_route("/v2/rerank", "rerankV2", f"{_RERANK} (Cohere's API)")
    async def rerank_v2(self, data: Annotated[RerankRequest, Body()]) -> VllmAnswer:
        raise relayed()

    @_route("/v2/embed", "embedV2", "Embeddings from a service of the model (Cohere's API)")
    async def embed_v2(self, data: Annotated[CohereEmbedRequest, Body()]) -> VllmAnswer:
        raise relayed()

    @_route("/pooling", "pool", "Pooled hidden states of the inputs, from a service of the model")
    async def pooling(self, data: Annotated[PoolingRequest, Body()]) -> VllmAnswer:
        raise relayed()

    @_route(
        "/classify", "classify", "Class probabilities of the inputs, from a service of the model"
    )
    async def classify(self, data: Annotated[PoolingRequest, Body()]) -> VllmAnswer:
        raise relayed()

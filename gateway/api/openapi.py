"""OpenAPI helpers: the problem answers a route documents, examples written as
they are, and the operations whose 200 answer may also be an event stream."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import OpenAPIMediaType, OpenAPIResponse, OpenAPIType, Operation, Schema
from litestar.openapi.spec.base import BaseSchemaObject

from gateway.api.schemas import ProblemResponse

_MEANINGS = {
    400: "Malformed request: a body that is not JSON, or a parameter that cannot be read",
    401: "No credentials, or credentials that do not check out (see WWW-Authenticate)",
    403: "Authenticated, but not allowed: a caller outside the allow-list, or acting as "
    "another Slurm user",
    404: "No such service or recipe (another tenant's service is no service of yours)",
    409: "The service is not in a state that allows this",
    422: "Invalid request; `errors` names the fields, or Slurm refused the job",
    429: "A quota of the caller's tenant is reached; `limit` names it",
    500: "Unexpected failure of the gateway; the details are in its log",
    502: "Slurm or the service answered with an error",
    503: "Slurm is unreachable; retry after Retry-After seconds",
    504: "The service did not answer in time",
}


def problem_responses(*codes: int, public: bool = False) -> dict[int, ResponseSpec]:
    """OpenAPI entries for the problem-details errors a route can answer
    (401 and 403 too, unless the route is public)."""
    if not public:
        codes = tuple(sorted({*codes, 401, 403}))
    return {
        code: ResponseSpec(
            ProblemResponse,
            description=_MEANINGS[code],
            media_type="application/problem+json",
            generate_examples=False,
        )
        for code in codes
    }


@dataclass
class JsonExample(BaseSchemaObject):
    """An OpenAPI example value written out as is, `None` included (as `null`).
    A Litestar workaround: it can go once Litestar keeps `None` in examples.

    Litestar's ``to_schema()`` drops every ``None`` dict value of the spec tree,
    example values included, and offers no switch; it hands a spec object's own
    ``to_schema()`` result through untouched, so wrapping the value keeps it.
    """

    value: dict[str, Any]

    def to_schema(self) -> dict[str, Any]:
        return self.value


EVENT_STREAM = (
    "Server-Sent Events: vLLM's chunks as they come, as `data: {...}` events, ending in "
    "`data: [DONE]`. If vLLM fails once the stream has begun, it ends instead with an "
    '`event: error` event whose data is `{"error": {"message": ..., "type": "upstream_error"}}`.'
)


# Before OpenAPI 3.2 (and its `itemSchema`), an event stream's `schema` describes
# one event, with the fields of the SSE format (what Schemathesis checks events against).
SSE_EVENT = Schema(
    type=OpenAPIType.OBJECT,
    description=EVENT_STREAM,
    required=["data"],
    properties={
        "event": Schema(
            type=OpenAPIType.STRING,
            enum=["message", "error"],
            description="`error` for a failure once the stream has begun; unnamed otherwise",
        ),
        "data": Schema(
            type=OpenAPIType.STRING,
            description="one of vLLM's chunks as JSON, or `[DONE]`; for an `error` event, "
            '`{"error": {"message": ..., "type": "upstream_error"}}`',
        ),
    },
)


@dataclass
class EventStreamOperation(Operation):
    """An operation whose 200 answer is JSON, or a text/event-stream (EVENT_STREAM).

    A ResponseSpec documents one media type; Litestar builds each operation with
    the route's ``operation_class``, which adds the second one here.
    """

    def __post_init__(self) -> None:
        ok = (self.responses or {}).get("200")
        if isinstance(ok, OpenAPIResponse):
            ok.content = {**(ok.content or {}), "text/event-stream": OpenAPIMediaType(SSE_EVENT)}

"""One error shape for the whole API: RFC 9457 problem details with field errors.

Domain and Slurm failures are mapped here, once, to HTTP statuses; controllers
just raise.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import msgspec
import structlog
from litestar import Request, Response
from litestar.enums import HttpMethod, MediaType
from litestar.exceptions import HTTPException, ValidationException
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import OpenAPIMediaType, OpenAPIResponse, OpenAPIType, Operation, Schema
from litestar.openapi.spec.base import BaseSchemaObject
from litestar.plugins.problem_details import (
    ProblemDetailsConfig,
    ProblemDetailsException,
    ProblemDetailsPlugin,
)
from litestar.routes import HTTPRoute
from litestar.status_codes import (
    HTTP_204_NO_CONTENT,
    HTTP_400_BAD_REQUEST,
    HTTP_404_NOT_FOUND,
    HTTP_422_UNPROCESSABLE_ENTITY,
    HTTP_500_INTERNAL_SERVER_ERROR,
    HTTP_502_BAD_GATEWAY,
    HTTP_503_SERVICE_UNAVAILABLE,
)

from gateway.api.schemas import ProblemResponse
from gateway.core.errors import FieldError, GatewayError
from gateway.metrics import UNROUTED
from gateway.slurm import (
    SlurmAuthError,
    SlurmError,
    SlurmJobNotFound,
    SlurmRequestRejected,
    SlurmUnavailable,
)

RETRY_AFTER_SECONDS = 5

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


def problem(
    status: int,
    title: str,
    detail: str,
    errors: tuple[FieldError, ...] | list[FieldError] = (),
    headers: dict[str, str] | None = None,
) -> ProblemDetailsException:
    extra: dict[str, Any] = {}
    if errors:
        extra["errors"] = [{"field": e.field, "message": e.message} for e in errors]
    return ProblemDetailsException(
        status_code=status, title=title, detail=detail, extra=extra or None, headers=headers
    )


def from_gateway_error(exc: GatewayError) -> ProblemDetailsException:
    failure = problem(exc.status_code, exc.title, exc.detail, exc.errors, exc.headers)
    limit = getattr(exc, "limit", None)
    if limit is not None and isinstance(failure.extra, dict | None):
        failure.extra = {**(failure.extra or {}), "limit": limit}
    service_status = getattr(exc, "service_status", None)
    if service_status is not None and isinstance(failure.extra, dict | None):
        failure.extra = {**(failure.extra or {}), "service_status": service_status}
    return failure


def from_slurm_error(exc: SlurmError) -> ProblemDetailsException:
    if isinstance(exc, SlurmUnavailable):
        return problem(
            HTTP_503_SERVICE_UNAVAILABLE,
            "Slurm unavailable",
            str(exc),
            headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
        )
    if isinstance(exc, SlurmJobNotFound):
        return problem(HTTP_404_NOT_FOUND, "Not found", str(exc))
    if isinstance(exc, SlurmRequestRejected):
        return problem(HTTP_422_UNPROCESSABLE_ENTITY, "Rejected by Slurm", str(exc))
    if isinstance(exc, SlurmAuthError):
        return problem(HTTP_502_BAD_GATEWAY, "Slurm refused the gateway's credentials", str(exc))
    return problem(HTTP_502_BAD_GATEWAY, "Unexpected answer from Slurm", str(exc))


_NAMED_FIELD = re.compile(r"(?:unknown|missing required) field `([^`]+)`")
_AT_PATH = re.compile(r"^(?P<msg>.*?)(?: - at `\$(?P<path>[^`]*)`)?$")


def from_validation(exc: ValidationException) -> ProblemDetailsException:
    """Litestar's body and parameter validation, with the offending field named."""
    errors: list[FieldError] = []
    items = exc.extra if isinstance(exc.extra, list) else []
    for item in items:
        if not isinstance(item, dict):
            continue
        message = str(item.get("message", "invalid"))
        key = str(item.get("key") or "")
        source = str(item.get("source") or "")
        match = _AT_PATH.match(message)
        if match and match.group("path") is not None:
            message = match.group("msg")
            key = key or _dotted(match.group("path"))
        if key == "data":  # Litestar's name for the whole body
            key = ""
        named = _NAMED_FIELD.search(message)
        if named:
            key = f"{key}.{named.group(1)}" if key else named.group(1)
        errors.append(FieldError(field=key or source or "body", message=message))
    malformed = not errors and "decode" in (exc.detail or "").lower()
    if malformed or any("malformed" in e.message.lower() for e in errors):
        return problem(HTTP_400_BAD_REQUEST, "Malformed request", _first(exc, errors), errors)
    return problem(HTTP_422_UNPROCESSABLE_ENTITY, "Invalid request", _first(exc, errors), errors)


def _dotted(path: str) -> str:
    return re.sub(r"\[(\d+)\]", r".\1", path).lstrip(".") or "body"


def _first(exc: ValidationException, errors: list[FieldError]) -> str:
    if errors:
        return "; ".join(f"{e.field}: {e.message}" for e in errors)
    return exc.detail or "invalid request"


class _HttpProblem(ProblemDetailsException):
    def to_response(self, request: Request[Any, Any, Any]) -> Response[Any]:
        # The router sets the template only once a route matched.
        if "path_template" not in request.scope:
            method = request.method if request.method in _METHODS else "other"
            UNROUTED.labels(method, str(self.status_code)).inc()
            if request.url.path.startswith("/v1/"):
                # No route, so not the /v1 controller's handlers: OpenAI's
                # clients still expect its error shape under /v1.
                from gateway.api.openai import openai_error  # imports this module

                return openai_error(request, self)
        return super().to_response(request)


_METHODS = frozenset(HttpMethod)


def from_http_exception(exc: HTTPException) -> ProblemDetailsException:
    # The exception's headers are part of the answer: a 405's `Allow` (RFC 9110).
    return _HttpProblem(
        status_code=exc.status_code,
        title=_title(exc.status_code),
        detail=exc.detail or _title(exc.status_code),
        headers=dict(exc.headers) if exc.headers else None,
    )


class _Unexpected(ProblemDetailsException):
    """A 500 for an exception nothing else maps; its text stays in the log."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(
            status_code=HTTP_500_INTERNAL_SERVER_ERROR,
            title="Internal error",
            detail="The gateway failed unexpectedly; the error was logged",
        )
        self.cause = cause

    def to_response(self, request: Request[Any, Any, Any]) -> Response[dict[str, Any]]:
        # Logged here because the converters of the map never see the request.
        structlog.get_logger(__name__).exception(
            "unhandled exception", path=request.url.path, exc_info=self.cause
        )
        return super().to_response(request)


def from_unexpected(exc: Exception) -> ProblemDetailsException:
    return _Unexpected(exc)


def _title(status: int) -> str:
    from http import HTTPStatus

    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def plugin() -> ProblemDetailsPlugin:
    return ProblemDetailsPlugin(
        ProblemDetailsConfig(
            exception_to_problem_detail_map={
                GatewayError: from_gateway_error,
                SlurmError: from_slurm_error,
                ValidationException: from_validation,
                HTTPException: from_http_exception,
                Exception: from_unexpected,  # last resort: any exception not mapped above
            }
        )
    )


# -- Where Litestar 2 answers otherwise than the document says ----------------------


async def before_request(request: Request[Any, Any, Any]) -> Response[None] | None:
    """The app's ``before_request`` hook: OPTIONS answered whole, bodies read strictly."""
    if request.method == HttpMethod.OPTIONS:
        return _options(request)
    await _check_body(request)
    return None


def _options(request: Request[Any, Any, Any]) -> Response[None]:
    """OPTIONS with every method of the path in ``Allow``: Litestar 2's own
    handler lists only those of the first handler registered on a path
    (litestar-org/litestar#4169, fixed in Litestar 3)."""
    template = request.scope["path_template"]
    methods = {
        method
        for route in request.app.routes
        if isinstance(route, HTTPRoute) and route.path_format == template
        for method in route.methods
    }
    return Response(
        None,
        status_code=HTTP_204_NO_CONTENT,
        headers={"Allow": ", ".join(sorted({*methods, HttpMethod.OPTIONS}))},
        media_type=MediaType.TEXT,
    )


async def _check_body(request: Request[Any, Any, Any]) -> None:
    """A JSON body read as the document types it. Litestar converts a handler's
    ``data`` leniently (``"stream": 0`` for false, ``"nodes": "2"`` for 2), as it
    must query strings; the prompt route's fast path reads strictly already.
    JSON's ``2.0`` is the integer 2 all the same (JSON Schema says so). Malformed
    JSON is left to Litestar's own answer."""
    data = request.route_handler.parsed_fn_signature.parameters.get("data")
    if data is None or not data.is_subclass_of(msgspec.Struct):
        return
    try:
        value = msgspec.json.decode(await request.body())
    except msgspec.DecodeError:
        return
    try:
        msgspec.convert(_whole_numbers(value), data.annotation, strict=True)
    except RecursionError:
        raise ValidationException(
            detail="Malformed request: JSON nested too deeply",
            extra=[{"message": "malformed: JSON nested too deeply", "key": "", "source": "body"}],
        ) from None
    except msgspec.ValidationError as exc:
        raise ValidationException(
            detail=f"Validation failed for {request.method} {request.url.path}",
            extra=[{"message": str(exc), "key": "", "source": "body"}],
        ) from None


def _whole_numbers(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_whole_numbers(v) for v in value]
    if isinstance(value, dict):
        return {k: _whole_numbers(v) for k, v in value.items()}
    return value

"""One error shape for the whole API: RFC 9457 problem details with field errors.

Domain and Slurm failures are mapped here, once, to HTTP statuses; controllers
just raise.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import structlog
from litestar import Request, Response
from litestar.enums import HttpMethod
from litestar.exceptions import HTTPException, ValidationException
from litestar.plugins.problem_details import (
    ProblemDetailsConfig,
    ProblemDetailsException,
    ProblemDetailsPlugin,
)
from litestar.status_codes import (
    HTTP_400_BAD_REQUEST,
    HTTP_404_NOT_FOUND,
    HTTP_422_UNPROCESSABLE_ENTITY,
    HTTP_500_INTERNAL_SERVER_ERROR,
    HTTP_502_BAD_GATEWAY,
    HTTP_503_SERVICE_UNAVAILABLE,
)

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
# An answer in another shape, for requests no route took under a path prefix.
Unrouted = Callable[[Request[Any, Any, Any], Exception], Response[Any]]


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
    def __init__(self, unrouted: Mapping[str, Unrouted], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.unrouted = unrouted

    def to_response(self, request: Request[Any, Any, Any]) -> Response[Any]:
        # The router sets the template only once a route matched.
        if "path_template" not in request.scope:
            method = request.method if request.method in _METHODS else "other"
            UNROUTED.labels(method, str(self.status_code)).inc()
            for prefix, answer in self.unrouted.items():
                if request.url.path.startswith(prefix):
                    # No route, so not the route's handlers: clients of the
                    # prefix's API still expect its error shape (/v1: OpenAI's).
                    return answer(request, self)
        return super().to_response(request)


_METHODS = frozenset(HttpMethod)


def from_http_exception(
    exc: HTTPException, unrouted: Mapping[str, Unrouted] | None = None
) -> ProblemDetailsException:
    # The exception's headers are part of the answer: a 405's `Allow` (RFC 9110).
    return _HttpProblem(
        unrouted or {},
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


def plugin(unrouted: Mapping[str, Unrouted] | None = None) -> ProblemDetailsPlugin:
    """The app's exception mapping; ``unrouted`` answers, by path prefix, the
    requests no route took (a 404 or 405) in another shape."""
    answers = dict(unrouted or {})

    def from_http(exc: HTTPException) -> ProblemDetailsException:
        return from_http_exception(exc, answers)

    return ProblemDetailsPlugin(
        ProblemDetailsConfig(
            exception_to_problem_detail_map={
                GatewayError: from_gateway_error,
                SlurmError: from_slurm_error,
                ValidationException: from_validation,
                HTTPException: from_http,
                Exception: from_unexpected,  # last resort: any exception not mapped above
            }
        )
    )

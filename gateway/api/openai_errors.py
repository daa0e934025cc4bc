"""OpenAI's error shape, ``{"error": {message, type, param, code}}``, which its
SDKs turn into their exceptions: how /v1 answers every failure."""

from __future__ import annotations

from typing import Any

import structlog
from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException

from gateway.api.openai_schemas import OpenAIError, OpenAIErrorDetail
from gateway.api.problems import from_slurm_error
from gateway.core.errors import GatewayError
from gateway.proxy.frontdoor import UpstreamAnswer
from gateway.slurm import SlurmError

log = structlog.get_logger("gateway.api.openai")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}


def openai_error(request: Request[Any, Any, Any], exc: Exception) -> Response[OpenAIError]:
    """Any failure on /v1, as ``{"error": {message, type, param, code}}``."""
    headers: dict[str, str] | None = None
    param: str | None = None
    code: str | None = None
    kind: str | None = None
    if isinstance(exc, GatewayError):
        status, message, headers = exc.status_code, exc.detail, exc.headers
        if exc.errors:
            param = exc.errors[0].field
        param = getattr(exc, "param", param)
        code = getattr(exc, "code", None)
        if isinstance(exc, UpstreamAnswer):
            kind = exc.kind
    elif isinstance(exc, SlurmError):
        problem = from_slurm_error(exc)
        status, message, headers = problem.status_code, problem.detail, problem.headers
    elif isinstance(exc, ValidationException):
        status, message = 400, exc.detail
    elif isinstance(exc, HTTPException):
        status, message = exc.status_code, exc.detail
        headers = dict(exc.headers) if exc.headers else None
    else:
        log.exception("unhandled exception", path=request.url.path, exc_info=exc)
        status, message = 500, "The gateway failed unexpectedly; the error was logged"
    detail = OpenAIErrorDetail(
        message=message,
        type=kind or _TYPES.get(status, "server_error"),
        param=param,
        code=code,
    )
    return Response(OpenAIError(error=detail), status_code=status, headers=headers)

"""Domain failures, mapped to HTTP statuses by the API layer."""

from __future__ import annotations

import msgspec


class FieldError(msgspec.Struct, frozen=True):
    """One invalid input: where it is (``config.resources.memory``) and why."""

    field: str
    message: str


class GatewayError(Exception):
    status_code = 500
    title = "Internal error"
    headers: dict[str, str] | None = None

    def __init__(self, detail: str, *, errors: tuple[FieldError, ...] = ()) -> None:
        super().__init__(detail)
        self.detail = detail
        self.errors = errors


class InvalidRequest(GatewayError):
    status_code = 422
    title = "Invalid request"

    @classmethod
    def field(cls, field: str, message: str) -> InvalidRequest:
        return cls(f"{field}: {message}", errors=(FieldError(field, message),))


class NotFound(GatewayError):
    status_code = 404
    title = "Not found"


class Unauthenticated(GatewayError):
    """No credentials, or credentials that do not check out (RFC 6750)."""

    status_code = 401
    title = "Unauthorized"

    def __init__(self, detail: str, *, invalid: bool = True) -> None:
        super().__init__(detail)
        # No credentials: just the challenge; bad ones: say so (RFC 6750 3.1).
        challenge = 'Bearer realm="slurm-ai-gateway"'
        if invalid:
            # Printable ASCII only: the detail may quote a token's own header.
            quoted = "".join(c if " " <= c <= "~" and c not in '"\\' else "?" for c in detail[:200])
            challenge += f', error="invalid_token", error_description="{quoted}"'
        self.headers = {"WWW-Authenticate": challenge}


class Forbidden(GatewayError):
    """Authenticated, but not allowed to do this."""

    status_code = 403
    title = "Forbidden"
    # The caller, when known (gateway.core.principal.Principal), for the audit line.
    principal: object = None


class QuotaExceeded(GatewayError):
    status_code = 429
    title = "Quota exceeded"

    def __init__(self, detail: str, *, limit: str) -> None:
        super().__init__(detail)
        self.limit = limit


class Conflict(GatewayError):
    status_code = 409
    title = "Conflict"

    def __init__(self, detail: str, *, service_status: str | None = None) -> None:
        super().__init__(detail)
        self.service_status = service_status


class UpstreamFailed(GatewayError):
    """The service itself (vLLM) answered with an error."""

    status_code = 502
    title = "The service answered with an error"


class UpstreamTimeout(GatewayError):
    status_code = 504
    title = "The service did not answer in time"


class RecipeError(Exception):
    """A recipe or site overlay on disk is broken; start-up stops with this."""

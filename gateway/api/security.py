"""Authentication of every route but liveness, readiness and /metrics.

Litestar's authentication middleware puts the caller's :class:`Principal` in
``scope["user"]``; handlers take it as the ``principal`` dependency and pass it
to the core, which decides what that caller may see and do. The prompt fast
path reads the same scope entry.
"""

from __future__ import annotations

from typing import Any, cast

from litestar.connection import ASGIConnection, Request
from litestar.enums import HttpMethod
from litestar.middleware import DefineMiddleware
from litestar.middleware.authentication import (
    AbstractAuthenticationMiddleware,
    AuthenticationResult,
)
from litestar.openapi.spec import Components, SecurityRequirement, SecurityScheme
from litestar.types import ASGIApp

from gateway.auth.authenticate import Authenticator
from gateway.core.principal import Principal
from gateway.proxy.middleware import RAISED

BEARER = "bearer"
SLURM_TOKEN = "slurmToken"  # noqa: S105 - a scheme name
# Routes without authentication (and their OpenAPI operations say so).
PUBLIC: list[SecurityRequirement] = [{}]


class AuthenticationMiddleware(AbstractAuthenticationMiddleware):
    def __init__(self, app: ASGIApp, *, authenticator: Authenticator, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.authenticator = authenticator

    async def authenticate_request(self, connection: ASGIConnection[Any, Any, Any, Any]) -> Any:
        scope = connection.scope
        raised = cast(dict[str, Any], scope).pop(RAISED, None)
        if raised is not None:
            # The front (gateway/proxy/front.py) authenticated already, or
            # tried: what it failed on is raised here, for the route's handlers.
            raise raised
        principal = await self.authenticator.authenticate_asgi(scope)
        return AuthenticationResult(user=principal, auth=principal.method)


def middleware(authenticator: Authenticator, *, public_schema: bool) -> DefineMiddleware:
    exclude = ["^/metrics$"]
    if public_schema:
        exclude.append("^/api/v1/schema(/|$)")
    # Handlers marked exclude_from_auth=True (health, readiness) pass too. Only
    # OPTIONS is exempt by method (no route answers HEAD: Litestar says 405).
    return DefineMiddleware(
        AuthenticationMiddleware,
        authenticator=authenticator,
        exclude=exclude,
        exclude_http_methods=[HttpMethod.OPTIONS],
    )


def provide_principal(request: Request[Any, Any, Any]) -> Principal:
    principal: Principal = request.scope["user"]
    return principal


def components() -> Components:
    return Components(
        security_schemes={
            BEARER: SecurityScheme(
                type="http",
                scheme="bearer",
                description="An API key (`sgw_...`) or an OIDC access token of the "
                "configured issuer. Not needed when the gateway runs without "
                "authentication (loopback only).",
            ),
            SLURM_TOKEN: SecurityScheme(
                type="apiKey",
                name="X-SLURM-USER-TOKEN",
                security_scheme_in="header",
                description="The caller's own Slurm JWT (`scontrol token`), where the "
                "gateway accepts them: the caller then acts as its own Slurm user.",
            ),
        }
    )


def requirements() -> list[SecurityRequirement]:
    return [{BEARER: []}, {SLURM_TOKEN: []}]

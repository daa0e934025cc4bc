"""The data path in front of the routes it answers, handed what it needs when built.

The API marks its routes in their ``opt``: ``PROMPT`` for the prompt route
(prompts.py's fast path), ``RELAY`` with the service's path for the /v1 routes
(frontdoor.py). This middleware, the innermost of the app's, answers them
before their handlers; Litestar's routing, exception handlers and
authentication have run by then, so failures raised here get the route's
error shape, and ``scope["user"]`` is the caller.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, cast

from litestar.types import ASGIApp, Receive, Scope, Send

from gateway.proxy.frontdoor import FrontDoor, relay_request
from gateway.proxy.prompts import Prompting, fast_path
from gateway.proxy.responses import relay_stored

PROMPT = "proxy.prompt"
RELAY = "proxy.relay"
# A stored response's routes: to the service that holds it (responses.py).
STORED = "proxy.stored"
# Set by the front (front.py) in a scope it hands to Litestar: the failure that
# Litestar's authentication middleware raises instead of checking the caller
# (api/security.py), or that the prompt goes to its handler.
RAISED = "gateway.front.raised"
TO_HANDLER = "gateway.front.to_handler"


class DataPath(Protocol):
    """Where the data path finds the objects the app makes at start-up."""

    @property
    def prompting(self) -> Prompting: ...

    @property
    def front_door(self) -> FrontDoor: ...


def data_path(wiring: DataPath) -> Callable[[ASGIApp], ASGIApp]:
    """The app middleware that answers the routes marked ``PROMPT`` or ``RELAY``."""

    def middleware(app: ASGIApp) -> ASGIApp:
        async def answer(scope: Scope, receive: Receive, send: Send) -> None:
            handler = scope.get("route_handler")
            opt = handler.opt if handler is not None else {}
            # (RAISED is raised by the authentication middleware, before this one.)
            if TO_HANDLER in cast(dict[str, Any], scope):
                await app(scope, receive, send)
                return
            if PROMPT in opt:
                prompting: Prompting | None = getattr(wiring, "prompting", None)
                if prompting is not None:  # not before the app has started
                    await fast_path(prompting, app, scope, receive, send)
                    return
            elif RELAY in opt:
                await relay_request(wiring.front_door, opt[RELAY], scope, receive, send)
                return
            elif STORED in opt:
                await relay_stored(wiring.front_door, scope, receive, send)
                return
            await app(scope, receive, send)

        return answer

    return middleware

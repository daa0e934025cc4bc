"""The data path's routes answered in front of Litestar.

Every proxied request went through Litestar's exception, routing, metrics,
audit and authentication middleware before the data path (middleware.py)
answered it: a fifth of its CPU (py-spy under wrk, bench/proxy.py). This ASGI
app, between the access log and Litestar, answers the routes the data path
serves (those marked ``PROMPT`` or ``RELAY``, found in the app's routes) when
it can do so exactly as Litestar would: it authenticates the caller with the
same authenticator, counts the request in the same metrics under the same
route template, and runs the same data path.

Anything else goes to Litestar: another route or method, unchanged; a caller
whose credentials do not check out, and every failure raised before the
answer started, marked in the scope (``RAISED``): Litestar's authentication
middleware raises it again instead of checking the caller (a Slurm token is
not checked twice), so that its exception handlers answer in the route's
shape and its middleware count it. Nothing was sent by then; the body was
read already, and is not read again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, cast

from litestar.enums import ScopeType
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from gateway.auth.authenticate import Authenticator
from gateway.metrics import IN_FLIGHT, REQUESTS, series
from gateway.proxy.frontdoor import relay_request
from gateway.proxy.middleware import PROMPT, RAISED, RELAY, TO_HANDLER, DataPath
from gateway.proxy.prompts import fast_path


@dataclass(frozen=True, slots=True)
class _Route:
    template: str  # Litestar's path template: the metrics' label
    relay_to: str | None  # a /v1 route: the service's path
    param: str | None = None  # the prompt route: the name of its one parameter


class Front:
    """``app`` (Litestar) behind the data path's own dispatch of its routes."""

    def __init__(self, app: Any, wiring: DataPath, authenticator: Authenticator) -> None:
        self.app: ASGIApp = app
        self._wiring = wiring
        self._authenticator = authenticator
        self._exact: dict[str, _Route] = {}
        # The prompt route's template split at its parameter: prefix, suffix.
        self._around: list[tuple[str, str, _Route]] = []
        for route in app.routes:
            for handler in getattr(route, "route_handlers", ()):
                if "POST" not in handler.http_methods:
                    continue
                if RELAY in handler.opt and "{" not in route.path_format:
                    self._exact[route.path_format] = _Route(route.path_format, handler.opt[RELAY])
                elif PROMPT in handler.opt and route.path_format.count("{") == 1:
                    before, _, rest = route.path_format.partition("{")
                    name, _, after = rest.partition("}")
                    found = _Route(route.path_format, None, name.partition(":")[0])
                    self._around.append((before, after, found))

    def _route(self, path: str) -> tuple[_Route, str | None] | None:
        route = self._exact.get(path)
        if route is not None:
            return route, None
        for before, after, found in self._around:
            if path.startswith(before) and path.endswith(after):
                value = path[len(before) : len(path) - len(after)]
                if value and "/" not in value:
                    return found, value
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        matched = (
            self._route(scope["path"])
            if scope["type"] == ScopeType.HTTP and scope.get("method") == "POST"
            else None
        )
        if matched is None or getattr(self._wiring, "front_door", None) is None:
            await self.app(scope, receive, send)  # not the data path's, or not started
            return
        route, value = matched
        try:
            principal = await self._authenticator.authenticate_asgi(scope)
        except Exception as exc:
            # Litestar refuses it in the route's shape, without checking again.
            cast(dict[str, Any], scope)[RAISED] = exc
            await self.app(scope, receive, send)
            return
        scope["user"] = principal
        scope["auth"] = principal.method
        scope["path_template"] = route.template
        if route.param is not None and value is not None:
            scope["path_params"] = {route.param: value}
        await self._answer(route, scope, receive, send)

    async def _answer(self, route: _Route, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        status = 0
        handed_on = False

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        async def to_handler(inner: Scope, replay: Receive, send_: Send) -> None:
            # The prompt path passes what it refuses to the route's handler:
            # through Litestar whole, which counts it.
            nonlocal handed_on
            handed_on = True
            cast(dict[str, Any], inner)[TO_HANDLER] = True
            await self.app(inner, replay, send)

        IN_FLIGHT.inc()
        try:
            if route.relay_to is not None:
                await relay_request(
                    self._wiring.front_door, route.relay_to, scope, receive, sending
                )
            else:
                await fast_path(self._wiring.prompting, to_handler, scope, receive, sending)
        except Exception as exc:
            if status or handed_on:
                status = status or 500
                raise  # too late for an error answer: the server cuts the connection
            handed_on = True
            cast(dict[str, Any], scope)[RAISED] = exc
            await self.app(scope, receive, send)
        finally:
            IN_FLIGHT.dec()
            if not handed_on:
                seconds = time.perf_counter() - started
                series(REQUESTS, "POST", route.template, str(status or 500)).observe(seconds)

"""Without client authentication, only the machine's own programs may call.

A gateway serving loopback with no authentication (``make run``) is still
reachable from the user's browser, and so from any web page it opens: a
cross-site form or ``fetch`` may POST ``text/plain`` with no preflight, and a
name rebound to 127.0.0.1 (DNS rebinding) makes the page's own origin the
gateway, answers readable. This guard, in front of everything the app serves
(the prompt fast path and the /v1 relay included, which answer before
Litestar's handlers), refuses what only a browser sends:

* a ``Host`` that is not a loopback name (421): rebinding sends the page's
  name; only where the gateway listens on loopback, since a deliberately
  exposed one (``GATEWAY_ALLOW_UNAUTHENTICATED``) is reached by other names;
* an ``Origin`` that is not a loopback one (403);
* a body that is not ``application/json`` (415): what needs no preflight.

Liveness and readiness answer whatever the Host, for local probes. With
authentication none of this applies: browsers add no credentials of the
gateway's (headers) to a cross-site request.
"""

from __future__ import annotations

import msgspec
from litestar.enums import ScopeType
from litestar.types import ASGIApp, Receive, Scope, Send

from gateway.api.schemas import ProblemResponse

_LOOPBACK_NAMES = frozenset({b"localhost", b"127.0.0.1", b"[::1]"})
_PROBES = frozenset({"/api/v1/health", "/api/v1/ready"})
_BODILESS = frozenset({"GET", "HEAD", "OPTIONS", "DELETE"})
_encode = msgspec.json.Encoder().encode


def _loopback_host(host: bytes) -> bool:
    """``localhost``, ``127.0.0.1`` or ``[::1]``, with or without a port."""
    name, colon, port = host.rpartition(b":")
    if not colon or name.endswith(b":") or host.endswith(b"]"):  # no port: "[::1]"
        name, port = host, b"0"
    return name.lower() in _LOOPBACK_NAMES and port.isdigit()


def _loopback_origin(origin: bytes) -> bool:
    scheme, sep, rest = origin.partition(b"://")
    return bool(sep) and scheme in (b"http", b"https") and _loopback_host(rest)


class LoopbackOnly:
    def __init__(self, app: ASGIApp, *, check_host: bool) -> None:
        self.app = app
        self.check_host = check_host

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await self.app(scope, receive, send)
            return
        headers: dict[bytes, list[bytes]] = {}
        for name, value in scope["headers"]:
            headers.setdefault(name, []).append(value)
        refusal = self._refusal(scope["method"], scope["path"], headers)
        if refusal is None:
            await self.app(scope, receive, send)
            return
        status, title, detail = refusal
        body = _encode(ProblemResponse(status=status, title=title, detail=detail))
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/problem+json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body, "more_body": False})

    def _refusal(
        self, method: str, path: str, headers: dict[bytes, list[bytes]]
    ) -> tuple[int, str, str] | None:
        """Status, title and detail of the refusal, or None. A header sent twice
        passes only if each of its values does."""
        if path in _PROBES and method in ("GET", "HEAD"):
            return None
        hosts = headers.get(b"host", [b""])
        if self.check_host and not all(_loopback_host(host) for host in hosts):
            return (
                421,
                "Misdirected request",
                "this gateway has no client authentication and answers only requests "
                "for localhost, 127.0.0.1 or [::1] (the Host header)",
            )
        if not all(_loopback_origin(origin) for origin in headers.get(b"origin", [])):
            return (
                403,
                "Forbidden",
                "this gateway has no client authentication and refuses requests from web "
                "pages of other origins (the Origin header)",
            )
        has_body = (
            method not in _BODILESS
            or headers.get(b"content-length", [b"0"]) != [b"0"]
            or b"transfer-encoding" in headers
        )
        if has_body and not all(_json(t) for t in headers.get(b"content-type", [b""])):
            return (
                415,
                "Unsupported media type",
                "this gateway has no client authentication and takes request bodies only "
                "as Content-Type: application/json",
            )
        return None


def _json(content_type: bytes) -> bool:
    return content_type.partition(b";")[0].strip().lower() == b"application/json"

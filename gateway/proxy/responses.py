"""``GET /v1/responses/{id}`` and ``POST /v1/responses/{id}/cancel``: to the
service that holds the response (gateway/proxy/response_ids.py)."""

from __future__ import annotations

from typing import cast
from urllib.parse import parse_qs

from litestar.types import HTTPScope, Receive, Scope, Send

from gateway.proxy.frontdoor import FrontDoor, RequestBody
from gateway.proxy.prompts import upstream_failure
from gateway.proxy.response_ids import holding
from gateway.upstream.answers import UpstreamUnavailable
from gateway.upstream.limits import tenant_of

_TRUE = frozenset({"true", "1", "yes", "on"})


async def relay_stored(door: FrontDoor, scope: Scope, receive: Receive, send: Send) -> None:
    """The request, its query string too, to the service that holds the response."""
    response_id: str = scope["path_params"]["response_id"]
    service = await holding(door.router, scope["user"], response_id, None)
    method = cast("HTTPScope", scope)["method"]
    # From the id the route checked (the pattern allows no / or ?), not the
    # request's path, which a root path would prefix.
    path = f"/v1/responses/{response_id}" + ("/cancel" if method == "POST" else "")
    query: bytes = scope.get("query_string", b"")
    if query:
        path += "?" + query.decode("latin-1")
    asked = parse_qs(query.decode("latin-1")).get("stream", [""])[-1]
    stream = asked.lower() in _TRUE
    lease = door.vllm.limits.lease()
    try:
        # A stored response's tokens counted when it was made: not again.
        await door.send_to(
            service, tenant_of(scope["user"]), method, path, RequestBody(b""), lease, stream,
            receive, send, metered=False,
        )  # fmt: skip
    except UpstreamUnavailable as exc:
        raise upstream_failure(service.id, exc) from None
    finally:
        lease.close()

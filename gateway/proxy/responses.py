"""``GET /v1/responses/{id}`` and ``POST /v1/responses/{id}/cancel``: to the
service that holds the response (gateway/proxy/response_ids.py)."""

from __future__ import annotations

from typing import cast

from litestar.types import HTTPScope, Receive, Scope, Send

from gateway.proxy.frontdoor import FrontDoor, RequestBody
from gateway.proxy.response_ids import holding
from gateway.upstream.limits import tenant_of


async def relay_stored(door: FrontDoor, scope: Scope, receive: Receive, send: Send) -> None:
    """The request, its query string too, to the service that holds the response."""
    response_id: str = scope["path_params"]["response_id"]
    service = await holding(door.router, scope["user"], response_id, None)
    path = scope["path"]
    query: bytes = scope.get("query_string", b"")
    if query:
        path += "?" + query.decode("latin-1")
    method = cast("HTTPScope", scope)["method"]
    stream = b"stream=true" in query
    lease = door.vllm.limits.lease()
    try:
        await door.send_to(
            service, tenant_of(scope["user"]), method, path, RequestBody(b""), lease, stream,
            receive, send,
        )  # fmt: skip
    finally:
        lease.close()

"""The prompt route's common case, answered in front of Litestar's handler.

A proxied prompt spent about a quarter of its CPU in the handler machinery
(kwargs and dependency resolution, the signature model, response building):
py-spy under wrk, see bench/proxy.py. This middleware sits on the prompt
route only, after Litestar's routing and exception handling. A well-formed
prompt to a running service it answers itself, with the same decoding
(msgspec, ``PromptRequest``) and the same core calls as the handler; streams
are written chunk by chunk. Everything else (a body that does not decode, a
service that is not running) goes to the handler with the body replayed, so
each answer and error keeps one shape and one place; failures once the
upstream was asked are raised for Litestar's exception handlers, never retried.
The body is read under the replica's memory budget (gateway/upstream/limits.py),
and held on the request's lease until the answer is sent.

Authentication is app middleware, so it has run by the time this does; a
guard on the route would not have (route middleware runs before guards).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

import msgspec
from litestar.types import (
    ASGIApp,
    HTTPRequestEvent,
    HTTPResponseBodyEvent,
    HTTPResponseStartEvent,
    Receive,
    ReceiveMessage,
    Scope,
    Send,
)

from gateway.api.prompting import (
    Prompting,
    complete,
    open_stream,
    prompt_of,
    relay,
    upstream_of,
)
from gateway.api.schemas import PromptRequest
from gateway.core.errors import GatewayError
from gateway.core.services import Service
from gateway.slurm import SlurmError
from gateway.upstream.limits import Lease, tenant_of

# Litestar's request_max_body_size: a body past it goes to the handler, which
# answers 413; read here up to it, so that what is held is on the budget.
_MAX_BODY = 10_000_000
_JSON = [(b"content-type", b"application/json")]
SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),  # as Litestar's Stream sends it
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


def prompt_fast_path(app: ASGIApp) -> ASGIApp:
    async def fast_path(scope: Scope, receive: Receive, send: Send) -> None:
        prompting: Prompting | None = scope["litestar_app"].state.get("prompting")
        if prompting is None:
            await app(scope, receive, send)
            return
        lease = prompting.vllm.limits.lease()
        try:
            await _answer(app, prompting, lease, scope, receive, send)
        finally:
            lease.close()

    return fast_path


async def _answer(
    app: ASGIApp, prompting: Prompting, lease: Lease, scope: Scope, receive: Receive, send: Send
) -> None:
    # Twice the body: the bytes, and the prompt decoded from them.
    body, complete_body = await read_body(receive, scope, _MAX_BODY, lease, weight=2)
    replay = _replaying(body, complete_body, receive)
    if not complete_body:
        await app(scope, replay, send)
        return
    try:
        data = msgspec.json.decode(body, type=PromptRequest)
    except msgspec.MsgspecError:
        await app(scope, replay, send)  # the handler names the bad field
        return
    service_id = str(scope["path_params"]["service_id"])
    try:
        # The caller authenticated already (app middleware, outside this
        # one); it sees only its own services here as in the handler.
        service = await prompting.services.running(service_id, scope["user"], kind="vllm")
    except (GatewayError, SlurmError):
        await app(scope, replay, send)  # no side effect yet: the handler says why
        return
    tenant = tenant_of(scope["user"])
    if data.stream:
        await _stream(prompting, service_id, service, data, lease, tenant, receive, send)
        return
    done = await complete(prompting.vllm, service_id, service, data, lease, tenant)
    answer = msgspec.json.encode(done)
    start: HTTPResponseStartEvent = {
        "type": "http.response.start",
        "status": 200,
        "headers": [*_JSON, (b"content-length", str(len(answer)).encode())],
    }
    await send(start)
    end: HTTPResponseBodyEvent = {
        "type": "http.response.body",
        "body": answer,
        "more_body": False,
    }
    await send(end)


async def _stream(
    prompting: Prompting,
    service_id: str,
    service: Service,
    data: PromptRequest,
    lease: Lease,
    tenant: str | None,
    receive: Receive,
    send: Send,
) -> None:
    upstream = upstream_of(service)
    # A refusal before the first chunk raises here, for Litestar's handlers.
    first, chunks = await open_stream(
        prompting.vllm, service_id, upstream, prompt_of(service, data), lease, tenant
    )
    await send_stream(relay(first, chunks), chunks, receive, send, SSE_HEADERS)


async def send_stream(
    body: AsyncGenerator[bytes, None],
    chunks: AsyncGenerator[bytes, None],
    receive: Receive,
    send: Send,
    headers: list[tuple[bytes, bytes]],
    status: int = 200,
) -> None:
    """``body`` (the relay of the upstream's ``chunks``) written chunk by chunk
    as it comes; a client that goes away closes the upstream at once (vLLM
    then aborts the request)."""

    async def pump() -> None:
        start: HTTPResponseStartEvent = {
            "type": "http.response.start",
            "status": status,
            "headers": headers,
        }
        await send(start)
        async for chunk in body:
            more: HTTPResponseBodyEvent = {
                "type": "http.response.body",
                "body": chunk,
                "more_body": True,
            }
            await send(more)
        end: HTTPResponseBodyEvent = {"type": "http.response.body", "body": b"", "more_body": False}
        await send(end)

    async def gone() -> None:
        # The body was read whole: what comes next is the client leaving.
        while (await receive())["type"] != "http.disconnect":
            pass

    pumping = asyncio.ensure_future(pump())
    watching = asyncio.ensure_future(gone())
    try:
        await asyncio.wait((pumping, watching), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (pumping, watching):
            task.cancel()
        await asyncio.gather(pumping, watching, return_exceptions=True)
        await body.aclose()
        await chunks.aclose()  # also when the relay never started
    if pumping.done() and not pumping.cancelled() and pumping.exception() is not None:
        # Not a client that left: a failure the relay did not turn into an
        # error event. Raised, so that it is logged and the connection ends.
        raise pumping.exception()  # type: ignore[misc]


async def read_body(
    receive: Receive,
    scope: Scope,
    limit: int = _MAX_BODY,
    lease: Lease | None = None,
    weight: int = 1,
) -> tuple[bytes | bytearray, bool]:
    """The request body, and whether it is all of it (not past ``limit``),
    ``weight`` times its size taken from the memory budget on ``lease``
    (OverBudget past it).

    Most bodies come in one piece, taken as it is. One in pieces goes into one
    buffer (pieces joined, or a buffer grown, took up to three times the body),
    made at once at its declared size (Content-Length), which is taken from
    the budget before more of it is read."""
    message = await receive()
    if message["type"] != "http.request":
        return b"", False  # a disconnect: the handler sees it too
    first = message.get("body", b"")
    if lease is not None:
        lease.take(weight * len(first))
    if not message.get("more_body", False) or len(first) > limit:
        return first, len(first) <= limit
    size = taken = len(first)
    declared = _declared_length(scope)
    if declared is None or not size < declared <= limit:
        declared = size
    elif lease is not None:
        lease.take(weight * (declared - size))
        taken = declared
    body = bytearray(declared)
    body[:size] = first
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return body[:size], False
        chunk = message.get("body", b"")
        if lease is not None and size + len(chunk) > taken:
            lease.take(weight * (size + len(chunk) - taken))
            taken = size + len(chunk)
        # In place while the buffer has room; past it, the buffer grows.
        body[size : size + len(chunk)] = chunk
        size += len(chunk)
        if size > limit:
            return body, False
        if not message.get("more_body", False):
            del body[size:]  # if less came than was declared
            return body, True


def _declared_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None


def _replaying(body: bytes | bytearray, whole: bool, receive: Receive) -> Receive:
    """``receive`` with what was read from it given back first."""
    given = False

    async def replay() -> ReceiveMessage:
        nonlocal given
        if not given:
            given = True
            first: HTTPRequestEvent = {
                "type": "http.request",
                "body": bytes(body),
                "more_body": not whole,
            }
            return first
        return await receive()

    return replay

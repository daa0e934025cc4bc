"""The prompt route's common case, answered in front of Litestar's handler.

A proxied prompt spent about a quarter of its CPU in the handler machinery
(kwargs and dependency resolution, the signature model, response building):
py-spy under wrk, see bench/proxy.py. This middleware sits on the prompt
route only, after Litestar's routing and exception handling, and answers a
well-formed, non-streamed prompt to a running service itself, with the same
decoding (msgspec, ``PromptRequest``) and the same core call (``complete``) as
the handler. Everything else (a body that does not decode, a stream, a
service that is not running) goes to the handler with the body replayed, so
each answer and error keeps one shape and one place; failures after the
upstream call are raised for Litestar's exception handlers, never retried.

Whatever guards the route (authentication, when it comes) must run here too:
a middleware on the route runs before them otherwise.
"""

from __future__ import annotations

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

from gateway.api.prompting import Prompting, complete
from gateway.api.schemas import PromptRequest
from gateway.core.errors import GatewayError
from gateway.slurm import SlurmError

# Bodies beyond this go to the handler (which applies Litestar's own limit).
_MAX_BODY = 1 << 20
_JSON = [(b"content-type", b"application/json")]


def prompt_fast_path(app: ASGIApp) -> ASGIApp:
    async def fast_path(scope: Scope, receive: Receive, send: Send) -> None:
        body, complete_body = await _read(receive)
        replay = _replaying(body, complete_body, receive)
        prompting: Prompting | None = scope["litestar_app"].state.get("prompting")
        if not complete_body or prompting is None:
            await app(scope, replay, send)
            return
        try:
            data = msgspec.json.decode(body, type=PromptRequest)
        except msgspec.MsgspecError:
            await app(scope, replay, send)  # the handler names the bad field
            return
        service_id = str(scope["path_params"]["service_id"])
        if data.stream:
            await app(scope, replay, send)
            return
        try:
            service = await prompting.services.running(service_id, kind="vllm")
        except (GatewayError, SlurmError):
            await app(scope, replay, send)  # no side effect yet: the handler says why
            return
        answer = msgspec.json.encode(await complete(prompting.vllm, service_id, service, data))
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

    return fast_path


async def _read(receive: Receive) -> tuple[bytes, bool]:
    """The request body, and whether it is all of it (not past ``_MAX_BODY``)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks), False  # a disconnect: the handler sees it too
        chunk = message.get("body", b"")
        chunks.append(chunk)
        size += len(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks), True
        if size > _MAX_BODY:
            return b"".join(chunks), False


def _replaying(body: bytes, whole: bool, receive: Receive) -> Receive:
    """``receive`` with what was read from it given back first."""
    given = False

    async def replay() -> ReceiveMessage:
        nonlocal given
        if not given:
            given = True
            first: HTTPRequestEvent = {"type": "http.request", "body": body, "more_body": not whole}
            return first
        return await receive()

    return replay

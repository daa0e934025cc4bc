"""The OpenAI front door's data path: a request for a model, relayed as it came.

This middleware answers ``POST /v1/chat/completions``, ``/v1/completions`` and
``/v1/embeddings`` in front of their (documenting) handlers, for the reason
the prompt route has a fast path (fastpath.py): Litestar's handler machinery
was a quarter of a proxied request's CPU. Only ``model`` is read from the
body; the body goes to the chosen service byte for byte, and its answer comes
back byte for byte (streams chunk by chunk). Failures are raised for the
route's exception handlers, which answer in OpenAI's error shape.

Authentication is app middleware and has run by now: ``scope["user"]``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
import msgspec
from litestar.types import (
    ASGIApp,
    HTTPResponseBodyEvent,
    HTTPResponseStartEvent,
    Receive,
    Scope,
    Send,
)

from gateway.api.fastpath import SSE_HEADERS, read_body, send_stream
from gateway.api.prompting import count_usage, relay, upstream_failure
from gateway.auth.principal import Principal
from gateway.core.errors import GatewayError
from gateway.core.routing import ModelRouter
from gateway.core.services import Service
from gateway.metrics import PROMPT_FIRST_BYTE, PROMPTS, series
from gateway.upstream.vllm import (
    LARGE_ANSWER,
    UpstreamError,
    UpstreamUnavailable,
    VllmClient,
    iter_chunks,
    message_of,
    read_all,
)

# Longer contexts and embedding batches than the prompt route's 1 MiB.
MAX_BODY = 32 * 1024 * 1024
SERVICE_HEADER = b"x-gateway-service-id"
# vLLM's error statuses the client gets as they are.
PASSED_ON = frozenset({400, 404, 422, 429, 500, 503})
_JSON = (b"content-type", b"application/json")


class BadRequest(GatewayError):
    """A /v1 body the relay cannot route (OpenAI answers these 400)."""

    status_code = 400
    title = "Bad request"

    def __init__(self, detail: str, *, param: str | None = None, status: int = 400) -> None:
        super().__init__(detail)
        self.param = param
        self.status_code = status


class UpstreamAnswer(GatewayError):
    """vLLM's own error answer, passed on with its status and message."""

    title = "The service answered with an error"

    def __init__(self, status: int, detail: str, kind: str | None) -> None:
        super().__init__(detail)
        # Passed on where they are the request's (or vLLM's load's) business; a
        # 401 or 403 is about the key, which is the gateway's: those, and
        # anything else undocumented, are a bad gateway.
        self.status_code = status if status in PASSED_ON else 502
        self.kind = kind if self.status_code == status else None


class _Head(msgspec.Struct):
    """What routing reads of a body; the rest is skipped, never built."""

    model: str | None = None


_read_head = msgspec.json.Decoder(_Head).decode


class _UpstreamError(msgspec.Struct):
    type: str | None = None


class _UpstreamErrorBody(msgspec.Struct):
    error: _UpstreamError | str | None = None
    type: str | None = None  # vLLM before 0.6 put it at the top


_read_error = msgspec.json.Decoder(_UpstreamErrorBody).decode


@dataclass(slots=True)
class FrontDoor:
    """What the /v1 routes need, as one object in the app's state."""

    router: ModelRouter
    vllm: VllmClient
    # Service id -> the longest context vLLM reports for its model.
    _context: dict[str, int | None] = field(default_factory=dict)

    async def max_model_len(self, service: Service, model: str) -> int | None:
        """From the request's ``VLLM_MAX_MODEL_LEN``, else vLLM's own model
        list (asked once per service)."""
        configured = service.config.environment.get("VLLM_MAX_MODEL_LEN")
        if configured and configured.isdigit():
            return int(configured)
        upstream = service.upstream
        if upstream is None:
            return None
        if service.id in self._context:
            return self._context[service.id]
        try:
            cards = await self.vllm.model_cards(upstream.url, upstream.key)
        except (UpstreamError, UpstreamUnavailable):
            return None  # asked again next time
        found = next((c.max_model_len for c in cards if c.id == model), None)
        if len(self._context) > 4096:
            self._context.clear()
        self._context[service.id] = found
        return found

    async def forward(
        self, principal: Principal, model: str, path: str, body: bytes, receive: Receive, send: Send
    ) -> None:
        service = await self.router.pick(principal, model)
        try:
            await self._once(service, path, body, receive, send)
        except UpstreamUnavailable as exc:
            if not exc.unsent:
                raise upstream_failure(service.id, exc) from None
            # Nothing reached it: another service of the model may take it, once.
            assert service.upstream is not None
            self.router.eject(service.upstream)
            try:
                other = await self.router.pick(principal, model, avoid=service.upstream.url)
            except GatewayError:
                raise upstream_failure(service.id, exc) from None
            try:
                await self._once(other, path, body, receive, send)
            except UpstreamUnavailable as again:
                if again.unsent:
                    assert other.upstream is not None
                    self.router.eject(other.upstream)
                raise upstream_failure(other.id, again) from None

    async def _once(
        self, service: Service, path: str, body: bytes, receive: Receive, send: Send
    ) -> None:
        upstream = service.upstream
        assert upstream is not None  # the router picks running services only
        with self.router.outstanding(upstream):
            started = time.perf_counter()
            response = await self.vllm.forward(upstream.url, path, body, upstream.key)
            headers = [(SERVICE_HEADER, service.id.encode())]
            if response.status >= 400:
                series(PROMPTS, "false", "upstream_error").inc()
                try:
                    answer = await read_all(response)
                except UpstreamError:
                    raise UpstreamAnswer(502, "vLLM's error answer is over 1 MiB", None) from None
                raise UpstreamAnswer(
                    answer.status, message_of(answer.content, answer.status), _kind(answer.content)
                )
            if response.content_type == "text/event-stream":
                await self._stream(response, started, headers, receive, send)
                return
            try:
                answer = await read_all(response, LARGE_ANSWER)
            except UpstreamError as exc:
                series(PROMPTS, "false", "upstream_error").inc()
                raise UpstreamAnswer(502, exc.message, None) from None
            except UpstreamUnavailable:
                series(PROMPTS, "false", "unreachable").inc()
                raise
            series(PROMPT_FIRST_BYTE, "false").observe(time.perf_counter() - started)
            series(PROMPTS, "false", "ok").inc()
            count_usage(answer.content)
            start: HTTPResponseStartEvent = {
                "type": "http.response.start",
                "status": answer.status,
                "headers": [_JSON, (b"content-length", b"%d" % len(answer.content)), *headers],
            }
            await send(start)
            end: HTTPResponseBodyEvent = {
                "type": "http.response.body",
                "body": answer.content,
                "more_body": False,
            }
            await send(end)

    @staticmethod
    async def _stream(
        response: aiohttp.ClientResponse,
        started: float,
        headers: list[tuple[bytes, bytes]],
        receive: Receive,
        send: Send,
    ) -> None:
        chunks = iter_chunks(response)
        try:
            first = await anext(chunks)
        except StopAsyncIteration:
            first = b""
        except UpstreamUnavailable:
            await chunks.aclose()
            series(PROMPTS, "true", "unreachable").inc()
            raise
        series(PROMPT_FIRST_BYTE, "true").observe(time.perf_counter() - started)
        await send_stream(relay(first, chunks), chunks, receive, send, [*SSE_HEADERS, *headers])


def _kind(content: bytes) -> str | None:
    try:
        body = _read_error(content)
    except msgspec.DecodeError:
        return None
    if isinstance(body.error, _UpstreamError):
        return body.error.type
    return body.type


def relay_to(path: str) -> Callable[[ASGIApp], ASGIApp]:
    """The middleware that relays a route's requests to ``path`` of a service."""

    def middleware(app: ASGIApp) -> ASGIApp:
        async def relay_request(scope: Scope, receive: Receive, send: Send) -> None:
            door: FrontDoor = scope["litestar_app"].state.front_door
            body, whole = await read_body(receive, MAX_BODY)
            if not whole:
                if len(body) <= MAX_BODY:
                    return  # the client left before sending it all
                raise BadRequest(f"the body is over {MAX_BODY // (1024 * 1024)} MiB", status=413)
            try:
                model = _read_head(body).model
            except msgspec.ValidationError as exc:
                raise BadRequest(
                    f"the body is not an OpenAI request: {exc}", param="model"
                ) from None
            except msgspec.DecodeError as exc:
                raise BadRequest(f"the body is not JSON: {exc}") from None
            if not model:
                raise BadRequest("model: required; GET /v1/models lists them", param="model")
            await door.forward(scope["user"], model, path, body, receive, send)

        return relay_request

    return middleware

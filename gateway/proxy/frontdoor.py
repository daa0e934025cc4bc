"""The OpenAI front door's data path: a request for a model, relayed as it came.

``relay_request`` answers ``POST /v1/chat/completions``, ``/v1/completions``
and ``/v1/embeddings`` in front of their (documenting) handlers (middleware.py),
for the reason the prompt route has a fast path (prompts.py): Litestar's handler machinery
was a quarter of a proxied request's CPU. Only ``model`` (and ``stream``) is
read from the body; the body goes to the chosen service byte for byte, and its
answer comes back byte for byte as it arrives, never held whole (streams
chunk by chunk). Failures are raised for the route's exception handlers,
which answer in OpenAI's error shape; one after the answer has started
(vLLM breaking off) cuts the connection, which the client sees as an
incomplete answer.

Each request holds a lease (gateway/upstream/limits.py): its body on the
memory budget until the service has it, and a slot at the service for its
tenant until the answer ends.

Authentication is app middleware and has run by now: ``scope["user"]``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Annotated

import msgspec
import structlog
from litestar.types import Receive, Scope, Send

from gateway.auth.authenticate import ANTHROPIC_PREFIX
from gateway.core.affinity import prefix_key
from gateway.core.errors import GatewayError
from gateway.core.principal import Principal
from gateway.core.routing import ModelRouter
from gateway.core.services import Service
from gateway.metrics import PROMPT_FIRST_BYTE, PROMPTS, series
from gateway.proxy.asgi import (
    JSON,
    SSE_HEADERS,
    WAIT_BODY_MAX,
    header,
    prefer_wait,
    read_body,
    send_stream,
    send_whole,
)
from gateway.proxy.multipart import boundary_of, form_fields
from gateway.proxy.prompts import upstream_failure
from gateway.proxy.response_ids import CREATE_PATH, holding, new_id, stamped
from gateway.proxy.sse import count_usage, passed_on, relay
from gateway.proxy.wire import MODEL_MAX_LENGTH
from gateway.upstream.answers import (
    UpstreamError,
    UpstreamUnavailable,
    error_kind,
    iter_answer,
    iter_chunks,
    message_of,
    read_all,
)
from gateway.upstream.limits import Lease, tenant_of
from gateway.upstream.pool import Response
from gateway.upstream.vllm import LARGE_ANSWER, VllmClient

log = structlog.get_logger(__name__)

# Longer contexts and embedding batches than the prompt route's 1 MiB.
MAX_BODY = 32 * 1024 * 1024
SERVICE_HEADER = b"x-gateway-service-id"
# vLLM's error statuses the client gets as they are.
PASSED_ON = frozenset({400, 404, 422, 429, 500, 503})


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

    model: Annotated[str, msgspec.Meta(max_length=MODEL_MAX_LENGTH)] | None = None
    # Raw: whatever it is, never decoded (vLLM says if it is not a boolean).
    stream: msgspec.Raw = msgspec.Raw(b"false")
    # Raw too: only their first bytes are read, for the prefix key (chat, completions).
    messages: msgspec.Raw = msgspec.Raw()
    prompt: msgspec.Raw = msgspec.Raw()
    # The Responses API: a response whose service the request must reach.
    previous_response_id: str | None = None


class RequestBody:
    """The body, until the service has it: then dropped and its bytes given
    back to the budget, as a stream may last long after."""

    __slots__ = ("data",)

    def __init__(self, data: bytes | bytearray) -> None:
        self.data = data

    def drop(self, lease: Lease) -> None:
        lease.give(len(self.data))
        self.data = b""


_read_head = msgspec.json.Decoder(_Head).decode


@dataclass(slots=True)
class FrontDoor:
    """What the /v1 routes and their data path need, as one object."""

    router: ModelRouter
    vllm: VllmClient
    # GATEWAY_ROUTING_PREFIX_AFFINITY: requests that start alike to one service.
    prefix_affinity: bool = True
    # Service id -> the longest context vLLM reports for its model.
    _context: dict[str, int | None] = field(default_factory=dict)

    async def max_model_len(self, service: Service) -> int | None:
        """From the request (the recipe's ``max_model_len_variable``), else
        vLLM's own model list (asked once per service): its base model's,
        which its LoRA adapters share."""
        configured = service.max_model_len
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
        found = next((c.max_model_len for c in cards if c.id == service.served_model), None)
        if len(self._context) > 4096:
            self._context.clear()
        self._context[service.id] = found
        return found

    async def forward(
        self,
        principal: Principal,
        model: str,
        path: str,
        body: RequestBody,
        lease: Lease,
        receive: Receive,
        send: Send,
        *,
        stream: bool = False,
        affinity: bytes | None = None,
        wait: float = 0.0,
        previous: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        """``body`` to a service of ``model`` and its answer to the client, on
        ``lease`` (whose bytes hold the body, given back once it is sent);
        ``affinity``: the key of its prefix (gateway/core/affinity.py). A new
        response (``path``: the Responses API) is named for its service, and
        goes to the service of its ``previous`` one (gateway/proxy/response_ids.py)."""
        tenant = tenant_of(principal)
        naming = path == CREATE_PATH
        if previous is not None and naming:
            service = await holding(self.router, principal, previous, model)
        else:
            service = await self.router.pick(principal, model, affinity=affinity, wait=wait)
        if naming:
            body.data = stamped(body.data, new_id(service.id))
        try:
            await self.send_to(
                service, tenant, "POST", path, body, lease, stream, receive, send, headers
            )
        except UpstreamUnavailable as exc:
            if not exc.unsent or (previous is not None and naming):
                raise upstream_failure(service.id, exc) from None
            # Nothing reached it: another service of the model may take it, once.
            assert service.upstream is not None
            self.router.eject(service.upstream)
            try:
                other = await self.router.pick(
                    principal, model, avoid=service.upstream.url, affinity=affinity
                )
            except GatewayError:
                raise upstream_failure(service.id, exc) from None
            if naming:  # named again: JSON's last duplicate wins
                body.data = stamped(body.data, new_id(other.id))
            try:
                await self.send_to(
                    other, tenant, "POST", path, body, lease, stream, receive, send, headers
                )
            except UpstreamUnavailable as again:
                if again.unsent:
                    assert other.upstream is not None
                    self.router.eject(other.upstream)
                raise upstream_failure(other.id, again) from None

    async def send_to(
        self,
        service: Service,
        tenant: str | None,
        method: str,
        path: str,
        body: RequestBody,
        lease: Lease,
        stream: bool,
        receive: Receive,
        send: Send,
        passed: dict[str, str] | None = None,
        *,
        metered: bool = True,
    ) -> None:
        """``body`` to ``service`` and its answer to the client; ``passed``:
        headers of the client's that vLLM is to see; ``metered``: whether the
        answer's tokens count (not when it repeats a stored answer's)."""
        upstream = service.upstream
        assert upstream is not None  # the router picks running services only
        await lease.admit(upstream.url, tenant)
        try:
            with self.router.outstanding(upstream):
                started = time.perf_counter()
                response, deadline = await self.vllm.forward(
                    upstream.url, path, body.data, upstream.key, stream, method, passed
                )
                body.drop(lease)  # it has reached the service: never sent again
                headers = [(SERVICE_HEADER, service.id.encode())]
                if response.status >= 400:
                    series(PROMPTS, "false", "upstream_error").inc()
                    try:
                        answer = await read_all(response, lease=lease, deadline=deadline)
                    except UpstreamError:
                        raise UpstreamAnswer(
                            502, "vLLM's error answer is over 1 MiB", None
                        ) from None
                    raise UpstreamAnswer(
                        answer.status,
                        message_of(answer.content, answer.status),
                        error_kind(answer.content),
                    )
                if response.content_type == "text/event-stream":
                    await self._stream(response, deadline, started, headers, receive, send, metered)
                else:
                    await self._pass(response, deadline, started, headers, receive, send, metered)
        finally:
            lease.leave()

    @staticmethod
    async def _pass(
        response: Response,
        deadline: float,
        started: float,
        headers: list[tuple[bytes, bytes]],
        receive: Receive,
        send: Send,
        metered: bool,
    ) -> None:
        """A whole answer, passed on as it arrives: never held whole."""
        length = response.content_length
        if length is not None and length > LARGE_ANSWER:
            response.close()
            series(PROMPTS, "false", "upstream_error").inc()
            raise UpstreamAnswer(502, f"vLLM answered more than {LARGE_ANSWER} bytes", None)
        chunks = iter_answer(response, LARGE_ANSWER, deadline)
        try:
            first = await anext(chunks)
        except StopAsyncIteration:
            first = b""
        except UpstreamError as exc:
            series(PROMPTS, "false", "upstream_error").inc()
            raise UpstreamAnswer(502, exc.message, None) from None
        except UpstreamUnavailable as exc:
            series(PROMPTS, "false", "timeout" if exc.timeout else "unreachable").inc()
            raise
        series(PROMPT_FIRST_BYTE, "false").observe(time.perf_counter() - started)
        if length is not None:
            headers.append((b"content-length", b"%d" % length))
            if len(first) == length:
                # The usual answer, whole in one read: sent as it is, without
                # the machinery of a stream (two tasks a request).
                async for _ in chunks:
                    pass  # its end: the connection goes back to the pool
                if metered:
                    count_usage(first)
                series(PROMPTS, "false", "ok").inc()
                await send_whole(send, response.status, [JSON, *headers], first)
                return
        try:
            await send_stream(
                passed_on(first, chunks, metered=metered),
                chunks,
                receive,
                send,
                [JSON, *headers],
                response.status,
            )
        except (UpstreamError, UpstreamUnavailable) as exc:
            # Too late for an error answer: returning without its end makes
            # the server close the connection, so the client sees it cut short.
            log.warning("upstream_answer_cut_off", reason=str(exc))

    @staticmethod
    async def _stream(
        response: Response,
        deadline: float,
        started: float,
        headers: list[tuple[bytes, bytes]],
        receive: Receive,
        send: Send,
        metered: bool,
    ) -> None:
        chunks = iter_chunks(response, deadline)
        try:
            first = await anext(chunks)
        except StopAsyncIteration:
            first = b""
        except UpstreamUnavailable as exc:
            await chunks.aclose()
            series(PROMPTS, "true", "timeout" if exc.timeout else "unreachable").inc()
            raise
        series(PROMPT_FIRST_BYTE, "true").observe(time.perf_counter() - started)
        await send_stream(
            relay(first, chunks, metered=metered), chunks, receive, send, [*SSE_HEADERS, *headers]
        )


async def relay_request(
    door: FrontDoor, path: str, scope: Scope, receive: Receive, send: Send
) -> None:
    """A /v1 request relayed to ``path`` of a service of its model, on a lease
    of its own."""
    lease = door.vllm.limits.lease()
    try:
        await _relay(door, path, lease, scope, receive, send)
    finally:
        lease.close()


async def _relay(
    door: FrontDoor, path: str, lease: Lease, scope: Scope, receive: Receive, send: Send
) -> None:
    data, whole = await read_body(receive, scope, MAX_BODY, lease)
    if not whole:
        if len(data) <= MAX_BODY:
            return  # the client left before sending it all
        raise BadRequest(f"the body is over {MAX_BODY // (1024 * 1024)} MiB", status=413)
    passed: dict[str, str] | None = None
    key = previous = None
    content_type = (header(scope, b"content-type") or b"").decode("latin-1")
    boundary = boundary_of(content_type)
    if boundary is not None:  # a form (audio): passed on with its boundary
        fields = form_fields(data, boundary)
        model, stream = fields.get("model"), fields.get("stream", "").lower() == "true"
        passed = {"Content-Type": content_type}
    else:
        model, stream, key, previous = _json_head(door, data, scope)
    if not model:
        raise BadRequest("model: required; GET /v1/models lists them", param="model")
    if path.startswith(ANTHROPIC_PREFIX):
        passed = _anthropic_headers(scope)
    body = RequestBody(data)
    del data  # only ``body`` holds it now, and drops it once the service has it
    await door.forward(
        scope["user"],
        model,
        path,
        body,
        lease,
        receive,
        send,
        stream=stream,
        affinity=key,
        previous=previous,
        headers=passed,
        # A waiting request holds its body: only small ones may wait.
        wait=prefer_wait(scope) if len(body.data) <= WAIT_BODY_MAX else 0.0,
    )


def _json_head(
    door: FrontDoor, data: bytes | bytearray, scope: Scope
) -> tuple[str | None, bool, bytes | None, str | None]:
    """A JSON body's model, stream flag, prefix key and previous response."""
    try:
        head = _read_head(data)
    except msgspec.ValidationError as exc:
        # msgspec ends its message with where: "... - at `$.model`".
        _, at, where = str(exc).rpartition("at `$.")
        where = where.rstrip("`") if at else "model"
        raise BadRequest(f"the body is not an OpenAI request: {exc}", param=where) from None
    except msgspec.DecodeError as exc:
        raise BadRequest(f"the body is not JSON: {exc}") from None
    stream = len(head.stream) == 4 and bytes(head.stream) == b"true"
    shared_start = head.messages or head.prompt
    key = (
        prefix_key(shared_start, tenant_of(scope["user"]))
        if door.prefix_affinity and shared_start
        else None
    )
    return head.model, stream, key, head.previous_response_id


def _anthropic_headers(scope: Scope) -> dict[str, str]:
    """Anthropic's version and beta headers, which its API reads, as sent."""
    return {
        name.decode("latin-1"): value.decode("latin-1")
        for name, value in scope["headers"]
        if name in (b"anthropic-version", b"anthropic-beta")
    }

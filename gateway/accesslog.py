"""One JSON line per request on stdout, and the request's id.

uvicorn's access log goes through the logging module (and Litestar's queue
handler and its thread): 0.15 to 0.2 ms of a proxied prompt's 0.5 ms, measured
with bench/proxy.py. This writes the same facts (client, method, path,
status, duration) straight to the stream, as JSON like every other line. No
body, header or query value is written: they may hold prompts or keys.

Each request gets an id the gateway chose (16 random hex digits), followed by
the caller's ``X-Request-ID`` when it sent a plain one (``<ours>-<theirs>``):
two requests never share an id, whatever callers send, and a caller still
finds its own. The caller's part is also written alone (``client_request_id``).
The id is sent back in the answer, bound to every log line of the request
(structlog's contextvars) and sent to the service (vLLM) with the prompt, so
one request can be followed through the gateway and vLLM.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any, TextIO

import msgspec
import structlog
from litestar.enums import ScopeType
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from gateway.requestid import REQUEST_ID

HEADER = b"x-request-id"
# The caller's part: what no log or header reader can mistake, bounded.
_TOKEN = re.compile(rb"[A-Za-z0-9._:-]{1,64}")
_encode = msgspec.json.Encoder().encode


class AccessLog:
    def __init__(
        self, app: ASGIApp, out: TextIO | None = None, *, write: bool = True, batch: float = 0.0
    ) -> None:
        """``batch``: seconds lines may wait to be written together (0: at once).
        One write and flush per request is a syscall each (the image runs with
        PYTHONUNBUFFERED=1), a visible share of a proxied prompt's CPU."""
        self.app = app
        self.out = out or sys.stdout
        self.write = write
        self.batch = batch
        self._pending: list[bytes] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            kind: str = scope["type"]  # Litestar's Scope type leaves lifespan out
            if kind == "lifespan":
                send = self._draining_at_shutdown(send)
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        path = scope["path"]  # as sent: Litestar normalises the scope's own
        request_id, theirs = _request_id(scope)
        status = 0

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), (HEADER, request_id.encode())]
            await send(message)

        token = REQUEST_ID.set(request_id)
        bound = structlog.contextvars.bind_contextvars(request_id=request_id)
        try:
            await self.app(scope, receive, sending)
        finally:
            structlog.contextvars.reset_contextvars(**bound)
            REQUEST_ID.reset(token)
            if self.write and not (path in _PROBED and 0 < status < 400 and _kubelet(scope)):
                seconds = time.perf_counter() - started
                self._line(scope, path, status, request_id, theirs, seconds)

    def _line(
        self,
        scope: Scope,
        path: str,
        status: int,
        request_id: str,
        theirs: str | None,
        seconds: float,
    ) -> None:
        client = scope.get("client")
        line = {
            "event": "access",
            "client": f"{client[0]}:{client[1]}" if client else None,
            "method": scope.get("method"),
            "path": path,  # JSON-escaped: a newline in it cannot forge a line
            "http_version": scope["http_version"],
            "status": status or None,
            "duration_ms": round(seconds * 1000, 3),
            "request_id": request_id,
            "client_request_id": theirs,
            "level": "info",
            "timestamp": datetime.now(tz=UTC).isoformat().replace("+00:00", "Z"),
        }
        if not self.batch:
            self._pending.append(_encode(line))
            self.drain()
            return
        if not self._pending:
            asyncio.get_running_loop().call_later(self.batch, self.drain)
        self._pending.append(_encode(line))

    def drain(self) -> None:
        """Writes the lines waiting, in one write."""
        if not self._pending:
            return
        text = b"\n".join(self._pending).decode() + "\n"
        self._pending.clear()
        with contextlib.suppress(OSError, ValueError):  # a closed stdout
            self.out.write(text)
            self.out.flush()

    def _draining_at_shutdown(self, send: Send) -> Send:
        async def sending(message: Any) -> None:
            if message["type"] == "lifespan.shutdown.complete":
                self.drain()
            await send(message)

        return sending


# The kubelet's probes that pass: two lines every few seconds per pod, which
# say nothing. A failing probe is written.
_PROBED = frozenset({"/api/v1/health", "/api/v1/ready"})


def _kubelet(scope: Scope) -> bool:
    for name, value in scope["headers"]:
        if name == b"user-agent":
            return value.startswith(b"kube-probe/")
    return False


def _fresh_ids() -> Iterator[str]:
    """Random ids of 16 hex digits, read from the kernel 256 at a time (one
    read a request was 3 % of a proxied request's CPU)."""
    while True:
        block = secrets.token_hex(8 * 256)
        for start in range(0, len(block), 16):
            yield block[start : start + 16]


_IDS = _fresh_ids()


def _request_id(scope: Scope) -> tuple[str, str | None]:
    """The request's id, and the caller's own when it sent a usable one."""
    ours = next(_IDS)
    for name, value in scope["headers"]:
        if name == HEADER:
            if _TOKEN.fullmatch(value):
                theirs = value.decode()
                return f"{ours}-{theirs}", theirs
            break
    return ours, None

"""The app's data path in this loop, in front of upstream stubs: settings,
a client of its routes, a client straight into its ASGI app, and the checks
of OpenAI's error shape (the /v1, limits and memory tests share them)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

import httpx
from litestar import Litestar
from litestar.types import HTTPDisconnectEvent, HTTPRequestEvent, Message, ReceiveMessage

from gateway.app import create_app, served
from gateway.core.services import Service
from gateway.settings import Settings
from tests.support.app import TENANTS, app_client, stub_settings
from tests.support.http_stub import Seen, Stub, http_stub, response
from tests.support.relay_server import given

ROOT = Path(__file__).resolve().parents[2]
TEAM_A = {"Authorization": "Bearer sgw_local-team-a-key"}
TEAM_B = {"Authorization": "Bearer sgw_local-team-b-key"}
CHAT = "/v1/chat/completions"
COMPLETION = {
    "object": "chat.completion",
    "choices": [{"message": {"role": "assistant", "content": "hi"}}],
    "usage": {"prompt_tokens": 7, "completion_tokens": 11, "total_tokens": 18},
}


def openai_error(answer: httpx.Response, status: int) -> dict[str, Any]:
    """The answer's error, checked to be in OpenAI's shape, which its SDKs read."""
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"].startswith("application/json")
    body = answer.json()
    assert set(body) == {"error"}, body
    error: dict[str, Any] = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    return error


def settings_with(tmp_path: Path, **env: str) -> Settings:
    """Settings for the data path: Slurm never asked, deploy/local/tenants.toml's keys."""
    return stub_settings(tmp_path, **{"auth_file": TENANTS, **env})


class Gateway:
    def __init__(self, app: Litestar, client: httpx.AsyncClient) -> None:
        self.app = app
        self.client = client

    async def chat(self, who: dict[str, str], model: str, **more: Any) -> httpx.Response:
        body = json.dumps({"model": model, "messages": [], **more}).encode()
        headers = {"Content-Type": "application/json", **who}
        return await self.client.post(CHAT, content=body, headers=headers)

    async def prompt(self, who: dict[str, str], sid: str, **more: Any) -> httpx.Response:
        body = {"prompt": "hi", **more}
        return await self.client.post(f"/api/v1/vllm/{sid}/prompt", json=body, headers=who)


@asynccontextmanager
async def gateway(
    settings: Settings, *services: Service, front: bool = True
) -> AsyncIterator[Gateway]:
    """The app in this loop, its data path built from ``settings``, served as
    in production (the access log, the front: gateway/proxy/front.py); with
    ``front=False`` the bare Litestar app, whose own data path middleware
    answers the same routes."""
    app = create_app(settings)
    given(app, list(services))
    limits = httpx.Limits(max_connections=None)
    outer = served(app, settings) if front else None
    # A loopback name: without authentication the web-page guard refuses others.
    where = "http://127.0.0.1:8001"
    async with app_client(app, outer, base_url=where, timeout=60, limits=limits) as client:
        yield Gateway(app, client)


@asynccontextmanager
async def hanging(trickle: float | None = None) -> AsyncIterator[tuple[Stub, asyncio.Event]]:
    """A service that takes connections and requests and never answers (until
    the event is set, at the end of the test), or with ``trickle`` starts to,
    a byte of its headers every so many seconds, which no per-read timeout
    ends. Its own server: the attack opens thousands of connections at once,
    past http_stub's backlog."""
    release = asyncio.Event()
    stub = Stub("")

    async def dribble(writer: asyncio.StreamWriter, every: float) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
        while not release.is_set():
            await writer.drain()
            await asyncio.sleep(every)
            writer.write(b"x")

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                int(line.split(b":")[1])
                for line in head.lower().split(b"\r\n")
                if line.startswith(b"content-length")
            )
            stub.seen.append(Seen("POST", "", await reader.readexactly(length)))
            if trickle is not None:
                await dribble(writer, trickle)
            await release.wait()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, backlog=8192)
    stub.port = server.sockets[0].getsockname()[1]
    stub.url = f"http://127.0.0.1:{stub.port}"
    try:
        yield stub, release
    finally:
        release.set()
        server.close()


def healthy() -> Any:
    async def answer(seen: Seen, writer: asyncio.StreamWriter) -> None:
        writer.write(response(200, COMPLETION))

    return http_stub(answer)


class AsgiClient:
    """One POST straight into the app, each body event recorded as it is sent."""

    def __init__(self, app: Litestar, path: str, body: bytes) -> None:
        self.app = app
        self.path = path
        self.body = body
        self.start: dict[str, Any] = {}
        self.bodies: list[bytes] = []
        self._sent = False
        self._done = asyncio.Event()

    async def run(self) -> None:
        headers = [
            (b"host", b"gateway.test"),
            (b"content-type", b"application/json"),
            (b"content-length", b"%d" % len(self.body)),
            *((k.lower().encode(), v.encode()) for k, v in TEAM_A.items()),
        ]
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": self.path,
            "raw_path": self.path.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": headers,
            "client": ("127.0.0.1", 50000),
            "server": ("gateway.test", 80),
            "state": {},
        }
        await self.app(cast(Any, scope), self._receive, self._send)

    async def _receive(self) -> ReceiveMessage:
        if not self._sent:
            self._sent = True
            request: HTTPRequestEvent = {
                "type": "http.request",
                "body": self.body,
                "more_body": False,
            }
            return request
        await self._done.wait()  # the client stays until the answer is complete
        gone: HTTPDisconnectEvent = {"type": "http.disconnect"}
        return gone

    async def _send(self, message: Message) -> None:
        event = cast(dict[str, Any], message)
        if event["type"] == "http.response.start":
            self.start = event
        elif event.get("body"):
            self.bodies.append(event["body"])
        if event["type"] == "http.response.body" and not event.get("more_body", False):
            self._done.set()

    @property
    def status(self) -> int:
        return int(self.start["status"])

    @property
    def complete(self) -> bool:
        """The answer ended as answers do (not cut off)."""
        return self._done.is_set()

    @property
    def headers(self) -> dict[bytes, bytes]:
        return dict(self.start["headers"])


def closed_port() -> str:
    """A loopback URL nothing listens on: connections are refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"

"""The access log: one line per request, with no query values or bodies."""

from __future__ import annotations

import io

from litestar.types import Receive, Scope, Send

from gateway.accesslog import AccessLog


async def test_one_line_per_request_without_query_or_body() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 409, "headers": []})
        await send({"type": "http.response.body", "body": b"secret answer", "more_body": False})

    out = io.StringIO()
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/api/v1/vllm/7/prompt",
        "query_string": b"key=hunter2",
        "http_version": "1.1",
        "client": ("10.1.2.3", 4567),
    }

    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": b'{"prompt": "my secret"}'}

    sent: list[object] = []

    async def send(message: object) -> None:
        sent.append(message)

    await AccessLog(app, out)(scope, receive, send)  # type: ignore[arg-type]
    assert out.getvalue() == 'access: 10.1.2.3:4567 "POST /api/v1/vllm/7/prompt HTTP/1.1" 409\n'
    assert len(sent) == 2


async def test_a_path_cannot_forge_a_log_line() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 404, "headers": []})

    out = io.StringIO()
    scope = {
        "type": "http",
        "method": "GET",
        "path": '/x\naccess: 10.0.0.1:1 "POST /admin HTTP/1.1" 200',
        "http_version": "1.1",
        "client": ("10.1.2.3", 4567),
    }

    async def receive() -> dict[str, object]:
        return {"type": "http.disconnect"}

    async def send(message: object) -> None:
        pass

    await AccessLog(app, out)(scope, receive, send)  # type: ignore[arg-type]
    assert out.getvalue().count("\n") == 1
    assert "%0Aaccess" in out.getvalue()

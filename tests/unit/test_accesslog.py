"""The access log: one JSON line per request, with no query values or bodies,
and the request id given back and bound to the request's log lines."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

import pytest
import structlog
from litestar.types import Receive, Scope, Send

from gateway.accesslog import AccessLog
from gateway.app import create_app, served
from tests.support.app import app_client, stub_settings
from tests.support.polling import poll


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
        "headers": [],
        "http_version": "1.1",
        "client": ("10.1.2.3", 4567),
    }

    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": b'{"prompt": "my secret"}'}

    sent: list[object] = []

    async def send(message: object) -> None:
        sent.append(message)

    await AccessLog(app, out)(scope, receive, send)  # type: ignore[arg-type]
    line = json.loads(out.getvalue())
    assert {k: line[k] for k in ("event", "client", "method", "path", "status")} == {
        "event": "access",
        "client": "10.1.2.3:4567",
        "method": "POST",
        "path": "/api/v1/vllm/7/prompt",
        "status": 409,
    }
    assert "hunter2" not in out.getvalue()
    assert "secret" not in out.getvalue()
    assert len(sent) == 2


async def test_a_path_cannot_forge_a_log_line() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 404, "headers": []})

    out = io.StringIO()
    scope = {
        "type": "http",
        "method": "GET",
        "path": '/x\n{"event": "access", "path": "/admin", "status": 200}',
        "headers": [],
        "http_version": "1.1",
        "client": ("10.1.2.3", 4567),
    }

    async def receive() -> dict[str, object]:
        return {"type": "http.disconnect"}

    async def send(message: object) -> None:
        pass

    await AccessLog(app, out)(scope, receive, send)  # type: ignore[arg-type]
    assert out.getvalue().count("\n") == 1
    assert json.loads(out.getvalue())["path"] == scope["path"]


async def test_the_request_id_is_the_gateways_then_the_callers() -> None:
    seen: list[object] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(structlog.contextvars.get_contextvars().get("request_id"))
        await send({"type": "http.response.start", "status": 200, "headers": []})

    async def receive() -> dict[str, object]:
        return {"type": "http.disconnect"}

    sent: list[dict[str, object]] = []

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    for given, kept in (
        (b"trace-42.a:b", "trace-42.a:b"),
        (b"bad id\r\nx: y", None),  # not a plain token: left out
        (b"x" * 65, None),  # longer than 64
        (None, None),
    ):
        out = io.StringIO()
        sent.clear()

        headers = [(b"x-request-id", given)] if given else []
        scope = {"type": "http", "method": "GET", "path": "/", "headers": headers,
                 "http_version": "1.1", "client": None}  # fmt: skip
        await AccessLog(app, out)(scope, receive, send)  # type: ignore[arg-type]
        returned = dict(sent[0]["headers"])[b"x-request-id"].decode()  # type: ignore[call-overload]
        line = json.loads(out.getvalue())
        assert line["request_id"] == returned == seen[-1]
        assert line["client_request_id"] == kept
        ours = returned[:16]
        assert re.fullmatch("[0-9a-f]{16}", ours), returned
        assert returned == (f"{ours}-{kept}" if kept else ours)
    assert structlog.contextvars.get_contextvars().get("request_id") is None


async def test_two_requests_sending_one_request_id_get_two(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A client choosing its X-Request-ID must not make two requests look like
    one in the log (nor pass its request off as another's): the real app as
    served, the same id sent twice."""
    settings = stub_settings(tmp_path)
    app = create_app(settings)
    async with app_client(app, served(app, settings), base_url="http://127.0.0.1:8001") as api:
        answers = [
            await api.get("/api/v1/recipes", headers={"X-Request-ID": "victims-id-1"})
            for _ in range(2)
        ]

        async def access_lines() -> list[dict[str, Any]]:
            out = capsys.readouterr().out.splitlines()
            lines = [json.loads(x) for x in out if x.startswith("{")]
            found.extend(x for x in lines if x.get("event") == "access")
            return found

        found: list[dict[str, Any]] = []
        logged = await poll(access_lines, lambda x: len(x) == 2, timeout=5, interval=0.02)
    given = [a.headers["x-request-id"] for a in answers]
    in_log = [x["request_id"] for x in logged]
    print(f"\none X-Request-ID sent twice: ids {in_log}")
    assert len(set(in_log)) == 2 and in_log == given
    assert all(x.endswith("-victims-id-1") for x in in_log)
    assert [x["client_request_id"] for x in logged] == ["victims-id-1"] * 2


async def test_passing_kubelet_probes_are_not_written_failing_ones_are() -> None:
    def answering(status: int) -> AccessLog:
        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            await send({"type": "http.response.start", "status": status, "headers": []})
            await send({"type": "http.response.body", "body": b"{}", "more_body": False})

        return AccessLog(app, out)  # type: ignore[arg-type]

    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": b""}

    async def send(message: object) -> None:
        pass

    def request(path: str, agent: bytes) -> dict[str, object]:
        return {
            "type": "http",
            "method": "GET",
            "path": path,
            "headers": [(b"user-agent", agent)],
            "http_version": "1.1",
            "client": ("10.0.0.9", 1),
        }

    out = io.StringIO()
    probe = b"kube-probe/1.31"
    await answering(200)(request("/api/v1/ready", probe), receive, send)  # type: ignore[arg-type]
    await answering(200)(request("/api/v1/health", probe), receive, send)  # type: ignore[arg-type]
    assert out.getvalue() == ""
    await answering(503)(request("/api/v1/ready", probe), receive, send)  # type: ignore[arg-type]
    await answering(200)(request("/api/v1/ready", b"curl/8"), receive, send)  # type: ignore[arg-type]
    await answering(200)(request("/api/v1/recipes", probe), receive, send)  # type: ignore[arg-type]
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(x["path"], x["status"]) for x in lines] == [
        ("/api/v1/ready", 503),
        ("/api/v1/ready", 200),
        ("/api/v1/recipes", 200),
    ]


async def test_batched_lines_come_in_one_write_and_all_before_shutdown_completes() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"{}", "more_body": False})
        else:  # lifespan: straight to shutdown
            await send({"type": "lifespan.shutdown.complete"})  # type: ignore[typeddict-item]

    class Writes(io.StringIO):
        calls = 0

        def write(self, text: str) -> int:
            Writes.calls += 1
            return super().write(text)

    out = Writes()
    log = AccessLog(app, out, batch=0.05)  # type: ignore[arg-type]

    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": b""}

    async def send(message: object) -> None:
        pass

    def request(n: int) -> dict[str, object]:
        return {
            "type": "http",
            "method": "GET",
            "path": f"/api/v1/services/{n}",
            "headers": [],
            "http_version": "1.1",
            "client": ("127.0.0.1", 1),
        }

    for n in range(3):
        await log(request(n), receive, send)  # type: ignore[arg-type]
    assert out.getvalue() == ""  # waiting for the batch

    async def written() -> int:
        return len(out.getvalue().splitlines())

    assert await poll(written, lambda n: n == 3, timeout=2, interval=0.01) == 3
    assert Writes.calls == 1
    await log(request(3), receive, send)  # type: ignore[arg-type]
    await log({"type": "lifespan"}, receive, send)  # type: ignore[arg-type]
    paths = [json.loads(line)["path"] for line in out.getvalue().splitlines()]
    assert paths == [f"/api/v1/services/{n}" for n in range(4)]

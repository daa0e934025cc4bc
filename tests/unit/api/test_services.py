"""``GET /api/v1/services/{id}/logs?follow=true`` through the real app: the
Server-Sent Events a client reads, the bound of followers as a 429, and a
client that leaves ending its follow. Slurm is the in-memory scheduler
(tests/support/services.py), the job's files are in a temporary folder."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from litestar.types import Message

from gateway.app import create_app
from gateway.core import joblogs, logfollow
from gateway.core.services import ServiceManager
from gateway.slurm import JobState
from tests.support.app import app_client, stub_settings
from tests.support.services import CODEC, blob, fake_manager, job_info

NAME = f"gw-testing-http-{CODEC.job_tag}-7"
LOGS = "/api/v1/services/7/logs"


@pytest.fixture(autouse=True)
def fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logfollow, "FOLLOW_POLL_SECONDS", 0.01)


class Gateway:
    def __init__(self, app: Any, client: httpx.AsyncClient, services: ServiceManager) -> None:
        self.app = app
        self.client = client
        self.services = services

    @property
    def followers(self) -> joblogs.Followers:
        return self.services.log_reader.followers


@asynccontextmanager
async def gateway(tmp_path: Path, state: JobState) -> AsyncIterator[Gateway]:
    """The app without authentication (the caller: tenant "local", gwuser's
    services), its services those of the in-memory scheduler, where service 7
    is ``state`` and writes to ``tmp_path/gwuser``."""
    (tmp_path / "gwuser").mkdir()
    services, fake = fake_manager(job_dir="/cluster/{user}", path_map=[("/cluster", str(tmp_path))])
    fake.put(
        job_info(
            7,
            blob(),
            state,
            user_id=os.getuid(),
            standard_output=f"/cluster/gwuser/{NAME}.out",
            standard_error=f"/cluster/gwuser/{NAME}.err",
        )
    )
    app = create_app(stub_settings(tmp_path))
    async with app_client(app) as client:
        app.state.provided.services = services
        yield Gateway(app, client, services)
    await services.prober.aclose()


def parse(stream: str) -> list[tuple[str, str]]:
    """(event, data) of each event; ("", text) for a comment."""
    events = []
    for block in stream.split("\n\n"):
        if not block:
            continue
        fields = dict(line.split(": ", 1) for line in block.split("\n"))
        events.append((fields.get("event", ""), fields.get("data", fields.get("", ""))))
    return events


async def test_a_follow_streams_each_line_as_an_event_and_ends_with_the_service(
    tmp_path: Path,
) -> None:
    async with gateway(tmp_path, JobState.COMPLETED) as gw:
        (tmp_path / "gwuser" / f"{NAME}.out").write_text("one\ndata: two\n\nthree")
        (tmp_path / "gwuser" / f"{NAME}.err").write_text("oops\r\n")
        response = await gw.client.get(LOGS, params={"follow": "true", "tail": "5"})
        plain = await gw.client.get(LOGS)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache"
    events = parse(response.text)
    assert events[0] == ("", "following the logs of service 7")
    assert events[1:-1] == [
        ("stdout", "one"),
        ("stdout", "data: two"),  # a line's own text, not a field of the event
        ("stdout", ""),
        ("stdout", "three"),
        ("stderr", "oops"),
    ]
    assert events[-1][0] == "end"
    assert json.loads(events[-1][1]) == {
        "status": "completed",
        "reason": "the service exited normally",
    }
    assert plain.json()["stdout"] == "one\ndata: two\n\nthree"  # without follow: as before
    assert gw.followers.held() == 0


async def test_followers_over_the_tenants_bound_are_429_with_retry_after(
    tmp_path: Path,
) -> None:
    async with gateway(tmp_path, JobState.RUNNING) as gw:
        held = [gw.followers.admit("local") for _ in range(joblogs.FOLLOWERS_PER_TENANT)]
        refused = await gw.client.get(LOGS, params={"follow": "true"})
        assert refused.status_code == 429
        assert refused.headers["retry-after"] == str(joblogs.FOLLOWERS_RETRY_AFTER_SECONDS)
        problem = refused.json()
        assert problem["limit"] == "log_followers"
        assert "already follows 8 logs" in problem["detail"]
        # A plain read of the logs is no follow: not held back.
        assert (await gw.client.get(LOGS)).status_code in (200, 404)
        for slot in held:
            slot.release()


async def test_a_follow_of_an_unknown_service_is_404_and_a_bad_flag_422(tmp_path: Path) -> None:
    async with gateway(tmp_path, JobState.RUNNING) as gw:
        response = await gw.client.get("/api/v1/services/8/logs", params={"follow": "true"})
        assert response.status_code == 404
        bad = await gw.client.get(LOGS, params={"follow": "maybe"})
        assert bad.status_code == 422, bad.text
        assert [e["field"] for e in bad.json()["errors"]] == ["follow"]
        assert gw.followers.held() == 0


async def test_a_client_that_leaves_ends_its_follow(tmp_path: Path) -> None:
    """The ASGI app called as the server calls it: once the client has gone
    (http.disconnect), the answer ends, the follow's place is given back and
    nothing reads the files any more."""
    async with gateway(tmp_path, JobState.RUNNING) as gw:
        out = tmp_path / "gwuser" / f"{NAME}.out"
        out.write_text("first\n")
        leave = asyncio.Event()
        sent: list[Message] = []

        async def receive() -> Message:
            await leave.wait()
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            sent.append(message)
            if b"event: stdout" in message.get("body", b""):
                leave.set()  # the client has seen a line, and goes

        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": LOGS,
            "raw_path": LOGS.encode(),
            "query_string": b"follow=true",
            "root_path": "",
            "headers": [(b"host", b"gateway.test")],
            "client": ("127.0.0.1", 123),
            "server": ("gateway.test", 80),
            "state": {},
        }
        await asyncio.wait_for(gw.app(scope, receive, send), 5)
        assert sent[0]["type"] == "http.response.start"
        assert sent[0]["status"] == 200
        assert gw.followers.held() == 0
        # The job goes on writing; nobody reads it any more.
        before = msgspec.json.encode(sent)
        out.write_text("first\nsecond\n")
        await asyncio.sleep(0.1)
        assert msgspec.json.encode(sent) == before
        assert gw.followers.held() == 0

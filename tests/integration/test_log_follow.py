"""Following a service's logs on every local cluster: from pending, each
phase's lines as the job writes them, and the end of the stream when the
service is stopped (GET /api/v1/services/{id}/logs?follow=true)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import httpx

from gateway.testing.clusters import LocalCluster
from tests.support.clusters import TIMINGS
from tests.support.gateway_per_cluster import *  # noqa: F403 - its fixtures
from tests.support.live_services import Services

# The walker's pace: what it writes in one phase comes seconds before the next.
BUILD_SECONDS = 3
START_SECONDS = 3


class Follow:
    """A follow read as it arrives: each event with the time it came."""

    def __init__(self) -> None:
        self.events: list[tuple[float, str, str]] = []
        self.comments: list[str] = []
        self.changed = asyncio.Event()

    async def read(self, api: httpx.AsyncClient, sid: str) -> int:
        async with api.stream(
            "GET", f"/api/v1/services/{sid}/logs", params={"follow": "true"}, timeout=120
        ) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            event = ""
            async for line in response.aiter_lines():
                if line.startswith(":"):
                    self.comments.append(line)
                elif line.startswith("event: "):
                    event = line.removeprefix("event: ")
                elif line.startswith("data: "):
                    self.events.append((time.monotonic(), event, line.removeprefix("data: ")))
                    event = ""
                self.changed.set()
            return response.status_code

    async def until(self, found: str, timeout: float = 60) -> float:
        """When the first line holding ``found`` came (waiting for it)."""
        async with asyncio.timeout(timeout):
            while True:
                for at, _, data in self.events:
                    if found in data:
                        return at
                self.changed.clear()
                await self.changed.wait()

    def lines(self, stream: str) -> list[str]:
        return [data for _, event, data in self.events if event == stream]


async def test_a_follow_from_pending_shows_each_phase_and_ends_when_stopped(
    api: httpx.AsyncClient, services: Services, cluster_of: LocalCluster
) -> None:
    message = f"follow-{uuid.uuid4().hex[:8]}"
    # A create with an Idempotency-Key waits a few seconds before it may start
    # (its job's begin time): pending, with no blocker holding the node.
    created = await api.post(
        "/api/v1/services",
        json={
            "recipe_name": "testing/http",
            "config": {
                "environment": {
                    "MESSAGE": message,
                    "BUILD_SECONDS": str(BUILD_SECONDS),
                    "START_SECONDS": str(START_SECONDS),
                }
            },
        },
        headers={"Idempotency-Key": message},
    )
    assert created.status_code == 201, created.text
    sid = created.json()["id"]
    services.ids.append(sid)
    follow = Follow()
    began = time.monotonic()
    reading = asyncio.ensure_future(follow.read(api, sid))
    try:
        async with asyncio.timeout(10):
            while not follow.comments:
                follow.changed.clear()
                await follow.changed.wait()
        # The follow is open, and the service has not started.
        assert (await services.status(sid))["status"] == "pending"
        assert follow.events == [], "lines of a service that is still pending"

        building = await follow.until("gateway: phase building")
        said = await follow.until(f"message from environment: {message}")
        starting = await follow.until("gateway: phase starting (warming up)")
        serving = await follow.until("serving on port")
        published = await follow.until("gateway: endpoint ")
        # Each phase's lines came as they were written, seconds apart, not at
        # the end. (Lines of stdout and stderr read in one poll come stdout
        # first; the first ones wait until the job view has seen the job start,
        # up to a listing later; later ones up to a poll.)
        assert max(building, said) + BUILD_SECONDS - 2 <= starting
        assert starting + START_SECONDS - 1 <= serving <= published
        stdout = follow.lines("stdout")
        assert stdout[0] == f"message from environment: {message}"
        assert stdout[1].startswith("serving on port")
        assert follow.lines("stderr")[:2] == [
            "gateway: phase building",
            "gateway: phase starting (warming up)",
        ]
        await services.wait(sid, "running")
        assert not reading.done(), "the follow ended while the service runs"

        stopped = time.monotonic()
        assert (await api.delete(f"/api/v1/services/{sid}")).status_code == 200
        assert await asyncio.wait_for(reading, 30) == 200
        ended = time.monotonic()
    finally:
        reading.cancel()
    _, event, data = follow.events[-1]
    assert event == "end", follow.events[-3:]
    assert json.loads(data)["status"] == "cancelled"
    assert [e for _, e, _ in follow.events].count("error") == 0, follow.events
    TIMINGS.append(
        f"log follow | {cluster_of.name} | {len(follow.events) - 1} lines over "
        f"{ended - began:.1f} s | phases {starting - said:.1f} s, {serving - starting:.1f} s "
        f"apart | end {ended - stopped:.1f} s after the stop"
    )

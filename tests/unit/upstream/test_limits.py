"""The data path's share-out through the real app (gateway/upstream/limits.py,
gateway/proxy/): what one hostile or slow upstream, or one tenant, can
hold, in front of real upstream servers on 127.0.0.1.

The app is the one ``create_app`` builds, with its settings (deploy/local/
tenants.toml's keys: team-a and team-b are two tenants); only its running
services are given (tests/support/relay_server.py), so no Slurm is involved.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.settings import Settings, SettingsError
from tests.support.front_door import (
    CHAT,
    COMPLETION,
    TEAM_A,
    TEAM_B,
    AsgiClient,
    gateway,
    hanging,
    healthy,
    openai_error,
    settings_with,
)
from tests.support.http_stub import Seen, Stub, http_stub, response
from tests.support.polling import poll
from tests.support.services import service


async def timed(request: Any) -> tuple[float, int]:
    started = time.monotonic()
    try:
        status = (await request).status_code
    except httpx.HTTPError:
        status = 0
    return time.monotonic() - started, status


# -- one upstream cannot hold the pool, one tenant cannot take it all ---------------


async def test_a_service_that_never_finishes_an_answer_cannot_keep_others_waiting(
    tmp_path: Path,
) -> None:
    """The attack as found: team-a sends more requests than the whole pool
    (4,096) to its service that starts to answer and never ends (its headers
    a byte every 0.5 s); team-b's prompt to its healthy service must not wait
    for a connection. The bad service holds only its share, its requests end
    at the deadline, and the rest are refused at once."""
    # Long enough for the pool to fill before the first requests end (10 s was
    # not, once, in a full run: the stub had read 784 of the 1,024 it was sent).
    deadline = 20.0
    # This loop is the clients' too: on a busy machine their 4,100 requests hold
    # it past the default 3 s connect timeout, which would end connections the
    # kernel made at once (the shares are the subject here, not that timeout).
    settings = settings_with(tmp_path, vllm_timeout=str(deadline), vllm_connect_timeout="15")
    attack = 4096 + 4
    async with (
        hanging(trickle=0.5) as (bad, release),
        healthy() as good,
        gateway(
            settings, service("1", "bad", url=bad.url), service("2", "good", url=good.url)
        ) as gw,
    ):
        sent = time.monotonic()
        # Sent a few hundred at a time: this loop is the client's too, and
        # 4,100 requests started in one of its turns held it ~3 s, past the
        # 3 s connect timeout of connections the kernel had long made.
        requests = []
        for n in range(attack):
            requests.append(asyncio.create_task(timed(gw.chat(TEAM_A, "bad"))))
            if n % 128 == 127:
                await asyncio.sleep(0)
        # Saturated: the bad service has every request it will get, the
        # others are answered.
        await poll(
            lambda: _now(len(bad.seen) + sum(r.done() for r in requests)),
            lambda n: n >= attack or len(bad.seen) >= 4096,  # all, or the whole pool
            timeout=30,
            interval=0.05,
            what="the bad service saturated",
        )
        waited, status = await timed(gw.chat(TEAM_B, "good"))
        held = len(bad.seen)
        # Each ends by its deadline (the wait bounds this test, not the gateway).
        finished, _ = await asyncio.wait(requests, timeout=deadline + 5)
        ended = [r.result() if r in finished else (math.inf, -1) for r in requests]
        release.set()
    statuses = sorted({s for _, s in ended})
    print(f"\nteam-a's answers: {[(s, sum(1 for _, x in ended if x == s)) for s in statuses]}")
    print(
        f"team-b's prompt waited {waited * 1000:.0f} ms (answer {status}) while team-a's "
        f"trickling service held {held} connections ({attack} requests sent)"
    )
    assert status == 200
    assert waited < 1.0
    # Its share, not the pool: what reached it (the stub may still be reading
    # some) and, exactly, what was held until the deadline (below).
    assert held <= settings.vllm_max_per_service
    deadlined = [t for t, s in ended if s == 504]
    refused = [t for t, s in ended if s == 429]
    print(
        f"team-a: {len(deadlined)} requests ended 504 at the {deadline:.0f} s deadline "
        f"(longest {max(deadlined):.2f} s), {len(refused)} refused 429 "
        f"(longest {max(refused):.2f} s); all over {time.monotonic() - sent:.1f} s"
    )
    assert len(deadlined) == settings.vllm_max_per_service
    assert len(refused) == attack - len(deadlined)
    assert all(deadline - 0.5 < t < deadline + 3 for t in deadlined)
    assert max(refused) < settings.vllm_queue_seconds + 3


async def _now(value: int) -> int:
    return value


def trickling(interval: float, hung_up: asyncio.Event) -> Any:
    """A service that answers at once and then sends one byte every ``interval``
    seconds, which no per-read timeout ever ends; ``hung_up`` once the
    gateway closed the connection."""

    async def answer(seen: Seen, writer: asyncio.StreamWriter) -> None:
        streamed = b'"stream": true' in seen.body
        kind = b"text/event-stream" if streamed else b"application/json"
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\nContent-Length: 100000\r\n\r\n" % kind
        )
        try:
            for _ in range(100000):
                writer.write(b"\n" if streamed else b" ")
                await writer.drain()
                await asyncio.sleep(interval)
        except ConnectionError:
            hung_up.set()
            raise

    return http_stub(answer)


@pytest.mark.parametrize("stream", [False, True])
async def test_a_trickling_service_is_cut_off_at_the_deadline(tmp_path: Path, stream: bool) -> None:
    """A whole answer gets GATEWAY_VLLM_TIMEOUT in all, a stream
    GATEWAY_VLLM_STREAM_TIMEOUT: a byte every 0.1 s holds neither longer."""
    settings = settings_with(tmp_path, vllm_timeout="1.5", vllm_stream_timeout="3")
    deadline = 3.0 if stream else 1.5
    hung_up = asyncio.Event()
    async with trickling(0.1, hung_up) as up, gateway(settings, service("1", url=up.url)) as gw:
        body = json.dumps({"model": "m", "stream": stream}).encode()
        client = AsgiClient(gw.app, CHAT, body)
        started = time.monotonic()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(client.run(), deadline + 5)
        took = time.monotonic() - started
        # The upstream connection is closed too (vLLM would abort the request).
        await asyncio.wait_for(hung_up.wait(), 2)
    print(f"\na trickled {'stream' if stream else 'answer'} ended after {took:.2f} s")
    assert client.status == 200
    assert deadline - 0.2 < took < deadline + 1.5
    if stream:
        # A stream ends with an error event, as any stream vLLM breaks off.
        assert client.complete
        assert b"event: error" in client.bodies[-1]
        assert b"ran out of time" in client.bodies[-1]
    else:
        assert not client.complete  # cut off: the client sees an incomplete answer


# -- refusals: who is told what ---------------------------------------------------


async def test_over_its_share_a_tenant_gets_429_and_a_full_service_503(tmp_path: Path) -> None:
    settings = settings_with(
        tmp_path, vllm_max_per_service="2", vllm_max_per_tenant="3", vllm_queue_seconds="0.2"
    )
    async with (
        hanging() as (one, _),
        hanging() as (other, _),
        gateway(settings, service("1", url=one.url), service("2", "n", url=other.url)) as gw,
    ):
        held = [asyncio.create_task(gw.chat(TEAM_A, "m")) for _ in range(2)]
        held.append(asyncio.create_task(gw.chat(TEAM_A, "n")))
        await poll(lambda: _now(len(one.seen) + len(other.seen)), (3).__eq__, interval=0.02)
        started = time.monotonic()
        full = await gw.chat(TEAM_B, "m")  # team-b is under its share; service 1 is full
        waited = time.monotonic() - started
        over = await gw.chat(TEAM_A, "n")  # service 2 has room; team-a does not
        prompt_over = await gw.prompt(TEAM_A, "2")
        prompt_full = await gw.prompt(TEAM_B, "1")
        for task in held:
            task.cancel()
        await asyncio.gather(*held, return_exceptions=True)
    error = openai_error(full, 503)
    assert (error["code"], error["type"]) == ("upstream_full", "service_unavailable_error")
    assert full.headers["retry-after"] == "1"
    assert 0.2 <= waited < 1  # it waited a moment for a slot
    error = openai_error(over, 429)
    assert (error["code"], error["type"]) == ("tenant_over_share", "rate_limit_error")
    assert over.headers["retry-after"] == "1"
    # The prompt route answers in the gateway's own shape (problem details).
    for got, status in ((prompt_over, 429), (prompt_full, 503)):
        assert got.status_code == status, got.text
        assert got.headers["content-type"].startswith("application/problem+json")
        assert got.headers["retry-after"] == "1"
        assert got.json()["status"] == status
    assert len(one.seen) == 2 and len(other.seen) == 1  # the refused never reached one


async def test_a_request_waits_a_moment_for_a_slot_that_frees(tmp_path: Path) -> None:
    settings = settings_with(tmp_path, vllm_max_per_service="1", vllm_queue_seconds="2")
    gate = asyncio.Event()

    async def slow(seen: Seen, writer: asyncio.StreamWriter) -> None:
        if len(up.seen) == 1:
            await gate.wait()
        writer.write(response(200, COMPLETION))

    async with http_stub(slow) as up, gateway(settings, service("1", url=up.url)) as gw:
        first = asyncio.create_task(gw.chat(TEAM_A, "m"))
        await poll(lambda: _now(len(up.seen)), (1).__eq__, interval=0.02)
        second = asyncio.create_task(gw.chat(TEAM_B, "m"))
        await asyncio.sleep(0.3)
        assert len(up.seen) == 1  # the second waits for the slot
        gate.set()
        answers = await asyncio.gather(first, second)
    assert [a.status_code for a in answers] == [200, 200]


async def asked_while_held(
    settings: Settings, held: list[tuple[dict[str, str], str]], who: dict[str, str], model: str
) -> tuple[httpx.Response, Stub]:
    """The answer to ``who``'s request for ``model`` once the ``held`` requests
    (caller, model) have reached the services, service 1 of "m" and service 2
    of "n", neither ever answering; and service 2's stub."""
    async with (
        hanging() as (one, _),
        hanging() as (other, _),
        gateway(settings, service("1", url=one.url), service("2", "n", url=other.url)) as gw,
    ):
        tasks = [asyncio.create_task(gw.chat(caller, name)) for caller, name in held]
        await poll(lambda: _now(len(one.seen) + len(other.seen)), len(held).__eq__, interval=0.02)
        answer = await gw.chat(who, model)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return answer, other


async def test_no_authentication_gives_the_one_caller_the_whole_replica(tmp_path: Path) -> None:
    """Loopback without keys: one anonymous caller, no tenant share (the
    service cap still holds)."""
    settings = settings_with(
        tmp_path,
        auth_file="",
        vllm_max_per_service="2",
        vllm_max_per_tenant="2",
        vllm_queue_seconds="0.1",
    )
    held: list[tuple[dict[str, str], str]] = [({}, model) for model in ("m", "m", "n", "n")]
    full, _ = await asked_while_held(settings, held, {}, "m")
    assert openai_error(full, 503)["code"] == "upstream_full"


async def test_a_full_replica_refuses_503_whoever_asks(tmp_path: Path) -> None:
    settings = settings_with(
        tmp_path,
        vllm_max_connections="2",
        vllm_max_per_service="2",
        vllm_max_per_tenant="2",
        vllm_queue_seconds="0.1",
    )
    # Two on service 1, then another service, for a tenant under its share.
    full, other = await asked_while_held(settings, [(TEAM_A, "m"), (TEAM_B, "m")], TEAM_B, "n")
    error = openai_error(full, 503)
    assert error["code"] == "overloaded"
    assert full.headers["retry-after"] == "1"
    assert other.seen == []


@pytest.mark.parametrize("variable", ["vllm_max_per_service", "vllm_max_per_tenant"])
def test_a_share_larger_than_the_replica_stops_start_up(tmp_path: Path, variable: str) -> None:
    shares = {"vllm_max_per_service": "100", "vllm_max_per_tenant": "100", variable: "101"}
    with pytest.raises(SettingsError, match=f"GATEWAY_{variable.upper()}: must not exceed"):
        settings_with(tmp_path, vllm_max_connections="100", **shares)

"""Graceful stop: on SIGTERM the gateway keeps serving but answers not-ready for
GATEWAY_SHUTDOWN_DRAIN_SECONDS, then closes its listener (new connections are
refused), lets open streams finish for up to GATEWAY_SHUTDOWN_GRACE_SECONDS,
cuts what is left, and exits 0; with one server process and with several.

One cluster is enough (c2205): what is under test is the gateway process. The
upstream is the OpenAI-shaped stub recipe, sending one token every 150 ms.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway.testing.clusters import LocalCluster, discover
from tests.support.clusters import TIMINGS
from tests.support.gateway_process import GatewayProcess
from tests.support.polling import poll

CLUSTER = "c2205"
TOKEN_MS = 150  # STUB_CHUNK_DELAY_MS: a stream of n tokens lasts n x 150 ms


@pytest.fixture(scope="module")
def c2205() -> LocalCluster:
    found = [c for c in discover() if c.name == CLUSTER]
    if not found:  # a missing cluster is a failure, never a silent skip
        raise pytest.UsageError(f"no local cluster {CLUSTER}; run `make cluster` first")
    return found[0]


@pytest.fixture(scope="module")
def stub(c2205: LocalCluster) -> Iterator[str]:
    """A running testing/openai-stub service, started (and cancelled at the end)
    through a gateway of its own that the tests do not stop."""
    with GatewayProcess(c2205) as keeper, httpx.Client(base_url=keeper.url, timeout=30) as api:
        environment = {"STUB_CHUNK_DELAY_MS": str(TOKEN_MS)}
        created = api.post(
            "/api/v1/services",
            json={"recipe_name": "testing/openai-stub", "config": {"environment": environment}},
        )
        assert created.status_code == 201, created.text
        sid: str = created.json()["id"]
        try:

            async def status() -> httpx.Response:
                async with httpx.AsyncClient(base_url=keeper.url, timeout=30) as client:
                    return await client.get(f"/api/v1/services/{sid}/status")

            asyncio.run(poll(status, lambda r: r.json()["status"] == "running", timeout=60))
            yield sid
        finally:
            stopped = api.delete(f"/api/v1/services/{sid}")
            assert stopped.status_code == 200, stopped.text


@pytest.fixture
def gateways() -> Iterator[list[GatewayProcess]]:
    """The gateways a test starts, stopped at the end whatever happened."""
    started: list[GatewayProcess] = []
    yield started
    for gateway in started:
        gateway.stop()


def start(
    cluster: LocalCluster, gateways: list[GatewayProcess], workers: int, drain: int, grace: int
) -> GatewayProcess:
    gateway = GatewayProcess(
        cluster,
        GATEWAY_WORKERS=str(workers),
        GATEWAY_SHUTDOWN_DRAIN_SECONDS=str(drain),
        GATEWAY_SHUTDOWN_GRACE_SECONDS=str(grace),
    )
    gateways.append(gateway)
    return gateway.start()


async def ready(url: str) -> tuple[int, str] | None:
    """Readiness over a new connection: (HTTP status, `status`); None when the
    connection is refused; (0, the error) when it was accepted but not answered
    (as the listener closes; or a listener nobody serves any more)."""
    try:
        async with httpx.AsyncClient(timeout=3) as fresh:
            response = await fresh.get(f"{url}/api/v1/ready")
    except httpx.ConnectError:
        return None
    except httpx.TransportError as exc:
        return 0, type(exc).__name__
    return response.status_code, response.json()["status"]


async def read_stream(
    url: str, sid: str, tokens: int, first: asyncio.Event
) -> tuple[bytes, float, httpx.HTTPError | None]:
    """A streaming prompt read to its end: the bytes, when it ended, and the
    error that cut it (None when it ended properly). ``first`` is set once
    the first bytes came."""
    received = b""
    error = None
    body = {"prompt": "hi", "max_tokens": tokens, "stream": True}
    async with httpx.AsyncClient(base_url=url, timeout=30) as api:
        try:
            async with api.stream("POST", f"/api/v1/vllm/{sid}/prompt", json=body) as response:
                assert response.status_code == 200, await response.aread()
                async for chunk in response.aiter_raw():
                    received += chunk
                    first.set()
        except httpx.HTTPError as exc:
            error = exc
    return received, time.monotonic(), error


def generated(stream: bytes) -> str:
    """The text of the stream's events (completions or chat chunks)."""
    text = ""
    for line in stream.decode().splitlines():
        if line.startswith("data: {"):
            for choice in json.loads(line.removeprefix("data: ")).get("choices", []):
                text += choice.get("text") or choice.get("delta", {}).get("content") or ""
    return text


async def stream_then_sigterm(
    gateway: GatewayProcess, sid: str, tokens: int
) -> tuple[asyncio.Task[tuple[bytes, float, httpx.HTTPError | None]], float]:
    """Starts a streaming prompt and sends SIGTERM once it is under way."""
    first = asyncio.Event()
    streaming = asyncio.create_task(read_stream(gateway.url, sid, tokens, first))
    await asyncio.wait_for(first.wait(), 30)
    assert gateway.process is not None
    gateway.process.send_signal(signal.SIGTERM)
    return streaming, time.monotonic()


async def exits_0(gateway: GatewayProcess, signalled: float, timeout: float) -> float:
    """Seconds from the SIGTERM to the gateway's exit, whose status must be 0."""
    process = gateway.process
    assert process is not None

    async def status() -> int | None:
        return process.poll()

    code = await poll(status, lambda c: c is not None, timeout=timeout, interval=0.05)
    assert code == 0, gateway.log.read_text()[-3000:]
    return time.monotonic() - signalled


@pytest.mark.parametrize("workers", [1, 2])
async def test_sigterm_drains_then_lets_open_streams_finish(
    c2205: LocalCluster, stub: str, gateways: list[GatewayProcess], workers: int
) -> None:
    drain, grace, tokens = 2, 10, 30  # a stream of 4.5 s: past the drain
    gateway = start(c2205, gateways, workers, drain, grace)
    assert await ready(gateway.url) == (200, "ok")

    streaming, signalled = await stream_then_sigterm(gateway, stub, tokens)
    answers: list[tuple[float, tuple[int, str] | None]] = []

    async def probe() -> tuple[int, str] | None:
        answer = await ready(gateway.url)
        answers.append((time.monotonic() - signalled, answer))
        return answer

    await poll(
        probe, lambda a: a is None, timeout=drain + 5, interval=0.1, what="connections refused"
    )
    refused_after = answers[-1][0]
    served = [a for _, a in answers[:-1]]
    # New connections were served through the drain, and readiness said 503.
    assert (503, "draining") in served, answers
    assert (200, "ok") not in served[served.index((503, "draining")) :], answers
    # Refused once the drain is over (a supervisor passes SIGTERM on within 0.5 s).
    # (Wide upper margin: this 2-core machine stalls for a second at times.)
    assert drain - 0.1 <= refused_after < drain + 3, answers

    received, ended, error = await streaming
    assert error is None, error
    assert received.decode().rstrip().endswith("data: [DONE]"), received[-300:]
    assert generated(received) == " tok" * tokens
    assert ended - signalled > refused_after  # it outlived the listener

    stopped_after = await exits_0(gateway, signalled, timeout=drain + grace)
    TIMINGS.append(
        f"graceful stop on {c2205.name}, {workers} worker(s), drain {drain} s: "
        f"refused new connections after {refused_after:.2f} s, the {tokens * TOKEN_MS / 1000:g} s "
        f"stream ended after {ended - signalled:.2f} s, exit 0 after {stopped_after:.2f} s"
    )


@pytest.mark.parametrize("workers", [1, 2])
async def test_a_stream_longer_than_the_grace_is_cut_and_the_gateway_exits_0(
    c2205: LocalCluster, stub: str, gateways: list[GatewayProcess], workers: int
) -> None:
    grace, tokens = 2, 100  # a stream of 15 s
    gateway = start(c2205, gateways, workers, drain=0, grace=grace)

    streaming, signalled = await stream_then_sigterm(gateway, stub, tokens)
    received, ended, error = await streaming
    cut_after = ended - signalled
    assert isinstance(error, httpx.RemoteProtocolError), (error, received[-300:])
    assert b"[DONE]" not in received
    assert 0 < len(generated(received)) < len(" tok" * tokens)
    # Cut at the grace (uvicorn's supervisor passes SIGTERM on within 0.5 s).
    assert grace - 0.2 < cut_after < grace + 3, cut_after

    stopped_after = await exits_0(gateway, signalled, timeout=6)
    TIMINGS.append(
        f"graceful stop on {c2205.name}, {workers} worker(s), grace {grace} s: a "
        f"{tokens * TOKEN_MS / 1000:g} s stream cut after {cut_after:.2f} s, "
        f"exit 0 after {stopped_after:.2f} s"
    )


def in_flight(metrics: str) -> float:
    for line in metrics.splitlines():
        if line.startswith("gateway_http_requests_in_flight "):
            return float(line.split()[1])
    raise AssertionError("no gateway_http_requests_in_flight in /metrics")


async def test_a_killed_worker_leaves_no_request_counted_in_flight(
    c2205: LocalCluster, stub: str, gateways: list[GatewayProcess]
) -> None:
    gateway = start(c2205, gateways, workers=2, drain=0, grace=2)
    first = asyncio.Event()
    streaming = asyncio.create_task(read_stream(gateway.url, stub, 100, first))
    await asyncio.wait_for(first.wait(), 30)
    async with httpx.AsyncClient(base_url=gateway.url, timeout=5) as api:
        assert in_flight((await api.get("/metrics")).text) == 1
        assert gateway.process is not None
        workers = Path(f"/proc/{gateway.process.pid}/task/{gateway.process.pid}/children")
        # Not multiprocessing's resource tracker, also a child.
        killed = [
            int(pid)
            for pid in workers.read_text().split()
            if b"resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_bytes()
        ]
        assert len(killed) == 2, killed
        for pid in killed:
            os.kill(pid, signal.SIGKILL)
        _, _, error = await streaming
        assert isinstance(error, httpx.TransportError), error

        async def counted() -> float | None:
            try:
                return in_flight((await api.get("/metrics")).text)
            except httpx.TransportError:
                return None  # between the old workers and their replacements

        # The supervisor replaces dead workers within about a second; their
        # counts of requests in flight must go with them.
        assert await poll(counted, lambda n: n == 0, timeout=20, interval=0.25) == 0
    TIMINGS.append(
        f"worker SIGKILL on {c2205.name}: 2 workers replaced, requests in flight back to 0"
    )

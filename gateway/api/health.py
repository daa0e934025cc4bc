"""Liveness and readiness, for Kubernetes probes and for people."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import FrameType
from typing import Annotated

import msgspec
import structlog
from litestar import Controller, Litestar, get
from litestar.datastructures import State
from litestar.di import NamedDependency
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import QueryParameter
from litestar.response import Response
from litestar.status_codes import HTTP_200_OK, HTTP_503_SERVICE_UNAVAILABLE

from gateway.api.openapi import problem_responses
from gateway.api.security import PUBLIC
from gateway.slurm import PingResult, SlurmClient, SlurmError

log = structlog.get_logger(__name__)


class Health(msgspec.Struct, frozen=True):
    status: str


class Readiness(msgspec.Struct, frozen=True, kw_only=True):
    # No defaults: every field is always sent (null when unknown), so the
    # document marks them required and generated clients need no "unset" case.
    status: str
    slurm_url: str
    slurm_api_version: str | None
    slurm_release: str | None
    detail: str | None


class HealthController(Controller):
    path = "/api/v1"
    tags = ("health",)

    @get(
        "/health",
        operation_id="getHealth",
        summary="Liveness: the process answers",
        exclude_from_auth=True,
        security=PUBLIC,
    )
    async def health(self) -> Health:
        return Health(status="ok")

    @get(
        "/ready",
        operation_id="getReadiness",
        summary="Readiness: slurmrestd answers and slurmctld responds",
        exclude_from_auth=True,
        security=PUBLIC,
        responses={
            **problem_responses(400, 422, public=True),
            HTTP_503_SERVICE_UNAVAILABLE: ResponseSpec(
                Readiness,
                generate_examples=False,
                description="Not ready: slurmrestd cannot be reached or slurmctld does not "
                "respond; `detail` says which",
            ),
        },
    )
    async def ready(
        self,
        slurm: NamedDependency[SlurmClient],
        state: State,
        ask_slurm: Annotated[
            bool,
            # Not `slurm`: that name is the client's dependency.
            QueryParameter(
                name="slurm",
                description="false: ready unless draining, without asking Slurm. For "
                "Kubernetes' readiness probe: a Slurm outage is every replica's, and taking "
                "them all out of the Service would stop prompts that still work (running "
                "services keep answering) and answers with Retry-After; it also keeps the "
                "probes of every replica off slurmctld",
            ),
        ] = True,
    ) -> Response[Readiness]:
        if state.get("draining", False):
            body = Readiness(
                status="draining",
                slurm_url=slurm.base_url,
                slurm_api_version=None,
                slurm_release=None,
                detail="the gateway is stopping (SIGTERM): finishing what it serves",
            )
            return Response(body, status_code=HTTP_503_SERVICE_UNAVAILABLE)
        if not ask_slurm:
            body = Readiness(
                status="ok",
                slurm_url=slurm.base_url,
                slurm_api_version=slurm.api_version,
                slurm_release=None,
                detail="Slurm not asked (slurm=false)",
            )
            return Response(body)
        try:
            pings = await _shared_ping(state, slurm)
        except SlurmError as exc:
            body = Readiness(
                status="unavailable",
                slurm_url=slurm.base_url,
                slurm_api_version=None,
                slurm_release=None,
                detail=str(exc),
            )
            return Response(body, status_code=HTTP_503_SERVICE_UNAVAILABLE)
        responding = any(p.responding for p in pings)
        body = Readiness(
            status="ok" if responding else "unavailable",
            slurm_url=slurm.base_url,
            slurm_api_version=slurm.api_version,
            slurm_release=pings[0].slurm_release if pings else None,
            detail=None if responding else "slurmctld does not respond",
        )
        return Response(
            body, status_code=HTTP_200_OK if responding else HTTP_503_SERVICE_UNAVAILABLE
        )


# Readiness is public: however often it is asked, slurmctld gets at most one
# ping a second from it per replica.
_READY_PING_SECONDS = 1.0
_clock = time.monotonic


async def _shared_ping(state: State, slurm: SlurmClient) -> list[PingResult]:
    now = _clock()
    cached: tuple[float, asyncio.Future[list[PingResult]]] | None = state.get("ready_ping")
    if cached is None or now - cached[0] >= _READY_PING_SECONDS:
        ping = asyncio.ensure_future(slurm.ping())
        ping.add_done_callback(lambda done: done.cancelled() or done.exception())
        cached = (now, ping)
        state["ready_ping"] = cached
    # Shielded: one caller going away does not cancel the others' answer.
    return await asyncio.shield(cached[1])


@asynccontextmanager
async def drain_on_sigterm(app: Litestar) -> AsyncIterator[None]:
    """On SIGTERM, answer not-ready for ``shutdown_drain_seconds`` while still
    serving, then hand the signal to uvicorn, which closes the listener and
    waits for the open requests (Kubernetes takes the pod out of its Service
    first, so no new connection is refused).

    uvicorn installs its SIGTERM handler before the application starts: this
    wraps it, in each worker. Without a drain, or outside the main thread (a
    test client), it changes nothing.
    """
    app.state.draining = False
    seconds: int = app.state.settings.shutdown_drain_seconds
    stop = signal.getsignal(signal.SIGTERM)
    if (
        not seconds
        or not callable(stop)
        or threading.current_thread() is not threading.main_thread()
    ):
        yield
        return
    loop = asyncio.get_running_loop()

    def begin(signum: int) -> None:
        if app.state.draining:  # a second SIGTERM: stop now
            stop(signum, None)
            return
        app.state.draining = True
        log.info("draining", seconds=seconds)
        loop.call_later(seconds, stop, signum, None)

    def drain(signum: int, frame: FrameType | None) -> None:
        # Only hand over to the loop: a signal handler that writes a log line
        # can land inside another write to stdout and fail there.
        loop.call_soon_threadsafe(begin, signum)

    signal.signal(signal.SIGTERM, drain)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGTERM) is drain:
            signal.signal(signal.SIGTERM, stop)

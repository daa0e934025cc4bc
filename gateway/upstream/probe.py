"""Readiness probes of service endpoints: concurrent, short, cached for a moment.

Listing many services must not cost one slow request each, and many callers
polling one service must not multiply the probes: a result is cached for
``ttl`` seconds and a probe already under way is shared. Up to ``4 * ttl`` a
cached result is answered at once while a new probe runs in the background,
so no caller (a prompt, above all) waits for a probe of a service seen lately. At most
``max_concurrent`` probes run at once; the others queue for a slot (never for
a pooled connection, whose wait would count against the probe's own timeout
and fail healthy services when many are listed at once).
"""

from __future__ import annotations

import asyncio
import contextvars
import math
import time
from collections.abc import Awaitable, Callable

import structlog

from gateway.upstream.pool import Pool, TransportFailure
from gateway.upstream.vllm import VllmClient, auth_headers

log = structlog.get_logger(__name__)


class HealthProber:
    def __init__(
        self,
        *,
        timeout: float = 2.0,
        ttl: float = 3.0,
        max_concurrent: int = 32,
    ) -> None:
        self._http = Pool(timeout=timeout, connect_timeout=timeout, max_connections=max_concurrent)
        self._slots = asyncio.Semaphore(max_concurrent)
        self._vllm = VllmClient(timeout=timeout, connect_timeout=timeout)
        self._ttl = ttl
        # Past this age a cached answer is not given out even while a new probe runs.
        self._stale = 4 * ttl
        # A vLLM probe is two requests.
        self._deadline = 2 * timeout + 0.5
        self._cache: dict[str, tuple[float, bool]] = {}
        self._inflight: dict[str, asyncio.Task[bool]] = {}

    async def aclose(self) -> None:
        for task in self._inflight.values():
            task.cancel()
        await self._http.aclose()
        await self._vllm.aclose()

    async def healthy(self, url: str, key: str | None = None) -> bool:
        """``url`` answers with a 2xx status."""
        return await self._cached(url, lambda: self._get(url, key))

    async def vllm_ready(self, endpoint: str, model: str | None, key: str | None = None) -> bool:
        """vLLM's ``/health`` answers and ``/v1/models`` lists ``model``."""
        return await self._cached(
            f"vllm {endpoint} {model} {key}", lambda: self._vllm.ready(endpoint, model, key)
        )

    async def _cached(self, key: str, probe: Callable[[], Awaitable[bool]]) -> bool:
        cached = self._cache.get(key)
        age = math.inf if cached is None else time.monotonic() - cached[0]
        if cached is not None and age < self._ttl:
            return cached[1]
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.create_task(self._run(key, probe), context=contextvars.Context())
            self._inflight[key] = task
            task.add_done_callback(lambda t: self._done(key, t))
        if cached is not None and age < self._stale:
            # Stale while revalidating: a prompt never waits for a probe of a
            # service that answered moments ago; the next caller gets the news.
            return cached[1]
        return await asyncio.shield(task)

    def _done(self, key: str, task: asyncio.Task[bool]) -> None:
        self._inflight.pop(key, None)
        if not task.cancelled() and task.exception() is not None:
            # Nobody may be waiting (a stale answer was given): log it here.
            log.warning("probe_failed", key=key, error=repr(task.exception())[:300])

    async def _run(self, key: str, probe: Callable[[], Awaitable[bool]]) -> bool:
        # httpx's timeouts are per read: an endpoint that trickles a byte at a
        # time would hold the probe, and every listing waiting on it, for ever.
        async with self._slots:
            try:
                ok = await asyncio.wait_for(probe(), timeout=self._deadline)
            except TimeoutError:
                ok = False
        now = time.monotonic()
        self._cache[key] = (now, ok)
        if len(self._cache) > 4096:  # forget services long gone
            self._cache = {k: v for k, v in self._cache.items() if now - v[0] < self._ttl}
        return ok

    async def _get(self, url: str, key: str | None) -> bool:
        try:
            response = await self._http.open("GET", url, headers=auth_headers(key))
        except TransportFailure:
            return False
        # The status is the answer: the body is never read (nor the connection reused).
        response.close()
        return response.status < 300

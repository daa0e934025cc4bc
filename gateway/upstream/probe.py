"""Health probes of service endpoints: concurrent, short, cached for a moment.

Listing many services must not cost one slow request each, and many callers
polling one service must not multiply the probes: results are cached for
``ttl`` seconds and a probe already under way is shared.
"""

from __future__ import annotations

import asyncio
import time

import httpx


class HealthProber:
    def __init__(
        self,
        *,
        timeout: float = 2.0,
        ttl: float = 3.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout), transport=transport, follow_redirects=False
        )
        self._ttl = ttl
        self._cache: dict[str, tuple[float, bool]] = {}
        self._inflight: dict[str, asyncio.Task[bool]] = {}

    async def aclose(self) -> None:
        for task in self._inflight.values():
            task.cancel()
        await self._http.aclose()

    async def healthy(self, url: str) -> bool:
        now = time.monotonic()
        cached = self._cache.get(url)
        if cached is not None and now - cached[0] < self._ttl:
            return cached[1]
        task = self._inflight.get(url)
        if task is None:
            task = asyncio.create_task(self._probe(url))
            self._inflight[url] = task
            task.add_done_callback(lambda _t: self._inflight.pop(url, None))
        return await asyncio.shield(task)

    async def _probe(self, url: str) -> bool:
        try:
            response = await self._http.get(url)
            ok = response.status_code < 300
        except httpx.HTTPError:
            ok = False
        self._cache[url] = (time.monotonic(), ok)
        if len(self._cache) > 4096:  # forget services long gone
            cutoff = time.monotonic() - self._ttl
            self._cache = {k: v for k, v in self._cache.items() if v[0] >= cutoff}
        return ok

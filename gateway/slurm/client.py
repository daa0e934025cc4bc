"""Async slurmrestd client: one pooled connection set, API version negotiated once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import datetime
from functools import partial
from typing import Self, TypeVar

import httpx
import msgspec
import structlog

from gateway.metrics import SLURM_CALLS
from gateway.slurm.adapters import SUPPORTED_VERSIONS, Adapter, JobList, Request, adapter_for
from gateway.slurm.errors import (
    SlurmAuthError,
    SlurmBusy,
    SlurmError,
    SlurmRequestRejected,
    SlurmUnavailable,
    SlurmUnexpectedResponse,
    SlurmVersionUnsupported,
)
from gateway.slurm.models import (
    JobInfo,
    JobSubmission,
    NodeInfo,
    PingResult,
    SubmitResult,
    check_node_name,
)
from gateway.slurm.tokens import Credentials, FixedCredentials, TokenProvider
from gateway.transport import Outbound

log = structlog.get_logger(__name__)

T = TypeVar("T")
_EXCHANGE_SECONDS = "gateway.exchange_seconds"

# A job listing larger than this is decoded in a worker thread.
_DECODE_IN_THREAD_BYTES = 256 * 1024


class _Negotiated:
    """What a client shares with the views made by ``as_user``: the version
    choice, and the bound on calls in flight (one per replica)."""

    def __init__(
        self, pinned: str | None, max_concurrency: int = 16, queue_timeout: float = 2.0
    ) -> None:
        if pinned is not None:
            adapter_for(pinned)  # fail fast on a version we cannot speak
        self.pinned = pinned
        self.adapter: Adapter | None = None
        self.lock = asyncio.Lock()
        self.max_concurrency = max_concurrency
        self.queue_timeout = queue_timeout
        self.slots = asyncio.Semaphore(max_concurrency)


class SlurmClient:
    """Talks to one slurmrestd.

    The API version is the newest one both sides speak, found on first use by
    probing ``/slurm/<version>/ping`` newest first (a version the daemon does
    not serve answers 404), unless ``api_version`` pins one. Only a successful
    ping picks a version; any other failure is raised as its typed error and
    nothing is remembered, so the next call negotiates again.
    """

    def __init__(
        self,
        base_url: str,
        tokens: TokenProvider,
        *,
        api_version: str | None = None,
        timeout: float = 10.0,
        connect_timeout: float = 3.0,
        max_connections: int = 32,
        max_concurrency: int = 16,
        queue_timeout: float = 2.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        self._http = Outbound(
            base_url,
            timeout=timeout,
            connect_timeout=connect_timeout,
            max_connections=max_connections,
            headers={"Accept": "application/json"},
            transport=transport,
        )
        self._tokens = tokens
        # At most max_concurrency calls in flight; one that waits longer than
        # queue_timeout for a slot fails as SlurmUnavailable (a 503) rather than
        # piling up on a slurmrestd that is already slow.
        self._negotiated = _Negotiated(api_version, max_concurrency, queue_timeout)
        self._owns_http = True

    @property
    def base_url(self) -> str:
        return self._http.base_url

    def as_user(self, credentials: Credentials) -> SlurmClient:
        """A view acting with a caller's own credentials (pass-through mode),
        sharing this client's connections and negotiated version."""
        return self.with_tokens(FixedCredentials(credentials))

    def with_tokens(self, tokens: TokenProvider) -> SlurmClient:
        """A view with other credentials (another Slurm user's minted tokens),
        sharing this client's connections, version and bound on calls."""
        view = object.__new__(SlurmClient)
        view._http = self._http
        view._tokens = tokens
        view._negotiated = self._negotiated
        view._owns_http = False
        return view

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- version negotiation --------------------------------------------------

    async def adapter(self) -> Adapter:
        neg = self._negotiated
        if neg.adapter is not None:
            return neg.adapter
        async with neg.lock:
            if neg.adapter is None:
                neg.adapter = await self._negotiate(neg.pinned)
                log.info("slurmrestd_version", url=self.base_url, version=neg.adapter.version)
            return neg.adapter

    async def _negotiate(self, pinned: str | None) -> Adapter:
        """The newest version whose ping succeeds. 404 means "not served": try
        the next older one. Any other failure (a proxy's 503 at start-up, a
        refused token, a body that is no ping) is raised as the adapter's typed
        error rather than taken as an answer, since it says nothing about the
        versions served."""
        candidates = (pinned,) if pinned else SUPPORTED_VERSIONS
        for version in candidates:
            adapter = adapter_for(version)
            response = await self._send(adapter.ping_request())
            if response.status_code == 404:
                continue
            try:
                if not adapter.parse_ping(response.status_code, response.content):
                    # slurmrestd lists every configured controller; a JSON
                    # answer without any is some other service's.
                    raise SlurmUnexpectedResponse(
                        f"slurmrestd {version}: ping answered no controller",
                        status_code=response.status_code,
                    )
            except SlurmError as exc:
                log.warning(
                    "slurmrestd_negotiation_failed",
                    url=self.base_url,
                    version=version,
                    status=response.status_code,
                    error=type(exc).__name__,
                )
                raise
            return adapter
        if pinned:
            raise SlurmVersionUnsupported(
                f"slurmrestd at {self.base_url} does not serve the pinned API version {pinned}"
            )
        raise SlurmVersionUnsupported(
            f"slurmrestd at {self.base_url} serves none of {', '.join(SUPPORTED_VERSIONS)}"
        )

    @property
    def api_version(self) -> str | None:
        adapter = self._negotiated.adapter
        return adapter.version if adapter else None

    # -- transport ----------------------------------------------------------------

    async def _send(self, request: Request) -> httpx.Response:
        headers = (await self._tokens.credentials()).headers()
        content = None
        if request.body is not None:
            # msgspec encodes several times faster than httpx's json=.
            content = msgspec.json.encode(request.body)
            headers["Content-Type"] = "application/json"
        bound = self._negotiated
        try:
            async with asyncio.timeout(bound.queue_timeout):
                await bound.slots.acquire()
        except TimeoutError:
            raise SlurmBusy(
                f"slurmrestd is busy: {bound.max_concurrency} calls in flight, and no slot "
                f"came free in {bound.queue_timeout:g} s for {request.method} {request.path}"
            ) from None
        started = time.monotonic()
        try:
            response = await self._http.request(
                request.method,
                request.path,
                params=request.params or None,
                content=content,
                headers=headers,
            )
            # The exchange alone, not the wait for a slot (see ``_run``).
            response.extensions[_EXCHANGE_SECONDS] = time.monotonic() - started
            return response
        except httpx.TimeoutException:
            raise SlurmUnavailable(
                f"slurmrestd at {self.base_url} did not answer {request.method} "
                f"{request.path} in time"
            ) from None
        except httpx.TransportError as exc:
            raise SlurmUnavailable(
                f"slurmrestd at {self.base_url} is unreachable: {type(exc).__name__}"
            ) from None
        finally:
            bound.slots.release()

    async def _call(self, build: Request) -> httpx.Response:
        response = await self._send(build)
        if response.status_code == 401:
            # slurmrestd's own refusal, before any JSON: no or unusable token.
            raise SlurmAuthError(
                f"slurmrestd at {self.base_url} refused the credentials (HTTP 401)",
                status_code=401,
            )
        return response

    # -- operations -------------------------------------------------------------

    async def user_name(self) -> str:
        """The Slurm user this client acts as (a static token names it)."""
        return (await self._tokens.credentials()).user_name

    async def ping(self) -> list[PingResult]:
        adapter = await self.adapter()
        return await self._run("ping", adapter, adapter.ping_request(), adapter.parse_ping)

    async def submit(self, job: JobSubmission) -> SubmitResult:
        adapter = await self.adapter()
        return await self._run("submit", adapter, adapter.submit_request(job), adapter.parse_submit)

    async def get_node(self, name: str) -> NodeInfo:
        """The names of node ``name``: Slurm's NodeName, NodeHostname, NodeAddr.

        Raises ValueError, before any request, for a name that is not 1 to 255
        of ``A-Z a-z 0-9 . _ -``; SlurmNodeNotFound when Slurm knows no such node.
        """
        check_node_name(name)
        adapter = await self.adapter()
        return await self._run(
            "get_node",
            adapter,
            adapter.get_node_request(name),
            partial(adapter.parse_node, name=name),
        )

    async def list_nodes(self) -> list[NodeInfo]:
        """Every node with its state (for why jobs wait: drained, down)."""
        adapter = await self.adapter()
        return await self._run(
            "list_nodes", adapter, adapter.list_nodes_request(), adapter.parse_nodes
        )

    async def get_job(self, job_id: int) -> JobInfo:
        adapter = await self.adapter()
        return await self._run(
            "get_job",
            adapter,
            adapter.get_job_request(job_id),
            partial(adapter.parse_job, job_id=job_id),
        )

    async def list_jobs(self, changed_since: datetime | None = None) -> JobList:
        """All jobs slurmctld still holds. With ``changed_since``, Slurm answers
        ``unchanged`` when no job changed since then (it is not a filter)."""
        adapter = await self.adapter()
        return await self._run(
            "list_jobs", adapter, adapter.list_jobs_request(changed_since), adapter.parse_jobs
        )

    async def cancel(self, job_id: int, signal: str | None = None) -> None:
        """Cancel a job (SIGKILL to all its steps) or send it ``signal``.
        Cancelling a job that already ended is not an error."""
        adapter = await self.adapter()
        await self._run(
            "cancel",
            adapter,
            adapter.cancel_request(job_id, signal),
            partial(adapter.parse_cancel, job_id=job_id),
        )

    async def release(self, job_id: int) -> None:
        """Lets a job held by its begin time start now (slurmctld schedules it at
        once; after a hold it would wait for the scheduler's next pass)."""
        adapter = await self.adapter()
        await self._run(
            "release",
            adapter,
            adapter.release_request(job_id, int(time.time())),
            partial(adapter.parse_update, job_id=job_id),
        )

    async def shorten(self, job_id: int, minutes: int) -> None:
        """Lowers a job's time limit to ``minutes`` (a deployment's scale-down:
        every gateway replica sees it in the job)."""
        adapter = await self.adapter()
        await self._run(
            "shorten",
            adapter,
            adapter.shorten_request(job_id, minutes),
            partial(adapter.parse_update, job_id=job_id),
        )

    async def update_comment(self, job_id: int, comment: str) -> None:
        adapter = await self.adapter()
        await self._run(
            "update_comment",
            adapter,
            adapter.update_comment_request(job_id, comment),
            partial(adapter.parse_update, job_id=job_id),
        )

    async def _run(
        self, operation: str, adapter: Adapter, request: Request, parse: Callable[[int, bytes], T]
    ) -> T:
        """Send, then read the answer with the adapter; a refusal that was
        really an unreachable slurmctld becomes SlurmUnavailable (a 503).
        Timed and counted by operation and outcome (gateway/metrics.py)."""
        started = time.perf_counter()
        outcome = "ok"
        try:
            return await self._exchange(adapter, request, parse)
        except SlurmError as exc:
            outcome = type(exc).__name__
            raise
        except BaseException:
            outcome = "cancelled_or_error"
            raise
        finally:
            SLURM_CALLS.labels(operation, outcome).observe(time.perf_counter() - started)

    async def _exchange(
        self, adapter: Adapter, request: Request, parse: Callable[[int, bytes], T]
    ) -> T:
        response = await self._call(request)
        try:
            if len(response.content) > _DECODE_IN_THREAD_BYTES:
                # Thousands of jobs take a good part of a second to read: off the
                # event loop, so that requests meanwhile wait milliseconds, not that.
                return await asyncio.to_thread(parse, response.status_code, response.content)
            return parse(response.status_code, response.content)
        except (SlurmAuthError, SlurmRequestRejected) as exc:
            elapsed = float(response.extensions.get(_EXCHANGE_SECONDS, 0.0))
            outage = adapter.outage_behind(exc, elapsed)
            if outage is None:
                outage = await self._controller_down(adapter)
            if not outage:
                raise
            raise SlurmUnavailable(
                f"slurmctld is unreachable (slurmrestd answered {request.method} "
                f"{request.path} with HTTP {response.status_code} after {elapsed:.1f} s)",
                status_code=response.status_code,
                errors=exc.errors,
            ) from None

    async def _controller_down(self, adapter: Adapter) -> bool:
        """Whether slurmrestd says no slurmctld responds. One ping, sent
        straight (never through ``_run``: no recursion); a ping that fails
        (busy, timed out) proves nothing, and the refusal stands."""
        try:
            response = await self._call(adapter.ping_request())
            pings = adapter.parse_ping(response.status_code, response.content)
        except SlurmError:
            return False
        return bool(pings) and not any(p.responding for p in pings)

"""``/metrics``: Prometheus metrics, outside ``/api/v1`` and the API document.

HTTP requests are counted by ``HttpMetrics`` below, labelled by route
template (never a service id); slurmrestd calls, services and build
information come from gateway/metrics.py. With several workers, ``__main__`` points
``PROMETHEUS_MULTIPROC_DIR`` at a fresh directory and a scrape sums them.

``/metrics`` is public, so what it costs and shows does not depend on who
asks or how often: services are counted once per job view generation (not
per scrape), and anonymous scrapes get series with no tenant in them; the
per-tenant ones need an admin's credentials.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

from litestar import Controller, Request, get
from litestar.di import NamedDependency
from litestar.enums import ScopeType
from litestar.response import Response
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway import __version__
from gateway.auth.authenticate import TOKEN_HEADER, Authenticator
from gateway.core.errors import Forbidden
from gateway.core.services import ServiceManager
from gateway.metrics import IN_FLIGHT, PREFIX, REQUESTS, series
from gateway.slurm import SlurmClient


class HttpMetrics:
    """Requests by method, route template and status: count and duration (to
    the last byte sent), and how many are in flight.

    Litestar's Prometheus middleware costs 35 µs a request on this machine (an
    in-process health request: 64 µs instead of 29); this one about 8 (39
    instead of 31), which matters on the prompt path.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await self.app(scope, receive, send)
            return
        method = scope["method"]
        # Set by Litestar's router: "/api/v1/services/{service_id}", never an id.
        template = scope.get("path_template", "")
        if template == "/metrics":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # unless an answer starts or the exception says otherwise

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        IN_FLIGHT.inc()
        try:
            await self.app(scope, receive, sending)
        except Exception as exc:
            # Answered outside this middleware (the prompt fast path's 502 or
            # 504 go to the app's exception handlers): their status, not 500.
            code = getattr(exc, "status_code", 500)
            status = code if isinstance(code, int) else 500
            raise
        finally:
            IN_FLIGHT.dec()
            series(REQUESTS, method, template, str(status)).observe(time.perf_counter() - started)


class MetricsController(Controller):
    path = "/metrics"
    include_in_schema = False

    @get(operation_id="getMetrics", summary="Prometheus metrics")
    async def metrics(
        self,
        request: Request[Any, Any, Any],
        authenticator: NamedDependency[Authenticator],
        service_counts: NamedDependency[ServiceCounts],
        services: NamedDependency[ServiceManager],
        slurm: NamedDependency[SlurmClient],
    ) -> Response[bytes]:
        tenants = await _admin(request, authenticator)
        registry = REGISTRY
        if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        # What is true now, not counted: made at each scrape, never stored.
        now = CollectorRegistry(auto_describe=False)
        now.register(_Now(service_counts.of(services), slurm, tenants=tenants))
        body = generate_latest(registry) + generate_latest(now)
        return Response(body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _admin(request: Request[Any, Any, Any], authenticator: Authenticator) -> bool:
    """Whether the scrape may see tenants: an admin's, or any without client
    authentication (everyone is the gateway's admin then). Credentials that do
    not check out are a 401, a tenant's a 403, as on any route."""
    headers = request.headers
    if authenticator.enabled and "authorization" not in headers and TOKEN_HEADER not in headers:
        return False
    client = request.client.host if request.client else None
    principal = await authenticator.authenticate(headers, client=client)
    if not principal.is_admin:
        raise Forbidden(
            "per-tenant metrics are for admins; scrape without credentials for the others"
        )
    return True


class ServiceCounts:
    """Services by tenant, recipe and status, counted once per job view
    generation: a scrape of an unchanged view costs no pass over its jobs,
    however often it comes (every job was recounted at each scrape: 7-10 ms
    with 5,000 jobs)."""

    def __init__(self) -> None:
        self._of: tuple[ServiceManager, int] | None = None
        self._counts: dict[tuple[str, str, str], int] = {}

    def of(self, services: ServiceManager) -> dict[tuple[str, str, str], int]:
        key = (services, services.view.generation)
        if self._of is None or self._of[0] is not services or self._of[1] != key[1]:
            self._counts = services.counts()
            self._of = key
        return self._counts


class _Now(Collector):
    """Services by recipe and status (and, for admins, by tenant), from what
    the job view holds (it is not woken, refreshed nor probed for a scrape),
    and the build information."""

    def __init__(
        self, counts: dict[tuple[str, str, str], int], slurm: SlurmClient, *, tenants: bool
    ) -> None:
        self.counts = counts
        self.slurm = slurm
        self.tenants = tenants

    def collect(self) -> Iterator[Metric]:
        summed: dict[tuple[str, str], int] = {}
        for (_, recipe, status), n in self.counts.items():
            summed[recipe, status] = summed.get((recipe, status), 0) + n
        counts = GaugeMetricFamily(
            f"{PREFIX}_services",
            "Services Slurm still knows, by recipe and status, as the job view last listed them",
            labels=["recipe", "status"],
        )
        for (recipe, status), n in sorted(summed.items()):
            counts.add_metric([recipe, status], n)
        yield counts
        if self.tenants:
            by_tenant = GaugeMetricFamily(
                f"{PREFIX}_tenant_services",
                "Services Slurm still knows, by tenant, recipe and status (admins only)",
                labels=["tenant", "recipe", "status"],
            )
            for (tenant, recipe, status), n in sorted(self.counts.items()):
                by_tenant.add_metric([tenant, recipe, status], n)
            yield by_tenant
        build = GaugeMetricFamily(
            f"{PREFIX}_build_info",
            "The gateway's version and the slurmrestd API version it negotiated",
            labels=["version", "slurm_api_version"],
        )
        build.add_metric([__version__, self.slurm.api_version or ""], 1)
        yield build

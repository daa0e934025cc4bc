"""``/metrics``: Prometheus metrics, outside ``/api/v1`` and the API document.

HTTP requests are counted by ``HttpMetrics`` below, labelled by route
template (never a service id); slurmrestd calls, services and build
information come from gateway/metrics.py. With several workers, ``__main__`` points
``PROMETHEUS_MULTIPROC_DIR`` at a fresh directory and a scrape sums them.
"""

from __future__ import annotations

import os
import time

import structlog
from litestar import Controller, get
from litestar.di import NamedDependency
from litestar.enums import ScopeType
from litestar.response import Response
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Histogram,
    generate_latest,
    multiprocess,
)

from gateway import __version__
from gateway.core.services import ServiceManager
from gateway.core.status import ServiceStatus
from gateway.metrics import BUILD, IN_FLIGHT, REQUESTS, SERVICES
from gateway.slurm import SlurmClient, SlurmError

log = structlog.get_logger(__name__)


class HttpMetrics:
    """Requests by method, route template and status: count and duration (to
    the last byte sent), and how many are in flight.

    Litestar's Prometheus middleware costs 35 µs a request on this machine (an
    in-process health request: 64 µs instead of 29); this one about 8 (39
    instead of 31), which matters on the prompt path.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._series: dict[tuple[str, str, int], Histogram] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await self.app(scope, receive, send)
            return
        method = scope["method"]
        started = time.perf_counter()
        status = 500  # unless an answer starts

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        IN_FLIGHT.inc()
        try:
            await self.app(scope, receive, sending)
        finally:
            IN_FLIGHT.dec()
            # Set by Litestar's router: "/api/v1/services/{service_id}", never an id.
            template = scope.get("path_template", "")
            if template != "/metrics":
                key = (method, template, status)
                series = self._series.get(key)
                if series is None:
                    series = self._series[key] = REQUESTS.labels(key[0], key[1], str(status))
                series.observe(time.perf_counter() - started)


class MetricsController(Controller):
    path = "/metrics"
    include_in_schema = False

    @get(operation_id="getMetrics", summary="Prometheus metrics")
    async def metrics(
        self, services: NamedDependency[ServiceManager], slurm: NamedDependency[SlurmClient]
    ) -> Response[bytes]:
        await _count_services(services)
        BUILD.labels(__version__, slurm.api_version or "").set(1)
        registry = REGISTRY
        if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return Response(generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _count_services(services: ServiceManager) -> None:
    """From the job view, as any read (no call to Slurm of its own); a failed
    listing leaves the last counts."""
    try:
        listed = await services.list()
    except SlurmError as exc:
        log.warning("metrics_services_unknown", error=str(exc)[:300])
        return
    counts: dict[tuple[str, str], int] = {}
    for service in listed:
        key = (service.recipe_name, service.status.value)
        counts[key] = counts.get(key, 0) + 1
    for recipe in {r for r, _ in counts} | {labels[0] for labels in _known()}:
        for status in ServiceStatus:
            SERVICES.labels(recipe, status.value).set(counts.get((recipe, status.value), 0))


def _known() -> set[tuple[str, ...]]:
    """Label sets already exported, so that a status nobody has now reads 0."""
    return {tuple(s.labels.values())[:2] for m in SERVICES.collect() for s in m.samples}

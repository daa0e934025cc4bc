"""Which service answers a request for a model (the OpenAI front door, /v1).

A model is the name a service serves it under (``Service.served_model``, as
its recipe declares it); several services may serve one. A request goes to a
running one the caller may use: with a prefix key, the key's first choice
that is not overloaded (affinity.py); without, the one with the fewest
requests outstanding on this replica, ties taking turns. A request for a deployment at
zero replicas starts one (elastic.py) and is answered 503 ``model_not_ready``
with ``Retry-After``, or waits up to ``Prefer: wait=N`` (``_started``).

A service stops receiving requests when it leaves:
- stopped through this replica: at once, before Slurm is even asked;
- stopped elsewhere, failed, timed out: when the job view next lists it
  (``GATEWAY_VIEW_REFRESH_SECONDS``, 1 s by default), or earlier when its
  server stops taking connections: the first refused connection passes it
  over for ``eject_seconds`` (and that request goes to another service);
- its server stops answering /health: within ``GATEWAY_HEALTH_CACHE_SECONDS``.

Outstanding counts are this replica's own: replicas balance independently,
as vLLM's router and SkyServe's load balancers do.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol

from gateway.core.affinity import CHOOSER
from gateway.core.deployments.spec import Deployment
from gateway.core.errors import GatewayError, NotFound
from gateway.core.model import Service, Upstream
from gateway.core.principal import Principal
from gateway.core.services import ServiceManager
from gateway.core.status import ServiceStatus

RETRY_AFTER_SECONDS = 5
# Requests of one tenant that may wait here for a deployment to start; more
# are answered 503 at once (each holds a connection and its body).
WAITERS_PER_TENANT = 64
_WAIT_POLL = 0.5
_COMING = frozenset({ServiceStatus.PENDING, ServiceStatus.BUILDING, ServiceStatus.STARTING})


class ModelNotFound(NotFound):
    """No service the caller may use serves this model."""

    code = "model_not_found"
    param = "model"

    def __init__(self, model: str, available: list[str]) -> None:
        if available:
            where = f"models you can use: {', '.join(available[:50])}"
        else:
            where = "no model is served for you: start a vLLM service (POST /api/v1/services)"
        super().__init__(f"the model {model[:200]!r} does not exist here; {where}")
        self.model = model
        self.available = available


class ModelNotReady(GatewayError):
    """The model's services have not started yet (or are all unhealthy)."""

    status_code = 503
    title = "Model not ready"
    code = "model_not_ready"

    def __init__(self, detail: str, retry_after: float = RETRY_AFTER_SECONDS) -> None:
        super().__init__(detail)
        self.headers = {"Retry-After": str(max(1, math.ceil(retry_after)))}


class OnDemand(Protocol):
    """Deployments that may run no replica until a request asks for one
    (gateway/core/deployments/elastic.py)."""

    def serving(self, principal: Principal, model: str) -> Deployment | None: ...

    def sleeping(self, principal: Principal) -> list[Deployment]: ...

    def wake(self, name: str) -> None: ...

    def ready_in(self, name: str) -> float: ...


class ModelRouter:
    def __init__(
        self,
        services: ServiceManager,
        *,
        eject_seconds: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        on_demand: OnDemand | None = None,
    ) -> None:
        self.services = services
        self.on_demand = on_demand
        # Tenant -> its requests waiting here for a deployment to start.
        self._waiters: dict[str, int] = {}
        self.eject_seconds = eject_seconds
        self._clock = clock
        # Upstream URL -> requests this replica has in flight there.
        self._outstanding: dict[str, int] = {}
        # Upstream URL -> until when it is passed over (a refused connection).
        self._ejected: dict[str, float] = {}
        self._turn = 0

    async def models(self, principal: Principal) -> dict[str, list[Service]]:
        """Served model (or LoRA adapter) -> the running services of it the
        caller may use."""
        models: dict[str, list[Service]] = {}
        for service in await self.services.serving(principal):
            if service.status is ServiceStatus.RUNNING and service.upstream is not None:
                for name in service.names:
                    models.setdefault(name, []).append(service)
        return models

    def asleep(self, principal: Principal) -> dict[str, Deployment]:
        """Served model -> a deployment of it the caller may use that runs no
        replica now (the first request starts one)."""
        if self.on_demand is None:
            return {}
        found: dict[str, Deployment] = {}
        for deployment in self.on_demand.sleeping(principal):
            for name in deployment.names:
                found.setdefault(name, deployment)
        return found

    async def holding(
        self, principal: Principal, service_id: str, model: str | None = None
    ) -> Service | None:
        """The running service ``service_id`` if the caller may use it (and it
        serves ``model``): where state it keeps lives (a stored response)."""
        for service in await self.services.serving(principal, model):
            if (
                service.id == service_id
                and service.status is ServiceStatus.RUNNING
                and service.upstream is not None
            ):
                return service
        return None

    async def pick(
        self,
        principal: Principal,
        model: str,
        *,
        avoid: str | None = None,
        affinity: bytes | None = None,
        wait: float = 0.0,
    ) -> Service:
        """The service to send a request for ``model`` to (not the upstream
        ``avoid``, which just refused a connection): with an ``affinity`` key
        (gateway/core/affinity.py) the key's own while it is not overloaded."""
        candidates = await self.services.serving(principal, model)
        live: list[Service] = [
            s
            for s in candidates
            if s.status is ServiceStatus.RUNNING
            and s.upstream is not None
            and s.upstream.url != avoid
        ]
        if not live:
            if avoid is None and self.on_demand is not None:
                deployment = self.on_demand.serving(principal, model)
                if deployment is not None:
                    return await self._started(
                        principal, model, deployment, candidates, wait, affinity
                    )
            raise await self._why_none(principal, model, candidates, avoid)
        if len(live) == 1:
            return live[0]
        now = self._clock()
        if self._ejected:
            for url, until in list(self._ejected.items()):
                if until <= now:
                    del self._ejected[url]
            # All passed over: they may be back; better to try than to refuse.
            live = [s for s in live if _url(s) not in self._ejected] or live
        self._turn += 1
        loads = [self._outstanding.get(_url(s), 0) for s in live]
        return live[CHOOSER.choose(affinity, [s.id for s in live], loads, self._turn)]

    @contextmanager
    def outstanding(self, upstream: Upstream) -> Iterator[None]:
        """Counts a request in flight at ``upstream`` for as long as it lasts."""
        url = upstream.url
        self._outstanding[url] = self._outstanding.get(url, 0) + 1
        try:
            yield
        finally:
            left = self._outstanding[url] - 1
            if left:
                self._outstanding[url] = left
            else:
                del self._outstanding[url]

    def eject(self, upstream: Upstream) -> None:
        """Pass ``upstream`` over for a while: it refused a connection."""
        if len(self._ejected) > 4096:
            self._ejected.clear()
        self._ejected[upstream.url] = self._clock() + self.eject_seconds

    async def _started(
        self,
        principal: Principal,
        model: str,
        deployment: Deployment,
        candidates: list[Service],
        wait: float,
        affinity: bytes | None,
    ) -> Service:
        """A replica of ``deployment``, started for this request if none is
        starting, once it answers: within ``wait`` seconds (at most the
        deployment's ``max_wait_seconds``), or 503 with when to come back."""
        assert self.on_demand is not None
        if not any(s.status in _COMING for s in candidates):
            self.on_demand.wake(deployment.name)
        bound = min(wait, deployment.spec.max_wait_seconds)
        tenant = principal.tenant or ""
        if bound > 0 and self._waiters.get(tenant, 0) < WAITERS_PER_TENANT:
            deadline = self._clock() + bound
            self._waiters[tenant] = self._waiters.get(tenant, 0) + 1
            try:
                while self._clock() < deadline:
                    await asyncio.sleep(min(_WAIT_POLL, max(0.0, deadline - self._clock())))
                    found = await self.services.serving(principal, model)
                    if any(_running(s) for s in found):
                        return await self.pick(principal, model, affinity=affinity)
            finally:
                self._waiters[tenant] -= 1
                if not self._waiters[tenant]:
                    del self._waiters[tenant]
        ready_in = self.on_demand.ready_in(deployment.name)
        raise ModelNotReady(
            f"the model {model[:200]!r} is starting (deployment {deployment.name} was at "
            f"zero replicas); it should answer in about {ready_in:.0f} s. Send "
            f"'Prefer: wait={min(300, math.ceil(ready_in) + 30)}' to wait for it",
            retry_after=ready_in,
        )

    async def _why_none(
        self, principal: Principal, model: str, candidates: list[Service], avoid: str | None
    ) -> GatewayError:
        waiting = [s for s in candidates if s.status in _COMING]
        if waiting:
            states = ", ".join(f"service {s.id} is {s.status.value}" for s in waiting[:5])
            return ModelNotReady(f"the model {model[:200]!r} has no service running yet: {states}")
        if any(s.status is ServiceStatus.RUNNING for s in candidates):
            # The only running one just refused a connection.
            return ModelNotReady(f"the service of the model {model!r} refused the connection")
        if candidates:
            states = ", ".join(f"service {s.id} is {s.status.value}" for s in candidates[:5])
            return ModelNotReady(f"the model {model!r} has no working service: {states}")
        serving = await self.services.serving(principal)
        return ModelNotFound(model, sorted({n for s in serving for n in s.names}))


def _running(service: Service) -> bool:
    return service.status is ServiceStatus.RUNNING and service.upstream is not None


def _url(service: Service) -> str:
    assert service.upstream is not None  # only running services are picked
    return service.upstream.url

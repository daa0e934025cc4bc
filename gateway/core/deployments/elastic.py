"""Elastic deployments: the count from the load, and the start from zero.

The reconciler asks ``want`` each round; the /v1 router asks whether a model
it has no running service for is a deployment at zero (``serving``), starts
it (``wake``) and says when it should answer (``ready_in``). What is kept
here is this replica's own: the samples of the autoscaler, the loads last
read, the requests that found a deployment at zero, and its decisions.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from gateway.core.deployments import view as views
from gateway.core.deployments.autoscale import Autoscaler, Decision, Reading
from gateway.core.deployments.plan import Replica, size
from gateway.core.deployments.spec import Declared, Deployment
from gateway.core.model import Service
from gateway.core.principal import Principal
from gateway.core.status import ServiceStatus

# A running replica's load (requests running and waiting) and its counter of
# finished requests, from its model server.
LoadReader = Callable[[Service], Awaitable[tuple[float, float]]]
# A request for a deployment at zero starts one within this long, or not at all.
DEMAND_SECONDS = 60.0
_READ_SECONDS = 3.0
# Before any replica of it was seen to start: a guess.
_STARTUP_GUESS = 60.0


class Elastic:
    def __init__(
        self,
        read_load: LoadReader | None,
        clock: Callable[[], float],
        note: Callable[[str, str, str | None, str], None],
        grace: float = 120.0,
    ) -> None:
        self.read_load = read_load
        # A count over max_replicas may be another replica's reading of a newer
        # file (a raised maximum): this long before it is cut.
        self.grace = grace
        self._over: dict[str, float] = {}
        self.clock = clock
        self._note = note
        self.autoscaler = Autoscaler()
        self.decisions: dict[str, Decision] = {}
        # The loads last read, by job: the status shows them.
        self.loads: dict[int, float] = {}
        # The count each deployment runs, as last seen, and its newest submission.
        self._size: dict[str, int] = {}
        self._submitted: dict[str, float] = {}
        # When a request last asked for a deployment at zero, here.
        self._demand: dict[str, float] = {}
        self._scaled: dict[str, list[views.Action]] = {}
        self._wake = asyncio.Event()
        # Set by the reconciler: the file as read, and start-up times seen.
        self.declared: Callable[[], Declared | None] = lambda: None
        self.startup: Callable[[str], float | None] = lambda name: None

    async def pause(self, seconds: float) -> None:
        """Until the next round: ``seconds``, or a request for a deployment at zero."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)
        self._wake.clear()

    def forget(self, names: set[str], jobs: set[int]) -> None:
        self.autoscaler.forget(names)
        if len(self.loads) > 2 * len(jobs) + 64:
            self.loads = {k: v for k, v in self.loads.items() if k in jobs}

    # -- for the router -------------------------------------------------------------

    def serving(self, principal: Principal, model: str) -> Deployment | None:
        """A deployment the caller may use that serves ``model`` and may be at zero."""
        return next((d for d in self._zeroable(principal) if model in d.names), None)

    def sleeping(self, principal: Principal) -> list[Deployment]:
        """The deployments the caller may use that run no replica now."""
        return [d for d in self._zeroable(principal) if self._size.get(d.name, 0) == 0]

    def _zeroable(self, principal: Principal) -> list[Deployment]:
        declared = self.declared()
        if declared is None:
            return []
        return [
            d
            for _, d in sorted(declared.deployments.items())
            if d.minimum == 0
            and d.maximum > 0
            and d.served
            and (principal.is_admin or d.shared or d.spec.tenant == principal.tenant)
        ]

    def wake(self, name: str) -> None:
        """A request wants ``name`` and no replica of it runs: start one at the
        next round, now (one job, whichever replicas ask: plan.py's key)."""
        if self._size.get(name, 0) == 0 and name not in self._demand:
            self._demand[name] = self.clock()
            self._wake.set()

    def ready_in(self, name: str) -> float:
        """Seconds until a replica of ``name`` should answer, as seen so far."""
        startup = self.startup(name) or _STARTUP_GUESS
        since = self._submitted.get(name) or self._demand.get(name)
        if since is None:
            return startup
        return max(1.0, startup - (self.clock() - since))

    # -- for the reconciler -----------------------------------------------------------

    async def want(
        self, deployment: Deployment | None, built: list[tuple[Replica, Service]], now: float
    ) -> tuple[int | None, str]:
        """The count wanted (None: as declared) and why slots past the
        current count are filled."""
        if deployment is None or not (deployment.elastic or deployment.minimum == 0):
            return None, "new"
        name = deployment.name
        replicas = [r for r, _ in built]
        current = size(replicas)
        self._size[name] = current
        staying = [r.submitted for r in replicas if r.alive and not r.leaving and r.submitted]
        if staying:
            self._submitted[name] = max(staying)
        running = [
            (r, s)
            for r, s in built
            if r.alive and not r.leaving and r.status is ServiceStatus.RUNNING
        ]
        readings = await self._read(running)
        decision = self.autoscaler.decide(
            deployment, current, readings, len(running) - len(readings), now
        )
        want = current if decision.count is None else decision.count
        # Filling up to min_replicas is no scaling decision.
        grow = "scale" if current >= deployment.minimum else "new"
        demand = self._demand.get(name)
        if current > 0 or (demand is not None and now - demand > DEMAND_SECONDS):
            self._demand.pop(name, None)
        elif demand is not None and want == 0:
            want, grow = 1, "demand"
            decision = Decision(1, None, "a request arrived for it at zero replicas")
        if current > deployment.maximum:
            since = self._over.setdefault(name, now)
            if now - since < self.grace:
                decision = Decision(
                    None,
                    decision.load,
                    f"over max_replicas ({deployment.maximum}): cut {self.grace:.0f} s after "
                    "first seen, as another gateway replica may have read a newer file",
                )
                self.decisions[name] = decision
                return current, grow
        else:
            self._over.pop(name, None)
        self.decisions[name] = decision
        want = max(deployment.minimum, min(want, deployment.maximum))
        if want != current:
            self._decided(name, current, want, decision.reason, now)
        return want, grow

    async def _read(self, running: list[tuple[Replica, Service]]) -> list[Reading]:
        reader = self.read_load
        if reader is None or not running:
            return []
        got = await asyncio.gather(
            *(asyncio.wait_for(reader(service), _READ_SECONDS) for _, service in running),
            return_exceptions=True,
        )
        readings = []
        for (replica, _), value in zip(running, got, strict=True):
            if isinstance(value, BaseException):
                self.loads.pop(replica.job_id, None)
                continue
            load, finished = value
            self.loads[replica.job_id] = load
            readings.append(Reading(replica.job_id, load, finished))
        return readings

    def _decided(self, name: str, current: int, want: int, reason: str, now: float) -> None:
        """A scaling decision of this replica's, for the status (once per change)."""
        kept = self._scaled.setdefault(name, [])
        action = "scale.up" if want > current else "scale.down"
        text = f"{current} -> {want}: {reason}"
        if kept and kept[-1].reason == text:
            return
        kept.append(views.Action(at=views.utc(now), action=action, reason=text))
        del kept[: -views.RECENT_ACTIONS]
        self._note(name, action, None, text)

    def status(self, deployment: Deployment | None) -> views.Scaling | None:
        if deployment is None or not (deployment.elastic or deployment.minimum == 0):
            return None
        decision = self.decisions.get(deployment.name)
        spec = deployment.spec
        return views.Scaling(
            min_replicas=deployment.minimum,
            max_replicas=deployment.maximum,
            target_load=spec.target_load,
            load_per_replica=decision.load if decision else None,
            reason=decision.reason if decision else "no round yet",
            idle_seconds=spec.idle_seconds if deployment.minimum == 0 else None,
            decisions=list(self._scaled.get(deployment.name, [])),
        )

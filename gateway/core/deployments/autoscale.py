"""How many replicas an elastic deployment wants, from the load they report.

Every gateway replica reads the same numbers, each model server's own
(vLLM's /metrics: requests running and waiting, and its counter of finished
requests), so all decide alike. What one keeps is a few minutes of samples,
which a restarted one gathers again before it decides anything: until then
it holds the count as the jobs show it.

A sample recommends ceil(load / target_load) replicas. The count rises to the
lowest recommendation of the last ``scale_up_seconds`` once even that is over
it, and falls to the highest of the last ``scale_down_seconds`` once even
that is under it (the stabilisation windows of Kubernetes' autoscaler). It
falls to zero only with ``min_replicas = 0``, once ``idle_seconds`` passed in
which no request ran, waited or finished. Replicas still starting count as
capacity: a burst does not submit a job per request.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from gateway.core.deployments.spec import Deployment

# The most load one replica's reading counts for, in targets.
PER_REPLICA_CAP = 10.0


@dataclass(frozen=True, slots=True)
class Reading:
    """One running replica's numbers at one moment."""

    job_id: int
    # Requests running and waiting.
    load: float
    # Requests it finished since it started (a counter).
    finished: float


@dataclass(frozen=True, slots=True)
class Decision:
    # The count wanted; None: as the jobs show it.
    count: int | None
    # Mean load of the replicas that answered (None: none did).
    load: float | None
    reason: str


@dataclass(slots=True)
class _History:
    bounds: tuple[float, ...]
    since: float
    samples: deque[tuple[float, int]] = field(default_factory=deque)
    # The last moment a request ran, waited or finished.
    active: float = 0.0
    finished: dict[int, float] = field(default_factory=dict)


class Autoscaler:
    def __init__(self) -> None:
        self._history: dict[str, _History] = {}

    def forget(self, keep: set[str]) -> None:
        for name in set(self._history) - keep:
            del self._history[name]

    def decide(
        self,
        deployment: Deployment,
        current: int,
        readings: list[Reading],
        unread: int,
        now: float,
    ) -> Decision:
        """``current``: the count the jobs show (starting ones included);
        ``readings`` of the running replicas that answered, ``unread`` how many
        running ones did not."""
        spec = deployment.spec
        mean = sum(r.load for r in readings) / len(readings) if readings else None
        if not deployment.elastic:
            return Decision(None, mean, f"fixed at {deployment.maximum}")
        bounds = (
            deployment.minimum,
            deployment.maximum,
            spec.target_load,
            spec.scale_up_seconds,
            spec.scale_down_seconds,
            spec.idle_seconds,
        )
        history = self._history.get(deployment.name)
        if history is None or history.bounds != bounds or current == 0:
            # Nothing to read at zero: the idle window counts from the next start.
            history = self._history[deployment.name] = _History(bounds, now, active=now)
        if current < deployment.minimum:
            return Decision(deployment.minimum, mean, f"under min_replicas ({deployment.minimum})")
        if current > deployment.maximum:
            return Decision(deployment.maximum, mean, f"over max_replicas ({deployment.maximum})")
        if not readings:
            # Queued or starting: the idle window counts from the first answer.
            history.active = now
            if current == 0:
                return Decision(None, None, "scaled to zero: the next request starts a replica")
            return Decision(None, None, "no replica reports its load yet")
        # A server's numbers are its own word: one cannot ask for more than
        # many times the target alone.
        cap = PER_REPLICA_CAP * spec.target_load
        readings = [Reading(r.job_id, min(r.load, cap), r.finished) for r in readings]
        mean = sum(r.load for r in readings) / len(readings)
        # Those that did not answer are taken to carry the mean.
        total = (mean or 0.0) * (len(readings) + unread)
        self._activity(history, readings, now)
        wanted = math.ceil(total / spec.target_load - 1e-9)
        history.samples.append((now, wanted))
        horizon = now - max(spec.scale_up_seconds, spec.scale_down_seconds, 1.0) - 5
        while history.samples and history.samples[0][0] < horizon:
            history.samples.popleft()
        per = f"load {mean:.1f} per replica"
        up = _window(history, now, spec.scale_up_seconds)
        if up is not None and min(up) > current:
            count = min(min(up), deployment.maximum)
            if count > current:
                why = f"{per}, over the target {spec.target_load:g} for {spec.scale_up_seconds:g} s"
                return Decision(count, mean, why)
        idle = now - history.active
        if deployment.minimum == 0 and idle >= spec.idle_seconds:
            return Decision(0, mean, f"no request for {idle:.0f} s (idle_seconds)")
        down = _window(history, now, spec.scale_down_seconds)
        if down is not None and max(down) < current:
            count = max(max(down), deployment.minimum, 1)
            if count < current:
                why = (
                    f"{per}, under the target {spec.target_load:g} "
                    f"for {spec.scale_down_seconds:g} s"
                )
                return Decision(count, mean, why)
        return Decision(None, mean, f"{per}, target {spec.target_load:g}")

    @staticmethod
    def _activity(history: _History, readings: list[Reading], now: float) -> None:
        seen = history.finished
        for reading in readings:
            before = seen.get(reading.job_id)
            # Forward only: a counter that goes back is no request.
            if reading.load > 0 or (before is not None and reading.finished > before):
                history.active = now
            seen[reading.job_id] = max(reading.finished, before or 0.0)
        if len(seen) > 4 * len(readings) + 64:
            current = {r.job_id for r in readings}
            history.finished = {k: v for k, v in seen.items() if k in current}


def _window(history: _History, now: float, seconds: float) -> list[int] | None:
    """The recommendations of the last ``seconds``, once samples span them."""
    if now - history.since < seconds:
        return None
    return [wanted for at, wanted in history.samples if at >= now - seconds] or None

"""What one upstream, one tenant, and all requests together may hold of a replica.

The data path (the /v1 relay and the prompt route) shares one connection pool
and one process's memory among every tenant. Unbounded, a service that took
connections and never answered held the whole pool, and big bodies and
answers could get the pod OOM-killed with every tenant's streams in it. So:

- **in flight**: at most ``per_service`` requests at one upstream,
  ``per_tenant`` for one tenant and ``total`` in all. A request waits up to
  ``wait`` seconds for a slot, then is refused with ``Retry-After``: 429 when
  its tenant is over its share, 503 when the upstream (or the replica) is full;
- **bytes**: request bodies and the answers the gateway buffers take from one
  budget; past it a request is refused (503) instead of held in memory.

Each request holds one :class:`Lease` from its body to its last byte.
"""

from __future__ import annotations

import asyncio
from collections import deque

from gateway.core.errors import GatewayError
from gateway.core.principal import Method, Principal

RETRY_AFTER_SECONDS = 1


class Overloaded(GatewayError):
    """A request the gateway refuses rather than queue or hold: try again soon."""

    status_code = 503
    title = "Overloaded"
    code = "overloaded"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.headers = {"Retry-After": str(RETRY_AFTER_SECONDS)}


class UpstreamFull(Overloaded):
    code = "upstream_full"
    title = "The service is busy"


class TenantOverShare(Overloaded):
    status_code = 429
    code = "tenant_over_share"
    title = "Too many requests in flight"


class OverBudget(Overloaded):
    code = "memory_budget"
    title = "The gateway's memory budget is spent"


def tenant_of(principal: Principal) -> str | None:
    """The tenant whose share a request counts against; None without
    authentication, where the one anonymous caller has the whole replica."""
    return None if principal.method is Method.NONE else principal.tenant


class _Gate:
    """At most ``cap`` holders; the others wait in line, and a slot given back
    goes straight to the first in line. (asyncio.Semaphore's ``locked()``, on
    every request, cost more than this whole gate.)"""

    __slots__ = ("free", "line", "users")

    def __init__(self, cap: int) -> None:
        self.free = cap
        self.line: deque[asyncio.Future[None]] = deque()
        self.users = 0  # holders and those in line: an unused gate is forgotten

    def enter(self) -> bool:
        """A slot now, if one is free and nobody is in line before."""
        if self.free and not self.line:
            self.free -= 1
            return True
        return False

    async def wait(self, deadline: float) -> bool:
        """A slot by the (loop time) deadline; False past it."""
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.line.append(turn)
        try:
            async with asyncio.timeout_at(deadline):
                await turn
        except BaseException as exc:  # the deadline, or cancelled
            if turn.done() and not turn.cancelled():
                self.leave()  # the slot came as it gave up: the next one's
            else:
                turn.cancel()  # skipped when its turn comes
            if isinstance(exc, TimeoutError):
                return False
            raise
        return True

    def leave(self) -> None:
        while self.line:
            turn = self.line.popleft()
            if not turn.done():
                turn.set_result(None)  # the slot, handed on
                return
        self.free += 1


class _Gates:
    """A gate per key, made on first use and dropped when unused, so that the
    keys a caller can invent cost nothing once their requests end."""

    __slots__ = ("_cap", "_gates")

    def __init__(self, cap: int) -> None:
        self._cap = cap
        self._gates: dict[str, _Gate] = {}

    def enter(self, key: str) -> _Gate:
        """The key's gate, counted as used (enter it, or wait, then leave)."""
        gate = self._gates.get(key)
        if gate is None:
            gate = self._gates[key] = _Gate(self._cap)
        gate.users += 1
        return gate

    def leave(self, key: str, gate: _Gate, *, held: bool = True) -> None:
        if held:
            gate.leave()
        gate.users -= 1
        if gate.users == 0:
            del self._gates[key]


class Limits:
    """A replica's caps (GATEWAY_VLLM_* settings): requests in flight in all,
    per service and per tenant, the wait for a slot, the bytes budget."""

    def __init__(
        self,
        *,
        total: int = 4096,
        per_service: int = 1024,
        per_tenant: int = 1024,
        wait: float = 0.5,
        budget: int = 256 * 1024 * 1024,
    ) -> None:
        self.total = total
        self.per_service = per_service
        self.per_tenant = per_tenant
        self.wait = wait
        self.budget = budget
        self._total = _Gates(total)
        self._services = _Gates(per_service)
        self._tenants = _Gates(per_tenant)
        self.buffered = 0  # bytes of bodies and answers held now

    def lease(self) -> Lease:
        return Lease(self)

    def refusal(self, gates: _Gates) -> Overloaded:
        """Why a request found ``gates`` full."""
        if gates is self._tenants:
            return TenantOverShare(
                f"your tenant has {self.per_tenant} requests in flight on this replica, "
                "the most it may have"
            )
        if gates is self._services:
            return UpstreamFull(
                f"the service has {self.per_service} requests in flight from this replica, "
                "the most it is given"
            )
        return Overloaded(f"the gateway has {self.total} requests in flight, the most it takes")

    def _take(self, size: int) -> None:
        if self.buffered + size > self.budget:
            raise OverBudget(
                f"the gateway holds {self.budget // (1024 * 1024)} MiB of bodies and "
                "answers at most, and that is taken by requests in flight"
            )
        self.buffered += size


class Lease:
    """One request's slot (at an upstream, for a tenant) and bytes; released once."""

    __slots__ = ("_bytes", "_limits", "_passed")

    def __init__(self, limits: Limits) -> None:
        self._limits = limits
        self._bytes = 0
        self._passed: list[tuple[_Gates, str, _Gate]] | None = None

    def take(self, size: int) -> None:
        """``size`` more bytes held; OverBudget (and nothing taken) past the budget."""
        self._limits._take(size)
        self._bytes += size

    def give(self, size: int) -> None:
        size = min(size, self._bytes)
        self._bytes -= size
        self._limits.buffered -= size

    async def admit(self, upstream: str, tenant: str | None) -> None:
        """A slot at ``upstream`` for ``tenant``, waited for a moment at most."""
        assert self._passed is None, "one upstream at a time"
        limits = self._limits
        deadline: float | None = None  # set when a gate is full: most never wait
        passed: list[tuple[_Gates, str, _Gate]] = []
        try:
            for gates, key in (
                (limits._tenants, tenant),
                (limits._services, upstream),
                (limits._total, ""),
            ):
                if key is None:
                    continue  # no tenant: no share to keep to
                gate = gates.enter(key)
                try:
                    if not gate.enter():
                        if deadline is None:
                            deadline = asyncio.get_running_loop().time() + limits.wait
                        if not await gate.wait(deadline):
                            raise limits.refusal(gates)
                except BaseException:
                    gates.leave(key, gate, held=False)
                    raise
                passed.append((gates, key, gate))
        except BaseException:
            for gates, key, gate in reversed(passed):
                gates.leave(key, gate)
            raise
        self._passed = passed

    def leave(self) -> None:
        """The slot back (its request ended, or goes to another upstream)."""
        passed = self._passed
        if passed is None:
            return
        self._passed = None
        for gates, key, gate in reversed(passed):
            gates.leave(key, gate)

    def close(self) -> None:
        self.leave()
        self.give(self._bytes)

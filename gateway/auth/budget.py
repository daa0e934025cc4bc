"""How many Slurm tokens a replica asks slurmrestd about, and for whom.

Without the cluster's key, each new token costs slurmctld an RPC (a ping as
its user), and anyone can make up tokens. One budget for everyone let a client
sending made-up tokens lock out every genuine one, so checks are spent from
two lanes:

* *known*: tokens naming a user whose token was verified in the last day
  (a user renewing ``scontrol token``); a budget per user within the lane's
  own, so made-up tokens naming one user do not hold up the others;
* *new*: everything else, within a budget per client address (an IPv6
  client by its /64), so one client's flood costs it 429s and leaves the
  lane's budget to the others.

A known user's token that finds its lane spent tries the new lane. Refusals
carry Retry-After: 429 for a client over its own budget, 503 for a lane spent.
"""

from __future__ import annotations

import ipaddress
import math
from collections import OrderedDict
from collections.abc import Callable

from gateway.core.errors import GatewayError

# Buckets kept per client and per user; the least recently used goes first.
_KEYS = 10_000
KNOWN_FOR = 86_400.0  # seconds a verified user's new tokens take the known lane
_PER_USER = 1.0  # checks a second per known user (burst: _USER_BURST)
_USER_BURST = 5.0
_CLIENT_BURST = 5.0


class TooManyChecks(GatewayError):
    """This client sent more new Slurm tokens than its budget."""

    status_code = 429
    title = "Too many new Slurm tokens"

    def __init__(self, detail: str, *, wait: float) -> None:
        super().__init__(detail)
        self.headers = {"Retry-After": str(max(1, math.ceil(wait)))}


class ChecksBusy(GatewayError):
    """The replica's budget of token checks is spent for now."""

    status_code = 503
    title = "Busy"

    def __init__(self, detail: str, *, wait: float) -> None:
        super().__init__(detail)
        self.headers = {"Retry-After": str(max(1, math.ceil(wait)))}


class _Bucket:
    __slots__ = ("at", "burst", "rate", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.at = now

    def wait(self, now: float) -> float:
        """Seconds until one check is available (0: now)."""
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        return 0.0 if self.tokens >= 1 else (1 - self.tokens) / self.rate

    def take(self) -> None:
        self.tokens -= 1


class _Buckets:
    """One bucket per key, bounded in number."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def get(self, key: str, now: float) -> _Bucket:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(self.rate, self.burst, now)
            while len(self._buckets) > _KEYS:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        return bucket


def client_key(address: str | None) -> str:
    """The budget a client address spends: an IPv6 address by its /64 (what
    one subscriber gets), an IPv4-mapped one as the IPv4 address."""
    try:
        ip = ipaddress.ip_address(address or "")
    except ValueError:
        return address or "unknown"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class CheckBudget:
    def __init__(
        self,
        *,
        per_second: float,
        per_client: float,
        clock: Callable[[], float],
    ) -> None:
        self._clock = clock
        now = clock()
        self._new = _Bucket(per_second, per_second, now)
        self._known = _Bucket(per_second, per_second, now)
        self._clients = _Buckets(per_client, _CLIENT_BURST)
        self._users = _Buckets(_PER_USER, _USER_BURST)
        self._verified: OrderedDict[str, float] = OrderedDict()

    def verified(self, user: str) -> None:
        """``user``'s token checked out: its next new tokens take the known lane."""
        self._verified[user] = self._clock()
        self._verified.move_to_end(user)
        while len(self._verified) > _KEYS:
            self._verified.popitem(last=False)

    def spend(self, user: str, client: str | None) -> None:
        """One check of a token naming ``user`` sent from ``client``; raises
        :class:`TooManyChecks` or :class:`ChecksBusy` when none is left."""
        now = self._clock()
        seen = self._verified.get(user)
        if seen is not None and now - seen < KNOWN_FOR:
            own = self._users.get(user, now)
            if own.wait(now) == 0 and self._known.wait(now) == 0:
                own.take()
                self._known.take()
                return
        mine = self._clients.get(client_key(client), now)
        wait = mine.wait(now)
        if wait:
            raise TooManyChecks(
                "this client sent too many new Slurm tokens to check; retry after "
                "Retry-After seconds, reusing a token (checked once, then remembered)",
                wait=wait,
            )
        wait = self._new.wait(now)
        if wait:
            raise ChecksBusy(
                "too many new Slurm tokens to check right now; retry after Retry-After seconds",
                wait=wait,
            )
        mine.take()
        self._new.take()

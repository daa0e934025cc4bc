"""Prefix affinity: which of a model's services a /v1 request goes to, so that
requests that start alike meet the prefix cache their predecessors left.

vLLM keeps the KV blocks (16 tokens each) of the prompts it has seen and skips
their prefill when a later prompt starts with them. A chat session's request
repeats every earlier turn, and many requests share a long system prompt: sent
to the service that saw the start before, their prefill is mostly skipped; sent
anywhere, each service computes it once more.

The start is keyed by ``prefix_key``; the services are ranked for a key by
rendezvous (highest-random-weight) hashing of (key, service id). No shared
state: every gateway replica ranks alike, and a service joining or leaving
moves only the keys it wins or won (1/N of them). The top-ranked one takes the
request unless it is overloaded; then the next-ranked, and so on (the least
loaded one never is). Without a key, the least outstanding, turns taken on
ties, as before.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

# Bytes of the request's ``messages`` (or ``prompt``) as sent that make its key.
# 1 KiB of JSON is some 250 tokens, 16 of vLLM's blocks: two keys alike share
# at least that much cache, worth sending their requests to one service for.
# Only a longer value gets a key: a chat session's next request extends this
# one, so past 1 KiB its first 1 KiB (its key) stays the same for every later
# turn, whereas a shorter one's key would take in the closing bracket and
# move with each turn, for a few blocks of cache at most.
PREFIX_BYTES = 1024


def prefix_key(raw: bytes | bytearray | memoryview, tenant: str | None = None) -> bytes | None:
    """The key of a request's shared start, from its ``messages`` or ``prompt``
    as the client encoded them (the same client encodes the same start alike):
    a digest of their first ``PREFIX_BYTES`` bytes; None when they are no longer.
    Keyed by the tenant: another tenant's same start goes elsewhere, so that no
    tenant learns from its time to first token what another's prompts begin with."""
    if len(raw) <= PREFIX_BYTES:
        return None
    salt = (tenant or "").encode()[:64]
    return hashlib.blake2b(memoryview(raw)[:PREFIX_BYTES], digest_size=16, key=salt).digest()


def least_outstanding(loads: Sequence[int], turn: int) -> int:
    """The index of the least loaded, the scan starting at ``turn`` so that
    ties take turns."""
    start = turn % len(loads)
    best = start
    for i in range(1, len(loads)):
        at = (start + i) % len(loads)
        if loads[at] < loads[best]:
            best = at
    return best


def _weight(key: bytes, service_id: str) -> int:
    # A stable hash, unlike hash(): every process and replica ranks alike.
    digest = hashlib.blake2b(service_id.encode(), digest_size=8, key=key).digest()
    return int.from_bytes(digest, "big")


class PrefixAffinity:
    """Rendezvous hashing with a bound on the load it may cost."""

    def __init__(self, *, slack: int = 4) -> None:
        self.slack = slack

    def overloaded(self, load: int, least: int) -> bool:
        # Past twice the least loaded's count and ``slack`` more: a factor keeps
        # the imbalance affinity may cost in proportion at any load (a hit
        # saves one prefill, not a queue's worth), and within ``slack`` counts
        # differ by chance (a session's burst, this replica's share of them).
        return load > least + max(self.slack, least)

    def ranked(self, key: bytes, ids: Sequence[str]) -> list[int]:
        """Indexes of ``ids``, the key's first choice first."""
        return sorted(range(len(ids)), key=lambda i: _weight(key, ids[i]), reverse=True)

    def choose(self, key: bytes | None, ids: Sequence[str], loads: Sequence[int], turn: int) -> int:
        """The index of the service to take a request: of ``ids`` (service ids)
        and ``loads`` (their outstanding requests on this replica), alike in
        length and not empty; ``turn`` a counter the caller advances per call."""
        if key is None:
            return least_outstanding(loads, turn)
        least = min(loads)
        top = max(range(len(ids)), key=lambda i: _weight(key, ids[i]))
        if not self.overloaded(loads[top], least):
            return top
        return next(i for i in self.ranked(key, ids) if not self.overloaded(loads[i], least))


# The router's (gateway/core/routing.py).
CHOOSER = PrefixAffinity()

"""The names and addresses of cluster nodes, to check where a job says it listens.

A job publishes its endpoint itself, so a hostile job could name any host,
the gateway's own loopback included. An endpoint is believed only when its
host is one of the names of the node Slurm runs the job on. Nodes rarely
change address, so each node is asked about once per ``ttl`` (the RPC load
grows with the nodes in use, not with clients or polls), and concurrent
lookups of one node share one request.

The gateway then connects to the node's address as Slurm has it (NodeAddr),
not to the name the job published: Slurm reaches its nodes that way, while the
gateway's host may not resolve the nodes' host names at all.
"""

from __future__ import annotations

import asyncio
import contextvars
import ipaddress
import time

import msgspec
import structlog

from gateway.core.scheduler import Scheduler
from gateway.slurm import NodeInfo

log = structlog.get_logger(__name__)


class Node(msgspec.Struct, frozen=True):
    names: frozenset[str]  # lower case: Slurm's name, the host name, the address
    address: str  # where to connect: NodeAddr, else the name

    def connect_host(self, published: str) -> str | None:
        """Where to reach a server the job says listens on ``published``
        (brackets allowed); None when that is not one of this node's names."""
        bare = published[1:-1] if published.startswith("[") else published
        if bare.lower() not in self.names:
            return None
        # A specific address of the node is what the server listens on.
        host = bare if _is_ip(bare) else self.address
        return f"[{host}]" if ":" in host else host


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


class NodeAddresses:
    def __init__(self, slurm: Scheduler, *, ttl: float = 300.0) -> None:
        self._slurm = slurm
        self._ttl = ttl
        self._known: dict[str, tuple[float, Node]] = {}
        self._inflight: dict[str, asyncio.Task[Node]] = {}

    async def get(self, node: str) -> Node:
        """The node's names and address. Raises the Slurm error when the lookup fails."""
        known = self._known.get(node)
        if known is not None and time.monotonic() < known[0]:
            return known[1]
        task = self._inflight.get(node)
        if task is None:
            task = asyncio.create_task(self._lookup(node), context=contextvars.Context())
            self._inflight[node] = task
            task.add_done_callback(lambda _t: self._inflight.pop(node, None))
        return await asyncio.shield(task)

    async def _lookup(self, node: str) -> Node:
        info = await self._slurm.get_node(node)
        names = frozenset(n.lower() for n in (node, info.name, info.hostname, info.address) if n)
        found = Node(names=names, address=info.address or info.name or node)
        now = time.monotonic()
        self._known[node] = (now + self._ttl, found)
        if len(self._known) > 65536:  # nodes long gone
            self._known = {k: v for k, v in self._known.items() if v[0] > now}
        return found


class NodeStates:
    """Which nodes jobs cannot start on (drained, down...), to say why a job
    waits. Reads never wait for Slurm: they get the last listing, and a
    listing older than ``ttl`` is renewed in the background, one at a time,
    only while jobs wait on nodes."""

    def __init__(self, slurm: Scheduler, *, ttl: float = 30.0, named: int = 3) -> None:
        self._slurm = slurm
        self._ttl = ttl
        self._named = named
        self._down: list[NodeInfo] = []
        self._until = 0.0
        self._refresh: asyncio.Task[None] | None = None

    def unavailable(self, among: frozenset[str] | None = None) -> str | None:
        """``node n1 drained (reason)`` and the like for the nodes ``among``
        (all when None), from the last listing; None when there is nothing to say."""
        if time.monotonic() >= self._until and self._refresh is None:
            self._refresh = asyncio.create_task(self._list(), context=contextvars.Context())
            self._refresh.add_done_callback(self._done)
        found = [n for n in self._down if among is None or n.name in among]
        parts = [
            f"node {n.name} {n.unavailable}" + (f" ({n.reason[:120]})" if n.reason else "")
            for n in found[: self._named]
        ]
        if len(found) > self._named:
            parts.append(f"{len(found) - self._named} more nodes unavailable")
        return "; ".join(parts) or None

    def _done(self, _task: asyncio.Task[None]) -> None:
        self._refresh = None

    async def _list(self) -> None:
        try:
            nodes = await self._slurm.list_nodes()
        except Exception as exc:  # a background refresh: log it, keep the last listing
            log.warning("node_listing_failed", error=repr(exc)[:300])
        else:
            self._down = [n for n in nodes if n.unavailable]
        self._until = time.monotonic() + self._ttl
        self._refresh = None  # (also on cancellation, by the done callback)

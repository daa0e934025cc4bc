"""The names and addresses of cluster nodes, to check where a job says it listens.

A job publishes its endpoint itself, so a hostile job could name any host,
the gateway's own loopback included. An endpoint is believed only when its
host is one of the names of the node Slurm runs the job on. Nodes rarely
change address, so each node is asked about once per ``ttl`` (the RPC load
grows with the nodes in use, not with clients or polls), and concurrent
lookups of one node share one request.
"""

from __future__ import annotations

import asyncio
import time

from gateway.slurm import SlurmClient


class NodeAddresses:
    def __init__(self, slurm: SlurmClient, *, ttl: float = 300.0) -> None:
        self._slurm = slurm
        self._ttl = ttl
        self._known: dict[str, tuple[float, frozenset[str]]] = {}
        self._inflight: dict[str, asyncio.Task[frozenset[str]]] = {}

    async def names(self, node: str) -> frozenset[str]:
        """Every name the node answers to, lower case: its Slurm name, host
        name and address. Raises the Slurm error when the lookup fails."""
        known = self._known.get(node)
        if known is not None and time.monotonic() < known[0]:
            return known[1]
        task = self._inflight.get(node)
        if task is None:
            task = asyncio.create_task(self._lookup(node))
            self._inflight[node] = task
            task.add_done_callback(lambda _t: self._inflight.pop(node, None))
        return await asyncio.shield(task)

    async def _lookup(self, node: str) -> frozenset[str]:
        info = await self._slurm.get_node(node)
        names = frozenset(n.lower() for n in (node, info.name, info.hostname, info.address) if n)
        now = time.monotonic()
        self._known[node] = (now + self._ttl, names)
        if len(self._known) > 65536:  # nodes long gone
            self._known = {k: v for k, v in self._known.items() if v[0] > now}
        return names

"""Where a job's published endpoint is reached: only on its node, at the node's address."""

from __future__ import annotations

import asyncio
from typing import cast

import pytest

from gateway.core.nodes import Node, NodeStates
from gateway.slurm import NodeInfo, SlurmClient

NODE = Node(names=frozenset({"gpu7", "gpu7.cluster", "10.1.2.7"}), address="10.1.2.7")
V6 = Node(names=frozenset({"gpu8", "fd00::8"}), address="fd00::8")


@pytest.mark.parametrize(
    ("node", "published", "host"),
    [
        (NODE, "gpu7", "10.1.2.7"),
        (NODE, "GPU7.cluster", "10.1.2.7"),
        (NODE, "10.1.2.7", "10.1.2.7"),
        (V6, "gpu8", "[fd00::8]"),
        (V6, "[fd00::8]", "[fd00::8]"),
        (NODE, "localhost", None),
        (NODE, "127.0.0.1", None),
        (NODE, "gpu8", None),
        (NODE, "evil.invalid", None),
    ],
)
def test_an_endpoint_is_reached_at_its_nodes_address(
    node: Node, published: str, host: str | None
) -> None:
    assert node.connect_host(published) == host


class Listing:
    """Stands in for SlurmClient.list_nodes: counts the calls, can fail."""

    def __init__(self, nodes: list[NodeInfo]) -> None:
        self.nodes = nodes
        self.calls = 0
        self.fail = False

    async def list_nodes(self) -> list[NodeInfo]:
        self.calls += 1
        if self.fail:
            raise RuntimeError("slurmrestd went away")
        return self.nodes


async def test_node_states_never_wait_and_list_once_per_ttl() -> None:
    drained = NodeInfo(
        name="n1", hostname="n1", address="n1", state=("IDLE", "DRAIN"), reason="disk"
    )
    down = NodeInfo(name="n2", hostname="n2", address="n2", state=("DOWN",))
    idle = NodeInfo(name="n3", hostname="n3", address="n3", state=("IDLE",))
    slurm = Listing([drained, down, idle])
    states = NodeStates(cast(SlurmClient, slurm), ttl=60)
    assert states.unavailable() is None  # nothing known yet: asked in the background
    await asyncio.sleep(0)
    assert states.unavailable() == "node n1 drained (disk); node n2 down"
    assert states.unavailable(frozenset({"n2"})) == "node n2 down"
    assert states.unavailable(frozenset({"n3"})) is None
    assert slurm.calls == 1
    # A failed refresh keeps the last listing.
    slurm.fail = True
    states._until = 0.0
    states.unavailable()
    await asyncio.sleep(0)
    assert slurm.calls == 2
    assert states.unavailable(frozenset({"n1"})) == "node n1 drained (disk)"

"""Where a job's published endpoint is reached: only on its node, at the node's address."""

from __future__ import annotations

import pytest

from gateway.core.nodes import Node

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

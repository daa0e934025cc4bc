"""Node answers as current.py reads them for every version (v0.0.38's one state
word and flags included), written here: which record a lookup picks, which
failures stay typed, which states a listing reports."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gateway.slurm import SlurmNodeNotFound, SlurmRequestRejected, SlurmUnavailable
from gateway.slurm.adapters import adapter_for


def _nodes_body(*names: str, version: str) -> bytes:
    nodes = [{"name": n, "hostname": f"{n}.lan", "address": "10.0.0.7"} for n in names]
    if version == "v0.0.38":
        return json.dumps({"meta": {}, "errors": [], "nodes": nodes}).encode()
    last_update = {"set": True, "infinite": False, "number": 1795828827}
    body = {"nodes": nodes, "last_update": last_update, "errors": [], "warnings": []}
    return json.dumps(body).encode()


@pytest.mark.parametrize("version", ["v0.0.38", "v0.0.42"])
def test_node_lookup_picks_the_named_record(version: str) -> None:
    adapter = adapter_for(version)
    body = _nodes_body("n1", "n2", version=version)
    found = adapter.parse_node(200, body, "n2")
    assert (found.name, found.hostname, found.address) == ("n2", "n2.lan", "10.0.0.7")
    # One record is Slurm's match for the name asked (an alias, say).
    assert adapter.parse_node(200, _nodes_body("n1", version=version), "alias").name == "n1"
    with pytest.raises(SlurmNodeNotFound):
        adapter.parse_node(200, body, "n3")
    with pytest.raises(SlurmNodeNotFound):
        adapter.parse_node(200, _nodes_body(version=version), "n1")


@pytest.mark.parametrize("version", ["v0.0.38", "v0.0.42"])
def test_node_lookup_keeps_other_failures_typed(version: str) -> None:
    adapter = adapter_for(version)
    down = {"errors": [{"error_number": 1001, "error": "Unable to contact slurm controller"}]}
    with pytest.raises(SlurmUnavailable):
        adapter.parse_node(500, json.dumps(down).encode(), "n1")
    denied = {"errors": [{"error_number": 2002, "error": "Access/permission denied"}]}
    with pytest.raises(SlurmRequestRejected) as info:
        adapter.parse_node(500, json.dumps(denied).encode(), "n1")
    assert not isinstance(info.value, SlurmNodeNotFound)
    with pytest.raises(SlurmUnavailable):
        adapter.parse_node(503, b"<html>upstream down</html>", "n1")


# Node states as 22.05 (one word plus flags) and 24.11 (a list) report a
# drained node, checked live; and the words the gateway reads from them.
@pytest.mark.parametrize(
    ("version", "record", "state", "unavailable"),
    [
        ("v0.0.38", {"state": "idle", "state_flags": ["DRAIN"]}, ("IDLE", "DRAIN"), "drained"),
        ("v0.0.42", {"state": ["MIXED", "DRAIN"]}, ("MIXED", "DRAIN"), "draining"),
        ("v0.0.42", {"state": ["IDLE", "NOT_RESPONDING"]}, ("IDLE", "NOT_RESPONDING"), "down"),
        ("v0.0.45", {"state": ["DOWN"]}, ("DOWN",), "down"),
        ("v0.0.45", {"state": ["IDLE"]}, ("IDLE",), None),
        ("v0.0.38", {"state": "allocated", "state_flags": []}, ("ALLOCATED",), None),
    ],
)
def test_node_listing_reads_states(
    version: str, record: dict[str, Any], state: tuple[str, ...], unavailable: str | None
) -> None:
    node = {"name": "n1", "hostname": "n1", "address": "10.0.0.1", "reason": "disk", **record}
    body = json.dumps({"nodes": [node], "errors": [], "warnings": []}).encode()
    adapter = adapter_for(version)
    assert adapter.list_nodes_request().path == f"/slurm/{version}/nodes"
    (info,) = adapter.parse_nodes(200, body)
    assert info.state == state
    assert info.unavailable == unavailable
    assert info.reason == "disk"

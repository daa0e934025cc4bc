"""The local Slurm clusters as the integration tests see them, the lines they
add to pytest's summary, and parametrizing a test over them."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

from gateway.testing.clusters import LocalCluster, discover, local_root

CLUSTERS = discover()
# The clusters whose chroot has the local vLLM runtime (deploy/local/vllm-runtime.sh).
VLLM_CLUSTERS = [c for c in CLUSTERS if (Path(c.chroot) / "opt/vllm/bin/python").exists()]
NO_CLUSTERS = f"no local Slurm clusters under {local_root()}; run `make cluster` first"
NO_VLLM = "no local cluster has the vLLM runtime; run deploy/local/vllm-runtime.sh"
# (cluster, Slurm release, API version) as negotiated by the tests, for the summary.
NEGOTIATED: list[tuple[str, str, str]] = []
# Lines about how long things took, for the summary.
TIMINGS: list[str] = []


def named(*names: str) -> list[LocalCluster]:
    """The clusters of these names, all of them up."""
    found = {c.name: c for c in CLUSTERS}
    missing = [name for name in names if name not in found]
    if missing:
        # A missing cluster is a failure, never a silent skip.
        raise pytest.UsageError(
            f"clusters {missing} are not up; run `bash deploy/local/cluster.sh up`"
        )
    return [found[name] for name in names]


def parametrize(
    metafunc: pytest.Metafunc,
    name: str,
    clusters: Sequence[LocalCluster],
    *,
    per_module: bool = False,
    missing: str = NO_CLUSTERS,
) -> bool:
    """Run the test once per cluster when it takes ``name``: the cluster itself,
    or (``per_module``) what the module-scoped fixture ``name`` makes of it.
    False when the test does not take ``name``."""
    if name not in metafunc.fixturenames:
        return False
    if not clusters:
        # A missing cluster is a failure, never a silent skip.
        raise pytest.UsageError(missing)
    ids = [c.name for c in clusters]
    if per_module:
        metafunc.parametrize(name, clusters, ids=ids, indirect=True, scope="module")
    else:
        metafunc.parametrize(name, clusters, ids=ids)
    return True


def fault_line(cluster: LocalCluster, fault: str, during: str, after: str, lost: int) -> None:
    """One row of the fault table (tests/integration/test_faults.py), for the summary."""
    TIMINGS.append(
        f"fault | {cluster.name} | {fault} | during: {during} | after: {after} | lost: {lost}"
    )


async def cluster_up(cluster: LocalCluster) -> None:
    """Start whatever daemons of ``cluster`` a test stopped (cluster.sh up)."""
    script = Path(__file__).resolve().parents[2] / "deploy" / "local" / "cluster.sh"
    await asyncio.to_thread(
        subprocess.run,
        [str(script), "up", cluster.name],
        check=True, timeout=300, capture_output=True,
    )  # fmt: skip

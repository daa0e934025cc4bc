"""The local Slurm clusters as the integration tests see them, and the lines
they add to pytest's summary."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

from gateway.testing.clusters import LocalCluster, discover

CLUSTERS = discover()
# (cluster, Slurm release, API version) as negotiated by the tests, for the summary.
NEGOTIATED: list[tuple[str, str, str]] = []
# Lines about how long things took, for the summary.
TIMINGS: list[str] = []


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

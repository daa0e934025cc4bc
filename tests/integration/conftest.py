from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.slurm import SlurmClient
from gateway.testing.clusters import LocalCluster, discover, local_root

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


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for name, release, version in NEGOTIATED:
        terminalreporter.write_line(f"cluster {name}: Slurm {release}, slurmrestd API {version}")
    for line in TIMINGS:
        terminalreporter.write_line(line)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "integration" in str(item.path):
            item.add_marker(pytest.mark.integration)
    # The check that no job left a process behind looks after everything else.
    last = "test_no_process_outlives_its_job"
    items.sort(key=lambda item: getattr(item, "originalname", "") == last)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "cluster" in metafunc.fixturenames:
        if not CLUSTERS:
            # A missing cluster is a failure, never a silent skip.
            raise pytest.UsageError(
                f"no local Slurm clusters under {local_root()}; run `make cluster` first"
            )
        metafunc.parametrize("cluster", CLUSTERS, ids=[c.name for c in CLUSTERS])


@pytest.fixture
async def client(cluster: LocalCluster) -> AsyncIterator[SlurmClient]:
    async with cluster.client() as c:
        yield c


async def cluster_up(cluster: LocalCluster) -> None:
    """Start whatever daemons of ``cluster`` a test stopped (cluster.sh up)."""
    script = Path(__file__).resolve().parents[2] / "deploy" / "local" / "cluster.sh"
    await asyncio.to_thread(
        subprocess.run,
        [str(script), "up", cluster.name],
        check=True, timeout=300, capture_output=True,
    )  # fmt: skip

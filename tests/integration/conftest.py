from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from gateway.slurm import SlurmClient
from gateway.testing.clusters import LocalCluster
from tests.support.clusters import CLUSTERS, NEGOTIATED, TIMINGS, parametrize


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
    parametrize(metafunc, "cluster", CLUSTERS)


@pytest.fixture
async def client(cluster: LocalCluster) -> AsyncIterator[SlurmClient]:
    async with cluster.client() as c:
        yield c

"""pytest fixtures for a module that tests one live gateway per cluster. The
module takes them all (``from tests.support.gateway_per_cluster import *``),
``pytest_generate_tests`` with them: each test taking ``gateway`` runs once per
cluster, on that cluster's gateway (one per module and cluster)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

from gateway.testing.clusters import LocalCluster
from tests.support.clusters import CLUSTERS, parametrize
from tests.support.gateway_process import GatewayProcess
from tests.support.live_services import Services

__all__ = ["api", "cluster_of", "gateway", "pytest_generate_tests", "services"]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    parametrize(metafunc, "gateway", CLUSTERS, per_module=True)


@pytest.fixture(scope="module")
def gateway(request: pytest.FixtureRequest) -> Iterator[GatewayProcess]:
    cluster: LocalCluster = request.param
    with GatewayProcess(cluster) as process:
        yield process


@pytest.fixture
async def api(gateway: GatewayProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:
        yield client


@pytest.fixture
def cluster_of(gateway: GatewayProcess) -> LocalCluster:
    return gateway.cluster


@pytest.fixture
async def services(api: httpx.AsyncClient) -> AsyncIterator[Services]:
    tracker = Services(api)
    try:
        yield tracker
    finally:
        await tracker.cleanup()

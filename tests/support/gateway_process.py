"""Runs the real gateway (``python -m gateway``) as a process for the tests."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Self

import httpx

from gateway.testing.clusters import LocalCluster
from tests.support.lifecycle import Running
from tests.support.polling import free_port

ROOT = Path(__file__).resolve().parents[2]


class GatewayProcess(Running):
    def __init__(self, cluster: LocalCluster, **env: str) -> None:
        self.cluster = cluster
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = Path(f"/tmp/gateway-test-{cluster.name}-{self.port}.log")
        self.env = {
            **os.environ,
            "GATEWAY_HOST": "127.0.0.1",
            "GATEWAY_PORT": str(self.port),
            "GATEWAY_SLURM_CLUSTER_FILE": str(Path(cluster.chroot).parent / "cluster.json"),
            "GATEWAY_SITE_FILE": str(ROOT / "deploy" / "local" / "site.toml"),
            "GATEWAY_RECIPES_DIRS": f"{ROOT / 'recipes'}:{ROOT / 'tests' / 'recipes'}",
            "GATEWAY_HEALTH_CACHE_SECONDS": "1",
            # One process, as the tests count what it holds and does (the
            # default is one per CPU).
            "GATEWAY_WORKERS": "1",
            **env,
        }
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Self:
        log = self.log.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gateway"], env=self.env, stdout=log, stderr=log, cwd=ROOT
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gateway exited: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/api/v1/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"gateway did not start: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()


@asynccontextmanager
async def serving(cluster: LocalCluster, **env: str) -> AsyncIterator[httpx.AsyncClient]:
    """A client of a gateway that runs for the block (started and stopped in a
    thread: the start waits for its health, which would block the loop)."""
    gateway = GatewayProcess(cluster, **env)
    await asyncio.to_thread(gateway.start)
    try:
        async with httpx.AsyncClient(base_url=gateway.url, timeout=60) as client:
            yield client
    finally:
        await asyncio.to_thread(gateway.stop)

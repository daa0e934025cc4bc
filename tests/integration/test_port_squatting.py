"""A port taken by another process is never published, so the gateway never
sends a service's key there.

Between the job's check that its port is free (``gw_free_port``) and its
server's bind, anyone on the node may bind that port and answer ``/health``:
vLLM imports for many seconds first (about 9 s here). The test binds the
service's port once the service says it is starting, with a listener that
answers everything and notes each request's Authorization header: as root
(another user) or as the job's own user against the test recipe, whose window
is its START_SECONDS; as root against the real vLLM. The service must end
``failed`` saying the port is held by another process, and the listener must
never see the key.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from gateway.testing.clusters import LocalCluster
from tests.support.clusters import TIMINGS, VLLM_CLUSTERS
from tests.support.gateway_process import serving
from tests.support.polling import free_port, poll

SQUATTER = """import http.server, sys
class Record(http.server.BaseHTTPRequestHandler):
    def answer(self):
        print("request", self.command, self.path, self.headers.get("Authorization"), flush=True)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"object": "list", "data": []}')
    do_GET = do_POST = answer
    def log_message(self, *args):
        pass
server = http.server.ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), Record)
print("listening", flush=True)
server.serve_forever()
"""

WINDOW = 10  # START_SECONDS: how long the job waits between its check and its bind


@pytest.fixture
async def api(cluster: LocalCluster) -> AsyncIterator[httpx.AsyncClient]:
    async with serving(cluster) as client:
        yield client


def squat(cluster: LocalCluster, who: str, port: int) -> subprocess.Popen[str]:
    """A listener on ``port`` run by ``who``: root on this host, or a cluster
    user inside the cluster's chroot (the node's view)."""
    if who == "root":
        command = [sys.executable, "-c", SQUATTER, str(port)]
    else:
        uid, gid = cluster.user_ids(who)
        command = [
            "chroot", f"--userspec={uid}:{gid}", cluster.chroot, "/usr/bin/env", "-i",
            "PATH=/usr/bin:/bin", "python3", "-c", SQUATTER, str(port),
        ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    assert process.stdout.readline() == "listening\n", "the squatter could not bind"
    return process


@pytest.mark.parametrize("who", ["root", "job user"])
async def test_a_port_taken_after_the_check_gets_no_key(
    cluster: LocalCluster, api: httpx.AsyncClient, who: str
) -> None:
    user = "root" if who == "root" else cluster.user
    port = free_port()
    environment = {"PORT": str(port), "START_SECONDS": str(WINDOW)}
    await squatted(cluster, api, "testing/http", environment, who, user, port)


@pytest.mark.parametrize("vllm_cluster", VLLM_CLUSTERS, ids=[c.name for c in VLLM_CLUSTERS])
async def test_a_port_taken_before_vllm_binds_gets_no_key(vllm_cluster: LocalCluster) -> None:
    async with serving(vllm_cluster) as api:
        port = free_port()
        environment = {"VLLM_MODEL": "gpt2", "VLLM_PORT": str(port)}
        await squatted(vllm_cluster, api, "inference/vllm", environment, "root", "root", port)


async def squatted(
    cluster: LocalCluster,
    api: httpx.AsyncClient,
    recipe: str,
    environment: dict[str, str],
    who: str,
    user: str,
    port: int,
) -> None:
    """Create the service, take its port once it starts, check what came of it."""
    body: dict[str, Any] = {"recipe_name": recipe, "config": {"environment": environment}}
    created = await api.post("/api/v1/services", json=body)
    assert created.status_code == 201, created.text
    sid = created.json()["id"]
    squatter: subprocess.Popen[str] | None = None
    try:
        # The job has checked its port and waits before it binds: take the port.
        await poll(
            lambda: api.get(f"/api/v1/services/{sid}/status"),
            lambda r: r.json()["status"] == "starting",
            timeout=60,
            what="the service starting",
        )
        taken_at = time.monotonic()
        squatter = await asyncio.to_thread(squat, cluster, user, port)
        ended = await poll(
            lambda: api.get(f"/api/v1/services/{sid}/status"),
            lambda r: r.json()["status"] not in ("pending", "building", "starting"),
            timeout=WINDOW + 60,
            what="the service giving up",
        )
        status = ended.json()
    finally:
        await api.delete(f"/api/v1/services/{sid}")
        if squatter is not None:
            squatter.kill()
    assert squatter is not None and squatter.stdout is not None
    requests = squatter.stdout.read().splitlines()
    with_key = [line for line in requests if not line.endswith(" None")]
    assert with_key == [], f"the squatter got the service's key: {with_key}"
    assert status["status"] == "failed", status
    assert f"port {port} on " in status["status_reason"], status
    assert "is held by another process" in status["status_reason"], status
    TIMINGS.append(
        f"squatting | {cluster.name} | {recipe}: port {port} taken by {who} ({user}) after "
        f"the job's check | service failed {time.monotonic() - taken_at:.0f} s later "
        f'("{status["status_reason"]}"); the squatter got {len(requests)} requests, '
        f"{len(with_key)} with the key"
    )

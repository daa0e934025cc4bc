"""The shared job view of live gateway replicas: what each shows, and how soon.

A replica shows what it did itself at once, and what happened elsewhere (another
replica, ``scancel`` on a login node) within its refresh interval (1 s by
default) plus one listing. Restarts of the gateway or of slurmctld lose nothing.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx

from gateway.testing.clusters import LocalCluster
from tests.support.clusters import TIMINGS, cluster_up
from tests.support.gateway_per_cluster import *  # noqa: F403 - its fixtures
from tests.support.gateway_process import GatewayProcess
from tests.support.live_services import Services
from tests.support.polling import poll

ROOT = Path(__file__).resolve().parents[2]
# The documented bound (refresh interval 1 s, plus a listing) with room for
# this small, busy machine.
BOUND = 5.0


async def status_on(client: httpx.AsyncClient, service_id: str) -> dict[str, Any]:
    response = await client.get(f"/api/v1/services/{service_id}/status")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def test_a_replica_shows_its_own_writes_at_once(services: Services) -> None:
    created = await services.http(MESSAGE="mine")
    # No wait: the replica that created it shows it on the next read, pending
    # (or already further, if a listing caught the job starting meanwhile).
    status = await status_on(services.api, created["id"])
    assert status["status"] in ("pending", "building", "starting"), status
    listed = {s["id"] for s in (await services.api.get("/api/v1/services")).json()}
    assert created["id"] in listed
    await services.wait(created["id"], "running")
    stop = await services.api.delete(f"/api/v1/services/{created['id']}")
    assert stop.json()["status"] == "cancelled"
    assert (await status_on(services.api, created["id"]))["status"] == "cancelled"


async def test_another_replica_follows_within_the_bound(
    services: Services, cluster_of: LocalCluster
) -> None:
    with GatewayProcess(cluster_of) as second:
        async with httpx.AsyncClient(base_url=second.url, timeout=30) as other:
            created = await services.http(MESSAGE="shared")
            # Unknown to the second replica's view: it lists once and finds it.
            seen = await status_on(other, created["id"])
            assert seen["status"] in ("pending", "building", "starting", "running"), seen
            await services.wait(created["id"], "running")
            await poll(lambda: status_on(other, created["id"]), lambda s: s["status"] == "running")
            await services.api.delete(f"/api/v1/services/{created['id']}")
            t0 = time.monotonic()
            await poll(
                lambda: status_on(other, created["id"]),
                lambda s: s["status"] == "cancelled",
                timeout=BOUND,
                interval=0.05,
            )
            TIMINGS.append(
                f"view on {cluster_of.name}: a stop on one replica showed on another "
                f"after {time.monotonic() - t0:.2f} s"
            )


async def test_a_job_cancelled_outside_the_gateway_shows_cancelled(
    services: Services, cluster_of: LocalCluster
) -> None:
    created = await services.http(MESSAGE="scancel me")
    await services.wait(created["id"], "running")
    cluster_of.run_as(cluster_of.user, "scancel", created["id"])
    t0 = time.monotonic()
    final = await poll(
        lambda: status_on(services.api, created["id"]),
        lambda s: s["status"] == "cancelled",
        timeout=BOUND,
        interval=0.05,
    )
    assert final["slurm_state"] == "CANCELLED"
    took = time.monotonic() - t0
    TIMINGS.append(f"view on {cluster_of.name}: scancel showed as cancelled after {took:.2f} s")


async def test_gateway_and_slurmctld_restarts_lose_nothing(
    services: Services, cluster_of: LocalCluster
) -> None:
    created = await services.http(MESSAGE="survivor")
    await services.wait(created["id"], "running")
    running = (await services.api.get(f"/api/v1/services/{created['id']}")).json()
    stable = ("id", "name", "recipe_name", "config", "created_at", "node", "endpoint")
    # A fresh replica (a restarted gateway) rebuilds the same service from Slurm.
    with GatewayProcess(cluster_of) as fresh:
        async with httpx.AsyncClient(base_url=fresh.url, timeout=30) as api:
            again = (await api.get(f"/api/v1/services/{created['id']}")).json()
            assert {k: again[k] for k in stable} == {k: running[k] for k in stable}

    # slurmctld goes away and comes back (its state saved to disk).
    await asyncio.to_thread(
        subprocess.run,
        ["chroot", cluster_of.chroot, "/usr/bin/env", "-i", "PATH=/usr/bin:/usr/sbin",
         "scontrol", "shutdown", "slurmctld"],
        check=True, timeout=30,
    )  # fmt: skip
    try:
        # Meanwhile the view answers from what it last listed.
        assert (await status_on(services.api, created["id"]))["status"] == "running"
    finally:
        await cluster_up(cluster_of)
    t0 = time.monotonic()
    back = await poll(
        lambda: status_on(services.api, created["id"]),
        lambda s: s["status"] == "running" and s["slurm_state"] == "RUNNING",
        timeout=30,
    )
    assert {k: back[k] for k in ("id", "node", "endpoint")} == {
        k: running[k] for k in ("id", "node", "endpoint")
    }
    # And the replica submits again.
    later = await services.http(MESSAGE="after the restart")
    await services.wait(later["id"], "running")
    TIMINGS.append(
        f"view on {cluster_of.name}: after a slurmctld restart the view was current "
        f"again {time.monotonic() - t0:.2f} s after cluster.sh up returned"
    )

"""The services and recipes API of a live gateway process on every local cluster."""

from __future__ import annotations

import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

import httpx

from gateway.slurm import JobSubmission
from gateway.slurm.adapters import SUPPORTED_VERSIONS
from gateway.testing.clusters import LocalCluster
from tests.support.clusters import TIMINGS
from tests.support.gateway_per_cluster import *  # noqa: F403 - its fixtures
from tests.support.gateway_process import GatewayProcess
from tests.support.live_services import Services
from tests.support.polling import poll

TERMINAL = {"completed", "failed", "cancelled", "timeout"}


# -- the seed document's examples, as curl runs them ------------------------------

SEED_CREATE_BODIES = [
    '{"recipe_name": "inference/vllm"}',
    '{"recipe_name": "inference/vllm", "config": {"environment": {"VLLM_MODEL": "gpt2"}}}',
    '{"recipe_name": "inference/vllm", "config": {"environment": {"VLLM_MODEL": "gpt2"},'
    ' "resources": {"nodes": 1, "cpu": "8", "memory": "64G", "time_limit": 120, "gpu": "1"}}}',
    '{"recipe_name": "inference/vllm", "config": {"environment": {"VLLM_MODEL": "gpt2",'
    ' "VLLM_HOST": "0.0.0.0", "VLLM_PORT": "8001", "VLLM_MAX_MODEL_LEN": "2048",'
    ' "VLLM_TENSOR_PARALLEL_SIZE": "1", "VLLM_GPU_MEMORY_UTILIZATION": "0.9",'
    ' "CUDA_VISIBLE_DEVICES": "0"}, "resources": {"nodes": 1, "cpu": "2", "memory": "32G",'
    ' "time_limit": 15, "gpu": "1"}}}',
    '{"recipe_name": "inference/vllm", "config": {"environment": {"VLLM_MODEL": "gpt2"},'
    ' "resources": {"nodes": 1, "cpu": "4", "memory": "16G", "gpu": null}}}',
]


def curl(*args: str) -> tuple[int, Any]:
    """Run curl as the seed document does; return the HTTP status and the JSON body."""
    assert shutil.which("curl"), "curl is needed for the seed examples"
    out = subprocess.run(
        ["curl", "-sS", "-w", "\n%{http_code}", *args],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    body, _, status = out.rpartition("\n")
    import json

    return int(status), json.loads(body) if body.strip() else None


async def test_seed_examples_with_curl(gateway: GatewayProcess, services: Services) -> None:
    base = gateway.url
    created: list[dict[str, Any]] = []
    for body in SEED_CREATE_BODIES:
        status, service = curl(
            "-X", "POST", f"{base}/api/v1/services",
            "-H", "Content-Type: application/json",
            "-d", body,
        )  # fmt: skip
        assert status == 201, service
        services.ids.append(service["id"])
        assert service["recipe_name"] == "inference/vllm"
        assert service["status"] in {"pending", "building", "starting", "failed"}
        created.append(service)
    first, custom, sized, full, cpu_only = created
    assert first["config"]["environment"]["VLLM_MODEL"] == "Qwen/Qwen2.5-0.5B-Instruct"
    assert custom["config"]["environment"]["VLLM_MODEL"] == "gpt2"
    assert sized["config"]["resources"] == {
        "nodes": 1, "cpu": "8", "memory": "64G", "time_limit": 120, "gpu": "1",
    }  # fmt: skip
    assert full["config"]["environment"]["VLLM_PORT"] == "8001"
    assert cpu_only["config"]["resources"]["gpu"] is None

    status, listed = curl(f"{base}/api/v1/services")
    assert status == 200
    listed_ids = {s["id"] for s in listed}
    assert {s["id"] for s in created} <= listed_ids

    sid = first["id"]
    status, detail = curl(f"{base}/api/v1/services/{sid}")
    assert status == 200
    assert detail["id"] == sid
    assert detail["name"] == f"vllm-{sid}"
    status, state = curl(f"{base}/api/v1/services/{sid}/status")
    assert status == 200
    assert state["status"] in {"pending", "building", "starting", "running", "failed"}
    await services.wait(sid, "building", "starting", "running", *TERMINAL)
    status, logs = curl(f"{base}/api/v1/services/{sid}/logs")
    assert status in (200, 404, 409), logs
    for service in created:
        status, stopped = curl("-X", "DELETE", f"{base}/api/v1/services/{service['id']}")
        assert status == 200, stopped
    status, recipes = curl(f"{base}/api/v1/recipes")
    assert status == 200
    assert "inference/vllm" in {r["path"] for r in recipes}
    status, recipe = curl(f"{base}/api/v1/recipes/inference/vllm")
    assert status == 200
    assert recipe["path"] == "inference/vllm"


# -- the status walk -------------------------------------------------------------


async def test_status_walk_pending_to_cancelled(
    services: Services, cluster_of: LocalCluster
) -> None:
    # A blocker holding every CPU of the node keeps the next service pending.
    blocker = await services.create(
        {"recipe_name": "testing/http", "config": {"resources": {"cpu": str(cluster_of.cpus)}}}
    )
    await services.wait(blocker["id"], "running")
    walker = await services.http(BUILD_SECONDS="3", START_SECONDS="3")
    seen = [walker["status"]]
    pending = await services.wait(walker["id"], "pending")
    assert pending["slurm_state"] == "PENDING"
    assert pending["status_reason"]

    await services.api.delete(f"/api/v1/services/{blocker['id']}")

    async def observe() -> dict[str, Any]:
        current = await services.status(walker["id"])
        if current["status"] != seen[-1]:
            seen.append(current["status"])
        return current

    running = await poll(observe, lambda s: s["status"] == "running", timeout=90, interval=0.2)
    assert running["endpoint"].startswith("http://")
    stop = await services.api.delete(f"/api/v1/services/{walker['id']}")
    assert stop.status_code == 200
    final = await services.wait(walker["id"], "cancelled")
    seen.append(final["status"])
    order = ["pending", "building", "starting", "running", "cancelled"]
    assert [s for s in order if s in seen] == order, seen
    assert [s for s in seen if s in order] == sorted(
        {s for s in seen if s in order}, key=order.index
    ), seen


async def test_two_services_on_one_node_both_run(services: Services) -> None:
    a = await services.http(MESSAGE="first")
    b = await services.http(MESSAGE="second")
    ra = await services.wait(a["id"], "running")
    rb = await services.wait(b["id"], "running")
    assert ra["node"] == rb["node"]
    assert ra["endpoint"] != rb["endpoint"]
    async with httpx.AsyncClient(timeout=5) as http:
        assert (await http.get(ra["endpoint"] + "/message")).text == "first"
        assert (await http.get(rb["endpoint"] + "/message")).text == "second"


async def test_a_second_gateway_sees_the_same_services(
    services: Services, cluster_of: LocalCluster, api: httpx.AsyncClient
) -> None:
    created = await services.http(MESSAGE="shared")
    await services.wait(created["id"], "running")
    stable = ("id", "name", "recipe_name", "config", "created_at", "node", "owner", "endpoint")
    with GatewayProcess(cluster_of) as second:
        async with httpx.AsyncClient(base_url=second.url, timeout=30) as other:
            mine = (await api.get(f"/api/v1/services/{created['id']}")).json()
            theirs = (await other.get(f"/api/v1/services/{created['id']}")).json()
            assert {k: theirs[k] for k in stable} == {k: mine[k] for k in stable}
            assert theirs["status"] == "running"
            listed = {s["id"]: s for s in (await other.get("/api/v1/services")).json()}
            assert created["id"] in listed
            assert {k: listed[created["id"]][k] for k in stable} == {k: mine[k] for k in stable}


async def test_jobs_not_launched_by_the_gateway_are_not_listed(
    api: httpx.AsyncClient, cluster_of: LocalCluster
) -> None:
    async with cluster_of.client() as slurm:
        foreign = await slurm.submit(
            JobSubmission(
                script="#!/bin/sh\nsleep 60\n",
                name="not-a-service",
                working_directory=f"/home/{cluster_of.user}",
                partition=cluster_of.partition,
                comment="someone else's job",
            )
        )
        try:
            # Asking for it makes the view list Slurm's jobs, so the listing
            # below has seen the job and still leaves it out.
            response = await api.get(f"/api/v1/services/{foreign.job_id}")
            assert response.status_code == 404
            assert "no service of yours has this id" in response.json()["detail"]
            ids = {s["id"] for s in (await api.get("/api/v1/services")).json()}
            assert str(foreign.job_id) not in ids
        finally:
            await slurm.cancel(foreign.job_id)


# -- logs, stop, unknown ids ------------------------------------------------------


async def test_logs_tail_and_stop_twice(services: Services, api: httpx.AsyncClient) -> None:
    created = await services.http(MESSAGE="log-line")
    await services.wait(created["id"], "running")
    logs = (await api.get(f"/api/v1/services/{created['id']}/logs")).json()
    assert "message from environment: log-line" in logs["logs"]
    assert "gateway: phase starting" in logs["logs"]
    tail = (await api.get(f"/api/v1/services/{created['id']}/logs", params={"tail": 1})).json()
    assert tail["truncated"] is True
    assert len(tail["stdout"].splitlines()) <= 1
    first = await api.delete(f"/api/v1/services/{created['id']}")
    assert first.status_code == 200
    assert first.json()["status"] == "cancelled"
    again = await api.delete(f"/api/v1/services/{created['id']}")
    assert again.status_code == 200


async def test_walk_on_every_served_api_version(cluster: LocalCluster) -> None:
    """create -> running -> logs -> stop -> cancelled through a gateway pinned to
    each API version the cluster's slurmrestd serves (not only the newest)."""
    versions = [v for v in cluster.api_versions if v in SUPPORTED_VERSIONS]
    assert versions, f"{cluster.name} serves none of {SUPPORTED_VERSIONS}"
    walked: list[str] = []
    for version in versions:
        with GatewayProcess(cluster, GATEWAY_SLURM_API_VERSION=version) as gateway:
            async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as api:
                ready = (await api.get("/api/v1/ready")).json()
                assert ready["slurm_api_version"] == version, ready
                assert ready["slurm_release"] == cluster.slurm_release, ready
                services = Services(api)
                try:
                    created = await services.http(MESSAGE=f"pinned-{version}")
                    assert created["status"] == "pending"
                    running = await services.wait(created["id"], "running")
                    assert running["slurm_state"] == "RUNNING"
                    logs = (await api.get(f"/api/v1/services/{created['id']}/logs")).json()
                    assert f"message from environment: pinned-{version}" in logs["logs"]
                    stop = await api.delete(f"/api/v1/services/{created['id']}")
                    assert stop.status_code == 200, stop.text
                    await services.wait(created["id"], "cancelled")
                finally:
                    await services.cleanup()
        walked.append(version)
    TIMINGS.append(f"services walk on {cluster.name}: {', '.join(walked)}")


async def test_unknown_service_is_404(api: httpx.AsyncClient) -> None:
    for path in ("", "/status", "/logs"):
        response = await api.get(f"/api/v1/services/987654321{path}")
        assert response.status_code == 404
        assert response.json()["status"] == 404
    assert (await api.delete("/api/v1/services/987654321")).status_code == 404


# -- shell injection ---------------------------------------------------------------

INJECTIONS = [
    "$(touch {canary})",
    "`touch {canary}`",
    "x; touch {canary}",
    "x' ; touch {canary} ; '",
    'x" && touch {canary} && "',
    "x | touch {canary}",
]


async def test_injection_attempts_stay_inert(
    services: Services, api: httpx.AsyncClient, cluster_of: LocalCluster
) -> None:
    canaries = []
    created = []
    for template in INJECTIONS:
        canary = f"/tmp/gw-canary-{uuid.uuid4().hex}"
        canaries.append(canary)
        value = template.format(canary=canary)
        created.append((value, await services.http(MESSAGE=value)))
    for value, service in created:
        await services.wait(service["id"], "running")
        logs = (await api.get(f"/api/v1/services/{service['id']}/logs")).json()["logs"]
        assert f"message from environment: {value}\n" in logs
    for canary in canaries:
        assert not cluster_of.host_path(canary).exists(), canary
        assert not Path(canary).exists(), canary
    for bad in ("../../etc/passwd", "inference/vllm; touch /tmp/x", "$(id)"):
        response = await api.post("/api/v1/services", json={"recipe_name": bad})
        assert response.status_code == 422
        assert response.json()["errors"][0]["field"] == "recipe_name"

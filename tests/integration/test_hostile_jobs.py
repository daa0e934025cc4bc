"""Jobs any cluster user can submit, crafted to fool the gateway.

They are submitted with ``sbatch`` straight to Slurm, as a cluster user would
from a login node: as ``gwother`` (a user the gateway does not submit as) and
as the gateway's own user. Their comments copy a real service's, or forge one; or
they are services (their metadata bound to their own ids, as a create binds
it) whose owner then publishes what it likes.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import socket
import time
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.core.metadata import MetaCodec
from gateway.settings import load_settings
from gateway.slurm import JobInfo
from gateway.testing.clusters import LocalCluster
from gateway.wiring import metadata_codec
from tests.support.gateway_per_cluster import *  # noqa: F403 - its fixtures
from tests.support.gateway_process import GatewayProcess
from tests.support.live_services import Services
from tests.support.polling import free_port, poll

KEY_IN_CLUSTER = "/etc/slurm/jwt_hs256.key"


def sbatch(cluster: LocalCluster, user: str, *args: str) -> int:
    out = cluster.run_as(
        user, "sbatch", "--parsable", "-p", cluster.partition, "-D", f"/home/{user}", *args
    )
    return int(out.strip().split(";")[0])


async def job(cluster: LocalCluster, job_id: int) -> JobInfo:
    async with cluster.client() as slurm:
        return await slurm.get_job(job_id)


async def ended(cluster: LocalCluster, job_id: int) -> JobInfo:
    return await poll(
        lambda: job(cluster, job_id), lambda j: j.state.is_terminal, timeout=30, what="job end"
    )


async def status_of(api: httpx.AsyncClient, job_id: int) -> dict[str, Any]:
    body: dict[str, Any] = (await api.get(f"/api/v1/services/{job_id}/status")).json()
    return body


async def real_service(services: Services, cluster: LocalCluster) -> tuple[dict[str, Any], str]:
    """A running service and the metadata part of its job's comment (what
    ``squeue -o %k`` shows every cluster user)."""
    created = await services.http(MESSAGE="the real one")
    running = await services.wait(created["id"], "running")
    comment = (await job(cluster, int(created["id"]))).comment
    return running, comment.split("|", 1)[0]


class Misbehaving:
    """Jobs the gateway takes for services (their metadata bound to their own
    ids, as a create binds it) whose owner then publishes what it likes: what
    a service's own user can do to its own jobs."""

    def __init__(self, gateway: GatewayProcess, running: dict[str, Any], meta: str) -> None:
        self.cluster = gateway.cluster
        self.running, self.meta = running, meta
        self.codec: MetaCodec = metadata_codec(load_settings(gateway.env))
        decoded = self.codec.decode(meta, int(running["id"]))
        assert decoded is not None, meta
        self.unbound = self.codec.unbound(decoded.meta)

    def head(self, job_id: int) -> str:
        return self.codec.bind(self.unbound, job_id)

    def submit(self, tail: str, *args: str) -> int:
        """Held with no comment, given its bound one, then released."""
        user = self.cluster.user
        job_id = sbatch(self.cluster, user, "--hold", *args)
        comment = f"{self.head(job_id)}{tail}"
        self.cluster.run_as(user, "scontrol", "update", f"jobid={job_id}", f"comment={comment}")
        self.cluster.run_as(user, "scontrol", "release", str(job_id))
        return job_id


@pytest.fixture
async def misbehaving(services: Services, gateway: GatewayProcess) -> Misbehaving:
    """Misbehaving jobs beside a real, running service, whose comment they copy."""
    running, meta = await real_service(services, gateway.cluster)
    return Misbehaving(gateway, running, meta)


@pytest.fixture
async def cleanup(cluster_of: LocalCluster) -> AsyncIterator[list[tuple[str, int]]]:
    """(user, job id) of the crafted jobs, cancelled at the end."""
    jobs: list[tuple[str, int]] = []
    yield jobs
    for user, job_id in jobs:
        with contextlib.suppress(RuntimeError):
            cluster_of.run_as(user, "scancel", str(job_id))


async def test_another_users_job_with_a_copied_comment_is_not_a_service(
    services: Services, cluster_of: LocalCluster, api: httpx.AsyncClient, cleanup: list[Any]
) -> None:
    cluster = cluster_of
    running, meta = await real_service(services, cluster)
    endpoint = running["endpoint"].removeprefix("http://")
    other = cluster.other_user
    job_id = sbatch(
        cluster, other, "--hold", f"--comment={meta}|phase=running|endpoint={endpoint}",
        f"--output={KEY_IN_CLUSTER}", "--wrap=true",
    )  # fmt: skip
    cleanup.append((other, job_id))
    cluster.run_as(other, "scancel", str(job_id))
    assert (await ended(cluster, job_id)).user_name == other

    # Asking for it by id makes the view list Slurm's jobs: the listing after
    # that has seen the job and must still leave it out.
    for path in ("", "/status", "/logs"):
        response = await api.get(f"/api/v1/services/{job_id}{path}")
        assert response.status_code == 404, response.text
        assert "no service of yours has this id" in response.json()["detail"]
    listed = {s["id"] for s in (await api.get("/api/v1/services")).json()}
    assert running["id"] in listed
    assert str(job_id) not in listed


async def test_logs_are_read_only_from_the_file_the_gateway_chose(
    misbehaving: Misbehaving, api: httpx.AsyncClient, cleanup: list[Any]
) -> None:
    cluster, running = misbehaving.cluster, misbehaving.running
    user = cluster.user
    secret = Path(cluster.jwt_key).read_bytes()
    home = f"/home/{user}"
    # The output file the gateway would choose for a job of this recipe.
    job_name = (await job(cluster, int(running["id"]))).name
    assert job_name.startswith("gw-testing-http-"), job_name
    expected = f"{home}/{job_name}-%j.out"
    cases = {
        "the JWT key": (KEY_IN_CLUSTER, None),
        "the gateway's environment": ("/proc/self/environ", None),
        "a path with ..": (f"{home}/../..{KEY_IN_CLUSTER}", None),
        "a symlink to the key": (expected, "symlink"),
        "a FIFO": (expected, "fifo"),
    }
    jobs: dict[str, int] = {}
    for what, (output, plant) in cases.items():
        job_id = sbatch(cluster, user, "--hold", f"--output={output}", "--wrap=true")
        cleanup.append((user, job_id))
        bound = f"comment={misbehaving.head(job_id)}"
        cluster.run_as(user, "scontrol", "update", f"jobid={job_id}", bound)
        jobs[what] = job_id
        target = cluster.host_path(f"{home}/{job_name}-{job_id}.out")
        if plant == "symlink":
            target.symlink_to(cluster.host_path(KEY_IN_CLUSTER))
        elif plant == "fifo":
            os.mkfifo(target)
        cluster.run_as(user, "scancel", str(job_id))
    reasons = {}
    for what, job_id in jobs.items():
        await ended(cluster, job_id)
        # The gateway's view follows Slurm within its refresh interval.
        await poll(partial(status_of, api, job_id), lambda s: s["slurm_state"] == "CANCELLED")
        started = time.monotonic()
        response = await api.get(f"/api/v1/services/{job_id}/logs", timeout=10)
        took = time.monotonic() - started
        assert response.status_code == 200, (what, response.text)
        body = response.json()
        assert body["logs"] == body["stdout"] == "", (what, body)
        assert secret not in response.content
        assert b"GATEWAY_" not in response.content
        assert body["reason"], (what, body)
        assert took < 5, (what, took)
        reasons[what] = body["reason"]
    assert "not in the file the gateway chose" in reasons["the JWT key"]
    assert "not in the file the gateway chose" in reasons["a path with .."]
    assert "symbolic link" in reasons["a symlink to the key"]
    assert "not a regular file" in reasons["a FIFO"]


class Listener:
    """A loopback TCP server that counts the connections made to it."""

    def __init__(self) -> None:
        self.connections = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Listener:
        async def accept(_r: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            writer.close()

        self._server = await asyncio.start_server(accept, "127.0.0.1", 0, family=socket.AF_INET)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()


async def test_forged_endpoints_are_never_shown_nor_probed(
    misbehaving: Misbehaving, api: httpx.AsyncClient, cleanup: list[Any]
) -> None:
    cluster, running = misbehaving.cluster, misbehaving.running
    user = cluster.user
    async with Listener() as listener:
        forged = [
            "gw-forged.invalid:8080",
            # The loopback under a name that is not the node's: if the gateway
            # believed it, the listener would count a probe.
            f"localhost:{listener.port}",
        ]
        ids = []
        for endpoint in forged:
            job_id = misbehaving.submit(
                f"|phase=running|endpoint={endpoint}", "--output=/dev/null", "--wrap=sleep 120"
            )
            cleanup.append((user, job_id))
            ids.append(job_id)
        for job_id in ids:
            # As the gateway's view has it (at most its refresh interval behind Slurm).
            await poll(partial(status_of, api, job_id), lambda s: s["slurm_state"] == "RUNNING")
            for _ in range(3):  # more than one read, past the probe cache
                status = await status_of(api, job_id)
                assert status["endpoint"] is None, status
                assert status["status"] == "starting", status
                assert "not on its node" in status["status_reason"], status
                await asyncio.sleep(0.5)
            prompt = await api.post(f"/api/v1/vllm/{job_id}/prompt", json={"prompt": "hi"})
            assert prompt.status_code == 409
        listed = {s["id"]: s for s in (await api.get("/api/v1/services")).json()}
        assert all(listed[str(j)]["endpoint"] is None for j in ids)
        # The real service keeps its own endpoint.
        assert listed[running["id"]]["endpoint"] == running["endpoint"]
        assert listener.connections == 0


async def test_garbage_in_comments_never_breaks_a_listing(
    misbehaving: Misbehaving, api: httpx.AsyncClient, cleanup: list[Any]
) -> None:
    cluster, meta = misbehaving.cluster, misbehaving.meta
    old_style = base64.urlsafe_b64encode(json.dumps({"recipe": "x", "created": 1e20}).encode())
    comments = {
        cluster.other_user: [
            f"gw1:{old_style.decode()}|phase=running|endpoint=127.0.0.1:70000",
            f"{meta}|phase=running|endpoint=127.0.0.1:70000",
        ],
        cluster.user: [
            "gw3:not base64!|phase=running",
            "gw2:not base64!|phase=running",
            meta.rsplit(".", 1)[0] + ".AAAAAAAAAAAAAAAAAAAAAA|phase=running",
            # the real service's own, copied: bound to the real job's id
            f"{meta}|phase=running|endpoint=127.0.0.1:8000",
        ],
    }
    for user, texts in comments.items():
        for text in texts:
            job_id = sbatch(
                cluster, user, f"--comment={text}", "--output=/dev/null", "--wrap=sleep 120"
            )
            cleanup.append((user, job_id))
    # Genuine services (bound to their own ids) publishing garbage.
    mine: list[int] = []
    for tail in (
        "|phase=running|endpoint=127.0.0.1:70000",
        "|phase=running|endpoint=[::1]:99999|reason=" + "x" * 600,
        "|phase=\u00b2|endpoint=|reason=\u00e9\u00e9",
    ):
        job_id = misbehaving.submit(tail, "--output=/dev/null", "--wrap=sleep 120")
        cleanup.append((cluster.user, job_id))
        mine.append(job_id)
    # Bytes that are not UTF-8 (slurmrestd passes them on), an output pattern
    # asking for a 50-million-digit job id, a start thousands of years ahead.
    other = cluster.other_user
    for args in (
        ["--comment=\udcff\udcfe", "-J", "n\udcff", "--output=/dev/null"],
        ["--output=/tmp/gw-%50000000j-%\u00b2j.out"],
        ["--begin=now+3000000days", "--output=/dev/null"],
    ):
        cleanup.append((other, sbatch(cluster, other, *args, "--wrap=sleep 120")))
    for job_id in mine:
        await poll(lambda j=job_id: job(cluster, j), lambda j: j.state.value == "RUNNING")

    async def listing() -> dict[str, Any]:
        for path in ("/api/v1/services", "/api/v1/vllm/services"):
            response = await api.get(path)
            assert response.status_code == 200, response.text
        return {s["id"]: s for s in (await api.get("/api/v1/services")).json()}

    crafted = {str(j) for _, j in cleanup}
    # The gateway's view follows Slurm within its refresh interval.
    listed = await poll(
        listing, lambda ls: all(ls.get(str(j), {}).get("slurm_state") == "RUNNING" for j in mine)
    )
    # Only the gateway user's jobs carrying a genuine blob are services.
    assert crafted & set(listed) == {str(j) for j in mine}
    for job_id in mine:
        service = listed[str(job_id)]
        assert service["endpoint"] is None, service
        assert len(service["status_reason"]) <= 400, service
    odd = await api.get("/api/v1/services/%C2%B2")
    assert odd.status_code == 404
    assert odd.headers["content-type"].startswith("application/problem+json")


async def test_a_comment_over_slurms_limit_is_refused_naming_the_field(
    services: Services, api: httpx.AsyncClient
) -> None:
    response = await api.post(
        "/api/v1/services",
        json={"recipe_name": "testing/http", "config": {"environment": {"MESSAGE": "m" * 900}}},
    )
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["errors"][0]["field"] == "config.environment.MESSAGE"
    assert "1024" in body["detail"]
    # A long value that fits still runs, and the job can publish every phase.
    long = "l" * 400
    created = await services.http(MESSAGE=long)
    running = await services.wait(created["id"], "running")
    assert running["endpoint"]


async def test_numbers_reach_the_job_normalised(services: Services) -> None:
    created = await services.http(PORT="000" + str(free_port()))
    assert created["config"]["environment"]["PORT"].isdigit()
    assert not created["config"]["environment"]["PORT"].startswith("0")
    running = await services.wait(created["id"], "running")
    assert running["endpoint"].endswith(":" + created["config"]["environment"]["PORT"])
    for bad in (" 8001", "nan", "8001\n", "\u0668\u0660"):
        response = await services.api.post(
            "/api/v1/services",
            json={"recipe_name": "testing/http", "config": {"environment": {"PORT": bad}}},
        )
        assert response.status_code == 422, (bad, response.text)
        assert response.json()["errors"][0]["field"] == "config.environment.PORT"

"""The cluster side of tests/integration/test_copied_comment.py: a gateway
with tenants of its own, the services made through it, and the attacker, a
process of the gateway's Slurm user that submits jobs and rewrites their
comments as any cluster user may. Everything is cancelled or removed at the end."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from gateway.auth.authfile import new_key
from gateway.slurm import SlurmJobNotFound
from gateway.testing.clusters import LocalCluster
from tests.support.gateway_process import GatewayProcess
from tests.support.polling import poll

# A vLLM look-alike the attacker runs in its job: answers /health, lists the
# model and completes chats, and writes down every request it gets.
LISTENER = r"""
import http.server, json, sys
port, record, model = int(sys.argv[1]), sys.argv[2], sys.argv[3]
MODELS = json.dumps({"object": "list", "data": [
    {"id": model, "object": "model", "owned_by": "copy", "max_model_len": 2048}]}).encode()
CHAT = json.dumps({"id": "copy", "object": "chat.completion", "created": 0, "model": model,
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "copy"},
    "finish_reason": "stop"}], "usage": {"prompt_tokens": 1, "completion_tokens": 1,
    "total_tokens": 2}}).encode()

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def answer(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode("utf-8", "replace") if length else ""
        with open(record, "a") as out:
            out.write(json.dumps({"path": self.path, "body": body[:2000],
                "authorization": self.headers.get("Authorization")}) + "\n")
        data = b"" if self.path == "/health" else MODELS if self.path == "/v1/models" else CHAT
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = answer

server = http.server.ThreadingHTTPServer(("0.0.0.0", port), Handler)
open(record + ".ready", "w").close()
server.serve_forever()
"""


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@dataclass
class Deployment:
    cluster: LocalCluster
    gateway: GatewayProcess
    admin: dict[str, str]  # an admin, Slurm user gwuser (like deploy/local's)
    keyed: dict[str, str]  # a tenant of gwuser too, max_services = 2
    other: dict[str, str]  # a tenant of another Slurm user (gwteam)
    tag: str


@contextlib.contextmanager
def deployed(cluster: LocalCluster, folder: Path) -> Iterator[Deployment]:
    """A gateway of ``cluster`` with tenants of a random tag (its auth file in ``folder``)."""
    tag = uuid.uuid4().hex[:6]
    roles = {
        "admin": (f"ops-{tag}", cluster.user, "admin"),
        "keyed": (f"keyed-{tag}", cluster.user, "user"),
        "other": (f"team-b-{tag}", cluster.team_user, "user"),
    }
    lines = [f"[tenants.keyed-{tag}]", "max_services = 2"]
    keys = {}
    for role, (tenant, user, kind) in roles.items():
        key, digest = new_key()
        keys[role] = bearer(key)
        lines += [
            "[[keys]]",
            f'name = "{role} key"',
            f'tenant = "{tenant}"',
            f'slurm_user = "{user}"',
            f'role = "{kind}"',
            f'sha256 = "{digest}"',
        ]
    path = folder / "auth.toml"
    path.write_text("\n".join(lines) + "\n")
    with GatewayProcess(cluster, GATEWAY_AUTH_FILE=str(path)) as gateway:
        yield Deployment(cluster, gateway, keys["admin"], keys["keyed"], keys["other"], tag)


async def ended(cluster: LocalCluster, ids: list[int]) -> None:
    """Waits until Slurm has ended (or forgotten) each of the jobs ``ids``."""
    async with cluster.client() as slurm:
        for job_id in ids:

            async def state(j: int = job_id) -> bool:
                try:
                    return (await slurm.get_job(j)).state.is_terminal
                except SlurmJobNotFound:
                    return True

            await poll(state, bool, timeout=30, what=f"job {job_id} ended")


class Services:
    """Services made through the gateway: stopped at the end, whatever is left
    of them cancelled."""

    def __init__(self, deployment: Deployment) -> None:
        self.deployment = deployment
        self.api = httpx.AsyncClient(base_url=deployment.gateway.url, timeout=30)
        self.made: list[tuple[str, dict[str, str]]] = []

    async def create(
        self, who: dict[str, str], body: dict[str, Any], **headers: str
    ) -> httpx.Response:
        response = await self.api.post("/api/v1/services", json=body, headers={**who, **headers})
        if response.status_code == 201:
            self.made.append((response.json()["id"], who))
        return response

    async def running(self, sid: str, who: dict[str, str]) -> None:
        async def status() -> dict[str, Any]:
            body: dict[str, Any] = (
                await self.api.get(f"/api/v1/services/{sid}/status", headers=who)
            ).json()
            return body

        await poll(status, lambda s: s.get("status") == "running", timeout=90, what=f"{sid} up")

    async def aclose(self) -> None:
        for sid, who in self.made:
            with contextlib.suppress(httpx.HTTPError):
                await self.api.delete(f"/api/v1/services/{sid}", headers=who)
        await self.api.aclose()
        if not self.made:
            return
        cluster = self.deployment.cluster
        ids = [int(sid) for sid, _ in self.made]
        await asyncio.to_thread(
            subprocess.run,
            ["chroot", cluster.chroot, "scancel", *map(str, ids)],
            capture_output=True, timeout=30, check=False,
        )  # fmt: skip
        await ended(cluster, ids)
        # The logs the gateway had the jobs write in their users' homes.
        for home in {cluster.host_path(f"/home/{u}") for u in (cluster.user, cluster.team_user)}:
            for job_id in ids:
                for log in home.glob(f"gw-*-{job_id}.*"):
                    log.unlink()


class Attacker:
    """Another process of the gateway's Slurm user, on the cluster: sbatch,
    squeue and scontrol as that user, files in a folder of its home."""

    def __init__(self, cluster: LocalCluster) -> None:
        self.cluster = cluster
        self.user = cluster.user
        self.folder = f"/home/{self.user}/gw-copied-{uuid.uuid4().hex[:8]}"
        self.jobs: list[int] = []
        cluster.run_as(self.user, "mkdir", self.folder)

    def run(self, *command: str) -> str:
        return self.cluster.run_as(self.user, *command)

    def sbatch(self, *args: str) -> int:
        out = self.run(
            "sbatch", "--parsable", "-p", self.cluster.partition, "-D", self.folder,
            "--mem=64M", "--time=10", *args,
        )  # fmt: skip
        job_id = int(out.strip().split(";")[0])
        self.jobs.append(job_id)
        return job_id

    def comment_of(self, job_id: str | int) -> str:
        """What every cluster user reads of a job's comment."""
        return self.run("squeue", "-h", "-j", str(job_id), "-o", "%k").strip()

    def listen(
        self, port: int, model: str, comment: str, name: str = "copy", *args: str
    ) -> tuple[int, Path]:
        """A job carrying ``comment`` that serves the look-alike on ``port``;
        its id and the file of the requests it got (on this host)."""
        script = self.cluster.host_path(f"{self.folder}/listener.py")
        script.write_text(LISTENER)
        script.chmod(0o644)
        record = f"{self.folder}/{name}.jsonl"
        job_id = self.sbatch(
            f"--comment={comment}", f"--output={self.folder}/{name}-%j.out", *args,
            f"--wrap=exec python3 {script.name} {port} {record} {model}",
        )  # fmt: skip
        return job_id, self.cluster.host_path(record)

    async def up(self, job_id: int, record: Path) -> None:
        """Until Slurm runs the job and its listener listens."""
        state = lambda: job_state(self.cluster, job_id)  # noqa: E731
        await poll(state, lambda s: s == "RUNNING", what=f"job {job_id} running")
        ready = lambda: asyncio.to_thread(Path(f"{record}.ready").exists)  # noqa: E731
        await poll(ready, bool, what=f"the listener of job {job_id}")

    async def cleanup(self) -> None:
        for job_id in self.jobs:
            with contextlib.suppress(RuntimeError):
                self.run("scancel", str(job_id))
        await ended(self.cluster, self.jobs)
        shutil.rmtree(self.cluster.host_path(self.folder))


def copied(comment: str, published: str) -> str:
    """``comment`` with what its job published about itself replaced by
    ``published``: the metadata, exactly as the gateway wrote it."""
    head = comment.split("|reason=", 1)[0]
    kept = [part for part in head.split("|") if not part.startswith(("phase=", "endpoint="))]
    return "|".join(kept) + published


def endpoint_host(comment: str) -> str:
    """The host a running service published (a name of its node)."""
    for part in comment.split("|"):
        if part.startswith("endpoint="):
            return part[len("endpoint=") :].rpartition(":")[0]
    raise AssertionError(f"no endpoint in {comment!r}")


async def job_state(cluster: LocalCluster, job_id: int) -> str:
    async with cluster.client() as slurm:
        return (await slurm.get_job(job_id)).state.value

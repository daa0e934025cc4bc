"""Deployments on a live cluster: a deployments file, gateway processes that
read it, steady /v1 load through them, and what Slurm itself says (squeue)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from gateway.core.metadata import MetaCodec
from gateway.testing.clusters import LocalCluster
from tests.support.gateway_process import ROOT, GatewayProcess
from tests.support.polling import poll

TEAM_A = {"Authorization": "Bearer sgw_local-team-a-key"}
ADMIN = {"Authorization": "Bearer sgw_local-admin-key"}
STUB = "testing/openai-stub"


def stub_deployment(
    name: str, *, replicas: int, model: str, minutes: int, tenant: str = "team-a", **env: str
) -> str:
    """One [deployments.<name>] table of the stub recipe, served as ``model``."""
    return table(name, STUB, replicas=replicas, minutes=minutes, tenant=tenant,
                 VLLM_SERVED_MODEL_NAME=model, **env)  # fmt: skip


def table(
    name: str,
    recipe: str,
    *,
    replicas: int,
    minutes: int,
    tenant: str | None = "team-a",
    lead: float | None = None,
    **env: str,
) -> str:
    """One [deployments.<name>] table: ``recipe`` with ``env``, limited to
    ``minutes``; no tenant: shared."""
    lines = [
        f"[deployments.{name}]",
        f'recipe_name = "{recipe}"',
        f"replicas = {replicas}",
        *([f'tenant = "{tenant}"'] if tenant else []),
        *([f"lead_seconds = {lead}"] if lead is not None else []),
        f"[deployments.{name}.config.environment]",
        *(f"{k} = {json.dumps(v)}" for k, v in env.items()),
        f"[deployments.{name}.config.resources]",
        f"time_limit = {minutes}",
    ]
    return "\n".join(lines) + "\n"


class Fleet:
    """``count`` gateway processes on ``cluster`` reading one deployments file."""

    def __init__(
        self,
        cluster: LocalCluster,
        folder: Path,
        count: int = 1,
        *,
        secret: str | None = None,
        **env: str,
    ) -> None:
        """``secret``: the gateways' own (GATEWAY_SECRET; by default one of the
        fleet's): they see, and manage, the jobs made under it only, and their
        names carry its tag, so that fleets on one cluster leave each other be."""
        self.cluster = cluster
        folder.mkdir(parents=True, exist_ok=True)
        self.file = folder / f"deployments-{cluster.name}.toml"
        secret = secret or f"fleet-{os.urandom(12).hex()}"
        env = {**env, "GATEWAY_SECRET": secret}
        self.tag = MetaCodec(secret.encode()).job_tag
        self.file.write_text("")
        self.env = {
            "GATEWAY_AUTH_FILE": str(ROOT / "deploy" / "local" / "tenants.toml"),
            "GATEWAY_DEPLOYMENTS_FILE": str(self.file),
            "GATEWAY_DEPLOYMENT_DRAIN_SECONDS": "8",
            # One file for every process here: no replica reads it late.
            "GATEWAY_DEPLOYMENT_CHANGE_GRACE_SECONDS": "3",
            **env,
        }
        self.gateways = [GatewayProcess(cluster, **self.env) for _ in range(count)]
        self.clients: list[httpx.AsyncClient] = []

    async def start(self) -> None:
        await asyncio.gather(*(asyncio.to_thread(g.start) for g in self.gateways))
        self.clients = [httpx.AsyncClient(base_url=g.url, timeout=60) for g in self.gateways]

    async def restart(self) -> None:
        """Every gateway process killed, then started again."""
        for gateway in self.gateways:
            if gateway.process is not None:
                gateway.process.kill()
                gateway.process.wait()
        await self.start()

    def declare(self, text: str) -> None:
        # A new inode at once, as a ConfigMap update does: never half a file.
        staged = self.file.with_suffix(".new")
        staged.write_text(text)
        staged.replace(self.file)

    async def deployment(self, name: str, gateway: int = 0) -> dict[str, Any]:
        """Its status; {} while the gateway has not read it from the file yet."""
        answer = await self.clients[gateway].get(f"/api/v1/deployments/{name}", headers=TEAM_A)
        if answer.status_code == 404:
            return {}
        assert answer.status_code == 200, answer.text
        body: dict[str, Any] = answer.json()
        return body

    async def everywhere(self, name: str, what: str, check: Any, timeout: float = 240) -> None:
        """Until every gateway process says so (each sees Slurm through its own view)."""
        for index in range(len(self.clients)):
            probe = lambda i=index: self.deployment(name, gateway=i)  # noqa: E731
            await poll(probe, check, timeout=timeout, interval=1, what=f"{name} {index}: {what}")

    async def until(self, name: str, what: str, check: Any, timeout: float = 240) -> dict[str, Any]:
        return await poll(
            lambda: self.deployment(name),
            check,
            timeout=timeout,
            interval=1,
            what=f"{name}: {what}",
        )

    def squeue(self, recipe: str = "") -> list[tuple[int, str, str]]:
        """(job id, state, reason) of the gateway's jobs, as Slurm lists them;
        with ``recipe``, those of its jobs only (their name holds it)."""
        command = ["squeue", "-h", "-u", self.cluster.user, "-o", "%i %T %j %r"]
        out = subprocess.run(
            ["chroot", self.cluster.chroot, *command],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout  # fmt: skip
        rows = (line.split(" ", 3) for line in out.splitlines())
        needle = f"{recipe.replace('/', '-')}-{self.tag}"
        return [(int(i), s, r) for i, s, name, r in rows if needle in name]

    async def jobs(self) -> set[int]:
        """The job ids of every replica of the deployments, as the first gateway sees them."""
        with contextlib.suppress(Exception):
            answer = await self.clients[0].get("/api/v1/deployments", headers=ADMIN)
            return {int(m["service_id"]) for d in answer.json() for m in d.get("members", [])}
        return set()

    async def close(self) -> None:
        """Stops what the deployments made (the file emptied, then scancel of
        the rest): theirs only, as other tests may share the cluster."""
        ours = await self.jobs()
        self.declare("")

        async def left() -> list[int]:
            listed = await asyncio.to_thread(self.squeue)
            return [job_id for job_id, _, _ in listed if job_id in ours]

        with contextlib.suppress(Exception):
            await poll(left, lambda jobs: not jobs, timeout=40, interval=1)
        ours |= await self.jobs()
        for client in self.clients:
            await client.aclose()
        await asyncio.gather(*(asyncio.to_thread(g.stop) for g in self.gateways))
        left_over = [str(job_id) for job_id in await left()]
        if left_over:
            scancel = ["chroot", self.cluster.chroot, "scancel", *left_over]
            await asyncio.to_thread(subprocess.run, scancel, check=False, timeout=30)


@dataclass
class Load:
    """Steady /v1 requests (plain and streamed, in turn) through every gateway of a fleet."""

    fleet: Fleet
    model: str
    workers: int = 2
    # Seconds each worker waits between requests.
    pause: float = 0.05
    ok: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    # The longest time with no answer completing, seconds.
    longest_gap: float = 0.0
    _last: float = field(default_factory=time.monotonic)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self) -> None:
        self._last = time.monotonic()
        self._tasks = [asyncio.create_task(self._worker(i)) for i in range(self.workers)]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    @property
    def running(self) -> bool:
        return bool(self._tasks)

    @property
    def total(self) -> int:
        return sum(self.ok.values())

    async def _worker(self, index: int) -> None:
        for turn in itertools.count():
            client = self.fleet.clients[(index + turn) % len(self.fleet.clients)]
            stream = turn % 2 == 1
            messages = [{"role": "user", "content": "hi"}]
            body = {"model": self.model, "messages": messages, "max_tokens": 4, "stream": stream}
            try:
                answer = await client.post("/v1/chat/completions", json=body, headers=TEAM_A)
                complete = answer.status_code == 200 and (
                    not stream or answer.text.rstrip().endswith("data: [DONE]")
                )
            except httpx.HTTPError as exc:
                self.failures.append(f"{type(exc).__name__}: {exc}")
                continue
            now = time.monotonic()
            if complete:
                self.longest_gap = max(self.longest_gap, now - self._last)
                self._last = now
                self.ok[answer.headers.get("x-gateway-service-id", "?")] += 1
            else:
                self.failures.append(f"{answer.status_code} {answer.text[:200]}")
            await asyncio.sleep(self.pause)

"""Services: a recipe plus overrides, run as one Slurm job.

Nothing here is stored by the gateway. A service is rebuilt on every read from
the job record (state, times, node) and the job's comment (recipe, requested
configuration, creation time, owner, and what the job published about itself).
"""

from __future__ import annotations

import asyncio
import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec

from gateway.core import jobscript, metadata
from gateway.core.errors import Conflict, InvalidRequest, NotFound
from gateway.core.recipes import Recipe, RecipeCatalog, resolve_resources
from gateway.core.status import ServiceStatus, derive
from gateway.slurm import (
    JobInfo,
    JobState,
    JobSubmission,
    SlurmClient,
    SlurmJobNotFound,
)
from gateway.upstream.probe import HealthProber

STOP_WAIT_SECONDS = 5.0
JOB_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class ServiceConfig(msgspec.Struct, frozen=True, kw_only=True):
    environment: dict[str, str]
    resources: dict[str, str | int | None]


class Service(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    name: str
    recipe_name: str
    kind: str
    status: ServiceStatus
    status_reason: str
    config: ServiceConfig
    created_at: datetime
    started_at: datetime | None
    ended_at: datetime | None
    owner: str
    slurm_state: str
    slurm_reason: str
    node: str | None
    endpoint: str | None


class Logs(msgspec.Struct, frozen=True, kw_only=True):
    stdout: str
    stderr: str | None
    truncated: bool


class CreateRequest(msgspec.Struct, frozen=True, kw_only=True):
    recipe_name: str
    environment: dict[str, str] = msgspec.field(default_factory=dict)
    resources: dict[str, Any] = msgspec.field(default_factory=dict)


class ServiceManager:
    def __init__(
        self,
        *,
        slurm: SlurmClient,
        recipes: RecipeCatalog,
        prober: HealthProber,
        job_dir: str,
        slurm_user: str,
        partition: str | None = None,
        account: str | None = None,
        path_map: list[tuple[str, str]] | None = None,
        log_max_bytes: int = 1024 * 1024,
        running_ttl: float = 2.0,
    ) -> None:
        self.slurm = slurm
        self.recipes = recipes
        self.prober = prober
        self.job_dir = job_dir.rstrip("/") or "/"
        self.slurm_user = slurm_user
        self.partition = partition
        self.account = account
        self.path_map = path_map or []
        self.log_max_bytes = log_max_bytes
        self.running_ttl = running_ttl
        self._running: dict[str, tuple[float, Service]] = {}

    # -- create ---------------------------------------------------------------

    async def create(self, request: CreateRequest) -> Service:
        recipe = self._recipe_for_create(request.recipe_name)
        environment = recipe.environment(request.environment)
        resources = resolve_resources(
            recipe.spec.resources, request.resources, field="config.resources"
        )
        resources_wire = resources.as_config()
        meta = metadata.ServiceMeta(
            recipe=recipe.name,
            created=time.time(),
            owner=self.slurm_user,
            environment=environment,
            resources=resources_wire,
        )
        context = jobscript.render_context(recipe, environment, resources_wire)
        job_name = "gw-" + recipe.name.replace("/", "-")
        submission = JobSubmission(
            script=jobscript.build(recipe, meta, context),
            name=job_name,
            working_directory=self.job_dir,
            environment={"PATH": JOB_PATH, **environment},
            partition=recipe.partition(resources) or self.partition,
            account=recipe.spec.account or self.account,
            standard_output=f"{self.job_dir}/{job_name}-%j.out",
            standard_error=f"{self.job_dir}/{job_name}-%j.err",
            nodes=resources.nodes,
            cpus_per_task=resources.cpus,
            memory_per_node_mb=resources.memory_mb,
            time_limit_minutes=resources.time_limit_minutes,
            gpus_per_node=resources.gpus or None,
            comment=metadata.encode(meta),
        )
        submitted = await self.slurm.submit(submission)
        try:
            job = await self.slurm.get_job(submitted.job_id)
        except SlurmJobNotFound:
            # Submitted but already purged (MinJobAge): describe it from what we sent.
            return self._service_from_submission(submitted.job_id, recipe, meta)
        parsed = metadata.decode(job.comment) or (meta, metadata.Reported())
        return await self._service(job, *parsed)

    def _recipe_for_create(self, name: str) -> Recipe:
        try:
            return self.recipes.get(name)
        except NotFound as exc:
            raise InvalidRequest.field("recipe_name", exc.detail) from None

    def _service_from_submission(
        self, job_id: int, recipe: Recipe, meta: metadata.ServiceMeta
    ) -> Service:
        return Service(
            id=str(job_id),
            name=service_name(recipe.name, job_id),
            recipe_name=recipe.name,
            kind=recipe.spec.service.kind,
            status=ServiceStatus.PENDING,
            status_reason="submitted",
            config=ServiceConfig(environment=meta.environment, resources=meta.resources),
            created_at=datetime.fromtimestamp(meta.created, tz=UTC),
            started_at=None,
            ended_at=None,
            owner=meta.owner,
            slurm_state=JobState.PENDING.value,
            slurm_reason="",
            node=None,
            endpoint=None,
        )

    # -- read -----------------------------------------------------------------

    async def list(self) -> list[Service]:
        """Every service Slurm still knows: one slurmrestd call, probes in parallel."""
        listing = await self.slurm.list_jobs()
        ours = [(job, parsed) for job in listing.jobs if (parsed := metadata.decode(job.comment))]
        services = await asyncio.gather(*(self._service(job, *parsed) for job, parsed in ours))
        return sorted(services, key=lambda s: int(s.id), reverse=True)

    async def get(self, service_id: str) -> Service:
        return await self._service(*await self._job(service_id))

    async def _job(
        self, service_id: str
    ) -> tuple[JobInfo, metadata.ServiceMeta, metadata.Reported]:
        """The job of a service with what its comment holds; 404 for any other."""
        job_id = parse_id(service_id)
        try:
            job = await self.slurm.get_job(job_id)
        except SlurmJobNotFound:
            raise NotFound(
                f"service {service_id} does not exist (Slurm does not know job {job_id}; "
                "finished jobs are forgotten after Slurm's MinJobAge)"
            ) from None
        parsed = metadata.decode(job.comment)
        if parsed is None:
            raise NotFound(f"service {service_id} does not exist (job {job_id} is not a service)")
        return job, *parsed

    async def _service(
        self, job: JobInfo, meta: metadata.ServiceMeta, reported: metadata.Reported
    ) -> Service:
        recipe_kind, health_path = self._service_spec(meta.recipe)
        endpoint = f"http://{reported.endpoint}" if reported.endpoint else None
        healthy: bool | None = None
        if endpoint and job.state is JobState.RUNNING and reported.phase in ("starting", "running"):
            if recipe_kind == "vllm":
                # Ready when vLLM answers /health and serves the model asked for.
                model = meta.environment.get("VLLM_MODEL")
                healthy = await self.prober.vllm_ready(endpoint, model)
            else:
                healthy = await self.prober.healthy(endpoint + health_path)
        status, reason = derive(job, reported, healthy)
        return Service(
            id=str(job.job_id),
            name=service_name(meta.recipe, job.job_id),
            recipe_name=meta.recipe,
            kind=recipe_kind,
            status=status,
            status_reason=reason,
            config=ServiceConfig(environment=meta.environment, resources=meta.resources),
            created_at=datetime.fromtimestamp(meta.created, tz=UTC),
            started_at=job.start_time if job.state is not JobState.PENDING else None,
            ended_at=job.end_time if job.state.is_terminal else None,
            owner=meta.owner,
            slurm_state=job.state.value,
            slurm_reason=job.state_reason,
            node=job.batch_host or job.nodes or None,
            endpoint=endpoint if not status.is_terminal else None,
        )

    def _service_spec(self, recipe_name: str) -> tuple[str, str]:
        try:
            spec = self.recipes.get(recipe_name).spec.service
        except NotFound:
            return "http", "/health"  # recipe removed since: still list the service
        return spec.kind, spec.health_path

    async def running(self, service_id: str, *, kind: str | None = None) -> Service:
        """The service, which must be running (and of ``kind``); 409 otherwise.

        This is on every prompt's path, so a running service is remembered for
        ``running_ttl`` seconds instead of asking Slurm each time; at worst a
        prompt reaches a service stopped by another replica meanwhile, and gets
        vLLM's connection error (502).
        """
        cached = self._running.get(service_id)
        if cached is not None and time.monotonic() < cached[0]:
            service = cached[1]
        else:
            service = await self.get(service_id)
            if service.status is ServiceStatus.RUNNING:
                self._running[service_id] = (time.monotonic() + self.running_ttl, service)
                if len(self._running) > 4096:
                    now = time.monotonic()
                    self._running = {k: v for k, v in self._running.items() if v[0] > now}
        if kind is not None and service.kind != kind:
            raise Conflict(f"service {service_id} is a {service.kind} service, not {kind}")
        if service.status is not ServiceStatus.RUNNING or service.endpoint is None:
            raise Conflict(
                f"service {service_id} is {service.status.value}, not running: "
                f"{service.status_reason}",
                service_status=service.status.value,
            )
        return service

    # -- logs -----------------------------------------------------------------

    async def logs(self, service_id: str, *, tail: int | None) -> Logs:
        job, _, _ = await self._job(service_id)
        if job.state is JobState.PENDING:
            raise Conflict(f"service {service_id} is pending: it has not started, so no logs yet")
        stdout_path = self.local_path(job.standard_output)
        stderr_path = (
            self.local_path(job.standard_error)
            if job.standard_error and job.standard_error != job.standard_output
            else None
        )
        stdout = await asyncio.to_thread(_read_tail, stdout_path, tail, self.log_max_bytes)
        stderr = (
            await asyncio.to_thread(_read_tail, stderr_path, tail, self.log_max_bytes)
            if stderr_path
            else None
        )
        if stdout is None and (stderr is None):
            raise NotFound(
                f"no log file of service {service_id} at {job.standard_output} "
                f"(looked at {stdout_path} on the gateway host)"
            )
        return Logs(
            stdout=stdout[0] if stdout else "",
            stderr=stderr[0] if stderr else None,
            truncated=bool((stdout and stdout[1]) or (stderr and stderr[1])),
        )

    def local_path(self, cluster_path: str) -> Path:
        for remote, local in self.path_map:
            if cluster_path == remote or cluster_path.startswith(remote.rstrip("/") + "/"):
                rest = cluster_path[len(remote.rstrip("/")) :].lstrip("/")
                return Path(local) / rest
        return Path(cluster_path)

    # -- stop -----------------------------------------------------------------

    async def stop(self, service_id: str) -> Service:
        self._running.pop(service_id, None)
        job, meta, reported = await self._job(service_id)
        if job.state.is_terminal:
            service = await self._service(job, meta, reported)
            if service.status is ServiceStatus.CANCELLED:
                return service  # stopping twice is fine
            raise Conflict(
                f"service {service_id} already ended ({service.status.value}: "
                f"{service.status_reason}); there is nothing to stop"
            )
        await self.slurm.cancel(job.job_id)
        # Slurm ends the job within moments; answer with its final state when
        # it arrives in time, else with what Slurm says now.
        deadline = time.monotonic() + STOP_WAIT_SECONDS
        while True:
            job = await self.slurm.get_job(job.job_id)
            done = job.state.is_terminal and "COMPLETING" not in job.state_flags
            if done or time.monotonic() > deadline:
                return await self._service(job, meta, reported)
            await asyncio.sleep(0.25)


def service_name(recipe: str, job_id: int) -> str:
    """``vllm-12`` for job 12 of ``inference/vllm``."""
    return f"{recipe.rsplit('/', 1)[-1]}-{job_id}"


def parse_id(service_id: str) -> int:
    if not service_id.isdigit() or len(service_id) > 12:
        raise NotFound(f"service {service_id!r} does not exist (ids are Slurm job numbers)")
    return int(service_id)


def _read_tail(path: Path, lines: int | None, max_bytes: int) -> tuple[str, bool] | None:
    """The last ``lines`` lines (all if None), at most ``max_bytes``; None if missing."""
    try:
        with path.open("rb") as f:
            size = f.seek(0, os.SEEK_END)
            start = max(0, size - max_bytes)
            f.seek(start)
            data = f.read(max_bytes)
    except (FileNotFoundError, NotADirectoryError):
        return None
    truncated = start > 0
    if truncated:
        # Drop the partial first line.
        data = data.split(b"\n", 1)[1] if b"\n" in data else data
    text = data.decode("utf-8", errors="replace")
    if lines is not None:
        parts = text.splitlines(keepends=True)
        if len(parts) > lines:
            truncated = True
            text = "".join(parts[-lines:]) if lines else ""
    return text, truncated

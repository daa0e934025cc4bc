"""Services: a recipe plus overrides, run as one Slurm job.

Nothing here is stored by the gateway. A service is rebuilt on every read from
the job record (state, times, node, user) and the job's comment (recipe,
requested configuration, creation time, owner, and what the job published
about itself). Job records come from the replica's shared view of Slurm's
jobs (jobview.py), so reads cost slurmctld nothing per request.

``ServiceManager`` is the one door to services; behind it, one module per job:
recognition.py (which jobs are services, who may see them), building.py (a
Service from its job), creating.py (create: quota, idempotency), joblogs.py
(logs), jobscript.py (the batch job), model.py (what is handed out).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable
from datetime import UTC, datetime
from pathlib import Path

import msgspec

from gateway.core import metadata
from gateway.core.building import Prober, ServiceBuilder
from gateway.core.creating import Creator
from gateway.core.errors import Conflict, NotFound
from gateway.core.joblogs import LogReader
from gateway.core.jobview import JobView
from gateway.core.logfollow import LogEvent, follow
from gateway.core.metadata import MetaCodec
from gateway.core.model import (
    Created,
    CreateRequest,
    Logs,
    Service,
    ServiceConfig,
    Stopped,
    Upstream,
    job_dir_for,
    parse_id,
)
from gateway.core.nodes import NodeAddresses, NodeStates
from gateway.core.principal import Principal
from gateway.core.recipes import RecipeCatalog
from gateway.core.recognition import Recognizer, usable, visible
from gateway.core.scheduler import ActingAs, Scheduler
from gateway.core.status import ServiceStatus, derive
from gateway.slurm import JobInfo, JobState, Minter, SlurmJobNotFound

# The model's names are handed out from here too: callers import what they use
# of services from one place (gateway/core/model.py defines them).
__all__ = [
    "CreateRequest",
    "Created",
    "Logs",
    "Service",
    "ServiceConfig",
    "ServiceManager",
    "Stopped",
    "Upstream",
]

STOP_WAIT_SECONDS = 5.0
# (Inside the class, ``list`` is the method.)
_Services = list[Service]


class ServiceManager:
    def __init__(
        self,
        *,
        slurm: Scheduler,
        recipes: RecipeCatalog,
        prober: Prober,
        codec: MetaCodec,
        job_dir: str,
        slurm_user: str,
        partition: str | None = None,
        account: str | None = None,
        path_map: list[tuple[str, str]] | None = None,
        log_max_bytes: int = 1024 * 1024,
        node_ttl: float = 300.0,
        view: JobView | None = None,
        minter: Minter | None = None,
        known_users: Callable[[], frozenset[str]] | None = None,
    ) -> None:
        self.slurm = slurm
        self.recipes = recipes
        self.prober = prober
        self.codec = codec
        # May hold `{user}`: each Slurm user's jobs write in their own folder.
        self.job_dir = job_dir.rstrip("/") or "/"
        self.slurm_user = slurm_user
        # With the cluster's key, jobs run as each caller's own Slurm user.
        self.minter = minter
        # Slurm users the site's auth file names (besides the gateway's own).
        self.known_users = known_users or frozenset
        # Jobs this replica is stopping: /v1 sends them nothing more, before
        # Slurm is even asked (other replicas see them end with the view).
        self.leaving: set[int] = set()
        # Deployment replicas handing over to a successor (core/deployments):
        # /v1 sends them nothing new; every replica decides the same.
        self.draining: frozenset[int] = frozenset()
        self.partition = partition
        self.account = account
        self.path_map = path_map or []
        self.log_max_bytes = log_max_bytes
        self.view = view or JobView(slurm)
        self.nodes = NodeAddresses(slurm, ttl=node_ttl)
        self.node_states = NodeStates(slurm)
        self.acting_as = ActingAs(slurm, minter, lambda: self.slurm_user)
        self.recognizer = Recognizer(
            view=self.view,
            codec=codec,
            recipes=recipes,
            job_dir=self.job_dir,
            gateway_user=lambda: self.slurm_user,
            known_users=lambda: self.known_users(),
        )
        self.builder = ServiceBuilder(
            codec=codec,
            recipes=recipes,
            prober=prober,
            nodes=self.nodes,
            node_states=self.node_states,
        )
        self.creator = Creator(
            recipes=recipes,
            codec=codec,
            view=self.view,
            recognizer=self.recognizer,
            builder=self.builder,
            acting_as=self.acting_as,
            owner=self.owner,
            job_dir=self.job_dir,
            partition=partition,
            account=account,
        )
        self.log_reader = LogReader(
            job_tag=codec.job_tag,
            job_dir=self.job_dir,
            path_map=self.path_map,
            max_bytes=log_max_bytes,
        )

    async def owner(self) -> str:
        """The Slurm user the gateway submits as (static tokens name it)."""
        if not self.slurm_user:
            self.slurm_user = await self.slurm.user_name()
        return self.slurm_user

    def job_dir_for(self, user: str) -> str:
        return job_dir_for(self.job_dir, user)

    visible = staticmethod(visible)

    def usable(self, principal: Principal, job: JobInfo, meta: metadata.ServiceMeta) -> bool:
        return usable(principal, job, meta)

    # -- create -----------------------------------------------------------------

    async def create(
        self,
        request: CreateRequest,
        principal: Principal,
        *,
        idempotency_key: str | None = None,
        placement: metadata.Placement | None = None,
    ) -> Created:
        return await self.creator.create(
            request, principal, idempotency_key=idempotency_key, placement=placement
        )

    # -- read -------------------------------------------------------------------

    async def list(self, principal: Principal) -> list[Service]:
        """The caller's services Slurm still knows, from the view; probes in parallel.

        One job's bad data never fails the listing: it is left out and logged once.
        """
        jobs = await self.view.jobs()
        self.recognizer.forget_gone(jobs)
        ours = [
            (job, parsed)
            for job, parsed in self.recognizer.services(jobs)
            if visible(principal, job, parsed[0])
        ]
        built = await asyncio.gather(
            *(self.builder.service(job, *parsed) for job, parsed in ours), return_exceptions=True
        )
        services = self.builder.kept([job for job, _ in ours], built)
        return sorted(services, key=lambda s: int(s.id), reverse=True)

    async def get(self, service_id: str, principal: Principal) -> Service:
        return await self.builder.service(*await self._job(service_id, principal))

    async def running(
        self, service_id: str, principal: Principal, *, kind: str | None = None
    ) -> Service:
        """The service, which must be running (and of ``kind``); 409 otherwise.

        This is on every prompt's path; it reads the view and the prober's cache
        only. At worst a prompt reaches a service stopped by another replica
        within the view's refresh interval, and gets the upstream's error (502).
        """
        service = await self.get(service_id, principal)
        if kind is not None and service.kind != kind:
            raise Conflict(f"service {service_id} is a {service.kind} service, not {kind}")
        if service.status is not ServiceStatus.RUNNING or service.upstream is None:
            raise Conflict(
                f"service {service_id} is {service.status.value}, not running: "
                f"{service.status_reason}",
                service_status=service.status.value,
            )
        return service

    async def serving(self, principal: Principal, model: str | None = None) -> _Services:
        """The vLLM services the caller may prompt that have not ended, of
        ``model`` (the name it is served under) or of every model, from the view.

        This is on every /v1 request's path: the view's jobs are grouped by
        model once per view generation, and each service is built from the
        same memo and prober cache as a prompt's."""
        await self.view.jobs_ready()
        index = self.recognizer.models()
        if model is None:
            # A job serving adapters is in several groups: each once.
            unique = {entry[0].job_id: entry for group in index.values() for entry in group}
            entries = list(unique.values())
        else:
            entries = index.get(model, [])
        allowed = [
            entry
            for entry in entries
            if entry[0].job_id not in self.leaving
            and entry[0].job_id not in self.draining
            and usable(principal, entry[0], entry[1])
        ]
        if not allowed:
            return []
        built: tuple[Service | BaseException, ...]
        if len(allowed) == 1:  # the common case, without a gather's tasks
            try:
                built = (await self.builder.service_of(*allowed[0]),)
            except Exception as exc:
                built = (exc,)
        else:
            built = tuple(
                await asyncio.gather(
                    *(self.builder.service_of(*entry) for entry in allowed),
                    return_exceptions=True,
                )
            )
        return self.builder.kept([job for job, _, _ in allowed], built)

    def counts(self) -> dict[tuple[str, str, str], int]:
        """Services by tenant, recipe and status, from the view as last listed,
        with no call and no probe: the status last built for a job, else Slurm's
        say without a health answer (a running job then counts as starting).
        A job with no tenant recorded counts for the tenant of its Slurm user."""
        counts: dict[tuple[str, str, str], int] = {}
        for job, (meta, reported) in self.recognizer.services(self.view.snapshot()):
            status = self.builder.last_status(job)
            if status is None:
                status = derive(job, reported, None)[0]
            key = (meta.tenant or job.user_name, meta.recipe, status.value)
            counts[key] = counts.get(key, 0) + 1
        return counts

    async def _job(
        self, service_id: str, principal: Principal
    ) -> tuple[JobInfo, metadata.ServiceMeta, metadata.Reported]:
        """The job of a service the caller may see, with what its comment
        holds; one and the same 404 for any other job id, known or not."""
        job_id = parse_id(service_id)
        job = await self.view.job(job_id)
        parsed = self.recognizer.parse(job) if job is not None else None
        if (
            job is None
            or parsed is None
            or self.recognizer.is_twin(job, parsed[0])
            or not visible(principal, job, parsed[0])
        ):
            if job is not None:
                # As long as for an id the view does not hold (which waits for
                # a listing), and the same error when that listing fails: the
                # answer must not tell another's from none.
                await self.view.fresh(self.view.clock())
            raise NotFound(
                f"service {service_id} does not exist: no service of yours has this id "
                "(finished services are forgotten after Slurm's MinJobAge)"
            )
        return job, *parsed

    # -- logs -------------------------------------------------------------------

    async def logs(self, service_id: str, principal: Principal, *, tail: int | None) -> Logs:
        job, meta, _ = await self._job(service_id, principal)
        return await self.log_reader.logs(service_id, job, meta, tail=tail)

    def local_path(self, cluster_path: str) -> Path:
        return self.log_reader.local_path(cluster_path)

    async def follow_logs(
        self,
        service_id: str,
        principal: Principal,
        *,
        tail: int | None,
        stopping: Callable[[], bool] = lambda: False,
    ) -> AsyncGenerator[LogEvent, None]:
        """The service's log lines as they are written, until its job ends or
        ``stopping()`` (gateway/core/logfollow.py). 404 as ``logs``; a pending
        service is waited for; 429 or 503 past the bounds of followers."""
        job, meta, reported = await self._job(service_id, principal)
        slot = self.log_reader.followers.admit(principal.tenant)

        async def status(now: JobInfo) -> tuple[str, str]:
            parsed = self.recognizer.parse(now) or (meta, reported)
            service = await self.builder.service(now, *parsed)
            return service.status.value, service.status_reason

        return follow(
            self.log_reader,
            job,
            meta,
            view=self.view,
            status=status,
            slot=slot,
            tail=tail,
            stopping=stopping,
        )

    # -- stop -------------------------------------------------------------------

    async def stop(self, service_id: str, principal: Principal) -> Stopped:
        """Cancel the service's job and answer with its final state.

        Safe to repeat: clients stop services in cleanup paths and retry on
        timeouts, so a service that already ended, however it ended, is
        stopped: its final state, no error. Only an unknown id is 404.
        """
        job, meta, reported = await self._job(service_id, principal)
        if job.state.is_terminal:
            return Stopped(await self.builder.service(job, meta, reported), already_ended=True)
        if len(self.leaving) > 4096:
            self.leaving.clear()
        self.leaving.add(job.job_id)
        try:
            # As the job's own user (an admin stopping another user's service too).
            await self.acting_as(job.user_name, principal).cancel(job.job_id)
        except SlurmJobNotFound:
            return Stopped(await self._gone(job, meta, reported), already_ended=True)
        except BaseException:
            self.leaving.discard(job.job_id)  # not stopped: it may take prompts again
            raise
        # Slurm ends the job within moments; answer with its final state when
        # it arrives in time, else with what Slurm says now. The wait shares
        # the view's listings with every other reader.
        final = await self.view.wait_for(job.job_id, _settled, STOP_WAIT_SECONDS)
        if final is None:
            return Stopped(await self._gone(job, meta, reported), already_ended=False)
        return Stopped(await self.builder.service(final, meta, reported), already_ended=False)

    async def shorten(self, service_id: str, minutes: int, principal: Principal) -> None:
        """Lower the service's time limit, as its job's own user."""
        job, _, _ = await self._job(service_id, principal)
        if not job.state.is_terminal:
            await self.acting_as(job.user_name, principal).shorten(job.job_id, minutes)

    async def _gone(
        self, job: JobInfo, meta: metadata.ServiceMeta, reported: metadata.Reported
    ) -> Service:
        """A job purged while being stopped: it was cancelled, and is no more."""
        ended = msgspec.structs.replace(
            job, state=JobState.CANCELLED, end_time=job.end_time or datetime.now(tz=UTC)
        )
        return await self.builder.service(ended, meta, reported)


def _settled(job: JobInfo | None) -> bool:
    """Gone from Slurm, or ended with its exit code final."""
    return job is None or (job.state.is_terminal and "COMPLETING" not in job.state_flags)

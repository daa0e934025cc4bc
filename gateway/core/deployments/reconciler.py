"""Keeps every declared deployment at its count: one loop per gateway replica.

Each round reads the declared file and the shared job view (no listing of its
own: the view lists for every reader at once), builds each deployment's jobs
with the same health probes as /v1, plans (plan.py) and acts: submissions go
through the ordinary create with an idempotency key the plan derives from the
jobs, so replicas that decide the same thing at once leave one job; stops go
through the ordinary stop. What the status shows is rebuilt from the jobs too,
so every replica answers alike; only this replica's failed calls to Slurm and
the moments it first saw a job answer or become unneeded are its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Callable

import structlog

from gateway import metrics
from gateway.core import metadata
from gateway.core.deployments import view as views
from gateway.core.deployments.elastic import Elastic, LoadReader
from gateway.core.deployments.plan import (
    Plan,
    Replica,
    Submit,
    Timing,
    lead_time,
    leaving,
    plan,
)
from gateway.core.deployments.spec import Declared, Deployment, DeploymentsFile
from gateway.core.errors import GatewayError, NotFound
from gateway.core.model import Service
from gateway.core.principal import Method, Principal, Role
from gateway.core.services import ServiceManager
from gateway.core.status import ServiceStatus
from gateway.slurm import JobInfo, JobState, SlurmError

log = structlog.get_logger(__name__)
audit = structlog.get_logger("gateway.audit")

Jobs = list[tuple[JobInfo, metadata.ServiceMeta, metadata.Reported]]
# Errors of this replica's own calls, kept per deployment for its status.
_ERRORS_KEPT = 5


class Reconciler:
    def __init__(
        self,
        *,
        services: ServiceManager,
        declared: DeploymentsFile | None,
        principal_for: Callable[[Deployment], Principal],
        timing: Timing | None = None,
        interval: float = 2.0,
        clock: Callable[[], float] = time.time,
        read_load: LoadReader | None = None,
    ) -> None:
        self.services = services
        self.file = declared
        self.principal_for = principal_for
        self.timing = timing or Timing()
        self.interval = interval
        self.clock = clock
        self.elastic = Elastic(read_load, clock, self._note, self.timing.grace)
        # When this replica first saw a job unneeded (its drain counts from then).
        self._marks: dict[int, float] = {}
        # When it first saw a job answer: the deployment's start-up time.
        self._answered: dict[int, float] = {}
        self._starting: set[int] = set()
        # What this replica read of each deployment, and since when.
        self._readings: dict[str, tuple[object, float]] = {}
        self._startup: dict[str, float] = {}
        self._errors: dict[str, list[views.Action]] = {}
        # Calls to Slurm that failed: the deployment waits before the next.
        self._retry_at: dict[str, tuple[float, float]] = {}
        self.statuses: dict[str, views.DeploymentStatus] = {}
        self._round = asyncio.Event()
        self._loop: asyncio.Task[None] | None = None
        self.elastic.declared = lambda: self.file.declared if self.file is not None else None
        self.elastic.startup = self._startup.get

    # -- lifecycle ------------------------------------------------------------

    def start(self) -> None:
        if self._loop is None and self.file is not None:
            self._loop = asyncio.create_task(self._run(), name="deployments")

    async def close(self) -> None:
        if self._loop is not None:
            self._loop.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._loop
            self._loop = None

    async def _run(self) -> None:
        while True:
            try:
                await self.reconcile()
            except SlurmError as exc:
                log.warning("deployments_round_failed", error=str(exc)[:300])
            except Exception:  # never let the loop die
                log.exception("deployments_round_failed")
            await self.elastic.pause(self.interval)

    # -- reads ------------------------------------------------------------------

    async def all(self, principal: Principal) -> list[views.DeploymentStatus]:
        await self._first_round()
        return [s for name, s in sorted(self.statuses.items()) if _visible(principal, s)]

    async def get(self, name: str, principal: Principal) -> views.DeploymentStatus:
        await self._first_round()
        status = self.statuses.get(name)
        if status is None or not _visible(principal, status):
            raise NotFound(f"deployment {name[:64]!r} does not exist (or is not yours)")
        return status

    async def _first_round(self) -> None:
        if self.file is not None and not self._round.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._round.wait(), timeout=10)

    # -- one round --------------------------------------------------------------

    async def reconcile(self) -> None:
        if self.file is None:
            return
        declared = self.file.current()
        jobs = await self.services.view.jobs()
        groups = self._groups(jobs)
        now = self.clock()
        draining: set[int] = set()
        work = []
        statuses: dict[str, views.DeploymentStatus] = {}
        for name in sorted(declared.names | groups.keys()):
            deployment = declared.deployments.get(name)
            built = await self._build(groups.get(name, []), now)
            replicas = [replica for replica, _ in built]
            if name not in declared.names and not any(r.alive for r in replicas):
                continue  # removed, and gone: Slurm only remembers its jobs a while
            self._observe(name, built, now)
            error = declared.errors.get(name)
            blocked = self._blocked(deployment)
            if name in declared.names and (deployment is None or blocked):
                # Declared but not usable: its jobs are left as they are.
                statuses[name] = self._status(
                    name, declared, None, built, Plan(), blocked or error, now
                )
                continue
            want, grow = await self.elastic.want(deployment, built, now)
            done = plan(
                deployment,
                replicas,
                now,
                self.timing,
                marks=self._marks,
                lead=self._lead(name, deployment),
                read_for=self._read_for(name, deployment, now),
                want=want,
                grow=grow,
            )
            draining |= done.draining
            statuses[name] = self._status(name, declared, deployment, built, done, error, now, want)
            work.append(self._act(name, deployment, done, now))
        self.services.draining = frozenset(draining)
        self.statuses = statuses
        self._gauge(statuses)
        self._round.set()
        self._forget(jobs)
        self.elastic.forget(set(declared.deployments), {job.job_id for job in jobs})
        await asyncio.gather(*work)

    def _groups(self, jobs: list[JobInfo]) -> dict[str, Jobs]:
        groups: dict[str, Jobs] = {}
        for job, (meta, reported) in self.services.recognizer.services(jobs):
            if meta.placement is not None:
                groups.setdefault(meta.placement.deployment, []).append((job, meta, reported))
        return groups

    async def _build(self, jobs: Jobs, now: float) -> list[tuple[Replica, Service]]:
        built = await asyncio.gather(
            *(self.services.builder.service(job, meta, reported) for job, meta, reported in jobs),
            return_exceptions=True,
        )
        out = []
        for (job, meta, _), service in zip(jobs, built, strict=True):
            if isinstance(service, BaseException):
                continue  # logged by the listing of services already
            assert meta.placement is not None
            replica = _replica(job, meta.placement, service, now, self.timing)
            out.append((replica, service))
        return sorted(out, key=lambda pair: pair[0].job_id)

    def _observe(self, name: str, built: list[tuple[Replica, Service]], now: float) -> None:
        """The deployment's start-up time, from submission to answering, as seen
        here: only of jobs this replica saw before they answered (one found
        answering, after a restart, says nothing of how long it took)."""
        for replica, _ in built:
            if replica.job_id in self._answered:
                continue
            if replica.status is not ServiceStatus.RUNNING:
                self._starting.add(replica.job_id)
            elif replica.job_id in self._starting:
                self._answered[replica.job_id] = now
                self._starting.discard(replica.job_id)
                if replica.submitted is not None:
                    self._startup[name] = max(0.0, now - replica.submitted)
            else:
                self._answered[replica.job_id] = now

    def _read_for(self, name: str, deployment: Deployment | None, now: float) -> float:
        """How long this replica has read the deployment as it is declared now
        (a removal, another count, another generation is a new reading)."""
        reading = (
            (deployment.generation, deployment.minimum, deployment.maximum) if deployment else None
        )
        known = self._readings.get(name)
        if known is None or known[0] != reading:
            self._readings[name] = (reading, now)
            return 0.0
        return now - known[1]

    def _lead(self, name: str, deployment: Deployment | None) -> float:
        limit = deployment.resources.time_limit_minutes * 60 if deployment else None
        timing = self.timing
        if deployment is not None and deployment.spec.lead_seconds is not None:
            timing = dataclasses.replace(timing, lead=deployment.spec.lead_seconds)
        return lead_time(timing, self._startup.get(name), limit)

    def _blocked(self, deployment: Deployment | None) -> str | None:
        if deployment is None:
            return None
        try:
            principal = self.principal_for(deployment)
        except GatewayError as exc:
            return f"{deployment.where}: deployments.{deployment.name}.{exc.detail}"
        most = principal.limits.max_services
        # One more than the replicas: a successor runs beside its predecessor.
        if most is not None and deployment.replicas and deployment.replicas + 1 > most:
            return (
                f"{deployment.where}: deployments.{deployment.name}.replicas: "
                f"{deployment.replicas} and a successor are over tenant {principal.tenant}'s "
                f"max_services ({most})"
            )
        return None

    # -- acting -----------------------------------------------------------------

    async def _act(self, name: str, deployment: Deployment | None, done: Plan, now: float) -> None:
        retry = self._retry_at.get(name)
        try:
            # Stops are due whatever the submissions' trouble: a job past its
            # drain would be killed by Slurm mid-request.
            principal = self._reconciler_principal()
            for shorten in done.shortens:
                await self.services.shorten(str(shorten.job_id), shorten.minutes, principal)
                self._note(name, "leave", str(shorten.job_id), shorten.reason)
            for stop in done.stops:
                await self.services.stop(str(stop.job_id), principal)
                self._note(name, "stop", str(stop.job_id), stop.reason)
            if retry is not None and now < retry[0]:
                return
            if deployment is not None:
                for submit in done.submits:
                    await self._submit(deployment, submit)
        except (GatewayError, SlurmError) as exc:
            reason = getattr(exc, "detail", None) or str(exc)
            wait = min(2 * retry[1], 300.0) if retry else 10.0
            self._retry_at[name] = (now + wait, wait)
            self._note(name, "error", None, f"{reason[:300]} (next try in {wait:.0f} s)")
            kept = self._errors.setdefault(name, [])
            kept.append(views.Action(at=views.utc(now), action="error", reason=reason[:300]))
            del kept[:-_ERRORS_KEPT]
        else:
            self._retry_at.pop(name, None)

    async def _submit(self, deployment: Deployment, submit: Submit) -> None:
        created = await self.services.create(
            deployment.request(),
            self.principal_for(deployment),
            idempotency_key=submit.key(deployment),
            placement=submit.placement(deployment),
        )
        if not created.replayed:
            self._note(deployment.name, f"submit.{submit.why}", created.service.id, submit.reason)

    def _note(self, name: str, action: str, service_id: str | None, reason: str) -> None:
        metrics.series(metrics.DEPLOYMENT_ACTIONS, name, action.split(".")[0]).inc()
        audit.info(
            f"deployment.{action}", deployment=name, service_id=service_id, reason=reason[:300]
        )

    def _reconciler_principal(self) -> Principal:
        return Principal(
            tenant="",
            slurm_user=self.services.slurm_user,
            role=Role.ADMIN,
            method=Method.NONE,
            label="deployments",
        )

    # -- status -----------------------------------------------------------------

    def _status(
        self,
        name: str,
        declared: Declared,
        deployment: Deployment | None,
        built: list[tuple[Replica, Service]],
        done: Plan,
        error: str | None,
        now: float,
        want: int | None = None,
    ) -> views.DeploymentStatus:
        """``want``: the count this round wants (None: as declared)."""
        return views.status(
            name,
            listed=name in declared.names,
            owner=declared.owners.get(name),
            declared=declared.deployments.get(name),
            in_force=deployment,
            built=built,
            done=done,
            error=error,
            errors=self._errors.get(name, []),
            now=now,
            want=want,
            scaling=self.elastic.status(deployment),
            loads=self.elastic.loads,
        )

    def _gauge(self, statuses: dict[str, views.DeploymentStatus]) -> None:
        for name, status in statuses.items():
            if status.scaling is not None and status.scaling.load_per_replica is not None:
                metrics.series(metrics.DEPLOYMENT_LOAD, name).set(status.scaling.load_per_replica)
            counts = status.replicas
            for state, value in (
                ("wanted", counts.wanted),
                ("running", counts.running),
                ("starting", counts.starting),
                ("pending", counts.pending),
            ):
                metrics.series(metrics.DEPLOYMENT_REPLICAS, name, state).set(value)

    def _forget(self, jobs: list[JobInfo]) -> None:
        if len(self._marks) + len(self._answered) > 4 * len(jobs) + 256:
            current = {job.job_id for job in jobs}
            self._marks = {k: v for k, v in self._marks.items() if k in current}
            self._answered = {k: v for k, v in self._answered.items() if k in current}
            self._starting &= current


def _replica(
    job: JobInfo, placement: metadata.Placement, service: Service, now: float, timing: Timing
) -> Replica:
    ends = None
    # A pending job's start_time is Slurm's guess: the limit counts once it runs.
    if job.start_time is not None and job.time_limit_minutes and job.state is JobState.RUNNING:
        ends = job.start_time.timestamp() + 60 * job.time_limit_minutes
    started = job.start_time.timestamp() if job.start_time and ends is not None else None
    return Replica(
        job_id=job.job_id,
        placement=placement,
        status=service.status,
        reason=service.status_reason,
        submitted=job.submit_time.timestamp() if job.submit_time else None,
        started=started,
        minutes=job.time_limit_minutes,
        leaving=leaving(
            placement.minutes,
            job.time_limit_minutes,
            ended=job.state.is_terminal,
            ends=ends,
            now=now,
            timing=timing,
        ),
        ends=ends,
        ended=job.end_time.timestamp() if job.end_time and job.state.is_terminal else None,
    )


def _visible(principal: Principal, status: views.DeploymentStatus) -> bool:
    return principal.is_admin or status.tenant is None or status.tenant == principal.tenant

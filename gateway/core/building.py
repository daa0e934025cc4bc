"""A Service built from its job: Slurm's record, what the job's comment
holds, the recipe, and whether the server answers.

A job's published endpoint is used only when it is on the job's own node
(reached at the node's address, as Slurm has it); a running service's
health comes from the prober (its cache), so a build asks Slurm at most for
a node's names, once per node and ``ttl``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import NamedTuple, Protocol

import msgspec
import structlog

from gateway.core import metadata
from gateway.core.model import (
    Service,
    ServiceConfig,
    Upstream,
    model_names,
    service_name,
    service_spec,
)
from gateway.core.nodes import NodeAddresses, NodeStates
from gateway.core.recipes import Recipe, RecipeCatalog, ServiceSpec
from gateway.core.status import ServiceStatus, derive
from gateway.slurm import JobInfo, JobState, SlurmError

log = structlog.get_logger(__name__)

# Pending reasons about nodes that cannot take jobs (not about busy ones).
# (24.11 may say "Resources" with "Nodes required for job are DOWN, DRAINED..." instead.)
_WAITS_ON_NODES = re.compile(r"ReqNodeNotAvail|NodeDown|are DOWN, DRAINED")
_UNAVAILABLE_NODES = re.compile(r"UnavailableNodes:([A-Za-z0-9._,-]+)(?![\[\w])")
# A service of a recipe removed since is listed as a plain HTTP one.
_REMOVED = ServiceSpec()


class Prober(Protocol):
    """Whether a service's server answers (gateway.upstream.probe.HealthProber)."""

    async def healthy(self, url: str, key: str | None = None) -> bool: ...

    async def vllm_ready(self, endpoint: str, model: str | None, key: str | None = None) -> bool:
        """vLLM answers /health and serves ``model``."""
        ...


class _Built(NamedTuple):
    job: JobInfo
    reported: metadata.Reported
    checked: metadata.Reported
    upstream: Upstream | None
    healthy: bool | None
    service: Service


class ServiceBuilder:
    def __init__(
        self,
        *,
        codec: metadata.MetaCodec,
        recipes: RecipeCatalog,
        prober: Prober,
        nodes: NodeAddresses,
        node_states: NodeStates,
    ) -> None:
        self.codec = codec
        self.recipes = recipes
        self.prober = prober
        self.nodes = nodes
        self.node_states = node_states
        # job id -> the last service built for it, and from what.
        self._built: dict[int, _Built] = {}
        self._reported_bad: set[int] = set()

    async def service(
        self, job: JobInfo, meta: metadata.ServiceMeta, reported: metadata.Reported
    ) -> Service:
        """The service, with why it waits when Slurm says nodes are unavailable."""
        service = await self.service_of(job, meta, reported)
        if job.state is JobState.PENDING and _WAITS_ON_NODES.search(
            f"{job.state_reason} {job.state_description}"
        ):
            # Slurm says "ReqNodeNotAvail"; which nodes, and why, is the news.
            unavailable = self.node_states.unavailable(_unavailable_nodes(job))
            if unavailable:
                reason = f"{service.status_reason}; {unavailable}"
                return msgspec.structs.replace(service, status_reason=reason)
        return service

    async def service_of(
        self, job: JobInfo, meta: metadata.ServiceMeta, reported: metadata.Reported
    ) -> Service:
        spec = service_spec(self.recipes, meta.recipe)
        # The same job record (the view keeps it until a listing changes it)
        # and the same health answer give the same service: the prompt path
        # asks this on every prompt, and building it was a tenth of its CPU.
        memo = self._built.get(job.job_id)
        if memo is not None and memo.job is job and memo.reported is reported:
            checked, upstream = memo.checked, memo.upstream
        else:
            memo = None
            checked, settled = await self._checked(job, reported)
            upstream = (
                Upstream(f"http://{checked.endpoint}", self.codec.upstream_key(meta))
                if checked.endpoint
                else None
            )
        healthy: bool | None = None
        if upstream and job.state is JobState.RUNNING and reported.phase in ("starting", "running"):
            kind = spec or _REMOVED
            if kind.kind == "vllm":
                # Ready when vLLM answers /health and serves the model asked for.
                served = model_names(spec, meta.environment).served
                healthy = await self.prober.vllm_ready(upstream.url, served, upstream.key)
            else:
                healthy = await self.prober.healthy(upstream.url + kind.health_path, upstream.key)
        if memo is not None and memo.healthy == healthy:
            return memo.service
        service = build(job, meta, checked, upstream, healthy, spec)
        if memo is None and not settled:
            return service  # a node lookup failed: ask again next time
        if len(self._built) > 65536:
            self._built.clear()
        self._built[job.job_id] = _Built(job, reported, checked, upstream, healthy, service)
        return service

    def last_status(self, job: JobInfo) -> ServiceStatus | None:
        """The status last built for this very job record, if any (no probe)."""
        memo = self._built.get(job.job_id)
        return memo.service.status if memo is not None and memo.job is job else None

    def kept(
        self, jobs: Sequence[JobInfo], built: Sequence[Service | BaseException]
    ) -> list[Service]:
        """The services built for ``jobs``; a job whose build failed is left
        out and logged once (a cancellation goes on up)."""
        services: list[Service] = []
        for job, result in zip(jobs, built, strict=True):
            if isinstance(result, Service):
                services.append(result)
            elif isinstance(result, Exception):
                self.log_bad_job(job.job_id, result)
            else:
                raise result
        return services

    def log_bad_job(self, job_id: int, exc: Exception) -> None:
        if job_id in self._reported_bad:
            return
        if len(self._reported_bad) > 65536:
            self._reported_bad.clear()
        self._reported_bad.add(job_id)
        log.warning("service_skipped", job_id=job_id, error=repr(exc)[:300])

    async def _checked(
        self, job: JobInfo, reported: metadata.Reported
    ) -> tuple[metadata.Reported, bool]:
        """``reported`` with its endpoint kept only when it is on the job's node,
        and whether that is settled (False: the node could not be looked up)."""
        if reported.refused:
            return msgspec.structs.replace(reported, endpoint=None, reason=reported.refused), True
        endpoint = reported.endpoint
        if endpoint is None:
            return reported, True
        if job.state is not JobState.RUNNING:
            # Suspended, requeued or ended: whatever it published is stale.
            return msgspec.structs.replace(reported, endpoint=None), True
        node = job.batch_host or job.nodes.split(",")[0]
        why: str | None = None
        settled = True
        try:
            host = (await self.nodes.get(node)).connect_host(endpoint.host) if node else None
        except (SlurmError, ValueError) as exc:
            log.warning("node_lookup_failed", node=node, error=str(exc))
            why = f"the published endpoint cannot be checked: Slurm did not describe node {node}"
            settled = False
        else:
            if host is None:
                why = (
                    f"the job published the endpoint {endpoint}, which is not on its node "
                    f"{node or '(none)'}; ignored"
                )
            else:
                # Reached at the node's address, as Slurm has it.
                endpoint = metadata.Endpoint(host, endpoint.port)
                return msgspec.structs.replace(reported, endpoint=endpoint), True
        self.log_bad_job(job.job_id, ValueError(why))
        return msgspec.structs.replace(reported, endpoint=None, reason=why), settled


def build(
    job: JobInfo,
    meta: metadata.ServiceMeta,
    reported: metadata.Reported,
    upstream: Upstream | None,
    healthy: bool | None,
    spec: ServiceSpec | None,
) -> Service:
    """The service as Slurm's record, its comment and its health say it is."""
    status, reason = derive(job, reported, healthy)
    live = upstream if not status.is_terminal else None
    names = model_names(spec, meta.environment)
    return Service(
        id=str(job.job_id),
        name=service_name(meta.recipe, job.job_id),
        recipe_name=meta.recipe,
        kind=(spec or _REMOVED).kind,
        status=status,
        status_reason=reason,
        config=ServiceConfig(environment=meta.environment, resources=meta.resources),
        created_at=datetime.fromtimestamp(meta.created, tz=UTC),
        started_at=job.start_time if job.state is not JobState.PENDING else None,
        ended_at=job.end_time if job.state.is_terminal else None,
        owner=meta.owner,
        tenant=meta.tenant or None,
        slurm_state=job.state.value,
        slurm_reason=job.state_reason,
        node=job.batch_host or job.nodes or None,
        endpoint=live.url if live else None,
        upstream=live,
        shared=meta.shared,
        model=names.model,
        served_model=names.served,
        max_model_len=names.max_model_len,
        adapters=names.adapters,
        idle_stop_minutes=meta.idle_stop_minutes,
    )


def submitted(job_id: int, recipe: Recipe, meta: metadata.ServiceMeta) -> Service:
    """The service a create just submitted, before Slurm lists its job."""
    names = model_names(recipe.spec.service, meta.environment)
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
        tenant=meta.tenant or None,
        slurm_state=JobState.PENDING.value,
        slurm_reason="",
        node=None,
        endpoint=None,
        shared=meta.shared,
        model=names.model,
        served_model=names.served,
        max_model_len=names.max_model_len,
        adapters=names.adapters,
        idle_stop_minutes=meta.idle_stop_minutes,
    )


def _unavailable_nodes(job: JobInfo) -> frozenset[str] | None:
    """The nodes Slurm names in the pending reason; None when it names none
    (or in a bracketed host list, not expanded here)."""
    found = _UNAVAILABLE_NODES.search(job.state_description)
    return frozenset(found.group(1).split(",")) if found else None

"""Create: a submit and one update, within the tenant's quota, once per
Idempotency-Key.

The job is submitted with its metadata unbound, then one update binds the
metadata to the job id (the job's script waits for it): a comment copied onto
another job is nothing there. Replicas do not talk to each other, so what two
of them may do at once (one key sent to both, a quota both were within) is
settled after the submit from a listing that began after it: job ids order
the creates, the later one is cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import msgspec
import structlog

from gateway.core import building, jobscript, metadata
from gateway.core.building import ServiceBuilder
from gateway.core.errors import Forbidden, InvalidRequest, NotFound, QuotaExceeded
from gateway.core.jobview import JobView
from gateway.core.model import Created, CreateRequest, Service, job_dir_for, job_name_of
from gateway.core.principal import Principal
from gateway.core.recipes import Recipe, RecipeCatalog, resolve_resources
from gateway.core.recognition import Recognizer
from gateway.core.resources import Resources
from gateway.core.scheduler import ActingAs, Scheduler
from gateway.slurm import JobInfo, JobState, SlurmError, SlurmJobNotFound

log = structlog.get_logger(__name__)

# A create with an Idempotency-Key may not start before this many seconds: the
# time to find a concurrent twin (another replica's) and cancel the later one.
IDEMPOTENT_HOLD_SECONDS = 3
# idle_stop_minutes: up to a week; only servers with vLLM's metrics report idleness.
MAX_IDLE_STOP_MINUTES = 10080
IDLE_STOP_KINDS = ("vllm",)


class Creator:
    def __init__(
        self,
        *,
        recipes: RecipeCatalog,
        codec: metadata.MetaCodec,
        view: JobView,
        recognizer: Recognizer,
        builder: ServiceBuilder,
        acting_as: ActingAs,
        owner: Callable[[], Awaitable[str]],
        job_dir: str,
        partition: str | None,
        account: str | None,
    ) -> None:
        self.recipes = recipes
        self.codec = codec
        self.view = view
        self.recognizer = recognizer
        self.builder = builder
        self.acting_as = acting_as
        self.owner = owner
        self.job_dir = job_dir
        self.partition = partition
        self.account = account
        # Creates with one Idempotency-Key on this replica wait for each other.
        self._creating: dict[str, asyncio.Lock] = {}

    async def create(
        self,
        request: CreateRequest,
        principal: Principal,
        *,
        idempotency_key: str | None = None,
        placement: metadata.Placement | None = None,
    ) -> Created:
        recipe = self._recipe_for_create(request.recipe_name)
        check_idle_stop(recipe, request.idle_stop_minutes)
        if request.shared and not principal.is_admin:
            raise Forbidden(
                "shared: only an admin may offer a service to every tenant",
            )
        environment = recipe.environment(request.environment)
        resources = resolve_resources(
            recipe.spec.resources, request.resources, field="config.resources"
        )
        gateway_user = await self.owner()
        user = principal.slurm_user or gateway_user
        if principal.credentials is None and self.acting_as.minter is None and user != gateway_user:
            raise Forbidden(
                f"this gateway holds a Slurm token for {gateway_user} only and cannot run "
                f"jobs as {user}: the site must give it the cluster's JWT key (mint mode), "
                "or the caller must send its own Slurm token"
            )
        marker = digest = ""
        if idempotency_key is not None:
            marker = self.codec.idempotency_marker(principal.tenant, user, idempotency_key)
            digest = request.digest()
        lock = self._creating.setdefault(marker, asyncio.Lock()) if marker else None
        try:
            async with lock or contextlib.nullcontext():
                if marker:
                    earlier = await self._earlier_create(marker, digest)
                    if earlier is not None:
                        return Created(earlier, replayed=True)
                if principal.limits.any:
                    jobs = await self.view.jobs()
                    self.check_quota(principal, resources.gpus * resources.nodes, jobs)
                return await self._submit(
                    recipe,
                    environment,
                    resources,
                    principal,
                    user,
                    marker,
                    digest,
                    request.shared,
                    placement,
                    request.idle_stop_minutes,
                )
        finally:
            # Once nobody holds it. A create that still waits on this lock
            # finds the job in the view, which has it since the submit.
            if lock is not None and not lock.locked():
                self._creating.pop(marker, None)

    async def _submit(
        self,
        recipe: Recipe,
        environment: dict[str, str],
        resources: Resources,
        principal: Principal,
        user: str,
        marker: str,
        digest: str,
        shared: bool,
        placement: metadata.Placement | None = None,
        idle_stop_minutes: int | None = None,
    ) -> Created:
        meta = self.codec.new_meta(
            recipe=recipe.name,
            created=time.time(),
            owner=user,
            environment=environment,
            resources=resources.as_config(),
            tenant=principal.tenant,
            idempotency=marker,
            request_digest=digest,
            shared=shared,
            placement=placement,
            idle_stop_minutes=idle_stop_minutes,
        )
        unbound = self.codec.unbound(meta)
        check_comment_budget(unbound, environment)
        job_name = job_name_of(recipe.name, self.codec.job_tag)
        job_dir = job_dir_for(self.job_dir, user)
        submission = jobscript.submission(
            recipe,
            resources,
            unbound_meta=unbound,
            environment=environment,
            key=self.codec.upstream_key(meta),
            job_name=job_name,
            job_dir=job_dir,
            partition=self.partition,
            account=principal.account or recipe.spec.account or self.account,
            begin_time=int(time.time()) + IDEMPOTENT_HOLD_SECONDS if marker else None,
            idle_stop_seconds=idle_stop_minutes * 60 if idle_stop_minutes else None,
        )
        slurm = self.acting_as(user, principal)
        submitted = await slurm.submit(submission)
        encoded = await self._bind(slurm, submitted.job_id, unbound)
        # One slurmrestd call: the job exists now, and reading it back could
        # only fail a create that worked (a client retrying would start a
        # second job). The view shows it at once, pending, until a listing
        # brings Slurm's own record.
        self.view.put(
            JobInfo(
                job_id=submitted.job_id,
                name=job_name,
                user_name=user,
                state=JobState.PENDING,
                state_reason="None",
                partition=submission.partition or "",
                submit_time=datetime.now(tz=UTC),
                comment=encoded,
                working_directory=job_dir,
                standard_output=f"{job_dir}/{job_name}-{submitted.job_id}.out",
                standard_error=f"{job_dir}/{job_name}-{submitted.job_id}.err",
            )
        )
        service = building.submitted(submitted.job_id, recipe, meta)
        if not marker and not principal.limits.any:
            return Created(service, replayed=False)
        return await self._settle(slurm, submitted.job_id, service, principal, marker, digest)

    async def _bind(self, slurm: Scheduler, job_id: int, unbound: str) -> str:
        """Writes the metadata bound to the job's id: the one update that makes
        the job a service (its script waits for it). If Slurm refuses it, the
        job is cancelled and the create fails: nothing is left half made (a
        job whose cancel fails too ends itself, unbound, after its wait)."""
        encoded = self.codec.bind(unbound, job_id)
        try:
            await slurm.update_comment(job_id, encoded)
        except SlurmError as exc:
            log.error("create_bind_failed", job_id=job_id, error=str(exc)[:300])
            with contextlib.suppress(SlurmError):
                await slurm.cancel(job_id)
            raise
        return encoded

    async def _settle(
        self,
        slurm: Scheduler,
        job_id: int,
        service: Service,
        principal: Principal,
        marker: str,
        digest: str,
    ) -> Created:
        """Checks, with a listing that began after the submit, what another
        replica may have done at the same time: the same Idempotency-Key
        submitted twice, or a quota both creates were within on their own.
        Job ids order the creates: the lower one stands, the later is
        cancelled (an idempotent one has not started: it waits its hold)."""
        try:
            await self.view.fresh(self.view.clock())
        except SlurmError as exc:
            # Nothing lost: the job stands, unverified; said in the log.
            log.warning("create_not_verified", job_id=job_id, error=str(exc)[:300])
            return Created(service, replayed=False)
        first = self.recognizer.firsts().get(marker) if marker else None
        if first is not None and first.job_id < job_id:
            await self._cancel_twin(slurm, job_id, f"twin of job {first.job_id}")
            return Created(await self._replay(first, digest), replayed=True)
        try:
            self.check_quota(principal, 0, self.view.snapshot(), upto=job_id)
        except QuotaExceeded:
            await self._cancel_twin(slurm, job_id, "over quota")
            raise
        if marker:
            await self._release(slurm, job_id)
        return Created(service, replayed=False)

    async def _release(self, slurm: Scheduler, job_id: int) -> None:
        """The job stands: its hold has served, so it need not wait for
        Slurm's next scheduling pass (up to a minute) once the hold ends."""
        try:
            await slurm.release(job_id)
        except SlurmError as exc:
            # It starts at its begin time all the same.
            log.warning("create_release_failed", job_id=job_id, error=str(exc)[:300])

    async def _cancel_twin(self, slurm: Scheduler, job_id: int, why: str) -> None:
        try:
            await slurm.cancel(job_id)
        except SlurmJobNotFound:
            pass
        except SlurmError as exc:
            # It stays visible (a twin is hidden only once ended) and can be stopped.
            log.error("create_cancel_failed", job_id=job_id, why=why, error=str(exc)[:300])
            raise
        log.info("create_cancelled", job_id=job_id, why=why)
        known = self.view.peek(job_id)
        if known is not None:
            self.view.put(
                msgspec.structs.replace(
                    known, state=JobState.CANCELLED, end_time=datetime.now(tz=UTC)
                )
            )

    async def _earlier_create(self, marker: str, digest: str) -> Service | None:
        """The service an earlier create with this key made, while Slurm holds it."""
        await self.view.jobs()  # a view no older than its interval
        first = self.recognizer.firsts().get(marker)
        if first is None:
            return None
        return await self._replay(first, digest)

    async def _replay(self, first: JobInfo, digest: str) -> Service:
        parsed = self.recognizer.parse(first)
        assert parsed is not None  # firsts() holds services only
        check_same_request(parsed[0], digest, first.job_id)
        return await self.builder.service(first, *parsed)

    def check_quota(
        self, principal: Principal, gpus: int, jobs: list[JobInfo], *, upto: int | None = None
    ) -> None:
        """429 when this create would take the tenant over a limit, counting
        from Slurm's view its services that have not ended (those up to job
        ``upto`` when given: the create's own job is among them then)."""
        limits = principal.limits
        if not limits.any:
            return
        count, used = 0 if upto is not None else 1, gpus
        for job in jobs:
            if job.state.is_terminal or (upto is not None and job.job_id > upto):
                continue
            parsed = self.recognizer.parse(job)
            if parsed is None or parsed[0].tenant != principal.tenant:
                continue
            if self.recognizer.is_twin(job, parsed[0]):
                continue
            count += 1
            used += _gpus_of(parsed[0].resources)
        if limits.max_services is not None and count > limits.max_services:
            raise QuotaExceeded(
                f"tenant {principal.tenant} may have at most {limits.max_services} services "
                "pending or running (max_services); stop one first",
                limit="max_services",
            )
        if limits.max_gpus is not None and used > limits.max_gpus:
            raise QuotaExceeded(
                f"tenant {principal.tenant} may use at most {limits.max_gpus} GPUs at once "
                f"(max_gpus); this would make {used}",
                limit="max_gpus",
            )

    def _recipe_for_create(self, name: str) -> Recipe:
        try:
            return self.recipes.get(name)
        except NotFound as exc:
            raise InvalidRequest.field("recipe_name", exc.detail) from None


def check_idle_stop(recipe: Recipe, minutes: int | None) -> None:
    """The job tells idleness from its server's vLLM metrics (jobscript.py):
    a recipe whose server reports none cannot stop itself."""
    if minutes is None:
        return
    if not 1 <= minutes <= MAX_IDLE_STOP_MINUTES:
        raise InvalidRequest.field(
            "idle_stop_minutes", f"must be from 1 to {MAX_IDLE_STOP_MINUTES} minutes"
        )
    kind = recipe.spec.service.kind
    if kind not in IDLE_STOP_KINDS:
        raise InvalidRequest.field(
            "idle_stop_minutes",
            f"the recipe's service kind ({kind}) cannot report idleness; only "
            f"{', '.join(IDLE_STOP_KINDS)} services can stop themselves when idle",
        )


def check_same_request(meta: metadata.ServiceMeta, digest: str, job_id: int) -> None:
    if meta.request_digest != digest:
        raise InvalidRequest.field(
            "Idempotency-Key",
            f"was used for another request (service {job_id}); "
            "a key may be reused only with the same body",
        )


def check_comment_budget(encoded: str, environment: dict[str, str]) -> None:
    over = metadata.comment_room(encoded)
    if over <= 0:
        return
    # The longest value is the one to shorten; base64 makes 3 bytes 4 characters.
    key = max(environment, key=lambda k: len(environment[k]), default=None)
    field = f"config.environment.{key}" if key else "config"
    raise InvalidRequest.field(
        field,
        f"too long: the service's metadata would take {over} characters more than "
        f"the {metadata.META_BUDGET} that fit in Slurm's {metadata.COMMENT_LIMIT}-character "
        f"job comment; shorten it by at least {-(-over * 3 // 4)} characters",
    )


def _gpus_of(resources: dict[str, str | int | None]) -> int:
    gpu, nodes = resources.get("gpu"), resources.get("nodes")
    try:
        return int(gpu or 0) * int(nodes or 1)
    except ValueError:
        return 0

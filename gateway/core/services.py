"""Services: a recipe plus overrides, run as one Slurm job.

Nothing here is stored by the gateway. A service is rebuilt on every read from
the job record (state, times, node, user) and the job's comment (recipe,
requested configuration, creation time, owner, and what the job published
about itself). Job records come from the replica's shared view of Slurm's
jobs (jobview.py), so reads cost slurmctld nothing per request.

What a job writes is untrusted: a job is a service only when its metadata
carries the gateway's MAC and its Slurm user is one the gateway submits as;
its endpoint is used only when it names the job's own node; its logs are read
only from the files the gateway chose.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import msgspec
import structlog

from gateway.core import jobscript, metadata
from gateway.core.errors import Conflict, Forbidden, InvalidRequest, NotFound, QuotaExceeded
from gateway.core.joblogs import LogFile, read_tail
from gateway.core.jobview import JobView
from gateway.core.metadata import MetaCodec
from gateway.core.nodes import NodeAddresses, NodeStates
from gateway.core.principal import Principal
from gateway.core.recipes import Recipe, RecipeCatalog, resolve_resources
from gateway.core.status import ServiceStatus, derive
from gateway.slurm import (
    JobInfo,
    JobState,
    JobSubmission,
    Minter,
    SlurmClient,
    SlurmError,
    SlurmJobNotFound,
)
from gateway.upstream.probe import HealthProber

log = structlog.get_logger(__name__)

STOP_WAIT_SECONDS = 5.0
JOB_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# The job's copy of its upstream key; the recipe hands it to the server.
KEY_VARIABLE = "GW_SERVICE_KEY"
_SERVICE_ID = re.compile(r"[0-9]{1,12}")
# Pending reasons about nodes that cannot take jobs (not about busy ones).
# (24.11 may say "Resources" with "Nodes required for job are DOWN, DRAINED..." instead.)
_WAITS_ON_NODES = re.compile(r"ReqNodeNotAvail|NodeDown|are DOWN, DRAINED")
_UNAVAILABLE_NODES = re.compile(r"UnavailableNodes:([A-Za-z0-9._,-]+)(?![\[\w])")
# A create with an Idempotency-Key may not start before this many seconds: the
# time to find a concurrent twin (another replica's) and cancel the later one.
IDEMPOTENT_HOLD_SECONDS = 3
# An old-format comment (its MAC does not name the job) is believed only on a
# job submitted within this window (seconds) of the creation time it records.
LEGACY_CLOCK_SKEW = 5.0
LEGACY_SUBMIT_WINDOW = 60.0


class ServiceConfig(msgspec.Struct, frozen=True, kw_only=True):
    environment: dict[str, str]
    resources: dict[str, str | int | None]


class Upstream:
    """Where a running service answers, and the key it requires.

    A plain class on purpose: msgspec and the API refuse to serialise it, and
    its repr hides the key, so no response or log line can carry the key.
    """

    __slots__ = ("key", "url")

    def __init__(self, url: str, key: str) -> None:
        self.url = url
        self.key = key

    def __repr__(self) -> str:
        return f"Upstream({self.url!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Upstream) and (self.url, self.key) == (other.url, other.key)

    def __hash__(self) -> int:
        return hash(self.url)


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
    tenant: str | None
    slurm_state: str
    slurm_reason: str
    node: str | None
    endpoint: str | None
    upstream: Upstream | None = None
    shared: bool = False


class Logs(msgspec.Struct, frozen=True, kw_only=True):
    stdout: str
    stderr: str | None
    truncated: bool
    reason: str | None = None


class CreateRequest(msgspec.Struct, frozen=True, kw_only=True):
    recipe_name: str
    environment: dict[str, str] = msgspec.field(default_factory=dict)
    resources: dict[str, Any] = msgspec.field(default_factory=dict)
    # Usable by every tenant through /v1 (admins only may say so).
    shared: bool = False

    def digest(self) -> str:
        """Same request, same digest: what an Idempotency-Key is bound to."""
        return hashlib.sha256(msgspec.json.encode(self, order="sorted")).hexdigest()[:18]


class Created(NamedTuple):
    service: Service
    # An earlier create with the same Idempotency-Key made it.
    replayed: bool


class ServiceManager:
    def __init__(
        self,
        *,
        slurm: SlurmClient,
        recipes: RecipeCatalog,
        prober: HealthProber,
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
        self._as_users: dict[str, SlurmClient] = {}
        # Creates with one Idempotency-Key on this replica wait for each other.
        self._creating: dict[str, asyncio.Lock] = {}
        # Idempotency marker -> the job with the lowest id holding it in the
        # view (as of the view's generation): a later one that ended is a
        # cancelled twin.
        self._first_of: dict[str, JobInfo] = {}
        self._first_of_generation = -1
        # Served model -> its vLLM jobs, as of the view's generation (/v1).
        self._models: dict[str, _ModelEntries] = {}
        self._models_generation = -1
        # Jobs this replica is stopping: /v1 sends them nothing more, before
        # Slurm is even asked (other replicas see them end with the view).
        self.leaving: set[int] = set()
        self.partition = partition
        self.account = account
        self.path_map = path_map or []
        self.log_max_bytes = log_max_bytes
        self.view = view or JobView(slurm)
        self.nodes = NodeAddresses(slurm, ttl=node_ttl)
        self.node_states = NodeStates(slurm)
        self._reported_bad: set[int] = set()
        # job id -> ((comment, user), what it parses to): a comment is checked
        # (MAC, owner) once, not on every read.
        self._built: dict[int, _Built] = {}
        self._parsed: dict[int, tuple[tuple[str, str, JobState], metadata.Decoded | None]] = {}
        # Nonce -> jobs with an old-format comment, per view generation.
        self._legacy_jobs_of: dict[bytes, list[int]] = {}
        self._legacy_generation = -1

    async def owner(self) -> str:
        """The Slurm user the gateway submits as (static tokens name it)."""
        if not self.slurm_user:
            self.slurm_user = await self.slurm.user_name()
        return self.slurm_user

    def job_dir_for(self, user: str) -> str:
        return self.job_dir.replace("{user}", user)

    def _slurm_as(self, user: str, principal: Principal | None = None) -> SlurmClient:
        """The client acting as ``user``: the caller's own token when it sent
        one, else tokens minted for that user, else the gateway's own."""
        credentials = principal.credentials if principal is not None else None
        if credentials is not None and credentials.user_name == user:
            return self.slurm.as_user(credentials)
        if self.minter is None or user == self.slurm_user:
            return self.slurm
        client = self._as_users.get(user)
        if client is None:
            if len(self._as_users) > 10_000:
                self._as_users.clear()
            client = self._as_users[user] = self.slurm.with_tokens(self.minter.for_user(user))
        return client

    @staticmethod
    def visible(principal: Principal, job: JobInfo, meta: metadata.ServiceMeta) -> bool:
        """Admins see every service; others those of their tenant run as their
        Slurm user (a job with no recorded tenant belongs to its Slurm user)."""
        if principal.is_admin:
            return True
        if job.user_name != principal.slurm_user:
            return False
        if meta.tenant:
            return meta.tenant == principal.tenant
        # No tenant recorded (made before tenants, or its comment was
        # overwritten): only the tenant named after the Slurm user, so that
        # tenants sharing a user do not see each other's through it.
        return principal.tenant == principal.slurm_user

    def usable(self, principal: Principal, job: JobInfo, meta: metadata.ServiceMeta) -> bool:
        """Whom a service takes prompts from: those who see it, and everyone
        when an admin shared it."""
        return meta.shared or self.visible(principal, job, meta)

    # -- create ---------------------------------------------------------------

    async def create(
        self,
        request: CreateRequest,
        principal: Principal,
        *,
        idempotency_key: str | None = None,
    ) -> Created:
        recipe = self._recipe_for_create(request.recipe_name)
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
        if principal.credentials is None and self.minter is None and user != gateway_user:
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
                    self._check_quota(principal, resources.gpus * resources.nodes, jobs)
                return await self._submit(
                    recipe,
                    environment,
                    resources,
                    principal,
                    user,
                    marker,
                    digest,
                    shared=request.shared,
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
        resources: Any,
        principal: Principal,
        user: str,
        marker: str,
        digest: str,
        *,
        shared: bool = False,
    ) -> Created:
        resources_wire = resources.as_config()
        meta = self.codec.new_meta(
            recipe=recipe.name,
            created=time.time(),
            owner=user,
            environment=environment,
            resources=resources_wire,
            tenant=principal.tenant,
            idempotency=marker,
            request_digest=digest,
            shared=shared,
        )
        unbound = self.codec.unbound(meta)
        self._check_comment_budget(unbound, environment)
        context = jobscript.render_context(recipe, environment, resources_wire)
        job_name = job_name_of(recipe.name, self.codec.job_tag)
        job_dir = self.job_dir_for(user)
        submission = JobSubmission(
            script=jobscript.build(recipe, unbound, context),
            name=job_name,
            working_directory=job_dir,
            environment={
                "PATH": JOB_PATH,
                **environment,
                KEY_VARIABLE: self.codec.upstream_key(meta),
            },
            partition=recipe.partition(resources) or self.partition,
            account=principal.account or recipe.spec.account or self.account,
            standard_output=f"{job_dir}/{job_name}-%j.out",
            standard_error=f"{job_dir}/{job_name}-%j.err",
            nodes=resources.nodes,
            cpus_per_task=resources.cpus,
            memory_per_node_mb=resources.memory_mb,
            time_limit_minutes=resources.time_limit_minutes,
            gpus_per_node=resources.gpus or None,
            comment=unbound,
            begin_time=int(time.time()) + IDEMPOTENT_HOLD_SECONDS if marker else None,
        )
        slurm = self._slurm_as(user, principal)
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
        service = self._service_from_submission(submitted.job_id, recipe, meta)
        if not marker and not principal.limits.any:
            return Created(service, replayed=False)
        return await self._settle(slurm, submitted.job_id, service, principal, marker, digest)

    async def _bind(self, slurm: SlurmClient, job_id: int, unbound: str) -> str:
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
        slurm: SlurmClient,
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
        first = self._firsts().get(marker) if marker else None
        if first is not None and first.job_id < job_id:
            await self._cancel_twin(slurm, job_id, f"twin of job {first.job_id}")
            return Created(await self._replay(first, digest), replayed=True)
        try:
            self._check_quota(principal, 0, self.view.snapshot(), upto=job_id)
        except QuotaExceeded:
            await self._cancel_twin(slurm, job_id, "over quota")
            raise
        return Created(service, replayed=False)

    async def _cancel_twin(self, slurm: SlurmClient, job_id: int, why: str) -> None:
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
        first = self._firsts().get(marker)
        if first is None:
            return None
        return await self._replay(first, digest)

    async def _replay(self, first: JobInfo, digest: str) -> Service:
        parsed = self._parse(first)
        assert parsed is not None  # _firsts holds services only
        self._check_same_request(parsed[0], digest, first.job_id)
        return await self._service(first, *parsed)

    @staticmethod
    def _check_same_request(meta: metadata.ServiceMeta, digest: str, job_id: int) -> None:
        if meta.request_digest != digest:
            raise InvalidRequest.field(
                "Idempotency-Key",
                f"was used for another request (service {job_id}); "
                "a key may be reused only with the same body",
            )

    def _check_quota(
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
            parsed = self._parse(job)
            if parsed is None or parsed[0].tenant != principal.tenant:
                continue
            if self._is_twin(job, parsed[0]):
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

    @staticmethod
    def _check_comment_budget(encoded: str, environment: dict[str, str]) -> None:
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
            tenant=meta.tenant or None,
            slurm_state=JobState.PENDING.value,
            slurm_reason="",
            node=None,
            endpoint=None,
            shared=meta.shared,
        )

    # -- read -----------------------------------------------------------------

    def _parse(self, job: JobInfo) -> tuple[metadata.ServiceMeta, metadata.Reported] | None:
        """The job's metadata when the job is a service of this gateway's users."""
        parsed = self._decoded(job)
        if parsed is None:
            return None
        if parsed.legacy and not self._legacy_believed(job, parsed.meta):
            return None
        return parsed.meta, parsed.reported

    def _decoded(self, job: JobInfo) -> metadata.Decoded | None:
        """What the job's comment holds, checked once per comment (MAC, owner)."""
        # The state too: what an overwritten comment means depends on it.
        key = (job.comment, job.user_name, job.state)
        cached = self._parsed.get(job.job_id)
        if cached is not None and cached[0] == key:
            return cached[1]
        parsed = self._parse_comment(job)
        self._parsed[job.job_id] = (key, parsed)
        return parsed

    def _legacy_believed(self, job: JobInfo, meta: metadata.ServiceMeta) -> bool:
        """A comment of the previous format (its MAC does not name the job) is
        believed only on the one job submitted when its metadata says it was
        created: a copy is on a job submitted earlier (held, then filled in)
        or later. Two such jobs carrying one nonce: neither is believed (the
        genuine one loses its listing, nobody gains its traffic or key)."""
        return self._legacy_jobs().get(meta.nonce) == [job.job_id]

    def _legacy_jobs(self) -> dict[bytes, list[int]]:
        """Nonce -> the jobs carrying it in an old-format comment whose
        submission is within the creation time's window."""
        if self._legacy_generation != self.view.generation:
            jobs: dict[bytes, list[int]] = {}
            for job in self.view.snapshot():
                if not job.comment.startswith(metadata.LEGACY_PREFIX) or job.submit_time is None:
                    continue
                decoded = self._decoded(job)  # the owner checked too
                if decoded is None or not decoded.legacy:
                    continue
                # The gateway took the time just before it submitted; Slurm
                # records whole seconds, on a clock that may differ a little.
                lag = job.submit_time.timestamp() - decoded.meta.created
                if -LEGACY_CLOCK_SKEW <= lag <= LEGACY_SUBMIT_WINDOW:
                    jobs.setdefault(decoded.meta.nonce, []).append(job.job_id)
            self._legacy_jobs_of = jobs
            self._legacy_generation = self.view.generation
        return self._legacy_jobs_of

    def _is_twin(self, job: JobInfo, meta: metadata.ServiceMeta) -> bool:
        """A later job of an Idempotency-Key whose earlier job Slurm still
        holds, once ended: the cancelled twin of a concurrent create, never a
        service. A twin still alive stays visible (a cancel that failed must
        not hide a running job), and so does a later job once the first is
        purged (the key was reused after Slurm forgot it)."""
        if not meta.idempotency or not job.state.is_terminal:
            return False
        first = self._firsts().get(meta.idempotency)
        return first is not None and first.job_id < job.job_id

    def _firsts(self) -> dict[str, JobInfo]:
        """Marker -> its lowest-id job in the view, rebuilt when the view changed."""
        if self._first_of_generation != self.view.generation:
            firsts: dict[str, JobInfo] = {}
            for job in self.view.snapshot():
                parsed = self._parse(job)
                marker = parsed[0].idempotency if parsed is not None else ""
                if marker and (marker not in firsts or job.job_id < firsts[marker].job_id):
                    firsts[marker] = job
            self._first_of = firsts
            self._first_of_generation = self.view.generation
        return self._first_of

    def _parse_comment(self, job: JobInfo) -> metadata.Decoded | None:
        # Any Slurm user's job may be a service (jobs run as their callers);
        # the MAC says the gateway wrote the comment for this job id, and the
        # owner it names must be the job's user: a copied comment is nothing.
        if not job.user_name:
            return None
        if not job.comment.startswith((metadata.PREFIX, metadata.LEGACY_PREFIX)):
            return self._overwritten(job)
        parsed = self.codec.decode(job.comment, job.job_id)
        if parsed is None or parsed.meta.owner != job.user_name:
            return None  # forged, copied, not yet bound, or another gateway's
        return parsed

    def _overwritten(self, job: JobInfo) -> metadata.Decoded | None:
        """A job of ours whose owner replaced its comment (``scontrol update``).

        Its metadata is gone, so nothing in it can be trusted, but the job is
        still this gateway's by its Slurm user, its job name (which carries
        this secret's tag: another gateway's jobs stay invisible) and the
        output file the gateway chose. It stays listed, so
        that it can be seen and stopped, with no configuration and no
        endpoint: a running one is ``failed`` (it cannot be reached), an ended
        one keeps Slurm's verdict.
        """
        if job.user_name != self.slurm_user and job.user_name not in self.known_users():
            # No MAC left to go by: only users the site configured are believed.
            return None
        recipe = self._recipe_of_job_name(job.name)
        expected = f"{self.job_dir_for(job.user_name).rstrip('/')}/{job.name}-{job.job_id}.out"
        if recipe is None or job.standard_output != expected or job.submit_time is None:
            return None
        meta = metadata.ServiceMeta(
            recipe=recipe, created=job.submit_time.timestamp(), owner=job.user_name
        )
        why = (
            "the job's comment was overwritten (not by the gateway): its configuration "
            "and endpoint cannot be verified, so it takes no prompts; it can be stopped"
        )
        running = job.state is not JobState.PENDING and not job.state.is_terminal
        return metadata.Decoded(
            meta, metadata.Reported(phase="failed" if running else None, reason=why)
        )

    def _recipe_of_job_name(self, name: str) -> str | None:
        if not name.startswith("gw-"):
            return None
        tag = self.codec.job_tag
        return next((r for r in self.recipes.names() if job_name_of(r, tag) == name), None)

    async def list(self, principal: Principal) -> list[Service]:
        """The caller's services Slurm still knows, from the view; probes in parallel.

        One job's bad data never fails the listing: it is left out and logged once.
        """
        jobs = await self.view.jobs()
        if len(self._parsed) > 2 * len(jobs) + 1024:
            current = {job.job_id for job in jobs}
            self._parsed = {k: v for k, v in self._parsed.items() if k in current}
        # Every job parsed first: a twin is known as one only once its first is.
        parsed_jobs = [(job, parsed) for job in jobs if (parsed := self._parse(job))]
        ours = [
            (job, parsed)
            for job, parsed in parsed_jobs
            if self.visible(principal, job, parsed[0]) and not self._is_twin(job, parsed[0])
        ]
        built = await asyncio.gather(
            *(self._service(job, *parsed) for job, parsed in ours), return_exceptions=True
        )
        services = self._kept([job for job, _ in ours], built)
        return sorted(services, key=lambda s: int(s.id), reverse=True)

    def _kept(self, jobs: Sequence[JobInfo], built: Sequence[Service | BaseException]) -> _Services:
        """The services built for ``jobs``; a job whose build failed is left
        out and logged once (a cancellation goes on up)."""
        services: _Services = []
        for job, result in zip(jobs, built, strict=True):
            if isinstance(result, Service):
                services.append(result)
            elif isinstance(result, Exception):
                self._log_bad_job(job.job_id, result)
            else:
                raise result
        return services

    def counts(self) -> dict[tuple[str, str, str], int]:
        """Services by tenant, recipe and status, from the view as last listed,
        with no call and no probe: the status last built for a job, else Slurm's
        say without a health answer (a running job then counts as starting).
        A job with no tenant recorded counts for the tenant of its Slurm user."""
        counts: dict[tuple[str, str, str], int] = {}
        for job in self.view.snapshot():
            parsed = self._parse(job)
            if parsed is None or self._is_twin(job, parsed[0]):
                continue
            memo = self._built.get(job.job_id)
            if memo is not None and memo.job is job:
                status = memo.service.status
            else:
                status = derive(job, parsed[1], None)[0]
            key = (parsed[0].tenant or job.user_name, parsed[0].recipe, status.value)
            counts[key] = counts.get(key, 0) + 1
        return counts

    def _log_bad_job(self, job_id: int, exc: Exception) -> None:
        if job_id in self._reported_bad:
            return
        if len(self._reported_bad) > 65536:
            self._reported_bad.clear()
        self._reported_bad.add(job_id)
        log.warning("service_skipped", job_id=job_id, error=repr(exc)[:300])

    async def get(self, service_id: str, principal: Principal) -> Service:
        return await self._service(*await self._job(service_id, principal))

    async def _job(
        self, service_id: str, principal: Principal
    ) -> tuple[JobInfo, metadata.ServiceMeta, metadata.Reported]:
        """The job of a service the caller may see, with what its comment
        holds; one and the same 404 for any other job id, known or not."""
        job_id = parse_id(service_id)
        job = await self.view.job(job_id)
        parsed = self._parse(job) if job is not None else None
        if (
            job is None
            or parsed is None
            or self._is_twin(job, parsed[0])
            or not self.visible(principal, job, parsed[0])
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

    async def _service(
        self, job: JobInfo, meta: metadata.ServiceMeta, reported: metadata.Reported
    ) -> Service:
        service = await self._service_of(job, meta, reported)
        if job.state is JobState.PENDING and _WAITS_ON_NODES.search(
            f"{job.state_reason} {job.state_description}"
        ):
            # Slurm says "ReqNodeNotAvail"; which nodes, and why, is the news.
            unavailable = self.node_states.unavailable(_unavailable_nodes(job))
            if unavailable:
                reason = f"{service.status_reason}; {unavailable}"
                return msgspec.structs.replace(service, status_reason=reason)
        return service

    async def _service_of(
        self, job: JobInfo, meta: metadata.ServiceMeta, reported: metadata.Reported
    ) -> Service:
        recipe_kind, health_path = self._service_spec(meta.recipe)
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
            if recipe_kind == "vllm":
                # Ready when vLLM answers /health and serves the model asked for.
                model = served_model(meta.environment)
                healthy = await self.prober.vllm_ready(upstream.url, model, upstream.key)
            else:
                healthy = await self.prober.healthy(upstream.url + health_path, upstream.key)
        if memo is not None and memo.healthy == healthy:
            return memo.service
        service = self._build(job, meta, checked, upstream, healthy, recipe_kind)
        if memo is None and not settled:
            return service  # a node lookup failed: ask again next time
        if len(self._built) > 65536:
            self._built.clear()
        self._built[job.job_id] = _Built(job, reported, checked, upstream, healthy, service)
        return service

    @staticmethod
    def _build(
        job: JobInfo,
        meta: metadata.ServiceMeta,
        reported: metadata.Reported,
        upstream: Upstream | None,
        healthy: bool | None,
        recipe_kind: str,
    ) -> Service:
        status, reason = derive(job, reported, healthy)
        live = upstream if not status.is_terminal else None
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
            tenant=meta.tenant or None,
            slurm_state=job.state.value,
            slurm_reason=job.state_reason,
            node=job.batch_host or job.nodes or None,
            endpoint=live.url if live else None,
            upstream=live,
            shared=meta.shared,
        )

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
        self._log_bad_job(job.job_id, ValueError(why))
        return msgspec.structs.replace(reported, endpoint=None, reason=why), settled

    def _service_spec(self, recipe_name: str) -> tuple[str, str]:
        try:
            spec = self.recipes.get(recipe_name).spec.service
        except NotFound:
            return "http", "/health"  # recipe removed since: still list the service
        return spec.kind, spec.health_path

    async def serving(self, principal: Principal, model: str | None = None) -> _Services:
        """The vLLM services the caller may prompt that have not ended, of
        ``model`` (the name vLLM serves) or of every model, from the view.

        This is on every /v1 request's path: the view's jobs are grouped by
        model once per view generation, and each service is built from the
        same memo and prober cache as a prompt's."""
        await self.view.jobs_ready()
        index = self._models_index()
        if model is None:
            entries = [entry for group in index.values() for entry in group]
        else:
            entries = index.get(model, [])
        usable = [
            entry
            for entry in entries
            if entry[0].job_id not in self.leaving and self.usable(principal, entry[0], entry[1])
        ]
        if not usable:
            return []
        built: tuple[Service | BaseException, ...]
        if len(usable) == 1:  # the common case, without a gather's tasks
            try:
                built = (await self._service_of(*usable[0]),)
            except Exception as exc:
                built = (exc,)
        else:
            built = tuple(
                await asyncio.gather(
                    *(self._service_of(*entry) for entry in usable), return_exceptions=True
                )
            )
        return self._kept([job for job, _, _ in usable], built)

    def _models_index(self) -> dict[str, _ModelEntries]:
        """Served model -> the vLLM jobs serving it that have not ended, as of
        the view's generation."""
        if self._models_generation != self.view.generation:
            index: dict[str, _ModelEntries] = {}
            for job in self.view.snapshot():
                if job.state.is_terminal:
                    continue
                parsed = self._parse(job)
                if parsed is None or self._is_twin(job, parsed[0]):
                    continue
                meta, reported = parsed
                if self._service_spec(meta.recipe)[0] != "vllm":
                    continue
                index.setdefault(served_model(meta.environment), []).append((job, meta, reported))
            for group in index.values():
                group.sort(key=lambda entry: entry[0].job_id)
            self._models = index
            self._models_generation = self.view.generation
        return self._models

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

    # -- logs -----------------------------------------------------------------

    async def logs(self, service_id: str, principal: Principal, *, tail: int | None) -> Logs:
        job, meta, _ = await self._job(service_id, principal)
        if job.state is JobState.PENDING:
            raise Conflict(f"service {service_id} is pending: it has not started, so no logs yet")
        stdout = await self._log_file(job, meta, "out", job.standard_output, tail)
        stderr: LogFile | None = None
        if job.standard_error and job.standard_error != job.standard_output:
            stderr = await self._log_file(job, meta, "err", job.standard_error, tail)
        files = [f for f in (stdout, stderr) if f is not None]
        if all(f.missing for f in files):
            job_dir = self.job_dir_for(job.user_name)
            raise NotFound(
                f"no log file of service {service_id} at {job_dir} yet "
                f"(looked at {self.local_path(job_dir)} on the gateway host)"
            )
        refused = "; ".join(f.refused for f in files if f.refused)
        return Logs(
            stdout=stdout.text,
            stderr=stderr.text if stderr is not None and not stderr.missing else None,
            truncated=any(f.truncated for f in files),
            reason=refused or None,
        )

    async def _log_file(
        self,
        job: JobInfo,
        meta: metadata.ServiceMeta,
        suffix: str,
        reported: str,
        tail: int | None,
    ) -> LogFile:
        name = f"{job_name_of(meta.recipe, self.codec.job_tag)}-{job.job_id}.{suffix}"
        job_dir = self.job_dir_for(job.user_name).rstrip("/")
        expected = f"{job_dir}/{name}"
        if reported != expected:
            shown = reported[:200].encode("unicode_escape").decode("ascii")
            return LogFile(
                refused=f"Slurm reports the job's output at '{shown}', not in the file "
                f"the gateway chose ({expected}); not read"
            )
        return await asyncio.to_thread(
            read_tail,
            self.local_path(job_dir or "/"),
            name,
            uid=job.user_id,
            lines=tail,
            max_bytes=self.log_max_bytes,
        )

    def local_path(self, cluster_path: str) -> Path:
        for remote, local in self.path_map:
            if cluster_path == remote or cluster_path.startswith(remote.rstrip("/") + "/"):
                rest = cluster_path[len(remote.rstrip("/")) :].lstrip("/")
                return Path(local) / rest
        return Path(cluster_path)

    # -- stop -----------------------------------------------------------------

    async def stop(self, service_id: str, principal: Principal) -> Stopped:
        """Cancel the service's job and answer with its final state.

        Safe to repeat: clients stop services in cleanup paths and retry on
        timeouts, so a service that already ended, however it ended, is
        stopped: its final state, no error. Only an unknown id is 404.
        """
        job, meta, reported = await self._job(service_id, principal)
        if job.state.is_terminal:
            return Stopped(await self._service(job, meta, reported), already_ended=True)
        if len(self.leaving) > 4096:
            self.leaving.clear()
        self.leaving.add(job.job_id)
        try:
            # As the job's own user (an admin stopping another user's service too).
            await self._slurm_as(job.user_name, principal).cancel(job.job_id)
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
        return Stopped(await self._service(final, meta, reported), already_ended=False)

    async def _gone(
        self, job: JobInfo, meta: metadata.ServiceMeta, reported: metadata.Reported
    ) -> Service:
        """A job purged while being stopped: it was cancelled, and is no more."""
        ended = msgspec.structs.replace(
            job, state=JobState.CANCELLED, end_time=job.end_time or datetime.now(tz=UTC)
        )
        return await self._service(ended, meta, reported)


class Stopped(NamedTuple):
    service: Service
    # It had ended before this stop (completed, failed, timed out, cancelled).
    already_ended: bool


class _Built(NamedTuple):
    job: JobInfo
    reported: metadata.Reported
    checked: metadata.Reported
    upstream: Upstream | None
    healthy: bool | None
    service: Service


def _gpus_of(resources: dict[str, str | int | None]) -> int:
    gpu, nodes = resources.get("gpu"), resources.get("nodes")
    try:
        return int(gpu or 0) * int(nodes or 1)
    except ValueError:
        return 0


def _settled(job: JobInfo | None) -> bool:
    """Gone from Slurm, or ended with its exit code final."""
    return job is None or (job.state.is_terminal and "COMPLETING" not in job.state_flags)


def _unavailable_nodes(job: JobInfo) -> frozenset[str] | None:
    """The nodes Slurm names in the pending reason; None when it names none
    (or in a bracketed host list, not expanded here)."""
    found = _UNAVAILABLE_NODES.search(job.state_description)
    return frozenset(found.group(1).split(",")) if found else None


# A vLLM job of the view with what its comment holds (the /v1 index).
_ModelEntry = tuple[JobInfo, metadata.ServiceMeta, metadata.Reported]
_ModelEntries = list[_ModelEntry]
_Services = list["Service"]


def served_model(environment: dict[str, str]) -> str:
    """The name vLLM serves its model under: the alias when the request gave
    one (vLLM's ``--served-model-name``), else the model itself."""
    return environment.get("VLLM_SERVED_MODEL_NAME") or environment.get("VLLM_MODEL") or ""


def job_name_of(recipe: str, tag: str) -> str:
    """The Slurm job name, which also names the log files: ``gw-inference-vllm-3f9a1c``
    (the tag says which gateway's secret the job was made under)."""
    return f"gw-{recipe.replace('/', '-')}-{tag}"


def service_name(recipe: str, job_id: int) -> str:
    """``vllm-12`` for job 12 of ``inference/vllm``."""
    return f"{recipe.rsplit('/', 1)[-1]}-{job_id}"


def parse_id(service_id: str) -> int:
    # ASCII digits only: str.isdigit() also takes '²', which int() refuses.
    if not _SERVICE_ID.fullmatch(service_id):
        raise NotFound(f"service {service_id!r} does not exist (ids are Slurm job numbers)")
    return int(service_id)

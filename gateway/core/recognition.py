"""Which of the scheduler's jobs are services, and who may see or use them.

Pure: everything here reads job records the job view already holds (its
snapshot and generation) and asks nothing of Slurm. What is derived from all
jobs at once (first jobs of Idempotency-Keys, old-format comments, the /v1
model index) is recomputed only when the view's generation changes.

What a job writes is untrusted: a job is a service only when its comment
carries the gateway's MAC bound to its job id and names the job's Slurm user
as owner (or, its comment overwritten, when its name, user and output file
are the ones this gateway chose).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol

from gateway.core import metadata
from gateway.core.model import job_dir_for, job_name_of, model_names, service_spec
from gateway.core.principal import Principal
from gateway.core.recipes import RecipeCatalog
from gateway.slurm import JobInfo, JobState

# An old-format comment (its MAC does not name the job) is believed only on a
# job submitted within this window (seconds) of the creation time it records.
LEGACY_CLOCK_SKEW = 5.0
LEGACY_SUBMIT_WINDOW = 60.0

Parsed = tuple[metadata.ServiceMeta, metadata.Reported]
# A vLLM job of the view with what its comment holds (the /v1 index).
ModelEntry = tuple[JobInfo, metadata.ServiceMeta, metadata.Reported]


class Snapshot(Protocol):
    """The job view as read here: its jobs as last listed, and a number that
    changes whenever they may have."""

    @property
    def generation(self) -> int: ...

    def snapshot(self) -> list[JobInfo]: ...


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


def usable(principal: Principal, job: JobInfo, meta: metadata.ServiceMeta) -> bool:
    """Whom a service takes prompts from: those who see it, and everyone
    when an admin shared it."""
    return meta.shared or visible(principal, job, meta)


class Recognizer:
    def __init__(
        self,
        *,
        view: Snapshot,
        codec: metadata.MetaCodec,
        recipes: RecipeCatalog,
        job_dir: str,
        gateway_user: Callable[[], str],
        known_users: Callable[[], frozenset[str]],
    ) -> None:
        self.view = view
        self.codec = codec
        self.recipes = recipes
        self.job_dir = job_dir
        self.gateway_user = gateway_user
        # Slurm users the site's auth file names (besides the gateway's own).
        self.known_users = known_users
        # job id -> ((comment, user, state), what it decodes to): a comment is
        # checked (MAC, owner) once, not on every read.
        self._decoded: dict[int, tuple[tuple[str, str, JobState], metadata.Decoded | None]] = {}
        # Idempotency marker -> the job with the lowest id holding it.
        self._first_of: dict[str, JobInfo] = {}
        self._first_of_generation = -1
        # Nonce -> jobs with an old-format comment.
        self._legacy_jobs_of: dict[bytes, list[int]] = {}
        self._legacy_generation = -1
        # Served model -> its vLLM jobs that have not ended (/v1).
        self._models: dict[str, list[ModelEntry]] = {}
        self._models_generation = -1

    def parse(self, job: JobInfo) -> Parsed | None:
        """The job's metadata when the job is a service of this gateway's users."""
        parsed = self.decoded(job)
        if parsed is None:
            return None
        if parsed.legacy and not self._legacy_believed(job, parsed.meta):
            return None
        return parsed.meta, parsed.reported

    def services(self, jobs: Iterable[JobInfo]) -> list[tuple[JobInfo, Parsed]]:
        """The services among ``jobs``, cancelled twins left out."""
        # Every job parsed first: a twin is known as one only once its first is.
        parsed_jobs = [(job, parsed) for job in jobs if (parsed := self.parse(job))]
        return [(job, parsed) for job, parsed in parsed_jobs if not self.is_twin(job, parsed[0])]

    def decoded(self, job: JobInfo) -> metadata.Decoded | None:
        """What the job's comment holds, checked once per comment (MAC, owner)."""
        # The state too: what an overwritten comment means depends on it.
        key = (job.comment, job.user_name, job.state)
        cached = self._decoded.get(job.job_id)
        if cached is not None and cached[0] == key:
            return cached[1]
        parsed = self._parse_comment(job)
        self._decoded[job.job_id] = (key, parsed)
        return parsed

    def forget_gone(self, jobs: list[JobInfo]) -> None:
        """Drops what was decoded for jobs Slurm no longer holds (now and then)."""
        if len(self._decoded) > 2 * len(jobs) + 1024:
            current = {job.job_id for job in jobs}
            self._decoded = {k: v for k, v in self._decoded.items() if k in current}

    def is_twin(self, job: JobInfo, meta: metadata.ServiceMeta) -> bool:
        """A later job of an Idempotency-Key whose earlier job Slurm still
        holds, once ended: the cancelled twin of a concurrent create, never a
        service. A twin still alive stays visible (a cancel that failed must
        not hide a running job), and so does a later job once the first is
        purged (the key was reused after Slurm forgot it)."""
        if not meta.idempotency or not job.state.is_terminal:
            return False
        first = self.firsts().get(meta.idempotency)
        return first is not None and first.job_id < job.job_id

    def firsts(self) -> dict[str, JobInfo]:
        """Marker -> its lowest-id job in the view, rebuilt when the view changed."""
        if self._first_of_generation != self.view.generation:
            firsts: dict[str, JobInfo] = {}
            for job in self.view.snapshot():
                parsed = self.parse(job)
                marker = parsed[0].idempotency if parsed is not None else ""
                if marker and (marker not in firsts or job.job_id < firsts[marker].job_id):
                    firsts[marker] = job
            self._first_of = firsts
            self._first_of_generation = self.view.generation
        return self._first_of

    def models(self) -> dict[str, list[ModelEntry]]:
        """Served model (or LoRA adapter) -> the vLLM jobs serving it that
        have not ended, by job id, as of the view's generation."""
        if self._models_generation != self.view.generation:
            index: dict[str, list[ModelEntry]] = {}
            for job in self.view.snapshot():
                if job.state.is_terminal:
                    continue
                parsed = self.parse(job)
                if parsed is None or self.is_twin(job, parsed[0]):
                    continue
                meta, reported = parsed
                spec = service_spec(self.recipes, meta.recipe)
                if spec is None or spec.kind != "vllm":
                    continue
                for name in model_names(spec, meta.environment).names:
                    index.setdefault(name, []).append((job, meta, reported))
            for group in index.values():
                group.sort(key=lambda entry: entry[0].job_id)
            self._models = index
            self._models_generation = self.view.generation
        return self._models

    # -- old-format comments ----------------------------------------------------

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
                decoded = self.decoded(job)  # the owner checked too
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

    # -- one comment ------------------------------------------------------------

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
        if job.user_name != self.gateway_user() and job.user_name not in self.known_users():
            # No MAC left to go by: only users the site configured are believed.
            return None
        recipe = self._recipe_of_job_name(job.name)
        job_dir = job_dir_for(self.job_dir, job.user_name).rstrip("/")
        expected = f"{job_dir}/{job.name}-{job.job_id}.out"
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

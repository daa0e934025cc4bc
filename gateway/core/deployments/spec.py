"""Deployments as declared: a TOML file, re-read when it changes.

Nothing else stores a deployment. The file (``GATEWAY_DEPLOYMENTS_FILE``, a
ConfigMap on Kubernetes) says what should run; the jobs say what runs (each
replica's comment names its deployment, generation and slot). ::

    [deployments.qwen]
    recipe_name = "inference/vllm"
    replicas = 2
    tenant = "team-a"              # omitted: shared with every tenant
    [deployments.qwen.config.environment]
    VLLM_MODEL = "Qwen/Qwen2.5-0.5B-Instruct"
    [deployments.qwen.config.resources]
    time_limit = 120

Instead of a fixed ``replicas``, ``min_replicas`` and ``max_replicas`` bound
a count the gateway sets from the load the replicas report (autoscale.py):
``target_load`` requests (running and waiting) per replica, more after
``scale_up_seconds`` above it, fewer after ``scale_down_seconds`` below, none
after ``idle_seconds`` without a request when ``min_replicas = 0``; the
first request then starts one again.

A file that does not parse keeps the previous version in force (at start-up
it stops the gateway); a deployment that does not check out keeps its
previous version too, and says why in its status. Either is logged once per
change, with the file and line.
"""

from __future__ import annotations

import hashlib
import re
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import msgspec
import structlog

from gateway.core.errors import GatewayError
from gateway.core.filewatch import FileWatch
from gateway.core.model import CreateRequest, model_names
from gateway.core.principal import SLURM_USER, TENANT
from gateway.core.recipes import Recipe, RecipeCatalog, resolve_resources
from gateway.core.resources import Resources

log = structlog.get_logger(__name__)

# Short: it is written into every replica's job comment (1,024 bytes in all).
NAME = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,30}[a-z0-9])?")
MAX_REPLICAS = 64
_RESOURCES = ("nodes", "cpu", "memory", "time_limit", "gpu")
_TOML_LINE = re.compile(r"at line (\d+)")


class ConfigSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    environment: dict[str, str | int | float] = msgspec.field(default_factory=dict)
    resources: dict[str, str | int | None] = msgspec.field(default_factory=dict)


class DeploymentSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One table of the file: the body of a create, and how many to keep."""

    recipe_name: str
    config: ConfigSpec = ConfigSpec()
    # A fixed count; or the bounds of one set by the load (not both).
    replicas: Annotated[int, msgspec.Meta(ge=0, le=MAX_REPLICAS)] | None = None
    min_replicas: Annotated[int, msgspec.Meta(ge=0, le=MAX_REPLICAS)] | None = None
    max_replicas: Annotated[int, msgspec.Meta(ge=1, le=MAX_REPLICAS)] | None = None
    # Requests running and waiting per replica that the count aims at.
    target_load: Annotated[float, msgspec.Meta(gt=0, le=100000)] = 8.0
    scale_up_seconds: Annotated[float, msgspec.Meta(ge=0, le=3600)] = 30.0
    scale_down_seconds: Annotated[float, msgspec.Meta(ge=0, le=86400)] = 300.0
    idle_seconds: Annotated[float, msgspec.Meta(ge=10, le=604800)] = 900.0
    # The longest a request for it at zero replicas may wait (``Prefer: wait``).
    max_wait_seconds: Annotated[float, msgspec.Meta(ge=0, le=3600)] = 300.0
    # Who owns it (its quota, its Slurm user); None: every tenant may use it.
    tenant: str | None = None
    # The Slurm user its jobs run as; default: the tenant's only one.
    slurm_user: str | None = None
    # Seconds before a replica's time limit its successor is submitted, for a
    # model slower to start than the gateway's rule guesses.
    lead_seconds: Annotated[float, msgspec.Meta(ge=0, le=86400)] | None = None


class Deployment(msgspec.Struct, frozen=True, kw_only=True):
    """A declared deployment, checked against its recipe."""

    name: str
    spec: DeploymentSpec
    environment: dict[str, str]
    resources: Resources
    # Digest of what its jobs get: a change of any of it is a new generation.
    generation: str
    # Where it is declared, for messages: "deployments.toml:12".
    where: str
    # The model its servers load, and the name /v1 requests use for it.
    loaded: str | None = None
    served: str | None = None
    # The LoRA adapters its servers serve besides (models of their own): name -> path.
    adapters: dict[str, str] = msgspec.field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        """Every name /v1 requests reach its replicas by."""
        return [self.served, *self.adapters] if self.served else []

    @property
    def shared(self) -> bool:
        return self.spec.tenant is None

    @property
    def minimum(self) -> int:
        spec = self.spec
        if spec.replicas is not None:
            return spec.replicas
        return spec.min_replicas if spec.min_replicas is not None else 1

    @property
    def maximum(self) -> int:
        spec = self.spec
        if spec.replicas is not None:
            return spec.replicas
        return spec.max_replicas if spec.max_replicas is not None else max(self.minimum, 1)

    @property
    def elastic(self) -> bool:
        return self.maximum > self.minimum

    @property
    def replicas(self) -> int:
        """The most it may run (its quota is checked against this)."""
        return self.maximum

    def request(self) -> CreateRequest:
        return CreateRequest(
            recipe_name=self.spec.recipe_name,
            environment=self.environment,
            resources=self.resources.as_config(),
            shared=self.shared,
        )


class Declared(msgspec.Struct, frozen=True, kw_only=True):
    """One version of the file: the deployments in force, and for each one
    that does not check out, why (it keeps its previous version if it had
    one, else it is absent from ``deployments``)."""

    deployments: dict[str, Deployment] = msgspec.field(default_factory=dict)
    errors: dict[str, str] = msgspec.field(default_factory=dict)
    # Every name the file declares, good or bad: the jobs of others are removed.
    names: frozenset[str] = frozenset()
    # The tenant each table names, checked or not: who may see its errors.
    owners: dict[str, str | None] = msgspec.field(default_factory=dict)


class DeploymentsFileError(ValueError):
    """The file as a whole is unusable (unreadable, not TOML, wrong shape)."""


def parse(
    text: str, source: str, recipes: RecipeCatalog, previous: Declared | None = None
) -> Declared:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        line = _TOML_LINE.search(str(exc))
        raise DeploymentsFileError(
            f"{source}:{line.group(1) if line else 1}: not TOML: {exc}"
        ) from None
    unknown = sorted(set(raw) - {"deployments"})
    if unknown:
        raise DeploymentsFileError(f"{source}:1: {unknown[0]}: only [deployments.<name>] tables")
    tables = raw.get("deployments", {})
    if not isinstance(tables, dict):
        raise DeploymentsFileError(f"{source}:1: deployments: expected tables")
    lines = text.splitlines()
    deployments: dict[str, Deployment] = {}
    errors: dict[str, str] = {}
    for name, table in tables.items():
        where = f"{source}:{_line_of(lines, name)}"
        try:
            deployments[name] = check(name, table, recipes, where)
        except GatewayError as exc:
            errors[name] = f"{where}: deployments.{name}.{exc.detail}"
            kept = previous.deployments.get(name) if previous else None
            if kept is not None:
                deployments[name] = kept
    owners = {
        name: table.get("tenant") if isinstance(table, dict) else ""
        for name, table in tables.items()
    }
    return Declared(
        deployments=deployments,
        errors=errors,
        names=frozenset(tables),
        owners={k: v if isinstance(v, str) or v is None else "" for k, v in owners.items()},
    )


def check(name: str, table: Any, recipes: RecipeCatalog, where: str) -> Deployment:
    """One deployment checked: each error names its field."""
    if not NAME.fullmatch(name):
        raise _Invalid(
            "name", f"{name[:40]!r} is not a deployment name (a-z, 0-9, '-', 1 to 32 characters)"
        )
    if not isinstance(table, dict):
        raise _Invalid("name", "expected a table")
    try:
        spec = msgspec.convert(table, DeploymentSpec)
    except msgspec.ValidationError as exc:
        message, _, path = str(exc).partition(" - at `$")
        raise _Invalid(path.rstrip("`").lstrip(".") or "name", message) from None
    if spec.tenant is not None and not TENANT.fullmatch(spec.tenant):
        raise _Invalid("tenant", f"{spec.tenant[:70]!r} is not a tenant name")
    if spec.slurm_user is not None and not SLURM_USER.fullmatch(spec.slurm_user):
        raise _Invalid("slurm_user", f"{spec.slurm_user[:70]!r} is not a user name")
    try:
        recipe = recipes.get(spec.recipe_name)
    except GatewayError as exc:
        raise _Invalid("recipe_name", exc.detail) from None
    extra = sorted(set(spec.config.resources) - set(_RESOURCES))
    if extra:
        raise _Invalid(f"config.resources.{extra[0]}", f"not a resource ({', '.join(_RESOURCES)})")
    _bounds(spec)
    environment = _environment(recipe, spec)
    names = model_names(recipe.spec.service, environment)
    resources = resolve_resources(
        recipe.spec.resources, spec.config.resources, field="config.resources"
    )
    return Deployment(
        name=name,
        spec=spec,
        environment=environment,
        resources=resources,
        generation=generation(recipe.name, environment, resources, spec.tenant),
        where=where,
        loaded=names.model,
        served=names.served or None,
        adapters=names.adapters,
    )


def _bounds(spec: DeploymentSpec) -> None:
    bounded = spec.min_replicas is not None or spec.max_replicas is not None
    if spec.replicas is not None and bounded:
        raise _Invalid("replicas", "give either replicas or min_replicas and max_replicas")
    low, high = spec.min_replicas, spec.max_replicas
    if low is not None and high is not None and low > high:
        raise _Invalid("min_replicas", f"{low} is over max_replicas ({high})")
    if low is not None and high is None and low > 1:
        raise _Invalid("max_replicas", f"required with min_replicas = {low}")
    if spec.scale_down_seconds < spec.scale_up_seconds:
        raise _Invalid(
            "scale_down_seconds",
            f"{spec.scale_down_seconds:g} is under scale_up_seconds "
            f"({spec.scale_up_seconds:g}): the count would flap",
        )


def generation(
    recipe: str, environment: dict[str, str], resources: Resources, tenant: str | None
) -> str:
    """Same jobs, same generation, whichever replica computes it."""
    what = (recipe, sorted(environment.items()), resources, tenant)
    return hashlib.sha256(msgspec.json.encode(what)).hexdigest()[:10]


def _environment(recipe: Recipe, spec: DeploymentSpec) -> dict[str, str]:
    # TOML numbers are accepted as the API takes them: as their text.
    given = {k: v if isinstance(v, str) else str(v) for k, v in spec.config.environment.items()}
    return recipe.environment(given)


class _Invalid(GatewayError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")


def _line_of(lines: list[str], name: str) -> int:
    header = re.compile(rf"""^\s*\[\s*deployments\s*\.\s*["']?{re.escape(name)}["']?\s*[\].]""")
    return next((i for i, line in enumerate(lines, 1) if header.match(line)), 1)


class DeploymentsFile:
    """The file, checked for a change at most every ``check_every`` seconds."""

    def __init__(
        self,
        path: Path,
        recipes: RecipeCatalog,
        *,
        check_every: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self.recipes = recipes
        self._watch = FileWatch(path, every=check_every, clock=clock)
        self._unreadable = False
        self.declared = self._load(None)  # a file that does not parse stops start-up
        self._log_errors()

    def _load(self, previous: Declared | None) -> Declared:
        try:
            text = self._watch.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise DeploymentsFileError(f"{self.path}: cannot read: {exc}") from None
        return parse(text, str(self.path), self.recipes, previous)

    def current(self) -> Declared:
        try:
            changed = self._watch.changed()
        except OSError as exc:
            if not self._unreadable:
                log.error("deployments_file_unreadable", path=str(self.path), error=str(exc))
                self._unreadable = True  # said once
            return self.declared
        self._unreadable = False
        if not changed:
            return self.declared
        try:
            self.declared = self._load(self.declared)
        except DeploymentsFileError as exc:
            log.error("deployments_file_rejected", error=str(exc)[:500])  # once per change
            return self.declared
        log.info(
            "deployments_file_loaded", path=str(self.path), deployments=len(self.declared.names)
        )
        self._log_errors()
        return self.declared

    def _log_errors(self) -> None:
        for name, error in sorted(self.declared.errors.items()):
            log.error("deployment_rejected", deployment=name, error=error[:500])

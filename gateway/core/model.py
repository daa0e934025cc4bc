"""What a service is, as the core hands it out: built from a job and its
recipe on every read, never stored (see services.py)."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from datetime import datetime
from typing import Any, NamedTuple

import msgspec

from gateway.core.errors import NotFound
from gateway.core.recipes import RecipeCatalog, ServiceSpec, adapter_modules
from gateway.core.status import ServiceStatus

_SERVICE_ID = re.compile(r"[0-9]{1,12}")


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
    # What the recipe's declared variables say (ModelNames); none when the
    # recipe declares none or is no longer in the catalog.
    model: str | None = None
    served_model: str = ""
    max_model_len: str | None = None
    # LoRA adapter -> where it is loaded from: models it serves besides
    # ``served_model``, on the same server.
    adapters: dict[str, str] = msgspec.field(default_factory=dict)
    # It stops itself after this many minutes without a request (None: never).
    idle_stop_minutes: int | None = None

    @property
    def names(self) -> list[str]:
        """Every name /v1 requests reach it by: its model's, its adapters'."""
        return served_names(self.served_model, self.adapters)


class ModelNames(NamedTuple):
    """The model a service loads, the name it serves it under (else the
    loaded one's, else ""), its context length and its LoRA adapters (name ->
    path), as the request set them."""

    model: str | None = None
    served: str = ""
    max_model_len: str | None = None
    adapters: dict[str, str] = {}  # noqa: RUF012 - never mutated

    @property
    def names(self) -> list[str]:
        """Every name /v1 requests reach it by: its model's, then its adapters'."""
        return served_names(self.served, self.adapters)


def served_names(served: str, adapters: Mapping[str, str]) -> list[str]:
    """The model's name, then its adapters' (one named like the model, which
    jobs submitted before that was refused may have, once)."""
    return [served, *(a for a in adapters if a != served)]


def model_names(spec: ServiceSpec | None, environment: Mapping[str, str]) -> ModelNames:
    """Read through the variables the recipe declares (``[service]
    model_variable`` ...): no code outside a recipe names a server's variables."""
    if spec is None:
        return ModelNames()

    def value(variable: str | None) -> str | None:
        return (environment.get(variable) or None) if variable else None

    model = value(spec.model_variable)
    served = value(spec.served_name_variable) or model or ""
    adapters = dict(adapter_modules(value(spec.adapters_variable) or ""))
    return ModelNames(model, served, value(spec.max_model_len_variable), adapters)


def service_spec(recipes: RecipeCatalog, recipe_name: str) -> ServiceSpec | None:
    """How to talk to a service of this recipe; None when the recipe has been
    removed since (its services are still listed, as plain HTTP ones)."""
    try:
        return recipes.get(recipe_name).spec.service
    except NotFound:
        return None


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
    # The job stops itself after this many minutes without a request.
    idle_stop_minutes: int | None = None

    def digest(self) -> str:
        """Same request, same digest: what an Idempotency-Key is bound to.
        A field left unset is left out, so that a request without it keeps the
        digest gateways without the field gave it (replicas mid-upgrade agree)."""
        fields = msgspec.structs.asdict(self)
        if self.idle_stop_minutes is None:
            del fields["idle_stop_minutes"]
        return hashlib.sha256(msgspec.json.encode(fields, order="sorted")).hexdigest()[:18]


class Created(NamedTuple):
    service: Service
    # An earlier create with the same Idempotency-Key made it.
    replayed: bool


class Stopped(NamedTuple):
    service: Service
    # It had ended before this stop (completed, failed, timed out, cancelled).
    already_ended: bool


def job_dir_for(job_dir: str, user: str) -> str:
    """``job_dir`` may hold ``{user}``: each Slurm user's jobs write in their own folder."""
    return job_dir.replace("{user}", user)


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

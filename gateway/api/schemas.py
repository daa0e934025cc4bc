"""Wire schemas of the public API (msgspec Structs; OpenAPI is generated from them)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, TypeVar

import msgspec
from msgspec import UNSET, Meta, UnsetType

from gateway.core.creating import MAX_IDLE_STOP_MINUTES
from gateway.core.recipes import Recipe, VariableSpec
from gateway.core.resources import MAX_TIME_LIMIT
from gateway.core.services import Logs, Service
from gateway.core.status import ServiceStatus

# The prompt route's wire types, shared with the data path that reads and writes them.
from gateway.proxy.wire import PromptRequest as PromptRequest
from gateway.proxy.wire import PromptResponse as PromptResponse
from gateway.proxy.wire import UsageResponse as UsageResponse

EnvName = Annotated[str, Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", max_length=128)]
EnvValue = Annotated[str, Meta(max_length=4096)]
GpuCount = Annotated[str, Meta(description="GPUs per node; null for a CPU-only service")]
IdleStopMinutes = Annotated[
    int,
    Meta(
        ge=1,
        le=MAX_IDLE_STOP_MINUTES,
        description="the service stops itself after this many minutes without a request; "
        "it ends `completed`, its status_reason saying so. Only for recipes whose "
        "service kind reports its load (`vllm`); absent: it runs until stopped or its "
        "time limit",
        examples=[30],
    ),
]


W = TypeVar("W", bound=msgspec.Struct)


def _copy(wire: type[W], service: Service, **overrides: object) -> W:
    """The wire view of a service: its fields of the same names, plus overrides."""
    values = {f: getattr(service, f) for f in wire.__struct_fields__ if f not in overrides}
    return wire(**values, **overrides)


class ResourcesRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Overrides of the recipe's default resources; absent fields keep the default."""

    nodes: Annotated[int, Meta(ge=1, le=1024)] | UnsetType = UNSET
    cpu: Annotated[str, Meta(examples=["8"])] | int | UnsetType = UNSET
    memory: Annotated[str, Meta(examples=["64G", "512M"])] | UnsetType = UNSET
    time_limit: Annotated[int, Meta(ge=1, le=MAX_TIME_LIMIT, description="minutes")] | UnsetType = (
        UNSET
    )
    gpu: GpuCount | int | UnsetType | None = UNSET

    def overrides(self) -> dict[str, object]:
        return {f: v for f in self.__struct_fields__ if (v := getattr(self, f)) is not UNSET}


class ServiceConfigRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    environment: dict[EnvName, EnvValue] = msgspec.field(default_factory=dict)
    resources: ResourcesRequest = msgspec.field(default_factory=ResourcesRequest)
    # Accepted for compatibility with clients that put the node count here.
    nodes: Annotated[int, Meta(ge=1, le=1024)] | UnsetType = UNSET


class CreateServiceRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    recipe_name: Annotated[str, Meta(min_length=1, max_length=200, examples=["inference/vllm"])]
    config: ServiceConfigRequest = msgspec.field(default_factory=ServiceConfigRequest)
    shared: Annotated[
        bool,
        Meta(
            description="offer the service to every tenant on the OpenAI front door (/v1); "
            "admins only"
        ),
    ] = False
    idle_stop_minutes: IdleStopMinutes | None = None


class ServiceConfigResponse(msgspec.Struct, kw_only=True):
    environment: dict[str, str]
    resources: dict[str, str | int | None]


class ServiceResponse(msgspec.Struct, kw_only=True):
    id: Annotated[str, Meta(description="the Slurm job id", examples=["3652098"])]
    name: str
    recipe_name: str
    status: ServiceStatus
    status_reason: str
    config: ServiceConfigResponse
    created_at: datetime
    started_at: datetime | None
    ended_at: datetime | None
    node: str | None
    endpoint: Annotated[
        str | None, Meta(description="where the service listens, once it published it")
    ]
    owner: Annotated[str, Meta(description="the Slurm user the job runs as")]
    tenant: Annotated[
        str | None,
        Meta(description="the tenant that created it (null: not recorded)"),
    ]
    shared: Annotated[bool, Meta(description="every tenant may use it on /v1")] = False
    idle_stop_minutes: Annotated[
        int | None,
        Meta(description="it stops itself after this many minutes without a request (null: never)"),
    ]
    slurm_state: str
    slurm_reason: str

    @classmethod
    def of(cls, s: Service) -> ServiceResponse:
        return _copy(
            cls,
            s,
            config=ServiceConfigResponse(
                environment=s.config.environment, resources=s.config.resources
            ),
        )


class ServiceStatusResponse(msgspec.Struct, kw_only=True):
    id: str
    status: ServiceStatus
    status_reason: str
    slurm_state: str
    slurm_reason: str
    node: str | None
    endpoint: str | None
    created_at: datetime
    started_at: datetime | None
    ended_at: datetime | None

    @classmethod
    def of(cls, s: Service) -> ServiceStatusResponse:
        return _copy(cls, s)


class LogsResponse(msgspec.Struct, kw_only=True):
    id: str
    logs: Annotated[str, Meta(description="stdout, then stderr when it is a separate file")]
    stdout: str
    stderr: str | None
    truncated: Annotated[bool, Meta(description="older lines were left out (tail or size cap)")]
    reason: Annotated[
        str | None,
        Meta(
            description="why a log file was not read: the gateway reads only the files it "
            "chose for the job, when they are regular files owned by the job's user"
        ),
    ]  # always sent (null when read), so required: generated clients type it str | None

    @classmethod
    def of(cls, service_id: str, logs: Logs) -> LogsResponse:
        combined = logs.stdout
        if logs.stderr:
            separator = "\n" if combined and not combined.endswith("\n") else ""
            combined = combined + separator + logs.stderr
        return cls(
            id=service_id,
            logs=combined,
            stdout=logs.stdout,
            stderr=logs.stderr,
            truncated=logs.truncated,
            reason=logs.reason,
        )


class StopResponse(msgspec.Struct, kw_only=True):
    id: str
    status: ServiceStatus
    message: str


class VariableResponse(msgspec.Struct, kw_only=True, omit_defaults=True):
    type: str
    description: str = ""
    default: str | None = None
    pattern: str | None = None
    min: float | None = None
    max: float | None = None
    choices: list[str] | None = None

    @classmethod
    def of(cls, spec: VariableSpec, default: str | None) -> VariableResponse:
        return cls(
            type=spec.type,
            description=spec.description,
            default=default,
            pattern=spec.pattern,
            min=spec.min,
            max=spec.max,
            choices=spec.choices,
        )


class RecipeResponse(msgspec.Struct, kw_only=True):
    name: Annotated[str, Meta(examples=["vllm"])]
    category: Annotated[str, Meta(examples=["inference"])]
    path: Annotated[str, Meta(description="what recipe_name takes", examples=["inference/vllm"])]
    description: str
    version: str
    kind: str
    resources: dict[str, str | int | None]
    environment: dict[str, str]
    parameters: dict[str, VariableResponse]

    @classmethod
    def of(cls, recipe: Recipe) -> RecipeResponse:
        spec = recipe.spec
        return cls(
            name=recipe.name.split("/", 1)[1],
            category=recipe.category,
            path=recipe.name,
            description=spec.description,
            version=spec.version,
            kind=spec.service.kind,
            resources=recipe.default_resources.as_config(),
            environment=dict(spec.environment_defaults),
            parameters={
                k: VariableResponse.of(v, spec.environment_defaults.get(k))
                for k, v in spec.environment.items()
            },
        )


class FieldErrorResponse(msgspec.Struct):
    field: str
    message: str


class ProblemResponse(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Every error of the API (RFC 9457 problem details)."""

    status: int
    title: str
    detail: str
    errors: list[FieldErrorResponse] = msgspec.field(default_factory=list)
    service_status: (
        Annotated[str, Meta(description="the service's status when the conflict is about it")]
        | None
    ) = None


# -- vLLM -------------------------------------------------------------------------


class VllmServiceResponse(msgspec.Struct, kw_only=True):
    id: str
    name: str
    recipe_name: str
    status: ServiceStatus
    endpoint: str | None
    model: str | None
    node: str | None


class VllmServicesResponse(msgspec.Struct, kw_only=True):
    vllm_services: list[VllmServiceResponse]


class ModelsResponse(msgspec.Struct, kw_only=True):
    service_id: str
    endpoint: str
    models: list[str]

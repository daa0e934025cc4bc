"""``/api/v1/deployments``: what the deployments file declares and how each stands.

Read only: deployments are declared in the file (``GATEWAY_DEPLOYMENTS_FILE``),
and their replicas are ordinary services on every ``/api/v1/services`` route.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

import msgspec
from litestar import Controller, get
from litestar.di import NamedDependency
from litestar.openapi.spec import Example
from litestar.params import Parameter
from msgspec import Meta

from gateway.api.openapi import problem_responses
from gateway.core.deployments.reconciler import Reconciler
from gateway.core.deployments.view import DeploymentStatus
from gateway.core.principal import Principal
from gateway.core.status import ServiceStatus

DeploymentName = Annotated[
    str,
    # No length bound here: any name that is none of the caller's is one 404.
    Parameter(
        description="the deployment's name in the deployments file",
        examples=[Example(value="qwen")],
    ),
]


class ActionResponse(msgspec.Struct, kw_only=True):
    at: Annotated[datetime | None, Meta(description="when it was done, or is due")]
    action: Annotated[
        str,
        Meta(
            description="submit.new, submit.replace, submit.walltime, submit.roll, "
            "submit.scale, submit.demand, stop, end.<status>, error; planned: submit, walltime, "
            "handover, roll, stop; scaling decisions: scale.up, scale.down",
            examples=["submit.walltime"],
        ),
    ]
    reason: str
    service_id: str | None = None


class ReplicaCountsResponse(msgspec.Struct, kw_only=True):
    wanted: Annotated[
        int, Meta(description="replicas the file declares, or the count the load sets now")
    ]
    running: Annotated[int, Meta(description="answering their health check")]
    starting: Annotated[int, Meta(description="building or starting on a node")]
    pending: Annotated[int, Meta(description="queued in Slurm (see each one's slurm_reason)")]


class MemberResponse(msgspec.Struct, kw_only=True):
    service_id: Annotated[str, Meta(description="an ordinary service id (its Slurm job id)")]
    slot: int
    generation: str
    status: ServiceStatus
    status_reason: str
    slurm_reason: str
    node: str | None
    time_left_seconds: Annotated[
        int | None, Meta(description="until Slurm's time limit ends it; null until it runs")
    ]
    draining: Annotated[
        bool,
        Meta(description="takes no new requests: its successor answers, or it is unneeded"),
    ]
    submitted_for: Annotated[
        str, Meta(description="new, replace, walltime, roll, scale or demand", examples=["scale"])
    ]
    submitted_at: datetime | None
    load: Annotated[
        float | None,
        Meta(description="requests running and waiting at its server, as last read"),
    ]
    leaving: Annotated[
        bool, Meta(description="scaled down: its time limit was lowered; it drains and stops")
    ] = False


class ScalingResponse(msgspec.Struct, kw_only=True):
    min_replicas: int
    max_replicas: int
    target_load: Annotated[
        float, Meta(description="requests running and waiting per replica aimed at")
    ]
    load_per_replica: Annotated[
        float | None, Meta(description="now, mean of the running replicas that reported")
    ]
    reason: Annotated[str, Meta(description="why the count is what it is, as of the last round")]
    idle_seconds: Annotated[
        float | None, Meta(description="with min_replicas 0: idle this long, to zero")
    ]
    decisions: Annotated[
        list[ActionResponse],
        Meta(description="this gateway replica's recent scaling decisions, oldest first"),
    ]


class DeploymentResponse(msgspec.Struct, kw_only=True):
    name: str
    state: Literal["ready", "progressing", "degraded", "invalid", "removing"]
    reason: str
    recipe_name: str | None
    environment: dict[str, str]
    resources: dict[str, str | int | None]
    tenant: Annotated[str | None, Meta(description="the owner; null: shared with every tenant")]
    shared: bool
    generation: Annotated[
        str | None, Meta(description="digest of the declared spec: a change rolls the replicas")
    ]
    replicas: ReplicaCountsResponse
    members: Annotated[list[MemberResponse], Meta(description="the replicas not yet ended")]
    next_action: ActionResponse | None
    recent_actions: list[ActionResponse]
    error: Annotated[
        str | None,
        Meta(description="why the declared version is not in force: file:line, field, reason"),
    ] = None
    scaling: Annotated[
        ScalingResponse | None,
        Meta(description="with min_replicas and max_replicas: the load and the decisions"),
    ]
    model: Annotated[
        str | None, Meta(description="the name /v1 requests use for it (its served model)")
    ]

    @classmethod
    def of(cls, status: DeploymentStatus) -> DeploymentResponse:
        return msgspec.convert(status, cls, from_attributes=True)


class DeploymentsController(Controller):
    path = "/api/v1/deployments"
    tags = ("deployments",)

    @get(
        "/",
        operation_id="listDeployments",
        responses=problem_responses(502, 503),
        summary="The declared deployments the caller may see, with their replicas",
        description="A tenant sees its own deployments and the shared ones; an admin all.",
    )
    async def list_deployments(
        self, deployments: NamedDependency[Reconciler], principal: NamedDependency[Principal]
    ) -> list[DeploymentResponse]:
        return [DeploymentResponse.of(s) for s in await deployments.all(principal)]

    @get(
        "/{name:str}",
        operation_id="getDeployment",
        responses=problem_responses(400, 404, 502, 503),
        summary="One deployment: its spec, replicas, next planned action and recent actions",
    )
    async def get_deployment(
        self,
        deployments: NamedDependency[Reconciler],
        principal: NamedDependency[Principal],
        name: DeploymentName,
    ) -> DeploymentResponse:
        return DeploymentResponse.of(await deployments.get(name, principal))

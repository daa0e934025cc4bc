"""``/api/v1/services``: create, list, describe, status, logs, stop."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from litestar import Controller, Request, delete, get, post
from litestar.datastructures import ResponseHeader
from litestar.di import NamedDependency
from litestar.exceptions import ValidationException
from litestar.openapi.spec import Example, Link, OpenAPIResponse, Operation
from litestar.params import Body, HeaderParameter, Parameter
from litestar.response import Response
from litestar.status_codes import HTTP_200_OK, HTTP_201_CREATED
from msgspec import UNSET

from gateway.api import audit
from gateway.api.openapi import JsonExample, problem_responses
from gateway.api.schemas import (
    CreateServiceRequest,
    LogsResponse,
    ServiceResponse,
    ServiceStatusResponse,
    StopResponse,
)
from gateway.core.principal import Principal
from gateway.core.services import CreateRequest, ServiceManager

ServiceId = Annotated[
    str,
    Parameter(description="the service id: its Slurm job id", examples=[Example(value="3652098")]),
]

IdempotencyKey = Annotated[
    str | None,
    HeaderParameter(
        name="Idempotency-Key",
        required=False,
        min_length=1,
        max_length=255,
        pattern=r"^[\x21-\x7e]+$",
        description="Makes a retried create safe: the same key with the same body, "
        "from the same tenant, answers with the service the first create made (also "
        "from another replica, also while the first is under way), with "
        "`Idempotent-Replayed: true`; the same key with another body is 422. Remembered "
        "while Slurm lists the service (until MinJobAge after it ends). A create with a "
        "key waits a few seconds before it may start.",
        examples=[Example(value="benchmark-run-42-server-1")],
    ),
]


def _plain_count(request: Request[Any, Any, Any], name: str) -> None:
    """Refuse what msgspec's lax parsing would take as a count: ``0.0``, ``1e2``, repeats.

    A client means one thing by a number; ``1e2`` lines is a guess we do not make.
    """
    given = request.query_params.getall(name, [])
    if len(given) > 1 or (given and not (given[0].isascii() and given[0].isdigit())):
        raise ValidationException(
            detail=f"Validation failed for {request.method} {request.url.path}",
            extra=[
                {
                    "message": "Expected a whole number written in digits, once",
                    "key": name,
                    "source": "query",
                }
            ],
        )


_CREATE_EXAMPLES = [
    Example(summary="Default model", value={"recipe_name": "inference/vllm"}),
    Example(
        summary="Custom model and resources",
        value={
            "recipe_name": "inference/vllm",
            "config": {
                "environment": {"VLLM_MODEL": "gpt2"},
                "resources": {
                    "nodes": 1,
                    "cpu": "8",
                    "memory": "64G",
                    "time_limit": 120,
                    "gpu": "1",
                },
            },
        },
    ),
    Example(
        summary="CPU only",
        # JsonExample: Litestar would drop `"gpu": None` (and so the recipe's GPU
        # default would apply to a client that copies the example).
        value=JsonExample(
            {
                "recipe_name": "inference/vllm",
                "config": {
                    "environment": {"VLLM_MODEL": "gpt2"},
                    "resources": {"nodes": 1, "cpu": "4", "memory": "16G", "gpu": None},
                },
            }
        ),
    ),
]


# What a client does next with a service it created: the operations that take its id.
_FOLLOW_UPS = {
    "GetService": "getService",
    "GetServiceStatus": "getServiceStatus",
    "GetServiceLogs": "getServiceLogs",
    "StopService": "stopService",
    "ListVllmModels": "listVllmModels",
    "PromptVllm": "promptVllm",
}


@dataclass
class CreateServiceOperation(Operation):
    """createService, with OpenAPI links from its 201 answer's ``id`` to the
    operations on that service (what Schemathesis' stateful phase follows).

    Litestar builds each operation with the route's ``operation_class``; a
    ResponseSpec has no links, so they are added here.
    """

    def __post_init__(self) -> None:
        created = (self.responses or {}).get("201")
        if isinstance(created, OpenAPIResponse):
            created.links = {
                name: Link(
                    operation_id=operation_id,
                    parameters={"service_id": "$response.body#/id"},
                    description="the service just created",
                )
                for name, operation_id in _FOLLOW_UPS.items()
            }


class ServicesController(Controller):
    path = "/api/v1/services"
    tags = ("services",)

    @post(
        "/",
        operation_id="createService",
        responses=problem_responses(400, 422, 429, 502, 503),
        summary="Start a service from a recipe",
        description="Renders the recipe with the given overrides and submits it to Slurm. "
        "The new service is usually `pending`; poll its status.",
        status_code=HTTP_201_CREATED,
        response_description="The new service; its `id` is what the other operations take",
        operation_class=CreateServiceOperation,  # adds the links to the 201 answer
        response_headers=[
            ResponseHeader(
                name="Idempotent-Replayed",
                required=False,
                documentation_only=True,
                description="`true` when an earlier create with the same Idempotency-Key "
                "made this service",
            )
        ],
        audit="service.create",
    )
    async def create(
        self,
        request: Request[Principal, Any, Any],
        services: NamedDependency[ServiceManager],
        principal: NamedDependency[Principal],
        data: Annotated[CreateServiceRequest, Body(examples=_CREATE_EXAMPLES)],
        idempotency_key: IdempotencyKey = None,
    ) -> Response[ServiceResponse]:
        resources = data.config.resources.overrides()
        if "nodes" not in resources and data.config.nodes is not UNSET:
            resources["nodes"] = data.config.nodes
        created = await services.create(
            CreateRequest(
                recipe_name=data.recipe_name,
                environment=dict(data.config.environment),
                resources=resources,
                shared=data.shared,
            ),
            principal,
            idempotency_key=idempotency_key,
        )
        audit.note(request.scope, service_id=created.service.id, replayed=created.replayed)
        headers = {"Idempotent-Replayed": "true"} if created.replayed else {}
        return Response(
            ServiceResponse.of(created.service), status_code=HTTP_201_CREATED, headers=headers
        )

    @get(
        "/",
        operation_id="listServices",
        responses=problem_responses(502, 503),
        summary="List the services Slurm still knows",
    )
    async def list_services(
        self, services: NamedDependency[ServiceManager], principal: NamedDependency[Principal]
    ) -> list[ServiceResponse]:
        return [ServiceResponse.of(s) for s in await services.list(principal)]

    @get(
        "/{service_id:str}",
        operation_id="getService",
        responses=problem_responses(400, 404, 502, 503),
        summary="Describe one service",
    )
    async def get_service(
        self,
        services: NamedDependency[ServiceManager],
        principal: NamedDependency[Principal],
        service_id: ServiceId,
    ) -> ServiceResponse:
        return ServiceResponse.of(await services.get(service_id, principal))

    @get(
        "/{service_id:str}/status",
        operation_id="getServiceStatus",
        responses=problem_responses(400, 404, 502, 503),
        summary="A service's status: pending, building, starting, running, completed, "
        "failed, cancelled or timeout",
    )
    async def get_status(
        self,
        services: NamedDependency[ServiceManager],
        principal: NamedDependency[Principal],
        service_id: ServiceId,
    ) -> ServiceStatusResponse:
        return ServiceStatusResponse.of(await services.get(service_id, principal))

    @get(
        "/{service_id:str}/logs",
        operation_id="getServiceLogs",
        responses=problem_responses(400, 404, 409, 422, 502, 503),
        summary="The service's stdout and stderr",
    )
    async def get_logs(
        self,
        request: Request[Any, Any, Any],
        services: NamedDependency[ServiceManager],
        principal: NamedDependency[Principal],
        service_id: ServiceId,
        tail: Annotated[
            int | None,
            Parameter(
                ge=0,
                le=100_000,
                description="only the last N lines",
                required=False,
                # Litestar leaves a bound of 0 out of the document (it tests truth).
                schema_extra={"minimum": 0},
            ),
        ] = None,
    ) -> LogsResponse:
        _plain_count(request, "tail")
        return LogsResponse.of(service_id, await services.logs(service_id, principal, tail=tail))

    @delete(
        "/{service_id:str}",
        operation_id="stopService",
        responses=problem_responses(400, 404, 422, 502, 503),
        summary="Stop a service (cancels its Slurm job)",
        description="Safe to repeat: a service that has already ended, however it ended, "
        "answers 200 with its final state. Only an unknown id answers 404.",
        status_code=HTTP_200_OK,
        audit="service.stop",
    )
    async def stop(
        self,
        services: NamedDependency[ServiceManager],
        principal: NamedDependency[Principal],
        service_id: ServiceId,
    ) -> StopResponse:
        service, already_ended = await services.stop(service_id, principal)
        if already_ended:
            message = (
                f"Service {service.id} had already ended ({service.status.value}); nothing to stop"
            )
        else:
            message = f"Service {service.id} stopped successfully"
        return StopResponse(id=service.id, status=service.status, message=message)

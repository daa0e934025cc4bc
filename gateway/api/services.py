"""``/api/v1/services``: create, list, describe, status, logs, stop."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Annotated, Any

from litestar import Controller, Request, delete, get, post
from litestar.datastructures import ResponseHeader
from litestar.di import NamedDependency
from litestar.exceptions import ValidationException
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import (
    Example,
    Link,
    OpenAPIMediaType,
    OpenAPIResponse,
    OpenAPIType,
    Operation,
    Schema,
)
from litestar.params import Body, HeaderParameter, Parameter
from litestar.response import Response, Stream
from litestar.status_codes import HTTP_200_OK, HTTP_201_CREATED
from msgspec import UNSET

from gateway.api import audit
from gateway.api.openapi import JsonExample, problem_responses
from gateway.api.schemas import (
    CreateServiceRequest,
    LogsResponse,
    ProblemResponse,
    ServiceResponse,
    ServiceStatusResponse,
    StopResponse,
)
from gateway.core.joblogs import FOLLOWERS_PER_TENANT, FOLLOWERS_TOTAL
from gateway.core.logfollow import FOLLOW_POLL_SECONDS, HEARTBEAT_SECONDS, LogEvent
from gateway.core.principal import Principal
from gateway.core.services import CreateRequest, ServiceManager
from gateway.proxy.asgi import ClosingStream

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


FOLLOW_DESCRIPTION = (
    "With `follow=true` the answer is a stream of Server-Sent Events: each line of the "
    "job's output as it is written, `event: stdout` or `event: stderr` with the line as "
    "`data` (without its line break; a line longer than 64 KiB comes in pieces), first all "
    "lines written so far (at most the log byte cap, or the last `tail`). The files are "
    f"polled every {FOLLOW_POLL_SECONDS} s. A pending service is waited for. The stream "
    'ends with `event: end`, `data: {"status": ..., "reason": ...}`, once the service has '
    "ended and its files are read to their end (or the gateway is stopping). "
    '`event: error` (`{"stream", "reason"}`) says a file is not read (the same checks as '
    'without follow); `event: reset` (`{"stream", "reason"}`) that a file was replaced or '
    f"shrank and is read again from its start. A comment line every {HEARTBEAT_SECONDS:g} s "
    f"keeps an idle connection open. Each gateway process serves at most "
    f"{FOLLOWERS_PER_TENANT} follows per tenant (429) and {FOLLOWERS_TOTAL} in all (503)."
)

LOG_EVENT = Schema(
    type=OpenAPIType.OBJECT,
    description="Server-Sent Events: the service's log lines as they are written, ending "
    "with an `end` event",
    required=["event", "data"],
    properties={
        "event": Schema(
            type=OpenAPIType.STRING,
            enum=["stdout", "stderr", "reset", "error", "end"],
            description="the file a line is of; `reset`, `error` or `end` (JSON data)",
        ),
        "data": Schema(
            type=OpenAPIType.STRING,
            description='one line; for `end`, `{"status": ..., "reason": ...}`; for `error` '
            'and `reset`, `{"stream": ..., "reason": ...}`',
        ),
    },
)


@dataclass
class LogStreamOperation(Operation):
    """getServiceLogs: its 200 answer is JSON, or with follow=true a text/event-stream
    (LOG_EVENT). A ResponseSpec documents one media type; the second is added here."""

    def __post_init__(self) -> None:
        ok = (self.responses or {}).get("200")
        if isinstance(ok, OpenAPIResponse):
            ok.content = {**(ok.content or {}), "text/event-stream": OpenAPIMediaType(LOG_EVENT)}


async def _event_stream(events: AsyncGenerator[LogEvent, None]) -> AsyncGenerator[bytes, None]:
    """A follow's events as Server-Sent Events (their data holds no line break)."""
    try:
        async for event in events:
            if event.event:
                yield f"event: {event.event}\ndata: {event.data}\n\n".encode()
            else:
                yield f": {event.data}\n\n".encode()
    finally:
        await events.aclose()


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
                idle_stop_minutes=data.idle_stop_minutes,
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
        responses={
            **problem_responses(400, 404, 409, 422, 429, 502, 503),
            200: ResponseSpec(
                LogsResponse,
                generate_examples=False,
                description="The logs, or with follow=true a text/event-stream of their "
                "lines as they are written",
            ),
            503: ResponseSpec(
                ProblemResponse,
                description="Slurm is unreachable, or (follow=true) this gateway process "
                "follows as many logs as it will at once; retry after Retry-After seconds",
                media_type="application/problem+json",
                generate_examples=False,
            ),
        },
        operation_class=LogStreamOperation,  # adds the text/event-stream 200 answer
        summary="The service's stdout and stderr; with follow=true, streamed as they are written",
        description=FOLLOW_DESCRIPTION,
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
                description="only the last N lines (with follow=true: of those already "
                "written, then every new one)",
                required=False,
                # Litestar leaves a bound of 0 out of the document (it tests truth).
                schema_extra={"minimum": 0},
            ),
        ] = None,
        follow: Annotated[
            bool,
            Parameter(
                description="stream the lines as Server-Sent Events as they are written, "
                "until the service ends or the client leaves",
                required=False,
            ),
        ] = False,
    ) -> Response[LogsResponse] | Stream:
        _plain_count(request, "tail")
        if follow:
            state = request.app.state
            events = await services.follow_logs(
                service_id, principal, tail=tail, stopping=lambda: bool(state.get("draining"))
            )
            return ClosingStream(
                _event_stream(events),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        return Response(
            LogsResponse.of(service_id, await services.logs(service_id, principal, tail=tail))
        )

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

"""Liveness and readiness, for Kubernetes probes and for people."""

from __future__ import annotations

import msgspec
from litestar import Controller, get
from litestar.di import NamedDependency
from litestar.openapi.datastructures import ResponseSpec
from litestar.response import Response
from litestar.status_codes import HTTP_200_OK, HTTP_503_SERVICE_UNAVAILABLE

from gateway.slurm import SlurmClient, SlurmError


class Health(msgspec.Struct, frozen=True):
    status: str


class Readiness(msgspec.Struct, frozen=True, kw_only=True):
    status: str
    slurm_url: str
    slurm_api_version: str | None = None
    slurm_release: str | None = None
    detail: str | None = None


class HealthController(Controller):
    path = "/api/v1"
    tags = ("health",)

    @get("/health", operation_id="getHealth", summary="Liveness: the process answers")
    async def health(self) -> Health:
        return Health(status="ok")

    @get(
        "/ready",
        operation_id="getReadiness",
        summary="Readiness: slurmrestd answers and slurmctld responds",
        responses={
            HTTP_503_SERVICE_UNAVAILABLE: ResponseSpec(
                Readiness,
                generate_examples=False,
                description="Not ready: slurmrestd cannot be reached or slurmctld does not "
                "respond; `detail` says which",
            )
        },
    )
    async def ready(self, slurm: NamedDependency[SlurmClient]) -> Response[Readiness]:
        try:
            pings = await slurm.ping()
        except SlurmError as exc:
            body = Readiness(status="unavailable", slurm_url=slurm.base_url, detail=str(exc))
            return Response(body, status_code=HTTP_503_SERVICE_UNAVAILABLE)
        responding = any(p.responding for p in pings)
        body = Readiness(
            status="ok" if responding else "unavailable",
            slurm_url=slurm.base_url,
            slurm_api_version=slurm.api_version,
            slurm_release=pings[0].slurm_release if pings else None,
            detail=None if responding else "slurmctld does not respond",
        )
        return Response(
            body, status_code=HTTP_200_OK if responding else HTTP_503_SERVICE_UNAVAILABLE
        )

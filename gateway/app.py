"""Application factory."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from litestar import Litestar
from litestar.datastructures import State
from litestar.openapi import OpenAPIConfig
from litestar.plugins.structlog import StructlogPlugin

from gateway import __version__
from gateway.api.health import HealthController
from gateway.settings import Settings, load_settings
from gateway.wiring import slurm_client


def create_app(settings: Settings | None = None) -> Litestar:
    settings = settings or load_settings()

    @asynccontextmanager
    async def slurm_lifespan(app: Litestar) -> AsyncIterator[None]:
        client = slurm_client(settings)
        app.state.slurm = client
        try:
            yield
        finally:
            await client.aclose()

    return Litestar(
        route_handlers=[HealthController],
        lifespan=[slurm_lifespan],
        plugins=[StructlogPlugin()],
        openapi_config=OpenAPIConfig(
            title="Slurm AI Gateway",
            version=__version__,
            path="/api/v1/schema",
        ),
        state=State({"settings": settings}),
    )

"""Application factory."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from litestar import Litestar
from litestar.datastructures import State
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig
from litestar.plugins.structlog import StructlogConfig, StructlogPlugin
from litestar.types import ASGIApp

from gateway import __version__, wiring
from gateway.accesslog import AccessLog
from gateway.api import audit, litestar_fixes, problems, reference, security
from gateway.api.anthropic import AnthropicController
from gateway.api.deployments import DeploymentsController
from gateway.api.health import HealthController, drain_on_sigterm
from gateway.api.loopback import LoopbackOnly
from gateway.api.metrics import HttpMetrics, MetricsController, ServiceCounts
from gateway.api.openai import OpenAIController
from gateway.api.openai_errors import openai_error
from gateway.api.recipes import RecipesController
from gateway.api.services import ServicesController
from gateway.api.vllm import VllmController
from gateway.api.vllm_apis import VllmApisController
from gateway.auth.authenticate import Authenticator
from gateway.core.deployments.plan import Timing
from gateway.core.deployments.reconciler import Reconciler
from gateway.core.jobview import JobView
from gateway.core.recipes import RecipeCatalog
from gateway.core.routing import ModelRouter
from gateway.core.services import ServiceManager
from gateway.proxy.front import Front
from gateway.proxy.frontdoor import FrontDoor
from gateway.proxy.middleware import data_path
from gateway.proxy.prompts import Prompting
from gateway.settings import Settings, is_loopback, load_settings
from gateway.slurm import SlurmClient
from gateway.upstream.probe import HealthProber
from gateway.upstream.vllm import VllmClient
from gateway.wiring import metadata_codec, slurm_client, token_provider


def load_recipes(settings: Settings) -> RecipeCatalog:
    site = Path(settings.site_file) if settings.site_file else None
    return RecipeCatalog.load(settings.recipe_folders(), site)


def _logging() -> StructlogPlugin:
    # Litestar's request/response middleware would log prompts and generated
    # text (user data) and one line per streamed chunk; uvicorn's access log
    # already gives one line per request without bodies.
    # httpx logs every upstream call and health probe at INFO: too chatty.
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return StructlogPlugin(StructlogConfig(enable_middleware_logging=False))


def openapi_config() -> OpenAPIConfig:
    return OpenAPIConfig(
        title="Slurm AI Gateway",
        version=__version__,
        description="Run AI services (vLLM first) on Slurm clusters through one HTTP API.",
        path="/api/v1/schema",
        # Swagger UI from the gateway's own files: no CDN on a cluster's network.
        render_plugins=reference.render_plugins("/api/v1/schema"),
        components=security.components(),
        security=security.requirements(),
    )


@dataclass(slots=True)
class Provided:
    """What the app hands out: to handlers as dependencies, one per field and
    by its name; to the raw middlewares when they are built. One per app, in
    its state as ``provided``; the adapters are made by its lifespan (unset
    until it starts)."""

    recipes: RecipeCatalog
    authenticator: Authenticator
    service_counts: ServiceCounts
    slurm: SlurmClient = field(init=False)
    vllm: VllmClient = field(init=False)
    services: ServiceManager = field(init=False)
    prompting: Prompting = field(init=False)
    front_door: FrontDoor = field(init=False)
    deployments: Reconciler = field(init=False)

    def dependencies(self) -> dict[str, Provide]:
        return {f.name: Provide(self._getter(f.name), sync_to_thread=False) for f in fields(self)}

    def _getter(self, name: str) -> Callable[[], Any]:
        def provide() -> Any:
            return getattr(self, name)

        return provide


def create_app(settings: Settings | None = None, recipes: RecipeCatalog | None = None) -> Litestar:
    settings = settings or load_settings()
    # Recipes are checked before anything is served: a broken one stops start-up.
    catalog = recipes if recipes is not None else load_recipes(settings)
    tokens = token_provider(settings)  # so is a token or key that cannot be used
    codec = metadata_codec(settings)  # and a secret that cannot be read
    minter = wiring.minter(settings)
    authenticate = wiring.authenticator(settings)  # and an auth file that cannot be used
    declared = wiring.deployments_file(settings, catalog)  # and a deployments file
    provided = Provided(recipes=catalog, authenticator=authenticate, service_counts=ServiceCounts())

    @asynccontextmanager
    async def adapters(app: Litestar) -> AsyncIterator[None]:
        client = slurm_client(settings, tokens)
        prober = HealthProber(timeout=settings.health_timeout, ttl=settings.health_cache_seconds)
        vllm = wiring.vllm_client(settings)
        provided.slurm = client
        provided.vllm = vllm
        authenticate.bind(client)
        services = provided.services = ServiceManager(
            slurm=client,
            recipes=catalog,
            prober=prober,
            codec=codec,
            job_dir=settings.job_dir,
            slurm_user=settings.slurm_user,
            partition=settings.slurm_partition,
            account=settings.slurm_account,
            path_map=settings.path_mapping(),
            log_max_bytes=settings.log_max_bytes,
            minter=minter,
            known_users=lambda: authenticate.directory().slurm_users,
            view=JobView(
                client,
                interval=settings.view_refresh_seconds,
                min_gap=settings.view_min_gap_seconds,
                max_stale=settings.view_max_stale_seconds,
            ),
        )
        provided.prompting = Prompting(services=services, vllm=vllm)
        # Its own small pool: a deployment's load is read whatever the data path holds.
        meter = VllmClient(timeout=settings.health_timeout, connect_timeout=settings.health_timeout)
        reconciler = provided.deployments = Reconciler(
            read_load=wiring.load_reader(meter),
            services=services,
            declared=declared,
            principal_for=wiring.deployment_principal(
                authenticate, lambda: services.slurm_user, settings.denied_slurm_user_set()
            ),
            timing=Timing(
                lead=settings.deployment_lead_seconds,
                drain=settings.deployment_drain_seconds,
                grace=settings.deployment_change_grace_seconds,
            ),
        )
        provided.front_door = FrontDoor(
            router=ModelRouter(services, on_demand=reconciler.elastic),
            vllm=vllm,
            prefix_affinity=settings.routing_prefix_affinity,
        )
        services.view.start()
        reconciler.start()
        _freeze_startup_objects()
        try:
            yield
        finally:
            await reconciler.close()
            await services.view.close()
            await prober.aclose()
            await meter.aclose()
            await vllm.aclose()
            await client.aclose()

    return Litestar(
        route_handlers=[
            HealthController,
            ServicesController,
            DeploymentsController,
            RecipesController,
            VllmController,
            OpenAIController,
            VllmApisController,
            AnthropicController,
            MetricsController,
        ],
        dependencies={
            **provided.dependencies(),
            "principal": Provide(security.provide_principal, sync_to_thread=False),
        },
        lifespan=[adapters, drain_on_sigterm],
        # No route under /v1: OpenAI's clients still expect its error shape there.
        plugins=[
            _logging(),
            problems.plugin({"/v1/": openai_error}),
            litestar_fixes.StrictStructSchemaPlugin(),
        ],
        openapi_config=openapi_config(),
        before_request=litestar_fixes.before_request,
        # Outermost first: audit lines are written for refused requests too;
        # the data path answers its routes (marked in their opt) last.
        middleware=[
            HttpMetrics,
            audit.audit_middleware,
            security.middleware(authenticate, public_schema=settings.public_schema),
            data_path(provided),
        ],
        state=State({"settings": settings, "provided": provided}),
    )


def _freeze_startup_objects() -> None:
    """The start-up's objects (the app, its routes and schemas, the recipes)
    kept out of every later collection: the collector's passes over them were
    the proxied requests' longest stalls (p99 at 32 streams 70 ms with them,
    24 ms without the collector at all: bench/proxy.py). The youngest objects
    are collected as often as Python's default has it: collected less often
    (every 20,000 allocations), the cycles an error leaves, which can hold a
    request's buffers, lived long enough to add 120 MiB to the peak of the
    memory attack test (tests/unit/upstream/test_limits_memory.py)."""
    gc.collect()
    gc.freeze()


def served(app: Litestar, settings: Settings) -> ASGIApp:
    """``app`` as the server runs it, outermost first: the access log (every
    request has an id, refused ones too); then, without client authentication,
    the guard that keeps web pages out (gateway/api/loopback.py). Both sit in
    front of Litestar's routing, so they cover the prompt fast path, the /v1
    relay and unknown paths alike."""
    provided: Provided = app.state.provided
    inner: ASGIApp = Front(app, provided, provided.authenticator)
    if not settings.authenticates:
        inner = LoopbackOnly(inner, check_host=is_loopback(settings.listen_host))
    # Lines wait up to 50 ms to be written together.
    return AccessLog(inner, write=settings.access_log, batch=0.05)

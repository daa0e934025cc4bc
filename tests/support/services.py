"""Helpers for tests of services: metadata blobs, jobs as the scheduler hands
them to the core, a ServiceManager over the in-memory scheduler
(``fake_manager``), and services given whole (the router's and the relay's)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import msgspec

from gateway.core import metadata
from gateway.core.model import Service, ServiceConfig, Upstream
from gateway.core.principal import Principal, anonymous
from gateway.core.recipes import RecipeCatalog
from gateway.core.routing import ModelRouter
from gateway.core.services import ServiceManager
from gateway.core.status import ServiceStatus
from gateway.slurm import JobInfo, JobState, NodeInfo
from gateway.testing.scheduler import FakeScheduler
from gateway.upstream.probe import HealthProber
from tests.support.clock import Clock

ROOT = Path(__file__).resolve().parents[2]
CODEC = metadata.MetaCodec(b"the gateway's shared secret....!")
ADMIN = anonymous("gwuser")
# The node's address is a loopback one of its own, where the tests' health
# stubs listen (tests/support/http_stub.py); 127.0.0.1 is then off the node.
NODE_ADDRESS = "127.0.0.2"
CREATED = 1_800_000_000.0
RECIPES = [ROOT / "recipes", ROOT / "tests" / "recipes"]


def bound(comment: str, job_id: int) -> str:
    """A comment whose metadata is unbound (the helpers below make them so),
    bound to ``job_id`` as the gateway's create does."""
    head, sep, tail = comment.partition("|")
    if head.startswith(metadata.PREFIX) and "." not in head:
        comment = CODEC.bind(head, job_id) + sep + tail
    return comment


def job_info(
    job_id: int,
    comment: str,
    state: JobState | str = JobState.RUNNING,
    *,
    submitted: float = CREATED,
    **fields: Any,
) -> JobInfo:
    """A running job of the gateway's user as the scheduler hands it to the
    core, its comment ``bound``; ``fields`` change any other."""
    listed = JobInfo(
        job_id=job_id,
        name=f"gw-testing-http-{CODEC.job_tag}",
        user_name="gwuser",
        state=JobState(state),
        batch_host="node1",
        nodes="node1",
        comment=bound(comment, job_id),
        submit_time=datetime.fromtimestamp(submitted, tz=UTC),
        start_time=datetime.fromtimestamp(CREATED + 10, tz=UTC),
    )
    return msgspec.structs.replace(listed, **fields) if fields else listed


def blob(owner: str = "gwuser", **environment: str) -> str:
    meta = CODEC.new_meta(
        recipe="testing/http",
        created=CREATED,
        owner=owner,
        environment=dict(environment),
        resources={},
    )
    return CODEC.unbound(meta)


def service_comment(port: int, host: str = "node1") -> str:
    return f"{blob()}|phase=starting|endpoint={host}:{port}"


def tenant_blob(owner: str, tenant: str, idempotency: str = "") -> str:
    meta = CODEC.new_meta(
        recipe="testing/http",
        created=CREATED,
        owner=owner,
        environment={},
        resources={"nodes": 1, "gpu": "2"},
        tenant=tenant,
        idempotency=idempotency,
    )
    return CODEC.unbound(meta)


def vllm_blob(
    owner: str, tenant: str, model: str, *, shared: bool = False, alias: str = "", lora: str = ""
) -> str:
    environment = {"VLLM_MODEL": model}
    if alias:
        environment["VLLM_SERVED_MODEL_NAME"] = alias
    if lora:
        environment["VLLM_LORA_MODULES"] = lora
    meta = CODEC.new_meta(
        recipe="testing/openai-stub",
        created=CREATED,
        owner=owner,
        environment=environment,
        resources={},
        tenant=tenant,
        shared=shared,
    )
    return CODEC.unbound(meta)


# -- over the in-memory scheduler ---------------------------------------------------


def fake_manager(*jobs: JobInfo, **options: Any) -> tuple[ServiceManager, FakeScheduler]:
    """A ServiceManager whose scheduler holds ``jobs`` and knows node1."""
    fake = FakeScheduler("gwuser", first_id=options.pop("first_id", 1))
    fake.put(*jobs)
    fake.add_node(NodeInfo(name="node1", hostname="node1.cluster", address=NODE_ADDRESS))
    settings: dict[str, Any] = {"job_dir": "/home/gwuser", "slurm_user": "gwuser", **options}
    services = ServiceManager(
        slurm=fake,
        recipes=RecipeCatalog.load(RECIPES),
        prober=HealthProber(timeout=1, ttl=5),
        codec=CODEC,
        **settings,
    )
    return services, fake


# -- services given, not built from jobs (the router's and the relay's tests) ------


def service(
    sid: str,
    model: str = "m",
    status: ServiceStatus = ServiceStatus.RUNNING,
    url: str = "",
    adapters: dict[str, str] | None = None,
) -> Service:
    """A vLLM service of ``model`` (the name it is served under too), with
    LoRA ``adapters`` (name -> path)."""
    running = status in (ServiceStatus.RUNNING, ServiceStatus.STARTING)
    return Service(
        id=sid,
        name=f"s-{sid}",
        recipe_name="inference/vllm",
        kind="vllm",
        status=status,
        status_reason="",
        config=ServiceConfig(environment={"VLLM_MODEL": model}, resources={}),
        created_at=datetime(2026, 1, 1, tzinfo=UTC),
        started_at=None,
        ended_at=None,
        owner="gwuser",
        tenant="gwuser",
        slurm_state="RUNNING",
        slurm_reason="",
        node="node1",
        endpoint=url or f"http://node1:{sid}",
        upstream=Upstream(url or f"http://node1:{sid}", "key") if running else None,
        model=model,
        served_model=model,
        adapters=adapters or {},
    )


class Services:
    """What the router asks of ServiceManager: the caller's services of a model."""

    def __init__(self, *services: Service) -> None:
        self.services = list(services)

    async def serving(self, principal: Principal, model: str | None = None) -> list[Service]:
        return [s for s in self.services if model is None or model in s.names]


def router(*services: Service, clock: Clock | None = None) -> ModelRouter:
    return ModelRouter(
        cast(ServiceManager, Services(*services)), clock=clock or Clock(), eject_seconds=5
    )

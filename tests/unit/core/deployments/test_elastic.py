"""Elastic deployments through the reconciler over the in-memory scheduler:
two gateway replicas scale one deployment up and down from the loads its
replicas report and leave one job per decision; a scale-down is on record in
the job itself (its lowered time limit) so both drain it; at zero, a burst
of requests starts exactly one job."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest

from gateway.core.deployments.plan import Timing
from gateway.core.deployments.reconciler import Reconciler
from gateway.core.deployments.spec import DeploymentsFile, parse
from gateway.core.model import Service
from gateway.core.principal import Method, Principal, Role
from gateway.core.recipes import RecipeCatalog
from gateway.core.routing import ModelNotReady, ModelRouter
from gateway.core.status import ServiceStatus
from gateway.slurm import JobInfo, JobState
from gateway.testing.scheduler import FakeScheduler
from tests.support.services import fake_manager

ROOT = Path(__file__).resolve().parents[4]
RECIPES = RecipeCatalog.load([ROOT / "recipes", ROOT / "tests" / "recipes"])
TEAM_A = Principal(tenant="team-a", slurm_user="gwuser", role=Role.USER, method=Method.KEY)


def file(**fields: object) -> str:
    values = {"min_replicas": 1, "max_replicas": 3, "target_load": 4, **fields}
    lines = "\n".join(f"{k} = {v}" for k, v in values.items())
    return (
        f'[deployments.m]\nrecipe_name = "testing/openai-stub"\ntenant = "team-a"\n{lines}\n'
        '[deployments.m.config.environment]\nVLLM_SERVED_MODEL_NAME = "tiny"\n'
    )


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"min_replicas": 3, "max_replicas": 2}, "deployments.m.min_replicas: 3 is over"),
        ({"scale_up_seconds": -1}, "deployments.m.scale_up_seconds: Expected `float` >= 0"),
        ({"target_load": 0}, "deployments.m.target_load: Expected `float` > 0"),
        ({"replicas": 2}, "deployments.m.replicas: give either replicas or min_replicas"),
        ({"idle_seconds": 1}, "deployments.m.idle_seconds: Expected `float` >= 10"),
        (
            {"scale_up_seconds": 60, "scale_down_seconds": 30},
            "deployments.m.scale_down_seconds: 30 is under scale_up_seconds (60)",
        ),
    ],
)
def test_bad_bounds_and_windows_are_refused_naming_the_field(
    fields: dict[str, object], error: str
) -> None:
    declared = parse(file(**fields), "d.toml", RECIPES)
    assert "m" not in declared.deployments
    assert error in declared.errors["m"], declared.errors["m"]


class Loads:
    """What each job's server reports: requests running and waiting."""

    def __init__(self) -> None:
        self.by_job: dict[int, float] = {}
        self.finished = 0.0

    async def __call__(self, service: Service) -> tuple[float, float]:
        return self.by_job.get(int(service.id), 0.0), self.finished


def gateway(
    tmp_path: Path, clock: list[float], loads: Loads, fake: FakeScheduler | None = None
) -> tuple[Reconciler, FakeScheduler]:
    services, made = fake_manager()
    if fake is not None:  # another gateway replica over the same Slurm
        services.slurm = services.view.slurm = services.acting_as.scheduler = fake
    reconciler = Reconciler(
        services=services,
        declared=DeploymentsFile(tmp_path / "deployments.toml", RECIPES, check_every=0),
        principal_for=lambda d: TEAM_A,
        timing=Timing(grace=0, drain=10),
        clock=lambda: clock[0],
        read_load=loads,
    )
    built = services.builder.service

    async def answering(job: JobInfo, *parsed: Any) -> Service:
        service = await built(job, *parsed)
        if job.state is JobState.RUNNING:
            return msgspec.structs.replace(service, status=ServiceStatus.RUNNING)
        return service

    services.builder.service = answering  # type: ignore[method-assign]
    return reconciler, fake or made


def alive(fake: FakeScheduler) -> list[int]:
    return sorted(j.job_id for j in fake.jobs.values() if not j.state.is_terminal)


def start(fake: FakeScheduler, now: float) -> None:
    for job_id in alive(fake):
        job = fake.jobs[job_id]
        if job.state is JobState.PENDING:
            fake.advance(job_id, JobState.RUNNING, start_time=datetime.fromtimestamp(now, UTC))


async def rounds(clock: list[float], fake: FakeScheduler, *gateways: Reconciler, n: int) -> None:
    for _ in range(n):
        for g in gateways:
            await g.services.view.fresh(g.services.view.clock())
            await g.reconcile()
        start(fake, clock[0])
        clock[0] += 2


async def test_two_gateways_scale_up_and_down_with_one_job_per_step(tmp_path: Path) -> None:
    (tmp_path / "deployments.toml").write_text(
        file(scale_up_seconds=10, scale_down_seconds=30, max_replicas=3)
    )
    clock, loads = [1_000_000.0], Loads()
    first, fake = gateway(tmp_path, clock, loads)
    second = gateway(tmp_path, clock, loads, fake)[0]
    await rounds(clock, fake, first, second, n=3)
    (one,) = alive(fake)
    # 10 requests at the one replica, target 4: three wanted, after 10 s.
    loads.by_job[one] = 10
    await rounds(clock, fake, first, second, n=10)
    assert len(alive(fake)) == 3, fake.jobs
    submitted = len(fake.submitted)
    status = await first.get("m", TEAM_A)
    assert status.scaling is not None and status.scaling.decisions[-1].action == "scale.up"
    print(f"\nup: {status.scaling.decisions[-1].reason}; {submitted} submissions for 3 jobs")
    # The load is spread, then falls to 1 in all: one replica is enough.
    for job_id in alive(fake):
        loads.by_job[job_id] = 0.3
    # 30 s under the target, then the two over one leave.
    await rounds(clock, fake, first, second, n=17)
    leaving = sorted(j for j in alive(fake) if fake.jobs[j].time_limit_minutes < 60)
    assert len(leaving) == 2 and one not in leaving
    # On record in Slurm: both gateways take them out of /v1 routing, and
    # lowered limits are the only Slurm calls for it (no twin decisions).
    assert first.services.draining == second.services.draining == set(leaving)
    assert fake.count("shorten") == 2
    await rounds(clock, fake, first, second, n=8)  # the 10 s drain, then stopped
    assert alive(fake) == [one]
    assert len(fake.submitted) == submitted  # the leaving slots were not refilled
    status = await second.get("m", TEAM_A)
    assert status.replicas.wanted == 1 and status.state == "ready"


async def test_at_zero_a_burst_of_requests_starts_exactly_one_job(tmp_path: Path) -> None:
    (tmp_path / "deployments.toml").write_text(
        file(min_replicas=0, max_replicas=2, idle_seconds=20, scale_down_seconds=30)
    )
    clock, loads = [1_000_000.0], Loads()
    first, fake = gateway(tmp_path, clock, loads)
    second = gateway(tmp_path, clock, loads, fake)[0]
    await rounds(clock, fake, first, second, n=2)
    assert alive(fake) == []
    status = await first.get("m", TEAM_A)
    assert status.state == "ready" and status.replicas.wanted == 0
    routers = [ModelRouter(g.services, on_demand=g.elastic) for g in (first, second)]
    assert [list(r.asleep(TEAM_A)) for r in routers] == [["tiny"], ["tiny"]]
    answers = await asyncio.gather(
        *(routers[i % 2].pick(TEAM_A, "tiny") for i in range(200)), return_exceptions=True
    )
    assert all(isinstance(a, ModelNotReady) for a in answers), answers[:3]
    refused = answers[0]
    assert isinstance(refused, ModelNotReady)
    assert int(refused.headers["Retry-After"]) >= 1 and "Prefer: wait=" in refused.detail
    await rounds(clock, fake, first, second, n=3)
    assert len(alive(fake)) == 1
    stood = alive(fake)[0]
    status = await first.get("m", TEAM_A)
    assert [m.submitted_for for m in status.members] == ["demand"]
    print(f"\n200 requests at zero over 2 gateways: {len(fake.submitted)} submissions, job {stood}")
    # Idle for the idle window: back to zero, through a lowered limit.
    await rounds(clock, fake, first, second, n=30)
    assert alive(fake) == []
    assert fake.count("shorten") >= 1


async def test_a_request_for_an_adapter_of_a_deployment_at_zero_starts_it(
    tmp_path: Path,
) -> None:
    (tmp_path / "deployments.toml").write_text(
        file(min_replicas=0, max_replicas=1) + 'VLLM_LORA_MODULES = "sql=/models/sql-lora"\n'
    )
    clock, loads = [1_000_000.0], Loads()
    first, fake = gateway(tmp_path, clock, loads)
    await rounds(clock, fake, first, n=2)
    router = ModelRouter(first.services, on_demand=first.elastic)
    assert sorted(router.asleep(TEAM_A)) == ["sql", "tiny"]
    with pytest.raises(ModelNotReady):
        await router.pick(TEAM_A, "sql")
    await rounds(clock, fake, first, n=3)
    assert len(alive(fake)) == 1
    assert (await first.get("m", TEAM_A)).members[0].submitted_for == "demand"


async def test_a_request_waits_as_long_as_it_asked_then_hears_when_to_come_back(
    tmp_path: Path,
) -> None:
    """``Prefer: wait=N`` holds the request up to N seconds (here nothing answers
    in that time); without it the answer is at once."""
    (tmp_path / "deployments.toml").write_text(file(min_replicas=0, max_replicas=1))
    clock, loads = [1_000_000.0], Loads()
    first, fake = gateway(tmp_path, clock, loads)
    await rounds(clock, fake, first, n=1)
    router = ModelRouter(first.services, on_demand=first.elastic)
    for wait, least, most in ((0.0, 0.0, 0.5), (1.5, 1.4, 3.0)):
        began = time.monotonic()
        with pytest.raises(ModelNotReady) as refused:
            await router.pick(TEAM_A, "tiny", wait=wait)
        took = time.monotonic() - began
        assert least <= took <= most, (wait, took)
        assert "Retry-After" in refused.value.headers
    assert len(fake.submitted) == 0  # no round ran: the wake waits for one
    await rounds(clock, fake, first, n=1)
    assert len(alive(fake)) == 1

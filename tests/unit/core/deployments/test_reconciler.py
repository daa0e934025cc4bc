"""The reconciler over the in-memory scheduler: replicas reconciling at once
leave one job per slot; who may read a deployment; a removed one's jobs stop."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest

from gateway.core.deployments.plan import Timing
from gateway.core.deployments.reconciler import Reconciler
from gateway.core.deployments.spec import Deployment, DeploymentsFile
from gateway.core.errors import InvalidRequest, NotFound
from gateway.core.model import Service
from gateway.core.principal import Limits, Method, Principal, Role
from gateway.core.recipes import RecipeCatalog
from gateway.core.status import ServiceStatus
from gateway.slurm import JobInfo, JobState, SlurmError
from gateway.testing.scheduler import FakeScheduler
from tests.support.services import fake_manager

ROOT = Path(__file__).resolve().parents[4]
RECIPES = RecipeCatalog.load([ROOT / "recipes", ROOT / "tests" / "recipes"])
TEAM_A = Principal(tenant="team-a", slurm_user="gwuser", role=Role.USER, method=Method.KEY)
TEAM_B = Principal(tenant="team-b", slurm_user="gwteam", role=Role.USER, method=Method.KEY)
FILE = """
[deployments.web]
recipe_name = "testing/openai-stub"
replicas = 2
tenant = "team-a"

[deployments.everyone]
recipe_name = "testing/openai-stub"
"""


def principal_for(deployment: Deployment) -> Principal:
    if deployment.spec.tenant is None:
        return Principal(tenant="", slurm_user="gwuser", role=Role.ADMIN, method=Method.NONE)
    if deployment.spec.tenant != "team-a":
        raise InvalidRequest.field("tenant", "not in the auth file")
    return Principal(
        tenant="team-a",
        slurm_user="gwuser",
        role=Role.USER,
        method=Method.KEY,
        limits=Limits(max_services=4),
    )


def replica(tmp_path: Path, fake: FakeScheduler | None = None) -> tuple[Reconciler, FakeScheduler]:
    services, made = fake_manager()
    if fake is not None:  # another gateway replica over the same Slurm
        services.slurm = services.view.slurm = services.acting_as.scheduler = fake
    path = tmp_path / "deployments.toml"
    if not path.exists():
        path.write_text(FILE)
    reconciler = Reconciler(
        services=services,
        declared=DeploymentsFile(path, RECIPES, check_every=0),
        principal_for=principal_for,
        timing=Timing(grace=0),
    )
    return reconciler, fake or made


def alive(fake: FakeScheduler) -> list[int]:
    return sorted(j.job_id for j in fake.jobs.values() if not j.state.is_terminal)


@pytest.mark.parametrize("replicas", [2, 3])
async def test_replicas_reconciling_at_once_leave_one_job_per_slot(
    tmp_path: Path, replicas: int
) -> None:
    first, fake = replica(tmp_path)
    others = [replica(tmp_path, fake)[0] for _ in range(replicas - 1)]
    await asyncio.gather(*(r.reconcile() for r in (first, *others)))
    submitted = len(fake.submitted)
    print(f"\n{replicas} replicas: {submitted} submissions, {len(alive(fake))} jobs left")
    assert len(alive(fake)) == 3  # web's 2 slots and everyone's 1
    assert fake.count("cancel") == submitted - 3  # every twin, before it could start
    # A second round of every replica changes nothing.
    await asyncio.gather(*(r.reconcile() for r in (first, *others)))
    assert len(fake.submitted) == submitted and len(alive(fake)) == 3


async def test_a_tenant_sees_its_own_and_the_shared_deployments(tmp_path: Path) -> None:
    reconciler, _ = replica(tmp_path)
    await reconciler.reconcile()
    await reconciler.reconcile()  # the status shows the jobs the first round made
    assert [d.name for d in await reconciler.all(TEAM_A)] == ["everyone", "web"]
    assert [d.name for d in await reconciler.all(TEAM_B)] == ["everyone"]
    web = await reconciler.get("web", TEAM_A)
    assert web.replicas.wanted == 2 and web.replicas.pending == 2
    assert {m.slot for m in web.members} == {0, 1}
    with pytest.raises(NotFound):
        await reconciler.get("web", TEAM_B)
    with pytest.raises(NotFound):
        await reconciler.get("nope", TEAM_A)


async def test_a_removed_deployment_drains_then_its_jobs_stop(tmp_path: Path) -> None:
    clock = [1_000_000.0]
    reconciler, fake = replica(tmp_path)
    reconciler.clock = lambda: clock[0]
    await reconciler.reconcile()
    await reconciler.reconcile()
    web = [int(m.service_id) for m in (await reconciler.get("web", TEAM_A)).members]
    assert len(web) == 2
    (tmp_path / "deployments.toml").write_text(
        '[deployments.everyone]\nrecipe_name = "testing/openai-stub"\n'
    )
    await reconciler.reconcile()
    status = await reconciler.get("web", TEAM_A)
    assert status.state == "removing"
    assert reconciler.services.draining == set(web)  # /v1 sends them nothing new
    clock[0] += 31
    await reconciler.reconcile()
    left = alive(fake)
    assert len(left) == 1  # everyone's
    assert all(fake.jobs[j].state is JobState.CANCELLED for j in web)


async def test_a_deployment_over_its_tenants_quota_is_left_alone(tmp_path: Path) -> None:
    (tmp_path / "deployments.toml").write_text(FILE.replace("replicas = 2", "replicas = 5"))
    reconciler, fake = replica(tmp_path)
    await reconciler.reconcile()
    status = await reconciler.get("web", TEAM_A)
    assert status.state == "invalid"
    assert status.error is not None
    assert "deployments.web.replicas: 5 and a successor are over tenant team-a's" in status.error
    assert len(alive(fake)) == 1  # everyone's only


async def test_a_replica_still_reading_the_old_file_leaves_a_new_deployment_alone(
    tmp_path: Path,
) -> None:
    """A ConfigMap reaches replicas a minute or so apart: the one that reads a
    new deployment submits it; the one still on the old file waits the grace
    before it would call it removed, by which time it has read it too."""
    clock = [1_000_000.0]
    new, old = tmp_path / "new", tmp_path / "old"
    new.mkdir(), old.mkdir()
    (new / "deployments.toml").write_text(FILE)
    (old / "deployments.toml").write_text(FILE.split("[deployments.everyone]")[0])
    first, fake = replica(new)
    second = replica(old, fake)[0]
    for reconciler in (first, second):
        reconciler.clock = lambda: clock[0]
        reconciler.timing = Timing(grace=120)
    for _ in range(4):
        await first.reconcile()
        await second.services.view.fresh(second.services.view.clock())
        await second.reconcile()
        clock[0] += 31
    assert fake.count("cancel") == 0
    assert len(alive(fake)) == 3


async def test_a_restarted_gateway_does_not_take_a_jobs_age_for_its_start_up(
    tmp_path: Path,
) -> None:
    """A replica found answering after a restart says nothing of how long it
    took to start: the successor is not asked for hours early."""
    (tmp_path / "deployments.toml").write_text(
        FILE.replace("replicas = 2", "replicas = 1\nconfig = { resources = { time_limit = 720 } }")
    )
    first, fake = replica(tmp_path)
    await first.reconcile()
    web = max(alive(fake))
    start = datetime.now(tz=UTC) - timedelta(hours=7)
    fake.advance(web, JobState.RUNNING, time_limit_minutes=720, start_time=start)
    restarted = replica(tmp_path, fake)[0]
    built = restarted.services.builder.service

    async def answering(job: JobInfo, *parsed: Any) -> Service:
        service = await built(job, *parsed)
        return msgspec.structs.replace(service, status=ServiceStatus.RUNNING)

    restarted.services.builder.service = answering  # type: ignore[method-assign]
    submitted = len(fake.submitted)
    for _ in range(2):
        await restarted.reconcile()
    assert "web" not in restarted._startup
    assert len(fake.submitted) == submitted


async def test_a_deployment_that_never_checked_out_is_its_owners_to_see(tmp_path: Path) -> None:
    (tmp_path / "deployments.toml").write_text(
        FILE + "[deployments.web.config.environment]\nNOPE = 'x'\n"
    )
    reconciler, _ = replica(tmp_path)
    await reconciler.reconcile()
    status = await reconciler.get("web", TEAM_A)
    assert status.state == "invalid"
    assert status.error is not None and "config.environment.NOPE" in status.error
    with pytest.raises(NotFound):
        await reconciler.get("web", TEAM_B)


async def test_a_failing_submission_does_not_hold_back_a_due_stop(tmp_path: Path) -> None:
    clock = [1_000_000.0]
    reconciler, fake = replica(tmp_path)
    reconciler.clock = lambda: clock[0]
    await reconciler.reconcile()
    await reconciler.reconcile()
    web = [int(m.service_id) for m in (await reconciler.get("web", TEAM_A)).members]
    (tmp_path / "deployments.toml").write_text(
        FILE.replace("replicas = 2", "replicas = 1").replace(
            "[deployments.everyone]",
            "[deployments.more]\nrecipe_name = 'testing/openai-stub'\n"
            "tenant = 'team-a'\nreplicas = 1\n\n[deployments.everyone]",
        )
    )
    fake.fail("submit", SlurmError("slurmrestd refused"), times=None)
    await reconciler.reconcile()  # "more" fails to submit: its retry waits
    clock[0] += 31
    await reconciler.reconcile()
    assert fake.jobs[max(web)].state is JobState.CANCELLED  # web's second slot left on time


async def test_replicas_and_a_successor_must_fit_the_quota(tmp_path: Path) -> None:
    (tmp_path / "deployments.toml").write_text(FILE.replace("replicas = 2", "replicas = 4"))
    reconciler, _ = replica(tmp_path)
    await reconciler.reconcile()
    status = await reconciler.get("web", TEAM_A)
    assert status.state == "invalid"
    assert status.error is not None and "4 and a successor are over" in status.error

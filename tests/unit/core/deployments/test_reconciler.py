"""The reconciler over the in-memory scheduler: replicas reconciling at once
leave one job per slot; who may read a deployment; a removed one's jobs stop."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gateway.core.deployments.plan import Timing
from gateway.core.deployments.reconciler import Reconciler
from gateway.core.deployments.spec import Deployment, DeploymentsFile
from gateway.core.errors import InvalidRequest, NotFound
from gateway.core.principal import Limits, Method, Principal, Role
from gateway.core.recipes import RecipeCatalog
from gateway.slurm import JobState
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
        services.slurm = services.view.slurm = fake
        services.acting_as.slurm = fake
    path = tmp_path / "deployments.toml"
    if not path.exists():
        path.write_text(FILE)
    reconciler = Reconciler(
        services=services,
        declared=DeploymentsFile(path, RECIPES, check_every=0),
        principal_for=principal_for,
        timing=Timing(),
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
    assert "deployments.web.replicas: 5 is over tenant team-a's max_services (4)" in status.error
    assert len(alive(fake)) == 1  # everyone's only

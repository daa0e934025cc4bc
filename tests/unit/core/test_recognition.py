"""Recognition over a snapshot of jobs, with no scheduler at all."""

from __future__ import annotations

import pytest

from gateway.core import metadata
from gateway.core.principal import Method, Principal, Role
from gateway.core.recipes import RecipeCatalog
from gateway.core.recognition import Recognizer, usable, visible
from gateway.slurm import JobInfo, JobState
from tests.support.services import ADMIN, CODEC, RECIPES, job_info, tenant_blob, vllm_blob


class Snapshot:
    def __init__(self, *jobs: JobInfo) -> None:
        self.jobs = list(jobs)
        self.generation = 0

    def snapshot(self) -> list[JobInfo]:
        return list(self.jobs)


def recognizer(view: Snapshot) -> Recognizer:
    return Recognizer(
        view=view,
        codec=CODEC,
        recipes=RecipeCatalog.load(RECIPES),
        job_dir="/home/{user}",
        gateway_user=lambda: "gwuser",
        known_users=frozenset,
    )


def meta_of(tenant: str = "", shared: bool = False) -> metadata.ServiceMeta:
    return CODEC.new_meta(
        recipe="testing/http",
        created=0.0,
        owner="bob",
        environment={},
        resources={},
        tenant=tenant,
        shared=shared,
    )


def principal(tenant: str, user: str) -> Principal:
    return Principal(tenant=tenant, slurm_user=user, role=Role.USER, method=Method.KEY)


@pytest.mark.parametrize(
    ("who", "tenant", "shared", "sees", "uses"),
    [
        (ADMIN, "team-b", False, True, True),
        (principal("team-b", "bob"), "team-b", False, True, True),
        (principal("team-c", "bob"), "team-b", False, False, False),  # shares bob's user
        (principal("team-a", "alice"), "team-b", True, False, True),  # shared: prompts only
        (principal("bob", "bob"), "", False, True, True),  # no tenant: the user's own
        (principal("team-b", "bob"), "", False, False, False),
    ],
)
def test_who_sees_and_who_uses_a_service(
    who: Principal, tenant: str, shared: bool, sees: bool, uses: bool
) -> None:
    job = job_info(1, "", user_name="bob")
    meta = meta_of(tenant, shared)
    assert (visible(who, job, meta), usable(who, job, meta)) == (sees, uses)


def test_twins_and_the_model_index_follow_the_snapshots_generation() -> None:
    def keyed(job_id: int, state: JobState) -> JobInfo:
        return job_info(job_id, tenant_blob("gwuser", "ops", "k1"), state)

    view = Snapshot(keyed(5, JobState.PENDING), keyed(6, JobState.CANCELLED))
    jobs = recognizer(view)
    assert [job.job_id for job, _ in jobs.services(view.snapshot())] == [5]
    assert jobs.firsts()["k1"].job_id == 5
    assert jobs.models() == {}
    served = job_info(7, vllm_blob("gwuser", "ops", "org/big", alias="m"), JobState.PENDING)
    view.jobs.append(served)
    assert jobs.models() == {}  # the same generation: the same index
    view.generation += 1
    assert [entry[0].job_id for entry in jobs.models()["m"]] == [7]
    # The first job gone, the later one is no twin any more (the key was reused).
    view.jobs = [keyed(6, JobState.CANCELLED)]
    view.generation += 1
    assert [job.job_id for job, _ in jobs.services(view.snapshot())] == [6]

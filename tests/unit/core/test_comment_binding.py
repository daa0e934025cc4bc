"""A service's comment is bound to its job id: copied onto any other job (the
same Slurm user's included) it makes nothing of that job. Old-format comments
are still read, only on the job they were written for."""

from __future__ import annotations

import asyncio
from typing import Any

from gateway.core import metadata
from gateway.core.errors import NotFound
from gateway.core.principal import Limits, Method, Principal, Role
from gateway.slurm import JobInfo, SlurmError, SlurmUnavailable
from tests.support.services import ADMIN, CODEC, CREATED, fake_manager, job_info

ALICE = Principal(tenant="team-a", slurm_user="gwuser", role=Role.USER, method=Method.KEY)
OTHER = Principal(tenant="team-b", slurm_user="gwuser", role=Role.USER, method=Method.KEY)


def team_a(max_services: int) -> Principal:
    """Alice's tenant, allowed ``max_services`` services."""
    return Principal(
        tenant="team-a",
        slurm_user="gwuser",
        role=Role.USER,
        method=Method.KEY,
        limits=Limits(max_services=max_services),
    )


def meta(**fields: Any) -> metadata.ServiceMeta:
    return CODEC.new_meta(
        recipe="testing/openai-stub",
        created=CREATED,
        owner="gwuser",
        environment={"VLLM_MODEL": "m"},
        resources={},
        **fields,
    )


def listed(job_id: int, comment: str, submitted: float = CREATED) -> JobInfo:
    return job_info(job_id, comment, submitted=submitted)


async def test_a_bound_comment_copied_onto_another_job_is_nothing() -> None:
    """The review's attack: the same Slurm user puts a running shared
    service's comment, with its own endpoint, on its own job."""
    victim = CODEC.encode(meta(tenant="ops", shared=True), 10)
    keyed = CODEC.encode(meta(tenant="team-a", idempotency="k1"), 11)
    services, _ = fake_manager(
        listed(10, f"{victim}|phase=running|endpoint=node1:8000"),
        listed(11, keyed),
        # the copies: a later job, and (for the key) an earlier one
        listed(12, f"{victim}|phase=running|endpoint=node1:9999"),
        listed(9, keyed),
    )
    assert sorted(s.id for s in await services.list(ADMIN)) == ["10", "11"]
    assert [s.id for s in await services.serving(OTHER, "m")] == ["10"]
    # The key's first job is the genuine one, not the older copy.
    assert services.recognizer.firsts()["k1"].job_id == 11
    # A copy does not count against the tenant's quota.
    services.creator.check_quota(team_a(max_services=2), 0, await services.view.jobs())
    refused = await asyncio.gather(
        services.get("12", ADMIN), services.get("424242", ADMIN), return_exceptions=True
    )
    assert all(isinstance(e, NotFound) for e in refused)
    await services.prober.aclose()


async def test_an_old_comment_is_believed_on_its_own_job_only() -> None:
    old = CODEC.legacy_encode(meta(tenant="team-a"))
    purged = CODEC.legacy_encode(meta(tenant="team-a"))
    early = CODEC.legacy_encode(meta(tenant="team-a"))
    twice = CODEC.legacy_encode(meta(tenant="team-a"))
    services, _ = fake_manager(
        listed(20, f"{old}|phase=running|endpoint=node1:8000", submitted=CREATED + 1),
        # copied onto a later job, minutes later
        listed(21, f"{old}|phase=running|endpoint=node1:9999", submitted=CREATED + 300),
        # its original is gone from Slurm; the copy was made an hour later
        listed(22, f"{purged}|phase=running|endpoint=node1:9998", submitted=CREATED + 3600),
        # a held job submitted before the create, filled in later: an earlier id
        listed(23, f"{early}|phase=running|endpoint=node1:9997", submitted=CREATED - 60),
        listed(24, f"{early}|phase=running|endpoint=node1:8001", submitted=CREATED),
        # two jobs in the window: neither (nobody gains the traffic)
        listed(25, f"{twice}|phase=running|endpoint=node1:8002", submitted=CREATED),
        listed(26, f"{twice}|phase=running|endpoint=node1:9996", submitted=CREATED + 2),
    )
    assert [s.id for s in await services.list(ALICE)] == ["24", "20"]
    assert [s.id for s in await services.serving(ALICE, "m")] == ["20", "24"]
    await services.prober.aclose()


async def test_while_listings_fail_another_tenants_id_answers_as_an_unknown_one() -> None:
    """No existence oracle: both get Slurm's error, neither a 404."""
    theirs = CODEC.encode(meta(tenant="team-b"), 30)
    services, fake = fake_manager(listed(30, theirs))
    await services.view.jobs()
    fake.fail("list_jobs", SlurmUnavailable("slurmrestd answered 503", status_code=503), times=None)
    answers = await asyncio.gather(
        services.get("30", ALICE), services.get("31", ALICE), return_exceptions=True
    )
    assert [type(a) for a in answers] == [type(answers[1])] * 2
    assert isinstance(answers[1], SlurmError)
    await services.prober.aclose()


async def test_copies_do_not_use_up_a_tenants_quota() -> None:
    mine = CODEC.encode(meta(tenant="team-a"), 40)
    services, _ = fake_manager(*(listed(40 + i, mine) for i in range(1, 6)))
    # Five copies, no genuine service: the tenant may still create its one.
    services.creator.check_quota(team_a(max_services=1), 0, await services.view.jobs())
    await services.prober.aclose()

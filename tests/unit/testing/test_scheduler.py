"""The in-memory scheduler the core's tests run against."""

from __future__ import annotations

import pytest

from gateway.slurm import (
    Credentials,
    JobState,
    JobSubmission,
    MintedTokens,
    NodeInfo,
    SlurmJobNotFound,
    SlurmNodeNotFound,
    SlurmUnavailable,
)
from gateway.testing.scheduler import FakeScheduler


def submission(comment: str = "c") -> JobSubmission:
    return JobSubmission(
        script="#!/bin/bash\n",
        name="gw-x",
        working_directory="/home/u",
        standard_output="/home/u/gw-x-%j.out",
        comment=comment,
    )


async def test_a_submit_takes_the_next_id_and_lists_pending_as_its_user() -> None:
    fake = FakeScheduler("gwuser", first_id=7)
    alice = fake.as_user(Credentials(user_name="alice", token="t"))
    first = await alice.submit(submission())
    second = await fake.submit(submission())
    assert (first.job_id, second.job_id) == (7, 8)
    listed = {j.job_id: j for j in (await fake.list_jobs()).jobs}
    assert listed[7].state is JobState.PENDING
    assert (listed[7].user_name, listed[8].user_name) == ("alice", "gwuser")
    assert listed[7].standard_output == "/home/u/gw-x-7.out"
    assert [(c.op, c.user) for c in fake.calls] == [
        ("submit", "alice"),
        ("submit", "gwuser"),
        ("list_jobs", "gwuser"),
    ]


async def test_minted_tokens_act_as_their_user() -> None:
    fake = FakeScheduler()
    bob = fake.with_tokens(MintedTokens(b"k" * 32, "bob"))
    assert await bob.user_name() == "bob"
    assert await fake.user_name() == "gwuser"


async def test_jobs_advance_comments_change_and_cancels_end_them() -> None:
    fake = FakeScheduler()
    job_id = (await fake.submit(submission())).job_id
    running = fake.advance(job_id, JobState.RUNNING, batch_host="n1")
    assert running.start_time is not None and running.batch_host == "n1"
    await fake.update_comment(job_id, "bound")
    assert fake.jobs[job_id].comment == "bound"
    assert fake.comment_updates() == {job_id: "bound"}
    await fake.cancel(job_id)
    assert fake.jobs[job_id].state is JobState.CANCELLED
    assert fake.jobs[job_id].end_time is not None
    await fake.cancel(job_id)  # an ended job: no error, as Slurm
    fake.cancel_purges = True
    fake.purge(job_id)
    with pytest.raises(SlurmJobNotFound):
        await fake.cancel(job_id)


async def test_failures_are_injected_per_operation() -> None:
    fake = FakeScheduler()
    fake.fail("list_jobs", SlurmUnavailable("down"), times=2)
    for _ in range(2):
        with pytest.raises(SlurmUnavailable):
            await fake.list_jobs()
    assert (await fake.list_jobs()).jobs == ()
    fake.fail("submit", SlurmUnavailable("down"), times=None)
    for _ in range(3):
        with pytest.raises(SlurmUnavailable):
            await fake.submit(submission())
    fake.heal("submit")
    assert (await fake.submit(submission())).job_id == 1
    assert fake.count("list_jobs") == 3


async def test_nodes_are_what_was_added() -> None:
    fake = FakeScheduler()
    node = NodeInfo(name="n1", hostname="n1.c", address="10.0.0.1", state=("DOWN",))
    fake.add_node(node)
    assert await fake.get_node("n1") == node
    assert await fake.list_nodes() == [node]
    with pytest.raises(SlurmNodeNotFound):
        await fake.get_node("n2")

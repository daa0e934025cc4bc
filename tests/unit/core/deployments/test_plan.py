"""What a deployment does next, from its jobs: replicas kept, walltime
successors, handovers, backoff, rolling updates, removal, the submission cap."""

from __future__ import annotations

from pathlib import Path

from gateway.core.deployments.plan import Plan, Replica, Timing, lead_time, plan
from gateway.core.deployments.spec import Deployment, check
from gateway.core.metadata import Placement
from gateway.core.recipes import RecipeCatalog
from gateway.core.status import ServiceStatus

ROOT = Path(__file__).resolve().parents[4]
RECIPES = RecipeCatalog.load([ROOT / "tests" / "recipes"])
NOW = 1_000_000.0
TIMING = Timing(drain=30, margin=15, backoff=10, backoff_max=600, per_minute=6)
RUNNING, PENDING, FAILED = ServiceStatus.RUNNING, ServiceStatus.PENDING, ServiceStatus.FAILED


def deployment(replicas: int = 2, model: str = "m") -> Deployment:
    table = {
        "recipe_name": "testing/openai-stub",
        "replicas": replicas,
        "config": {"environment": {"VLLM_MODEL": model}, "resources": {"time_limit": 10}},
    }
    return check("web", table, RECIPES, "deployments.toml:1")


def job(
    job_id: int,
    slot: int,
    status: ServiceStatus = RUNNING,
    *,
    gen: str | None = None,
    attempt: int = 0,
    ends: float | None = NOW + 500,
    ended: float | None = None,
    submitted: float = NOW - 600,
) -> Replica:
    generation = gen if gen is not None else deployment().generation
    return Replica(
        job_id=job_id,
        placement=Placement(deployment="web", generation=generation, slot=slot, attempt=attempt),
        status=status,
        reason=f"{status.value} reason",
        submitted=submitted,
        ends=ends if not status.is_terminal and status is not PENDING else None,
        ended=ended if status.is_terminal else None,
    )


def decide(
    jobs: list[Replica],
    *,
    d: Deployment | None = None,
    now: float = NOW,
    marks: dict[int, float] | None = None,
    removed: bool = False,
    read_for: float = 3600.0,
) -> Plan:
    target = None if removed else (d or deployment())
    kept = marks if marks is not None else {}
    return plan(target, jobs, now, TIMING, marks=kept, lead=60, read_for=read_for)


def test_an_empty_deployment_gets_one_job_per_slot_with_keys_of_its_own() -> None:
    d = deployment(3)
    done = decide([], d=d)
    assert [(s.slot, s.after, s.why) for s in done.submits] == [
        (0, 0, "new"),
        (1, 0, "new"),
        (2, 0, "new"),
    ]
    assert len({s.key(d) for s in done.submits}) == 3


def test_the_same_jobs_give_the_same_keys_on_every_replica() -> None:
    jobs = [job(10, 0, FAILED, ended=NOW - 100), job(11, 1)]
    first, second = decide(jobs), decide(list(reversed(jobs)))
    assert [s.key(deployment()) for s in first.submits] == [
        s.key(deployment()) for s in second.submits
    ]
    assert first.submits[0].after == 10  # the failed job's id: a new key after every job


def test_a_deployment_at_its_count_does_nothing_and_says_what_is_next() -> None:
    done = decide([job(10, 0), job(11, 1)])
    assert not done.submits and not done.stops and not done.draining
    assert done.next is not None and done.next.action == "walltime"
    assert done.next.at == NOW + 500 - 60


def test_a_successor_is_submitted_lead_seconds_before_the_limit() -> None:
    done = decide([job(10, 0, ends=NOW + 59), job(11, 1)])
    assert [(s.slot, s.after, s.why) for s in done.submits] == [(0, 10, "walltime")]


def test_the_old_replica_serves_until_its_successor_answers() -> None:
    jobs = [job(10, 0, ends=NOW + 40), job(11, 1), job(12, 0, PENDING)]
    done = decide(jobs)
    assert not done.submits and not done.stops and not done.draining
    assert any("successor 12 is pending" in p.reason for p in done.waiting)


def test_once_the_successor_answers_the_old_one_drains_then_stops() -> None:
    jobs = [job(10, 0, ends=NOW + 100), job(11, 1), job(12, 0)]
    marks: dict[int, float] = {}
    first = decide(jobs, marks=marks)
    assert first.draining == {10} and not first.stops
    later = decide(jobs, now=NOW + 30, marks=marks)
    assert [s.job_id for s in later.stops] == [10]


def test_a_handover_late_in_the_job_stops_it_before_slurm_would() -> None:
    jobs = [job(10, 0, ends=NOW + 10), job(11, 1), job(12, 0)]
    done = decide(jobs)  # drain would end at NOW+30, after the limit less the 15 s margin
    assert [s.job_id for s in done.stops] == [10]


def test_a_failed_replica_is_replaced_after_a_backoff_that_doubles() -> None:
    once = [job(10, 0, FAILED, attempt=0, ended=NOW - 5), job(11, 1)]
    waiting = decide(once)
    assert not waiting.submits and waiting.degraded and "replica 10" in waiting.degraded
    assert waiting.next is not None and waiting.next.at == NOW + 5
    assert [s.attempt for s in decide(once, now=NOW + 5).submits] == [1]
    third = [job(12, 0, FAILED, attempt=2, ended=NOW - 30), job(11, 1)]
    assert not decide(third).submits  # 10 * 2**2 = 40 s
    assert decide(third, now=NOW + 10).submits


def test_a_stopped_or_timed_out_replica_is_replaced_at_once() -> None:
    for status in (ServiceStatus.CANCELLED, ServiceStatus.TIMEOUT):
        done = decide([job(10, 0, status, ended=NOW - 1), job(11, 1)])
        assert [(s.slot, s.after, s.attempt, s.why) for s in done.submits] == [
            (0, 10, 0, "replace")
        ]
        assert done.degraded is None


def test_submissions_are_capped_per_minute() -> None:
    d = deployment(10)
    recent = [job(i, i, FAILED, ended=NOW - 700, submitted=NOW - 10) for i in range(6)]
    done = decide(recent, d=d, now=NOW)
    assert not done.submits
    assert any("at most 6 submissions a minute" in p.reason for p in done.waiting)


def test_twins_count_once_against_the_cap() -> None:
    twins = [
        job(i, 0, ServiceStatus.CANCELLED, ended=NOW - 1, submitted=NOW - 10) for i in (10, 11, 12)
    ]
    assert decide(twins, d=deployment(1)).submits


def test_a_rolling_update_replaces_one_slot_at_a_time() -> None:
    old = "oldgen0000"
    jobs = [job(10, 0, gen=old), job(11, 1, gen=old)]
    new = deployment(2, model="m2")
    done = decide(jobs, d=new)
    assert [(s.slot, s.after, s.why) for s in done.submits] == [(0, 10, "roll")]
    # Slot 0's new job is starting: slot 1 waits its turn.
    starting = [*jobs, job(12, 0, ServiceStatus.STARTING, gen=new.generation)]
    assert not decide(starting, d=new).submits
    # It answers: the old one drains; slot 1 still waits for slot 0 to settle.
    answered = [*jobs, job(12, 0, gen=new.generation)]
    step = decide(answered, d=new)
    assert step.draining == {10} and not step.submits


def test_a_new_generation_that_fails_keeps_the_old_replicas_serving() -> None:
    old = "oldgen0000"
    new = deployment(2, model="m2")
    jobs = [
        job(10, 0, gen=old),
        job(11, 1, gen=old),
        job(12, 0, FAILED, gen=new.generation, ended=NOW - 1),
    ]
    done = decide(jobs, d=new)
    assert not done.submits and not done.stops and not done.draining
    assert done.degraded is not None and "replica 12" in done.degraded


def test_scaling_down_drains_the_slots_over_the_count() -> None:
    done = decide([job(10, 0), job(11, 1), job(12, 2)], d=deployment(2))
    assert done.draining == {12}


def test_a_removed_deployment_drains_and_stops_every_replica() -> None:
    marks: dict[int, float] = {}
    jobs = [job(10, 0), job(11, 1)]
    assert decide(jobs, removed=True, marks=marks).draining == {10, 11}
    assert {s.job_id for s in decide(jobs, removed=True, now=NOW + 31, marks=marks).stops} == {
        10,
        11,
    }


def test_lead_time_follows_the_observed_start_up_and_the_limit() -> None:
    assert lead_time(Timing(lead=90), 5.0, 7200) == 90
    assert lead_time(Timing(margin=15), 30.0, 7200) == 75
    assert lead_time(Timing(margin=15), 5.0, 7200) == 60  # a minute at least
    assert lead_time(Timing(margin=15), None, 7200) == 135  # unobserved: 60 s assumed
    assert lead_time(Timing(margin=15), 600.0, 600) == 300  # at most half the job's life


def test_a_change_of_the_file_waits_for_every_replica_to_read_it() -> None:
    """A replica that has just read a removal, a lower count or a new generation
    waits: another may still read the previous file, and they must not undo
    each other's work (a ConfigMap reaches pods a minute or so apart)."""
    jobs = [job(10, 0), job(11, 1), job(12, 2)]
    assert not decide(jobs, removed=True, read_for=5).draining
    assert not decide(jobs, d=deployment(2), read_for=5).draining
    assert decide(jobs, d=deployment(2), read_for=TIMING.grace).draining == {12}
    rolled = deployment(3, model="m2")
    assert not decide(jobs, d=rolled, read_for=5).submits
    assert [s.why for s in decide(jobs, d=rolled, read_for=TIMING.grace).submits] == ["roll"]
    # What only adds (a new deployment, more replicas) is done at once.
    assert decide(jobs, d=deployment(4), read_for=0).submits


def test_a_slot_waiting_its_turn_to_roll_still_gets_its_walltime_successor() -> None:
    new = deployment(2, model="m2")
    jobs = [
        job(10, 0, gen="oldgen0000", ends=NOW + 500),
        job(12, 0, ServiceStatus.STARTING, gen=new.generation),
        job(11, 1, gen="oldgen0000", ends=NOW + 30),
    ]
    done = decide(jobs, d=new)
    assert [(s.slot, s.why) for s in done.submits] == [(1, "walltime")]


def test_a_job_no_longer_unneeded_drains_anew_next_time() -> None:
    marks: dict[int, float] = {}
    handing = [job(10, 0, ends=NOW + 400), job(11, 1), job(12, 0)]
    assert decide(handing, marks=marks).draining == {10}
    # The successor failed: 10 serves on, and forgets it was draining.
    failed = [job(10, 0, ends=NOW + 400), job(11, 1), job(12, 0, FAILED, ended=NOW + 5)]
    assert not decide(failed, now=NOW + 10, marks=marks).draining
    assert 10 not in marks
    # A later successor answers: 10 gets its whole drain, not none.
    later = [job(10, 0, ends=NOW + 400), job(11, 1), job(13, 0)]
    done = decide(later, now=NOW + 100, marks=marks)
    assert done.draining == {10} and not done.stops


def test_the_cap_says_when_the_oldest_recent_submission_leaves_the_minute() -> None:
    d = deployment(10)
    old = [job(i, i, ServiceStatus.TIMEOUT, ended=NOW - 1, submitted=NOW - 3600) for i in (0, 1)]
    recent = [job(i, i, FAILED, ended=NOW - 700, submitted=NOW - 20 + i) for i in range(2, 8)]
    done = decide(old + recent, d=d)
    capped = [p for p in done.waiting if "submissions a minute" in p.reason]
    assert capped and capped[0].at == NOW - 20 + 2 + 60


def test_a_lead_longer_than_the_job_is_cut_to_leave_it_a_life() -> None:
    assert lead_time(Timing(lead=900, margin=15), 30.0, 600) == 540
    assert lead_time(Timing(lead=900, margin=15), 30.0, 120) == 60

"""The count an elastic deployment wants, from the load its replicas report
(gateway/core/deployments/autoscale.py): windows, bounds, idle, restarts."""

from __future__ import annotations

from pathlib import Path

from gateway.core.deployments.autoscale import Autoscaler, Decision, Reading
from gateway.core.deployments.spec import Deployment, parse
from gateway.core.recipes import RecipeCatalog

ROOT = Path(__file__).resolve().parents[4]
RECIPES = RecipeCatalog.load([ROOT / "recipes", ROOT / "tests" / "recipes"])


def deployment(**fields: object) -> Deployment:
    values = {"min_replicas": 1, "max_replicas": 3, "target_load": 4, **fields}
    lines = "\n".join(f"{k} = {v}" for k, v in values.items())
    text = f'[deployments.m]\nrecipe_name = "testing/openai-stub"\n{lines}\n'
    declared = parse(text, "d.toml", RECIPES)
    assert not declared.errors, declared.errors
    return declared.deployments["m"]


def loads(*values: float, finished: float = 0.0) -> list[Reading]:
    return [Reading(i + 1, v, finished) for i, v in enumerate(values)]


def run(
    scaler: Autoscaler,
    d: Deployment,
    current: int,
    readings: list[Reading],
    start: float,
    seconds: float,
    every: float = 2.0,
) -> list[tuple[float, Decision]]:
    out = []
    t = start
    while t <= start + seconds:
        out.append((t, scaler.decide(d, current, readings, 0, t)))
        t += every
    return out


def first_change(decisions: list[tuple[float, Decision]]) -> tuple[float, Decision] | None:
    return next(((t, d) for t, d in decisions if d.count is not None), None)


def test_load_over_the_target_adds_replicas_after_the_scale_up_window() -> None:
    d = deployment(scale_up_seconds=30, scale_down_seconds=300)
    scaler = Autoscaler()
    # One replica carrying 10 requests against a target of 4: three wanted.
    decided = run(scaler, d, 1, loads(10), 0.0, 60)
    at, decision = first_change(decided) or (None, None)
    assert at == 30.0 and decision is not None and decision.count == 3
    assert "over the target 4 for 30 s" in decision.reason


def test_the_count_never_passes_max_replicas() -> None:
    d = deployment(max_replicas=2, scale_up_seconds=0)
    decision = Autoscaler().decide(d, 1, loads(100), 0, 0.0)
    assert decision.count == 2


def test_a_short_burst_changes_nothing() -> None:
    d = deployment(scale_up_seconds=30)
    scaler = Autoscaler()
    run(scaler, d, 1, loads(1), 0.0, 40)
    burst = run(scaler, d, 1, loads(12), 42.0, 20)
    calm = run(scaler, d, 1, loads(1), 64.0, 40)
    assert first_change(burst + calm) is None


def test_starting_replicas_count_as_capacity() -> None:
    """Three slots held (two still starting): the running one's load of 10
    wants three, which are there; nothing more is asked."""
    d = deployment(scale_up_seconds=0)
    assert Autoscaler().decide(d, 3, loads(10), 0, 0.0).count is None


def test_replicas_that_did_not_answer_are_taken_to_carry_the_mean() -> None:
    d = deployment(scale_up_seconds=0, max_replicas=5)
    # Two read at 8 each, two unread: 32 in all over a target of 4.
    assert Autoscaler().decide(d, 4, loads(8, 8), 2, 0.0).count == 5


def test_load_under_the_target_removes_replicas_after_the_longer_window() -> None:
    d = deployment(scale_up_seconds=30, scale_down_seconds=120)
    scaler = Autoscaler()
    decided = run(scaler, d, 3, loads(1, 1, 1), 0.0, 200)
    at, decision = first_change(decided) or (None, None)
    assert at == 120.0 and decision is not None and decision.count == 1
    assert "under the target" in decision.reason


def test_never_under_min_replicas_and_not_to_zero_while_requests_come() -> None:
    d = deployment(min_replicas=0, scale_down_seconds=60, idle_seconds=600)
    scaler = Autoscaler()
    # No load at any sampled moment, but the finished counter moves: active.
    decided = [(t, scaler.decide(d, 2, loads(0, 0, finished=t), 0, t)) for t in range(0, 500, 2)]
    counts = {decision.count for _, decision in decided if decision.count is not None}
    assert counts == {1}


def test_idle_for_the_idle_window_goes_to_zero() -> None:
    d = deployment(min_replicas=0, scale_down_seconds=60, idle_seconds=300)
    scaler = Autoscaler()
    decided = run(scaler, d, 1, loads(0, finished=7), 0.0, 400)
    at, decision = first_change(decided) or (None, None)
    assert at == 300.0 and decision is not None and decision.count == 0
    assert "no request for 300 s" in decision.reason


def test_a_restarted_replica_decides_nothing_before_its_windows_fill() -> None:
    """What one keeps is its own samples: one that just started (or restarted)
    holds the count as the jobs show it until it has seen a whole window."""
    d = deployment(min_replicas=0, scale_up_seconds=30, scale_down_seconds=120, idle_seconds=300)
    scaler = Autoscaler()
    decided = run(scaler, d, 2, loads(0, 0), 10_000.0, 100)
    assert first_change(decided) is None


def test_fixed_deployments_are_not_scaled() -> None:
    lines = '[deployments.m]\nrecipe_name = "testing/openai-stub"\nreplicas = 2\n'
    d = parse(lines, "d.toml", RECIPES).deployments["m"]
    assert Autoscaler().decide(d, 2, loads(100, 100), 0, 0.0).count is None

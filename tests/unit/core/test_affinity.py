"""Prefix affinity (gateway/core/affinity.py): which service a request's
prefix key goes to, and when load overrides it."""

from __future__ import annotations

import json
from collections import Counter

from gateway.core.affinity import PREFIX_BYTES, PrefixAffinity, least_outstanding, prefix_key

IDS = ["101", "102", "103"]
KEYS = [prefix_key(b"[%d]" % n + b"x" * PREFIX_BYTES) for n in range(1000)]


def winners(chooser: PrefixAffinity, ids: list[str], loads: list[int] | None = None) -> list[str]:
    loads = loads or [0] * len(ids)
    return [ids[chooser.choose(key, ids, loads, turn=0)] for key in KEYS]


def test_one_key_goes_to_one_service_whatever_the_order_or_the_replica() -> None:
    key = prefix_key(b"y" * 2000)
    turns = {IDS[PrefixAffinity().choose(key, IDS, [0, 0, 0], turn=t)] for t in range(10)}
    reversed_ids = IDS[::-1]
    listed_otherwise = reversed_ids[PrefixAffinity().choose(key, reversed_ids, [0, 0, 0], turn=0)]
    assert turns == {listed_otherwise}


def test_a_thousand_keys_spread_over_three_services() -> None:
    counts = Counter(winners(PrefixAffinity(), IDS))
    assert set(counts) == set(IDS)
    # 333 each expected; 3 standard deviations (~15) are far inside these bounds.
    assert all(280 <= n <= 390 for n in counts.values()), counts


def test_a_service_leaving_moves_only_its_own_keys_and_one_joining_takes_a_share() -> None:
    before = winners(PrefixAffinity(), IDS)
    after = winners(PrefixAffinity(), ["101", "103"])
    moved = [(b, a) for b, a in zip(before, after, strict=True) if b != a]
    assert moved and all(b == "102" for b, _ in moved)
    assert len(moved) == before.count("102")
    joined = winners(PrefixAffinity(), [*IDS, "104"])
    taken = [(b, a) for b, a in zip(before, joined, strict=True) if b != a]
    assert all(a == "104" for _, a in taken)
    assert 200 <= len(taken) <= 300  # a quarter


def test_an_overloaded_first_choice_passes_to_the_next_ranked() -> None:
    chooser = PrefixAffinity(slack=4)
    key = KEYS[0]
    first, second, third = chooser.ranked(key, IDS)
    loads = [0, 0, 0]
    loads[first] = 4  # within slack of the least (0): still the key's own
    assert chooser.choose(key, IDS, loads, turn=0) == first
    loads[first] = 5
    assert chooser.choose(key, IDS, loads, turn=0) == second
    loads[second] = 5  # both too busy: the third, the least loaded
    assert chooser.choose(key, IDS, loads, turn=0) == third
    # Under load the bound is twice the least, whatever the slack.
    assert chooser.choose(key, IDS, _at(first, 20, rest=10), turn=0) == first
    assert chooser.choose(key, IDS, _at(first, 21, rest=10), turn=0) == second
    assert PrefixAffinity(slack=50).choose(key, IDS, _at(first, 40, rest=0), turn=0) == first


def _at(index: int, load: int, rest: int) -> list[int]:
    return [load if i == index else rest for i in range(len(IDS))]


def test_no_key_is_the_least_outstanding_ties_taking_turns() -> None:
    chooser = PrefixAffinity()
    assert chooser.choose(None, IDS, [3, 1, 2], turn=0) == 1
    assert [chooser.choose(None, IDS, [0, 0, 0], turn=t) for t in range(4)] == [0, 1, 2, 0]
    assert [chooser.choose(None, IDS, [1, 0, 0], turn=t) for t in range(4)] == [1, 1, 2, 1]
    assert least_outstanding([2, 2, 5], 1) == 1


def test_the_key_is_the_shared_start_of_a_session_and_short_prompts_have_none() -> None:
    system = {"role": "system", "content": "You are a careful assistant. " * 40}
    turns = [system, {"role": "user", "content": "Hi"}]
    first = json.dumps(turns).encode()
    later = json.dumps([*turns, {"role": "assistant", "content": "Hello"}]).encode()
    other = json.dumps([{"role": "system", "content": "Be brief. " * 120}]).encode()
    assert prefix_key(first) is not None
    assert prefix_key(first) == prefix_key(later)
    assert prefix_key(other) != prefix_key(first)
    assert prefix_key(json.dumps([{"role": "user", "content": "Hi"}]).encode()) is None
    assert prefix_key(b"x" * PREFIX_BYTES) is None

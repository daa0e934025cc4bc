"""The load signal in vLLM's Prometheus ``/metrics`` page.

Only a handful of series are read: requests running and waiting (the load),
requests finished, and the prefix cache's queries and hits. Each is summed
over its label sets (several models, or data-parallel engines, on one
server). The page is a job's, so it is read as hostile: a strict line parser
over just those names (one regular expression: 40 µs for a real 46 KB page,
where prometheus_client's parser, which makes objects of every histogram
bucket, takes 7 ms), NaN and negative values taken as 0, huge values capped,
a series repeated counted once.
"""

from __future__ import annotations

import math
import re

import msgspec

# A real page is 20-100 KB (it grows with engines, models and LoRA adapters:
# each has a few hundred histogram buckets); ten times that is room enough,
# and whatever listens on an endpoint is a job's, so the gateway never holds more.
METRICS_ANSWER = 1024 * 1024
# The most one series may say: finite, so that sums stay numbers.
_CAP = 1e15

RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
_SUCCEEDED = "vllm:request_success"
_QUERIES = "vllm:prefix_cache_queries"
_HITS = "vllm:prefix_cache_hits"

# A line's start, name, {labels} (quoted values may hold braces and escapes),
# value; an optional timestamp after it is ignored. Counters come with or
# without _total. Led by a literal newline, not ^ with MULTILINE, so that the
# engine skips to candidates with a fast substring search (7 times faster).
_SAMPLE = re.compile(
    r"\n(vllm:(?:num_requests_running|num_requests_waiting"
    r"|(?:request_success|prefix_cache_queries|prefix_cache_hits)(?:_total)?))"
    # Possessive: a huge hostile line is scanned once, keeping no backtrack state.
    r"(\{(?:[^\"}\n]++|\"(?:[^\"\\\n]++|\\.)*+\")*+\})?"
    r"[ \t]+([^ \t\n]+)"
)


class Load(msgspec.Struct, frozen=True):
    """What one vLLM server says it is doing, summed over its engines and models."""

    running: float
    waiting: float
    succeeded: float
    prefix_queries: float | None = None
    prefix_hits: float | None = None

    @property
    def load(self) -> float:
        return self.running + self.waiting


def parse(text: str) -> Load:
    """The load in a Prometheus text page; ValueError when it lacks the
    running or waiting gauge, or a value of those series is not a number."""
    # A series seen twice (name and labels alike) counts once: the last wins.
    series: dict[tuple[str, str], float] = {}
    for match in _SAMPLE.finditer("\n" + text):
        name, labels, value = match.groups()
        series[name.removesuffix("_total"), labels or ""] = _number(name, value)
    sums: dict[str, float] = {}
    for (name, _), value in series.items():
        sums[name] = sums.get(name, 0.0) + value
    missing = [name for name in (RUNNING, WAITING) if name not in sums]
    if missing:
        raise ValueError(f"the metrics page has no {' or '.join(missing)}")
    return Load(
        running=sums[RUNNING],
        waiting=sums[WAITING],
        succeeded=sums.get(_SUCCEEDED, 0.0),
        prefix_queries=sums.get(_QUERIES),
        prefix_hits=sums.get(_HITS),
    )


def _number(name: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{name} has a value that is not a number") from None
    if math.isnan(value) or value < 0:
        return 0.0
    return min(value, _CAP)

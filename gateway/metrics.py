"""The gateway's own Prometheus metrics (served by gateway/api/metrics.py).

Only the metric objects live here, so that any layer can count without
importing the HTTP layer. Labels are few and bounded: operations, outcomes,
recipes, statuses; never a service id or anything from a request body.
"""

from __future__ import annotations

import functools
from typing import TypeVar

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

PREFIX = "gateway"

M = TypeVar("M", bound=MetricWrapperBase)


@functools.cache
def series(metric: M, *labels: str) -> M:
    """The child of ``metric`` for ``labels``, looked up once: ``labels()``
    takes a lock and builds a key on every call, on the prompt path too.
    Labels are bounded (see above), so the cache is."""
    return metric.labels(*labels)


REQUESTS = Histogram(
    f"{PREFIX}_http_request_duration_seconds",
    "HTTP requests by method, route template and status, to the last byte sent",
    ["method", "path", "status"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10, 60),
)
# Routing refused these before any route (and so HttpMetrics) saw them: a
# scanner's probes, a client built for another version. No path label: the
# path is whatever the caller sent.
UNROUTED = Counter(
    f"{PREFIX}_http_unrouted_requests_total",
    "Requests no route took: unknown path (404) or method (405); method 'other' if not standard",
    ["method", "status"],
)
IN_FLIGHT = Gauge(
    f"{PREFIX}_http_requests_in_flight",
    "HTTP requests being answered (streams included)",
    multiprocess_mode="livesum",
)
SLURM_CALLS = Histogram(
    f"{PREFIX}_slurm_request_duration_seconds",
    "slurmrestd calls, by operation and outcome (ok, or the error's type)",
    ["operation", "outcome"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
PROMPTS = Counter(
    f"{PREFIX}_prompts_total",
    "Requests relayed to services (prompts, and the other model routes: tokenize, rerank, "
    "a stored response...), by streaming or not and outcome (ok, upstream_error, "
    "timeout, unreachable, client_gone)",
    ["stream", "outcome"],
)
PROMPT_FIRST_BYTE = Histogram(
    f"{PREFIX}_prompt_first_byte_seconds",
    "From the gateway asking vLLM to its first chunk (streams) or whole answer",
    ["stream"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
PROMPT_TOKENS = Counter(
    f"{PREFIX}_prompt_tokens_total",
    "Tokens passed through, as vLLM reported them (streams: only when vLLM sends usage)",
    ["kind"],
)
DEPLOYMENT_REPLICAS = Gauge(
    f"{PREFIX}_deployment_replicas",
    "Replicas of each declared deployment: wanted, running, starting, pending",
    ["deployment", "state"],
    multiprocess_mode="livemax",
)
DEPLOYMENT_LOAD = Gauge(
    f"{PREFIX}_deployment_load_per_replica",
    "Requests running and waiting per running replica of an elastic deployment, "
    "as its model servers report them",
    ["deployment"],
    multiprocess_mode="livemax",
)
DEPLOYMENT_ACTIONS = Counter(
    f"{PREFIX}_deployment_actions_total",
    "What the reconciler did, by deployment and kind (submit, leave, stop, scale, error)",
    ["deployment", "action"],
)

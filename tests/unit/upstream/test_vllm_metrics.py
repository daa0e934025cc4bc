"""The load read from vLLM's /metrics page (gateway/upstream/vllm_metrics.py),
and the client's request for it against a real socket (tests/support/http_stub.py)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from gateway.upstream.answers import UpstreamError
from gateway.upstream.vllm import VllmClient
from gateway.upstream.vllm_metrics import METRICS_ANSWER, Load, parse
from tests.support.http_stub import Seen, http_stub, response

# A real single-engine page of a vLLM 0.10-era server: process and HTTP
# metrics, every vLLM histogram, counters with their _created gauges (46 KB).
PAGE = (Path(__file__).parents[2] / "fixtures" / "vllm_metrics.txt").read_text()

# Two data-parallel engines of one model, and a second model.
SAMPLE = """\
# HELP python_gc_objects_collected_total Objects collected during gc
# TYPE python_gc_objects_collected_total counter
python_gc_objects_collected_total{generation="0"} 18911.0
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 2.0
vllm:num_requests_running{engine="1",model_name="m"} 3.0
vllm:num_requests_running{engine="0",model_name="other"} 1.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 4.0
vllm:num_requests_waiting{engine="1",model_name="m"} 0.0
vllm:num_requests_waiting{engine="0",model_name="other"} 0.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.41
# HELP vllm:prefix_cache_queries_total Prefix cache queries, in terms of number of queried tokens.
# TYPE vllm:prefix_cache_queries_total counter
vllm:prefix_cache_queries_total{engine="0",model_name="m"} 1000.0
vllm:prefix_cache_queries_total{engine="1",model_name="m"} 600.0
# HELP vllm:prefix_cache_queries_created Prefix cache queries, in terms of number of queried tokens.
# TYPE vllm:prefix_cache_queries_created gauge
vllm:prefix_cache_queries_created{engine="0",model_name="m"} 1.7600431195377462e+09
# HELP vllm:prefix_cache_hits_total Prefix cache hits, in terms of number of cached tokens.
# TYPE vllm:prefix_cache_hits_total counter
vllm:prefix_cache_hits_total{engine="0",model_name="m"} 250.0
vllm:prefix_cache_hits_total{engine="1",model_name="m"} 150.0
# HELP vllm:request_success_total Count of successfully processed requests.
# TYPE vllm:request_success_total counter
vllm:request_success_total{engine="0",finished_reason="stop",model_name="m"} 10.0
vllm:request_success_total{engine="0",finished_reason="length",model_name="m"} 5.0
vllm:request_success_total{engine="1",finished_reason="stop",model_name="m"} 7.0
# HELP vllm:request_success_created Count of successfully processed requests.
# TYPE vllm:request_success_created gauge
vllm:request_success_created{engine="0",finished_reason="stop",model_name="m"} 1.76e+09
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.001",model_name="m"} 0.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.005",model_name="m"} 3.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="m"} 22.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="m"} 22.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="m"} 1.2345
"""

GAUGES = """\
vllm:num_requests_running{engine="0",model_name="m"} 1.0
vllm:num_requests_waiting{engine="0",model_name="m"} 1.0
"""


def test_a_page_is_summed_over_engines_and_models() -> None:
    load = parse(SAMPLE)
    assert load == Load(
        running=6.0, waiting=4.0, succeeded=22.0, prefix_queries=1600.0, prefix_hits=400.0
    )
    assert load.load == 10.0


def test_a_real_page() -> None:
    load = parse(PAGE)
    assert (load.running, load.waiting, load.load) == (7.0, 3.0, 10.0)
    assert load.succeeded == 1510 + 201 + 12
    assert (load.prefix_queries, load.prefix_hits) == (1.893632e06, 1.208e06)


def test_a_server_without_a_prefix_cache_count_says_none() -> None:
    # vLLM before 0.8 had only a hit-rate gauge, and no success yet.
    old = GAUGES + 'vllm:gpu_prefix_cache_hit_rate{model_name="m"} 0.5\n'
    assert parse(old) == Load(running=1.0, waiting=1.0, succeeded=0.0)


def test_counters_are_read_without_total_too_and_counted_once() -> None:
    page = GAUGES + (
        'vllm:prefix_cache_queries{model_name="m"} 64\n'
        'vllm:prefix_cache_hits{model_name="m"} 32\n'
        'vllm:request_success{finished_reason="stop",model_name="m"} 3\n'
        # The same series again under its _total name: not counted twice.
        'vllm:request_success_total{finished_reason="stop",model_name="m"} 3\n'
    )
    load = parse(page)
    assert (load.prefix_queries, load.prefix_hits, load.succeeded) == (64.0, 32.0, 3.0)


@pytest.mark.parametrize(
    ("page", "missing"),
    [
        ("", "vllm:num_requests_running or vllm:num_requests_waiting"),
        (PAGE.replace("vllm:num_requests_waiting{", "vllm:other{"), "vllm:num_requests_waiting"),
        (
            "# TYPE vllm:num_requests_running gauge\nvllm:num_requests_waiting 0\n",
            "vllm:num_requests_running",
        ),
        # Longer names that begin like the gauges are other metrics.
        (
            "vllm:num_requests_running_total 1\nvllm:num_requests_waiting_by_reason 1\n",
            "vllm:num_requests_running or vllm:num_requests_waiting",
        ),
        # Only a line's start begins a sample.
        (" vllm:num_requests_running 1\nx vllm:num_requests_waiting 1\n", "running or"),
    ],
)
def test_a_page_without_the_gauges_is_refused_naming_them(page: str, missing: str) -> None:
    with pytest.raises(ValueError, match=missing):
        parse(page)


def test_hostile_values_are_clamped() -> None:
    page = (
        'vllm:num_requests_running{engine="0"} NaN\n'
        'vllm:num_requests_running{engine="1"} -5\n'
        'vllm:num_requests_running{engine="2"} 2 1760043119537\n'  # a timestamp
        'vllm:num_requests_waiting{engine="0"} +Inf\n'
        'vllm:num_requests_waiting{engine="1"} -Inf\n'
        'vllm:request_success_total{engine="0"} 1e308\n'
        'vllm:request_success_total{engine="1"} 1e308\n'
    )
    load = parse(page)
    assert load.running == 2.0
    # Capped, so sums and comparisons stay numbers.
    assert 0 < load.waiting < float("inf") and load.load < float("inf")
    assert load.succeeded < float("inf")


def test_a_series_repeated_counts_once() -> None:
    page = GAUGES * 1000
    assert parse(page).load == 2.0


def test_labels_that_look_like_values_do_not_fool_it() -> None:
    page = (
        'vllm:num_requests_running{model_name="a} 99\\" 98",engine="0"} 1\n'
        'vllm:num_requests_waiting{model_name="b\\nvllm:num_requests_waiting 50"} 2\n'
        "# HELP vllm:num_requests_running 1000\n"
        "#vllm:num_requests_waiting 1000\n"
    )
    assert (parse(page).running, parse(page).waiting) == (1.0, 2.0)


def test_a_value_that_is_not_a_number_is_refused() -> None:
    with pytest.raises(ValueError, match=r"vllm:num_requests_waiting .*not a number"):
        parse(GAUGES + 'vllm:num_requests_waiting{engine="1"} many\n')


@pytest.mark.parametrize(
    "line",
    [
        'vllm:num_requests_running{a="' + "x" * 1_000_000 + '"} 1',
        'vllm:num_requests_running{a="' + 'x\\"' * 400_000,  # never closed
        "vllm:num_requests_running{" + "{" * 1_000_000,
        "vllm:num_requests_running" * 40_000,
    ],
    ids=["long-label", "open-quote", "braces", "names"],
)
def test_a_huge_line_is_read_in_one_pass(line: str) -> None:
    started = time.perf_counter()
    load = parse(line + "\n" + GAUGES)
    # One pass over a megabyte takes milliseconds; backtracking would take minutes.
    assert time.perf_counter() - started < 2.0
    assert load.waiting == 1.0


# -- VllmClient.load, over a socket -----------------------------------------


async def test_the_client_reads_the_load_with_the_key() -> None:
    async def answer(seen: Seen, writer: asyncio.StreamWriter) -> None:
        writer.write(response(200, SAMPLE.encode(), "text/plain; version=0.0.4"))

    async with http_stub(answer) as stub:
        vllm = VllmClient()
        try:
            load = await vllm.load(stub.url, "sekrit")
        finally:
            await vllm.aclose()
    assert (load.running, load.waiting, load.prefix_hits) == (6.0, 4.0, 400.0)
    assert stub.paths() == ["/metrics"]
    assert stub.seen[0].headers["authorization"] == "Bearer sekrit"


async def test_the_client_refuses_errors_huge_pages_and_pages_without_the_gauges() -> None:
    answers = iter(
        [
            response(401, {"error": "Unauthorized"}),
            response(200, b"#" * (METRICS_ANSWER + 1), "text/plain"),
            response(200, b"python_info 1.0\n", "text/plain"),
            response(302, b""),
        ]
    )

    async def answer(seen: Seen, writer: asyncio.StreamWriter) -> None:
        writer.write(next(answers))

    async with http_stub(answer) as stub:
        vllm = VllmClient()
        try:
            with pytest.raises(UpstreamError, match="Unauthorized") as refused:
                await vllm.load(stub.url, "wrong")
            assert refused.value.status == 401
            with pytest.raises(UpstreamError, match=f"more than {METRICS_ANSWER} bytes"):
                await vllm.load(stub.url, "k")
            with pytest.raises(UpstreamError, match="no vllm:num_requests_running") as unusable:
                await vllm.load(stub.url, "k")
            assert unusable.value.status == 502
            with pytest.raises(UpstreamError, match="HTTP 302"):
                await vllm.load(stub.url, "k")
        finally:
            await vllm.aclose()

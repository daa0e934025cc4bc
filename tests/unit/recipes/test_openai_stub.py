"""The OpenAI stub (tests/recipes/testing/openai-stub) without Slurm: its
program, cut from the job script's heredoc, run on a free port, read through
the gateway's own client (VllmClient.load); and the rendered job script once,
for the service key it hands the stub."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.core import jobscript, metadata
from gateway.core.errors import InvalidRequest
from gateway.core.recipes import RecipeCatalog
from gateway.upstream.answers import UpstreamError
from gateway.upstream.vllm import VllmClient
from gateway.upstream.vllm_metrics import Load
from tests.support import sandbox
from tests.support.polling import free_port, poll

ROOT = Path(__file__).resolve().parents[3]
RECIPE = ROOT / "tests" / "recipes" / "testing" / "openai-stub"
KEY = "stub-key-0123456789abcdef"
MODEL = "stub-model"


def program() -> str:
    """The stub's Python, as the job script feeds it to the interpreter."""
    text = (RECIPE / "job.sh.j2").read_text()
    start = text.index("<<'PY'\n") + len("<<'PY'\n")
    return text[start : text.index("\nPY\n", start) + 1]


@dataclass
class Stub:
    url: str
    key: str | None
    vllm: VllmClient

    async def load(self) -> Load:
        return await self.vllm.load(self.url, self.key)

    async def until(self, done: Callable[[Load], bool], what: str) -> Load:
        return await poll(self.load, done, timeout=20, interval=0.05, what=what)


Start = Callable[..., Awaitable[Stub]]


async def answers(url: str) -> bool:
    async with httpx.AsyncClient(timeout=2) as client:
        try:
            return (await client.get(url + "/health")).status_code == 200
        except httpx.TransportError:
            return False


def launch(folder: Path, port: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with (folder / "log").open("ab") as log:
        return subprocess.Popen(
            [sys.executable, str(folder / "stub.py"), str(port)],
            env=env,
            stdout=log,
            stderr=log,
            start_new_session=True,  # with its "engine", ended as one group
        )


@pytest.fixture
async def stub(tmp_path: Path) -> AsyncIterator[Start]:
    (tmp_path / "stub.py").write_text(program())
    started: list[subprocess.Popen[bytes]] = []
    vllm = VllmClient()

    async def start(key: str | None = KEY, **settings: str) -> Stub:
        port = free_port()
        env = {
            "PATH": os.environ["PATH"],
            "VLLM_MODEL": MODEL,
            "STUB_TOKENS": "4",
            "STUB_CHUNK_DELAY_MS": "0",
            **settings,
        }
        if key:
            env["VLLM_API_KEY"] = key
        started.append(launch(tmp_path, port, env))
        url = f"http://127.0.0.1:{port}"
        await poll(lambda: answers(url), bool, timeout=20, interval=0.05, what="the stub")
        return Stub(url, key, vllm)

    yield start
    await vllm.aclose()
    for process in started:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def chat(content: str | list[str], max_tokens: int = 4) -> dict[str, Any]:
    parts = [content] if isinstance(content, str) else content
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": part} for part in parts],
        "max_tokens": max_tokens,
    }


async def stream(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> tuple[float, bytes]:
    """Seconds to the answer's head, and the whole stream."""
    started = time.monotonic()
    request = {**body, "stream": True}
    async with client.stream("POST", url + "/v1/chat/completions", json=request) as answer:
        head = time.monotonic() - started
        assert answer.status_code == 200
        return head, b"".join([piece async for piece in answer.aiter_raw()])


async def complete(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> float:
    """Seconds to the whole (not streamed) answer."""
    started = time.monotonic()
    answer = await client.post(url + "/v1/chat/completions", json=body)
    assert answer.status_code == 200, answer.text
    return time.monotonic() - started


async def test_metrics_need_the_service_key(stub: Start) -> None:
    running = await stub()
    async with httpx.AsyncClient(base_url=running.url) as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}):
            assert (await client.get("/metrics", headers=headers)).status_code == 401
        page = await client.get("/metrics", headers={"Authorization": f"bearer {KEY}"})
        # /health stays open (the job's own probe asks it), and so does /v1:
        # bench/proxy.py asks the stub straight, without the service's key.
        assert (await client.get("/health")).status_code == 200
        assert (await client.get("/v1/models")).status_code == 200
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/plain; version=0.0.4")
    with pytest.raises(UpstreamError) as refused:
        await running.vllm.load(running.url, "wrong")
    assert refused.value.status == 401
    assert await running.load() == Load(
        running=0, waiting=0, succeeded=0, prefix_queries=0, prefix_hits=0
    )
    # vLLM's names and types, labelled with the served model.
    families = {f.name: f for f in text_string_to_metric_families(page.text)}
    assert {name: families[name].type for name in sorted(families)} == {
        "vllm:num_requests_running": "gauge",
        "vllm:num_requests_waiting": "gauge",
        "vllm:prefix_cache_hits": "counter",
        "vllm:prefix_cache_queries": "counter",
        "vllm:request_success": "counter",
    }
    success = families["vllm:request_success"].samples[0]
    assert success.labels == {"engine": "0", "finished_reason": "length", "model_name": MODEL}


async def test_a_stub_without_a_key_shows_its_metrics_to_anyone(stub: Start) -> None:
    running = await stub(key=None)
    assert (await running.load()).load == 0


async def test_streams_in_flight_run_and_those_past_the_limit_wait(stub: Start) -> None:
    # Each stream lasts 15 x 100 ms; three at a time.
    running = await stub(STUB_CHUNK_DELAY_MS="100", STUB_MAX_RUNNING="3")
    async with httpx.AsyncClient(timeout=30) as client:
        streams = [
            asyncio.create_task(stream(client, running.url, chat("hi", 15))) for _ in range(5)
        ]
        await running.until(lambda x: (x.running, x.waiting) == (3, 2), "3 running, 2 waiting")
        ends = await asyncio.gather(*streams)
    assert all(whole.endswith(b"data: [DONE]\n\n") for _, whole in ends)
    # The last two began once a stream had ended, not before.
    heads = sorted(head for head, _ in ends)
    assert heads[3] > 0.75, heads
    load = await running.until(lambda x: x.succeeded == 5, "5 succeeded")
    assert load.load == 0


async def test_a_request_that_stops_waiting_leaves_the_queue(stub: Start) -> None:
    running = await stub(STUB_CHUNK_DELAY_MS="100", STUB_MAX_RUNNING="1")
    async with httpx.AsyncClient(timeout=30) as first, httpx.AsyncClient(timeout=30) as second:
        answering = asyncio.create_task(stream(first, running.url, chat("hi", 15)))
        await running.until(lambda x: x.running == 1, "1 running")
        queued = asyncio.create_task(stream(second, running.url, chat("hi", 15)))
        await running.until(lambda x: x.waiting == 1, "1 waiting")
        queued.cancel()
        await asyncio.gather(queued, return_exceptions=True)
        await second.aclose()  # its connection closes: the stub sees it leave
        await running.until(lambda x: (x.running, x.waiting) == (1, 0), "none waiting")
        await answering
        # The slot came back: the next request is answered at once.
        await complete(first, running.url, chat("again"))
    load = await running.until(lambda x: x.succeeded == 2, "2 succeeded")
    assert load.load == 0


async def test_a_delayed_answer_runs_without_holding_up_the_others(stub: Start) -> None:
    running = await stub(STUB_ANSWER_DELAY_MS="1500")
    async with httpx.AsyncClient(timeout=30) as client:
        answers = [asyncio.create_task(complete(client, running.url, chat("hi"))) for _ in range(3)]
        # /metrics answers meanwhile, on a connection of its own.
        await running.until(lambda x: x.running == 3, "3 running")
        took = await asyncio.gather(*answers)
    assert min(took) >= 1.4, took
    load = await running.until(lambda x: x.succeeded == 3, "3 succeeded")
    assert load.load == 0


async def test_a_repeated_prompt_hits_the_prefix_cache_and_answers_sooner(stub: Start) -> None:
    # 30 ms a block not cached; room for 32 blocks.
    running = await stub(STUB_PREFIX_CACHE_BLOCKS="32", STUB_PREFILL_MS_PER_BLOCK="30")
    prompt = "".join(f"{i:063d}\n" for i in range(16))  # 16 blocks of 64 bytes
    async with httpx.AsyncClient(timeout=30) as client:
        cold, _ = await stream(client, running.url, chat(prompt))
        load = await running.load()
        assert (load.prefix_queries, load.prefix_hits) == (16, 0)
        assert cold >= 16 * 0.03
        # The same text, cut into two messages: the same prompt.
        warm, _ = await stream(client, running.url, chat([prompt[:100], prompt[100:]]))
        load = await running.load()
        assert (load.prefix_queries, load.prefix_hits) == (32, 16)
        assert warm < cold / 2, (warm, cold)
        # Half of it in common, then other text: half hits, half computed.
        half = await complete(client, running.url, chat(prompt[:512] + "x" * 520))
        load = await running.load()
        assert (load.prefix_queries, load.prefix_hits) == (48, 24)
        assert half >= 8 * 0.03
        # 32 blocks of something else push the prompt out of the cache.
        await complete(client, running.url, chat("y" * 32 * 64))
        await complete(client, running.url, chat(prompt))
        load = await running.load()
        assert (load.prefix_queries, load.prefix_hits) == (48 + 32 + 16, 24)
    assert load.succeeded == 5


def test_the_recipe_declares_the_stub_settings() -> None:
    recipe = RecipeCatalog.load([ROOT / "tests" / "recipes"]).get("testing/openai-stub")
    names = ("STUB_ANSWER_DELAY_MS", "STUB_MAX_RUNNING")
    names += ("STUB_PREFIX_CACHE_BLOCKS", "STUB_PREFILL_MS_PER_BLOCK")
    assert {name: recipe.environment({})[name] for name in names} == dict.fromkeys(names, "0")
    assert recipe.environment({"STUB_MAX_RUNNING": "4"})["STUB_MAX_RUNNING"] == "4"
    for name in names:
        with pytest.raises(InvalidRequest):
            recipe.environment({name: "-1"})


# -- the rendered job script, for the key -------------------------------------

CODEC = metadata.MetaCodec(b"k" * 32)
JOB_ID = 11
SCONTROL = """#!/bin/bash
if [ "$1" = show ]; then  # the preamble waits for the gateway's binding
  printf 'JobId=%s JobName=x Comment=%s StdOut=/x\\n' "$SLURM_JOB_ID" "$(cat "$OUT/bound")"
  exit 0
fi
for arg in "$@"; do
  case "$arg" in comment=*) printf '%s\\n' "${arg#comment=}" >> "$OUT/comments" ;; esac
done
"""


@pytest.fixture
def box() -> Iterator[Path]:
    with sandbox.folder() as path:
        yield path


def endpoint(box: Path) -> str | None:
    comments = box / "comments"
    for line in comments.read_text().splitlines() if comments.exists() else ():
        decoded = CODEC.decode(line, JOB_ID)
        if decoded is not None and decoded[1].endpoint is not None:
            return f"http://127.0.0.1:{decoded[1].endpoint.port}"
    return None


async def test_the_job_hands_the_stub_the_service_key(box: Path) -> None:
    recipe = RecipeCatalog.load([ROOT / "tests" / "recipes"]).get("testing/openai-stub")
    # The system's Python: the job runs as nobody under root (tests/support/sandbox.py).
    env = recipe.environment({"STUB_PYTHON": "/usr/bin/python3"})
    meta = CODEC.new_meta(recipe=recipe.name, created=1.0, owner="u", environment=env, resources={})
    unbound = CODEC.unbound(meta)
    (box / "bound").write_text(CODEC.bind(unbound, JOB_ID))
    context = recipe.template_values(recipe.default_resources.as_config())
    (box / "job.sh").write_text(jobscript.build(recipe, unbound, context))
    (box / "scontrol").write_text(SCONTROL)
    (box / "scontrol").chmod(0o755)
    variables = {"PATH": f"{box}:/usr/bin:/bin", "OUT": str(box), "SLURM_JOB_ID": str(JOB_ID)}
    with (box / "log").open("wb") as log:
        job = sandbox.popen(
            ["bash", str(box / "job.sh")],
            env={**variables, **env, "GW_SERVICE_KEY": KEY},
            stdout=log,
            stderr=log,
        )
    vllm = VllmClient()
    try:

        async def published() -> str | None:
            assert job.poll() is None, (box / "log").read_text()
            return endpoint(box)

        url = await poll(published, bool, timeout=30, interval=0.1, what="an endpoint")
        assert url is not None
        assert (await vllm.load(url, KEY)).load == 0
        with pytest.raises(UpstreamError) as refused:
            await vllm.load(url)
        assert refused.value.status == 401
    finally:
        await vllm.aclose()
        # The job's own exit trap ends the stub's session (gw_stop_server).
        job.terminate()
        job.wait(timeout=30)
    assert not await answers(url)  # ended with the job
    assert KEY not in (box / "comments").read_text()

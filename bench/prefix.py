"""/v1 chat sessions through the gateway with prefix affinity on against off,
side by side in one run.

Runs ``--stubs`` instances of the OpenAI-shaped stub (the Python program of
tests/recipes/testing/openai-stub/job.sh.j2) as plain local processes, no
Slurm: each with the stub's simulated prefix cache (an LRU of
``--cache-blocks`` 64-byte prompt blocks) and prefill (``--prefill-ms`` before
the first byte for each block not cached). In front of them, the gateway as a
process (tests/support/relay_server.py: uvicorn as in production, the stubs
given as running services of one model), with GATEWAY_ROUTING_PREFIX_AFFINITY
on or off.

The workload, the same for both: ``--sessions`` chat sessions, each with a
system prompt of its own (``--system-bytes``) and ``--turns`` requests, each
turn repeating the earlier ones plus an answer and a new question; streamed,
``--concurrency`` requests in flight, sessions interleaved (a session's next
turn is sent once its last one has ended). Each round starts fresh stubs (a
cold cache) and a fresh gateway per mode, the modes' order alternating.

Prints per mode: the prefix cache hit rate (hits / queries in blocks, summed
over the stubs' /metrics), mean, p50 and p90 time to first streamed byte, and
the ratios on / off.

    python bench/prefix.py [--rounds 2] [--sessions 48] [--turns 8] [--stubs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.core import shell  # noqa: E402
from tests.support.polling import free_port  # noqa: E402

STUB_TEMPLATE = ROOT / "tests" / "recipes" / "testing" / "openai-stub" / "job.sh.j2"
MODEL = "stub"
KEY = "key"  # the services' key as tests/support/services.py gives them
TEAM_A = {"Authorization": "Bearer sgw_local-team-a-key"}  # deploy/local/tenants.toml
WORDS = (
    "the", "cluster", "job", "model", "token", "cache", "prefix", "block", "request", "answer",
    "service", "gateway", "replica", "queue", "batch", "prompt", "session", "system", "user",
    "assistant", "stream", "latency", "memory", "node", "partition",
)  # fmt: skip
MODES = ("on", "off")


# -- the stubs and the gateway, local processes ----------------------------------------


def stub_program() -> str:
    """The stub's Python: the template rendered as the gateway renders job
    scripts (it has no variables: its shell reads the environment), then its
    ``<<'PY'`` heredoc."""
    template = shell.environment().from_string(STUB_TEMPLATE.read_text(encoding="utf-8"))
    text = template.render()
    found = re.search(r"<<'PY'\n(.*?)\nPY\n", text, re.S)
    if found is None:
        raise SystemExit(f"no <<'PY' heredoc in {STUB_TEMPLATE}")
    program = found.group(1)
    if "STUB_PREFIX_CACHE_BLOCKS" not in program or "prefix_cache_hits_total" not in program:
        raise SystemExit(f"the stub in {STUB_TEMPLATE} has no simulated prefix cache yet")
    return program


def wait_http(url: str, process: subprocess.Popen[bytes], log: Path, within: float = 30) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + within
    while True:
        if process.poll() is not None:
            raise SystemExit(f"{url} exited: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:  # noqa: S310 (loopback)
                if answer.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"{url} did not answer in {within:.0f} s: {log.read_text()[-2000:]}")
        time.sleep(0.1)


def stop(process: subprocess.Popen[bytes]) -> None:
    """The process and what it started (the stub's stand-in engine process):
    each runs in a session of its own."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(10)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)


@contextmanager
def stubs(args: argparse.Namespace, program: Path, work: Path) -> Iterator[list[str]]:
    processes: list[subprocess.Popen[bytes]] = []
    urls: list[str] = []
    try:
        for n in range(args.stubs):
            port = free_port()
            log = work / f"stub-{n}.log"
            env = {
                "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                "VLLM_MODEL": MODEL,
                "VLLM_API_KEY": KEY,
                "STUB_TOKENS": str(args.tokens),
                "STUB_CHUNK_DELAY_MS": "0",
                "STUB_PREFIX_CACHE_BLOCKS": str(args.cache_blocks),
                "STUB_PREFILL_MS_PER_BLOCK": str(args.prefill_ms),
            }
            with log.open("wb") as out:
                processes.append(
                    subprocess.Popen(
                        [sys.executable, str(program), str(port)],
                        env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                    )
                )  # fmt: skip
            urls.append(f"http://127.0.0.1:{port}")
            wait_http(urls[-1] + "/health", processes[-1], log)
        yield urls
    finally:
        for process in processes:
            stop(process)


@contextmanager
def gateway(affinity: bool, urls: list[str], work: Path) -> Iterator[str]:
    """The gateway as a process, the stubs its running services of MODEL."""
    key = work / "jwt.key"
    key.write_bytes(b"k" * 32)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(
        {
            "GATEWAY_SLURM_URL": f"http://127.0.0.1:{free_port()}",  # never asked
            "GATEWAY_SLURM_USER": "gwuser",
            "GATEWAY_SLURM_JWT_KEY_FILE": str(key),
            "GATEWAY_RECIPES_DIRS": f"{ROOT / 'recipes'}:{ROOT / 'tests' / 'recipes'}",
            "GATEWAY_AUTH_FILE": str(ROOT / "deploy" / "local" / "tenants.toml"),
            "GATEWAY_ACCESS_LOG": "false",
            "GATEWAY_ROUTING_PREFIX_AFFINITY": "true" if affinity else "false",
            "RELAY_SERVICES": json.dumps([[str(n + 1), MODEL, u] for n, u in enumerate(urls)]),
        }
    )
    log = work / f"gateway-{'on' if affinity else 'off'}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.support.relay_server", str(port)],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/api/v1/health", process, log)
        yield url
    finally:
        stop(process)


# -- the workload ----------------------------------------------------------------------


def text(rng: random.Random, size: int) -> str:
    words: list[str] = []
    length = 0
    while length < size:
        words.append(rng.choice(WORDS))
        length += len(words[-1]) + 1
    return " ".join(words)


def sessions(args: argparse.Namespace) -> list[list[dict[str, Any]]]:
    """Each session's requests in order: turn t repeats turns 0..t-1."""
    out = []
    for s in range(args.sessions):
        rng = random.Random(s)  # noqa: S311 (a workload, the same each run)
        messages = [{"role": "system", "content": f"Session {s}. " + text(rng, args.system_bytes)}]
        requests = []
        for _ in range(args.turns):
            messages.append({"role": "user", "content": text(rng, 300)})
            requests.append(
                {"model": MODEL, "messages": list(messages), "max_tokens": args.tokens,
                 "stream": True}
            )  # fmt: skip
            messages.append({"role": "assistant", "content": text(rng, 200)})
        out.append(requests)
    return out


@dataclass
class Run:
    firsts: list[float] = field(default_factory=list)  # seconds to the first byte
    failures: list[str] = field(default_factory=list)
    hits: float = 0.0
    queries: float = 0.0
    by_service: dict[str, int] = field(default_factory=dict)


async def one(session: aiohttp.ClientSession, url: str, body: dict[str, Any], run: Run) -> None:
    started = time.perf_counter()
    async with session.post(url, json=body, headers=TEAM_A) as answer:
        if answer.status != 200:
            raise RuntimeError(f"HTTP {answer.status}: {(await answer.text())[:200]}")
        seen = await answer.content.readany()
        run.firsts.append(time.perf_counter() - started)
        async for piece in answer.content.iter_any():
            seen = (seen + piece)[-64:]
        if b"[DONE]" not in seen:
            raise RuntimeError("the stream ended without [DONE]")
        sid = answer.headers.get("x-gateway-service-id", "?")
        run.by_service[sid] = run.by_service.get(sid, 0) + 1


async def workload(gateway_url: str, work: list[list[dict[str, Any]]], concurrency: int) -> Run:
    run = Run()
    ready = deque((requests, 0) for requests in work)
    url = gateway_url + "/v1/chat/completions"
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def worker() -> None:
            while ready:
                requests, turn = ready.popleft()
                try:
                    await one(session, url, requests[turn], run)
                except (aiohttp.ClientError, RuntimeError) as exc:
                    run.failures.append(repr(exc)[:300])
                if turn + 1 < len(requests):
                    ready.append((requests, turn + 1))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return run


async def cache_counts(urls: list[str]) -> tuple[float, float]:
    """Prefix cache hits and queries (blocks), summed over the stubs."""
    hits = queries = 0.0
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as session:
        for url in urls:
            async with session.get(url + "/metrics") as answer:
                body = await answer.text()
                if answer.status != 200:
                    raise SystemExit(f"{url}/metrics: HTTP {answer.status}: {body[:200]}")
            hits += _sample(body, "vllm:prefix_cache_hits_total")
            queries += _sample(body, "vllm:prefix_cache_queries_total")
    return hits, queries


def _sample(exposition: str, name: str) -> float:
    pattern = re.compile(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? (\S+)$", re.M)
    return sum(float(value) for value in pattern.findall(exposition))


# -- the run ---------------------------------------------------------------------------


def mode_run(args: argparse.Namespace, program: Path, work: Path, affinity: bool) -> Run:
    requests = sessions(args)
    with stubs(args, program, work) as urls, gateway(affinity, urls, work) as url:
        run = asyncio.run(workload(url, requests, args.concurrency))
        run.hits, run.queries = asyncio.run(cache_counts(urls))
    return run


@dataclass
class Summary:
    hit_rate: float
    mean: float
    p50: float
    p90: float
    count: int
    failures: int


def summarize(runs: list[Run]) -> Summary:
    ms = sorted(1000 * f for r in runs for f in r.firsts)
    hits = sum(r.hits for r in runs)
    queries = sum(r.queries for r in runs)
    return Summary(
        hit_rate=hits / queries if queries else 0.0,
        mean=statistics.fmean(ms),
        p50=statistics.median(ms),
        p90=ms[int(0.9 * (len(ms) - 1))],
        count=len(ms),
        failures=sum(len(r.failures) for r in runs),
    )


def report(args: argparse.Namespace, runs: dict[str, list[Run]]) -> None:
    on, off = summarize(runs["on"]), summarize(runs["off"])
    requests = args.sessions * args.turns
    print(
        f"\n{args.stubs} stubs (cache {args.cache_blocks} blocks of 64 bytes, "
        f"{args.prefill_ms} ms prefill per uncached block); {args.sessions} sessions x "
        f"{args.turns} turns = {requests} streamed requests, {args.concurrency} at once, "
        f"{args.rounds} rounds per mode\n"
    )
    print("| affinity | prefix cache hit rate | TTFT mean | p50 | p90 | requests | failed |")
    print("|---|---|---|---|---|---|---|")
    for name, s in (("on", on), ("off", off)):
        print(
            f"| {name} | {100 * s.hit_rate:.1f} % | {s.mean:.1f} ms | {s.p50:.1f} ms | "
            f"{s.p90:.1f} ms | {s.count} | {s.failures} |"
        )
    print(
        f"| on / off | {_ratio(on.hit_rate, off.hit_rate)}x | {_ratio(on.mean, off.mean)}x | "
        f"{_ratio(on.p50, off.p50)}x | {_ratio(on.p90, off.p90)}x | | |"
    )
    for name in MODES:
        spread = [dict(sorted(r.by_service.items())) for r in runs[name]]
        print(f"requests per service, affinity {name}: {spread}")


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "-"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--stubs", type=int, default=3)
    parser.add_argument("--sessions", type=int, default=48)
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--system-bytes", type=int, default=2048)
    parser.add_argument("--concurrency", type=int, default=12)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--cache-blocks", type=int, default=2048)
    parser.add_argument("--prefill-ms", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-prefix-") as folder:
        work = Path(folder)
        program = work / "stub.py"
        program.write_text(stub_program(), encoding="utf-8")
        runs: dict[str, list[Run]] = {name: [] for name in MODES}
        for n in range(args.rounds):
            order = MODES if n % 2 == 0 else MODES[::-1]
            for name in order:
                run = mode_run(args, program, work, affinity=name == "on")
                runs[name].append(run)
                print(
                    f"round {n + 1}, affinity {name}: {len(run.firsts)} requests, "
                    f"hit rate {100 * run.hits / max(run.queries, 1):.1f} %, "
                    f"{len(run.failures)} failed {run.failures[:2]}",
                    flush=True,
                )
        report(args, runs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

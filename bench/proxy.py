"""The prompt path against nginx and vllm-router, in front of the same upstream.

On the local cluster that has the vLLM runtime (c2205), this starts two
OpenAI-shaped stubs as Slurm jobs through the bench recipe
(tests/recipes/testing/openai-stub): one answering at once, one pausing 200 ms
before each streamed chunk. In front of the fast one it runs Debian's nginx
(one worker, upstream keepalive; installed if missing) and vLLM's own router,
``vllm-router`` (pip), and measures, in interleaved rounds, each of:

* direct: the stub itself;
* nginx: the reference proxy;
* vllm-router: the peer;
* gateway: ``POST /api/v1/vllm/{id}/prompt``;
* gateway /v1: the OpenAI front door, ``POST /v1/chat/completions`` routed by
  model (the same body as direct, nginx and vllm-router get).

Non-streamed: wrk at 1 and 64 connections (req/s, p50, p99). Streamed: an
aiohttp client at 1 and 32 concurrent streams (streams/s, first-chunk p50).
For each side, the CPU time its processes used during the test (from
/proc: all threads, nginx's and the gateway's workers included; for direct,
the stub's own), per request answered or per streamed chunk (SSE event).
Then, on the paced stub: the gateway's RSS with 2,000 streams open, and how
long 2,000 concurrent 16-chunk streams (3.2 s each on schedule) take, direct
and through the gateway. Medians of the rounds; ratios of each gateway side
to direct, nginx and vllm-router.

    python bench/proxy.py [--rounds 3] [--seconds 5] [--workers 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.testing.clusters import LocalCluster, discover  # noqa: E402
from tests.support.gateway_process import GatewayProcess  # noqa: E402
from tests.support.polling import free_port  # noqa: E402

PROMPT = "Say something"
TOKENS = 16
OPENAI_BODY = {
    "model": "stub",
    "messages": [{"role": "user", "content": PROMPT}],
    "max_tokens": TOKENS,
}
GATEWAY_BODY = {"prompt": PROMPT, "max_tokens": TOKENS}
# Every request carries this (the baselines too, which ignore it): with
# --auth key the gateway checks an API key on each one, as deployed.
HEADERS: dict[str, str] = {}
LOCAL_KEY = "sgw_local-admin-key"  # deploy/local/tenants.toml
SIDES = ("direct", "nginx", "vllm-router", "gateway", "gateway /v1")
GATEWAYS = ("gateway", "gateway /v1")


def ensure_tools() -> None:
    missing = [tool for tool in ("nginx", "wrk") if shutil.which(tool) is None]
    if missing:
        print(f"installing {', '.join(missing)} (apt)", flush=True)
        packages = ["nginx-light" if m == "nginx" else m for m in missing]
        subprocess.run(
            ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages],
            check=True,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
            stdout=subprocess.DEVNULL,
        )
    if not (Path(sys.executable).parent / "vllm-router").exists():
        print("installing vllm-router (pip)", flush=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "vllm-router"],
            check=True,
            stdout=subprocess.DEVNULL,
        )


# -- the proxies in front of the stub -------------------------------------------


class Nginx:
    def __init__(self, upstream: str) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="bench-nginx-"))
        host = upstream.split("://", 1)[1]
        (self.dir / "nginx.conf").write_text(
            f"""worker_processes 1;
pid {self.dir}/nginx.pid;
error_log {self.dir}/error.log warn;
events {{ worker_connections 16384; }}
http {{
    access_log off;
    upstream stub {{ server {host}; keepalive 256; }}
    server {{
        listen 127.0.0.1:{self.port} backlog=4096;
        location / {{
            proxy_pass http://stub;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}
}}
"""
        )
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["nginx", "-p", str(self.dir), "-c", str(self.dir / "nginx.conf"), "-g",
             "daemon off;"],
        )  # fmt: skip

    def stop(self) -> None:
        if self.process:
            self.process.terminate()
            self.process.wait(10)


class Router:
    def __init__(self, upstream: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.upstream = upstream
        self.process: subprocess.Popen[bytes] | None = None
        self.log = Path(tempfile.mkstemp(prefix="bench-vllm-router-", suffix=".log")[1])

    def start(self) -> None:
        binary = Path(sys.executable).parent / "vllm-router"
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [str(binary), "--host", "127.0.0.1", "--port", str(self.port),
                 "--worker-urls", self.upstream],
                stdout=log, stderr=log,
            )  # fmt: skip

    def stop(self) -> None:
        if self.process:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()


async def wait_answering(url: str, body: dict[str, Any], within: float = 60) -> None:
    deadline = time.monotonic() + within
    async with aiohttp.ClientSession(headers=HEADERS) as session:
        while True:
            try:
                async with session.post(url, json=body) as r:
                    if r.status == 200:
                        return
                    last = f"HTTP {r.status}: {(await r.text())[:200]}"
            except aiohttp.ClientError as exc:
                last = repr(exc)
            if time.monotonic() > deadline:
                raise SystemExit(f"{url} did not answer: {last}")
            await asyncio.sleep(0.5)


# -- load ---------------------------------------------------------------------------


@dataclass
class Load:
    rate: float  # requests or streams per second
    p50: float  # ms: latency, or first chunk for streams
    p99: float
    errors: int = 0
    count: int = 0  # requests, or streamed chunks (SSE events), answered
    cpu: float = 0.0  # seconds of CPU the proxy's processes used meanwhile

    @property
    def cpu_each(self) -> float:
        """µs of the proxy's CPU per request, or per streamed chunk."""
        return 1e6 * self.cpu / self.count if self.count else 0.0


@dataclass
class Results:
    data: dict[tuple[str, str], list[Load]] = field(default_factory=dict)

    def add(self, test: str, side: str, load: Load) -> None:
        self.data.setdefault((test, side), []).append(load)

    def median(self, test: str, side: str) -> Load:
        runs = self.data[(test, side)]
        middle = sorted(runs, key=lambda r: r.cpu_each)[len(runs) // 2]
        return Load(
            rate=statistics.median(r.rate for r in runs),
            p50=statistics.median(r.p50 for r in runs),
            p99=statistics.median(r.p99 for r in runs),
            errors=sum(r.errors for r in runs),
            count=middle.count,
            cpu=middle.cpu,
        )


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()  # type: ignore[union-attr]
    return float(number) * _UNITS[unit]


def wrk(url: str, body: dict[str, Any], connections: int, seconds: float) -> Load:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(
            'wrk.method = "POST"\n'
            'wrk.headers["Content-Type"] = "application/json"\n'
            + "".join(f'wrk.headers["{k}"] = "{v}"\n' for k, v in HEADERS.items())
            + f"wrk.body = {json.dumps(json.dumps(body))}\n"
        )
    threads = 1 if connections == 1 else 2
    out = subprocess.run(
        ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{round(seconds)}s", "--latency",
         "--timeout", "5s", "-s", script.name, url],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    os.unlink(script.name)
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    done = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    errors = 0
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        errors += int(m.group(1))
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        errors += sum(int(g) for g in m.groups())
    return Load(rate, p50, p99, errors, count=done)


async def one_stream(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any]
) -> tuple[float, float, int]:
    """Seconds to the first chunk and to the end of one stream; its chunks."""
    t0 = time.perf_counter()
    async with session.post(url, json={**body, "stream": True}) as r:
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {(await r.text())[:200]}")
        seen = bytearray(await r.content.readany())
        first = time.perf_counter() - t0
        async for piece in r.content.iter_any():
            seen += piece
        if b"[DONE]" not in seen[-64:]:
            raise RuntimeError("the stream ended without [DONE]")
    return first, time.perf_counter() - t0, seen.count(b"data:")


async def streams(url: str, body: dict[str, Any], concurrency: int, seconds: float) -> Load:
    firsts: list[float] = []
    failures: list[str] = []
    errors = 0
    done = 0
    chunks = 0
    stop_at = time.monotonic() + seconds
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, headers=HEADERS) as session:

        async def worker() -> None:
            nonlocal errors, done, chunks
            while time.monotonic() < stop_at:
                try:
                    first, _, events = await one_stream(session, url, body)
                    firsts.append(first)
                    done += 1
                    chunks += events
                except (aiohttp.ClientError, RuntimeError) as exc:
                    errors += 1
                    failures.append(repr(exc)[:300])

        t0 = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.monotonic() - t0
    if not firsts:
        raise SystemExit(f"no stream from {url} ended well: {failures[:3]}")
    firsts.sort()
    return Load(
        done / elapsed,
        1000 * statistics.median(firsts),
        1000 * firsts[int(0.99 * (len(firsts) - 1))],
        errors,
        count=chunks,
    )


async def burst(url: str, body: dict[str, Any], count: int) -> tuple[float, int]:
    """Seconds for ``count`` streams started at once to end; failures."""
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, headers=HEADERS
    ) as session:
        t0 = time.perf_counter()
        ends = await asyncio.gather(
            *(one_stream(session, url, body) for _ in range(count)), return_exceptions=True
        )
        elapsed = time.perf_counter() - t0
    return elapsed, sum(isinstance(e, BaseException) for e in ends)


async def open_streams(url: str, body: dict[str, Any], count: int, pid: int) -> tuple[float, int]:
    """The gateway's RSS (MiB) once ``count`` streams are open at once."""
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=600)
    opened = 0
    failed = 0
    all_open = asyncio.Event()
    release = asyncio.Event()
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, headers=HEADERS
    ) as session:

        async def hold() -> None:
            nonlocal opened, failed
            try:
                async with session.post(url, json={**body, "stream": True}) as r:
                    await r.content.readany()
                    if r.status != 200:
                        raise aiohttp.ClientResponseError(r.request_info, (), status=r.status)
                    opened += 1
                    if opened + failed == count:
                        all_open.set()
                    await release.wait()
            except aiohttp.ClientError:
                failed += 1
                if opened + failed == count:
                    all_open.set()

        tasks = [asyncio.create_task(hold()) for _ in range(count)]
        await asyncio.wait_for(all_open.wait(), 120)
        rss = rss_mib(pid)
        release.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    return rss, failed


_TICK = os.sysconf("SC_CLK_TCK")


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (nginx's worker, the gateway's workers)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        found.append(todo.pop())
        todo.extend(children.get(found[-1], []))
    return found


def cpu_seconds(pids: list[int]) -> float:
    """User and system CPU time the processes have used, all their threads."""
    ticks = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])
    return ticks / _TICK


def listener(port: int) -> int:
    """The pid of the process listening on ``port`` (the stub, a Slurm job)."""
    out = subprocess.run(
        ["ss", "-Htlnp", f"sport = :{port}"], capture_output=True, text=True, check=True
    ).stdout
    found = re.search(r"pid=(\d+)", out)
    if found is None:
        raise SystemExit(f"nothing listens on port {port}")
    return int(found.group(1))


def rss_mib(pid: int) -> float:
    """The resident memory of ``pid`` and its descendants (the workers)."""
    total = 0
    for each in process_tree(pid):
        try:
            status = Path(f"/proc/{each}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total / 1024


# -- the run ------------------------------------------------------------------------


async def start_stub(api: aiohttp.ClientSession, env: dict[str, str]) -> dict[str, Any]:
    async with api.post(
        "/api/v1/services",
        json={"recipe_name": "testing/openai-stub", "config": {"environment": env}},
    ) as r:
        created = await r.json()
        if r.status != 201:
            raise SystemExit(f"could not start the stub: {created}")
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            async with api.get(f"/api/v1/services/{created['id']}") as r:
                service: dict[str, Any] = await r.json()
            if service["status"] == "running":
                return service
            if service["status"] in ("failed", "cancelled", "completed", "timeout"):
                raise SystemExit(f"stub ended: {service}")
            await asyncio.sleep(0.5)
        raise SystemExit("the stub did not reach running in 120 s")
    except BaseException:
        async with api.delete(f"/api/v1/services/{created['id']}"):
            pass  # a stub left running would hold a CPU of the node for an hour
        raise


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "-"


async def run(args: argparse.Namespace, cluster: LocalCluster, gateway: GatewayProcess) -> None:
    async with aiohttp.ClientSession(base_url=gateway.url, headers=HEADERS) as api:
        python = "/opt/vllm/bin/python"  # has uvloop; the chroot's python3 may not
        fast = await start_stub(api, {"STUB_PYTHON": python})
        # Another model name: /v1 routes by model, and must not pick the paced one.
        paced = await start_stub(
            api,
            {"STUB_PYTHON": python, "STUB_CHUNK_DELAY_MS": "200", "VLLM_MODEL": "stub-paced"},
        )
        try:
            await measure(args, gateway, fast, paced)
        finally:
            for stub in (fast, paced):
                async with api.delete(f"/api/v1/services/{stub['id']}"):
                    pass


async def measure(
    args: argparse.Namespace,
    gateway: GatewayProcess,
    fast: dict[str, Any],
    paced: dict[str, Any],
) -> None:
    endpoint = fast["endpoint"]
    nginx = Nginx(endpoint)
    router = Router(endpoint)
    nginx.start()
    router.start()
    try:
        chat = "/v1/chat/completions"
        urls = {
            "direct": (endpoint + chat, OPENAI_BODY),
            "nginx": (nginx.url + chat, OPENAI_BODY),
            "vllm-router": (router.url + chat, OPENAI_BODY),
            "gateway": (f"{gateway.url}/api/v1/vllm/{fast['id']}/prompt", GATEWAY_BODY),
            "gateway /v1": (gateway.url + chat, OPENAI_BODY),
        }
        for url, body in urls.values():
            await wait_answering(url, body)
        assert gateway.process is not None
        print(
            f"stub {fast['id']} at {endpoint}; nginx {nginx.url}; vllm-router {router.url}; "
            f"gateway {gateway.url} ({gateway.env.get('GATEWAY_WORKERS', '1')} worker)",
            flush=True,
        )
        assert nginx.process is not None
        assert router.process is not None
        pids = {
            "direct": [listener(int(endpoint.rsplit(":", 1)[1]))],
            "nginx": process_tree(nginx.process.pid),
            "vllm-router": [router.process.pid],
            "gateway": process_tree(gateway.process.pid),
            "gateway /v1": process_tree(gateway.process.pid),
        }
        results = Results()
        tests = [("1 conn", 1), ("64 conn", 64), ("1 stream", 1), ("32 streams", 32)]
        for n in range(args.rounds):
            for test, concurrency in tests:
                for side in SIDES:
                    url, body = urls[side]
                    before = cpu_seconds(pids[side])
                    if "stream" in test:
                        load = await streams(url, body, concurrency, args.seconds)
                    else:
                        load = await asyncio.to_thread(wrk, url, body, concurrency, args.seconds)
                    load.cpu = cpu_seconds(pids[side]) - before
                    results.add(test, side, load)
            print(f"round {n + 1} of {args.rounds} done", flush=True)
        report(results, tests)

        paced_url = f"{gateway.url}/api/v1/vllm/{paced['id']}/prompt"
        await wait_answering(paced_url, {**GATEWAY_BODY, "max_tokens": 1})
        # 2,000 streams held open at once (each would last 100 chunks x 200 ms).
        rss_idle = rss_mib(gateway.process.pid)
        rss, failed = await open_streams(
            paced_url, {**GATEWAY_BODY, "max_tokens": 100}, args.open_streams, gateway.process.pid
        )
        print(
            f"\ngateway RSS: {rss_idle:.0f} MiB idle, {rss:.0f} MiB with "
            f"{args.open_streams - failed} of {args.open_streams} streams open"
        )
        schedule = TOKENS * 0.2
        for side, url, body in (
            ("direct", paced["endpoint"] + chat, OPENAI_BODY),
            ("gateway", paced_url, GATEWAY_BODY),
        ):
            elapsed, failed = await burst(url, body, args.burst)
            print(
                f"{args.burst} concurrent {TOKENS}-chunk streams at 200 ms a chunk, {side}: "
                f"all done in {elapsed:.2f} s, {elapsed / schedule:.2f}x the {schedule:.1f} s "
                f"schedule, {failed} failed"
            )
    finally:
        nginx.stop()
        router.stop()


def _cell(load: Load, unit: str) -> str:
    errors = f", {load.errors} errors" if load.errors else ""
    each = "chunk" if unit == "streams/s" else "req"
    return (
        f"{load.rate:,.0f} {unit} · p50 {load.p50:.2f} · p99 {load.p99:.2f} ms · "
        f"{load.cpu_each:.0f} µs CPU/{each}{errors}"
    )


def report(results: Results, tests: list[tuple[str, int]]) -> None:
    print("\n| test | " + " | ".join(SIDES) + " |")
    print("|---" * (len(SIDES) + 1) + "|")
    for test, _ in tests:
        unit = "streams/s" if "stream" in test else "req/s"
        latency = "first chunk" if "stream" in test else "latency"
        cells = " | ".join(_cell(results.median(test, side), unit) for side in SIDES)
        print(f"| {test} ({latency}) | {cells} |")
    print("\nCPU of each proxy's processes per request (per streamed chunk for streams):\n")
    print(
        "| test | nginx | vllm-router | gateway | gateway /v1 | gateway / router | /v1 / router |"
    )
    print("|---|---|---|---|---|---|---|")
    for test, _ in tests:
        each = {side: results.median(test, side).cpu_each for side in SIDES}
        print(
            f"| {test} | {each['nginx']:.0f} µs | {each['vllm-router']:.0f} µs | "
            f"{each['gateway']:.0f} µs | {each['gateway /v1']:.0f} µs | "
            f"{ratio(each['gateway'], each['vllm-router'])}x | "
            f"{ratio(each['gateway /v1'], each['vllm-router'])}x |"
        )
    print("\n| test | side | vs direct | vs nginx | vs vllm-router |")
    print("|---|---|---|---|---|")
    for test, _ in tests:
        direct = results.median(test, "direct")
        nginx = results.median(test, "nginx")
        router = results.median(test, "vllm-router")
        for side in GATEWAYS:
            g = results.median(test, side)
            print(
                f"| {test} | {side} | {ratio(g.rate, direct.rate)}x rate, "
                f"+{g.p50 - direct.p50:.2f} ms p50, +{g.p99 - direct.p99:.2f} ms p99 | "
                f"{ratio(g.rate, nginx.rate)}x rate | {ratio(g.rate, router.rate)}x rate, "
                f"{ratio(g.p99, router.p99)}x p99 |"
            )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cluster", default="c2205")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--open-streams", type=int, default=2000)
    parser.add_argument("--burst", type=int, default=2000)
    parser.add_argument(
        "--auth",
        choices=["key", "none"],
        default="key",
        help="key: clients authenticate with an API key (deploy/local/tenants.toml); "
        "none: no authentication (loopback only)",
    )
    args = parser.parse_args()
    auth_env: dict[str, str] = {}
    if args.auth == "key":
        HEADERS["Authorization"] = f"Bearer {LOCAL_KEY}"
        auth_env["GATEWAY_AUTH_FILE"] = str(ROOT / "deploy" / "local" / "tenants.toml")
    cluster = next((c for c in discover() if c.name == args.cluster), None)
    if cluster is None:
        raise SystemExit(f"no local cluster {args.cluster}; run `make cluster`")
    ensure_tools()
    recipes = f"{ROOT / 'recipes'}:{ROOT / 'tests' / 'recipes'}"
    with GatewayProcess(
        cluster,
        GATEWAY_RECIPES_DIRS=recipes,
        GATEWAY_WORKERS=str(args.workers),
        GATEWAY_HEALTH_CACHE_SECONDS="3",
        # Room for the 2,000-stream runs at one service (1,024 by default):
        # what they measure is the proxy, not its bounds.
        GATEWAY_VLLM_MAX_PER_SERVICE="4096",
        GATEWAY_VLLM_MAX_PER_TENANT="4096",
        **auth_env,
    ) as gateway:
        asyncio.run(run(args, cluster, gateway))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The control plane against slurmrestd itself, side by side in one run.

On one local cluster, with its partition down so that every job stays pending
(no job processes compete for the CPUs), this measures:

1. creates: ``POST /services`` through the gateway against the same job
   submitted straight to slurmrestd, and against that submit followed by the
   update that binds a service's metadata to its job id (what a create asks
   of Slurm), at the same concurrency, alternating (``--only-creates`` stops
   after this part);
2. listing: ``GET /services`` with ``--list-size`` services queued against
   slurmrestd's own ``GET /jobs``, alternating;
3. polling: ``--pollers`` clients each polling ``GET /services/{id}/status``
   once per ``--poll-interval`` for ``--poll-seconds``, with slurmctld's RPC
   counters (``sdiag``) read before and after: the RPC rate the gateway
   caused, against the clients' rate;
4. scale: the queue filled to ``--scale`` services, then list and status
   times, and the gateway process's memory before and after.

Everything it submits is cancelled at the end and the partition brought up.

    python bench/control_plane.py [--cluster c2205] [--pollers 100] [--poll-seconds 60]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import msgspec

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.core.principal import anonymous  # noqa: E402
from gateway.core.services import CreateRequest, ServiceManager  # noqa: E402
from gateway.slurm import JobSubmission, SubmitResult  # noqa: E402
from gateway.slurm.adapters import adapter_for  # noqa: E402
from gateway.testing.clusters import LocalCluster, discover  # noqa: E402
from gateway.wiring import metadata_codec  # noqa: E402
from tests.support.gateway_process import GatewayProcess  # noqa: E402

RECIPE = "testing/http"


class Answer(msgspec.Struct):
    status_code: int
    content: bytes

    def json(self) -> Any:
        return msgspec.json.decode(self.content)

    @property
    def text(self) -> str:
        return self.content.decode(errors="replace")


class Client:
    """One HTTP client for every side of the comparison. aiohttp, because
    httpx's own pool costs about 1 ms of CPU per request here (bench/transport.py):
    on 2 cores that would be measured as gateway or slurmrestd latency."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url.rstrip("/")
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=200),
            timeout=aiohttp.ClientTimeout(total=120),
        )

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        headers: dict[str, str] | None = None,
    ) -> Answer:
        data = None if json is None else msgspec.json.encode(json)
        if data is not None:
            headers = {**(headers or {}), "Content-Type": "application/json"}
        async with self.session.request(
            method, self.base_url + path, data=data, headers=headers
        ) as r:
            return Answer(r.status, await r.read())

    async def get(self, path: str) -> Answer:
        return await self.request("GET", path)

    async def post(self, path: str, json: Any) -> Answer:
        return await self.request("POST", path, json=json)

    async def aclose(self) -> None:
        await self.session.close()


_RPC_LINE = re.compile(r"^\s*([A-Z_]+)\s+\(\s*\d+\)\s+count:(\d+)")


def chroot(cluster: LocalCluster, *command: str) -> str:
    done = subprocess.run(
        ["chroot", cluster.chroot, "/usr/bin/env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
         *command],
        capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    return done.stdout


def rpc_counts(cluster: LocalCluster) -> dict[str, int]:
    """slurmctld's RPC counts by message type (sdiag)."""
    counts: dict[str, int] = {}
    section = False
    for line in chroot(cluster, "sdiag").splitlines():
        if line.startswith("Remote Procedure Call statistics by message type"):
            section = True
        elif line.startswith("Remote Procedure Call statistics by user"):
            break
        elif section and (m := _RPC_LINE.match(line)):
            counts[m.group(1)] = int(m.group(2))
    return counts


def rpc_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    # sdiag's own REQUEST_STATS_INFO is ours, not the gateway's.
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after if k != "REQUEST_STATS_INFO"}
    return {k: v for k, v in delta.items() if v}


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def ms(values: list[float]) -> str:
    data = sorted(v * 1000 for v in values)
    return f"p50 {statistics.median(data):7.1f} ms  p90 {data[int(0.9 * (len(data) - 1))]:7.1f} ms"


async def timed_batch(
    count: int, concurrency: int, one: Callable[[], Awaitable[Any]]
) -> tuple[list[float], float]:
    """Latencies of ``count`` calls run ``concurrency`` at a time, and the calls per second."""
    latencies: list[float] = []
    todo = iter(range(count))

    async def worker() -> None:
        for _ in todo:
            t0 = time.perf_counter()
            await one()
            latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, count / (time.perf_counter() - t0)


async def captured_submission(cluster: LocalCluster, gateway: GatewayProcess) -> JobSubmission:
    """The job the gateway submits for one service, built by its own code."""
    from gateway.app import load_recipes
    from gateway.settings import load_settings

    settings = load_settings(gateway.env)
    captured: list[JobSubmission] = []

    class Capture:
        async def submit(self, job: JobSubmission) -> SubmitResult:
            captured.append(job)
            return SubmitResult(job_id=1)

        async def update_comment(self, job_id: int, comment: str) -> None:
            pass

    manager = ServiceManager(
        slurm=Capture(),  # type: ignore[arg-type]
        recipes=load_recipes(settings),
        prober=None,  # type: ignore[arg-type]
        codec=metadata_codec(settings),
        job_dir=settings.job_dir,
        slurm_user=cluster.user,
        partition=cluster.partition,
    )
    await manager.create(CreateRequest(recipe_name=RECIPE), anonymous(cluster.user))
    return captured[0]


async def run(args: argparse.Namespace, cluster: LocalCluster, gateway: GatewayProcess) -> None:
    job = await captured_submission(cluster, gateway)
    api = Client(gateway.url)
    async with cluster.client() as slurm:
        await slurm.ping()
        version = slurm.api_version
        assert version is not None
        adapter = adapter_for(version)
        tokens = cluster.tokens()
        raw = Client(cluster.url)
        print(
            f"{cluster.name}: Slurm {cluster.slurm_release}, slurmrestd {version}; "
            "partition down: jobs stay pending"
        )

        async def gateway_create() -> None:
            r = await api.post("/api/v1/services", json={"recipe_name": RECIPE})
            assert r.status_code == 201, r.text

        async def raw_submit() -> int:
            request = adapter.submit_request(job)
            headers = (await tokens.credentials()).headers()
            r = await raw.request(request.method, request.path, json=request.body, headers=headers)
            assert r.status_code == 200, r.text
            return adapter.parse_submit(r.status_code, r.content).job_id

        async def raw_submit_and_bind() -> None:
            job_id = await raw_submit()
            request = adapter.update_comment_request(job_id, f"{job.comment}.bound-{job_id}")
            headers = (await tokens.credentials()).headers()
            r = await raw.request(request.method, request.path, json=request.body, headers=headers)
            assert r.status_code == 200, r.text

        sides: dict[str, Callable[[], Awaitable[Any]]] = {
            "gateway": gateway_create,
            "raw": raw_submit,
            "raw+bind": raw_submit_and_bind,
        }

        # 1. creates, alternating blocks
        for warm in sides.values():
            await timed_batch(8, args.concurrency, warm)
        results: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in sides}
        processes = {
            "bench client": [os.getpid()],
            "gateway": [gateway.process.pid] if gateway.process else [],
            "slurmrestd": cluster.daemon_pids("slurmrestd"),
            "slurmctld": cluster.daemon_pids("slurmctld"),
        }
        cpu: dict[str, dict[str, float]] = {name: {} for name in sides}
        for _ in range(args.rounds):
            for name, one in sides.items():
                cpu_before = {k: cpu_seconds(v) for k, v in processes.items()}
                lat, rate = await timed_batch(args.creates, args.concurrency, one)
                for k, v in processes.items():
                    cpu[name][k] = cpu[name].get(k, 0.0) + cpu_seconds(v) - cpu_before[k]
                results[name][0].extend(lat)
                results[name][1].append(rate)
        print(
            f"\ncreate, {args.concurrency} concurrent clients, {args.rounds}x{args.creates} each:"
        )
        for name, (lat, rates) in results.items():
            print(f"  {name:>8}: {ms(lat)}  {statistics.median(rates):6.0f}/s")
        for one, other in (("gateway", "raw"), ("raw+bind", "raw"), ("gateway", "raw+bind")):
            a, b = results[one], results[other]
            print(
                f"     ratio: p50 {statistics.median(a[0]) / statistics.median(b[0]):.2f}x  "
                f"throughput {statistics.median(b[1]) / statistics.median(a[1]):.2f}x slower "
                f"({one} / {other})"
            )
        made = args.rounds * args.creates
        for name, spent in cpu.items():
            print(
                f"  CPU per create ({name}): "
                + ", ".join(f"{k} {v / made * 1000:.2f} ms" for k, v in spent.items())
            )
        if args.only_creates:
            await raw.aclose()
            await api.aclose()
            return

        async def fill(target: int) -> int:
            queued = len((await slurm.list_jobs()).jobs)
            missing = max(0, target - queued)
            await timed_batch(missing, 16, raw_submit)
            return queued + missing

        async def compare_list(size: int, rounds: int = args.list_rounds) -> None:
            total = await fill(size)
            await api.get("/api/v1/services")  # the view catches up
            gw: list[float] = []
            direct: list[float] = []
            count = 0
            for _ in range(rounds):
                t0 = time.perf_counter()
                listed = await api.get("/api/v1/services")
                gw.append(time.perf_counter() - t0)
                count = len(listed.json())
                request = adapter.list_jobs_request(None)
                headers = (await tokens.credentials()).headers()
                t0 = time.perf_counter()
                await raw.request(request.method, request.path, headers=headers)
                direct.append(time.perf_counter() - t0)
            print(f"\nlist, {total} jobs queued ({count} services listed):")
            print(f"   gateway GET /services: {ms(gw)}")
            print(f"  slurmrestd GET /jobs:   {ms(direct)}")
            print(f"     ratio: p50 {statistics.median(gw) / statistics.median(direct):.3f}")

        await compare_list(args.list_size)

        # 3. polling
        ids = [s["id"] for s in (await api.get("/api/v1/services")).json()][: args.pollers]

        async def paced(paths: list[str], seconds: float) -> list[float]:
            """Each client GETs its path once per --poll-interval (0: back to back),
            starting spread over one interval as independent clients would."""
            stop_at = time.monotonic() + seconds
            latencies: list[float] = []

            async def client(path: str, offset: float) -> None:
                await asyncio.sleep(offset)
                while time.monotonic() < stop_at:
                    t0 = time.perf_counter()
                    r = await api.get(path)
                    took = time.perf_counter() - t0
                    latencies.append(took)
                    assert r.status_code == 200, r.text
                    await asyncio.sleep(max(0.0, args.poll_interval - took))

            await asyncio.gather(
                *(
                    client(paths[i % len(paths)], args.poll_interval * i / args.pollers)
                    for i in range(args.pollers)
                )
            )
            return latencies

        # The floor: the same clients on an endpoint that does no work.
        gateway_pids = processes["gateway"]
        cpu_at = cpu_seconds(gateway_pids)
        floor = await paced(["/api/v1/health"], min(10.0, args.poll_seconds))
        floor_cpu = (cpu_seconds(gateway_pids) - cpu_at) / max(1, len(floor))
        cpu_at = cpu_seconds(gateway_pids)
        before = rpc_counts(cluster)
        t0 = time.monotonic()
        latencies = await paced([f"/api/v1/services/{i}/status" for i in ids], args.poll_seconds)
        status_cpu = (cpu_seconds(gateway_pids) - cpu_at) / max(1, len(latencies))
        elapsed = time.monotonic() - t0
        delta = rpc_delta(before, rpc_counts(cluster))
        total = sum(delta.values())
        every = f"every {args.poll_interval:g} s" if args.poll_interval else "back to back"
        print(f"\nstatus polling, {args.pollers} clients ({every}) for {elapsed:.0f} s:")
        print(f"  {len(latencies) / elapsed:.0f} polls/s, {ms(latencies)}")
        print(f"  floor, the same clients on /api/v1/health: {ms(floor)}")
        print(
            f"  gateway CPU per request: status {status_cpu * 1000:.2f} ms, "
            f"health {floor_cpu * 1000:.2f} ms"
        )
        print(
            f"  slurmctld RPCs: {total} in all, {total / elapsed:.2f}/s "
            f"({', '.join(f'{k} {v}' for k, v in sorted(delta.items())) or 'none'}); "
            f"bound: 1 listing per {gateway.env.get('GATEWAY_VIEW_REFRESH_SECONDS', '1.0')} s "
            "while in use, never more than 1 per 0.25 s"
        )
        print(f"  RPCs per poll: {total / max(1, len(latencies)):.5f}")

        # 4. scale
        rss_before = rss_mib(gateway.process.pid) if gateway.process else 0.0
        t0 = time.perf_counter()
        total = await fill(args.scale)
        print(f"\nscale: queue filled to {total} jobs in {time.perf_counter() - t0:.0f} s")
        # Fewer rounds here: every slurmrestd GET /jobs of 10,000 jobs takes
        # seconds and gigabytes (24.11's was OOM-killed at 18 GB after ten).
        await compare_list(args.scale, rounds=3)
        status_lat, _ = await timed_status(api, ids[0])
        print(f"  status with {total} jobs queued: {ms(status_lat)}")
        rss_after = rss_mib(gateway.process.pid) if gateway.process else 0.0
        print(f"  gateway RSS: {rss_before:.0f} MiB before the fill, {rss_after:.0f} MiB after")
        await raw.aclose()
        await api.aclose()


async def timed_status(api: Client, service_id: str) -> tuple[list[float], float]:
    async def one() -> None:
        r = await api.get(f"/api/v1/services/{service_id}/status")
        assert r.status_code == 200, r.text

    return await timed_batch(400, 8, one)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cluster", default="c2205")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--creates", type=int, default=100, help="creates per round and side")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--only-creates", action="store_true", help="stop after the creates")
    parser.add_argument("--list-size", type=int, default=2000)
    parser.add_argument("--list-rounds", type=int, default=10)
    parser.add_argument("--pollers", type=int, default=100)
    parser.add_argument("--poll-seconds", type=float, default=60)
    parser.add_argument("--poll-interval", type=float, default=1.0, help="seconds; 0: back to back")
    parser.add_argument("--scale", type=int, default=10000)
    args = parser.parse_args()
    cluster = next((c for c in discover() if c.name == args.cluster), None)
    if cluster is None:
        raise SystemExit(f"no local cluster {args.cluster}; run `make cluster`")
    # A DOWN partition queues jobs but starts none (a drained node would make
    # 22.05 refuse the submits).
    partition = f"partitionname={cluster.partition}"
    chroot(cluster, "scontrol", "update", partition, "state=down")
    try:
        with GatewayProcess(cluster) as gateway:
            asyncio.run(run(args, cluster, gateway))
    finally:
        chroot(cluster, "scancel", "-u", cluster.user)
        chroot(cluster, "scontrol", "update", partition, "state=up")
        wait_for_purge(cluster)
    return 0


def wait_for_purge(cluster: LocalCluster, limit: float = 600) -> None:
    """slurmctld keeps cancelled jobs for MinJobAge (300 s here): thousands of
    them would slow every job listing of whatever runs next (make test)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        held = len(chroot(cluster, "squeue", "-h", "-t", "all", "-o", "%i").split())
        if held < 100:
            break
        print(f"  waiting for slurmctld to purge {held} ended jobs (MinJobAge)", flush=True)
        time.sleep(30)
    print(f"  queue purged in {time.monotonic() - t0:.0f} s")


if __name__ == "__main__":
    raise SystemExit(main())

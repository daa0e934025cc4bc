"""/v1 requests through a deployment's walltime rollover against the same
deployment without one, side by side in one run.

On one local cluster, one gateway reads a deployments file of two shared
deployments of the OpenAI-shaped stub (tests/recipes/testing/openai-stub),
alike but for their served name and time limit: ``bench-roll`` (2 minutes:
each replica hands over to a successor before its limit) and ``bench-steady``
(60 minutes: it does not). Once both answer, a fixed-concurrency load of
non-streamed ``POST /v1/chat/completions`` (``--connections`` per model,
aiohttp, team-a's key) runs against both models over the same window: from
``--before`` seconds before roll's successors are due until every first
replica of roll has been stopped, plus ``--after`` seconds. It prints, per
model, requests, failed, req/s, p50 and p99 over the whole window and over the
handover (the first successor's submission to the last old replica's stop),
and the ratios roll / steady. A failed request is any answer but 200 or any
transport error: there must be none.

At the end the file is emptied, the replicas drain and stop, the gateway stops,
and any job of the bench still listed is cancelled.

A gateway with a deployments file stops the deployment jobs on its cluster
that its file does not declare: do not run this beside another deployments
gateway on the same cluster (tests/integration/test_deployments.py).

    python bench/rollover.py [--cluster c2411] [--connections 16] [--before 30]
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import msgspec

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.testing.clusters import LocalCluster, discover  # noqa: E402
from tests.support.deployments import Fleet, table  # noqa: E402

STUB = "testing/openai-stub"
TEAM_A = {"Authorization": "Bearer sgw_local-team-a-key"}  # deploy/local/tenants.toml
# Deployment and served model names, apart from the tests' (a gateway reads
# the ended jobs of a deployment of the same name as its history).
ROLL, STEADY = "bench-roll", "bench-steady"
MINUTES = {ROLL: 2, STEADY: 60}


@dataclass
class Load:
    """``connections`` clients sending one request after another to one model."""

    url: str
    model: str
    connections: int
    # (completed at, seconds, ok) of each request.
    done: list[tuple[float, float, bool]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def run(self, stop: asyncio.Event) -> None:
        body = msgspec.json.encode(
            {
                "model": self.model,
                "messages": [{"role": "user", "content": "Say something"}],
                "max_tokens": 16,
            }
        )
        headers = {**TEAM_A, "Content-Type": "application/json"}
        connector = aiohttp.TCPConnector(limit=self.connections)
        timeout = aiohttp.ClientTimeout(total=60)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

            async def one() -> None:
                while not stop.is_set():
                    began = time.monotonic()
                    try:
                        async with session.post(
                            f"{self.url}/v1/chat/completions", data=body, headers=headers
                        ) as answer:
                            text = await answer.read()
                            ok = answer.status == 200
                            if not ok:
                                self.failures.append(f"{answer.status} {text[:200]!r}")
                    except (aiohttp.ClientError, TimeoutError) as exc:
                        ok = False
                        self.failures.append(f"{type(exc).__name__}: {exc}")
                    now = time.monotonic()
                    self.done.append((now, now - began, ok))

            await asyncio.gather(*(one() for _ in range(self.connections)))


class Stats(msgspec.Struct):
    requests: int
    failed: int
    rate: float
    p50: float
    p99: float


def stats(load: Load, start: float, end: float) -> Stats:
    """The requests that completed in [start, end)."""
    inside = [(s, ok) for at, s, ok in load.done if start <= at < end]
    ms = sorted(s * 1000 for s, ok in inside if ok)
    failed = sum(1 for _, ok in inside if not ok)

    def pick(q: float) -> float:
        return ms[min(len(ms) - 1, int(q * len(ms)))] if ms else float("nan")

    return Stats(len(inside), failed, len(inside) / max(end - start, 1e-9), pick(0.5), pick(0.99))


def ids(status: dict[str, Any]) -> set[str]:
    return {m["service_id"] for m in status.get("members", [])}


def ready(status: dict[str, Any], replicas: int) -> bool:
    return status.get("state") == "ready" and status["replicas"]["running"] >= replicas


async def due_in(fleet: Fleet) -> float:
    """Seconds until roll's first successor is due (its planned walltime action)."""
    while True:
        status = await fleet.deployment(ROLL)
        planned = status.get("next_action") or {}
        if planned.get("action") == "walltime" and planned.get("at"):
            at = datetime.fromisoformat(planned["at"].replace("Z", "+00:00"))
            return (at - datetime.now(UTC)).total_seconds()
        await asyncio.sleep(1)


class Handover(msgspec.Struct):
    """Seconds from the load's start: roll's first successor listed, all its
    successors answering, all its first replicas stopped."""

    submitted: float
    answered: float
    stopped: float


async def watch(
    fleet: Fleet, first: set[str], replicas: int, start: float, made: set[str], limit: float
) -> Handover:
    """Follows roll's status until none of its ``first`` replicas is left and
    ``replicas`` of their successors answer."""
    submitted = answered = None
    status: dict[str, Any] = {}
    while time.monotonic() - start < limit:
        status = await fleet.deployment(ROLL)
        now = time.monotonic() - start
        members = {m["service_id"]: m for m in status.get("members", [])}
        made |= set(members)
        new = set(members) - first
        if new and submitted is None:
            submitted = now
        if (
            answered is None
            and len(new) >= replicas
            and all(members[i]["status"] == "running" for i in new)
        ):
            answered = now
        if not first & set(members) and ready(status, replicas):
            assert submitted is not None
            return Handover(submitted, answered if answered is not None else now, now)
        await asyncio.sleep(0.5)
    raise SystemExit(f"no handover within {limit:.0f} s: {status}")


async def run(args: argparse.Namespace, fleet: Fleet, made: set[str]) -> None:
    declared = "".join(
        table(
            name,
            STUB,
            replicas=args.replicas,
            minutes=MINUTES[name],
            tenant=None,
            VLLM_SERVED_MODEL_NAME=name,
        )
        for name in (ROLL, STEADY)
    )
    t0 = time.monotonic()
    fleet.declare(declared)
    for name in (ROLL, STEADY):
        status = await fleet.until(name, "replicas answer", lambda d: ready(d, args.replicas), 150)
        made |= ids(status)
    first = ids(await fleet.deployment(ROLL))
    print(f"both deployments answer after {time.monotonic() - t0:.0f} s", flush=True)
    wait = await due_in(fleet) - args.before
    print(f"roll's successors due in {wait + args.before:.0f} s; load starts in {wait:.0f} s",
          flush=True)  # fmt: skip
    await asyncio.sleep(max(wait, 0))

    stop = asyncio.Event()
    loads = {n: Load(fleet.gateways[0].url, n, args.connections) for n in (ROLL, STEADY)}
    start = time.monotonic()
    running = [asyncio.create_task(load.run(stop)) for load in loads.values()]
    try:
        handover = await watch(fleet, first, args.replicas, start, made, args.before + 120)
        await asyncio.sleep(args.after)
    finally:
        stop.set()
        await asyncio.gather(*running)
    end = time.monotonic()
    # How the first replicas ended: stopped by the gateway (cancelled), not timeout.
    ends = [
        action["action"]
        for action in (await fleet.deployment(ROLL)).get("recent_actions", [])
        if action["action"].startswith("end.") and action.get("service_id") in first
    ]
    print(
        f"\nwindow {end - start:.0f} s at {args.connections} connections per model; roll's "
        f"successors submitted at +{handover.submitted:.0f} s, all answering at "
        f"+{handover.answered:.0f} s, first replicas all stopped at +{handover.stopped:.0f} s "
        f"({', '.join(sorted(ends)) or 'their ends not listed yet'})"
    )
    spans = {
        "window": (start, end),
        "handover": (start + handover.submitted, start + handover.stopped),
    }
    print(f"\n{'model':<14}{'span':<10}{'requests':>9}{'failed':>8}{'req/s':>9}"
          f"{'p50 ms':>9}{'p99 ms':>9}")  # fmt: skip
    table_of: dict[tuple[str, str], Stats] = {}
    for span, (a, b) in spans.items():
        for name, load in loads.items():
            s = table_of[name, span] = stats(load, a, b)
            print(f"{load.model:<14}{span:<10}{s.requests:>9}{s.failed:>8}{s.rate:>9.0f}"
                  f"{s.p50:>9.1f}{s.p99:>9.1f}")  # fmt: skip
    for span in spans:
        r, s = table_of[ROLL, span], table_of[STEADY, span]
        print(f"roll / steady, {span}: req/s {r.rate / s.rate:.3f}x, p99 {r.p99 / s.p99:.3f}x")
    failed = sum(len(load.failures) for load in loads.values())
    print(f"failed requests: {failed}")
    for load in loads.values():
        for failure in load.failures[:5]:
            print(f"  {load.model}: {failure}")
    if failed:
        raise SystemExit(1)


async def clean(fleet: Fleet, made: set[str]) -> None:
    """The file emptied, the replicas drained and gone, the gateway stopped,
    then any job of the bench still listed cancelled."""
    fleet.declare("")
    deadline = time.monotonic() + 90
    try:
        while time.monotonic() < deadline:
            # Ended jobs stay in the view a while: members, not the state, say it is over.
            members = set().union(*[ids(await fleet.deployment(n)) for n in (ROLL, STEADY)])
            made |= members
            listed = {str(i) for i, _, _ in await asyncio.to_thread(fleet.squeue)}
            if not members and not made & listed:
                break
            await asyncio.sleep(1)
    except Exception as exc:  # the gateway gone: scancel below
        print(f"waiting for the replicas to stop: {type(exc).__name__}: {exc}")
    for client in fleet.clients:
        await client.aclose()
    await asyncio.to_thread(fleet.gateways[0].stop)
    left = sorted(made & {str(i) for i, _, _ in await asyncio.to_thread(fleet.squeue)})
    if left:
        print(f"cancelling {', '.join(left)}")
        scancel = ["chroot", fleet.cluster.chroot, "scancel", *left]
        await asyncio.to_thread(subprocess.run, scancel, check=False, timeout=30)


async def main_async(args: argparse.Namespace, cluster: LocalCluster) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-rollover-") as folder:
        drain = {"GATEWAY_DEPLOYMENT_DRAIN_SECONDS": str(args.drain)}
        fleet = Fleet(cluster, Path(folder), 1, **drain)
        await fleet.start()
        made: set[str] = set()
        try:
            await run(args, fleet, made)
        finally:
            await clean(fleet, made)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cluster", default="c2411")
    parser.add_argument("--replicas", type=int, default=2, help="per deployment")
    parser.add_argument("--connections", type=int, default=16, help="per model")
    parser.add_argument("--before", type=float, default=30, help="load before successors are due")
    parser.add_argument("--after", type=float, default=10, help="load after the handover")
    parser.add_argument("--drain", type=float, default=8, help="GATEWAY_DEPLOYMENT_DRAIN_SECONDS")
    args = parser.parse_args()
    cluster = next((c for c in discover() if c.name == args.cluster), None)
    if cluster is None:
        raise SystemExit(f"no local cluster {args.cluster}; run `make cluster`")
    asyncio.run(main_async(args, cluster))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

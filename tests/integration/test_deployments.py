"""Deployments on the local clusters, with the OpenAI-shaped stub.

The scenarios wait on Slurm's time limits, so they run at once, one cluster
each: rollovers under load through two gateway processes (22.05) and three
(24.11); and, on 26.05, one gateway through a replica cancelled behind its
back, a rolling update, a broken generation, a recipe that always fails, a
restart of the gateway and a bad edit of the file. Beside them, under secrets
of their own: an elastic deployment's load ramp (24.11), a burst of first
requests at zero and services that stop themselves when idle (26.05):
tests/support/elastic.py and idle_stop.py.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway.testing.clusters import LocalCluster
from tests.support import elastic
from tests.support.clusters import CLUSTERS, NO_CLUSTERS, TIMINGS, VLLM_CLUSTERS, named
from tests.support.deployments import ADMIN, STUB, Fleet, Load, stub_deployment, table
from tests.support.idle_stop import idle_stop

pytestmark = pytest.mark.skipif(not CLUSTERS, reason=NO_CLUSTERS)

ROLLOVERS = 3


def _ready(want: int):  # type: ignore[no-untyped-def]
    return lambda d: d.get("state") == "ready" and d["replicas"]["running"] >= want


async def _rollovers(cluster: LocalCluster, folder: Path, gateways: int, vllm: bool) -> None:
    """2 replicas of 2 minutes under load for 3 rollovers (successors asked for
    by the default rule, from the start-up time observed): no request fails,
    no replica reaches its limit, never fewer than 2 answer once 2 did, and
    Slurm never runs more jobs than the slots and their successors. With
    ``vllm``, the real vLLM beside them: 1 replica of 3 minutes, 1 rollover."""
    fleet = Fleet(cluster, folder, gateways)
    model = f"roll-{cluster.name}"
    await fleet.start()
    loads = [Load(fleet, model)]
    declared = stub_deployment("roll", replicas=2, model=model, minutes=2)
    if vllm:
        # Shared (no tenant): beside team-a's quota. vLLM takes a minute to
        # start on this CPU, so its successor is asked for early.
        # Two vLLMs share this machine's two cores during a handover: their
        # threads float (nobind), and the load leaves them room.
        declared += table(
            "vllm", "inference/vllm", replicas=1, minutes=3, tenant=None, lead=130,
            VLLM_SERVED_MODEL_NAME="dep-vllm", VLLM_CPU_OMP_THREADS_BIND="nobind",
        )  # fmt: skip
        loads.append(Load(fleet, "dep-vllm", workers=1, pause=0.5))
    try:
        fleet.declare(declared)
        first = await fleet.until("roll", "2 replicas answer", _ready(2), timeout=150)
        await fleet.everywhere("roll", "2 replicas answer", _ready(2), timeout=30)
        loads[0].start()
        seen: set[str] = {m["service_id"] for m in first["members"]}
        vllm_seen: set[str] = set()
        ended: dict[str, str] = {}
        fewest, most_jobs = 2, 0
        listed: set[int] = set()  # every job squeue showed
        deadline = time.monotonic() + 2 * 60 * (ROLLOVERS + 1)
        while True:
            status = await fleet.deployment("roll", gateway=len(seen) % gateways)
            done = len(seen) >= 2 * (ROLLOVERS + 1) and _settled(status)
            if vllm:
                served = await fleet.deployment("vllm")
                if _settled(served) and not loads[1].running:
                    # Once every gateway process sees it answer (each has its own view).
                    await fleet.everywhere("vllm", "answers", _ready(1), timeout=30)
                    loads[1].start()
                vllm_seen |= {m["service_id"] for m in served.get("members", [])}
                done = done and len(vllm_seen) >= 2 and _settled(served)
            if done:
                break
            assert time.monotonic() < deadline, f"{cluster.name}: {len(seen)}, {vllm_seen}"
            fewest = min(fewest, status["replicas"]["running"])
            seen |= {m["service_id"] for m in status["members"]}
            for action in status["recent_actions"]:
                if action["action"].startswith("end."):
                    ended[action["service_id"]] = action["action"]
            jobs = await asyncio.to_thread(fleet.squeue)
            listed |= {job_id for job_id, _, _ in jobs}
            most_jobs = max(most_jobs, sum(1 for _, state, _ in jobs if state == "RUNNING"))
            await asyncio.sleep(1)
        for load in loads:
            await load.stop()
        print(
            f"\n{cluster.name}, {gateways} gateways: {len(seen)} replicas over {ROLLOVERS} "
            f"rollovers; {loads[0].total} requests, {len(loads[0].failures)} failed; longest "
            f"gap {loads[0].longest_gap:.2f} s; per replica: {dict(sorted(loads[0].ok.items()))}; "
            f"ends: {sorted(ended.values())}; most jobs running at once {most_jobs}; "
            f"twins cancelled: {len(listed - {int(i) for i in seen | vllm_seen})}"
        )
        for load in loads:
            assert not load.failures, load.failures[:5]
        assert "end.timeout" not in ended.values(), ended
        assert fewest >= 2
        if vllm:
            print(
                f"{cluster.name}: vLLM replicas {sorted(vllm_seen)}: {loads[1].total} requests, "
                f"{len(loads[1].failures)} failed, per replica {dict(loads[1].ok)}, "
                f"longest gap {loads[1].longest_gap:.2f} s"
            )
            assert len(loads[1].ok) >= 2  # both replicas served
        else:
            # Each slot hands over on its own: at most a successor per slot beside the two.
            assert most_jobs <= 4
    finally:
        for load in loads:
            await load.stop()
        await fleet.close()


async def _node(cluster: LocalCluster, *change: str) -> None:
    command = ["chroot", cluster.chroot, "scontrol", "update", f"nodename={cluster.node}", *change]
    await asyncio.to_thread(subprocess.run, command, check=True, timeout=30)


def _settled(status: dict[str, object]) -> bool:
    return status.get("state") == "ready"


async def _operations(cluster: LocalCluster, folder: Path) -> None:
    fleet = Fleet(cluster, folder, 1)
    await fleet.start()
    load = Load(fleet, "ops-web", workers=1)
    web = stub_deployment("web", replicas=2, model="ops-web", minutes=10)
    broken = stub_deployment(
        "broken", replicas=1, model="ops-broken", minutes=10, STUB_PYTHON="/nonexistent/python"
    )
    try:
        fleet.declare(web + broken)
        await fleet.until("web", "2 replicas", _ready(2), timeout=150)
        load.start()

        # Cancelled behind the gateway's back: replaced.
        victim = (await fleet.deployment("web"))["members"][0]["service_id"]
        await asyncio.to_thread(fleet.cluster.run_as, cluster.user, "scancel", victim)
        began = time.monotonic()
        await fleet.until(
            "web",
            "replaced",
            lambda d: _ready(2)(d) and victim not in {m["service_id"] for m in d["members"]},
        )
        print(f"\n{cluster.name}: scancel'ed replica replaced in {time.monotonic() - began:.1f} s")

        # A rolling update of the model (same served name) under load.
        before = {m["service_id"] for m in (await fleet.deployment("web"))["members"]}
        web = stub_deployment("web", replicas=2, model="ops-web", minutes=10, VLLM_MODEL="rev2")
        fleet.declare(web + broken)
        rolled = await fleet.until(
            "web",
            "rolled",
            lambda d: _ready(2)(d) and not before & {m["service_id"] for m in d["members"]},
        )
        assert {m["generation"] for m in rolled["members"]} == {rolled["generation"]}
        assert not load.failures, load.failures[:5]

        # A generation that cannot start: the roll stops, the old replicas serve.
        serving = {m["service_id"] for m in rolled["members"]}
        fleet.declare(
            stub_deployment(
                "web", replicas=2, model="ops-web", minutes=10, STUB_PYTHON="/nonexistent/python"
            )
            + broken
        )
        degraded = await fleet.until("web", "degraded", lambda d: d.get("state") == "degraded")
        print(f"{cluster.name}: broken generation: {degraded['reason']}")
        assert serving <= {m["service_id"] for m in degraded["members"]}
        assert not load.failures, load.failures[:5]

        # The recipe that always fails backs off; its submissions are few.
        failing = await fleet.deployment("broken")
        now = datetime.now(tz=UTC)
        submits = [
            a for a in failing["recent_actions"]
            if a["action"].startswith("submit.")
            and now - datetime.fromisoformat(a["at"]) < timedelta(minutes=1)
        ]  # fmt: skip
        print(f"{cluster.name}: always-failing deployment: {len(submits)} submissions in the "
              f"last minute; {failing['state']}: {failing['reason']}; next: "
              f"{failing['next_action']}")  # fmt: skip
        assert failing["state"] == "degraded"
        assert len(submits) <= 6

        # A bad edit of one deployment: named with its line; it keeps its
        # previous version, and the other deployment is untouched.
        fleet.declare(web + broken.replace("replicas = 1", "replicas = 99"))
        invalid = await fleet.until("broken", "refused", lambda d: bool(d.get("error")))
        assert invalid["replicas"]["wanted"] == 1
        assert invalid["error"].endswith("deployments.broken.replicas: Expected `int` <= 64"), (
            invalid["error"]
        )
        assert f"deployments-{cluster.name}.toml:" in invalid["error"]

        # All gateway processes restarted: every replica kept, none restarted.
        fleet.declare(web + broken)
        steady = await fleet.until("web", "old spec back", _ready(2))
        kept = {m["service_id"] for m in steady["members"]}
        await load.stop()
        await fleet.restart()
        await asyncio.sleep(6)  # several rounds of the new processes
        again = await fleet.until("web", "adopted", _ready(2))
        assert {m["service_id"] for m in again["members"]} == kept
        metrics = (await fleet.clients[0].get("/metrics", headers=ADMIN)).text
        assert 'gateway_deployment_replicas{deployment="web",state="running"} 2.0' in metrics

        # A successor Slurm cannot place (the node drained): the old replica
        # serves to its limit, and the status names Slurm's reason.
        tight = table("tight", STUB, replicas=1, minutes=2, tenant=None, lead=70,
                      VLLM_SERVED_MODEL_NAME="ops-tight")  # fmt: skip
        fleet.declare(web + broken + tight)
        old = (await fleet.until("tight", "ready", _ready(1)))["members"][0]["service_id"]
        await _node(cluster, "state=drain", "reason=gateway-deployments-test")
        try:
            queued = await fleet.until(
                "tight",
                "successor queued",
                lambda d: any(m["status"] == "pending" for m in d.get("members", [])),
                timeout=90,
            )
            waiting = queued["next_action"]["reason"]
            print(f"{cluster.name}: node drained: {waiting}")
            assert f"replica {old} serves until then" in waiting
            ended = await fleet.until(
                "tight",
                "old replica ended at its limit",
                lambda d: any(a["service_id"] == old and a["action"].startswith("end.")
                              for a in d.get("recent_actions", [])),
                timeout=120,
            )  # fmt: skip
            print(
                f"{cluster.name}: {[a for a in ended['recent_actions'] if a['service_id'] == old]}"
            )
        finally:
            await _node(cluster, "state=resume")
    finally:
        await load.stop()
        await fleet.close()


async def test_deployments_keep_serving(tmp_path: Path) -> None:
    scenarios = [
        _rollovers(cluster, tmp_path, gateways, vllm=cluster in VLLM_CLUSTERS)
        for cluster, gateways in zip(named("c2205", "c2411"), (2, 3), strict=False)
    ]
    scenarios += [_operations(cluster, tmp_path) for cluster in named("c2605")]
    # Elastic deployments and idle stops wait on their windows too: beside these.
    scenarios += [elastic.ramp(cluster, tmp_path) for cluster in named("c2411")]
    scenarios += [elastic.burst(cluster, tmp_path) for cluster in named("c2605")]
    scenarios += [idle_stop(cluster) for cluster in named("c2605")]
    results = await asyncio.gather(*scenarios, return_exceptions=True)
    for line in results:
        if isinstance(line, str):
            print(line)
            TIMINGS.append(line)
    errors = [
        f"{type(r).__name__}: {str(r)[:1500]}" for r in results if isinstance(r, BaseException)
    ]
    assert not errors, "\n\n".join(errors)


async def test_a_file_that_does_not_parse_stops_start_up(tmp_path: Path) -> None:
    cluster = CLUSTERS[0]
    fleet = Fleet(cluster, tmp_path, 1)
    fleet.file.write_text("[deployments.web\n")
    gateway = fleet.gateways[0]
    with pytest.raises(RuntimeError, match=r"GATEWAY_DEPLOYMENTS_FILE: .*toml:1: not TOML"):
        await asyncio.to_thread(gateway.start)

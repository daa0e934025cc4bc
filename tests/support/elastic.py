"""Elastic deployments on a live cluster: the scenarios that run beside the
other deployments' (tests/integration/test_deployments.py), each fleet under
a secret of its own so that the fleets on one cluster do not take each
other's replicas for removed deployments."""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from gateway.testing.clusters import LocalCluster
from tests.support.deployments import TEAM_A, Fleet, table

STUB = "testing/openai-stub"


def elastic(name: str, recipe: str, model: str, *, low: int, high: int, **fields: Any) -> str:
    """A [deployments.<name>] table between ``low`` and ``high`` replicas."""
    env = fields.pop("env", {})
    minutes, tenant = fields.pop("minutes", 10), fields.pop("tenant", "team-a")
    text = table(
        name,
        recipe,
        replicas=0,
        minutes=minutes,
        tenant=tenant,
        VLLM_SERVED_MODEL_NAME=model,
        **env,
    )
    bounds = [f"min_replicas = {low}", f"max_replicas = {high}"]
    bounds += [f"{k} = {v}" for k, v in fields.items()]
    return text.replace("replicas = 0\n", "\n".join(bounds) + "\n", 1)


def unique(name: str) -> str:
    """A name of its own per run: Slurm remembers ended jobs a while, and a
    deployment takes every job of its name as its own."""
    return f"{name}-{os.urandom(3).hex()}"


def chat(model: str, *, stream: bool = False, tokens: int = 4) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": tokens,
        "stream": stream,
    }


class Ramp:
    """``workers`` clients in a loop of streamed chats, each ~1 s at the stub,
    through the fleet's gateways in turn, waiting for a start when at zero."""

    def __init__(self, fleet: Fleet, model: str) -> None:
        self.fleet, self.model = fleet, model
        self.tasks: list[asyncio.Task[None]] = []
        self.answers: Counter[int] = Counter()
        self.failures: list[str] = []

    def set(self, workers: int) -> None:
        while len(self.tasks) > workers:
            self.tasks.pop().cancel()
        while len(self.tasks) < workers:
            self.tasks.append(asyncio.create_task(self._worker(len(self.tasks))))

    async def _worker(self, index: int) -> None:
        turn = 0
        while True:
            client = self.fleet.clients[(index + turn) % len(self.fleet.clients)]
            turn += 1
            headers = {**TEAM_A, "Prefer": "wait=120"}
            try:
                answer = await client.post(
                    "/v1/chat/completions",
                    json=chat(self.model, stream=True, tokens=10),
                    headers=headers,
                    timeout=180,
                )
            except httpx.HTTPError as exc:
                self.failures.append(f"{type(exc).__name__}: {exc}")
                continue
            self.answers[answer.status_code] += 1
            if answer.status_code != 200 or not answer.text.rstrip().endswith("[DONE]"):
                self.failures.append(f"{answer.status_code} {answer.text[:200]}")


async def ramp(cluster: LocalCluster, folder: Path) -> str:
    """0 -> 1 -> 3 -> 1 -> 0 replicas through two gateway processes."""
    model, name = f"ramp-{cluster.name}", unique("ramp")
    fleet = Fleet(cluster, folder / name, 2)
    await fleet.start()
    ramp = Ramp(fleet, model)
    rows: list[str] = []
    ran: set[int] = set()
    seen: list[set[int]] = []
    most = 0
    try:
        fleet.declare(
            elastic(
                name, STUB, model, low=0, high=3, target_load=2, scale_up_seconds=4,
                scale_down_seconds=12, idle_seconds=20,
                env={"STUB_CHUNK_DELAY_MS": "100"},
            )
        )  # fmt: skip
        await fleet.everywhere(name, "declared at zero", lambda d: d.get("state") == "ready")
        began = time.monotonic()
        # (workers, seconds): a load of about one request per worker.
        for workers, seconds in ((1, 25), (6, 45), (2, 40), (0, 60)):
            ramp.set(workers)
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                status = await fleet.deployment(name, gateway=len(rows) % 2)
                jobs = await asyncio.to_thread(fleet.squeue, STUB)
                ran |= {job for job, state, _ in jobs if state == "RUNNING"}
                staying = [m for m in status["members"] if not m["leaving"]]
                seen.append({job for job, _, _ in jobs})
                most = max(most, len(jobs))
                rows.append(
                    f"{time.monotonic() - began:5.0f} s | workers {workers} | "
                    f"wanted {status['replicas']['wanted']} | running "
                    f"{status['replicas']['running']} | staying {len(staying)} | "
                    f"squeue {len(jobs)} | load/replica {status['scaling']['load_per_replica']}"
                )
                await asyncio.sleep(3)
        status = await fleet.deployment(name)
        print(f"\nramp on {cluster.name} (2 gateways, target 2, max 3):")
        print("\n".join(rows[::2]))
        decisions = [f"{d['action']} {d['reason']}" for d in status["scaling"]["decisions"]]
        print("decisions (gateway 0):\n  " + "\n  ".join(decisions))
        assert status["replicas"]["wanted"] == 0, status
        assert not await asyncio.to_thread(fleet.squeue, STUB)
        # When both gateways decide a step, the later one's twin job waits its
        # idempotency hold and is cancelled before it runs: squeue may list it
        # for a moment. Replicas are the jobs that ran; never more than 3 at once.
        at_once = max(len(ids & ran) for ids in seen)
        assert at_once <= 3, rows
        assert not ramp.failures, ramp.failures[:5]
        assert max(int(r.split("wanted ")[1].split()[0]) for r in rows) == 3, rows
        # One job per slot a scale step opened: 1 at the first request, 2 more at 6.
        assert len(ran) == 3, ran
        return (
            f"elastic ramp on {cluster.name}: 0 -> 1 -> 3 -> 1 -> 0 replicas, "
            f"{sum(ramp.answers.values())} requests {dict(ramp.answers)}, 0 failed; "
            f"at most {at_once} replicas at once (squeue {most} with twins); "
            f"{len(ran)} jobs ran for 3 slots"
        )
    finally:
        ramp.set(0)
        await fleet.close()


async def burst(cluster: LocalCluster, folder: Path) -> str:
    """200 first requests at once to a deployment at zero: one job."""
    model, name = f"burst-{cluster.name}", unique("burst")
    fleet = Fleet(cluster, folder / name, 1)
    await fleet.start()
    try:
        fleet.declare(elastic(name, STUB, model, low=0, high=2, idle_seconds=600))
        await fleet.until(name, "declared at zero", lambda d: d.get("state") == "ready")
        listed = (await fleet.clients[0].get("/v1/models", headers=TEAM_A)).json()["data"]
        assert [m["scaled_to_zero"] for m in listed if m["id"] == model] == [True], listed
        client = fleet.clients[0]
        answers = await asyncio.gather(
            *(
                client.post("/v1/chat/completions", json=chat(model), headers=TEAM_A)
                for _ in range(200)
            )
        )
        codes = Counter(a.status_code for a in answers)
        retry = sorted({a.headers.get("retry-after") for a in answers if a.status_code == 503})
        status = await fleet.until(
            name, "one replica answers", lambda d: d["replicas"]["running"] == 1, timeout=120
        )
        submitted = [a for a in status["recent_actions"] if a["action"].startswith("submit.")]
        ours = {int(m["service_id"]) for m in status["members"]}
        jobs = [j for j in await asyncio.to_thread(fleet.squeue, STUB) if j[0] in ours]
        # Refused until the one replica answers, then served.
        assert set(codes) <= {200, 503} and codes[503] > 0, codes
        refused = [a for a in answers if a.status_code == 503]
        assert all(a.json()["error"]["code"] == "model_not_ready" for a in refused)
        assert len(submitted) == 1 and len(jobs) == 1, (submitted, jobs)
        assert [m["submitted_for"] for m in status["members"]] == ["demand"]
        served = await client.post("/v1/chat/completions", json=chat(model), headers=TEAM_A)
        assert served.status_code == 200, served.text
        return (
            f"burst on {cluster.name}: 200 first requests at zero -> {dict(codes)} "
            f"(Retry-After {retry}), {len(submitted)} job submitted, then 200"
        )
    finally:
        await fleet.close()

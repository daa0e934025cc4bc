"""vLLM from a container image with Apptainer on cluster c2605 (Slurm 26.05,
Debian sid), whose own Python cannot run vLLM's CPU build; the site overlay is
deploy/local/site-c2605.toml. deploy/local/vllm-image.sh (part of `make
test`) leaves the image there as an OCI archive; a scenario converts it into
a cache folder of its own in the job user's home (cold), then starts from it
(warm), and removes the folder.

``cold_and_warm`` waits minutes on conversions and vLLM starts: it runs beside
tests/integration/test_stop.py's walk, which waits on a time limit.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
import tomllib
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from gateway.testing.clusters import LocalCluster
from tests.support.clusters import named
from tests.support.gateway_process import ROOT, serving
from tests.support.polling import poll

SITE = ROOT / "deploy" / "local" / "site-c2605.toml"
STARTUP = 600.0  # seconds: a conversion, then two vLLMs starting on two cores
ACTIVE = ("pending", "building", "starting")


def site_file(folder: Path, **runtime: str) -> Path:
    """deploy/local/site-c2605.toml with these runtime values of the vLLM recipe."""
    site = tomllib.loads(SITE.read_text())
    site["recipes"]["inference/vllm"]["runtime"].update(runtime)
    lines = []
    for table, values in [
        ("partitions", site["partitions"]),
        ('recipes."inference/vllm".resources', site["recipes"]["inference/vllm"]["resources"]),
        ('recipes."inference/vllm".runtime', site["recipes"]["inference/vllm"]["runtime"]),
    ]:
        lines.append(f"[{table}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    path = folder / f"site-{uuid.uuid4().hex[:8]}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@contextmanager
def own_cache() -> Iterator[tuple[str, Path]]:
    """A cache folder of this test's own in gwuser's home: (as the recipe names
    it, where the host sees it). Removed afterwards."""
    (cluster,) = named("c2605")
    name = f".cache/gw-test-{uuid.uuid4().hex[:8]}"
    home = Path(cluster.chroot) / "home" / cluster.user
    host = home / name
    if not (home / ".cache").exists():
        # The user's, as a job of its would make it: made by root, no job of
        # the user could make its cache in it (a fresh machine's first run).
        (home / ".cache").mkdir()
        os.chown(home / ".cache", *cluster.user_ids(cluster.user))
    try:
        yield f"~/{name}", host
    finally:
        shutil.rmtree(host, ignore_errors=True)


async def walk(
    api: httpx.AsyncClient, sid: str, seen: dict[str, float], t0: float
) -> dict[str, Any]:
    """Polls the service until it leaves the active phases; ``seen``: when each
    status was first seen, in seconds since ``t0``."""

    async def status() -> dict[str, Any]:
        body: dict[str, Any] = (await api.get(f"/api/v1/services/{sid}/status")).json()
        seen.setdefault(body["status"], round(time.monotonic() - t0, 1))
        return body

    return await poll(status, lambda s: s["status"] not in ACTIVE, timeout=STARTUP, interval=0.5)


def phases(seen: dict[str, float]) -> str:
    return ", ".join(f"{status} {at:.0f} s" for status, at in seen.items())


async def cold_and_warm(folder: Path) -> str:
    """Two services at once on a cold cache (one conversion), a third warm once
    the image is there, while those start; a
    prompt, a stream and /v1 through the first. The summary's line."""
    (cluster,) = named("c2605")
    with own_cache() as (image_cache, host_cache):
        site = site_file(folder, image_cache=image_cache)
        return await _cold_and_warm(cluster, site, host_cache)


async def _cold_and_warm(cluster: LocalCluster, site: Path, host_cache: Path) -> str:
    async with serving(cluster, GATEWAY_SITE_FILE=str(site)) as api:
        # Two services at once on a cold cache: one converts, the other waits.
        t0 = time.monotonic()
        ids = [
            (await api.post("/api/v1/services", json={"recipe_name": "inference/vllm"})).json()[
                "id"
            ]
            for _ in range(2)
        ]
        warm: asyncio.Task[dict[str, Any]] | None = None
        try:
            seen: list[dict[str, float]] = [{}, {}]
            reasons: list[set[str]] = [set(), set()]
            converted_once = asyncio.Event()  # both have left building

            async def follow(i: int) -> dict[str, Any]:
                async def status() -> dict[str, Any]:
                    body: dict[str, Any] = (
                        await api.get(f"/api/v1/services/{ids[i]}/status")
                    ).json()
                    seen[i].setdefault(body["status"], round(time.monotonic() - t0, 1))
                    if body["status"] == "building":
                        reasons[i].add(body["status_reason"])
                    if all({"starting", "running"} & s.keys() for s in seen):
                        converted_once.set()
                    return body

                return await poll(
                    status, lambda s: s["status"] not in ACTIVE, timeout=STARTUP, interval=0.5
                )

            # Warm: once the image is in the cache, a third, while the two start.
            warm_seen: dict[str, float] = {}

            async def warm_walk() -> dict[str, Any]:
                await converted_once.wait()
                started = time.monotonic()
                created = await api.post("/api/v1/services", json={"recipe_name": "inference/vllm"})
                ids.append(created.json()["id"])
                return await walk(api, ids[2], warm_seen, started)

            warm = asyncio.create_task(warm_walk())
            ended = await asyncio.gather(follow(0), follow(1))
            assert [e["status"] for e in ended] == ["running", "running"], ended
            for walked in seen:
                order = [s for s in ("pending", "building", "starting", "running") if s in walked]
                assert list(walked) == order, walked
            # One conversion: one job's log says it converted, the other's that it waited.
            cold_ids = ids[:2]  # the warm one may be there too by now
            logs = [
                (await api.get(f"/api/v1/services/{sid}/logs")).json()["logs"] for sid in cold_ids
            ]
            converted = [("converted in" in log) for log in logs]
            assert sorted(converted) == [False, True], logs
            waiter = logs[converted.index(False)]
            assert "waiting for another job converting the image" in waiter, waiter
            assert any("converting the image vllm-cpu" in r for r in reasons[0] | reasons[1])
            images = sorted(p.name for p in host_cache.iterdir() if not p.name.startswith("."))
            assert images == ["vllm-cpu-0.32.0-1.sif"], images
            assert not [p for p in host_cache.iterdir() if ".part" in p.name]
            cold = [phases(s) for s in seen]

            await api.delete(f"/api/v1/services/{ids[1]}")

            # Meanwhile, the first: its model, a prompt, a stream, the front door.
            sid = ids[0]
            models = (await api.get(f"/api/v1/vllm/{sid}/models")).json()
            assert models["models"] == ["Qwen/Qwen2.5-0.5B-Instruct"], models
            answer = await api.post(
                f"/api/v1/vllm/{sid}/prompt", json={"prompt": "Hello", "max_tokens": 8}
            )
            assert answer.status_code == 200 and answer.json()["success"], answer.text
            async with api.stream(
                "POST",
                f"/api/v1/vllm/{sid}/prompt",
                json={"prompt": "Count to five", "max_tokens": 8, "stream": True},
            ) as stream:
                assert stream.status_code == 200
                text = "".join([chunk async for chunk in stream.aiter_text()])
            assert text.rstrip().endswith("data: [DONE]"), text[-200:]
            chat = await api.post(
                "/v1/chat/completions",
                json={
                    "model": "Qwen/Qwen2.5-0.5B-Instruct",
                    "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 5,
                },
            )
            assert chat.status_code == 200, chat.text
            assert chat.json()["choices"][0]["message"]["content"] is not None

            done = await warm
            assert done["status"] == "running", done
            assert "building" not in warm_seen or warm_seen["building"] < warm_seen["starting"]
            log = (await api.get(f"/api/v1/services/{ids[2]}/logs")).json()["logs"]
            assert "converted in" not in log and "converting" not in log, log
            for sid in (ids[0], ids[2]):
                stopped = await api.delete(f"/api/v1/services/{sid}")
                assert stopped.json()["status"] == "cancelled", stopped.text
            return (
                f"vLLM in Apptainer on c2605, cold (two at once, one conversion): "
                f"{cold[0]} | {cold[1]}; warm: {phases(warm_seen)}; "
                f"prompt, stream and /v1/chat/completions 200"
            )
        finally:
            if warm is not None and not warm.done():
                warm.cancel()  # the cold ones failed: it waits for nothing
            for sid in ids:
                await api.delete(f"/api/v1/services/{sid}")

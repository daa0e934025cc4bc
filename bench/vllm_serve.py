"""vLLM's own serving benchmark (`vllm bench serve`) through the gateway's
OpenAI front door (/v1) and straight to the same vLLM service, side by side.

Starts a gateway process on the local cluster with the vLLM runtime (c2205)
with deploy/local/tenants.toml, starts one vLLM service of the recipe's
default tiny chat model through it (served as "tiny-chat"), then runs
`vllm bench serve` from the cluster's chroot (which shares the host's
network) in interleaved rounds: gateway, direct, gateway, direct... Each
round sends the same random dataset (fixed seed) to /v1/completions, at each
of several request rates (Poisson arrivals; ``inf``: all at once). With
``--pin`` (the default on a machine of 2 CPUs or more) vLLM's processes run on
the first CPU and the gateway and the benchmark client on the second, so that
what the gateway costs is not vLLM's contention for the same core. The
gateway path uses team-a's API key; the direct path the service's own key
(vLLM checks it), which only the gateway's secret derives. Prints request
and output token throughput, mean and median time to first token for both
paths, and their ratios (gateway / direct). Stops the service at the end.

    python bench/vllm_serve.py [--rounds 2] [--prompts 32] [--rates 2,8,inf] [--no-pin]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.proxy import listener, process_tree  # noqa: E402
from gateway.testing.clusters import LocalCluster, discover, upstream_key  # noqa: E402
from tests.support.gateway_process import GatewayProcess  # noqa: E402

TEAM_A = "sgw_local-team-a-key"  # deploy/local/tenants.toml
SERVED = "tiny-chat"
TOKENIZER = "/opt/models/tiny-chat"  # what Qwen/Qwen2.5-0.5B-Instruct resolves to locally
VLLM = "/opt/vllm/bin/vllm"  # inside the chroot
SCRATCH = "/tmp"  # noqa: S108  (the chroot's; each run makes its own folder in it)
METRICS = {
    "request_throughput": "req/s",
    "output_throughput": "tok/s",
    "mean_ttft_ms": "ms",
    "median_ttft_ms": "ms",
}


async def start_service(api: httpx.AsyncClient, limit: float) -> tuple[str, dict[str, Any]]:
    """Start one vLLM service served as ``SERVED``; its id and status once running."""
    body = {
        "recipe_name": "inference/vllm",
        "config": {"environment": {"VLLM_SERVED_MODEL_NAME": SERVED}},
    }
    created = await api.post("/api/v1/services", json=body)
    if created.status_code != 201:
        raise SystemExit(f"could not create the service: {created.status_code} {created.text}")
    sid: str = created.json()["id"]
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        status: dict[str, Any] = (await api.get(f"/api/v1/services/{sid}/status")).json()
        if status["status"] == "running":
            return sid, status
        if status["status"] in ("failed", "cancelled", "completed", "timeout"):
            await api.delete(f"/api/v1/services/{sid}")
            raise SystemExit(f"service {sid} ended: {status['status_reason']}")
        await asyncio.sleep(1)
    await api.delete(f"/api/v1/services/{sid}")
    raise SystemExit(f"service {sid} not running after {limit}s")


def pin(pids: list[int], cpu: int) -> None:
    """Every thread of ``pids`` onto ``cpu``."""
    for pid in pids:
        subprocess.run(
            ["taskset", "-a", "-p", "-c", str(cpu), str(pid)],
            check=True,
            stdout=subprocess.DEVNULL,
        )


def bench_serve(
    cluster: LocalCluster,
    base_url: str,
    key: str,
    args: argparse.Namespace,
    tag: str,
    rate: str = "inf",
) -> dict[str, Any]:
    """One `vllm bench serve` run against ``base_url``; its saved result."""
    # A fresh folder in the chroot's /tmp, for the result and vLLM's caches.
    host_dir = Path(tempfile.mkdtemp(prefix="vllm-bench-", dir=cluster.host_path(SCRATCH)))
    out_dir = f"{SCRATCH}/{host_dir.name}"
    command = [
        "chroot", cluster.chroot, VLLM, "bench", "serve",
        "--backend", "openai",
        "--base-url", base_url,
        "--endpoint", "/v1/completions",
        "--model", SERVED,
        "--tokenizer", TOKENIZER,
        "--dataset-name", "random",
        "--random-input-len", str(args.input_len),
        "--random-output-len", str(args.output_len),
        "--num-prompts", str(args.prompts),
        "--seed", str(args.seed),
        "--ignore-eos",
        "--disable-tqdm",
        "--save-result",
        "--result-dir", out_dir,
        "--result-filename", "result.json",
        "--request-rate", rate,
    ]  # fmt: skip
    if args.pin:
        command = ["taskset", "-c", "1", *command]
    env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": out_dir,
        "OPENAI_API_KEY": key,
        "HF_HOME": "/opt/hf",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    started = time.monotonic()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise SystemExit(
            f"vllm bench serve ({tag}) failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
        )
    result: dict[str, Any] = json.loads((host_dir / "result.json").read_text())
    shutil.rmtree(host_dir)
    if result["completed"] != args.prompts:
        raise SystemExit(f"{tag}: {result['completed']} of {args.prompts} requests completed")
    print(
        f"  {tag:>8}: {result['request_throughput']:6.2f} req/s  "
        f"{result['output_throughput']:7.1f} tok/s  "
        f"TTFT mean {result['mean_ttft_ms']:7.1f} ms  median {result['median_ttft_ms']:7.1f} ms  "
        f"({time.monotonic() - started:.0f} s)",
        flush=True,
    )
    return result


async def run(cluster: LocalCluster, gateway: GatewayProcess, args: argparse.Namespace) -> None:
    headers = {"Authorization": f"Bearer {TEAM_A}"}
    async with httpx.AsyncClient(base_url=gateway.url, headers=headers, timeout=60) as api:
        sid, status = await start_service(api, 600)
        try:
            endpoint: str = status["endpoint"]
            key = await upstream_key(cluster, gateway.env, int(sid))
            if args.pin:
                assert gateway.process is not None
                vllm = process_tree(listener(int(endpoint.rsplit(":", 1)[1])))
                pin(vllm, 0)
                pin(process_tree(gateway.process.pid), 1)
            print(
                f"service {sid} at {endpoint}; {args.rounds} rounds of {args.prompts} prompts "
                f"at each rate of {args.rates} req/s, random dataset (seed {args.seed}), "
                f"input {args.input_len}, output {args.output_len} tokens; "
                + ("vLLM on CPU 0, gateway and client on CPU 1" if args.pin else "not pinned"),
                flush=True,
            )
            paths = {"gateway": (f"{gateway.url}", TEAM_A), "direct": (endpoint, key)}
            # One untimed round each first: vLLM's first requests are slower.
            for name, (url, credential) in paths.items():
                await asyncio.to_thread(bench_serve, cluster, url, credential, args, f"warm-{name}")
            results: dict[tuple[str, str], list[dict[str, Any]]] = {}
            for rate in args.rates.split(","):
                print(f"request rate {rate}:", flush=True)
                for _ in range(args.rounds):
                    for name, (url, credential) in paths.items():
                        result = await asyncio.to_thread(
                            bench_serve, cluster, url, credential, args, name, rate
                        )
                        results.setdefault((rate, name), []).append(result)
        finally:
            await api.delete(f"/api/v1/services/{sid}")
    print(f"\nmedians over {args.rounds} rounds:\n")
    print("| rate (req/s) | metric | gateway | direct | gateway / direct |")
    print("|---|---|---|---|---|")
    for rate in args.rates.split(","):
        for metric, unit in METRICS.items():
            gw = statistics.median(r[metric] for r in results[(rate, "gateway")])
            direct = statistics.median(r[metric] for r in results[(rate, "direct")])
            print(
                f"| {rate} | {metric} | {gw:.2f} {unit} | {direct:.2f} {unit} | {gw / direct:.3f} |"
            )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds per path (>= 2)")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cluster", default="c2205", help="local cluster with the vLLM runtime")
    parser.add_argument("--rates", default="2,8,inf", help="request rates, comma-separated")
    parser.add_argument(
        "--pin",
        action=argparse.BooleanOptionalAction,
        default=len(os.sched_getaffinity(0)) >= 2,
        help="vLLM on CPU 0, the gateway and the client on CPU 1",
    )
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error("--rounds must be at least 2")
    cluster = next((c for c in discover() if c.name == args.cluster), None)
    if cluster is None:
        raise SystemExit(f"no local cluster {args.cluster}; run `bash deploy/local/cluster.sh up`")
    if not (Path(cluster.chroot) / VLLM.lstrip("/")).exists():
        raise SystemExit(
            f"cluster {args.cluster} has no vLLM runtime; run deploy/local/vllm-runtime.sh"
        )
    tenants = str(ROOT / "deploy" / "local" / "tenants.toml")
    with GatewayProcess(cluster, GATEWAY_AUTH_FILE=tenants) as gateway:
        asyncio.run(run(cluster, gateway, args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

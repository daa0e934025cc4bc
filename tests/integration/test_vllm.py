"""Real vLLM (CPU build, tiny local models) started by Slurm through the gateway.

Runs on the clusters whose chroot has the local vLLM runtime
(deploy/local/vllm-runtime.sh, part of `make test`): cluster c2205.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.testing.clusters import LocalCluster, upstream_key
from tests.support.clusters import NO_VLLM, TIMINGS, VLLM_CLUSTERS, fault_line, parametrize
from tests.support.gateway_process import GatewayProcess
from tests.support.polling import poll

STARTUP = 420.0  # seconds; two vLLMs starting at once on two cores


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    parametrize(metafunc, "gateway", VLLM_CLUSTERS, per_module=True, missing=NO_VLLM)


@pytest.fixture(scope="module")
def gateway(request: pytest.FixtureRequest) -> Iterator[GatewayProcess]:
    with GatewayProcess(request.param) as process:
        yield process


@pytest.fixture
async def api(gateway: GatewayProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=gateway.url, timeout=120) as client:
        yield client


async def status_of(api: httpx.AsyncClient, sid: str) -> dict[str, Any]:
    body: dict[str, Any] = (await api.get(f"/api/v1/services/{sid}/status")).json()
    return body


async def create(
    api: httpx.AsyncClient,
    environment: dict[str, str] | None = None,
    recipe: str = "inference/vllm",
) -> str:
    """Start a service; its id."""
    body: dict[str, Any] = {"recipe_name": recipe}
    if environment:
        body["config"] = {"environment": environment}
    sid: str = (await api.post("/api/v1/services", json=body)).json()["id"]
    return sid


async def settled(api: httpx.AsyncClient, sid: str, timeout: float) -> dict[str, Any]:
    """The service's status once it has left pending, building and starting."""
    return await poll(
        lambda: status_of(api, sid),
        lambda s: s["status"] not in ("pending", "building", "starting"),
        timeout=timeout,
        interval=1.0,
    )


def chroot_processes(cluster: LocalCluster, wanted: Callable[[Path], bool]) -> list[int]:
    """PIDs of processes rooted in the cluster's chroot for which ``wanted(/proc/PID)``."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if cluster.roots(proc) and wanted(proc):
                found.append(int(proc.name))
        except OSError:
            continue  # gone meanwhile
    return found


def vllm_processes(cluster: LocalCluster, port: int) -> list[int]:
    """The cluster's vLLM processes whose command names ``port``."""

    def wanted(proc: Path) -> bool:
        cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        return "vllm" in cmd and f"--port {port}" in cmd

    return chroot_processes(cluster, wanted)


def job_processes(cluster: LocalCluster, job_id: str) -> list[int]:
    """The cluster's processes that belong to Slurm job ``job_id``."""
    tag = f"SLURM_JOB_ID={job_id}".encode()

    def wanted(proc: Path) -> bool:
        return tag in (proc / "environ").read_bytes().split(b"\0")

    return chroot_processes(cluster, wanted)


async def service_key(gateway: GatewayProcess, sid: str) -> tuple[str, str]:
    """The key the gateway derives for a service, and the job's comment."""
    key = await upstream_key(gateway.cluster, gateway.env, int(sid))
    async with gateway.cluster.client() as slurm:
        comment = (await slurm.get_job(int(sid))).comment
    return key, comment


def long_model_path(cluster: LocalCluster, length: int = 320) -> str:
    """A model folder whose path is ``length`` characters long (a link to the
    tiny chat model), as a site's deep model trees have."""
    base = "/tmp/gw-long-model"
    parts = [base]
    while len("/".join(parts)) + len("/tiny-chat") < length:
        parts.append("d" * min(60, length - len("/".join(parts)) - len("/tiny-chat") - 1))
    path = "/".join([*parts, "tiny-chat"])
    link = cluster.host_path(path)
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.is_symlink():
        link.symlink_to("/opt/models/tiny-chat")
    return path


async def sse_events(response: httpx.Response) -> AsyncIterator[str]:
    async for line in response.aiter_lines():
        if line.startswith("data: "):
            yield line[len("data: ") :]


async def test_vllm_end_to_end(gateway: GatewayProcess, api: httpx.AsyncClient) -> None:
    cluster = gateway.cluster
    started = time.monotonic()
    # The seed's "default model" and "custom model" examples, at once.
    chat = (await api.post("/api/v1/services", json={"recipe_name": "inference/vllm"})).json()
    base = (
        await api.post(
            "/api/v1/services",
            json={
                "recipe_name": "inference/vllm",
                "config": {"environment": {"VLLM_MODEL": "gpt2"}},
            },
        )
    ).json()
    ids = [chat["id"], base["id"]]
    try:
        seen: dict[str, list[str]] = {sid: [] for sid in ids}

        async def both() -> list[dict[str, Any]]:
            states = [await status_of(api, sid) for sid in ids]
            for sid, s in zip(ids, states, strict=True):
                if not seen[sid] or seen[sid][-1] != s["status"]:
                    seen[sid].append(s["status"])
            return states

        states = await poll(
            both,
            lambda ss: all(s["status"] in ("running", "failed", "cancelled") for s in ss),
            timeout=STARTUP,
            interval=0.25,
            what="both vLLM services running",
        )
        assert [s["status"] for s in states] == ["running", "running"], (states, seen)
        TIMINGS.append(
            f"vLLM: POST to running took {time.monotonic() - started:.0f} s "
            f"(two services starting at once; walks: {seen})"
        )
        order = ["pending", "building", "starting", "running"]
        for walk in seen.values():
            assert walk == [s for s in order if s in walk], walk
            assert "starting" in walk
        # Building lasts a second or two, about the job view's refresh interval,
        # so a poller may miss it; each job's log records it.
        for sid in ids:
            logs = (await api.get(f"/api/v1/services/{sid}/logs")).json()
            assert "gateway: phase building" in logs["logs"], logs
        endpoints = [s["endpoint"] for s in states]
        assert endpoints[0] != endpoints[1]

        listed = (await api.get("/api/v1/vllm/services")).json()["vllm_services"]
        mine = {s["id"]: s for s in listed if s["id"] in ids}
        assert mine[chat["id"]]["endpoint"] == endpoints[0]
        assert mine[chat["id"]]["model"] == "Qwen/Qwen2.5-0.5B-Instruct"
        assert mine[base["id"]]["model"] == "gpt2"

        models = (await api.get(f"/api/v1/vllm/{chat['id']}/models")).json()
        assert models["models"] == ["Qwen/Qwen2.5-0.5B-Instruct"]

        # vLLM wants the service's own key: finding its endpoint in the job's
        # comment (any cluster user can) is no way in.
        key, comment = await service_key(gateway, chat["id"])
        async with httpx.AsyncClient(timeout=30) as direct:
            # vLLM's own --api-key leaves /invocations (SageMaker's prompt
            # route) open; the recipe's middleware does not.
            invoke = {"model": "Qwen/Qwen2.5-0.5B-Instruct", "prompt": "hi", "max_tokens": 1}
            sneak = await direct.post(endpoints[0] + "/invocations", json=invoke)
            assert sneak.status_code == 401, sneak.text
            url = endpoints[0] + "/v1/models"
            assert (await direct.get(url)).status_code == 401
            wrong = {"Authorization": "Bearer " + "0" * len(key)}
            assert (await direct.get(url, headers=wrong)).status_code == 401
            right = {"Authorization": f"Bearer {key}"}
            assert (await direct.get(url, headers=right)).status_code == 200
        assert key not in comment

        # The seed's prompt examples: a chat model, then gpt2 (no chat template).
        answer = await api.post(
            f"/api/v1/vllm/{chat['id']}/prompt",
            json={"prompt": "Tell me a joke about programming", "max_tokens": 100},
        )
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["success"] is True
        assert body["endpoint_used"] == "chat"
        assert body["response"]
        assert body["usage"]["completion_tokens"] > 0
        assert body["finish_reason"] in ("length", "stop")
        advanced = await api.post(
            f"/api/v1/vllm/{base['id']}/prompt",
            json={
                "prompt": "Write a short haiku about AI",
                "model": "gpt2",
                "max_tokens": 64,
                "temperature": 0.7,
            },
        )
        assert advanced.status_code == 200, advanced.text
        assert advanced.json()["endpoint_used"] == "completions"
        assert advanced.json()["model"] == "gpt2"

        # Streaming: SSE chunks as vLLM sends them, ending in [DONE].
        async with api.stream(
            "POST",
            f"/api/v1/vllm/{chat['id']}/prompt",
            json={"prompt": "Count to five", "max_tokens": 16, "stream": True},
        ) as stream:
            assert stream.status_code == 200
            assert stream.headers["content-type"].startswith("text/event-stream")
            events = [e async for e in sse_events(stream)]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert len(chunks) > 2
        assert any(c["choices"] and c["choices"][0]["delta"].get("content") for c in chunks)

        # The gateway's own log has one line per request, and no user data.
        # (A stream's line is written once its last chunk is sent: poll.)
        own_log = await poll(
            lambda: asyncio.to_thread(gateway.log.read_text),
            lambda text: text.count(f"/api/v1/vllm/{chat['id']}/prompt") >= 2,
            timeout=10,
            what="both prompts in the access log",
        )
        assert "Tell me a joke about programming" not in own_log
        assert "chat.completion.chunk" not in own_log
        assert own_log.count(f"/api/v1/vllm/{chat['id']}/prompt") == 2

        logs = (await api.get(f"/api/v1/services/{chat['id']}/logs")).json()["logs"]
        assert "Starting vLLM API server" in logs or "Application startup complete" in logs
        assert key not in logs

        port = int(endpoints[0].rsplit(":", 1)[1])
        assert vllm_processes(cluster, port)
        stopped = await api.delete(f"/api/v1/services/{chat['id']}")
        assert stopped.status_code == 200
        assert stopped.json()["status"] == "cancelled"
        await poll(
            lambda: asyncio.to_thread(vllm_processes, cluster, port),
            lambda pids: not pids,
            timeout=30,
            what="vLLM processes gone",
        )

        # Fault: vLLM itself dies inside a running service. The service ends
        # `failed` with the reason, and stopping it is still a 200.
        port = int(endpoints[1].rsplit(":", 1)[1])
        for pid in vllm_processes(cluster, port):
            os.kill(pid, signal.SIGKILL)
        during = await api.post(f"/api/v1/vllm/{base['id']}/prompt", json={"prompt": "hi"})
        ended = await poll(
            lambda: status_of(api, base["id"]),
            lambda s: s["status"] not in ("running", "starting"),
            timeout=60,
            what="the service noticing that vLLM died",
        )
        assert ended["status"] == "failed", ended
        assert "vLLM exited" in ended["status_reason"], ended
        for _ in range(2):
            again = await api.delete(f"/api/v1/services/{base['id']}")
            assert again.status_code == 200, again.text
            assert again.json()["status"] == "failed"
        fault_line(
            cluster, "vLLM killed (SIGKILL) inside a running service",
            f"prompt {during.status_code}",
            f"status `failed` (\"{ended['status_reason']}\"), stop 200 twice", 0,
        )  # fmt: skip
    finally:
        for sid in ids:
            await api.delete(f"/api/v1/services/{sid}")


async def test_client_disconnect_cancels_the_upstream_request(
    gateway: GatewayProcess, api: httpx.AsyncClient
) -> None:
    # A generation that would run for a minute, so that an early end tells a
    # cancel apart from a natural one. On this machine every process outside
    # vLLM can stall for seconds while vLLM generates (README, "Known limits"),
    # the test client included: the margin must be far wider than a stall.
    max_tokens = 15_000
    # The model's path is long (its folder is deep): the job's comment still
    # fits Slurm's 1024-character limit, and the service reaches running.
    model = long_model_path(gateway.cluster)
    assert len(model) >= 300
    sid = await create(api, {"VLLM_MAX_MODEL_LEN": "16384", "VLLM_MODEL": model})
    try:
        running = await settled(api, sid, STARTUP)
        assert running["status"] == "running", running
        metrics_url = running["endpoint"] + "/metrics"
        key, _ = await service_key(gateway, sid)  # vLLM wants it on /metrics too

        async def metric(name: str) -> float:
            response = await api.get(metrics_url, headers={"Authorization": f"Bearer {key}"})
            assert response.status_code == 200, response.text
            text = response.text
            pattern = rf"^{re.escape(name)}\{{[^}}]*\}} ([0-9.e+]+)$"
            return sum(float(value) for value in re.findall(pattern, text, re.M))

        tokens, finished = "vllm:generation_tokens_total", "vllm:request_success_total"
        tokens_before, finished_before = await metric(tokens), await metric(finished)
        async with (
            httpx.AsyncClient(base_url=gateway.url, timeout=60) as client,
            client.stream(
                "POST",
                f"/api/v1/vllm/{sid}/prompt",
                # Greedy: the tiny model then never says its end-of-text token.
                json={
                    "prompt": "Tell a long story",
                    "max_tokens": max_tokens,
                    "temperature": 0,
                    "stream": True,
                },
            ) as stream,
        ):
            assert stream.status_code == 200
            async for line in stream.aiter_lines():
                if line.startswith("data: "):
                    break  # the first chunk arrived: vLLM is generating
        left = time.monotonic()  # leaving the block closed the connection
        await poll(
            lambda: metric("vllm:num_requests_running"),
            lambda n: n == 0,
            timeout=120,
            interval=0.05,
            what="no request running in vLLM",
        )
        stopped_after = time.monotonic() - left
        await asyncio.sleep(1)  # vLLM updates its counters a moment later
        generated = await metric(tokens) - tokens_before
        TIMINGS.append(
            f"vLLM disconnect: no request running {stopped_after:.2f} s after the client left; "
            f"{generated:.0f} of {max_tokens} tokens generated"
        )
        # vLLM aborted the request: it never finished (vLLM counts finished
        # requests by reason, aborts not), and stopped far short of its end.
        assert await metric(finished) == finished_before
        assert generated < max_tokens / 2, generated
    finally:
        await api.delete(f"/api/v1/services/{sid}")


async def test_missing_model_fails_with_reason(api: httpx.AsyncClient) -> None:
    sid = await create(api, {"VLLM_MODEL": "no-such-org/no-such-model"})
    final = await settled(api, sid, 120)
    assert final["status"] == "failed"
    assert "no-such-org/no-such-model" in final["status_reason"]
    assert "Hugging Face cache" in final["status_reason"]
    response = await api.post(f"/api/v1/vllm/{sid}/prompt", json={"prompt": "hi"})
    assert response.status_code == 409
    assert response.json()["service_status"] == "failed"


async def test_startup_deadline_fails_the_service(gateway: GatewayProcess, tmp_path: Path) -> None:
    # A site whose deadline no vLLM can meet: the service must end `failed`
    # saying why, and leave no vLLM behind.
    site = (Path(__file__).parents[2] / "deploy" / "local" / "site.toml").read_text()
    assert 'startup_timeout = "600"' in site
    site_file = tmp_path / "site.toml"
    site_file.write_text(site.replace('startup_timeout = "600"', 'startup_timeout = "3"'))
    cluster = gateway.cluster
    with GatewayProcess(cluster, GATEWAY_SITE_FILE=str(site_file)) as impatient:
        async with httpx.AsyncClient(base_url=impatient.url, timeout=60) as api:
            sid = await create(api)
            try:
                final = await settled(api, sid, 180)
                assert final["status"] == "failed", final
                assert "did not answer /health within 3s of its start" in (final["status_reason"])
                await poll(
                    lambda: asyncio.to_thread(job_processes, cluster, sid),
                    lambda pids: not pids,
                    timeout=30,
                    what="vLLM processes gone",
                )
            finally:
                await api.delete(f"/api/v1/services/{sid}")


async def test_a_taken_vllm_port_fails_the_service(
    gateway: GatewayProcess, api: httpx.AsyncClient
) -> None:
    # The gateway's own port is taken on the node (the same machine here).
    sid = await create(api, {"VLLM_PORT": str(gateway.port)})
    try:
        final = await settled(api, sid, 120)
        assert final["status"] == "failed", final
        assert f"port {gateway.port} is not free" in final["status_reason"]
    finally:
        await api.delete(f"/api/v1/services/{sid}")


async def test_prompt_to_a_service_that_is_not_running_is_409(api: httpx.AsyncClient) -> None:
    sid = await create(api, {"BUILD_SECONDS": "60"}, recipe="testing/http")
    try:
        response = await api.post(f"/api/v1/vllm/{sid}/prompt", json={"prompt": "hi"})
        assert response.status_code == 409
        assert "not vllm" in response.json()["detail"]
    finally:
        await api.delete(f"/api/v1/services/{sid}")

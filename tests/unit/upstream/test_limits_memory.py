"""What a caller can make the gateway hold in memory through the data path:
model names, bodies, answers (gateway/upstream/limits.py, vllm.py; gateway/proxy/).

The first tests run the real app in this loop; the last runs the attacks as
found against a gateway process (tests/support/relay_server.py: uvicorn as in
production) in front of real upstream servers on 127.0.0.1, and reads the
process's memory from /proc.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.api.openai_schemas import MODEL_MAX_LENGTH
from gateway.upstream import vllm as vllm_module
from tests.support.front_door import (
    ROOT,
    TEAM_A,
    TEAM_B,
    Gateway,
    gateway,
    hanging,
    healthy,
    openai_error,
    settings_with,
)
from tests.support.http_stub import Seen, http_stub, response
from tests.support.polling import free_port, poll
from tests.support.services import service

MiB = 1024 * 1024
NO_TEMPLATE = {"error": {"message": "the model has no chat template", "type": "BadRequestError"}}


def no_chat_template() -> Any:
    """vLLM serving a model without a chat template: chat refused, completions answered."""

    async def answer(seen: Seen, writer: asyncio.StreamWriter) -> None:
        if seen.path == "/v1/chat/completions":
            writer.write(response(400, NO_TEMPLATE))
        else:
            writer.write(response(200, {"choices": [{"text": "ok"}]}))

    return http_stub(answer)


def held(gw: Gateway) -> int:
    """Bytes the data path holds on its budget now."""
    buffered: int = gw.app.state.provided.vllm.limits.buffered
    return buffered


# -- model names -------------------------------------------------------------------


async def test_an_over_long_model_name_is_refused_on_both_routes(tmp_path: Path) -> None:
    long = "x" * (MODEL_MAX_LENGTH + 1)
    async with (
        healthy() as up,
        gateway(settings_with(tmp_path), service("1", url=up.url)) as gw,
    ):
        relayed = await gw.chat(TEAM_A, long)
        prompted = await gw.prompt(TEAM_A, "1", model=long)
        at_limit = await gw.prompt(TEAM_A, "1", model="y" * MODEL_MAX_LENGTH)
    error = openai_error(relayed, 400)
    assert error["param"] == "model"
    assert f"length <= {MODEL_MAX_LENGTH}" in error["message"]
    assert prompted.status_code == 422, prompted.text  # the route's answer to a bad field
    assert prompted.json()["errors"][0]["field"] == "model"
    assert at_limit.status_code == 200
    assert len(up.seen) == 1  # only the one at the limit reached the service


async def test_which_api_a_model_takes_is_remembered_for_the_latest_few(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every model name a caller sends to a service without a chat template
    is learnt; past the bound the least recently used is forgotten."""
    monkeypatch.setattr(vllm_module, "_REMEMBERED", 16)
    async with (
        no_chat_template() as up,
        gateway(settings_with(tmp_path), service("1", url=up.url)) as gw,
    ):
        for i in range(40):
            assert (await gw.prompt(TEAM_A, "1", model=f"{i:0>500}")).status_code == 200
        remembered = len(gw.app.state.provided.vllm._api)
        up.seen.clear()
        await gw.prompt(TEAM_A, "1", model=f"{39:0>500}")  # recent: completions at once
        await gw.prompt(TEAM_A, "1", model=f"{0:0>500}")  # forgotten: chat first again
    assert remembered == 16
    assert up.paths() == ["/v1/completions", "/v1/chat/completions", "/v1/completions"]


async def test_what_is_learnt_is_the_services_not_its_addresss(tmp_path: Path) -> None:
    """A port may be reused by another service: what service 1 taught is not
    applied to service 2 at the same address."""
    async with no_chat_template() as up:
        services = (service("1", url=up.url), service("2", url=up.url))
        async with gateway(settings_with(tmp_path), *services) as gw:
            await gw.prompt(TEAM_A, "1", model="m")
            up.seen.clear()
            await gw.prompt(TEAM_A, "1", model="m")
            await gw.prompt(TEAM_A, "2", model="m")
    assert up.paths() == ["/v1/completions", "/v1/chat/completions", "/v1/completions"]


# -- the memory budget ---------------------------------------------------------------


async def test_bodies_past_the_budget_are_refused_503_not_held(tmp_path: Path) -> None:
    settings = settings_with(tmp_path, vllm_max_buffered_bytes=str(MiB))
    body = "x" * (700 * 1024)
    async with (
        hanging() as (up, _),
        gateway(settings, service("1", url=up.url)) as gw,
    ):
        first = asyncio.create_task(gw.chat(TEAM_A, "m", pad=body))
        await poll(lambda: _now(len(up.seen)), (1).__eq__, interval=0.02)
        assert held(gw) > 700 * 1024  # the body, until the service takes it
        refused = await gw.chat(TEAM_B, "m", pad=body)
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)
        await poll(lambda: _now(held(gw)), (0).__eq__, interval=0.02)
    error = openai_error(refused, 503)
    assert error["code"] == "memory_budget"
    assert refused.headers["retry-after"] == "1"
    assert len(up.seen) == 1


async def test_a_body_is_given_back_to_the_budget_once_the_service_answers(
    tmp_path: Path,
) -> None:
    """A stream may last minutes: its body is not held (nor counted) meanwhile."""
    settings = settings_with(tmp_path, vllm_max_buffered_bytes=str(MiB))
    go_on = asyncio.Event()

    async def stream(seen: Seen, writer: asyncio.StreamWriter) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n5\r\ndata:\r\n"
        )
        await writer.drain()
        await go_on.wait()
        writer.write(b"0\r\n\r\n")

    body = "x" * (700 * 1024)
    async with http_stub(stream) as up, gateway(settings, service("1", url=up.url)) as gw:
        streams = []
        for i in range(3):  # each over half the budget; all open at once
            streams.append(asyncio.create_task(gw.chat(TEAM_A, "m", pad=body, stream=True)))
            await poll(lambda: _now(len(up.seen)), (i + 1).__eq__, timeout=5, interval=0.02)
            await poll(lambda: _now(held(gw)), (0).__eq__, timeout=5, interval=0.02)
        go_on.set()
        answers = await asyncio.gather(*streams)
        assert held(gw) == 0
    assert [a.status_code for a in answers] == [200, 200, 200]


async def test_a_buffered_answer_past_the_budget_is_a_503(tmp_path: Path) -> None:
    """The prompt route reshapes vLLM's answer, so holds it whole: within the
    budget only."""
    settings = settings_with(tmp_path, vllm_max_buffered_bytes=str(MiB))
    big = {"choices": [{"text": "x" * (600 * 1024)}]}

    async def answer(seen: Seen, writer: asyncio.StreamWriter) -> None:
        writer.write(response(200, big))

    async with http_stub(answer) as up, gateway(settings, service("1", url=up.url)) as gw:
        refused = await gw.prompt(TEAM_A, "1")
        assert held(gw) == 0
    assert refused.status_code == 503, refused.text
    assert refused.headers["retry-after"] == "1"
    assert "memory budget" in refused.json()["title"]


async def _now(value: int) -> int:
    return value


# -- the attacks as found, against a gateway process ---------------------------------

BIG = 60 * 1000 * 1000  # the size of the answers in the attack
BUDGET = 256 * MiB  # GATEWAY_VLLM_MAX_BUFFERED_BYTES's default
# The documented bound on what the data path adds to an idle replica's memory:
# the budget, and what is not on it (sockets' buffers, allocator slack).
BOUND = BUDGET + 128 * MiB


def memory(pid: int) -> tuple[float, float]:
    """The process's resident memory now and at its peak, in MiB."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS (proc(5))
    print(f"  (RSS before: {memory(pid)[0]:.0f} MiB)")


@contextlib.contextmanager
def gateway_process(tmp_path: Path, services: list[list[str]], **env: str) -> Iterator[Any]:
    """A gateway process (uvicorn, uvloop, httptools) serving ``services``."""
    key = tmp_path / "key"
    key.write_bytes(b"k" * 32)
    port = free_port()
    environ = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    environ.update(
        {
            "GATEWAY_SLURM_URL": f"http://127.0.0.1:{free_port()}",  # never asked
            "GATEWAY_SLURM_USER": "gwuser",
            "GATEWAY_SLURM_JWT_KEY_FILE": str(key),
            "GATEWAY_RECIPES_DIRS": f"{ROOT / 'recipes'}:{ROOT / 'tests' / 'recipes'}",
            "GATEWAY_AUTH_FILE": str(ROOT / "deploy" / "local" / "tenants.toml"),
            "GATEWAY_ACCESS_LOG": "false",
            "RELAY_SERVICES": json.dumps(services),
            **{f"GATEWAY_{k.upper()}": v for k, v in env.items()},
        }
    )
    log = (tmp_path / "gateway.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.support.relay_server", str(port)],
        cwd=ROOT,
        env=environ,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, (tmp_path / "gateway.log").read_text()[-3000:]
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/api/v1/health").status_code == 200:
                    break
            assert time.monotonic() < deadline, "the gateway did not start"
            time.sleep(0.1)
        process.url = f"http://127.0.0.1:{port}"  # type: ignore[attr-defined]
        yield process
    finally:
        process.terminate()
        process.wait(10)
        log.close()


@contextlib.asynccontextmanager
async def big_answers() -> AsyncIterator[Any]:
    """vLLM answering 60 MB: an OpenAI completion (/v1) or its text (prompt route)."""
    text = "x" * BIG
    answers = {
        "/v1/chat/completions": response(
            200,
            {
                "object": "chat.completion",
                "choices": [{"message": {"content": text}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 2},
            },
        )
    }

    async def answer(seen: Seen, writer: asyncio.StreamWriter) -> None:
        writer.write(answers["/v1/chat/completions"])

    async with http_stub(answer) as stub:
        yield stub


async def fetch(
    client: httpx.AsyncClient, path: str, body: bytes, who: dict[str, str]
) -> tuple[int, int, str]:
    """Status, bytes of the answer (read and dropped as they come), Retry-After."""
    try:
        async with client.stream("POST", path, content=body, headers=who) as answer:
            size = 0
            async for chunk in answer.aiter_raw():
                size += len(chunk)
            return answer.status_code, size, answer.headers.get("retry-after", "")
    except httpx.TransportError:
        return 0, 0, ""


async def test_memory_stays_under_the_bound_under_the_attacks(tmp_path: Path) -> None:
    async with (
        healthy() as small,
        big_answers() as big,
        hanging() as (stuck, release),
    ):
        services = [["1", "small", small.url], ["2", "big", big.url], ["3", "stuck", stuck.url]]
        with gateway_process(tmp_path, services, vllm_timeout="30") as gateway:
            pid = gateway.pid
            async with httpx.AsyncClient(base_url=gateway.url, timeout=120) as client:
                chat = b'{"model": "small", "messages": []}'
                assert (await fetch(client, "/v1/chat/completions", chat, TEAM_A))[0] == 200
                prompt = b'{"prompt": "hi"}'
                assert (await fetch(client, "/api/v1/vllm/1/prompt", prompt, TEAM_A))[0] == 200
                idle, _ = memory(pid)
                print(f"\ngateway RSS idle: {idle:.0f} MiB; bound: +{BOUND / MiB:.0f} MiB")
                await _model_names(client, pid, idle)
                await _big_answers(client, pid, idle)
                await _big_bodies(client, pid, idle, stuck.seen, release)


async def _model_names(client: httpx.AsyncClient, pid: int, idle: float) -> None:
    """As found: 200 prompts naming distinct million-character models (+465 MB, never freed)."""
    reset_peak(pid)
    answers = []
    for i in range(200):
        body = json.dumps({"prompt": "hi", "model": f"{i:0>1000000}"}).encode()
        answers.append((await fetch(client, "/api/v1/vllm/1/prompt", body, TEAM_A))[0])
    for i in range(20):
        body = json.dumps({"model": f"{i:0>1000000}", "messages": []}).encode()
        answers.append((await fetch(client, "/v1/chat/completions", body, TEAM_A))[0])
    now, peak = memory(pid)
    print(
        f"220 requests naming distinct 1M-character models: answered {sorted(set(answers))}; "
        f"RSS after {now:.0f} MiB (+{now - idle:.0f}), peak {peak:.0f} MiB"
    )
    assert now - idle < 32
    assert set(answers) <= {400, 422}


async def _big_answers(client: httpx.AsyncClient, pid: int, idle: float) -> None:
    """As found: 4 concurrent 60 MB answers (+453 MB); then 6 on the prompt
    route, which holds its answers whole: past the budget, 503."""
    reset_peak(pid)
    chat = b'{"model": "big", "messages": []}'
    relayed = await asyncio.gather(
        *(fetch(client, "/v1/chat/completions", chat, TEAM_A) for _ in range(4))
    )
    _, peak = memory(pid)
    print(
        f"4 concurrent {BIG / 1e6:.0f} MB answers on /v1: {[(s, n) for s, n, _ in relayed]}; "
        f"RSS peak {peak:.0f} MiB (+{peak - idle:.0f})"
    )
    assert all(status == 200 and size > BIG for status, size, _ in relayed)
    assert peak - idle < BOUND / MiB
    reset_peak(pid)
    prompt = b'{"prompt": "hi"}'
    who = (TEAM_A, TEAM_B)
    prompted = await asyncio.gather(
        *(fetch(client, "/api/v1/vllm/2/prompt", prompt, who[i % 2]) for i in range(6))
    )
    _, peak = memory(pid)
    print(
        f"6 concurrent {BIG / 1e6:.0f} MB answers on the prompt route: "
        f"{sorted((s, n, r) for s, n, r in prompted)}; RSS peak {peak:.0f} MiB (+{peak - idle:.0f})"
    )
    assert {s for s, _, _ in prompted} == {200, 503}
    assert all(size > BIG for s, size, _ in prompted if s == 200)
    assert all(after == "1" for s, _, after in prompted if s == 503)
    assert peak - idle < BOUND / MiB


async def _big_bodies(
    client: httpx.AsyncClient, pid: int, idle: float, seen: list[Seen], release: asyncio.Event
) -> None:
    """16 concurrent 30 MB bodies to a service that does not answer: those
    past the budget are refused, not held."""
    reset_peak(pid)
    body = json.dumps({"model": "stuck", "messages": [], "pad": "x" * 30_000_000}).encode()
    who = (TEAM_A, TEAM_B)
    sent = [
        asyncio.create_task(fetch(client, "/v1/chat/completions", body, who[i % 2]))
        for i in range(16)
    ]
    await poll(
        lambda: _now(len(seen) + sum(t.done() for t in sent)),
        (16).__le__,
        timeout=60,
        interval=0.1,
        what="every body taken or refused",
    )
    taken = len(seen)
    _, peak = memory(pid)
    release.set()
    answers = await asyncio.gather(*sent)
    refused = [(s, after) for s, _, after in answers if s == 503]
    print(
        f"16 concurrent 30 MB bodies: {taken} taken, {len(refused)} refused 503; "
        f"RSS peak {peak:.0f} MiB (+{peak - idle:.0f})"
    )
    assert 1 <= taken <= BUDGET // 30_000_000
    assert len(refused) == 16 - taken
    assert all(after == "1" for _, after in refused)
    assert peak - idle < BOUND / MiB

"""The OpenAI front door through the real app (gateway/api/openai.py, gateway/proxy/frontdoor.py):
what a client of ``/v1`` sees, in front of real upstream servers on 127.0.0.1.

The app is the one ``create_app`` builds (authentication with
deploy/local/tenants.toml, the route's exception handlers, the relay
middleware); only its router's services are given (tests/support/services.py's
fakes), so no Slurm is involved.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from litestar import Litestar

from gateway.app import create_app
from gateway.core.services import Service
from gateway.core.status import ServiceStatus
from gateway.proxy import frontdoor
from gateway.proxy.frontdoor import FrontDoor
from gateway.settings import Settings
from gateway.upstream.vllm import VllmClient
from tests.support.app import app_client
from tests.support.front_door import (
    COMPLETION,
    AsgiClient,
    closed_port,
    openai_error,
    settings_with,
)
from tests.support.http_stub import Seen, chunked, http_stub, response
from tests.support.polling import poll
from tests.support.services import router, service

TEAM_A = {"Authorization": "Bearer sgw_local-team-a-key"}  # deploy/local/tenants.toml
CHAT = "/v1/chat/completions"
Answer = Callable[[Seen, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    # Slurm is never asked: the front door's services are given below.
    return settings_with(tmp_path)


class Gateway:
    def __init__(self, app: Litestar, client: httpx.AsyncClient) -> None:
        self.app = app
        self.client = client

    async def chat(self, body: bytes | dict[str, Any], path: str = CHAT) -> httpx.Response:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return await self.client.post(path, content=content, headers=TEAM_A)

    async def metric(self, sample: str) -> float:
        text = (await self.client.get("/metrics")).text
        lines = [line for line in text.splitlines() if line.startswith(sample + " ")]
        return float(lines[0].rsplit(" ", 1)[1]) if lines else 0.0


@asynccontextmanager
async def gateway(settings: Settings, *services: Service) -> AsyncIterator[Gateway]:
    """The app, in this loop (with the upstream stubs), its router serving ``services``."""
    app = create_app(settings)
    vllm = VllmClient(timeout=5, connect_timeout=1)
    try:
        async with app_client(app) as client:
            app.state.provided.front_door = FrontDoor(router=router(*services), vllm=vllm)
            yield Gateway(app, client)
    finally:
        await vllm.aclose()


def at(*urls: str) -> list[Service]:
    """Running services of model "m", ids 1, 2, ... at ``urls``."""
    return [service(str(i + 1), url=url) for i, url in enumerate(urls)]


def answering(status: int, body: Any, content_type: str = "application/json") -> Answer:
    async def answer(seen: Seen, writer: asyncio.StreamWriter) -> None:
        writer.write(response(status, body, content_type))

    return answer


# -- the body goes as it came, the answer comes back ------------------------------------


async def test_the_body_arrives_byte_for_byte_and_vllms_answer_comes_back(
    settings: Settings,
) -> None:
    # Key order, spacing, unicode (raw and escaped), duplicates, numbers as
    # written, fields neither OpenAI nor this gateway knows: all vLLM's business.
    body = (
        '{ "zeta": 1.50, "messages": [{"role": "user", "content": "h\u00e9llo \u2603 \\u00e9 '
        '\U0001f600"}],\n "model" : "m", "guided_json": {"b": [], "a": null}, "n": 1e2,'
        ' "zeta": 2 }'
    ).encode()
    answer = json.dumps(COMPLETION, separators=(",", ":")).encode() + b"\n"
    async with http_stub(answering(200, answer)) as up, gateway(settings, *at(up.url)) as gw:
        got = await gw.chat(body)
    assert [s.body for s in up.seen] == [body]
    assert up.seen[0].path == CHAT
    # The service's key, not the caller's.
    assert up.seen[0].headers["authorization"] == "Bearer key"
    assert got.status_code == 200
    assert got.content == answer  # byte for byte, too
    assert got.headers["x-gateway-service-id"] == "1"


async def test_a_lora_adapter_is_listed_with_its_base_and_reaches_its_service(
    settings: Settings,
) -> None:
    async def vllm(seen: Seen, writer: asyncio.StreamWriter) -> None:
        if seen.path == "/v1/models":  # vLLM's cards: an adapter's has no max_model_len
            cards = [{"id": "m", "max_model_len": 333}, {"id": "sql", "parent": "m"}]
            writer.write(response(200, {"object": "list", "data": cards}))
        else:
            writer.write(response(200, COMPLETION))

    async with http_stub(vllm) as a, http_stub(vllm) as b:
        lora = service("1", url=a.url, adapters={"sql": "/models/sql-lora"})
        async with gateway(settings, lora, service("2", url=b.url)) as gw:
            listed = (await gw.client.get("/v1/models", headers=TEAM_A)).json()["data"]
            one = (await gw.client.get("/v1/models/sql", headers=TEAM_A)).json()
            answered = [(await gw.chat({"model": "sql"})).headers for _ in range(4)]
    cards = {card["id"]: card for card in listed}
    assert cards["m"]["parent"] is None and cards["m"]["services"] == 2
    assert cards["sql"] == one
    assert (one["parent"], one["root"], one["services"]) == ("m", "/models/sql-lora", 1)
    assert one["max_model_len"] == 333  # its base model's
    assert {h["x-gateway-service-id"] for h in answered} == {"1"}
    assert [s.path for s in b.seen if s.path == CHAT] == []


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/embeddings"])
async def test_each_route_asks_the_service_at_its_own_path(settings: Settings, path: str) -> None:
    async with (
        http_stub(answering(200, {"object": "list"})) as up,
        gateway(settings, *at(up.url)) as gw,
    ):
        got = await gw.chat({"model": "m", "input": "x"}, path)
    assert got.status_code == 200
    assert up.paths() == [path]


async def test_usage_is_counted_into_the_token_metrics(settings: Settings) -> None:
    prompt = 'gateway_prompt_tokens_total{kind="prompt"}'
    completion = 'gateway_prompt_tokens_total{kind="completion"}'
    async with (
        http_stub(answering(200, COMPLETION)) as up,
        gateway(settings, *at(up.url)) as gw,
    ):
        before = (await gw.metric(prompt), await gw.metric(completion))
        assert (await gw.chat({"model": "m"})).status_code == 200
        assert (await gw.chat({"model": "m"})).status_code == 200
        after = (await gw.metric(prompt), await gw.metric(completion))
    assert after == (before[0] + 14, before[1] + 22)


# -- which service takes it -------------------------------------------------------------


async def test_a_refused_connection_is_retried_once_on_the_other_service(
    settings: Settings,
) -> None:
    async with (
        http_stub(answering(200, COMPLETION)) as up,
        gateway(settings, *at(closed_port(), up.url)) as gw,
    ):
        answers = [await gw.chat({"model": "m"}) for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert [a.headers["x-gateway-service-id"] for a in answers] == ["2", "2", "2"]
    assert [a.json() for a in answers] == [COMPLETION] * 3
    assert len(up.seen) == 3  # each request once: none went twice


async def test_two_refusals_are_a_502_in_openai_shape(settings: Settings) -> None:
    async with gateway(settings, *at(closed_port(), closed_port())) as gw:
        got = await gw.chat({"model": "m"})
    error = openai_error(got, 502)
    assert "unreachable" in error["message"]
    assert error["type"] == "server_error"


async def test_a_busy_service_is_passed_over_for_an_idle_one(settings: Settings) -> None:
    """Least outstanding: while one service holds a request, the others go elsewhere."""
    release = asyncio.Event()
    held: list[str] = []

    def holding(name: str) -> Answer:
        async def answer(seen: Seen, writer: asyncio.StreamWriter) -> None:
            if not held:  # the first request, wherever it lands, is held
                held.append(name)
                await release.wait()
            writer.write(response(200, {**COMPLETION, "by": name}))

        return answer

    async with (
        http_stub(holding("a")) as a,
        http_stub(holding("b")) as b,
        gateway(settings, *at(a.url, b.url)) as gw,
    ):
        first = asyncio.create_task(gw.chat({"model": "m"}))
        await poll(lambda: _value(len(held)), lambda n: n == 1, timeout=5, interval=0.01)
        others = [await gw.chat({"model": "m"}) for _ in range(4)]
        release.set()
        slow = await asyncio.wait_for(first, 5)
    idle = "b" if held == ["a"] else "a"
    assert slow.json()["by"] == held[0]
    assert [o.json()["by"] for o in others] == [idle] * 4


async def _value(value: int) -> int:
    return value


# -- vLLM's errors -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "body", "content_type", "expected", "message", "kind"),
    [
        # vLLM's own refusal: its status, message and type
        (400, {"error": {"message": "max_tokens is too large", "type": "BadRequestError",
                         "param": None, "code": 400}},
         "application/json", 400, "max_tokens is too large", "BadRequestError"),
        # vLLM before 0.6: the message at the top
        (400, {"object": "error", "message": "bad field", "type": "BadRequestError"},
         "application/json", 400, "bad field", "BadRequestError"),
        (429, {"error": {"message": "too many requests"}}, "application/json", 429,
         "too many requests", "rate_limit_error"),
        # the key is the gateway's business: the client gets a bad gateway
        (401, {"error": "Unauthorized"}, "application/json", 502, "Unauthorized",
         "server_error"),
        (403, {"error": "Forbidden"}, "application/json", 502, "Forbidden", "server_error"),
        # not JSON: its text is the message
        (500, b"Internal Server Error", "text/plain", 500, "Internal Server Error",
         "server_error"),
        (503, b"", "text/plain", 503, "HTTP 503", "service_unavailable_error"),
        # a status vLLM does not document
        (418, b"<html>teapot</html>", "text/html", 502, "<html>teapot</html>", "server_error"),
    ],
)  # fmt: skip
async def test_vllms_errors_come_in_openai_shape_with_its_message(
    settings: Settings,
    status: int,
    body: Any,
    content_type: str,
    expected: int,
    message: str,
    kind: str,
) -> None:
    async with (
        http_stub(answering(status, body, content_type)) as up,
        gateway(settings, *at(up.url)) as gw,
    ):
        got = await gw.chat({"model": "m"})
    error = openai_error(got, expected)
    assert error["message"] == message
    assert error["type"] == kind


async def test_a_stream_is_relayed_chunk_by_chunk(settings: Settings) -> None:
    """Each chunk reaches the client before vLLM sends the next (through the app,
    as ASGI events: httpx's ASGI transport would wait for the whole answer)."""
    chunks = [b'data: {"n": 1}\n\n', b'data: {"n": 2}\n\n', b"data: [DONE]\n\n"]
    go_on = [asyncio.Event() for _ in chunks]
    stream = chunked(chunks, go_on, "text/event-stream; charset=utf-8")
    async with http_stub(stream) as up, gateway(settings, *at(up.url)) as gw:
        client = AsgiClient(gw.app, CHAT, b'{"model": "m", "stream": true}')
        task = asyncio.create_task(client.run())
        for i, may in enumerate(go_on):
            may.set()
            await poll(lambda: _value(len(client.bodies)), (i + 1).__le__, timeout=5, interval=0.01)
            assert client.bodies == chunks[: i + 1]  # that chunk alone, as it came
        await asyncio.wait_for(task, 5)
    assert client.status == 200
    assert client.headers[b"content-type"].startswith(b"text/event-stream")
    assert client.headers[b"x-gateway-service-id"] == b"1"
    assert b"".join(client.bodies) == b"".join(chunks)


# -- a hostile upstream ----------------------------------------------------------------


def endless(status: int, sent: list[int]) -> Answer:
    """An answer that never ends (up to 64 MiB), ``sent`` counting what got out."""

    async def answer(seen: Seen, writer: asyncio.StreamWriter) -> None:
        writer.write(
            b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" % status
        )
        piece = b"x" * 65536
        frame = b"%x\r\n%s\r\n" % (len(piece), piece)
        for _ in range(1024):
            writer.write(frame)
            await writer.drain()  # raises once the gateway hung up
            sent[0] += len(piece)

    return answer


async def test_an_endless_answer_is_cut_off(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """vLLM's answers may take 64 MiB (frontdoor.LARGE_ANSWER); here 256 KiB, so
    that the cut is quick. The answer is passed on as it comes, so past the
    limit the gateway hangs up on both sides: the client's answer never ends."""
    monkeypatch.setattr(frontdoor, "LARGE_ANSWER", 256 * 1024)
    sent = [0]
    async with http_stub(endless(200, sent)) as up, gateway(settings, *at(up.url)) as gw:
        client = AsgiClient(gw.app, CHAT, b'{"model": "m"}')
        await asyncio.wait_for(client.run(), 10)
    assert client.status == 200
    assert 0 < len(b"".join(client.bodies)) <= 256 * 1024
    assert not client.complete
    assert sent[0] < 32 * 1024 * 1024  # it stopped reading; the stub never finished


async def test_an_oversized_error_answer_is_a_502(settings: Settings) -> None:
    sent = [0]
    async with http_stub(endless(400, sent)) as up, gateway(settings, *at(up.url)) as gw:
        got = await gw.chat({"model": "m"})
    openai_error(got, 502)


async def test_an_answer_declared_over_the_limit_is_a_502_not_telling_where(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(frontdoor, "LARGE_ANSWER", 1024)
    async with (
        http_stub(answering(200, b"x" * 2048)) as up,
        gateway(settings, *at(up.url)) as gw,
    ):
        got = await gw.chat({"model": "m"})
    error = openai_error(got, 502)
    assert "more than 1024 bytes" in error["message"]
    assert f":{up.port}" not in error["message"]


# -- the gateway's own refusals, in OpenAI's shape ---------------------------------


@pytest.mark.parametrize(
    ("body", "param", "said"),
    [
        (b"not json", None, "not JSON"),
        (b'{"model": "m"', None, "not JSON"),
        (b"", None, "not JSON"),
        (b'{"messages": []}', "model", "model: required"),
        (b'{"model": ""}', "model", "model: required"),
        (b'{"model": null}', "model", "model: required"),
        (b'{"model": 5}', "model", "not an OpenAI request"),
        (b'["model", "m"]', "model", "not an OpenAI request"),
    ],
)
async def test_a_body_that_cannot_be_routed_is_a_400(
    settings: Settings, body: bytes, param: str | None, said: str
) -> None:
    async with (
        http_stub(answering(200, COMPLETION)) as up,
        gateway(settings, *at(up.url)) as gw,
    ):
        got = await gw.chat(body)
    error = openai_error(got, 400)
    assert said in error["message"]
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert up.seen == []


async def test_a_body_over_the_limit_is_a_413_and_one_at_it_goes_through(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """32 MiB (frontdoor.MAX_BODY); 1 MiB here, to keep the test quick."""
    monkeypatch.setattr(frontdoor, "MAX_BODY", 1024 * 1024)
    head = b'{"model": "m", "pad": "'
    at_limit = head + b"x" * (frontdoor.MAX_BODY - len(head) - 2) + b'"}'
    assert len(at_limit) == frontdoor.MAX_BODY
    over = at_limit[:-2] + b'x"}'
    async with (
        http_stub(answering(200, COMPLETION)) as up,
        gateway(settings, *at(up.url)) as gw,
    ):
        refused = await gw.chat(over)
        taken = await gw.chat(at_limit)
    error = openai_error(refused, 413)
    assert "over 1 MiB" in error["message"]
    assert error["type"] == "invalid_request_error"
    assert taken.status_code == 200
    assert [s.body for s in up.seen] == [at_limit]


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer sgw_not-a-key"}, {"Authorization": "Basic Zm9vOmJhcg=="}],
)
async def test_no_or_a_wrong_key_is_a_401_in_openai_shape(
    settings: Settings, headers: dict[str, str]
) -> None:
    async with (
        http_stub(answering(200, COMPLETION)) as up,
        gateway(settings, *at(up.url)) as gw,
    ):
        got = await gw.client.post(CHAT, json={"model": "m"}, headers=headers)
    error = openai_error(got, 401)
    assert error["type"] == "authentication_error"
    assert up.seen == []


async def test_an_unknown_model_is_a_404_naming_those_the_caller_can_use(
    settings: Settings,
) -> None:
    services = [service("1", "alpha"), service("2", "beta", ServiceStatus.STARTING)]
    async with gateway(settings, *services) as gw:
        got = await gw.chat({"model": "gamma"})
        listed = await gw.client.get("/v1/models/gamma", headers=TEAM_A)
    error = openai_error(got, 404)
    assert (error["param"], error["code"]) == ("model", "model_not_found")
    assert "'gamma' does not exist" in error["message"]
    assert "alpha, beta" in error["message"]
    assert openai_error(listed, 404)["code"] == "model_not_found"


async def test_a_model_still_starting_is_a_503_with_retry_after(settings: Settings) -> None:
    async with gateway(settings, service("4", status=ServiceStatus.STARTING)) as gw:
        got = await gw.chat({"model": "m"})
    error = openai_error(got, 503)
    assert got.headers["retry-after"] == "5"
    assert error["code"] == "model_not_ready"
    assert error["type"] == "service_unavailable_error"
    assert "service 4 is starting" in error["message"]

"""The front (gateway/proxy/front.py): the data path's routes answered in front
of Litestar, served as in production, with what Litestar's middleware did for
them kept: one count each in the HTTP metrics, one check of the caller, and
every refusal in its route's error shape."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from gateway.auth.authenticate import Authenticator
from tests.support.front_door import TEAM_A, Gateway, gateway, openai_error, settings_with
from tests.support.http_stub import Seen, http_stub, response
from tests.support.services import service

WRONG = {"Authorization": "Bearer sgw_not-a-key"}
PROMPT_ROUTE = "/api/v1/vllm/{service_id}/prompt"  # the template Litestar labels it with
COMPLETION = {
    "model": "m",
    "choices": [{"message": {"content": "hi"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
}


def counted(path: str, status: int) -> float:
    labels = {"method": "POST", "path": path, "status": str(status)}
    value = REGISTRY.get_sample_value("gateway_http_request_duration_seconds_count", labels)
    return value or 0.0


async def answer(seen: Seen, writer: asyncio.StreamWriter) -> None:
    writer.write(response(200, COMPLETION))


@asynccontextmanager
async def one_service(tmp_path: Path) -> AsyncIterator[Gateway]:
    """The gateway, served as in production, with service 1 (model "m") answering."""
    async with (
        http_stub(answer) as up,
        gateway(settings_with(tmp_path), service("1", url=up.url)) as gw,
    ):
        yield gw


@pytest.fixture
def checks(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Each check of a caller's credentials, by the Authorization it read."""
    seen: list[str] = []
    check = Authenticator.authenticate

    async def counting(self: Authenticator, headers: Any, **kwargs: Any) -> Any:
        seen.append(headers.get("authorization", ""))
        return await check(self, headers, **kwargs)

    monkeypatch.setattr(Authenticator, "authenticate", counting)
    return seen


async def test_a_relayed_request_is_counted_and_checked_once_whoever_answers_it(
    tmp_path: Path, checks: list[str]
) -> None:
    chat = "/v1/chat/completions"
    before = {status: counted(chat, status) for status in (200, 401, 404)}
    async with one_service(tmp_path) as gw:
        ok = await gw.chat(TEAM_A, "m")
        refused = await gw.chat(WRONG, "m")
        unknown = await gw.chat(TEAM_A, "no-such-model")
    assert ok.status_code == 200, ok.text
    assert ok.json()["choices"][0]["message"]["content"] == "hi"
    assert openai_error(refused, 401)["message"]
    assert openai_error(unknown, 404)["code"] == "model_not_found"
    after = {status: counted(chat, status) for status in (200, 401, 404)}
    assert {s: after[s] - before[s] for s in after} == {200: 1, 401: 1, 404: 1}
    # A wrong key is checked once: Litestar raises the front's refusal, it
    # does not check again (a caller's Slurm token would be verified twice).
    assert checks.count(WRONG["Authorization"]) == 1
    assert checks.count(TEAM_A["Authorization"]) == 2


async def test_the_prompt_route_keeps_its_handler_for_what_it_refuses(tmp_path: Path) -> None:
    before = {status: counted(PROMPT_ROUTE, status) for status in (200, 401, 422)}
    async with one_service(tmp_path) as gw:
        ok = await gw.prompt(TEAM_A, "1")
        refused = await gw.prompt(WRONG, "1")
        bad = await gw.prompt(TEAM_A, "1", max_tokens=0)
    assert ok.status_code == 200, ok.text
    assert ok.json()["response"] == "hi"
    # Problem details, as every /api/v1 route answers.
    assert refused.status_code == 401
    assert refused.headers["content-type"] == "application/problem+json"
    assert bad.status_code == 422
    assert "max_tokens" in bad.text
    after = {status: counted(PROMPT_ROUTE, status) for status in (200, 401, 422)}
    assert {s: after[s] - before[s] for s in after} == {200: 1, 401: 1, 422: 1}

"""Prefix affinity through the real app (gateway/proxy/frontdoor.py,
gateway/core/affinity.py): requests that start alike reach the same service of
their model, others spread, in front of two real upstream servers on 127.0.0.1."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from gateway.settings import Settings
from tests.support.front_door import CHAT, TEAM_A, Gateway, gateway, healthy, settings_with
from tests.support.services import service


def system(n: int) -> dict[str, str]:
    """A long system prompt of its own (some 2 KB) for each ``n``."""
    return {"role": "system", "content": f"You are assistant number {n}. " + "Be precise. " * 170}


async def sent(gw: Gateway, body: dict[str, Any], path: str = CHAT) -> str:
    """The service that answered."""
    answer = await gw.client.post(path, content=json.dumps(body).encode(), headers=TEAM_A)
    assert answer.status_code == 200, answer.text
    return answer.headers["x-gateway-service-id"]


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return settings_with(tmp_path)


async def test_a_chat_session_stays_on_one_service_and_sessions_spread(
    settings: Settings,
) -> None:
    async with (
        healthy() as a,
        healthy() as b,
        gateway(settings, service("1", "m", url=a.url), service("2", "m", url=b.url)) as gw,
    ):
        turns = [system(0), {"role": "user", "content": "Hello"}]
        first = await sent(gw, {"model": "m", "messages": turns})
        again = await sent(gw, {"model": "m", "messages": turns, "stream": False})
        later = [*turns, {"role": "assistant", "content": "hi"}, {"role": "user", "content": "?"}]
        next_turn = await sent(gw, {"model": "m", "messages": later})
        sessions = Counter(
            [await sent(gw, {"model": "m", "messages": [system(n)]}) for n in range(1, 41)]
        )
        prompt = {"model": "m", "prompt": "Continue this text. " * 80}
        completions = {await sent(gw, prompt, "/v1/completions") for _ in range(4)}
    assert first == again == next_turn
    assert set(sessions) == {"1", "2"}
    assert min(sessions.values()) >= 8, sessions  # 20 each expected
    assert len(completions) == 1


async def test_turned_off_the_same_prompt_takes_turns(tmp_path: Path) -> None:
    settings = settings_with(tmp_path, routing_prefix_affinity="false")
    async with (
        healthy() as a,
        healthy() as b,
        gateway(settings, service("1", "m", url=a.url), service("2", "m", url=b.url)) as gw,
    ):
        body = {"model": "m", "messages": [system(0)]}
        chosen = [await sent(gw, body) for _ in range(4)]
    assert sorted(chosen) == ["1", "1", "2", "2"]

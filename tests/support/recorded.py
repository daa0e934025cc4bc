"""Answers recorded from live slurmrestd daemons (``make fixtures``,
scripts/record_fixtures.py), stored under tests/fixtures/slurmrestd/<release>/<version>/."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.support.http_stub import response

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "slurmrestd"


def recorded_answer(
    scenario: str, release: str = "24.11.5", version: str = "v0.0.42"
) -> tuple[int, bytes]:
    """The HTTP status and body slurmrestd answered in ``scenario``."""
    answer = json.loads((FIXTURES / release / version / f"{scenario}.json").read_text())
    return answer["status"], answer["body"].encode()


def recorded_response(scenario: str) -> bytes:
    """slurmrestd's answer in ``scenario``, as a stub writes it back."""
    return response(*recorded_answer(scenario))


def recorded_body(scenario: str) -> dict[str, Any]:
    """The JSON body slurmrestd answered in ``scenario``."""
    body: dict[str, Any] = json.loads(recorded_answer(scenario)[1])
    return body

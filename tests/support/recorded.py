"""Answers recorded from live slurmrestd daemons (``make fixtures``,
scripts/record_fixtures.py), stored under tests/fixtures/slurmrestd/<release>/<version>/."""

from __future__ import annotations

import json
from pathlib import Path

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "slurmrestd"


def recorded_answer(
    scenario: str, release: str = "24.11.5", version: str = "v0.0.42"
) -> tuple[int, bytes]:
    """The HTTP status and body slurmrestd answered in ``scenario``."""
    answer = json.loads((FIXTURES / release / version / f"{scenario}.json").read_text())
    return answer["status"], answer["body"].encode()

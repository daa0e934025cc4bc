from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import openapi  # noqa: E402


def test_committed_openapi_document_is_current() -> None:
    committed = openapi.TARGET.read_text(encoding="utf-8")
    assert committed == openapi.document(), "openapi/openapi.json is stale: run `make openapi`"

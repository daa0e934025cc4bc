from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest

from gateway.api import errors
from gateway.api.schemas import ProblemResponse
from gateway.core.errors import Conflict

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import openapi  # noqa: E402

READINESS = {"$ref": "#/components/schemas/Readiness"}


def test_committed_openapi_document_is_current() -> None:
    committed = openapi.TARGET.read_text(encoding="utf-8")
    assert committed == openapi.document(), "openapi/openapi.json is stale: run `make openapi`"


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    parsed: dict[str, Any] = json.loads(openapi.document())
    return parsed


def test_cpu_only_create_example_sends_gpu_null(document: dict[str, Any]) -> None:
    body = document["paths"]["/api/v1/services"]["post"]["requestBody"]
    examples = body["content"]["application/json"]["schema"]["examples"]
    resources = [e.get("config", {}).get("resources", {}) for e in examples]
    cpu_only = [r for r in resources if r.get("cpu") == "4"]
    assert len(cpu_only) == 1
    assert "gpu" in cpu_only[0]
    assert cpu_only[0]["gpu"] is None
    assert '"gpu": null' in openapi.document()


def test_readiness_documents_its_503(document: dict[str, Any]) -> None:
    responses = document["paths"]["/api/v1/ready"]["get"]["responses"]
    for code in ("200", "503"):
        content = responses[code]["content"]
        assert content == {"application/json": {"schema": READINESS}}, code
    assert responses["503"]["description"]


def test_prompt_answers_json_or_an_event_stream(document: dict[str, Any]) -> None:
    ok = document["paths"]["/api/v1/vllm/{service_id}/prompt"]["post"]["responses"]["200"]
    assert set(ok["content"]) == {"application/json", "text/event-stream"}
    assert ok["content"]["application/json"] == {
        "schema": {"$ref": "#/components/schemas/PromptResponse"}
    }
    stream = ok["content"]["text/event-stream"]["schema"]
    assert stream["type"] == "string"
    assert "data: [DONE]" in stream["description"]
    assert "event: error" in stream["description"]
    # The error answers are untouched by the operation class.
    assert list(document["paths"]["/api/v1/vllm/{service_id}/prompt"]["post"]["responses"]) == [
        "200",
        "400",
        "404",
        "409",
        "422",
        "502",
        "503",
        "504",
    ]


def test_problem_documents_service_status(document: dict[str, Any]) -> None:
    problem = document["components"]["schemas"]["ProblemResponse"]
    assert "service_status" in problem["properties"]
    assert "service_status" not in problem["required"]
    assert problem["properties"]["service_status"]["description"]


def test_a_409_problem_matches_its_schema() -> None:
    failure = errors.from_gateway_error(Conflict("service 1 is pending", service_status="pending"))
    body = {"status": failure.status_code, "title": failure.title, "detail": failure.detail}
    assert isinstance(failure.extra, dict)
    body.update(failure.extra)
    decoded = msgspec.convert(body, ProblemResponse)
    assert decoded.service_status == "pending"
    assert msgspec.json.decode(msgspec.json.encode(decoded)) == body
    # Omitted when absent.
    plain = ProblemResponse(status=404, title="Not found", detail="no such service")
    assert "service_status" not in msgspec.json.decode(msgspec.json.encode(plain))


def test_500_has_a_meaning() -> None:
    spec = errors.problem_responses(500)[500]
    assert spec.description
    assert spec.media_type == "application/problem+json"

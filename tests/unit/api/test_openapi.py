from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest

from gateway.api import problems
from gateway.api.openapi import problem_responses
from gateway.api.schemas import ProblemResponse
from gateway.core.errors import Conflict

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "scripts"))

# scripts/openapi.py; imported by name, as mypy would take the openapi/ folder for it.
openapi = importlib.import_module("openapi")

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
    # One event (before OpenAPI 3.2's itemSchema, `schema` describes each event).
    event = ok["content"]["text/event-stream"]["schema"]
    assert event["type"] == "object"
    assert event["required"] == ["data"]
    assert event["properties"]["data"]["type"] == "string"
    assert event["properties"]["event"]["enum"] == ["message", "error"]
    assert "data: [DONE]" in event["description"]
    assert "event: error" in event["description"]
    # The error answers are untouched by the operation class.
    assert list(document["paths"]["/api/v1/vllm/{service_id}/prompt"]["post"]["responses"]) == [
        "200",
        "400",
        "401",
        "403",
        "404",
        "409",
        "422",
        "429",
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
    failure = problems.from_gateway_error(
        Conflict("service 1 is pending", service_status="pending")
    )
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
    spec = problem_responses(500)[500]
    assert spec.description
    assert spec.media_type == "application/problem+json"


def _schema(document: dict[str, Any], ref: dict[str, Any]) -> dict[str, Any]:
    """The component a schema refers to (directly, or as its one ``allOf``)."""
    [ref] = ref.get("allOf", [ref])
    found: dict[str, Any] = document["components"]["schemas"][ref["$ref"].rsplit("/", 1)[1]]
    return found


def test_request_bodies_allow_no_other_fields(document: dict[str, Any]) -> None:
    """The server refuses unknown fields (forbid_unknown_fields): the document says so."""
    bodies = [
        op["requestBody"]["content"]["application/json"]["schema"]
        for path, item in document["paths"].items()
        for op in item.values()
        # /v1 and vLLM's other APIs pass bodies to vLLM untouched: OpenAI's
        # fields, and vLLM's own.
        if "requestBody" in op and path.startswith("/api/")
    ]
    assert len(bodies) == 2  # createService, promptVllm
    closed = {"CreateServiceRequest", "ServiceConfigRequest", "ResourcesRequest", "PromptRequest"}
    for name in closed:
        assert document["components"]["schemas"][name]["additionalProperties"] is False, name
    for body in bodies:
        assert _schema(document, body)["additionalProperties"] is False
    relayed = {
        "ChatCompletionRequest",
        "CompletionRequest",
        "EmbeddingRequest",
        "TokenizeRequest",
        "DetokenizeRequest",
        "ScoreRequest",
        "RerankRequest",
        "CohereEmbedRequest",
        "PoolingRequest",
        "ResponseRequest",
        "MessagesRequest",
        "CountTokensRequest",
    }
    for name in relayed:
        assert document["components"]["schemas"][name].get("additionalProperties") is not False
    # Answers stay open: a client must accept fields added later.
    assert "additionalProperties" not in document["components"]["schemas"]["ServiceResponse"]


def test_bounds_of_zero_are_documented(document: dict[str, Any]) -> None:
    """Litestar leaves falsy bounds out; the document carries them all the same."""
    logs = document["paths"]["/api/v1/services/{service_id}/logs"]["get"]
    [tail] = [p for p in logs["parameters"] if p["name"] == "tail"]
    assert tail["schema"]["minimum"] == 0
    assert tail["schema"]["maximum"] == 100_000
    prompt = document["components"]["schemas"]["PromptRequest"]["properties"]
    assert prompt["top_p"]["exclusiveMinimum"] == 0
    assert prompt["top_p"]["maximum"] == 1
    assert prompt["temperature"]["minimum"] == 0


def test_created_service_links_to_its_operations(document: dict[str, Any]) -> None:
    created = document["paths"]["/api/v1/services"]["post"]["responses"]["201"]
    links = created["links"]
    operations = {
        op["operationId"]: op for item in document["paths"].values() for op in item.values()
    }
    assert {link["operationId"] for link in links.values()} >= {
        "getService",
        "getServiceStatus",
        "getServiceLogs",
        "stopService",
    }
    assert _schema(document, created["content"]["application/json"]["schema"])["properties"]["id"]
    for name, link in links.items():
        assert link["parameters"] == {"service_id": "$response.body#/id"}, name
        target = operations[link["operationId"]]
        assert "service_id" in [p["name"] for p in target["parameters"] if p["in"] == "path"]

"""The HTTP layer without a cluster: recipes, input validation, error shape."""

from __future__ import annotations

from collections.abc import AsyncIterator
from http import HTTPStatus
from pathlib import Path
from typing import Any

import msgspec
import pytest
import structlog.testing
from litestar import get
from litestar.testing import AsyncTestClient

from gateway.api.health import Readiness
from gateway.app import create_app
from gateway.settings import load_settings
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[AsyncTestClient[Any]]:
    key = tmp_path / "key"
    key.write_bytes(b"k" * 32)
    settings = load_settings(
        {
            # Nothing listens here: every Slurm call fails as "unavailable".
            "GATEWAY_SLURM_URL": f"http://127.0.0.1:{free_port()}",
            "GATEWAY_SLURM_USER": "gwuser",
            "GATEWAY_SLURM_JWT_KEY_FILE": str(key),
            "GATEWAY_RECIPES_DIRS": f"{ROOT / 'recipes'}:{ROOT / 'tests' / 'recipes'}",
        }
    )
    async with AsyncTestClient(app=create_app(settings)) as client:
        yield client


def assert_problem(body: dict[str, Any], status: int) -> None:
    assert body["status"] == status
    assert body["title"]
    assert body["detail"]


async def test_recipes_list_and_get(api: AsyncTestClient[Any]) -> None:
    listed = (await api.get("/api/v1/recipes")).json()
    paths = [r["path"] for r in listed]
    assert "inference/vllm" in paths
    vllm = (await api.get("/api/v1/recipes/inference/vllm")).json()
    assert vllm["name"] == "vllm"
    assert vllm["category"] == "inference"
    assert vllm["environment"]["VLLM_MODEL"] == "Qwen/Qwen2.5-0.5B-Instruct"
    assert vllm["resources"] == {
        "nodes": 1,
        "cpu": "2",
        "memory": "32G",
        "time_limit": 15,
        "gpu": "1",
    }
    assert vllm["parameters"]["VLLM_PORT"]["type"] == "port"
    assert (await api.get("/api/v1/recipes/vllm")).json()["path"] == "inference/vllm"


@pytest.mark.parametrize("name", ["nope/nope", "../../etc/passwd", "inference/vllm/../x"])
async def test_unknown_recipe_is_404(api: AsyncTestClient[Any], name: str) -> None:
    response = await api.get(f"/api/v1/recipes/{name}")
    assert response.status_code == 404
    assert_problem(response.json(), 404)


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        (b'{"recipe_name": "inference/vllm"', 400, None),
        (b"not json", 400, None),
        (b'{"recipe_name": "inference/vllm", "colour": "red"}', 422, "colour"),
        (b'{"recipe_name": 5}', 422, "recipe_name"),
        (b'{"recipe_name": ""}', 422, "recipe_name"),
        (b"{}", 422, "recipe_name"),
        (b'{"recipe_name": "inference/vllm", "config": {"resources": {"cpu": []}}}', 422, "cpu"),
        (
            b'{"recipe_name": "inference/vllm", "config": {"environment": {"A": 1}}}',
            422,
            "config.environment",
        ),
        (b'{"recipe_name": "inference/vllm", "config": {"resources": {"disk": "1G"}}}', 422, None),
        (b'{"recipe_name": "../../etc/passwd"}', 422, "recipe_name"),
        (b'{"recipe_name": "nope/nope"}', 422, "recipe_name"),
        (
            b'{"recipe_name": "inference/vllm", "config": {"resources": {"memory": "lots"}}}',
            422,
            "config.resources.memory",
        ),
        (
            b'{"recipe_name": "inference/vllm", "config": {"environment": {"EVIL": "x"}}}',
            422,
            "config.environment.EVIL",
        ),
        (
            b'{"recipe_name": "inference/vllm", '
            b'"config": {"environment": {"VLLM_MODEL": "$(touch /tmp/x)"}}}',
            422,
            "config.environment.VLLM_MODEL",
        ),
    ],
)
async def test_bad_create_requests_are_4xx_with_the_field(
    api: AsyncTestClient[Any], body: bytes, status: int, field: str | None
) -> None:
    response = await api.post(
        "/api/v1/services", content=body, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == status, response.text
    problem = response.json()
    assert_problem(problem, status)
    if field is not None:
        fields = [e["field"] for e in problem.get("errors", [])]
        assert any(field in f for f in fields), problem


async def test_slurm_down_is_503_with_retry_after(api: AsyncTestClient[Any]) -> None:
    response = await api.get("/api/v1/services")
    assert response.status_code == 503
    assert response.headers["retry-after"] == "5"
    assert_problem(response.json(), 503)
    response = await api.post("/api/v1/services", json={"recipe_name": "inference/vllm"})
    assert response.status_code == 503


@pytest.mark.parametrize("service_id", ["abc", "12; rm -rf /", "-1", "9" * 20])
async def test_malformed_service_ids_are_404(api: AsyncTestClient[Any], service_id: str) -> None:
    response = await api.get(f"/api/v1/services/{service_id}")
    assert response.status_code == 404
    assert_problem(response.json(), 404)


async def test_every_route_has_an_operation_id(api: AsyncTestClient[Any]) -> None:
    schema = (await api.get("/api/v1/schema/openapi.json")).json()
    ops = [op for item in schema["paths"].values() for op in item.values()]
    assert ops
    ids = [op.get("operationId") for op in ops]
    assert all(ids), ids
    assert len(set(ids)) == len(ids)


@pytest.mark.parametrize("tail", ["-1", "many", "100001"])
async def test_bad_log_tail_is_422_naming_it(api: AsyncTestClient[Any], tail: str) -> None:
    response = await api.get(f"/api/v1/services/1/logs?tail={tail}")
    assert response.status_code == 422
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert_problem(body, 422)
    assert [e["field"] for e in body["errors"]] == ["tail"]


def test_openapi_documents_one_error_shape(api: AsyncTestClient[Any]) -> None:
    """Every documented error answer is our problem document, never Litestar's own."""
    schema = api.app.openapi_schema.to_schema()
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            for code, response in operation["responses"].items():
                # Readiness answers 503 with its own body: a probe result, not an error.
                if code.startswith(("4", "5")) and (path, code) != ("/api/v1/ready", "503"):
                    assert list(response["content"]) == ["application/problem+json"], (
                        method,
                        path,
                        code,
                    )


async def test_unexpected_exception_is_a_500_problem(api: AsyncTestClient[Any]) -> None:
    @get("/api/v1/test-boom", sync_to_thread=False)
    def boom() -> str:
        raise RuntimeError("secret internals")

    api.app.register(boom)
    with structlog.testing.capture_logs() as logs:
        response = await api.get("/api/v1/test-boom")
    assert response.status_code == 500
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["status"] == 500
    assert body["title"] == "Internal error"
    assert body["detail"]
    assert "secret" not in response.text
    assert "RuntimeError" not in response.text
    [logged] = [e for e in logs if e.get("log_level") == "error"]
    assert logged["path"] == "/api/v1/test-boom"
    assert isinstance(logged["exc_info"], RuntimeError)


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/api/v1/nothing-here", 404),
        ("GET", "/nope", 404),
        ("DELETE", "/api/v1/health", 405),
        ("PUT", "/api/v1/recipes", 405),
    ],
)
async def test_litestar_http_errors_stay_problems(
    api: AsyncTestClient[Any], method: str, path: str, status: int
) -> None:
    response = await api.request(method, path)
    assert response.status_code == status
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json() == {
        "status": status,
        "title": HTTPStatus(status).phrase,
        "detail": HTTPStatus(status).phrase,
    }


async def test_not_ready_is_a_503_with_the_readiness_body(api: AsyncTestClient[Any]) -> None:
    response = await api.get("/api/v1/ready")
    assert response.status_code == 503
    assert response.headers["content-type"].startswith("application/json")
    body = msgspec.convert(response.json(), Readiness)
    assert body.status == "unavailable"
    assert body.detail
    documented = api.app.openapi_schema.to_schema()["paths"]["/api/v1/ready"]["get"]
    assert documented["responses"]["503"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Readiness"
    }


async def test_served_document_keeps_null_in_examples(api: AsyncTestClient[Any]) -> None:
    schema = (await api.get("/api/v1/schema/openapi.json")).json()
    body = schema["paths"]["/api/v1/services"]["post"]["requestBody"]
    examples = body["content"]["application/json"]["schema"]["examples"]
    assert any(
        e.get("config", {}).get("resources", {}).get("gpu", "absent") is None for e in examples
    )

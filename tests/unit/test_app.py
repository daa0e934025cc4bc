"""The HTTP layer without a cluster: recipes, input validation, error shape."""

from __future__ import annotations

import asyncio
import time
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
from tests.support.app import app_client, stub_settings
from tests.support.http_stub import Seen, http_stub
from tests.support.http_stub import response as http_response

# slurmrestd's ping as 24.11 (v0.0.42) answers it.
PING_42 = {
    "pings": [{"hostname": "n1", "pinged": "UP", "responding": True, "latency": 10}],
    "meta": {"slurm": {"release": "24.11.5"}},
    "errors": [],
    "warnings": [],
}


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[AsyncTestClient[Any]]:
    # Nothing listens at its slurmrestd: every Slurm call fails as "unavailable".
    async with AsyncTestClient(app=create_app(stub_settings(tmp_path))) as client:
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


@pytest.mark.parametrize(
    "tail", ["-1", "many", "100001", "0.0", "1e2", "1&tail=2", "%EF%BC%91", "+1", ""]
)
async def test_bad_log_tail_is_422_naming_it(api: AsyncTestClient[Any], tail: str) -> None:
    response = await api.get(f"/api/v1/services/1/logs?tail={tail}")
    assert response.status_code == 422
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert_problem(body, 422)
    assert [e["field"] for e in body["errors"]] == ["tail"]


VLLM_ROOT_PATHS = {"/tokenize", "/detokenize", "/score", "/rerank", "/pooling", "/classify"}


def test_openapi_documents_one_error_shape(api: AsyncTestClient[Any]) -> None:
    """Every documented error answer is our problem document, never Litestar's own."""
    schema = api.app.openapi_schema.to_schema()
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            for code, response in operation["responses"].items():
                if not code.startswith(("4", "5")):
                    continue
                if path.startswith("/v1/messages"):
                    # Anthropic's API answers in Anthropic's shape, which its SDKs read.
                    content = response["content"]
                    ref = content["application/json"]["schema"]["$ref"]
                    assert ref.endswith("/AnthropicError"), (method, path, code)
                elif path.startswith(("/v1/", "/v2/")) or path in VLLM_ROOT_PATHS:
                    # The OpenAI front door and vLLM's other APIs answer in
                    # OpenAI's shape, which its SDKs (and vLLM's clients) read.
                    content = response["content"]
                    assert list(content) == ["application/json"], (method, path, code)
                    ref = content["application/json"]["schema"]["$ref"]
                    assert ref.endswith("/OpenAIError"), (method, path, code)
                # Readiness answers 503 with its own body: a probe result, not an error.
                elif (path, code) != ("/api/v1/ready", "503"):
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


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("DELETE", "/api/v1/health", "GET, OPTIONS"),
        ("PUT", "/api/v1/services", "GET, OPTIONS, POST"),
        ("PATCH", "/api/v1/services/1", "DELETE, GET, OPTIONS"),
        ("GET", "/api/v1/vllm/1/prompt", "OPTIONS, POST"),
    ],
)
async def test_every_method_of_a_path_is_allowed(
    api: AsyncTestClient[Any], method: str, path: str, allowed: str
) -> None:
    """A 405 says what is allowed (RFC 9110), and OPTIONS says all of it, also
    on a path where Litestar 2 would list only its first handler's method."""
    refused = await api.request(method, path)
    assert refused.status_code == 405
    assert set(refused.headers["allow"].split(", ")) == set(allowed.split(", "))
    assert refused.headers["content-type"].startswith("application/problem+json")
    options = await api.options(path)
    assert options.status_code == 204
    assert options.headers["allow"] == allowed


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"config": {"resources": {"nodes": "2"}}}, "config.resources.nodes"),
        ({"config": {"resources": {"nodes": True}}}, "config.resources.nodes"),
        ({"config": {"resources": {"time_limit": 1.5}}}, "config.resources.time_limit"),
    ],
)
async def test_bodies_are_read_as_the_document_types_them(
    api: AsyncTestClient[Any], body: dict[str, Any], field: str
) -> None:
    """No lenient conversion of a body ("2" for 2), as the prompt's fast path reads it."""
    response = await api.post("/api/v1/services", json={"recipe_name": "inference/vllm", **body})
    assert response.status_code == 422, response.text
    assert [e["field"] for e in response.json()["errors"]] == [field]
    prompt = await api.post("/api/v1/vllm/1/prompt", json={"prompt": "hi", "stream": 0})
    assert prompt.status_code == 422, prompt.text
    assert [e["field"] for e in prompt.json()["errors"]] == ["stream"]


async def test_a_whole_float_is_an_integer(api: AsyncTestClient[Any]) -> None:
    """JSON Schema's integer 2 may be written 2.0: past validation, to Slurm (down here)."""
    body = {"recipe_name": "inference/vllm", "config": {"resources": {"nodes": 2.0}}}
    assert (await api.post("/api/v1/services", json=body)).status_code == 503


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


async def test_busy_slurmrestd_is_503_with_retry_after(tmp_path: Path) -> None:
    """Calls beyond GATEWAY_SLURM_MAX_CONCURRENCY wait at most the queue timeout,
    then are answered 503 with Retry-After instead of piling up."""
    answered = 0
    holding = asyncio.Event()
    release = asyncio.Event()

    async def slurmrestd(seen: Seen, writer: asyncio.StreamWriter) -> None:
        nonlocal answered
        answered += 1
        if answered > 1:  # the version probe is answered at once, the rest wait
            holding.set()
            await release.wait()
        writer.write(http_response(200, PING_42))

    async with http_stub(slurmrestd) as stub:
        settings = stub_settings(
            tmp_path, stub.url, slurm_max_concurrency="1", slurm_queue_timeout_seconds="0.2"
        )
        # In this loop, with the stub (AsyncTestClient runs the app in a thread of its own).
        async with app_client(create_app(settings)) as api:
            create = {"recipe_name": "testing/http"}
            # The first create's submission takes the one slot (after the probe).
            held = asyncio.create_task(api.post("/api/v1/services", json=create))
            await asyncio.wait_for(holding.wait(), 5)
            started = time.monotonic()
            busy = await api.post("/api/v1/services", json=create)
            waited = time.monotonic() - started
            reached = answered
            release.set()
            await held
    assert busy.status_code == 503, busy.text
    assert busy.headers["retry-after"] == "5"
    assert_problem(busy.json(), 503)
    assert "slurmrestd is busy" in busy.json()["detail"]
    assert waited < 1.5  # the queue timeout, not the held call
    assert reached == 2  # the probe and the held call: the refused one was never sent


async def test_draining_is_not_ready_without_asking_slurm(api: AsyncTestClient[Any]) -> None:
    api.app.state.draining = True  # what SIGTERM sets for GATEWAY_SHUTDOWN_DRAIN_SECONDS
    response = await api.get("/api/v1/ready")
    assert response.status_code == 503
    body = msgspec.convert(response.json(), Readiness)
    assert body.status == "draining"
    assert (await api.get("/api/v1/health")).status_code == 200  # still alive, still serving
    assert (await api.get("/api/v1/ready", params={"slurm": "false"})).status_code == 503


async def test_ready_without_slurm_is_what_kubernetes_probes(api: AsyncTestClient[Any]) -> None:
    # This app's slurmrestd is unreachable: every replica would be out of the Service.
    assert (await api.get("/api/v1/ready")).status_code == 503
    response = await api.get("/api/v1/ready", params={"slurm": "false"})
    assert response.status_code == 200
    body = msgspec.convert(response.json(), Readiness)
    assert (body.status, body.detail) == ("ok", "Slurm not asked (slurm=false)")
    assert (await api.get("/api/v1/ready", params={"slurm": "maybe"})).status_code == 422


async def test_metrics_count_requests_by_route_not_by_id(api: AsyncTestClient[Any]) -> None:
    for service_id in ("12", "13"):
        await api.get(f"/api/v1/services/{service_id}/status")
    await api.get("/api/v1/recipes")
    response = await api.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    template = 'path="/api/v1/services/{service_id}/status"'
    counted = [
        line
        for line in text.splitlines()
        if line.startswith("gateway_http_request_duration_seconds_count{") and template in line
    ]
    assert counted and 'status="503"' in counted[0], counted
    assert float(counted[0].rsplit(" ", 1)[1]) >= 2
    assert 'path="/api/v1/recipes"' in text
    assert "/api/v1/services/12" not in text  # no ids as labels
    assert "gateway_build_info{" in text
    # Not part of the API document.
    schema = (await api.get("/api/v1/schema/openapi.json")).json()
    assert "/metrics" not in schema["paths"]


def _sample(text: str, prefix: str) -> float:
    lines = [line for line in text.splitlines() if line.startswith(prefix)]
    return float(lines[0].rsplit(" ", 1)[1]) if lines else 0.0


async def test_metrics_count_requests_no_route_took(api: AsyncTestClient[Any]) -> None:
    unknown = 'gateway_http_unrouted_requests_total{method="GET",status="404"}'
    wrong_method = 'gateway_http_unrouted_requests_total{method="PUT",status="405"}'
    odd = 'gateway_http_unrouted_requests_total{method="other",status="404"}'
    before = (await api.get("/metrics")).text
    assert (await api.get("/wp-login.php")).status_code == 404
    assert (await api.put("/api/v1/recipes")).status_code == 405
    assert (await api.request("BREW", "/coffee")).status_code == 404
    # A handler's own 404 (unknown service) is a routed request, counted by route.
    assert (await api.get("/api/v1/recipes/no/such")).status_code == 404
    after = (await api.get("/metrics")).text
    assert _sample(after, unknown) == _sample(before, unknown) + 1
    assert _sample(after, wrong_method) == _sample(before, wrong_method) + 1
    assert _sample(after, odd) == _sample(before, odd) + 1
    assert "wp-login" not in after and "BREW" not in after  # nothing the caller chose

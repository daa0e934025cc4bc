"""A Python client generated from openapi/openapi.json drives the live gateway.

``openapi-python-client`` generates a package from the committed document into
a temporary folder; the test imports it and walks a service's life with its
async API against a real gateway on cluster c2411, with the OpenAI-shaped stub
recipe: create, read, list, status until running, vLLM listing and models,
prompt, logs, the OpenAI front door's five operations (model listing, a served
model and an unknown one: 404 in OpenAI's error shape; a chat completion, embeddings,
a completion for an unknown model), two of vLLM's other APIs (tokenize, Cohere's
rerank), stop, recipes, health. Where the document and
the server disagree, a generated client quietly answers ``None`` (an undocumented
status) or files unknown fields under ``additional_properties``: every call
therefore uses the ``*_detailed`` variant and checks that ``.parsed`` is the
documented model, that no field was left undocumented, and that the model gives
back exactly the JSON the server sent. vLLM's answers on /v1 are the exception
by design: the document describes what the gateway reads of them (``object``,
``id``, ``model``) and they come back as vLLM sent them, so the rest of their
fields are ``additional_properties``.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest

from tests.support.clusters import CLUSTERS, TIMINGS
from tests.support.gateway_process import ROOT, GatewayProcess
from tests.support.polling import poll

CLUSTER = "c2411"
PACKAGE = "gateway_generated_client"


def generate(out: Path) -> None:
    """Generate the client package into ``out``; fail on anything but success."""
    venv_bin = Path(sys.executable).parent
    run = subprocess.run(
        [
            str(venv_bin / "openapi-python-client"), "generate",
            "--path", str(ROOT / "openapi" / "openapi.json"),
            "--output-path", str(out),
            "--meta", "none",
        ],
        # The generator formats its output with the ruff it finds on PATH.
        env={"PATH": f"{venv_bin}:/usr/bin:/bin", "HOME": str(out.parent)},
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    output = (run.stdout + run.stderr).strip()
    # Its only line on a clean run; every warning it has comes on top of it.
    assert run.returncode == 0, output
    assert output == f"Generating {out}", f"openapi-python-client warned:\n{output}"


@pytest.fixture(scope="module")
def client_package(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    folder = tmp_path_factory.mktemp("generated")
    generate(folder / PACKAGE)
    sys.path.insert(0, str(folder))
    try:
        yield importlib.import_module(PACKAGE)
    finally:
        sys.path.remove(str(folder))


@pytest.fixture
def gateway() -> Iterator[GatewayProcess]:
    cluster = next((c for c in CLUSTERS if c.name == CLUSTER), None)
    if cluster is None:
        pytest.fail(f"no local cluster {CLUSTER}; run `make cluster`")
    with GatewayProcess(cluster) as process:
        yield process


def module(name: str) -> Any:
    return importlib.import_module(f"{PACKAGE}.{name}")


def _wire(value: Any) -> Any:
    """``to_dict()`` output in JSON's terms, for comparing with the server's JSON."""
    if isinstance(value, dict):
        return {k: _wire(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_wire(v) for v in value]
    return value


def _same_json(sent: Any, back: Any) -> bool:
    """The server's JSON and the model's ``to_dict()``; timestamps by instant."""
    if isinstance(sent, dict) and isinstance(back, dict):
        return sent.keys() == back.keys() and all(_same_json(sent[k], back[k]) for k in sent)
    if isinstance(sent, list) and isinstance(back, list):
        return len(sent) == len(back) and all(map(_same_json, sent, back))
    if isinstance(sent, str) and isinstance(back, str) and sent != back:
        try:
            return datetime.fromisoformat(sent) == datetime.fromisoformat(back)
        except ValueError:
            return False
    return bool(sent == back)


def _optional_but_sent(item: Any, where: str = "") -> list[str]:
    """Fields the document calls optional (``Unset`` by default) that the server
    sent anyway as null: the document should make them required."""
    found: list[str] = []
    if isinstance(item, list):
        for i, value in enumerate(item):
            found += _optional_but_sent(value, f"{where}[{i}]")
    elif attrs.has(type(item)):
        for field in attrs.fields(type(item)):
            value = getattr(item, field.name)
            if value is None and type(field.default).__name__ == "Unset":
                found.append(f"{where}.{field.name}")
            found += _optional_but_sent(value, f"{where}.{field.name}")
    return found


def documented(response: Any, status: int, model: type) -> Any:
    """``.parsed`` of a ``*_detailed`` answer: the documented model, all of the JSON."""
    assert response.status_code == status, response.content
    parsed = response.parsed
    items = parsed if isinstance(parsed, list) else [parsed]
    assert isinstance(parsed, list | model), (parsed, response.content)
    for item in items:
        assert isinstance(item, model), (item, response.content)
        assert not getattr(item, "additional_properties", {}), (
            f"fields the document does not describe: {item.additional_properties}"
        )
    back = [i.to_dict() for i in items] if isinstance(parsed, list) else parsed.to_dict()
    sent = json.loads(response.content)
    assert _same_json(sent, _wire(back)), (sent, back)
    assert not _optional_but_sent(parsed), _optional_but_sent(parsed)
    return parsed


def relayed(response: Any, model: type, kind: str, service_id: str) -> Any:
    """``.parsed`` of a 200 that vLLM (here the stub) answered through /v1: the
    documented model, open by design, giving back the JSON exactly."""
    assert response.status_code == 200, response.content
    assert response.headers["x-gateway-service-id"] == service_id
    parsed = response.parsed
    assert isinstance(parsed, model), (parsed, response.content)
    assert parsed.object_ == kind and parsed.model == "stub", parsed
    assert _same_json(json.loads(response.content), _wire(parsed.to_dict())), response.content
    return parsed


async def test_generated_python_client_walks_a_service(
    client_package: Any, gateway: GatewayProcess
) -> None:
    models = module("models")
    services = {n: module(f"api.services.{n}") for n in (
        "create_service", "get_service", "list_services", "get_service_status",
        "get_service_logs", "stop_service",
    )}  # fmt: skip
    vllm = {n: module(f"api.vllm.{n}") for n in ("list_vllm_services", "list_vllm_models")}
    prompt_vllm = module("api.vllm.prompt_vllm")
    vllm_apis = {n: module(f"api.vllm.{n}") for n in ("tokenize", "rerank_v2")}
    openai = {n: module(f"api.openai.{n}") for n in (
        "list_open_ai_models", "get_open_ai_model", "create_chat_completion",
        "create_embedding", "create_completion",
    )}  # fmt: skip
    recipes = {n: module(f"api.recipes.{n}") for n in ("list_recipes", "get_recipe")}
    health = {n: module(f"api.health.{n}") for n in ("get_health", "get_readiness")}
    driven: list[str] = []
    started = time.monotonic()

    client = client_package.Client(base_url=gateway.url, timeout=httpx.Timeout(60))
    async with client as api:
        created = documented(
            await services["create_service"].asyncio_detailed(
                client=api, body=models.CreateServiceRequest(recipe_name="testing/openai-stub")
            ),
            201,
            models.ServiceResponse,
        )
        sid = created.id
        driven.append("create")
        try:
            assert created.recipe_name == "testing/openai-stub"
            assert created.status in {models.ServiceStatus.PENDING, models.ServiceStatus.BUILDING}
            assert isinstance(created.created_at, datetime)

            async def status() -> Any:
                return documented(
                    await services["get_service_status"].asyncio_detailed(sid, client=api),
                    200,
                    models.ServiceStatusResponse,
                )

            polls = 0

            async def counted() -> Any:
                nonlocal polls
                polls += 1
                return await status()

            running = await poll(
                counted,
                lambda s: s.status == models.ServiceStatus.RUNNING,
                timeout=90,
                what=f"service {sid} running",
            )
            driven.append(f"status x{polls}")
            assert running.endpoint and running.node

            one = documented(
                await services["get_service"].asyncio_detailed(sid, client=api),
                200,
                models.ServiceResponse,
            )
            assert one.id == sid and one.config.environment["VLLM_MODEL"] == "stub"
            listed = documented(
                await services["list_services"].asyncio_detailed(client=api),
                200,
                models.ServiceResponse,
            )
            assert sid in {s.id for s in listed}
            driven += ["get", "list"]

            on_vllm = documented(
                await vllm["list_vllm_services"].asyncio_detailed(client=api),
                200,
                models.VllmServicesResponse,
            )
            assert sid in {s.id for s in on_vllm.vllm_services}
            served = documented(
                await vllm["list_vllm_models"].asyncio_detailed(sid, client=api),
                200,
                models.ModelsResponse,
            )
            assert served.models == ["stub"]
            driven += ["vllm services", "models"]

            answer = documented(
                await prompt_vllm.asyncio_detailed(
                    sid, client=api, body=models.PromptRequest(prompt="hi", max_tokens=4)
                ),
                200,
                models.PromptResponse,
            )
            assert answer.success and answer.response == " tok" * 4
            assert answer.model == "stub" and answer.service_id == sid
            assert isinstance(answer.usage, models.UsageResponse)
            assert answer.usage.completion_tokens == 4
            driven.append("prompt")

            logs = documented(
                await services["get_service_logs"].asyncio_detailed(sid, client=api, tail=50),
                200,
                models.LogsResponse,
            )
            assert logs.id == sid and isinstance(logs.logs, str)
            assert logs.reason is None, logs.reason  # the gateway read its own files
            assert "openai stub on port" in logs.stdout
            driven.append("logs")

            # The OpenAI front door (/v1) routes by model: the stub's is listed.
            cards = documented(
                await openai["list_open_ai_models"].asyncio_detailed(client=api),
                200,
                models.OpenAIModelList,
            )
            stub = next(c for c in cards.data if c.id == "stub")
            assert stub.object_ == "model" and stub.root == "stub" and stub.services >= 1
            card = documented(
                await openai["get_open_ai_model"].asyncio_detailed("stub", client=api),
                200,
                models.OpenAIModel,
            )
            assert card.to_dict() == stub.to_dict()
            # A model name with a slash (as most are): the client sends it as %2F.
            unknown = documented(
                await openai["get_open_ai_model"].asyncio_detailed("no/such-model", client=api),
                404,
                models.OpenAIError,
            )
            assert unknown.error.code == "model_not_found", unknown
            assert unknown.error.type_ == "invalid_request_error", unknown
            driven += ["openai models", "openai model", "openai model 404"]

            # Completions go to the service of their model as sent: a field the
            # document does not name (vLLM's `seed`) travels in additional_properties.
            message = models.ChatCompletionRequestMessagesItem.from_dict(
                {"role": "user", "content": "hi"}
            )
            request = models.ChatCompletionRequest(model="stub", messages=[message], max_tokens=4)
            request["seed"] = 7
            chat = relayed(
                await openai["create_chat_completion"].asyncio_detailed(client=api, body=request),
                models.OpenAIAnswer,
                "chat.completion",
                sid,
            )
            assert chat["choices"][0]["message"]["content"] == " tok" * 4, chat
            assert chat["usage"]["completion_tokens"] == 4, chat
            vectors = relayed(
                await openai["create_embedding"].asyncio_detailed(
                    client=api, body=models.EmbeddingRequest(model="stub", input_=["a", "b"])
                ),
                models.OpenAIAnswer,
                "list",
                sid,
            )
            assert [v["index"] for v in vectors["data"]] == [0, 1], vectors
            nowhere = documented(
                await openai["create_completion"].asyncio_detailed(
                    client=api, body=models.CompletionRequest(model="no/such-model", prompt="hi")
                ),
                404,
                models.OpenAIError,
            )
            assert nowhere.error.code == "model_not_found", nowhere
            assert "stub" in nowhere.error.message, nowhere  # it lists the served models
            driven += ["openai chat", "openai embeddings", "openai completion 404"]

            # vLLM's other APIs: the answer in vLLM's shape, all of it kept.
            tokenized = await vllm_apis["tokenize"].asyncio_detailed(
                client=api, body=models.TokenizeRequest(model="stub", prompt="hi")
            )
            assert tokenized.status_code == 200, tokenized.content
            assert tokenized.headers["x-gateway-service-id"] == sid
            assert isinstance(tokenized.parsed, models.VllmAnswer), tokenized.content
            assert tokenized.parsed["tokens"] == [104, 105], tokenized.content
            reranked = await vllm_apis["rerank_v2"].asyncio_detailed(
                client=api,
                body=models.RerankRequest(model="stub", query="q", documents=["a", "b"], top_n=1),
            )
            assert reranked.status_code == 200, reranked.content
            assert isinstance(reranked.parsed, models.VllmAnswer), reranked.content
            assert reranked.parsed.model == "stub"
            assert [r["index"] for r in reranked.parsed["results"]] == [0], reranked.content
            for answer in (tokenized, reranked):
                sent = json.loads(answer.content)
                assert _same_json(sent, _wire(answer.parsed.to_dict())), answer.content
            driven += ["vllm tokenize", "vllm rerank (Cohere's v2)"]
        finally:
            stopped = documented(
                await services["stop_service"].asyncio_detailed(sid, client=api),
                200,
                models.StopResponse,
            )
        assert stopped.id == sid
        assert stopped.status == models.ServiceStatus.CANCELLED, stopped
        driven.append("stop")
        final = await poll(
            status, lambda s: s.status.value == "cancelled", timeout=30, what="cancelled"
        )
        assert final.ended_at is not None

        every = documented(
            await recipes["list_recipes"].asyncio_detailed(client=api),
            200,
            models.RecipeResponse,
        )
        vllm_recipe = next(r for r in every if r.path == "inference/vllm")
        assert vllm_recipe.kind == "vllm"
        assert "VLLM_MODEL" in vllm_recipe.parameters.additional_keys
        # A path parameter with a slash: the client sends it as %2F.
        by_path = documented(
            await recipes["get_recipe"].asyncio_detailed("inference/vllm", client=api),
            200,
            models.RecipeResponse,
        )
        assert by_path.to_dict() == vllm_recipe.to_dict()
        missing = await recipes["get_recipe"].asyncio_detailed("no/such", client=api)
        assert isinstance(documented(missing, 404, models.ProblemResponse), models.ProblemResponse)
        assert missing.parsed.status == 404
        driven += ["recipes", "recipe", "recipe 404"]

        documented(await health["get_health"].asyncio_detailed(client=api), 200, models.Health)
        ready = documented(
            await health["get_readiness"].asyncio_detailed(client=api), 200, models.Readiness
        )
        assert ready.status == "ok" and ready.slurm_api_version, ready
        driven += ["health", "ready"]

    TIMINGS.append(
        f"generated Python client (openapi-python-client {version('openapi-python-client')},"
        f" no warnings) on {CLUSTER}: {', '.join(driven)} in {time.monotonic() - started:.1f}s"
    )

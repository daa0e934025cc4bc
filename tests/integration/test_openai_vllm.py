"""OpenAI's own Python SDK against the gateway's /v1, in front of the real vLLM
(CPU build, tiny local model) started by Slurm on the cluster with the vLLM
runtime (c2205).

Two services serve the recipe's default chat model under one alias
(VLLM_SERVED_MODEL_NAME): the SDK sees one model, and requests spread over
both; the first also serves a LoRA adapter of it, a model of its own. A third
serves a tiny cross-encoder (rerank, score), a fourth a tiny Whisper (audio).
The caller is tenant team-a with its API key, sent as the SDK sends it.
"""

from __future__ import annotations

import asyncio
import io
import math
import struct
import time
import wave
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import anthropic
import httpx
import openai
import pytest

from gateway.testing.clusters import LocalCluster, upstream_key
from tests.support.clusters import NO_VLLM, TIMINGS, VLLM_CLUSTERS, parametrize
from tests.support.gateway_process import GatewayProcess
from tests.support.polling import poll

ROOT = Path(__file__).resolve().parents[2]
KEY = "sgw_local-team-a-key"  # deploy/local/tenants.toml: tenant team-a
ALIAS = "tiny-chat"
ADAPTER = "tiny-lora"  # deploy/local/build_tiny_models.py: a LoRA adapter of tiny-chat
RERANKER = "tiny-rerank"
LISTENER = "tiny-whisper"
ROOT_MODEL = "Qwen/Qwen2.5-0.5B-Instruct"  # the recipe's default, a tiny local stand-in
STARTUP = 420.0  # seconds; four vLLMs starting at once on two cores


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    parametrize(metafunc, "gateway", VLLM_CLUSTERS, per_module=True, missing=NO_VLLM)


@pytest.fixture(scope="module")
def gateway(request: pytest.FixtureRequest) -> Iterator[GatewayProcess]:
    cluster: LocalCluster = request.param
    tenants = str(ROOT / "deploy" / "local" / "tenants.toml")
    with GatewayProcess(cluster, GATEWAY_AUTH_FILE=tenants) as process:
        yield process


class Services(NamedTuple):
    pair: list[str]  # two replicas of the chat model, the first with a LoRA adapter
    reranker: str  # a cross-encoder
    listener: str  # a Whisper


@pytest.fixture(scope="module")
def started(gateway: GatewayProcess) -> Iterator[Services]:
    """Two vLLM services of one model under one alias, the first also serving
    a LoRA adapter of it; one of a tiny cross-encoder, one of a tiny Whisper.
    All four start at once."""
    headers = {"Authorization": f"Bearer {KEY}"}
    ids: list[str] = []
    chat = {
        "VLLM_SERVED_MODEL_NAME": ALIAS,
        # Responses kept for GET /v1/responses/{id} and previous_response_id.
        "VLLM_ENABLE_RESPONSES_API_STORE": "1",
    }
    environments = [
        {**chat, "VLLM_LORA_MODULES": f"{ADAPTER}=/opt/models/tiny-lora"},
        chat,
        {"VLLM_MODEL": "/opt/models/tiny-rerank", "VLLM_SERVED_MODEL_NAME": RERANKER},
        {"VLLM_MODEL": "/opt/models/tiny-whisper", "VLLM_SERVED_MODEL_NAME": LISTENER},
    ]

    async def start() -> None:
        async with httpx.AsyncClient(base_url=gateway.url, headers=headers, timeout=60) as api:
            for environment in environments:
                body = {"recipe_name": "inference/vllm", "config": {"environment": environment}}
                created = await api.post("/api/v1/services", json=body)
                assert created.status_code == 201, created.text
                ids.append(created.json()["id"])
            started = time.monotonic()
            for sid in ids:
                state = await poll(
                    lambda sid=sid: api.get(f"/api/v1/services/{sid}/status"),  # type: ignore[misc]
                    lambda r: r.json()["status"] not in ("pending", "building", "starting"),
                    timeout=STARTUP,
                    interval=1,
                    what=f"vLLM service {sid} started",
                )
                assert state.json()["status"] == "running", state.text
            TIMINGS.append(
                f"/v1 with the SDK: four vLLMs running in {time.monotonic() - started:.0f} s"
            )

    async def stop() -> None:
        async with httpx.AsyncClient(base_url=gateway.url, headers=headers, timeout=60) as api:
            for sid in ids:
                await api.delete(f"/api/v1/services/{sid}")

    try:
        asyncio.run(start())
        yield Services(ids[:2], ids[2], ids[3])
    finally:
        asyncio.run(stop())


@pytest.fixture(scope="module")
def pair(started: Services) -> list[str]:
    return started.pair


@pytest.fixture
def client(gateway: GatewayProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=KEY, max_retries=0) as sdk:
        yield sdk


def test_the_sdk_lists_one_model_served_twice(client: openai.OpenAI, pair: list[str]) -> None:
    models = [m for m in client.models.list() if m.id == ALIAS]
    assert len(models) == 1, models
    card = models[0].model_dump()
    assert card["services"] == 2
    assert card["root"] == ROOT_MODEL
    assert card["owned_by"] == "team-a"
    assert card["max_model_len"] == 512  # the site's --max-model-len, as vLLM reports it
    assert client.models.retrieve(ALIAS).id == ALIAS


def test_a_lora_adapter_is_a_model_reaching_the_replica_that_loaded_it(
    client: openai.OpenAI, pair: list[str]
) -> None:
    card = client.models.retrieve(ADAPTER).model_dump()
    assert (card["parent"], card["root"]) == (ALIAS, "/opt/models/tiny-lora")
    assert card["services"] == 1
    assert card["max_model_len"] == 512  # its base model's
    assert ADAPTER in [m.id for m in client.models.list()]
    question = [{"role": "user", "content": "Once upon a time"}]
    served = set()
    for _ in range(4):
        raw = client.chat.completions.with_raw_response.create(
            model=ADAPTER, messages=question, max_tokens=8, temperature=0
        )
        served.add(raw.headers["x-gateway-service-id"])
        assert raw.parse().model == ADAPTER
    assert served == {pair[0]}
    adapted = client.chat.completions.create(
        model=ADAPTER, messages=question, max_tokens=8, temperature=0
    )
    base = client.chat.completions.create(
        model=ALIAS, messages=question, max_tokens=8, temperature=0
    )
    # The adapter's weights are its own: greedy decoding tells them apart.
    assert adapted.choices[0].message.content != base.choices[0].message.content
    print(f"LoRA {ADAPTER} on service {pair[0]}: {adapted.choices[0].message.content!r}")


def test_chat_plain_and_streamed_and_completions(client: openai.OpenAI, pair: list[str]) -> None:
    chat = client.chat.completions.create(
        model=ALIAS, messages=[{"role": "user", "content": "Tell me a joke"}], max_tokens=8
    )
    assert chat.choices[0].message.content
    assert chat.model == ALIAS
    assert chat.usage is not None and chat.usage.completion_tokens > 0

    pieces = [
        chunk.choices[0].delta.content or ""
        for chunk in client.chat.completions.create(
            model=ALIAS,
            messages=[{"role": "user", "content": "Count to five"}],
            max_tokens=8,
            stream=True,
        )
        if chunk.choices
    ]
    assert len(pieces) > 1 and "".join(pieces), pieces

    completion = client.completions.create(model=ALIAS, prompt="Once upon a time", max_tokens=8)
    assert completion.choices[0].text
    print(f"SDK through /v1: chat {chat.choices[0].message.content!r}, stream {len(pieces)} chunks")


def test_both_services_take_requests(client: openai.OpenAI, pair: list[str]) -> None:
    seen: Counter[str] = Counter()
    for _ in range(6):
        raw = client.chat.completions.with_raw_response.create(
            model=ALIAS, messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
        assert raw.parse().choices
        seen[raw.headers["x-gateway-service-id"]] += 1
    print(f"SDK requests per service: {dict(seen)}")
    assert set(seen) == set(pair)


async def test_the_async_client(gateway: GatewayProcess, pair: list[str]) -> None:
    async with openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key=KEY) as sdk:
        answers = await asyncio.gather(
            *(
                sdk.chat.completions.create(
                    model=ALIAS, messages=[{"role": "user", "content": f"say {n}"}], max_tokens=4
                )
                for n in range(4)
            )
        )
    assert all(a.choices[0].message.content for a in answers)


def test_sdk_errors(gateway: GatewayProcess, client: openai.OpenAI, pair: list[str]) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "hi"}]
        )
    assert ALIAS in str(missing.value)  # what the caller can use instead
    assert missing.value.code == "model_not_found"
    with (
        openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="sgw_wrong", max_retries=0) as wrong,
        pytest.raises(openai.AuthenticationError),
    ):
        wrong.models.list()


def test_tokenize_and_detokenize_round_trip(gateway: GatewayProcess, pair: list[str]) -> None:
    # vLLM's own routes, at its paths under the gateway's root, routed by model.
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=gateway.url, headers=headers, timeout=60) as api:
        tokens = api.post("/tokenize", json={"model": ALIAS, "prompt": "Once upon a time"})
        assert tokens.status_code == 200, tokens.text
        ids = tokens.json()["tokens"]
        assert tokens.json()["count"] == len(ids) > 0
        assert tokens.json()["max_model_len"] == 512
        assert tokens.headers["x-gateway-service-id"] in pair
        text = api.post("/detokenize", json={"model": ALIAS, "tokens": ids})
    assert text.status_code == 200, text.text
    assert text.json()["prompt"].endswith("Once upon a time"), text.json()
    print(f"tokenize through the gateway: {len(ids)} tokens, detokenized {text.json()}")


def test_rerank_and_score_in_jinas_and_cohere_shapes(
    gateway: GatewayProcess, started: Services
) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}
    query = "what does the licence allow"
    documents = ["the gnu general public license", "a recipe for bread", "apache license 2.0"]
    asked = {"model": RERANKER, "query": query, "documents": documents}
    with httpx.Client(base_url=gateway.url, headers=headers, timeout=60) as api:
        jina = api.post("/v1/rerank", json={**asked, "top_n": 2})
        cohere = api.post("/v2/rerank", json=asked)
        scored = api.post("/v1/score", json={"model": RERANKER, "queries": query,
                                             "documents": documents})  # fmt: skip
        bare = api.post("/score", json={"model": RERANKER, "text_1": query, "text_2": documents})
    for answer in (jina, cohere, scored, bare):
        assert answer.status_code == 200, answer.text
        assert answer.headers["x-gateway-service-id"] == started.reranker
    scores = [item["score"] for item in scored.json()["data"]]
    assert len(scores) == 3 and [item["score"] for item in bare.json()["data"]] == scores
    # Reranked: the same scores, best first; top_n kept two.
    ranked = sorted(range(3), key=lambda i: -scores[i])
    results = cohere.json()["results"]
    assert [r["index"] for r in results] == ranked
    assert [r["relevance_score"] for r in results] == pytest.approx([scores[i] for i in ranked])
    assert [r["index"] for r in jina.json()["results"]] == ranked[:2]
    print(f"rerank through the gateway: {ranked} with scores {scores}")


def tone(seconds: float = 1.0, rate: int = 16000) -> bytes:
    """A WAV of a 440 Hz tone."""
    out = io.BytesIO()
    with wave.open(out, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        samples = (
            int(8000 * math.sin(2 * math.pi * 440 * i / rate)) for i in range(int(seconds * rate))
        )
        wav.writeframes(b"".join(struct.pack("<h", sample) for sample in samples))
    return out.getvalue()


def test_audio_transcribed_and_translated_by_a_whisper_plain_and_streamed(
    client: openai.OpenAI, started: Services
) -> None:
    # A form (multipart) routed by its model field to the Whisper's service.
    audio = ("tone.wav", tone())
    heard = client.audio.transcriptions.with_raw_response.create(
        model=LISTENER, file=audio, language="en"
    )
    assert heard.headers["x-gateway-service-id"] == started.listener
    assert heard.parse().text
    # vLLM streams its own chunks (choices' deltas), which OpenAI's SDK does
    # not read: counted raw, as they come.
    form = {"model": LISTENER, "language": "en", "stream": "true"}
    headers = {"Authorization": f"Bearer {KEY}"}
    with (
        httpx.Client(base_url=str(client.base_url), headers=headers, timeout=60) as api,
        api.stream("POST", "/audio/transcriptions", data=form, files={"file": audio}) as streamed,
    ):
        assert streamed.status_code == 200
        assert streamed.headers["content-type"].startswith("text/event-stream")
        events = [line for line in streamed.iter_lines() if line.startswith("data: ")]
    deltas = [e for e in events if '"transcription.chunk"' in e]
    assert deltas and events[-1] == "data: [DONE]", events[-3:]
    translated = client.audio.translations.create(model=LISTENER, file=audio)
    assert translated.text
    print(
        f"Whisper through the gateway: {len(deltas)} streamed deltas, {heard.parse().text[:40]!r}"
    )


# vLLM's management routes (vllm/entrypoints/serve/dev, lora, profile,
# instrumentator, rl, elastic_ep, fault_tolerance in 0.32.0).
MANAGEMENT = (
    ("POST", "/sleep"), ("POST", "/wake_up"), ("GET", "/is_sleeping"),
    ("POST", "/pause"), ("POST", "/resume"), ("GET", "/is_paused"),
    ("POST", "/collective_rpc"), ("POST", "/reset_prefix_cache"), ("POST", "/reset_mm_cache"),
    ("POST", "/reset_encoder_cache"), ("POST", "/release_kv_cache_memory"),
    ("POST", "/start_profile"), ("POST", "/stop_profile"), ("GET", "/server_info"),
    ("POST", "/update_weights"), ("POST", "/init_weight_transfer_engine"),
    ("POST", "/start_weight_update"), ("POST", "/finish_weight_update"), ("GET", "/weight_info"),
    ("POST", "/v1/load_lora_adapter"), ("POST", "/v1/unload_lora_adapter"),
    ("POST", "/scale_elastic_ep"), ("GET", "/is_scaling_elastic_ep"), ("POST", "/abort_requests"),
    ("POST", "/fault_tolerance/apply"), ("GET", "/load"), ("GET", "/kv_event_sources"),
)  # fmt: skip


def test_vllms_management_routes_are_not_reachable(
    gateway: GatewayProcess, pair: list[str]
) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"model": ALIAS, "lora_name": "x", "lora_path": "/tmp", "method": "x"}
    with httpx.Client(base_url=gateway.url, headers=headers, timeout=60) as api:
        endpoint = api.get(f"/api/v1/services/{pair[0]}").json()["endpoint"]
        through = {
            (method, path): api.request(method, path, json=body if method == "POST" else None)
            for method, path in MANAGEMENT
        }
    reached = {
        key: answer.status_code for key, answer in through.items() if answer.status_code != 404
    }
    assert not reached, reached
    # The same vLLM answers some of them itself, to the gateway's key for it:
    # the routes exist behind the gateway.
    key = asyncio.run(upstream_key(gateway.cluster, gateway.env, int(pair[0])))
    with httpx.Client(
        base_url=endpoint, timeout=60, headers={"Authorization": f"Bearer {key}"}
    ) as direct:
        load = direct.get("/load")
    assert load.status_code == 200, load.text
    print(f"{len(MANAGEMENT)} management routes: 404 through the gateway; GET /load direct: 200")


def test_responses_plain_streamed_stored_and_followed_up(
    gateway: GatewayProcess, client: openai.OpenAI, pair: list[str]
) -> None:
    # OpenAI's Responses API: each response is named for its service, so a
    # follow-up and a retrieval reach the vLLM that keeps it.
    before = token_counts(gateway)
    first = client.responses.with_raw_response.create(
        model=ALIAS, input="Tell me a story", max_output_tokens=8
    )
    made = first.parse()
    holder = first.headers["x-gateway-service-id"]
    assert made.id.startswith(f"resp_{holder}_"), made.id
    assert made.output_text, made

    events = list(
        client.responses.create(
            model=ALIAS, input="Count to five", max_output_tokens=8, stream=True
        )
    )
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed", kinds
    streamed = events[-1].response  # type: ignore[union-attr]
    assert holder_of(streamed.id) in pair
    # Both answers' tokens are in the gateway's token metrics.
    assert made.usage is not None and streamed.usage is not None
    after = token_counts(gateway)
    assert (after[0] - before[0], after[1] - before[1]) == (
        made.usage.input_tokens + streamed.usage.input_tokens,
        made.usage.output_tokens + streamed.usage.output_tokens,
    )

    # Follow-ups reach the holder, whichever service the model's load would pick.
    reached = Counter()
    previous = made.id
    for _ in range(4):
        raw = client.responses.with_raw_response.create(
            model=ALIAS, input="And then?", previous_response_id=previous, max_output_tokens=4
        )
        reached[raw.headers["x-gateway-service-id"]] += 1
        assert raw.parse().previous_response_id == previous
    assert set(reached) == {holder}, reached

    # Any gateway replica finds it: a second process, nothing shared but Slurm.
    tenants = str(ROOT / "deploy" / "local" / "tenants.toml")
    with (
        GatewayProcess(gateway.cluster, GATEWAY_AUTH_FILE=tenants) as other,
        openai.OpenAI(base_url=f"{other.url}/v1", api_key=KEY, max_retries=0) as sdk,
    ):
        again = sdk.responses.retrieve(made.id)
        assert again.id == made.id and again.output_text == made.output_text
        with pytest.raises(openai.NotFoundError) as gone:
            sdk.responses.retrieve("resp_999999_" + "0" * 32)
    assert gone.value.code == "response_not_found"
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve("resp_not-ours")
    # A cancel reaches the holder too, which refuses it for a finished response.
    with pytest.raises(openai.BadRequestError) as finished:
        client.responses.cancel(made.id)
    assert "synchronous" in str(finished.value), finished.value
    print(
        f"Responses: {made.id} on {holder}; 4 follow-ups on {dict(reached)}; {len(events)} events"
    )


def token_counts(gateway: GatewayProcess) -> tuple[float, float]:
    """gateway_prompt_tokens_total's prompt and completion counts."""
    answer = httpx.get(f"{gateway.url}/metrics")  # a scrape without credentials
    assert answer.status_code == 200, answer.text
    text = answer.text
    found = dict.fromkeys(("prompt", "completion"), 0.0)
    for line in text.splitlines():
        for kind in found:
            if line.startswith(f'gateway_prompt_tokens_total{{kind="{kind}"}} '):
                found[kind] = float(line.rsplit(" ", 1)[1])
    return found["prompt"], found["completion"]


def holder_of(response_id: str) -> str:
    return response_id.split("_")[1]


def test_anthropics_sdk_plain_streamed_counted_and_refused(
    gateway: GatewayProcess, pair: list[str]
) -> None:
    # Anthropic's SDK sends the key as X-Api-Key, with anthropic-version.
    asked = [{"role": "user", "content": "Tell me a joke"}]
    before = token_counts(gateway)
    with anthropic.Anthropic(base_url=gateway.url, api_key=KEY, max_retries=0) as sdk:
        message = sdk.messages.create(model=ALIAS, max_tokens=8, messages=asked)
        assert message.content and message.content[0].text, message
        assert message.usage.output_tokens > 0
        with sdk.messages.stream(model=ALIAS, max_tokens=8, messages=asked) as stream:
            text = "".join(stream.text_stream)
            streamed = stream.get_final_message().usage
        assert text
        # Both answers' tokens are in the gateway's token metrics.
        used = (message.usage.input_tokens + streamed.input_tokens,
                message.usage.output_tokens + streamed.output_tokens)  # fmt: skip
        after = token_counts(gateway)
        assert (after[0] - before[0], after[1] - before[1]) == used
        counted = sdk.messages.count_tokens(model=ALIAS, messages=asked)
        assert counted.input_tokens > 0
        with pytest.raises(anthropic.NotFoundError) as missing:
            sdk.messages.create(model="no-such-model", max_tokens=8, messages=asked)
        assert ALIAS in str(missing.value)
    with (
        anthropic.Anthropic(base_url=gateway.url, api_key="sgw_wrong", max_retries=0) as wrong,
        pytest.raises(anthropic.AuthenticationError) as refused,
    ):
        wrong.messages.create(model=ALIAS, max_tokens=8, messages=asked)
    assert refused.value.body["error"]["type"] == "authentication_error"
    said = message.content[0].text
    print(f"Anthropic's SDK: {said!r}, stream {text!r}, {counted.input_tokens} input tokens")

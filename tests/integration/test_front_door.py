"""The OpenAI front door (/v1) on a real cluster, in front of OpenAI-shaped stubs.

Services of tests/recipes/testing/openai-stub run as Slurm jobs on c2411
(Slurm 24.11) behind one gateway with deploy/local/tenants.toml. What a user
of /v1 would notice: a model served by two services spreads over both; a
service stopped, or killed behind the gateway's back, under load costs no
request (beyond one in flight on it); a client that leaves a stream frees the
service at once; errors come in OpenAI's shape; tenants see their own models
and those an admin shared, nothing else.

Every service a test starts is stopped at its end; the module ends by checking
that none of its jobs is left in squeue. Run with ``-s`` for the figures.

The real vLLM behind /v1, with OpenAI's SDK, is tests/integration/test_openai_vllm.py.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from gateway.testing.clusters import LocalCluster
from tests.support.clusters import CLUSTERS, TIMINGS
from tests.support.gateway_process import GatewayProcess
from tests.support.polling import poll

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = "c2411"
TEAM_A = {"Authorization": "Bearer sgw_local-team-a-key"}  # tenant team-a, gwuser
TEAM_B = {"Authorization": "Bearer sgw_local-team-b-key"}  # tenant team-b, gwteam
ADMIN = {"Authorization": "Bearer sgw_local-admin-key"}  # tenant ops
MODEL = "fd-pair"
# Every job the module made: none may be left in squeue at its end.
CREATED: list[str] = []


def chat(model: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4,
        **extra,
    }


@pytest.fixture(scope="module")
def stub_cluster() -> LocalCluster:
    found = [c for c in CLUSTERS if c.name == CLUSTER]
    if not found:
        raise pytest.UsageError(
            f"cluster {CLUSTER} is not up; run `bash deploy/local/cluster.sh up`"
        )
    return found[0]


def squeue_ids(cluster: LocalCluster) -> set[str]:
    """The ids of the jobs squeue shows (pending, running, completing)."""
    done = subprocess.run(
        ["chroot", cluster.chroot, "squeue", "-h", "-o", "%i"],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    return set(done.stdout.split())


@pytest.fixture(scope="module")
def gateway(stub_cluster: LocalCluster) -> Iterator[GatewayProcess]:
    with GatewayProcess(
        stub_cluster, GATEWAY_AUTH_FILE=str(ROOT / "deploy" / "local" / "tenants.toml")
    ) as process:
        yield process
        # Each test stopped what it started, through the API: none of it is
        # left in Slurm (a cancelled job leaves squeue within moments).
        deadline = time.monotonic() + 30
        while (left := squeue_ids(stub_cluster) & set(CREATED)) and time.monotonic() < deadline:
            time.sleep(0.3)
        if left:
            subprocess.run(
                ["chroot", stub_cluster.chroot, "scancel", *sorted(left)],
                capture_output=True, timeout=30, check=False,
            )  # fmt: skip
        print(f"\n/v1 module: {len(CREATED)} jobs made, {len(left)} left in squeue")
        assert not left, f"jobs left in squeue: {sorted(left)}"


@pytest.fixture
async def api(gateway: GatewayProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30, headers=TEAM_A) as client:
        yield client


class Services:
    """Stubs started for a test, stopped at its end whatever happens."""

    def __init__(self, gateway: GatewayProcess) -> None:
        self.gateway = gateway
        self.ids: list[str] = []

    async def start(
        self,
        model: str,
        who: dict[str, str] = TEAM_A,
        *,
        shared: bool = False,
        headers: dict[str, str] | None = None,
        **env: str,
    ) -> str:
        body: dict[str, Any] = {
            "recipe_name": "testing/openai-stub",
            "config": {"environment": {"VLLM_MODEL": model, **env}},
        }
        if shared:
            body["shared"] = True
        async with httpx.AsyncClient(base_url=self.gateway.url, timeout=30) as client:
            created = await client.post(
                "/api/v1/services", json=body, headers={**who, **(headers or {})}
            )
        assert created.status_code == 201, created.text
        sid: str = created.json()["id"]
        self.ids.append(sid)
        CREATED.append(sid)
        return sid

    async def running(self, *ids: str) -> None:
        async with httpx.AsyncClient(base_url=self.gateway.url, timeout=30, headers=ADMIN) as c:
            await asyncio.gather(
                *(
                    poll(
                        lambda sid=sid: c.get(f"/api/v1/services/{sid}/status"),  # type: ignore[misc]
                        lambda r: r.json()["status"] == "running",
                        timeout=90,
                        what=f"service {sid} running",
                    )
                    for sid in ids
                )
            )

    async def aclose(self) -> None:
        async with httpx.AsyncClient(base_url=self.gateway.url, timeout=30, headers=ADMIN) as c:
            for sid in self.ids:
                await c.delete(f"/api/v1/services/{sid}")


@pytest.fixture
async def services(gateway: GatewayProcess) -> AsyncIterator[Services]:
    async with aclosing(Services(gateway)) as started:
        yield started


@pytest.fixture(scope="module")
def pair(gateway: GatewayProcess) -> Iterator[list[str]]:
    """Two running stubs of one model (team-a's), for the module's read-only tests."""
    started = Services(gateway)

    async def up() -> list[str]:
        ids = [await started.start(MODEL), await started.start(MODEL)]
        await started.running(*ids)
        return ids

    try:
        yield asyncio.run(up())
    finally:
        asyncio.run(started.aclose())


async def slurm(cluster: LocalCluster, *command: str) -> None:
    """A Slurm command as root on the cluster (what its admin or another replica does)."""
    await asyncio.to_thread(
        subprocess.run, ["chroot", cluster.chroot, *command], check=True, capture_output=True
    )


def error_of(response: httpx.Response) -> dict[str, Any]:
    """OpenAI's error shape, checked: {"error": {message, type, param, code}}."""
    assert response.headers["content-type"].startswith("application/json"), response.text
    body: dict[str, Any] = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"], body
    error: dict[str, Any] = body["error"]
    return error


def sse_events(text: str) -> list[str]:
    """The data of each server-sent event of a stream."""
    return [line[len("data: ") :] for line in text.splitlines() if line.startswith("data: ")]


# -- one model, two services ------------------------------------------------------


async def test_two_services_of_one_model_share_its_requests(
    api: httpx.AsyncClient, pair: list[str]
) -> None:
    models = await poll(
        lambda: api.get("/v1/models"),
        lambda r: any(m["id"] == MODEL and m["services"] == 2 for m in r.json()["data"]),
        what="the model listed with both services",
    )
    assert models.json()["object"] == "list"
    cards = [m for m in models.json()["data"] if m["id"] == MODEL]
    assert len(cards) == 1, cards  # one model, however many services serve it
    card = cards[0]
    assert card["object"] == "model"
    assert card["owned_by"] == "team-a"
    assert card["root"] == MODEL
    assert isinstance(card["created"], int)
    assert card["max_model_len"] == 2048  # as the stub's /v1/models reports it
    one = await api.get(f"/v1/models/{MODEL}")
    assert one.status_code == 200
    assert one.json() == card

    seen: Counter[str] = Counter()
    for _ in range(20):
        answer = await api.post("/v1/chat/completions", json=chat(MODEL))
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["content"] == " tok" * 4
        assert answer.json()["model"] == MODEL
        seen[answer.headers["x-gateway-service-id"]] += 1
    print(f"/v1 20 chat requests over two services of {MODEL}: {dict(seen)}")
    assert set(seen) == set(pair)
    assert min(seen.values()) >= 5, seen

    plain = await api.post(
        "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 3}
    )
    assert plain.status_code == 200, plain.text
    assert plain.json()["object"] == "text_completion"
    assert plain.json()["choices"][0]["text"] == " tok" * 3
    assert plain.headers["x-gateway-service-id"] in pair

    for path, body in (
        ("/v1/chat/completions", chat(MODEL, stream=True)),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 4, "stream": True}),
    ):
        async with api.stream("POST", path, json=body) as stream:
            assert stream.status_code == 200, await stream.aread()
            assert stream.headers["content-type"].startswith("text/event-stream")
            assert stream.headers["x-gateway-service-id"] in pair
            text = (await stream.aread()).decode()
        assert text.rstrip().endswith("data: [DONE]"), text
        events = sse_events(text)
        assert events[-1] == "[DONE]"
        tokens = [json.loads(e)["choices"] for e in events[:-1]]
        assert sum(1 for choices in tokens if choices) == 4, text  # then the usage event

    embedded = await api.post("/v1/embeddings", json={"model": MODEL, "input": ["hi", "there"]})
    assert embedded.status_code == 200, embedded.text
    assert embedded.headers["x-gateway-service-id"] in pair
    vectors = embedded.json()
    assert vectors["object"] == "list"
    assert [d["index"] for d in vectors["data"]] == [0, 1]
    assert vectors["data"][0]["embedding"] == [0.25, -0.5, 1.0]
    assert vectors["usage"]["prompt_tokens"] > 0


async def test_the_body_reaches_the_service_as_sent(
    api: httpx.AsyncClient, pair: list[str]
) -> None:
    # Fields the gateway does not know (vLLM's extensions) pass; a stream with
    # usage asked for ends with the usage event.
    body = chat(MODEL, stream=True, stream_options={"include_usage": True}, top_k=5)
    async with api.stream("POST", "/v1/chat/completions", json=body) as stream:
        text = (await stream.aread()).decode()
    assert '"usage"' in text, text


# -- errors -------------------------------------------------------------------------


async def test_errors_come_in_openais_shape(
    gateway: GatewayProcess, api: httpx.AsyncClient, pair: list[str]
) -> None:
    not_json = await api.post(
        "/v1/chat/completions", content=b"{nope", headers={"Content-Type": "application/json"}
    )
    assert not_json.status_code == 400
    assert error_of(not_json)["type"] == "invalid_request_error"

    no_model = await api.post("/v1/chat/completions", json={"messages": []})
    assert no_model.status_code == 400
    assert error_of(no_model)["param"] == "model"

    unknown = await api.post("/v1/chat/completions", json=chat("no-such-model"))
    assert unknown.status_code == 404
    error = error_of(unknown)
    assert error["code"] == "model_not_found"
    assert error["param"] == "model"
    assert MODEL in error["message"], error  # what the caller can use instead
    card = await api.get("/v1/models/no-such-model")
    assert card.status_code == 404
    assert error_of(card)["code"] == "model_not_found"
    embeddings = await api.post("/v1/embeddings", json={"model": "no-such-model", "input": "x"})
    assert embeddings.status_code == 404
    assert error_of(embeddings)["code"] == "model_not_found"

    # Over 32 MiB: refused before anything reaches a service.
    big = b'{"model": "%s", "prompt": "%s"}' % (MODEL.encode(), b"x" * (33 * 1024 * 1024))
    too_big = await api.post(
        "/v1/completions", content=big, headers={"Content-Type": "application/json"}
    )
    assert too_big.status_code == 413, too_big.text[:200]
    assert "32 MiB" in error_of(too_big)["message"]

    # An unknown path or method is refused (in which shape: the next test).
    assert (await api.get("/v1/no-such-route")).status_code == 404
    assert (await api.get("/v1/chat/completions")).status_code == 405

    async with httpx.AsyncClient(base_url=gateway.url) as anonymous:
        refused = await anonymous.get("/v1/models")
        wrong = await anonymous.post(
            "/v1/chat/completions", json=chat(MODEL), headers={"Authorization": "Bearer sgw_x"}
        )
    assert refused.status_code == 401
    assert refused.headers["www-authenticate"].startswith("Bearer")
    assert error_of(refused)["type"] == "authentication_error"
    assert wrong.status_code == 401
    assert error_of(wrong)["type"] == "authentication_error"


async def test_unknown_v1_paths_answer_in_openais_shape(api: httpx.AsyncClient) -> None:
    nowhere = await api.get("/v1/no-such-route")
    wrong_method = await api.get("/v1/chat/completions")
    for what, answer in (("unknown path", nowhere), ("wrong method", wrong_method)):
        print(f"/v1 {what}: {answer.status_code} {answer.headers['content-type']}")
    assert nowhere.status_code == 404
    assert error_of(nowhere)["type"] == "invalid_request_error"
    assert wrong_method.status_code == 405
    assert "POST" in wrong_method.headers["allow"]
    assert error_of(wrong_method)["type"] == "invalid_request_error"


# -- vLLM's APIs beyond OpenAI's ----------------------------------------------------


async def test_vllms_other_apis_reach_the_same_path_of_a_service_of_the_model(
    api: httpx.AsyncClient, pair: list[str]
) -> None:
    # The stub answers them in vLLM's shapes; its ids name the path it was asked.
    rerank = {"model": MODEL, "query": "q", "documents": ["a", "b", "c"], "top_n": 2}
    for path in ("/rerank", "/v1/rerank", "/v2/rerank"):  # Jina's, and Cohere's v2
        answer = await api.post(path, json=rerank)
        assert answer.status_code == 200, (path, answer.text)
        assert answer.json()["id"] == f"rerank-stub{path}"
        assert [r["index"] for r in answer.json()["results"]] == [0, 1]
        assert answer.headers["x-gateway-service-id"] in pair
    score = {"model": MODEL, "queries": "q", "documents": ["a", "b"]}
    for path in ("/score", "/v1/score"):
        answer = await api.post(path, json=score)
        assert answer.status_code == 200, (path, answer.text)
        assert [d["score"] for d in answer.json()["data"]] == [0.5, 0.5]
    tokens = await api.post("/tokenize", json={"model": MODEL, "prompt": "hello"})
    assert tokens.status_code == 200, tokens.text
    assert tokens.json()["count"] == 5
    text = await api.post("/detokenize", json={"model": MODEL, "tokens": tokens.json()["tokens"]})
    assert text.json() == {"prompt": "hello"}
    embed = await api.post("/v2/embed", json={"model": MODEL, "texts": ["a", "b"]})
    assert embed.json()["embeddings"]["float"] == [[0.25, -0.5, 1.0]] * 2, embed.text
    pooled = await api.post("/pooling", json={"model": MODEL, "input": ["a"]})
    assert pooled.json()["data"][0]["object"] == "pooling", pooled.text
    classes = await api.post("/classify", json={"model": MODEL, "input": ["a", "b"]})
    assert [d["label"] for d in classes.json()["data"]] == ["LABEL_0"] * 2, classes.text

    # Routed like /v1: a model the caller's tenant cannot use is not found,
    # a body without one is refused, both in OpenAI's shape.
    other = await api.post("/rerank", json=rerank, headers=TEAM_B)
    assert other.status_code == 404
    assert error_of(other)["code"] == "model_not_found"
    unnamed = await api.post("/tokenize", json={"prompt": "hello"})
    assert unnamed.status_code == 400
    assert error_of(unnamed)["param"] == "model"


async def test_an_audio_form_reaches_a_service_of_its_model_whole(
    gateway: GatewayProcess, pair: list[str]
) -> None:
    # OpenAI's SDK sends a form (multipart), the model among its fields. The
    # stub says how much of the form came, and whether whole.
    audio = bytes(range(256)) * 4096  # 1 MiB
    with openai.OpenAI(
        base_url=f"{gateway.url}/v1", api_key=TEAM_A["Authorization"][7:], max_retries=0
    ) as sdk:
        heard = sdk.audio.transcriptions.with_raw_response.create(
            model=MODEL, file=("a.wav", audio), language="en"
        )
        translated = sdk.audio.translations.create(model=MODEL, file=("a.wav", audio))
        with pytest.raises(openai.NotFoundError):
            sdk.audio.transcriptions.create(model="no-such-model", file=("a.wav", b"RIFF"))
    assert heard.headers["x-gateway-service-id"] in pair
    text = heard.parse().text
    assert text.endswith("bytes, form whole") and int(text.split()[0]) > len(audio), text
    assert translated.text.endswith("form whole"), translated
    async with httpx.AsyncClient(base_url=gateway.url, headers=TEAM_A) as api:
        unnamed = await api.post("/v1/audio/transcriptions", files={"file": ("a.wav", b"RIFF")})
    assert unnamed.status_code == 400
    assert error_of(unnamed)["param"] == "model"


async def test_a_model_still_pending_is_503_with_retry_after(
    api: httpx.AsyncClient, services: Services, stub_cluster: LocalCluster
) -> None:
    # A keyed create waits 3 s before it may start: time to hold it in Slurm.
    sid = await services.start("fd-pending", headers={"Idempotency-Key": f"fd-{time.time()}"})
    await slurm(stub_cluster, "scontrol", "hold", sid)
    answer = await api.post("/v1/chat/completions", json=chat("fd-pending"))
    assert answer.status_code == 503, answer.text
    assert answer.headers["retry-after"] == "5"
    error = error_of(answer)
    assert error["code"] == "model_not_ready"
    assert error["type"] == "service_unavailable_error"
    assert f"service {sid} is pending" in error["message"]
    print(f"/v1 model pending: 503 Retry-After {answer.headers['retry-after']}")
    # Not listed until it runs.
    models = (await api.get("/v1/models")).json()["data"]
    assert "fd-pending" not in [m["id"] for m in models]


# -- tenants ------------------------------------------------------------------------


async def test_tenants_see_their_models_and_shared_ones(
    gateway: GatewayProcess, api: httpx.AsyncClient, pair: list[str], services: Services
) -> None:
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30, headers=TEAM_B) as team_b:
        listed = [m["id"] for m in (await team_b.get("/v1/models")).json()["data"]]
        assert MODEL not in listed
        foreign = await team_b.post("/v1/chat/completions", json=chat(MODEL))
        assert foreign.status_code == 404
        assert error_of(foreign)["code"] == "model_not_found"
        # The same answer as for a model nobody serves: nothing of team-a's shows.
        assert "no model is served for you" in error_of(foreign)["message"]
        assert (await team_b.get(f"/v1/models/{MODEL}")).status_code == 404

        # Only an admin offers a service to everyone.
        refused = await api.post(
            "/api/v1/services", json={"recipe_name": "testing/openai-stub", "shared": True}
        )
        assert refused.status_code == 403, refused.text
        assert "shared" in refused.json()["detail"]

        # Served under an alias (vLLM's --served-model-name): /v1 routes by it.
        sid = await services.start(
            "org/fd-base", ADMIN, shared=True, VLLM_SERVED_MODEL_NAME="fd-shared"
        )
        await services.running(sid)
        got = await api.get(f"/api/v1/services/{sid}", headers=ADMIN)
        assert got.json()["shared"] is True
        shared_models = await poll(
            lambda: team_b.get("/v1/models"),
            lambda r: "fd-shared" in [m["id"] for m in r.json()["data"]],
            what="the shared model listed for team-b",
        )
        card = next(m for m in shared_models.json()["data"] if m["id"] == "fd-shared")
        assert card["owned_by"] == "ops"
        assert card["root"] == "org/fd-base"
        assert MODEL not in [m["id"] for m in shared_models.json()["data"]]
        answer = await team_b.post("/v1/chat/completions", json=chat("fd-shared"))
        assert answer.status_code == 200, answer.text
        assert answer.headers["x-gateway-service-id"] == sid
        assert answer.json()["model"] == "fd-shared"
        # team-a sees it too; by its alias only.
        assert (await api.get("/v1/models/fd-shared")).status_code == 200
        assert (await api.get("/v1/models/org/fd-base")).status_code == 404
        # Shared for prompts through /v1 only: not to read, log or stop.
        assert (await team_b.get(f"/api/v1/services/{sid}")).status_code == 404
        assert (await team_b.get(f"/api/v1/services/{sid}/logs")).status_code == 404
        assert (await team_b.delete(f"/api/v1/services/{sid}")).status_code == 404
        assert (await api.delete(f"/api/v1/services/{sid}")).status_code == 404  # team-a
        still = await api.get(f"/api/v1/services/{sid}/status", headers=ADMIN)
        assert still.json()["status"] == "running"
        again = await team_b.post("/v1/chat/completions", json=chat("fd-shared"))
        assert again.status_code == 200, again.text
        print(f"/v1 shared service {sid}: team-b prompts it, GET/logs/stop 404")


# -- a client that leaves ------------------------------------------------------------


async def test_a_client_leaving_a_stream_closes_the_upstream(
    api: httpx.AsyncClient, services: Services
) -> None:
    # 200 ms a chunk, 100 chunks: a 20 s stream if nobody let go.
    sid = await services.start("fd-slow", STUB_CHUNK_DELAY_MS="200")
    await services.running(sid)
    body = chat("fd-slow", stream=True, max_tokens=100)
    received, left = 0, 0.0
    async with api.stream("POST", "/v1/chat/completions", json=body) as stream:
        assert stream.status_code == 200
        assert stream.headers["x-gateway-service-id"] == sid
        async for line in stream.aiter_lines():
            if line.startswith("data: "):
                received += 1
                if received == 3:
                    left = time.time()
                    break  # leaving the block closes the connection to the gateway

    assert received == 3

    # The stub logs the moment its connection was closed mid-stream.
    async def log() -> str:
        answer = await api.get(f"/api/v1/services/{sid}/logs")
        assert answer.status_code == 200, answer.text
        text: str = answer.json()["stdout"]
        return text

    cut = re.compile(r"stream cut by the peer after (\d+) of (\d+) chunks at ([0-9.]+)")
    text = await poll(log, lambda t: cut.search(t) is not None, timeout=10, what="the cut")
    found = cut.search(text)
    assert found is not None
    sent, total, at = int(found[1]), int(found[2]), float(found[3])
    after = at - left
    print(f"/v1 client left after {received} events: upstream closed {after * 1000:.0f} ms later, "
          f"{sent} of {total} chunks sent")  # fmt: skip
    TIMINGS.append(f"/v1 disconnect: upstream stream closed {after * 1000:.0f} ms after the client")
    assert total == 100
    assert sent < 20, sent  # far from the end: cut, not finished
    assert after < 2.0, after
    # The service is free and answers the next request.
    again = await api.post("/v1/chat/completions", json=chat("fd-slow", max_tokens=2))
    assert again.status_code == 200, again.text


# -- services leaving under load ----------------------------------------------------


class Load:
    """Clients sending requests for one model in a loop until told to stop."""

    def __init__(self, api: httpx.AsyncClient, model: str, clients: int = 4) -> None:
        self.api = api
        self.model = model
        self.clients = clients
        # (service id or None on failure, started, ended, status or error)
        self.done: list[tuple[str | None, float, float, str]] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def _client(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                answer = await self.api.post("/v1/chat/completions", json=chat(self.model))
            except httpx.HTTPError as exc:
                self.done.append((None, started, time.monotonic(), repr(exc)))
                continue
            if answer.status_code == 200:
                sid = answer.headers["x-gateway-service-id"]
                self.done.append((sid, started, time.monotonic(), "200"))
            else:
                failure = f"{answer.status_code} {answer.text[:200]}"
                self.done.append((None, started, time.monotonic(), failure))

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._client()) for _ in range(self.clients)]

    async def finish(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def until(self, count: int) -> None:
        """Until ``count`` more requests were answered."""
        target = len(self.done) + count
        await poll(lambda: _now(len(self.done)), lambda n: n >= target, interval=0.05, timeout=60)

    @property
    def failures(self) -> list[str]:
        return [outcome for sid, _, _, outcome in self.done if sid is None]


async def _now(value: int) -> int:
    return value


@asynccontextmanager
async def two_under_load(
    api: httpx.AsyncClient, services: Services, model: str
) -> AsyncIterator[tuple[str, str, Load]]:
    """Two running services of ``model``, and a load on it that has had 200
    answers; the load stops at the end."""
    first = await services.start(model)
    second = await services.start(model)
    await services.running(first, second)
    await poll(
        lambda: api.get(f"/v1/models/{model}"),
        lambda r: r.status_code == 200 and r.json()["services"] == 2,
        what="both services routable",
    )
    load = Load(api, model)
    load.start()
    try:
        await load.until(200)
        yield first, second, load
    finally:
        await load.finish()


async def test_a_service_stopped_under_load_costs_no_request(
    api: httpx.AsyncClient, services: Services
) -> None:
    async with two_under_load(api, services, "fd-stop") as (first, second, load):
        asked = time.monotonic()
        stopped = await api.delete(f"/api/v1/services/{first}")
        stop_answered = time.monotonic()
        assert stopped.status_code == 200, stopped.text
        assert stopped.json()["status"] == "cancelled", stopped.text
        await load.until(200)
    before = Counter(sid for sid, _, end, _ in load.done if sid and end < asked)
    after = Counter(sid for sid, start, _, _ in load.done if sid and start > stop_answered)
    line = (
        f"/v1 stop under load: {len(load.done)} requests by 4 clients, "
        f"{len(load.failures)} failed; per service before the stop {dict(before)}, "
        f"after {dict(after)} (stop answered in {stop_answered - asked:.2f} s)"
    )
    print(line)
    TIMINGS.append(line)
    assert set(before) == {first, second}
    assert first not in after, after
    assert after[second] >= 100, after
    assert len(load.failures) <= 1, load.failures


async def test_a_service_killed_behind_the_gateways_back_costs_at_most_those_in_flight(
    api: httpx.AsyncClient, services: Services, stub_cluster: LocalCluster
) -> None:
    async with two_under_load(api, services, "fd-kill") as (first, second, load):
        # As another replica or the job's owner might: the stub dies at once
        # (its port refuses), the job ends, this gateway is not told.
        await slurm(stub_cluster, "scancel", "--batch", "--signal=KILL", first)
        killed = time.monotonic()
        await load.until(100)
        # Once the gateway's view has the job ended, nothing more goes there.
        await poll(
            lambda: api.get(f"/api/v1/services/{first}/status", headers=ADMIN),
            lambda r: r.json()["status"] != "running",
            what="the killed service no longer running",
        )
        known = time.monotonic()
        await load.until(100)
    last = max((end for sid, _, end, _ in load.done if sid == first), default=killed)
    before = Counter(sid for sid, _, end, _ in load.done if sid and end < killed)
    since = Counter(sid for sid, start, _, _ in load.done if sid and start > killed)
    later = [sid for sid, start, _, _ in load.done if sid and start > known]
    # Answered while the gateway still took the dead one for running (its
    # refused connections went to the other service instead).
    unaware = [sid for sid, start, _, _ in load.done if sid and killed < start < known]
    line = (
        f"/v1 service killed outside the gateway: {len(load.done)} requests, "
        f"{len(load.failures)} failed; per service before {dict(before)}, since {dict(since)}; "
        f"the killed one's last answer {max(0.0, last - killed) * 1000:.0f} ms after the kill; "
        f"the gateway saw the job end {known - killed:.1f} s after it, "
        f"{len(unaware)} answered meanwhile"
    )
    print(line)
    if load.failures:
        print(f"/v1 failed while killed: {load.failures}")
    TIMINGS.append(line)
    assert set(before) == {first, second}
    assert later and first not in later
    # A request in flight on the stub when it died may fail; no other.
    assert len(load.failures) <= load.clients, load.failures

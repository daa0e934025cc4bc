"""Schemathesis 4 against a live gateway: the OpenAPI document and the server agree.

One gateway on one local cluster, with a secret of its own: it sees only the
jobs it created, so a fuzzed ``DELETE`` of some digit id can never stop another
test's service. Its only recipe folder is tests/recipes/schemathesis, where
``inference/vllm`` (the name the document's examples use) is the OpenAI-shaped
stub with tiny resources: the services the examples and Schemathesis' own data
create start in a second and cost nothing, never the real vLLM. One of them is
started before the run, so that the OpenAI front door (/v1) has a model to
list and to relay to: the stub's, "stub", which half of the /v1 bodies (and of
getOpenAIModel's names) name; fuzzed names are served by nothing: 404, as
documented. Each /v1 operation that routes by model must have been answered
2xx by the stub, not only 404.

Every phase runs (examples, coverage, fuzzing, stateful: the last follows the
document's links from createService to the operations on the new service);
the run must end with exit status 0, i.e. no server error, no schema
violation, no conformance failure. Every service it created is stopped
afterwards, and none may be left.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.core.status import ServiceStatus
from tests.support.clusters import CLUSTERS, TIMINGS
from tests.support.gateway_process import ROOT, GatewayProcess
from tests.support.polling import poll

# Not c2411, whose daemons the fault tests kill and restart; c2205 runs vLLM's
# own tests. Slurm 26.05's slurmrestd is the newest the gateway speaks to.
CLUSTER = "c2605"
RECIPES = ROOT / "tests" / "recipes" / "schemathesis"
# Per operation and phase (coverage's own cases come on top): about 3,000 test
# cases over 18 operations and a dozen services (createService soon meets the
# tenant's limit: 429), some 60 s, stopping included.
MAX_EXAMPLES = 100
RUN_TIMEOUT = 240.0
# The local admin key (deploy/local/tenants.toml): the run authenticates as a
# site's clients do, and Schemathesis checks that the document's security is
# enforced (no or made-up credentials: 401).
AUTH = {"Authorization": "Bearer sgw_local-admin-key"}

# Each setting that is not Schemathesis' default, with why.
CONFIG = """\
# DELETE stops a service: it cancels the Slurm job, and the service is still
# described (status `cancelled`) for as long as Slurm remembers the job, as the
# document says. This check wants a 404 after a DELETE: it does not apply.
[checks.use_after_free]
enabled = false

[[operations]]
include-operation-id = "createService"
# A schema-valid body can still name an environment variable the recipe does not
# have (the document cannot list them: they are the recipe's), ask for resources
# out of Slurm's bounds ("cpu": "0"), or be refused by Slurm: 422, which the
# document gives as "Invalid request; `errors` names the fields, or Slurm
# refused the job". Schemathesis' default statuses, and 422.
checks.positive_data_acceptance.expected-statuses = [
    "2xx", "3xx", "401", "403", "404", "409", "422", "429", "5xx",
]

# The OpenAI front door routes by `model`: a fuzzed name is served by nothing
# (404, documented), so half of the bodies (and of getOpenAIModel's names) name
# the stub's model, which the service started before the run serves: those
# reach the relay and the stub, and their 200s are checked against the document.
# No check is excluded for them. The relay passes a body on unvalidated (vLLM
# validates, not the gateway), and the stub accepts anything, so a negative
# body naming "stub" would get 200 and fail negative_data_rejection. But
# Schemathesis uses a dictionary entry that fits the schema ("stub" is a valid
# model name) in positive cases only: negative bodies name fuzzed or example
# models (404) or none (400). Should a later Schemathesis put it into negative
# cases, disable exactly negative_data_rejection for the three POSTs, for that
# reason.
[dictionaries.served]
values = ["stub"]

[[operations]]
include-operation-id = [
    "createChatCompletion", "createCompletion", "createEmbedding", "createResponse",
    "createTranscription", "createTranslation",
    "tokenize", "detokenize", "score", "scoreV1", "rerank", "rerankV1", "rerankV2",
    "embedV2", "pool", "classify", "createMessage", "countMessageTokens",
]
parameters = { "body.model" = { dictionary = "served", probability = 0.5 } }

[[operations]]
include-operation-id = "getOpenAIModel"
parameters = { "path.model" = { dictionary = "served", probability = 0.5 } }

[dictionaries.deployments]
values = ["docs"]

[[operations]]
include-operation-id = "getDeployment"
parameters = { "path.name" = { dictionary = "deployments", probability = 0.5 } }

# A follow (follow=true) streams until its service ends: an answer that never
# completes, which Schemathesis cannot check. The document's JSON answer is
# checked with follow=false; tests/integration/test_log_follow.py checks the stream.
[[operations]]
include-operation-id = "getServiceLogs"
parameters = { "query.follow" = "false" }
"""
# The operations that route by model: each must have had positive cases answered
# 2xx (by the stub, through the relay), not only 404s for fuzzed names.
SERVED = (
    "GET /v1/models/{model}",
    "POST /v1/chat/completions",
    "POST /v1/completions",
    "POST /v1/embeddings",
    "POST /v1/responses",
    "POST /v1/audio/transcriptions",
    "POST /v1/audio/translations",
    "POST /tokenize",
    "POST /detokenize",
    "POST /score",
    "POST /v1/score",
    "POST /rerank",
    "POST /v1/rerank",
    "POST /v2/rerank",
    "POST /v2/embed",
    "POST /pooling",
    "POST /classify",
    "POST /v1/messages",
    "POST /v1/messages/count_tokens",
)


def schemathesis_command(url: str, config: Path, report: Path) -> list[str]:
    return [
        str(Path(sys.executable).parent / "schemathesis"),
        "--config-file", str(config),
        "run", f"{url}/api/v1/schema/openapi.json",
        "--phases", "examples,coverage,fuzzing,stateful",
        "--max-examples", str(MAX_EXAMPLES),
        "--request-timeout", "60",
        "--generation-database", "none",  # nothing carried over between runs
        "--output-sanitize", "false",  # `max_tokens` is no secret
        "--report", "json", "--report-json-path", str(report),
        "--no-color",
        "--header", f"Authorization: {AUTH['Authorization']}",
        # A failing run prints its seed; SCHEMATHESIS_SEED=<it> replays that run.
        *(["--seed", seed] if (seed := os.environ.get("SCHEMATHESIS_SEED")) else []),
    ]  # fmt: skip


# One deployment of no replicas: the deployment routes answer 200 for it
# (getDeployment's name comes from the dictionary half of the time), and no job
# is made for it.
DEPLOYMENTS = """\
[deployments.docs]
recipe_name = "inference/vllm"
replicas = 0
"""


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[GatewayProcess]:
    cluster = next((c for c in CLUSTERS if c.name == CLUSTER), None)
    if cluster is None:
        pytest.fail(f"no local cluster {CLUSTER}; run `make cluster`")
    env = {
        "GATEWAY_SECRET": secrets.token_hex(32),
        "GATEWAY_RECIPES_DIRS": str(RECIPES),
        "GATEWAY_SITE_FILE": "",  # the local site overlay would size inference/vllm for vLLM
        "GATEWAY_AUTH_FILE": str(ROOT / "deploy" / "local" / "tenants.toml"),
        "GATEWAY_PUBLIC_SCHEMA": "true",  # where Schemathesis reads the document
        "GATEWAY_DEPLOYMENTS_FILE": str(tmp_path / "deployments.toml"),
    }
    (tmp_path / "deployments.toml").write_text(DEPLOYMENTS, encoding="utf-8")
    with GatewayProcess(cluster, **env) as process:
        yield process


async def start_served(url: str) -> str:
    """A running stub service whose model ("stub") the /v1 operations can reach."""
    async with httpx.AsyncClient(base_url=url, timeout=60, headers=AUTH) as api:
        created = await api.post("/api/v1/services", json={"recipe_name": "inference/vllm"})
        sid: str = created.raise_for_status().json()["id"]
        await poll(
            lambda: api.get("/v1/models/stub"),
            lambda r: r.status_code == 200,
            timeout=60,
            what=f"service {sid} serving model stub on /v1",
        )
        return sid


async def stop_all(url: str) -> tuple[int, list[dict[str, Any]]]:
    """Stop every service of the gateway: how many it had, and those still live."""
    async with httpx.AsyncClient(base_url=url, timeout=120, headers=AUTH) as api:
        listed = (await api.get("/api/v1/services")).raise_for_status().json()
        gate = asyncio.Semaphore(8)

        async def stop(service_id: str) -> None:
            async with gate:
                (await api.delete(f"/api/v1/services/{service_id}")).raise_for_status()

        await asyncio.gather(*(stop(s["id"]) for s in listed if not _ended(s)))
        final = await poll(
            lambda: api.get("/api/v1/services"),
            lambda r: r.status_code == 200 and all(_ended(s) for s in r.json()),
            timeout=60,
            what="every service stopped",
        )
        return len(listed), [s for s in final.json() if not _ended(s)]


def _ended(service: dict[str, Any]) -> bool:
    return ServiceStatus(service["status"]).is_terminal


async def test_document_and_server_agree(gateway: GatewayProcess, tmp_path: Path) -> None:
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG, encoding="utf-8")
    report = tmp_path / "report.json"
    command = schemathesis_command(gateway.url, config, report)
    started = time.monotonic()
    try:
        await start_served(gateway.url)
        run = await asyncio.to_thread(
            subprocess.run,
            command,
            cwd=tmp_path,  # where Schemathesis writes anything of its own
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT,
            check=False,
        )
    finally:
        ran = time.monotonic() - started
        created, left = await stop_all(gateway.url)
    took = time.monotonic() - started
    output = run.stdout + run.stderr
    (tmp_path / "schemathesis.out").write_text(output, encoding="utf-8")

    summary = json.loads(report.read_text(encoding="utf-8")) if report.exists() else {}
    operations = summary.get("operations", {})
    cases = summary.get("test_cases", {})
    phases = ", ".join(f"{name} {p['status']}" for name, p in summary.get("phases", {}).items())
    rates = summary.get("valid_rates", {})
    served = {op: sum(p["accepted"] for p in rates.get(op, {}).values()) for op in SERVED}
    TIMINGS.append(
        f"schemathesis on {gateway.cluster.name}: {operations.get('tested')}/"
        f"{operations.get('total')} operations, {cases.get('generated')} test cases "
        f"({MAX_EXAMPLES} examples per operation and phase; {phases}), "
        f"{cases.get('unique_failures')} failures, seed {summary.get('seed')}; "
        f"served by the stub (2xx): "
        f"{', '.join(f'{op} {n}' for op, n in served.items())}; "
        f"{created} services created and stopped; {ran:.0f} s run, {took:.0f} s in all"
    )
    assert run.returncode == 0, output[-12000:]
    assert operations.get("tested") == operations.get("total"), operations
    assert all(served.values()), f"operations routed by model never answered 2xx: {served}"
    assert not left, left

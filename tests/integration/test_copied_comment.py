"""A genuine service's comment copied onto another job of the same Slurm user
(issue 23), on the real clusters c2205 (Slurm 22.05) and c2411 (Slurm 24.11).

Two tenants may share a Slurm user (deploy/local/tenants.toml: the admin and
team-a are both ``gwuser``), and every cluster user reads every comment
(``squeue -o %k``). The attacker here is just another process of ``gwuser``
on the cluster: it submits with ``sbatch`` and rewrites its own job's comment
with ``scontrol update``, as any user may. A comment copied like that must
make no service: no traffic and no upstream key for the copy, no replay of an
Idempotency-Key, nothing counted against a quota.

Each cluster gets a gateway of its own with a temporary auth file (tenants
with a random tag, so that nothing else on the cluster counts against them).
Run with ``-s`` for the figures.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.core.recognition import LEGACY_SUBMIT_WINDOW
from gateway.settings import load_settings
from gateway.testing.clusters import upstream_key
from gateway.wiring import metadata_codec
from tests.support.clusters import TIMINGS, named, parametrize
from tests.support.copied_jobs import (
    Attacker,
    Deployment,
    Services,
    copied,
    deployed,
    endpoint_host,
)
from tests.support.polling import free_port, poll

# The clusters the issue names: Slurm 22.05 and 24.11.
CLUSTER_NAMES = ("c2205", "c2411")
REQUESTS = 20
PROMPT = "a prompt only the genuine service may read"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    parametrize(metafunc, "deployment", named(*CLUSTER_NAMES), per_module=True)


@pytest.fixture(scope="module")
def deployment(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    with deployed(request.param, tmp_path_factory.mktemp("auth")) as made:
        yield made


@pytest.fixture
async def services(deployment: Deployment) -> AsyncIterator[Services]:
    async with aclosing(Services(deployment)) as made:
        yield made


@pytest.fixture
async def attacker(deployment: Deployment) -> AsyncIterator[Attacker]:
    made = Attacker(deployment.cluster)
    try:
        yield made
    finally:
        await made.cleanup()


def stub(model: str) -> dict[str, Any]:
    return {
        "recipe_name": "testing/openai-stub",
        "config": {"environment": {"VLLM_MODEL": model}},
        "shared": True,
    }


async def settled(
    api: httpx.AsyncClient, who: dict[str, str], job_id: int, *statuses: str
) -> httpx.Response:
    """Asks the gateway for the job by id until it has made up its mind: a 404
    (which waits for a listing of Slurm's jobs that began after the question)
    or the copy taken for a service in one of ``statuses`` (any, if none)."""
    return await poll(
        lambda: api.get(f"/api/v1/services/{job_id}/status", headers=who),
        lambda r: r.status_code == 404 or not statuses or r.json().get("status") in statuses,
        timeout=30,
        what=f"the gateway's answer about job {job_id}",
    )


async def chats(api: httpx.AsyncClient, who: dict[str, str], model: str) -> Counter[str]:
    """``REQUESTS`` chats through /v1: how many each "status service-id" answered."""
    answered: Counter[str] = Counter()
    body = {"model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 4}
    for _ in range(REQUESTS):
        answer = await api.post("/v1/chat/completions", json=body, headers=who)
        answered[f"{answer.status_code} {answer.headers.get('x-gateway-service-id')}"] += 1
    return answered


def report(what: str, record: Path, key: str, answered: Counter[str]) -> list[dict[str, Any]]:
    """The requests the copy got, with the summary line printed and kept."""
    got = [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []
    reached = sum(1 for r in got if r["path"] == "/v1/chat/completions")
    seen = any(r["authorization"] == f"Bearer {key}" for r in got)
    line = (
        f"{what}: {reached} of {REQUESTS} requests reached the copy (0 expected), "
        f"key seen by the copy: {'yes' if seen else 'no'}"
    )
    prompts = sum(1 for r in got if PROMPT in r["body"])
    print(f"\n{line}\n{len(got)} requests at the copy ({prompts} with the prompt); "
          f"answers (status service): {dict(answered)}")  # fmt: skip
    TIMINGS.append(line)
    return got


async def test_a_copied_shared_service_gets_no_request_and_no_key(
    deployment: Deployment, services: Services, attacker: Attacker
) -> None:
    cluster, api = deployment.cluster, services.api
    model = f"copied-{deployment.tag}"
    created = await services.create(deployment.admin, stub(model))
    assert created.status_code == 201, created.text
    victim = created.json()["id"]
    assert created.json()["owner"] == attacker.user  # the admin's jobs run as the attacker's user
    await services.running(victim, deployment.admin)

    comment = attacker.comment_of(victim)
    port = free_port()
    forged = copied(comment, f"|phase=running|endpoint={endpoint_host(comment)}:{port}")
    copy, record = attacker.listen(port, model, forged)
    await attacker.up(copy, record)
    assert attacker.comment_of(copy).startswith(forged.split("|", 1)[0])

    by_id = await settled(api, deployment.admin, copy, "running", "failed")
    listed = {s["id"] for s in (await api.get("/api/v1/services", headers=deployment.admin)).json()}
    models = (await api.get("/v1/models", headers=deployment.other)).json()["data"]
    served = [card.get("services") for card in models if card["id"] == model]
    answered = await chats(api, deployment.other, model)
    key = await upstream_key(cluster, deployment.gateway.env, int(victim))
    what = f"copied comment on {cluster.name} (victim {victim}, copy {copy})"
    got = report(what, record, key, answered)

    assert by_id.status_code == 404, by_id.text
    assert str(copy) not in listed
    assert served == [1], models
    assert answered == {f"200 {victim}": REQUESTS}
    assert got == [], got[:3]


async def test_a_copied_keyed_comment_replays_nothing_and_counts_for_no_quota(
    deployment: Deployment, services: Services, attacker: Attacker
) -> None:
    """The copy sits on a job older than the genuine create: the attacker's
    job waits held, and takes the comment once the create has made it."""
    cluster, api, tenant = deployment.cluster, services.api, deployment.keyed
    older = attacker.sbatch("--hold", "--comment=nothing yet", "--output=/dev/null", "--wrap=true")
    key = f"copied-{uuid.uuid4().hex}"
    body = {"recipe_name": "testing/http", "config": {"environment": {"MESSAGE": "genuine"}}}
    created = await services.create(tenant, body, **{"Idempotency-Key": key})
    assert created.status_code == 201, created.text
    genuine = created.json()["id"]
    assert created.json()["owner"] == attacker.user
    assert int(genuine) > older
    # Running: the job has published, so its comment is final.
    await services.running(genuine, tenant)

    comment = copied(attacker.comment_of(genuine), "")
    attacker.run("scontrol", "update", f"jobid={older}", f"comment={comment}")
    assert attacker.comment_of(older) == comment

    by_id = await settled(api, tenant, older)
    listed = {s["id"] for s in (await api.get("/api/v1/services", headers=tenant)).json()}
    replay = await services.create(tenant, body, **{"Idempotency-Key": key})
    # The tenant has one service of its max_services = 2: one more fits.
    another = await services.create(tenant, {"recipe_name": "testing/http"})
    replayed = replay.json().get("id") if replay.status_code == 201 else replay.status_code
    line = (
        f"copied keyed comment on {cluster.name}: the key's replay answered {replayed} "
        f"(genuine {genuine}, copy {older}); a create within max_services: "
        f"{another.status_code} (201 expected)"
    )
    print(f"\n{line}")
    TIMINGS.append(line)

    assert by_id.status_code == 404, by_id.text
    assert str(older) not in listed
    assert replay.status_code == 201, replay.text
    assert replay.headers.get("idempotent-replayed") == "true", replay.headers
    assert replay.json()["id"] == genuine, replay.json()
    assert another.status_code == 201, another.text


# An old-format comment is believed on the one job submitted within this many
# seconds of its creation time (gateway/core/services.py).
WINDOW = LEGACY_SUBMIT_WINDOW


def old_format(deployment: Deployment, model: str, created: float) -> tuple[str, str]:
    """The comment an admin's shared stub got from a gateway from before
    comments were bound to their job ids (``gw2:``), under this gateway's
    secret, and its upstream key."""
    codec = metadata_codec(load_settings(deployment.gateway.env))
    meta = codec.new_meta(
        recipe="testing/openai-stub",
        created=created,
        owner=deployment.cluster.user,
        environment={"VLLM_MODEL": model},
        resources={},
        tenant=f"ops-{deployment.tag}",
        shared=True,
    )
    comment = codec.legacy_encode(meta)
    assert comment.startswith("gw2:"), comment
    return comment, codec.upstream_key(meta)


@pytest.mark.parametrize("placed", ["later", "earlier"])
async def test_a_copied_old_format_comment_gets_no_request(
    deployment: Deployment, services: Services, attacker: Attacker, placed: str
) -> None:
    """An old-format service still running after the upgrade: its comment
    copied onto a later job, or onto one the attacker submitted (held) just
    before the old gateway's create, so with a lower id and a close submit time."""
    cluster, api, node = deployment.cluster, services.api, deployment.cluster.node
    model = f"old-{placed}-{deployment.tag}"
    port, genuine_port = free_port(), free_port()
    if placed == "earlier":
        copy, record = attacker.listen(port, model, "nothing yet", "copy", "--hold")
        created = time.time()
    else:
        # Made by the old gateway near the end of the window in which its
        # comment is believed, so that a copy made after the upgrade (here:
        # once the window has passed) is on a job submitted out of it.
        created = time.time() - WINDOW + 10
    comment, key = old_format(deployment, model, created)
    # What the old gateway submitted, as its Slurm user (a look-alike of the stub).
    genuine, genuine_record = attacker.listen(
        genuine_port, model, f"{comment}|phase=running|endpoint={node}:{genuine_port}", "genuine"
    )
    forged = f"{comment}|phase=running|endpoint={node}:{port}"
    if placed == "earlier":
        attacker.run("scontrol", "update", f"jobid={copy}", f"comment={forged}")
        attacker.run("scontrol", "release", str(copy))
    else:
        await attacker.up(genuine, genuine_record)
        # The window is a wall-clock time, not an event to wait on.
        await asyncio.sleep(max(0.0, created + WINDOW + 1 - time.time()))
        copy, record = attacker.listen(port, model, forged)
    await attacker.up(genuine, genuine_record)
    await attacker.up(copy, record)

    by_id = await settled(api, deployment.admin, copy, "running", "failed")
    answered = await chats(api, deployment.other, model)
    what = f"copied old-format comment on {cluster.name}, {placed} job"
    what += f" (genuine {genuine}, copy {copy})"
    got = report(what, record, key, answered)

    assert by_id.status_code == 404, by_id.text
    assert got == [], got[:3]
    if placed == "later":
        # Still the service it was until its job ends.
        assert answered == {f"200 {genuine}": REQUESTS}

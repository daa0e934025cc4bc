"""ServiceManager behaviour that needs exact control of slurmrestd's answers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from pytest_httpx import HTTPXMock
from structlog.testing import capture_logs

from gateway.api.schemas import ServiceResponse
from gateway.core import metadata
from gateway.core.errors import Conflict, Forbidden, InvalidRequest, NotFound, QuotaExceeded
from gateway.core.principal import Limits, Method, Principal, Role, anonymous
from gateway.core.recipes import RecipeCatalog
from gateway.core.services import CreateRequest, ServiceManager, served_model
from gateway.core.status import ServiceStatus
from gateway.slurm import MintedTokens, SlurmClient, SlurmError
from gateway.slurm.adapters import adapter_for
from gateway.upstream.probe import HealthProber
from tests.support.http_stub import Answer, Seen, Stub, http_stub, response

ROOT = Path(__file__).resolve().parents[2]
URL = "http://slurmrestd.test"
# The job listing, with or without update_time.
JOBS = re.compile(re.escape(f"{URL}/slurm/v0.0.42/jobs") + r"(\?.*)?$")
PING = {"pings": [{"hostname": "c", "responding": True}], "meta": {"slurm": {"release": "x"}}}


def job(job_id: int, comment: str, state: str = "RUNNING") -> dict[str, Any]:
    """A listed job; a comment whose metadata is unbound (the helpers below
    make them so) is bound to ``job_id``, as the gateway's create does."""
    head, sep, tail = comment.partition("|")
    if head.startswith(metadata.PREFIX) and "." not in head:
        comment = CODEC.bind(head, job_id) + sep + tail
    return {
        "job_id": job_id,
        "name": f"gw-testing-http-{CODEC.job_tag}",
        "user_name": "gwuser",
        "job_state": [state],
        "batch_host": "node1",
        "nodes": "node1",
        "comment": comment,
        "submit_time": {"set": True, "number": 1_800_000_000},
        "start_time": {"set": True, "number": 1_800_000_010},
    }


CODEC = metadata.MetaCodec(b"the gateway's shared secret....!")
ADMIN = anonymous("gwuser")
# The node's address is a loopback one of its own, where the tests' health
# stubs listen (tests/support/http_stub.py); 127.0.0.1 is then off the node.
NODE_ADDRESS = "127.0.0.2"
NODE = {"nodes": [{"name": "node1", "hostname": "node1.cluster", "address": NODE_ADDRESS}]}


def blob(owner: str = "gwuser", **environment: str) -> str:
    meta = CODEC.new_meta(
        recipe="testing/http",
        created=1_800_000_000.0,
        owner=owner,
        environment=dict(environment),
        resources={},
    )
    return CODEC.unbound(meta)


def service_comment(port: int, host: str = "node1") -> str:
    return f"{blob()}|phase=starting|endpoint={host}:{port}"


def manager() -> ServiceManager:
    slurm = SlurmClient(
        URL,
        MintedTokens(b"k" * 32, "gwuser"),
        api_version="v0.0.42",
        transport=httpx.AsyncHTTPTransport(),  # the one pytest-httpx answers
    )
    return ServiceManager(
        slurm=slurm,
        recipes=RecipeCatalog.load([ROOT / "recipes", ROOT / "tests" / "recipes"]),
        prober=HealthProber(timeout=1, ttl=5),
        codec=CODEC,
        job_dir="/home/gwuser",
        slurm_user="gwuser",
    )


def mock_node(httpx_mock: HTTPXMock) -> None:
    httpx_mock.add_response(url=f"{URL}/slurm/v0.0.42/node/node1", json=NODE, is_optional=True)


async def test_listing_costs_one_slurm_call_and_probes_run_concurrently(
    httpx_mock: HTTPXMock,
) -> None:
    in_flight = 0
    most = 0

    def health(status: int) -> Answer:
        async def answer(seen: Seen, writer: asyncio.StreamWriter) -> None:
            nonlocal in_flight, most
            in_flight += 1
            most = max(most, in_flight)
            await asyncio.sleep(0.2)
            in_flight -= 1
            writer.write(response(status))

        return answer

    async with contextlib.AsyncExitStack() as stack:
        stubs = [
            await stack.enter_async_context(http_stub(health(status), NODE_ADDRESS))
            for status in (200, 200, 200, 503)
        ]
        await _listing_costs_one_slurm_call(httpx_mock, stubs)
    assert most == len(stubs), "health probes ran one after another"
    assert [len(stub.seen) for stub in stubs] == [1, 1, 1, 1]


async def _listing_costs_one_slurm_call(httpx_mock: HTTPXMock, stubs: list[Stub]) -> None:
    ports = [stub.port for stub in stubs]
    jobs = [job(10 + i, service_comment(p)) for i, p in enumerate(ports)]
    jobs.append(job(99, "not ours"))
    httpx_mock.add_response(url=f"{URL}/slurm/v0.0.42/ping", json=PING)
    mock_node(httpx_mock)
    httpx_mock.add_response(
        url=JOBS,
        json={"jobs": jobs, "last_update": {"set": True, "number": 5}},
        is_reusable=True,
    )
    services = manager()
    listed = await services.list(ADMIN)
    assert [s.id for s in listed] == ["13", "12", "11", "10"]
    assert [s.status for s in listed] == [
        ServiceStatus.STARTING,  # the fourth answers 503
        ServiceStatus.RUNNING,
        ServiceStatus.RUNNING,
        ServiceStatus.RUNNING,
    ]
    await services.list(ADMIN)  # within the view's interval and the probe cache: nothing sent
    jobs_calls = httpx_mock.get_requests(url=JOBS)
    assert len(jobs_calls) == 1
    await services.prober.aclose()
    await services.slurm.aclose()


async def test_comment_from_the_job_is_parsed_not_trusted(httpx_mock: HTTPXMock) -> None:
    evil = f"{blob()}|phase=running|endpoint=169.254.169.254/latest:80"
    httpx_mock.add_response(url=f"{URL}/slurm/v0.0.42/ping", json=PING)
    httpx_mock.add_response(url=JOBS, json={"jobs": [job(7, evil)]})
    services = manager()
    service = await services.get("7", ADMIN)
    # A malformed endpoint is ignored, no probe is sent, and the reason says so.
    assert service.endpoint is None
    assert service.status is ServiceStatus.STARTING
    assert "not host:port" in service.status_reason
    assert json.loads(json.dumps(service.config.environment)) == {}
    await services.prober.aclose()
    await services.slurm.aclose()


async def test_an_endpoint_off_the_jobs_node_is_never_probed(httpx_mock: HTTPXMock) -> None:
    async def ok(seen: Seen, writer: asyncio.StreamWriter) -> None:
        writer.write(response(200))

    async with http_stub(ok, NODE_ADDRESS) as node, http_stub(ok) as elsewhere:
        await _off_the_node(httpx_mock, node, elsewhere)
    assert [s.path for s in node.seen] == ["/health"]
    assert elsewhere.seen == []


async def _off_the_node(httpx_mock: HTTPXMock, node: Stub, elsewhere: Stub) -> None:
    httpx_mock.add_response(url=f"{URL}/slurm/v0.0.42/ping", json=PING)
    mock_node(httpx_mock)
    jobs = [
        job(7, service_comment(elsewhere.port, "127.0.0.1")),
        job(8, service_comment(9, "x.invalid")),
    ]
    # The node's host name: reached at its address, as Slurm has it (the
    # gateway's host need not resolve node names).
    jobs.append(job(9, service_comment(node.port, "node1.cluster")))
    httpx_mock.add_response(url=JOBS, json={"jobs": jobs})
    services = manager()
    listed = {s.id: s for s in await services.list(ADMIN)}
    for sid in ("7", "8"):
        assert listed[sid].endpoint is None
        assert listed[sid].status is ServiceStatus.STARTING
        assert "not on its node node1" in listed[sid].status_reason
    assert listed["9"].status is ServiceStatus.RUNNING
    assert listed["9"].upstream is not None
    # The probe carries the service's key, derived from its metadata.
    assert node.seen[0].headers["authorization"] == f"Bearer {listed['9'].upstream.key}"
    # One node lookup for three jobs on it.
    assert len(httpx_mock.get_requests(url=f"{URL}/slurm/v0.0.42/node/node1")) == 1
    await services.prober.aclose()
    await services.slurm.aclose()


async def test_only_the_gateways_user_and_genuine_blobs_make_services(
    httpx_mock: HTTPXMock,
) -> None:
    httpx_mock.add_response(url=f"{URL}/slurm/v0.0.42/ping", json=PING)
    genuine = blob()
    jobs = [
        {**job(1, genuine), "user_name": "alice"},  # a copied comment on another's job
        job(2, blob(owner="alice")),  # a blob naming another owner
        job(3, "gw2:" + genuine[4:-3] + "AAA"),  # a broken MAC
        job(4, genuine, state="PENDING"),
    ]
    httpx_mock.add_response(url=JOBS, json={"jobs": jobs})
    # A job that is no service is refused after a listing, like an unknown id.
    httpx_mock.add_response(url=JOBS, json={"jobs": jobs})
    services = manager()
    assert [s.id for s in await services.list(ADMIN)] == ["4"]
    with pytest.raises(NotFound, match="no service of yours has this id"):
        await services.get("1", ADMIN)
    await services.prober.aclose()
    await services.slurm.aclose()


async def test_one_bad_job_never_fails_a_listing(
    httpx_mock: HTTPXMock, monkeypatch: pytest.MonkeyPatch
) -> None:
    httpx_mock.add_response(url=f"{URL}/slurm/v0.0.42/ping", json=PING)
    mock_node(httpx_mock)
    jobs = [job(1, service_comment(9001)), job(2, service_comment(9002))]
    httpx_mock.add_response(url=JOBS, json={"jobs": jobs}, is_reusable=True)
    services = manager()

    async def healthy(url: str, key: str | None = None) -> bool:
        if ":9001" in url:
            raise RuntimeError("something no one foresaw")
        return True

    monkeypatch.setattr(services.prober, "healthy", healthy)
    with capture_logs() as logs:
        assert [s.id for s in await services.list(ADMIN)] == ["2"]
        assert [s.id for s in await services.list(ADMIN)] == ["2"]
    skipped = [e for e in logs if e["event"] == "service_skipped"]
    assert [e["job_id"] for e in skipped] == [1]  # logged once
    await services.prober.aclose()
    await services.slurm.aclose()


def mock_bind(httpx_mock: HTTPXMock, job_id: int) -> None:
    """slurmrestd's answer to the update that binds a new job's metadata."""
    httpx_mock.add_response(
        url=f"{URL}/slurm/v0.0.42/job/{job_id}", method="POST", json={"errors": []}
    )


def bound_comments(httpx_mock: HTTPXMock) -> dict[int, str]:
    """Job id -> the comment the gateway bound to it (the update after the submit)."""
    return {
        int(r.url.path.rsplit("/", 1)[1]): json.loads(r.content)["comment"]
        for r in httpx_mock.get_requests(method="POST")
        if r.url.path.rsplit("/", 1)[1].isdigit()
    }


async def test_create_is_a_submit_and_one_update_binding_the_metadata_to_the_job(
    httpx_mock: HTTPXMock,
) -> None:
    httpx_mock.add_response(url=f"{URL}/slurm/v0.0.42/ping", json=PING)
    httpx_mock.add_response(url=f"{URL}/slurm/v0.0.42/job/submit", json={"job_id": 41})
    mock_bind(httpx_mock, 41)
    services = manager()
    created, _ = await services.create(CreateRequest(recipe_name="testing/http"), ADMIN)
    assert (created.id, created.status) == ("41", ServiceStatus.PENDING)
    sent = [r for r in httpx_mock.get_requests() if not r.url.path.endswith("/ping")]
    assert [r.url.path for r in sent] == ["/slurm/v0.0.42/job/submit", "/slurm/v0.0.42/job/41"]
    body = json.loads(sent[0].content)["job"]
    # Submitted unbound: a comment nobody takes for a service, on any job.
    assert len(body["comment"]) <= metadata.META_BUDGET
    assert CODEC.decode(body["comment"], 41) is None
    bound = json.loads(sent[1].content)["comment"]
    assert bound.startswith(body["comment"] + ".")
    assert CODEC.decode(bound, 41) is not None
    assert CODEC.decode(bound, 42) is None  # copied onto another job: nothing
    key = next(e for e in body["environment"] if e.startswith("GW_SERVICE_KEY="))
    assert len(key) > len("GW_SERVICE_KEY=") + 30
    assert key.split("=", 1)[1] not in body["comment"]
    assert key.split("=", 1)[1] not in body["script"]
    # The view holds the bound comment until a listing brings Slurm's own.
    known = services.view.peek(41)
    assert known is not None and known.comment == bound
    await services.prober.aclose()
    await services.slurm.aclose()


async def test_a_refused_bind_cancels_the_job_and_fails_the_create(httpx_mock: HTTPXMock) -> None:
    httpx_mock.add_response(url=f"{URL}/slurm/v0.0.42/ping", json=PING)
    httpx_mock.add_response(url=f"{URL}/slurm/v0.0.42/job/submit", json={"job_id": 41})
    httpx_mock.add_response(url=f"{URL}/slurm/v0.0.42/job/41", method="POST", status_code=503)
    httpx_mock.add_response(url=f"{URL}/slurm/v0.0.42/job/41", method="DELETE", json={})
    services = manager()
    with pytest.raises(SlurmError):
        await services.create(CreateRequest(recipe_name="testing/http"), ADMIN)
    deleted = httpx_mock.get_requests(method="DELETE")
    assert [r.url.path for r in deleted] == ["/slurm/v0.0.42/job/41"]
    await services.prober.aclose()
    await services.slurm.aclose()


async def test_a_comment_over_slurms_limit_names_the_longest_field() -> None:
    services = manager()
    with pytest.raises(InvalidRequest) as info:
        await services.create(
            CreateRequest(
                recipe_name="testing/http", environment={"MESSAGE": "m" * 900, "PORT": "8000"}
            ),
            ADMIN,
        )
    assert info.value.errors[0].field == "config.environment.MESSAGE"
    assert "1024" in info.value.detail
    await services.prober.aclose()
    await services.slurm.aclose()


async def test_a_job_purged_while_stopping_answers_stopped(httpx_mock: HTTPXMock) -> None:
    httpx_mock.add_response(url=f"{URL}/slurm/v0.0.42/ping", json=PING)
    running = job(7, f"{blob()}|phase=building")
    httpx_mock.add_response(url=JOBS, json={"jobs": [running]})
    httpx_mock.add_response(url=f"{URL}/slurm/v0.0.42/job/7", method="DELETE", json={})
    # The next listing no longer holds it (purged right away).
    httpx_mock.add_response(url=JOBS, json={"jobs": [], "last_update": {"set": True, "number": 9}})
    services = manager()
    stopped, already_ended = await services.stop("7", ADMIN)
    assert not already_ended
    assert stopped.status is ServiceStatus.CANCELLED
    assert stopped.ended_at is not None
    await services.prober.aclose()
    await services.slurm.aclose()


@pytest.mark.parametrize("service_id", ["\u00b2", "1\n", "-1", "1.0", "9" * 13, ""])
async def test_ids_are_ascii_job_numbers(service_id: str) -> None:
    services = manager()
    with pytest.raises(NotFound):
        await services.get(service_id, ADMIN)
    await services.prober.aclose()
    await services.slurm.aclose()


async def test_prompt_path_reads_the_shared_view(httpx_mock: HTTPXMock) -> None:
    async def ok(seen: Seen, writer: asyncio.StreamWriter) -> None:
        writer.write(response(200))

    async with http_stub(ok, NODE_ADDRESS) as node:
        await _prompt_path_reads_the_view(httpx_mock, node)
    assert len(node.seen) == 1


async def _prompt_path_reads_the_view(httpx_mock: HTTPXMock, node: Stub) -> None:
    httpx_mock.add_response(url=f"{URL}/slurm/v0.0.42/ping", json=PING)
    httpx_mock.add_response(
        url=JOBS, json={"jobs": [job(7, service_comment(node.port))]}, is_reusable=True
    )
    mock_node(httpx_mock)
    services = manager()
    first = await asyncio.gather(*(services.running("7", ADMIN) for _ in range(50)))
    second = await services.running("7", ADMIN)
    assert first[0].status is ServiceStatus.RUNNING
    assert all(s == second for s in first)
    assert len(httpx_mock.get_requests(url=JOBS)) == 1
    await services.prober.aclose()
    await services.slurm.aclose()


def overwritten(
    job_id: int, state: str, *, name: str | None = None, user: str = "gwuser"
) -> dict[str, Any]:
    """A job of the gateway whose owner replaced its comment."""
    record = job(job_id, "phase=running|endpoint=evil.example:80", state)
    name = name or f"gw-testing-http-{CODEC.job_tag}"
    return {
        **record,
        "name": name,
        "user_name": user,
        "standard_output": f"/home/gwuser/{name}-{job_id}.out",
    }


async def test_an_overwritten_comment_leaves_a_stoppable_failed_service(
    httpx_mock: HTTPXMock,
) -> None:
    httpx_mock.add_response(url=f"{URL}/slurm/v0.0.42/ping", json=PING)
    other_gateway = f"gw-testing-http-{metadata.MetaCodec(b'another gateway secret!!').job_tag}"
    jobs = [
        overwritten(7, "RUNNING"),
        overwritten(8, "RUNNING", name=other_gateway),  # another gateway's: invisible
        overwritten(9, "RUNNING", user="gwother"),  # another user's: invisible
        overwritten(10, "RUNNING", name="gw-testing-http"),  # no tag: invisible
    ]
    httpx_mock.add_response(url=JOBS, json={"jobs": jobs})
    services = manager()
    listed = await services.list(ADMIN)
    assert [s.id for s in listed] == ["7"]
    service = listed[0]
    assert service.status is ServiceStatus.FAILED
    assert "overwritten" in service.status_reason
    assert (service.recipe_name, service.endpoint, service.upstream) == ("testing/http", None, None)
    with pytest.raises(Conflict, match="overwritten"):
        await services.running("7", ADMIN)
    # Once it ends, Slurm's verdict: what it meant is not remembered from before.
    body = json.dumps({"jobs": [overwritten(7, "COMPLETED")]}).encode()
    services.view.put(adapter_for("v0.0.42").parse_jobs(200, body).jobs[0])
    assert (await services.get("7", ADMIN)).status is ServiceStatus.COMPLETED
    await services.prober.aclose()
    await services.slurm.aclose()


def tenant_blob(owner: str, tenant: str, idempotency: str = "") -> str:
    meta = CODEC.new_meta(
        recipe="testing/http",
        created=1_800_000_000.0,
        owner=owner,
        environment={},
        resources={"nodes": 1, "gpu": "2"},
        tenant=tenant,
        idempotency=idempotency,
    )
    return CODEC.unbound(meta)


async def test_each_tenant_sees_its_own_and_twins_are_no_service(httpx_mock: HTTPXMock) -> None:
    httpx_mock.add_response(url=f"{URL}/slurm/v0.0.42/ping", json=PING)
    jobs = [
        {**job(1, tenant_blob("alice", "team-a"), "PENDING"), "user_name": "alice"},
        {**job(2, tenant_blob("bob", "team-b"), "PENDING"), "user_name": "bob"},
        # team-c shares alice's Slurm user, not her services
        {**job(3, tenant_blob("alice", "team-c"), "PENDING"), "user_name": "alice"},
        # two creates with one Idempotency-Key (two replicas): the later, once
        # cancelled, is a twin; one whose cancel failed (alive) stays visible
        {**job(5, tenant_blob("bob", "team-b", "m1"), "PENDING"), "user_name": "bob"},
        {**job(6, tenant_blob("bob", "team-b", "m1"), "CANCELLED"), "user_name": "bob"},
        {**job(7, tenant_blob("bob", "team-b", "m1"), "PENDING"), "user_name": "bob"},
        # no tenant recorded: only the tenant named after the Slurm user sees it
        {**job(8, tenant_blob("bob", ""), "PENDING"), "user_name": "bob"},
    ]
    httpx_mock.add_response(url=JOBS, json={"jobs": jobs}, is_reusable=True)
    services = manager()
    team = {
        name: Principal(tenant=name, slurm_user=user, role=Role.USER, method=Method.KEY)
        for name, user in (("team-a", "alice"), ("team-b", "bob"), ("team-c", "alice"))
    }
    assert [s.id for s in await services.list(team["team-a"])] == ["1"]
    assert [s.id for s in await services.list(team["team-b"])] == ["7", "5", "2"]
    bob = Principal(tenant="bob", slurm_user="bob", role=Role.USER, method=Method.SLURM_TOKEN)
    assert [s.id for s in await services.list(bob)] == ["8"]
    assert [s.id for s in await services.list(team["team-c"])] == ["3"]
    assert [s.id for s in await services.list(ADMIN)] == ["8", "7", "5", "3", "2", "1"]
    unknown = await asyncio.gather(
        services.get("2", team["team-a"]),
        services.get("6", team["team-b"]),
        services.get("424242", team["team-a"]),
        return_exceptions=True,
    )
    # Another tenant's id, a twin and an unknown id: one and the same answer.
    assert all(isinstance(e, NotFound) for e in unknown)
    assert (
        len({str(e).replace(i, "N") for e, i in zip(unknown, ("2", "6", "424242"), strict=True)})
        == 1
    )
    # Quotas count the tenant's services that have not ended, twins excepted.
    limited = Principal(
        tenant="team-b",
        slurm_user="bob",
        role=Role.USER,
        method=Method.KEY,
        limits=Limits(max_services=3, max_gpus=4),
    )
    with pytest.raises(QuotaExceeded) as info:
        services._check_quota(limited, 2, await services.view.jobs())
    assert info.value.limit == "max_services"
    services._check_quota(
        Principal(
            tenant="team-b",
            slurm_user="bob",
            role=Role.USER,
            method=Method.KEY,
            limits=Limits(max_gpus=8),
        ),
        2,
        await services.view.jobs(),
    )
    with pytest.raises(QuotaExceeded, match="at most 7 GPUs"):
        services._check_quota(
            Principal(
                tenant="team-b",
                slurm_user="bob",
                role=Role.USER,
                method=Method.KEY,
                limits=Limits(max_gpus=7),
            ),
            2,
            await services.view.jobs(),
        )
    await services.prober.aclose()
    await services.slurm.aclose()


def vllm_blob(owner: str, tenant: str, model: str, *, shared: bool = False, alias: str = "") -> str:
    environment = {"VLLM_MODEL": model}
    if alias:
        environment["VLLM_SERVED_MODEL_NAME"] = alias
    meta = CODEC.new_meta(
        recipe="testing/openai-stub",
        created=1_800_000_000.0,
        owner=owner,
        environment=environment,
        resources={},
        tenant=tenant,
        shared=shared,
    )
    return CODEC.unbound(meta)


async def test_serving_finds_the_model_among_what_the_caller_may_use(
    httpx_mock: HTTPXMock,
) -> None:
    httpx_mock.add_response(url=f"{URL}/slurm/v0.0.42/ping", json=PING)
    jobs = [
        {**job(1, vllm_blob("alice", "team-a", "m"), "PENDING"), "user_name": "alice"},
        {**job(2, vllm_blob("bob", "team-b", "m"), "PENDING"), "user_name": "bob"},
        # an admin's service offered to everyone
        {**job(3, vllm_blob("gwuser", "ops", "m", shared=True), "PENDING")},
        # served under an alias: that is its name on /v1
        {
            **job(4, vllm_blob("alice", "team-a", "org/big", alias="m"), "PENDING"),
            "user_name": "alice",
        },
        {**job(5, vllm_blob("alice", "team-a", "m"), "COMPLETED"), "user_name": "alice"},
        {**job(6, vllm_blob("alice", "team-a", "other"), "PENDING"), "user_name": "alice"},
        # not a vLLM service, whatever its environment says
        {**job(7, tenant_blob("alice", "team-a"), "PENDING"), "user_name": "alice"},
    ]
    httpx_mock.add_response(url=JOBS, json={"jobs": jobs}, is_reusable=True)
    services = manager()
    alice = Principal(tenant="team-a", slurm_user="alice", role=Role.USER, method=Method.KEY)
    bob = Principal(tenant="team-b", slurm_user="bob", role=Role.USER, method=Method.KEY)
    assert sorted(s.id for s in await services.serving(alice, "m")) == ["1", "3", "4"]
    assert sorted(s.id for s in await services.serving(bob, "m")) == ["2", "3"]
    assert sorted(s.id for s in await services.serving(alice)) == ["1", "3", "4", "6"]
    assert sorted(s.id for s in await services.serving(ADMIN, "m")) == ["1", "2", "3", "4"]
    # Shared for prompts only: the service itself stays another tenant's.
    with pytest.raises(NotFound):
        await services.get("3", bob)
    # A service this replica is stopping takes no more requests.
    services.leaving.add(1)
    assert sorted(s.id for s in await services.serving(alice, "m")) == ["3", "4"]
    await services.prober.aclose()
    await services.slurm.aclose()


async def test_only_an_admin_shares_a_service(httpx_mock: HTTPXMock) -> None:
    httpx_mock.add_response(url=f"{URL}/slurm/v0.0.42/ping", json=PING, is_optional=True)
    httpx_mock.add_response(url=f"{URL}/slurm/v0.0.42/job/submit", json={"job_id": 42})
    mock_bind(httpx_mock, 42)
    services = manager()
    user = Principal(tenant="gwuser", slurm_user="gwuser", role=Role.USER, method=Method.KEY)
    with pytest.raises(Forbidden, match="shared"):
        await services.create(CreateRequest(recipe_name="testing/http", shared=True), user)
    created, _ = await services.create(
        CreateRequest(recipe_name="testing/http", shared=True), ADMIN
    )
    assert created.shared is True
    decoded = CODEC.decode(bound_comments(httpx_mock)[42], 42)
    assert decoded is not None and decoded.meta.shared is True
    await services.prober.aclose()
    await services.slurm.aclose()


def test_a_comment_written_before_sharing_existed_decodes_unshared() -> None:
    class Before(msgspec.Struct, array_like=True):
        recipe: str
        created: float
        owner: str
        environment: dict[str, str]
        resources: dict[str, Any]
        nonce: bytes
        tenant: str
        idempotency: str
        request_digest: str

    raw = msgspec.msgpack.encode(Before("testing/http", 1.0, "gwuser", {}, {}, b"n", "t", "", ""))
    decoded = msgspec.msgpack.decode(raw, type=metadata.ServiceMeta)
    assert decoded.shared is False
    assert decoded.tenant == "t"


async def test_a_shared_service_says_so_wherever_it_is_read(httpx_mock: HTTPXMock) -> None:
    httpx_mock.add_response(url=f"{URL}/slurm/v0.0.42/ping", json=PING, is_optional=True)
    httpx_mock.add_response(url=f"{URL}/slurm/v0.0.42/job/submit", json={"job_id": 42})
    httpx_mock.add_response(url=f"{URL}/slurm/v0.0.42/job/submit", json={"job_id": 43})
    mock_bind(httpx_mock, 42)
    mock_bind(httpx_mock, 43)
    services = manager()
    user = Principal(tenant="team-a", slurm_user="gwuser", role=Role.USER, method=Method.KEY)
    with pytest.raises(Forbidden) as refused:
        await services.create(CreateRequest(recipe_name="testing/http", shared=True), user)
    assert refused.value.detail.startswith("shared:")
    # Refused before anything reached Slurm.
    assert not [r for r in httpx_mock.get_requests() if r.url.path.endswith("/submit")]
    shared, _ = await services.create(CreateRequest(recipe_name="testing/http", shared=True), ADMIN)
    plain, _ = await services.create(CreateRequest(recipe_name="testing/http"), user)
    assert ServiceResponse.of(shared).shared is True
    assert ServiceResponse.of(plain).shared is False
    # Read back from the jobs' comments, as Slurm lists them.
    bound = bound_comments(httpx_mock)
    httpx_mock.add_response(
        url=JOBS, json={"jobs": [job(i, c, "PENDING") for i, c in sorted(bound.items())]}
    )
    assert {s.id: s.shared for s in await services.list(ADMIN)} == {"42": True, "43": False}
    body = msgspec.json.decode(msgspec.json.encode(ServiceResponse.of(shared)))
    assert body["shared"] is True
    await services.prober.aclose()
    await services.slurm.aclose()


def test_the_served_name_is_the_alias_when_there_is_one() -> None:
    assert served_model({"VLLM_MODEL": "org/big", "VLLM_SERVED_MODEL_NAME": "m"}) == "m"
    assert served_model({"VLLM_MODEL": "org/big", "VLLM_SERVED_MODEL_NAME": ""}) == "org/big"
    assert served_model({"VLLM_MODEL": "org/big"}) == "org/big"
    assert served_model({}) == ""


async def test_readiness_asks_vllm_for_the_served_name(httpx_mock: HTTPXMock) -> None:
    """vLLM lists a model under its --served-model-name only: a service with an
    alias is ready when the alias is listed, not the model's path."""
    asked: list[str] = []

    async def vllm(seen: Seen, writer: asyncio.StreamWriter) -> None:
        asked.append(seen.path)
        if seen.path == "/v1/models":
            writer.write(response(200, {"object": "list", "data": [{"id": "m"}]}))
        else:
            writer.write(response(200, {}))

    async with http_stub(vllm, NODE_ADDRESS) as node:
        aliased = vllm_blob("gwuser", "ops", "org/big", alias="m")
        plain = vllm_blob("gwuser", "ops", "org/big")
        jobs = [
            job(1, f"{aliased}|phase=running|endpoint=node1:{node.port}"),
            job(2, f"{plain}|phase=running|endpoint=node1:{node.port}"),
        ]
        httpx_mock.add_response(url=f"{URL}/slurm/v0.0.42/ping", json=PING)
        mock_node(httpx_mock)
        httpx_mock.add_response(url=JOBS, json={"jobs": jobs}, is_reusable=True)
        services = manager()
        listed = {s.id: s.status for s in await services.list(ADMIN)}
        serving = [s.id for s in await services.serving(ADMIN, "m")]
        await services.prober.aclose()
        await services.slurm.aclose()
    assert listed == {"1": ServiceStatus.RUNNING, "2": ServiceStatus.STARTING}
    assert "/v1/models" in asked
    assert serving == ["1"]


async def test_serving_leaves_out_cancelled_twins_and_keeps_a_live_one(
    httpx_mock: HTTPXMock,
) -> None:
    def twin(job_id: int, state: str) -> dict[str, Any]:
        meta = CODEC.new_meta(
            recipe="testing/openai-stub",
            created=1_800_000_000.0,
            owner="gwuser",
            environment={"VLLM_MODEL": "m"},
            resources={},
            tenant="ops",
            idempotency="k1",
        )
        return job(job_id, CODEC.unbound(meta), state)

    httpx_mock.add_response(url=f"{URL}/slurm/v0.0.42/ping", json=PING)
    # Two creates with one Idempotency-Key: the later one, cancelled, is a twin;
    # one whose cancel failed (still pending) takes requests like any other.
    jobs = [twin(5, "PENDING"), twin(6, "CANCELLED"), twin(7, "PENDING")]
    httpx_mock.add_response(url=JOBS, json={"jobs": jobs}, is_reusable=True)
    services = manager()
    assert [s.id for s in await services.serving(ADMIN, "m")] == ["5", "7"]
    await services.prober.aclose()
    await services.slurm.aclose()

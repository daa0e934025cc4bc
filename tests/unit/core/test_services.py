"""ServiceManager over the in-memory scheduler: what it asks of Slurm, and
what it makes of the jobs Slurm lists (health answers from real stubs)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest
from structlog.testing import capture_logs

from gateway.api.schemas import ServiceResponse
from gateway.core import metadata
from gateway.core.errors import Conflict, Forbidden, InvalidRequest, NotFound, QuotaExceeded
from gateway.core.model import CreateRequest
from gateway.core.principal import Limits, Method, Principal, Role
from gateway.core.services import ServiceManager
from gateway.core.status import ServiceStatus
from gateway.slurm import JobInfo, JobState, SlurmError, SlurmUnavailable
from gateway.testing.scheduler import FakeScheduler
from tests.support.http_stub import Overlap, Seen, Stub, http_stub, response
from tests.support.services import (
    ADMIN,
    CODEC,
    NODE_ADDRESS,
    blob,
    fake_manager,
    job_info,
    service_comment,
    tenant_blob,
    vllm_blob,
)

job = job_info


@contextlib.asynccontextmanager
async def manager_of(
    *jobs: JobInfo, **options: Any
) -> AsyncIterator[tuple[ServiceManager, FakeScheduler]]:
    """A ServiceManager over the in-memory scheduler holding ``jobs``."""
    services, fake = fake_manager(*jobs, **options)
    try:
        yield services, fake
    finally:
        await services.prober.aclose()


def of(user: str, listed: JobInfo) -> JobInfo:
    return msgspec.structs.replace(listed, user_name=user)


async def test_listing_costs_one_slurm_call_and_probes_run_concurrently() -> None:
    overlap = Overlap()
    async with contextlib.AsyncExitStack() as stack:
        stubs = [
            await stack.enter_async_context(http_stub(overlap.answer(0.2, status), NODE_ADDRESS))
            for status in (200, 200, 200, 503)
        ]
        await _listing_costs_one_slurm_call(stubs)
    assert overlap.most == len(stubs), "health probes ran one after another"
    assert [len(stub.seen) for stub in stubs] == [1, 1, 1, 1]


async def _listing_costs_one_slurm_call(stubs: list[Stub]) -> None:
    jobs = [job(10 + i, service_comment(stub.port)) for i, stub in enumerate(stubs)]
    jobs.append(job(99, "not ours"))
    async with manager_of(*jobs) as (services, fake):
        listed = await services.list(ADMIN)
        assert [s.id for s in listed] == ["13", "12", "11", "10"]
        assert [s.status for s in listed] == [
            ServiceStatus.STARTING,  # the fourth answers 503
            ServiceStatus.RUNNING,
            ServiceStatus.RUNNING,
            ServiceStatus.RUNNING,
        ]
        await services.list(ADMIN)  # within the view's interval and the probe cache: nothing sent
        assert fake.count("list_jobs") == 1


async def test_comment_from_the_job_is_parsed_not_trusted() -> None:
    evil = f"{blob()}|phase=running|endpoint=169.254.169.254/latest:80"
    async with manager_of(job(7, evil)) as (services, fake):
        service = await services.get("7", ADMIN)
        # A malformed endpoint is ignored, no probe is sent, and the reason says so.
        assert service.endpoint is None
        assert service.status is ServiceStatus.STARTING
        assert "not host:port" in service.status_reason
        assert json.loads(json.dumps(service.config.environment)) == {}
        assert fake.count("get_node") == 0


async def test_an_endpoint_off_the_jobs_node_is_never_probed() -> None:
    async def ok(seen: Seen, writer: asyncio.StreamWriter) -> None:
        writer.write(response(200))

    async with http_stub(ok, NODE_ADDRESS) as node, http_stub(ok) as elsewhere:
        await _off_the_node(node, elsewhere)
    assert [s.path for s in node.seen] == ["/health"]
    assert elsewhere.seen == []


async def _off_the_node(node: Stub, elsewhere: Stub) -> None:
    jobs = [
        job(7, service_comment(elsewhere.port, "127.0.0.1")),
        job(8, service_comment(9, "x.invalid")),
        # The node's host name: reached at its address, as Slurm has it (the
        # gateway's host need not resolve node names).
        job(9, service_comment(node.port, "node1.cluster")),
    ]
    async with manager_of(*jobs) as (services, fake):
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
        assert fake.count("get_node") == 1


async def test_only_the_gateways_user_and_genuine_blobs_make_services() -> None:
    genuine = blob()
    jobs = [
        of("alice", job(1, genuine)),  # a copied comment on another's job
        job(2, blob(owner="alice")),  # a blob naming another owner
        job(3, "gw2:" + genuine[4:-3] + "AAA"),  # a broken MAC
        job(4, genuine, JobState.PENDING),
    ]
    async with manager_of(*jobs) as (services, fake):
        assert [s.id for s in await services.list(ADMIN)] == ["4"]
        with pytest.raises(NotFound, match="no service of yours has this id"):
            await services.get("1", ADMIN)
        # A job that is no service is refused after a listing, like an unknown id.
        assert fake.count("list_jobs") == 2


async def test_one_bad_job_never_fails_a_listing(monkeypatch: pytest.MonkeyPatch) -> None:
    jobs = [job(1, service_comment(9001)), job(2, service_comment(9002))]
    async with manager_of(*jobs) as (services, _):

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


async def test_create_is_a_submit_and_one_update_binding_the_metadata_to_the_job() -> None:
    async with manager_of(first_id=41) as (services, fake):
        created, _ = await services.create(CreateRequest(recipe_name="testing/http"), ADMIN)
        assert (created.id, created.status) == ("41", ServiceStatus.PENDING)
        assert [(c.op, c.user) for c in fake.calls] == [
            ("submit", "gwuser"),
            ("update_comment", "gwuser"),
        ]
        [(job_id, submitted)] = fake.submitted
        assert job_id == 41 and submitted.comment is not None
        # Submitted unbound: a comment nobody takes for a service, on any job.
        assert len(submitted.comment) <= metadata.META_BUDGET
        assert CODEC.decode(submitted.comment, 41) is None
        bound = fake.comment_updates()[41]
        assert bound.startswith(submitted.comment + ".")
        assert CODEC.decode(bound, 41) is not None
        assert CODEC.decode(bound, 42) is None  # copied onto another job: nothing
        key = submitted.environment["GW_SERVICE_KEY"]
        assert len(key) > 30
        assert key not in submitted.comment
        assert key not in submitted.script
        # The view holds the bound comment until a listing brings Slurm's own.
        known = services.view.peek(41)
        assert known is not None and known.comment == bound


async def test_a_refused_bind_cancels_the_job_and_fails_the_create() -> None:
    async with manager_of(first_id=41) as (services, fake):
        fake.fail("update_comment", SlurmUnavailable("slurmrestd answered 503", status_code=503))
        with pytest.raises(SlurmError):
            await services.create(CreateRequest(recipe_name="testing/http"), ADMIN)
        assert [c.args for c in fake.calls if c.op == "cancel"] == [(41,)]
        assert fake.jobs[41].state is JobState.CANCELLED


async def test_a_comment_over_slurms_limit_names_the_longest_field() -> None:
    async with manager_of() as (services, fake):
        with pytest.raises(InvalidRequest) as info:
            await services.create(
                CreateRequest(
                    recipe_name="testing/http", environment={"MESSAGE": "m" * 900, "PORT": "8000"}
                ),
                ADMIN,
            )
        assert info.value.errors[0].field == "config.environment.MESSAGE"
        assert "1024" in info.value.detail
        assert fake.calls == []


async def test_a_job_purged_while_stopping_answers_stopped() -> None:
    async with manager_of(job(7, f"{blob()}|phase=building")) as (services, fake):
        # The next listing no longer holds it (purged right away).
        fake.cancel_purges = True
        stopped, already_ended = await services.stop("7", ADMIN)
        assert not already_ended
        assert stopped.status is ServiceStatus.CANCELLED
        assert stopped.ended_at is not None
        assert [c.args for c in fake.calls if c.op == "cancel"] == [(7,)]


@pytest.mark.parametrize("service_id", ["\u00b2", "1\n", "-1", "1.0", "9" * 13, ""])
async def test_ids_are_ascii_job_numbers(service_id: str) -> None:
    async with manager_of() as (services, fake):
        with pytest.raises(NotFound):
            await services.get(service_id, ADMIN)
        assert fake.calls == []


async def test_prompt_path_reads_the_shared_view() -> None:
    async def ok(seen: Seen, writer: asyncio.StreamWriter) -> None:
        writer.write(response(200))

    async with http_stub(ok, NODE_ADDRESS) as node:
        await _prompt_path_reads_the_view(node)
    assert len(node.seen) == 1


async def _prompt_path_reads_the_view(node: Stub) -> None:
    async with manager_of(job(7, service_comment(node.port))) as (services, fake):
        first = await asyncio.gather(*(services.running("7", ADMIN) for _ in range(50)))
        second = await services.running("7", ADMIN)
        assert first[0].status is ServiceStatus.RUNNING
        assert all(s == second for s in first)
        assert fake.count("list_jobs") == 1


def overwritten(
    job_id: int, state: JobState, *, name: str | None = None, user: str = "gwuser"
) -> JobInfo:
    """A job of the gateway whose owner replaced its comment."""
    name = name or f"gw-testing-http-{CODEC.job_tag}"
    return job(
        job_id,
        "phase=running|endpoint=evil.example:80",
        state,
        name=name,
        user_name=user,
        standard_output=f"/home/gwuser/{name}-{job_id}.out",
    )


async def test_an_overwritten_comment_leaves_a_stoppable_failed_service() -> None:
    other_gateway = f"gw-testing-http-{metadata.MetaCodec(b'another gateway secret!!').job_tag}"
    jobs = [
        overwritten(7, JobState.RUNNING),
        overwritten(8, JobState.RUNNING, name=other_gateway),  # another gateway's: invisible
        overwritten(9, JobState.RUNNING, user="gwother"),  # another user's: invisible
        overwritten(10, JobState.RUNNING, name="gw-testing-http"),  # no tag: invisible
    ]
    async with manager_of(*jobs) as (services, _):
        listed = await services.list(ADMIN)
        assert [s.id for s in listed] == ["7"]
        service = listed[0]
        assert service.status is ServiceStatus.FAILED
        assert "overwritten" in service.status_reason
        assert (service.recipe_name, service.endpoint, service.upstream) == (
            "testing/http",
            None,
            None,
        )
        with pytest.raises(Conflict, match="overwritten"):
            await services.running("7", ADMIN)
        # Once it ends, Slurm's verdict: what it meant is not remembered from before.
        services.view.put(overwritten(7, JobState.COMPLETED))
        assert (await services.get("7", ADMIN)).status is ServiceStatus.COMPLETED


async def test_each_tenant_sees_its_own_and_twins_are_no_service() -> None:
    pending = JobState.PENDING
    jobs = [
        of("alice", job(1, tenant_blob("alice", "team-a"), pending)),
        of("bob", job(2, tenant_blob("bob", "team-b"), pending)),
        # team-c shares alice's Slurm user, not her services
        of("alice", job(3, tenant_blob("alice", "team-c"), pending)),
        # two creates with one Idempotency-Key (two replicas): the later, once
        # cancelled, is a twin; one whose cancel failed (alive) stays visible
        of("bob", job(5, tenant_blob("bob", "team-b", "m1"), pending)),
        of("bob", job(6, tenant_blob("bob", "team-b", "m1"), JobState.CANCELLED)),
        of("bob", job(7, tenant_blob("bob", "team-b", "m1"), pending)),
        # no tenant recorded: only the tenant named after the Slurm user sees it
        of("bob", job(8, tenant_blob("bob", ""), pending)),
    ]
    async with manager_of(*jobs) as (services, _):
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
        answers = {
            str(e).replace(i, "N") for e, i in zip(unknown, ("2", "6", "424242"), strict=True)
        }
        assert len(answers) == 1

        # Quotas count the tenant's services that have not ended, twins excepted.
        def limited(**limits: int) -> Principal:
            return Principal(
                tenant="team-b",
                slurm_user="bob",
                role=Role.USER,
                method=Method.KEY,
                limits=Limits(**limits),
            )

        jobs_now = await services.view.jobs()
        with pytest.raises(QuotaExceeded) as info:
            services.creator.check_quota(limited(max_services=3, max_gpus=4), 2, jobs_now)
        assert info.value.limit == "max_services"
        services.creator.check_quota(limited(max_gpus=8), 2, jobs_now)
        with pytest.raises(QuotaExceeded, match="at most 7 GPUs"):
            services.creator.check_quota(limited(max_gpus=7), 2, jobs_now)


async def test_serving_finds_the_model_among_what_the_caller_may_use() -> None:
    pending = JobState.PENDING
    jobs = [
        of("alice", job(1, vllm_blob("alice", "team-a", "m"), pending)),
        of("bob", job(2, vllm_blob("bob", "team-b", "m"), pending)),
        # an admin's service offered to everyone
        job(3, vllm_blob("gwuser", "ops", "m", shared=True), pending),
        # served under an alias: that is its name on /v1
        of("alice", job(4, vllm_blob("alice", "team-a", "org/big", alias="m"), pending)),
        of("alice", job(5, vllm_blob("alice", "team-a", "m"), JobState.COMPLETED)),
        of("alice", job(6, vllm_blob("alice", "team-a", "other"), pending)),
        # not a vLLM service, whatever its environment says
        of("alice", job(7, tenant_blob("alice", "team-a"), pending)),
    ]
    async with manager_of(*jobs) as (services, _):
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


async def test_only_an_admin_shares_a_service() -> None:
    async with manager_of(first_id=42) as (services, fake):
        user = Principal(tenant="gwuser", slurm_user="gwuser", role=Role.USER, method=Method.KEY)
        with pytest.raises(Forbidden, match="shared"):
            await services.create(CreateRequest(recipe_name="testing/http", shared=True), user)
        created, _ = await services.create(
            CreateRequest(recipe_name="testing/http", shared=True), ADMIN
        )
        assert created.shared is True
        decoded = CODEC.decode(fake.comment_updates()[42], 42)
        assert decoded is not None and decoded.meta.shared is True


def test_a_comment_written_before_sharing_existed_decodes_unshared() -> None:
    class Before(msgspec.Struct, array_like=True):
        recipe: str
        created: float
        owner: str
        environment: dict[str, str]
        resources: dict[str, object]
        nonce: bytes
        tenant: str
        idempotency: str
        request_digest: str

    raw = msgspec.msgpack.encode(Before("testing/http", 1.0, "gwuser", {}, {}, b"n", "t", "", ""))
    decoded = msgspec.msgpack.decode(raw, type=metadata.ServiceMeta)
    assert decoded.shared is False
    assert decoded.tenant == "t"


async def test_a_shared_service_says_so_wherever_it_is_read() -> None:
    async with manager_of(first_id=42) as (services, fake):
        user = Principal(tenant="team-a", slurm_user="gwuser", role=Role.USER, method=Method.KEY)
        with pytest.raises(Forbidden) as refused:
            await services.create(CreateRequest(recipe_name="testing/http", shared=True), user)
        assert refused.value.detail.startswith("shared:")
        # Refused before anything reached Slurm.
        assert fake.count("submit") == 0
        shared, _ = await services.create(
            CreateRequest(recipe_name="testing/http", shared=True), ADMIN
        )
        plain, _ = await services.create(CreateRequest(recipe_name="testing/http"), user)
        assert ServiceResponse.of(shared).shared is True
        assert ServiceResponse.of(plain).shared is False
        # Read back from the jobs' comments, as Slurm lists them.
        assert sorted(fake.comment_updates()) == [42, 43]
        await services.view.fresh(services.view.clock())
        assert {s.id: s.shared for s in await services.list(ADMIN)} == {"42": True, "43": False}
        body = msgspec.json.decode(msgspec.json.encode(ServiceResponse.of(shared)))
        assert body["shared"] is True


async def test_the_served_name_is_the_alias_when_there_is_one() -> None:
    """What the recipe's declared variables say, on the Service itself."""
    jobs = [
        job(1, vllm_blob("gwuser", "ops", "org/big", alias="m"), JobState.PENDING),
        job(2, vllm_blob("gwuser", "ops", "org/big", alias=""), JobState.PENDING),
        job(3, vllm_blob("gwuser", "ops", "org/big"), JobState.PENDING),
        job(4, blob(VLLM_MODEL="org/big"), JobState.PENDING),  # no model variable declared
    ]
    async with manager_of(*jobs) as (services, _):
        listed = {s.id: (s.model, s.served_model) for s in await services.list(ADMIN)}
    assert listed == {
        "1": ("org/big", "m"),
        "2": ("org/big", "org/big"),
        "3": ("org/big", "org/big"),
        "4": (None, ""),
    }


async def test_readiness_asks_vllm_for_the_served_name() -> None:
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
        async with manager_of(*jobs) as (services, _):
            listed = {s.id: s.status for s in await services.list(ADMIN)}
            serving = [s.id for s in await services.serving(ADMIN, "m")]
    assert listed == {"1": ServiceStatus.RUNNING, "2": ServiceStatus.STARTING}
    assert "/v1/models" in asked
    assert serving == ["1"]


async def test_serving_leaves_out_cancelled_twins_and_keeps_a_live_one() -> None:
    def twin(job_id: int, state: JobState) -> JobInfo:
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

    # Two creates with one Idempotency-Key: the later one, cancelled, is a twin;
    # one whose cancel failed (still pending) takes requests like any other.
    jobs = [twin(5, JobState.PENDING), twin(6, JobState.CANCELLED), twin(7, JobState.PENDING)]
    async with manager_of(*jobs) as (services, _):
        assert [s.id for s in await services.serving(ADMIN, "m")] == ["5", "7"]

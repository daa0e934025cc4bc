"""Which service takes a /v1 request (gateway/core/routing.py)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gateway.core.principal import Method, Principal, Role, anonymous
from gateway.core.routing import ModelNotFound, ModelNotReady, ModelRouter
from gateway.core.services import ServiceManager
from gateway.core.status import ServiceStatus
from gateway.slurm import JobInfo, SlurmAuthError, SlurmError
from gateway.testing.scheduler import FakeScheduler
from tests.support import services as tests
from tests.support.clock import Clock
from tests.support.http_stub import Seen, http_stub, response
from tests.support.services import router, service

CALLER = anonymous("gwuser")


# -- routing ------------------------------------------------------------------------


async def test_ties_take_turns_and_the_least_busy_wins() -> None:
    a, b = service("1"), service("2")
    r = router(a, b)
    picks = [(await r.pick(CALLER, "m")).id for _ in range(6)]
    assert sorted(picks) == ["1", "1", "1", "2", "2", "2"]
    assert picks[0] != picks[1]
    assert a.upstream is not None
    with r.outstanding(a.upstream), r.outstanding(a.upstream):
        assert {(await r.pick(CALLER, "m")).id for _ in range(4)} == {"2"}
    # Counts go back down when requests end.
    assert {(await r.pick(CALLER, "m")).id for _ in range(4)} == {"1", "2"}


async def test_a_refusing_upstream_is_passed_over_for_a_while() -> None:
    clock = Clock()
    a, b = service("1"), service("2")
    r = router(a, b, clock=clock)
    assert a.upstream is not None and b.upstream is not None
    r.eject(a.upstream)
    assert {(await r.pick(CALLER, "m")).id for _ in range(4)} == {"2"}
    assert (await r.pick(CALLER, "m", avoid=b.upstream.url)).id == "1"  # better than none
    r.eject(b.upstream)
    # All passed over: one is tried rather than the request refused.
    assert (await r.pick(CALLER, "m")).id in {"1", "2"}
    clock.now += 5.1
    assert {(await r.pick(CALLER, "m")).id for _ in range(4)} == {"1", "2"}


async def test_an_unknown_model_names_those_the_caller_can_use() -> None:
    r = router(service("1", "alpha"), service("2", "beta", ServiceStatus.STARTING))
    with pytest.raises(ModelNotFound) as raised:
        await r.pick(CALLER, "gamma")
    assert raised.value.status_code == 404
    assert raised.value.code == "model_not_found"
    assert raised.value.param == "model"
    assert "alpha, beta" in raised.value.detail
    with pytest.raises(ModelNotFound) as nothing:
        await router().pick(CALLER, "x" * 5000)
    assert "no model is served for you" in nothing.value.detail
    assert len(nothing.value.detail) < 400  # the client's name is not echoed whole


@pytest.mark.parametrize(
    "status", [ServiceStatus.PENDING, ServiceStatus.BUILDING, ServiceStatus.STARTING]
)
async def test_a_model_not_yet_running_is_503_with_retry_after(status: ServiceStatus) -> None:
    with pytest.raises(ModelNotReady) as raised:
        await router(service("7", status=status)).pick(CALLER, "m")
    assert raised.value.status_code == 503
    assert raised.value.headers == {"Retry-After": "5"}
    assert f"service 7 is {status.value}" in raised.value.detail


async def test_models_lists_running_services_only() -> None:
    r = router(
        service("1", "alpha"),
        service("2", "alpha"),
        service("3", "beta", ServiceStatus.STARTING),
    )
    models = await r.models(CALLER)
    assert {name: [s.id for s in group] for name, group in models.items()} == {"alpha": ["1", "2"]}


async def test_a_lora_adapter_is_a_model_of_the_services_that_serve_it() -> None:
    lora = {"sql": "/models/sql-lora"}
    r = router(service("1", "base", adapters=lora), service("2", "base"), service("3", "other"))
    models = await r.models(CALLER)
    assert {name: [s.id for s in group] for name, group in models.items()} == {
        "base": ["1", "2"],
        "sql": ["1"],
        "other": ["3"],
    }
    # Only the service that loaded it takes its requests; the base model's go to both.
    assert {(await r.pick(CALLER, "sql")).id for _ in range(6)} == {"1"}
    assert {(await r.pick(CALLER, "base")).id for _ in range(6)} == {"1", "2"}
    with pytest.raises(ModelNotFound) as raised:
        await r.pick(CALLER, "sql-v2")
    assert raised.value.available == ["base", "other", "sql"]


# -- routing, more closely ------------------------------------------------------------


async def test_two_idle_services_take_every_other_request() -> None:
    r = router(service("1"), service("2"))
    picks = [(await r.pick(CALLER, "m")).id for _ in range(8)]
    assert all(a != b for a, b in itertools.pairwise(picks)), picks


async def test_the_least_busy_of_three_wins_whatever_the_turn() -> None:
    a, b, c = service("1"), service("2"), service("3")
    r = router(a, b, c)
    assert a.upstream is not None and c.upstream is not None
    with r.outstanding(a.upstream), r.outstanding(c.upstream), r.outstanding(c.upstream):
        assert {(await r.pick(CALLER, "m")).id for _ in range(6)} == {"2"}
        assert b.upstream is not None
        with r.outstanding(b.upstream), r.outstanding(b.upstream):
            # b has 2, a 1, c 2: a, whose turn it may not be.
            assert {(await r.pick(CALLER, "m")).id for _ in range(6)} == {"1"}


async def test_a_passed_over_upstream_is_back_when_its_time_is_up() -> None:
    clock = Clock()
    a, b = service("1"), service("2")
    r = router(a, b, clock=clock)
    assert a.upstream is not None
    r.eject(a.upstream)
    clock.now += 4.9
    assert {(await r.pick(CALLER, "m")).id for _ in range(4)} == {"2"}
    clock.now += 0.1  # the 5 s are up
    assert {(await r.pick(CALLER, "m")).id for _ in range(4)} == {"1", "2"}


async def test_the_upstream_to_avoid_is_never_picked() -> None:
    a, b = service("1"), service("2")
    r = router(a, b)
    assert a.upstream is not None
    assert {(await r.pick(CALLER, "m", avoid=a.upstream.url)).id for _ in range(4)} == {"2"}
    # The only running one is to be avoided: not ready (and no other is starting).
    with pytest.raises(ModelNotReady, match="refused the connection"):
        await router(a, service("3", "other")).pick(CALLER, "m", avoid=a.upstream.url)


async def test_a_model_whose_services_all_failed_is_not_ready() -> None:
    with pytest.raises(ModelNotReady) as raised:
        await router(service("5", status=ServiceStatus.FAILED)).pick(CALLER, "m")
    assert "service 5 is failed" in raised.value.detail


# -- routing over the real ServiceManager: who may use a service --------------------


async def vllm_answer(seen: Seen, writer: asyncio.StreamWriter) -> None:
    """A vLLM that is up and serves "m" (and "private")."""
    if seen.path == "/v1/models":
        writer.write(response(200, {"object": "list", "data": [{"id": "m"}, {"id": "private"}]}))
    else:
        writer.write(response(200, {}))


def running(job_id: int, user: str, tenant: str, port: int, **meta: Any) -> JobInfo:
    """A running vLLM job of ``user``/``tenant`` with its endpoint published."""
    comment = f"{tests.vllm_blob(user, tenant, meta.pop('model', 'm'), **meta)}|phase=running"
    return tests.job_info(job_id, f"{comment}|endpoint=node1:{port}", user_name=user)


def tenant(name: str, user: str) -> Principal:
    return Principal(tenant=name, slurm_user=user, role=Role.USER, method=Method.KEY)


ALICE, BOB, CAROL = tenant("team-a", "alice"), tenant("team-b", "bob"), tenant("team-c", "carol")


@contextlib.asynccontextmanager
async def slurm_with(*jobs: JobInfo) -> AsyncIterator[tuple[ServiceManager, FakeScheduler]]:
    """A ServiceManager whose (in-memory) Slurm holds ``jobs``."""
    services, fake = tests.fake_manager(*jobs)
    try:
        yield services, fake
    finally:
        await services.prober.aclose()


async def picked(r: ModelRouter, principal: Principal, model: str = "m", n: int = 6) -> set[str]:
    return {(await r.pick(principal, model)).id for _ in range(n)}


async def test_a_shared_service_takes_every_tenants_requests_an_unshared_one_its_own() -> None:
    async with contextlib.AsyncExitStack() as stack:
        ports = [
            (await stack.enter_async_context(http_stub(vllm_answer, tests.NODE_ADDRESS))).port
            for _ in range(4)
        ]
        jobs = [
            running(1, "alice", "team-a", ports[0]),
            running(2, "bob", "team-b", ports[1]),
            running(3, "gwuser", "ops", ports[2], shared=True),  # an admin's, offered to all
            running(4, "alice", "team-a", ports[3], model="private"),
        ]
        services, _ = await stack.enter_async_context(slurm_with(*jobs))
        r = ModelRouter(services)
        assert await picked(r, ALICE) == {"1", "3"}
        assert await picked(r, BOB) == {"2", "3"}
        assert await picked(r, CAROL) == {"3"}
        assert await picked(r, tests.ADMIN) == {"1", "2", "3"}
        # Another tenant's unshared model does not exist for the caller, nor is it named.
        with pytest.raises(ModelNotFound) as raised:
            await r.pick(CAROL, "private")
        assert raised.value.available == ["m"]
        assert (await r.pick(ALICE, "private")).id == "4"
        assert sorted(await r.models(CAROL)) == ["m"]


async def test_a_lora_adapter_reaches_the_jobs_that_serve_it() -> None:
    # As Slurm lists them: the adapters read from each job's recorded environment.
    async with contextlib.AsyncExitStack() as stack:
        ports = [
            (await stack.enter_async_context(http_stub(vllm_answer, tests.NODE_ADDRESS))).port
            for _ in range(3)
        ]
        jobs = [
            running(1, "alice", "team-a", ports[0], lora="sql=/models/sql a=/models/a"),
            running(2, "alice", "team-a", ports[1]),
            running(3, "bob", "team-b", ports[2], lora="sql=/models/sql"),
        ]
        services, _ = await stack.enter_async_context(slurm_with(*jobs))
        r = ModelRouter(services)
        assert await picked(r, ALICE, "sql") == {"1"}
        assert await picked(r, ALICE, "a") == {"1"}
        assert await picked(r, ALICE) == {"1", "2"}
        # Each service once under each of its names.
        models = {name: [s.id for s in group] for name, group in (await r.models(ALICE)).items()}
        assert models == {"m": ["1", "2"], "sql": ["1"], "a": ["1"]}
        assert await picked(r, BOB, "sql") == {"3"}
        with pytest.raises(ModelNotFound):
            await r.pick(BOB, "a")  # team-a's adapter


async def test_a_service_being_stopped_takes_no_more_requests(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    during: list[set[str]] = []

    async with contextlib.AsyncExitStack() as stack:
        ports = [
            (await stack.enter_async_context(http_stub(vllm_answer, tests.NODE_ADDRESS))).port
            for _ in range(2)
        ]
        jobs = [running(1, "alice", "team-a", ports[0]), running(2, "alice", "team-a", ports[1])]
        services, fake = await stack.enter_async_context(slurm_with(*jobs))
        r = ModelRouter(services)
        cancel = fake.cancel

        async def cancelling(job_id: int, signal: str | None = None) -> None:
            # While Slurm is being asked: the router already passes it over.
            during.append(await picked(r, ALICE))
            # Slurm ends it; the view shows it cancelled from then on.
            await cancel(job_id, signal)

        monkeypatch.setattr(fake, "cancel", cancelling)
        assert await picked(r, ALICE) == {"1", "2"}
        stopped, _ = await services.stop("1", tests.ADMIN)
        assert stopped.status is ServiceStatus.CANCELLED
        assert during == [{"2"}]
        assert await picked(r, ALICE) == {"2"}


async def test_a_stop_slurm_refused_leaves_the_service_taking_requests() -> None:
    async with http_stub(vllm_answer, tests.NODE_ADDRESS) as up:
        job = running(1, "alice", "team-a", up.port)
        async with slurm_with(job) as (services, fake):
            fake.fail("cancel", SlurmAuthError("Access denied (error 1)", status_code=403))
            r = ModelRouter(services)
            assert await picked(r, ALICE) == {"1"}
            with pytest.raises(SlurmError):
                await services.stop("1", tests.ADMIN)
            assert await picked(r, ALICE) == {"1"}

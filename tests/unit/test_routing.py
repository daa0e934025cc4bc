"""Which service takes a /v1 request (gateway/core/routing.py), and the relay in
front of real upstream servers on 127.0.0.1 (gateway/api/relay.py)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
from datetime import UTC, datetime
from typing import Any, cast

import httpx
import msgspec
import pytest
from litestar.types import Message, ReceiveMessage
from pytest_httpx import HTTPXMock

from gateway.api.relay import FrontDoor, RequestBody, UpstreamAnswer
from gateway.core.errors import UpstreamFailed
from gateway.core.principal import Method, Principal, Role, anonymous
from gateway.core.routing import ModelNotFound, ModelNotReady, ModelRouter
from gateway.core.services import Service, ServiceConfig, ServiceManager, Upstream
from gateway.core.status import ServiceStatus
from gateway.metrics import PROMPT_TOKENS, series
from gateway.slurm import SlurmError
from gateway.upstream.vllm import VllmClient
from tests.support.http_stub import Seen, http_stub, response
from tests.support.polling import poll
from tests.unit import test_services as tests

CALLER = anonymous("gwuser")


def service(
    sid: str, model: str = "m", status: ServiceStatus = ServiceStatus.RUNNING, url: str = ""
) -> Service:
    running = status in (ServiceStatus.RUNNING, ServiceStatus.STARTING)
    return Service(
        id=sid,
        name=f"s-{sid}",
        recipe_name="inference/vllm",
        kind="vllm",
        status=status,
        status_reason="",
        config=ServiceConfig(environment={"VLLM_MODEL": model}, resources={}),
        created_at=datetime(2026, 1, 1, tzinfo=UTC),
        started_at=None,
        ended_at=None,
        owner="gwuser",
        tenant="gwuser",
        slurm_state="RUNNING",
        slurm_reason="",
        node="node1",
        endpoint=url or f"http://node1:{sid}",
        upstream=Upstream(url or f"http://node1:{sid}", "key") if running else None,
    )


class Services:
    """What the router asks of ServiceManager: the caller's services of a model."""

    def __init__(self, *services: Service) -> None:
        self.services = list(services)

    async def serving(self, principal: Principal, model: str | None = None) -> list[Service]:
        return [
            s for s in self.services if model is None or s.config.environment["VLLM_MODEL"] == model
        ]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def router(*services: Service, clock: Clock | None = None) -> ModelRouter:
    return ModelRouter(
        cast(ServiceManager, Services(*services)), clock=clock or Clock(), eject_seconds=5
    )


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


# -- the relay, against real upstreams ----------------------------------------------


async def _value(value: int) -> int:
    return value


def closed_port() -> str:
    """A loopback URL nothing listens on: connections are refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


class Client:
    """An ASGI client's side: what the relay sent back."""

    def __init__(self) -> None:
        self.messages: list[Message] = []

    async def receive(self) -> ReceiveMessage:
        await asyncio.Event().wait()  # the body was read already; never leaves
        raise AssertionError

    async def send(self, message: Message) -> None:
        self.messages.append(message)

    @property
    def status(self) -> int:
        return int(cast(dict[str, Any], self.messages[0])["status"])

    @property
    def headers(self) -> dict[bytes, bytes]:
        return dict(cast(dict[str, Any], self.messages[0])["headers"])

    @property
    def body(self) -> bytes:
        return b"".join(cast(dict[str, Any], m).get("body", b"") for m in self.messages[1:])


async def relay(door: FrontDoor, body: bytes, path: str = "/v1/chat/completions") -> Client:
    client = Client()
    lease = door.vllm.limits.lease()
    try:
        await door.forward(CALLER, "m", path, RequestBody(body), lease, client.receive, client.send)
    finally:
        lease.close()
    return client


@contextlib.asynccontextmanager
async def door(*urls: str) -> Any:
    vllm = VllmClient(timeout=5, connect_timeout=1)
    try:
        services = [service(str(i + 1), url=url) for i, url in enumerate(urls)]
        yield FrontDoor(router=router(*services), vllm=vllm)
    finally:
        await vllm.aclose()


def answering(status: int, body: Any, content_type: str = "application/json") -> Any:
    async def answer(seen: Seen, writer: asyncio.StreamWriter) -> None:
        writer.write(response(status, body, content_type))

    return answer


COMPLETION = {"object": "chat.completion", "usage": {"prompt_tokens": 3, "completion_tokens": 5}}


async def test_the_body_goes_byte_for_byte_and_the_answer_comes_back() -> None:
    body = '{"top_k": 5, "model":"m",  "messages":[{"content":"héllo ☃"}], "z": null}'.encode()
    async with http_stub(answering(200, COMPLETION)) as up, door(up.url) as d:
        before = series(PROMPT_TOKENS, "completion")._value.get()
        client = await relay(d, body)
    assert up.seen[0].body == body
    assert up.seen[0].path == "/v1/chat/completions"
    assert up.seen[0].headers["authorization"] == "Bearer key"  # the service's, not the caller's
    assert client.status == 200
    assert msgspec.json.decode(client.body) == COMPLETION
    assert client.headers[b"x-gateway-service-id"] == b"1"
    assert series(PROMPT_TOKENS, "completion")._value.get() == before + 5


async def test_a_refused_connection_is_retried_once_on_another_service() -> None:
    async with http_stub(answering(200, COMPLETION)) as up, door(closed_port(), up.url) as d:
        answers = [await relay(d, b'{"model": "m"}') for _ in range(4)]
    assert [c.status for c in answers] == [200] * 4
    assert {c.headers[b"x-gateway-service-id"] for c in answers} == {b"2"}
    assert len(up.seen) == 4


async def test_two_refusals_are_a_502() -> None:
    async with door(closed_port(), closed_port()) as d:
        with pytest.raises(UpstreamFailed) as raised:
            await relay(d, b'{"model": "m"}')
    assert raised.value.status_code == 502
    assert "unreachable" in raised.value.detail


@pytest.mark.parametrize(
    ("status", "body", "expected", "message"),
    [
        (400, {"error": {"message": "max_tokens is too large", "type": "BadRequestError"}}, 400,
         "max_tokens is too large"),
        (422, {"object": "error", "message": "bad field", "type": "invalid"}, 422, "bad field"),
        (401, {"error": "Unauthorized"}, 502, "Unauthorized"),
        (500, b"Internal Server Error", 500, "Internal Server Error"),
    ],
)  # fmt: skip
async def test_vllms_errors_pass_with_its_status_and_message(
    status: int, body: Any, expected: int, message: str
) -> None:
    async with http_stub(answering(status, body)) as up, door(up.url) as d:
        with pytest.raises(UpstreamAnswer) as raised:
            await relay(d, b'{"model": "m"}')
    assert raised.value.status_code == expected
    assert raised.value.detail == message


async def test_a_stream_is_relayed_chunk_by_chunk() -> None:
    chunks = [b'data: {"n": 1}\n\n', b'data: {"n": 2}\n\n', b"data: [DONE]\n\n"]
    go_on = asyncio.Event()

    async def stream(seen: Seen, writer: asyncio.StreamWriter) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        for i, chunk in enumerate(chunks):
            writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            await writer.drain()
            if i == 0:
                await go_on.wait()  # the first chunk must reach the client alone
        writer.write(b"0\r\n\r\n")

    async with http_stub(stream) as up, door(up.url) as d:
        client = Client()
        task = asyncio.create_task(
            d.forward(
                CALLER,
                "m",
                "/v1/chat/completions",
                RequestBody(b'{"model":"m"}'),
                d.vllm.limits.lease(),
                client.receive,
                client.send,
            )
        )
        await poll(lambda: _value(len(client.messages)), lambda n: n >= 2, interval=0.01)
        assert cast(dict[str, Any], client.messages[1])["body"] == chunks[0]
        go_on.set()
        await asyncio.wait_for(task, 5)
    assert client.headers[b"content-type"].startswith(b"text/event-stream")
    assert client.body == b"".join(chunks)


async def test_the_upstream_is_asked_at_the_path_of_the_route() -> None:
    async with http_stub(answering(200, {"object": "list", "data": []})) as up, door(up.url) as d:
        await relay(d, b'{"model":"m","input":"x"}', "/v1/embeddings")
    assert up.paths() == ["/v1/embeddings"]


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


def running(job_id: int, user: str, tenant: str, port: int, **meta: Any) -> dict[str, Any]:
    """A running vLLM job of ``user``/``tenant`` with its endpoint published."""
    comment = f"{tests.vllm_blob(user, tenant, meta.pop('model', 'm'), **meta)}|phase=running"
    return {**tests.job(job_id, f"{comment}|endpoint=node1:{port}"), "user_name": user}


def tenant(name: str, user: str) -> Principal:
    return Principal(tenant=name, slurm_user=user, role=Role.USER, method=Method.KEY)


ALICE, BOB, CAROL = tenant("team-a", "alice"), tenant("team-b", "bob"), tenant("team-c", "carol")


@contextlib.asynccontextmanager
async def slurm_with(httpx_mock: HTTPXMock, *jobs: dict[str, Any]) -> Any:
    """A ServiceManager whose Slurm lists ``jobs`` (tests/unit/test_services.py's)."""
    httpx_mock.add_response(
        url=f"{tests.URL}/slurm/v0.0.42/ping", json=tests.PING, is_reusable=True
    )
    tests.mock_node(httpx_mock)
    httpx_mock.add_response(url=tests.JOBS, json={"jobs": list(jobs)}, is_reusable=True)
    services = tests.manager()
    try:
        yield services
    finally:
        await services.prober.aclose()
        await services.slurm.aclose()


async def picked(r: ModelRouter, principal: Principal, model: str = "m", n: int = 6) -> set[str]:
    return {(await r.pick(principal, model)).id for _ in range(n)}


async def test_a_shared_service_takes_every_tenants_requests_an_unshared_one_its_own(
    httpx_mock: HTTPXMock,
) -> None:
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
        services = await stack.enter_async_context(slurm_with(httpx_mock, *jobs))
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


async def test_a_service_being_stopped_takes_no_more_requests(httpx_mock: HTTPXMock) -> None:
    during: list[set[str]] = []

    async with contextlib.AsyncExitStack() as stack:
        ports = [
            (await stack.enter_async_context(http_stub(vllm_answer, tests.NODE_ADDRESS))).port
            for _ in range(2)
        ]
        jobs = [running(1, "alice", "team-a", ports[0]), running(2, "alice", "team-a", ports[1])]
        httpx_mock.add_response(url=f"{tests.URL}/slurm/v0.0.42/ping", json=tests.PING)
        tests.mock_node(httpx_mock)
        httpx_mock.add_response(url=tests.JOBS, json={"jobs": jobs})
        services = tests.manager()
        stack.push_async_callback(services.slurm.aclose)
        stack.push_async_callback(services.prober.aclose)
        r = ModelRouter(services)

        async def cancel(request: httpx.Request) -> httpx.Response:
            # While Slurm is being asked: the router already passes it over.
            during.append(await picked(r, ALICE))
            return httpx.Response(200, json={})

        httpx_mock.add_callback(cancel, url=f"{tests.URL}/slurm/v0.0.42/job/1", method="DELETE")
        # Slurm ends it; the view shows it cancelled from then on.
        ended = [{**jobs[0], "job_state": ["CANCELLED"]}, jobs[1]]
        httpx_mock.add_response(
            url=tests.JOBS,
            json={"jobs": ended, "last_update": {"set": True, "number": 9}},
            is_reusable=True,
        )
        assert await picked(r, ALICE) == {"1", "2"}
        stopped, _ = await services.stop("1", tests.ADMIN)
        assert stopped.status is ServiceStatus.CANCELLED
        assert during == [{"2"}]
        assert await picked(r, ALICE) == {"2"}


async def test_a_stop_slurm_refused_leaves_the_service_taking_requests(
    httpx_mock: HTTPXMock,
) -> None:
    async with http_stub(vllm_answer, tests.NODE_ADDRESS) as up:
        job = running(1, "alice", "team-a", up.port)
        async with slurm_with(httpx_mock, job) as services:
            httpx_mock.add_response(
                url=f"{tests.URL}/slurm/v0.0.42/job/1",
                method="DELETE",
                status_code=403,
                json={"errors": [{"error": "Access denied", "error_number": 1}]},
            )
            r = ModelRouter(services)
            assert await picked(r, ALICE) == {"1"}
            with pytest.raises(SlurmError):
                await services.stop("1", tests.ADMIN)
            assert await picked(r, ALICE) == {"1"}

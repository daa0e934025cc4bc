"""Client failures a real slurmrestd cannot be made to produce on demand."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import httpx
import msgspec
import pytest
from pytest_httpx import HTTPXMock

from gateway.slurm import (
    SUPPORTED_VERSIONS,
    Credentials,
    MintedTokens,
    NodeInfo,
    SlurmAuthError,
    SlurmClient,
    SlurmError,
    SlurmNodeNotFound,
    SlurmRequestRejected,
    SlurmUnavailable,
    SlurmUnexpectedResponse,
    SlurmVersionUnsupported,
)
from gateway.slurm.adapters import adapter_for
from tests.support.http_stub import Seen, http_stub, response
from tests.support.polling import free_port

URL = "http://slurmrestd.test:6820"
E = TypeVar("E", bound=Exception)
# The newest version the gateway speaks, and the one after it.
NEWEST, NEXT = SUPPORTED_VERSIONS[0], SUPPORTED_VERSIONS[1]
PING_42 = {
    "pings": [{"hostname": "n1", "pinged": "UP", "responding": True, "latency": 10}],
    "meta": {"slurm": {"release": "24.11.5"}},
    "errors": [],
    "warnings": [],
}
PING_38 = {
    "meta": {"Slurm": {"release": "22.05.8"}},
    "errors": [],
    "pings": [{"hostname": "n1", "ping": "UP", "status": 0, "mode": "primary"}],
}
# How 22.05 (v0.0.38) refuses an expired or forged token.
REFUSED_38 = {
    "errors": [
        {
            "description": "slurmctld config is unable to load",
            "error_number": -1,
            "error": "Unspecified error",
            "source": "slurm_load_ctl_conf",
        }
    ]
}


def make_client(version: str | None = "v0.0.42") -> SlurmClient:
    return SlurmClient(
        URL,
        MintedTokens(b"k" * 32, "gwuser"),
        api_version=version,
        timeout=1,
        transport=httpx.AsyncHTTPTransport(),  # the one pytest-httpx answers
    )


def negotiated(httpx_mock: HTTPXMock) -> SlurmClient:
    """A client pinned to v0.0.42 whose one-off version probe is answered."""
    httpx_mock.add_response(url=f"{URL}/slurm/v0.0.42/ping", json=PING_42)
    return make_client()


async def raised(
    httpx_mock: HTTPXMock,
    expected: type[E],
    call: Callable[[SlurmClient], Awaitable[object]],
    *,
    match: str | None = None,
    **answer: Any,
) -> E:
    """The error ``call`` raises when slurmrestd gives ``answer`` (add_response's arguments)."""
    client = negotiated(httpx_mock)
    httpx_mock.add_response(**answer)
    async with client:
        with pytest.raises(expected, match=match) as info:
            await call(client)
    return info.value


async def test_negotiation_takes_newest_served_version(httpx_mock: HTTPXMock) -> None:
    for version in ("v0.0.45", "v0.0.44", "v0.0.43"):
        httpx_mock.add_response(url=f"{URL}/slurm/{version}/ping", status_code=404)
    httpx_mock.add_response(url=f"{URL}/slurm/v0.0.42/ping", json=PING_42, is_reusable=True)
    async with make_client(None) as client:
        pings = await client.ping()
        assert client.api_version == "v0.0.42"
        assert pings[0].slurm_release == "24.11.5"
        await client.ping()  # negotiated once: no more 404 probes
    assert len(httpx_mock.get_requests(url=f"{URL}/slurm/v0.0.45/ping")) == 1


async def test_no_common_version(httpx_mock: HTTPXMock) -> None:
    httpx_mock.add_response(status_code=404, is_reusable=True)
    async with make_client(None) as client:
        with pytest.raises(SlurmVersionUnsupported, match="serves none of"):
            await client.ping()


async def test_pinned_version_not_served(httpx_mock: HTTPXMock) -> None:
    httpx_mock.add_response(status_code=404)
    async with make_client("v0.0.40") as client:
        with pytest.raises(SlurmVersionUnsupported, match=r"pinned API version v0\.0\.40"):
            await client.ping()


def test_pinning_an_unknown_version_fails_at_once() -> None:
    with pytest.raises(ValueError, match="unsupported slurmrestd API version"):
        make_client("v0.0.37")


async def test_timeout_is_unavailable(httpx_mock: HTTPXMock) -> None:
    client = negotiated(httpx_mock)
    httpx_mock.add_exception(httpx.ReadTimeout("slow"), is_reusable=True)
    async with client:
        with pytest.raises(SlurmUnavailable, match="did not answer"):
            await client.get_job(1)


async def test_closed_port_is_unavailable() -> None:
    client = SlurmClient(f"http://127.0.0.1:{free_port()}", MintedTokens(b"k" * 32, "u"))
    async with client:
        with pytest.raises(SlurmUnavailable, match="unreachable"):
            await client.ping()


@pytest.mark.httpx_mock(assert_all_requests_were_expected=False)
async def test_gateway_error_from_a_proxy_is_unavailable(httpx_mock: HTTPXMock) -> None:
    await raised(
        httpx_mock,
        SlurmUnavailable,
        lambda c: c.list_jobs(),
        status_code=503,
        text="<html>upstream down</html>",
    )


async def test_non_json_body_is_unexpected(httpx_mock: HTTPXMock) -> None:
    await raised(
        httpx_mock,
        SlurmUnexpectedResponse,
        lambda c: c.list_jobs(),
        match="not JSON",
        status_code=200,
        text="<html>not slurm</html>",
    )


async def test_wrong_shape_is_unexpected_not_keyerror(httpx_mock: HTTPXMock) -> None:
    await raised(
        httpx_mock,
        SlurmUnexpectedResponse,
        lambda c: c.get_job(7),
        match=r"\$\.job_id",
        json={"jobs": [{"job_id": "seven"}], "errors": []},
    )


async def test_one_unreadable_job_never_fails_a_listing(httpx_mock: HTTPXMock) -> None:
    # Any cluster user's job is in the listing: odd bytes, shapes, times or
    # output patterns in one of them leave it out, and only it.
    client = negotiated(httpx_mock)
    good = {"job_id": 8, "job_state": ["RUNNING"], "standard_output": "/o/%50000000j"}
    body = (
        b'{"jobs": [{"job_id": 1, "comment": "\xff"}, {"job_id": "seven"}, '
        b'{"job_id": 3, "begin_time": {"set": true, "number": 99999999999999}, '
        b'"start_time": {"set": true, "number": 99999999999999}}, '
        + msgspec.json.encode(good)
        + b'], "errors": []}'
    )
    httpx_mock.add_response(content=body)
    async with client:
        listing = await client.list_jobs()
    assert [j.job_id for j in listing.jobs] == [3, 8]
    assert listing.jobs[0].start_time is None
    assert listing.jobs[1].standard_output == "/o/" + "8".zfill(10)
    assert listing.unreadable == 2


async def test_errors_on_http_200_are_raised(httpx_mock: HTTPXMock) -> None:
    body = {"errors": [{"error_number": 2002, "error": "Access/permission denied"}]}
    error = await raised(
        httpx_mock,
        SlurmRequestRejected,
        lambda c: c.update_comment(5, "x"),
        match="permission denied",
        status_code=200,
        json=body,
    )
    assert error.error_numbers == (2002,)


async def test_plain_401_is_auth_error(httpx_mock: HTTPXMock) -> None:
    await raised(
        httpx_mock,
        SlurmAuthError,
        lambda c: c.list_jobs(),
        status_code=401,
        text="Authentication failure",
    )


async def test_cancel_status_error_is_raised_even_on_200(httpx_mock: HTTPXMock) -> None:
    body = {
        "status": [{"error": {"string": "Job can not be altered now", "code": 2020}}],
        "errors": [],
    }
    await raised(
        httpx_mock,
        SlurmRequestRejected,
        lambda c: c.cancel(7, "SIGUSR1"),
        match="can not be altered",
        json=body,
    )


async def test_slurmctld_down_behind_slurmrestd_is_unavailable(httpx_mock: HTTPXMock) -> None:
    body = {"errors": [{"error_number": 1001, "error": "Unable to contact slurm controller"}]}
    await raised(
        httpx_mock,
        SlurmUnavailable,
        lambda c: c.list_jobs(),
        match="contact slurm controller",
        status_code=500,
        json=body,
    )


async def test_credentials_never_leak_into_errors(httpx_mock: HTTPXMock) -> None:
    error = await raised(
        httpx_mock,
        SlurmAuthError,
        lambda c: c.list_jobs(),
        status_code=500,
        json={"errors": [{"error_number": 1007}]},
    )
    sent = httpx_mock.get_requests()[-1]
    assert sent is not None
    token = sent.headers["X-SLURM-USER-TOKEN"]
    assert token not in str(error)
    assert token not in repr(error)


# -- negotiation only settles on a successful ping ------------------------------


def ping_url(version: str) -> str:
    return f"{URL}/slurm/{version}/ping"


async def test_negotiation_after_a_503_tries_again_on_the_next_call(
    httpx_mock: HTTPXMock,
) -> None:
    httpx_mock.add_response(url=ping_url(NEWEST), status_code=503, text="<html>starting</html>")
    httpx_mock.add_response(url=ping_url(NEWEST), json=PING_42, is_reusable=True)
    async with make_client(None) as client:
        with pytest.raises(SlurmUnavailable, match="HTTP 503"):
            await client.ping()
        assert client.api_version is None  # nothing remembered
        pings = await client.ping()
        assert client.api_version == NEWEST
        assert pings[0].responding
    # The 503 was not taken for "not served": no older version was probed.
    assert not httpx_mock.get_requests(url=ping_url(NEXT))
    assert len(httpx_mock.get_requests(url=ping_url(NEWEST))) == 3


async def test_negotiation_falls_back_when_the_newest_answers_404(httpx_mock: HTTPXMock) -> None:
    httpx_mock.add_response(url=ping_url(NEWEST), status_code=404)
    httpx_mock.add_response(url=ping_url(NEXT), json=PING_42)
    node = {"nodes": [{"name": "n1", "hostname": "vm", "address": "10.0.0.1"}], "errors": []}
    httpx_mock.add_response(url=f"{URL}/slurm/{NEXT}/node/n1", json=node)
    async with make_client(None) as client:
        assert await client.get_node("n1") == NodeInfo(name="n1", hostname="vm", address="10.0.0.1")
        assert client.api_version == NEXT


@pytest.mark.parametrize("status", [500, 502, 504])
async def test_negotiation_failure_is_raised_typed_not_cached(
    httpx_mock: HTTPXMock, status: int
) -> None:
    body = {"errors": [{"error_number": 1001, "error": "Unable to contact slurm controller"}]}
    httpx_mock.add_response(url=ping_url(NEWEST), status_code=status, json=body)
    httpx_mock.add_response(url=ping_url(NEWEST), json=PING_42, is_reusable=True)
    async with make_client(None) as client:
        with pytest.raises(SlurmUnavailable):
            await client.ping()
        await client.ping()
        assert client.api_version == NEWEST


async def test_negotiation_with_refused_credentials_is_auth_error(httpx_mock: HTTPXMock) -> None:
    httpx_mock.add_response(url=ping_url(NEWEST), status_code=401, text="Authentication failure")
    httpx_mock.add_response(url=ping_url(NEWEST), json=PING_42, is_reusable=True)
    async with make_client(None) as client:
        with pytest.raises(SlurmAuthError):
            await client.ping()
        assert client.api_version is None
        await client.ping()
        assert client.api_version == NEWEST


async def test_negotiation_with_v0_0_38_token_refusal_is_auth_error(httpx_mock: HTTPXMock) -> None:
    for version in SUPPORTED_VERSIONS[:-1]:
        httpx_mock.add_response(url=ping_url(version), status_code=404, is_reusable=True)
    httpx_mock.add_response(url=ping_url("v0.0.38"), status_code=500, json=REFUSED_38)
    httpx_mock.add_response(url=ping_url("v0.0.38"), json=PING_38, is_reusable=True)
    async with make_client(None) as client:
        with pytest.raises(SlurmAuthError, match="token was rejected"):
            await client.ping()
        assert client.api_version is None
        pings = await client.ping()
        assert client.api_version == "v0.0.38"
        assert pings[0].slurm_release == "22.05.8"


async def test_negotiation_refuses_a_body_that_is_no_ping(httpx_mock: HTTPXMock) -> None:
    httpx_mock.add_response(url=ping_url("v0.0.42"), text="<html>login portal</html>")
    httpx_mock.add_response(url=ping_url("v0.0.42"), json={"pings": "?"})
    async with make_client() as client:
        with pytest.raises(SlurmUnexpectedResponse, match="not JSON"):
            await client.ping()
        with pytest.raises(SlurmUnexpectedResponse, match="cannot read"):
            await client.ping()
        assert client.api_version is None


async def test_negotiation_refuses_a_ping_without_controllers(httpx_mock: HTTPXMock) -> None:
    httpx_mock.add_response(url=ping_url(NEWEST), json={"status": "ok"})
    httpx_mock.add_response(url=ping_url(NEWEST), json=PING_42, is_reusable=True)
    async with make_client(None) as client:
        with pytest.raises(SlurmUnexpectedResponse, match="no controller"):
            await client.ping()
        assert client.api_version is None
        await client.ping()
        assert client.api_version == NEWEST


async def test_pinned_version_failing_is_not_unsupported(httpx_mock: HTTPXMock) -> None:
    httpx_mock.add_response(url=ping_url("v0.0.40"), status_code=503)
    async with make_client("v0.0.40") as client:
        with pytest.raises(SlurmUnavailable):
            await client.ping()
        assert client.api_version is None


# -- node lookup -----------------------------------------------------------------


async def test_get_node(httpx_mock: HTTPXMock) -> None:
    client = negotiated(httpx_mock)
    body = {
        "nodes": [{"name": "gpu-01", "hostname": "gpu-01.lan", "address": "10.1.2.3"}],
        "last_update": {"set": True, "infinite": False, "number": 1795828827},
        "errors": [],
        "warnings": [],
    }
    httpx_mock.add_response(url=f"{URL}/slurm/v0.0.42/node/gpu-01", json=body)
    async with client:
        node = await client.get_node("gpu-01")
    assert node == NodeInfo(name="gpu-01", hostname="gpu-01.lan", address="10.1.2.3")


async def test_get_unknown_node_on_v0_0_42(httpx_mock: HTTPXMock) -> None:
    client = negotiated(httpx_mock)
    body = {
        "errors": [
            {
                "description": "Failure to query node nope",
                "error_number": 0,
                "error": "No error",
                "source": "_dump_nodes",
            }
        ],
        "warnings": [],
    }
    httpx_mock.add_response(url=f"{URL}/slurm/v0.0.42/node/nope", json=body)
    async with client:
        with pytest.raises(SlurmNodeNotFound, match="nope"):
            await client.get_node("nope")


async def test_get_unknown_node_on_v0_0_38(httpx_mock: HTTPXMock) -> None:
    httpx_mock.add_response(url=ping_url("v0.0.38"), json=PING_38)
    body = {"errors": [{"error": "Invalid node name specified", "errno": 2018}], "nodes": []}
    httpx_mock.add_response(url=f"{URL}/slurm/v0.0.38/node/nope", status_code=500, json=body)
    async with make_client("v0.0.38") as client:
        with pytest.raises(SlurmNodeNotFound) as info:
            await client.get_node("nope")
    assert info.value.error_numbers == (2018,)


@pytest.mark.parametrize("name", ["", "..", "a/b", "n1?flags=ALL", "n 1", "x" * 256])
async def test_unsafe_node_name_is_refused_before_any_request(
    httpx_mock: HTTPXMock, name: str
) -> None:
    async with make_client(None) as client:
        with pytest.raises(ValueError, match="invalid node name"):
            await client.get_node(name)
    assert httpx_mock.get_requests() == []


# -- a bounded number of calls in flight ---------------------------------------


class SlowSlurmrestd:
    """Answers pings of v0.0.42; fast until ``slow`` is set, then after ``delay``
    seconds (or once ``release`` is set), counting the requests it holds at once."""

    def __init__(self, delay: float = 2.0) -> None:
        self.delay = delay
        self.slow = False
        self.release = asyncio.Event()
        self.holding = asyncio.Event()
        self.in_flight = 0
        self.most = 0

    async def answer(self, seen: Seen, writer: asyncio.StreamWriter) -> None:
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        try:
            if self.slow:
                self.holding.set()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.release.wait(), self.delay)
            writer.write(response(200, PING_42))
        finally:
            self.in_flight -= 1


def stub_client(
    url: str, version: str, *, max_concurrency: int = 16, queue_timeout: float = 2.0
) -> SlurmClient:
    """A client of a stub slurmrestd, pinned to ``version``."""
    tokens = MintedTokens(b"k" * 32, "gwuser")
    return SlurmClient(
        url,
        tokens,
        api_version=version,
        max_concurrency=max_concurrency,
        queue_timeout=queue_timeout,
    )


async def timed(call: Awaitable[object]) -> tuple[object, float]:
    """What the call returned or raised, and how long it took."""
    started = time.monotonic()
    try:
        result = await call
    except Exception as exc:
        result = exc
    return result, time.monotonic() - started


async def test_calls_beyond_the_bound_fail_fast_as_busy() -> None:
    slurmrestd = SlowSlurmrestd(delay=2.0)
    async with http_stub(slurmrestd.answer) as stub:
        client = stub_client(stub.url, "v0.0.42", max_concurrency=2, queue_timeout=0.2)
        async with client:
            await client.ping()  # negotiated while slurmrestd is fast
            slurmrestd.slow = True
            sent_before = len(stub.seen)
            results = await asyncio.gather(*(timed(client.ping()) for _ in range(10)))
    answered = [t for r, t in results if isinstance(r, list)]
    busy = [(r, t) for r, t in results if isinstance(r, SlurmUnavailable)]
    assert len(answered) == 2, results
    assert len(busy) == 8, results
    assert all("slurmrestd is busy: 2 calls in flight" in str(r) for r, _ in busy)
    assert max(t for _, t in busy) < 0.5, busy  # queue_timeout 0.2, not the 2 s answer
    assert min(answered) >= 1.9  # the stub's 2 s
    assert slurmrestd.most == 2
    assert len(stub.seen) - sent_before == 2  # the busy calls were never sent


async def test_views_made_by_as_user_share_the_bound() -> None:
    slurmrestd = SlowSlurmrestd(delay=5.0)
    async with http_stub(slurmrestd.answer) as stub:
        client = stub_client(stub.url, "v0.0.42", max_concurrency=1, queue_timeout=0.1)
        caller = client.as_user(Credentials(user_name="alice", token="t"))
        async with client:
            await client.ping()
            slurmrestd.slow = True
            held = asyncio.create_task(client.ping())
            await asyncio.wait_for(slurmrestd.holding.wait(), 5)
            with pytest.raises(SlurmUnavailable, match="busy"):
                await caller.ping()
            slurmrestd.release.set()
            await held
            # A slot freed is a slot for either.
            assert (await caller.ping())[0].responding
        assert slurmrestd.most == 1


# -- a refusal that is really an unreachable slurmctld ------------------------------

EPERM_CANCEL = {"errors": [{"error_number": 1, "error": "Operation not permitted"}]}
V38_REFUSED = {"errors": [{"error_code": -1, "error": "Unspecified error"}]}


def outage_stub(
    refusal: bytes, *, ping: bytes = b"", delay: float = 0.0
) -> Callable[[Seen, asyncio.StreamWriter], Awaitable[None]]:
    """A slurmrestd that refuses every call but pings (``ping`` answers them)."""

    async def answer(seen: Seen, writer: asyncio.StreamWriter) -> None:
        if seen.path.endswith("/ping") and ping:
            writer.write(ping)
            return
        await asyncio.sleep(delay)
        writer.write(refusal)

    return answer


def ping_answer(responding: bool) -> bytes:
    return response(200, {**PING_42, "pings": [{"hostname": "c", "responding": responding}]})


@pytest.mark.parametrize(
    ("ping", "expected"),
    [
        # 24.11/26.05 answer a cancel sent to an unreachable slurmctld with EPERM.
        (ping_answer(False), SlurmUnavailable),
        # slurmctld answers: EPERM is a refusal (someone else's job).
        (ping_answer(True), SlurmRequestRejected),
        # A ping that fails proves nothing: the refusal stands.
        (response(503, b"busy", "text/plain"), SlurmRequestRejected),
    ],
)
async def test_eperm_is_an_outage_only_when_no_controller_responds(
    ping: bytes, expected: type[SlurmError]
) -> None:
    async with (
        http_stub(outage_stub(response(500, EPERM_CANCEL), ping=ping)) as stub,
        stub_client(stub.url, "v0.0.42") as client,
    ):
        client._negotiated.adapter = adapter_for("v0.0.42")  # no negotiation round
        with pytest.raises(SlurmError) as info:
            await client.cancel(7)
    assert type(info.value) is expected, info.value


@pytest.mark.parametrize(("delay", "expected"), [(0.0, SlurmAuthError), (2.3, SlurmUnavailable)])
async def test_v0_0_38_refusal_is_an_outage_when_slurmrestd_took_seconds(
    delay: float, expected: type[SlurmError]
) -> None:
    # 22.05 answers both alike; a refused token comes at once, an unreachable
    # slurmctld after slurmrestd's connection retries.
    async with (
        http_stub(outage_stub(response(500, V38_REFUSED), delay=delay)) as stub,
        stub_client(stub.url, "v0.0.38") as client,
    ):
        client._negotiated.adapter = adapter_for("v0.0.38")
        with pytest.raises(SlurmError) as info:
            await client.list_jobs()
    assert type(info.value) is expected, info.value

"""Client failures a real slurmrestd cannot be made to produce on demand."""

from __future__ import annotations

import httpx
import pytest
from pytest_httpx import HTTPXMock

from gateway.slurm import (
    MintedTokens,
    SlurmAuthError,
    SlurmClient,
    SlurmRequestRejected,
    SlurmUnavailable,
    SlurmUnexpectedResponse,
    SlurmVersionUnsupported,
)
from tests.conftest import free_port

URL = "http://slurmrestd.test:6820"
PING_42 = {
    "pings": [{"hostname": "n1", "pinged": "UP", "responding": True, "latency": 10}],
    "meta": {"slurm": {"release": "24.11.5"}},
    "errors": [],
    "warnings": [],
}


def make_client(version: str | None = "v0.0.42") -> SlurmClient:
    return SlurmClient(URL, MintedTokens(b"k" * 32, "gwuser"), api_version=version, timeout=1)


def negotiated(httpx_mock: HTTPXMock) -> SlurmClient:
    """A client pinned to v0.0.42 whose one-off version probe is answered."""
    httpx_mock.add_response(url=f"{URL}/slurm/v0.0.42/ping", json=PING_42)
    return make_client()


async def test_negotiation_takes_newest_served_version(httpx_mock: HTTPXMock) -> None:
    httpx_mock.add_response(url=f"{URL}/slurm/v0.0.44/ping", status_code=404)
    httpx_mock.add_response(url=f"{URL}/slurm/v0.0.43/ping", status_code=404)
    httpx_mock.add_response(url=f"{URL}/slurm/v0.0.42/ping", json=PING_42, is_reusable=True)
    async with make_client(None) as client:
        pings = await client.ping()
        assert client.api_version == "v0.0.42"
        assert pings[0].slurm_release == "24.11.5"
        await client.ping()  # negotiated once: no more 404 probes
    assert len(httpx_mock.get_requests(url=f"{URL}/slurm/v0.0.44/ping")) == 1


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
    client = negotiated(httpx_mock)
    httpx_mock.add_response(status_code=503, text="<html>upstream down</html>")
    async with client:
        with pytest.raises(SlurmUnavailable):
            await client.list_jobs()


async def test_non_json_body_is_unexpected(httpx_mock: HTTPXMock) -> None:
    client = negotiated(httpx_mock)
    httpx_mock.add_response(status_code=200, text="<html>not slurm</html>")
    async with client:
        with pytest.raises(SlurmUnexpectedResponse, match="not JSON"):
            await client.list_jobs()


async def test_wrong_shape_is_unexpected_not_keyerror(httpx_mock: HTTPXMock) -> None:
    client = negotiated(httpx_mock)
    httpx_mock.add_response(json={"jobs": [{"job_id": "seven"}], "errors": []})
    async with client:
        with pytest.raises(SlurmUnexpectedResponse, match=r"\$\.jobs\[0\]\.job_id"):
            await client.list_jobs()


async def test_errors_on_http_200_are_raised(httpx_mock: HTTPXMock) -> None:
    client = negotiated(httpx_mock)
    body = {"errors": [{"error_number": 2002, "error": "Access/permission denied"}]}
    httpx_mock.add_response(status_code=200, json=body)
    async with client:
        with pytest.raises(SlurmRequestRejected, match="permission denied") as info:
            await client.update_comment(5, "x")
    assert info.value.error_numbers == (2002,)


async def test_plain_401_is_auth_error(httpx_mock: HTTPXMock) -> None:
    client = negotiated(httpx_mock)
    httpx_mock.add_response(status_code=401, text="Authentication failure")
    async with client:
        with pytest.raises(SlurmAuthError):
            await client.list_jobs()


async def test_cancel_status_error_is_raised_even_on_200(httpx_mock: HTTPXMock) -> None:
    client = negotiated(httpx_mock)
    body = {
        "status": [{"error": {"string": "Job can not be altered now", "code": 2020}}],
        "errors": [],
    }
    httpx_mock.add_response(json=body)
    async with client:
        with pytest.raises(SlurmRequestRejected, match="can not be altered"):
            await client.cancel(7, "SIGUSR1")


async def test_slurmctld_down_behind_slurmrestd_is_unavailable(httpx_mock: HTTPXMock) -> None:
    client = negotiated(httpx_mock)
    body = {"errors": [{"error_number": 1001, "error": "Unable to contact slurm controller"}]}
    httpx_mock.add_response(status_code=500, json=body)
    async with client:
        with pytest.raises(SlurmUnavailable, match="contact slurm controller"):
            await client.list_jobs()


async def test_credentials_never_leak_into_errors(httpx_mock: HTTPXMock) -> None:
    client = negotiated(httpx_mock)
    httpx_mock.add_response(status_code=500, json={"errors": [{"error_number": 1007}]})
    async with client:
        with pytest.raises(SlurmAuthError) as info:
            await client.list_jobs()
    sent = httpx_mock.get_requests()[-1]
    assert sent is not None
    token = sent.headers["X-SLURM-USER-TOKEN"]
    assert token not in str(info.value)
    assert token not in repr(info.value)

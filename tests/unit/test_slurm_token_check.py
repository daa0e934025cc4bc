"""A caller's own Slurm token when the gateway holds no key: slurmrestd judges
it, and 24.11 and later answer a refused token's ping with 200 and no
controller responding (the recorded answers of tests/fixtures/slurmrestd)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import jwt
import pytest
from pytest_httpx import HTTPXMock

from gateway.auth.authenticate import Authenticator
from gateway.auth.budget import KNOWN_FOR, CheckBudget, ChecksBusy, TooManyChecks, client_key
from gateway.core.errors import Unauthenticated
from gateway.settings import load_settings
from gateway.slurm import SlurmClient, SlurmUnavailable, StaticToken

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "slurmrestd" / "24.11.5" / "v0.0.42"
URL = "http://slurmrestd.test"
PING = f"{URL}/slurm/v0.0.42/ping"


def recorded(name: str) -> tuple[int, bytes]:
    answer = json.loads((FIXTURES / f"{name}.json").read_text())
    return answer["status"], answer["body"].encode()


def token(user: str, key: bytes, *, exp: float | None = None) -> str:
    expires = exp if exp is not None else time.time() + 600
    return jwt.encode({"sun": user, "exp": int(expires)}, key, algorithm="HS256")


async def authenticator() -> tuple[Authenticator, SlurmClient]:
    settings = load_settings(
        {
            "GATEWAY_SLURM_URL": URL,
            "GATEWAY_SLURM_API_VERSION": "v0.0.42",
            "GATEWAY_SLURM_AUTH": "static",
            "GATEWAY_SLURM_TOKEN": token("gwuser", b"the cluster key, thirty-two bytes"),
            "GATEWAY_SECRET": "s" * 32,
            "GATEWAY_AUTH_SLURM_TOKENS": "true",
        }
    )
    auth = Authenticator(settings)
    slurm = SlurmClient(
        URL,
        StaticToken(value=settings.slurm_token),
        api_version="v0.0.42",
        transport=httpx.AsyncHTTPTransport(),  # the one pytest-httpx answers
    )
    auth.bind(slurm)
    return auth, slurm


def answer_pings(httpx_mock: HTTPXMock, caller: str, own: str) -> None:
    """Pings carrying the caller's user get ``caller``'s recorded answer."""

    def respond(request: httpx.Request) -> httpx.Response:
        name = caller if request.headers["X-SLURM-USER-NAME"] == "alice" else own
        status, body = recorded(name)
        return httpx.Response(status, content=body)

    httpx_mock.add_callback(respond, url=PING, is_reusable=True)


async def test_a_forged_token_is_refused_though_the_ping_answers_200(
    httpx_mock: HTTPXMock,
) -> None:
    answer_pings(httpx_mock, caller="ping_forged_token", own="ping")
    auth, slurm = await authenticator()
    forged = token("alice", b"not the cluster key, 32 bytes long")
    with pytest.raises(Unauthenticated, match="refused the Slurm token"):
        await auth.authenticate({"x-slurm-user-token": forged})
    await slurm.aclose()


async def test_an_accepted_token_makes_the_caller(httpx_mock: HTTPXMock) -> None:
    answer_pings(httpx_mock, caller="ping", own="ping")
    auth, slurm = await authenticator()
    principal = await auth.authenticate({"x-slurm-user-token": token("alice", b"k" * 32)})
    assert (principal.tenant, principal.slurm_user) == ("alice", "alice")
    assert principal.credentials is not None
    await slurm.aclose()


async def test_an_expired_token_is_refused_without_asking_slurm(httpx_mock: HTTPXMock) -> None:
    auth, slurm = await authenticator()
    expired = token("alice", b"k" * 32, exp=time.time() - 3600)
    with pytest.raises(Unauthenticated, match="expired"):
        await auth.authenticate({"x-slurm-user-token": expired})
    assert httpx_mock.get_requests() == []
    await slurm.aclose()


async def test_no_controller_for_anyone_is_an_outage_not_a_refusal(
    httpx_mock: HTTPXMock,
) -> None:
    # slurmctld down: the gateway's own ping finds no controller either.
    answer_pings(httpx_mock, caller="ping_forged_token", own="ping_forged_token")
    auth, slurm = await authenticator()
    with pytest.raises(SlurmUnavailable):
        await auth.authenticate({"x-slurm-user-token": token("alice", b"k" * 32)})
    await slurm.aclose()


async def test_root_is_never_acted_as(httpx_mock: HTTPXMock) -> None:
    answer_pings(httpx_mock, caller="ping", own="ping")
    auth, slurm = await authenticator()
    from gateway.core.errors import Forbidden

    with pytest.raises(Forbidden, match="GATEWAY_DENIED_SLURM_USERS"):
        await auth.authenticate({"x-slurm-user-token": token("root", b"k" * 32)})
    await slurm.aclose()


# -- the budget of checks slurmctld pays for (gateway/auth/budget.py) ------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def spend_all(budget: CheckBudget, user: str, client: str, n: int) -> list[int]:
    """The status of each of ``n`` checks: 200 when spent, else the refusal's."""
    statuses = []
    for _ in range(n):
        try:
            budget.spend(user, client)
            statuses.append(200)
        except (TooManyChecks, ChecksBusy) as exc:
            retry_after = int((exc.headers or {})["Retry-After"])
            statuses.append(exc.status_code if retry_after >= 1 else 0)
    return statuses


def test_a_client_over_its_budget_gets_429_and_others_do_not() -> None:
    clock = Clock()
    budget = CheckBudget(per_second=5, per_client=1, clock=clock)
    assert spend_all(budget, "mallory", "203.0.113.9", 7) == [200] * 5 + [429] * 2
    clock.now += 1
    # A second later: one more for her, the rest of the replica's for the others.
    assert spend_all(budget, "mallory", "203.0.113.9", 2) == [200, 429]
    assert spend_all(budget, "bob", "198.51.100.1", 4) == [200] * 4
    assert spend_all(budget, "carol", "198.51.100.2", 1) == [503]


def test_the_replicas_budget_is_503_with_retry_after() -> None:
    clock = Clock()
    budget = CheckBudget(per_second=2, per_client=100, clock=clock)
    assert spend_all(budget, "u", "192.0.2.1", 3) == [200, 200, 503]
    with pytest.raises(ChecksBusy) as caught:
        budget.spend("v", "192.0.2.2")
    assert caught.value.headers == {"Retry-After": "1"}


def test_verified_users_have_a_lane_of_their_own() -> None:
    clock = Clock()
    budget = CheckBudget(per_second=5, per_client=1, clock=clock)
    budget.verified("alice")
    # Made-up tokens from many addresses spend the new lane...
    for n in range(10):
        spend_all(budget, f"u{n}", f"203.0.113.{n}", 1)
    assert spend_all(budget, "newcomer", "198.51.100.1", 1) == [503]
    # ...not alice's: her next tokens are checked, 5 at once, then 1 a second.
    assert spend_all(budget, "alice", "198.51.100.7", 5) == [200] * 5
    # Her own lane spent, she falls back to the new one (spent too here).
    assert spend_all(budget, "alice", "198.51.100.7", 1) == [503]
    clock.now += KNOWN_FOR + 1  # a day later she is new again: her client's budget only
    assert spend_all(budget, "alice", "198.51.100.7", 6) == [200] * 5 + [429]


@pytest.mark.parametrize(
    ("address", "key"),
    [
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff::1", "2001:db8:1:2::/64"),
        ("::ffff:192.0.2.7", "192.0.2.7"),
        ("192.0.2.7", "192.0.2.7"),
        (None, "unknown"),
    ],
)
def test_an_ipv6_client_is_one_by_its_64(address: str | None, key: str) -> None:
    assert client_key(address) == key

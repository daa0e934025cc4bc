"""The budget of token checks slurmctld pays for (gateway/auth/budget.py): on
its own, and under a flood of made-up Slurm tokens against the real app, the
gateway holding no cluster key: slurmrestd judges each new token (a ping as its
user), and the flood must not use up the checks genuine tokens need.

slurmrestd is a real HTTP server on 127.0.0.1 answering pings as 24.11 does
(tests/fixtures/slurmrestd): a token signed with the cluster's key is
answered with a responding controller, any other with none.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import jwt
import pytest
from litestar import Litestar

from gateway.app import create_app
from gateway.auth.budget import KNOWN_FOR, CheckBudget, ChecksBusy, TooManyChecks, client_key
from gateway.settings import load_settings
from tests.support.app import stub_settings
from tests.support.clock import Clock
from tests.support.http_stub import Seen, http_stub
from tests.support.recorded import recorded_response

ROOT = Path(__file__).resolve().parents[3]
CLUSTER_KEY = b"the cluster key, thirty-two bytes"
FLOOD_PER_SECOND = 100


def token(user: str, key: bytes = CLUSTER_KEY) -> str:
    # A random jti: every token is new to the gateway, as a fresh scontrol token is.
    claims = {"sun": user, "exp": int(time.time()) + 600, "jti": secrets.token_hex(8)}
    return jwt.encode(claims, key, algorithm="HS256")


async def slurmrestd(seen: Seen, writer: asyncio.StreamWriter) -> None:
    try:
        jwt.decode(seen.headers.get("x-slurm-user-token", ""), CLUSTER_KEY, algorithms=["HS256"])
        writer.write(recorded_response("ping"))
    except jwt.PyJWTError:
        writer.write(recorded_response("ping_forged_token"))


@dataclass
class Gateway:
    app: Litestar
    pings: list[Seen]

    def client(self, address: str) -> httpx.AsyncClient:
        transport = httpx.ASGITransport(app=self.app, client=(address, 40000))  # type: ignore[arg-type]
        return httpx.AsyncClient(transport=transport, base_url="http://gateway.test")


@asynccontextmanager
async def gateway() -> AsyncIterator[Gateway]:
    async with http_stub(slurmrestd) as stub:
        settings = load_settings(
            {
                "GATEWAY_SLURM_URL": stub.url,
                "GATEWAY_SLURM_API_VERSION": "v0.0.42",
                # static: the gateway holds no cluster key, slurmrestd checks tokens
                "GATEWAY_SLURM_AUTH": "static",
                "GATEWAY_SLURM_TOKEN": token("gwuser"),
                "GATEWAY_SECRET": "s" * 32,
                "GATEWAY_AUTH_SLURM_TOKENS": "true",
                "GATEWAY_RECIPES_DIRS": str(ROOT / "recipes"),
            }
        )
        app = create_app(settings)
        async with app.lifespan():
            yield Gateway(app, stub.seen)


async def ask(client: httpx.AsyncClient, slurm_token: str) -> httpx.Response:
    # A route that needs a caller and no Slurm call of its own.
    return await client.get("/api/v1/recipes", headers={"X-SLURM-USER-TOKEN": slurm_token})


async def flood(
    gw: Gateway, addresses: list[str], names: list[str], stop: asyncio.Event
) -> Counter[int]:
    """Made-up tokens (the wrong key) at FLOOD_PER_SECOND, from ``addresses``
    in turn, naming ``names`` in turn; the statuses they got."""
    statuses: Counter[int] = Counter()
    clients = [gw.client(address) for address in addresses]
    sent = 0
    started = time.monotonic()

    async def one(client: httpx.AsyncClient, user: str) -> None:
        answer = await ask(client, token(user, key=b"made up by the attacker, 32 bytes"))
        statuses[answer.status_code] += 1
        if answer.status_code in (429, 503):
            assert int(answer.headers["retry-after"]) >= 1

    tasks = []
    while not stop.is_set():
        tasks.append(
            asyncio.create_task(one(clients[sent % len(clients)], names[sent % len(names)]))
        )
        sent += 1
        await asyncio.sleep(max(0.0, started + sent / FLOOD_PER_SECOND - time.monotonic()))
    await asyncio.gather(*tasks)
    for client in clients:
        await client.aclose()
    return statuses


async def genuine_during_flood(
    gw: Gateway, tries: list[tuple[str, str]], flood_from: list[str], flood_names: list[str]
) -> tuple[list[int], Counter[int], float]:
    """Each (address, user) of ``tries`` sends a fresh genuine token, 0.25 s
    apart, once the flood is under way; their statuses, the flood's, its rate."""
    stop = asyncio.Event()
    started = time.monotonic()
    flooding = asyncio.create_task(flood(gw, flood_from, flood_names, stop))
    await asyncio.sleep(0.5)  # the budgets are spent by now on the code as it was
    statuses = []
    for address, user in tries:
        async with gw.client(address) as client:
            statuses.append((await ask(client, token(user))).status_code)
        await asyncio.sleep(0.25)
    stop.set()
    flooded = await flooding
    return statuses, flooded, flooded.total() / (time.monotonic() - started)


async def test_a_flood_of_made_up_tokens_from_one_client_locks_out_no_genuine_one() -> None:
    async with gateway() as gw:
        # alice used the gateway before (her token checked out): a user renewing hers.
        async with gw.client("198.51.100.7") as alice:
            assert (await ask(alice, token("alice"))).status_code == 200
        # The attacker names made-up users and alice too.
        names = [f"u{n}" for n in range(50)] + ["alice"] * 50
        tries = [("198.51.100.7", "alice")] * 5 + [
            (f"192.0.2.{n}", f"newuser{n}") for n in range(1, 6)
        ]
        statuses, flooded, rate = await genuine_during_flood(gw, tries, ["203.0.113.66"], names)
    accepted = statuses.count(200)
    print(
        f"\ngenuine tokens accepted during the flood: {accepted}/{len(statuses)} "
        f"(known user {statuses[:5].count(200)}/5, new users {statuses[5:].count(200)}/5); "
        f"flood {flooded.total()} made-up tokens at {rate:.0f}/s from one address: "
        f"{dict(sorted(flooded.items()))}"
    )
    assert statuses == [200] * len(tries), statuses
    assert rate > FLOOD_PER_SECOND / 2  # it was a flood
    # The flooding client is told to slow down; slurmctld was asked about a few of its tokens.
    assert flooded[429] > flooded.total() * 0.8, flooded
    assert flooded[401] < flooded.total() * 0.1, flooded  # its burst, then 1 a second


async def test_a_flood_from_many_addresses_leaves_known_users_their_own_lane() -> None:
    async with gateway() as gw:
        for user in ("alice", "bob"):
            async with gw.client("198.51.100.7") as client:
                assert (await ask(client, token(user))).status_code == 200
        # 100 addresses, made-up users: the new lane's budget is spent...
        flood_from = [f"203.0.113.{n}" for n in range(1, 101)]
        names = [f"u{n}" for n in range(100)]
        tries = [("198.51.100.7", "alice"), ("198.51.100.8", "bob")] * 5
        statuses, flooded, rate = await genuine_during_flood(gw, tries, flood_from, names)
        pings = len(gw.pings)
    print(
        f"\nknown users' genuine tokens accepted during a flood from 100 addresses: "
        f"{statuses.count(200)}/{len(statuses)}; flood {flooded.total()} at {rate:.0f}/s: "
        f"{dict(sorted(flooded.items()))}; slurmrestd pings in all: {pings}"
    )
    # ...but not the known lane.
    assert statuses == [200] * len(tries), statuses
    assert flooded[503] > 0, flooded  # the replica's budget held


async def test_with_the_cluster_key_no_token_is_sent_to_slurmrestd(tmp_path: Path) -> None:
    """mint mode holds the key: tokens are checked here, made-up ones cost no
    ping and no budget."""
    async with http_stub(slurmrestd) as stub:
        settings = stub_settings(tmp_path, stub.url, CLUSTER_KEY, auth_slurm_tokens="true")
        app = create_app(settings)
        async with app.lifespan():
            gw = Gateway(app, stub.seen)
            async with gw.client("203.0.113.66") as attacker:
                made_up = [
                    (await ask(attacker, token(f"u{n}", key=b"x" * 32))).status_code
                    for n in range(50)
                ]
            async with gw.client("198.51.100.7") as alice:
                genuine = (await ask(alice, token("alice"))).status_code
            pinged_with = [s.headers.get("x-slurm-user-name") for s in stub.seen]
    assert made_up == [401] * 50
    assert genuine == 200
    assert "alice" not in pinged_with and not any(u and u.startswith("u") for u in pinged_with)


# -- the budget itself -----------------------------------------------------------------


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

"""Tenants on the real clusters (issue 13): who is calling, each tenant its own
Slurm user and only its own services, idempotent creates across replicas,
quotas, audit lines, and loopback-only start-up without authentication.

Every test runs against live gateway processes on c2205 (Slurm 22.05, API
v0.0.38) and c2411 (Slurm 24.11). The main gateway of each cluster takes the
keys of deploy/local/tenants.toml (team-a -> gwuser, team-b -> gwteam, an
admin), OIDC tokens of a small real issuer on 127.0.0.1
(tests/support/oidc_issuer.py) mapped by the rule ``gw<name>@example.org``
-> Slurm user ``gw<name>``, and callers' own Slurm tokens. A second gateway of
each cluster takes a temporary auth file with quota-limited tenants and an
OIDC allow-list entry.

Run with ``-s`` to see the attack table and the audit lines.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from gateway.auth.authfile import new_key
from gateway.settings import load_settings
from gateway.slurm import JobState
from gateway.testing.clusters import LocalCluster
from gateway.wiring import metadata_codec
from tests.support.clusters import TIMINGS, named, parametrize
from tests.support.gateway_process import GatewayProcess
from tests.support.oidc_issuer import AUDIENCE, Issuer
from tests.support.polling import poll

ROOT = Path(__file__).resolve().parents[2]
TENANTS_FILE = ROOT / "deploy" / "local" / "tenants.toml"
# The clusters the issue names: Slurm 22.05 and 24.11.
CLUSTER_NAMES = ("c2205", "c2411")

TEAM_A = "sgw_local-team-a-key"  # tenant team-a, Slurm user gwuser
TEAM_B = "sgw_local-team-b-key"  # tenant team-b, Slurm user gwteam
ADMIN = "sgw_local-admin-key"  # tenant ops, sees every service
USER_RULE = r"(?P<user>gw[a-z]+)@example\.org"

HTTP = {"recipe_name": "testing/http"}
STUB = {"recipe_name": "testing/openai-stub"}
PROMPT = {"prompt": "hi", "max_tokens": 4}
UNKNOWN_ID = "987654321"

# (cluster, attack, endpoint, status, detail): printed at the end of the module.
TABLE: list[tuple[str, str, str, int, str]] = []
AUDIT_LINES: list[str] = []


def bearer(credential: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {credential}"}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    clusters = named(*CLUSTER_NAMES)
    if not parametrize(metafunc, "deployment", clusters, per_module=True):
        parametrize(metafunc, "local", clusters)


# -- fixtures --------------------------------------------------------------------


@dataclass
class Deployment:
    """One cluster's main gateway (deploy/local/tenants.toml, OIDC, Slurm tokens)."""

    cluster: LocalCluster
    gateway: GatewayProcess
    issuer: Issuer
    env: dict[str, str]

    @property
    def url(self) -> str:
        return self.gateway.url

    def slurm_token(self, user: str, *, key: bytes | None = None, lifespan: int = 600) -> str:
        """A Slurm JWT for ``user`` as `scontrol token` makes it (signed with the
        cluster's key unless another ``key`` is given)."""
        now = int(time.time())
        secret = key if key is not None else Path(self.cluster.jwt_key).read_bytes()
        return jwt.encode({"sun": user, "iat": now, "exp": now + lifespan}, secret, "HS256")


@pytest.fixture(scope="module")
def deployment(request: pytest.FixtureRequest) -> Iterator[Deployment]:
    cluster: LocalCluster = request.param
    with Issuer() as issuer:
        env = {
            "GATEWAY_AUTH_FILE": str(TENANTS_FILE),
            "GATEWAY_AUTH_SLURM_TOKENS": "true",
            "GATEWAY_OIDC_ISSUER": issuer.url,
            "GATEWAY_OIDC_AUDIENCE": AUDIENCE,
            "GATEWAY_OIDC_USER_PATTERN": USER_RULE,
        }
        with GatewayProcess(cluster, **env) as gateway:
            yield Deployment(cluster, gateway, issuer, {**gateway.env})


@dataclass
class Limited:
    """The cluster's second gateway: a temporary auth file with tenants of
    their own (so that nothing else on the cluster counts against them)."""

    deployment: Deployment
    gateway: GatewayProcess
    keys: dict[str, str]  # role in the tests -> API key
    tenants: dict[str, str]  # role in the tests -> tenant name
    allowed_subject: str

    @property
    def url(self) -> str:
        return self.gateway.url


@pytest.fixture(scope="module")
def limited(deployment: Deployment, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Limited]:
    tag = uuid.uuid4().hex[:6]
    tenants = {
        "services": f"quota-{tag}",
        "gpus": f"gpus-{tag}",
        "audit": f"audit-{tag}",
        "partner": f"partner-{tag}",
    }
    users = {"services": "gwuser", "gpus": "gwteam", "audit": "gwteam"}
    keys: dict[str, str] = {}
    lines = [
        "[defaults]",
        "max_services = 8",
        f"[tenants.{tenants['services']}]",
        "max_services = 1",
        f"[tenants.{tenants['gpus']}]",
        "max_gpus = 1",
    ]
    for role, user in users.items():
        key, digest = new_key()
        keys[role] = key
        lines += [
            "[[keys]]",
            f'name = "{role} test key"',
            f'tenant = "{tenants[role]}"',
            f'slurm_user = "{user}"',
            f'sha256 = "{digest}"',
        ]
    subject = f"carol-{tag}@partner.example"  # not matched by the rule: allow-listed
    lines += [
        "[[oidc_users]]",
        f'subject = "{subject}"',
        'slurm_user = "gwteam"',
        f'tenant = "{tenants["partner"]}"',
    ]
    path = tmp_path_factory.mktemp("auth") / "auth.toml"
    path.write_text("\n".join(lines) + "\n")
    env = {**deployment.env, "GATEWAY_AUTH_FILE": str(path), "GATEWAY_AUTH_SLURM_TOKENS": ""}
    with GatewayProcess(deployment.cluster, **_gateway_settings(env)) as gateway:
        yield Limited(deployment, gateway, keys, tenants, subject)


def _gateway_settings(env: dict[str, str]) -> dict[str, str]:
    """The GATEWAY_ settings of ``env`` (for a GatewayProcess of the same kind)."""
    return {k: v for k, v in env.items() if k.startswith("GATEWAY_") and k != "GATEWAY_PORT"}


@pytest.fixture(scope="module", autouse=True)
def report() -> Iterator[None]:
    """The attack table and the audit lines, printed once the module is done."""
    yield
    if TABLE:
        print("\n\nattack table (cluster | attack | endpoint | status | detail)")
        width = max(len(row[1]) for row in TABLE)
        for cluster, attack, endpoint, status, detail in TABLE:
            print(f"{cluster:6} | {attack:<{width}} | {endpoint:<34} | {status} | {detail}")
    if AUDIT_LINES:
        print("\naudit lines")
        for line in AUDIT_LINES:
            print(line)
    refused = sum(1 for row in TABLE if row[3] in (401, 403, 404, 422, 429))
    TIMINGS.append(f"tenants: {len(TABLE)} attack rows, {refused} refused (401/403/404/422/429)")


class Tracker:
    """Services a test made; stopped at the end through the API, and whatever is
    left of them cancelled with scancel."""

    def __init__(self) -> None:
        self.made: dict[str, tuple[LocalCluster, str, dict[str, str]]] = {}

    def track(self, cluster: LocalCluster, url: str, headers: dict[str, str], sid: str) -> None:
        self.made.setdefault(sid, (cluster, url, headers))

    async def create(
        self,
        cluster: LocalCluster,
        api: httpx.AsyncClient,
        headers: dict[str, str],
        body: dict[str, Any],
        **extra: str,
    ) -> httpx.Response:
        response = await api.post("/api/v1/services", json=body, headers={**headers, **extra})
        if response.status_code == 201:
            self.track(cluster, str(api.base_url), headers, response.json()["id"])
        return response

    async def cleanup(self) -> None:
        for sid, (_, url, headers) in self.made.items():
            try:
                async with httpx.AsyncClient(base_url=url, timeout=30) as api:
                    await api.delete(f"/api/v1/services/{sid}", headers=headers)
            except httpx.HTTPError:
                pass
        by_cluster: dict[str, tuple[LocalCluster, list[str]]] = {}
        for sid, (cluster, _, _) in self.made.items():
            by_cluster.setdefault(cluster.name, (cluster, []))[1].append(sid)
        for cluster, ids in by_cluster.values():
            await asyncio.to_thread(
                subprocess.run,
                ["chroot", cluster.chroot, "scancel", *ids],
                capture_output=True, timeout=30, check=False,
            )  # fmt: skip


@pytest.fixture
async def tracker() -> AsyncIterator[Tracker]:
    made = Tracker()
    try:
        yield made
    finally:
        await made.cleanup()


def client(url: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=url, timeout=30)


async def squeue(cluster: LocalCluster) -> dict[str, tuple[str, str]]:
    """Job id -> (Slurm user, state), as `squeue` inside the cluster shows them."""
    done = await asyncio.to_thread(
        subprocess.run,
        ["chroot", cluster.chroot, "squeue", "-h", "-t", "all", "-o", "%i %u %T"],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    jobs = {}
    for line in done.stdout.splitlines():
        job_id, user, state = line.split()
        jobs[job_id] = (user, state)
    return jobs


async def scontrol_job(cluster: LocalCluster, job_id: str) -> dict[str, str]:
    """`scontrol show job` as key=value pairs (the ones without spaces)."""
    done = await asyncio.to_thread(
        subprocess.run,
        ["chroot", cluster.chroot, "scontrol", "show", "job", job_id],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    pairs = {}
    for token in done.stdout.split():
        name, sep, value = token.partition("=")
        if sep:
            pairs.setdefault(name, value)
    return pairs


async def wait_status(
    api: httpx.AsyncClient, headers: dict[str, str], sid: str, *statuses: str, timeout: float = 60
) -> dict[str, Any]:
    async def status() -> dict[str, Any]:
        response = await api.get(f"/api/v1/services/{sid}/status", headers=headers)
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    return await poll(
        status, lambda s: s["status"] in statuses, timeout=timeout, what=f"{sid} in {statuses}"
    )


def detail_of(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:100]
    if response.is_success:
        if isinstance(body, dict) and "owner" in body:
            return f"service {body['id']} runs as {body['owner']} (tenant {body['tenant']})"
        return "accepted"
    if isinstance(body, dict):
        errors = body.get("errors")
        if errors:
            return f"{errors[0]['field']}: {errors[0]['message']}"[:110]
        return str(body.get("detail", body))[:110]
    return str(body)[:110]


def row(cluster: LocalCluster, attack: str, endpoint: str, response: httpx.Response) -> None:
    TABLE.append((cluster.name, attack, endpoint, response.status_code, detail_of(response)))


# -- 1. isolation ------------------------------------------------------------------

# (name, method, path, body) of every endpoint that takes a service id.
ENDPOINTS: list[tuple[str, str, str, dict[str, Any] | None]] = [
    ("get", "GET", "/api/v1/services/{id}", None),
    ("status", "GET", "/api/v1/services/{id}/status", None),
    ("logs", "GET", "/api/v1/services/{id}/logs", None),
    ("vllm models", "GET", "/api/v1/vllm/{id}/models", None),
    ("prompt", "POST", "/api/v1/vllm/{id}/prompt", PROMPT),
    ("prompt (stream)", "POST", "/api/v1/vllm/{id}/prompt", {**PROMPT, "stream": True}),
    ("stop", "DELETE", "/api/v1/services/{id}", None),
]


async def call(
    api: httpx.AsyncClient,
    headers: dict[str, str],
    method: str,
    path: str,
    sid: str,
    body: dict[str, Any] | None,
) -> httpx.Response:
    return await api.request(method, path.format(id=sid), headers=headers, json=body)


def same_answer(response: httpx.Response, sid: str) -> tuple[int, str, str]:
    """What a client sees of a 404, with the id it asked for taken out."""
    return (
        response.status_code,
        response.headers.get("content-type", ""),
        response.text.replace(sid, "<id>"),
    )


async def test_each_tenant_sees_only_its_own_services(
    deployment: Deployment, tracker: Tracker
) -> None:
    cluster = deployment.cluster
    a_key, b_key, admin = bearer(TEAM_A), bearer(TEAM_B), bearer(ADMIN)
    async with client(deployment.url) as api:
        made = await asyncio.gather(
            tracker.create(cluster, api, a_key, STUB), tracker.create(cluster, api, b_key, STUB)
        )
        for response in made:
            assert response.status_code == 201, response.text
        a, b = (r.json() for r in made)
        assert (a["owner"], a["tenant"]) == ("gwuser", "team-a"), a
        assert (b["owner"], b["tenant"]) == ("gwteam", "team-b"), b
        await asyncio.gather(
            wait_status(api, a_key, a["id"], "running"), wait_status(api, b_key, b["id"], "running")
        )

        # The jobs run as two different Slurm users.
        jobs = await squeue(cluster)
        assert jobs[a["id"]] == ("gwuser", "RUNNING"), jobs.get(a["id"])
        assert jobs[b["id"]] == ("gwteam", "RUNNING"), jobs.get(b["id"])
        print(f"\n{cluster.name} squeue: {a['id']} {jobs[a['id']]}, {b['id']} {jobs[b['id']]}")

        tenants = [
            ("team-a", a_key, a["id"], b["id"], "gwuser"),
            ("team-b", b_key, b["id"], a["id"], "gwteam"),
        ]
        for tenant, headers, own, foreign, user in tenants:
            listed = await api.get("/api/v1/services", headers=headers)
            assert listed.status_code == 200, listed.text
            ids = {s["id"] for s in listed.json()}
            assert own in ids
            assert foreign not in ids
            for service in listed.json():
                assert service["owner"] == user, service
                assert service["tenant"] in (tenant, None), service
            vllm = await api.get("/api/v1/vllm/services", headers=headers)
            assert vllm.status_code == 200, vllm.text
            vllm_ids = {s["id"] for s in vllm.json()["vllm_services"]}
            assert own in vllm_ids
            assert foreign not in vllm_ids

            for name, method, path, body in ENDPOINTS:
                endpoint = f"{method} {path}"
                theirs = await call(api, headers, method, path, foreign, body)
                unknown = await call(api, headers, method, path, UNKNOWN_ID, body)
                assert theirs.status_code == 404, (name, theirs.text)
                # Nothing tells another tenant's service from no service at all.
                assert same_answer(theirs, foreign) == same_answer(unknown, UNKNOWN_ID), name
                row(cluster, f"{tenant} key, foreign id: {name}", endpoint, theirs)
                if method == "DELETE":
                    continue  # their own stop comes last
                mine = await call(api, headers, method, path, own, body)
                assert mine.status_code == 200, (name, mine.text)

            # Its own service answers prompts, streamed or not.
            answer = await api.post(f"/api/v1/vllm/{own}/prompt", headers=headers, json=PROMPT)
            assert answer.json()["response"] == " tok" * 4, answer.text
            stream = await api.post(
                f"/api/v1/vllm/{own}/prompt", headers=headers, json={**PROMPT, "stream": True}
            )
            assert stream.text.rstrip().endswith("data: [DONE]"), stream.text

        # The refused stops changed nothing: both still run.
        jobs = await squeue(cluster)
        assert jobs[a["id"]][1] == jobs[b["id"]][1] == "RUNNING", jobs
        for headers, sid in ((a_key, a["id"]), (b_key, b["id"])):
            assert (await wait_status(api, headers, sid, "running"))["status"] == "running"

        # The admin sees both, on every listing.
        listed = {s["id"]: s for s in (await api.get("/api/v1/services", headers=admin)).json()}
        assert (listed[a["id"]]["owner"], listed[a["id"]]["tenant"]) == ("gwuser", "team-a")
        assert (listed[b["id"]]["owner"], listed[b["id"]]["tenant"]) == ("gwteam", "team-b")
        vllm = (await api.get("/api/v1/vllm/services", headers=admin)).json()
        assert {a["id"], b["id"]} <= {s["id"] for s in vllm["vllm_services"]}
        for sid in (a["id"], b["id"]):
            assert (await api.get(f"/api/v1/services/{sid}", headers=admin)).status_code == 200
            models = await api.get(f"/api/v1/vllm/{sid}/models", headers=admin)
            assert models.status_code == 200, models.text

        # Each stops its own.
        for headers, sid in ((a_key, a["id"]), (b_key, b["id"])):
            stopped = await api.delete(f"/api/v1/services/{sid}", headers=headers)
            assert stopped.status_code == 200, stopped.text
            assert stopped.json()["status"] == "cancelled", stopped.text


# -- 2. attacks --------------------------------------------------------------------


@dataclass(frozen=True)
class Attack:
    name: str
    expect: int
    headers: Callable[[Deployment], dict[str, str]]
    body: dict[str, Any] = field(default_factory=lambda: HTTP)
    # 422: the field the answer must name; 401/403: words the detail must hold.
    names: str = ""


def _oidc(
    subject: str = "gwteam@example.org", **claims: Any
) -> Callable[[Deployment], dict[str, str]]:
    """An OIDC token of ``subject`` (gwteam), with these claims changed."""
    return lambda d: bearer(d.issuer.token(subject, **claims))


def _forged(how: str) -> Callable[[Deployment], dict[str, str]]:
    """gwteam's OIDC token, forged ``how`` (tests/support/oidc_issuer.py)."""
    return lambda d: bearer(d.issuer.forged(how, "gwteam@example.org"))


def _team_a(d: Deployment) -> dict[str, str]:
    return bearer(TEAM_A)


def _expired(d: Deployment) -> dict[str, str]:
    now = int(time.time())
    return _oidc(iat=now - 900, exp=now - 120)(d)


def _slurm_expired(d: Deployment) -> dict[str, str]:
    now = int(time.time())
    key = Path(d.cluster.jwt_key).read_bytes()
    token = jwt.encode({"sun": "gwteam", "iat": now - 900, "exp": now - 120}, key, "HS256")
    return {"X-SLURM-USER-TOKEN": token}


ATTACKS = [
    Attack("no credentials", 401, lambda d: {}, names="authentication required"),
    Attack("wrong API key", 401, lambda d: bearer("sgw_" + uuid.uuid4().hex), names="unknown"),
    Attack(
        "Basic auth instead of Bearer",
        401,
        lambda d: {"Authorization": "Basic Z3d1c2VyOmd3dXNlcg=="},
        names="Bearer",
    ),
    Attack("OIDC expired", 401, _expired, names="expired"),
    *(
        Attack(f"OIDC {what}", 401, _forged(how), names=names)
        for what, how, names in [
            ("signature changed", "signature-changed", "Signature"),
            ("payload swapped (gwuser's signature)", "payload-changed", "Signature"),
            ("alg none", "alg-none", "'none' is not accepted"),
            ("HS256 keyed with the JWKS public key", "hs256-public-key", "'HS256' is not accepted"),
            ("signed by a foreign key (real kid)", "foreign-key", "Signature"),
        ]
    ),
    Attack("OIDC wrong issuer", 401, _oidc(iss="https://evil.example"), names="issuer"),
    Attack("OIDC wrong audience", 401, _oidc(aud="another-client"), names="audience"),
    Attack("OIDC without exp", 401, _oidc(exp=None), names="exp"),
    *(
        Attack(f"OIDC user {what}", 403, _oidc(subject), names="not allowed")
        for what, subject in [
            ("outside allow-list and rule", "mallory@evil.example"),
            ("almost matching the rule", "gwteam@example.org.evil.example"),
        ]
    ),
    Attack(
        "OIDC token + X-SLURM-USER-NAME of another user",
        403,
        lambda d: {
            **bearer(d.issuer.token("gwuser@example.org")),
            "X-SLURM-USER-NAME": "gwteam",
        },
        names="not the caller's Slurm user",
    ),
    Attack(
        "team-a key + X-SLURM-USER-NAME gwteam",
        403,
        lambda d: {**bearer(TEAM_A), "X-SLURM-USER-NAME": "gwteam"},
        names="not the caller's Slurm user",
    ),
    Attack(
        "Slurm token forged with a wrong key",
        401,
        lambda d: {"X-SLURM-USER-TOKEN": d.slurm_token("gwteam", key=b"k" * 32)},
        names="Signature",
    ),
    Attack("Slurm token expired", 401, _slurm_expired, names="expired"),
    Attack(
        "Slurm token of gwteam + X-SLURM-USER-NAME gwuser",
        403,
        lambda d: {"X-SLURM-USER-TOKEN": d.slurm_token("gwteam"), "X-SLURM-USER-NAME": "gwuser"},
        names="not the caller's Slurm user",
    ),
    Attack(
        "API key and Slurm token together",
        401,
        lambda d: {**bearer(TEAM_A), "X-SLURM-USER-TOKEN": d.slurm_token("gwteam")},
        names="not both",
    ),
    Attack("body: user", 422, _team_a, {**HTTP, "user": "gwteam"}, "user"),
    Attack("body: account", 422, _team_a, {**HTTP, "account": "x"}, "account"),
    Attack(
        "body: config.user",
        422,
        _team_a,
        {**HTTP, "config": {"user": "gwteam"}},
        "config.user",
    ),
    Attack(
        "body: config.resources.account",
        422,
        _team_a,
        {**HTTP, "config": {"resources": {"account": "other-project"}}},
        "config.resources.account",
    ),
    *(
        Attack(
            f"body: config.environment.{variable}",
            422,
            _team_a,
            {**HTTP, "config": {"environment": {variable: value}}},
            f"config.environment.{variable}",
        )
        for variable, value in [
            ("SLURM_JOB_USER", "gwteam"),
            ("SBATCH_ACCOUNT", "other-project"),
            ("USER", "gwteam"),
            ("SLURM_JWT", "forged"),
        ]
    ),
]


@pytest.mark.parametrize("attack", ATTACKS, ids=[a.name.replace(" ", "-") for a in ATTACKS])
async def test_attack_is_refused(deployment: Deployment, tracker: Tracker, attack: Attack) -> None:
    async with client(deployment.url) as api:
        response = await tracker.create(
            deployment.cluster, api, attack.headers(deployment), attack.body
        )
    row(deployment.cluster, attack.name, "POST /api/v1/services", response)
    assert response.status_code == attack.expect, response.text
    assert response.headers["content-type"] == "application/problem+json", response.headers
    challenge = response.headers.get("www-authenticate", "")
    if attack.expect == 401:
        assert challenge.startswith('Bearer realm="slurm-ai-gateway"'), response.headers
        if attack.name != "no credentials":
            assert 'error="invalid_token"' in challenge, challenge
        assert attack.names in response.json()["detail"], response.text
    elif attack.expect == 403:
        assert not challenge, challenge
        assert attack.names in response.json()["detail"], response.text
    else:
        assert [e["field"] for e in response.json()["errors"]] == [attack.names], response.text


async def running_as_gwteam(
    cluster: LocalCluster,
    api: httpx.AsyncClient,
    tracker: Tracker,
    credential: dict[str, str],
    what: str,
) -> dict[str, Any]:
    """A service created with ``credential`` (``what`` in the table), running
    as the Slurm user gwteam."""
    created = await tracker.create(cluster, api, credential, HTTP)
    row(cluster, what, "POST /api/v1/services", created)
    assert created.status_code == 201, created.text
    service: dict[str, Any] = created.json()
    assert service["owner"] == "gwteam", service
    await wait_status(api, credential, service["id"], "running")
    assert (await squeue(cluster))[service["id"]] == ("gwteam", "RUNNING")
    return service


async def test_oidc_token_runs_its_service_as_the_mapped_slurm_user(
    deployment: Deployment, tracker: Tracker
) -> None:
    cluster, issuer = deployment.cluster, deployment.issuer
    token = bearer(issuer.token("gwteam@example.org"))
    async with client(deployment.url) as api:
        what = "(valid) OIDC token gwteam@example.org"
        service = await running_as_gwteam(cluster, api, tracker, token, what)
        assert service["tenant"] == "gwteam", service
        # Same Slurm user, another tenant: team-b does not see it.
        theirs = await api.get(f"/api/v1/services/{service['id']}", headers=bearer(TEAM_B))
        row(cluster, "team-b key (gwteam) on OIDC tenant's id", "GET /api/v1/services/{id}", theirs)
        assert theirs.status_code == 404, theirs.text
        # Any fresh token of the same subject is the same caller.
        again = bearer(issuer.token("gwteam@example.org"))
        stopped = await api.delete(f"/api/v1/services/{service['id']}", headers=again)
        assert stopped.status_code == 200, stopped.text
        assert stopped.json()["status"] == "cancelled"


async def test_slurm_token_pass_through_runs_as_its_user(
    deployment: Deployment, tracker: Tracker
) -> None:
    cluster = deployment.cluster
    token = {"X-SLURM-USER-TOKEN": deployment.slurm_token("gwteam")}
    async with client(deployment.url) as api:
        service = await running_as_gwteam(
            cluster, api, tracker, token, "(valid) Slurm token of gwteam"
        )
        # A token of gwuser (another caller) does not see it.
        other = {"X-SLURM-USER-TOKEN": deployment.slurm_token("gwuser")}
        theirs = await api.get(f"/api/v1/services/{service['id']}/status", headers=other)
        row(cluster, "Slurm token of gwuser on gwteam's id", "GET .../{id}/status", theirs)
        assert theirs.status_code == 404, theirs.text
        stopped = await api.delete(f"/api/v1/services/{service['id']}", headers=token)
        assert stopped.status_code == 200, stopped.text
        assert stopped.json()["status"] == "cancelled"


async def test_oidc_allow_list_entry_and_rule(limited: Limited, tracker: Tracker) -> None:
    cluster, issuer = limited.deployment.cluster, limited.deployment.issuer
    listed = bearer(issuer.token(limited.allowed_subject))
    async with client(limited.url) as api:
        # Allow-listed (the rule does not match it): its entry's user and tenant.
        created = await tracker.create(cluster, api, listed, HTTP)
        row(cluster, "(valid) OIDC allow-listed subject", "POST /api/v1/services", created)
        assert created.status_code == 201, created.text
        service = created.json()
        assert service["owner"] == "gwteam", service
        assert service["tenant"] == limited.tenants["partner"], service
        # Matching the rule only.
        ruled = await api.get(
            "/api/v1/services", headers=bearer(issuer.token("gwuser@example.org"))
        )
        assert ruled.status_code == 200, ruled.text
        assert service["id"] not in {s["id"] for s in ruled.json()}
        # Neither: refused.
        outsider = bearer(issuer.token(limited.allowed_subject.replace("carol", "dave")))
        refused = await api.get("/api/v1/services", headers=outsider)
        row(cluster, "OIDC subject next to the allow-listed one", "GET /api/v1/services", refused)
        assert refused.status_code == 403, refused.text
        stopped = await api.delete(f"/api/v1/services/{service['id']}", headers=listed)
        assert stopped.status_code == 200, stopped.text


# -- 3. idempotent creates across replicas ---------------------------------------


async def test_idempotent_create_on_two_replicas_makes_one_job(
    deployment: Deployment, tracker: Tracker
) -> None:
    cluster = deployment.cluster
    key = f"tenants-test-{uuid.uuid4().hex}"
    headers = bearer(TEAM_A)
    body = {"recipe_name": "testing/http", "config": {"environment": {"MESSAGE": key[-12:]}}}
    second = GatewayProcess(cluster, **_gateway_settings(deployment.env))
    await asyncio.to_thread(second.start)
    try:
        async with client(deployment.url) as one, client(second.url) as two:
            # Both replicas have listed Slurm's jobs once (a warm view).
            for api in (one, two):
                assert (await api.get("/api/v1/services", headers=headers)).status_code == 200
            answers = await asyncio.gather(
                tracker.create(cluster, one, headers, body, **{"Idempotency-Key": key}),
                tracker.create(cluster, two, headers, body, **{"Idempotency-Key": key}),
            )
            for answer in answers:
                assert answer.status_code == 201, answer.text
            sid = answers[0].json()["id"]
            assert answers[1].json()["id"] == sid, [a.text for a in answers]
            # The create that came second (by Slurm job id, or by time) is a replay.
            replayed = [a.headers.get("idempotent-replayed") for a in answers]
            assert replayed.count("true") == 1, replayed

            # In Slurm: one job with this key stands; any twin was cancelled
            # before its start (creates with a key are held 3 s).
            codec = metadata_codec(load_settings(deployment.env))
            marker = codec.idempotency_marker("team-a", "gwuser", key)
            async with cluster.client() as slurm:
                jobs = (await slurm.list_jobs()).jobs
            keyed = []
            for job in jobs:
                decoded = codec.decode(job.comment, job.job_id)
                if decoded is not None and decoded.meta.idempotency == marker:
                    keyed.append(job)
            standing = [str(j.job_id) for j in keyed if j.state is not JobState.CANCELLED]
            assert standing == [sid], keyed
            twins = [str(j.job_id) for j in keyed if str(j.job_id) != sid]
            for twin in twins:
                assert int(twin) > int(sid)
                shown = await scontrol_job(cluster, twin)
                assert shown["JobState"] == "CANCELLED", shown
                assert shown["RunTime"] == "00:00:00", shown
                assert "BatchHost" not in shown, shown  # it never had a node
                tracker.track(cluster, deployment.url, headers, twin)
            logged = (deployment.gateway.log.read_text() + second.log.read_text()).splitlines()
            for twin in twins:
                assert any(
                    f'"job_id":{twin},' in line and f'"why":"twin of job {sid}"' in line
                    for line in logged
                ), twin
            TIMINGS.append(
                f"idempotency on {cluster.name}: two replicas answered {sid}; "
                f"twin jobs cancelled before start: {twins or 'none submitted'}; "
                f"Idempotent-Replayed: {replayed}"
            )
            print(f"\n{cluster.name}: answers {sid} {replayed}; cancelled twins {twins}")

            # The same key with another body: 422 naming the header.
            other = await two.post(
                "/api/v1/services",
                json={"recipe_name": "testing/http"},
                headers={**headers, "Idempotency-Key": key},
            )
            row(cluster, "Idempotency-Key reused with another body", "POST /api/v1/services", other)
            assert other.status_code == 422, other.text
            assert [e["field"] for e in other.json()["errors"]] == ["Idempotency-Key"]
            # A retry, on either replica: the same service, said to be a replay.
            for api in (one, two):
                retry = await api.post(
                    "/api/v1/services", json=body, headers={**headers, "Idempotency-Key": key}
                )
                assert retry.status_code == 201, retry.text
                assert retry.json()["id"] == sid
                assert retry.headers.get("idempotent-replayed") == "true", retry.headers
            # Keys are per tenant: team-b's create with the same key and body is
            # its own service, never a replay of team-a's.
            b_key = bearer(TEAM_B)
            theirs = await tracker.create(cluster, two, b_key, body, **{"Idempotency-Key": key})
            assert theirs.status_code == 201, theirs.text
            assert theirs.json()["id"] != sid
            assert theirs.json()["owner"] == "gwteam"
            assert "idempotent-replayed" not in theirs.headers
            # The standing job runs once its hold is over.
            await wait_status(two, headers, sid, "running")
            stopped = await two.delete(f"/api/v1/services/{theirs.json()['id']}", headers=b_key)
            assert stopped.status_code == 200, stopped.text
            stopped = await one.delete(f"/api/v1/services/{sid}", headers=headers)
            assert stopped.status_code == 200, stopped.text
    finally:
        await asyncio.to_thread(second.stop)


# -- 4. quotas ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("limit", "body"),
    [
        ("max_services", HTTP),
        ("max_gpus", {"recipe_name": "testing/http", "config": {"resources": {"gpu": "1"}}}),
    ],
    ids=["max_services", "max_gpus"],
)
async def test_quota_answers_429_until_a_service_is_stopped(
    limited: Limited, tracker: Tracker, limit: str, body: dict[str, Any]
) -> None:
    cluster = limited.deployment.cluster
    role = "services" if limit == "max_services" else "gpus"
    headers = bearer(limited.keys[role])
    async with client(limited.url) as api:
        first = await tracker.create(cluster, api, headers, body)
        assert first.status_code == 201, first.text
        sid = first.json()["id"]
        over = await tracker.create(cluster, api, headers, body)
        row(cluster, f"second create over {limit} = 1", "POST /api/v1/services", over)
        assert over.status_code == 429, over.text
        problem = over.json()
        assert problem["limit"] == limit, problem
        assert limit in problem["detail"], problem
        if limit == "max_gpus":
            # Only GPUs are limited: a CPU-only service is still welcome.
            cpu = await tracker.create(cluster, api, headers, HTTP)
            assert cpu.status_code == 201, cpu.text
            stopped = await api.delete(f"/api/v1/services/{cpu.json()['id']}", headers=headers)
            assert stopped.status_code == 200, stopped.text
        stopped = await api.delete(f"/api/v1/services/{sid}", headers=headers)
        assert stopped.status_code == 200, stopped.text
        again = await poll(
            lambda: tracker.create(cluster, api, headers, body),
            lambda r: r.status_code != 429,
            timeout=15,
            what="a create after the stop",
        )
        assert again.status_code == 201, again.text
        assert (await squeue(cluster))[again.json()["id"]][1] in ("PENDING", "RUNNING")
        stopped = await api.delete(f"/api/v1/services/{again.json()['id']}", headers=headers)
        assert stopped.status_code == 200, stopped.text


# -- 5. audit ----------------------------------------------------------------------


async def audit_lines(gateway: GatewayProcess, request_ids: list[str]) -> dict[str, list[str]]:
    """The audit lines of the gateway's log, by request id, once each id has one."""

    async def read() -> dict[str, list[str]]:
        found: dict[str, list[str]] = {rid: [] for rid in request_ids}
        for line in gateway.log.read_text().splitlines():
            if '"audit"' not in line:
                continue
            entry = json.loads(line)
            if entry.get("event") == "audit" and entry.get("request_id") in found:
                found[entry["request_id"]].append(line)
        return found

    return await poll(read, lambda f: all(f.values()), timeout=10, what="audit lines")


async def test_audit_line_per_create_and_stop(limited: Limited, tracker: Tracker) -> None:
    cluster = limited.deployment.cluster
    headers = bearer(limited.keys["audit"])
    tenant = limited.tenants["audit"]
    async with client(limited.url) as api:
        created = await tracker.create(cluster, api, headers, HTTP)
        assert created.status_code == 201, created.text
        sid = created.json()["id"]
        refused = await tracker.create(
            cluster, api, headers, {**HTTP, "config": {"resources": {"account": "other"}}}
        )
        assert refused.status_code == 422, refused.text
        stopped = await api.delete(f"/api/v1/services/{sid}", headers=headers)
        assert stopped.status_code == 200, stopped.text
        unknown = await api.delete(f"/api/v1/services/{UNKNOWN_ID}", headers=headers)
        assert unknown.status_code == 404, unknown.text
    expected = [
        (created, "service.create", sid, "ok", 201),
        (refused, "service.create", None, "refused", 422),
        (stopped, "service.stop", sid, "ok", 200),
        (unknown, "service.stop", UNKNOWN_ID, "refused", 404),
    ]
    request_ids = [response.headers["x-request-id"] for response, *_ in expected]
    found = await audit_lines(limited.gateway, request_ids)
    for (_, action, service_id, outcome, status), rid in zip(expected, request_ids, strict=True):
        assert len(found[rid]) == 1, found[rid]  # one line per request
        entry = json.loads(found[rid][0])
        assert entry["tenant"] == tenant, entry
        assert entry["slurm_user"] == "gwteam", entry
        assert entry["auth"] == "key", entry
        assert entry["credential"] == "audit test key", entry
        assert (entry["action"], entry["service_id"]) == (action, service_id), entry
        assert (entry["outcome"], entry["status"]) == (outcome, status), entry
        assert entry["request_id"] == rid
        AUDIT_LINES.append(f"{cluster.name}: {found[rid][0]}")
        print(found[rid][0])


async def test_audit_line_of_a_create_refused_by_authentication(limited: Limited) -> None:
    async with client(limited.url) as api:
        anonymous = await api.post("/api/v1/services", json=HTTP)
        assert anonymous.status_code == 401, anonymous.text
        impostor = await api.post(
            "/api/v1/services",
            json=HTTP,
            headers={**bearer(limited.keys["audit"]), "X-SLURM-USER-NAME": "gwuser"},
        )
        assert impostor.status_code == 403, impostor.text
    ids = [anonymous.headers["x-request-id"], impostor.headers["x-request-id"]]
    found = await audit_lines(limited.gateway, ids)
    lines = [found[rid][0] for rid in ids]
    print("\n" + "\n".join(lines))
    first, second = (json.loads(line) for line in lines)
    AUDIT_LINES.extend(f"{limited.deployment.cluster.name}: {line}" for line in lines)
    assert (first["outcome"], first["status"]) == ("refused", 401), first
    assert (second["outcome"], second["status"]) == ("refused", 403), second
    # The one refused for naming another user is named in its line.
    assert (second["tenant"], second["auth"]) != (None, None), second


# -- OIDC key rotation (last: the JWKS client refetches at most every 30 s) -----------


async def test_oidc_token_of_a_rotated_key_is_accepted(deployment: Deployment) -> None:
    issuer = deployment.issuer
    async with client(deployment.url) as api:
        before = await api.get(
            "/api/v1/services", headers=bearer(issuer.token("gwuser@example.org"))
        )
        assert before.status_code == 200, before.text
        fetches = issuer.jwks_fetches
        kid = issuer.add_key()
        added = time.monotonic()

        async def with_new_key() -> httpx.Response:
            token = issuer.token("gwuser@example.org", kid=kid)  # a fresh token each time
            return await api.get("/api/v1/services", headers=bearer(token))

        accepted = await poll(
            with_new_key, lambda r: r.status_code == 200, timeout=45, interval=1.0
        )
        took = time.monotonic() - added
        assert accepted.status_code == 200
        assert issuer.jwks_fetches > fetches  # the gateway fetched the new key set
        # Tokens of the old key still work while it is published.
        old = await api.get("/api/v1/services", headers=bearer(issuer.token("gwuser@example.org")))
        assert old.status_code == 200, old.text
    attack = f"(valid) OIDC token of a key added later (after {took:.0f} s)"
    row(deployment.cluster, attack, "GET /api/v1/services", accepted)
    TIMINGS.append(
        f"oidc rotation on {deployment.cluster.name}: new key accepted after {took:.1f} s"
    )


# -- 6. loopback only without authentication -----------------------------------------

NO_AUTH = {
    "GATEWAY_AUTH_FILE": "",
    "GATEWAY_OIDC_ISSUER": "",
    "GATEWAY_AUTH_SLURM_TOKENS": "",
    "GATEWAY_ALLOW_UNAUTHENTICATED": "",
}


def listening(port: int) -> set[str]:
    """The addresses a TCP socket listens on at ``port`` (from /proc/net)."""
    found = set()
    for name in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{name}").read_text().splitlines()[1:]:
            fields = line.split()
            address, _, hex_port = fields[1].partition(":")
            if fields[3] != "0A" or int(hex_port, 16) != port:
                continue
            raw = bytes.fromhex(address)
            words = [raw[i : i + 4][::-1] for i in range(0, len(raw), 4)]
            joined = b"".join(words)
            if len(joined) == 4:
                found.add(".".join(str(b) for b in joined))
            else:
                found.add(":".join(joined[i : i + 2].hex() for i in range(0, 16, 2)))
    return found


def other_address() -> str | None:
    """A non-loopback IPv4 address of this machine, if it has one."""
    try:
        out = subprocess.run(
            ["hostname", "-I"], capture_output=True, text=True, timeout=5, check=False
        ).stdout
    except OSError:
        return None
    return next((a for a in out.split() if re.fullmatch(r"[0-9.]+", a) and a[:4] != "127."), None)


def reachable(address: str, port: int) -> bool:
    try:
        return httpx.get(f"http://{address}:{port}/api/v1/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def warnings_of(gateway: GatewayProcess) -> list[dict[str, Any]]:
    lines = []
    for line in gateway.log.read_text().splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if entry.get("level") == "warning":
                lines.append(entry)
    return lines


def test_non_loopback_host_without_authentication_does_not_start(local: LocalCluster) -> None:
    env = GatewayProcess(local, **NO_AUTH, GATEWAY_HOST="0.0.0.0").env  # noqa: S104
    done = subprocess.run(
        [sys.executable, "-m", "gateway"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    print(f"\n{local.name}: exit {done.returncode}: {done.stderr.strip()}")
    assert done.returncode == 2, done.stderr
    assert "GATEWAY_HOST" in done.stderr
    assert "0.0.0.0 is not a loopback address" in done.stderr
    assert "GATEWAY_ALLOW_UNAUTHENTICATED" in done.stderr


def test_no_authentication_serves_loopback_only(local: LocalCluster) -> None:
    with GatewayProcess(local, **NO_AUTH, GATEWAY_HOST="") as gateway:
        assert listening(gateway.port) == {"127.0.0.1"}
        address = other_address()
        if address is not None:
            assert not reachable(address, gateway.port)
        said = [w["event"] for w in warnings_of(gateway)]
        assert any("serving loopback only" in w for w in said), said
        # Loopback callers need no credentials (make run, curl on localhost).
        assert httpx.get(f"{gateway.url}/api/v1/services", timeout=30).status_code == 200
    print(f"\n{local.name}: listens on {{'127.0.0.1'}} only; warned: {said}")


def test_unauthenticated_opt_out_serves_every_interface_and_says_so(local: LocalCluster) -> None:
    opted_out = {
        **NO_AUTH,
        "GATEWAY_HOST": "0.0.0.0",  # noqa: S104
        "GATEWAY_ALLOW_UNAUTHENTICATED": "true",
    }
    with GatewayProcess(local, **opted_out) as gateway:
        assert listening(gateway.port) == {"0.0.0.0"}  # noqa: S104
        address = other_address()
        if address is not None:
            assert reachable(address, gateway.port)
        said = [w["event"] for w in warnings_of(gateway)]
        assert any("WITHOUT client authentication" in w for w in said), said
    print(f"\n{local.name}: listens on 0.0.0.0; warned: {said}")

"""One typed settings object, read from ``GATEWAY_*`` environment variables.

Validation happens once, at start-up; a bad value stops the process with a
message naming the variable. docs/configuration.md lists every variable; it is
generated from this file (``make docs``), each field's ``#:`` comment its description.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import msgspec

from gateway.settings_checks import PREFIX as PREFIX
from gateway.settings_checks import SettingsError as SettingsError
from gateway.settings_checks import SlurmAuthMode as SlurmAuthMode
from gateway.settings_checks import check_auth, check_slurm
from gateway.settings_checks import env_name as env_name
from gateway.settings_checks import is_loopback as is_loopback

Seconds = Annotated[float, msgspec.Meta(gt=0)]
Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]


class Settings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    #: listen address; unset: `0.0.0.0` with client authentication, else `127.0.0.1` (a
    #: non-loopback one needs authentication: [auth](auth.md))
    host: str | None = None
    #: listen port
    port: Port = 8001
    #: uvicorn log level
    log_level: str = "info"
    #: server processes sharing the port; 0: one per CPU the gateway may use (its CPU
    #: affinity and cgroup quota), at most 8. Each is a replica with its own job view:
    #: the slurmctld RPC bound of `GATEWAY_VIEW_MIN_GAP_SECONDS`, and the per-tenant and
    #: per-service limits, are per worker
    workers: Annotated[int, msgspec.Meta(ge=0, le=64)] = 0
    #: one JSON line per request on stdout, written straight to the stream (uvicorn's own
    #: access log cost 0.15-0.2 ms of a proxied prompt's 0.5): [logs](operations.md#logs)
    access_log: bool = True
    #: after SIGTERM, seconds the gateway keeps serving while `/api/v1/ready` answers 503,
    #: so Kubernetes takes the pod out of its Service first ([stopping](operations.md#stopping))
    shutdown_drain_seconds: Annotated[int, msgspec.Meta(ge=0, le=3600)] = 0
    #: then, once the listener is closed, seconds open requests and streams get to finish;
    #: what is left is cut and the gateway exits 0
    shutdown_grace_seconds: Annotated[int, msgspec.Meta(ge=0, le=3600)] = 30

    #: a `cluster.json` of `deploy/local/cluster.sh`: the URL, user, key, partition, job folder
    #: (`/home/{user}`) and path map (`/` to the chroot) for those not set
    slurm_cluster_file: str | None = None
    #: slurmrestd base URL, e.g. `http://127.0.0.1:6820`; required
    slurm_url: str = ""
    #: pin a REST API version (`v0.0.38` … `v0.0.45`); unset: the newest one the daemon serves
    slurm_api_version: str | None = None
    #: Slurm user the gateway acts as (required for `mint`; `static`: the token's if unset)
    slurm_user: str = ""
    #: `mint`: sign tokens with the cluster's JWT key; `static`: use a token made elsewhere
    slurm_auth: SlurmAuthMode = SlurmAuthMode.MINT
    #: the cluster's HS256 key (`AuthAltParameters=jwt_key=`), for `mint`
    slurm_jwt_key_file: str | None = None
    #: seconds a minted token lives; renewed in its last fifth (at most 60 s)
    slurm_jwt_lifespan: Annotated[int, msgspec.Meta(ge=30)] = 1800
    #: a token, for `static` (`SLURM_JWT=` prefix accepted)
    slurm_token: str | None = None
    #: a file holding the token, for `static`; re-read when it changes (a mounted Secret)
    slurm_token_file: str | None = None
    #: seconds for a slurmrestd answer
    slurm_timeout: Seconds = 10.0
    #: seconds to connect to slurmrestd
    slurm_connect_timeout: Seconds = 3.0
    #: partition used when the recipe names none
    slurm_partition: str | None = None
    #: account used when the recipe and overlay name none
    slurm_account: str | None = None
    #: most slurmrestd calls in flight per replica (per worker), job listings included
    slurm_max_concurrency: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 16
    #: how long a call waits for one of those slots; then it is answered 503 with
    #: `Retry-After` ("slurmrestd is busy") instead of piling up on a slow slurmrestd
    slurm_queue_timeout_seconds: Annotated[float, msgspec.Meta(ge=0, le=60)] = 2.0
    #: how often the shared job view lists Slurm's jobs while the gateway is in use; what
    #: another replica or `scancel` did shows within this plus one listing
    view_refresh_seconds: Annotated[float, msgspec.Meta(ge=0.1, le=60)] = 1.0
    #: no two job listings start closer than this: the most slurmctld RPCs reads can cause
    #: is one per this many seconds
    view_min_gap_seconds: Annotated[float, msgspec.Meta(ge=0.05, le=60)] = 0.25
    #: while slurmrestd or slurmctld fails, reads (and the prompt path's lookup of running
    #: services) answer from the view this long, then 503
    view_max_stale_seconds: Annotated[float, msgspec.Meta(ge=1, le=3600)] = 30.0

    #: the secret of `GATEWAY_SECRET_FILE` given directly (set one of the two)
    secret: str | None = None
    #: a file holding the secret that signs the job comments' metadata and derives each
    #: service's key (16 bytes or more; the same on every replica). Required with `static`
    #: auth; with `mint` it defaults to one derived from the JWT key, so rotating that key
    #: hides the services started before
    secret_file: str | None = None

    # Client authentication (docs/auth.md): any of the next two or an issuer turns it on.
    #: the auth file (TOML): tenants, their quotas and account, API keys (as SHA-256
    #: hashes), the OIDC allow-list; re-read when it changes
    auth_file: str | None = None
    #: callers may send their own Slurm JWT in `X-SLURM-USER-TOKEN` and act as themselves
    auth_slurm_tokens: bool = False
    #: without the cluster's key, new Slurm tokens a replica asks slurmrestd about a second,
    #: as many again of users whose token checked out in the last day; then 503 + `Retry-After`
    slurm_token_checks_per_second: Annotated[float, msgspec.Meta(gt=0, le=1000)] = 5.0
    #: of those, per client address a second (5 at once); then 429 with `Retry-After`
    slurm_token_checks_per_client: Annotated[float, msgspec.Meta(gt=0, le=1000)] = 1.0
    #: accept OIDC bearer tokens of this issuer (`https://`; `http://` on loopback only)
    oidc_issuer: str | None = None
    #: the audience tokens must carry (the gateway's client id); required with an issuer
    oidc_audience: str | None = None
    #: where the issuer's signing keys are (unset: from its discovery document); cached 5
    #: minutes, refetched (at most every 30 s) for a key id it does not know
    oidc_jwks_url: str | None = None
    #: accepted signature algorithms; asymmetric ones only (`HS*` and `none` are refused at
    #: start-up)
    oidc_algorithms: str = "RS256,ES256"
    #: the claim that names the caller
    oidc_user_claim: str = "preferred_username"
    #: a rule for callers not in the allow-list: the claim must match this regex whole; its
    #: group `user` (else the whole value) is the Slurm user and the tenant
    oidc_user_pattern: str | None = None
    #: serve a non-loopback `GATEWAY_HOST` with no authentication (warned at every start)
    allow_unauthenticated: bool = False
    #: serve the API document and its viewer (`/api/v1/schema`) without authentication
    public_schema: bool = False
    #: Slurm users no caller may act as, whatever its credentials say (403); add the site's
    #: `SlurmUser` if it is not `slurm`: it can read the cluster's JWT key
    denied_slurm_users: str = "root,slurm"

    #: the deployments file (TOML): named replicas of a recipe kept running across time
    #: limits and failures, re-read when it changes ([deployments](deployments.md))
    deployments_file: str | None = None
    #: seconds before a deployment replica's time limit its successor is submitted; unset:
    #: twice the deployment's observed start-up time plus 15 s, at least 60 s, at most half
    #: the time limit
    deployment_lead_seconds: Annotated[float, msgspec.Meta(ge=0, le=86400)] | None = None
    #: seconds a replica handing over keeps its requests and streams once its successor
    #: answers (and no later than 15 s before its time limit); then it is stopped
    deployment_drain_seconds: Annotated[float, msgspec.Meta(ge=0, le=3600)] = 30.0
    #: seconds a replica waits, after it reads a removal, a lower count or a new generation in
    #: the deployments file, before it acts on it: longer than a ConfigMap takes to reach every
    #: replica, so that none undoes what another does
    deployment_change_grace_seconds: Annotated[float, msgspec.Meta(ge=0, le=3600)] = 120.0

    #: recipe folders, `:`-separated; a later one overrides an earlier one
    recipes_dirs: str = "recipes"
    #: site overlay (TOML) applied over the recipes
    site_file: str | None = None
    #: working directory of jobs on the cluster, where their stdout/stderr go; `{user}` is
    #: the job's Slurm user. Private to that user: one under `/tmp`, `/var/tmp`, `/dev/shm`,
    #: or that the gateway sees writable by all, is refused ([why](security.md#job-folder))
    job_dir: str = "/home/{user}"
    #: where the gateway sees cluster paths: `cluster_prefix=local_prefix`, comma-separated
    #: (for logs)
    path_map: str = ""
    #: most bytes of a log returned at once (logs are read only from `GATEWAY_JOB_DIR`:
    #: changing it hides the logs of services started before)
    log_max_bytes: Annotated[int, msgspec.Meta(ge=1024)] = 1024 * 1024
    #: seconds for a health probe of a service
    health_timeout: Seconds = 2.0
    #: how long a probe result is reused
    health_cache_seconds: Annotated[float, msgspec.Meta(ge=0)] = 3.0
    #: seconds for vLLM's whole answer to a prompt (streams: for the first chunk and between
    #: chunks); past it, 504 (an answer already started is cut off)
    vllm_timeout: Seconds = 300.0
    #: seconds a stream may last in all, however steadily it trickles; past it the stream
    #: ends with `event: error`
    vllm_stream_timeout: Seconds = 3600.0
    #: seconds to connect to a service; past it the request goes to another service of the
    #: model, or 504 (nothing was sent)
    vllm_connect_timeout: Seconds = 3.0
    #: prompts and `/v1` requests in flight per replica (per worker), streams included: the
    #: connection pool to services; past it, 503 + `Retry-After`
    vllm_max_connections: Annotated[int, msgspec.Meta(ge=1, le=65536)] = 4096
    #: of those, at most this many at one service (connections to it included): one that
    #: never answers holds no more; past it, 503 + `Retry-After`
    vllm_max_per_service: Annotated[int, msgspec.Meta(ge=1, le=65536)] = 1024
    #: of those, at most this many for one tenant (all its services and the shared ones);
    #: past it, 429 + `Retry-After`. No limit without authentication (one anonymous caller)
    vllm_max_per_tenant: Annotated[int, msgspec.Meta(ge=1, le=65536)] = 1024
    #: how long a request waits for one of those slots before it is refused
    vllm_queue_seconds: Annotated[float, msgspec.Meta(ge=0, le=60)] = 0.5
    #: bytes of request bodies and of answers held whole, per replica (256 MiB); a request
    #: past it is refused 503 + `Retry-After` ([sharing a replica](openai.md#sharing-a-replica))
    vllm_max_buffered_bytes: Annotated[int, msgspec.Meta(ge=1024 * 1024)] = 256 * 1024 * 1024
    #: `/v1` requests whose `messages` (or `prompt`) share their first KiB go to the same
    #: service of the model, unless it has twice the requests of the least busy one (and 4
    #: more), so that vLLM's prefix cache spares them the shared part; off: the least busy one
    routing_prefix_affinity: bool = True

    @property
    def authenticates(self) -> bool:
        return bool(self.auth_file or self.oidc_issuer or self.auth_slurm_tokens)

    @property
    def listen_host(self) -> str:
        if self.host is not None:
            return self.host
        return "0.0.0.0" if self.authenticates else "127.0.0.1"  # noqa: S104

    def denied_slurm_user_set(self) -> frozenset[str]:
        return frozenset(u.strip() for u in self.denied_slurm_users.split(",") if u.strip())

    def oidc_algorithm_list(self) -> list[str]:
        return [a.strip() for a in self.oidc_algorithms.split(",") if a.strip()]

    def recipe_folders(self) -> list[Path]:
        return [Path(p) for p in self.recipes_dirs.split(":") if p]

    def path_mapping(self) -> list[tuple[str, str]]:
        """``GATEWAY_PATH_MAP``: ``cluster_prefix=local_prefix`` pairs, comma separated."""
        pairs = []
        for item in self.path_map.split(","):
            if item.strip():
                remote, _, local = item.partition("=")
                pairs.append((remote.strip(), local.strip()))
        # Longest prefix first, so /home/x wins over /.
        return sorted(pairs, key=lambda p: len(p[0]), reverse=True)

    def __repr__(self) -> str:
        # Never print the token, even in a debugger or a crash report.
        shown = (
            f"{f}=" + repr("<hidden>" if f in _HIDDEN and getattr(self, f) else getattr(self, f))
            for f in self.__struct_fields__
        )
        return "Settings(" + ", ".join(shown) + ")"


_HIDDEN = frozenset({"slurm_token", "secret"})


_FIELD_IN_PATH = re.compile(r"at `\$\.([a-z_]+)")


# GATEWAY_ variables of the project's scripts, not of the gateway (not warned about;
# scripts/settings_doc.py describes them).
_TOOLING = frozenset(
    """
    GATEWAY_LOCAL_ROOT GATEWAY_LOCAL_START_TIMEOUT GATEWAY_DEBIAN_MIRROR
    GATEWAY_DEBIAN_SECURITY_MIRROR GATEWAY_IMAGE_SOURCE GATEWAY_IMAGE_GLIBC
    GATEWAY_IMAGE_BASE_MAX_AGE_DAYS GATEWAY_VLLM_VERSION GATEWAY_VLLM_CLUSTER
    GATEWAY_TORCH_WHEELS
    """.split()  # noqa: SIM905 (one name a word keeps the list short)
)


def unknown_variables(environ: Mapping[str, str] | None = None) -> list[tuple[str, str | None]]:
    """GATEWAY_ variables that are no setting, each with the closest setting:
    a misspelled one would otherwise be ignored without a word."""
    env = os.environ if environ is None else environ
    known = {env_name(field) for field in Settings.__struct_fields__}
    fields = list(Settings.__struct_fields__)
    found = []
    for name in sorted(env):
        if name.startswith(PREFIX) and name not in known and name not in _TOOLING:
            # Compared without the prefix, which every name shares.
            close = difflib.get_close_matches(name.removeprefix(PREFIX).lower(), fields, n=1)
            found.append((name, env_name(close[0]) if close else None))
    return found


# The most workers GATEWAY_WORKERS=0 starts: each lists Slurm's jobs on its own.
AUTO_WORKERS_MAX = 8


def usable_cpus(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """CPUs this process may run on: its affinity, within its cgroup's (v2)
    quota, which is how Kubernetes applies a CPU limit."""
    cpus = len(os.sched_getaffinity(0))
    try:
        quota, period = (cgroup / "cpu.max").read_text().split()
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota readable: the affinity alone
    return max(1, cpus)


def server_workers(settings: Settings) -> int:
    """The worker processes to start (``GATEWAY_WORKERS``, 0 resolved)."""
    return settings.workers or min(usable_cpus(), AUTO_WORKERS_MAX)


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    env = os.environ if environ is None else environ
    raw: dict[str, Any] = {}
    for field in Settings.__struct_fields__:
        value = env.get(env_name(field))
        if value is not None and value != "":
            raw[field] = value
    try:
        settings = msgspec.convert(raw, Settings, strict=False)
    except msgspec.ValidationError as exc:
        match = _FIELD_IN_PATH.search(str(exc))
        name = env_name(match.group(1)) if match else "a GATEWAY_ variable"
        reason = str(exc).split(" - at ")[0]
        raise SettingsError(f"{name}: {reason}") from None
    if settings.slurm_cluster_file is not None:
        settings = _apply_cluster_file(settings, raw)
    check_slurm(settings)
    check_auth(settings)
    return settings


def _apply_cluster_file(settings: Settings, explicit: Mapping[str, Any]) -> Settings:
    path = settings.slurm_cluster_file
    assert path is not None
    try:
        info = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SettingsError(
            f"{env_name('slurm_cluster_file')}: cannot read {path}: {exc}"
        ) from None
    user = info.get("user")
    from_file = {
        "slurm_url": info.get("url"),
        "slurm_user": user,
        "slurm_jwt_key_file": info.get("jwt_key"),
        "slurm_partition": info.get("partition"),
        "job_dir": "/home/{user}" if user else None,
        # Jobs of a chroot cluster write their files under the chroot.
        "path_map": f"/={info['chroot']}" if info.get("chroot") else None,
    }
    updates = {k: v for k, v in from_file.items() if v and k not in explicit}
    return msgspec.convert({**msgspec.structs.asdict(settings), **updates}, Settings, strict=False)

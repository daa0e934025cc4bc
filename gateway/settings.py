"""One typed settings object, read from ``GATEWAY_*`` environment variables.

Validation happens once, at start-up; a bad value stops the process with a
message naming the variable. Every variable is listed in README.md.
"""

from __future__ import annotations

import difflib
import enum
import ipaddress
import json
import os
import re
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import msgspec

PREFIX = "GATEWAY_"


class SlurmAuthMode(enum.StrEnum):
    MINT = "mint"  # sign tokens with the cluster's JWT key
    STATIC = "static"  # a token from GATEWAY_SLURM_TOKEN or GATEWAY_SLURM_TOKEN_FILE


Seconds = Annotated[float, msgspec.Meta(gt=0)]
Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]


class Settings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    # Unset: all interfaces when clients authenticate, else loopback only.
    host: str | None = None
    port: Port = 8001
    log_level: str = "info"
    # Server processes on one port; each is a replica with its own job view.
    workers: Annotated[int, msgspec.Meta(ge=1, le=64)] = 1
    access_log: bool = True
    # On SIGTERM: answer not-ready (still serving) for the drain, then close the
    # listener and give open requests and streams up to the grace to finish.
    shutdown_drain_seconds: Annotated[int, msgspec.Meta(ge=0, le=3600)] = 0
    shutdown_grace_seconds: Annotated[int, msgspec.Meta(ge=0, le=3600)] = 30

    # A cluster.json written by deploy/local/cluster.sh fills the slurm_* values
    # below that are not set explicitly.
    slurm_cluster_file: str | None = None
    slurm_url: str = ""
    slurm_api_version: str | None = None
    slurm_user: str = ""
    slurm_auth: SlurmAuthMode = SlurmAuthMode.MINT
    slurm_jwt_key_file: str | None = None
    slurm_jwt_lifespan: Annotated[int, msgspec.Meta(ge=30)] = 1800
    slurm_token: str | None = None
    slurm_token_file: str | None = None
    slurm_timeout: Seconds = 10.0
    slurm_connect_timeout: Seconds = 3.0
    slurm_partition: str | None = None
    slurm_account: str | None = None
    # At most this many slurmrestd calls in flight per replica; a call that
    # waits longer than the queue timeout for a slot is answered 503.
    slurm_max_concurrency: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 16
    slurm_queue_timeout_seconds: Annotated[float, msgspec.Meta(ge=0, le=60)] = 2.0
    # The shared job view: one job listing per interval while in use, and
    # never two listings closer than the minimum gap (the slurmctld RPC bound).
    view_refresh_seconds: Annotated[float, msgspec.Meta(ge=0.1, le=60)] = 1.0
    view_min_gap_seconds: Annotated[float, msgspec.Meta(ge=0.05, le=60)] = 0.25
    # While listings fail, reads (prompts included) answer from the view this long.
    view_max_stale_seconds: Annotated[float, msgspec.Meta(ge=1, le=3600)] = 30.0

    # Authenticates what the gateway writes into job comments and derives each
    # service's upstream key; every replica needs the same one. Defaults to one
    # derived from the Slurm JWT key (mint mode).
    secret: str | None = None
    secret_file: str | None = None

    # Client authentication (README "Authentication"). Any of the three turns it on.
    # API keys, tenants, quotas and the OIDC allow-list; re-read when it changes.
    auth_file: str | None = None
    # Callers may present their own Slurm JWT (X-SLURM-USER-TOKEN) and act as themselves.
    auth_slurm_tokens: bool = False
    # Without the cluster's key each new Slurm token costs slurmctld a ping: per
    # replica, new tokens a second of users not verified lately (and as many of
    # users verified), and per client address (gateway/auth/budget.py).
    slurm_token_checks_per_second: Annotated[float, msgspec.Meta(gt=0, le=1000)] = 5.0
    slurm_token_checks_per_client: Annotated[float, msgspec.Meta(gt=0, le=1000)] = 1.0
    oidc_issuer: str | None = None
    oidc_audience: str | None = None
    oidc_jwks_url: str | None = None  # default: from the issuer's discovery document
    oidc_algorithms: str = "RS256,ES256"
    oidc_user_claim: str = "preferred_username"
    # A rule for callers not in the allow-list: the claim must match it whole;
    # its group `user` (else the whole value) is the Slurm user.
    oidc_user_pattern: str | None = None
    # Serve a non-loopback address with no authentication (logged at start).
    allow_unauthenticated: bool = False
    # The API document and its viewer without authentication.
    public_schema: bool = False
    # Slurm users no caller may act as, whatever a key, token or rule says:
    # root, and the cluster's SlurmUser (who can read its JWT key).
    denied_slurm_users: str = "root,slurm"

    # Services
    recipes_dirs: str = "recipes"
    site_file: str | None = None
    # A folder on the cluster for job output; `{user}` stands for the job's Slurm user.
    # Private to that user: see _check_job_dir.
    job_dir: str = "/home/{user}"
    path_map: str = ""
    log_max_bytes: Annotated[int, msgspec.Meta(ge=1024)] = 1024 * 1024
    health_timeout: Seconds = 2.0
    health_cache_seconds: Annotated[float, msgspec.Meta(ge=0)] = 3.0
    # A non-streamed answer whole, and a stream's first chunk and each gap;
    # a whole stream at most vllm_stream_timeout.
    vllm_timeout: Seconds = 300.0
    vllm_stream_timeout: Seconds = 3600.0
    # The data path's share-out per replica (gateway/upstream/limits.py):
    # requests in flight in all, at one service and for one tenant; how long
    # one waits for a slot before 503/429; bytes of bodies and buffered answers.
    vllm_max_connections: Annotated[int, msgspec.Meta(ge=1, le=65536)] = 4096
    vllm_max_per_service: Annotated[int, msgspec.Meta(ge=1, le=65536)] = 1024
    vllm_max_per_tenant: Annotated[int, msgspec.Meta(ge=1, le=65536)] = 1024
    vllm_queue_seconds: Annotated[float, msgspec.Meta(ge=0, le=60)] = 0.5
    vllm_max_buffered_bytes: Annotated[int, msgspec.Meta(ge=1024 * 1024)] = 256 * 1024 * 1024

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
        fields = {
            f: ("<hidden>" if f in _HIDDEN and getattr(self, f) else getattr(self, f))
            for f in self.__struct_fields__
        }
        return "Settings(" + ", ".join(f"{k}={v!r}" for k, v in fields.items()) + ")"


_HIDDEN = frozenset({"slurm_token", "secret"})


class SettingsError(ValueError):
    """A setting is missing or invalid; the message names the variable."""


def env_name(field: str) -> str:
    return PREFIX + field.upper()


_FIELD_IN_PATH = re.compile(r"at `\$\.([a-z_]+)")


# GATEWAY_ variables of the project's scripts and tests, not of the gateway.
_TOOLING = frozenset(
    {
        "GATEWAY_LOCAL_ROOT",
        "GATEWAY_LOCAL_START_TIMEOUT",
        "GATEWAY_DEBIAN_MIRROR",
        "GATEWAY_DEBIAN_SECURITY_MIRROR",
        "GATEWAY_IMAGE_SOURCE",
        "GATEWAY_IMAGE_GLIBC",
        "GATEWAY_IMAGE_BASE_MAX_AGE_DAYS",
        "GATEWAY_VLLM_VERSION",
        "GATEWAY_VLLM_CLUSTER",
        "GATEWAY_TORCH_WHEELS",
    }
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
    _check_slurm(settings)
    _check_auth(settings)
    return settings


# Asymmetric only: an HS* token would be checked with a public key as its secret.
OIDC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _check_auth(s: Settings) -> None:
    if not s.authenticates and not s.allow_unauthenticated and not is_loopback(s.listen_host):
        raise SettingsError(
            f"{env_name('host')}: {s.host} is not a loopback address and no client "
            f"authentication is configured; set {env_name('auth_file')}, "
            f"{env_name('oidc_issuer')} or {env_name('auth_slurm_tokens')}, or "
            f"{env_name('allow_unauthenticated')}=true to serve anyone who can reach it"
        )
    if s.oidc_issuer is None:
        for field in ("oidc_audience", "oidc_jwks_url", "oidc_user_pattern"):
            if getattr(s, field) is not None:
                raise SettingsError(f"{env_name(field)}: needs {env_name('oidc_issuer')}")
        return
    for field in ("oidc_issuer", "oidc_jwks_url"):
        url = getattr(s, field)
        if url is None:
            continue
        parsed = urllib.parse.urlsplit(url)
        local = parsed.scheme == "http" and is_loopback(parsed.hostname or "")
        if not (parsed.scheme == "https" or local) or not parsed.hostname:
            raise SettingsError(
                f"{env_name(field)}: {url!r} must be an https:// URL (http:// on loopback only)"
            )
    if not s.oidc_audience:
        raise SettingsError(
            f"{env_name('oidc_audience')}: required with {env_name('oidc_issuer')} "
            "(the client id tokens must be issued for)"
        )
    algorithms = s.oidc_algorithm_list()
    bad = [a for a in algorithms if a not in OIDC_ALGORITHMS]
    if bad or not algorithms:
        raise SettingsError(
            f"{env_name('oidc_algorithms')}: {', '.join(bad) or 'empty'}: use asymmetric "
            "algorithms only: " + ", ".join(sorted(OIDC_ALGORITHMS))
        )
    if s.oidc_user_pattern is not None:
        try:
            re.compile(s.oidc_user_pattern)
        except re.error as exc:
            raise SettingsError(f"{env_name('oidc_user_pattern')}: not a regex: {exc}") from None


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


# Writable by every user on any Unix system.
_SHARED_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/shm")  # noqa: S108


def _check_job_dir(s: Settings) -> None:
    """A job's output files have predictable names (the job name and id), and
    slurmd opens them as the job's user, following links: in a folder other
    users can write, any of them can create or link the next job's files
    first, to read its logs or make it write over the user's own files."""
    why = "use a folder only the job's Slurm user can write, such as /home/{user}"
    for shared in _SHARED_DIRS:
        if s.job_dir == shared or s.job_dir.startswith(shared + "/"):
            raise SettingsError(
                f"{env_name('job_dir')}: {s.job_dir} is under {shared}, which every user of "
                f"the cluster can write; {why}"
            )
    # Where the gateway sees the folder (the same file system, or through the
    # path map), it checks the mode too.
    cluster_path = s.job_dir.replace("{user}", s.slurm_user or "")
    local = cluster_path
    for remote, mapped in s.path_mapping():
        if cluster_path == remote or cluster_path.startswith(remote.rstrip("/") + "/"):
            local = mapped.rstrip("/") + "/" + cluster_path[len(remote.rstrip("/")) :].lstrip("/")
            break
    try:
        mode = os.stat(local).st_mode
    except OSError:
        return
    if mode & 0o002:
        raise SettingsError(
            f"{env_name('job_dir')}: {cluster_path} is writable by every user (mode "
            f"{mode & 0o7777:o}); {why}"
        )


def _check_slurm(s: Settings) -> None:
    if not s.slurm_url:
        raise SettingsError(
            f"{env_name('slurm_url')}: required (the slurmrestd base URL, "
            "e.g. http://127.0.0.1:6820), or set "
            f"{env_name('slurm_cluster_file')}"
        )
    for remote, local in s.path_mapping():
        if not remote.startswith("/") or not local.startswith("/"):
            raise SettingsError(
                f"{env_name('path_map')}: {remote}={local}: both sides must be absolute paths"
            )
    if not s.job_dir.startswith("/"):
        raise SettingsError(f"{env_name('job_dir')}: must be an absolute path on the cluster")
    rest = s.job_dir.replace("{user}", "")
    if "{" in rest or "}" in rest:
        raise SettingsError(f"{env_name('job_dir')}: the only placeholder is {{user}}")
    _check_job_dir(s)
    if not re.match(r"^https?://", s.slurm_url):
        raise SettingsError(f"{env_name('slurm_url')}: must start with http:// or https://")
    if s.slurm_api_version is not None:
        from gateway.slurm.adapters import SUPPORTED_VERSIONS

        if s.slurm_api_version not in SUPPORTED_VERSIONS:
            raise SettingsError(
                f"{env_name('slurm_api_version')}: {s.slurm_api_version!r} is not one of "
                + ", ".join(SUPPORTED_VERSIONS)
            )
    if s.slurm_auth is SlurmAuthMode.MINT:
        if s.slurm_jwt_key_file is None:
            raise SettingsError(
                f"{env_name('slurm_jwt_key_file')}: required when {env_name('slurm_auth')}=mint"
            )
        if not s.slurm_user:
            raise SettingsError(
                f"{env_name('slurm_user')}: required when {env_name('slurm_auth')}=mint"
            )
    elif (s.slurm_token is None) == (s.slurm_token_file is None):
        raise SettingsError(
            f"{env_name('slurm_token')} or {env_name('slurm_token_file')}: set exactly one "
            f"when {env_name('slurm_auth')}=static"
        )
    for field in ("vllm_max_per_service", "vllm_max_per_tenant"):
        if getattr(s, field) > s.vllm_max_connections:
            raise SettingsError(
                f"{env_name(field)}: must not exceed {env_name('vllm_max_connections')} "
                f"({s.vllm_max_connections})"
            )
    if s.view_min_gap_seconds > s.view_refresh_seconds:
        raise SettingsError(
            f"{env_name('view_min_gap_seconds')}: must not exceed "
            f"{env_name('view_refresh_seconds')} ({s.view_refresh_seconds})"
        )
    if s.secret is not None and s.secret_file is not None:
        raise SettingsError(f"{env_name('secret')} or {env_name('secret_file')}: set one, not both")
    if s.slurm_auth is SlurmAuthMode.STATIC and s.secret is None and s.secret_file is None:
        raise SettingsError(
            f"{env_name('secret_file')} or {env_name('secret')}: required when "
            f"{env_name('slurm_auth')}=static (a secret every replica shares, at least 16 "
            "bytes, e.g. `openssl rand -hex 32`)"
        )

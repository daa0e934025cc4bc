"""The checks of settings that span several variables (gateway/settings.py
runs them at start-up): Slurm, the job folder, client authentication."""

from __future__ import annotations

import enum
import ipaddress
import os
import re
import urllib.parse
from typing import Any

PREFIX = "GATEWAY_"


class SlurmAuthMode(enum.StrEnum):
    MINT = "mint"  # sign tokens with the cluster's JWT key
    STATIC = "static"  # a token from GATEWAY_SLURM_TOKEN or GATEWAY_SLURM_TOKEN_FILE


class SettingsError(ValueError):
    """A setting is missing or invalid; the message names the variable."""


def env_name(field: str) -> str:
    return PREFIX + field.upper()


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


def check_auth(s: Any) -> None:
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
        if (url := getattr(s, field)) is None:
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


# Writable by every user on any Unix system.
_SHARED_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/shm")  # noqa: S108


def _check_job_dir(s: Any) -> None:
    # Job output files have predictable names and slurmd follows links: in a folder
    # others can write, they could plant the next job's files to read or overwrite.
    why = "use a folder only the job's Slurm user can write, such as /home/{user}"
    for shared in _SHARED_DIRS:
        if s.job_dir == shared or s.job_dir.startswith(shared + "/"):
            raise SettingsError(
                f"{env_name('job_dir')}: {s.job_dir} is under {shared}, which every user of "
                f"the cluster can write; {why}"
            )
    # Where the gateway sees the folder (directly or through the path map), the mode too.
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


def check_slurm(s: Any) -> None:
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

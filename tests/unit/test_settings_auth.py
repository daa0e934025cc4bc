"""Settings of client authentication: who may listen where, OIDC, job folders."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

import gateway.__main__ as gateway_main
from gateway.app import create_app
from gateway.settings import SettingsError, load_settings, unknown_variables

BASE = {
    "GATEWAY_SLURM_URL": "http://127.0.0.1:6820",
    "GATEWAY_SLURM_USER": "gwuser",
    "GATEWAY_SLURM_JWT_KEY_FILE": "/etc/slurm/jwt_hs256.key",
}
ANY_HOST = "0.0.0.0"  # noqa: S104 - what is tested
OIDC = {
    "GATEWAY_OIDC_ISSUER": "https://idp.example.org/realms/hpc",
    "GATEWAY_OIDC_AUDIENCE": "slurm-ai-gateway",
}


def load(**env: str) -> Any:
    return load_settings({**BASE, **env})


def refused(**env: str) -> str:
    with pytest.raises(SettingsError) as caught:
        load(**env)
    return str(caught.value)


# --- where the gateway listens -----------------------------------------------------------


def test_without_auth_the_default_is_loopback() -> None:
    settings = load()
    assert not settings.authenticates
    assert settings.host is None
    assert settings.listen_host == "127.0.0.1"


@pytest.mark.parametrize(
    "env",
    [
        {"GATEWAY_AUTH_FILE": "/etc/gateway/auth.toml"},
        {"GATEWAY_AUTH_SLURM_TOKENS": "true"},
        OIDC,
    ],
    ids=["auth-file", "slurm-tokens", "oidc"],
)
def test_with_auth_the_default_is_every_interface(env: dict[str, str]) -> None:
    settings = load(**env)
    assert settings.authenticates
    assert settings.listen_host == ANY_HOST


@pytest.mark.parametrize("host", [ANY_HOST, "::", "192.168.1.5", "gateway.example.org"])
def test_a_public_host_without_auth_stops_start_up_naming_gateway_host(host: str) -> None:
    message = refused(GATEWAY_HOST=host)
    assert message.startswith("GATEWAY_HOST:")
    assert host in message
    assert "GATEWAY_ALLOW_UNAUTHENTICATED" in message
    assert "GATEWAY_AUTH_FILE" in message


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_a_loopback_host_needs_no_auth(host: str) -> None:
    assert load(GATEWAY_HOST=host).listen_host == host


def test_the_opt_out_allows_a_public_host() -> None:
    settings = load(GATEWAY_HOST=ANY_HOST, GATEWAY_ALLOW_UNAUTHENTICATED="true")
    assert settings.allow_unauthenticated
    assert not settings.authenticates
    assert settings.listen_host == ANY_HOST


def test_the_opt_out_alone_still_listens_on_loopback() -> None:
    assert load(GATEWAY_ALLOW_UNAUTHENTICATED="true").listen_host == "127.0.0.1"


def test_the_opt_out_must_be_a_boolean() -> None:
    message = refused(GATEWAY_HOST=ANY_HOST, GATEWAY_ALLOW_UNAUTHENTICATED="please")
    assert message.startswith("GATEWAY_ALLOW_UNAUTHENTICATED:")


@pytest.mark.parametrize("value", ["false", "0"])
def test_the_opt_out_set_to_false_is_no_opt_out(value: str) -> None:
    assert refused(GATEWAY_HOST=ANY_HOST, GATEWAY_ALLOW_UNAUTHENTICATED=value).startswith(
        "GATEWAY_HOST:"
    )


def test_a_public_host_with_auth_is_fine() -> None:
    settings = load(GATEWAY_HOST=ANY_HOST, GATEWAY_AUTH_FILE="/etc/gateway/auth.toml")
    assert settings.listen_host == ANY_HOST


def test_an_explicit_loopback_host_wins_over_the_auth_default() -> None:
    settings = load(GATEWAY_HOST="127.0.0.1", GATEWAY_AUTH_FILE="/etc/gateway/auth.toml")
    assert settings.listen_host == "127.0.0.1"


def test_python_m_gateway_exits_2_naming_gateway_host(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in [n for n in os.environ if n.startswith("GATEWAY_")]:
        monkeypatch.delenv(name)
    for name, value in {**BASE, "GATEWAY_HOST": ANY_HOST}.items():
        monkeypatch.setenv(name, value)

    class NoServer:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            raise AssertionError("the gateway was about to serve 0.0.0.0 without auth")

    monkeypatch.setattr("gateway.__main__.uvicorn.Server", NoServer)
    assert gateway_main.main() == 2
    err = capsys.readouterr().err
    assert "configuration error: GATEWAY_HOST:" in err


def test_a_misspelt_auth_variable_is_pointed_out() -> None:
    found = dict(unknown_variables({**BASE, "GATEWAY_OIDC_ISUER": "https://x"}))
    assert found == {"GATEWAY_OIDC_ISUER": "GATEWAY_OIDC_ISSUER"}


# --- OIDC ------------------------------------------------------------------------------------


def test_oidc_defaults() -> None:
    settings = load(**OIDC)
    assert settings.oidc_algorithm_list() == ["RS256", "ES256"]
    assert settings.oidc_user_claim == "preferred_username"
    assert settings.oidc_jwks_url is None


@pytest.mark.parametrize(
    "issuer",
    [
        "http://127.0.0.1:8080/realms/dev",
        "http://localhost:8080/realms/dev",
        "http://[::1]:8080",
        "https://idp.example.org",
    ],
)
def test_an_issuer_over_http_is_allowed_on_loopback_only(issuer: str) -> None:
    assert load(**{**OIDC, "GATEWAY_OIDC_ISSUER": issuer}).oidc_issuer == issuer


@pytest.mark.parametrize(
    "issuer",
    [
        "http://idp.example.org",
        "http://10.0.0.1:8080",
        "http://127.0.0.1.example.org",
        "http://localhost.example.org",
        "ftp://idp.example.org",
        "idp.example.org",
        "https://",
    ],
)
def test_an_issuer_that_is_not_https_is_refused(issuer: str) -> None:
    message = refused(**{**OIDC, "GATEWAY_OIDC_ISSUER": issuer})
    assert message.startswith("GATEWAY_OIDC_ISSUER:")
    assert "https://" in message


def test_a_jwks_url_over_http_is_refused_off_loopback() -> None:
    ok = load(**OIDC, GATEWAY_OIDC_JWKS_URL="https://idp.example.org/certs")
    assert ok.oidc_jwks_url == "https://idp.example.org/certs"
    local = load(**OIDC, GATEWAY_OIDC_JWKS_URL="http://127.0.0.1:9000/certs")
    assert local.oidc_jwks_url == "http://127.0.0.1:9000/certs"
    message = refused(**OIDC, GATEWAY_OIDC_JWKS_URL="http://idp.example.org/certs")
    assert message.startswith("GATEWAY_OIDC_JWKS_URL:")


def test_an_audience_is_required() -> None:
    message = refused(GATEWAY_OIDC_ISSUER="https://idp.example.org")
    assert message.startswith("GATEWAY_OIDC_AUDIENCE: required")


@pytest.mark.parametrize(
    ("algorithms", "named"),
    [
        ("HS256", "HS256"),
        ("RS256,HS256", "HS256"),
        ("HS512", "HS512"),
        ("none", "none"),
        ("RS256, none", "none"),
        ("rs256", "rs256"),
        (" , ", "empty"),
    ],
)
def test_symmetric_or_no_algorithms_are_refused(algorithms: str, named: str) -> None:
    message = refused(**OIDC, GATEWAY_OIDC_ALGORITHMS=algorithms)
    assert message.startswith("GATEWAY_OIDC_ALGORITHMS:")
    assert named in message
    assert "asymmetric" in message


def test_asymmetric_algorithms_are_taken_trimmed() -> None:
    settings = load(**OIDC, GATEWAY_OIDC_ALGORITHMS=" RS256 , ES384,EdDSA ")
    assert settings.oidc_algorithm_list() == ["RS256", "ES384", "EdDSA"]


@pytest.mark.parametrize("pattern", ["(", "(?P<user>[a-z]+", "[a-z", "*x"])
def test_a_user_pattern_that_is_no_regex_is_refused(pattern: str) -> None:
    message = refused(**OIDC, GATEWAY_OIDC_USER_PATTERN=pattern)
    assert message.startswith("GATEWAY_OIDC_USER_PATTERN: not a regex")


def test_a_good_user_pattern_is_kept() -> None:
    pattern = r"(?P<user>[a-z][a-z0-9]*)@example\.org"
    assert load(**OIDC, GATEWAY_OIDC_USER_PATTERN=pattern).oidc_user_pattern == pattern


@pytest.mark.parametrize(
    "env",
    [
        {"GATEWAY_OIDC_AUDIENCE": "gateway"},
        {"GATEWAY_OIDC_JWKS_URL": "https://idp.example.org/certs"},
        {"GATEWAY_OIDC_USER_PATTERN": "(?P<user>.+)"},
    ],
)
def test_oidc_settings_without_an_issuer_are_refused(env: dict[str, str]) -> None:
    [name] = env
    message = refused(**env)
    assert message == f"{name}: needs GATEWAY_OIDC_ISSUER"


def test_oidc_without_issuer_is_not_authentication() -> None:
    """An issuer-less OIDC setting never silently turns the gateway public."""
    assert refused(GATEWAY_HOST=ANY_HOST, GATEWAY_OIDC_AUDIENCE="gw").startswith("GATEWAY_HOST:")


# --- GATEWAY_JOB_DIR ---------------------------------------------------------------------------


@pytest.mark.parametrize("job_dir", ["/home/{user}", "/scratch/{user}/gateway", "/srv/jobs"])
def test_job_dir_with_the_user_placeholder(job_dir: str) -> None:
    assert load(GATEWAY_JOB_DIR=job_dir).job_dir == job_dir


def test_the_default_job_dir_is_each_users_own() -> None:
    assert load().job_dir == "/home/{user}"


@pytest.mark.parametrize(
    "job_dir", ["/tmp", "/tmp/", "/tmp/{user}", "/var/tmp/gateway", "/dev/shm/{user}"]
)
def test_a_job_dir_every_user_can_write_is_refused(job_dir: str) -> None:
    """Output files have predictable names: another user could create or link
    them first (read the logs, or make the job write over the user's files)."""
    message = refused(GATEWAY_JOB_DIR=job_dir)
    assert message.startswith(f"GATEWAY_JOB_DIR: {job_dir} is under /")
    assert "every user of the cluster can write" in message


def test_a_world_writable_job_dir_the_gateway_sees_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "cluster" / "shared"
    shared.mkdir(parents=True)
    shared.chmod(0o1777)
    message = refused(GATEWAY_JOB_DIR="/shared", GATEWAY_PATH_MAP=f"/={tmp_path}/cluster")
    assert message.startswith("GATEWAY_JOB_DIR: /shared is writable by every user (mode 1777)")
    shared.chmod(0o755)
    assert load(GATEWAY_JOB_DIR="/shared", GATEWAY_PATH_MAP=f"/={tmp_path}/cluster").job_dir


@pytest.mark.parametrize(
    "job_dir",
    ["/home/{name}", "/home/{user}/{job}", "/home/{USER}", "/home/{}", "/home/{user", "/x}"],
)
def test_job_dir_with_another_placeholder_is_refused(job_dir: str) -> None:
    message = refused(GATEWAY_JOB_DIR=job_dir)
    assert message == "GATEWAY_JOB_DIR: the only placeholder is {user}"


def test_job_dir_must_be_absolute() -> None:
    assert refused(GATEWAY_JOB_DIR="{user}/jobs").startswith(
        "GATEWAY_JOB_DIR: must be an absolute path"
    )


# --- the auth file at start-up ----------------------------------------------------------------


def app_settings(tmp_path: Path, **env: str) -> Any:
    key = tmp_path / "jwt.key"
    key.write_bytes(b"k" * 32)
    return load(GATEWAY_SLURM_JWT_KEY_FILE=str(key), **env)


def test_a_broken_auth_file_stops_start_up_naming_the_variable_and_field(
    tmp_path: Path,
) -> None:
    path = tmp_path / "auth.toml"
    path.write_text('[[keys]]\ntenant = "a"\nslurm_user = "alice"\nsha256 = "nothex"\n')
    with pytest.raises(SettingsError) as caught:
        create_app(app_settings(tmp_path, GATEWAY_AUTH_FILE=str(path)))
    message = str(caught.value)
    assert message.startswith("GATEWAY_AUTH_FILE:")
    assert "keys[0].sha256" in message


def test_a_missing_auth_file_stops_start_up(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(SettingsError) as caught:
        create_app(app_settings(tmp_path, GATEWAY_AUTH_FILE=str(missing)))
    assert str(caught.value).startswith("GATEWAY_AUTH_FILE: cannot read")
    assert str(missing) in str(caught.value)


def test_public_schema_is_a_boolean_setting() -> None:
    assert load().public_schema is False
    assert load(GATEWAY_PUBLIC_SCHEMA="true").public_schema is True
    assert refused(GATEWAY_PUBLIC_SCHEMA="open").startswith("GATEWAY_PUBLIC_SCHEMA:")

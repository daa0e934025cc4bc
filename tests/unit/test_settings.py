from __future__ import annotations

import json
import os
from pathlib import Path

import jwt
import pytest

from gateway.settings import (
    AUTO_WORKERS_MAX,
    SettingsError,
    SlurmAuthMode,
    load_settings,
    server_workers,
    usable_cpus,
)
from gateway.slurm import StaticToken
from gateway.wiring import metadata_codec, token_provider

SECRET = "s" * 32
BASE = {
    "GATEWAY_SLURM_URL": "http://127.0.0.1:6820",
    "GATEWAY_SLURM_USER": "gwuser",
    "GATEWAY_SLURM_JWT_KEY_FILE": "/etc/slurm/jwt_hs256.key",
}


def test_defaults() -> None:
    s = load_settings(BASE)
    assert s.port == 8001
    assert s.slurm_auth is SlurmAuthMode.MINT
    assert s.slurm_api_version is None
    assert s.slurm_timeout == 10.0


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"GATEWAY_PORT": "http"}, "GATEWAY_PORT: Expected `int`"),
        ({"GATEWAY_PORT": "70000"}, "GATEWAY_PORT: Expected `int` <= 65535"),
        ({"GATEWAY_SLURM_TIMEOUT": "0"}, "GATEWAY_SLURM_TIMEOUT: Expected `float` > 0"),
        ({"GATEWAY_SLURM_AUTH": "magic"}, "GATEWAY_SLURM_AUTH: Invalid enum value 'magic'"),
        ({"GATEWAY_SLURM_URL": "127.0.0.1:6820"}, "GATEWAY_SLURM_URL: must start with http"),
        ({"GATEWAY_SLURM_API_VERSION": "v0.0.37"}, "GATEWAY_SLURM_API_VERSION: 'v0.0.37'"),
        ({"GATEWAY_SLURM_USER": ""}, "GATEWAY_SLURM_USER: required"),
        ({"GATEWAY_SLURM_AUTH": "static"}, "GATEWAY_SLURM_TOKEN or GATEWAY_SLURM_TOKEN_FILE"),
    ],
)
def test_bad_values_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings({**BASE, **env})
    assert str(info.value).startswith(message)


def test_missing_url_is_explained() -> None:
    with pytest.raises(SettingsError, match="GATEWAY_SLURM_URL: required"):
        load_settings({})


def test_cluster_file_fills_slurm_settings(tmp_path: Path) -> None:
    path = tmp_path / "cluster.json"
    path.write_text(json.dumps({"url": "http://127.0.0.1:7820", "user": "gwuser", "jwt_key": "/k"}))
    s = load_settings({"GATEWAY_SLURM_CLUSTER_FILE": str(path)})
    assert (s.slurm_url, s.slurm_user, str(s.slurm_jwt_key_file)) == (
        "http://127.0.0.1:7820",
        "gwuser",
        "/k",
    )
    explicit = load_settings(
        {"GATEWAY_SLURM_CLUSTER_FILE": str(path), "GATEWAY_SLURM_URL": "http://other:1"}
    )
    assert explicit.slurm_url == "http://other:1"


def test_token_is_hidden_in_repr() -> None:
    s = load_settings(
        {
            **BASE,
            "GATEWAY_SLURM_AUTH": "static",
            "GATEWAY_SECRET": SECRET,
            "GATEWAY_SLURM_TOKEN": "eyJsecret",
        }
    )
    assert "eyJsecret" not in repr(s)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "GATEWAY_SLURM_JWT_KEY_FILE: cannot read the JWT key file /nonexistent/jwt.key"),
        (
            {
                "GATEWAY_SLURM_AUTH": "static",
                "GATEWAY_SECRET": SECRET,
                "GATEWAY_SLURM_TOKEN": "not-a-jwt",
            },
            "GATEWAY_SLURM_TOKEN: the configured Slurm token is not a JWT",
        ),
        (
            {
                "GATEWAY_SLURM_AUTH": "static",
                "GATEWAY_SECRET": SECRET,
                "GATEWAY_SLURM_TOKEN_FILE": "/nonexistent/token",
            },
            "GATEWAY_SLURM_TOKEN_FILE: cannot read the token file /nonexistent/token",
        ),
    ],
)
def test_unusable_credentials_stop_start_up(env: dict[str, str], message: str) -> None:
    settings = load_settings({**BASE, "GATEWAY_SLURM_JWT_KEY_FILE": "/nonexistent/jwt.key", **env})
    with pytest.raises(SettingsError) as info:
        token_provider(settings)
    assert str(info.value).startswith(message)
    assert "not-a-jwt" not in str(info.value)  # the token itself is never echoed


def test_a_good_static_token_file_is_accepted(tmp_path: Path) -> None:
    token = jwt.encode({"sun": "alice", "exp": 4_000_000_000}, "k" * 32, algorithm="HS256")
    path = tmp_path / "token"
    path.write_text(f"SLURM_JWT={token}\n")
    settings = load_settings(
        {
            **BASE,
            "GATEWAY_SLURM_AUTH": "static",
            "GATEWAY_SECRET": SECRET,
            "GATEWAY_SLURM_TOKEN_FILE": str(path),
        }
    )
    assert isinstance(token_provider(settings), StaticToken)


async def test_a_static_token_may_carry_the_scontrol_prefix() -> None:
    token = jwt.encode({"sun": "alice"}, "k" * 32, algorithm="HS256")
    settings = load_settings(
        {
            **BASE,
            "GATEWAY_SLURM_AUTH": "static",
            "GATEWAY_SECRET": SECRET,
            "GATEWAY_SLURM_TOKEN": f"SLURM_JWT={token}",
        }
    )
    credentials = await token_provider(settings).credentials()
    assert (credentials.user_name, credentials.token) == ("gwuser", token)


def test_static_tokens_need_a_shared_secret() -> None:
    env = {**BASE, "GATEWAY_SLURM_AUTH": "static", "GATEWAY_SLURM_TOKEN": "eyJsecret"}
    with pytest.raises(SettingsError, match="GATEWAY_SECRET_FILE or GATEWAY_SECRET: required"):
        load_settings(env)


def test_the_secret_is_checked_and_hidden(tmp_path: Path) -> None:
    s = load_settings({**BASE, "GATEWAY_SECRET": "short"})
    assert "short" not in repr(s)
    with pytest.raises(SettingsError, match="GATEWAY_SECRET: the metadata secret must be"):
        metadata_codec(s)
    with pytest.raises(SettingsError, match="GATEWAY_SECRET_FILE: cannot read"):
        metadata_codec(load_settings({**BASE, "GATEWAY_SECRET_FILE": str(tmp_path / "none")}))
    (tmp_path / "secret").write_text("q" * 40 + "\n")
    codec = metadata_codec(load_settings({**BASE, "GATEWAY_SECRET_FILE": str(tmp_path / "secret")}))
    same = metadata_codec(load_settings({**BASE, "GATEWAY_SECRET": "q" * 40}))
    meta = codec.new_meta(recipe="a/b", created=1.0, owner="u", environment={}, resources={})
    assert same.decode(codec.encode(meta, 7), 7) is not None  # every replica reads every other's


def test_a_misspelled_variable_is_named_with_the_setting_it_resembles() -> None:
    from gateway.settings import unknown_variables

    environ = {
        "GATEWAY_SHUTDOWN_DRAIN_SECOND": "15",  # the S missing
        "GATEWAY_SHUTDOWN_GRACE_SECONDS": "30",
        "GATEWAY_LOCAL_ROOT": "/var/lib/slurm-gateway-local",  # the scripts' own
        "GATEWAY_NOTHING_LIKE_IT": "1",
        "PATH": "/usr/bin",
    }
    assert unknown_variables(environ) == [
        ("GATEWAY_NOTHING_LIKE_IT", None),
        ("GATEWAY_SHUTDOWN_DRAIN_SECOND", "GATEWAY_SHUTDOWN_DRAIN_SECONDS"),
    ]


def test_slurm_token_check_budgets() -> None:
    s = load_settings(BASE)
    assert (s.slurm_token_checks_per_second, s.slurm_token_checks_per_client) == (5.0, 1.0)
    s = load_settings({**BASE, "GATEWAY_SLURM_TOKEN_CHECKS_PER_CLIENT": "0.5"})
    assert s.slurm_token_checks_per_client == 0.5
    for variable in ("PER_SECOND", "PER_CLIENT"):
        with pytest.raises(SettingsError) as info:
            load_settings({**BASE, f"GATEWAY_SLURM_TOKEN_CHECKS_{variable}": "0"})
        assert str(info.value).startswith(f"GATEWAY_SLURM_TOKEN_CHECKS_{variable}: Expected")


def test_workers_default_to_the_cpus_the_gateway_may_use(tmp_path: Path) -> None:
    affinity = len(os.sched_getaffinity(0))
    assert usable_cpus(tmp_path) == affinity  # no cgroup quota to read
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # a limit of 1.5 CPUs
    assert usable_cpus(tmp_path) == min(affinity, 2)
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert usable_cpus(tmp_path) == affinity
    defaults = load_settings(BASE)
    assert defaults.workers == 0
    assert server_workers(defaults) == min(usable_cpus(), AUTO_WORKERS_MAX)
    assert server_workers(load_settings({**BASE, "GATEWAY_WORKERS": "3"})) == 3

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.settings import SettingsError, SlurmAuthMode, load_settings

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
    s = load_settings({**BASE, "GATEWAY_SLURM_AUTH": "static", "GATEWAY_SLURM_TOKEN": "eyJsecret"})
    assert "eyJsecret" not in repr(s)

from __future__ import annotations

import os
from pathlib import Path

import jwt
import pytest

from gateway.slurm import Credentials, MintedTokens, SlurmAuthError, StaticToken
from tests.support.clock import Clock

KEY = b"k" * 32


async def test_minted_token_carries_slurm_claims() -> None:
    clock = Clock(1_000_000.0)
    tokens = MintedTokens(KEY, "gwuser", lifespan=600, clock=clock)
    creds = await tokens.credentials()
    claims = jwt.decode(creds.token, KEY, algorithms=["HS256"], options={"verify_exp": False})
    assert claims == {"sun": "gwuser", "iat": 1_000_000, "exp": 1_000_600}
    assert creds.headers() == {"X-SLURM-USER-NAME": "gwuser", "X-SLURM-USER-TOKEN": creds.token}


async def test_minted_token_is_reused_then_renewed_before_expiry() -> None:
    clock = Clock(1_000_000.0)
    tokens = MintedTokens(KEY, "gwuser", lifespan=600, renew_before=60, clock=clock)
    first = await tokens.credentials()
    clock.now += 539
    assert (await tokens.credentials()).token == first.token
    clock.now += 1  # 60 s left: renew now, never hand out a nearly expired token
    second = await tokens.credentials()
    assert second.token != first.token
    assert second.expires_at == clock.now + 600
    assert tokens.minted == 2


def test_repr_never_shows_secrets() -> None:
    creds = Credentials("gwuser", "secret.token.value")
    assert "secret" not in repr(creds)
    assert "k" * 32 not in repr(MintedTokens(KEY, "gwuser"))


def test_missing_key_file_is_an_auth_error(tmp_path: Path) -> None:
    with pytest.raises(SlurmAuthError, match="cannot read the JWT key file"):
        MintedTokens.from_key_file(tmp_path / "nope", "gwuser")


async def test_static_token_file_is_reread_when_it_changes(tmp_path: Path) -> None:
    path = tmp_path / "token"
    first = jwt.encode({"sun": "alice", "exp": 2_000_000_000}, KEY, "HS256")
    path.write_text(f"SLURM_JWT={first}\n")
    provider = StaticToken(path=path)
    creds = await provider.credentials()
    assert (creds.user_name, creds.token) == ("alice", first)

    second = jwt.encode({"sun": "alice", "exp": 2_000_000_100}, KEY, "HS256")
    replacement = tmp_path / "token.new"
    replacement.write_text(second)
    os.replace(replacement, path)  # how a Kubernetes Secret update lands
    assert (await provider.credentials()).token == second


async def test_static_token_that_expired_is_not_sent() -> None:
    token = jwt.encode({"sun": "alice", "exp": 100}, KEY, "HS256")
    provider = StaticToken(value=token, clock=Clock(200.0))
    with pytest.raises(SlurmAuthError, match="expired"):
        await provider.credentials()


async def test_static_token_without_user_needs_one() -> None:
    token = jwt.encode({"exp": 2_000_000_000}, KEY, "HS256")
    with pytest.raises(SlurmAuthError, match="names no user"):
        await StaticToken(value=token).credentials()
    creds = await StaticToken(value=token, user_name="bob").credentials()
    assert creds.user_name == "bob"


async def test_static_token_that_is_not_a_jwt() -> None:
    with pytest.raises(SlurmAuthError, match="not a JWT"):
        await StaticToken(value="garbage", user_name="bob").credentials()

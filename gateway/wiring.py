"""Builds the adapters the app needs from :class:`~gateway.settings.Settings`."""

from __future__ import annotations

from pathlib import Path

from gateway.settings import Settings, SlurmAuthMode
from gateway.slurm import MintedTokens, SlurmClient, StaticToken, TokenProvider


def token_provider(settings: Settings) -> TokenProvider:
    if settings.slurm_auth is SlurmAuthMode.MINT:
        assert settings.slurm_jwt_key_file is not None
        return MintedTokens.from_key_file(
            Path(settings.slurm_jwt_key_file),
            settings.slurm_user,
            lifespan=float(settings.slurm_jwt_lifespan),
        )
    if settings.slurm_token_file is not None:
        return StaticToken(
            path=Path(settings.slurm_token_file), user_name=settings.slurm_user or None
        )
    return StaticToken(value=settings.slurm_token, user_name=settings.slurm_user or None)


def slurm_client(settings: Settings) -> SlurmClient:
    return SlurmClient(
        settings.slurm_url,
        token_provider(settings),
        api_version=settings.slurm_api_version,
        timeout=settings.slurm_timeout,
        connect_timeout=settings.slurm_connect_timeout,
    )

"""The real app in a test, in this loop: its settings in front of a slurmrestd
stand-in (or of nothing listening, never asked), and a client of it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
from litestar import Litestar

from gateway.settings import Settings, load_settings
from tests.support.polling import free_port

ROOT = Path(__file__).resolve().parents[2]
RECIPES_DIRS = f"{ROOT / 'recipes'}:{ROOT / 'tests' / 'recipes'}"
TENANTS = str(ROOT / "deploy" / "local" / "tenants.toml")  # the team-a, team-b and admin keys


def stub_settings(
    tmp_path: Path, slurm_url: str = "", key: bytes = b"k" * 32, /, **env: str | None
) -> Settings:
    """The gateway's settings, its Slurm ``key`` in ``tmp_path``: slurmrestd is
    the stand-in at ``slurm_url`` (v0.0.42), else an address nothing listens
    on. ``env`` sets GATEWAY_<NAME> by its lower-case name (None leaves it out):
    ``stub_settings(tmp_path, stub.url, auth_file=TENANTS)``."""
    key_file = tmp_path / "key"
    key_file.write_bytes(key)
    given: dict[str, str | None] = {
        "GATEWAY_SLURM_URL": slurm_url or f"http://127.0.0.1:{free_port()}",
        "GATEWAY_SLURM_API_VERSION": "v0.0.42" if slurm_url else None,
        "GATEWAY_SLURM_USER": "gwuser",
        "GATEWAY_SLURM_JWT_KEY_FILE": str(key_file),
        "GATEWAY_RECIPES_DIRS": RECIPES_DIRS,
        **{f"GATEWAY_{name.upper()}": value for name, value in env.items()},
    }
    return load_settings({name: value for name, value in given.items() if value is not None})


@asynccontextmanager
async def app_client(
    app: Litestar,
    served: Any = None,
    *,
    base_url: str = "http://gateway.test",
    client: tuple[str, int] = ("127.0.0.1", 123),
    **options: Any,
) -> AsyncIterator[httpx.AsyncClient]:
    """A client of ``app`` (or of ``served``, what runs in front of it), the
    app's lifespan around it; ``options`` go to httpx.AsyncClient."""
    transport = httpx.ASGITransport(app=served or app, client=client)  # type: ignore[arg-type]
    async with (
        app.lifespan(),
        httpx.AsyncClient(transport=transport, base_url=base_url, **options) as http,
    ):
        yield http

"""``python -m gateway``: validate settings, then serve with uvicorn."""

from __future__ import annotations

import contextlib
import resource
import sys

import uvicorn
from litestar import Litestar
from litestar.types import ASGIApp

from gateway.accesslog import AccessLog
from gateway.app import create_app
from gateway.core.errors import RecipeError
from gateway.settings import Settings, SettingsError, load_settings


def main() -> int:
    try:
        settings = load_settings()
        app = create_app(settings)
    except SettingsError as exc:
        print(f"gateway: configuration error: {exc}", file=sys.stderr)
        return 2
    except RecipeError as exc:
        print(f"gateway: recipe error: {exc}", file=sys.stderr)
        return 2
    _raise_open_files_limit()
    uvicorn.run(
        # Several workers each build their app (and job view) from the environment.
        "gateway.__main__:worker_app" if settings.workers > 1 else _served(app, settings),
        factory=settings.workers > 1,
        workers=settings.workers,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,  # see gateway/accesslog.py
        loop="uvloop",
        http="httptools",
        backlog=4096,
    )
    return 0


def worker_app() -> ASGIApp:
    settings = load_settings()
    return _served(create_app(settings), settings)


def _served(app: Litestar, settings: Settings) -> ASGIApp:
    return AccessLog(app) if settings.access_log else app


def _raise_open_files_limit() -> None:
    """Each proxied stream holds two sockets: allow as many as the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 1 << 20 if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < want:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


if __name__ == "__main__":
    raise SystemExit(main())

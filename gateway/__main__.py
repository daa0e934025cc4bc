"""``python -m gateway``: validate settings, then serve with uvicorn."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import sys
import tempfile
from types import FrameType
from typing import Any

import structlog
import uvicorn
from litestar import Litestar
from litestar.types import ASGIApp
from prometheus_client import multiprocess
from uvicorn.supervisors import Multiprocess

from gateway.app import create_app, served
from gateway.core.errors import RecipeError
from gateway.httpserver import HeadWithBody
from gateway.settings import (
    Settings,
    SettingsError,
    is_loopback,
    load_settings,
    server_workers,
    unknown_variables,
)


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
    for name, close in unknown_variables():
        # After create_app: its structlog configuration makes this JSON too.
        structlog.get_logger("gateway").warning(
            "unknown setting ignored", variable=name, did_you_mean=close
        )
    _say_who_may_call(settings, app)
    _raise_open_files_limit()
    workers = server_workers(settings)
    config = uvicorn.Config(
        # Several workers each build their app (and job view) from the environment.
        "gateway.__main__:worker_app" if workers > 1 else _served(app, settings),
        factory=workers > 1,
        workers=workers,
        host=settings.listen_host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,  # see gateway/accesslog.py
        log_config=_uvicorn_logging(settings.log_level),
        loop="uvloop",
        http=HeadWithBody,  # uvicorn's httptools protocol, fewer writes
        backlog=4096,
        # On SIGTERM (after the drain, gateway/api/health.py) uvicorn closes the
        # listener and waits this long for open requests and streams, then
        # cancels them.
        timeout_graceful_shutdown=settings.shutdown_grace_seconds,
    )
    if workers > 1:
        # Each worker counts in files here; a scrape of any one sums them all.
        # A fresh directory each start: old files would add a past run's counts.
        with tempfile.TemporaryDirectory(prefix="gateway-metrics-") as counts:
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = counts
            _Workers(config, sockets=[config.bind_socket()]).run()
        return 0
    # Once stopped, uvicorn raises the SIGTERM it handled again, to end "by the
    # signal" (status 143): a graceful stop exits 0 instead.
    signal.signal(signal.SIGTERM, _exit_0)
    with contextlib.suppress(KeyboardInterrupt):  # likewise SIGINT, as uvicorn.run does
        uvicorn.Server(config).run()
    return 0


def _say_who_may_call(settings: Settings, app: Litestar) -> None:
    log = structlog.get_logger("gateway")
    host = settings.listen_host
    if settings.authenticates:
        log.info(
            "clients authenticate", host=host, methods=app.state.provided.authenticator.methods()
        )
    elif is_loopback(host):
        log.warning(
            "no client authentication configured: serving loopback only",
            host=host,
            hint="set GATEWAY_AUTH_FILE, GATEWAY_OIDC_ISSUER or GATEWAY_AUTH_SLURM_TOKENS",
        )
    else:
        log.warning(
            "serving WITHOUT client authentication (GATEWAY_ALLOW_UNAUTHENTICATED=true): "
            "anyone who reaches this address can run jobs as the gateway's Slurm user",
            host=host,
        )


def _exit_0(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


class _Workers(Multiprocess):
    """uvicorn's supervisor, letting go of the listening socket on SIGTERM.

    Each worker closes its copy of the socket when it stops; while this
    process holds one, the port still accepts connections that nobody answers.
    The workers keep theirs open through the drain.
    """

    def terminate_all(self) -> None:
        for sock in self.sockets:
            sock.close()
        super().terminate_all()

    # A worker that died or was replaced (SIGHUP) leaves its in-flight gauge
    # file behind; its last value would be added to every later scrape.
    def keep_subprocess_alive(self) -> None:
        before = self._pids()
        super().keep_subprocess_alive()
        self._forget(before - self._pids())

    def restart_all(self) -> None:
        before = self._pids()
        super().restart_all()
        self._forget(before - self._pids())

    def _pids(self) -> set[int]:
        return {p.pid for p in self.processes if p.pid is not None}

    @staticmethod
    def _forget(pids: set[int]) -> None:
        for pid in pids:
            multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


def _uvicorn_logging(level: str) -> dict[str, Any]:
    """uvicorn's own lines (start, stop, errors) as JSON, like every other line."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "json": {
                "()": structlog.stdlib.ProcessorFormatter,
                "processors": [
                    structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info,
                    structlog.processors.JSONRenderer(),
                ],
                "foreign_pre_chain": [
                    structlog.stdlib.add_logger_name,
                    structlog.stdlib.add_log_level,
                    structlog.processors.TimeStamper(fmt="iso", utc=True),
                ],
            }
        },
        "handlers": {
            "stdout": {
                "class": "logging.StreamHandler",
                "formatter": "json",
                "stream": "ext://sys.stdout",
            }
        },
        "loggers": {
            "uvicorn": {"handlers": ["stdout"], "level": level.upper(), "propagate": False},
        },
    }


def worker_app() -> ASGIApp:
    settings = load_settings()
    return _served(create_app(settings), settings)


def _served(app: Litestar, settings: Settings) -> ASGIApp:
    # Always wrapped: the request id is given out whether or not lines are written.
    return served(app, settings)


def _raise_open_files_limit() -> None:
    """Each proxied stream holds two sockets: allow as many as the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 1 << 20 if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < want:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


if __name__ == "__main__":
    raise SystemExit(main())

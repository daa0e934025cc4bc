"""``python -m gateway``: validate settings, then serve with uvicorn."""

from __future__ import annotations

import sys

import uvicorn

from gateway.app import create_app
from gateway.core.errors import RecipeError
from gateway.settings import SettingsError, load_settings


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
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

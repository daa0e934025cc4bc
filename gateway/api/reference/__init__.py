"""The API reference: Swagger UI served from files the gateway ships.

Litestar's pages load their scripts from public CDNs, which a cluster's
internal network often cannot reach (the page stays blank). Here Swagger UI
comes from ``assets/`` (fetched by scripts/reference_assets.py) and the page
names no other host. Litestar's other viewers are left out: they would need
assets of their own.
"""

from __future__ import annotations

import logging
from pathlib import Path

from litestar import Router
from litestar.datastructures import CacheControlHeader
from litestar.openapi.plugins import (
    JsonRenderPlugin,
    OpenAPIRenderPlugin,
    SwaggerRenderPlugin,
    YamlRenderPlugin,
)
from litestar.static_files import create_static_files_router

ASSETS = Path(__file__).parent / "assets"
# Relative to the schema path (/api/v1/schema).
ASSETS_SUBPATH = "/assets"
FILES = (
    "swagger-ui-bundle.js",
    "swagger-ui-standalone-preset.js",
    "swagger-ui.css",
    "favicon-32x32.png",
)

log = logging.getLogger(__name__)


def available(assets: Path = ASSETS) -> bool:
    return all((assets / name).is_file() for name in FILES)


class OfflineSwagger(SwaggerRenderPlugin):
    """Swagger UI whose page loads only what the gateway serves under ``assets``."""

    def __init__(self, schema_path: str, assets: Path = ASSETS) -> None:
        base = f"{schema_path}{ASSETS_SUBPATH}"
        self.assets = assets
        super().__init__(
            js_url=f"{base}/swagger-ui-bundle.js",
            css_url=f"{base}/swagger-ui.css",
            standalone_preset_js_url=f"{base}/swagger-ui-standalone-preset.js",
            # Litestar's default favicon is on a CDN too.
            favicon=f"<link rel='icon' type='image/png' href='{base}/favicon-32x32.png'>",
            path=["/", "/swagger"],
        )

    def receive_router(self, router: Router) -> None:
        super().receive_router(router)
        router.register(
            create_static_files_router(
                path=ASSETS_SUBPATH,
                directories=[self.assets],
                include_in_schema=False,
                # An hour: the URLs carry no version, and an upgrade may change them.
                cache_control=CacheControlHeader(max_age=3600),
            )
        )


def render_plugins(schema_path: str, assets: Path = ASSETS) -> list[OpenAPIRenderPlugin]:
    """Swagger UI at the schema path when its files are there, else the document only.

    Missing files do not stop the gateway: the API works without its reference,
    and the warning says how to get it back.
    """
    if available(assets):
        return [OfflineSwagger(schema_path, assets), *_documents()]
    log.warning(
        "API reference disabled: Swagger UI files missing from %s; run scripts/reference_assets.py",
        assets,
    )
    # An explicit plugin, else Litestar would fall back to its CDN-loading pages.
    return _documents()


def _documents() -> list[OpenAPIRenderPlugin]:
    # YAML too: some generators and review tools take only YAML.
    return [JsonRenderPlugin(path="/openapi.json"), YamlRenderPlugin(path="/openapi.yaml")]

"""The API reference page loads Swagger UI from the gateway itself, never a CDN."""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from gateway.api import reference
from gateway.app import create_app
from gateway.settings import load_settings
from tests.support.polling import free_port

ROOT = Path(__file__).resolve().parents[3]
SCHEMA = "/api/v1/schema"
# What the page's <script src>, <link href> and the like point at.
REFERENCES = re.compile(r"""(?:src|href)\s*=\s*["']([^"']+)["']""")


def _app() -> Litestar:
    key = Path("/tmp") / f"gateway-reference-key-{free_port()}"
    key.write_bytes(b"k" * 32)
    settings = load_settings(
        {
            "GATEWAY_SLURM_URL": f"http://127.0.0.1:{free_port()}",
            "GATEWAY_SLURM_USER": "gwuser",
            "GATEWAY_SLURM_JWT_KEY_FILE": str(key),
            "GATEWAY_RECIPES_DIRS": str(ROOT / "recipes"),
        }
    )
    try:
        return create_app(settings)
    finally:
        key.unlink()


@pytest.fixture
async def api() -> AsyncIterator[AsyncTestClient[Any]]:
    async with AsyncTestClient(app=_app()) as client:
        yield client


def test_the_assets_are_installed() -> None:
    # scripts/reference_assets.py (run by `make venv`) puts them there.
    assert reference.available(), "Swagger UI files missing: run scripts/reference_assets.py"


@pytest.mark.parametrize("path", [SCHEMA, f"{SCHEMA}/swagger"])
async def test_page_loads_only_the_gateways_own_files(api: AsyncTestClient[Any], path: str) -> None:
    page = await api.get(path)
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    html = page.text
    assert "http://" not in html
    assert "https://" not in html
    assert "SwaggerUIBundle(" in html
    loaded = REFERENCES.findall(html)
    assert sorted(loaded) == sorted(f"{SCHEMA}/assets/{name}" for name in reference.FILES)
    for url in loaded:
        asset = await api.get(url)
        assert asset.status_code == 200, url
        assert asset.content == (reference.ASSETS / url.rsplit("/", 1)[1]).read_bytes(), url
    types = {url.rsplit(".", 1)[1]: (await api.get(url)).headers["content-type"] for url in loaded}
    assert "javascript" in types["js"]
    assert types["css"].startswith("text/css")
    assert types["png"] == "image/png"
    assert (await api.get(loaded[0])).headers["cache-control"] == "max-age=3600"


async def test_only_swagger_ui_and_the_documents_are_served(api: AsyncTestClient[Any]) -> None:
    # Litestar's other viewers would load from CDNs: they are not offered.
    for viewer in ("redoc", "elements", "rapidoc", "scalar"):
        assert (await api.get(f"{SCHEMA}/{viewer}")).status_code == 404, viewer
    assert (await api.get(f"{SCHEMA}/assets/no-such-file.js")).status_code == 404
    # The package's source sits next to the assets folder: not served.
    assert (await api.get(f"{SCHEMA}/assets/..%2F__init__.py")).status_code == 404
    document = (await api.get(f"{SCHEMA}/openapi.json")).json()
    assert "/api/v1/services" in document["paths"]
    # The OpenAI front door (/v1) is in the same document, so on the same page.
    assert {"/v1/models", "/v1/models/{model}", "/v1/chat/completions"} <= document["paths"].keys()
    assert not [p for p in document["paths"] if p.startswith(SCHEMA)]
    yaml = await api.get(f"{SCHEMA}/openapi.yaml")
    assert yaml.status_code == 200
    assert "/api/v1/services:" in yaml.text
    assert "/v1/chat/completions:" in yaml.text


def test_without_the_files_only_the_document_is_served(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger=reference.__name__):
        plugins = reference.render_plugins(SCHEMA, assets=tmp_path)
    assert [p.paths for p in plugins] == [["/openapi.json"], ["/openapi.yaml"]]
    assert "scripts/reference_assets.py" in caplog.text

"""The API reference renders in a real browser with no network but the gateway's.

Debian's Chromium (scripts/browser.sh) loads /api/v1/schema from the real
gateway, headless, with every host name but 127.0.0.1 unresolvable, as on a
cluster's internal network: Swagger UI must come from the gateway and show
every operation of openapi/openapi.json. A screenshot is left for people.
"""

from __future__ import annotations

import html
import json
import re
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.testing.clusters import LocalCluster, discover
from tests.support.clusters import TIMINGS
from tests.support.gateway_process import GatewayProcess

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = "c2205"
CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOT = Path("/tmp/gateway-api-reference.png")
WIDTH, HEIGHT = 1280, 2400


@pytest.fixture(scope="module")
def gateway() -> Iterator[GatewayProcess]:
    found = [c for c in discover() if c.name == CLUSTER]
    if not found:  # a missing cluster is a failure, never a silent skip
        raise pytest.UsageError(f"no local cluster {CLUSTER}; run `make cluster` first")
    cluster: LocalCluster = found[0]
    with GatewayProcess(cluster) as process:
        yield process


def chromium(profile: Path, *arguments: str) -> subprocess.CompletedProcess[bytes]:
    if not CHROMIUM.is_file():
        raise pytest.UsageError("no /usr/bin/chromium; run `make browser` first")
    return subprocess.run(
        [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            # Any host but the gateway's fails to resolve: a CDN would too.
            "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
            # Runs the page's scripts to completion, or to 15 s of page time.
            "--virtual-time-budget=15000",
            *arguments,
        ],
        capture_output=True,
        timeout=180,
        check=True,
    )


def documented() -> set[tuple[str, str, str, str]]:
    document: dict[str, Any] = json.loads((ROOT / "openapi" / "openapi.json").read_text())
    return {
        (method, path, op["operationId"], op["summary"])
        for path, item in document["paths"].items()
        for method, op in item.items()
    }


def rendered(dom: str) -> set[tuple[str, str, str, str]]:
    """(method, path, operationId, summary) of each operation block Swagger UI drew."""
    found = set()
    for block in dom.split('<div class="opblock opblock-')[1:]:
        method = re.match(r"(\w+)", block)
        ident = re.search(r'id="operations-[^-"]+-([^"]+)"', block)
        path = re.search(r'data-path="([^"]+)"', block)
        summary = re.search(r'class="opblock-summary-description">([^<]*)<', block)
        assert method and ident and path and summary, block[:500]
        found.add(
            (
                method[1],
                html.unescape(path[1]),
                ident[1],
                html.unescape(summary[1]),
            )
        )
    return found


def page_requests(net_log: Path) -> list[str]:
    """URLs the page itself asked for (Chromium's own background calls left out)."""
    log = json.loads(net_log.read_text())
    start = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    starts = [e.get("params", {}) for e in log["events"] if e["type"] == start]
    # The page's requests share its network partition: 127.0.0.1's.
    return [
        p["url"]
        for p in starts
        if p.get("network_isolation_key", "").startswith("http://127.0.0.1")
    ]


def test_served_page_names_no_other_host(gateway: GatewayProcess) -> None:
    page = httpx.get(f"{gateway.url}/api/v1/schema", timeout=10)
    assert page.status_code == 200
    assert re.findall(r"https?://", page.text) == []
    assert "/api/v1/schema/assets/swagger-ui-bundle.js" in page.text


def test_chromium_renders_every_operation_offline(gateway: GatewayProcess, tmp_path: Path) -> None:
    url = f"{gateway.url}/api/v1/schema"
    net_log = tmp_path / "net-log.json"
    started = time.monotonic()
    dom = chromium(
        tmp_path / "profile", f"--log-net-log={net_log}", "--dump-dom", url
    ).stdout.decode()
    render_s = time.monotonic() - started

    drawn = rendered(dom)
    assert drawn == documented()
    # /api/v1's 15 operations, and those of the front doors: OpenAI's (/v1),
    # Anthropic's Messages and vLLM's own APIs.
    assert sum(1 for d in drawn if d[1].startswith("/api/v1/")) == 15, sorted(drawn)
    assert {d[2] for d in drawn if not d[1].startswith("/api/v1/")} == {
        "listOpenAIModels", "getOpenAIModel", "createChatCompletion",
        "createCompletion", "createEmbedding", "createResponse", "getResponse",
        "cancelResponse", "createTranscription", "createTranslation", "createMessage",
        "countMessageTokens", "tokenize", "detokenize", "score", "scoreV1", "rerank",
        "rerankV1", "rerankV2", "embedV2", "pool", "classify",
    }  # fmt: skip
    assert "Slurm AI Gateway" in dom
    requested = page_requests(net_log)
    assert requested, "the net log recorded none of the page's requests"
    assert [u for u in requested if not u.startswith(gateway.url)] == []
    assets = {u.removeprefix(f"{url}/assets/") for u in requested if "/assets/" in u}
    assert assets >= {"swagger-ui-bundle.js", "swagger-ui.css", "swagger-ui-standalone-preset.js"}

    SCREENSHOT.unlink(missing_ok=True)
    chromium(
        tmp_path / "profile-shot",
        f"--screenshot={SCREENSHOT}",
        f"--window-size={WIDTH},{HEIGHT}",
        "--hide-scrollbars",
        url,
    )
    png = SCREENSHOT.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", png[16:24]) == (WIDTH, HEIGHT)
    # A blank page of this size compresses to a few KiB; rendered text does not.
    assert len(png) > 50_000, len(png)
    TIMINGS.append(
        f"API reference: Chromium rendered {len(documented())} operations offline in "
        f"{render_s:.1f} s; screenshot {SCREENSHOT} ({len(png) // 1024} KiB)"
    )

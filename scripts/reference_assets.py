#!/usr/bin/env python3
"""Fetches the Swagger UI files the gateway serves its API reference from.

The reference must render on a cluster's internal network, so the page loads
nothing from a CDN: the files come from the pinned ``swagger-ui-dist`` package
of the npm registry, checked against its published sha512, and land in
``gateway/api/reference/assets`` (not in git). Does nothing when they are
already there at this version. Standard library only: runs before the venv.

To move to another release: ``npm view swagger-ui-dist@<version> dist``, then
set VERSION and INTEGRITY below.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import shutil
import sys
import tarfile
import tempfile
import time
import urllib.request
from pathlib import Path

VERSION = "5.35.0"
# `npm view swagger-ui-dist@<VERSION> dist.integrity`
INTEGRITY = (
    "sha512-"
    "U06rpMtW9V3XPGOBeamTUSr0Z09jMX4IJuANpE/EZbAhw0G8CgwrzU4YmXkn/h0wCDNsXdGarTNNHC3sU8yVUQ=="
)
TARBALL = f"https://registry.npmjs.org/swagger-ui-dist/-/swagger-ui-dist-{VERSION}.tgz"
# What the page loads, and the licence terms that travel with them.
FILES = (
    "swagger-ui-bundle.js",
    "swagger-ui-standalone-preset.js",
    "swagger-ui.css",
    "favicon-32x32.png",
    "LICENSE",
    "NOTICE",
)
TARGET = Path(__file__).resolve().parents[1] / "gateway" / "api" / "reference" / "assets"
STAMP = "VERSION"


def current(target: Path) -> bool:
    stamp = target / STAMP
    return (
        stamp.is_file()
        and stamp.read_text().strip() == VERSION
        and all((target / name).is_file() for name in FILES)
    )


def download(url: str) -> bytes:
    for attempt in range(3):
        try:
            with urllib.request.urlopen(url, timeout=60) as answer:  # noqa: S310 (fixed https URL)
                data: bytes = answer.read()
                return data
        except OSError as error:
            if attempt == 2:
                raise SystemExit(f"reference assets: cannot download {url}: {error}") from error
            time.sleep(2**attempt)
    raise AssertionError("unreachable")


def verify(data: bytes) -> None:
    algorithm, _, expected = INTEGRITY.partition("-")
    digest = base64.b64encode(hashlib.new(algorithm, data).digest()).decode()
    if digest != expected:
        raise SystemExit(
            f"reference assets: {TARBALL} does not match its pinned {algorithm} "
            f"({digest} instead of {expected}); refusing to install it"
        )


def extract(data: bytes, target: Path) -> None:
    # Into a sibling folder first, then swapped in: a failed run leaves no half set.
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".assets-", dir=target.parent))
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            for name in FILES:
                member = tar.extractfile(f"package/{name}")
                if member is None:
                    raise SystemExit(f"reference assets: {name} missing from {TARBALL}")
                (staging / name).write_bytes(member.read())
        (staging / STAMP).write_text(VERSION + "\n")
        for path in staging.iterdir():
            path.chmod(0o644)
        staging.chmod(0o755)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def main() -> None:
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else TARGET
    if current(target):
        return
    print(f"reference assets: fetching swagger-ui-dist {VERSION} from the npm registry", flush=True)
    data = download(TARBALL)
    verify(data)
    extract(data, target)
    sizes = ", ".join(f"{n} {(target / n).stat().st_size // 1024} KiB" for n in FILES[:3])
    print(f"reference assets: {target} ({sizes})")


if __name__ == "__main__":
    main()

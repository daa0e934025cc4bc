"""A TypeScript client typed from openapi/openapi.json type-checks with tsc.

tests/clients/typescript is a small npm project with pinned versions:
openapi-typescript turns the committed document into types (``generated/``,
not committed) and openapi-fetch checks every call of client.ts (create,
status, prompt, logs, the OpenAI front door's model list, an unknown model's
error in OpenAI's shape and a chat completion, stop, recipes) against them;
``tsc --strict`` must pass with no error and the generator must print no
warning. A second file with misspelled fields must fail, so that a passing
check means something.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.clusters import TIMINGS

ROOT = Path(__file__).resolve().parents[2]
PROJECT = ROOT / "tests" / "clients" / "typescript"
# Written after a successful `npm ci`: the lock file it installed.
STAMP = PROJECT / "node_modules" / ".installed-lock-sha256"


def run(*command: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    npm = shutil.which("npm")
    if npm is None:
        pytest.fail("npm is not installed; run `make node` (scripts/node.sh)")
    env = {**os.environ, "NO_COLOR": "1", "FORCE_COLOR": "0", "npm_config_update_notifier": "false"}
    return subprocess.run(
        [npm, *command], cwd=PROJECT, env=env,
        capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


def install() -> None:
    """``npm ci`` only when node_modules is missing or was installed from another lock."""
    lock = hashlib.sha256((PROJECT / "package-lock.json").read_bytes()).hexdigest()
    if STAMP.is_file() and STAMP.read_text().strip() == lock:
        return
    done = run("ci", "--no-audit", "--no-fund")
    assert done.returncode == 0, done.stdout + done.stderr
    STAMP.write_text(lock + "\n")


def versions() -> dict[str, str]:
    lock = json.loads((PROJECT / "package-lock.json").read_text())
    return {
        name: lock["packages"][f"node_modules/{name}"]["version"]
        for name in ("openapi-typescript", "openapi-fetch", "typescript")
    }


@pytest.fixture(scope="module")
def generated() -> float:
    """Install, then generate the types; fails on any line but the generator's two."""
    started = time.monotonic()
    install()
    done = run("run", "-s", "generate")
    output = (done.stdout + done.stderr).strip()
    assert done.returncode == 0, output
    lines = output.splitlines()
    # A clean run says its version, then source -> target with its time; a
    # warning or a lint finding of the document is a line of its own.
    assert len(lines) == 2, f"openapi-typescript warned:\n{output}"
    assert lines[0].endswith(f"openapi-typescript {versions()['openapi-typescript']}"), output
    assert re.search(r"openapi\.json → generated/api\.d\.ts \[[\d.]+m?s\]$", lines[1]), output
    return time.monotonic() - started


def tsc(config: str) -> subprocess.CompletedProcess[str]:
    return run("exec", "--", "tsc", "--noEmit", "--strict", "-p", config)


def test_client_type_checks_against_the_document(generated: float) -> None:
    started = time.monotonic()
    checked = tsc("tsconfig.json")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert (checked.stdout + checked.stderr).strip() == ""
    took = time.monotonic() - started
    v = versions()
    TIMINGS.append(
        f"TypeScript client (openapi-typescript {v['openapi-typescript']}, openapi-fetch"
        f" {v['openapi-fetch']}, tsc {v['typescript']}): installed and generated with no"
        f" warning in {generated:.1f}s, tsc --strict clean in {took:.1f}s"
    )


def test_type_check_catches_misspelled_fields(generated: float) -> None:
    checked = tsc("tsconfig.negative.json")
    output = checked.stdout + checked.stderr
    assert checked.returncode != 0, output
    # Exactly the two mistakes, not some other failure (a missing module, say).
    errors = re.findall(r"error (TS\d+): .*?'(\w+)'", output)
    assert sorted(errors) == [("TS2339", "state"), ("TS2353", "recipe")], output

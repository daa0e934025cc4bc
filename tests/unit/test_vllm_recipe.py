"""The vLLM recipe's batch script, run by bash with stand-ins for vLLM and scontrol.

The real vLLM runs in the integration tests; here the script's own logic is
checked for inputs those tests do not start a vLLM for.
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from gateway.core import jobscript, metadata
from gateway.core.recipes import RecipeCatalog

ROOT = Path(__file__).resolve().parents[2]
CODEC = metadata.MetaCodec(b"k" * 32)
KEY = "the-service-key-0123456789"

FAKE_PYTHON = """#!/bin/bash
case "$1" in
  -) cat >/dev/null; exit 0 ;;  # the model check
  -c) exit 0 ;;  # the job's own health probe
  -m) printf '%s\\n' "$@" > "$OUT/argv"; printf '%s' "${VLLM_API_KEY-unset}" > "$OUT/key"
      printf '%s' "${GW_SERVICE_KEY-unset}" > "$OUT/leaked"; sleep 1 ;;
esac
"""


def run_recipe(tmp_path: Path, **environment: str) -> list[metadata.Reported]:
    """Run the rendered script; what it published, in order."""
    recipe = RecipeCatalog.load([ROOT / "recipes"]).get("inference/vllm")
    env = recipe.environment(environment)
    context = jobscript.render_context(recipe, env, recipe.default_resources.as_config())
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    context["runtime"] = {**context["runtime"], "python": str(fake)}
    meta = CODEC.new_meta(recipe=recipe.name, created=1.0, owner="u", environment=env, resources={})
    encoded = CODEC.encode(meta)
    script = tmp_path / "job.sh"
    script.write_text(jobscript.build(recipe, encoded, context))
    scontrol = tmp_path / "scontrol"
    scontrol.write_text('#!/bin/sh\nprintf "%s\\n" "${3#comment=}" >> "$OUT/comments"\n')
    scontrol.chmod(0o755)
    subprocess.run(
        ["bash", str(script)],
        env={
            "PATH": f"{tmp_path}:/usr/bin:/bin",
            "OUT": str(tmp_path),
            "SLURM_JOB_ID": "7",
            "GW_SERVICE_KEY": KEY,
            **env,
        },
        capture_output=True,
        timeout=60,
        check=True,
    )
    published = []
    for line in (tmp_path / "comments").read_text().splitlines():
        decoded = CODEC.decode(line)
        assert decoded is not None, line
        published.append(decoded[1])
    return published


@pytest.mark.parametrize(
    ("host", "published"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("0.0.0.0", socket.gethostname()),  # noqa: S104
        ("::", socket.gethostname()),
        ("::1", "[::1]"),
    ],
)
def test_the_endpoint_published_is_where_vllm_listens(
    tmp_path: Path, host: str, published: str
) -> None:
    reports = run_recipe(tmp_path, VLLM_HOST=host, VLLM_MODEL="gpt2")
    endpoints = [r.endpoint for r in reports if r.endpoint]
    assert endpoints, reports
    assert endpoints[-1].host == published
    assert reports[-1].phase == "running"


def test_vllm_gets_the_key_in_its_environment_only(tmp_path: Path) -> None:
    run_recipe(tmp_path, VLLM_MODEL="gpt2")
    assert (tmp_path / "key").read_text() == KEY
    assert KEY not in (tmp_path / "argv").read_text()  # not on the command line (ps)
    assert (tmp_path / "leaked").read_text() == "unset"  # not exported to vLLM itself
    assert KEY not in (tmp_path / "comments").read_text()


def test_no_endpoint_is_published_before_vllm_answers(tmp_path: Path) -> None:
    reports = run_recipe(tmp_path, VLLM_MODEL="gpt2")
    assert [r.phase for r in reports if r.endpoint] == ["running"]


def _middleware() -> type:
    """The key-checking middleware the recipe writes for vLLM, loaded here."""
    template = (ROOT / "recipes/inference/vllm/job.sh.j2").read_text()
    source = template.split("gw_vllm_auth.py\" <<'PY'\n", 1)[1].split("\nPY\n", 1)[0]
    namespace: dict[str, object] = {}
    exec(compile(source, "gw_vllm_auth.py", "exec"), namespace)  # noqa: S102 - our own file
    cls = namespace["RequireKey"]
    assert isinstance(cls, type)
    return cls


async def _call(app: object, path: str, headers: list[tuple[bytes, bytes]]) -> int:
    sent: list[dict[str, object]] = []

    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": b""}

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    scope = {"type": "http", "path": path, "headers": headers, "method": "POST"}
    await app(scope, receive, send)  # type: ignore[operator]
    status = sent[0]["status"]
    assert isinstance(status, int)
    return status


async def test_vllm_wants_the_key_on_every_path_but_health(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def inner(scope: object, receive: object, send: Callable[..., Awaitable[None]]) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})

    monkeypatch.setenv("VLLM_API_KEY", KEY)
    app = _middleware()(inner)
    right = [(b"authorization", f"Bearer {KEY}".encode())]
    wrong = [(b"authorization", b"Bearer " + b"0" * len(KEY))]
    for path in ("/v1/chat/completions", "/invocations", "/tokenize", "/pooling", "/metrics"):
        assert await _call(app, path, []) == 401, path
        assert await _call(app, path, wrong) == 401, path
        assert await _call(app, path, right) == 200, path
    assert await _call(app, "/health", []) == 200

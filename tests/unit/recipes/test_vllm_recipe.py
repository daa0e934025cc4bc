"""The vLLM recipe's batch script, run by bash with stand-ins for vLLM and
scontrol (as nobody under root: tests/support/sandbox.py).

The real vLLM runs in the integration tests; here the script's own logic is
checked for inputs and faults those tests do not start a vLLM for. The
stand-in listens on the port it is given like vLLM, and forks an "engine"
that outlives it when it is killed, like vLLM's EngineCore.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from gateway.core import jobscript, metadata
from gateway.core.recipes import RecipeCatalog
from tests.support import sandbox
from tests.support.polling import free_port

ROOT = Path(__file__).resolve().parents[3]
CODEC = metadata.MetaCodec(b"k" * 32)
KEY = "the-service-key-0123456789"
JOB_ID = 7

FAKE_PYTHON = """#!/bin/bash
case "$1" in
  -) cat >/dev/null; exit 0 ;;  # the model check
  -c) exec python3 "$@" ;;  # the job's own health probe, for real
  -m) printf '%s\\n' "$@" > "$OUT/argv"; printf '%s' "${VLLM_API_KEY-unset}" > "$OUT/key"
      printf '%s' "${GW_SERVICE_KEY-unset}" > "$OUT/leaked"
      exec python3 "$OUT/fake_vllm.py" "$@" ;;
esac
"""

# vLLM as the recipe sees it: imports for a while, binds --host/--port, answers
# /health; FAKE_VLLM says what then: serve (exit 0 soon after), die (SIGKILL
# itself, as the fault test does to vLLM), hang (serve until stopped) or
# unhealthy (answer 503). Its engine's pid goes to $OUT/engine.
FAKE_VLLM = """import http.server, os, signal, socket, subprocess, sys, threading, time
args = sys.argv[1:]
host, port = args[args.index("--host") + 1], int(args[args.index("--port") + 1])
mode = os.environ.get("FAKE_VLLM", "serve")
engine = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
with open(os.path.join(os.environ["OUT"], "engine"), "w") as f:
    f.write(f"{os.getpid()} {engine.pid}")
time.sleep(float(os.environ.get("FAKE_IMPORT_SECONDS", "0")))
answered = threading.Event()

class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(503 if mode == "unhealthy" else 200)
        self.end_headers()
        answered.set()
    def log_message(self, *a):
        pass

class Server(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

try:
    server = Server((host, port), Health)
except OSError as exc:
    sys.exit(f"fake vLLM: {exc}")
threading.Thread(target=server.serve_forever, daemon=True).start()
answered.wait(30)
if mode == "serve":
    time.sleep(0.3)
elif mode == "die":
    os.kill(os.getpid(), signal.SIGKILL)
else:
    time.sleep(60)
"""

# Another process on the node: takes the port once the job says it is
# starting (after gw_free_port's check), answers /health, notes what it got.
SQUATTER = """import http.server, os, sys
class Record(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        with open(os.path.join(os.environ["OUT"], "squatted"), "a") as f:
            f.write(f"{self.path} {self.headers.get('Authorization')}\\n")
        self.send_response(200)
        self.end_headers()
    def log_message(self, *a):
        pass
server = http.server.HTTPServer(("0.0.0.0", int(sys.argv[1])), Record)
with open(os.path.join(os.environ["OUT"], "squatter"), "w") as f:
    f.write(str(os.getpid()))
server.timeout = 30
server.handle_request()
server.handle_request()
"""

FAKE_SCONTROL = """#!/bin/bash
if [ "$1" = show ]; then  # the preamble waits for the gateway's binding
  printf 'JobId=%s JobName=x Comment=%s StdOut=/x\\n' "$SLURM_JOB_ID" "$(cat "$OUT/bound")"
  exit 0
fi
for arg in "$@"; do
  case "$arg" in comment=*) printf '%s\\n' "${arg#comment=}" >> "$OUT/comments" ;; esac
  case "$arg" in
    comment=*"|phase=starting|"*)
      if [ -n "${SQUAT_PORT:-}" ] && [ ! -e "$OUT/squatter" ]; then
        python3 "$OUT/squatter.py" "$SQUAT_PORT" </dev/null >/dev/null 2>&1 &
        for _ in $(seq 100); do [ -s "$OUT/squatter" ] && break; sleep 0.05; done
      fi ;;
  esac
done
"""


@pytest.fixture
def box() -> Iterator[Path]:
    with sandbox.folder() as path:
        yield path
        # Whatever a failing recipe left behind goes with the test.
        if (path / "engine").exists():
            for pid in the_server_and_its_engine(path):
                if alive(pid):
                    kill(pid)


def script_for(
    box: Path, runtime: dict[str, str], environment: dict[str, str]
) -> tuple[list[str], dict[str, str]]:
    """Writes the rendered script and its stand-ins to ``box``; the command and
    the request's variables (the job's environment)."""
    recipe = RecipeCatalog.load([ROOT / "recipes"]).get("inference/vllm")
    env = recipe.environment(environment)
    context = recipe.template_values(recipe.default_resources.as_config())
    files = {"python": FAKE_PYTHON, "scontrol": FAKE_SCONTROL, "fake_vllm.py": FAKE_VLLM}
    for name, text in {**files, "squatter.py": SQUATTER}.items():
        (box / name).write_text(text)
        (box / name).chmod(0o755)
    context["runtime"] = {**context["runtime"], "python": str(box / "python"), **runtime}
    meta = CODEC.new_meta(recipe=recipe.name, created=1.0, owner="u", environment=env, resources={})
    unbound = CODEC.unbound(meta)
    (box / "bound").write_text(CODEC.bind(unbound, JOB_ID))
    (box / "job.sh").write_text(jobscript.build(recipe, unbound, context))
    return ["bash", str(box / "job.sh")], env


def job_env(box: Path, variables: dict[str, str], **extra: str) -> dict[str, str]:
    return {
        "PATH": f"{box}:/usr/bin:/bin",
        "OUT": str(box),
        "SLURM_JOB_ID": str(JOB_ID),
        "GW_SERVICE_KEY": KEY,
        **variables,
        **extra,
    }


def published(box: Path) -> list[metadata.Reported]:
    """What the script published, in order."""
    reports = []
    for line in (box / "comments").read_text().splitlines():
        decoded = CODEC.decode(line, JOB_ID)
        assert decoded is not None, line
        reports.append(decoded[1])
    return reports


def run_recipe(
    box: Path, runtime: dict[str, str] | None = None, fake: str = "serve", **environment: str
) -> list[metadata.Reported]:
    """Run the rendered script to its end; what it published, in order."""
    extra = {"FAKE_VLLM": fake}
    for name in ("SQUAT_PORT", "FAKE_IMPORT_SECONDS"):
        if name in environment:
            extra[name] = environment.pop(name)
    command, variables = script_for(box, runtime or {}, environment)
    # Its output to a file: a pipe would stay open as long as anything it
    # started lives on (an engine left behind).
    with (box / "log").open("wb") as log:
        try:
            sandbox.run(
                command, env=job_env(box, variables, **extra),
                stdout=log, stderr=log, timeout=90, check=False,
            )  # fmt: skip
        finally:
            squatter = box / "squatter"
            if squatter.exists() and squatter.read_text():
                kill(int(squatter.read_text()))
    return published(box)


def kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def alive(pid: int) -> bool:
    """A process that runs (a zombie waiting for init to reap it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(") ", 1)[1].split()[0] != "Z"


def the_server_and_its_engine(box: Path) -> list[int]:
    return [int(p) for p in (box / "engine").read_text().split()]


def gone(pids: list[int], within: float = 15.0) -> list[int]:
    """The pids still alive after ``within`` seconds."""
    deadline = time.monotonic() + within
    while (left := [p for p in pids if alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


@pytest.mark.parametrize(
    ("host", "expected"),
    [("127.0.0.1", "127.0.0.1"), ("0.0.0.0", None), ("::", None), ("::1", "[::1]")],  # noqa: S104
)
def test_the_endpoint_published_is_where_vllm_listens(
    box: Path, host: str, expected: str | None
) -> None:
    reports = run_recipe(box, VLLM_HOST=host, VLLM_MODEL="gpt2")
    endpoints = [r.endpoint for r in reports if r.endpoint]
    assert endpoints, reports
    # On all interfaces: the node's name, as the job's own `hostname` says it
    # now (read here, not when the tests were collected).
    assert endpoints[-1].host == (expected or socket.gethostname())
    assert reports[-1].phase == "running"


def test_vllm_gets_the_key_in_its_environment_only(box: Path) -> None:
    run_recipe(box, VLLM_MODEL="gpt2")
    assert (box / "key").read_text() == KEY
    assert KEY not in (box / "argv").read_text()  # not on the command line (ps)
    assert (box / "leaked").read_text() == "unset"  # not exported to vLLM itself
    assert KEY not in (box / "comments").read_text()


def test_no_endpoint_is_published_before_vllm_answers(box: Path) -> None:
    reports = run_recipe(box, VLLM_MODEL="gpt2")
    assert [r.phase for r in reports if r.endpoint] == ["running"]


def test_a_port_taken_after_the_check_is_not_published(box: Path) -> None:
    """Another process binds the port between gw_free_port's check and vLLM's
    bind (vLLM imports for a while first) and answers /health: the service
    fails saying so, and nothing is published there for the gateway to probe."""
    port = free_port()
    reports = run_recipe(
        box, VLLM_MODEL="gpt2", VLLM_PORT=str(port), SQUAT_PORT=str(port), FAKE_IMPORT_SECONDS="3"
    )
    assert (box / "squatter").exists()  # it did hold the port
    assert [r.endpoint for r in reports if r.endpoint] == []
    assert reports[-1].phase == "failed"
    assert reports[-1].reason is not None
    assert f"port {port} on {socket.gethostname()} is held by another process" in reports[-1].reason


def test_vllm_dying_takes_its_engine_along(box: Path) -> None:
    """vLLM's API server killed: the service fails and its engine, which
    outlives it, ends with the job."""
    reports = run_recipe(box, fake="die", VLLM_MODEL="gpt2")
    assert reports[-1].phase == "failed"
    assert "vLLM exited with code 137" in (reports[-1].reason or "")
    assert gone(the_server_and_its_engine(box), within=0) == []


def test_the_startup_timeout_ends_all_of_vllm(box: Path) -> None:
    reports = run_recipe(box, {"startup_timeout": "3"}, fake="unhealthy", VLLM_MODEL="gpt2")
    assert "did not answer /health within 3s" in (reports[-1].reason or "")
    assert gone(the_server_and_its_engine(box), within=0) == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_cancelled_job_ends_all_of_vllm(box: Path, sig: signal.Signals) -> None:
    """Slurm's SIGTERM (a cancel, the time limit) to the job script alone:
    the script ends vLLM's whole session before it exits."""
    command, variables = script_for(box, {}, {"VLLM_MODEL": "gpt2"})
    job = sandbox.popen(command, env=job_env(box, variables, FAKE_VLLM="hang"))
    try:
        deadline = time.monotonic() + 30
        while not (box / "comments").exists() or published(box)[-1].phase != "running":
            assert job.poll() is None and time.monotonic() < deadline, "vLLM never ran"
            time.sleep(0.1)
        pids = the_server_and_its_engine(box)
        job.send_signal(sig)  # setpriv execs bash: this is the job script
        assert job.wait(timeout=30) == 128 + sig
    finally:
        if job.poll() is None:
            job.kill()
    assert gone(pids, within=0) == []


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

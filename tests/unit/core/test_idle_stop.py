"""Idle stop, job side: the real preamble (gateway/core/jobscript.py) run by
bash without Slurm (``scontrol`` is a stand-in that records what the job
publishes), in front of a /metrics server the test controls."""

from __future__ import annotations

import socketserver
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gateway.core import jobscript, metadata
from gateway.core.recipes import RecipeCatalog
from tests.support import sandbox
from tests.support.polling import free_port

ROOT = Path(__file__).resolve().parents[3]
CODEC = metadata.MetaCodec(b"i" * 32)
JOB = 12
KEY = "k3y-of-the-service"
LIMIT = 3  # GW_IDLE_STOP_SECONDS
REASON = "stopped itself after 3 s without a request"

# What vLLM's /metrics holds, around the three series the watcher sums.
PAGE = """# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{{engine="0",model_name="stub"}} {running}
vllm:num_requests_running{{engine="1",model_name="stub"}} 0.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{{engine="0",model_name="stub"}} 0.0
# TYPE vllm:request_success_total counter
vllm:request_success_total{{engine="0",finished_reason="stop",model_name="stub"}} {done}
vllm:request_success_total{{engine="0",finished_reason="length",model_name="stub"}} 2.0
vllm:request_success_created{{engine="0",finished_reason="stop",model_name="stub"}} {now}
vllm:num_requests_running_total_not_this 5.0
"""

# The metrics here are the test's own server, not the job's: the check that
# every listener on the port is the server's (before the key is sent) is
# passed over, except where OWN_LISTENER_CHECK is set.
PASS_OVER = """[ -n "${OWN_LISTENER_CHECK:-}" ] || gw_own_listener() { return 0; }
"""
JOB_BODY = (
    PASS_OVER
    + """set -uo pipefail  # as the vLLM recipe runs
gw_phase starting "fake server"
gw_start sleep 300
echo "$GW_SERVER" > "$BOX/server"
gw_endpoint "$(hostname)" "$METRICS_PORT"
echo "$GW_IDLE_WATCHER" > "$BOX/watcher"
wait "$GW_SERVER"
echo "the recipe went on after wait: $?"
"""
)
# As recipes/inference/vllm publishes: GW_ENDPOINT set, then phase running,
# with an EXIT trap of its own (which calls gw_stop_server).
VLLM_BODY = (
    PASS_OVER
    + """set -uo pipefail
trap 'gw_stop_server; echo "own exit trap" >&2' EXIT
gw_phase starting "launching"
gw_start sleep 300
echo "$GW_SERVER" > "$BOX/server"
GW_ENDPOINT="$(hostname):$METRICS_PORT"
gw_phase running "answers on $GW_ENDPOINT"
echo "$GW_IDLE_WATCHER" > "$BOX/watcher"
wait "$GW_SERVER"
echo "the recipe went on after wait: $?"
"""
)


class Metrics:
    """A /metrics answer from ``page()``; like the stub recipe, it keeps the
    connection open after an answer (the watcher must go by Content-Length)."""

    def __init__(self, page: Callable[[], str]) -> None:
        self.page = page
        self.asked = 0
        self.authorized = 0
        outer = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = self.request.recv(4096)
                    if not chunk:
                        return
                    head += chunk
                lines = head.decode("latin-1").split("\r\n")
                outer.asked += 1
                if f"Authorization: Bearer {KEY}" not in lines or not lines[0].startswith(
                    "GET /metrics "
                ):
                    body, status = b'{"error": "Unauthorized"}', b"401 Unauthorized"
                else:
                    outer.authorized += 1
                    body, status = outer.page().encode(), b"200 OK"
                self.wfile.write(
                    b"HTTP/1.1 %s\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s"
                    % (status, len(body), body)
                )
                self.wfile.flush()
                self.request.settimeout(30)
                try:
                    while self.request.recv(4096):  # keep-alive: the client closes
                        pass
                except OSError:
                    pass

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", free_port()), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]

    def __enter__(self) -> Metrics:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def box() -> Iterator[Path]:
    with sandbox.folder() as path:
        yield path


def start_job(
    box: Path, port: int, *, key: str = KEY, body: str = JOB_BODY, **env: str
) -> subprocess.Popen[str]:
    """The preamble and JOB_BODY, as bash runs a batch script, idle stop asked."""
    recipe = RecipeCatalog.load([ROOT / "tests" / "recipes"]).get("testing/openai-stub")
    context = recipe.template_values(recipe.default_resources.as_config())
    meta = CODEC.new_meta(recipe=recipe.name, created=1.0, owner="u", environment={}, resources={})
    unbound = CODEC.unbound(meta)
    preamble = jobscript.build(recipe, unbound, context).split("# --- recipe", 1)[0]
    (box / "job.sh").write_text(preamble + body)
    (box / "scontrol").write_text(
        "#!/bin/sh\n"
        'if [ "$1" = show ]; then echo "JobId=$3 Comment=$BOUND Priority=1"; exit 0; fi\n'
        'printf "%s\\n" "$*" >> "$BOX/published"\n'
    )
    (box / "scontrol").chmod(0o755)
    return sandbox.popen(
        ["bash", str(box / "job.sh")],
        env={
            "PATH": f"{box}:/usr/bin:/bin",
            "SLURM_JOB_ID": str(JOB),
            "BOUND": CODEC.bind(unbound, JOB),
            "BOX": str(box),
            "METRICS_PORT": str(port),
            jobscript.KEY_VARIABLE: key,
            jobscript.IDLE_VARIABLE: str(LIMIT),
            "GW_IDLE_POLL_SECONDS": "0.5",
            **env,
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def published(box: Path) -> list[str]:
    path = box / "published"
    return path.read_text().splitlines() if path.exists() else []


def gone(pid: int, within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while Path(f"/proc/{pid}").exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def pids(box: Path) -> tuple[int, int]:
    """The fake server's pid and the watcher's, as the job wrote them."""
    deadline = time.monotonic() + 20
    while not ((box / "watcher").exists() and (box / "watcher").read_text().strip()):
        assert time.monotonic() < deadline, "the job never published its endpoint"
        time.sleep(0.05)
    return int((box / "server").read_text()), int((box / "watcher").read_text())


@pytest.mark.parametrize("body", [JOB_BODY, VLLM_BODY], ids=["gw_endpoint", "vllm-recipe"])
def test_an_idle_server_is_stopped_and_the_job_ends_completed_with_the_reason(
    box: Path, body: str
) -> None:
    with Metrics(lambda: PAGE.format(running="0.0", done="7.0", now=time.time())) as metrics:
        job = start_job(box, metrics.port, body=body)
        server, watcher = pids(box)
        started = time.monotonic()
        try:
            out, err = job.communicate(timeout=LIMIT + 15)
        finally:
            job.kill()
        took = time.monotonic() - started
    assert job.returncode == 0, err
    # The trapped signal ended `wait "$GW_SERVER"`; the trap's exit ended the script.
    assert "went on after wait" not in out, out
    assert LIMIT - 1 <= took <= LIMIT + 8, (took, err)
    last = published(box)[-1]
    assert "|phase=completed|" in last, published(box)
    assert last.endswith(f"|reason={REASON}"), last
    assert f"phase completed ({REASON})" in err
    assert gone(server), "the server outlived the job"
    assert gone(watcher), "the watcher outlived the job"
    assert metrics.authorized >= 2  # it did read the metrics, with the key
    assert KEY not in out + err
    if body is VLLM_BODY:
        assert "own exit trap" in err  # the recipe's EXIT trap ran, and ended the watcher


def busy(running: str) -> Callable[[], str]:
    return lambda: PAGE.format(running=running, done="7.0", now=time.time())


def counting() -> str:
    # Another request finished every second.
    return PAGE.format(running="0.0", done=f"{int(time.time())}.0", now=time.time())


@pytest.mark.parametrize(
    ("page", "key"),
    [
        pytest.param(counting, KEY, id="requests-finish"),
        pytest.param(busy("1.0"), KEY, id="a-request-runs"),
        pytest.param(busy("0.0"), "not-the-key", id="metrics-refused"),
    ],
)
def test_a_server_with_requests_or_unreadable_metrics_is_not_stopped(
    box: Path, page: Callable[[], str], key: str
) -> None:
    with Metrics(page) as metrics:
        job = start_job(box, metrics.port, key=key)
        server, watcher = pids(box)
        try:
            with pytest.raises(subprocess.TimeoutExpired):
                job.wait(timeout=2 * LIMIT)
            assert metrics.asked >= 4, "the watcher did not poll"
            assert not any("phase=completed" in line for line in published(box))
        finally:
            job.terminate()  # a cancel: SIGTERM
            _, err = job.communicate(timeout=30)
    assert job.returncode == 143, err
    assert gone(server), "the server outlived the job"
    assert gone(watcher), "the watcher outlived the job"
    # A refused poll is said once, however often it fails.
    assert err.count("idle stop: cannot read") == (1 if key != KEY else 0), err


def test_the_key_goes_to_no_listener_but_the_servers_own(box: Path) -> None:
    """Another process holds the port (here: the test's): the watcher never
    asks it, so it never gets the service's key, and the service runs on."""
    with Metrics(lambda: PAGE.format(running="0.0", done="7.0", now=time.time())) as metrics:
        job = start_job(box, metrics.port, OWN_LISTENER_CHECK="1")
        try:
            with pytest.raises(subprocess.TimeoutExpired):
                job.wait(timeout=2 * LIMIT)
            assert metrics.asked == 0
            assert not any("phase=completed" in line for line in published(box))
        finally:
            job.terminate()
            job.communicate(timeout=30)

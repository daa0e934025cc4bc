"""The preamble's process and port helpers (gateway/core/jobscript.py), run by
bash as a job would (as nobody under root: tests/support/sandbox.py)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.core import jobscript, metadata
from gateway.core.recipes import RecipeCatalog
from tests.support import sandbox
from tests.support.polling import free_port

ROOT = Path(__file__).resolve().parents[3]
CODEC = metadata.MetaCodec(b"h" * 32)
JOB = 11

LISTEN = """import socket, sys, time
family = socket.AF_INET6 if sys.argv[1] == "6" else socket.AF_INET
s = socket.socket(family)
if family == socket.AF_INET6:
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
s.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", int(sys.argv[2])))
s.listen()
time.sleep(30)
"""


@pytest.fixture
def box() -> Iterator[Path]:
    with sandbox.folder() as path:
        yield path


def run_body(box: Path, body: str) -> str:
    """The preamble, then ``body``; what it printed."""
    recipe = RecipeCatalog.load([ROOT / "tests" / "recipes"]).get("testing/http")
    env = recipe.environment({})
    context = recipe.template_values(recipe.default_resources.as_config())
    meta = CODEC.new_meta(recipe=recipe.name, created=1.0, owner="u", environment=env, resources={})
    unbound = CODEC.unbound(meta)
    preamble = jobscript.build(recipe, unbound, context).split("# --- recipe", 1)[0]
    (box / "job.sh").write_text(preamble + body)
    (box / "listen.py").write_text(LISTEN)
    (box / "scontrol").write_text(
        '#!/bin/sh\n[ "$1" = show ] && echo "JobId=$3 Comment=$BOUND Priority=1"\nexit 0\n'
    )
    (box / "scontrol").chmod(0o755)
    done = sandbox.run(
        ["bash", str(box / "job.sh")],
        env={
            "PATH": f"{box}:/usr/bin:/bin",
            "SLURM_JOB_ID": str(JOB),
            "BOUND": CODEC.bind(unbound, JOB),
            "BOX": str(box),
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return done.stdout


@pytest.mark.skipif(not socket.has_ipv6, reason="needs IPv6")
def test_a_listener_beside_the_servers_on_the_same_port_is_found(box: Path) -> None:
    """The server listens on IPv4; another process takes the same port on IPv6
    only (allowed): connections by name may reach either, so the port is not
    the server's alone."""
    port = free_port()
    out = run_body(
        box,
        f"""gw_start python3 "$BOX/listen.py" 4 {port}
until gw_own_listener {port}; [ $? -ne 2 ]; do sleep 0.1; done
gw_own_listener {port}; echo "alone: $?"
python3 "$BOX/listen.py" 6 {port} & OTHER=$!
until [ "$(grep -c ':{port:04X} .* 0A ' /proc/net/tcp6)" -gt 0 ]; do sleep 0.1; done
gw_own_listener {port}; echo "beside another: $?"
kill $OTHER
gw_own_listener {port + 1 if port < 65535 else 1}; echo "none: $?"
""",
    )
    assert out.splitlines() == ["alone: 0", "beside another: 1", "none: 2"], out


def test_an_orphan_of_the_server_is_ended_with_it(box: Path) -> None:
    """What gw_start began is ended whole: a child whose parent died (init's
    now) is found by its session and stopped."""
    out = run_body(
        box,
        """gw_start python3 -c 'import subprocess, sys, time
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
time.sleep(60)'
until [ "$(gw_session_pids "$GW_SERVER" | wc -l)" -eq 2 ]; do sleep 0.1; done
CHILD=$(gw_session_pids "$GW_SERVER" | grep -vx "$GW_SERVER")
kill -KILL "$GW_SERVER"; wait "$GW_SERVER" 2>/dev/null
echo "orphan left: $(gw_session_pids "$GW_SERVER" | grep -cx "$CHILD")"
gw_stop_server
echo "after gw_stop_server: $(gw_session_pids "$CHILD" | wc -l)"
""",
    )
    assert out.splitlines() == ["orphan left: 1", "after gw_stop_server: 0"], out

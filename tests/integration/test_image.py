"""The OCI image of `make image` (deploy/image/) run with podman against cluster c2605:
read-only root, a non-root user, no installer or compiler, labels with the version,
ready against slurmrestd, and a clean exit on SIGTERM. It is run as a site runs it:
with an auth file mounted beside the Slurm key, so that it serves every interface
and asks the API's callers for a key; without one, it refuses every interface."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import tomllib
from pathlib import Path

import httpx

from gateway.testing.clusters import discover
from tests.support.clusters import TIMINGS
from tests.support.polling import free_port

ROOT = Path(__file__).resolve().parents[2]
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
IMAGE = f"localhost/slurm-gateway:{VERSION}"
ENV = {**os.environ, "CONTAINERS_CONF": str(ROOT / "deploy" / "image" / "containers.conf")}
# The local tenants (their keys are in the file's comments).
TENANTS = ROOT / "deploy" / "local" / "tenants.toml"
TEAM_A = {"Authorization": "Bearer sgw_local-team-a-key"}


def podman(*args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["podman", *args], env=ENV, capture_output=True, text=True, check=check, timeout=timeout
    )


def outside_address() -> str | None:
    """An address of this machine other than loopback, if it has one (the one
    its default route leaves from; a UDP connect sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.254", 9))  # TEST-NET-1: any routable address
        except OSError:
            return None
        address: str = probe.getsockname()[0]
    return None if address.startswith("127.") else address


def image_config() -> dict[str, object]:
    found = podman("image", "inspect", IMAGE, check=False)
    assert found.returncode == 0, f"no image {IMAGE}: run `make image` ({found.stderr.strip()})"
    config: dict[str, object] = json.loads(found.stdout)[0]
    return config


def test_image_has_labels_user_and_no_build_tools() -> None:
    config = image_config()
    labels = config["Labels"]
    assert isinstance(labels, dict)
    assert labels["org.opencontainers.image.version"] == VERSION
    assert labels["org.opencontainers.image.revision"] not in ("", "unknown")
    assert "org.opencontainers.image.source" in labels
    inner = config["Config"]
    assert isinstance(inner, dict)
    assert inner["User"] == "10001:10001"
    assert inner["Entrypoint"] == ["/opt/gateway/bin/python", "-m", "gateway"]
    # Nothing that installs or compiles: no pip (as a command or a module), no compiler.
    tools = podman(
        "run", "--rm", "--network", "none", "--entrypoint", "/bin/sh", IMAGE, "-c",
        "for t in pip pip3 gcc cc c++ make ld; do command -v $t; done;"
        " python3 -c 'import pip' 2>/dev/null && echo pip-module; id -u",
    ).stdout.split()  # fmt: skip
    assert tools == ["10001"], tools


def test_image_serves_read_only_and_stops_cleanly() -> None:
    cluster = next(c for c in discover() if c.name == "c2605")
    config = image_config()
    size = config["Size"]
    assert isinstance(size, int)
    port = free_port()
    name = f"gateway-image-test-{port}"
    # The key and the auth file as Secrets would give them (deploy/kubernetes):
    # files the image's user can read, each in a folder of its own.
    secrets = Path(tempfile.mkdtemp(prefix="gateway-image-key-"))
    secrets.chmod(0o755)
    (secrets / "slurm").mkdir(mode=0o755)
    (secrets / "clients").mkdir(mode=0o755)
    key = secrets / "slurm" / "jwt_hs256.key"
    shutil.copyfile(cluster.jwt_key, key)
    auth_file = secrets / "clients" / "auth.toml"
    shutil.copyfile(TENANTS, auth_file)
    for path in (key, auth_file):
        path.chmod(0o400)
        os.chown(path, 10001, 10001)
    try:
        started = time.monotonic()
        # No GATEWAY_HOST: with clients authenticating, the default is every
        # interface, as a container needs to be reached from outside.
        podman(
            "run", "-d", "--name", name, "--read-only", "--network", "host",
            "-v", f"{secrets / 'slurm'}:/var/run/secrets/slurm-gateway:ro",
            "-v", f"{secrets / 'clients'}:/var/run/secrets/slurm-gateway-clients:ro",
            "-e", f"GATEWAY_PORT={port}",
            "-e", f"GATEWAY_SLURM_URL={cluster.url}",
            "-e", f"GATEWAY_SLURM_USER={cluster.user}",
            "-e", "GATEWAY_SLURM_JWT_KEY_FILE=/var/run/secrets/slurm-gateway/jwt_hs256.key",
            "-e", "GATEWAY_AUTH_FILE=/var/run/secrets/slurm-gateway-clients/auth.toml",
            IMAGE,
        )  # fmt: skip
        ready = None
        deadline = started + 60
        while time.monotonic() < deadline:
            try:
                answer = httpx.get(f"http://127.0.0.1:{port}/api/v1/ready", timeout=2)
                if answer.status_code == 200:
                    ready = answer.json()
                    break
            except httpx.HTTPError:
                pass
            state = podman("inspect", "--format", "{{.State.Status}}", name).stdout.strip()
            assert state == "running", podman("logs", name).stderr[-2000:]
            time.sleep(0.2)
        took = time.monotonic() - started
        assert ready is not None, f"not ready in 60 s: {podman('logs', name).stdout[-2000:]}"
        assert ready["status"] == "ok"
        assert ready["slurm_release"] == cluster.slurm_release
        # Every interface (the start-up line says where it listens).
        listening = [
            json.loads(line) for line in podman("logs", name).stdout.splitlines()
            if '"clients authenticate"' in line
        ]  # fmt: skip
        assert [entry["host"] for entry in listening] == ["0.0.0.0"], listening  # noqa: S104
        outside = outside_address()
        if outside is not None:
            health = httpx.get(f"http://{outside}:{port}/api/v1/health", timeout=5)
            assert health.status_code == 200, (outside, health.text)
        # The API asks for a key; the probes' paths do not.
        api = f"http://127.0.0.1:{port}/api/v1"
        refused = httpx.get(f"{api}/services", timeout=5)
        assert refused.status_code == 401, refused.text
        assert refused.headers["WWW-Authenticate"].startswith("Bearer realm=")
        listed = httpx.get(f"{api}/services", headers=TEAM_A, timeout=10)
        assert listed.status_code == 200, listed.text
        assert httpx.get(f"{api}/health", timeout=5).status_code == 200
        # The API reference ships inside: Swagger UI's files, not a CDN's.
        page = httpx.get(f"{api}/schema", headers=TEAM_A, timeout=5)
        assert page.status_code == 200 and "https://" not in page.text
        script = httpx.get(f"{api}/schema/assets/swagger-ui-bundle.js", headers=TEAM_A, timeout=5)
        assert script.status_code == 200 and len(script.content) > 500_000
        # The root filesystem is read-only, and the gateway runs anyway.
        write = podman("exec", name, "sh", "-c", "touch /opt/gateway/x", check=False)
        assert write.returncode != 0
        assert "Read-only file system" in write.stderr
        # SIGTERM: the graceful stop ends with status 0.
        podman("stop", "--time", "30", name, timeout=60)
        code = podman("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip()
        assert code == "0", podman("logs", name).stdout[-2000:]
        TIMINGS.append(
            f"image: {IMAGE} {size / 1e6:.0f} MB, podman run --read-only as uid 10001: "
            f"/api/v1/ready ok (Slurm {ready['slurm_release']}, "
            f"{ready['slurm_api_version']}) in {took:.1f} s; with an auth file on 0.0.0.0"
            f"{f' (reached at {outside})' if outside else ''}, the API 401 without a key; "
            f"stop exit {code}"
        )
    finally:
        podman("rm", "--force", "--time", "5", name, check=False)
        shutil.rmtree(secrets, ignore_errors=True)


def test_image_refuses_every_interface_without_client_authentication() -> None:
    image_config()
    name = f"gateway-image-noauth-{free_port()}"
    try:
        # Valid Slurm settings (never used: start-up stops before), no auth file.
        refused = podman(
            "run", "--rm", "--name", name, "--network", "none", "--read-only",
            "-e", "GATEWAY_HOST=0.0.0.0",
            "-e", "GATEWAY_SLURM_URL=http://127.0.0.1:6820",
            "-e", "GATEWAY_SLURM_AUTH=static",
            "-e", "GATEWAY_SLURM_TOKEN=unused",
            "-e", "GATEWAY_SECRET=0123456789abcdef0123456789abcdef",
            IMAGE, check=False, timeout=30,
        )  # fmt: skip
    finally:
        podman("rm", "--force", "--time", "0", name, check=False)
    assert refused.returncode == 2, (refused.returncode, refused.stderr[-2000:])
    assert "GATEWAY_HOST" in refused.stderr, refused.stderr[-2000:]


def test_image_holds_the_versions_the_tests_ran_with() -> None:
    image_config()
    listing = (
        "import importlib.metadata as m; "
        "print('\\n'.join(f'{d.name.lower()}=={d.version}' for d in m.distributions()))"
    )
    inside = set(
        podman(
            "run", "--rm", "--network", "none", "--entrypoint", "/opt/gateway/bin/python",
            IMAGE, "-c", listing,
        ).stdout.split()
    )  # fmt: skip
    tested = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "python"), str(ROOT / "deploy/image/tested_versions.py")],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    # Names as distributions spell them may differ in case or - and _.
    normal = {line.replace("_", "-") for line in inside}
    missing = [pin for pin in tested if pin not in normal]
    assert not missing, f"the image differs from the tested venv: {missing}"

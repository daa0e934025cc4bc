"""The Kubernetes manifests, played for real.

``deploy/kubernetes/overlays/local`` rendered with kustomize is played with
``podman kube play`` (the image of ``make image``) against cluster c2605's
slurmrestd on the host's loopback. Through the pod: create a service (the
OpenAI-shaped stub), follow its status to ``running``, prompt it, stop it, and
find those requests counted in ``/metrics``. podman plays Deployments,
ConfigMaps and Secrets only, so the Service, PodDisruptionBudget and
NetworkPolicy are left out here (tests/unit/test_manifests.py checks them).

What else podman 4.3 needs (the test does it to the rendered documents): a
Secret volume comes from podman's own secret store, and with `data` as plain
text; a `secret` volume without `optional` crashes it; with the host's network
it refuses container ports, so the probes get the port by number. A token
replaced in the Secret's folder is used at once (renewal without a restart).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from gateway.slurm.auth import MintedTokens
from gateway.testing.clusters import LocalCluster, discover
from tests.conftest import free_port
from tests.integration.conftest import TIMINGS

ROOT = Path(__file__).resolve().parents[2]
KUBECTL = Path(sys.executable).parent / "kubectl"
OVERLAY = ROOT / "deploy" / "kubernetes" / "overlays" / "local"
IMAGE = "localhost/slurm-gateway:latest"
PLAYED = {"Deployment", "ConfigMap", "Secret"}
POD = "slurm-gateway-pod-0"  # podman names a Deployment's pod <name>-pod-<n>
ENV = {**os.environ, "CONTAINERS_CONF": str(ROOT / "deploy" / "image" / "containers.conf")}


def podman(*args: str, check: bool = True, timeout: float = 120) -> str:
    done = subprocess.run(
        ["podman", *args], env=ENV, capture_output=True, text=True, timeout=timeout
    )
    if check and done.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)}: {done.stderr.strip()[-2000:]}")
    return done.stdout


def c2605() -> LocalCluster:
    found = [c for c in discover() if c.name == "c2605"]
    assert found, "cluster c2605 is not up: run `make cluster`"
    return found[0]


def token(cluster: LocalCluster) -> str:
    """What a site would put in the Secret: a token for the gateway's user."""
    return asyncio.run(cluster.tokens(lifespan=3600).credentials()).token


def podman_version() -> tuple[int, int]:
    out = podman("version", "--format", "{{.Client.Version}}").strip()
    major, minor = out.split(".")[:2]
    return int(major), int(minor)


def played_manifests(
    cluster: LocalCluster, port: int
) -> tuple[list[dict[str, Any]], dict[str, Any], list[str]]:
    """The overlay's documents podman plays, with this machine's values filled in.

    Returns the documents to play, the Secret (podman 4.3 takes a secret volume
    from its own secret store, not from the played file) and what was left out.
    """
    rendered = subprocess.run(
        [str(KUBECTL), "kustomize", str(OVERLAY)], check=True, capture_output=True, text=True
    ).stdout
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    left_out = sorted(
        f"{d['kind']}/{d['metadata']['name']}" for d in docs if d["kind"] not in PLAYED
    )
    secrets_ = [d for d in docs if d["kind"] == "Secret"]
    assert len(secrets_) == 1, [d["metadata"]["name"] for d in secrets_]
    secret = secrets_[0]
    # podman 4.3 writes a Secret's `data` into the volume as it stands, without
    # base64-decoding it, and ignores `stringData`: the values go in as plain
    # text. So the binary JWT key cannot travel, and the pod gets what a site's
    # Secret holds with static auth instead: a token (minted here from the
    # cluster's key) and the gateway's secret.
    # podman 4.4 and later decode `data` as Kubernetes does (containers/podman#16631).
    secret.pop("stringData", None)
    values = {"token": token(cluster), "gateway-secret": secrets.token_hex(32)}
    if podman_version() >= (4, 4):
        values = {k: base64.b64encode(v.encode()).decode() for k, v in values.items()}
    secret["data"] = values
    docs = [d for d in docs if d["kind"] in PLAYED and d["kind"] != "Secret"]
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    secret_volume = next(v["name"] for v in pod["volumes"] if "secret" in v)
    mounted = next(
        m["mountPath"] for m in pod["containers"][0]["volumeMounts"] if m["name"] == secret_volume
    )
    for doc in docs:
        if doc["kind"] == "ConfigMap" and "GATEWAY_HOST" in doc.get("data", {}):
            settings = doc["data"]
            settings["GATEWAY_PORT"] = str(port)
            settings.pop("GATEWAY_SLURM_JWT_KEY_FILE", None)
            settings["GATEWAY_SLURM_AUTH"] = "static"
            settings["GATEWAY_SLURM_TOKEN_FILE"] = f"{mounted}/token"
            settings["GATEWAY_SECRET_FILE"] = f"{mounted}/gateway-secret"
        if doc["kind"] == "Deployment":
            pod = doc["spec"]["template"]["spec"]
            container = pod["containers"][0]
            # With the host's network podman refuses port mappings; the port
            # listened on is GATEWAY_PORT, which the probes get by number.
            container.pop("ports", None)
            for probe in ("livenessProbe", "readinessProbe"):
                container[probe]["httpGet"]["port"] = port
            for volume in pod["volumes"]:
                path = volume.get("hostPath", {}).get("path", "")
                if "/set/by/the/test/" in path:
                    volume["hostPath"]["path"] = str(ROOT / path.split("/set/by/the/test/")[1])
                elif "/c2605/root/" in path:
                    # The overlay names the default GATEWAY_LOCAL_ROOT.
                    inside = "/" + path.split("/c2605/root/", 1)[1]
                    volume["hostPath"]["path"] = str(cluster.host_path(inside))
                if "secret" in volume:
                    # podman 4.3 dereferences `optional` unchecked (a nil pointer panic).
                    volume["secret"]["optional"] = False
    return docs, secret, left_out


def wait_for(what: str, deadline_s: float, probe: Any) -> Any:
    deadline = time.monotonic() + deadline_s
    last: object = None
    while time.monotonic() < deadline:
        try:
            result = probe()
        except httpx.HTTPError as exc:
            result, last = None, exc
        if result:
            return result
        time.sleep(0.5)
    raise AssertionError(f"{what} not within {deadline_s} s (last: {last!r})\n{pod_logs()}")


def pod_logs() -> str:
    return podman("pod", "logs", "--tail", "40", POD, check=False)


def secret_mount(docs: list[dict[str, Any]]) -> str:
    pod = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    volume = next(v["name"] for v in pod["volumes"] if "secret" in v)
    mounts = pod["containers"][0]["volumeMounts"]
    return str(next(m["mountPath"] for m in mounts if m["name"] == volume))


def renew_token(cluster: LocalCluster, api: httpx.Client, mounted_at: str) -> None:
    """A token replaced in the mounted Secret is used without a restart.

    The kubelet swaps a renewed Secret's files in place; here the file in
    podman's volume is replaced the same way (a new file renamed over it).
    """
    mounts = json.loads(podman("inspect", f"{POD}-gateway", "--format", "{{json .Mounts}}"))
    folder = Path(next(m["Source"] for m in mounts if m["Destination"] == mounted_at))

    def replace(text: str) -> None:
        fresh = folder / ".token.new"
        fresh.write_text(text)
        fresh.chmod(0o644)
        fresh.rename(folder / "token")

    started = time.monotonic()
    forged = MintedTokens(secrets.token_bytes(32), cluster.user, lifespan=600)
    replace(asyncio.run(forged.credentials()).token)
    wait_for("a refused token to show", 30, lambda: api.get("/api/v1/ready").status_code != 200)
    refused = time.monotonic() - started
    replace(asyncio.run(cluster.tokens(lifespan=3600).credentials()).token)
    wait_for(
        "the renewed token to be used", 30, lambda: api.get("/api/v1/ready").status_code == 200
    )
    TIMINGS.append(
        f"kube play: token replaced in the Secret's folder: a bad one refused after "
        f"{refused:.1f} s, a good one ready after {time.monotonic() - started - refused:.1f} s"
    )


def test_manifests_played_with_podman_serve_a_service_walk(tmp_path: Path) -> None:
    cluster = c2605()
    podman("image", "exists", IMAGE)  # else: run `make image` first
    size = int(podman("image", "inspect", "--format", "{{.Size}}", IMAGE))
    TIMINGS.append(f"kube play: image {IMAGE} {size / 1e6:.0f} MB")

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    docs, secret, left_out = played_manifests(cluster, port)
    manifest = tmp_path / "played.yaml"
    manifest.write_text(yaml.safe_dump_all(docs))
    secret_file = tmp_path / "secret.yaml"
    secret_file.write_text(yaml.safe_dump(secret))
    secret_name = secret["metadata"]["name"]
    TIMINGS.append(f"kube play: left out (podman does not play them): {', '.join(left_out)}")

    # podman makes a volume per ConfigMap and Secret and kube down leaves them
    # (with the token inside): removed before and after.
    volumes = [secret_name] + [d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap"]

    def clean_up() -> None:
        podman("kube", "down", str(manifest), check=False)
        podman("secret", "rm", secret_name, check=False)
        podman("volume", "rm", "--force", *volumes, check=False)

    clean_up()  # whatever an aborted run left
    podman("secret", "create", secret_name, str(secret_file))
    service_id = None
    started = time.monotonic()
    try:
        podman("kube", "play", str(manifest))
        with httpx.Client(base_url=url, timeout=10) as api:
            answers: list[httpx.Response] = []

            def ready() -> bool:
                answers.append(api.get("/api/v1/ready"))
                return answers[-1].status_code == 200

            try:
                wait_for("readiness", 90, ready)
            except AssertionError as exc:
                last = answers[-1].text if answers else None
                raise AssertionError(f"{exc}\nlast /ready: {last}") from None
            readiness = answers[-1].json()
            TIMINGS.append(
                f"kube play: ready after {time.monotonic() - started:.1f} s "
                f"(Slurm {readiness.get('slurm_release')}, {readiness.get('slurm_api_version')})"
            )

            # The restricted securityContext as podman applied it.
            inside = podman("exec", f"{POD}-gateway", "sh", "-c", "id -u; touch /probe 2>&1; true")
            assert inside.splitlines()[0] == "10001", inside
            assert "Read-only file system" in inside, inside

            created = api.post("/api/v1/services", json={"recipe_name": "testing/openai-stub"})
            assert created.status_code == 201, created.text
            service_id = created.json()["id"]
            statuses = [created.json()["status"]]

            def running() -> bool:
                status = api.get(f"/api/v1/services/{service_id}/status").json()["status"]
                if status != statuses[-1]:
                    statuses.append(status)
                assert status not in {"failed", "cancelled", "timeout", "completed"}, status
                return status == "running"

            wait_for("running", 90, running)
            answer = api.post(
                f"/api/v1/vllm/{service_id}/prompt", json={"prompt": "hello", "max_tokens": 8}
            )
            assert answer.status_code == 200, answer.text
            assert answer.json()["response"]

            stopped = api.delete(f"/api/v1/services/{service_id}")
            assert stopped.status_code == 200, stopped.text

            def ended() -> bool:
                status = api.get(f"/api/v1/services/{service_id}/status").json()["status"]
                if status != statuses[-1]:
                    statuses.append(status)
                return status == "cancelled"

            wait_for("cancelled", 60, ended)
            TIMINGS.append(f"kube play: service {service_id}: {' -> '.join(statuses)}")

            renew_token(cluster, api, mounted_at=secret_mount(docs))

            metrics = api.get("/metrics").text
            counted = [
                line
                for line in metrics.splitlines()
                if line.startswith("gateway_http_request_duration_seconds_count")
                and ('method="POST"' in line or 'method="DELETE"' in line)
            ]
            for line in counted:
                TIMINGS.append(f"kube play: {line}")
            assert re.search(
                r'gateway_http_request_duration_seconds_count\{[^}]*method="POST"'
                r'[^}]*path="/api/v1/services"[^}]*status="201"[^}]*\} 1\.0',
                metrics,
            ), counted
            assert re.search(
                r'gateway_http_request_duration_seconds_count\{[^}]*method="POST"'
                r'[^}]*path="/api/v1/vllm/[^"]*/prompt"[^}]*status="200"[^}]*\} 1\.0',
                metrics,
            ), counted
    finally:
        if service_id is not None:
            subprocess.run(["chroot", cluster.chroot, "scancel", service_id], check=False)
        stopping = time.monotonic()
        clean_up()
        TIMINGS.append(f"kube play: kube down took {time.monotonic() - stopping:.1f} s")
        left = podman("ps", "-a", "--filter", f"name={POD}", "--format", "{{.Names}}")
        assert not left.strip(), f"containers left after kube down: {left}"
        pods = podman("pod", "ps", "--filter", f"name={POD}", "--format", "{{.Name}}")
        assert not pods.strip(), f"pod left after kube down: {pods}"
        kept = set(podman("volume", "ls", "--format", "{{.Name}}").split()) & set(volumes)
        assert not kept, f"volumes left after kube down: {kept}"

"""The Kubernetes manifests, played for real.

``deploy/kubernetes/overlays/local`` rendered with kustomize is played with
``podman kube play`` (the image of ``make image``) against cluster c2605's
slurmrestd on the host's loopback. Through the pod: create a service (the
OpenAI-shaped stub), follow its status to ``running``, prompt it, stop it, and
find those requests counted in ``/metrics``. Clients authenticate with the keys
of ``deploy/local/tenants.toml``, which the overlay mounts from a Secret, as a
site does: without a key the API answers 401 while the probes' paths and
``/metrics`` answer anyone. podman plays Deployments,
ConfigMaps and Secrets only, so the Service, PodDisruptionBudget and
NetworkPolicy are left out here (tests/unit/test_manifests.py checks them).

What else podman 4.3 needs (the test does it to the rendered documents): a
Secret volume comes from podman's own secret store, and with `data` as plain
text; a `secret` volume without `optional` crashes it; with the host's network
it refuses container ports, so the probes get the port by number. A token
replaced in the Secret's folder is used at once (renewal without a restart),
and so is an auth file replaced in its Secret's folder (a key revoked, then
restored, without a restart).
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

from gateway.slurm.tokens import MintedTokens
from gateway.testing.clusters import LocalCluster, discover
from tests.support.clusters import TIMINGS
from tests.support.polling import free_port

ROOT = Path(__file__).resolve().parents[2]
KUBECTL = Path(sys.executable).parent / "kubectl"
OVERLAY = ROOT / "deploy" / "kubernetes" / "overlays" / "local"
IMAGE = "localhost/slurm-gateway:latest"
# The auth file the overlay carries, and its keys (in its comments).
TENANTS = ROOT / "deploy" / "local" / "tenants.toml"
TEAM_A = {"Authorization": "Bearer sgw_local-team-a-key"}  # jobs as gwuser
TEAM_B = {"Authorization": "Bearer sgw_local-team-b-key"}  # jobs as gwteam
ADMIN = {"Authorization": "Bearer sgw_local-admin-key"}
SLURM_SECRET = "slurm-gateway-slurm"  # the Slurm credentials (a generated name)
CLIENTS_SECRET = "slurm-gateway-clients"  # the auth file
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


def named(name: str, prefix: str) -> bool:
    """``prefix``, or ``prefix`` with the hash suffix of a kustomize generator."""
    return re.fullmatch(re.escape(prefix) + r"(-[a-z0-9]{10})?", name) is not None


def secret_named(docs: list[dict[str, Any]], prefix: str) -> dict[str, Any]:
    """The Secret whose name is ``prefix``, with or without a generator's suffix."""
    found = [d for d in docs if d["kind"] == "Secret" and named(d["metadata"]["name"], prefix)]
    assert len(found) == 1, [d["metadata"]["name"] for d in docs if d["kind"] == "Secret"]
    return found[0]


def played_manifests(
    cluster: LocalCluster, port: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[str]]:
    """The overlay's documents podman plays, with this machine's values filled in.

    Returns the documents to play, the Secrets (podman 4.3 takes a secret volume
    from its own secret store, not from the played file) and what was left out.
    """
    # The overlay takes deploy/local/tenants.toml from outside its folder.
    rendered = subprocess.run(
        [str(KUBECTL), "kustomize", "--load-restrictor", "LoadRestrictionsNone", str(OVERLAY)],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    left_out = sorted(
        f"{d['kind']}/{d['metadata']['name']}" for d in docs if d["kind"] not in PLAYED
    )
    slurm_secret = secret_named(docs, SLURM_SECRET)
    clients_secret = secret_named(docs, CLIENTS_SECRET)
    assert len([d for d in docs if d["kind"] == "Secret"]) == 2
    # podman 4.3 writes a Secret's `data` into the volume as it stands, without
    # base64-decoding it, and ignores `stringData`: the values go in as plain
    # text. So the binary JWT key cannot travel, and the pod gets what a site's
    # Secret holds with static auth instead: a token (minted here from the
    # cluster's key) and the gateway's secret. The auth file is the overlay's
    # own (deploy/local/tenants.toml), as rendered.
    # podman 4.4 and later decode `data` as Kubernetes does (containers/podman#16631).
    slurm_secret["data"] = {"token": token(cluster), "gateway-secret": secrets.token_hex(32)}
    clients_secret["data"] = {
        k: base64.b64decode(v).decode() for k, v in clients_secret["data"].items()
    }
    assert clients_secret["data"]["auth.toml"] == TENANTS.read_text()
    for secret in (slurm_secret, clients_secret):
        secret.pop("stringData", None)
        if podman_version() >= (4, 4):
            secret["data"] = {
                k: base64.b64encode(v.encode()).decode() for k, v in secret["data"].items()
            }
    docs = [d for d in docs if d["kind"] in PLAYED and d["kind"] != "Secret"]
    mounted = secret_mount(docs, SLURM_SECRET)
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
    return docs, [slurm_secret, clients_secret], left_out


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


def secret_mount(docs: list[dict[str, Any]], prefix: str) -> str:
    """Where the container mounts the Secret named ``prefix`` (maybe with a suffix)."""
    pod = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    volume = next(
        v["name"]
        for v in pod["volumes"]
        if named(v.get("secret", {}).get("secretName", ""), prefix)
    )
    mounts = pod["containers"][0]["volumeMounts"]
    return str(next(m["mountPath"] for m in mounts if m["name"] == volume))


def mounted_folder(mounted_at: str) -> Path:
    """The host folder behind a mount of the pod's container (podman's volume)."""
    mounts = json.loads(podman("inspect", f"{POD}-gateway", "--format", "{{json .Mounts}}"))
    return Path(next(m["Source"] for m in mounts if m["Destination"] == mounted_at))


def replace_file(folder: Path, name: str, text: str) -> None:
    """As the kubelet swaps a changed Secret in: a new file renamed over the old."""
    fresh = folder / f".{name}.new"
    fresh.write_text(text)
    fresh.chmod(0o644)
    fresh.rename(folder / name)


def renew_token(cluster: LocalCluster, api: httpx.Client, mounted_at: str) -> None:
    """A token replaced in the mounted Secret is used without a restart.

    The kubelet swaps a renewed Secret's files in place; here the file in
    podman's volume is replaced the same way (a new file renamed over it).
    """
    folder = mounted_folder(mounted_at)

    def replace(text: str) -> None:
        replace_file(folder, "token", text)

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


def without_keys_of(tenant: str, auth_file: str) -> str:
    """The auth file less the [[keys]] entries of ``tenant``."""
    head, *entries = auth_file.split("[[keys]]")
    kept = [e for e in entries if f'tenant = "{tenant}"' not in e]
    assert len(kept) < len(entries), f"no key of {tenant}"
    return "[[keys]]".join([head, *kept])


def rotate_keys(api: httpx.Client, mounted_at: str) -> None:
    """A key revoked in the mounted auth file is refused without a restart, and
    one added back is let in again: the gateway re-reads the changed file."""
    folder = mounted_folder(mounted_at)
    original = (folder / "auth.toml").read_text()
    assert original == TENANTS.read_text()
    started = time.monotonic()
    replace_file(folder, "auth.toml", without_keys_of("team-a", original))
    wait_for(
        "the revoked key to be refused",
        30,
        lambda: api.get("/api/v1/services", headers=TEAM_A).status_code == 401,
    )
    revoked = time.monotonic() - started
    # The other tenants' keys stayed in force all along.
    assert api.get("/api/v1/services", headers=TEAM_B).status_code == 200
    replace_file(folder, "auth.toml", original)
    wait_for(
        "the restored key to be let in",
        30,
        lambda: api.get("/api/v1/services", headers=TEAM_A).status_code == 200,
    )
    TIMINGS.append(
        f"kube play: auth file replaced in the Secret's folder: a revoked key refused after "
        f"{revoked:.1f} s, restored after {time.monotonic() - started - revoked:.1f} s"
    )


def check_who_may_call(api: httpx.Client) -> None:
    """Without credentials: the API 401, the probes' paths and /metrics 200."""
    for path in ("/api/v1/services", "/api/v1/services/1/status"):
        refused = api.get(path)
        assert refused.status_code == 401, (path, refused.status_code, refused.text)
        assert refused.headers["WWW-Authenticate"].startswith("Bearer realm="), refused.headers
    wrong = api.get("/api/v1/services", headers={"Authorization": "Bearer sgw_not-a-key"})
    assert wrong.status_code == 401, wrong.text
    refused_create = api.post("/api/v1/services", json={"recipe_name": "testing/openai-stub"})
    assert refused_create.status_code == 401, refused_create.text
    for path in ("/api/v1/ready?slurm=false", "/api/v1/health", "/metrics"):
        answer = api.get(path)
        assert answer.status_code == 200, (path, answer.status_code, answer.text)


def test_manifests_played_with_podman_serve_a_service_walk(tmp_path: Path) -> None:
    cluster = c2605()
    podman("image", "exists", IMAGE)  # else: run `make image` first
    size = int(podman("image", "inspect", "--format", "{{.Size}}", IMAGE))
    TIMINGS.append(f"kube play: image {IMAGE} {size / 1e6:.0f} MB")

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    docs, played_secrets, left_out = played_manifests(cluster, port)
    manifest = tmp_path / "played.yaml"
    manifest.write_text(yaml.safe_dump_all(docs))
    secret_names = [s["metadata"]["name"] for s in played_secrets]
    TIMINGS.append(f"kube play: left out (podman does not play them): {', '.join(left_out)}")

    # podman makes a volume per ConfigMap and Secret and kube down leaves them
    # (with the token inside): removed before and after.
    volumes = secret_names + [d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap"]

    def clean_up() -> None:
        podman("kube", "down", str(manifest), check=False)
        for name in secret_names:
            podman("secret", "rm", name, check=False)
        podman("volume", "rm", "--force", *volumes, check=False)

    clean_up()  # whatever an aborted run left
    for secret in played_secrets:
        secret_file = tmp_path / f"{secret['metadata']['name']}.yaml"
        secret_file.write_text(yaml.safe_dump(secret))
        podman("secret", "create", secret["metadata"]["name"], str(secret_file))
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

            check_who_may_call(api)
            # The Secret holds a static token for gwuser: team-b, whose Slurm
            # user is gwteam, cannot create through this gateway (403).
            foreign = api.post(
                "/api/v1/services", json={"recipe_name": "testing/openai-stub"}, headers=TEAM_B
            )
            assert foreign.status_code == 403, foreign.text

            created = api.post(
                "/api/v1/services", json={"recipe_name": "testing/openai-stub"}, headers=TEAM_A
            )
            assert created.status_code == 201, created.text
            service_id = created.json()["id"]
            # Another tenant: the same 404 as an unknown id. The admin: found.
            other = api.get(f"/api/v1/services/{service_id}/status", headers=TEAM_B)
            assert other.status_code == 404, other.text
            listed = api.get("/api/v1/services", headers=ADMIN).json()
            assert service_id in [s["id"] for s in listed], listed
            assert service_id not in [
                s["id"] for s in api.get("/api/v1/services", headers=TEAM_B).json()
            ]
            statuses = [created.json()["status"]]

            def running() -> bool:
                status = api.get(f"/api/v1/services/{service_id}/status", headers=TEAM_A)
                status = status.json()["status"]
                if status != statuses[-1]:
                    statuses.append(status)
                assert status not in {"failed", "cancelled", "timeout", "completed"}, status
                return status == "running"

            wait_for("running", 90, running)
            answer = api.post(
                f"/api/v1/vllm/{service_id}/prompt",
                json={"prompt": "hello", "max_tokens": 8},
                headers=TEAM_A,
            )
            assert answer.status_code == 200, answer.text
            assert answer.json()["response"]

            stopped = api.delete(f"/api/v1/services/{service_id}", headers=TEAM_A)
            assert stopped.status_code == 200, stopped.text

            def ended() -> bool:
                status = api.get(f"/api/v1/services/{service_id}/status", headers=TEAM_A)
                status = status.json()["status"]
                if status != statuses[-1]:
                    statuses.append(status)
                return status == "cancelled"

            wait_for("cancelled", 60, ended)
            TIMINGS.append(f"kube play: service {service_id}: {' -> '.join(statuses)}")

            renew_token(cluster, api, mounted_at=secret_mount(docs, SLURM_SECRET))
            rotate_keys(api, mounted_at=secret_mount(docs, CLIENTS_SECRET))

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

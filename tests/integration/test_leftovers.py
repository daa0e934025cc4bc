"""Nothing of a service outlives its job.

A server killed inside a service leaves its children behind unless the job
ends them: vLLM's engine (``VLLM::EngineCore`` and its worker, GBs of memory,
on a GPU node the GPU's) is reparented to init, where process tracking that
follows parents (proctrack/linuxproc) no longer finds it. The recipes start
their server in a session of their own and end all of it on every exit
(gateway/core/jobscript.py, ``gw_start``; tests/unit/test_vllm_recipe.py
checks that without Slurm), and the local clusters track jobs by cgroup where
the host allows it (deploy/local/README.md).

The OpenAI-shaped stub recipe forks an "engine" that outlives it, as vLLM's
does. The last test of the run (tests/integration/conftest.py orders it so)
looks on every cluster, after the fault tests, for a process of a job user
whose job is in no queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from gateway.testing.clusters import LocalCluster
from tests.support.clusters import TIMINGS
from tests.support.gateway_process import serving
from tests.support.live_services import running_stub
from tests.support.polling import poll


def active_jobs(cluster: LocalCluster) -> set[str]:
    """The ids of the jobs Slurm has in any queue (pending, running, completing...)."""
    done = subprocess.run(
        ["chroot", cluster.chroot, "/usr/bin/env", "-i", "PATH=/usr/bin:/usr/sbin",
         "squeue", "-h", "-a", "-o", "%i"],
        check=True, timeout=30, capture_output=True, text=True,
    )  # fmt: skip
    return set(done.stdout.split())


def job_users(cluster: LocalCluster) -> dict[int, str]:
    """uid -> name of the cluster users whose jobs the tests run."""
    names = (cluster.user, cluster.team_user, cluster.other_user)
    return {cluster.user_ids(name)[0]: name for name in names}


class Process:
    def __init__(self, pid: int, uid: int, job: str | None, command: str) -> None:
        self.pid, self.uid, self.job, self.command = pid, uid, job, command

    def __repr__(self) -> str:
        return f"{self.pid} uid {self.uid} job {self.job}: {self.command[:120]}"


def processes(cluster: LocalCluster, uids: set[int] | None = None) -> list[Process]:
    """The live processes rooted in the cluster's chroot (of ``uids`` only when
    given), with the Slurm job named by their environment."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if not cluster.roots(proc):
                continue
            uid = proc.stat().st_uid
            if uids is not None and uid not in uids:
                continue
            if (proc / "stat").read_text().rsplit(") ", 1)[1].startswith("Z"):
                continue  # dead, waiting for init to reap it
            job = job_of(proc)
            command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # gone meanwhile
        found.append(Process(int(proc.name), uid, job, command.strip()))
    return found


def job_of(proc: Path) -> str | None:
    """The Slurm job in the process's environment, else in its parent's or its
    session leader's: vLLM's engine renames itself (setproctitle), which
    overwrites what /proc shows of its environment."""
    stat = (proc / "stat").read_text().rsplit(") ", 1)[1].split()
    for where in (proc, Path("/proc", stat[1]), Path("/proc", stat[3])):
        try:
            for entry in (where / "environ").read_bytes().split(b"\0"):
                if entry.startswith(b"SLURM_JOB_ID="):
                    return entry.split(b"=", 1)[1].decode()
        except OSError:
            continue
    return None


def of_job(cluster: LocalCluster, job: str) -> list[Process]:
    return [p for p in processes(cluster) if p.job == job]


def outliving(cluster: LocalCluster) -> list[Process]:
    """Processes of the job users whose job is in no queue (or who have none)."""
    active = active_jobs(cluster)
    return [p for p in processes(cluster, set(job_users(cluster))) if p.job not in active]


def kill_all(found: list[Process]) -> None:
    for process in found:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGKILL)


@pytest.fixture
async def api(cluster: LocalCluster) -> AsyncIterator[httpx.AsyncClient]:
    async with serving(cluster) as client:
        yield client


async def test_a_killed_server_leaves_nothing_behind(
    cluster: LocalCluster, api: httpx.AsyncClient
) -> None:
    sid = await running_stub(api)
    try:
        mine = of_job(cluster, sid)
        engine = [p for p in mine if "stub-engine" in p.command]
        server = [p for p in mine if p.command.split()[1:2] == ["-"]]  # python3 - PORT
        assert engine, mine
        assert server, mine
        # What the fault test does to vLLM: its API server killed outright.
        os.kill(server[0].pid, signal.SIGKILL)
        killed_at = time.monotonic()
        ended = await poll(
            lambda: api.get(f"/api/v1/services/{sid}"),
            lambda r: r.json()["ended_at"] is not None,
            timeout=60,
            what="the job's end",
        )
        ended_after = time.monotonic() - killed_at
        left = await poll(
            lambda: asyncio.to_thread(of_job, cluster, sid),
            lambda found: not found,
            timeout=15,
            what=f"no process of job {sid} left once it ended",
        )
        service = ended.json()
        assert service["status"] == "failed", service
        assert "exited with code 137" in service["status_reason"], service
        TIMINGS.append(
            f"leftovers | {cluster.name} | stub server SIGKILLed in a service | job ended "
            f'{ended_after:.1f} s later, failed ("{service["status_reason"]}"); '
            f"its processes left: {len(left)} (its engine: {engine[0].pid} gone)"
        )
    finally:
        await api.delete(f"/api/v1/services/{sid}")
        kill_all(of_job(cluster, sid) if sid not in active_jobs(cluster) else [])


async def test_no_process_outlives_its_job(cluster: LocalCluster) -> None:
    """Runs last: whatever the tests before did (vLLM killed, slurmd killed,
    services cancelled, timed out, failed), no process of a job user is left
    whose job is in no queue. A process still being killed as its job ends
    gets the deadline."""
    users = job_users(cluster)
    checked = len(processes(cluster, set(users)))
    try:
        await poll(
            lambda: asyncio.to_thread(outliving, cluster),
            lambda found: not found,
            timeout=30,
            interval=1,
            what=f"no process of {', '.join(users.values())} outside a job on {cluster.name}",
        )
    except AssertionError:
        # What ended jobs left goes, so that it does not haunt the next run.
        kill_all([p for p in outliving(cluster) if p.job is not None])
        raise
    TIMINGS.append(
        f"leftovers | {cluster.name} | end of the run | 0 processes of ended jobs "
        f"({checked} processes of the job users, all in live jobs)"
    )

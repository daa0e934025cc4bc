"""Record real slurmrestd answers as fixtures for the adapter unit tests.

For every local cluster and every API version its slurmrestd serves, this
sends the requests our adapters build (and a few deliberately bad ones) and
stores each answer untouched under
``tests/fixtures/slurmrestd/<release>/<version>/<scenario>.json``:
``{"scenario", "request", "status", "body", "meta"}``. ``meta`` holds what the
tests need to know about the scenario (the job id, the expected exit code).
A version with no adapter is skipped: a new one's adapter comes first (see
gateway/slurm/adapters/__init__.py).

Usage: ``make fixtures`` (the clusters must be up: ``make cluster``);
``make fixtures ONLY=c2605`` records one cluster's answers and leaves the
others' files untouched.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import jwt

from gateway.slurm.adapters import Adapter, Request, adapter_for
from gateway.slurm.models import JobState, JobSubmission
from gateway.testing.clusters import LocalCluster, discover

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "slurmrestd"
DEADLINE = 90.0

FINISH_SCRIPT = """#!/bin/sh
echo "hello from $SLURM_JOB_ID greeting=$GW_GREETING"
echo "to stderr" >&2
sleep 3
exit 3
"""
# USR1 would end a plain sleep (and the job, as FAILED) before the cancel.
SLEEP_SCRIPT = "#!/bin/sh\ntrap 'echo got USR1' USR1\nwhile true; do sleep 1; done\n"


class Recorder:
    def __init__(self, cluster: LocalCluster, version: str, http: httpx.AsyncClient) -> None:
        self.cluster = cluster
        self.adapter: Adapter = adapter_for(version)
        self.http = http
        self.tokens = cluster.tokens()
        self.folder = OUT / cluster.slurm_release / version
        self.folder.mkdir(parents=True, exist_ok=True)

    async def send(self, request: Request, headers: dict[str, str] | None = None) -> httpx.Response:
        if headers is None:
            headers = (await self.tokens.credentials()).headers()
        return await self.http.request(
            request.method,
            self.cluster.url + request.path,
            params=request.params or None,
            json=request.body,
            headers=headers,
        )

    async def record(
        self,
        scenario: str,
        request: Request,
        *,
        meta: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        response = await self.send(request, headers)
        fixture = {
            "scenario": scenario,
            "request": {
                "method": request.method,
                "path": request.path,
                "params": request.params,
                "body": request.body,
            },
            "status": response.status_code,
            "body": response.text,
            "meta": meta or {},
        }
        path = self.folder / f"{scenario}.json"
        path.write_text(json.dumps(fixture, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        print(f"  {self.adapter.version} {scenario}: HTTP {response.status_code}")
        return response

    def job(self, name: str, script: str, **overrides: Any) -> JobSubmission:
        fields: dict[str, Any] = {
            "script": script,
            "name": name,
            "working_directory": f"/home/{self.cluster.user}",
            "partition": self.cluster.partition,
            "environment": {"PATH": "/usr/bin:/bin", "GW_GREETING": "fixture"},
            "standard_output": f"/home/{self.cluster.user}/{name}-%j.out",
            "standard_error": f"/home/{self.cluster.user}/{name}-%j.err",
            "cpus_per_task": 1,
            "memory_per_node_mb": 64,
            "time_limit_minutes": 5,
            "comment": "fixture",
        }
        fields.update(overrides)
        return JobSubmission(**fields)

    async def submit(self, scenario: str | None, job: JobSubmission) -> int:
        request = self.adapter.submit_request(job)
        if scenario:
            response = await self.record(scenario, request)
        else:
            response = await self.send(request)
        return self.adapter.parse_submit(response.status_code, response.content).job_id

    async def wait_for(self, job_id: int, states: set[JobState]) -> None:
        deadline = time.monotonic() + DEADLINE
        while time.monotonic() < deadline:
            response = await self.send(self.adapter.get_job_request(job_id))
            info = self.adapter.parse_job(response.status_code, response.content, job_id)
            # Wait until Slurm is done with the job too, so later answers are stable.
            if info.state in states and "COMPLETING" not in info.state_flags:
                return
            await asyncio.sleep(0.5)
        raise TimeoutError(f"job {job_id} did not reach {states} in {DEADLINE}s")

    async def run(self) -> None:
        a = self.adapter
        await self.record("ping", a.ping_request())

        finish = self.job("fx-finish", FINISH_SCRIPT)
        job_id = await self.submit("submit", finish)
        meta = {"job_id": job_id, "user": self.cluster.user, "name": finish.name}
        await self.wait_for(job_id, {JobState.RUNNING})
        await self.record("job_running", a.get_job_request(job_id), meta=meta)
        await self.record(
            "update_comment", a.update_comment_request(job_id, "phase=running"), meta=meta
        )
        await self.record("job_running_commented", a.get_job_request(job_id), meta=meta)
        await self.wait_for(job_id, {JobState.FAILED, JobState.COMPLETED})
        await self.record(
            "job_finished", a.get_job_request(job_id), meta={**meta, "return_code": 3}
        )
        listed = await self.record("jobs_list", a.list_jobs_request(None), meta=meta)
        # "Nothing changed since T" needs a quiet moment on slurmctld (it bumps
        # its change time on its own now and then): retry with a fresh T.
        for _ in range(10):
            listed = await self.send(a.list_jobs_request(None))
            last = a.parse_jobs(listed.status_code, listed.content).last_update
            # v0.0.38 has no last_update: the time of the listing serves instead.
            since = last + timedelta(seconds=1) if last else datetime.now(tz=UTC)
            await asyncio.sleep(2.0)
            answer = await self.record("jobs_list_unchanged", a.list_jobs_request(since), meta=meta)
            if a.parse_jobs(answer.status_code, answer.content).unchanged:
                break
        await self.record("job_cancel_finished", a.cancel_request(job_id, None), meta=meta)

        sleeper = self.job("fx-sleep", SLEEP_SCRIPT)
        sleep_id = await self.submit(None, sleeper)
        await self.wait_for(sleep_id, {JobState.RUNNING})
        sleep_meta = {"job_id": sleep_id, "user": self.cluster.user, "name": sleeper.name}
        await self.record("job_signal_usr1", a.cancel_request(sleep_id, "SIGUSR1"), meta=sleep_meta)
        await self.record("job_cancel", a.cancel_request(sleep_id, None), meta=sleep_meta)
        await self.wait_for(sleep_id, {JobState.CANCELLED})
        await self.record("job_cancelled", a.get_job_request(sleep_id), meta=sleep_meta)

        await self.record("job_unknown", a.get_job_request(999_999), meta={"job_id": 999_999})
        node = self.cluster.node
        await self.record("node", a.get_node_request(node), meta={"node": node})
        unknown = "gw-no-such-node"
        await self.record("node_unknown", a.get_node_request(unknown), meta={"node": unknown})
        bad_partition = self.job("fx-bad", "#!/bin/sh\ntrue\n", partition="no-such-partition")
        await self.record("submit_bad_partition", a.submit_request(bad_partition))
        too_big = self.job("fx-big", "#!/bin/sh\ntrue\n", memory_per_node_mb=64 * 1024 * 1024)
        await self.record("submit_too_much_memory", a.submit_request(too_big))
        bad_memory = a.submit_request(self.job("fx-mem", "#!/bin/sh\ntrue\n"))
        assert bad_memory.body is not None
        body = json.loads(json.dumps(bad_memory.body))
        body["job"]["memory_per_node"] = "lots"
        await self.record(
            "submit_bad_memory",
            Request(method=bad_memory.method, path=bad_memory.path, body=body),
        )

        key = Path(self.cluster.jwt_key).read_bytes()
        now = int(time.time())
        user = self.cluster.user
        expired = jwt.encode({"sun": user, "iat": now - 600, "exp": now - 300}, key, "HS256")
        forged = jwt.encode({"sun": user, "iat": now, "exp": now + 300}, b"x" * 32, "HS256")
        for label, token in (("expired", expired), ("forged", forged)):
            headers = {"X-SLURM-USER-NAME": user, "X-SLURM-USER-TOKEN": token}
            await self.record(f"ping_{label}_token", a.ping_request(), headers=headers)
            await self.record(f"jobs_{label}_token", a.list_jobs_request(None), headers=headers)
            if label == "forged":
                await self.record(
                    "node_forged_token",
                    a.get_node_request(node),
                    headers=headers,
                    meta={"node": node},
                )
            await self.record(
                f"submit_{label}_token",
                a.submit_request(self.job("fx-auth", "#!/bin/sh\ntrue\n")),
                headers=headers,
            )
        await self.record("ping_no_token", a.ping_request(), headers={})


async def main(only: list[str]) -> int:
    clusters = discover()
    if not clusters:
        print("no local clusters found; run `make cluster` first", file=sys.stderr)
        return 1
    if only:
        unknown = set(only) - {c.name for c in clusters}
        if unknown:
            print(f"no such local cluster: {', '.join(sorted(unknown))}", file=sys.stderr)
            return 1
        clusters = [c for c in clusters if c.name in only]
    async with httpx.AsyncClient(timeout=30.0) as http:
        for cluster in clusters:
            print(f"{cluster.name}: Slurm {cluster.slurm_release} at {cluster.url}")
            for version in cluster.api_versions:
                try:
                    adapter_for(version)
                except ValueError:
                    print(f"  {version}: no adapter, skipped")
                    continue
                await Recorder(cluster, version, http).run()
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("clusters", nargs="*", help="cluster names (default: all)")
    raise SystemExit(asyncio.run(main(parser.parse_args().clusters)))

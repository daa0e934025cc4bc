"""The slurmrestd client against the live local clusters (Slurm 22.05, 24.11, 26.05)."""

from __future__ import annotations

import json
import signal
import time
import uuid
from pathlib import Path

import jwt
import pytest

from gateway.slurm import (
    SUPPORTED_VERSIONS,
    Credentials,
    JobInfo,
    JobState,
    JobSubmission,
    MintedTokens,
    SlurmAuthError,
    SlurmClient,
    SlurmJobNotFound,
    SlurmRequestRejected,
)
from gateway.testing.clusters import LocalCluster
from tests.support.clusters import NEGOTIATED
from tests.support.polling import poll


def job(cluster: LocalCluster, script: str, **overrides: object) -> JobSubmission:
    name = f"it-{uuid.uuid4().hex[:8]}"
    fields: dict[str, object] = {
        "script": script,
        "name": name,
        "working_directory": f"/home/{cluster.user}",
        "partition": cluster.partition,
        "environment": {"PATH": "/usr/bin:/bin", "GW_MESSAGE": "it works; $(not run)"},
        "standard_output": f"/home/{cluster.user}/{name}-%j.out",
        "cpus_per_task": 1,
        "memory_per_node_mb": 100,
        "time_limit_minutes": 3,
        "comment": "integration",
    }
    fields.update(overrides)
    return JobSubmission(**fields)  # type: ignore[arg-type]


async def wait_state(client: SlurmClient, job_id: int, *states: JobState) -> JobInfo:
    """Until the job is in one of ``states`` and done completing (exit code final)."""
    return await poll(
        lambda: client.get_job(job_id),
        lambda j: j.state in states and "COMPLETING" not in j.state_flags,
        timeout=90,
        what=f"job {job_id} in {states}",
    )


async def test_negotiates_newest_served_version(cluster: LocalCluster, client: SlurmClient) -> None:
    pings = await client.ping()

    def key(version: str) -> tuple[int, ...]:
        return tuple(int(x) for x in version[1:].split("."))

    # The newest version both sides speak: a daemon newer than the gateway
    # (sid moves on) may serve versions no adapter exists for yet.
    newest = max((v for v in cluster.api_versions if v in SUPPORTED_VERSIONS), key=key)
    assert client.api_version == newest
    assert pings[0].responding
    assert pings[0].slurm_release == cluster.slurm_release
    newer = sorted((v for v in cluster.api_versions if key(v) > key(newest)), key=key)
    note = f" (also serves {', '.join(newer)}: no adapter yet)" if newer else ""
    NEGOTIATED.append((cluster.name, pings[0].slurm_release, client.api_version + note))


async def test_every_served_version_submits_reads_and_cancels(cluster: LocalCluster) -> None:
    versions = [v for v in cluster.api_versions if v in SUPPORTED_VERSIONS]
    assert versions
    for version in versions:
        async with cluster.client(api_version=version) as pinned:
            submitted = await pinned.submit(job(cluster, "#!/bin/sh\nsleep 120\n"))
            info = await pinned.get_job(submitted.job_id)
            assert info.job_id == submitted.job_id
            await pinned.cancel(submitted.job_id)
            done = await wait_state(pinned, submitted.job_id, JobState.CANCELLED)
            assert done.state is JobState.CANCELLED, version


async def test_every_served_version_releases_a_held_job_at_once(cluster: LocalCluster) -> None:
    """A job held by its begin time starts when released, not at Slurm's next
    scheduling pass (the idempotent create's hold ends this way)."""
    versions = [v for v in cluster.api_versions if v in SUPPORTED_VERSIONS]
    for version in versions:
        async with cluster.client(api_version=version) as pinned:
            held = job(cluster, "#!/bin/sh\nsleep 120\n", begin_time=int(time.time()) + 600)
            submitted = await pinned.submit(held)
            try:
                info = await pinned.get_job(submitted.job_id)
                assert info.state is JobState.PENDING  # for 10 minutes, unless released
                began = time.monotonic()
                await pinned.release(submitted.job_id)
                await wait_state(pinned, submitted.job_id, JobState.RUNNING)
                print(f"{cluster.name} {version}: released job ran after "
                      f"{time.monotonic() - began:.1f} s")  # fmt: skip
            finally:
                await pinned.cancel(submitted.job_id)


async def test_job_runs_with_environment_and_completes_with_exit_code(
    cluster: LocalCluster, client: SlurmClient
) -> None:
    script = '#!/bin/sh\necho "message=$GW_MESSAGE"\necho "gpus=$SLURM_GPUS_ON_NODE"\nexit 3\n'
    submitted = await client.submit(job(cluster, script, cpus_per_task=2, gpus_per_node=1))
    info = await client.get_job(submitted.job_id)
    assert info.name.startswith("it-")
    assert info.user_name == cluster.user
    assert info.partition == cluster.partition
    assert info.comment == "integration"
    assert info.time_limit_minutes == 3
    assert info.memory_per_node_mb == 100
    assert info.cpus == 2

    done = await wait_state(client, submitted.job_id, JobState.FAILED, JobState.COMPLETED)
    assert done.state is JobState.FAILED
    assert done.exit is not None and done.exit.return_code == 3
    assert done.standard_output.endswith(f"-{submitted.job_id}.out")
    output = cluster.host_path(done.standard_output).read_text()
    # The value arrived as inert data: no command substitution happened.
    assert "message=it works; $(not run)" in output
    assert "gpus=1" in output  # the GPU request reached Slurm in this version's shape


async def test_cancel_running_job(cluster: LocalCluster, client: SlurmClient) -> None:
    submitted = await client.submit(job(cluster, "#!/bin/sh\nsleep 300\n"))
    await wait_state(client, submitted.job_id, JobState.RUNNING)
    await client.cancel(submitted.job_id)
    done = await wait_state(client, submitted.job_id, JobState.CANCELLED)
    # Slurm signals every process of the job: either the shell dies of SIGTERM
    # itself, or its `sleep` dies first and the shell exits with 128 + 15.
    assert done.exit is not None
    assert done.exit.signal == signal.SIGTERM or done.exit.return_code == 128 + signal.SIGTERM
    # A second cancel of the finished job is not an error.
    await client.cancel(submitted.job_id)


async def test_update_comment_is_read_back(cluster: LocalCluster, client: SlurmClient) -> None:
    submitted = await client.submit(job(cluster, "#!/bin/sh\nsleep 120\n"))
    try:
        await client.update_comment(submitted.job_id, "phase=starting;endpoint=node:1234")
        info = await client.get_job(submitted.job_id)
        assert info.comment == "phase=starting;endpoint=node:1234"
        listed = await client.list_jobs()
        assert submitted.job_id in {j.job_id for j in listed.jobs}
    finally:
        await client.cancel(submitted.job_id)


async def test_job_can_publish_its_own_comment(cluster: LocalCluster, client: SlurmClient) -> None:
    script = (
        "#!/bin/sh\n"
        'scontrol update jobid="$SLURM_JOB_ID" comment="phase=running;endpoint=$(hostname):4321"\n'
        "sleep 60\n"
    )
    submitted = await client.submit(job(cluster, script))
    try:
        info = await poll(
            lambda: client.get_job(submitted.job_id),
            lambda j: j.comment.startswith("phase=running"),
            timeout=60,
            what="comment published by the job",
        )
        assert info.comment.endswith(":4321")
    finally:
        await client.cancel(submitted.job_id)


async def test_unknown_partition_is_rejected(cluster: LocalCluster, client: SlurmClient) -> None:
    with pytest.raises(SlurmRequestRejected) as info:
        await client.submit(job(cluster, "#!/bin/sh\ntrue\n", partition="no-such-partition"))
    assert 2000 in info.value.error_numbers
    assert "Invalid partition name" in str(info.value)


async def test_impossible_memory_is_rejected(cluster: LocalCluster, client: SlurmClient) -> None:
    with pytest.raises(SlurmRequestRejected) as info:
        await client.submit(job(cluster, "#!/bin/sh\ntrue\n", memory_per_node_mb=64 * 1024**2))
    assert 2014 in info.value.error_numbers


async def test_malformed_memory_is_rejected(cluster: LocalCluster, client: SlurmClient) -> None:
    # The domain type holds memory as an integer, so a malformed value can
    # only reach Slurm through a hand-made body; it must still be typed.
    adapter = await client.adapter()
    request = adapter.submit_request(job(cluster, "#!/bin/sh\ntrue\n"))
    assert request.body is not None
    body = json.loads(json.dumps(request.body))
    body["job"]["memory_per_node"] = "lots"
    response = await client._call(type(request)(method="POST", path=request.path, body=body))
    with pytest.raises(SlurmRequestRejected) as info:
        adapter.parse_submit(response.status_code, response.content)
    assert "memory" in str(info.value).lower()


async def test_unknown_job_is_not_found(client: SlurmClient) -> None:
    with pytest.raises(SlurmJobNotFound) as info:
        await client.get_job(987_654_321)
    assert 2017 in info.value.error_numbers


@pytest.mark.parametrize("kind", ["expired", "forged"])
async def test_bad_tokens_give_auth_error(
    cluster: LocalCluster, client: SlurmClient, kind: str
) -> None:
    await client.ping()  # negotiate with good credentials first
    now = int(time.time())
    if kind == "expired":
        key = Path(cluster.jwt_key).read_bytes()
        claims = {"sun": cluster.user, "iat": now - 600, "exp": now - 60}
    else:
        key = b"not-the-cluster-key-not-the-key!"
        claims = {"sun": cluster.user, "iat": now, "exp": now + 600}
    token = jwt.encode(claims, key, algorithm="HS256")
    bad = client.as_user(Credentials(cluster.user, token))
    with pytest.raises(SlurmAuthError) as info:
        await bad.list_jobs()
    assert token not in str(info.value)
    with pytest.raises(SlurmAuthError):
        await bad.submit(job(cluster, "#!/bin/sh\ntrue\n"))


async def test_pass_through_credentials(cluster: LocalCluster, client: SlurmClient) -> None:
    own = await cluster.tokens().credentials()
    as_caller = client.as_user(own)
    submitted = await as_caller.submit(job(cluster, "#!/bin/sh\nsleep 60\n"))
    try:
        listed = await as_caller.list_jobs()
        assert submitted.job_id in {j.job_id for j in listed.jobs}
    finally:
        await as_caller.cancel(submitted.job_id)


async def test_minted_tokens_are_renewed_before_expiry(cluster: LocalCluster) -> None:
    tokens = MintedTokens(
        Path(cluster.jwt_key).read_bytes(), cluster.user, lifespan=4.0, renew_before=2.0
    )
    seen: set[str] = set()
    async with SlurmClient(cluster.url, tokens) as client:

        async def ping_once() -> int:
            creds = await tokens.credentials()
            claims = jwt.decode(creds.token, options={"verify_signature": False})
            assert claims["exp"] - time.time() > 1.0, "a token close to expiry was handed out"
            seen.add(creds.token)
            pings = await client.ping()
            assert pings[0].responding
            return tokens.minted

        minted = await poll(ping_once, lambda n: n >= 3, timeout=20, interval=0.5)
    assert minted >= 3
    assert len(seen) >= 3

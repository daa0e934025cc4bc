"""Every version adapter against answers recorded from live slurmrestd daemons,
and the requests each version builds.

The fixtures come from ``make fixtures`` (scripts/record_fixtures.py); each
test taking ``rec`` runs once per recorded (Slurm release, API version) pair.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from gateway.slurm import (
    JobState,
    JobSubmission,
    SlurmAuthError,
    SlurmJobNotFound,
    SlurmNodeNotFound,
    SlurmRequestRejected,
)
from gateway.slurm.adapters import ADAPTERS, Adapter, adapter_for
from tests.support.recorded import FIXTURES

VERSION_DIRS = sorted(p for p in FIXTURES.glob("*/v*") if p.is_dir())


def _ids() -> list[str]:
    return [f"{p.parent.name}-{p.name}" for p in VERSION_DIRS]


class Recorded:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.release = folder.parent.name
        self.adapter: Adapter = adapter_for(folder.name)

    def load(self, scenario: str) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.folder / f"{scenario}.json").read_text())
        return data

    def answer(self, scenario: str) -> tuple[int, bytes, dict[str, Any]]:
        data = self.load(scenario)
        return data["status"], data["body"].encode(), data["meta"]


@pytest.fixture(params=VERSION_DIRS, ids=_ids())
def rec(request: pytest.FixtureRequest) -> Recorded:
    return Recorded(request.param)


def test_fixtures_cover_every_local_release_and_every_adapter() -> None:
    releases = {p.parent.name.split(".")[0] for p in VERSION_DIRS}
    assert {"22", "24", "26"} <= releases, f"recorded releases: {sorted(releases)}"
    recorded = {p.name for p in VERSION_DIRS}
    # v0.0.39 is the one version no Debian release's slurmrestd serves.
    assert set(ADAPTERS) - recorded == {"v0.0.39"}, f"recorded versions: {sorted(recorded)}"


def test_ping_reports_release_and_responding(rec: Recorded) -> None:
    status, body, _ = rec.answer("ping")
    pings = rec.adapter.parse_ping(status, body)
    assert pings, "no controller in the ping answer"
    assert all(p.responding for p in pings)
    assert pings[0].slurm_release == rec.release
    assert pings[0].api_version == rec.folder.name


def test_submit_returns_job_id(rec: Recorded) -> None:
    status, body, _ = rec.answer("submit")
    result = rec.adapter.parse_submit(status, body)
    assert result.job_id == rec.answer("job_running")[2]["job_id"]


def test_submit_request_sent_environment_in_this_versions_shape(rec: Recorded) -> None:
    request = rec.load("submit")["request"]
    env = request["body"]["job"]["environment"]
    if rec.folder.name == "v0.0.38":
        assert env == {"PATH": "/usr/bin:/bin", "GW_GREETING": "fixture"}
    else:
        assert env == ["PATH=/usr/bin:/bin", "GW_GREETING=fixture"]


def test_running_job(rec: Recorded) -> None:
    status, body, meta = rec.answer("job_running")
    job = rec.adapter.parse_job(status, body, meta["job_id"])
    assert job.state is JobState.RUNNING
    assert job.exit is None
    assert job.start_time is not None and job.submit_time is not None
    assert job.end_time is None or job.end_time >= job.start_time
    assert job.user_name == meta["user"]
    assert job.name == meta["name"]
    assert job.comment == "fixture"
    assert job.time_limit_minutes == 5
    assert job.memory_per_node_mb == 64
    assert job.batch_host and job.nodes
    # %j is expanded whatever the version sends.
    assert job.standard_output == f"/home/{meta['user']}/{meta['name']}-{meta['job_id']}.out"
    assert job.standard_error == f"/home/{meta['user']}/{meta['name']}-{meta['job_id']}.err"


def test_comment_update_is_visible(rec: Recorded) -> None:
    status, body, meta = rec.answer("update_comment")
    rec.adapter.parse_update(status, body, meta["job_id"])
    status, body, meta = rec.answer("job_running_commented")
    assert rec.adapter.parse_job(status, body, meta["job_id"]).comment == "phase=running"


def test_finished_job_has_exit_code(rec: Recorded) -> None:
    status, body, meta = rec.answer("job_finished")
    job = rec.adapter.parse_job(status, body, meta["job_id"])
    assert job.state is JobState.FAILED
    assert job.state_reason == "NonZeroExitCode"
    assert job.exit is not None
    assert job.exit.return_code == meta["return_code"]
    assert job.exit.signal is None
    assert job.start_time and job.end_time and job.end_time >= job.start_time


def test_list_contains_the_job(rec: Recorded) -> None:
    status, body, meta = rec.answer("jobs_list")
    listing = rec.adapter.parse_jobs(status, body)
    assert meta["job_id"] in {j.job_id for j in listing.jobs}
    # v0.0.38 has no last_update; callers then use their own clock.
    assert (listing.last_update is None) == (rec.folder.name == "v0.0.38")
    assert not listing.unchanged


def test_list_since_last_update_is_unchanged(rec: Recorded) -> None:
    status, body, _ = rec.answer("jobs_list_unchanged")
    listing = rec.adapter.parse_jobs(status, body)
    assert listing.unchanged
    assert listing.jobs == ()


def test_cancel_and_cancelled_job(rec: Recorded) -> None:
    status, body, meta = rec.answer("job_cancel")
    rec.adapter.parse_cancel(status, body, meta["job_id"])
    status, body, meta = rec.answer("job_cancelled")
    job = rec.adapter.parse_job(status, body, meta["job_id"])
    assert job.state is JobState.CANCELLED
    assert job.exit is not None and job.exit.signal is not None


def test_signal_to_running_job_is_accepted(rec: Recorded) -> None:
    status, body, meta = rec.answer("job_signal_usr1")
    rec.adapter.parse_cancel(status, body, meta["job_id"])


def test_cancelling_a_finished_job_is_not_an_error(rec: Recorded) -> None:
    status, body, meta = rec.answer("job_cancel_finished")
    rec.adapter.parse_cancel(status, body, meta["job_id"])


def test_unknown_job_is_typed_not_found(rec: Recorded) -> None:
    status, body, meta = rec.answer("job_unknown")
    with pytest.raises(SlurmJobNotFound) as info:
        rec.adapter.parse_job(status, body, meta["job_id"])
    assert 2017 in info.value.error_numbers


def test_bad_partition_is_rejected_with_slurms_reason(rec: Recorded) -> None:
    status, body, _ = rec.answer("submit_bad_partition")
    with pytest.raises(SlurmRequestRejected) as info:
        rec.adapter.parse_submit(status, body)
    assert 2000 in info.value.error_numbers
    assert "Invalid partition name specified" in str(info.value)


def test_too_much_memory_is_rejected(rec: Recorded) -> None:
    status, body, _ = rec.answer("submit_too_much_memory")
    with pytest.raises(SlurmRequestRejected) as info:
        rec.adapter.parse_submit(status, body)
    assert 2014 in info.value.error_numbers


def test_malformed_memory_is_rejected(rec: Recorded) -> None:
    status, body, _ = rec.answer("submit_bad_memory")
    with pytest.raises(SlurmRequestRejected) as info:
        rec.adapter.parse_submit(status, body)
    assert "memory" in str(info.value).lower()


@pytest.mark.parametrize("label", ["expired", "forged"])
@pytest.mark.parametrize("call", ["ping", "jobs", "submit"])
def test_bad_tokens_are_auth_errors(rec: Recorded, label: str, call: str) -> None:
    status, body, _ = rec.answer(f"{call}_{label}_token")
    parse = {
        "ping": rec.adapter.parse_ping,
        "jobs": rec.adapter.parse_jobs,
        "submit": rec.adapter.parse_submit,
    }[call]
    try:
        result = parse(status, body)
    except SlurmAuthError:
        return
    # v0.0.42+ answers ping with HTTP 200 and responding=false instead.
    assert call == "ping" and not any(p.responding for p in result)  # type: ignore[union-attr]


@pytest.mark.parametrize("version", list(ADAPTERS))
def test_a_job_without_environment_still_gets_one(version: str) -> None:
    # Slurm refuses an empty environment (22.05 and 24.11 both, seen live).
    body = adapter_for(version).submit_body(
        JobSubmission(script="#!/bin/sh\ntrue\n", name="x", working_directory="/tmp")
    )
    env = body["job"]["environment"]
    assert env in ({"PATH": "/usr/local/bin:/usr/bin:/bin"}, ["PATH=/usr/local/bin:/usr/bin:/bin"])


# -- user id -------------------------------------------------------------------


@pytest.mark.parametrize("scenario", ["job_running", "job_finished", "job_cancelled"])
def test_job_has_the_users_numeric_id(rec: Recorded, scenario: str) -> None:
    status, body, meta = rec.answer(scenario)
    sent = json.loads(body)["jobs"][0]["user_id"]
    job = rec.adapter.parse_job(status, body, meta["job_id"])
    assert isinstance(sent, int) and sent > 0
    assert job.user_id == sent


def test_listed_jobs_have_user_ids(rec: Recorded) -> None:
    status, body, _ = rec.answer("jobs_list")
    listing = rec.adapter.parse_jobs(status, body)
    assert listing.jobs and all(isinstance(j.user_id, int) for j in listing.jobs)


# -- node lookup ---------------------------------------------------------------


def test_node_lookup(rec: Recorded) -> None:
    status, body, meta = rec.answer("node")
    node = rec.adapter.parse_node(status, body, meta["node"])
    # Each local cluster names its one node after itself and runs it on the
    # controller's host (whatever that machine was called when recorded).
    controller = rec.adapter.parse_ping(*rec.answer("ping")[:2])[0].hostname
    assert controller
    assert (node.name, node.hostname, node.address) == (meta["node"], controller, "127.0.0.1")
    # Recorded idle or busy, never unavailable.
    assert node.state and node.unavailable is None, node.state


def test_unknown_node_is_typed_not_found(rec: Recorded) -> None:
    status, body, meta = rec.answer("node_unknown")
    with pytest.raises(SlurmNodeNotFound, match=meta["node"]) as info:
        rec.adapter.parse_node(status, body, meta["node"])
    # v0.0.38: HTTP 500, {error, errno: 2018}; v0.0.40+: HTTP 200, error 0.
    expected = 2018 if rec.folder.name == "v0.0.38" else 0
    assert info.value.error_numbers == (expected,)


def test_node_lookup_with_forged_token_is_auth_error(rec: Recorded) -> None:
    status, body, meta = rec.answer("node_forged_token")
    with pytest.raises(SlurmAuthError):
        rec.adapter.parse_node(status, body, meta["node"])


def test_node_request_asks_for_one_node(rec: Recorded) -> None:
    sent = rec.load("node")["request"]
    request = rec.adapter.get_node_request(rec.load("node")["meta"]["node"])
    assert (request.method, request.path, request.params) == (
        sent["method"],
        sent["path"],
        sent["params"],
    )


@pytest.mark.parametrize("version", list(ADAPTERS))
def test_node_request_path(version: str) -> None:
    request = adapter_for(version).get_node_request("gpu-01.rack_2")
    assert request.method == "GET"
    assert request.path == f"/slurm/{version}/node/gpu-01.rack_2"
    assert request.body is None


@pytest.mark.parametrize("version", list(ADAPTERS))
@pytest.mark.parametrize("name", ["", "a/b", "..", "n1?x=1", "n 1", "n1%2F", "x" * 256])
def test_node_request_refuses_unsafe_names(version: str, name: str) -> None:
    with pytest.raises(ValueError, match="invalid node name"):
        adapter_for(version).get_node_request(name)


def test_an_emptied_queue_is_a_change_not_unchanged(rec: Recorded) -> None:
    """The last job purged: every version must say the queue changed, or the
    view would keep showing that job until another one came."""
    status, body, _ = rec.answer("jobs_list")
    answer = json.loads(body)
    answer["jobs"] = []
    listing = rec.adapter.parse_jobs(status, json.dumps(answer).encode())
    assert (listing.jobs, listing.unchanged) == ((), False)

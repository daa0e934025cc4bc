"""Reading a job's log file: only the gateway's own file, never anything else."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import msgspec
import pytest

from gateway.core.errors import Conflict, NotFound
from gateway.core.joblogs import read_tail
from gateway.slurm import JobState
from tests.support.services import ADMIN, CODEC, blob, fake_manager, job_info

UID = os.getuid()


def test_a_regular_file_of_the_jobs_user_is_read_with_bounds(tmp_path: Path) -> None:
    (tmp_path / "job.out").write_text("one\ntwo\nthree\n")
    got = read_tail(tmp_path, "job.out", uid=UID, lines=2, max_bytes=1024)
    assert (got.text, got.truncated, got.refused) == ("two\nthree\n", True, None)
    capped = read_tail(tmp_path, "job.out", uid=UID, lines=None, max_bytes=9)
    assert (capped.text, capped.truncated) == ("three\n", True)
    assert read_tail(tmp_path, "none.out", uid=UID, lines=None, max_bytes=9).missing


def test_a_symlink_is_not_followed(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("key")
    (tmp_path / "job.out").symlink_to(tmp_path / "secret")
    got = read_tail(tmp_path, "job.out", uid=UID, lines=None, max_bytes=1024)
    assert got.text == ""
    assert got.refused is not None
    assert "symbolic link" in got.refused


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "job.out")
    result: list[object] = []
    reader = threading.Thread(
        target=lambda: result.append(
            read_tail(tmp_path, "job.out", uid=UID, lines=None, max_bytes=1024)
        )
    )
    reader.start()
    reader.join(timeout=5)
    assert not reader.is_alive(), "reading a FIFO blocked"
    assert "not a regular file" in str(result)


def test_another_owner_an_unknown_owner_or_a_hard_link_is_refused(tmp_path: Path) -> None:
    (tmp_path / "job.out").write_text("x")
    other = read_tail(tmp_path, "job.out", uid=UID + 1, lines=None, max_bytes=1024)
    unknown = read_tail(tmp_path, "job.out", uid=None, lines=None, max_bytes=1024)
    assert "not owned by the job's user" in str(other.refused)
    assert "not owned by the job's user" in str(unknown.refused)
    (tmp_path / "secret").write_text("key")
    os.link(tmp_path / "secret", tmp_path / "linked.out")
    linked = read_tail(tmp_path, "linked.out", uid=UID, lines=None, max_bytes=1024)
    assert linked.text == ""
    assert "hard links" in str(linked.refused)


@pytest.mark.parametrize("name", ["../x", "a/b", "..", ".", ""])
def test_only_a_plain_file_name_is_taken(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="not a file name"):
        read_tail(tmp_path, name, uid=UID, lines=None, max_bytes=1)


async def test_a_services_logs_come_from_the_files_the_gateway_named(tmp_path: Path) -> None:
    """Through ServiceManager.logs: the job's user's folder, mapped to where
    the gateway's host mounts it; a path Slurm reports elsewhere is not read."""
    services, fake = fake_manager(job_dir="/cluster/{user}", path_map=[("/cluster", str(tmp_path))])
    name = f"gw-testing-http-{CODEC.job_tag}"
    (tmp_path / "gwuser").mkdir()
    (tmp_path / "gwuser" / f"{name}-7.out").write_text("started\n")
    out = f"/cluster/gwuser/{name}-7.out"
    running = job_info(7, blob(), user_id=UID, standard_output=out, standard_error="/tmp/e")
    fake.put(running)
    logs = await services.logs("7", ADMIN, tail=None)
    assert (logs.stdout, logs.stderr) == ("started\n", "")  # stderr refused, not read
    assert logs.reason is not None and "'/tmp/e'" in logs.reason
    assert services.local_path("/cluster/gwuser") == tmp_path / "gwuser"
    fake.put(msgspec.structs.replace(running, state=JobState.PENDING))
    await services.view.fresh(services.view.clock())
    with pytest.raises(Conflict, match="pending"):
        await services.logs("7", ADMIN, tail=None)
    fake.put(msgspec.structs.replace(running, standard_error=""))
    await services.view.fresh(services.view.clock())
    (tmp_path / "gwuser" / f"{name}-7.out").unlink()
    with pytest.raises(NotFound, match=f"no log file .* at /cluster/gwuser .*{tmp_path}/gwuser"):
        await services.logs("7", ADMIN, tail=None)
    await services.prober.aclose()

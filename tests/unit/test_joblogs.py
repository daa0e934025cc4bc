"""Reading a job's log file: only the gateway's own file, never anything else."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from gateway.core.joblogs import read_tail

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

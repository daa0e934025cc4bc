"""Following a service's logs (gateway/core/logfollow.py) through
ServiceManager.follow_logs: new lines in order, the same file checks as a
read of the logs, the end with the job, the bounds of followers."""

from __future__ import annotations

import asyncio
import gc
import json
import os
from collections.abc import AsyncGenerator
from pathlib import Path

import msgspec
import pytest

from gateway.core import joblogs, logfollow
from gateway.core.errors import NotFound
from gateway.core.joblogs import Followers, FollowersFull, TooManyFollowers
from gateway.core.logfollow import LogEvent, _split
from gateway.core.principal import Method, Principal, Role
from gateway.slurm import JobState
from tests.support.services import ADMIN, CODEC, blob, fake_manager, job_info

UID = os.getuid()
NAME = f"gw-testing-http-{CODEC.job_tag}-7"
Events = AsyncGenerator[LogEvent, None]


@pytest.fixture(autouse=True)
def fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logfollow, "FOLLOW_POLL_SECONDS", 0.01)


class Job:
    """Service 7 of gwuser, its files in ``tmp_path/gwuser`` (the cluster's
    /cluster/gwuser as the gateway's host mounts it)."""

    def __init__(self, tmp_path: Path, *, stderr: bool = True, **fields: object) -> None:
        self.dir = tmp_path / "gwuser"
        self.dir.mkdir()
        self.services, self.fake = fake_manager(
            job_dir="/cluster/{user}", path_map=[("/cluster", str(tmp_path))]
        )
        given: dict[str, object] = {
            "user_id": UID,
            "standard_output": f"/cluster/gwuser/{NAME}.out",
            "standard_error": f"/cluster/gwuser/{NAME}.err" if stderr else "",
            **fields,
        }
        self.job = job_info(7, blob(), **given)
        self.fake.put(self.job)

    @property
    def out(self) -> Path:
        return self.dir / f"{NAME}.out"

    @property
    def err(self) -> Path:
        return self.dir / f"{NAME}.err"

    def append(self, path: Path, text: str) -> None:
        with path.open("a") as f:
            f.write(text)

    async def becomes(self, state: JobState, **fields: object) -> None:
        """Slurm's record of the job changes, and the view lists it."""
        self.job = msgspec.structs.replace(self.job, state=state, **fields)
        self.fake.put(self.job)
        await self.services.view.fresh(self.services.view.clock())

    async def follow(self, tail: int | None = None, principal: Principal = ADMIN) -> Events:
        return await self.services.follow_logs("7", principal, tail=tail)


async def events(follow: Events, count: int, timeout: float = 5.0) -> list[tuple[str, str]]:
    """The next ``count`` events (heartbeat comments left out)."""
    got: list[tuple[str, str]] = []
    async with asyncio.timeout(timeout):
        while len(got) < count:
            event = await anext(follow)
            if event.event:
                got.append((event.event, event.data))
    return got


def ended(event: tuple[str, str]) -> dict[str, str]:
    assert event[0] == "end", event
    body: dict[str, str] = json.loads(event[1])
    return body


async def test_appended_lines_come_in_order_and_the_follow_ends_with_the_job(
    tmp_path: Path,
) -> None:
    job = Job(tmp_path)
    job.out.write_text("one\n")
    follow = await job.follow()
    assert await events(follow, 1) == [("stdout", "one")]
    job.append(job.out, "two\nthr")  # a line being written is held until it ends
    assert await events(follow, 1) == [("stdout", "two")]
    job.append(job.out, "ee\r\n\n")
    job.append(job.err, "warning: \xe9\n")
    assert await events(follow, 3) == [
        ("stdout", "three"),
        ("stdout", ""),
        ("stderr", "warning: \xe9"),
    ]
    job.append(job.out, "last words")  # never ended by a line break
    await job.becomes(JobState.COMPLETED)
    last, end = await events(follow, 2)
    assert last == ("stdout", "last words")
    assert ended(end) == {"status": "completed", "reason": "the service exited normally"}
    with pytest.raises(StopAsyncIteration):
        await anext(follow)
    assert job.services.log_reader.followers.held() == 0


async def test_tail_begins_with_the_last_lines_written(tmp_path: Path) -> None:
    job = Job(tmp_path, stderr=False)
    job.out.write_text("a\nb\nc\n")
    follow = await job.follow(tail=2)
    assert await events(follow, 2) == [("stdout", "b"), ("stdout", "c")]
    job.append(job.out, "d\n")
    assert await events(follow, 1) == [("stdout", "d")]
    await follow.aclose()
    none = await job.follow(tail=0)
    first = asyncio.ensure_future(events(none, 1))
    await asyncio.sleep(0.1)  # it has read what there was, and left all of it out
    job.append(job.out, "e\n")
    assert await first == [("stdout", "e")]
    await none.aclose()


async def test_a_pending_service_is_waited_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logfollow, "HEARTBEAT_SECONDS", 0.05)
    job = Job(tmp_path, state=JobState.PENDING)
    follow = await job.follow()
    beats = [await anext(follow) for _ in range(3)]
    assert [b.event for b in beats] == ["", "", ""]  # comments: the connection stays open
    await job.becomes(JobState.RUNNING)
    job.out.write_text("started\n")
    assert await events(follow, 1) == [("stdout", "started")]
    await job.becomes(JobState.CANCELLED)
    assert ended((await events(follow, 1))[0])["status"] == "cancelled"


async def test_a_follow_ends_when_the_gateway_stops(tmp_path: Path) -> None:
    job = Job(tmp_path)
    job.out.write_text("one\n")
    stopping = False
    follow = await job.services.follow_logs("7", ADMIN, tail=None, stopping=lambda: stopping)
    assert await events(follow, 1) == [("stdout", "one")]
    stopping = True  # the gateway drains: its clients follow again elsewhere
    assert ended((await events(follow, 1))[0]) == {
        "status": "building",
        "reason": "the gateway is stopping: follow again",
    }


async def test_a_symlink_is_refused_with_an_error_event(tmp_path: Path) -> None:
    job = Job(tmp_path)
    (tmp_path / "secret").write_text("key\n")
    job.out.symlink_to(tmp_path / "secret")
    job.err.write_text("fine\n")
    follow = await job.follow()
    error, line = await events(follow, 2)
    assert error[0] == "error"
    assert json.loads(error[1])["stream"] == "stdout"
    assert "symbolic link" in json.loads(error[1])["reason"]
    assert line == ("stderr", "fine")
    await job.becomes(JobState.COMPLETED)
    assert ended((await events(follow, 1))[0])["status"] == "completed"


async def test_a_file_of_another_owner_is_refused_and_the_follow_ends(tmp_path: Path) -> None:
    job = Job(tmp_path, stderr=False, user_id=UID + 1)
    job.out.write_text("not the job's own\n")
    follow = await job.follow()
    error, end = await events(follow, 2)
    assert "not owned by the job's user" in json.loads(error[1])["reason"]
    assert ended(end)["reason"] == "no log file of the service can be read"
    with pytest.raises(StopAsyncIteration):
        await anext(follow)
    assert job.services.log_reader.followers.held() == 0


async def test_output_slurm_reports_elsewhere_is_not_read(tmp_path: Path) -> None:
    job = Job(tmp_path, stderr=False, standard_output="/etc/shadow")
    follow = await job.follow()
    error, _ = await events(follow, 2)
    assert "'/etc/shadow'" in json.loads(error[1])["reason"]


async def test_a_replaced_file_is_read_again_from_its_start(tmp_path: Path) -> None:
    job = Job(tmp_path, stderr=False)
    job.out.write_text("old one\nold two\n")
    follow = await job.follow()
    assert len(await events(follow, 2)) == 2
    job.out.unlink()
    job.out.write_text("new\n")
    reset, line = await events(follow, 2)
    assert reset[0] == "reset"
    assert "read again from its start" in json.loads(reset[1])["reason"]
    assert line == ("stdout", "new")
    # Truncated in place (and written again, less than before: a file that
    # grew past its old size within one poll cannot be told from one appended to).
    job.out.write_text("")
    job.append(job.out, "ok\n")
    assert await events(follow, 2) == [(reset[0], reset[1]), ("stdout", "ok")]
    await follow.aclose()


async def test_a_big_file_begins_at_the_byte_cap_and_is_read_on_without_waiting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logfollow, "FOLLOW_POLL_SECONDS", 3600)  # no second poll
    job = Job(tmp_path, stderr=False)
    job.services.log_reader.max_bytes = 16
    job.out.write_text("".join(f"line {i}\n" for i in range(10)))  # 7 bytes a line
    await job.becomes(JobState.COMPLETED)
    follow = await job.follow()
    # The last 16 bytes: the end of "line 7" (left out), "line 8" and "line 9";
    # a read of the whole cap is followed by another at once, which finds the end.
    line_8, line_9, end = await events(follow, 3)
    assert (line_8, line_9) == (("stdout", "line 8"), ("stdout", "line 9"))
    assert ended(end)["status"] == "completed"


async def test_followers_are_bounded_per_tenant_and_in_all(tmp_path: Path) -> None:
    job = Job(tmp_path)
    job.out.write_text("x\n")
    team = Principal(tenant="team-a", slurm_user="gwuser", role=Role.ADMIN, method=Method.KEY)
    follows = [await job.follow(principal=team) for _ in range(joblogs.FOLLOWERS_PER_TENANT)]
    with pytest.raises(TooManyFollowers) as refused:
        await job.follow(principal=team)
    assert refused.value.status_code == 429
    assert refused.value.limit == "log_followers"
    assert refused.value.headers == {"Retry-After": str(joblogs.FOLLOWERS_RETRY_AFTER_SECONDS)}
    other = await job.follow()  # another tenant is not held back
    await anext(follows[0])
    await follows[0].aclose()  # a follow that ends gives its place back
    follows[0] = await job.follow(principal=team)
    assert job.services.log_reader.followers.held("team-a") == joblogs.FOLLOWERS_PER_TENANT
    # Follows never iterated (a client gone before its answer began), dropped:
    # their places are given back too.
    follows.clear()
    del other
    gc.collect()
    assert job.services.log_reader.followers.held() == 0
    full = Followers(per_tenant=2, total=3)
    slots = [full.admit("a"), full.admit("a"), full.admit("b")]
    with pytest.raises(FollowersFull) as busy:
        full.admit("c")
    assert busy.value.status_code == 503
    assert busy.value.headers is not None and "Retry-After" in busy.value.headers
    slots[0].release()
    slots[0].release()  # once only
    assert full.held() == 2


async def test_an_unknown_service_is_404_and_takes_no_place(tmp_path: Path) -> None:
    job = Job(tmp_path)
    with pytest.raises(NotFound):
        await job.services.follow_logs("8", ADMIN, tail=None)
    assert job.services.log_reader.followers.held() == 0


async def test_a_closed_follow_stops_polling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a client leaving does (the response closes the generator): no
    task or thread goes on reading, and its place is given back."""
    job = Job(tmp_path, stderr=False)
    job.out.write_text("x\n")
    follow = await job.follow()
    task = asyncio.ensure_future(events(follow, 5))
    await asyncio.sleep(0.1)  # it polls, waiting for more lines
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await follow.aclose()
    assert job.services.log_reader.followers.held() == 0
    reads: list[object] = []
    monkeypatch.setattr(logfollow, "read_new", lambda *args, **kwargs: reads.append(args))
    await asyncio.sleep(0.1)
    assert reads == []


def test_lines_are_cut_at_every_break_sse_knows_and_long_ones_in_pieces(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert _split(b"a\rb\r\nc\nd", flush=False) == (["a", "b", "c"], b"d")
    assert _split(b"half\r", flush=False) == ([], b"half\r")  # a CRLF may follow
    assert _split(b"half\r", flush=True) == (["half"], b"")
    assert _split(b"", flush=True) == ([], b"")
    monkeypatch.setattr(logfollow, "MAX_LINE_BYTES", 4)
    assert _split(b"abcdefghij\n", flush=False) == (["abcd", "efgh", "ij"], b"")
    # Not inside a character: "é" is two bytes.
    assert _split("abc\xe9z".encode(), flush=False) == (["abc"], "\xe9z".encode())
    assert _split(b"abcdefghij", flush=False) == (["abcd", "efgh"], b"ij")

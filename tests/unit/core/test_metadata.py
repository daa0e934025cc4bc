"""The job comment: authenticated metadata, and the job's own bounded say."""

from __future__ import annotations

import base64
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import msgspec
import pytest

from gateway.core import jobscript, metadata
from gateway.core.metadata import Endpoint, MetaCodec, Reported
from gateway.core.recipes import RecipeCatalog
from tests.support import sandbox

ROOT = Path(__file__).resolve().parents[3]
CODEC = MetaCodec(b"a shared secret of 32 bytes....!")
JOB = 7


def meta(**environment: str) -> metadata.ServiceMeta:
    return CODEC.new_meta(
        recipe="inference/vllm",
        created=1_800_000_000.5,
        owner="gwuser",
        environment=dict(environment),
        resources={"nodes": 1, "cpu": "2", "memory": "32G", "time_limit": 15, "gpu": None},
    )


def test_round_trip_with_the_jobs_fields() -> None:
    m = meta(A="b|c")
    comment = CODEC.encode(m, JOB) + "|phase=starting|endpoint=node1:8000|reason=a|b"
    decoded = CODEC.decode(comment, JOB)
    assert decoded is not None
    assert decoded.meta == m
    assert decoded.reported == Reported(
        phase="starting", endpoint=Endpoint("node1", 8000), reason="a|b"
    )
    assert decoded.legacy is False


def test_forged_copied_or_edited_blobs_are_not_services() -> None:
    m = meta()
    good = CODEC.encode(m, JOB)
    blob, mac = good[len(metadata.PREFIX) :].split(".")
    raw = base64.urlsafe_b64decode(blob + "=" * (-len(blob) % 4))
    edited = msgspec.msgpack.encode(msgspec.structs.replace(m, owner="root"))
    edited_blob = base64.urlsafe_b64encode(edited).decode().rstrip("=")
    for comment in (
        "someone else's comment",
        "gw3:",
        "gw3:!!!.???",
        f"gw3:{blob}",  # no MAC: as submitted, before the gateway binds it
        f"gw3:{blob}.{'A' * 22}",  # a wrong MAC
        f"gw3:{edited_blob}.{mac}",  # an edited blob under the old MAC
        f"gw2:{blob}.{mac}",  # the MAC of the new format under the old prefix
        "gw1:" + base64.urlsafe_b64encode(b'{"recipe":"x","created":1}').decode(),
    ):
        assert CODEC.decode(comment, JOB) is None, comment
    # Copied onto any other job, the same Slurm user's included.
    for other in (JOB + 1, JOB - 1, 70, 0):
        assert CODEC.decode(good, other) is None, other
    # Another gateway's secret does not accept this one's blobs.
    assert MetaCodec(b"another secret of 32 bytes......").decode(good, JOB) is None
    assert raw  # the blob itself is readable: it is signed, not secret


def test_out_of_range_times_are_not_services() -> None:
    for created in (1e20, -1.0, float("nan"), float("inf")):
        m = msgspec.structs.replace(meta(), created=created)
        assert CODEC.decode(CODEC.encode(m, JOB), JOB) is None, created


@pytest.mark.parametrize(
    ("tail", "endpoint", "refused"),
    [
        ("|phase=running|endpoint=node1:8000", Endpoint("node1", 8000), False),
        ("|phase=running|endpoint=[fe80::1]:8000", Endpoint("[fe80::1]", 8000), False),
        ("|phase=running|endpoint=127.0.0.1:70000", None, True),
        ("|phase=running|endpoint=node1:0", None, True),
        ("|phase=running|endpoint=node1: 80", None, True),
        ("|phase=running|endpoint=169.254.169.254/latest:80", None, True),
        ("|phase=running|endpoint=a@b:80", None, True),
        ("|phase=running|endpoint=node1:\u0668\u0660", None, True),
        ("|phase=running|endpoint=", None, False),
    ],
)
def test_endpoints_are_host_and_port_only(
    tail: str, endpoint: Endpoint | None, refused: bool
) -> None:
    decoded = CODEC.decode(CODEC.encode(meta(), JOB) + tail, JOB)
    assert decoded is not None
    assert decoded.reported.endpoint == endpoint
    assert (decoded.reported.refused is not None) == refused


def test_phase_and_reason_are_bounded_text() -> None:
    tail = "|phase=hacked|reason=" + "\x1b[31m" + "x" * 5000
    decoded = CODEC.decode(CODEC.encode(meta(), JOB) + tail, JOB)
    assert decoded is not None
    assert decoded.reported.phase is None
    assert decoded.reported.reason is not None
    assert len(decoded.reported.reason) <= metadata.REASON_MAX
    assert "\x1b" not in decoded.reported.reason


def test_the_upstream_key_is_derived_per_service_and_secret() -> None:
    a, b = meta(), meta()
    assert CODEC.upstream_key(a) == CODEC.upstream_key(a)
    assert CODEC.upstream_key(a) != CODEC.upstream_key(b)
    assert MetaCodec(b"x" * 32).upstream_key(a) != CODEC.upstream_key(a)
    assert CODEC.upstream_key(a) not in CODEC.encode(a, JOB)


def test_the_seeds_full_example_fits_with_room_to_spare() -> None:
    m = meta(
        VLLM_MODEL="gpt2", VLLM_HOST="0.0.0.0", VLLM_PORT="8001", VLLM_MAX_MODEL_LEN="2048",  # noqa: S104
        VLLM_TENSOR_PARALLEL_SIZE="1", VLLM_GPU_MEMORY_UTILIZATION="0.9", CUDA_VISIBLE_DEVICES="0",
    )  # fmt: skip
    assert metadata.comment_room(CODEC.unbound(m)) < -300


def _preamble(unbound: str) -> str:
    catalog = RecipeCatalog.load([ROOT / "recipes", ROOT / "tests" / "recipes"])
    recipe = catalog.get("testing/http")
    context = recipe.template_values(recipe.default_resources.as_config())
    return jobscript.build(recipe, unbound, context).split("# --- recipe", 1)[0]


@pytest.fixture
def work() -> Iterator[Path]:
    """A folder the preamble, run without root, may write."""
    with sandbox.folder() as path:
        yield path


# How `scontrol show job -o` prints a job: its comment among other fields.
_SHOW = 'if [ "$1" = show ]; then echo "JobId=$3 JobName=x Comment=$COMMENT Priority=1"; exit; fi\n'


def _run(
    script: str, tmp_path: Path, scontrol: str, *args: str, comment: str = "", check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run shell with a fake scontrol first on PATH: ``show job`` prints
    ``comment``, anything else runs ``scontrol``."""
    fake = tmp_path / "scontrol"
    fake.write_text("#!/bin/sh\n" + _SHOW + scontrol)
    fake.chmod(0o755)
    return sandbox.run(
        ["bash", "-c", script, "x", *args],
        env={
            "PATH": f"{tmp_path}:/usr/bin:/bin",
            "OUT": str(tmp_path / "out"),
            "SLURM_JOB_ID": str(JOB),
            "COMMENT": comment,
        },
        capture_output=True,
        text=True,
        check=check,
        timeout=30,
    )


def test_the_job_cuts_its_reason_to_fit_slurms_limit(work: Path) -> None:
    unbound = CODEC.unbound(meta(VLLM_MODEL="m" * 400))
    script = _preamble(unbound) + 'gw_endpoint node1 8000\ngw_phase starting "$1"\n'
    bound = CODEC.bind(unbound, JOB)
    _run(
        script,
        work,
        'printf "%s" "$3" > "$OUT"\n',
        "\u00e9\n|" + "r" * 2000,
        comment=bound,
    )
    comment = (work / "out").read_text().removeprefix("comment=")
    assert len(comment.encode()) <= metadata.COMMENT_LIMIT
    decoded = CODEC.decode(comment, JOB)
    assert decoded is not None
    assert decoded.reported.phase == "starting"
    assert decoded.reported.endpoint == Endpoint("node1", 8000)
    assert decoded.reported.reason is not None
    # non-ASCII, newline and '|' dropped
    assert decoded.reported.reason.lstrip().startswith("r")


def test_a_refused_publish_is_written_to_the_jobs_log(work: Path) -> None:
    unbound = CODEC.unbound(meta())
    script = _preamble(unbound) + "gw_phase starting x\n"
    bound = CODEC.bind(unbound, JOB)
    stderr = _run(script, work, "echo 'Comment too long' >&2\nexit 1\n", comment=bound).stderr
    assert "Slurm refused to publish the service state (starting): Comment too long" in stderr


def test_shared_round_trips_and_is_signed() -> None:
    shared = msgspec.structs.replace(meta(), shared=True)
    decoded = CODEC.decode(CODEC.encode(shared, JOB), JOB)
    assert decoded is not None
    assert decoded.meta.shared is True
    assert decoded.meta == shared
    unshared = CODEC.decode(CODEC.encode(meta(), JOB), JOB)
    assert unshared is not None and unshared.meta.shared is False
    # Sharing cannot be switched on by editing the blob: the MAC no longer fits.
    blob, mac = CODEC.encode(meta(), JOB)[len(metadata.PREFIX) :].split(".")
    raw = base64.urlsafe_b64decode(blob + "=" * (-len(blob) % 4))
    original = msgspec.msgpack.decode(raw, type=metadata.ServiceMeta)
    edited = msgspec.msgpack.encode(msgspec.structs.replace(original, shared=True))
    edited_blob = base64.urlsafe_b64encode(edited).decode().rstrip("=")
    assert CODEC.decode(f"{metadata.PREFIX}{edited_blob}.{mac}", JOB) is None


class _BeforeSharing(msgspec.Struct, frozen=True, kw_only=True, array_like=True):
    """ServiceMeta as gateways before /v1 wrote it: no ``shared`` at the end."""

    recipe: str
    created: float
    owner: str
    environment: dict[str, str]
    resources: dict[str, str | int | None]
    nonce: bytes
    tenant: str
    idempotency: str
    request_digest: str


def test_a_comment_written_before_sharing_existed_still_decodes_unshared() -> None:
    old = _BeforeSharing(
        recipe="inference/vllm",
        created=1_800_000_000.5,
        owner="gwuser",
        environment={"VLLM_MODEL": "m"},
        resources={"nodes": 1},
        nonce=b"0123456789ab",
        tenant="team-a",
        idempotency="abc",
        request_digest="def",
    )
    assert len(msgspec.msgpack.decode(msgspec.msgpack.encode(old))) == 9  # one element fewer
    # Signed as an older gateway signed it (msgpack-encoded and MAC'd, no job id).
    legacy = CODEC.legacy_encode(cast(metadata.ServiceMeta, old))
    decoded = CODEC.decode(legacy + "|phase=running|endpoint=node1:80", JOB)
    assert decoded is not None and decoded.legacy
    new, reported = decoded.meta, decoded.reported
    assert new.shared is False
    assert (new.recipe, new.owner, new.tenant, new.idempotency, new.request_digest) == (
        "inference/vllm",
        "gwuser",
        "team-a",
        "abc",
        "def",
    )
    assert new.environment == {"VLLM_MODEL": "m"}
    # The same service, the same key: its running server keeps working.
    assert CODEC.upstream_key(new) == CODEC.upstream_key(cast(metadata.ServiceMeta, old))
    assert reported.endpoint == Endpoint("node1", 80)


def test_the_job_waits_for_its_bound_metadata_before_publishing(work: Path) -> None:
    unbound = CODEC.unbound(meta())
    script = _preamble(unbound) + "gw_phase running x\n"
    bound = CODEC.bind(unbound, JOB)
    _run(script, work, 'printf "%s" "$3" > "$OUT"\n', comment=f"{bound}|phase=building")
    published = (work / "out").read_text().removeprefix("comment=")
    assert published.startswith(bound + "|phase=running")
    decoded = CODEC.decode(published, JOB)
    assert decoded is not None and decoded.reported.phase == "running"


def test_a_job_never_bound_ends_without_publishing(work: Path) -> None:
    """A create that failed after the submit: the job ends on its own, and its
    unbound metadata is never written back (nobody could take it for a service)."""
    unbound = CODEC.unbound(meta())
    script = (
        _preamble(unbound).replace(f"-lt {jobscript.BIND_WAIT_SECONDS}", "-lt 2")
        + "gw_phase running x\n"
    )
    done = _run(script, work, 'printf "%s" "$3" > "$OUT"\n', comment=unbound, check=False)
    assert done.returncode == 1
    assert "did not confirm this service" in done.stderr
    assert not (work / "out").exists()


def test_an_old_comment_still_decodes_and_says_so() -> None:
    m = meta()
    decoded = CODEC.decode(CODEC.legacy_encode(m) + "|phase=running", JOB)
    assert decoded is not None and decoded.legacy and decoded.meta == m
    assert CODEC.upstream_key(decoded.meta) == CODEC.upstream_key(m)

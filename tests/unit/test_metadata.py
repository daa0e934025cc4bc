"""The job comment: authenticated metadata, and the job's own bounded say."""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path
from typing import cast

import msgspec
import pytest

from gateway.core import jobscript, metadata
from gateway.core.metadata import Endpoint, MetaCodec, Reported
from gateway.core.recipes import RecipeCatalog

ROOT = Path(__file__).resolve().parents[2]
CODEC = MetaCodec(b"a shared secret of 32 bytes....!")


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
    comment = CODEC.encode(m) + "|phase=starting|endpoint=node1:8000|reason=a|b"
    decoded = CODEC.decode(comment)
    assert decoded is not None
    assert decoded[0] == m
    assert decoded[1] == Reported(phase="starting", endpoint=Endpoint("node1", 8000), reason="a|b")


def test_forged_copied_or_edited_blobs_are_not_services() -> None:
    m = meta()
    good = CODEC.encode(m)
    blob, mac = good[len(metadata.PREFIX) :].split(".")
    raw = base64.urlsafe_b64decode(blob + "=" * (-len(blob) % 4))
    edited = msgspec.msgpack.encode(msgspec.structs.replace(m, owner="root"))
    edited_blob = base64.urlsafe_b64encode(edited).decode().rstrip("=")
    for comment in (
        "someone else's comment",
        "gw2:",
        "gw2:!!!.???",
        f"gw2:{blob}",  # no MAC
        f"gw2:{blob}.{'A' * 22}",  # a wrong MAC
        f"gw2:{edited_blob}.{mac}",  # an edited blob under the old MAC
        "gw1:" + base64.urlsafe_b64encode(b'{"recipe":"x","created":1}').decode(),
    ):
        assert CODEC.decode(comment) is None, comment
    # Another gateway's secret does not accept this one's blobs.
    assert MetaCodec(b"another secret of 32 bytes......").decode(good) is None
    assert raw  # the blob itself is readable: it is signed, not secret


def test_out_of_range_times_are_not_services() -> None:
    for created in (1e20, -1.0, float("nan"), float("inf")):
        m = msgspec.structs.replace(meta(), created=created)
        assert CODEC.decode(CODEC.encode(m)) is None, created


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
    decoded = CODEC.decode(CODEC.encode(meta()) + tail)
    assert decoded is not None
    assert decoded[1].endpoint == endpoint
    assert (decoded[1].refused is not None) == refused


def test_phase_and_reason_are_bounded_text() -> None:
    tail = "|phase=hacked|reason=" + "\x1b[31m" + "x" * 5000
    decoded = CODEC.decode(CODEC.encode(meta()) + tail)
    assert decoded is not None
    assert decoded[1].phase is None
    assert decoded[1].reason is not None
    assert len(decoded[1].reason) <= metadata.REASON_MAX
    assert "\x1b" not in decoded[1].reason


def test_the_upstream_key_is_derived_per_service_and_secret() -> None:
    a, b = meta(), meta()
    assert CODEC.upstream_key(a) == CODEC.upstream_key(a)
    assert CODEC.upstream_key(a) != CODEC.upstream_key(b)
    assert MetaCodec(b"x" * 32).upstream_key(a) != CODEC.upstream_key(a)
    assert CODEC.upstream_key(a) not in CODEC.encode(a)


def test_the_seeds_full_example_fits_with_room_to_spare() -> None:
    m = meta(
        VLLM_MODEL="gpt2", VLLM_HOST="0.0.0.0", VLLM_PORT="8001", VLLM_MAX_MODEL_LEN="2048",  # noqa: S104
        VLLM_TENSOR_PARALLEL_SIZE="1", VLLM_GPU_MEMORY_UTILIZATION="0.9", CUDA_VISIBLE_DEVICES="0",
    )  # fmt: skip
    assert metadata.comment_room(CODEC.encode(m)) < -300


def _preamble(encoded: str) -> str:
    catalog = RecipeCatalog.load([ROOT / "recipes", ROOT / "tests" / "recipes"])
    recipe = catalog.get("testing/http")
    env = recipe.environment({})
    context = jobscript.render_context(recipe, env, recipe.default_resources.as_config())
    return jobscript.build(recipe, encoded, context).split("# --- recipe", 1)[0]


def _run(script: str, tmp_path: Path, scontrol: str, *args: str) -> str:
    """Run shell with a fake scontrol first on PATH; its stderr."""
    fake = tmp_path / "scontrol"
    fake.write_text("#!/bin/sh\n" + scontrol)
    fake.chmod(0o755)
    done = subprocess.run(
        ["bash", "-c", script, "x", *args],
        env={
            "PATH": f"{tmp_path}:/usr/bin:/bin",
            "OUT": str(tmp_path / "out"),
            "SLURM_JOB_ID": "7",
        },
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stderr


def test_the_job_cuts_its_reason_to_fit_slurms_limit(tmp_path: Path) -> None:
    encoded = CODEC.encode(meta(VLLM_MODEL="m" * 400))
    script = _preamble(encoded) + 'gw_endpoint node1 8000\ngw_phase starting "$1"\n'
    _run(script, tmp_path, 'printf "%s" "$3" > "$OUT"\n', "\u00e9\n|" + "r" * 2000)
    comment = (tmp_path / "out").read_text().removeprefix("comment=")
    assert len(comment.encode()) <= metadata.COMMENT_LIMIT
    decoded = CODEC.decode(comment)
    assert decoded is not None
    assert decoded[1].phase == "starting"
    assert decoded[1].endpoint == Endpoint("node1", 8000)
    assert decoded[1].reason is not None
    assert decoded[1].reason.lstrip().startswith("r")  # non-ASCII, newline and '|' dropped


def test_a_refused_publish_is_written_to_the_jobs_log(tmp_path: Path) -> None:
    script = _preamble(CODEC.encode(meta())) + "gw_phase starting x\n"
    stderr = _run(script, tmp_path, "echo 'Comment too long' >&2\nexit 1\n")
    assert "Slurm refused to publish the service state (starting): Comment too long" in stderr


def test_shared_round_trips_and_is_signed() -> None:
    shared = msgspec.structs.replace(meta(), shared=True)
    decoded = CODEC.decode(CODEC.encode(shared))
    assert decoded is not None
    assert decoded[0].shared is True
    assert decoded[0] == shared
    unshared = CODEC.decode(CODEC.encode(meta()))
    assert unshared is not None and unshared[0].shared is False
    # Sharing cannot be switched on by editing the blob: the MAC no longer fits.
    blob, mac = CODEC.encode(meta())[len(metadata.PREFIX) :].split(".")
    raw = base64.urlsafe_b64decode(blob + "=" * (-len(blob) % 4))
    original = msgspec.msgpack.decode(raw, type=metadata.ServiceMeta)
    edited = msgspec.msgpack.encode(msgspec.structs.replace(original, shared=True))
    edited_blob = base64.urlsafe_b64encode(edited).decode().rstrip("=")
    assert CODEC.decode(f"{metadata.PREFIX}{edited_blob}.{mac}") is None


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
    # Signed as an older gateway signed it (encode only msgpack-encodes and MACs).
    comment = CODEC.encode(cast(metadata.ServiceMeta, old)) + "|phase=running|endpoint=node1:80"
    decoded = CODEC.decode(comment)
    assert decoded is not None
    new, reported = decoded
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

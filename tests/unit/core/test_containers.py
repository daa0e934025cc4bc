"""Container runtimes of recipes (gateway/core/containers.py): the site's
settings checked at load, and the command lines the job runs, recorded by
stand-ins for apptainer, Charliecloud, enroot and srun (the live Apptainer
path is tests/integration/test_containers.py)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.core import containers

# A source archive where only root may change it (pytest's own folders are).
ARCHIVE = Path("/tmp/gw-test-containers-vllm.oci.tar")
APPTAINER = {
    "kind": "apptainer",
    "image": "vllm-1",
    "image_source": f"oci-archive:{ARCHIVE}",
    "binds": "/opt/hf",
}


@pytest.fixture(autouse=True)
def archive() -> Iterator[None]:
    ARCHIVE.write_text("archive")
    yield
    ARCHIVE.unlink(missing_ok=True)


# Each stand-in records its command line, one line per call, and writes the
# image a build names: its last word, or the word after -o.
STANDIN = r"""#!/bin/bash
printf '%s\n' "$(basename "$0")$(printf ' %s' "$@")" >>"$CALLS"
out=
prev=
for word in "$@"; do
  [ "$prev" = -o ] && out=$word
  prev=$word
done
case "$(basename "$0") $1" in
  "apptainer build") out=${*: -2:1} ;;
  "ch-convert "*) out=${*: -1:1} ;;
esac
if [ -n "$out" ]; then sleep "${BUILD_SECONDS:-0}"; echo image >"$out"; fi
exit "${STANDIN_EXIT:-0}"
"""


def script(runtime: dict[str, str], body: str) -> str:
    return (
        "#!/bin/bash\n"
        'gw_phase() { echo "phase $*" >>"$CALLS"; }\n'
        'gw_fail() { echo "failed: $*"; exit 1; }\n' + containers.preamble(runtime) + body
    )


def run(
    tmp_path: Path,
    runtime: dict[str, str],
    body: str = 'gw_container\nprintf "%s\\n" "${GW_CONTAINER[@]}"\n',
    as_user: str = "",
    **env: str,
) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """The job's container helpers with stand-ins; ``as_user``: a uid to run
    them as (the test is root's)."""
    tools = tmp_path / "bin"
    if not tools.exists():
        tools.mkdir()
        for name in ("apptainer", "ch-run", "ch-convert", "ch-image", "enroot", "srun"):
            (tools / name).write_text(STANDIN)
            (tools / name).chmod(0o755)
    calls = tmp_path / "calls"
    calls.touch()
    calls.chmod(0o666)
    user = ["setpriv", f"--reuid={as_user}", f"--regid={as_user}", "--clear-groups"]
    done = subprocess.run(
        [*(user if as_user else []), "/bin/bash", "-c", script(runtime, body)],
        capture_output=True,
        text=True,
        timeout=60,
        env={
            "PATH": f"{tools}:/usr/bin:/bin",
            "HOME": str(tmp_path / "home"),
            "CALLS": str(calls),
            "SLURM_JOB_ID": "42",
            **env,
        },
        check=False,
    )
    return done, calls.read_text().splitlines()


def test_apptainer_converts_once_into_the_cache_then_runs_read_only(tmp_path: Path) -> None:
    runtime = {**APPTAINER, "image_build_args": "--mksquashfs-args '-Xcompression-level 1'"}
    done, calls = run(tmp_path, runtime)
    cache = tmp_path / "home/.cache/gateway-images"
    assert done.returncode == 0, done.stdout + done.stderr
    part = f"{cache}/.vllm-1.42.part.sif"
    assert calls[1] == (
        f"apptainer build --mksquashfs-args -Xcompression-level 1 {part} oci-archive:{ARCHIVE}"
    )
    assert calls[0] == f"phase building converting the image vllm-1 from oci-archive:{ARCHIVE}"
    assert calls[-1] == f"apptainer exec --bind /opt/hf {cache}/vllm-1.sif true"
    assert done.stdout.split("\n")[:-1] == [
        "apptainer",
        "exec",
        "--bind",
        "/opt/hf",
        f"{cache}/vllm-1.sif",
    ]
    assert sorted(p.name for p in cache.iterdir()) == [".vllm-1.sif.lock", "vllm-1.sif"]
    assert not stat.S_IMODE((cache / "vllm-1.sif").stat().st_mode) & 0o022
    # Warm: no build.
    done, calls = run(tmp_path, runtime)
    assert done.returncode == 0
    assert [c for c in calls if " build " in c] == [calls[1]]


@pytest.mark.parametrize(
    ("gpu", "gpus", "flags"),
    [("nvidia", "1", ["--nv"]), ("rocm", "2", ["--rocm"]), ("none", "1", []), ("nvidia", "0", [])],
)
def test_apptainer_gpu_flags_only_for_a_job_with_gpus(
    tmp_path: Path, gpu: str, gpus: str, flags: list[str]
) -> None:
    done, _ = run(tmp_path, {**APPTAINER, "gpu": gpu, "binds": ""}, SLURM_GPUS_ON_NODE=gpus)
    cache = tmp_path / "home/.cache/gateway-images"
    assert done.stdout.split() == ["apptainer", "exec", *flags, f"{cache}/vllm-1.sif"]


def test_charliecloud_pulls_converts_and_binds(tmp_path: Path) -> None:
    runtime = {
        "kind": "charliecloud",
        "image": "vllm-1",
        "image_source": "docker://vllm/vllm-openai:v0.9",
        "binds": "/opt/hf /scratch",
        "image_cache": str(tmp_path / "cache"),
    }
    done, calls = run(tmp_path, runtime)
    assert done.returncode == 0, done.stdout
    part, dest = f"{tmp_path}/cache/.vllm-1.42.part.sqfs", f"{tmp_path}/cache/vllm-1.sqfs"
    assert calls[1:] == [
        "ch-image pull vllm/vllm-openai:v0.9",
        f"ch-convert -i ch-image -o squash vllm/vllm-openai:v0.9 {part}",
        f"ch-run --bind=/tmp --bind=/opt/hf --bind=/scratch {dest} -- true",
    ]
    assert done.stdout.split() == [
        "ch-run", "--bind=/tmp", "--bind=/opt/hf", "--bind=/scratch", dest, "--"
    ]  # fmt: skip


def test_pyxis_imports_with_enroot_and_runs_a_step(tmp_path: Path) -> None:
    runtime = {
        "kind": "pyxis",
        "image": "vllm-1",
        "image_source": "docker://nvcr.io#nvidia/vllm:25.01",
        "binds": "/opt/hf",
        "image_cache": str(tmp_path / "cache"),
    }
    done, calls = run(tmp_path, runtime, SLURM_GPUS_ON_NODE="4")
    assert done.returncode == 0, done.stdout
    dest = f"{tmp_path}/cache/vllm-1.sqsh"
    assert (
        calls[1]
        == f"enroot import -o {tmp_path}/cache/.vllm-1.42.part.sqsh docker://nvcr.io#nvidia/vllm:25.01"
    )
    prefix = [
        "srun",
        "--overlap",
        "--ntasks=1",
        f"--container-image={dest}",
        "--container-name=gw-42",
        "--container-mounts=/tmp:/tmp,/opt/hf:/opt/hf",
    ]
    assert calls[2] == " ".join([*prefix, "true"])
    assert done.stdout.split() == prefix


def test_a_ready_image_file_is_used_in_place(tmp_path: Path) -> None:
    sif = tmp_path / "site.sif"
    sif.write_text("image")
    done, calls = run(tmp_path, {**APPTAINER, "image_source": str(sif), "binds": ""})
    assert done.returncode == 0
    assert calls == [f"apptainer exec {sif} true"]
    done, _ = run(tmp_path, {**APPTAINER, "image_source": str(tmp_path / "gone.sif")})
    assert done.stdout.startswith(f"failed: the image {tmp_path}/gone.sif does not exist on ")


def test_two_jobs_at_once_convert_once(tmp_path: Path) -> None:
    body = "gw_container &\ngw_container &\nwait\n"
    done, calls = run(tmp_path, APPTAINER, body, BUILD_SECONDS="1")
    assert done.returncode == 0, done.stdout
    assert len([c for c in calls if " build " in c]) == 1, calls
    assert "phase building waiting for another job converting the image vllm-1" in calls
    assert len([c for c in calls if c.startswith("apptainer exec")]) == 2


def test_a_failed_conversion_names_the_image_and_leaves_nothing(tmp_path: Path) -> None:
    done, _ = run(tmp_path, APPTAINER, STANDIN_EXIT="3")
    assert done.returncode == 1
    assert done.stdout.startswith(
        f"failed: could not convert the image vllm-1 from oci-archive:{ARCHIVE}"
    )
    cache = tmp_path / "home/.cache/gateway-images"
    assert [p.name for p in cache.iterdir()] == [".vllm-1.sif.lock"]


def test_an_image_or_cache_others_may_write_is_not_run(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "vllm-1.sif").write_text("planted")
    (cache / "vllm-1.sif").chmod(0o666)
    runtime = {**APPTAINER, "image_cache": str(cache)}
    done, calls = run(tmp_path, runtime)
    assert done.stdout.startswith(f"failed: the cached image {cache}/vllm-1.sif on ")
    assert calls == []
    (cache / "vllm-1.sif").unlink()
    cache.chmod(0o777)  # writable by all, and not sticky
    done, calls = run(tmp_path, runtime)
    assert done.stdout.startswith(f"failed: the image cache {cache} on ")
    cache.chmod(0o1777)  # sticky, as /tmp: others cannot replace what is ours
    done, _ = run(tmp_path, runtime)
    assert done.returncode == 0, done.stdout


def test_an_image_in_a_cache_others_may_change_is_not_run(tmp_path: Path) -> None:
    """Another cluster user may rename or replace what a folder they may write
    to holds, or any folder above it: the image there is not run, even when
    the image file itself looks safe."""
    public = tmp_path / "public"
    cache = public / "cache"
    cache.mkdir(parents=True)
    (cache / "vllm-1.sif").write_text("image")
    public.chmod(0o777)  # not sticky: cache/ could be swapped for another folder
    done, calls = run(tmp_path, {**APPTAINER, "image_cache": str(cache)})
    assert done.stdout.startswith(f"failed: the image cache {cache} on ")
    assert "may be changed by users other than" in done.stdout
    assert calls == []
    cache.chmod(0o777)
    public.chmod(0o755)
    done, calls = run(tmp_path, {**APPTAINER, "image_cache": str(cache)})
    assert done.stdout.startswith(f"failed: the image cache {cache} on "), done.stdout
    assert calls == []


def test_a_source_others_may_change_is_not_converted(tmp_path: Path) -> None:
    source = tmp_path / "drop" / "vllm.oci.tar"
    source.parent.mkdir()
    source.write_text("archive")
    source.chmod(0o666)
    done, calls = run(tmp_path, {**APPTAINER, "image_source": f"oci-archive:{source}"})
    assert done.stdout.startswith(f"failed: the image source {source} on ")
    assert calls == []
    ready = tmp_path / "drop" / "site.sif"
    ready.write_text("image")
    source.chmod(0o644)
    tmp_path.joinpath("drop").chmod(0o777)
    done, calls = run(tmp_path, {**APPTAINER, "image_source": str(ready)})
    assert done.stdout.startswith(f"failed: the image {ready} on ")
    assert calls == []


def test_a_shared_cache_gives_each_user_a_folder_of_its_own() -> None:
    """A site's sticky cache of root's, the job as another user (nobody): its
    images go to a folder of its own there; one another user made for it is
    refused; the site's own copy is read in place."""
    base = Path(tempfile.mkdtemp(prefix="gw-test-shared-", dir="/tmp"))
    try:
        base.chmod(0o755)
        cache = base / "shared"
        cache.mkdir()
        cache.chmod(0o1777)
        nobody = {"as_user": "65534"}
        done, calls = run(base, {**APPTAINER, "image_cache": str(cache)}, **nobody)
        assert done.returncode == 0, done.stdout + done.stderr
        assert calls[-1].endswith(f" {cache}/nobody/vllm-1.sif true")
        assert (cache / "nobody" / "vllm-1.sif").stat().st_uid == 65534
        (cache / "nobody" / "vllm-1.sif").unlink()
        os.chown(cache / "nobody", 12345, 12345)
        done, calls = run(base, {**APPTAINER, "image_cache": str(cache)}, **nobody)
        assert done.stdout.startswith(f"failed: the image vllm-1 is not in the cache {cache} ")
        (cache / "vllm-1.sif").write_text("site image")
        done, calls = run(base, {**APPTAINER, "image_cache": str(cache), "binds": ""}, **nobody)
        assert done.returncode == 0, done.stdout
        assert calls[-1] == f"apptainer exec {cache}/vllm-1.sif true"
    finally:
        shutil.rmtree(base)


def test_a_cancelled_conversion_leaves_nothing_the_next_one_keeps(tmp_path: Path) -> None:
    cache = tmp_path / "home/.cache/gateway-images"
    cache.mkdir(parents=True)
    (cache / ".vllm-1.7.part.sif").write_text("half an image")
    done, _ = run(tmp_path, APPTAINER)
    assert done.returncode == 0, done.stdout
    assert sorted(p.name for p in cache.iterdir()) == [".vllm-1.sif.lock", "vllm-1.sif"]


def test_a_fifo_for_a_lock_fails_instead_of_hanging(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    os.mkfifo(cache / ".vllm-1.sif.lock")
    done, _ = run(tmp_path, {**APPTAINER, "image_cache": str(cache)})
    assert done.stdout.startswith(f"failed: cannot open the lock {cache}/.vllm-1.sif.lock")


def test_a_missing_runtime_is_named(tmp_path: Path) -> None:
    done = subprocess.run(
        ["/bin/bash", "-c", script(APPTAINER, "gw_container\n")],
        capture_output=True,
        text=True,
        env={"PATH": "/nonexistent", "CALLS": "/dev/null"},
        check=False,
    )
    assert done.stdout.startswith("failed: apptainer is not available on ")


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"image": "../x"}, "runtime.image:"),
        ({"image": ""}, "runtime.image:"),
        ({"image_source": "http://example.org/x.sif"}, "runtime.image_source:"),
        ({"image_source": "/srv/../etc/shadow"}, "runtime.image_source:"),
        ({"image_source": "oci-archive:relative.tar"}, "runtime.image_source:"),
        ({"kind": "pyxis"}, "runtime.image_source: pyxis (enroot) imports docker://"),
        (
            {"kind": "charliecloud", "image_source": "oras://r/x"},
            "runtime.image_source: charliecloud",
        ),
        ({"image_cache": "cache"}, "runtime.image_cache:"),
        ({"gpu": "cuda"}, "runtime.gpu:"),
        ({"binds": "/opt/hf relative"}, "runtime.binds: 'relative'"),
        ({"image_build_args": "--x 'unbalanced"}, "runtime.image_build_args:"),
        ({"image_wait": "0"}, "runtime.image_wait:"),
        ({"image_wait": "\u00b2"}, "runtime.image_wait:"),
        ({"hf_home": "/a,b c"}, "runtime.hf_home: '/a,b'"),
        ({"image_source": "/srv/images/vllm.sqsh"}, "runtime.image_source: apptainer runs .sif"),
        ({"image_source": "/srv/images/vllm.tar"}, "runtime.image_source: apptainer takes a .sif"),
        ({"kind": "charliecloud", "image_source": "/x.sif"}, "runtime.image_source: charliecloud"),
    ],
)
def test_a_site_setting_a_job_could_not_run_is_refused_by_name(
    change: dict[str, str], named: str
) -> None:
    with pytest.raises(ValueError, match=named.replace("(", r"\(").replace(")", r"\)")):
        containers.check({**APPTAINER, **change})


def test_an_enroot_registry_reference_is_a_source() -> None:
    containers.check(
        {"kind": "pyxis", "image": "v", "image_source": "docker://nvcr.io#nvidia/vllm:25.01"}
    )


def test_other_runtime_kinds_are_not_containers() -> None:
    containers.check({"kind": "python", "image": "../anything"})
    assert not containers.is_container({"kind": "python"})
    assert containers.is_container(APPTAINER)

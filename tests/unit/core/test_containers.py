"""Container runtimes of recipes (gateway/core/containers.py): the site's
settings checked at load, and the command lines the job runs, recorded by
stand-ins for apptainer, Charliecloud, enroot and srun (the live Apptainer
path is tests/integration/test_containers.py)."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from gateway.core import containers

APPTAINER = {
    "kind": "apptainer",
    "image": "vllm-1",
    "image_source": "oci-archive:/srv/images/vllm.oci.tar",
    "binds": "/opt/hf",
}

# Each stand-in records its command line, one line per call, and writes the
# image a build names: its last word, or the word after -o.
STANDIN = r"""#!/bin/bash
printf '%s' "$(basename "$0")" >>"$CALLS"
printf ' %s' "$@" >>"$CALLS"
echo >>"$CALLS"
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
    **env: str,
) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    tools = tmp_path / "bin"
    if not tools.exists():
        tools.mkdir()
        for name in ("apptainer", "ch-run", "ch-convert", "ch-image", "enroot", "srun"):
            (tools / name).write_text(STANDIN)
            (tools / name).chmod(0o755)
    calls = tmp_path / "calls"
    calls.touch()
    done = subprocess.run(
        ["bash", "-c", script(runtime, body)],
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
        f"apptainer build --mksquashfs-args -Xcompression-level 1 {part} "
        "oci-archive:/srv/images/vllm.oci.tar"
    )
    assert calls[0].startswith("phase building converting the image vllm-1 from oci-archive:")
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
        "--ntasks=1",
        f"--container-image={dest}",
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
    assert done.stdout.startswith(f"failed: the image {tmp_path}/gone.sif is missing or unreadable")


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
        "failed: could not convert the image vllm-1 from oci-archive:/srv/images/vllm.oci.tar"
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
    assert done.stdout.startswith(f"failed: the cached image {cache}/vllm-1.sif may have been")
    assert calls == []
    (cache / "vllm-1.sif").unlink()
    cache.chmod(0o777)  # writable by all, and not sticky
    done, calls = run(tmp_path, runtime)
    assert done.stdout.startswith(f"failed: the image cache {cache} on ")
    cache.chmod(0o1777)  # sticky, as /tmp: others cannot replace what is ours
    done, _ = run(tmp_path, runtime)
    assert done.returncode == 0, done.stdout


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
    ],
)
def test_a_site_setting_a_job_could_not_run_is_refused_by_name(
    change: dict[str, str], named: str
) -> None:
    with pytest.raises(ValueError, match=named.replace("(", r"\(").replace(")", r"\)")):
        containers.check({**APPTAINER, **change})


def test_other_runtime_kinds_are_not_containers() -> None:
    containers.check({"kind": "python", "image": "../anything"})
    assert not containers.is_container({"kind": "python"})
    assert containers.is_container(APPTAINER)

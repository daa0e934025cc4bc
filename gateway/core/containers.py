"""Model servers in container images, as HPC sites run them.

A recipe's ``[runtime]`` (set by the site overlay) names the runtime:

* ``kind``: ``apptainer``, ``charliecloud`` or ``pyxis`` (``srun
  --container-image``); any other kind is not a container and this module
  leaves it alone;
* ``image``: the name of the image in the cache (the operator's choice;
  a new version is a new name);
* ``image_source``: where a job gets the image when the cache lacks it:
  ``docker://`` or ``oras://`` where the site has a registry, an archive
  (``oci-archive:``, ``docker-archive:``, a tarball) on a shared filesystem,
  or a ready image file (``/path/x.sif``, ``.sqfs``, ``.sqsh``) used in place;
* ``image_cache``: the cache folder (``~/`` is the job user's home; default
  ``~/.cache/gateway-images``). It and the images in it must be writable by
  the job's user or root only (a shared folder must be sticky), so that no
  other cluster user can plant an image that a tenant's job then runs;
* ``image_build_args``: extra words for the build command (e.g. apptainer's
  ``--mksquashfs-args``); ``gpu``: ``nvidia``, ``rocm`` or ``none`` (the
  runtime's GPU flags, given only when the job has GPUs); ``binds``: paths
  bound into the container, space-separated.

The job converts a missing image in its ``building`` phase (the reason says
so) under a lock in the cache: two jobs that need it at once build it once,
and a build lands under its final name only when complete. The image never
comes from a request: a caller picks a recipe, the site picks its image.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping

from gateway.core.shell import quote

KINDS = ("apptainer", "charliecloud", "pyxis")
GPUS = ("nvidia", "rocm", "none")
DEFAULT_CACHE = "~/.cache/gateway-images"
# Seconds a job waits for another job's build of the same image.
DEFAULT_WAIT = 3600

_IMAGE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# enroot writes a registry as docker://REGISTRY#IMAGE.
_REGISTRY = re.compile(r"(docker|oras)://[A-Za-z0-9][A-Za-z0-9._/:@+#-]{0,510}")
_ARCHIVE = re.compile(r"(oci-archive:|docker-archive:)?(/[A-Za-z0-9._/+-]{1,1023})")
_PATH = re.compile(r"/[A-Za-z0-9._/+-]{0,1023}")
# The ready image of each kind, in the order of KINDS.
_READY = (".sif", ".sqfs", ".sqsh")


def is_container(runtime: Mapping[str, str]) -> bool:
    return runtime.get("kind", "") in KINDS


def check(runtime: Mapping[str, str]) -> None:
    """Refuses a container runtime a job could not run, naming the key."""
    kind = runtime.get("kind", "")
    if kind not in KINDS:
        return
    image = runtime.get("image", "")
    if not _IMAGE.fullmatch(image):
        raise ValueError(
            f"runtime.image: {image!r} must be a name of letters, digits, '.', '_' or '-' "
            "(the image's file name in the cache)"
        )
    _check_source(kind, runtime.get("image_source", ""))
    cache = runtime.get("image_cache", "") or DEFAULT_CACHE
    if not (_PATH.fullmatch(cache) or (cache.startswith("~/") and _PATH.fullmatch(cache[1:]))):
        raise ValueError(f"runtime.image_cache: {cache!r} must be an absolute path or ~/...")
    gpu = runtime.get("gpu", "") or "nvidia"
    if gpu not in GPUS:
        raise ValueError(f"runtime.gpu: {gpu!r} must be one of {', '.join(GPUS)}")
    # hf_home (the vLLM recipe's model cache) is bound into the container too.
    for key in ("binds", "hf_home"):
        for bind in runtime.get(key, "").split(" "):
            if bind and not _PATH.fullmatch(bind):
                raise ValueError(f"runtime.{key}: {bind!r} is not an absolute path")
    try:
        shlex.split(runtime.get("image_build_args", ""))
    except ValueError as exc:
        raise ValueError(f"runtime.image_build_args: {exc}") from None
    wait = runtime.get("image_wait", "") or str(DEFAULT_WAIT)
    if not re.fullmatch(r"[0-9]{1,5}", wait) or not 0 < int(wait) <= 86400:
        raise ValueError(f"runtime.image_wait: {wait!r} must be seconds from 1 to 86400")


def _check_source(kind: str, source: str) -> None:
    registry = _REGISTRY.fullmatch(source)
    archive = _ARCHIVE.fullmatch(source)
    if not (registry or archive) or ".." in source.split("/"):
        raise ValueError(
            f"runtime.image_source: {source!r} must be docker://..., oras://..., "
            "oci-archive:/path, docker-archive:/path or an absolute path"
        )
    ready = source.endswith(_READY)
    if ready and not source.endswith(_READY[KINDS.index(kind)]):
        raise ValueError(
            f"runtime.image_source: {kind} runs {_READY[KINDS.index(kind)]} images, not {source!r}"
        )
    if kind == "apptainer" and source.startswith("/") and not ready:
        raise ValueError(
            f"runtime.image_source: apptainer takes a .sif file or oci-archive:/path, "
            f"docker-archive:/path, docker:// or oras://, not {source!r}"
        )
    if kind == "pyxis" and not (source.startswith("docker://") or ready):
        raise ValueError(
            f"runtime.image_source: pyxis (enroot) imports docker://... or runs a .sqsh "
            f"file, not {source!r}"
        )
    if kind == "charliecloud" and source.startswith(("oras://", "oci-archive:", "docker-archive:")):
        raise ValueError(
            f"runtime.image_source: charliecloud converts docker://..., a tarball, a "
            f"folder or a .sqfs file, not {source!r}"
        )


def preamble(runtime: Mapping[str, str]) -> str:
    """The shell values and helpers of a container runtime (checked by :func:`check`)."""
    words = shlex.split(runtime.get("image_build_args", ""))
    values = "\n".join(
        [
            f"GW_CT_KIND={quote(runtime['kind'])}",
            f"GW_CT_IMAGE={quote(runtime['image'])}",
            f"GW_CT_SOURCE={quote(runtime['image_source'])}",
            f"GW_CT_CACHE={_cache(runtime.get('image_cache', '') or DEFAULT_CACHE)}",
            f"GW_CT_BUILD_ARGS=({' '.join(quote(w) for w in words)})",
            f"GW_CT_GPU={quote(runtime.get('gpu', '') or 'nvidia')}",
            f"GW_CT_BINDS=({' '.join(quote(b) for b in runtime.get('binds', '').split())})",
            f"GW_CT_WAIT={int(runtime.get('image_wait', '') or DEFAULT_WAIT)}",
        ]
    )
    return _HEADER + values + "\n" + _FUNCTIONS


def _cache(path: str) -> str:
    """``~/...`` is in the job user's home, which only the job knows (bash
    looks it up when the job has no $HOME, as Slurm jobs may not)."""
    return f"~/{quote(path[2:])}" if path.startswith("~/") else quote(path)


_HEADER = "# --- container runtime: gw_container sets GW_CONTAINER, a command prefix ---\n"

_FUNCTIONS = r"""GW_IMAGE=
GW_CT_REAL=
GW_CONTAINER=()
# Whether only this job's user or root can have written path $1: a folder
# others may write to must be sticky (then they cannot replace what is ours).
gw_ct_safe() {
  local owner mode
  [ ! -L "$1" ] || return 1
  owner=$(stat -c %u -- "$1" 2>/dev/null) || return 1
  mode=$(stat -c %A -- "$1") || return 1
  [ "$owner" = "$(id -u)" ] || [ "$owner" = 0 ] || return 1
  if [ "${mode:5:1}" = w ] || [ "${mode:8:1}" = w ]; then
    [ "${mode:0:1}" = d ] && [[ ${mode:9:1} == [tT] ]] || return 1
  fi
}
# Prints path $1 without symbolic links once it and every folder above it are
# safe (gw_ct_safe): then no other user can change what it names later.
gw_ct_chain() {
  local real part=
  real=$(realpath -e -- "$1" 2>/dev/null) || return 2
  gw_ct_safe / || return 1
  while IFS= read -r -d / name; do
    [ -n "$name" ] || continue
    part=$part/$name
    gw_ct_safe "$part" || return 1
  done <<<"${real#/}/"
  printf '%s\n' "$real"
}
# Sets GW_CT_REAL to path $2 resolved (gw_ct_chain), or fails the service
# saying why ($1: what the path is).
gw_ct_use() {
  local rc
  GW_CT_REAL=$(gw_ct_chain "$2")
  rc=$?
  [ "$rc" -ne 2 ] || gw_fail "$1 $2 does not exist on $(hostname)"
  [ "$rc" -eq 0 ] \
    || gw_fail "$1 $2 on $(hostname) may be changed by users other than $(id -un); not used"
}
gw_ct_build() {
  case "$GW_CT_KIND" in
    apptainer) apptainer build "${GW_CT_BUILD_ARGS[@]}" "$1" "$GW_CT_SOURCE" ;;
    charliecloud)
      # Its build storage in the cache, not in /var/tmp where anyone may write.
      export CH_IMAGE_STORAGE=$2/.ch-storage
      case "$GW_CT_SOURCE" in
        docker://*)
          ch-image pull "${GW_CT_SOURCE#docker://}" && ch-convert -i ch-image -o squash \
            "${GW_CT_BUILD_ARGS[@]}" "${GW_CT_SOURCE#docker://}" "$1" ;;
        *) ch-convert -o squash "${GW_CT_BUILD_ARGS[@]}" "$GW_CT_SOURCE" "$1" ;;
      esac ;;
    pyxis) enroot import "${GW_CT_BUILD_ARGS[@]}" -o "$1" "$GW_CT_SOURCE" ;;
  esac
}
# The folder this job's images go to: the cache when it is the job user's,
# else (a site's shared cache) a folder of the user's own in it.
gw_ct_folder() {
  local cache=$1 own
  [ "$(stat -c %u -- "$cache")" = "$(id -u)" ] && { printf '%s\n' "$cache"; return 0; }
  own=$cache/$(id -un)
  [ -w "$cache" ] && [ ! -e "$own" ] && (umask 022 && mkdir -- "$own") 2>/dev/null
  gw_ct_chain "$own"
}
# Sets GW_IMAGE: the image file, converted into the cache when missing. One
# job converts (flock); the others wait, then use it.
gw_image() {
  local ext cache folder dest lock tmp pid rc out started next
  case "$GW_CT_KIND" in apptainer) ext=sif ;; charliecloud) ext=sqfs ;; *) ext=sqsh ;; esac
  case "$GW_CT_SOURCE" in
    /*.sif | /*.sqfs | /*.sqsh)
      gw_ct_use "the image" "$GW_CT_SOURCE"
      GW_IMAGE=$GW_CT_REAL
      return 0 ;;
    /* | oci-archive:/* | docker-archive:/*)
      gw_ct_use "the image source" "${GW_CT_SOURCE#*-archive:}" ;;
  esac
  (umask 022 && mkdir -p -- "$GW_CT_CACHE") 2>/dev/null
  gw_ct_use "the image cache" "$GW_CT_CACHE"
  cache=$GW_CT_REAL
  # A site's own copy, which jobs only read.
  if [ -e "$cache/$GW_CT_IMAGE.$ext" ] && [ "$(stat -c %u -- "$cache")" != "$(id -u)" ]; then
    gw_ct_use "the cached image" "$cache/$GW_CT_IMAGE.$ext"
    GW_IMAGE=$GW_CT_REAL
    return 0
  fi
  folder=$(gw_ct_folder "$cache") \
    || gw_fail "the image $GW_CT_IMAGE is not in the cache $cache on $(hostname), and" \
         "$(id -un) has no safe folder of its own there"
  dest=$folder/$GW_CT_IMAGE.$ext
  if [ ! -e "$dest" ] && [ ! -L "$dest" ]; then
    lock=$folder/.$GW_CT_IMAGE.$ext.lock
    command -v flock >/dev/null 2>&1 || gw_fail "flock (util-linux) is not available on $(hostname)"
    # Read-write: NFS grants an exclusive lock only so (and a FIFO put
    # there does not block such an open).
    { [ ! -L "$lock" ] && exec {GW_CT_LOCK}<>"$lock" && [ -f "$lock" ]; } \
      || gw_fail "cannot open the lock $lock of the image cache on $(hostname)"
    if ! flock -n "$GW_CT_LOCK"; then
      gw_phase building "waiting for another job converting the image $GW_CT_IMAGE"
      flock -E 75 -w "$GW_CT_WAIT" "$GW_CT_LOCK"
      rc=$?
      [ "$rc" -ne 75 ] \
        || gw_fail "another job held the image $GW_CT_IMAGE's lock $lock for over ${GW_CT_WAIT}s"
      [ "$rc" -eq 0 ] || gw_fail "cannot lock $lock (a file system without flock?)"
    fi
    if [ ! -e "$dest" ]; then
      gw_phase building "converting the image $GW_CT_IMAGE from $GW_CT_SOURCE"
      # What a cancelled conversion left behind (only one converts at a time).
      rm -rf -- "$folder/.$GW_CT_IMAGE".*.part."$ext" "$folder/.$GW_CT_IMAGE".*.part."$ext".log
      tmp=$folder/.$GW_CT_IMAGE.$SLURM_JOB_ID.part.$ext
      started=$SECONDS
      next=$(( started + 15 ))
      gw_ct_build "$tmp" "$folder" >"$tmp.log" 2>&1 </dev/null &
      pid=$!
      while kill -0 "$pid" 2>/dev/null; do
        sleep 0.2
        # Progress in the reason every 15 s: one scontrol update each.
        if [ "$SECONDS" -ge "$next" ]; then
          next=$(( SECONDS + 15 ))
          gw_phase building "converting the image $GW_CT_IMAGE from $GW_CT_SOURCE" \
            "($(( SECONDS - started )) s)"
        fi
      done
      wait "$pid"
      rc=$?
      out=$(grep -v '^[[:space:]]*$' "$tmp.log" | tail -n 1)
      cat "$tmp.log" >&2
      rm -f -- "$tmp.log"
      if [ "$rc" -ne 0 ] || [ ! -s "$tmp" ]; then
        rm -rf -- "$tmp"
        gw_fail "could not convert the image $GW_CT_IMAGE from $GW_CT_SOURCE: ${out:-exit code $rc}"
      fi
      if ! { chmod go-w -- "$tmp" && mv -fT -- "$tmp" "$dest"; }; then
        gw_fail "could not move the image $GW_CT_IMAGE into the cache $folder"
      fi
      echo "gateway: image $dest converted in $(( SECONDS - started )) s" >&2
    fi
    exec {GW_CT_LOCK}>&-
  fi
  gw_ct_use "the cached image" "$dest"
  GW_IMAGE=$GW_CT_REAL
}
# GW_CONTAINER: the command prefix that runs a program in the image, which
# is converted first when missing, then run once (a broken image ends here).
gw_container() {
  local b out mounts gpu=''
  if [ "${SLURM_GPUS_ON_NODE:-0}" != 0 ] || [ -n "${SLURM_JOB_GPUS:-}" ]; then gpu=$GW_CT_GPU; fi
  case "$GW_CT_KIND" in
    apptainer)
      command -v apptainer >/dev/null 2>&1 || gw_fail "apptainer is not available on $(hostname)"
      gw_image
      GW_CONTAINER=(apptainer exec)
      case "$gpu" in nvidia) GW_CONTAINER+=(--nv) ;; rocm) GW_CONTAINER+=(--rocm) ;; esac
      for b in "${GW_CT_BINDS[@]}"; do GW_CONTAINER+=(--bind "$b"); done
      GW_CONTAINER+=("$GW_IMAGE") ;;
    charliecloud)
      command -v ch-run >/dev/null 2>&1 \
        || gw_fail "charliecloud (ch-run) is not available on $(hostname)"
      gw_image
      # /tmp, as Apptainer binds it: the job's private folders (mktemp) are there.
      GW_CONTAINER=(ch-run --bind=/tmp)
      for b in "${GW_CT_BINDS[@]}"; do GW_CONTAINER+=("--bind=$b"); done
      GW_CONTAINER+=("$GW_IMAGE" --) ;;
    pyxis)
      command -v enroot >/dev/null 2>&1 \
        || gw_fail "enroot (for pyxis) is not available on $(hostname)"
      gw_image
      mounts=/tmp:/tmp
      for b in "${GW_CT_BINDS[@]}"; do mounts=$mounts,$b:$b; done
      # --overlap: the model check and the server are steps beside the batch
      # script; one container name: the image is unpacked once per job.
      GW_CONTAINER=(srun --overlap --ntasks=1 "--container-image=$GW_IMAGE"
        "--container-name=gw-$SLURM_JOB_ID" "--container-mounts=$mounts") ;;
  esac
  if ! out=$("${GW_CONTAINER[@]}" true 2>&1 </dev/null); then
    out=$(printf '%s\n' "$out" | grep -v '^[[:space:]]*$' | tail -n 1)
    gw_fail "the image $GW_IMAGE does not run on $(hostname): $out"
  fi
}
"""

#!/usr/bin/env bash
# Builds the gateway's OCI image from deploy/image/Containerfile with podman.
#
#   deploy/image/build.sh                    # localhost/slurm-gateway:<version> and :latest
#   IMAGE=registry.example/gw:1 BASE_IMAGE=docker.io/library/python:3.11-slim deploy/image/build.sh
#
# With no BASE_IMAGE, the base is Debian bookworm (minbase + python3) made here
# with debootstrap, since no registry is reachable; its tarball is kept under
# $GATEWAY_LOCAL_ROOT/image-base and the dependency wheels under
# $GATEWAY_LOCAL_ROOT/image-wheels, so only the first build on a machine pays.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
LOCAL_ROOT=${GATEWAY_LOCAL_ROOT:-/var/lib/slurm-gateway-local}
# The same mirror variable as deploy/local/cluster.sh.
MIRROR=${GATEWAY_DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${GATEWAY_DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
# The base is made again (with the security updates of the day) once older.
MAX_AGE_DAYS=${GATEWAY_IMAGE_BASE_MAX_AGE_DAYS:-7}
SUITE=bookworm
# Bump the number when the recipe of the base below changes.
BASE_TAG=$SUITE-slim-2
DEFAULT_BASE=localhost/slurm-gateway-base:$BASE_TAG
BASE_IMAGE=${BASE_IMAGE:-$DEFAULT_BASE}
PY=${PY:-$ROOT/.venv/bin/python}
export CONTAINERS_CONF=$ROOT/deploy/image/containers.conf

log() { printf 'image: %s\n' "$*" >&2; }

# podman (its build is buildah's) and runc; apt only when one is missing.
if ! command -v podman >/dev/null || ! command -v runc >/dev/null; then
  log "installing podman and runc with apt"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq podman runc >/dev/null
fi

version=$("$PY" -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
IMAGE=${IMAGE:-localhost/slurm-gateway:$version}
revision=$(git rev-parse --verify --quiet HEAD 2>/dev/null || echo unknown)
if [ "$revision" != unknown ] && ! git diff --quiet HEAD -- gateway recipes pyproject.toml deploy/image 2>/dev/null; then
  revision="$revision-dirty"
fi
source_url=${GATEWAY_IMAGE_SOURCE:-$(git remote get-url origin 2>/dev/null || echo unknown)}

# The base: debootstrap once, keep the tarball, import it when podman lacks it.
cache=$LOCAL_ROOT/image-base
tarball=$cache/$BASE_TAG.tar
if [ "$BASE_IMAGE" = "$DEFAULT_BASE" ] && [ -s "$tarball" ] \
  && [ -n "$(find "$tarball" -mtime "+$MAX_AGE_DAYS")" ]; then
  log "$tarball is older than $MAX_AGE_DAYS days: making the base again"
  rm -f "$tarball"
  podman rmi --force "$BASE_IMAGE" >/dev/null 2>&1 || true
fi
if [ "$BASE_IMAGE" = "$DEFAULT_BASE" ] && ! podman image exists "$BASE_IMAGE"; then
  if [ ! -s "$tarball" ]; then
    if ! command -v debootstrap >/dev/null; then
      apt-get update -qq
      apt-get install -y -qq debootstrap >/dev/null
    fi
    log "debootstrap $SUITE (minbase + python3) from $MIRROR"
    mkdir -p "$cache"
    dir=$(mktemp -d "$cache/rootfs.XXXXXX")
    trap 'rm -rf "$dir"' EXIT
    debootstrap --variant=minbase --include=python3,ca-certificates "$SUITE" "$dir" "$MIRROR" >/dev/null
    # debootstrap takes the release alone: the updates and security fixes on top.
    printf 'deb %s %s main\n' "$MIRROR" "$SUITE" "$MIRROR" "$SUITE-updates" \
      "$SECURITY_MIRROR" "$SUITE-security" >"$dir/etc/apt/sources.list"
    printf '#!/bin/sh\nexit 101\n' >"$dir/usr/sbin/policy-rc.d"  # no service starts
    chmod 0755 "$dir/usr/sbin/policy-rc.d"
    chroot "$dir" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    chroot "$dir" env DEBIAN_FRONTEND=noninteractive apt-get upgrade -y -qq >/dev/null
    rm -f "$dir/usr/sbin/policy-rc.d"
    # What the gateway never reads: package downloads and lists, docs, man
    # pages, translations (about 55 MB).
    rm -rf "$dir"/var/cache/apt/archives/*.deb "$dir"/var/cache/apt/*.bin \
      "$dir"/var/lib/apt/lists/* "$dir"/usr/share/doc/* "$dir"/usr/share/man/* \
      "$dir"/usr/share/info/* "$dir"/usr/share/locale/* "$dir"/var/log/*.log \
      "$dir"/var/cache/debconf/*-old
    tar --numeric-owner -C "$dir" -cf "$tarball.tmp" .
    mv "$tarball.tmp" "$tarball"
    find "$cache" -maxdepth 1 -name "$SUITE-slim-*.tar" ! -name "$BASE_TAG.tar" -delete
    rm -rf "$dir"
    trap - EXIT
  fi
  log "importing $tarball as $BASE_IMAGE"
  podman import --quiet --change 'CMD ["/bin/bash"]' "$tarball" "$BASE_IMAGE" >/dev/null
fi

# The wheels the image installs, for the base's Python, kept per dependency set.
pyver=$(podman run --rm --network none --entrypoint python3 "$BASE_IMAGE" -c \
  'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
# pip takes each platform tag literally: list every manylinux up to the
# base's glibc (bookworm has 2.36).
glibc=${GATEWAY_IMAGE_GLIBC:-36}
platforms=()
for minor in $(seq 17 "$glibc"); do platforms+=(--platform "manylinux_2_${minor}_$(uname -m)"); done
platforms+=(--platform "manylinux2014_$(uname -m)")
requirements=$("$PY" - <<'PY'
import tomllib
project = tomllib.load(open("pyproject.toml", "rb"))
print("\n".join(project["project"]["dependencies"]))
PY
)
# The versions the tests ran with (the venv's), as constraints.
tested=$("$PY" deploy/image/tested_versions.py)
key=$(printf '%s\n' "$pyver" "$glibc" "$requirements" "$tested" | sha256sum | cut -c1-16)
wheels=$LOCAL_ROOT/image-wheels/$key
if [ ! -s "$wheels/requirements.txt" ]; then
  log "downloading wheels for Python $pyver (glibc 2.$glibc)"
  rm -rf "$wheels.tmp" && mkdir -p "$wheels.tmp"
  printf '%s\n' "$requirements" >"$wheels.tmp/requirements.in"
  printf '%s\n' "$tested" >"$wheels.tmp/constraints.txt"
  # Binary wheels only: the image has no compiler. setuptools builds the gateway.
  "$PY" -m pip download -q --only-binary=:all: --python-version "$pyver" \
    --implementation cp "${platforms[@]}" --dest "$wheels.tmp" \
    -r "$wheels.tmp/requirements.in" -c "$wheels.tmp/constraints.txt" 'setuptools>=68'
  "$PY" -m pip download -q --only-binary=:all: --no-deps --dest "$wheels.tmp/tools" pip
  mv "$wheels.tmp/tools/"pip-*.whl "$wheels.tmp/pip.whl" && rmdir "$wheels.tmp/tools"
  mv "$wheels.tmp/requirements.in" "$wheels.tmp/requirements.txt"
  rm -rf "$wheels" && mv "$wheels.tmp" "$wheels"
fi

# A context with exactly what the Containerfile copies.
ctx=$(mktemp -d /tmp/gateway-image.XXXXXX)
trap 'rm -rf "$ctx"' EXIT
mkdir -p "$ctx/wheels" "$ctx/tools"
find "$wheels" -maxdepth 1 -name '*.whl' ! -name pip.whl -exec cp -p -t "$ctx/wheels/" {} +
cp -p "$wheels/requirements.txt" "$ctx/wheels/"
cp -p "$wheels/pip.whl" "$ctx/tools/pip.whl"
cp -p pyproject.toml "$ctx/"
# pyproject.toml names README.md as the package's long description; a stub
# keeps README edits from rebuilding the gateway's layer.
echo "Slurm AI Gateway: see README.md in its repository." >"$ctx/README.md"
touch -d @0 "$ctx/README.md"
# The API reference's Swagger UI files travel as package data (a no-op once there).
"$PY" scripts/reference_assets.py
cp -rp gateway recipes "$ctx/"
find "$ctx" -name __pycache__ -prune -exec rm -rf {} +

log "building $IMAGE on $BASE_IMAGE"
podman build --quiet --layers --network none \
  --build-arg BASE="$BASE_IMAGE" \
  --build-arg VERSION="$version" \
  --build-arg REVISION="$revision" \
  --build-arg SOURCE="$source_url" \
  -f deploy/image/Containerfile -t "$IMAGE" -t "${IMAGE%:*}:latest" "$ctx" >/dev/null
size=$(podman image inspect --format '{{.Size}}' "$IMAGE")
log "built $IMAGE: $((size / 1000000)) MB, version $version, revision $revision"

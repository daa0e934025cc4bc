#!/usr/bin/env bash
# Builds the local vLLM image and hands it to the clusters that run
# containers, the way a site keeps images where its nodes can read them:
#   $GATEWAY_LOCAL_ROOT/images/vllm-cpu-<version>.oci.tar   an OCI archive
#   <cluster chroot>/srv/images/vllm-cpu-<version>.oci.tar   the same, per cluster
#   <cluster chroot>/opt/hf                                  the tiny models
# No registry is needed: the base is deploy/image/build.sh's Debian image and
# vLLM is the virtual environment deploy/local/vllm-runtime.sh built. A job of
# the vLLM recipe converts the archive into its site's image cache (the
# `building` phase). Idempotent: a second run takes a second.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="${GATEWAY_LOCAL_ROOT:-/var/lib/slurm-gateway-local}"
SOURCE="${ROOT}/${GATEWAY_VLLM_CLUSTER:-c2205}/root"
VLLM_VERSION="${GATEWAY_VLLM_VERSION:-0.32.0}"
# Bump the last number when the Containerfile changes.
TAG="${VLLM_VERSION}-1"
IMAGE="localhost/gateway-vllm-cpu:${TAG}"
BASE="localhost/slurm-gateway-base:bookworm-slim-2"
ARCHIVE="${ROOT}/images/vllm-cpu-${TAG}.oci.tar"
# The clusters whose nodes run containers (cluster.sh installs Apptainer there).
CLUSTERS=(c2605)
export CONTAINERS_CONF="${HERE}/../image/containers.conf"

log() { printf '[vllm-image %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[[ -x "${SOURCE}/opt/vllm/bin/python" ]] || die "no vLLM runtime in ${SOURCE}; run deploy/local/vllm-runtime.sh first"
podman image exists "${BASE}" || die "no ${BASE}; run deploy/image/build.sh first"

if [[ ! -s "${ARCHIVE}" ]]; then
    start=${SECONDS}
    log "building ${IMAGE} (vLLM ${VLLM_VERSION}, a few minutes)"
    context="$(mktemp -d "${ROOT}/images.build.XXXXXX")"
    trap 'rm -rf "${context}"' EXIT
    cp "${HERE}/vllm-image/Containerfile" "${context}/"
    # A hard-linked copy: the context is read, never changed.
    cp -al "${SOURCE}/opt/vllm" "${context}/vllm"
    podman build -q --network host --build-arg "BASE=${BASE}" -t "${IMAGE}" "${context}" >/dev/null
    mkdir -p "${ROOT}/images"
    rm -f "${ROOT}"/images/vllm-cpu-*.oci.tar
    podman save -q --format oci-archive -o "${ARCHIVE}.tmp" "${IMAGE}"
    mv -f "${ARCHIVE}.tmp" "${ARCHIVE}"
    rm -rf "${context}"
    trap - EXIT
    log "${ARCHIVE}: $(du -h "${ARCHIVE}" | cut -f1) in $((SECONDS - start)) s"
fi

for cluster in "${CLUSTERS[@]}"; do
    chroot="${ROOT}/${cluster}/root"
    [[ -d "${chroot}/etc" ]] || die "no cluster ${cluster}; run deploy/local/cluster.sh up first"
    mkdir -p "${chroot}/srv/images"
    # Same file system: a hard link, not a copy. The name carries the version,
    # as the image's name in the site's cache does (deploy/local/site-c2605.toml).
    if ! [[ "${chroot}/srv/images/${ARCHIVE##*/}" -ef "${ARCHIVE}" ]]; then
        rm -f "${chroot}"/srv/images/vllm-cpu-*.oci.tar
        ln -f "${ARCHIVE}" "${chroot}/srv/images/${ARCHIVE##*/}"
        log "${cluster}: /srv/images/${ARCHIVE##*/}"
    fi
    chmod 0644 "${ARCHIVE}"
    if [[ ! -e "${chroot}/opt/hf/.gateway-models-v4" ]]; then
        rm -rf "${chroot}/opt/hf" "${chroot}/opt/models"
        cp -a "${SOURCE}/opt/hf" "${SOURCE}/opt/models" "${chroot}/opt/"
        touch "${chroot}/opt/hf/.gateway-models-v4"
    fi
done
log "image ready: ${CLUSTERS[*]}:/srv/images/${ARCHIVE##*/}"

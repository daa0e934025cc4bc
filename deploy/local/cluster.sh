#!/usr/bin/env bash
# Local Slurm test clusters for the gateway: Slurm 22.05 (Debian bookworm),
# Slurm 24.11 (Debian trixie) and Slurm 26.05 (Debian sid), each in its own
# debootstrap chroot, each with its own munged, slurmctld, slurmd and slurmrestd
# (JWT auth) on loopback ports.
#
#   cluster.sh up      [c2205|c2411|c2605 ...]   build if needed, start, check, write cluster.json
#   cluster.sh down    [c2205|c2411|c2605 ...]   stop the daemons (and jobs), unmount; chroots stay
#   cluster.sh status  [c2205|c2411|c2605 ...]   print the state of each cluster
#   cluster.sh destroy [c2205|c2411|c2605 ...]   down, then delete the chroots
#
# Everything lives under ${GATEWAY_LOCAL_ROOT:-/var/lib/slurm-gateway-local}; the
# host's own /etc/slurm and /etc/munge are never read or written. Needs root.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="${GATEWAY_LOCAL_ROOT:-/var/lib/slurm-gateway-local}"
MIRROR="${GATEWAY_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SECURITY_MIRROR="${GATEWAY_DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}"
# Seconds allowed for each cluster to come up once its daemons were started.
START_TIMEOUT="${GATEWAY_LOCAL_START_TIMEOUT:-120}"

ALL_CLUSTERS=(c2205 c2411 c2605)
# Bump when the provisioning steps change: chroots with another marker are rebuilt.
PROVISION_VERSION="3"
NODE_CPUS=16
NODE_MEMORY_MB=131072
NODE_GPUS=4
CHROOT_PACKAGES=(slurmctld slurmd slurmrestd slurm-client slurm-wlm-jwt-plugin munge python3 procps)
JOB_USER="gwuser"
JOB_UID="5000"
# Another cluster user, who is not the gateway's: the tests submit hostile jobs as it.
OTHER_USER="gwother"
OTHER_UID="5001"
# A second user the gateway runs jobs as: the local settings' second tenant.
TEAM_USER="gwteam"
TEAM_UID="5002"
REST_USER="slurmrestd"
PARTITION="debug"
CHROOT_PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
JWT_KEY_IN_CHROOT="/etc/slurm/jwt_hs256.key"
T0="${SECONDS}"

log() { printf '[cluster.sh %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() {
    log "ERROR: $*"
    exit 1
}

usage() {
    cat >&2 <<'EOF'
usage: cluster.sh {up|down|status|destroy} [c2205|c2411|c2605 ...]
  up       build the chroots if needed, start the daemons, check them, write cluster.json
  down     stop the daemons and leftover job processes, unmount /proc and /sys; keep the chroots
  status   print each cluster's state (exit 0 only if all are up and answering)
  destroy  down, then remove the chroots
Root folder: ${GATEWAY_LOCAL_ROOT:-/var/lib/slurm-gateway-local}
EOF
}

# ---------------------------------------------------------------------------
# Cluster table

# Sets the C_* globals for one cluster.
load_cluster() {
    C_NAME="$1"
    C_EXTRA_PACKAGES=()
    case "${C_NAME}" in
    c2205)
        C_SUITE="bookworm"
        C_CTLD_PORT="6817"
        C_SLURMD_PORT="6818"
        C_REST_PORT="6820"
        # slurmrestd -s choices, best first; the first that serves is remembered.
        C_REST_PLUGIN_CHOICES=("openapi/v0.0.36,openapi/v0.0.37,openapi/v0.0.38" "openapi/v0.0.38")
        C_PING_VERSION="v0.0.38"
        # 22.05 has no "disabled" cgroup plugin, and its autodetection fails in a chroot
        # without /sys/fs/cgroup ("cgroup filesystem not mounted"): name v1, never mount.
        C_CGROUP_CONF=$'CgroupPlugin=cgroup/v1\nCgroupAutomount=no'
        # With the host's freezer hierarchy mounted where it looks (mount_cgroup).
        C_CGROUP_TRACK_CONF=$'CgroupPlugin=cgroup/v1\nCgroupAutomount=no\nCgroupMountpoint=/sys/fs/cgroup'
        C_API_CANDIDATES=(v0.0.38 v0.0.37 v0.0.36)
        ;;
    c2411)
        C_SUITE="trixie"
        C_CTLD_PORT="7817"
        C_SLURMD_PORT="7818"
        C_REST_PORT="7820"
        C_REST_PLUGIN_CHOICES=("openapi/slurmctld")
        C_PING_VERSION="v0.0.42"
        # No cgroup controllers here: 24.11's slurmd refuses to start without this.
        C_CGROUP_CONF="CgroupPlugin=disabled"
        # (CgroupAutomount is "defunct" from 24.11 on: an error in each job's log.)
        C_CGROUP_TRACK_CONF=$'CgroupPlugin=cgroup/v1\nCgroupMountpoint=/sys/fs/cgroup'
        C_API_CANDIDATES=(v0.0.44 v0.0.43 v0.0.42 v0.0.41 v0.0.40 v0.0.39)
        ;;
    c2605)
        # Debian's development suite: its Slurm moves on with it (26.05 when added).
        C_SUITE="sid"
        C_CTLD_PORT="8817"
        C_SLURMD_PORT="8818"
        C_REST_PORT="8820"
        C_REST_PLUGIN_CHOICES=("openapi/slurmctld")
        C_PING_VERSION="v0.0.42"
        C_CGROUP_CONF="CgroupPlugin=disabled"
        C_CGROUP_TRACK_CONF=$'CgroupPlugin=cgroup/v1\nCgroupMountpoint=/sys/fs/cgroup'
        C_API_CANDIDATES=(v0.0.46 v0.0.45 v0.0.44 v0.0.43 v0.0.42 v0.0.41 v0.0.40)
        # Apptainer (unprivileged, on user namespaces) for the container recipes.
        C_EXTRA_PACKAGES=(apptainer squashfs-tools squashfuse fuse3)
        ;;
    *) die "unknown cluster '${C_NAME}' (known: ${ALL_CLUSTERS[*]})" ;;
    esac
    C_DIR="${ROOT}/${C_NAME}"
    C_CHROOT="${C_DIR}/root"
    C_NODE="${C_NAME}-n1"
    C_MARKER="${C_DIR}/.provisioned"
    C_URL="http://127.0.0.1:${C_REST_PORT}"
    C_JSON="${C_DIR}/cluster.json"
    C_PLUGIN_CHOICE_FILE="${C_DIR}/slurmrestd.plugins"
    # The cluster's folder in the host's freezer hierarchy (mount_cgroup).
    C_FREEZER_NAME="gw-local-${C_NAME}-$(printf '%s' "${C_DIR}" | md5sum | cut -c1-8)"
}

# Host path of a daemon's PID file.
pidfile_of() {
    case "$1" in
    munged) printf '%s\n' "${C_CHROOT}/run/munge/munged.pid" ;;
    slurmctld) printf '%s\n' "${C_CHROOT}/run/slurm/slurmctld.pid" ;;
    slurmd) printf '%s\n' "${C_CHROOT}/run/slurm/slurmd.pid" ;;
    slurmrestd) printf '%s\n' "${C_CHROOT}/run/slurm/slurmrestd.pid" ;;
    *) die "unknown daemon $1" ;;
    esac
}

# Host path of a daemon's log file.
logfile_of() {
    case "$1" in
    munged) printf '%s\n' "${C_CHROOT}/var/log/munge/munged.log" ;;
    # What a daemon prints before its own logging starts (munged insists that its
    # log file belongs to it, so nothing else may write there).
    *-stdio) printf '%s\n' "${C_DIR}/${1%-stdio}.stdio.log" ;;
    *) printf '%s\n' "${C_CHROOT}/var/log/slurm/$1.log" ;;
    esac
}

# ---------------------------------------------------------------------------
# Processes

# True if PID is alive (not a zombie) and its root directory is the chroot DIR.
# Compared by device and inode: slurmd and its jobs live after pivot_root in a
# mount namespace of their own, where /proc/PID/root reads "/".
pid_in_chroot() {
    local pid="$1" dir="$2" state
    [[ "${pid}" =~ ^[0-9]+$ ]] || return 1
    if [[ "$(stat -Lc '%d:%i' "/proc/${pid}/root/" 2>/dev/null)" != "$(stat -c '%d:%i' "${dir}/")" ]]; then
        # A job's process in a container has the image for its root: it is
        # found by the cluster's freezer cgroup instead.
        [[ "${dir}" == "${C_CHROOT}" ]] && grep -qs ":freezer:/${C_FREEZER_NAME}/" "/proc/${pid}/cgroup" ||
            return 1
    fi
    state="$(sed -E 's/^.*\) ([A-Za-z]).*$/\1/' "/proc/${pid}/stat" 2>/dev/null)" || return 1
    [[ -n "${state}" && "${state}" != "Z" ]]
}

# Basename of the executable of PID ("slurmctld-wlm", "munged", ...).
exe_name() {
    local exe
    exe="$(readlink "/proc/$1/exe" 2>/dev/null)" || return 1
    exe="${exe% (deleted)}"
    printf '%s\n' "${exe##*/}"
}

# Prints the PID of DAEMON if its PID file names a live process of that
# program whose root is this cluster's chroot; fails otherwise.
daemon_pid() {
    local daemon="$1" pidfile pid name
    pidfile="$(pidfile_of "${daemon}")"
    [[ -r "${pidfile}" ]] || return 1
    pid="$(tr -dc '0-9' <"${pidfile}" 2>/dev/null)" || return 1
    pid_in_chroot "${pid}" "${C_CHROOT}" || return 1
    name="$(exe_name "${pid}")" || return 1
    [[ "${name}" == "${daemon}" || "${name}" == "${daemon}-"* ]] || return 1
    printf '%s\n' "${pid}"
}

# PIDs of all live processes whose root is DIR.
pids_in_chroot() {
    local dir="$1" p pid
    for p in /proc/[0-9]*; do
        pid="${p#/proc/}"
        [[ "${pid}" == "$$" ]] && continue
        if pid_in_chroot "${pid}" "${dir}"; then
            printf '%s\n' "${pid}"
        fi
    done
}

# Sends SIGTERM to each PID still inside DIR, waits up to DEADLINE seconds,
# then SIGKILLs the rest and waits for them to vanish.
terminate_pids() {
    local dir="$1" deadline="$2" pid end sig
    shift 2
    local -a pids=("$@") live=() alive=()
    for pid in "${pids[@]}"; do
        if pid_in_chroot "${pid}" "${dir}"; then
            live+=("${pid}")
            kill -TERM "${pid}" 2>/dev/null || true
        fi
    done
    ((${#live[@]} > 0)) || return 0
    for sig in KILL NONE; do
        end=$((SECONDS + deadline))
        while :; do
            alive=()
            for pid in "${live[@]}"; do
                if pid_in_chroot "${pid}" "${dir}"; then alive+=("${pid}"); fi
            done
            ((${#alive[@]} > 0)) || return 0
            ((SECONDS < end)) || break
            sleep 0.2
        done
        if [[ "${sig}" == "KILL" ]]; then
            log "${C_NAME}: SIGKILL to ${alive[*]} (no exit after SIGTERM)"
            kill -KILL "${alive[@]}" 2>/dev/null || true
            live=("${alive[@]}")
            deadline=10
        fi
    done
    die "${C_NAME}: processes ${alive[*]} did not exit"
}

# Stops one daemon by its PID file (only if it really runs in this chroot).
stop_daemon() {
    local daemon="$1" deadline="$2" pid
    if pid="$(daemon_pid "${daemon}")"; then
        log "${C_NAME}: stopping ${daemon} (pid ${pid})"
        terminate_pids "${C_CHROOT}" "${deadline}" "${pid}"
    fi
    rm -f "$(pidfile_of "${daemon}")"
}

# ---------------------------------------------------------------------------
# Mounts

# Mount points at or below DIR, deepest first.
mounts_under() {
    local dir="$1"
    awk -v d="${dir}" '{
        mp = $5
        gsub(/\\040/, " ", mp)
        if (mp == d || index(mp, d "/") == 1) print mp
    }' /proc/self/mountinfo | sort -r
}

unmount_under() {
    local dir="$1" mp
    local -a mps=()
    mapfile -t mps < <(mounts_under "${dir}")
    for mp in "${mps[@]}"; do
        [[ -n "${mp}" ]] || continue
        log "${C_NAME}: unmounting ${mp}"
        umount "${mp}" 2>/dev/null || umount -l "${mp}"
    done
    if [[ -n "$(mounts_under "${dir}")" ]]; then
        die "${C_NAME}: still mounted below ${dir}: $(mounts_under "${dir}" | tr '\n' ' ')"
    fi
}

mount_proc() {
    mkdir -p "${C_CHROOT}/proc" "${C_CHROOT}/sys"
    if ! mountpoint -q "${C_CHROOT}/proc"; then
        mount -t proc -o nosuid,nodev,noexec proc "${C_CHROOT}/proc"
    fi
    # Read-only sysfs: jobs need the CPU topology (vLLM's CPU build runs lscpu).
    if ! mountpoint -q "${C_CHROOT}/sys"; then
        mount -t sysfs -o ro,nosuid,nodev,noexec sysfs "${C_CHROOT}/sys"
    fi
}

# The host's cgroup v1 freezer hierarchy (its mount point), if it has one.
host_freezer() {
    awk '{ split($0, a, " - "); split(a[1], m, " "); split(a[2], f, " ")
           if (f[1] == "cgroup" && m[4] == "/" && ("," f[3] ",") ~ /,freezer,/) { print m[5]; exit } }' \
        /proc/self/mountinfo
}

# This cluster's own folder in the host's freezer hierarchy.
freezer_dir() {
    printf '%s/%s\n' "$1" "${C_FREEZER_NAME}"
}

# Sets C_FREEZER when jobs can be tracked by cgroup (proctrack/cgroup): Slurm
# then puts each job in a freezer cgroup and ends everything in it with the
# job, orphans included (proctrack/linuxproc follows parents, and loses a
# process whose parent died, e.g. vLLM's engine). The host's hierarchy is
# shared by all clusters, whose job ids overlap: each gets a folder of its own,
# bind-mounted where its slurmd looks (CgroupMountpoint/freezer).
mount_cgroup() {
    local freezer own dir="${C_CHROOT}/sys/fs/cgroup"
    C_FREEZER=""
    freezer="$(host_freezer)"
    if [[ -z "${freezer}" ]]; then
        log "${C_NAME}: no cgroup v1 freezer hierarchy on this host; jobs are tracked by parentage"
        return 0
    fi
    own="$(freezer_dir "${freezer}")"
    if mkdir -p "${own}" &&
        { mountpoint -q "${dir}" || mount -t tmpfs -o nosuid,nodev,noexec,mode=0755,size=64k gw-cgroup "${dir}"; } &&
        mkdir -p "${dir}/freezer" &&
        { mountpoint -q "${dir}/freezer" || mount --bind "${own}" "${dir}/freezer"; }; then
        C_FREEZER="${own}"
    else
        log "${C_NAME}: cannot mount ${own} at ${dir}/freezer; jobs are tracked by parentage"
    fi
}

# Removes this cluster's cgroups from the host's hierarchy (empty ones only).
remove_cgroup() {
    local freezer
    freezer="$(host_freezer)"
    [[ -n "${freezer}" ]] || return 0
    freezer="$(freezer_dir "${freezer}")"
    [[ -d "${freezer}" ]] && find "${freezer}" -depth -type d -exec rmdir {} + 2>/dev/null
    return 0
}

# ---------------------------------------------------------------------------
# Running things inside the chroot (clean environment: no SLURM_* from the host)

in_chroot() {
    chroot "${C_CHROOT}" /usr/bin/env -i PATH="${CHROOT_PATH}" HOME=/root LANG=C.UTF-8 "$@"
}

# in_chroot, in a UTS namespace of its own named after the node: slurmctld and
# slurmd (and so every job: `hostname`) never depend on what the host is
# called, which a test run once changed under the running clusters.
in_chroot_as_node() {
    unshare --uts -- /bin/sh -c 'printf %s "$1" >/proc/sys/kernel/hostname && shift && exec "$@"' \
        sh "${C_NODE}" chroot "${C_CHROOT}" /usr/bin/env -i PATH="${CHROOT_PATH}" HOME=/root \
        LANG=C.UTF-8 "$@"
}

# in_chroot_as_node, but entered with pivot_root (enter-root.sh) instead of
# chroot, so that the jobs of slurmd may create user namespaces.
in_root_as_node() {
    unshare --uts --mount --propagation private -- /bin/sh -c \
        'printf %s "$1" >/proc/sys/kernel/hostname && shift && exec "$@"' \
        sh "${C_NODE}" "${HERE}/enter-root.sh" "${C_CHROOT}" "${CHROOT_PATH}" "$@"
}

# True if PID runs in a mount namespace other than the host's (in_root_as_node).
own_mount_ns() {
    [[ "$(readlink "/proc/$1/ns/mnt" 2>/dev/null)" != "$(readlink /proc/self/ns/mnt)" ]]
}

as_job_user() {
    chroot --userspec="${JOB_UID}:${JOB_UID}" "${C_CHROOT}" /usr/bin/env -i \
        PATH="${CHROOT_PATH}" HOME="/home/${JOB_USER}" USER="${JOB_USER}" LOGNAME="${JOB_USER}" LANG=C.UTF-8 "$@"
}

# uid (field 3) or gid (field 4) of a user of the chroot.
chroot_id() {
    awk -F: -v u="$1" -v f="$2" '$1 == u { print $f; found = 1; exit } END { exit !found }' "${C_CHROOT}/etc/passwd"
}

# ---------------------------------------------------------------------------
# Host prerequisites

ensure_host_tools() {
    local -a missing=()
    command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
    command -v curl >/dev/null 2>&1 || missing+=(curl)
    command -v mountpoint >/dev/null 2>&1 || missing+=(util-linux)
    command -v flock >/dev/null 2>&1 || missing+=(util-linux)
    command -v mount >/dev/null 2>&1 || missing+=(mount)
    [[ -e /usr/share/keyrings/debian-archive-keyring.gpg || -e /usr/share/keyrings/debian-archive-keyring.pgp ]] ||
        missing+=(debian-archive-keyring)
    ((${#missing[@]} == 0)) && return 0
    command -v apt-get >/dev/null 2>&1 || die "missing ${missing[*]} and no apt-get to install them"
    log "host: installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null || log "host: apt-get update reported errors"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        "${missing[@]}" debian-archive-keyring >/dev/null
}

# ---------------------------------------------------------------------------
# Provisioning (debootstrap + packages): slow, done once per chroot

is_provisioned() {
    [[ -f "${C_MARKER}" && "$(cat "${C_MARKER}")" == "${PROVISION_VERSION}" && -e "${C_CHROOT}/usr/sbin/slurmctld-wlm" ]]
}

# Removes a chroot that is not (fully) provisioned. Never crosses a mount.
remove_chroot() {
    local -a pids=()
    if [[ -d "${C_CHROOT}" ]]; then
        mapfile -t pids < <(pids_in_chroot "${C_CHROOT}")
        ((${#pids[@]} == 0)) || terminate_pids "${C_CHROOT}" 15 "${pids[@]}"
        unmount_under "${C_CHROOT}"
        log "${C_NAME}: removing ${C_CHROOT}"
        rm -rf --one-file-system "${C_CHROOT}"
    fi
    rm -f "${C_MARKER}" "${C_JSON}" "${C_PLUGIN_CHOICE_FILE}"
}

# Builds the chroot from scratch. Runs in a background subshell (output -> log file).
provision() {
    load_cluster "$1"
    local t="${SECONDS}"
    remove_chroot
    mkdir -p "${C_DIR}"
    log "${C_NAME}: debootstrap ${C_SUITE} -> ${C_CHROOT}"
    debootstrap --variant=minbase "${C_SUITE}" "${C_CHROOT}" "${MIRROR}"
    log "${C_NAME}: debootstrap done after $((SECONDS - t)) s"

    # No service may start inside the chroot while packages are installed.
    printf '#!/bin/sh\nexit 101\n' >"${C_CHROOT}/usr/sbin/policy-rc.d"
    chmod 0755 "${C_CHROOT}/usr/sbin/policy-rc.d"
    if [[ "${C_SUITE}" == "sid" ]]; then
        # The development suite has no -updates or -security archives.
        printf 'deb %s sid main\n' "${MIRROR}" >"${C_CHROOT}/etc/apt/sources.list"
    else
        cat >"${C_CHROOT}/etc/apt/sources.list" <<EOF
deb ${MIRROR} ${C_SUITE} main
deb ${MIRROR} ${C_SUITE}-updates main
deb ${SECURITY_MIRROR} ${C_SUITE}-security main
EOF
    fi
    rm -f "${C_CHROOT}/etc/apt/sources.list.d/debian.sources"
    # Mirrors and caches may serve a snapshot of sid whose Release file is past
    # its Valid-Until date; apt would then refuse it (seen on this machine).
    printf 'APT::Install-Recommends "false";\nAPT::Install-Suggests "false";\nAcquire::Check-Valid-Until "false";\n' \
        >"${C_CHROOT}/etc/apt/apt.conf.d/90gateway-local"

    mount_proc
    in_chroot env DEBIAN_FRONTEND=noninteractive apt-get update -q
    in_chroot env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        "${CHROOT_PACKAGES[@]}"
    in_chroot apt-get clean
    # (/usr/sbin/slurmctld is an absolute alternatives link: test it inside the chroot.)
    in_chroot test -x /usr/sbin/slurmctld || die "${C_NAME}: slurmctld missing after install"
    [[ -n "$(find "${C_CHROOT}/usr/lib" -name auth_jwt.so -print -quit)" ]] ||
        die "${C_NAME}: auth_jwt.so missing after install"

    # A fresh random munge key of our own (whatever the package generated).
    install -d -m 0700 "${C_CHROOT}/etc/munge"
    head -c 1024 /dev/urandom >"${C_CHROOT}/etc/munge/munge.key"
    chown "$(chroot_id munge 3):$(chroot_id munge 4)" "${C_CHROOT}/etc/munge" "${C_CHROOT}/etc/munge/munge.key"
    chmod 0400 "${C_CHROOT}/etc/munge/munge.key"

    printf '%s\n' "${PROVISION_VERSION}" >"${C_MARKER}.tmp"
    mv -f "${C_MARKER}.tmp" "${C_MARKER}"
    log "${C_NAME}: provisioned in $((SECONDS - t)) s"
}

# Packages added after the chroot was built (C_EXTRA_PACKAGES), installed on
# `up` once: a new one costs an install, not a rebuild.
install_extras() {
    local want="${C_EXTRA_PACKAGES[*]}" t="${SECONDS}"
    [[ -n "${want}" ]] || return 0
    [[ "$(cat "${C_DIR}/.extras" 2>/dev/null)" == "${want}" ]] && return 0
    log "${C_NAME}: installing ${want}"
    in_chroot env DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null ||
        log "${C_NAME}: apt-get update reported errors"
    in_chroot env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        "${C_EXTRA_PACKAGES[@]}" >/dev/null || die "${C_NAME}: cannot install ${want}"
    in_chroot apt-get clean
    printf '%s\n' "${want}" >"${C_DIR}/.extras"
    log "${C_NAME}: ${want} installed in $((SECONDS - t)) s"
}

# ---------------------------------------------------------------------------
# Configuration: cheap and idempotent, done on every `up`

# Writes FILE (host path) only if its content differs; sets CONFIG_CHANGED.
write_if_changed() {
    local file="$1" mode="$2" content="$3"
    if [[ -f "${file}" ]] && [[ "$(cat "${file}")" == "${content}" ]]; then
        chmod "${mode}" "${file}"
        return 0
    fi
    printf '%s\n' "${content}" >"${file}.tmp"
    chmod "${mode}" "${file}.tmp"
    mv -f "${file}.tmp" "${file}"
    CONFIG_CHANGED=1
}

configure() {
    local cpus mem_kb mem_mb su sg mu mg proctrack cgroup_conf
    CONFIG_CHANGED=0

    # Users: SlurmUser, the slurmrestd runner (must be neither root nor SlurmUser), the job user.
    if ! chroot_id slurm 3 >/dev/null; then
        in_chroot groupadd --system slurm 2>/dev/null || true
        in_chroot useradd --system --gid slurm --home-dir /nonexistent --no-create-home \
            --shell /usr/sbin/nologin slurm
    fi
    if ! chroot_id "${REST_USER}" 3 >/dev/null; then
        in_chroot useradd --system --user-group --home-dir /nonexistent --no-create-home \
            --shell /usr/sbin/nologin "${REST_USER}"
    fi
    if ! chroot_id "${JOB_USER}" 3 >/dev/null; then
        in_chroot groupadd --gid "${JOB_UID}" "${JOB_USER}"
        in_chroot useradd --uid "${JOB_UID}" --gid "${JOB_UID}" --create-home \
            --home-dir "/home/${JOB_USER}" --shell /bin/bash "${JOB_USER}"
    fi
    [[ "$(chroot_id "${JOB_USER}" 3)" == "${JOB_UID}" && "$(chroot_id "${JOB_USER}" 4)" == "${JOB_UID}" ]] ||
        die "${C_NAME}: ${JOB_USER} exists in the chroot with another uid/gid than ${JOB_UID}"
    install -d -m 0755 -o "${JOB_UID}" -g "${JOB_UID}" "${C_CHROOT}/home/${JOB_USER}"
    chmod 0755 "${C_CHROOT}/home/${JOB_USER}"
    if ! chroot_id "${OTHER_USER}" 3 >/dev/null; then
        in_chroot groupadd --gid "${OTHER_UID}" "${OTHER_USER}"
        in_chroot useradd --uid "${OTHER_UID}" --gid "${OTHER_UID}" --create-home \
            --home-dir "/home/${OTHER_USER}" --shell /bin/bash "${OTHER_USER}"
    fi
    install -d -m 0755 -o "${OTHER_UID}" -g "${OTHER_UID}" "${C_CHROOT}/home/${OTHER_USER}"
    if ! chroot_id "${TEAM_USER}" 3 >/dev/null; then
        in_chroot groupadd --gid "${TEAM_UID}" "${TEAM_USER}"
        in_chroot useradd --uid "${TEAM_UID}" --gid "${TEAM_UID}" --create-home \
            --home-dir "/home/${TEAM_USER}" --shell /bin/bash "${TEAM_USER}"
    fi
    install -d -m 0755 -o "${TEAM_UID}" -g "${TEAM_UID}" "${C_CHROOT}/home/${TEAM_USER}"
    # Nothing is mounted on /dev/shm in the chroot: let jobs use the plain folder.
    install -d -m 1777 "${C_CHROOT}/dev/shm" "${C_CHROOT}/tmp"
    chmod 1777 "${C_CHROOT}/dev/shm" "${C_CHROOT}/tmp"

    su="$(chroot_id slurm 3)"
    sg="$(chroot_id slurm 4)"
    mu="$(chroot_id munge 3)"
    mg="$(chroot_id munge 4)"

    # Directories (/run is plain disk in the chroot: recreate what a boot would).
    install -d -m 0755 "${C_CHROOT}/etc/slurm"
    install -d -m 0700 -o "${su}" -g "${sg}" "${C_CHROOT}/var/spool/slurmctld"
    install -d -m 0755 "${C_CHROOT}/var/spool/slurmd"
    install -d -m 0755 -o "${su}" -g "${sg}" "${C_CHROOT}/var/log/slurm" "${C_CHROOT}/run/slurm"
    install -d -m 0755 -o "${mu}" -g "${mg}" "${C_CHROOT}/run/munge"
    install -d -m 0700 -o "${mu}" -g "${mg}" "${C_CHROOT}/var/lib/munge" "${C_CHROOT}/var/log/munge" \
        "${C_CHROOT}/etc/munge"
    chown -R "${mu}:${mg}" "${C_CHROOT}/var/log/munge" "${C_CHROOT}/var/lib/munge"

    # Keys: created once, kept across runs.
    if [[ ! -s "${C_CHROOT}/etc/munge/munge.key" ]]; then
        head -c 1024 /dev/urandom >"${C_CHROOT}/etc/munge/munge.key"
    fi
    chown "${mu}:${mg}" "${C_CHROOT}/etc/munge/munge.key"
    chmod 0400 "${C_CHROOT}/etc/munge/munge.key"
    if [[ ! -s "${C_CHROOT}${JWT_KEY_IN_CHROOT}" ]]; then
        head -c 32 /dev/urandom >"${C_CHROOT}${JWT_KEY_IN_CHROOT}.tmp"
        mv -f "${C_CHROOT}${JWT_KEY_IN_CHROOT}.tmp" "${C_CHROOT}${JWT_KEY_IN_CHROOT}"
    fi
    chown "${su}:${sg}" "${C_CHROOT}${JWT_KEY_IN_CHROOT}"
    chmod 0600 "${C_CHROOT}${JWT_KEY_IN_CHROOT}"

    # The daemons (and jobs) are called after the node (in_chroot_as_node),
    # whatever the host is called.
    write_if_changed "${C_CHROOT}/etc/hosts" 0644 "127.0.0.1 localhost
127.0.0.1 ${C_NODE}
::1 localhost ip6-localhost ip6-loopback"
    if [[ -n "${C_FREEZER}" ]]; then
        proctrack="proctrack/cgroup"
        cgroup_conf="${C_CGROUP_TRACK_CONF}"
    else
        # No cgroup v1 freezer on this host: processes are tracked by parentage,
        # and the recipes end what their servers leave (gw_stop_server).
        proctrack="proctrack/linuxproc"
        cgroup_conf="${C_CGROUP_CONF}"
    fi

    # The node is declared with the shape of a production GPU node, so that the
    # API's examples (8 CPUs, 64G, a GPU) are accepted here too. config_overrides
    # makes slurmd trust these numbers; nothing enforces them without cgroups, and
    # the GPUs are stand-in device files with no hardware behind them.
    cpus=${NODE_CPUS}
    mem_mb=${NODE_MEMORY_MB}

    write_if_changed "${C_CHROOT}/etc/slurm/slurm.conf" 0644 "# Written by deploy/local/cluster.sh on every 'up'; edits are overwritten.
ClusterName=${C_NAME}
SlurmctldHost=${C_NODE}(127.0.0.1)
SlurmctldPort=${C_CTLD_PORT}
SlurmdPort=${C_SLURMD_PORT}
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
AuthAltTypes=auth/jwt
AuthAltParameters=jwt_key=${JWT_KEY_IN_CHROOT}
MpiDefault=none
ProctrackType=${proctrack}
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=512
ReturnToService=2
JobRequeue=0
MinJobAge=300
# Room for the control-plane bench's 10,000 queued services next to the jobs
# that ended in the last MinJobAge (Slurm's default is 10000 in all).
MaxJobCount=50000
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
Waittime=0
MailProg=/bin/true
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
SlurmdParameters=config_overrides
GresTypes=gpu
NodeName=${C_NODE} NodeHostname=${C_NODE} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${mem_mb} Gres=gpu:${NODE_GPUS} State=UNKNOWN
PartitionName=${PARTITION} Nodes=${C_NODE} Default=YES MaxTime=INFINITE State=UP"

    # Stand-in GPU devices (copies of /dev/null): slurmd counts a gres/gpu only
    # through its device files, and CountOnly GPUs register as 0 on 22.05.
    local i
    for ((i = 0; i < NODE_GPUS; i++)); do
        [[ -e "${C_CHROOT}/dev/gwgpu${i}" ]] || mknod -m 0666 "${C_CHROOT}/dev/gwgpu${i}" c 1 3
    done
    write_if_changed "${C_CHROOT}/etc/slurm/gres.conf" 0644 "AutoDetect=off
Name=gpu File=/dev/gwgpu[0-$((NODE_GPUS - 1))]"

    # Apptainer (C_EXTRA_PACKAGES) mounts images through FUSE (squashfuse), as
    # on most sites; /dev/pts here is no devpts of its own to mount again.
    if [[ -e "${C_CHROOT}/etc/apptainer/apptainer.conf" ]]; then
        [[ -e "${C_CHROOT}/dev/fuse" ]] || mknod -m 0666 "${C_CHROOT}/dev/fuse" c 10 229
        sed -i 's/^mount devpts = yes$/mount devpts = no/' "${C_CHROOT}/etc/apptainer/apptainer.conf"
    fi

    if [[ -n "${cgroup_conf}" ]]; then
        write_if_changed "${C_CHROOT}/etc/slurm/cgroup.conf" 0644 "${cgroup_conf}"
    elif [[ -e "${C_CHROOT}/etc/slurm/cgroup.conf" ]]; then
        rm -f "${C_CHROOT}/etc/slurm/cgroup.conf"
        CONFIG_CHANGED=1
    fi
}

# ---------------------------------------------------------------------------
# Starting daemons

tail_log() {
    local file="$1"
    if [[ -f "${file}" ]]; then
        printf -- '----- last lines of %s -----\n' "${file}" >&2
        tail -n 25 "${file}" >&2 || true
    else
        printf -- '----- %s does not exist -----\n' "${file}" >&2
    fi
}

fail_with_logs() {
    local msg="$1" d
    shift
    for d in "$@"; do tail_log "$(logfile_of "${d}")"; done
    die "${C_NAME}: ${msg}"
}

# Waits until daemon_pid finds DAEMON.
wait_for_daemon() {
    local daemon="$1" timeout="$2" end
    end=$((SECONDS + timeout))
    while ((SECONDS < end)); do
        daemon_pid "${daemon}" >/dev/null && return 0
        sleep 0.2
    done
    return 1
}

# Removes a PID file unless it names the live daemon (stale after a reboot or crash).
clear_stale_pidfile() {
    daemon_pid "$1" >/dev/null || rm -f "$(pidfile_of "$1")"
}

start_munged() {
    local mu mg
    daemon_pid munged >/dev/null && return 0
    clear_stale_pidfile munged
    mu="$(chroot_id munge 3)"
    mg="$(chroot_id munge 4)"
    rm -f "${C_CHROOT}/run/munge/munge.socket.2" "${C_CHROOT}/run/munge/munge.socket.2.lock"
    log "${C_NAME}: starting munged"
    chroot --userspec="${mu}:${mg}" "${C_CHROOT}" /usr/bin/env -i PATH="${CHROOT_PATH}" \
        /usr/sbin/munged --pid-file=/run/munge/munged.pid --log-file=/var/log/munge/munged.log \
        </dev/null >>"$(logfile_of munged-stdio)" 2>&1 9>&- ||
        fail_with_logs "munged failed to start" munged-stdio munged
    wait_for_daemon munged 15 || fail_with_logs "munged did not come up" munged-stdio munged
}

start_slurm_daemon() {
    local daemon="$1" enter=in_chroot_as_node
    shift
    daemon_pid "${daemon}" >/dev/null && return 0
    clear_stale_pidfile "${daemon}"
    log "${C_NAME}: starting ${daemon}"
    [[ "${daemon}" == slurmd ]] && enter=in_root_as_node
    "${enter}" "${daemon}" "$@" </dev/null >>"$(logfile_of "${daemon}-stdio")" 2>&1 9>&- ||
        fail_with_logs "${daemon} failed to start" "${daemon}-stdio" "${daemon}"
    wait_for_daemon "${daemon}" 30 || fail_with_logs "${daemon} did not come up" "${daemon}-stdio" "${daemon}"
}

# The PID of this chroot's slurmrestd process, found by program name and root.
find_slurmrestd() {
    local pid
    while read -r pid; do
        [[ -n "${pid}" ]] || continue
        if [[ "$(exe_name "${pid}" 2>/dev/null)" == slurmrestd* ]]; then
            printf '%s\n' "${pid}"
            return 0
        fi
    done < <(pids_in_chroot "${C_CHROOT}")
    return 1
}

# Starts slurmrestd with the given -s argument; only it gets SLURM_JWT.
launch_slurmrestd() {
    local plugins="$1" pid end
    log "${C_NAME}: starting slurmrestd -s ${plugins} on 127.0.0.1:${C_REST_PORT}"
    setsid chroot "${C_CHROOT}" /usr/bin/env -i PATH="${CHROOT_PATH}" LANG=C.UTF-8 SLURM_JWT=daemon \
        slurmrestd -u "${REST_USER}" -g "${REST_USER}" -a rest_auth/jwt -s "${plugins}" \
        "127.0.0.1:${C_REST_PORT}" </dev/null >>"$(logfile_of slurmrestd)" 2>&1 9>&- &
    end=$((SECONDS + 15))
    while ((SECONDS < end)); do
        if pid="$(find_slurmrestd)"; then
            printf '%s\n' "${pid}" >"$(pidfile_of slurmrestd)"
            return 0
        fi
        sleep 0.2
    done
    return 1
}

# A fresh JWT for the job user, minted by slurmctld's key.
mint_token() {
    local out
    out="$(in_chroot scontrol token username="${JOB_USER}" lifespan=300 2>/dev/null)" || return 1
    out="${out#SLURM_JWT=}"
    [[ -n "${out}" ]] || return 1
    printf '%s\n' "${out}"
}

# GET /slurm/VERSION/ping with TOKEN; succeeds on HTTP 200 and a controller that
# is "UP" (v0.0.38-v0.0.44) or "responding": true (v0.0.42+; v0.0.45 drops "UP").
rest_ping() {
    local version="$1" token="$2" body code
    body="$(curl -sS -m 5 -w '\n%{http_code}' \
        -H "X-SLURM-USER-NAME: ${JOB_USER}" -H "X-SLURM-USER-TOKEN: ${token}" \
        "${C_URL}/slurm/${version}/ping" 2>/dev/null)" || return 1
    code="${body##*$'\n'}"
    [[ "${code}" == "200" ]] || return 1
    [[ "${body}" == *'"UP"'* ]] || [[ "${body}" =~ \"responding\"[[:space:]]*:[[:space:]]*true ]]
}

wait_for_rest() {
    local timeout="$1" end token=""
    end=$((SECONDS + timeout))
    while ((SECONDS < end)); do
        daemon_pid slurmrestd >/dev/null || return 1
        if [[ -n "${token}" ]] || token="$(mint_token)"; then
            rest_ping "${C_PING_VERSION}" "${token}" && return 0
        fi
        sleep 0.5
    done
    return 1
}

start_slurmrestd() {
    local choice
    local -a choices=()
    if daemon_pid slurmrestd >/dev/null; then
        wait_for_rest 10 && return 0
        log "${C_NAME}: slurmrestd runs but does not answer; restarting it"
        stop_daemon slurmrestd 10
    fi
    clear_stale_pidfile slurmrestd
    if [[ -s "${C_PLUGIN_CHOICE_FILE}" ]]; then
        choices=("$(cat "${C_PLUGIN_CHOICE_FILE}")")
    else
        choices=("${C_REST_PLUGIN_CHOICES[@]}")
    fi
    for choice in "${choices[@]}"; do
        if launch_slurmrestd "${choice}" && wait_for_rest 30; then
            printf '%s\n' "${choice}" >"${C_PLUGIN_CHOICE_FILE}"
            return 0
        fi
        log "${C_NAME}: slurmrestd with -s ${choice} did not answer; trying the next choice"
        stop_daemon slurmrestd 10
    done
    fail_with_logs "slurmrestd did not answer ${C_URL}/slurm/${C_PING_VERSION}/ping" slurmrestd slurmctld
}

node_state() {
    in_chroot sinfo -h -n "${C_NODE}" -o '%T' 2>/dev/null | head -n 1
}

wait_for_node() {
    local end state resumed=0
    end=$((SECONDS + START_TIMEOUT))
    while ((SECONDS < end)); do
        state="$(node_state || true)"
        case "${state}" in
        idle | mixed | allocated | completing) return 0 ;;
        down | drained | draining | drain | fail | failing)
            # Responding but held down (e.g. state saved before a restart): resume once in a while.
            if ((resumed < 3)); then
                log "${C_NAME}: node ${C_NODE} is ${state}; resuming it"
                in_chroot scontrol update nodename="${C_NODE}" state=resume >/dev/null 2>&1 || true
                resumed=$((resumed + 1))
            fi
            ;;
        esac
        sleep 0.5
    done
    log "${C_NAME}: node ${C_NODE} state: '${state}'"
    in_chroot sinfo -N -l >&2 || true
    fail_with_logs "node ${C_NODE} did not become idle in ${START_TIMEOUT} s" slurmd slurmctld
}

# Submits `true` as the job user and waits for COMPLETED.
check_job() {
    local jobid end state=""
    jobid="$(as_job_user sbatch --parsable -J cluster-sh-check -p "${PARTITION}" -D "/home/${JOB_USER}" \
        -o /dev/null -t 1 --wrap true 2>"${C_DIR}/sbatch.err")" ||
        fail_with_logs "sbatch failed: $(cat "${C_DIR}/sbatch.err")" slurmctld
    jobid="${jobid%%;*}"
    end=$((SECONDS + START_TIMEOUT))
    while ((SECONDS < end)); do
        state="$(in_chroot scontrol -o show job "${jobid}" 2>/dev/null | sed -nE 's/.*JobState=([A-Z_]+).*/\1/p')"
        case "${state}" in
        COMPLETED) return 0 ;;
        FAILED | CANCELLED | TIMEOUT | NODE_FAIL | OUT_OF_MEMORY | BOOT_FAIL | DEADLINE | PREEMPTED)
            in_chroot scontrol show job "${jobid}" >&2 || true
            fail_with_logs "test job ${jobid} ended ${state}" slurmd slurmctld
            ;;
        esac
        sleep 0.5
    done
    in_chroot scontrol show job "${jobid}" >&2 || true
    fail_with_logs "test job ${jobid} did not complete (state '${state}')" slurmd slurmctld
}

all_daemons_running() {
    local d pid
    for d in munged slurmctld slurmd slurmrestd; do
        pid="$(daemon_pid "${d}")" || return 1
    done
    # A slurmd of an older cluster.sh, started under chroot: its jobs cannot
    # use containers, so it is restarted.
    own_mount_ns "$(daemon_pid slurmd)"
}

json_str() {
    local s="$1"
    s="${s//\\/\\\\}"
    s="${s//\"/\\\"}"
    printf '"%s"' "${s}"
}

slurm_release() {
    local v
    v="$(in_chroot sinfo --version 2>/dev/null)" || return 1
    v="${v##* }"
    [[ -n "${v}" ]] || return 1
    printf '%s\n' "${v}"
}

# Probes the API versions, then writes cluster.json atomically. Sets C_RELEASE, C_VERSIONS.
write_cluster_json() {
    local token v sep="" list=""
    C_RELEASE="$(slurm_release)" || die "${C_NAME}: cannot read the Slurm release"
    token="$(mint_token)" || die "${C_NAME}: scontrol token failed"
    C_VERSIONS=()
    for v in "${C_API_CANDIDATES[@]}"; do
        if rest_ping "${v}" "${token}"; then C_VERSIONS+=("${v}"); fi
    done
    ((${#C_VERSIONS[@]} > 0)) || die "${C_NAME}: no API version answered ping"
    for v in "${C_VERSIONS[@]}"; do
        list+="${sep}$(json_str "${v}")"
        sep=", "
    done
    cat >"${C_JSON}.tmp" <<EOF
{
  "name": $(json_str "${C_NAME}"),
  "slurm_release": $(json_str "${C_RELEASE}"),
  "url": $(json_str "${C_URL}"),
  "user": $(json_str "${JOB_USER}"),
  "uid": ${JOB_UID},
  "other_user": $(json_str "${OTHER_USER}"),
  "team_user": $(json_str "${TEAM_USER}"),
  "team_uid": ${TEAM_UID},
  "jwt_key": $(json_str "${C_CHROOT}${JWT_KEY_IN_CHROOT}"),
  "cluster_name": $(json_str "${C_NAME}"),
  "chroot": $(json_str "${C_CHROOT}"),
  "partition": $(json_str "${PARTITION}"),
  "node": $(json_str "${C_NODE}"),
  "cpus": ${NODE_CPUS},
  "memory_mb": ${NODE_MEMORY_MB},
  "gpus": ${NODE_GPUS},
  "api_versions": [${list}]
}
EOF
    chmod 0644 "${C_JSON}.tmp"
    mv -f "${C_JSON}.tmp" "${C_JSON}"
}

# Brings one provisioned cluster up (fast path when it already is).
start_cluster() {
    load_cluster "$1"
    is_provisioned || die "${C_NAME}: chroot is not provisioned"
    mount_proc
    install_extras
    mount_cgroup
    configure
    if ((CONFIG_CHANGED == 0)) && all_daemons_running && wait_for_rest 5; then
        write_cluster_json
        log "${C_NAME}: already up"
        return 0
    fi
    if ((CONFIG_CHANGED)); then
        # New configuration: restart the Slurm daemons that run with the old one.
        stop_daemon slurmrestd 10
        stop_daemon slurmd 20
        stop_daemon slurmctld 30
    fi
    start_munged
    start_slurm_daemon slurmctld
    local slurmd_started="" pid
    if pid="$(daemon_pid slurmd)" && ! own_mount_ns "${pid}"; then
        log "${C_NAME}: restarting slurmd (chrooted: its jobs could not use containers)"
        stop_daemon slurmd 20
    fi
    if ! daemon_pid slurmd >/dev/null; then slurmd_started="$(date +%s)"; fi
    start_slurm_daemon slurmd -N "${C_NODE}"
    wait_for_node
    if [[ -n "${slurmd_started}" ]]; then cancel_ghost_jobs "${slurmd_started}"; fi
    start_slurmrestd
    check_job
    write_cluster_json
}

active_jobs() {
    in_chroot squeue -h -a -t PENDING,RUNNING,SUSPENDED,CONFIGURING,COMPLETING,REQUEUED,RESIZING,SIGNALING,STAGE_OUT \
        -o '%i' 2>/dev/null
}

cancel_all_jobs() {
    local end
    local -a ids=()
    mapfile -t ids < <(active_jobs)
    ((${#ids[@]} > 0)) || return 0
    log "${C_NAME}: cancelling jobs ${ids[*]}"
    in_chroot scancel "${ids[@]}" >/dev/null 2>&1 || true
    end=$((SECONDS + 15))
    while ((SECONDS < end)); do
        [[ -z "$(active_jobs)" ]] && return 0
        sleep 0.5
    done
    log "${C_NAME}: jobs still active after scancel: $(active_jobs | tr '\n' ' ')"
}

# After a crash or reboot slurmctld recovers the jobs that ran then as RUNNING,
# though their processes are gone: cancel those that started before the new slurmd
# when no slurmstepd is left in the chroot.
cancel_ghost_jobs() {
    local since="$1" id start pid
    local -a ghosts=()
    # A slurmstepd survives a slurmd restart: if any runs, its job may be real; keep all.
    while read -r pid; do
        [[ "$(exe_name "${pid}" 2>/dev/null)" == slurmstepd* ]] && return 0
    done < <(pids_in_chroot "${C_CHROOT}")
    while read -r id start; do
        if [[ "${start}" =~ ^[0-9]+$ ]] && ((start < since)); then ghosts+=("${id}"); fi
    done < <(in_chroot env SLURM_TIME_FORMAT=%s squeue -h -a -t RUNNING,SUSPENDED,CONFIGURING,COMPLETING \
        -o '%i %S' 2>/dev/null)
    ((${#ghosts[@]} > 0)) || return 0
    log "${C_NAME}: cancelling jobs ${ghosts[*]}, left RUNNING from before slurmd was restarted"
    in_chroot scancel "${ghosts[@]}" >/dev/null 2>&1 || true
}

stop_cluster() {
    local pid
    local -a pids=() leftover=() names=()
    load_cluster "$1"
    [[ -d "${C_CHROOT}" ]] || return 0
    # Their processes die with the cluster anyway: cancel the jobs first, or slurmctld
    # would bring them back as RUNNING ghosts (holding CPUs) on the next `up`.
    if daemon_pid slurmctld >/dev/null; then cancel_all_jobs; fi
    stop_daemon slurmrestd 10
    stop_daemon slurmd 20
    stop_daemon slurmctld 30
    # Leftover job processes (slurmstepd, job scripts), then munged, then anything else.
    mapfile -t pids < <(pids_in_chroot "${C_CHROOT}")
    for pid in "${pids[@]}"; do
        [[ -n "${pid}" && "$(exe_name "${pid}" 2>/dev/null)" != munged ]] || continue
        leftover+=("${pid}")
        names+=("${pid}:$(exe_name "${pid}" 2>/dev/null || echo '?')")
    done
    if ((${#leftover[@]} > 0)); then
        log "${C_NAME}: stopping leftover processes ${names[*]}"
        # slurmstepd ignores SIGTERM: kill it at once; job processes get SIGTERM first.
        for pid in "${leftover[@]}"; do
            if [[ "$(exe_name "${pid}" 2>/dev/null)" == slurmstepd* ]] && pid_in_chroot "${pid}" "${C_CHROOT}"; then
                kill -KILL "${pid}" 2>/dev/null || true
            fi
        done
        terminate_pids "${C_CHROOT}" 10 "${leftover[@]}"
    fi
    stop_daemon munged 10
    mapfile -t pids < <(pids_in_chroot "${C_CHROOT}")
    ((${#pids[@]} == 0)) || terminate_pids "${C_CHROOT}" 10 "${pids[@]}"
    unmount_under "${C_CHROOT}"
    log "${C_NAME}: down"
}

# ---------------------------------------------------------------------------
# Commands

take_lock() {
    mkdir -p "${ROOT}"
    chmod 0755 "${ROOT}"
    # fd 9 holds the lock; every daemon is started with 9>&- so none inherits it.
    exec 9>"${ROOT}/.lock"
    flock -w 900 9 || die "another cluster.sh holds ${ROOT}/.lock"
}

cmd_up() {
    local name rc i
    local -a to_build=() pids=()
    ensure_host_tools
    take_lock
    for name in "$@"; do
        load_cluster "${name}"
        is_provisioned || to_build+=("${name}")
    done
    # The slow part (debootstrap + apt) runs for all clusters in parallel.
    for name in "${to_build[@]}"; do
        load_cluster "${name}"
        mkdir -p "${C_DIR}"
        log "${name}: building the ${C_SUITE} chroot (log: ${C_DIR}/provision.log)"
        provision "${name}" >"${C_DIR}/provision.log" 2>&1 9>&- &
        pids+=("$!")
    done
    rc=0
    for i in "${!pids[@]}"; do
        if ! wait "${pids[${i}]}"; then
            load_cluster "${to_build[${i}]}"
            tail -n 30 "${C_DIR}/provision.log" >&2 || true
            log "${C_NAME}: provisioning FAILED (full log: ${C_DIR}/provision.log)"
            rc=1
        fi
    done
    ((rc == 0)) || die "provisioning failed"
    local -a lines=()
    for name in "$@"; do
        start_cluster "${name}"
        lines+=("$(printf '%-6s slurm %-8s %-22s versions=%s ready after %ss' "${C_NAME}" "${C_RELEASE}" \
            "${C_URL}" "$(
                IFS=,
                printf '%s' "${C_VERSIONS[*]}"
            )" "$((SECONDS - T0))")")
    done
    printf '%s\n' "${lines[@]}"
    printf 'up took %ss in total; cluster files: %s/*/cluster.json\n' "$((SECONDS - T0))" "${ROOT}"
}

cmd_down() {
    local name
    [[ -d "${ROOT}" ]] || return 0
    take_lock
    for name in "$@"; do stop_cluster "${name}"; done
}

cmd_destroy() {
    local name
    [[ -d "${ROOT}" ]] || return 0
    take_lock
    for name in "$@"; do
        stop_cluster "${name}"
        load_cluster "${name}"
        [[ -d "${C_DIR}" ]] || continue
        unmount_under "${C_DIR}"
        remove_cgroup
        log "${C_NAME}: removing ${C_DIR}"
        rm -rf --one-file-system "${C_DIR}"
    done
    if [[ -z "$(find "${ROOT}" -mindepth 1 -maxdepth 1 ! -name .lock -print -quit)" ]]; then
        rm -f "${ROOT}/.lock"
        rmdir "${ROOT}" 2>/dev/null || true
    fi
}

cmd_status() {
    local name d pid rc=0 state token
    local -a parts=()
    for name in "$@"; do
        load_cluster "${name}"
        parts=()
        if ! is_provisioned; then
            printf '%-6s not built (%s)\n' "${C_NAME}" "${C_CHROOT}"
            rc=1
            continue
        fi
        for d in munged slurmctld slurmd slurmrestd; do
            if pid="$(daemon_pid "${d}")"; then parts+=("${d}=${pid}"); else parts+=("${d}=down"); fi
        done
        if all_daemons_running && token="$(mint_token)" && rest_ping "${C_PING_VERSION}" "${token}"; then
            state="up   node=$(node_state || echo '?') ${C_URL}"
        elif [[ "${parts[*]}" == *"=down"*"=down"*"=down"*"=down"* ]]; then
            state="down"
            rc=1
        else
            state="DEGRADED"
            rc=1
        fi
        printf '%-6s %s  [%s]  chroot=%s\n' "${C_NAME}" "${state}" "${parts[*]}" "${C_CHROOT}"
    done
    return "${rc}"
}

main() {
    local cmd="${1:-}"
    [[ -n "${cmd}" ]] || {
        usage
        exit 2
    }
    shift
    local -a names=("$@")
    ((${#names[@]} > 0)) || names=("${ALL_CLUSTERS[@]}")
    local n
    for n in "${names[@]}"; do load_cluster "${n}"; done
    case "${cmd}" in
    up | down | destroy) [[ "$(id -u)" == 0 ]] || die "${cmd} needs root" ;;
    esac
    # /proc/PID/root shows the canonical path: resolve symlinks in ROOT once.
    ROOT="$(realpath -m "${ROOT}")"
    case "${cmd}" in
    up) cmd_up "${names[@]}" ;;
    down) cmd_down "${names[@]}" ;;
    status) cmd_status "${names[@]}" ;;
    destroy) cmd_destroy "${names[@]}" ;;
    -h | --help | help) usage ;;
    *)
        usage
        exit 2
        ;;
    esac
}

main "$@"

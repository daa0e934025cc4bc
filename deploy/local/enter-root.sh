#!/bin/sh
# Runs a command with ROOT as its root directory, entered with pivot_root in
# a mount namespace of its own rather than with chroot: the kernel refuses
# user namespaces to a chrooted process, and the jobs of the slurmd started
# this way need them (Apptainer, Charliecloud). The host's root is let go.
#
#   unshare --mount --propagation private -- enter-root.sh ROOT PATH CMD [ARG...]
#
# ROOT's mounts (/proc, /sys, the freezer cgroup) come along (--rbind).
set -eu
root=$1 path=$2
shift 2
mount --rbind "${root}" "${root}"
cd "${root}"
mkdir -p .oldroot
pivot_root . .oldroot
cd /
exec /usr/bin/env -i PATH="${path}" HOME=/root LANG=C.UTF-8 \
    /bin/sh -c 'umount -l /.oldroot && exec "$@"' sh "$@"

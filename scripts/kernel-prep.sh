#!/usr/bin/env bash
# Make the fuse and loop kernel facilities usable: load the modules (they may be built in,
# so failures are ignored) and create the control device nodes if the kernel has them but
# /dev lacks them (minimal containers). Fails only if they are still unusable.
set -uo pipefail

modprobe fuse >/dev/null 2>&1 || true
modprobe loop >/dev/null 2>&1 || true

# name, major, minor (fixed misc-device numbers: fuse 10:229, loop-control 10:237)
ensure_node() {
    [ -c "$1" ] && return 0
    mknod -m 0666 "$1" c "$2" "$3" 2>/dev/null || true
}
grep -qw fuse /proc/filesystems && ensure_node /dev/fuse 10 229
grep -qw loop /proc/devices && ensure_node /dev/loop-control 10 237

rc=0
if [ ! -c /dev/fuse ]; then
    echo "kernel-prep: /dev/fuse is unavailable (no fuse support in this kernel?)" >&2
    rc=1
fi
if [ ! -c /dev/loop-control ]; then
    echo "kernel-prep: /dev/loop-control is unavailable (no loop support in this kernel?)" >&2
    rc=1
fi
exit $rc

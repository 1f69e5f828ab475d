#!/usr/bin/env bash
# Install the Debian packages that `just bench` (benches/fio.rs) needs.
# Idempotent and quiet: does nothing (and prints nothing) when everything is present;
# runs `apt-get update` at most once, and only when something is missing.
# The `docker run` timing also needs docker.io and busybox-static (scripts/install-deps.sh);
# without them that row of the results says "not measured".
set -euo pipefail

PACKAGES=(
    fio               # the load generator
    qemu-utils        # qemu-storage-daemon: the peer (FUSE export of a raw file)
    fonts-dejavu-core # DejaVuSans.ttf, read at run time to label target/bench/chart.png
    util-linux        # losetup, mount, umount, findmnt
    e2fsprogs         # mkfs.ext4, for the plugin Create/Mount timing
    fuse3             # /dev/fuse userspace bits (dunnage's FUSE export)
)

installed() {
    [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)" = "install ok installed" ]
}

missing=()
for p in "${PACKAGES[@]}"; do
    installed "$p" || missing+=("$p")
done
[ "${#missing[@]}" -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
    echo "bench-deps: missing packages: ${missing[*]}; run this script as root to install them" >&2
    exit 1
fi

log=$(mktemp /tmp/dunnage-bench-deps.XXXXXX.log)
export DEBIAN_FRONTEND=noninteractive
echo "bench-deps: installing ${missing[*]}" >&2
# Try with the package lists we have; update them once only if that fails.
if ! apt-get install -y --no-install-recommends "${missing[@]}" </dev/null >"$log" 2>&1; then
    if ! apt-get update >>"$log" 2>&1; then
        cat "$log" >&2
        echo "bench-deps: apt-get update failed (log: $log)" >&2
        exit 1
    fi
    if ! apt-get install -y --no-install-recommends "${missing[@]}" </dev/null >>"$log" 2>&1; then
        cat "$log" >&2
        echo "bench-deps: apt-get install ${missing[*]} failed (log: $log)" >&2
        exit 1
    fi
fi
for p in "${missing[@]}"; do
    if ! installed "$p"; then
        echo "bench-deps: $p still not installed after apt-get install (log: $log)" >&2
        exit 1
    fi
done
rm -f "$log"

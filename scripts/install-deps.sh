#!/usr/bin/env bash
# Install the Debian packages that dunnage's daemon, tests and benchmarks (`just bench`) need.
# Idempotent: does nothing (and prints nothing) when everything is present;
# runs `apt-get update` at most once, and only when something is missing.
set -euo pipefail

PACKAGES=(
    docker.io      # dockerd 20.10 + the matching /usr/bin/docker client (end-to-end tests)
    fuse3          # fusermount3, /dev/fuse userspace bits (FUSE export)
    xfsprogs       # mkfs.xfs (fs=xfs)
    e2fsprogs      # mkfs.ext4 (fs=ext4, the default)
    busybox-static # /bin/busybox for the FROM-scratch test image
    fio            # benchmarks
    qemu-utils     # qemu-storage-daemon (the benchmark peer)
    util-linux     # losetup, mount, umount, findmnt
    iproute2       # ip (network namespaces in cluster tests)
    nftables       # nft: packet drops in cluster fault tests
    etcd-server    # etcd 3.4: the cluster's catalog, membership and attach leases
    etcd-client    # etcdctl: the cluster tests' etcd health checks (only Suggested by etcd-server)
    openssl        # certificates for the test of an etcd with TLS
    protobuf-compiler # protoc, run by etcd-client's build script
    kmod           # modprobe (fuse, loop)
    libclang-dev   # bindgen, run by libublk-rs-sys when building the ublk export
    fonts-dejavu-core # DejaVuSans.ttf: labels the chart of `just bench`
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
    echo "install-deps: missing packages: ${missing[*]}" >&2
    echo "install-deps: run this script as root to install them" >&2
    exit 1
fi

log=$(mktemp /tmp/dunnage-install-deps.XXXXXX.log)
export DEBIAN_FRONTEND=noninteractive
echo "install-deps: installing ${missing[*]}" >&2
if ! apt-get update >"$log" 2>&1; then
    cat "$log" >&2
    echo "install-deps: apt-get update failed (log: $log)" >&2
    exit 1
fi
if ! apt-get install -y "${missing[@]}" </dev/null >>"$log" 2>&1; then
    cat "$log" >&2
    echo "install-deps: apt-get install ${missing[*]} failed (log: $log)" >&2
    exit 1
fi
for p in "${missing[@]}"; do
    if ! installed "$p"; then
        echo "install-deps: $p still not installed after apt-get install (log: $log)" >&2
        exit 1
    fi
done
rm -f "$log"

#!/usr/bin/env bash
# Boot a throwaway qemu (TCG) VM with Debian bookworm-backports' 6.12 kernel
# (which has ublk_drv) and run a guest script inside a busybox initramfs.
#
# Usage (as root):
#   scripts/vm/run.sh [--script FILE] [--bin PATH] [--add HOST[:GUEST]]...
#                     [--module NAME]... [--timeout SECS] [--mem MB] [--smp N]
#
#   --script FILE   guest script, run with busybox sh as /guest.sh
#                   (default tests/vm/smoke.sh)
#   --bin PATH      binary put at /usr/local/bin/<basename> with its ldd libs
#                   (default target/release/dunnage)
#   --add H[:G]     extra host file copied to guest path G (default: same path);
#                   dynamic ELF files get their ldd libraries too. Repeatable.
#   --module NAME   extra kernel module to insmod (with its deps). Repeatable.
#   --timeout SECS  hard limit for the qemu run (default 300)
#
# A guest script names the host tools it needs beyond busybox, mke2fs and
# the binary in lines of its own, `# vm-needs: TOOL...`; each is copied to
# the guest at the path `command -v` finds on this host, with its libraries.
#
# Outputs in target/vm/: the kernel .deb and its extracted tree, initramfs.cpio,
# console.log. Exit status 0 only if the guest printed "VM-RESULT: PASS".
# Inside the guest the script's exit code decides PASS / FAIL <rc>.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
VM_DIR=$ROOT/target/vm
SCRIPT=$ROOT/tests/vm/smoke.sh
BIN=$ROOT/target/release/dunnage
TIMEOUT=300
MEM=1024
SMP=2
ADDS=()
EXTRA_MODULES=()

while [ $# -gt 0 ]; do
    case $1 in
        --script) SCRIPT=$2; shift 2 ;;
        --bin) BIN=$2; shift 2 ;;
        --add) ADDS+=("$2"); shift 2 ;;
        --module) EXTRA_MODULES+=("$2"); shift 2 ;;
        --timeout) TIMEOUT=$2; shift 2 ;;
        --mem) MEM=$2; shift 2 ;;
        --smp) SMP=$2; shift 2 ;;
        -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
        *) echo "run.sh: unknown argument: $1" >&2; exit 2 ;;
    esac
done

log() { echo "[vm] $*" >&2; }
die() { echo "[vm] ERROR: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root"
[ -f "$SCRIPT" ] || die "guest script not found: $SCRIPT"
[ -x "$BIN" ] || die "binary not found: $BIN (build it: cargo build --release)"
SCRIPT=$(realpath "$SCRIPT")
BIN=$(realpath "$BIN")
mkdir -p "$VM_DIR"

export DEBIAN_FRONTEND=noninteractive
APT_UPDATED=0
apt_update_once() {
    if [ "$APT_UPDATED" = 0 ]; then
        log "apt-get update"
        apt-get update -qq
        APT_UPDATED=1
    fi
}

# ---------------------------------------------------------------- 1. packages
is_installed() {
    [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]
}
missing=()
# fio, curl and util-linux (blkid) for the tools guest scripts ask for (vm-needs).
for p in qemu-system-x86 busybox-static cpio xz-utils kmod e2fsprogs fio curl util-linux; do
    is_installed "$p" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    apt_update_once
    log "installing: ${missing[*]}"
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# ------------------------------------------------------------------- 2. kernel
. /etc/os-release
CODENAME=${VERSION_CODENAME:-bookworm}
BPO=$CODENAME-backports

bpo_configured() {
    grep -rqsE "(^|[[:space:]])$BPO([[:space:]]|$)" \
        /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources
}
if ! bpo_configured; then
    # Mirror the style and host of the existing Debian main archive entry.
    if [ -f /etc/apt/sources.list.d/debian.sources ] ||
       grep -qs "Suites:.*\b$CODENAME\b" /etc/apt/sources.list.d/*.sources; then
        src=$(grep -ls "Suites:.*\b$CODENAME\b" /etc/apt/sources.list.d/*.sources | head -n1)
        uri=$(awk -v c="$CODENAME" '
            /^URIs:/ {u=$2} /^Suites:/ {for(i=2;i<=NF;i++) if($i==c) found=1}
            /^$/ {if(found && u && !done) {print u; done=1} u=""; found=0}
            END {if(found && u && !done) print u}' "$src")
        uri=${uri:-http://deb.debian.org/debian}
        signed=$(awk '/^Signed-By:/ {print $2; exit}' "$src")
        f=/etc/apt/sources.list.d/$BPO.sources
        log "adding $f ($uri)"
        {
            echo "Types: deb"
            echo "URIs: $uri"
            echo "Suites: $BPO"
            echo "Components: main"
            if [ -n "$signed" ]; then echo "Signed-By: $signed"; fi
        } > "$f"
    else
        uri=$(awk -v c="$CODENAME" '$1=="deb" {for(i=2;i<=NF;i++) if($i==c) {for(j=2;j<i;j++) if($j ~ /^[a-z]+:\/\//) {print $j; exit}}}' \
              /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null | head -n1)
        uri=${uri:-http://deb.debian.org/debian}
        f=/etc/apt/sources.list.d/$BPO.list
        log "adding $f ($uri)"
        echo "deb $uri $BPO main" > "$f"
    fi
    APT_UPDATED=0
    apt_update_once
fi

# Which linux-image-6.x-amd64 does the backports metapackage depend on?
resolve_kernel_pkg() {
    apt-cache depends "linux-image-amd64/$BPO" 2>/dev/null |
        awk '/Depends: linux-image-[0-9]/ {print $2; exit}'
}
KPKG=$(resolve_kernel_pkg || true)
if [ -z "$KPKG" ]; then
    APT_UPDATED=0
    apt_update_once
    KPKG=$(resolve_kernel_pkg || true)
fi
[ -n "$KPKG" ] || die "could not resolve linux-image-amd64's dependency in $BPO"
log "kernel package: $KPKG"

KDIR=$VM_DIR/kernel
mkdir -p "$KDIR"
deb=$(ls "$KDIR"/"${KPKG}"_*_amd64.deb 2>/dev/null | head -n1 || true)
if [ -z "$deb" ]; then
    log "apt-get download $KPKG/$BPO"
    (cd "$KDIR" && apt-get download -qq -o APT::Sandbox::User=root "$KPKG/$BPO")
    deb=$(ls "$KDIR"/"${KPKG}"_*_amd64.deb | head -n1)
fi
KROOT=$KDIR/root-$KPKG
if [ ! -f "$KROOT/.ready" ]; then
    log "dpkg -x $(basename "$deb")"
    rm -rf "$KROOT"
    dpkg -x "$deb" "$KROOT"
    kv=$(ls "$KROOT/lib/modules" | head -n1)
    depmod -b "$KROOT" "$kv"   # modules.dep is generated at install time, not shipped
    touch "$KROOT/.ready"
fi
KVER=$(ls "$KROOT/lib/modules" | head -n1)
MODDIR=$KROOT/lib/modules/$KVER
VMLINUZ=$KROOT/boot/vmlinuz-$KVER
[ -f "$VMLINUZ" ] || die "no vmlinuz in $KROOT/boot"
log "kernel version: $KVER"

# --------------------------------------------------------------- 3. initramfs
IRD=$VM_DIR/initramfs
rm -rf "$IRD"
mkdir -p "$IRD"/{bin,sbin,usr/bin,usr/sbin,usr/local/bin,lib,lib64,etc,proc,sys,dev,tmp,run,mnt,root,lib/modules}

# busybox + applet symlinks in /bin (real tools in /usr/sbin etc. win via PATH)
cp /bin/busybox "$IRD/bin/busybox"
for a in $(/bin/busybox --list); do
    [ -e "$IRD/bin/$a" ] || ln -s busybox "$IRD/bin/$a"
done

# copy a host file (following symlinks) to a guest path, plus its ldd libs
copy_with_libs() {
    local src=$1 dst=$2
    mkdir -p "$IRD/$(dirname "$dst")"
    cp -L "$src" "$IRD/$dst"
    if file_is_dynamic "$src"; then
        local lib
        for lib in $(ldd "$src" | awk '/=> \// {print $3} /^[[:space:]]*\/[^ ]+ \(/ {print $1}'); do
            if [ ! -e "$IRD/$lib" ]; then
                mkdir -p "$IRD/$(dirname "$lib")"
                cp -L "$lib" "$IRD/$lib"
            fi
        done
    fi
}
file_is_dynamic() {
    ldd "$1" >/dev/null 2>&1
}

copy_with_libs "$BIN" "/usr/local/bin/$(basename "$BIN")"
copy_with_libs "$(command -v mke2fs)" /usr/sbin/mke2fs
ln -sf mke2fs "$IRD/usr/sbin/mkfs.ext4"
[ -f /etc/mke2fs.conf ] && cp /etc/mke2fs.conf "$IRD/etc/"
for tool in $(sed -n 's/^# vm-needs://p' "$SCRIPT"); do
    path=$(command -v "$tool") || die "$(basename "$SCRIPT") needs $tool, which this host does not have"
    copy_with_libs "$path" "$path"
done
for spec in "${ADDS[@]+"${ADDS[@]}"}"; do
    host=${spec%%:*}
    guest=${spec#*:}
    [ "$guest" = "$spec" ] && guest=$(realpath "$host")
    [ -e "$host" ] || die "--add: not found: $host"
    copy_with_libs "$host" "$guest"
done
cp "$SCRIPT" "$IRD/guest.sh"
chmod +x "$IRD/guest.sh"

# Modules: resolve via modules.dep, skip builtins, deps first.
declare -A MOD_SEEN=()
MOD_ORDER=()
modpath() { # name -> relative path in modules.dep (handles - vs _)
    local n=${1//-/_} alt=${1//_/-}
    awk -F: -v a="/$n.ko" -v b="/$alt.ko" '
        { p=$1; sub(/\.(xz|zst|gz)$/, "", p)
          if (substr(p, length(p)-length(a)+1) == a || substr(p, length(p)-length(b)+1) == b) {print $1; exit} }' \
        "$MODDIR/modules.dep"
}
add_module_path() { # relative path, recursive deps first
    local rel=$1 dep
    [ -n "${MOD_SEEN[$rel]:-}" ] && return 0
    MOD_SEEN[$rel]=1
    for dep in $(awk -F: -v r="$rel" '$1==r {print $2; exit}' "$MODDIR/modules.dep"); do
        add_module_path "$dep"
    done
    MOD_ORDER+=("$rel")
}
is_builtin() {
    local n=${1//-/_} alt=${1//_/-}
    grep -qE "/($n|$alt)\.ko$" "$MODDIR/modules.builtin"
}
WANT_MODULES=(ublk_drv loop crc32c_generic crc32c-intel ext4 "${EXTRA_MODULES[@]+"${EXTRA_MODULES[@]}"}")
for m in "${WANT_MODULES[@]}"; do
    if is_builtin "$m"; then
        log "module $m: builtin"
        continue
    fi
    rel=$(modpath "$m")
    if [ -z "$rel" ]; then
        case $m in
            ublk_drv) die "ublk_drv not found in $KVER" ;;
            *) log "module $m: not available, skipping"; continue ;;
        esac
    fi
    add_module_path "$rel"
done
: > "$IRD/etc/modules.order"
for rel in "${MOD_ORDER[@]+"${MOD_ORDER[@]}"}"; do
    name=$(basename "$rel"); name=${name%.xz}; name=${name%.zst}; name=${name%.gz}
    dst=$IRD/lib/modules/$name
    case $rel in
        *.xz) xz -dc "$MODDIR/$rel" > "$dst" ;;
        *.zst) zstd -qdc "$MODDIR/$rel" > "$dst" ;;
        *.gz) gzip -dc "$MODDIR/$rel" > "$dst" ;;
        *) cp "$MODDIR/$rel" "$dst" ;;
    esac
    echo "$name" >> "$IRD/etc/modules.order"
done
log "modules: $(tr '\n' ' ' < "$IRD/etc/modules.order")"

cat > "$IRD/init" <<'EOF'
#!/bin/busybox sh
export PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /dev/shm
ln -sf /proc/self/fd /dev/fd 2>/dev/null
ip link set lo up 2>/dev/null
while read -r m; do
    [ -n "$m" ] || continue
    insmod "/lib/modules/$m" || echo "init: insmod $m failed"
done < /etc/modules.order
# give devtmpfs a moment to create /dev/ublk-control
i=0; while [ ! -e /dev/ublk-control ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
echo "init: running /guest.sh"
cd /root
sh /guest.sh
rc=$?
if [ $rc -eq 0 ]; then echo "VM-RESULT: PASS"; else echo "VM-RESULT: FAIL $rc"; fi
# Not waited for: a failed test can leave IO that never completes (a
# quiesced ublk device with no daemon), and everything here is in memory.
sync &
sleep 1
poweroff -f
EOF
chmod +x "$IRD/init"

INITRD=$VM_DIR/initramfs.cpio
(cd "$IRD" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc --quiet > "$INITRD")
log "initramfs: $(du -h "$INITRD" | cut -f1)"

# -------------------------------------------------------------------- 4. boot
# Single-threaded TCG: with one host thread per vCPU (MTTCG) the guest kernel
# now and then hits a stale int3 from its own boot-time text patching on the
# other vCPU and panics (seen in CI: "Oops: int3" in sched_clock_cpu).
CONSOLE=$VM_DIR/console.log
boot() {
    log "booting (timeout ${TIMEOUT}s), console -> $CONSOLE"
    start=$(date +%s)
    set +e
    timeout --foreground -k 10 "$TIMEOUT" qemu-system-x86_64 \
        -accel tcg,thread=single -cpu max -m "$MEM" -smp "$SMP" \
        -nographic -no-reboot -nic none \
        -kernel "$VMLINUZ" -initrd "$INITRD" \
        -append "console=ttyS0 panic=-1 quiet" \
        < /dev/null 2>&1 | tee "$CONSOLE"
    qrc=${PIPESTATUS[0]}
    set -e
    log "qemu exited rc=$qrc after $(( $(date +%s) - start ))s"
}
boot
# A kernel that panics before the guest script starts is qemu's or the
# kernel's trouble, not the code under test: boot once more, loudly.
if tr -d '\r' < "$CONSOLE" | grep -qa 'Kernel panic' \
    && ! tr -d '\r' < "$CONSOLE" | grep -qaF 'init: running /guest.sh'; then
    cp "$CONSOLE" "$VM_DIR/console.first-boot.log"
    log "WARNING: the guest kernel panicked before /guest.sh started (console in console.first-boot.log); booting again"
    boot
fi

if tr -d '\r' < "$CONSOLE" | grep -qx 'VM-RESULT: PASS'; then
    log "PASS"
    exit 0
fi
if [ "$qrc" = 124 ]; then
    log "FAIL: timed out after ${TIMEOUT}s"
else
    log "FAIL: $(tr -d '\r' < "$CONSOLE" | grep -a 'VM-RESULT:' | tail -n1 || echo 'no VM-RESULT marker')"
fi
exit 1

#!/bin/sh
# Guest script for scripts/vm/run.sh: the ublk export end to end.
#   scripts/vm/run.sh --script tests/vm/ublk.sh
# Serves a volume as /dev/ublkbN, does direct IO and an ext4 round trip on
# it, detaches, stops the daemon, and checks no ublk device is left.
R=/tmp/r
LOG=/tmp/dunnage.log
pid=

say() { echo "ublk-test: $*"; }
fail() {
    say "FAIL: $*"
    [ -f "$LOG" ] && { say "daemon log:"; tail -n 40 "$LOG"; }
    [ -n "$pid" ] && kill "$pid" 2>/dev/null
    exit 1
}
d() { dunnage --run-dir "$R" "$@"; }
start_daemon() {
    rm -f "$R/control.sock"
    dunnage serve --export ublk --data-dir /tmp/d --run-dir "$R" --plugin-dir /tmp/p >>"$LOG" 2>&1 &
    pid=$!
    i=0
    while [ ! -S "$R/control.sock" ]; do
        kill -0 "$pid" 2>/dev/null || fail "daemon exited early"
        i=$((i + 1))
        [ $i -gt 300 ] && fail "no $R/control.sock after 30s"
        sleep 0.1
    done
    say "daemon up (pid $pid)"
}
stop_daemon() {
    kill -TERM "$pid"
    i=0
    while kill -0 "$pid" 2>/dev/null; do
        i=$((i + 1))
        [ $i -gt 300 ] && fail "daemon still running 30s after SIGTERM"
        sleep 0.1
    done
    wait "$pid"
    say "daemon exited with $?"
    pid=
}
no_ublk_left() {
    left=$(ls /dev/ublkb* /dev/ublkc* 2>/dev/null)
    [ -z "$left" ] || fail "ublk devices left behind: $left"
    say "ok: no /dev/ublkb* left"
}

say "kernel $(uname -r)"
test -c /dev/ublk-control || fail "/dev/ublk-control missing"

start_daemon

d volume create v -o size=256M -o fs=none || fail "volume create"
dev=$(d attach v) || fail "attach"
say "attached: $dev"
case $dev in
    /dev/ublkb*) say "ok: device is a ublk block device" ;;
    *) fail "device $dev is not /dev/ublkb*" ;;
esac
test -b "$dev" || fail "$dev is not a block device"
name=${dev#/dev/}
lbs=$(cat "/sys/block/$name/queue/logical_block_size")
size=$(cat "/sys/block/$name/size")
dmax=$(cat "/sys/block/$name/queue/discard_max_bytes")
say "logical_block_size=$lbs sectors=$size discard_max_bytes=$dmax"
[ "$lbs" = 4096 ] || fail "logical block size $lbs, want 4096"
[ "$size" = $((256 * 2048)) ] || fail "size $size sectors, want $((256 * 2048))"
[ "$dmax" -gt 0 ] || fail "discard not enabled"

# Direct IO round trip: 8 MiB of non-zero pattern at 1 MiB into the device.
dd if=/dev/urandom of=/tmp/pattern bs=1M count=8 2>/dev/null || fail "make pattern"
dd if=/tmp/pattern of="$dev" bs=1M seek=1 oflag=direct conv=fsync 2>/dev/null || fail "dd write"
dd if="$dev" of=/tmp/back bs=1M skip=1 count=8 iflag=direct 2>/dev/null || fail "dd read"
a=$(md5sum < /tmp/pattern | cut -d' ' -f1)
b=$(md5sum < /tmp/back | cut -d' ' -f1)
say "md5 written=$a read=$b"
[ "$a" = "$b" ] || fail "read back differs"
say "ok: direct IO round trip"

# Discard reads back as zeros.
blkdiscard -o 1048576 -l 1048576 "$dev" 2>/dev/null && {
    z=$(dd if="$dev" bs=1M skip=1 count=1 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
    zz=$(dd if=/dev/zero bs=1M count=1 2>/dev/null | md5sum | cut -d' ' -f1)
    [ "$z" = "$zz" ] || fail "discarded range does not read as zeros"
    say "ok: discard reads back zeros"
} || say "skip: blkdiscard not available"

# ext4 round trip.
mkfs.ext4 -q -F "$dev" || fail "mkfs.ext4"
mkdir -p /mnt/v
mount -t ext4 "$dev" /mnt/v || fail "mount"
cp /tmp/pattern /mnt/v/file || fail "write file"
sync
umount /mnt/v || fail "umount"
mount -t ext4 "$dev" /mnt/v || fail "remount"
c=$(md5sum < /mnt/v/file | cut -d' ' -f1)
umount /mnt/v || fail "umount again"
[ "$c" = "$a" ] || fail "file read back differs after remount"
say "ok: ext4 mkfs, mount, write, sync, umount, remount, read"

d detach v || fail "detach"
say "ok: detached"
[ -e "$dev" ] && fail "$dev still present after detach"

stop_daemon
no_ublk_left

# SIGTERM with the volume attached: shutdown must stop the device itself.
start_daemon
dev=$(d attach v) || fail "attach after restart"
say "attached again: $dev"
mount -t ext4 -o ro "$dev" /mnt/v || fail "mount after restart"
c=$(md5sum < /mnt/v/file | cut -d' ' -f1)
umount /mnt/v || fail "umount after restart"
[ "$c" = "$a" ] || fail "file differs after daemon restart"
say "ok: data survives a daemon restart"
stop_daemon
no_ublk_left

# Informational (recovery is not built yet): what kill -9 leaves behind.
start_daemon
dev=$(d attach v) || fail "attach before kill -9"
kill -KILL "$pid"
wait "$pid" 2>/dev/null
pid=
sleep 1
say "info: after kill -9 with $dev attached: $(ls /dev/ublkb* /dev/ublkc* 2>/dev/null | tr '\n' ' ')"
say "daemon log:"
cat "$LOG"
say "all checks passed"

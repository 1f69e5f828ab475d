#!/bin/sh
# Guest script for scripts/vm/run.sh: the ublk export end to end.
#   scripts/vm/run.sh --script tests/vm/ublk.sh
# Serves a volume as /dev/ublkbN, does direct IO and an ext4 round trip on
# it, detaches, stops the daemon, and checks no ublk device is left. Then
# Docker's path on the plugin socket (Create, Mount: the daemon formats and
# mounts ext4), fio with verification on a file in it while the daemon is
# killed with kill -9 and started again (user recovery: IO pauses, then
# goes on), Unmount and Remove; and a device whose attach record is lost
# is removed as an orphan at the next start.
# vm-needs: fio curl blkid
R=/tmp/r
LOG=/tmp/dunnage.log
SOCK=/tmp/p/dunnage.sock
pid=
fpid=

say() { echo "ublk-test: $*"; }
fail() {
    say "FAIL: $*"
    [ -f "$LOG" ] && { say "daemon log:"; tail -n 40 "$LOG"; }
    [ -f /tmp/fio.out ] && { say "fio output:"; tail -n 30 /tmp/fio.out; }
    [ -n "$fpid" ] && kill "$fpid" 2>/dev/null
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
# POST to the plugin socket as dockerd does; prints the answer, fails on an error.
plugin() {
    out=$(curl -sS --unix-socket "$SOCK" -H 'Content-Type: application/json' \
        -d "$2" "http://plugin/VolumeDriver.$1" 2>&1) || fail "VolumeDriver.$1 $2: $out"
    case $out in
        *'"Err":""'*) echo "$out" ;;
        *) fail "VolumeDriver.$1 $2: $out" ;;
    esac
}
# Writes completed on a block device (field 5 of its stat).
writes() { awk '{print $5}' "/sys/block/${1#/dev/}/stat"; }
md5() { md5sum < "$1" | cut -d' ' -f1; }

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

# Grown while detached: the next attach's device has the new size, and
# the data (an ext4 filesystem) is there.
d volume resize v 384M >/dev/null || fail "volume resize"
dev=$(d attach v) || fail "attach after resize"
size=$(cat "/sys/block/${dev#/dev/}/size")
[ "$size" = $((384 * 2048)) ] || fail "size after resize $size sectors, want $((384 * 2048))"
mount -t ext4 -o ro "$dev" /mnt/v || fail "mount after resize"
c=$(md5sum < /mnt/v/file | cut -d' ' -f1)
umount /mnt/v || fail "umount after resize"
[ "$c" = "$a" ] || fail "file differs after resize"
d detach v || fail "detach after resize"
say "ok: grown to 384 MiB while detached: the ublk device has the new size, the data stays"

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

# Docker's path: Create and Mount on the plugin socket; the daemon formats
# the volume (ext4, the default), mounts it and hands out <mount>/data.
start_daemon
plugin Create '{"Name":"w","Opts":{"size":"256M"}}' >/dev/null
out=$(plugin Mount '{"Name":"w","ID":"c1"}')
mp=$(echo "$out" | sed -n 's/.*"Mountpoint":"\([^"]*\)".*/\1/p')
[ -d "$mp" ] || fail "Mount answered $out"
wdev=$(d volume inspect w | sed -n 's/.*"device": *"\([^"]*\)".*/\1/p')
say "device used: $wdev (volume w, mounted for Docker at $mp)"
case $wdev in
    /dev/ublkb*) ;;
    *) fail "volume w is on $wdev, not /dev/ublkb*" ;;
esac
fsmnt=$(dirname "$mp")
grep -q "^$wdev $fsmnt ext4 " /proc/mounts || fail "$wdev is not mounted ext4 on $fsmnt: $(cat /proc/mounts)"
say "ok: Docker Mount formatted ext4 on $wdev and mounted it"
dd if=/dev/urandom of=/tmp/before bs=1M count=4 2>/dev/null || fail "make data"
cp /tmp/before "$mp/before" && sync || fail "write data"
before=$(md5 /tmp/before)
[ "$(md5 "$mp/before")" = "$before" ] || fail "data read back differs"
say "ok: wrote and read back 4 MiB in the volume"

# fio writes 8192 blocks of a file in the filesystem and verifies them;
# after 1000 writes have reached the device the daemon is killed (with a
# queue this deep some requests are in the daemon's hands then), and
# started again while fio waits on paused IO.
rm -f /tmp/fio.out
fio --name=crash --thread --filename="$mp/fio.dat" --size=32M --bs=4k \
    --rw=randwrite --ioengine=libaio --iodepth=32 --direct=1 \
    --verify=crc32c --verify_fatal=1 --verify_backlog=1024 \
    --output=/tmp/fio.out >/dev/null 2>&1 &
fpid=$!
w0=$(writes "$wdev")
i=0
while [ $(($(writes "$wdev") - w0)) -lt 1000 ]; do
    kill -0 "$fpid" 2>/dev/null || fail "fio ended before the daemon was killed"
    i=$((i + 1))
    [ $i -gt 600 ] && fail "fio made no progress on $wdev in 60s"
    sleep 0.1
done
kill -KILL "$pid"
wait "$pid" 2>/dev/null
pid=
say "killed dunnage serve (kill -9) with fio running on $wdev"
kill -0 "$fpid" 2>/dev/null || fail "fio ended when the daemon was killed"
[ -b "$wdev" ] || fail "$wdev is gone after kill -9"
w1=$(writes "$wdev")
sleep 1
[ "$(writes "$wdev")" = "$w1" ] || fail "writes completed on $wdev with no daemon running"
say "ok: $wdev still present, its IO paused while no daemon runs"
start_daemon
i=0
while kill -0 "$fpid" 2>/dev/null; do
    i=$((i + 1))
    [ $i -gt 1800 ] && fail "fio did not finish within 180s of the restart"
    sleep 0.1
done
wait "$fpid"
frc=$?
fpid=
grep -E "err=|verify|write:|read:" /tmp/fio.out | sed 's/^/ublk-test: fio: /'
[ "$frc" = 0 ] || fail "fio exited with $frc"
grep -q "err= 0" /tmp/fio.out || fail "fio reports errors"
grep -qi "verify.*\(bad\|fail\|mismatch\)" /tmp/fio.out && fail "fio reports verify errors"
say "ok: fio finished across the kill -9 and restart with zero verify errors"
errs=$(dmesg | grep -E "I/O error|EXT4-fs (error|warning)|Aborting journal")
[ -z "$errs" ] || fail "the kernel logged IO errors: $errs"
say "ok: no IO error in the kernel log"
grep -q "taken back after a daemon restart" "$LOG" || fail "the daemon did not log taking the volume back"
[ "$(d volume inspect w | sed -n 's/.*"device": *"\([^"]*\)".*/\1/p')" = "$wdev" ] ||
    fail "volume w is not on $wdev after the restart"
[ "$(md5 "$mp/before")" = "$before" ] || fail "data written before the kill differs"
say "ok: data written before the kill reads back the same"

plugin Unmount '{"Name":"w","ID":"c1"}' >/dev/null
grep -q " $fsmnt " /proc/mounts && fail "$fsmnt still mounted after Unmount"
[ -e "$wdev" ] && fail "$wdev still present after Unmount"
plugin Remove '{"Name":"w"}' >/dev/null
d volume inspect w >/dev/null 2>&1 && fail "volume w still exists after Remove"
say "ok: Unmount detached $wdev, Remove deleted the volume"

# A device whose attach record is lost (killed before it was written, say)
# is nobody's to take back: the next start removes it.
dev=$(d attach v) || fail "attach v"
kill -KILL "$pid"
wait "$pid" 2>/dev/null
pid=
rm -f "$R"/attached/*.json
[ -b "$dev" ] || fail "$dev is gone after kill -9"
start_daemon
grep -q "left by a crashed run" "$LOG" || fail "no orphan removal logged"
i=0
while [ -e "$dev" ]; do
    i=$((i + 1))
    [ $i -gt 100 ] && fail "$dev still present 10s after the start"
    sleep 0.1
done
say "ok: the orphaned $dev was removed at start"
d volume rm v || fail "volume rm v"

stop_daemon
no_ublk_left
left=$(grep -E "ublk|$R" /proc/mounts)
[ -z "$left" ] || fail "mounts left behind: $left"
left=$(pidof dunnage fio)
[ -z "$left" ] || fail "processes left behind: $left"
left=$(ls /run/ublksrvd 2>/dev/null)
[ -z "$left" ] || fail "libublk JSON left behind: $left"
say "ok: no ublk device, mount or process left"
say "daemon log:"
cat "$LOG"
say "all checks passed"

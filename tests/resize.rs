//! Growing volumes through the CLI and the plugin socket: mounted (under a
//! writer) or raw under fio, and detached; never shrinking, bad sizes
//! changing nothing; the data kept, the filesystem (ext4 and xfs) grown
//! online or at the next mount, fsck-clean; a snapshot from before the
//! grow restored, and a clone made, at the new size; the size kept across
//! a daemon restart.

mod common;

use common::{fio_verify, mount_id, pattern, wait_child, write_durably, Daemon, Opts};
use std::fs;
use std::path::Path;
use std::process::Command;

const MIB: u64 = 1 << 20;

/// Bytes of the filesystem mounted at `path`.
fn fs_bytes(path: &Path) -> u64 {
    let s = nix::sys::statvfs::statvfs(path).expect("statvfs");
    s.blocks() as u64 * s.fragment_size() as u64
}

fn size_of(d: &Daemon, vol: &str) -> u64 {
    d.inspect(vol)["size_bytes"].as_u64().unwrap()
}

/// fsck of the volume's filesystem, as a raw device on the host.
fn assert_fsck_clean(d: &Daemon, vol: &str, fs: &str) {
    let dev = d.cli_ok(&["attach", vol]).trim().to_string();
    let out = match fs {
        "xfs" => Command::new("xfs_repair").args(["-n", &dev]).output(),
        _ => Command::new("e2fsck").args(["-f", "-n", &dev]).output(),
    }
    .expect("run fsck");
    d.cli_ok(&["detach", vol]);
    assert!(
        out.status.success(),
        "{vol}: fsck found problems: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn grows_with(fs: &str, old: u64, mid: u64, new: u64) {
    let d = Daemon::start(Opts::default());
    let vol = format!("grow-{fs}");
    let mib = |b: u64| format!("{}M", b / MIB);
    d.create(&vol, &[("size", &mib(old)), ("fs", fs)]);
    let kept = pattern(4 << 20, 11);

    let id = mount_id(&format!("{vol}-1"));
    let mp = d.mount(&vol, &id);
    write_durably(&mp.join("kept"), &kept);
    let before = fs_bytes(&mp);
    assert!(before <= old, "{fs}: {before} bytes on a {old}-byte volume");
    d.cli_ok(&["snapshot", "create", &vol, "small"]);

    // Bad sizes: refused before anything changes.
    for (size, says) in [
        (mib(old / 2).as_str(), "cannot shrink"),
        ("12Q", "unknown unit"),
        ("99999999T", "64 TiB"),
        ("", "whole number"),
    ] {
        let err = d.cli_err(&["volume", "resize", &vol, size]);
        assert!(err.contains(says), "{size:?}: {err}");
    }
    let err = d.cli_err(&["volume", "update", &vol, "-o", "size=1T", "-o", "fs=xfs"]);
    assert!(err.contains("only size"), "{err}");
    // A refused grow applies none of the options given with it.
    let half = format!("size={}", mib(old / 2));
    let err = d.cli_err(&["volume", "update", &vol, "-o", &half, "-o", "sticky=true"]);
    assert!(err.contains("cannot shrink"), "{err}");
    assert_eq!(
        d.inspect(&vol)["sticky"],
        false,
        "a refused update set sticky"
    );
    assert_eq!(size_of(&d, &vol), old, "a refused update changed the size");
    // The same size again: nothing to do.
    d.cli_ok(&["volume", "resize", &vol, &mib(old)]);

    // Mounted: the device grows at once, under a writer; xfs grows online
    // too (ext4 does where the daemon holds CAP_SYS_RESOURCE, which these
    // hosts' sandbox withholds: then at the next mount).
    let dev = d.inspect(&vol)["device"].as_str().unwrap().to_string();
    let writing = {
        let path = mp.join("during");
        std::thread::spawn(move || {
            for i in 0..64u64 {
                write_durably(&path, &pattern(256 << 10, i));
            }
        })
    };
    let said = d.cli_ok(&["volume", "resize", &vol, &mib(mid)]);
    writing.join().expect("the writer failed during the grow");
    assert_eq!(fs::read(mp.join("during")).unwrap(), pattern(256 << 10, 63));
    assert_eq!(device_bytes(&dev), mid);
    assert_eq!(size_of(&d, &vol), mid);
    let online = fs_bytes(&mp);
    let grew = online > before + (mid - old) / 2;
    assert!(
        grew || fs != "xfs",
        "xfs did not grow online: {before} -> {online} bytes\n{}",
        d.log_tail()
    );
    // What the CLI says is what happened.
    let pending = d.inspect(&vol)["fs_grows_at_next_mount"].as_bool().unwrap();
    assert_eq!(pending, !grew, "{online} bytes, pending {pending}");
    let tells = if grew {
        format!("{fs} filesystem grew")
    } else {
        format!("{fs} filesystem grows at its next mount")
    };
    assert!(said.contains(&tells), "{said}");
    assert_eq!(fs::read(mp.join("kept")).unwrap(), kept);
    d.unmount(&vol, &id);

    // Detached: the next mount grows the filesystem.
    let said = d.cli_ok(&["volume", "resize", &vol, &mib(new)]);
    assert!(
        said.contains(&vol) && said.contains(&format!("{fs} filesystem grows at its next mount")),
        "{said}"
    );
    let info = d.inspect(&vol);
    assert_eq!(info["size_bytes"].as_u64().unwrap(), new, "{info}");
    assert_eq!(info["options"]["size"], mib(new).as_str(), "{info}");
    let id = mount_id(&format!("{vol}-2"));
    let mp = d.mount(&vol, &id);
    let after = fs_bytes(&mp);
    assert!(
        after > before + (new - old) / 2,
        "{fs}: the filesystem did not grow: {before} -> {after} bytes\n{}",
        d.log_tail()
    );
    assert_eq!(fs::read(mp.join("kept")).unwrap(), kept);
    // More than the old size now fits.
    let big = pattern(old as usize, 12);
    write_durably(&mp.join("big"), &big);
    d.unmount(&vol, &id);
    assert_fsck_clean(&d, &vol, fs);

    // A restart keeps the size; the data is read back whole.
    let mut d = d;
    d.restart();
    assert_eq!(size_of(&d, &vol), new);
    let id = mount_id(&format!("{vol}-3"));
    let mp = d.mount(&vol, &id);
    assert_eq!(fs::read(mp.join("big")).unwrap(), big);
    assert_eq!(fs_bytes(&mp), after);
    d.unmount(&vol, &id);

    // A clone has the volume's size and its filesystem.
    let clone = format!("{vol}-clone");
    d.create(&clone, &[("parent", &vol)]);
    assert_eq!(size_of(&d, &clone), new);
    let id = mount_id(&format!("{clone}-1"));
    let mp = d.mount(&clone, &id);
    assert_eq!(fs::read(mp.join("big")).unwrap(), big);
    assert_eq!(fs_bytes(&mp), after);
    d.unmount(&clone, &id);
    d.remove(&clone);

    // The snapshot from before the grows, restored: the volume keeps its
    // size, and its next mount grows the small filesystem again.
    d.cli_ok(&["volume", "restore", &vol, "small"]);
    assert_eq!(size_of(&d, &vol), new);
    let id = mount_id(&format!("{vol}-4"));
    let mp = d.mount(&vol, &id);
    assert_eq!(fs::read(mp.join("kept")).unwrap(), kept);
    assert!(!mp.join("big").exists());
    assert_eq!(fs_bytes(&mp), after);
    d.unmount(&vol, &id);
    assert_fsck_clean(&d, &vol, fs);

    d.cli_ok(&["snapshot", "rm", &vol, "small"]);
    d.remove(&vol);
    let l = d.leftovers_running();
    assert!(l.is_empty(), "leftovers {l:?}\n{}", d.log_tail());
}

#[test]
fn an_ext4_volume_grows_in_use_and_detached() {
    grows_with("ext4", 64 * MIB, 128 * MIB, 256 * MIB);
}

#[test]
fn an_xfs_volume_grows_in_use_and_detached() {
    // mkfs.xfs wants 300 MiB at least.
    grows_with("xfs", 320 * MIB, 640 * MIB, 960 * MIB);
}

/// A raw device grows under fio with verification, on the engine path and
/// in passthrough (the kernel writing the data file itself): fio sees no
/// error, the device has the new size at once, the new space reads zeros
/// and takes writes, and all of it is there after a detach and attach.
fn raw_grows_under_io(passthrough: bool) {
    let d = Daemon::start(Opts::default());
    let vol = if passthrough { "raw-pt" } else { "raw" };
    let pt = passthrough.to_string();
    d.create(
        vol,
        &[("size", "32M"), ("fs", "none"), ("passthrough", &pt)],
    );
    let dev = d.cli_ok(&["attach", vol]).trim().to_string();
    let path = d.inspect(vol)["io_path"].clone();
    assert_eq!(
        path,
        if passthrough { "passthrough" } else { "engine" },
        "{vol}"
    );
    let fio = fio_verify(
        vol,
        &dev,
        "16M",
        &["--time_based", "--runtime=4", "--offset=8M"],
    )
    .spawn()
    .expect("run fio");
    let head = pattern(MIB as usize, 21);
    write_device(&dev, 0, &head);
    std::thread::sleep(std::time::Duration::from_millis(500));
    let said: serde_json::Value =
        serde_json::from_str(&d.cli_ok(&["volume", "resize", vol, "80M", "--json"])).unwrap();
    assert_eq!(said["size_bytes"].as_u64(), Some(80 * MIB), "{said}");
    assert_eq!(device_bytes(&dev), 80 * MIB);
    let tail = pattern(MIB as usize, 22);
    write_device(&dev, 79 * MIB, &tail);
    let (ok, out) = wait_child(fio, "fio", std::time::Duration::from_secs(60), || {
        d.log_tail()
    });
    assert!(ok, "fio failed across the grow:\n{out}\n{}", d.log_tail());
    assert_eq!(read_device(&dev, 0, MIB as usize), head);
    assert_eq!(read_device(&dev, 79 * MIB, MIB as usize), tail);
    // Never-written new space reads zeros.
    assert!(read_device(&dev, 40 * MIB, MIB as usize)
        .iter()
        .all(|&b| b == 0));
    d.cli_ok(&["detach", vol]);
    let dev = d.cli_ok(&["attach", vol]).trim().to_string();
    assert_eq!(device_bytes(&dev), 80 * MIB);
    assert_eq!(read_device(&dev, 0, MIB as usize), head);
    assert_eq!(read_device(&dev, 79 * MIB, MIB as usize), tail);
    d.cli_ok(&["detach", vol]);
    d.remove(vol);
    let l = d.leftovers_running();
    assert!(l.is_empty(), "leftovers {l:?}\n{}", d.log_tail());
}

#[test]
fn a_raw_device_grows_under_io() {
    raw_grows_under_io(false);
}

#[test]
fn a_raw_device_in_passthrough_grows_under_io() {
    raw_grows_under_io(true);
}

fn device_bytes(dev: &str) -> u64 {
    let out = Command::new("blockdev")
        .args(["--getsize64", dev])
        .output()
        .expect("blockdev");
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

fn write_device(dev: &str, offset: u64, data: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = fs::OpenOptions::new().write(true).open(dev).unwrap();
    f.write_all_at(data, offset).unwrap();
    f.sync_all().unwrap();
}

fn read_device(dev: &str, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    use std::os::unix::fs::OpenOptionsExt;
    let f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(dev)
        .unwrap();
    // O_DIRECT wants an aligned buffer: over-allocate and align by hand.
    let mut buf = vec![0u8; len + 4096];
    let at = buf.as_ptr().align_offset(4096);
    f.read_exact_at(&mut buf[at..at + len], offset).unwrap();
    buf[at..at + len].to_vec()
}

//! Behaviour through the Docker plugin socket: refcounts, idempotence, removal rules,
//! durability across restarts and crashes, bad input, thin allocation, xfs, leak checks,
//! concurrency, socket takeover rules.

mod common;

use std::fs;
use std::path::Path;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use common::{expect_err, mount_id, pattern, write_durably, Daemon, Opts, GIB, MIB};
use serde_json::{json, Value};

fn assert_no_leftovers(d: &Daemon, context: &str) {
    let l = d.leftovers_running();
    assert!(l.is_empty(), "{context}: leftovers {l:?}\n{}", d.log_tail());
}

fn assert_no_leftovers_stopped(d: &Daemon, context: &str) {
    let l = d.leftovers_stopped();
    assert!(
        l.is_empty(),
        "{context}: leftovers after the daemon stopped {l:?}\n{}",
        d.log_tail()
    );
}

#[test]
fn refcount_same_id_twice_and_two_ids() {
    let d = Daemon::start(Opts::default());
    d.create("rc", &[("size", "64M")]);
    let (a, b) = (mount_id("rc-a"), mount_id("rc-b"));

    // Same ID twice: needs two unmounts.
    let mp = d.mount("rc", &a);
    assert_eq!(mp, d.mountpoint("rc"));
    assert!(d.is_mounted("rc"));
    assert_eq!(d.mount("rc", &a), mp, "second Mount with the same ID");
    d.unmount("rc", &a);
    assert!(
        d.is_mounted("rc"),
        "unmounted after the first of two Unmounts with the same ID"
    );
    write_durably(&mp.join("still-here"), b"x");
    d.unmount("rc", &a);
    assert!(!d.is_mounted("rc"), "still mounted after the last Unmount");
    assert_no_leftovers(&d, "after the last unmount (same ID)");

    // Two IDs.
    assert_eq!(d.mount("rc", &a), mp);
    assert_eq!(d.mount("rc", &b), mp);
    let v = d.inspect("rc");
    assert_eq!(v["mounts"], 2, "inspect mounts with two IDs: {v}");
    assert_eq!(v["state"], "mounted", "{v}");
    d.unmount("rc", &a);
    assert!(d.is_mounted("rc"), "unmounted while ID b still holds it");
    assert_eq!(
        fs::read(mp.join("still-here")).expect("file from earlier mount"),
        b"x"
    );
    // Unknown ID: success, no change.
    d.unmount("rc", &mount_id("never-mounted"));
    assert!(d.is_mounted("rc"), "Unmount of an unknown ID unmounted it");
    d.unmount("rc", &b);
    assert!(!d.is_mounted("rc"));
    // Unknown ID on an unmounted volume: success too.
    d.unmount("rc", &a);
    assert_no_leftovers(&d, "after unmounting both IDs");
    let v = d.inspect("rc");
    assert_eq!(v["mounts"], 0, "{v}");
    assert_eq!(v["state"], "detached", "{v}");

    d.remove("rc");
    assert_no_leftovers(&d, "after remove");
}

#[test]
fn create_twice_keeps_first_options() {
    let d = Daemon::start(Opts::default());
    d.create("twice", &[("size", "64M"), ("label", "gen=1")]);
    let first = d.inspect("twice");
    d.create("twice", &[("size", "2G"), ("label", "gen=2")]);
    let second = d.inspect("twice");
    assert_eq!(
        second["size_bytes"],
        64 * MIB,
        "second Create changed the size"
    );
    assert_eq!(second["labels"], json!({"gen": "1"}));
    assert_eq!(first, second, "second Create changed the volume");
    assert_eq!(d.list_names(), ["twice"]);
}

#[test]
fn remove_refused_while_mounted_and_when_sticky() {
    let d = Daemon::start(Opts::default());
    let before = d.data_baseline();
    d.create("busy", &[("size", "64M")]);
    let busy_id = d.inspect("busy")["id"].as_str().expect("id").to_string();
    let id = mount_id("busy");
    let mp = d.mount("busy", &id);
    write_durably(&mp.join("f"), b"keep me");
    let err = d.err("/VolumeDriver.Remove", &json!({"Name": "busy"}));
    assert!(
        err.contains("busy") || err.to_lowercase().contains("mount"),
        "Remove while mounted should say why: {err:?}"
    );
    assert!(d.is_mounted("busy"), "refused Remove unmounted the volume");
    assert_eq!(fs::read(mp.join("f")).unwrap(), b"keep me");
    assert_eq!(d.list_names(), ["baseline", "busy"]);
    d.unmount("busy", &id);
    d.remove("busy");
    assert_eq!(d.list_names(), ["baseline"]);
    let (status, v) = d.get("busy");
    expect_err("Get after Remove", status, &v);
    d.assert_no_new_data(&before, &["busy", &busy_id], "after Remove");
    assert_no_leftovers(&d, "after remove");

    d.create("glued", &[("size", "64M"), ("sticky", "true")]);
    assert_eq!(d.inspect("glued")["sticky"], true);
    let err = d.err("/VolumeDriver.Remove", &json!({"Name": "glued"}));
    assert!(
        err.to_lowercase().contains("sticky"),
        "Remove of a sticky volume should say it is sticky: {err:?}"
    );
    let cli = d.cli_err(&["volume", "rm", "glued"]);
    assert!(cli.to_lowercase().contains("sticky"), "{cli:?}");
    assert_eq!(d.list_names(), ["baseline", "glued"]);

    // sticky=false is an ordinary volume.
    d.create("loose", &[("size", "64M"), ("sticky", "false")]);
    d.remove("loose");
}

#[test]
fn data_survives_sigterm_restart() {
    let mut d = Daemon::start(Opts::default());
    d.create("dur", &[("size", "128M")]);
    let a = mount_id("dur-a");
    let mp = d.mount("dur", &a);
    let data = pattern(3 * MIB as usize + 4321, 1);
    write_durably(&mp.join("blob"), &data);

    // SIGTERM while mounted: exit 0, everything it set up is gone.
    d.sigterm_and_wait();
    assert_no_leftovers_stopped(&d, "after SIGTERM while mounted");

    // First request after the socket appears is a Get: dockerd's restore() does exactly
    // that and forgets volumes whose Get fails.
    d.spawn();
    d.wait_socket_file();
    let (status, v) = d.get("dur");
    assert_eq!(
        status,
        200,
        "first Get after restart: {v}\n{}",
        d.log_tail()
    );
    assert_eq!(v["Volume"]["Name"], "dur");
    assert_eq!(d.list_names(), ["dur"]);

    let b = mount_id("dur-b");
    let mp2 = d.mount("dur", &b);
    assert_eq!(mp2, mp);
    assert!(
        fs::read(mp2.join("blob")).unwrap() == data,
        "data changed across a SIGTERM restart"
    );
    d.unmount("dur", &b);
    // dockerd may still send the Unmount for the mount made before the restart.
    d.unmount("dur", &a);
    assert!(!d.is_mounted("dur"));
    assert_no_leftovers(&d, "after unmount following restart");
    d.sigterm_and_wait();
    assert_no_leftovers_stopped(&d, "after the final SIGTERM");
}

#[test]
fn data_survives_kill9() {
    kill9_keeps_fsynced_data(Opts::default());
}

#[test]
fn data_survives_kill9_engine_path() {
    kill9_keeps_fsynced_data(Opts::engine_path());
}

fn kill9_keeps_fsynced_data(opts: Opts) {
    let mut d = Daemon::start(opts);
    d.create("crash", &[("size", "128M")]);
    d.create("bystander", &[("size", "64M")]);
    let a = mount_id("crash-a");
    let mp = d.mount("crash", &a);
    let data = pattern(2 * MIB as usize + 17, 2);
    write_durably(&mp.join("blob"), &data);
    fs::create_dir(mp.join("dir")).unwrap();
    write_durably(&mp.join("dir/small"), b"small file");

    d.kill9();
    d.start_again();

    // Get and List answer from persisted state.
    let (status, v) = d.get("crash");
    assert_eq!(status, 200, "Get after kill -9: {v}\n{}", d.log_tail());
    assert_eq!(d.list_names(), ["bystander", "crash"]);

    // Whatever the new daemon kept or re-created must be live: no dead mounts (ENOTCONN,
    // EIO), no stacked mounts, at most one loop device per volume, backing files present.
    let mounts: Vec<_> = common::mount_entries()
        .into_iter()
        .filter(|m| {
            m.mount_point.starts_with(&d.run_dir) || m.mount_point.starts_with(&d.mount_dir)
        })
        .collect();
    let mut seen = std::collections::BTreeSet::new();
    for m in &mounts {
        assert!(
            seen.insert(m.mount_point.clone()),
            "stacked mounts at {} after restart: {mounts:?}",
            m.mount_point.display()
        );
        assert!(
            fs::metadata(&m.mount_point).is_ok() && fs::read_dir(&m.mount_point).is_ok(),
            "dead mount left from the crashed run: {m:?}\n{}",
            d.log_tail()
        );
    }
    let loops: Vec<_> = common::loop_devices()
        .into_iter()
        .filter(|(_, b)| b.starts_with(&d.run_dir))
        .collect();
    let mut backing = std::collections::BTreeSet::new();
    for (dev, b) in &loops {
        assert!(
            backing.insert(b.clone()),
            "two loop devices over {} after restart: {loops:?}",
            b.display()
        );
        assert!(
            fs::metadata(b).is_ok(),
            "{dev} left over a backing file that is gone: {}",
            b.display()
        );
    }
    assert!(
        d.volume_leftovers("bystander").is_empty(),
        "a volume that was never mounted has mounts/devices after restart: {:?}",
        d.volume_leftovers("bystander")
    );

    let b = mount_id("crash-b");
    let mp2 = d.mount("crash", &b);
    assert_eq!(mp2, mp);
    assert!(
        fs::read(mp2.join("blob")).unwrap() == data,
        "fsynced data lost or changed across kill -9"
    );
    assert_eq!(fs::read(mp2.join("dir/small")).unwrap(), b"small file");
    // The filesystem is writable again.
    write_durably(&mp2.join("after"), b"after crash");
    d.unmount("crash", &b);
    d.unmount("crash", &a);
    assert!(!d.is_mounted("crash"), "still mounted after all Unmounts");
    assert_no_leftovers(&d, "after unmount following the crash restart");

    // And once more, to read back what was written after the crash.
    let c = mount_id("crash-c");
    let mp3 = d.mount("crash", &c);
    assert_eq!(fs::read(mp3.join("after")).unwrap(), b"after crash");
    d.unmount("crash", &c);
    d.remove("crash");
    d.remove("bystander");
    assert_no_leftovers(&d, "after remove");
    d.sigterm_and_wait();
    assert_no_leftovers_stopped(&d, "after SIGTERM");
}

#[test]
fn get_and_list_answer_immediately_after_restart() {
    let mut d = Daemon::start(Opts::default());
    for i in 0..5 {
        d.create(&format!("quick{i}"), &[("size", "64M")]);
    }
    d.sigterm_and_wait();
    d.spawn();
    d.wait_socket_file();
    let t = Instant::now();
    let v = d.ok("/VolumeDriver.List", &json!({}));
    assert_eq!(
        v["Volumes"].as_array().map(Vec::len),
        Some(5),
        "first List after restart: {v}"
    );
    for i in 0..5 {
        let (status, v) = d.get(&format!("quick{i}"));
        assert_eq!(status, 200, "Get quick{i} after restart: {v}");
    }
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "List + 5 Gets took {:?} after restart",
        t.elapsed()
    );
}

#[test]
fn bad_input_is_refused_and_changes_nothing() {
    let d = Daemon::start(Opts::default());
    d.create("good", &[("size", "64M")]);
    let names_before = d.list_names();
    let data_before = d.data_paths();

    // Malformed JSON.
    for body in [
        &b"{\"Name\":\"mal\",\"Opts\":"[..],
        b"not json\n",
        b"[1,2,3]\n",
        b"{\"Name\":42}\n",
        b"",
    ] {
        let (status, v) = d.call_raw("/VolumeDriver.Create", body);
        expect_err(
            &format!("Create with body {:?}", String::from_utf8_lossy(body)),
            status,
            &v,
        );
    }

    // Bad names, through Create and through the other endpoints.
    let long = "n".repeat(300);
    let long129 = "n".repeat(129);
    for name in [
        "a/b",
        "..",
        "../escape",
        "/abs",
        "nul\u{0}byte",
        long.as_str(),
        long129.as_str(),
        "",
        "-dash",
        ".hidden",
        "sp ace",
    ] {
        let err = d.err("/VolumeDriver.Create", &json!({"Name": name, "Opts": {}}));
        assert!(
            err.to_lowercase().contains("name"),
            "Create {name:?}: the error should say the name is invalid: {err:?}"
        );
        for ep in [
            "/VolumeDriver.Get",
            "/VolumeDriver.Path",
            "/VolumeDriver.Remove",
        ] {
            d.err(ep, &json!({"Name": name}));
        }
        d.err(
            "/VolumeDriver.Mount",
            &json!({"Name": name, "ID": mount_id(name)}),
        );
    }
    // 128 characters is the limit and allowed.
    let max = "m".repeat(128);

    // Bad sizes.
    for size in ["-1", "1Q", "99999999T", "", "0", "1.5.G", "G", "0x10"] {
        let err = d.err(
            "/VolumeDriver.Create",
            &json!({"Name": "badsize", "Opts": {"size": size}}),
        );
        assert!(
            err.to_lowercase().contains("size"),
            "size {size:?}: the error should mention the size: {err:?}"
        );
    }

    // Bad values of known options.
    for (k, v, needle) in [
        ("repl", "7", "repl"),
        ("fs", "ntfs", "ntfs"),
        ("block_size", "3", "block_size"),
        ("block_size", "2048", "block_size"),
        ("block_size", "2", "block_size"),
        ("sticky", "maybe", "sticky"),
        ("label", "novalue", "label"),
    ] {
        let err = d.err(
            "/VolumeDriver.Create",
            &json!({"Name": "badopt", "Opts": {k: v}}),
        );
        assert!(
            err.contains(needle),
            "{k}={v}: the error should mention {needle:?}: {err:?}"
        );
    }
    // xfs needs at least 300 MiB.
    let err = d.err(
        "/VolumeDriver.Create",
        &json!({"Name": "tinyxfs", "Opts": {"fs": "xfs", "size": "64M"}}),
    );
    assert!(err.contains("xfs"), "small xfs: {err:?}");

    // Unknown option: refused, naming it and listing the valid ones.
    let err = d.err(
        "/VolumeDriver.Create",
        &json!({"Name": "unknownopt", "Opts": {"colour": "blue"}}),
    );
    assert!(err.contains("colour"), "unknown option: {err:?}");
    for valid in ["size", "fs", "fsopts", "block_size", "sticky", "label"] {
        assert!(
            err.contains(valid),
            "unknown option error should list {valid:?}: {err:?}"
        );
    }

    // Options this node can't honour: never silently ignored.
    // (option, value, what the error must name, what it must say)
    for (k, v, needle, says) in [
        ("repl", "2", "repl", "need a cluster"),
        ("replicas", "3", "repl", "need a cluster"),
        ("nodes", "n1", "nodes", "need a cluster"),
        ("hosts", "n1,n2", "nodes", "at most repl"),
        ("shared", "maybe", "shared", "true or false"),
    ] {
        let err = d.err(
            "/VolumeDriver.Create",
            &json!({"Name": "notyet", "Opts": {k: v}}),
        );
        assert!(
            err.contains(says) && err.contains(needle),
            "{k}={v}: expected an error naming {needle} that says {says:?}: {err:?}"
        );
    }

    // Built options with values they refuse, each saying what is accepted.
    for (k, v, needle) in [
        ("secure", "true", "needs a key"),
        ("secret_key", "s3cret", "secure=true"),
        ("io_priority", "urgent", "high, medium or low"),
        ("priority_io", "1", "high, medium or low"),
        ("group", "a/b", "group name"),
        ("fg", "maybe", "true or false"),
        ("parent", "ghost", "no such volume"),
    ] {
        let err = d.err(
            "/VolumeDriver.Create",
            &json!({"Name": "refused", "Opts": {k: v}}),
        );
        assert!(
            err.contains(needle) && !err.contains("s3cret"),
            "{k}={v}: expected an error saying {needle:?}: {err:?}"
        );
    }

    // Snapshot schedules are built and validated: a malformed one is refused,
    // naming the option and teaching the syntax (valid ones are created below).
    for (k, v, needle) in [
        ("snap_schedule", "daily=25:00", "HH:MM"),
        ("snap_schedule", "hourly=5", "periodic=MINUTES[,KEEP]"),
        (
            "snap_schedule",
            "periodic=60;periodic=30",
            "two periodic rules",
        ),
        ("snap_interval", "5m", "0 for off"),
    ] {
        let err = d.err(
            "/VolumeDriver.Create",
            &json!({"Name": "badsnap", "Opts": {k: v}}),
        );
        assert!(
            err.contains(k) && err.contains(needle),
            "{k}={v}: expected a refusal naming {k} and {needle:?}: {err:?}"
        );
    }

    // A Mount without a Name.
    d.err("/VolumeDriver.Mount", &json!({"ID": mount_id("x")}));

    assert_eq!(
        d.list_names(),
        names_before,
        "bad input changed the volume list"
    );
    let new: Vec<_> = d.data_paths().difference(&data_before).cloned().collect();
    assert!(
        new.is_empty(),
        "bad input created files in the data dir: {new:?}"
    );
    assert_eq!(
        d.inspect("good")["size_bytes"],
        64 * MIB,
        "bad input changed an existing volume"
    );

    // The boundary cases that are valid work.
    d.create(&max, &[("size", "64M")]);
    d.create("ok_name.with-chars_9", &[("size", "64M")]);
    d.create(
        "snapsched",
        &[
            ("size", "64M"),
            ("snap_interval", "60"),
            (
                "snap_schedule",
                "daily=12:00,4;weekly=sunday@12:00,2;monthly=15@12:00",
            ),
        ],
    );
    assert!(d.list_names().contains(&max));
    d.remove(&max);
    d.remove("ok_name.with-chars_9");
    d.remove("snapsched");
    assert_no_leftovers(&d, "end of bad input test");
}

#[test]
fn shorthand_name_at_size() {
    let d = Daemon::start(Opts::default());
    d.ok(
        "/VolumeDriver.Create",
        &json!({"Name": "short@2G", "Opts": null}),
    );
    assert_eq!(d.list_names(), ["short"], "name@size must create `name`");
    assert_eq!(d.inspect("short")["size_bytes"], 2 * GIB);
    // dockerd keeps calling the volume by the name it was given.
    let (status, v) = d.get("short@2G");
    assert_eq!(status, 200, "Get short@2G: {v}");
    // What follows '@' must be a size: `short@junk` names nothing, and
    // removing it removes nothing.
    let (status, v) = d.get("short@junk");
    assert!(status != 200 || v["Err"] != "", "Get short@junk: {v}");
    let err = d.err("/VolumeDriver.Remove", &json!({"Name": "short@junk"}));
    assert!(err.contains("junk"), "{err}");
    assert_eq!(d.list_names(), ["short"]);
    let id = mount_id("short");
    let mp = d.mount("short@2G", &id);
    assert_eq!(mp, d.mountpoint("short"));
    let st = nix::sys::statvfs::statvfs(&mp).expect("statvfs");
    let total = st.blocks() * st.fragment_size();
    assert!(
        (GIB * 17 / 10..=2 * GIB).contains(&total),
        "a 2G ext4 volume reports {total} bytes"
    );
    d.unmount("short@2G", &id);
    d.remove("short@2G");
    assert_eq!(d.list_names(), Vec::<String>::new());
}

#[test]
fn thin_allocation() {
    thin(Opts::default());
}

#[test]
fn thin_allocation_engine_path() {
    thin(Opts::engine_path());
}

fn thin(opts: Opts) {
    // This kernel has FUSE passthrough: a volume that asks for it gets it
    // unless the daemon turns it off.
    let want_path = if opts.passthrough == "off" {
        "engine"
    } else {
        "passthrough"
    };
    let d = Daemon::start(opts);
    let base = d.data_allocated();
    d.create("thin", &[("size", "10G"), ("passthrough", "true")]);
    let id = mount_id("thin");
    let mp = d.mount("thin", &id);
    assert_eq!(
        d.inspect("thin")["io_path"],
        want_path,
        "which path serves IO\n{}",
        d.log_tail()
    );
    let st = nix::sys::statvfs::statvfs(&mp).expect("statvfs");
    assert!(
        st.blocks() * st.fragment_size() > 9 * GIB,
        "10G volume is not 10G"
    );
    write_durably(&mp.join("five"), &pattern(5 * MIB as usize, 3));
    let used = d.data_allocated() - base;
    assert!(
        used < 64 * MIB,
        "10G volume with 5 MiB written allocates {} MiB under the data dir (limit 64)",
        used / MIB
    );
    d.unmount("thin", &id);
    let used = d.data_allocated() - base;
    assert!(
        used < 64 * MIB,
        "after unmount the 10G volume allocates {} MiB under the data dir (limit 64)",
        used / MIB
    );
    assert!(
        used >= 5 * MIB,
        "only {} KiB allocated for 5 MiB of fsynced data: where is it?",
        used >> 10
    );
    let v = d.inspect("thin");
    let alloc = v["allocated_bytes"].as_u64().expect("allocated_bytes");
    assert!(
        (5 * MIB..64 * MIB).contains(&alloc),
        "inspect allocated_bytes {alloc} for a 10G volume with 5 MiB written"
    );
    d.remove("thin");
    assert!(
        d.data_allocated() - base < MIB,
        "Remove left {} KiB allocated",
        (d.data_allocated() - base) >> 10
    );
}

#[test]
fn xfs_volume_mounts() {
    let d = Daemon::start(Opts::default());
    d.create("x", &[("size", "512M"), ("fs", "xfs")]);
    let id = mount_id("x");
    let mp = d.mount("x", &id);
    let m = common::mount_entries()
        .into_iter()
        .find(|m| m.mount_point == d.fs_mount("x"))
        .expect("xfs volume not mounted");
    assert_eq!(m.fs_type, "xfs", "{m:?}");
    assert!(
        common::is_loop_path(&m.source),
        "filesystem should be on a loop device: {m:?}"
    );
    assert_eq!(
        fs::read_dir(&mp).unwrap().count(),
        0,
        "fresh xfs volume not empty"
    );
    write_durably(&mp.join("f"), &pattern(MIB as usize, 4));
    let v = d.inspect("x");
    assert_eq!(v["fs"], "xfs");
    assert_eq!(v["formatted"], true);
    d.unmount("x", &id);
    assert_no_leftovers(&d, "after xfs unmount");
    let mp = d.mount("x", &id);
    assert_eq!(fs::read(mp.join("f")).unwrap(), pattern(MIB as usize, 4));
    d.unmount("x", &id);
    d.remove("x");
    assert_no_leftovers(&d, "after xfs remove");
}

#[test]
fn ext4_volume_layout_and_default_mount_dir() {
    // No --mount-dir: mounts go under <run-dir>/mounts.
    let mut d = Daemon::start(Opts {
        custom_mount_dir: false,
        ..Opts::default()
    });
    d.create("lay", &[("size", "64M"), ("fsopts", "-L dunnagetest")]);
    let id = mount_id("lay");
    let mp = d.mount("lay", &id);
    assert_eq!(mp, d.run_dir.join("mounts/lay/data"));
    let m = common::mount_entries()
        .into_iter()
        .find(|m| m.mount_point == d.run_dir.join("mounts/lay"))
        .expect("volume filesystem not at <run-dir>/mounts/<vol>");
    assert_eq!(m.fs_type, "ext4", "{m:?}");
    assert!(common::is_loop_path(&m.source), "{m:?}");
    // The loop device is backed by the FUSE-served image, with direct IO.
    let (dev, backing) = common::loop_devices()
        .into_iter()
        .find(|(dev, _)| *dev == m.source)
        .expect("mounted loop device not found in /sys/block");
    assert_eq!(backing, d.run_dir.join("fuse/lay/image"), "{dev}");
    let sysname = dev.trim_start_matches("/dev/");
    let dio = fs::read_to_string(format!("/sys/block/{sysname}/loop/dio")).unwrap_or_default();
    assert_eq!(dio.trim(), "1", "{dev} should use direct IO");
    // fsopts reached mkfs.
    let label = common::sh("blkid", &["-p", "-o", "value", "-s", "LABEL", &m.source]);
    assert_eq!(
        label.trim(),
        "dunnagetest",
        "fsopts -L was not passed to mkfs"
    );
    let v = d.inspect("lay");
    assert_eq!(v["state"], "mounted", "{v}");
    assert_eq!(v["device"], m.source.as_str(), "{v}");
    assert_eq!(v["mountpoint"], mp.display().to_string(), "{v}");
    assert_eq!(v["formatted"], true, "{v}");
    d.unmount("lay", &id);
    assert_no_leftovers(&d, "after unmount");
    d.remove("lay");
    d.sigterm_and_wait();
    assert_no_leftovers_stopped(&d, "after SIGTERM");
}

#[test]
fn concurrent_create_remove_one_name() {
    let d = Arc::new(Daemon::start(Opts::default()));
    let before = d.data_baseline();
    let threads = 4;
    let rounds = 8;
    let barrier = Arc::new(Barrier::new(threads));
    let created = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let d = Arc::clone(&d);
            let barrier = Arc::clone(&barrier);
            let created = Arc::clone(&created);
            thread::spawn(move || {
                barrier.wait();
                for r in 0..rounds {
                    let (ep, body) = if (t + r) % 2 == 0 {
                        (
                            "/VolumeDriver.Create",
                            json!({"Name": "race", "Opts": {"size": "64M"}}),
                        )
                    } else {
                        ("/VolumeDriver.Remove", json!({"Name": "race"}))
                    };
                    let (status, v) = d.call(ep, &body);
                    if status == 200 {
                        common::assert_no_err(ep, &v);
                        if ep.ends_with("Create") {
                            created.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        }
                    } else {
                        // Remove of a missing volume fails (and a Create racing a Remove
                        // may be refused); either way it must be a clean error.
                        expect_err(ep, status, &v);
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("worker panicked");
    }
    assert!(
        created.load(std::sync::atomic::Ordering::SeqCst) > 0,
        "no Create succeeded at all"
    );

    let listed = d.list_names().contains(&"race".to_string());
    let (status, v) = d.get("race");
    assert_eq!(
        listed,
        status == 200,
        "List ({listed}) and Get ({status} {v}) disagree after concurrent create/remove"
    );
    let cli_ls = d.cli_ok(&["volume", "ls", "--json"]);
    let cli: Value = serde_json::from_str(&cli_ls).expect("ls --json");
    let in_cli = cli
        .as_array()
        .expect("ls --json array")
        .iter()
        .any(|v| v["name"] == "race");
    assert_eq!(listed, in_cli, "plugin List and CLI ls disagree");
    if listed {
        // It must be a whole volume: mountable and removable.
        let id = mount_id("race");
        let mp = d.mount("race", &id);
        write_durably(&mp.join("ok"), b"ok");
        d.unmount("race", &id);
        d.remove("race");
    }
    assert!(!d.list_names().contains(&"race".to_string()));
    d.assert_no_new_data(&before, &["race"], "after concurrent create/remove");
    assert_no_leftovers(&d, "after concurrent create/remove");
}

#[test]
fn stale_socket_replaced_live_socket_refused() {
    common::require_host();
    let plugins = tempfile::tempdir().unwrap();
    let name = common::unique("dunnage-sock");
    common::make_stale_socket(&plugins.path().join(format!("{name}.sock")));

    // A stale socket file is replaced.
    let first = Daemon::start(Opts {
        plugin_dir: Some(plugins.path().to_path_buf()),
        name: Some(name.clone()),
        ..Opts::default()
    });
    first.create("mine", &[("size", "64M")]);

    // A live one is not: the second daemon exits non-zero with a clear error.
    let mut second = Daemon::spawn_only(Opts {
        plugin_dir: Some(plugins.path().to_path_buf()),
        name: Some(name.clone()),
        ..Opts::default()
    });
    let status = second.wait_exit(Duration::from_secs(30));
    assert!(
        !status.success(),
        "second daemon on a live socket exited {status}\n{}",
        second.log_tail()
    );
    let log = second.log();
    let sock = first.socket().display().to_string();
    assert!(
        log.contains(&sock) || log.contains("already"),
        "second daemon's error should name the socket {sock} in use: {log}"
    );
    // The first daemon keeps its socket and keeps serving.
    assert!(
        Path::new(&sock).exists(),
        "second daemon removed the live socket"
    );
    assert_eq!(first.list_names(), ["mine"]);
}

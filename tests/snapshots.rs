//! Snapshots, restore and clones (`parent=`) through the CLI, the plugin
//! socket and dockerd: copy-on-write, no data copied, clones that diverge
//! both ways, and a clone of a volume mounted under fio load that is
//! fsck-clean and holds every file synced before it was taken.

mod common;

use common::{
    docker_ok, mount_id, pattern, require_docker, unique, write_durably, Daemon, DockerGuard, Opts,
    TEST_IMAGE,
};
use serde_json::{json, Value};
use std::fs;
use std::process::{Command, Stdio};

fn assert_clean(d: &Daemon, context: &str) {
    let l = d.leftovers_running();
    assert!(l.is_empty(), "{context}: leftovers {l:?}\n{}", d.log_tail());
}

fn volume_names(d: &Daemon) -> Vec<String> {
    let list: Value = serde_json::from_str(&d.cli_ok(&["volume", "ls", "--json"])).unwrap();
    let list = list.as_array().expect("volume ls --json is an array");
    list.iter()
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect()
}

fn write_file(d: &Daemon, vol: &str, file: &str, data: &[u8]) {
    let id = mount_id(&format!("w-{vol}-{file}"));
    let mp = d.mount(vol, &id);
    write_durably(&mp.join(file), data);
    d.unmount(vol, &id);
}

fn read_file(d: &Daemon, vol: &str, file: &str) -> Option<Vec<u8>> {
    let id = mount_id(&format!("r-{vol}-{file}"));
    let mp = d.mount(vol, &id);
    let got = fs::read(mp.join(file)).ok();
    d.unmount(vol, &id);
    got
}

#[test]
fn snapshot_restore_and_delete_through_the_cli() {
    let d = Daemon::start(Opts::default());
    d.create("v", &[("size", "128M")]);
    let old = pattern(3 << 20, 1);
    write_file(&d, "v", "a", &old);
    let before = d.data_allocated();
    assert_eq!(d.cli_ok(&["snapshot", "create", "v", "s1"]).trim(), "s1");
    // Metadata only: the snapshot copies no data.
    let grown = d.data_allocated().saturating_sub(before);
    assert!(
        grown < 1 << 20,
        "taking a snapshot grew the data by {grown} bytes"
    );

    write_file(&d, "v", "a", &pattern(3 << 20, 2));
    write_file(&d, "v", "c", b"after the snapshot");
    let list: Value = serde_json::from_str(&d.cli_ok(&["snapshot", "ls", "v", "--json"])).unwrap();
    assert_eq!(list[0]["name"], "s1", "{list}");
    assert!(
        list[0]["exclusive_bytes"].as_u64().unwrap() > 0,
        "overwritten blocks belong to s1 alone: {list}"
    );
    let table = d.cli_ok(&["snapshot", "ls", "v"]);
    assert!(table.contains("NAME") && table.contains("s1"), "{table}");
    // The old file's blocks are held by the snapshot: still shared with the
    // volume, or the snapshot's alone where the volume moved on.
    let space = &d.inspect("v")["space"];
    let held = space["shared_bytes"].as_u64().unwrap() + space["snapshot_bytes"].as_u64().unwrap();
    assert!(held >= 3 << 20, "{space}");
    assert_eq!(space["snapshots"], 1, "{space}");

    // Restore refused while mounted, then done.
    let id = mount_id("held");
    d.mount("v", &id);
    let err = d.cli_err(&["volume", "restore", "v", "s1"]);
    assert!(err.contains("in use") && err.contains("v"), "{err}");
    d.unmount("v", &id);
    d.cli_ok(&["volume", "restore", "v", "s1"]);
    assert!(
        read_file(&d, "v", "a").unwrap() == old,
        "restore did not bring back the old data"
    );
    assert_eq!(
        read_file(&d, "v", "c"),
        None,
        "a file written after the snapshot survived restore"
    );

    let err = d.cli_err(&["snapshot", "rm", "v", "nope"]);
    assert!(err.contains("nope"), "{err}");
    d.cli_ok(&["snapshot", "rm", "v", "s1"]);
    let list: Value = serde_json::from_str(&d.cli_ok(&["snapshot", "ls", "v", "--json"])).unwrap();
    assert_eq!(list, json!([]));
    d.remove("v");
    assert_clean(&d, "after remove");
}

#[test]
fn clone_and_parent_diverge_both_ways() {
    let d = Daemon::start(Opts::default());
    d.create("src", &[("size", "64M")]);
    write_file(&d, "src", "x", b"old content");
    d.create("cln", &[("parent", "src")]);
    let info = d.inspect("cln");
    assert_eq!(info["size_bytes"], 64 << 20, "{info}");
    assert_eq!(info["options"]["parent"], "src", "{info}");
    write_file(&d, "src", "x", b"new content");
    write_file(&d, "cln", "z", b"clone only");
    assert_eq!(read_file(&d, "cln", "x").unwrap(), b"old content");
    assert_eq!(read_file(&d, "src", "x").unwrap(), b"new content");
    assert_eq!(read_file(&d, "src", "z"), None);

    let err = d.err(
        "/VolumeDriver.Create",
        &json!({"Name": "bad", "Opts": {"parent": "src", "size": "1G"}}),
    );
    assert!(err.contains("parent's size"), "{err}");
    let err = d.err(
        "/VolumeDriver.Create",
        &json!({"Name": "bad", "Opts": {"parent": "ghost"}}),
    );
    assert!(
        err.contains("ghost") && err.contains("no such volume"),
        "{err}"
    );
    let err = d.err("/VolumeDriver.Remove", &json!({"Name": "src"}));
    assert!(err.contains("clones (cln)"), "{err}");
    d.remove("cln");
    // The clone's base snapshot went with it.
    let list: Value =
        serde_json::from_str(&d.cli_ok(&["snapshot", "ls", "src", "--json"])).unwrap();
    assert_eq!(list, json!([]), "the clone's base snapshot was left behind");
    d.remove("src");
    assert_clean(&d, "after removing both");
}

/// A clone made while its parent is removed or resized (two requests at
/// once on the plugin socket and the CLI): never a clone over a deleted
/// parent, never a clone recorded at a size its device does not have.
/// The races are real (no hook slows either side); each round asserts the
/// outcome whichever request won.
#[test]
fn a_clone_races_with_the_removal_and_the_resize_of_its_parent() {
    let d = Daemon::start(Opts::default());
    let (mut clones, mut removes) = (0, 0);
    for i in 0..12 {
        let (p, c) = (format!("rp{i}"), format!("rc{i}"));
        d.create(&p, &[("size", "32M"), ("fs", "none")]);
        let clone_body = json!({"Name": c, "Opts": {"parent": p}});
        let resize = i % 2 == 1;
        let (cloned, other) = std::thread::scope(|s| {
            let cloning = s.spawn(|| d.call("/VolumeDriver.Create", &clone_body));
            let other = if resize {
                let out = d.cli(&["volume", "resize", &p, "64M"]);
                (
                    out.status.success(),
                    format!("{}{}", out.stdout, out.stderr),
                )
            } else {
                let (status, v) = d.call("/VolumeDriver.Remove", &json!({"Name": p}));
                (status == 200 && v["Err"] == "", v.to_string())
            };
            (cloning.join().expect("clone thread"), other)
        });
        let clone_ok = cloned.0 == 200 && cloned.1["Err"] == "";
        let names = volume_names(&d);
        if !clone_ok {
            let err = cloned.1["Err"].as_str().unwrap_or_default().to_string();
            assert!(
                !names.contains(&c),
                "round {i}: refused clone {c} is listed: {err}"
            );
            assert!(
                err.contains("being removed")
                    || err.contains("being resized")
                    || err.contains("no such volume"),
                "round {i}: the clone's error says why: {err}"
            );
        }
        if resize {
            // Both may succeed, one after the other; the clone's record
            // and its device must agree either way.
            if clone_ok {
                clones += 1;
                let info = d.inspect(&c);
                let dev = d.cli_ok(&["attach", &c]);
                let bytes = Command::new("blockdev")
                    .args(["--getsize64", dev.trim()])
                    .output()
                    .expect("blockdev");
                let bytes: u64 = String::from_utf8_lossy(&bytes.stdout)
                    .trim()
                    .parse()
                    .unwrap();
                d.cli_ok(&["detach", &c]);
                assert_eq!(info["size_bytes"], bytes, "round {i}: {info}");
            }
            if !other.0 {
                assert!(
                    other.1.contains("a clone of it is being made"),
                    "round {i}: {}",
                    other.1
                );
            }
        } else {
            assert!(
                !(clone_ok && other.0),
                "round {i}: both the clone and the removal of its parent succeeded: {}",
                d.log_tail()
            );
            if clone_ok {
                clones += 1;
                assert!(
                    names.contains(&p),
                    "round {i}: clone {c} made but parent {p} gone"
                );
                assert!(
                    other.1.contains("a clone of it is being made") || other.1.contains("clones ("),
                    "round {i}: the removal's error says why: {}",
                    other.1
                );
                // The clone is whole: its image opens.
                let dev = d.cli_ok(&["attach", &c]);
                assert!(dev.trim().starts_with("/dev/"), "{dev}");
                d.cli_ok(&["detach", &c]);
            } else {
                removes += 1;
                assert!(
                    !names.contains(&p),
                    "round {i}: {p} was removed but is listed"
                );
            }
        }
        for v in [&c, &p] {
            if volume_names(&d).contains(v) {
                d.remove(v);
            }
        }
    }
    eprintln!("clones made: {clones}, parents removed first: {removes}");
    assert_clean(&d, "after the races");
}

/// `parent=SRC@SNAP` clones one of SRC's snapshots, not its state now
/// (RBD's clone of a snapshot, LINSTOR's restore into a new resource): no
/// snapshot is taken for it, SNAP cannot be deleted while the clone uses
/// it, and removing the clone leaves SNAP.
#[test]
fn a_clone_of_one_of_the_parents_snapshots() {
    let d = Daemon::start(Opts::default());
    d.create("base", &[("size", "64M")]);
    write_file(&d, "base", "x", b"monday");
    d.cli_ok(&["snapshot", "create", "base", "mon"]);
    write_file(&d, "base", "x", b"tuesday");
    d.cli_ok(&["snapshot", "create", "base", "tue"]);
    // Mounted and written meanwhile: the clone does not care.
    let id = mount_id("base-held");
    let mp = d.mount("base", &id);
    write_durably(&mp.join("x"), b"wednesday");

    d.create("frommon", &[("parent", "base@mon")]);
    assert_eq!(read_file(&d, "frommon", "x").unwrap(), b"monday");
    d.create("fromtue", &[("parent", "base@tue")]);
    assert_eq!(read_file(&d, "fromtue", "x").unwrap(), b"tuesday");
    let snaps = |vol: &str| -> Vec<String> {
        let list: Value =
            serde_json::from_str(&d.cli_ok(&["snapshot", "ls", vol, "--json"])).unwrap();
        list.as_array()
            .unwrap()
            .iter()
            .map(|s| s["name"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(snaps("base"), ["mon", "tue"], "no snapshot taken for them");
    write_file(&d, "frommon", "x", b"changed in the clone");
    assert_eq!(fs::read(mp.join("x")).unwrap(), b"wednesday");
    d.unmount("base", &id);

    let err = d.cli_err(&["snapshot", "rm", "base", "mon"]);
    assert!(err.contains("clones (frommon)"), "{err}");
    let err = d.err(
        "/VolumeDriver.Create",
        &json!({"Name": "bad", "Opts": {"parent": "base@sun"}}),
    );
    assert!(
        err.contains("no snapshot sun") && err.contains("mon, tue"),
        "{err}"
    );
    let err = d.err(
        "/VolumeDriver.Create",
        &json!({"Name": "bad", "Opts": {"parent": "base@"}}),
    );
    assert!(err.contains("names a snapshot of SRC"), "{err}");

    d.remove("frommon");
    assert_eq!(snaps("base"), ["mon", "tue"], "SNAP stays with its volume");
    d.cli_ok(&["snapshot", "rm", "base", "mon"]);
    assert_eq!(read_file(&d, "fromtue", "x").unwrap(), b"tuesday");
    d.remove("fromtue");
    d.cli_ok(&["snapshot", "rm", "base", "tue"]);
    d.remove("base");
    assert_clean(&d, "after removing all");
}

#[test]
fn clone_of_a_volume_mounted_under_fio_load() {
    common::require_tools(&["fio", "e2fsck"]);
    // Engine path: every write goes through the engine, which the snapshot
    // stops for its instant.
    let d = Daemon::start(Opts::engine_path());
    d.create("busy", &[("size", "256M")]);
    let id = mount_id("busy");
    let mp = d.mount("busy", &id);
    let synced: Vec<(String, Vec<u8>)> = (0..8)
        .map(|i| (format!("synced{i}"), pattern(256 << 10, 100 + i)))
        .collect();
    for (name, data) in &synced {
        write_durably(&mp.join(name), data);
    }
    let mut fio = Command::new("fio")
        .args([
            "--name=load",
            &format!("--directory={}", mp.display()),
            "--rw=randwrite",
            "--bs=4k",
            "--size=32M",
            "--ioengine=libaio",
            "--iodepth=16",
            "--direct=1",
            "--time_based",
            "--runtime=30",
            "--fsync=64",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait until fio's file has data in it, so the clone is taken mid-load.
    let load = mp.join("load.0.0");
    while fs::metadata(&load).map(|m| m.len()).unwrap_or(0) == 0 {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    d.create("snapclone", &[("parent", "busy")]);
    assert!(
        fio.try_wait().unwrap().is_none(),
        "fio was not running when the clone was taken"
    );
    // SIGTERM, not SIGKILL: fio then stops its job process too (a killed
    // fio leaves it behind, asleep).
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(fio.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = fio.wait();
    d.unmount("busy", &id);

    // Mounting replays the journal; then every synced file is there.
    let cid = mount_id("snapclone");
    let cmp = d.mount("snapclone", &cid);
    for (name, data) in &synced {
        assert!(
            fs::read(cmp.join(name)).unwrap() == *data,
            "{name} differs in the clone"
        );
    }
    d.unmount("snapclone", &cid);
    let dev = d.cli_ok(&["attach", "snapclone"]).trim().to_string();
    let out = Command::new("e2fsck").args(["-fn", &dev]).output().unwrap();
    assert!(
        out.status.success(),
        "the clone is not fsck-clean:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    d.cli_ok(&["detach", "snapclone"]);
    d.remove("snapclone");
    d.remove("busy");
    assert_clean(&d, "after removing both");
}

#[test]
fn clone_through_dockerd() {
    require_docker();
    let d = Daemon::start(Opts {
        plugin_dir: Some("/run/docker/plugins".into()),
        ..Opts::default()
    });
    let src = unique("dsrc");
    let cln = unique("dcln");
    let guard = DockerGuard::volumes(&[&cln, &src]);
    docker_ok(&["volume", "create", "-d", &d.name, "-o", "size=64M", &src]);
    let c1 = unique("c");
    docker_ok(&[
        "run",
        "--rm",
        "--name",
        &c1,
        "-v",
        &format!("{src}:/data"),
        TEST_IMAGE,
        "sh",
        "-c",
        "echo before > /data/f; sync",
    ]);
    docker_ok(&[
        "volume",
        "create",
        "-d",
        &d.name,
        "-o",
        &format!("parent={src}"),
        &cln,
    ]);
    let c2 = unique("c");
    docker_ok(&[
        "run",
        "--rm",
        "--name",
        &c2,
        "-v",
        &format!("{src}:/data"),
        TEST_IMAGE,
        "sh",
        "-c",
        "echo after > /data/f; sync",
    ]);
    let c3 = unique("c");
    let out = docker_ok(&[
        "run",
        "--rm",
        "--name",
        &c3,
        "-v",
        &format!("{cln}:/data"),
        TEST_IMAGE,
        "cat",
        "/data/f",
    ]);
    assert_eq!(out.trim(), "before");
    docker_ok(&["volume", "rm", &cln]);
    docker_ok(&["volume", "rm", &src]);
    guard.done();
}

#[test]
fn only_volumes_that_ask_for_passthrough_get_it() {
    // Passthrough hands IO to the kernel, which writes the data file in
    // place: a snapshot of such a volume while attached can't be consistent.
    // Every other volume (default) snapshots and clones while in use.
    let d = Daemon::start(Opts::default());
    d.create("plain", &[("size", "64M")]);
    d.create("fast", &[("size", "64M"), ("passthrough", "true")]);
    let (a, b) = (mount_id("plain"), mount_id("fast"));
    d.mount("plain", &a);
    d.mount("fast", &b);
    assert_eq!(d.inspect("plain")["io_path"], "engine");
    assert_eq!(d.inspect("fast")["io_path"], "passthrough");
    d.cli_ok(&["snapshot", "create", "plain", "manual"]);
    let err = d.cli_err(&["snapshot", "create", "fast", "manual"]);
    assert!(
        err.contains("passthrough") && err.contains("fast") && err.contains("volume update"),
        "{err}"
    );
    // Schedules and passthrough exclude each other at create.
    let err = d.cli_err(&[
        "volume",
        "create",
        "both",
        "-o",
        "passthrough=true",
        "-o",
        "snap_schedule=periodic=60,2",
    ]);
    assert!(err.contains("scheduled"), "{err}");
    d.unmount("plain", &a);
    d.unmount("fast", &b);
    // Turned off, it takes effect at the next attach.
    d.cli_ok(&["volume", "update", "fast", "-o", "passthrough=false"]);
    d.mount("fast", &b);
    let info = d.inspect("fast");
    assert_eq!(info["io_path"], "engine");
    assert_eq!(
        info["options"]["passthrough"], "false",
        "inspect shows the value now: {info}"
    );
    d.cli_ok(&["snapshot", "create", "fast", "manual"]);
    d.unmount("fast", &b);
    d.cli_ok(&["snapshot", "rm", "plain", "manual"]);
    d.cli_ok(&["snapshot", "rm", "fast", "manual"]);
    d.remove("plain");
    d.remove("fast");
    assert_eq!(d.list_names(), Vec::<String>::new());
}

#[test]
fn a_volume_with_a_schedule_stays_on_the_engine_path() {
    let d = Daemon::start(Opts::default());
    d.create(
        "sched",
        &[("size", "64M"), ("snap_schedule", "periodic=60,2")],
    );
    let a = mount_id("sched");
    d.mount("sched", &a);
    assert_eq!(d.inspect("sched")["io_path"], "engine");
    d.cli_ok(&["snapshot", "create", "sched", "manual"]);
    d.unmount("sched", &a);
    d.cli_ok(&["snapshot", "rm", "sched", "manual"]);
    d.remove("sched");
}

/// `snapshot export` and `volume import` between two daemons (two
/// machines): a whole snapshot makes a new volume (formatted already,
/// under another key: the stream is plaintext), streams of changes bring
/// it forward (from a file, and piped from one CLI into the other), and
/// what would not apply, or a damaged or cut stream, is refused and
/// leaves nothing behind.
#[test]
fn snapshots_export_whole_and_as_changes_and_import_on_another_node() {
    let d1 = Daemon::start(Opts::default());
    let d2 = Daemon::start(Opts::default());
    let tmp = tempfile::tempdir().unwrap();
    let f = |n: &str| tmp.path().join(n).to_str().unwrap().to_string();
    d1.create(
        "src",
        &[("size", "64M"), ("secure", "true"), ("secret_key", "k-one")],
    );
    let (a1, a2, b, c) = (
        pattern(300_000, 1),
        pattern(200_000, 2),
        pattern(1 << 20, 3),
        pattern(5000, 4),
    );
    write_file(&d1, "src", "a", &a1);
    d1.cli_ok(&["snapshot", "create", "src", "s1"]);
    write_file(&d1, "src", "a", &a2);
    write_file(&d1, "src", "b", &b);
    d1.cli_ok(&["snapshot", "create", "src", "s2"]);
    write_file(&d1, "src", "c", &c);
    d1.cli_ok(&["snapshot", "create", "src", "s3"]);
    // The FIFO of a CLI killed mid-stream (no such pid), and one of a
    // live process: the next export removes the first only.
    let streams = d1.run_dir.join("streams");
    let (dead, live) = (
        streams.join("4194305-0123456789abcdef"),
        streams.join(format!("{}-0123456789abcdef", std::process::id())),
    );
    for dir in [&dead, &live] {
        fs::create_dir_all(dir).unwrap();
        fs::write(dir.join("stream"), b"").unwrap();
    }
    d1.cli_ok(&["snapshot", "export", "src", "s1", "-o", &f("s1")]);
    assert!(!dead.exists(), "a dead CLI's stream directory is left");
    assert!(
        live.join("stream").exists(),
        "a live process's stream was removed"
    );
    fs::remove_dir_all(&live).unwrap();
    d1.cli_ok(&[
        "snapshot",
        "export",
        "src",
        "s2",
        "--since",
        "s1",
        "-o",
        &f("s2"),
    ]);
    let err = d1.cli_err(&[
        "snapshot",
        "export",
        "src",
        "s2",
        "--since",
        "nope",
        "-o",
        &f("x"),
    ]);
    assert!(err.contains("nope"), "{err}");
    assert!(
        !tmp.path().join("x").exists(),
        "a failed export left its file"
    );
    // The changes since s1 are a fraction of the whole.
    let (whole, delta) = (
        fs::metadata(f("s1")).unwrap().len(),
        fs::metadata(f("s2")).unwrap().len(),
    );
    assert!(delta < whole + (2 << 20), "{whole} {delta}");

    let said = d2.cli_ok(&[
        "volume",
        "import",
        "dst",
        "-i",
        &f("s1"),
        "-o",
        "secure=true",
        "-o",
        "secret_key=k-two",
    ]);
    assert!(said.is_empty(), "the summary goes to stderr: {said}");
    let info = d2.inspect("dst");
    assert_eq!(info["size_bytes"], 64 << 20, "{info}");
    assert_eq!(info["encrypted"], true, "{info}");
    assert_eq!(read_file(&d2, "dst", "a").as_deref(), Some(&a1[..]));
    assert_eq!(read_file(&d2, "dst", "b"), None);
    d2.cli_ok(&["volume", "import", "dst", "-i", &f("s2")]);
    assert_eq!(read_file(&d2, "dst", "a").as_deref(), Some(&a2[..]));
    assert_eq!(read_file(&d2, "dst", "b").as_deref(), Some(&b[..]));
    assert_eq!(read_file(&d2, "dst", "c"), None);

    // What would not apply is refused, and changes nothing.
    let err = d2.cli_err(&["volume", "import", "dst", "-i", &f("s2")]);
    assert!(err.contains("has a snapshot s2 already"), "{err}");
    let err = d2.cli_err(&["volume", "import", "other", "-i", &f("s2")]);
    assert!(
        err.contains("no such volume: other") && err.contains("import the whole snapshot first"),
        "{err}"
    );
    let err = d2.cli_err(&["volume", "import", "dst", "-i", &f("s1")]);
    assert!(err.contains("volume dst exists"), "{err}");
    let mut bytes = fs::read(f("s1")).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    fs::write(f("damaged"), &bytes).unwrap();
    let err = d2.cli_err(&["volume", "import", "broken", "-i", &f("damaged")]);
    assert!(err.contains("damaged"), "{err}");
    fs::write(f("cut"), &fs::read(f("s1")).unwrap()[..mid]).unwrap();
    let err = d2.cli_err(&["volume", "import", "cut", "-i", &f("cut")]);
    assert!(err.contains("ends early"), "{err}");
    let names = d2.list_names();
    assert!(
        !names.iter().any(|n| n == "broken" || n == "cut"),
        "{names:?}"
    );
    let dev = d2.cli_ok(&["attach", "dst"]);
    d1.cli_ok(&[
        "snapshot",
        "export",
        "src",
        "s3",
        "--since",
        "s2",
        "-o",
        &f("s3"),
    ]);
    let err = d2.cli_err(&["volume", "import", "dst", "-i", &f("s3")]);
    assert!(err.contains("in use"), "{err}: {dev}");
    d2.cli_ok(&["detach", "dst"]);

    // Piped from one node's CLI into the other's.
    let piped = Command::new("sh")
        .args([
            "-c",
            &format!(
                "{bin} --run-dir {r1} snapshot export src s3 --since s2 | {bin} --run-dir {r2} volume import dst",
                bin = common::BIN,
                r1 = d1.run_dir.display(),
                r2 = d2.run_dir.display()
            ),
        ])
        .output()
        .expect("sh");
    assert!(piped.status.success(), "{piped:?}");
    let said = String::from_utf8_lossy(&piped.stderr);
    assert!(
        said.contains("exported src@s3 since s2") && said.contains("imported dst@s3 since s2"),
        "{said}"
    );
    assert_eq!(read_file(&d2, "dst", "c").as_deref(), Some(&c[..]));
    let snaps = d2.cli_ok(&["snapshot", "ls", "dst"]);
    assert!(
        ["s1", "s2", "s3"].iter().all(|s| snaps.contains(s)),
        "{snaps}"
    );

    // An export runs beside the volume's other requests: with the stream
    // unread (so the export cannot end), the volume mounts and unmounts,
    // and refuses removal.
    let exports = |d: &Daemon| d.log().matches("exporting").count();
    let before = exports(&d1);
    let mut held = Command::new(common::BIN)
        .args(["--run-dir", &d1.run_dir.display().to_string()])
        .args(["snapshot", "export", "src", "s3"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the export");
    let started = std::time::Instant::now();
    while exports(&d1) == before {
        assert!(
            started.elapsed().as_secs() < 60,
            "the export never started\n{}",
            d1.log_tail()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    write_file(&d1, "src", "d", &c);
    assert!(
        held.try_wait().unwrap().is_none(),
        "the export ended with its stream unread"
    );
    let err = d1.cli_err(&["volume", "rm", "src"]);
    assert!(
        err.contains("an export of one of its snapshots is running"),
        "{err}"
    );
    let mut stream = Vec::new();
    std::io::Read::read_to_end(held.stdout.as_mut().unwrap(), &mut stream).unwrap();
    let out = held.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(
        stream.starts_with(b"DNSTREAM") && stream.len() > 1 << 20,
        "{}",
        stream.len()
    );

    for d in [&d1, &d2] {
        let streams = d.run_dir.join("streams");
        let left: Vec<_> = fs::read_dir(&streams)
            .map(|r| r.flatten().collect())
            .unwrap_or_default();
        assert!(
            left.is_empty(),
            "FIFOs left in {}: {left:?}",
            streams.display()
        );
    }
    d2.remove("dst");
    d1.remove("src");
    assert_clean(&d1, "after the exports");
    assert_clean(&d2, "after the imports");
}

/// `snapshot group`: one instant across volumes (a database's data and log
/// volumes). A writer stamps block 0 of g0, then, once that write is
/// acknowledged, block 0 of g1, and so on to g5, over and over: in every
/// group of snapshots no volume is ahead of one written before it, and the
/// first is at most one round ahead of the last, as if all were one disk.
/// Taken one after the other, the later ones run ahead (checked by hand:
/// with a delay between the volumes' takes and no pause, this fails). All
/// or nothing: a group that cannot be taken whole leaves no snapshot.
#[test]
fn a_group_snapshot_is_one_instant_across_volumes() {
    use common::cluster::BlockDev;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    const VOLS: usize = 6;
    let d = Daemon::start(Opts::default());
    let vols: Vec<String> = (0..VOLS).map(|i| format!("g{i}")).collect();
    for v in &vols {
        d.create(v, &[("size", "64M"), ("fs", "none"), ("label", "app=db")]);
    }
    let devs: Vec<String> = vols
        .iter()
        .map(|v| d.cli_ok(&["attach", v]).trim().to_string())
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, devs) = (stop.clone(), devs.clone());
        std::thread::spawn(move || {
            let devs: Vec<BlockDev> = devs.iter().map(|p| BlockDev::open(p)).collect();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let mut blk = vec![0u8; 4096];
                blk[..8].copy_from_slice(&n.to_le_bytes());
                for dev in &devs {
                    dev.write_at(0, &blk).expect("write");
                    dev.sync().expect("sync");
                }
            }
            n
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(300));
    let rounds = 6;
    for r in 0..rounds {
        let out = d.cli_ok(&["snapshot", "group", &format!("s{r}"), "--label", "app=db"]);
        let want: String = vols.iter().map(|v| format!("{v} s{r}\n")).collect();
        assert_eq!(out, want);
        std::thread::sleep(std::time::Duration::from_millis(30));
    }
    stop.store(true, Ordering::Relaxed);
    let written = writer.join().unwrap();
    assert!(written > 10, "the writer made {written} rounds only");
    for v in &vols {
        d.cli_ok(&["detach", v]);
    }
    let stamp = |vol: &str| -> u64 {
        let dev = d.cli_ok(&["attach", vol]).trim().to_string();
        let blk = BlockDev::open(&dev).read_at(0, 4096).expect("read");
        d.cli_ok(&["detach", vol]);
        u64::from_le_bytes(blk[..8].try_into().unwrap())
    };
    for r in 0..rounds {
        let stamps: Vec<u64> = vols
            .iter()
            .map(|v| {
                let clone = format!("{v}-s{r}");
                d.create(&clone, &[("parent", &format!("{v}@s{r}"))]);
                let s = stamp(&clone);
                d.remove(&clone);
                s
            })
            .collect();
        assert!(
            stamps.windows(2).all(|w| w[0] >= w[1])
                && stamps[0] <= stamps[VOLS - 1] + 1
                && stamps[0] > 0,
            "group s{r}: stamps {stamps:?} are not one instant"
        );
    }
    // g1 has a snapshot "dup" already: the others', taken, are deleted.
    d.cli_ok(&["snapshot", "create", "g1", "dup"]);
    let err = d.cli_err(&["snapshot", "group", "dup", "g0", "g1", "g2"]);
    assert!(err.contains("dup") && err.contains("exists"), "{err}");
    d.cli_ok(&["snapshot", "rm", "g1", "dup"]);
    let err = d.cli_err(&["snapshot", "group", "lone", "g0", "ghost"]);
    assert!(err.contains("ghost"), "{err}");
    let err = d.cli_err(&["snapshot", "group", "none", "--label", "app=nothing"]);
    assert!(err.contains("no volume to snapshot"), "{err}");
    for v in &vols {
        let list: Value =
            serde_json::from_str(&d.cli_ok(&["snapshot", "ls", v, "--json"])).unwrap();
        let names: Vec<&str> = list
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["name"].as_str().unwrap())
            .collect();
        let want: Vec<String> = (0..rounds).map(|r| format!("s{r}")).collect();
        assert_eq!(names, want, "{v}: nothing left by the failed groups");
        for r in 0..rounds {
            d.cli_ok(&["snapshot", "rm", v, &format!("s{r}")]);
        }
        d.remove(v);
    }
    assert_clean(&d, "after the group test");
}

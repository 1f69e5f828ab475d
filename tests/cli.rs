//! The operator's CLI against a running daemon: volume create/ls/inspect/rm, label filters,
//! attach/detach for direct block use, and error reporting.

mod common;

use std::fs;
use std::os::unix::fs::FileTypeExt;

use common::{is_loop_path, is_rfc3339, mount_id, pattern, Daemon, Opts, GIB, MIB};
use serde_json::{json, Value};

/// Checks every field of the JSON form of a volume (inspect, `ls --json` elements).
fn check_volume_json(v: &Value, name: &str) {
    let o = v
        .as_object()
        .unwrap_or_else(|| panic!("volume JSON is not an object: {v}"));
    for k in [
        "name",
        "id",
        "created_at",
        "size_bytes",
        "fs",
        "fsopts",
        "block_size_kib",
        "sticky",
        "labels",
        "formatted",
        "state",
        "device",
        "mountpoint",
        "mounts",
        "allocated_bytes",
    ] {
        assert!(o.contains_key(k), "volume JSON lacks {k:?}: {v}");
    }
    assert_eq!(v["name"], name, "{v}");
    assert!(
        v["id"].as_str().is_some_and(|s| !s.is_empty()),
        "id must be a non-empty string: {v}"
    );
    assert!(
        v["created_at"].as_str().is_some_and(is_rfc3339),
        "created_at must be RFC 3339: {v}"
    );
    assert!(v["size_bytes"].is_u64(), "size_bytes: {v}");
    assert!(v["fs"].is_string(), "fs: {v}");
    assert!(
        v["fsopts"].is_string() || v["fsopts"].is_null(),
        "fsopts: {v}"
    );
    assert!(v["block_size_kib"].is_u64(), "block_size_kib: {v}");
    assert!(v["sticky"].is_boolean(), "sticky: {v}");
    assert!(v["labels"].is_object(), "labels: {v}");
    assert!(v["formatted"].is_boolean(), "formatted: {v}");
    assert!(
        ["detached", "mounted", "attached"].contains(&v["state"].as_str().unwrap_or("")),
        "state: {v}"
    );
    assert!(
        v["device"].is_null() || v["device"].as_str().is_some_and(is_loop_path),
        "device: {v}"
    );
    assert!(
        v["mountpoint"].is_null() || v["mountpoint"].is_string(),
        "mountpoint: {v}"
    );
    assert!(v["mounts"].is_u64(), "mounts: {v}");
    assert!(v["allocated_bytes"].is_u64(), "allocated_bytes: {v}");
}

fn ls_json(d: &Daemon, extra: &[&str]) -> Vec<Value> {
    let mut args = vec!["volume", "ls", "--json"];
    args.extend_from_slice(extra);
    let out = d.cli_ok(&args);
    let v: Value = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("volume ls --json: not JSON ({e}): {out:?}"));
    v.as_array()
        .unwrap_or_else(|| panic!("volume ls --json: not an array: {v}"))
        .clone()
}

/// Splits a human table (plain, or drawn with ASCII/Unicode borders) into its header
/// cells and the first cell of each row.
fn table(text: &str) -> (Vec<String>, Vec<String>) {
    let is_border = |c: char| "|+-=:".contains(c) || ('\u{2500}'..='\u{257F}').contains(&c);
    let is_separator = |c: char| c.is_whitespace() || "|\u{2502}\u{2503}\u{2551}".contains(c);
    let mut lines = text
        .lines()
        .map(|l| {
            l.split(is_separator)
                .filter(|w| !w.is_empty() && !w.chars().all(is_border))
                .map(str::to_string)
                .collect::<Vec<String>>()
        })
        .filter(|cells| !cells.is_empty());
    let header = lines.next().unwrap_or_default();
    let rows = lines.map(|cells| cells[0].clone()).collect();
    (header, rows)
}

fn names(vols: &[Value]) -> Vec<String> {
    let mut n: Vec<String> = vols
        .iter()
        .map(|v| v["name"].as_str().expect("name").to_string())
        .collect();
    n.sort();
    n
}

#[test]
fn volume_create_ls_inspect_rm() {
    let d = Daemon::start(Opts::default());
    let before = d.data_baseline();

    let out = d.cli(&[
        "volume",
        "create",
        "cli1",
        "-o",
        "size=64M",
        "-o",
        "label=env=prod,tier=db",
    ]);
    assert!(out.status.success(), "create: {out:?}\n{}", d.log_tail());

    let v = d.inspect("cli1");
    check_volume_json(&v, "cli1");
    // A single node's status: no cluster part; its volume counted.
    let status: Value = serde_json::from_str(&d.cli_ok(&["status", "--json"])).unwrap();
    assert_eq!(status["node"]["node"], v["node"], "{status}");
    let listed = ls_json(&d, &[]).len();
    assert_eq!(status["volumes"]["total"], listed, "{status}");
    assert!(status.get("nodes").is_none(), "{status}");
    let text = d.cli_ok(&["status"]);
    assert!(
        text.contains(&format!("volumes   {listed}, 0 attached here")),
        "{text}"
    );
    assert_eq!(v["size_bytes"], 64 * MIB, "{v}");
    assert_eq!(v["fs"], "ext4", "default fs: {v}");
    assert_eq!(v["block_size_kib"], 32, "default block size: {v}");
    assert_eq!(v["sticky"], false, "{v}");
    assert_eq!(v["labels"], json!({"env": "prod", "tier": "db"}), "{v}");
    assert_eq!(v["formatted"], false, "never mounted yet: {v}");
    assert_eq!(v["state"], "detached", "{v}");
    assert_eq!(v["device"], Value::Null, "{v}");
    assert_eq!(v["mountpoint"], Value::Null, "{v}");
    assert_eq!(v["mounts"], 0, "{v}");

    // Defaults: 1G, ext4, 32 KiB blocks.
    d.cli_ok(&["volume", "create", "cli2"]);
    let v2 = d.inspect("cli2");
    check_volume_json(&v2, "cli2");
    assert_eq!(v2["size_bytes"], GIB, "default size: {v2}");
    assert_ne!(v["id"], v2["id"], "two volumes with the same id");

    // Table: a header line, then one line per volume.
    let text = d.cli_ok(&["volume", "ls"]);
    let (header, mut rows) = table(&text);
    assert!(
        header.iter().any(|h| h.eq_ignore_ascii_case("name")),
        "ls table should start with a header naming its columns: {text:?}"
    );
    rows.sort();
    assert_eq!(
        rows,
        ["baseline", "cli1", "cli2"],
        "ls table rows: {text:?}"
    );

    let all = ls_json(&d, &[]);
    assert_eq!(names(&all), ["baseline", "cli1", "cli2"]);
    for e in &all {
        check_volume_json(e, e["name"].as_str().unwrap());
    }
    let e1 = all.iter().find(|e| e["name"] == "cli1").unwrap();
    // inspect adds the space a volume and its snapshots use; the rest agrees.
    let mut inspected = v.clone();
    let space = inspected
        .as_object_mut()
        .unwrap()
        .remove("space")
        .expect("inspect shows space");
    assert_eq!(space["snapshots"], 0, "{space}");
    assert_eq!(*e1, inspected, "ls --json and inspect disagree");

    // Same catalog as the plugin socket.
    let (status, g) = d.get("cli1");
    assert_eq!(status, 200, "plugin Get of a CLI-created volume: {g}");

    // DUNNAGE_RUN_DIR works like --run-dir.
    let out = d.cli_env(&["volume", "ls", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let via_env: Value = serde_json::from_str(&out.stdout).expect("ls --json via env");
    assert_eq!(
        names(via_env.as_array().unwrap()),
        ["baseline", "cli1", "cli2"]
    );

    let (id1, id2) = (v["id"].as_str().unwrap(), v2["id"].as_str().unwrap());
    d.cli_ok(&["volume", "rm", "cli1"]);
    d.cli_ok(&["volume", "rm", "cli2"]);
    assert_eq!(names(&ls_json(&d, &[])), ["baseline"]);
    let err = d.cli_err(&["volume", "inspect", "cli1"]);
    assert!(err.contains("cli1"), "inspect of a removed volume: {err:?}");
    d.assert_no_new_data(&before, &["cli1", "cli2", id1, id2], "after rm");
}

#[test]
fn size_spellings() {
    let d = Daemon::start(Opts::default());
    for (name, size, bytes) in [
        ("s512m", "512M", 512 * MIB),
        ("s10g", "10G", 10 * GIB),
        ("s1t", "1T", 1024 * GIB),
        ("s2gi", "2Gi", 2 * GIB),
        ("s3gb", "3GB", 3 * GIB),
        ("s5", "5", 5 * GIB),
    ] {
        d.cli_ok(&["volume", "create", name, "-o", &format!("size={size}")]);
        assert_eq!(
            d.inspect(name)["size_bytes"],
            bytes,
            "size={size} should be {bytes} bytes"
        );
    }
    d.cli_ok(&[
        "volume",
        "create",
        "bs",
        "-o",
        "size=64M",
        "-o",
        "block_size=128",
        "-o",
        "fs=none",
    ]);
    let v = d.inspect("bs");
    assert_eq!(v["block_size_kib"], 128, "{v}");
    assert_eq!(v["fs"], "none", "{v}");

    // `dunnage volume ls | head`: the reader goes away early; the CLI ends
    // as a Unix filter does (SIGPIPE), without a panic on stderr.
    let (read_end, write_end) = nix::unistd::pipe().expect("pipe");
    drop(read_end);
    let out = std::process::Command::new(common::BIN)
        .arg("--run-dir")
        .arg(&d.run_dir)
        .args(["volume", "ls"])
        .stdout(write_end)
        .stderr(std::process::Stdio::piped())
        .output()
        .expect("dunnage volume ls");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "stderr: {stderr}");
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&out.status),
        Some(libc::SIGPIPE),
        "{} stderr: {stderr}",
        out.status
    );
}

#[test]
fn label_filter() {
    let d = Daemon::start(Opts::default());
    d.cli_ok(&[
        "volume",
        "create",
        "lp",
        "-o",
        "size=64M",
        "-o",
        "label=env=prod",
    ]);
    d.cli_ok(&[
        "volume",
        "create",
        "ld",
        "-o",
        "size=64M",
        "-o",
        "label=env=dev,team=x",
    ]);
    d.cli_ok(&["volume", "create", "ln", "-o", "size=64M"]);

    assert_eq!(names(&ls_json(&d, &["--label", "env=prod"])), ["lp"]);
    assert_eq!(names(&ls_json(&d, &["--label", "env=dev"])), ["ld"]);
    assert_eq!(names(&ls_json(&d, &["--label", "team=x"])), ["ld"]);
    assert_eq!(
        names(&ls_json(&d, &["--label", "env=staging"])),
        Vec::<String>::new()
    );
    assert_eq!(names(&ls_json(&d, &[])), ["ld", "ln", "lp"]);

    let text = d.cli_ok(&["volume", "ls", "--label", "env=prod"]);
    let (_, rows) = table(&text);
    assert_eq!(rows, ["lp"], "ls --label env=prod table: {text:?}");

    // Labels show in the plugin's Status too.
    let (status, v) = d.get("ld");
    assert_eq!(status, 200);
    let status_text = v["Volume"]["Status"].to_string();
    assert!(
        status_text.contains("env") && status_text.contains("dev"),
        "labels should be shown in Status: {v}"
    );
}

#[test]
fn attach_raw_volume_mkfs_and_direct_io() {
    let d = Daemon::start(Opts::default());
    common::require_tools(&["dd", "mkfs.ext4"]);
    d.cli_ok(&[
        "volume",
        "create",
        "raw",
        "-o",
        "size=128M",
        "-o",
        "fs=none",
    ]);

    let out = d.cli_ok(&["attach", "raw"]);
    let dev = out
        .strip_suffix('\n')
        .unwrap_or_else(|| panic!("attach output must end with a newline: {out:?}"));
    assert!(
        is_loop_path(dev) && !dev.contains('\n'),
        "attach must print only the device path, got {out:?}"
    );
    let md = fs::metadata(dev).unwrap_or_else(|e| panic!("{dev}: {e}"));
    assert!(
        md.file_type().is_block_device(),
        "{dev} is not a block device"
    );
    let v = d.inspect("raw");
    assert_eq!(v["state"], "attached", "{v}");
    assert_eq!(v["device"], dev, "{v}");

    // The device is usable directly: O_DIRECT writes and reads, mkfs.
    let tmp = d.root().join("pattern.bin");
    let data = pattern(4 * MIB as usize, 7);
    fs::write(&tmp, &data).unwrap();
    let of = format!("of={dev}");
    let iff = format!("if={}", tmp.display());
    common::sh(
        "dd",
        &[
            &iff,
            &of,
            "bs=1M",
            "seek=16",
            "oflag=direct",
            "conv=fsync",
            "status=none",
        ],
    );
    let back = d.root().join("back.bin");
    common::sh(
        "dd",
        &[
            &format!("if={dev}"),
            &format!("of={}", back.display()),
            "bs=1M",
            "skip=16",
            "count=4",
            "iflag=direct",
            "status=none",
        ],
    );
    assert!(
        fs::read(&back).unwrap() == data,
        "O_DIRECT read-back differs"
    );

    // Detach and attach again: the data is still there.
    d.cli_ok(&["detach", "raw"]);
    assert_eq!(d.volume_leftovers("raw"), Vec::<String>::new());
    let dev2 = d.cli_ok(&["attach", "raw"]);
    let dev2 = dev2.trim_end_matches('\n');
    fs::remove_file(&back).unwrap();
    common::sh(
        "dd",
        &[
            &format!("if={dev2}"),
            &format!("of={}", back.display()),
            "bs=1M",
            "skip=16",
            "count=4",
            "iflag=direct",
            "status=none",
        ],
    );
    assert!(
        fs::read(&back).unwrap() == data,
        "data changed across detach/attach"
    );
    common::sh("mkfs.ext4", &["-q", "-F", dev2]);

    // Attached volumes cannot be removed.
    let err = d.cli_err(&["volume", "rm", "raw"]);
    assert!(err.contains("raw") || err.contains("attach"), "{err:?}");
    assert_eq!(d.inspect("raw")["state"], "attached");

    d.cli_ok(&["detach", "raw"]);
    let v = d.inspect("raw");
    assert_eq!(v["state"], "detached", "{v}");
    assert_eq!(v["device"], Value::Null, "{v}");
    assert_eq!(d.volume_leftovers("raw"), Vec::<String>::new());
    d.cli_ok(&["volume", "rm", "raw"]);
    let l = d.leftovers_running();
    assert!(l.is_empty(), "leftovers after detach + rm: {l:?}");
}

#[test]
fn docker_mount_refused_while_attached() {
    let d = Daemon::start(Opts::default());
    d.cli_ok(&["volume", "create", "held", "-o", "size=64M"]);
    let dev = d.cli_ok(&["attach", "held"]);
    assert!(is_loop_path(dev.trim_end()), "{dev:?}");

    let id = mount_id("held");
    let err = d.err("/VolumeDriver.Mount", &json!({"Name": "held", "ID": id}));
    assert!(
        err.contains("dunnage detach"),
        "Mount of a host-attached volume should tell the user to run `dunnage detach`: {err:?}"
    );
    assert!(!d.is_mounted("held"));
    // The refused mount left no refcount behind.
    assert_eq!(d.inspect("held")["mounts"], 0);

    let out = d.cli(&["detach", "held"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(d.volume_leftovers("held"), Vec::<String>::new());

    // Now Docker can have it.
    let mp = d.mount("held", &id);
    assert_eq!(mp, d.mountpoint("held"));
    // ... and while Docker has it, the host cannot attach it.
    let err = d.cli_err(&["attach", "held"]);
    assert!(
        err.contains("mounted by Docker") && err.contains("held"),
        "attach of a Docker-mounted volume should say why: {err:?}"
    );
    assert_eq!(d.inspect("held")["state"], "mounted");
    d.unmount("held", &id);
    d.cli_ok(&["volume", "rm", "held"]);
    let l = d.leftovers_running();
    assert!(l.is_empty(), "leftovers: {l:?}");
}

#[test]
fn cli_errors() {
    let d = Daemon::start(Opts::default());
    for args in [
        &["volume", "inspect", "nosuch"][..],
        &["volume", "rm", "nosuch"],
        &["attach", "nosuch"],
        &["detach", "nosuch"],
        &["volume", "create", "bad/name"],
        &["volume", "create", "x", "-o", "size=1Q"],
        &["volume", "create", "x", "-o", "colour=blue"],
        &["volume", "create", "x", "-o", "secure=true"],
        &["volume", "create", "x", "-o", "novalue"],
        &["volume", "frobnicate"],
    ] {
        let out = d.cli(args);
        assert!(!out.status.success(), "dunnage {args:?} succeeded: {out:?}");
        assert!(
            !out.stderr.trim().is_empty(),
            "dunnage {args:?} failed without a message on stderr: {out:?}"
        );
        assert!(
            out.stdout.trim().is_empty(),
            "dunnage {args:?} failed but printed on stdout: {:?}",
            out.stdout
        );
    }
    let err = d.cli_err(&["volume", "create", "x", "-o", "secure=true"]);
    assert!(err.contains("needs a key"), "{err:?}");
    let err = d.cli_err(&["volume", "create", "x", "-o", "repl=2"]);
    assert!(
        err.contains("need a cluster") && err.contains("--etcd"),
        "{err:?}"
    );
    let err = d.cli_err(&[
        "volume",
        "create",
        "x",
        "-o",
        "shared=true",
        "-o",
        "fs=none",
    ]);
    assert!(err.contains("shared") && err.contains("fs=none"), "{err:?}");
    let err = d.cli_err(&["node", "ls"]);
    assert!(err.contains("runs alone"), "{err:?}");
    d.cli_ok(&["volume", "create", "single", "-o", "size=16M"]);
    let err = d.cli_err(&["replica", "add", "single", "n2"]);
    assert!(
        err.contains("single") && err.contains("needs a cluster"),
        "{err:?}"
    );
    let err = d.cli_err(&["replica", "rm", "nosuch", "n2"]);
    assert!(err.contains("nosuch"), "{err:?}");
    d.cli_ok(&["volume", "rm", "single"]);
    let err = d.cli_err(&["volume", "create", "x", "-o", "colour=blue"]);
    assert!(err.contains("colour") && err.contains("size"), "{err:?}");
    assert_eq!(
        ls_json(&d, &[]),
        Vec::<Value>::new(),
        "errors created volumes"
    );

    // No daemon behind the run dir: a clear failure, not a hang.
    let empty = tempfile::tempdir().unwrap();
    let out = common::run_cli(
        &[
            "--run-dir".into(),
            empty.path().display().to_string(),
            "volume".into(),
            "ls".into(),
        ],
        &[],
    );
    assert!(
        !out.status.success(),
        "ls without a daemon succeeded: {out:?}"
    );
    assert!(!out.stderr.trim().is_empty(), "{out:?}");
}

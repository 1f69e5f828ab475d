//! Encrypted volumes (`secure=true`) through the plugin socket, the CLI and
//! dockerd: no plaintext and no key anywhere on disk or in what the daemon
//! shows, a wrong key refused before any IO, locked after an orderly
//! restart (SIGTERM) until `dunnage volume unlock`, still in use across a
//! kill -9 (the FUSE keeper held the key), and the node-wide key of
//! `--secret-file`.

mod common;

use common::{
    docker_ok, require_docker, unique, write_durably, Daemon, DockerGuard, Opts, BIN, TEST_IMAGE,
};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const MARKER: &[u8] = b"PLAINTEXT-MARKER-dunnage-7f3a9c";

fn marker_blob() -> Vec<u8> {
    MARKER.repeat(4 << 20 >> 5)
}

/// Every regular file under `dir` (sockets and the like skipped).
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let p = e.path();
        let Ok(ft) = e.file_type() else { continue };
        if ft.is_dir() {
            out.extend(files(&p));
        } else if ft.is_file() {
            out.push(p);
        }
    }
    out
}

/// The files under `dirs` whose bytes contain `needle`.
fn containing(dirs: &[&Path], needle: &[u8]) -> Vec<PathBuf> {
    let mut hits = Vec::new();
    for dir in dirs {
        for f in files(dir) {
            let Ok(bytes) = std::fs::read(&f) else {
                continue;
            };
            if bytes.windows(needle.len()).any(|w| w == needle) {
                hits.push(f);
            }
        }
    }
    hits
}

fn unlock(d: &Daemon, name: &str, key: &str) -> (bool, String) {
    let mut child = Command::new(BIN)
        .args([
            "--run-dir",
            &d.run_dir.display().to_string(),
            "volume",
            "unlock",
            name,
        ])
        .env_remove("DUNNAGE_RUN_DIR")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    writeln!(child.stdin.take().unwrap(), "{key}").unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn encrypted_volume_leaves_no_plaintext_or_key_and_locks_after_restart() {
    let mut d = Daemon::start(Opts::default());
    let key = format!("passphrase-{}", unique("k"));
    let info = d.create(
        "sec",
        &[("size", "64M"), ("secure", "true"), ("secret_key", &key)],
    );
    let text = info.to_string();
    assert!(!text.contains(&key), "Create answered the key: {text}");

    let a = common::mount_id("sec-a");
    let mp = d.mount("sec", &a);
    let inspect = d.inspect("sec");
    assert_eq!(inspect["encrypted"], true, "{inspect}");
    assert_eq!(
        inspect["io_path"], "engine",
        "encrypted IO must not bypass the engine: {inspect}"
    );
    write_durably(&mp.join("blob"), &marker_blob());
    d.unmount("sec", &a);

    // Nothing of the plaintext, nothing of the key: data, run dir, log.
    let dirs = [
        d.data_dir.as_path(),
        d.run_dir.as_path(),
        d.log_path.parent().unwrap(),
    ];
    let hits = containing(&dirs, MARKER);
    assert!(hits.is_empty(), "plaintext on disk in {hits:?}");
    let hits = containing(&dirs, key.as_bytes());
    assert!(hits.is_empty(), "the key is on disk in {hits:?}");
    let (_, get) = d.get("sec");
    assert!(!get.to_string().contains(&key), "Get shows the key: {get}");
    let shown = d.cli_ok(&["volume", "inspect", "sec"]);
    assert!(!shown.contains(&key) && shown.contains("secure"), "{shown}");

    // After a restart the volume's own key is gone: locked, with a way out.
    d.restart();
    let b = common::mount_id("sec-b");
    let err = d.err(
        "/VolumeDriver.Mount",
        &serde_json::json!({"Name": "sec", "ID": b}),
    );
    assert!(
        err.contains("volume unlock sec") && err.contains("sec"),
        "{err}"
    );
    let (ok, err) = unlock(&d, "sec", "not-the-key");
    assert!(!ok && err.contains("does not match"), "wrong key: {err}");
    let (ok, err) = unlock(&d, "sec", &key);
    assert!(ok, "right key refused: {err}");
    let mp = d.mount("sec", &b);
    assert!(
        std::fs::read(mp.join("blob")).unwrap() == marker_blob(),
        "data changed"
    );
    d.unmount("sec", &b);
    let hits = containing(&[d.log_path.parent().unwrap()], key.as_bytes());
    assert!(hits.is_empty(), "the key reached the log: {hits:?}");
    d.remove("sec");
}

/// Reads `path` with O_DIRECT (`dd iflag=direct`): through the device and
/// so through the daemon's engine, not from the page cache.
fn read_direct(path: &Path) -> Vec<u8> {
    let out = Command::new("dd")
        .arg(format!("if={}", path.display()))
        .args(["iflag=direct", "bs=1M", "status=none"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "dd {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Nothing of `needles` in the data dir, the run dir or the daemon log.
fn assert_nowhere(d: &Daemon, needles: &[(&str, &[u8])], when: &str) {
    let dirs = [
        d.data_dir.as_path(),
        d.run_dir.as_path(),
        d.log_path.parent().unwrap(),
    ];
    for (what, needle) in needles {
        let hits = containing(&dirs, needle);
        assert!(hits.is_empty(), "{when}: {what} on disk in {hits:?}");
    }
}

#[test]
fn own_key_volume_stays_mounted_across_kill9_and_locks_after_sigterm() {
    let mut d = Daemon::start(Opts::default());
    let key = format!("passphrase-{}", unique("k"));
    d.create(
        "crashsec",
        &[("size", "64M"), ("secure", "true"), ("secret_key", &key)],
    );
    let a = common::mount_id("crashsec-a");
    let mp = d.mount("crashsec", &a);
    write_durably(&mp.join("blob"), &marker_blob());

    // A crash: the FUSE keeper held the key, so the new daemon takes the
    // volume back without `volume unlock` and serves it.
    d.kill9();
    d.start_again();
    // Volumes are taken back just after the socket answers.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let v = d.inspect("crashsec");
        if v["state"] == "mounted" {
            break;
        }
        assert!(
            !d.log().contains("cannot take") && std::time::Instant::now() < deadline,
            "not taken back: {v}\n{}",
            d.log_tail()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(d.is_mounted("crashsec"), "the filesystem went away");
    assert!(
        read_direct(&mp.join("blob")) == marker_blob(),
        "the marker does not read back through the new daemon\n{}",
        d.log_tail()
    );
    let after = MARKER.repeat(1000);
    write_durably(&mp.join("after"), &after);
    assert!(
        read_direct(&mp.join("after")) == after,
        "a new write is lost"
    );
    d.unmount("crashsec", &a);
    let l = d.volume_leftovers("crashsec");
    assert!(l.is_empty(), "leftovers after unmount: {l:?}");
    assert_nowhere(
        &d,
        &[("plaintext", MARKER), ("the key", key.as_bytes())],
        "after kill -9",
    );

    // An orderly restart lets the key go, also one taken back after a crash.
    d.restart();
    let b = common::mount_id("crashsec-b");
    let err = d.err(
        "/VolumeDriver.Mount",
        &serde_json::json!({"Name": "crashsec", "ID": b}),
    );
    assert!(err.contains("volume unlock crashsec"), "not locked: {err}");
    let (ok, err) = unlock(&d, "crashsec", &key);
    assert!(ok, "right key refused: {err}");
    let mp = d.mount("crashsec", &b);
    assert!(std::fs::read(mp.join("blob")).unwrap() == marker_blob());
    assert!(std::fs::read(mp.join("after")).unwrap() == after);
    d.unmount("crashsec", &b);
    d.remove("crashsec");
    assert_nowhere(
        &d,
        &[("plaintext", MARKER), ("the key", key.as_bytes())],
        "after remove",
    );
    // No key keeps the keeper alive after an orderly stop.
    d.sigterm_and_wait();
    let l = d.leftovers_stopped();
    assert!(
        l.is_empty(),
        "leftovers after SIGTERM: {l:?}\n{}",
        d.log_tail()
    );
}

#[test]
fn secure_needs_a_key_and_a_key_needs_secure() {
    let d = Daemon::start(Opts::default());
    let err = d.err(
        "/VolumeDriver.Create",
        &serde_json::json!({"Name": "nokey", "Opts": {"secure": "true"}}),
    );
    assert!(
        err.contains("secret_key") && err.contains("--secret-file"),
        "{err}"
    );
    let err = d.err(
        "/VolumeDriver.Create",
        &serde_json::json!({"Name": "nosecure", "Opts": {"secret_key": "abc"}}),
    );
    assert!(err.contains("secure=true") && !err.contains("abc"), "{err}");
    assert!(d.list_names().is_empty(), "a refused create left a volume");
}

#[test]
fn node_key_through_dockerd() {
    require_docker();
    let tmp = tempfile::tempdir().unwrap();
    let key_file = tmp.path().join("node.key");
    let key = format!("node-key-{}", unique("k"));
    std::fs::write(&key_file, format!("{key}\n")).unwrap();
    let mut d = Daemon::start(Opts {
        plugin_dir: Some("/run/docker/plugins".into()),
        extra_args: vec!["--secret-file".into(), key_file.display().to_string()],
        ..Opts::default()
    });
    let vol = unique("enc-vol");
    docker_ok(&[
        "volume",
        "create",
        "-d",
        &d.name,
        "-o",
        "secure=true",
        "-o",
        "size=64M",
        &vol,
    ]);
    let guard = DockerGuard::volumes(&[&vol]);
    let marker = String::from_utf8(MARKER.to_vec()).unwrap();
    let script = format!("for i in $(seq 1 2000); do echo {marker}; done > /data/m; sync");
    let c1 = unique("enc-w");
    docker_ok(&[
        "run",
        "--rm",
        "--name",
        &c1,
        "-v",
        &format!("{vol}:/data"),
        TEST_IMAGE,
        "sh",
        "-c",
        &script,
    ]);
    let hits = containing(&[d.data_dir.as_path(), d.run_dir.as_path()], MARKER);
    assert!(hits.is_empty(), "plaintext on disk in {hits:?}");
    let hits = containing(&[d.data_dir.as_path(), d.run_dir.as_path()], key.as_bytes());
    assert!(hits.is_empty(), "the node key is on disk in {hits:?}");

    // With the node key, a restarted daemon opens the volume by itself.
    d.restart();
    let c2 = unique("enc-r");
    let out = docker_ok(&[
        "run",
        "--rm",
        "--name",
        &c2,
        "-v",
        &format!("{vol}:/data"),
        TEST_IMAGE,
        "sh",
        "-c",
        "grep -c dunnage /data/m",
    ]);
    assert_eq!(out.trim(), "2000");
    let shown = docker_ok(&["volume", "inspect", &vol]);
    assert!(
        !shown.contains(&key),
        "docker volume inspect shows the key: {shown}"
    );
    docker_ok(&["volume", "rm", &vol]);
    guard.done();
}

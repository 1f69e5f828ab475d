//! End to end against the real dockerd (started by `just test` / scripts/dockerd.sh) with
//! the local image dunnage-test-busybox (scripts/test-image.sh). dockerd is shared between
//! tests: every daemon, volume and container name is unique to this process.
//!
//! dockerd caches every legacy (socket) volume driver it has talked to until it restarts,
//! and when asked about a volume it does not know (`docker volume inspect` or `rm` of a
//! missing name, `docker volume ls`) it probes all of them — a driver whose socket is gone
//! costs ~30 s of connection retries. So these tests never ask dockerd about unknown
//! volumes: they only name volumes dockerd has on record, and forget a volume once
//! `docker volume rm` succeeded.

mod common;

use common::{
    docker, docker_ok, expect_err, require_docker, unique, Daemon, Opts, GIB, TEST_IMAGE,
};
use serde_json::{json, Value};

const DOCKER_PLUGIN_DIR: &str = "/run/docker/plugins";

/// Removes the containers and volumes a test made, whatever happened. Declare it after the
/// `Daemon` so that it is dropped first (volume removal needs the plugin).
#[derive(Default)]
struct Cleanup {
    containers: Vec<String>,
    volumes: Vec<String>,
}

impl Cleanup {
    /// `docker volume rm` that must succeed; the volume is then no longer cleaned up.
    fn volume_rm(&mut self, vol: &str) {
        docker_ok(&["volume", "rm", vol]);
        self.volumes.retain(|v| v != vol);
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for c in &self.containers {
            let _ = docker(&["rm", "-f", "-v", c]);
        }
        for v in &self.volumes {
            let _ = docker(&["volume", "rm", "-f", v]);
        }
    }
}

fn start_daemon() -> Daemon {
    require_docker();
    Daemon::start(Opts {
        plugin_dir: Some(DOCKER_PLUGIN_DIR.into()),
        ..Opts::default()
    })
}

fn run_container(cleanup: &mut Cleanup, args: &[&str]) -> String {
    let cname = unique("dunnage-e2e");
    cleanup.containers.push(cname.clone());
    let mut all = vec!["run", "--rm", "--name", cname.as_str()];
    all.extend_from_slice(args);
    docker_ok(&all)
}

#[test]
fn docker_volume_lifecycle_across_restart() {
    let mut d = start_daemon();
    let mut cleanup = Cleanup::default();
    let vol = unique("e2e");
    cleanup.volumes.push(vol.clone());
    let before = d.data_baseline();

    let out = docker_ok(&["volume", "create", "-d", &d.name, "--opt", "size=1G", &vol]);
    assert_eq!(out.trim(), vol);
    assert!(
        d.list_names().contains(&vol),
        "docker volume create did not reach dunnage"
    );
    let info = d.inspect(&vol);
    assert_eq!(info["size_bytes"], GIB, "{info}");
    let id = info["id"].as_str().expect("id").to_string();

    let bind = format!("{vol}:/data");
    run_container(
        &mut cleanup,
        &[
            "-v",
            &bind,
            TEST_IMAGE,
            "sh",
            "-c",
            "echo hello > /data/f && sync",
        ],
    );
    // dockerd unmounted it when the container went away.
    assert!(
        !d.is_mounted(&vol),
        "still mounted after the container exited"
    );
    let l = d.leftovers_running();
    assert!(l.is_empty(), "leftovers after the container exited: {l:?}");
    assert_eq!(d.inspect(&vol)["formatted"], true);

    d.restart();

    let out = run_container(
        &mut cleanup,
        &[
            "-v",
            &bind,
            TEST_IMAGE,
            "sh",
            "-c",
            "cat /data/f && ls -a /data",
        ],
    );
    let mut lines = out.lines();
    assert_eq!(
        lines.next(),
        Some("hello"),
        "read back after restart: {out:?}"
    );
    let mut listing: Vec<&str> = lines.collect();
    listing.sort();
    assert_eq!(
        listing,
        [".", "..", "f"],
        "the volume should hold only what the container wrote: {out:?}"
    );

    let out = docker_ok(&["volume", "inspect", &vol]);
    let v: Value = serde_json::from_str(&out).expect("docker volume inspect JSON");
    let v = &v[0];
    assert_eq!(v["Name"], vol.as_str(), "{v}");
    assert_eq!(v["Driver"], d.name.as_str(), "{v}");
    assert!(
        v["Status"].as_object().is_some_and(|s| !s.is_empty()),
        "docker volume inspect should show the plugin's Status: {v}"
    );

    cleanup.volume_rm(&vol);
    assert!(
        !d.list_names().contains(&vol),
        "docker volume rm did not remove it"
    );
    let (status, g) = d.get(&vol);
    expect_err("Get after docker volume rm", status, &g);
    d.assert_no_new_data(&before, &[&vol, &id], "after docker volume rm");
    let l = d.leftovers_running();
    assert!(l.is_empty(), "leftovers after docker volume rm: {l:?}");
}

#[test]
fn docker_run_shorthand_name_at_size() {
    let d = start_daemon();
    let mut cleanup = Cleanup::default();
    let base = unique("sh");
    let vol = format!("{base}@2G");
    cleanup.volumes.push(vol.clone());

    let bind = format!("{vol}:/data");
    let df_kib = |cleanup: &mut Cleanup| -> u64 {
        let out = run_container(
            cleanup,
            &[
                "-v",
                &bind,
                "--volume-driver",
                &d.name,
                TEST_IMAGE,
                "df",
                "-k",
                "/data",
            ],
        );
        // Filesystem 1K-blocks Used Available Use% Mounted on
        out.lines()
            .nth(1)
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("cannot parse df output: {out:?}"))
    };
    let kib = df_kib(&mut cleanup);
    assert!(
        (GIB / 1024 * 17 / 10..=2 * GIB / 1024).contains(&kib),
        "{vol} should be about 2 GiB, df says {kib} KiB"
    );
    assert_eq!(
        d.inspect(&base)["size_bytes"],
        2 * GIB,
        "{vol} should create {base} with 2 GiB"
    );
    assert!(!d.is_mounted(&base));

    // Grown between two containers: the next one sees the larger filesystem.
    d.cli_ok(&["volume", "resize", &base, "3G"]);
    let kib = df_kib(&mut cleanup);
    assert!(
        (GIB / 1024 * 27 / 10..=3 * GIB / 1024).contains(&kib),
        "{base} grown to 3 GiB, df says {kib} KiB"
    );
    assert_eq!(d.inspect(&base)["size_bytes"], 3 * GIB);

    cleanup.volume_rm(&vol);
    let (status, g) = d.get(&base);
    expect_err("Get after docker volume rm", status, &g);
}

#[test]
fn docker_volume_create_bad_option_shows_daemon_error() {
    let d = start_daemon();
    let mut cleanup = Cleanup::default();
    let vol = unique("bad");

    // What the daemon itself says about this request...
    let daemon_err = d.err(
        "/VolumeDriver.Create",
        &json!({"Name": vol, "Opts": {"size": "1Q"}}),
    );
    // ...is what the docker user sees.
    let out = docker(&["volume", "create", "-d", &d.name, "--opt", "size=1Q", &vol]);
    assert!(
        !out.status.success(),
        "docker volume create with size=1Q succeeded: {out:?}"
    );
    assert!(
        out.stderr.contains(daemon_err.trim()),
        "docker should show the daemon's message {daemon_err:?}, stderr: {:?}",
        out.stderr
    );
    assert!(!d.list_names().contains(&vol));

    let out = docker(&[
        "volume",
        "create",
        "-d",
        &d.name,
        "--opt",
        "colour=blue",
        &vol,
    ]);
    assert!(!out.status.success(), "unknown option accepted: {out:?}");
    assert!(
        out.stderr.contains("colour") && out.stderr.contains("size"),
        "docker should show the unknown option and the valid ones: {:?}",
        out.stderr
    );

    // The failed attempts left nothing behind, neither in dockerd nor in dunnage: the
    // same name can now be created with valid options, and gets exactly those.
    cleanup.volumes.push(vol.clone());
    docker_ok(&["volume", "create", "-d", &d.name, "--opt", "size=64M", &vol]);
    assert_eq!(d.inspect(&vol)["size_bytes"], 64 << 20);
    let out = docker_ok(&["volume", "inspect", &vol]);
    let v: Value = serde_json::from_str(&out).expect("docker volume inspect JSON");
    assert_eq!(v[0]["Driver"], d.name.as_str(), "{v}");
    assert_eq!(
        v[0]["Options"],
        json!({"size": "64M"}),
        "dockerd should record only the options of the successful create: {v}"
    );
    cleanup.volume_rm(&vol);
}

/// A replicated volume of a two-node cluster, used through dockerd on n1:
/// created with repl=2 (scope global), mounted into a running container,
/// grown while the container writes (asked on n2, forwarded to n1, xfs
/// grown online so the container sees it at once), and after the
/// container is gone the data is read back on n2 from its own replica.
/// Two nodes on loopback; dockerd talks to n1's plugin socket.
fn docker_cluster() -> common::cluster::Cluster {
    use common::cluster::{Cluster, Mode};
    require_docker();
    Cluster::start_custom(
        Mode::Loopback,
        2,
        |_| Vec::new(),
        |i| Opts {
            plugin_dir: (i == 0).then(|| DOCKER_PLUGIN_DIR.into()),
            ..Opts::default()
        },
    )
}

#[test]
fn docker_uses_a_replicated_volume_and_it_grows_in_use() {
    let c = docker_cluster();
    let mut cleanup = Cleanup::default();
    let driver = c.node(0).name.clone();
    let vol = unique("e2e-repl");
    cleanup.volumes.push(vol.clone());
    let opts = ["--opt", "repl=2", "--opt", "size=320M", "--opt", "fs=xfs"];
    let mut args = vec!["volume", "create", "-d", driver.as_str()];
    args.extend(opts);
    args.push(&vol);
    docker_ok(&args);
    let v: Value = serde_json::from_str(&docker_ok(&["volume", "inspect", &vol])).unwrap();
    assert_eq!(v[0]["Scope"], "global", "{v}");
    assert_eq!(c.placement(1, &vol), ["n1", "n2"], "seen from n2");

    let cname = unique("dunnage-e2e-repl");
    cleanup.containers.push(cname.clone());
    let bind = format!("{vol}:/data");
    docker_ok(&[
        "run",
        "-d",
        "--name",
        &cname,
        "-v",
        &bind,
        TEST_IMAGE,
        "sh",
        "-c",
        "echo kept > /data/f && sync && while true; do date >> /data/log; sleep 0.1; done",
    ]);
    let df = || {
        let out = docker_ok(&["exec", &cname, "df", "-k", "/data"]);
        let blocks: u64 = out
            .lines()
            .nth(1)
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|b| b.parse().ok())
            .unwrap_or_else(|| panic!("df output: {out}"));
        blocks
    };
    let before = df();
    assert!(before < 320 * 1024, "{before} KiB");
    c.cli_ok(1, &["volume", "resize", &vol, "1G"]);
    let after = df();
    assert!(
        after > 900 * 1024,
        "the container's filesystem did not grow: {before} -> {after} KiB\n{}",
        c.logs()
    );
    docker_ok(&["exec", &cname, "sh", "-c", "echo grown > /data/g && sync"]);
    docker_ok(&["rm", "-f", &cname]);
    cleanup.containers.clear();

    // Detached by dockerd; n2's replica holds everything.
    let dev = c.cli_ok(1, &["attach", &vol]).trim().to_string();
    let mnt = tempfile::tempdir().unwrap();
    let m = mnt.path().to_str().unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-o", "ro", &dev, m])
        .status()
        .expect("mount");
    assert!(mounted.success(), "mount {dev} on n2");
    let f = std::fs::read_to_string(mnt.path().join("data/f"));
    let g = std::fs::read_to_string(mnt.path().join("data/g"));
    let _ = std::process::Command::new("umount").arg(m).status();
    assert_eq!(f.unwrap(), "kept\n");
    assert_eq!(g.unwrap(), "grown\n");
    c.cli_ok(1, &["detach", &vol]);
    cleanup.volume_rm(&vol);
    drop(cleanup);
    c.shutdown();
}

/// A shared volume (`shared=true`) used by containers on two nodes at
/// once: n2 holds it (mounted through the plugin socket), and dockerd's
/// containers on n1 use it through n1's client of n2, as root and as
/// another user, each seeing what the other node wrote.
#[test]
fn containers_on_two_nodes_share_a_volume() {
    use std::os::unix::fs::MetadataExt;
    let c = docker_cluster();
    let mut cleanup = Cleanup::default();
    let driver = c.node(0).name.clone();
    let vol = unique("e2e-shared");
    cleanup.volumes.push(vol.clone());
    docker_ok(&[
        "volume",
        "create",
        "-d",
        &driver,
        "--opt",
        "shared=true",
        "--opt",
        "repl=2",
        "--opt",
        "size=64M",
        &vol,
    ]);
    let v: Value = serde_json::from_str(&docker_ok(&["volume", "inspect", &vol])).unwrap();
    assert_eq!(v[0]["Status"]["shared"], true, "{v}");
    c.wait_for("n2 to list the volume", || {
        c.volume_names(1).iter().any(|n| n == &vol)
    });
    let m = c
        .node(1)
        .ok("/VolumeDriver.Mount", &json!({"Name": vol, "ID": "on-n2"}));
    let p2 = std::path::PathBuf::from(m["Mountpoint"].as_str().unwrap());
    std::fs::write(p2.join("from-n2"), "hello from n2\n").unwrap();
    std::fs::create_dir(p2.join("open")).unwrap();
    std::fs::set_permissions(
        p2.join("open"),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();

    let bind = format!("{vol}:/data");
    let out = run_container(
        &mut cleanup,
        &[
            "-v",
            &bind,
            TEST_IMAGE,
            "sh",
            "-c",
            "cat /data/from-n2 && echo from-docker > /data/from-n1 && sync",
        ],
    );
    assert_eq!(out, "hello from n2\n");
    assert_eq!(
        std::fs::read_to_string(p2.join("from-n1")).unwrap(),
        "from-docker\n"
    );
    // While a container on n1 runs, n2 counts n1's session; then it goes.
    let cname = unique("dunnage-e2e-shared");
    cleanup.containers.push(cname.clone());
    docker_ok(&[
        "run", "-d", "--name", &cname, "-v", &bind, TEST_IMAGE, "sleep", "300",
    ]);
    assert_eq!(c.inspect_on(1, &vol)["shared_with"], json!(["n1"]));
    assert_eq!(c.inspect_on(0, &vol)["served_by"], "n2");
    docker_ok(&["rm", "-f", &cname]);
    c.wait_for("n1's session to end", || {
        c.inspect_on(1, &vol)["shared_with"].is_null()
    });
    // Another user in the container: files are theirs, and root's are not
    // theirs to write.
    let out = run_container(
        &mut cleanup,
        &[
            "-u",
            "1000:1000",
            "-v",
            &bind,
            TEST_IMAGE,
            "sh",
            "-c",
            "echo mine > /data/open/u && (echo no >> /data/from-n2 && echo wrote || echo refused)",
        ],
    );
    assert_eq!(out, "refused\n");
    let meta = std::fs::metadata(p2.join("open/u")).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (1000, 1000));
    assert_eq!(
        std::fs::read_to_string(p2.join("from-n2")).unwrap(),
        "hello from n2\n"
    );
    // dockerd unmounted after each container: n1 holds no client now.
    assert_eq!(c.inspect_on(0, &vol)["state"], "detached");
    c.node(1).ok(
        "/VolumeDriver.Unmount",
        &json!({"Name": vol, "ID": "on-n2"}),
    );
    cleanup.volume_rm(&vol);
    drop(cleanup);
    c.shutdown();
}

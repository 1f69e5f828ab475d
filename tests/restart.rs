//! A `dunnage serve` killed with -9 and started again takes its FUSE exports
//! back: IO in flight pauses instead of failing, nothing flushed is lost, a
//! container with the volume mounted keeps running. (The ublk twin runs in
//! the VM: tests/vm/ublk.sh.)

mod common;

use common::{docker_ok, require_docker, unique, Daemon, DockerGuard, Opts, TEST_IMAGE};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

fn assert_clean(d: &Daemon, context: &str) {
    let l = d.leftovers_running();
    assert!(l.is_empty(), "{context}: leftovers {l:?}\n{}", d.log_tail());
}

/// Rate-limited (`extra`) so that it is certainly still writing when the
/// daemon is killed.
fn fio(device: &str, extra: &[&str]) -> Command {
    common::fio_verify("restart", device, "32M", extra)
}

/// `copying`: the volume is written through once and snapshotted first,
/// so that fio's writes copy shared blocks (copy-on-write) when the
/// daemon is killed: those copies are in no map file yet, only in the copy
/// journal.
/// How the test stops the daemon under IO: `kill -9`, or SIGTERM to a
/// daemon started with `--handover-on-stop` (`systemctl restart`).
#[derive(Clone, Copy, PartialEq)]
enum Stop {
    Kill9,
    Handover,
}

fn stop(d: &mut Daemon, how: Stop) {
    match how {
        Stop::Kill9 => d.kill9(),
        Stop::Handover => {
            d.sigterm_and_wait();
            assert!(
                d.log()
                    .contains("leaving the attached volumes to the next dunnage serve"),
                "SIGTERM did not hand the volume over\n{}",
                d.log_tail()
            );
        }
    }
}

fn fio_survives_kill9(opts: Opts, copying: bool) {
    fio_survives_stop(opts, copying, Stop::Kill9)
}

fn fio_survives_stop(mut opts: Opts, copying: bool, how: Stop) {
    if how == Stop::Handover {
        opts.extra_args.push("--handover-on-stop".into());
    }
    common::require_tools(&["fio"]);
    let opts_passthrough_off = opts.passthrough == "off";
    let mut d = Daemon::start(opts);
    let pt = if opts_passthrough_off {
        "false"
    } else {
        "true"
    };
    d.create(
        "crashy",
        &[("size", "64M"), ("fs", "none"), ("passthrough", pt)],
    );
    let dev = d.cli_ok(&["attach", "crashy"]).trim().to_string();
    let io_path = d.inspect("crashy")["io_path"]
        .as_str()
        .unwrap_or("")
        .to_string();

    if copying {
        let fill = Command::new("dd")
            .args([
                "if=/dev/urandom",
                &format!("of={dev}"),
                "bs=1M",
                "count=32",
                "oflag=direct",
            ])
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(fill.success());
        d.cli_ok(&["snapshot", "create", "crashy", "before"]);
    }
    let fio_child = fio(&dev, &["--rate_iops=2500"]).spawn().expect("run fio");
    thread::sleep(Duration::from_millis(1500));
    let mut fio_child = fio_child;
    assert!(
        fio_child.try_wait().unwrap().is_none(),
        "fio ended before the kill: the test would prove nothing"
    );
    stop(&mut d, how);
    // While no daemon runs, IO waits: fio must not have failed.
    thread::sleep(Duration::from_millis(500));
    assert!(
        fio_child.try_wait().unwrap().is_none(),
        "fio ended while the daemon was dead (its IO failed instead of pausing)"
    );
    d.start_again();
    if copying {
        assert!(
            d.log()
                .contains("mapped again the copies of writes a stopped process had not flushed"),
            "the killed daemon left no copies to map again: the test proves nothing\n{}",
            d.log_tail()
        );
    }
    let (ok, out) = common::wait_child(fio_child, "fio", Duration::from_secs(180), || d.log_tail());
    assert!(
        ok && !out.contains("verify:") && !out.contains("bad magic"),
        "fio ({io_path} path) failed across kill -9 and restart:\n{out}\n{}",
        d.log_tail()
    );
    let after = d.inspect("crashy");
    assert_eq!(after["state"], "attached", "{after}");
    assert_eq!(
        after["device"].as_str(),
        Some(dev.as_str()),
        "same device after restart: {after}"
    );

    // fio's final read pass verified everything; now prove it is durable:
    // flush, kill again, and verify once more through a new daemon.
    let sync = Command::new("blockdev")
        .args(["--flushbufs", &dev])
        .status()
        .unwrap();
    assert!(sync.success());
    stop(&mut d, how);
    d.start_again();
    let verify = fio(&dev, &["--verify_only"]).spawn().unwrap();
    let (ok, out) = common::wait_child(
        verify,
        "fio --verify_only",
        Duration::from_secs(180),
        || d.log_tail(),
    );
    assert!(
        ok,
        "data lost across the second kill -9:\n{out}\n{}",
        d.log_tail()
    );

    d.cli_ok(&["detach", "crashy"]);
    if copying {
        d.cli_ok(&["snapshot", "rm", "crashy", "before"]);
    }
    d.cli_ok(&["volume", "rm", "crashy"]);
    assert_clean(&d, "after detach and remove");
    d.sigterm_and_wait();
    let l = d.leftovers_stopped();
    assert!(
        l.is_empty(),
        "leftovers after SIGTERM: {l:?}\n{}",
        d.log_tail()
    );
}

#[test]
fn raw_device_io_pauses_across_kill9() {
    fio_survives_kill9(Opts::default(), false);
}

/// `serve --handover-on-stop`: SIGTERM leaves the attached volume to the
/// next daemon as kill -9 does (fio runs on across it, every write
/// verified), and, once nothing is attached, stops in order as usual
/// (the end of the test checks nothing is left).
#[test]
fn raw_device_io_pauses_across_a_handover_stop() {
    fio_survives_stop(Opts::engine_path(), false, Stop::Handover);
}

#[test]
fn raw_device_io_pauses_across_kill9_engine_path() {
    fio_survives_kill9(Opts::engine_path(), false);
}

#[test]
fn raw_device_io_pauses_across_kill9_while_copying_snapshot_blocks() {
    fio_survives_kill9(Opts::engine_path(), true);
}

fn read_counter(path: &std::path::Path) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

fn wait_counter(path: &std::path::Path, at_least: u64, d: &Daemon) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let n = read_counter(path);
        if n >= at_least {
            return n;
        }
        assert!(
            Instant::now() < deadline,
            "the container stopped making progress at {n} (wanted {at_least})\n{}",
            d.log_tail()
        );
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn container_keeps_running_across_kill9() {
    require_docker();
    let mut d = Daemon::start(Opts {
        plugin_dir: Some("/run/docker/plugins".into()),
        ..Opts::engine_path()
    });
    let vol = unique("restart-vol");
    let cname = unique("restart-c");
    docker_ok(&["volume", "create", "-d", &d.name, "-o", "size=64M", &vol]);
    // Each step is synced: the counter file and every line of the log.
    let script = "i=0; while true; do i=$((i+1)); echo $i >> /data/log; sync; \
                  echo $i > /data/n.tmp; sync; mv /data/n.tmp /data/n; sync; sleep 0.02; done";
    docker_ok(&[
        "run",
        "-d",
        "--name",
        &cname,
        "-v",
        &format!("{vol}:/data"),
        TEST_IMAGE,
        "sh",
        "-c",
        script,
    ]);
    let guard = DockerGuard {
        containers: vec![cname.clone()],
        volumes: vec![vol.clone()],
    };
    let counter = d.mountpoint(&vol).join("n");
    let before = wait_counter(&counter, 20, &d);

    d.kill9();
    d.start_again();
    // It goes on: the counter climbs well past where it was.
    wait_counter(&counter, before + 50, &d);
    let running = docker_ok(&["inspect", "-f", "{{.State.Running}}", &cname]);
    assert_eq!(
        running.trim(),
        "true",
        "the container died across the restart"
    );

    docker_ok(&["stop", "-t", "1", &cname]);
    docker_ok(&["rm", &cname]);
    // Every line the container synced is there, in order, with no gap.
    let c2 = unique("restart-check");
    let log = docker_ok(&[
        "run",
        "--rm",
        "--name",
        &c2,
        "-v",
        &format!("{vol}:/data"),
        TEST_IMAGE,
        "cat",
        "/data/log",
    ]);
    let lines: Vec<u64> = log
        .lines()
        .map(|l| l.trim().parse().expect("a number"))
        .collect();
    assert!(
        lines.len() as u64 > before + 50,
        "log too short: {} lines",
        lines.len()
    );
    for (i, n) in lines.iter().enumerate() {
        assert_eq!(
            *n,
            i as u64 + 1,
            "log line {} is {n}: a synced write was lost",
            i + 1
        );
    }
    docker_ok(&["volume", "rm", &vol]);
    guard.done();
    assert_clean(&d, "after the container and the volume are gone");
    d.sigterm_and_wait();
    let l = d.leftovers_stopped();
    assert!(l.is_empty(), "leftovers after SIGTERM: {l:?}");
}

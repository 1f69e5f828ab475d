//! `io_priority`: when a high and a low volume compete, the high one gets
//! the larger share of the node's IO (two fio jobs run side by side on
//! two attached volumes; their completed IOs are compared, not timed).

mod common;

use common::{Daemon, Opts};
use std::process::{Command, Stdio};

fn fio_json(device: &str) -> Command {
    let mut cmd = Command::new("fio");
    cmd.args([
        "--name=prio",
        &format!("--filename={device}"),
        "--rw=randwrite",
        "--bs=4k",
        "--size=48M",
        "--ioengine=libaio",
        "--iodepth=32",
        "--direct=1",
        "--time_based",
        "--runtime=4",
        "--output-format=json",
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    cmd
}

fn write_ios(out: &std::process::Output) -> u64 {
    assert!(
        out.status.success(),
        "fio failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("fio JSON");
    v["jobs"][0]["write"]["total_ios"]
        .as_u64()
        .expect("total_ios")
}

#[test]
fn high_priority_volume_gets_the_larger_share() {
    common::require_tools(&["fio"]);
    let d = Daemon::start(Opts::default());
    d.create(
        "fast",
        &[("size", "64M"), ("fs", "none"), ("io_priority", "high")],
    );
    d.create(
        "slow",
        &[("size", "64M"), ("fs", "none"), ("io_priority", "low")],
    );
    let fast = d.cli_ok(&["attach", "fast"]).trim().to_string();
    let slow = d.cli_ok(&["attach", "slow"]).trim().to_string();
    for (name, want) in [("fast", "high"), ("slow", "low")] {
        let v = d.inspect(name);
        assert_eq!(v["io_priority"], want, "{v}");
        // High and low stay on the engine path, where the shares apply.
        assert_eq!(v["io_path"], "engine", "{v}");
    }
    let a = fio_json(&fast).spawn().unwrap();
    let b = fio_json(&slow).spawn().unwrap();
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    let (high, low) = (write_ios(&a), write_ios(&b));
    assert!(
        high > low,
        "the high-priority volume did {high} IOs, the low one {low}\n{}",
        d.log_tail()
    );
    eprintln!(
        "io_priority: high {high} IOs, low {low} IOs ({:.1}x)",
        high as f64 / low.max(1) as f64
    );
    d.cli_ok(&["detach", "fast"]);
    d.cli_ok(&["detach", "slow"]);
}

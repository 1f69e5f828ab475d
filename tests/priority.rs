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

/// fio's write IOPS and bytes per second, as it measured them.
fn write_rate(out: &std::process::Output) -> (f64, f64) {
    assert!(
        out.status.success(),
        "fio failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("fio JSON");
    let w = &v["jobs"][0]["write"];
    (
        w["iops"].as_f64().expect("iops"),
        w["bw_bytes"].as_f64().expect("bw_bytes"),
    )
}

/// `max_iops` and `max_bandwidth` hold a volume to its caps (fio never
/// measures more; the daemon's metrics show the IO it held back), change
/// live with `volume update`, and bad values are refused. Only upper
/// bounds are asserted: a slow machine can only make the figures smaller.
#[test]
fn caps_hold_a_volume_to_its_max_iops_and_bandwidth_and_change_live() {
    let port = common::netns::free_port(std::net::Ipv4Addr::LOCALHOST);
    let addr = format!("127.0.0.1:{port}");
    let d = Daemon::start(Opts {
        extra_args: vec!["--metrics-listen".into(), addr.clone()],
        ..Opts::default()
    });
    let metric = |name: &str| -> Option<f64> {
        let conn = std::net::TcpStream::connect(&addr).expect("connect to the metrics");
        let (_, body) = common::http_get(conn, "/metrics");
        body.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}{{volume=\"capped\"}} ")))
            .map(|v| v.parse().expect("a value"))
    };
    for (opt, bad) in [("max_iops", "-5"), ("max_bandwidth", "12Q")] {
        let err = d.cli_err(&["volume", "create", "x", "-o", &format!("{opt}={bad}")]);
        assert!(err.contains(opt), "{err}");
    }
    let err = d.cli_err(&[
        "volume",
        "create",
        "x",
        "-o",
        "passthrough=true",
        "-o",
        "max_iops=100",
    ]);
    assert!(err.contains("max_iops"), "{err}");
    assert!(!d.list_names().iter().any(|n| n == "x"));

    d.create(
        "capped",
        &[("size", "64M"), ("fs", "none"), ("max_iops", "300")],
    );
    let dev = d.cli_ok(&["attach", "capped"]).trim().to_string();
    let mut fio = fio_json(&dev);
    fio.args(["--runtime=3", "--iodepth=16"]);
    let (iops, _) = write_rate(&fio.output().expect("fio"));
    // 300 per second and a tenth of a second's burst.
    assert!(iops <= 300.0 * 1.1, "{iops} IOPS under max_iops=300");
    assert!(metric("dunnage_volume_throttled_seconds_total").unwrap() > 0.0);
    assert_eq!(metric("dunnage_volume_max_iops"), Some(300.0));

    // Live: the IO cap off, a bandwidth cap on.
    let err = d.cli_err(&["volume", "update", "capped", "-o", "max_iops=abc"]);
    assert!(err.contains("max_iops"), "{err}");
    assert_eq!(d.inspect("capped")["options"]["max_iops"], "300");
    d.cli_ok(&[
        "volume",
        "update",
        "capped",
        "-o",
        "max_iops=0",
        "-o",
        "max_bandwidth=8M",
    ]);
    let info = d.inspect("capped");
    assert_eq!(info["options"].get("max_iops"), None, "{info}");
    assert_eq!(info["options"]["max_bandwidth"], "8192K", "{info}");
    let mut fio = fio_json(&dev);
    fio.args(["--runtime=3", "--bs=64k", "--rw=write"]);
    let (_, bw) = write_rate(&fio.output().expect("fio"));
    let mib = (1u64 << 20) as f64;
    assert!(
        bw <= 8.0 * mib * 1.1,
        "{} MiB/s under max_bandwidth=8M",
        bw / mib
    );
    assert_eq!(metric("dunnage_volume_max_iops"), None);
    assert_eq!(
        metric("dunnage_volume_max_bandwidth_bytes"),
        Some(8.0 * mib)
    );
    d.cli_ok(&["detach", "capped"]);
    d.remove("capped");
    let l = d.leftovers_running();
    assert!(l.is_empty(), "leftovers {l:?}\n{}", d.log_tail());
}

//! Prometheus metrics of a real daemon: `serve --metrics-listen` and the
//! control socket answer `GET /metrics` with each volume's size, state and
//! the IO its device did during this attach (engine path and passthrough).

mod common;

use common::{Daemon, Opts, MIB};
use std::collections::HashMap;
use std::net::{Ipv4Addr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;

/// Samples by `name{labels}`; every line not a comment must be one.
fn samples(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (k, v) = l
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("not a sample: {l}"));
            (
                k.to_string(),
                v.parse().unwrap_or_else(|_| panic!("not a value: {l}")),
            )
        })
        .collect()
}

fn dd(args: &[&str]) {
    let out = Command::new("dd").args(args).output().expect("dd");
    assert!(out.status.success(), "dd {args:?}: {out:?}");
}

#[test]
fn metrics_count_each_volumes_io_during_its_attach() {
    let port = common::netns::free_port(Ipv4Addr::LOCALHOST);
    let addr = format!("127.0.0.1:{port}");
    let d = Daemon::start(Opts {
        extra_args: vec!["--metrics-listen".into(), addr.clone()],
        ..Opts::default()
    });
    let scrape = || {
        let (status, body) =
            common::http_get(TcpStream::connect(&addr).expect("connect"), "/metrics");
        assert!(status.contains("200"), "{status}\n{body}");
        samples(&body)
    };
    for (vol, pt) in [("m-engine", "false"), ("m-pt", "true")] {
        d.create(vol, &[("size", "64M"), ("fs", "none"), ("passthrough", pt)]);
    }
    let dev = d.cli_ok(&["attach", "m-engine"]).trim().to_string();
    let pt_dev = d.cli_ok(&["attach", "m-pt"]).trim().to_string();
    assert_eq!(d.inspect("m-pt")["io_path"], "passthrough");
    for dev in [&dev, &pt_dev] {
        dd(&[
            "if=/dev/urandom",
            &format!("of={dev}"),
            "bs=1M",
            "count=8",
            "oflag=direct",
        ]);
    }
    dd(&[
        &format!("if={dev}"),
        "of=/dev/null",
        "bs=1M",
        "count=4",
        "iflag=direct",
    ]);

    let m = scrape();
    for vol in ["m-engine", "m-pt"] {
        let s = |name: &str| m.get(&format!("{name}{{volume=\"{vol}\"}}")).copied();
        assert_eq!(
            s("dunnage_volume_size_bytes"),
            Some((64 * MIB) as f64),
            "{vol}: {m:?}"
        );
        assert_eq!(s("dunnage_volume_attached"), Some(1.0), "{vol}");
        // Only dd wrote to the raw devices.
        assert_eq!(
            s("dunnage_volume_written_bytes_total"),
            Some((8 * MIB) as f64),
            "{vol}: {m:?}"
        );
        assert!(s("dunnage_volume_writes_total").unwrap() >= 8.0, "{vol}");
        assert!(
            s("dunnage_volume_allocated_bytes").unwrap() >= (8 * MIB) as f64,
            "{vol}"
        );
    }
    let read = m["dunnage_volume_read_bytes_total{volume=\"m-engine\"}"];
    assert!(read >= (4 * MIB) as f64, "{read}");
    assert!(
        m.keys().any(|k| k.starts_with("dunnage_node_info{")),
        "{m:?}"
    );
    let (size, free) = (
        m["dunnage_data_capacity_bytes"],
        m["dunnage_data_free_bytes"],
    );
    assert!(size > 0.0 && free > 0.0 && free <= size, "{size} {free}");

    // Detached: no device figures; attached again (most likely on the same
    // loop device, whose counters run on), it starts from zero.
    d.cli_ok(&["detach", "m-engine"]);
    let m = scrape();
    assert_eq!(m["dunnage_volume_attached{volume=\"m-engine\"}"], 0.0);
    assert!(!m.contains_key("dunnage_volume_written_bytes_total{volume=\"m-engine\"}"));
    let dev = d.cli_ok(&["attach", "m-engine"]).trim().to_string();
    dd(&[
        "if=/dev/urandom",
        &format!("of={dev}"),
        "bs=64k",
        "count=3",
        "oflag=direct",
    ]);
    let m = scrape();
    assert_eq!(
        m["dunnage_volume_written_bytes_total{volume=\"m-engine\"}"],
        (3 * 65536) as f64,
        "{m:?}"
    );

    // The control socket answers it too; the metrics port nothing else.
    let sock = UnixStream::connect(Path::new(&d.run_dir).join("control.sock")).unwrap();
    let (status, body) = common::http_get(sock, "/metrics");
    assert!(
        status.contains("200") && body.contains("dunnage_volume_size_bytes"),
        "{status}"
    );
    let (status, body) = common::http_get(TcpStream::connect(&addr).unwrap(), "/v1/volume/list");
    assert!(
        status.contains("404") && body.contains("only GET /metrics"),
        "{status} {body}"
    );

    for vol in ["m-engine", "m-pt"] {
        d.cli_ok(&["detach", vol]);
        d.remove(vol);
    }
    let l = d.leftovers_running();
    assert!(l.is_empty(), "leftovers {l:?}\n{}", d.log_tail());
}

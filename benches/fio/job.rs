//! The fio profiles (job files under fixtures/fio/) and reading fio's JSON.

use crate::proc::run;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

pub struct Profile {
    /// The job file's stem under fixtures/fio/, and the key in results.json.
    pub id: &'static str,
    pub title: &'static str,
    /// Show the p99 completion latency of writes for this profile.
    pub latency: bool,
}

pub const PROFILES: [Profile; 6] = [
    Profile {
        id: "randread-4k-qd32",
        title: "4k randread QD32",
        latency: false,
    },
    Profile {
        id: "randwrite-4k-qd32",
        title: "4k randwrite QD32",
        latency: false,
    },
    Profile {
        id: "randwrite-4k-qd1",
        title: "4k randwrite QD1",
        latency: true,
    },
    Profile {
        id: "read-1m-qd8",
        title: "1M seq read QD8",
        latency: false,
    },
    Profile {
        id: "write-1m-qd8",
        title: "1M seq write QD8",
        latency: false,
    },
    Profile {
        id: "randrw-4k-qd16",
        title: "4k randrw 70/30 QD16",
        latency: false,
    },
];

pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/fio")
}

pub fn job_file(id: &str) -> PathBuf {
    fixtures_dir().join(format!("{id}.fio"))
}

/// One fio run's figures (both directions added up; latencies per direction).
#[derive(Debug, Clone, Copy, Serialize, Default)]
pub struct Sample {
    pub iops: f64,
    pub mib_s: f64,
    pub read_iops: f64,
    pub write_iops: f64,
    /// p99 of completion latency, µs; None when the direction did no IO.
    pub read_p99_us: Option<f64>,
    pub write_p99_us: Option<f64>,
    pub read_mean_us: Option<f64>,
    pub write_mean_us: Option<f64>,
    /// CPU time the target's user-space server (qemu-storage-daemon, dunnage
    /// serve) used while fio ran, per second of the job (ramp included): 1.0
    /// is one core busy. None for the limit, which has no server.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_cpu_cores: Option<f64>,
}

pub struct Params<'a> {
    pub dev: &'a Path,
    pub size: u64,
    pub runtime: u64,
    pub ramp: u64,
}

/// Runs `fio --output-format=json JOB` on a device; the job reads its
/// parameters from the environment (DEV, SIZE, RUNTIME, RAMP).
pub fn run_fio(job: &Path, p: &Params, timeout: Duration) -> Result<Sample> {
    let out = run(
        Command::new("fio")
            .arg("--output-format=json")
            .arg(job)
            .env("DEV", p.dev)
            .env("SIZE", p.size.to_string())
            .env("RUNTIME", p.runtime.to_string())
            .env("RAMP", p.ramp.to_string()),
        timeout,
    )?;
    if !out.status.success() {
        bail!(
            "fio {} on {} failed ({}): {}",
            job.display(),
            p.dev.display(),
            out.status,
            out.tail()
        );
    }
    parse(&out.stdout).with_context(|| format!("fio {} on {}", job.display(), p.dev.display()))
}

/// Writes `len` bytes of a device from `offset` on, sequentially, as the
/// precondition job does (1 MiB, QD8, libaio, direct), with the job on
/// fio's command line.
pub fn write_range(dev: &Path, offset: u64, len: u64, timeout: Duration) -> Result<Sample> {
    let out = run(
        Command::new("fio")
            .arg("--output-format=json")
            .arg("--name=overwrite")
            .arg(format!("--filename={}", dev.display()))
            .args([
                "--ioengine=libaio",
                "--direct=1",
                "--rw=write",
                "--bs=1M",
                "--iodepth=8",
            ])
            .arg(format!("--offset={offset}"))
            .arg(format!("--size={len}")),
        timeout,
    )?;
    if !out.status.success() {
        bail!(
            "fio write of {len} bytes at {offset} on {} failed ({}): {}",
            dev.display(),
            out.status,
            out.tail()
        );
    }
    parse(&out.stdout).with_context(|| format!("fio write at {offset} on {}", dev.display()))
}

/// Reads fio's JSON (which may follow notices on stdout).
pub fn parse(stdout: &str) -> Result<Sample> {
    let start = stdout.find('{').context("no JSON in fio's output")?;
    let v: Value = serde_json::from_str(&stdout[start..]).context("fio's JSON")?;
    let job = v["jobs"].get(0).context("fio's JSON has no jobs")?;
    let error = job["error"].as_i64().unwrap_or(0);
    if error != 0 {
        bail!("fio job error {error}");
    }
    let dir = |d: &str| -> (f64, f64, Option<f64>, Option<f64>) {
        let s = &job[d];
        let iops = s["iops"].as_f64().unwrap_or(0.0);
        let kib_s = s["bw"].as_f64().unwrap_or(0.0);
        let ios = s["total_ios"].as_u64().unwrap_or(0);
        let clat = &s["clat_ns"];
        let p99 = clat["percentile"]["99.000000"]
            .as_f64()
            .filter(|_| ios > 0)
            .map(|ns| ns / 1000.0);
        let mean = clat["mean"]
            .as_f64()
            .filter(|_| ios > 0)
            .map(|ns| ns / 1000.0);
        (iops, kib_s, p99, mean)
    };
    let (r_iops, r_bw, r_p99, r_mean) = dir("read");
    let (w_iops, w_bw, w_p99, w_mean) = dir("write");
    if r_iops + w_iops <= 0.0 {
        bail!("fio did no IO");
    }
    Ok(Sample {
        iops: r_iops + w_iops,
        mib_s: (r_bw + w_bw) / 1024.0,
        read_iops: r_iops,
        write_iops: w_iops,
        read_p99_us: r_p99,
        write_p99_us: w_p99,
        read_mean_us: r_mean,
        write_mean_us: w_mean,
        server_cpu_cores: None,
    })
}

pub fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.partial_cmp(b).expect("finite"));
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// The median of each figure over rounds (each figure on its own).
pub fn median_sample(samples: &[Sample]) -> Option<Sample> {
    if samples.is_empty() {
        return None;
    }
    let m = |f: &dyn Fn(&Sample) -> f64| median(samples.iter().map(f).collect()).unwrap_or(0.0);
    let mo = |f: &dyn Fn(&Sample) -> Option<f64>| median(samples.iter().filter_map(f).collect());
    Some(Sample {
        iops: m(&|s| s.iops),
        mib_s: m(&|s| s.mib_s),
        read_iops: m(&|s| s.read_iops),
        write_iops: m(&|s| s.write_iops),
        read_p99_us: mo(&|s| s.read_p99_us),
        write_p99_us: mo(&|s| s.write_p99_us),
        read_mean_us: mo(&|s| s.read_mean_us),
        write_mean_us: mo(&|s| s.write_mean_us),
        server_cpu_cores: mo(&|s| s.server_cpu_cores),
    })
}

//! What a run produced: results.json, the table (terminal and Markdown) and the chart.

use crate::control::{DockerTiming, PluginTiming};
use crate::host::{DeviceInfo, Machine};
use crate::job::{Sample, PROFILES};
use crate::targets::{IoPath, Kind, SnapJob, SnapSetup};
use anyhow::{Context, Result};
use comfy_table::{presets, CellAlignment, ContentArrangement, Table};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Debug, Serialize)]
pub struct Results {
    pub mode: String,
    pub machine: Machine,
    pub backing: Backing,
    pub params: RunParams,
    pub versions: BTreeMap<String, String>,
    pub targets: Vec<TargetInfo>,
    pub profiles: Vec<ProfileResult>,
    pub control_plane: ControlPlane,
    pub memory: Memory,
    /// What a reader must know to read the numbers.
    pub notes: Vec<String>,
    /// Anything that went wrong but did not stop the run.
    pub problems: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct Backing {
    /// Filesystem type and source, as findmnt reports it.
    pub fs: String,
    pub dir: String,
    /// A tmpfs mounted by the harness (the default) or a real filesystem (`--dir`).
    pub harness_tmpfs: bool,
}

#[derive(Debug, Serialize)]
pub struct RunParams {
    pub rounds: usize,
    pub runtime_s: u64,
    pub ramp_s: u64,
    pub device_size_bytes: u64,
    pub figure: &'static str,
    pub order: String,
}

#[derive(Debug, Serialize)]
pub struct TargetInfo {
    pub name: &'static str,
    pub what: &'static str,
    pub device: DeviceInfo,
    /// The median over every job on this target of the CPU its server used
    /// (cores); none for the limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_cpu_cores_median: Option<f64>,
    /// For the dunnage targets: the daemon's `--fuse-passthrough` and whether
    /// passthrough served the volume, as far as the daemon says.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub io_path: Option<IoPath>,
    /// For dunnage-10snaps: how its snapshots were made, and how much of
    /// the volume they shared before and after the profiles.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshots: Option<SnapSetup>,
}

#[derive(Debug, Serialize, Default)]
pub struct PerTarget {
    /// Median over the rounds that succeeded.
    pub median: Option<Sample>,
    pub rounds: Vec<Sample>,
    pub errors: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct ProfileResult {
    pub id: &'static str,
    pub title: &'static str,
    pub job: String,
    pub results: BTreeMap<&'static str, PerTarget>,
    /// IOPS ratios (the same as bandwidth ratios at a fixed block size).
    pub ratios: Ratios,
}

#[derive(Debug, Serialize, Default, Clone, Copy)]
pub struct Ratios {
    pub dunnage_limit: Option<f64>,
    pub dunnage_peer: Option<f64>,
    pub peer_limit: Option<f64>,
    pub dunnage_engine_limit: Option<f64>,
    pub dunnage_engine_peer: Option<f64>,
    /// The engine path (`--fuse-passthrough off`) ÷ the default (`auto`).
    pub dunnage_engine_dunnage: Option<f64>,
    /// dunnage-ublk (where the kernel has ublk) ÷ the limit, the peer,
    /// dunnage, and dunnage-engine (the same engine path over FUSE).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dunnage_ublk_limit: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dunnage_ublk_peer: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dunnage_ublk_dunnage: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dunnage_ublk_dunnage_engine: Option<f64>,
    /// The encrypted volume (dunnage-secure) ÷ the limit, the peer,
    /// dunnage, and dunnage-engine (the same path without encryption).
    pub dunnage_secure_limit: Option<f64>,
    pub dunnage_secure_peer: Option<f64>,
    pub dunnage_secure_dunnage: Option<f64>,
    pub dunnage_secure_dunnage_engine: Option<f64>,
    /// The volume with 10 snapshots (dunnage-10snaps) ÷ the same four.
    pub dunnage_10snaps_limit: Option<f64>,
    pub dunnage_10snaps_peer: Option<f64>,
    pub dunnage_10snaps_dunnage: Option<f64>,
    pub dunnage_10snaps_dunnage_engine: Option<f64>,
    /// The replicated volumes ÷ the limit, and ÷ dunnage-engine: the same
    /// engine path with one copy, i.e. what replication costs.
    pub dunnage_repl2_limit: Option<f64>,
    pub dunnage_repl2_dunnage_engine: Option<f64>,
    pub dunnage_repl3_limit: Option<f64>,
    pub dunnage_repl3_dunnage_engine: Option<f64>,
    /// For the latency profile: p99 write latency of dunnage ÷ that of the limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p99_dunnage_limit: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p99_dunnage_engine_limit: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p99_dunnage_ublk_limit: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p99_dunnage_secure_limit: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p99_dunnage_10snaps_limit: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p99_dunnage_repl2_limit: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p99_dunnage_repl3_limit: Option<f64>,
    /// p99 write latency of a replicated volume ÷ that of dunnage-engine.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p99_dunnage_repl2_dunnage_engine: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p99_dunnage_repl3_dunnage_engine: Option<f64>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome<T> {
    Measured(T),
    NotMeasured(String),
}

#[derive(Debug, Serialize)]
pub struct ControlPlane {
    pub plugin: Outcome<PluginTiming>,
    pub docker_run: Outcome<DockerTiming>,
}

#[derive(Debug, Serialize, Default)]
pub struct Memory {
    pub daemon_idle_kib: Option<u64>,
    pub daemon_attached_kib: Option<u64>,
    pub daemon_after_io_kib: Option<u64>,
    pub extra_attached_kib: Option<i64>,
    pub extra_after_io_kib: Option<i64>,
    /// The second daemon, `--fuse-passthrough off` (target dunnage-engine).
    pub engine_daemon_idle_kib: Option<u64>,
    pub engine_daemon_after_io_kib: Option<u64>,
    pub engine_extra_after_io_kib: Option<i64>,
    /// The third daemon, `--export ublk` (target dunnage-ublk), where the
    /// kernel has ublk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ublk_daemon_idle_kib: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ublk_daemon_after_io_kib: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ublk_extra_after_io_kib: Option<i64>,
    /// The daemon of dunnage-secure and dunnage-10snaps (default flags).
    pub features_daemon_idle_kib: Option<u64>,
    /// With both volumes attached and dunnage-10snaps set up.
    pub features_daemon_attached_kib: Option<u64>,
    pub features_extra_attached_kib: Option<i64>,
    pub features_daemon_after_io_kib: Option<u64>,
    pub features_extra_after_io_kib: Option<i64>,
    pub qemu_storage_daemon_after_io_kib: Option<u64>,
}

impl Results {
    /// The targets of this run, in run order.
    pub fn kinds(&self) -> Vec<Kind> {
        Kind::ALL
            .into_iter()
            .filter(|k| self.targets.iter().any(|t| t.name == k.name()))
            .collect()
    }
}

impl ProfileResult {
    pub fn get(&self, k: Kind) -> Option<&Sample> {
        self.results.get(k.name()).and_then(|t| t.median.as_ref())
    }

    /// IOPS of `a` ÷ IOPS of `b` (medians).
    pub fn ratio(&self, a: Kind, b: Kind) -> Option<f64> {
        iops_ratio(&self.results, a, b)
    }
}

fn iops_ratio(results: &BTreeMap<&'static str, PerTarget>, a: Kind, b: Kind) -> Option<f64> {
    let iops = |k: Kind| {
        results
            .get(k.name())
            .and_then(|t| t.median)
            .map(|s| s.iops)
            .filter(|v| *v > 0.0)
    };
    Some(iops(a)? / iops(b)?)
}

pub fn ratios(results: &BTreeMap<&'static str, PerTarget>, latency: bool) -> Ratios {
    let m = |k: Kind| results.get(k.name()).and_then(|t| t.median);
    let r = |a: Kind, b: Kind| iops_ratio(results, a, b);
    let p99 = |k: Kind| m(k).and_then(|s| s.write_p99_us).filter(|v| *v > 0.0);
    let p99_over = |a: Kind, b: Kind| {
        if latency {
            Some(p99(a)? / p99(b)?)
        } else {
            None
        }
    };
    let p99_ratio = |a: Kind| p99_over(a, Kind::Limit);
    Ratios {
        dunnage_limit: r(Kind::Dunnage, Kind::Limit),
        dunnage_peer: r(Kind::Dunnage, Kind::Peer),
        peer_limit: r(Kind::Peer, Kind::Limit),
        dunnage_engine_limit: r(Kind::DunnageEngine, Kind::Limit),
        dunnage_engine_peer: r(Kind::DunnageEngine, Kind::Peer),
        dunnage_engine_dunnage: r(Kind::DunnageEngine, Kind::Dunnage),
        dunnage_ublk_limit: r(Kind::DunnageUblk, Kind::Limit),
        dunnage_ublk_peer: r(Kind::DunnageUblk, Kind::Peer),
        dunnage_ublk_dunnage: r(Kind::DunnageUblk, Kind::Dunnage),
        dunnage_ublk_dunnage_engine: r(Kind::DunnageUblk, Kind::DunnageEngine),
        dunnage_secure_limit: r(Kind::DunnageSecure, Kind::Limit),
        dunnage_secure_peer: r(Kind::DunnageSecure, Kind::Peer),
        dunnage_secure_dunnage: r(Kind::DunnageSecure, Kind::Dunnage),
        dunnage_secure_dunnage_engine: r(Kind::DunnageSecure, Kind::DunnageEngine),
        dunnage_10snaps_limit: r(Kind::DunnageSnaps, Kind::Limit),
        dunnage_10snaps_peer: r(Kind::DunnageSnaps, Kind::Peer),
        dunnage_10snaps_dunnage: r(Kind::DunnageSnaps, Kind::Dunnage),
        dunnage_10snaps_dunnage_engine: r(Kind::DunnageSnaps, Kind::DunnageEngine),
        dunnage_repl2_limit: r(Kind::DunnageRepl2, Kind::Limit),
        dunnage_repl2_dunnage_engine: r(Kind::DunnageRepl2, Kind::DunnageEngine),
        dunnage_repl3_limit: r(Kind::DunnageRepl3, Kind::Limit),
        dunnage_repl3_dunnage_engine: r(Kind::DunnageRepl3, Kind::DunnageEngine),
        p99_dunnage_limit: p99_ratio(Kind::Dunnage),
        p99_dunnage_engine_limit: p99_ratio(Kind::DunnageEngine),
        p99_dunnage_ublk_limit: p99_ratio(Kind::DunnageUblk),
        p99_dunnage_secure_limit: p99_ratio(Kind::DunnageSecure),
        p99_dunnage_10snaps_limit: p99_ratio(Kind::DunnageSnaps),
        p99_dunnage_repl2_limit: p99_ratio(Kind::DunnageRepl2),
        p99_dunnage_repl3_limit: p99_ratio(Kind::DunnageRepl3),
        p99_dunnage_repl2_dunnage_engine: p99_over(Kind::DunnageRepl2, Kind::DunnageEngine),
        p99_dunnage_repl3_dunnage_engine: p99_over(Kind::DunnageRepl3, Kind::DunnageEngine),
    }
}

fn fmt_iops(v: f64) -> String {
    if v >= 10_000.0 {
        format!("{:.1}k", v / 1000.0)
    } else if v >= 1000.0 {
        format!("{:.2}k", v / 1000.0)
    } else {
        format!("{v:.0}")
    }
}

fn fmt_mib(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

fn fmt_ratio(v: Option<f64>) -> String {
    v.map(|r| format!("{r:.2}×"))
        .unwrap_or_else(|| "n/a".into())
}

fn fmt_ms(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0} ms")
    } else {
        format!("{v:.1} ms")
    }
}

fn fmt_mib_kib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn fmt_delta_kib(kib: i64) -> String {
    format!("{:+.1} MiB", kib as f64 / 1024.0)
}

/// Whether the main table shows the ratio of target `k` to target `base`.
fn ratio_shown(k: Kind, base: Kind) -> bool {
    match base {
        Kind::Limit => k != Kind::Limit,
        Kind::Peer => k.is_dunnage(),
        Kind::Dunnage => k.is_dunnage() && k != Kind::Dunnage,
        _ => matches!(
            k,
            Kind::DunnageSecure
                | Kind::DunnageSnaps
                | Kind::DunnageRepl2
                | Kind::DunnageRepl3
                | Kind::DunnageUblk
        ),
    }
}

/// The main table: a row per profile and target, in run order, with IOPS,
/// MiB/s, the p99 write latency of the latency profile, the CPU its server
/// used, and its IOPS ratio to the limit, to the peer, (for the dunnage
/// targets on the engine path) to dunnage with passthrough allowed, and (for
/// dunnage-secure, dunnage-10snaps, the replicated rows and dunnage-ublk) to
/// dunnage-engine, the same engine path on FUSE without encryption,
/// snapshots or replicas. A ratio column whose base was not run (`--only`),
/// or that no row of the run has, is left out.
pub fn main_table(r: &Results, markdown: bool) -> Table {
    let mut t = Table::new();
    t.load_preset(if markdown {
        presets::ASCII_MARKDOWN
    } else {
        presets::UTF8_FULL_CONDENSED
    });
    if !markdown {
        t.set_content_arrangement(ContentArrangement::Disabled);
    }
    let kinds = r.kinds();
    let bases: Vec<Kind> = [Kind::Limit, Kind::Peer, Kind::Dunnage, Kind::DunnageEngine]
        .into_iter()
        .filter(|&b| kinds.contains(&b) && kinds.iter().any(|&k| ratio_shown(k, b)))
        .collect();
    let mut header: Vec<String> = [
        "profile",
        "target",
        "IOPS",
        "MiB/s",
        "write p99 µs",
        "server CPU (cores)",
    ]
    .map(String::from)
    .into();
    header.extend(bases.iter().map(|b| format!("÷ {}", b.name())));
    t.set_header(header);
    let dash = || "—".to_string();
    for p in &r.profiles {
        let latency = PROFILES.iter().any(|q| q.id == p.id && q.latency);
        for (i, &k) in kinds.iter().enumerate() {
            let mut row = vec![
                if i == 0 {
                    p.title.to_string()
                } else {
                    String::new()
                },
                k.name().to_string(),
            ];
            let s = p.get(k);
            match s {
                Some(s) => {
                    row.push(fmt_iops(s.iops));
                    row.push(fmt_mib(s.mib_s));
                }
                None => {
                    row.push("failed".into());
                    row.push(dash());
                }
            }
            row.push(if latency {
                s.and_then(|s| s.write_p99_us)
                    .map(|v| format!("{v:.0}"))
                    .unwrap_or_else(|| "n/a".into())
            } else {
                String::new()
            });
            row.push(match (k, s) {
                (Kind::Limit, _) => dash(),
                (_, Some(s)) => s
                    .server_cpu_cores
                    .map(|c| format!("{c:.2}"))
                    .unwrap_or_else(|| "n/a".into()),
                (_, None) => dash(),
            });
            for &base in &bases {
                row.push(if ratio_shown(k, base) {
                    fmt_ratio(p.ratio(k, base))
                } else {
                    String::new()
                });
            }
            t.add_row(row);
        }
    }
    for i in 2..t.column_count() {
        if let Some(c) = t.column_mut(i) {
            c.set_cell_alignment(CellAlignment::Right);
        }
    }
    t
}

/// For the dunnage targets: the daemon's `--fuse-passthrough` and what it
/// says about the path that served the volume.
pub fn io_path_lines(r: &Results) -> Vec<String> {
    r.targets
        .iter()
        .filter_map(|t| {
            let p = t.io_path.as_ref()?;
            let said = match p.passthrough {
                Some(true) => "passthrough on".to_string(),
                Some(false) => "passthrough off".to_string(),
                None => "passthrough unknown".to_string(),
            };
            let mut line = format!(
                "{}: --fuse-passthrough {}; {said} ({})",
                t.name, p.fuse_passthrough_flag, p.source
            );
            for l in &p.log_lines {
                line.push_str(&format!("; log: {l}"));
            }
            if let (Some(c), Some(daemon)) = (t.server_cpu_cores_median, p.cpu_says_daemon_did_io) {
                line.push_str(&format!(
                    "; daemon CPU while fio ran: median {c:.2} cores, so the IO went {}",
                    if daemon {
                        "through the daemon"
                    } else {
                        "straight to the data file"
                    }
                ));
            }
            Some(line)
        })
        .collect()
}

/// For dunnage-10snaps: how its snapshots were made and what they shared.
pub fn snapshot_lines(r: &Results) -> Vec<String> {
    let mib = |b: u64| format!("{:.0} MiB", b as f64 / f64::from(1 << 20));
    let pct = |a: u64, b: u64| {
        if b > 0 {
            format!(" ({:.0}%)", a as f64 * 100.0 / b as f64)
        } else {
            String::new()
        }
    };
    r.targets
        .iter()
        .filter_map(|t| {
            let s = t.snapshots.as_ref()?;
            let mut line = format!(
                "{}: {}; snapshots {}; prefill {:.0} MiB/s, overwrites {} MiB/s (median), setup {:.1} s",
                t.name,
                s.scheme,
                s.snapshots.join(", "),
                s.prefill_mib_s,
                s.overwrite_mib_s_median
                    .map_or_else(|| "n/a".to_string(), |v| format!("{v:.0}")),
                s.setup_s
            );
            if let Some(a) = s.space_at_start {
                line.push_str(&format!(
                    "; after the setup {} of the {} the volume used were shared with snapshots{}, the snapshots alone held {}",
                    mib(a.shared_bytes),
                    mib(a.used_bytes),
                    pct(a.shared_bytes, a.used_bytes),
                    mib(a.snapshot_bytes)
                ));
            }
            // What each profile's jobs copied: shared at the start − at the end.
            let copied: Vec<String> = PROFILES
                .iter()
                .filter_map(|p| {
                    let jobs: Vec<&SnapJob> = s.jobs.iter().filter(|j| j.profile == p.id).collect();
                    let start = crate::job::median(
                        jobs.iter().map(|j| j.shared_bytes_at_start as f64).collect(),
                    )?;
                    let done = crate::job::median(
                        jobs.iter()
                            .filter_map(|j| {
                                Some(j.shared_bytes_at_start.saturating_sub(j.shared_bytes_at_end?) as f64)
                            })
                            .collect(),
                    )?;
                    Some(format!(
                        "{} {} of {}",
                        p.title,
                        mib(done as u64),
                        mib(start as u64)
                    ))
                })
                .collect();
            if !copied.is_empty() {
                line.push_str(&format!(
                    "; shared blocks copied by a job (median over rounds), of those shared when it began: {}",
                    copied.join(", ")
                ));
            }
            if let Some(b) = s.space_after_io {
                line.push_str(&format!(
                    "; after the profiles the snapshots held {} alone",
                    mib(b.snapshot_bytes)
                ));
            }
            Some(line)
        })
        .collect()
}

/// Control plane and memory, one row each.
pub fn side_table(r: &Results, markdown: bool) -> Table {
    let mut t = Table::new();
    t.load_preset(if markdown {
        presets::ASCII_MARKDOWN
    } else {
        presets::UTF8_FULL_CONDENSED
    });
    t.set_header(vec!["measure", "value"]);
    match &r.control_plane.plugin {
        Outcome::Measured(p) => {
            let n = p.total.samples_ms.len();
            for (what, tm) in [
                ("Create", &p.create),
                ("Mount (attach, mkfs, mount)", &p.mount),
                ("Unmount", &p.unmount),
                ("Remove", &p.remove),
                ("Create + Mount + Unmount + Remove", &p.total),
            ] {
                t.add_row(vec![
                    format!("plugin {what}, {} volume (median of {n})", p.volume),
                    fmt_ms(tm.median_ms),
                ]);
            }
        }
        Outcome::NotMeasured(why) => {
            t.add_row(vec![
                "plugin Create + Mount + Unmount + Remove".to_string(),
                format!("not measured: {why}"),
            ]);
        }
    }
    match &r.control_plane.docker_run {
        Outcome::Measured(d) => {
            let n = d.dunnage.samples_ms.len();
            t.add_row(vec![
                format!(
                    "`docker run --rm -v VOL:/data busybox true`, dunnage volume (median of {n})"
                ),
                fmt_ms(d.dunnage.median_ms),
            ]);
            t.add_row(vec![
                format!(
                    "`docker run --rm -v VOL:/data busybox true`, local volume (median of {n})"
                ),
                fmt_ms(d.local.median_ms),
            ]);
            t.add_row(vec![
                "docker run: dunnage − local".to_string(),
                format!("{:+.1} ms", d.dunnage.median_ms - d.local.median_ms),
            ]);
        }
        Outcome::NotMeasured(why) => {
            t.add_row(vec![
                "`docker run -v VOL:/data`, dunnage vs local".to_string(),
                format!("not measured: {why}"),
            ]);
        }
    }
    let m = &r.memory;
    let na = || "n/a".to_string();
    // A daemon's rows only where it served a target of the run (`--only`).
    let kinds = r.kinds();
    let ran = |k: Kind| kinds.contains(&k);
    if ran(Kind::Dunnage) {
        t.add_row(vec![
            "daemon RSS, idle".to_string(),
            m.daemon_idle_kib.map(fmt_mib_kib).unwrap_or_else(na),
        ]);
        t.add_row(vec![
            "daemon RSS, extra with the bench volume attached".to_string(),
            m.extra_attached_kib.map(fmt_delta_kib).unwrap_or_else(na),
        ]);
        t.add_row(vec![
            "daemon RSS, extra after the IO run".to_string(),
            m.extra_after_io_kib.map(fmt_delta_kib).unwrap_or_else(na),
        ]);
    }
    if ran(Kind::DunnageEngine) {
        t.add_row(vec![
            "second daemon (--fuse-passthrough off) RSS, idle".to_string(),
            m.engine_daemon_idle_kib.map(fmt_mib_kib).unwrap_or_else(na),
        ]);
        t.add_row(vec![
            "second daemon (--fuse-passthrough off) RSS, extra after the IO run".to_string(),
            m.engine_extra_after_io_kib
                .map(fmt_delta_kib)
                .unwrap_or_else(na),
        ]);
    }
    if m.ublk_daemon_idle_kib.is_some() {
        t.add_row(vec![
            "third daemon (--export ublk) RSS, idle".to_string(),
            m.ublk_daemon_idle_kib.map(fmt_mib_kib).unwrap_or_else(na),
        ]);
        t.add_row(vec![
            "third daemon (--export ublk) RSS, extra after the IO run".to_string(),
            m.ublk_extra_after_io_kib
                .map(fmt_delta_kib)
                .unwrap_or_else(na),
        ]);
    }
    if ran(Kind::DunnageSecure) || ran(Kind::DunnageSnaps) {
        let set_up = match (ran(Kind::DunnageSecure), ran(Kind::DunnageSnaps)) {
            (true, true) => "both volumes set up".to_string(),
            (true, false) => format!("the {} volume set up", Kind::DunnageSecure.name()),
            _ => format!("the {} volume set up", Kind::DunnageSnaps.name()),
        };
        t.add_row(vec![
            "daemon of dunnage-secure and dunnage-10snaps RSS, idle".to_string(),
            m.features_daemon_idle_kib
                .map(fmt_mib_kib)
                .unwrap_or_else(na),
        ]);
        t.add_row(vec![
            format!("daemon of dunnage-secure and dunnage-10snaps RSS, extra with {set_up}"),
            m.features_extra_attached_kib
                .map(fmt_delta_kib)
                .unwrap_or_else(na),
        ]);
        t.add_row(vec![
            "daemon of dunnage-secure and dunnage-10snaps RSS, extra after the IO run".to_string(),
            m.features_extra_after_io_kib
                .map(fmt_delta_kib)
                .unwrap_or_else(na),
        ]);
    }
    if ran(Kind::Peer) {
        t.add_row(vec![
            "qemu-storage-daemon RSS after the IO run".to_string(),
            m.qemu_storage_daemon_after_io_kib
                .map(fmt_mib_kib)
                .unwrap_or_else(na),
        ]);
    }
    t.column_mut(1)
        .expect("two columns")
        .set_cell_alignment(CellAlignment::Right);
    t
}

/// One line that says where the numbers come from.
pub fn summary_line(r: &Results) -> String {
    format!(
        "{} run, {} on {} ({} CPUs, kernel {}), backing fs {}; {} round(s) of {} s per job (+{} s ramp), {} MiB devices; median per figure; fio ioengine=libaio direct=1.",
        r.mode,
        r.machine.date,
        r.machine.cpu_model,
        r.machine.nproc,
        r.machine.kernel,
        r.backing.fs,
        r.params.rounds,
        r.params.runtime_s,
        r.params.ramp_s,
        r.params.device_size_bytes >> 20,
    )
}

pub fn markdown(r: &Results) -> String {
    let mut s = String::new();
    s.push_str(&format!("{}\n\n", summary_line(r)));
    for n in &r.notes {
        s.push_str(&format!("Note: {n}\n\n"));
    }
    s.push_str("Targets: ");
    s.push_str(
        &r.targets
            .iter()
            .map(|t| format!("**{}** = {}", t.name, t.what))
            .collect::<Vec<_>>()
            .join("; "),
    );
    s.push_str(".\n\n");
    let io = io_path_lines(r);
    if !io.is_empty() {
        s.push_str("IO path:\n\n");
        for l in io {
            s.push_str(&format!("- {l}\n"));
        }
        s.push('\n');
    }
    let snaps = snapshot_lines(r);
    if !snaps.is_empty() {
        s.push_str("Snapshots:\n\n");
        for l in snaps {
            s.push_str(&format!("- {l}\n"));
        }
        s.push('\n');
    }
    s.push_str(&main_table(r, true).to_string());
    s.push_str("\n\n");
    s.push_str(&side_table(r, true).to_string());
    s.push('\n');
    if !r.problems.is_empty() {
        s.push_str("\nProblems during the run:\n\n");
        for p in &r.problems {
            s.push_str(&format!("- {}\n", p.replace('\n', " ")));
        }
    }
    s
}

/// results.json's text.
pub fn json_text(r: &Results) -> Result<String> {
    Ok(serde_json::to_string_pretty(r).context("results as JSON")? + "\n")
}

const FONT_DIR: &str = "/usr/share/fonts/truetype/dejavu";

/// Registers DejaVu Sans (Debian's fonts-dejavu-core) as plotters' sans-serif.
fn load_fonts() -> Result<()> {
    use plotters::style::{register_font, FontStyle};
    for (file, style) in [
        ("DejaVuSans.ttf", FontStyle::Normal),
        ("DejaVuSans-Bold.ttf", FontStyle::Bold),
    ] {
        let path = Path::new(FONT_DIR).join(file);
        let bytes = std::fs::read(&path).with_context(|| {
            format!(
                "read {} (install fonts-dejavu-core: scripts/install-deps.sh)",
                path.display()
            )
        })?;
        // plotters keeps fonts for the life of the process.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        register_font("sans-serif", style, bytes)
            .map_err(|_| anyhow::anyhow!("{} is not a usable font", path.display()))?;
    }
    Ok(())
}

/// A grouped bar chart: each target's IOPS ÷ the limit's, per profile.
pub fn chart(r: &Results, path: &Path) -> Result<()> {
    use plotters::prelude::*;
    use plotters::style::text_anchor::{HPos, Pos, VPos};
    load_fonts()?;
    let err = |e: &dyn std::fmt::Display| anyhow::anyhow!("drawing {}: {e}", path.display());

    let n = r.profiles.len();
    let kinds = r.kinds();
    if !kinds.contains(&Kind::Limit) {
        anyhow::bail!(
            "its bars are ratios to the {}, which this run left out (--only)",
            Kind::Limit.name()
        );
    }
    let value = |p: &ProfileResult, k: Kind| match k {
        Kind::Limit => p.get(Kind::Limit).map(|_| 1.0),
        _ => p.ratio(k, Kind::Limit),
    };
    let top = r
        .profiles
        .iter()
        .flat_map(|p| kinds.iter().map(move |&k| value(p, k)))
        .flatten()
        .fold(1.0f64, f64::max)
        * 1.3;
    let color_of = |k: Kind| match k {
        Kind::Limit => RGBColor(150, 150, 150),
        Kind::Peer => RGBColor(230, 145, 56),
        Kind::Dunnage => RGBColor(31, 119, 180),
        Kind::DunnageEngine => RGBColor(44, 160, 44),
        Kind::DunnageSecure => RGBColor(214, 39, 40),
        Kind::DunnageSnaps => RGBColor(140, 86, 75),
        Kind::DunnageRepl2 => RGBColor(23, 190, 207),
        Kind::DunnageRepl3 => RGBColor(188, 189, 34),
        Kind::DunnageUblk => RGBColor(148, 103, 189),
    };

    let root = BitMapBackend::new(path, (1400, 700)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let caption = format!(
        "IOPS relative to the limit (kernel loop, direct IO), median of {} round(s), {}",
        r.params.rounds, r.backing.fs
    );
    let mut chart = ChartBuilder::on(&root)
        .caption(caption, ("sans-serif", 22))
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..n as f64, 0f64..top)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .y_max_light_lines(1)
        .x_labels(0)
        .y_desc("ratio to the limit")
        .y_label_formatter(&|v| format!("{v:.1}"))
        .label_style(("sans-serif", 16))
        .draw()
        .map_err(|e| err(&e))?;
    // The bars of a profile fill 0.8 of its slot, 0.1 either side.
    let width = 0.8 / kinds.len() as f64;
    for (ki, &k) in kinds.iter().enumerate() {
        let color = color_of(k);
        let bars: Vec<Rectangle<(f64, f64)>> = r
            .profiles
            .iter()
            .enumerate()
            .filter_map(|(i, p)| {
                let v = value(p, k)?;
                let x0 = i as f64 + 0.1 + ki as f64 * width;
                Some(Rectangle::new(
                    [(x0, 0.0), (x0 + width * 0.92, v)],
                    color.filled(),
                ))
            })
            .collect();
        chart
            .draw_series(bars)
            .map_err(|e| err(&e))?
            .label(k.name())
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], color.filled()));
        let labels: Vec<Text<(f64, f64), String>> = r
            .profiles
            .iter()
            .enumerate()
            .filter_map(|(i, p)| {
                let v = value(p, k)?;
                let x = i as f64 + 0.1 + ki as f64 * width + width * 0.46;
                Some(Text::new(
                    format!("{v:.2}"),
                    (x, v),
                    ("sans-serif", 14)
                        .into_font()
                        .into_text_style(&root)
                        .pos(Pos::new(HPos::Center, VPos::Bottom)),
                ))
            })
            .collect();
        chart.draw_series(labels).map_err(|e| err(&e))?;
    }
    chart
        .draw_series(std::iter::once(PathElement::new(
            vec![(0.0, 1.0), (n as f64, 1.0)],
            BLACK.stroke_width(1),
        )))
        .map_err(|e| err(&e))?;
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .label_font(("sans-serif", 16))
        .draw()
        .map_err(|e| err(&e))?;
    // Profile names under each group, in pixels of the whole picture.
    let style = ("sans-serif", 17)
        .into_font()
        .into_text_style(&root)
        .pos(Pos::new(HPos::Center, VPos::Top));
    for (i, p) in r.profiles.iter().enumerate() {
        let (x, y) = chart.backend_coord(&(i as f64 + 0.5, 0.0));
        root.draw(&Text::new(p.title.to_string(), (x, y + 10), style.clone()))
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

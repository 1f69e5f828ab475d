//! What a run produced: results.json, the table (terminal and Markdown) and the chart.

use crate::control::{DockerTiming, PluginTiming};
use crate::host::{DeviceInfo, Machine};
use crate::job::{Sample, PROFILES};
use crate::targets::Kind;
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
    pub order: &'static str,
}

#[derive(Debug, Serialize)]
pub struct TargetInfo {
    pub name: &'static str,
    pub what: &'static str,
    pub device: DeviceInfo,
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
    /// For the latency profile: p99 write latency of dunnage ÷ that of the limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p99_dunnage_limit: Option<f64>,
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
    pub qemu_storage_daemon_after_io_kib: Option<u64>,
}

impl ProfileResult {
    pub fn get(&self, k: Kind) -> Option<&Sample> {
        self.results.get(k.name()).and_then(|t| t.median.as_ref())
    }
}

pub fn ratios(results: &BTreeMap<&'static str, PerTarget>, latency: bool) -> Ratios {
    let m = |k: Kind| results.get(k.name()).and_then(|t| t.median);
    let iops = |k: Kind| m(k).map(|s| s.iops).filter(|v| *v > 0.0);
    let div = |a: Option<f64>, b: Option<f64>| Some(a? / b?);
    let p99 = |k: Kind| m(k).and_then(|s| s.write_p99_us).filter(|v| *v > 0.0);
    Ratios {
        dunnage_limit: div(iops(Kind::Dunnage), iops(Kind::Limit)),
        dunnage_peer: div(iops(Kind::Dunnage), iops(Kind::Peer)),
        peer_limit: div(iops(Kind::Peer), iops(Kind::Limit)),
        p99_dunnage_limit: if latency {
            div(p99(Kind::Dunnage), p99(Kind::Limit))
        } else {
            None
        },
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

/// The main table: per profile, IOPS and MiB/s of each target, p99 of the
/// latency profile, and dunnage's ratios.
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
    let mut header = vec!["profile".to_string()];
    for k in Kind::ALL {
        header.push(format!("{} IOPS", k.name()));
        header.push(format!("{} MiB/s", k.name()));
    }
    header.extend([
        "p99 µs limit / peer / dunnage".to_string(),
        "dunnage / limit".to_string(),
        "dunnage / peer".to_string(),
    ]);
    t.set_header(header);
    for p in &r.profiles {
        let mut row = vec![p.title.to_string()];
        for k in Kind::ALL {
            match p.get(k) {
                Some(s) => {
                    row.push(fmt_iops(s.iops));
                    row.push(fmt_mib(s.mib_s));
                }
                None => {
                    row.push("failed".into());
                    row.push("—".into());
                }
            }
        }
        let latency = PROFILES.iter().any(|q| q.id == p.id && q.latency);
        row.push(if latency {
            Kind::ALL
                .iter()
                .map(|k| {
                    p.get(*k)
                        .and_then(|s| s.write_p99_us)
                        .map(|v| format!("{v:.0}"))
                        .unwrap_or_else(|| "n/a".into())
                })
                .collect::<Vec<_>>()
                .join(" / ")
        } else {
            String::new()
        });
        row.push(fmt_ratio(p.ratios.dunnage_limit));
        row.push(fmt_ratio(p.ratios.dunnage_peer));
        t.add_row(row);
    }
    for i in 1..t.column_count() {
        if let Some(c) = t.column_mut(i) {
            c.set_cell_alignment(CellAlignment::Right);
        }
    }
    t
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
    t.add_row(vec![
        "qemu-storage-daemon RSS after the IO run".to_string(),
        m.qemu_storage_daemon_after_io_kib
            .map(fmt_mib_kib)
            .unwrap_or_else(na),
    ]);
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

pub fn write_json(r: &Results, path: &Path) -> Result<()> {
    let text = serde_json::to_string_pretty(r)?;
    std::fs::write(path, text + "\n").with_context(|| format!("write {}", path.display()))
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
                "read {} (install fonts-dejavu-core: scripts/bench-deps.sh)",
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
    let value = |p: &ProfileResult, k: Kind| match k {
        Kind::Limit => p.get(Kind::Limit).map(|_| 1.0),
        Kind::Peer => p.ratios.peer_limit,
        Kind::Dunnage => p.ratios.dunnage_limit,
    };
    let top = r
        .profiles
        .iter()
        .flat_map(|p| Kind::ALL.map(|k| value(p, k)))
        .flatten()
        .fold(1.0f64, f64::max)
        * 1.3;
    let colors = [
        RGBColor(150, 150, 150),
        RGBColor(230, 145, 56),
        RGBColor(31, 119, 180),
    ];

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
    let width = 0.26;
    for (ki, k) in Kind::ALL.into_iter().enumerate() {
        let color = colors[ki];
        let bars: Vec<Rectangle<(f64, f64)>> = r
            .profiles
            .iter()
            .enumerate()
            .filter_map(|(i, p)| {
                let v = value(p, k)?;
                let x0 = i as f64 + 0.11 + ki as f64 * width;
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
                let x = i as f64 + 0.11 + ki as f64 * width + width * 0.46;
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

//! End-to-end block IO with fio, side by side, in one run, on one backing
//! filesystem (DESIGN.md §5):
//!
//! - **limit**: the kernel loop device with direct IO over a raw file;
//! - **peer**: qemu-storage-daemon's FUSE export of a raw file, on a loop device;
//! - **dunnage**: a raw dunnage volume attached with `dunnage attach`, from a
//!   daemon with `--fuse-passthrough auto` (the kernel does IO on the data file
//!   when the volume's layout allows it);
//! - **dunnage-engine**: the same from a second daemon with
//!   `--fuse-passthrough off`: every IO through dunnage's FUSE threads and
//!   engine, the path that snapshots, encryption and replication need;
//! - **dunnage-secure**: an encrypted volume (`secure=true` with its own
//!   `secret_key`, made up for the run and never printed) from a further
//!   daemon with the default `--fuse-passthrough auto`: encryption keeps it
//!   on the engine path;
//! - **dunnage-10snaps**: a volume with 10 snapshots from that same daemon:
//!   prefilled, then 10 × (snapshot, overwrite of the next tenth); before
//!   each of its jobs the newest snapshot is taken again, so that the
//!   measured writes hit blocks shared with it (copy-on-write);
//! - **dunnage-repl2**, **dunnage-repl3**: replicated volumes (`repl=2`,
//!   `repl=3`) attached on n1 of a three-node cluster: each daemon in a
//!   network namespace of its own on a private veth bridge, with its own etcd
//!   (tests/common/netns.rs); every write is acknowledged once every replica
//!   holds it. Compare them with dunnage-engine, the same engine path with one
//!   copy;
//! - **dunnage-ublk**, where the kernel has ublk (`/dev/ublk-control`): the
//!   same from a third daemon with `--export ublk`, every IO through
//!   dunnage's ublk queue threads and engine. Elsewhere the results say why
//!   there is no such row.
//!
//! Each device is written through once (dunnage-10snaps by its setup), then
//! every profile of fixtures/fio/ runs on the targets in turn (limit, peer,
//! dunnage, dunnage-engine, dunnage-secure, dunnage-10snaps, dunnage-repl2,
//! dunnage-repl3[, dunnage-ublk], limit, ...) for each round; a figure is the median of the rounds. Besides fio's figures,
//! each job records the CPU its target's server used, and each dunnage target
//! what the daemon says about passthrough. The same run times the control plane
//! (plugin Create/Mount/Unmount/Remove, `docker run` with a dunnage volume vs a
//! `local` one) and the daemon's memory.
//!
//! `--only NAMES` (comma-separated target names, e.g.
//! `--only dunnage-engine,dunnage-repl2`) runs just those targets, in the
//! order above, and starts only what serves them (`--only dunnage-repl2`:
//! the cluster, no other daemon, no qemu-storage-daemon). The control-plane
//! timings and the memory figures of the daemon under test need dunnage's
//! daemon: without dunnage among the targets they are skipped, and the
//! results say so. `--profiles IDS` runs only those fio profiles (job file
//! stems, e.g. `--profiles randwrite-4k-qd1`), to study one figure.
//!
//! ```text
//! just bench [quick] [--dir PATH] [--rounds N] [--runtime SECS] [--size SIZE] [--no-docker] [--profiles IDS] [--only NAMES]
//! cargo bench --bench fio -- quick
//! cargo bench --bench fio -- --only dunnage-engine,dunnage-repl2
//! ```
//!
//! Needs root, fio, qemu-storage-daemon and the release binary
//! (`cargo build --release`). Writes target/bench/results.json, results.md and
//! chart.png. Everything it sets up is torn down at the end, on error and on Ctrl-C.

#[path = "fio/control.rs"]
mod control;
#[path = "fio/host.rs"]
mod host;
#[path = "fio/job.rs"]
mod job;
#[path = "fio/kind.rs"]
mod kind;
#[path = "../tests/common/netns.rs"]
mod netns;
#[path = "fio/proc.rs"]
mod proc;
#[path = "fio/report.rs"]
mod report;
#[path = "fio/targets.rs"]
mod targets;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use job::{Params, Profile, PROFILES};
use kind::{Server, UBLK_CONTROL};
use proc::{check_stop, cpu_seconds, nap, rss_kib, Teardown};
use report::{Outcome, PerTarget, ProfileResult, Results};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};
use targets::{Kind, Target};

const USAGE: &str = "\
usage: cargo bench --bench fio -- [quick] [options]     (or: just bench [quick] [options])

  quick             one round of 5 s jobs on 512 MiB devices (about 8 minutes)
                    (default: 3 rounds of 15 s jobs on 2 GiB devices, about 45 minutes)
  --dir PATH        put the backing files on the filesystem holding PATH
                    (default: a tmpfs that the bench mounts under /tmp)
  --rounds N        rounds per profile (the figure is the median)
  --runtime SECS    seconds per fio job
  --size SIZE       device size, e.g. 512M, 4G
  --no-docker       skip the `docker run` timing
  --only NAMES      run only these targets (comma-separated), starting only what
                    serves them: limit, peer, dunnage, dunnage-engine,
                    dunnage-secure, dunnage-10snaps, dunnage-repl2, dunnage-repl3,
                    dunnage-ublk (where the kernel has ublk). Without dunnage the
                    control-plane timings and its daemon's memory are skipped
  --profiles IDS    run only these fio profiles (comma-separated job names under
                    fixtures/fio/): randread-4k-qd32, randwrite-4k-qd32,
                    randwrite-4k-qd1, read-1m-qd8, write-1m-qd8, randrw-4k-qd16
  -h, --help        this text

Writes target/bench/results.json, results.md and chart.png.";

const PLUGIN_CYCLES: usize = 10;
const DOCKER_RUNS: usize = 5;

struct Opts {
    quick: bool,
    dir: Option<PathBuf>,
    rounds: usize,
    runtime: u64,
    ramp: u64,
    size: u64,
    docker: bool,
    /// `--only`: the targets to run, in run order; all of them without it.
    only: Option<Vec<Kind>>,
    /// `--profiles`: the fio profiles to run, in table order.
    profiles: Vec<&'static Profile>,
}

fn parse_size(s: &str) -> Result<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().with_context(|| format!("size {s:?}"))?;
    let mult: u64 = match unit.to_ascii_uppercase().as_str() {
        "" | "M" | "MB" | "MIB" | "MI" => 1 << 20,
        "G" | "GB" | "GIB" | "GI" => 1 << 30,
        _ => bail!("size {s:?}: use M or G"),
    };
    let bytes = n * mult;
    if bytes < 64 << 20 {
        bail!("size {s:?}: at least 64M");
    }
    Ok(bytes)
}

/// `--profiles a,b`: the named profiles, in table order.
fn parse_profiles(list: &str) -> Result<Vec<&'static Profile>> {
    let names: Vec<&str> = list.split(',').map(str::trim).collect();
    let known: Vec<&str> = PROFILES.iter().map(|p| p.id).collect();
    if let Some(bad) = names.iter().find(|n| !known.contains(n)) {
        bail!(
            "--profiles: no profile {bad:?}; the profiles are {}",
            known.join(", ")
        );
    }
    Ok(PROFILES.iter().filter(|p| names.contains(&p.id)).collect())
}

impl Opts {
    fn parse(args: &[String]) -> Result<Option<Opts>> {
        let mut o = Opts {
            quick: false,
            dir: None,
            rounds: 3,
            runtime: 15,
            ramp: 2,
            size: 2 << 30,
            docker: true,
            only: None,
            profiles: PROFILES.iter().collect(),
        };
        let (mut rounds, mut runtime, mut size, mut only) = (None, None, None, None);
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let mut value = |name: &str| {
                it.next()
                    .cloned()
                    .with_context(|| format!("{name} needs a value\n\n{USAGE}"))
            };
            match a.as_str() {
                "--bench" => {}
                "quick" | "--quick" => o.quick = true,
                "full" => o.quick = false,
                "--dir" => o.dir = Some(PathBuf::from(value("--dir")?)),
                "--rounds" => rounds = Some(value("--rounds")?.parse().context("--rounds")?),
                "--runtime" => runtime = Some(value("--runtime")?.parse().context("--runtime")?),
                "--size" => size = Some(parse_size(&value("--size")?)?),
                "--no-docker" => o.docker = false,
                "--only" => {
                    let list = value("--only")?;
                    // `--only` last: cargo's own `--bench` follows it.
                    if list.starts_with('-') {
                        bail!("--only needs a value (target names)\n\n{USAGE}");
                    }
                    only = Some(list);
                }
                "--profiles" => {
                    let list = value("--profiles")?;
                    if list.starts_with('-') {
                        bail!("--profiles needs a value (profile names)\n\n{USAGE}");
                    }
                    o.profiles = parse_profiles(&list)?;
                }
                "-h" | "--help" => {
                    println!("{USAGE}");
                    return Ok(None);
                }
                other => bail!("unknown argument {other:?}\n\n{USAGE}"),
            }
        }
        if o.quick {
            (o.rounds, o.runtime, o.ramp, o.size) = (1, 5, 1, 512 << 20);
        }
        o.rounds = rounds.unwrap_or(o.rounds).max(1);
        o.runtime = runtime.unwrap_or(o.runtime).max(1);
        o.size = size.unwrap_or(o.size);
        if let Some(list) = only {
            let ublk = Path::new(UBLK_CONTROL).exists();
            o.only = Some(Kind::parse_list(&list, ublk).map_err(anyhow::Error::msg)?);
        }
        Ok(Some(o))
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // `cargo test --all-targets` runs bench targets too, without `--bench`.
    if !args.iter().any(|a| a == "--bench") {
        println!(
            "benches/fio.rs: the fio benchmark only runs under `cargo bench --bench fio` or `just bench`; nothing to test"
        );
        return ExitCode::SUCCESS;
    }
    let opts = match Opts::parse(&args) {
        Ok(Some(o)) => o,
        Ok(None) => return ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fio bench: {e:#}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = proc::install_signal_handler() {
        eprintln!("fio bench: {e:#}");
        return ExitCode::FAILURE;
    }
    let mut td = Teardown::default();
    let res = bench(&opts, &mut td);
    td.unwind_to(0);
    let problems = std::mem::take(&mut td.problems);
    match res {
        Ok(()) if problems.is_empty() => ExitCode::SUCCESS,
        Ok(()) => {
            eprintln!("fio bench: teardown problems (see above)");
            ExitCode::FAILURE
        }
        Err(e) if proc::stopped() => {
            eprintln!("fio bench: interrupted ({e:#}); torn down");
            ExitCode::from(130)
        }
        Err(e) => {
            eprintln!("fio bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// CPU seconds used so far by all of `pids` (none without them).
fn servers_cpu(pids: &[u32]) -> Option<f64> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().map(|&p| cpu_seconds(p)).sum()
}

fn results_target(infos: &[report::TargetInfo], k: Kind) -> Option<&report::TargetInfo> {
    infos.iter().find(|t| t.name == k.name())
}

/// The daemon started for target `k` (by construction, there is one).
fn daemon_of(d: &Option<targets::Dunnage>, k: Kind) -> Result<&targets::Dunnage> {
    d.as_ref()
        .with_context(|| format!("no daemon started for {}", k.name()))
}

fn manifest_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Progress: a bar on a terminal, plain lines otherwise. Work is counted in
/// expected seconds, so the ETA means something.
struct Progress {
    bar: ProgressBar,
}

impl Progress {
    fn new(total: u64) -> Progress {
        let bar = ProgressBar::new(total);
        bar.set_style(
            ProgressStyle::with_template(
                "{msg}\n{spinner:.green} [{elapsed_precise}] [{wide_bar:.cyan/blue}] {percent:>3}% eta {eta:>4}",
            )
            .expect("template")
            .progress_chars("=> "),
        );
        bar.enable_steady_tick(Duration::from_millis(200));
        Progress { bar }
    }

    fn step(&self, msg: String) {
        if self.bar.is_hidden() {
            eprintln!("fio bench: {msg}");
        }
        self.bar.set_message(msg);
    }

    fn note(&self, msg: String) {
        if self.bar.is_hidden() {
            eprintln!("{msg}");
        } else {
            self.bar.println(msg);
        }
    }

    fn done(&self, work: u64) {
        self.bar.inc(work);
    }
}

fn bench(o: &Opts, td: &mut Teardown) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the fio bench needs root (loop devices, FUSE, mounts)");
    }
    let ublk = Path::new(UBLK_CONTROL).exists();
    let kinds = o.only.clone().unwrap_or_else(|| Kind::selected(ublk));
    let needs = |s: Server| Kind::need(&kinds, s);
    // The control-plane timings and the main memory figures use dunnage's
    // daemon (--fuse-passthrough auto): there whenever --only is absent.
    let control = needs(Server::Passthrough);
    let mut missing = Vec::new();
    let mut tools = vec!["fio", "losetup", "mount", "umount", "findmnt"];
    if needs(Server::QemuStorageDaemon) {
        tools.push("qemu-storage-daemon");
    }
    if needs(Server::Cluster) {
        // The replicated rows' cluster: namespaces, veths, etcd.
        tools.extend(["ip", "nsenter", "etcd", "etcdctl"]);
    }
    for tool in tools {
        if host::which(tool).is_none() {
            missing.push(tool);
        }
    }
    if !missing.is_empty() {
        bail!(
            "missing {}: run scripts/install-deps.sh",
            missing.join(", ")
        );
    }
    let bin = std::env::var_os("DUNNAGE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest_dir().join("target/release/dunnage"));
    if !bin.is_file() {
        bail!(
            "{} is missing: run `cargo build --release` first (or set DUNNAGE_BIN)",
            bin.display()
        );
    }
    let out = manifest_dir().join("target/bench");
    std::fs::create_dir_all(&out).with_context(|| format!("create {}", out.display()))?;
    for f in [
        "dunnage.log",
        "dunnage-engine.log",
        "dunnage-features.log",
        "dunnage-ublk.log",
        "dunnage-n1.log",
        "dunnage-n2.log",
        "dunnage-n3.log",
        "dunnage-docker.log",
        "qemu-storage-daemon.log",
    ] {
        let _ = std::fs::remove_file(out.join(f));
    }

    // The backing directory: our own tmpfs, or a directory on --dir's filesystem.
    let pid = std::process::id();
    let base = o.dir.clone().unwrap_or_else(std::env::temp_dir);
    // Absolute, so that loop devices' backing files can be matched to it.
    let base = std::fs::canonicalize(&base)
        .with_context(|| format!("--dir {}: no such directory", base.display()))?;
    let root = base.join(format!("dunnage-bench-{pid}"));
    std::fs::create_dir(&root).with_context(|| format!("create {}", root.display()))?;
    let tmpfs = o.dir.is_none();
    {
        let root = root.clone();
        td.push(format!("remove {}", root.display()), move || {
            let left = targets::sweep(&root);
            if tmpfs {
                std::fs::remove_dir(&root)?;
            } else {
                std::fs::remove_dir_all(&root)?;
            }
            if !left.is_empty() {
                bail!("left behind: {}", left.join("; "));
            }
            Ok(())
        });
    }
    let n_targets = kinds.len() as u64;
    let devices: u64 = kinds.iter().map(|k| k.space_in_devices()).sum();
    let need = devices * o.size + (1 << 30);
    if tmpfs {
        let avail = host::mem_available_bytes().unwrap_or(u64::MAX);
        if need + (2 << 30) > avail {
            bail!(
                "a tmpfs for {n_targets} devices of {} MiB (with room for the snapshots' copies) needs about {} MiB of memory, {} MiB available; use --size or --dir",
                o.size >> 20,
                need >> 20,
                avail >> 20
            );
        }
        host::mount_tmpfs(&root, need)?;
        let root = root.clone();
        td.push(
            format!("unmount the tmpfs on {}", root.display()),
            move || {
                let left = targets::sweep(&root);
                host::umount(&root, false).or_else(|e| {
                    host::umount(&root, true)?;
                    bail!("{e:#}; unmounted lazily")
                })?;
                if !left.is_empty() {
                    bail!("left behind: {}", left.join("; "));
                }
                Ok(())
            },
        );
    }
    let backing = report::Backing {
        fs: if tmpfs {
            format!("tmpfs ({} MiB, mounted by the bench)", need >> 20)
        } else {
            host::fs_of(&root)
        },
        dir: root.display().to_string(),
        harness_tmpfs: tmpfs,
    };

    let machine = host::Machine::probe();
    let mut versions = BTreeMap::new();
    versions.insert("fio".to_string(), host::version_of("fio"));
    if needs(Server::QemuStorageDaemon) {
        versions.insert(
            "qemu-storage-daemon".to_string(),
            host::version_of("qemu-storage-daemon"),
        );
    }
    versions.insert(
        "dunnage".to_string(),
        host::version_of(&bin.display().to_string()),
    );

    // Work, in expected seconds, for the progress bar.
    let per_job = o.runtime + o.ramp + 1;
    let precond = (o.size >> 20) / 400 + 2;
    let docker_work = if o.docker && control {
        10 + 2 * DOCKER_RUNS as u64
    } else {
        0
    };
    let total = 6
        + kinds.iter().map(|k| k.device_writes()).sum::<u64>() * precond
        + (o.rounds * o.profiles.len()) as u64 * n_targets * per_job
        + if control { PLUGIN_CYCLES as u64 } else { 0 }
        + docker_work;
    let pg = Progress::new(total);
    pg.note(format!(
        "fio bench ({}): {} round(s) x {} profiles x {n_targets} targets, {} s jobs, {} MiB devices on {}",
        if o.quick { "quick" } else { "full" },
        o.rounds,
        o.profiles.len(),
        o.runtime,
        o.size >> 20,
        backing.fs
    ));
    if o.only.is_some() {
        pg.note(format!(
            "--only: {}{}",
            Kind::order(&kinds),
            if control {
                ""
            } else {
                "; no dunnage, so no control-plane timings and no memory figures of its daemon"
            }
        ));
    }

    // The daemon under test, with everything under the backing directory; it
    // stays for the control-plane part. Each daemon starts only when a
    // target of the run needs it (all of them without --only).
    let name = format!("bench-{pid}");
    let d = if control {
        pg.step("starting dunnage serve (--fuse-passthrough auto)".into());
        Some(targets::Dunnage::start(
            &bin,
            &name,
            &root,
            &root.join("plugins"),
            "fuse",
            Kind::Dunnage.fuse_passthrough(),
            &out.join("dunnage.log"),
            td,
        )?)
    } else {
        None
    };
    let data_plane = td.mark();
    // A second daemon with passthrough off, its own directories under the
    // backing directory; it goes with the devices.
    let de = if needs(Server::Engine) {
        pg.step("starting a second dunnage serve (--fuse-passthrough off)".into());
        Some(targets::Dunnage::start(
            &bin,
            &format!("{name}-engine"),
            &root.join("engine"),
            &root.join("plugins"),
            "fuse",
            Kind::DunnageEngine.fuse_passthrough(),
            &out.join("dunnage-engine.log"),
            td,
        )?)
    } else {
        None
    };
    // The encrypted volume and the one with snapshots: a daemon of their
    // own with the default flags, so that what keeps them off passthrough
    // is encryption and snapshots, not a flag, and the memory figures of
    // the other daemons keep their meaning.
    let df = if needs(Server::Features) {
        pg.step("starting a dunnage serve for dunnage-secure and dunnage-10snaps".into());
        Some(targets::Dunnage::start(
            &bin,
            &format!("{name}-features"),
            &root.join("features"),
            &root.join("plugins"),
            "fuse",
            Kind::DunnageSecure.fuse_passthrough(),
            &out.join("dunnage-features.log"),
            td,
        )?)
    } else {
        None
    };
    // Where the kernel has ublk, a third daemon with --export ublk; it
    // goes with the devices too.
    let du = if needs(Server::Ublk) {
        pg.step("starting a third dunnage serve (--export ublk)".into());
        Some(targets::Dunnage::start(
            &bin,
            &format!("{name}-ublk"),
            &root.join("ublk"),
            &root.join("plugins"),
            "ublk",
            None,
            &out.join("dunnage-ublk.log"),
            td,
        )?)
    } else {
        None
    };
    let rss = |d: &Option<targets::Dunnage>| d.as_ref().and_then(|d| rss_kib(d.pid()));
    nap(Duration::from_secs(1));
    let mut memory = report::Memory {
        daemon_idle_kib: rss(&d),
        engine_daemon_idle_kib: rss(&de),
        ublk_daemon_idle_kib: rss(&du),
        features_daemon_idle_kib: rss(&df),
        ..Default::default()
    };
    pg.done(1);

    // The devices, in run order.
    pg.step(format!(
        "setting up the {} devices",
        kinds
            .iter()
            .map(|k| k.name())
            .collect::<Vec<_>>()
            .join(", ")
    ));
    let mut all: Vec<Target> = Vec::new();
    let mut qsd_pid = None;
    let mut secret = None;
    let mut snap_setup = None;
    let mut cluster = None;
    for &k in &kinds {
        let t = match k {
            Kind::Limit => targets::limit(&root, o.size, td)?,
            Kind::Peer => {
                let (t, pid) =
                    targets::peer(&root, o.size, &out.join("qemu-storage-daemon.log"), td)?;
                qsd_pid = Some(pid);
                t
            }
            Kind::Dunnage => targets::dunnage(daemon_of(&d, k)?, k, o.size, td)?,
            Kind::DunnageEngine => targets::dunnage(daemon_of(&de, k)?, k, o.size, td)?,
            Kind::DunnageUblk => targets::dunnage(daemon_of(&du, k)?, k, o.size, td)?,
            Kind::DunnageSecure => {
                let (t, s) = targets::dunnage_secure(daemon_of(&df, k)?, o.size, td)?;
                secret = Some(s);
                t
            }
            Kind::DunnageSnaps => {
                pg.step(format!(
                    "setting up dunnage-10snaps: prefill, then {} × (snapshot, overwrite a tenth)",
                    targets::SNAPSHOTS
                ));
                let (t, setup) = targets::dunnage_snaps(daemon_of(&df, k)?, o.size, td)?;
                pg.note(format!(
                    "  setup        {:<14} {:>7.0} MiB/s prefill, {} snapshots, overwrites {} MiB/s (median), {:.1} s{}",
                    Kind::DunnageSnaps.name(),
                    setup.prefill_mib_s,
                    setup.snapshots.len(),
                    setup
                        .overwrite_mib_s_median
                        .map_or_else(|| "n/a".to_string(), |v| format!("{v:.0}")),
                    setup.setup_s,
                    setup
                        .space_at_start
                        .map(|s| format!(
                            ", {} of {} MiB shared with snapshots",
                            s.shared_bytes >> 20,
                            s.used_bytes >> 20
                        ))
                        .unwrap_or_default()
                ));
                pg.done(2 * precond);
                snap_setup = Some(setup);
                t
            }
            Kind::DunnageRepl2 | Kind::DunnageRepl3 => {
                if cluster.is_none() {
                    pg.step(format!(
                        "starting a {}-node cluster on a veth network with its own etcd",
                        targets::CLUSTER_NODES
                    ));
                    cluster = Some(targets::cluster(
                        &bin,
                        &name,
                        &root.join("cluster"),
                        &root.join("plugins"),
                        &out,
                        td,
                    )?);
                }
                let c = cluster.as_ref().context("the cluster is not up")?;
                targets::dunnage_repl(c, k, o.size, td)?
            }
        };
        all.push(t);
    }
    nap(Duration::from_millis(500));
    memory.daemon_attached_kib = rss(&d);
    memory.features_daemon_attached_kib = rss(&df);
    let mut problems = Vec::new();
    for t in &all {
        if t.info.size_bytes != o.size {
            problems.push(format!(
                "{} device {} has {} bytes, not {}",
                t.kind.name(),
                t.dev.display(),
                t.info.size_bytes,
                o.size
            ));
        }
        if t.kind.engine_path() && t.io_path.as_ref().and_then(|p| p.passthrough) == Some(true) {
            problems.push(format!(
                "{} device {}: the daemon says passthrough serves it, not the engine",
                t.kind.name(),
                t.dev.display()
            ));
        }
        if t.info.direct_io == Some(false) {
            problems.push(format!(
                "{} device {}: the loop driver turned direct IO off",
                t.kind.name(),
                t.dev.display()
            ));
        }
    }
    for p in &problems {
        pg.note(format!("warning: {p}"));
    }
    pg.note(format!(
        "devices: {}",
        all.iter()
            .map(|t| format!("{} {}", t.kind.name(), t.dev.display()))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    for t in &all {
        if let Some(p) = &t.io_path {
            pg.note(format!(
                "io path: {} (--fuse-passthrough {}): passthrough {} ({})",
                t.kind.name(),
                p.fuse_passthrough_flag,
                match p.passthrough {
                    Some(true) => "on",
                    Some(false) => "off",
                    None => "unknown",
                },
                p.source
            ));
        }
    }
    pg.done(5);

    // Write every device through once.
    let mut broken: BTreeMap<&'static str, String> = BTreeMap::new();
    for t in &all {
        check_stop()?;
        if t.kind.written_by_setup() {
            pg.note(format!(
                "  precondition {:<14} skipped: its setup wrote it (a write-through would copy every shared block)",
                t.kind.name()
            ));
            continue;
        }
        pg.step(format!(
            "writing {} through once ({})",
            t.kind.name(),
            t.dev.display()
        ));
        let params = Params {
            dev: &t.dev,
            size: t.info.size_bytes,
            runtime: o.runtime,
            ramp: o.ramp,
        };
        let timeout = Duration::from_secs(120 + (o.size >> 20) / 20);
        match job::run_fio(&job::job_file("precondition"), &params, timeout) {
            Ok(s) => pg.note(format!(
                "  precondition {:<14} {:>7.0} MiB/s",
                t.kind.name(),
                s.mib_s
            )),
            Err(e) => {
                check_stop()?;
                let msg = format!("{e:#}");
                pg.note(format!("  precondition {} FAILED: {msg}", t.kind.name()));
                broken.insert(t.kind.name(), format!("precondition failed: {msg}"));
            }
        }
        pg.done(precond);
    }

    // The profiles, targets interleaved, round after round.
    let mut samples: BTreeMap<(&str, &str), PerTarget> = BTreeMap::new();
    for round in 1..=o.rounds {
        for p in &o.profiles {
            for t in &all {
                check_stop()?;
                let entry = samples.entry((p.id, t.kind.name())).or_default();
                if let Some(why) = broken.get(t.kind.name()) {
                    entry.errors.push(why.clone());
                    pg.done(per_job);
                    continue;
                }
                pg.step(format!(
                    "round {round}/{}: {} on {}",
                    o.rounds,
                    p.title,
                    t.kind.name()
                ));
                let params = Params {
                    dev: &t.dev,
                    size: t.info.size_bytes,
                    runtime: o.runtime,
                    ramp: o.ramp,
                };
                let shared0 = if t.kind == Kind::DunnageSnaps {
                    let retaken = daemon_of(&df, t.kind).and_then(|df| {
                        let setup = snap_setup.as_ref().context("no snapshot setup")?;
                        targets::retake_newest(df, setup)
                    });
                    match retaken {
                        Ok(b) => Some(b),
                        Err(e) => {
                            check_stop()?;
                            let msg =
                                format!("round {round}: taking the newest snapshot again: {e:#}");
                            pg.note(format!(
                                "  r{round} {:<21} {:<14} FAILED: {msg}",
                                p.title,
                                t.kind.name()
                            ));
                            entry.errors.push(msg);
                            pg.done(per_job);
                            continue;
                        }
                    }
                } else {
                    None
                };
                let timeout = Duration::from_secs(o.runtime + o.ramp + 120);
                let cpu0 = servers_cpu(&t.server_pids);
                let t0 = Instant::now();
                let res = job::run_fio(&job::job_file(p.id), &params, timeout);
                let wall = t0.elapsed().as_secs_f64();
                let cpu1 = servers_cpu(&t.server_pids);
                if let (Some(at_start), Some(setup), Some(df)) =
                    (shared0, snap_setup.as_mut(), df.as_ref())
                {
                    setup.jobs.push(targets::SnapJob {
                        profile: p.id,
                        round,
                        shared_bytes_at_start: at_start,
                        shared_bytes_at_end: Kind::DunnageSnaps
                            .volume()
                            .and_then(|v| targets::space(df, v).ok())
                            .map(|s| s.shared_bytes),
                    });
                }
                match res {
                    Ok(mut s) => {
                        s.server_cpu_cores = match (cpu0, cpu1) {
                            (Some(a), Some(b)) if wall > 0.0 => Some((b - a) / wall),
                            _ => None,
                        };
                        pg.note(format!(
                            "  r{round} {:<21} {:<14} {:>9.0} IOPS {:>8.1} MiB/s{}{}",
                            p.title,
                            t.kind.name(),
                            s.iops,
                            s.mib_s,
                            s.server_cpu_cores
                                .map(|c| format!("  server CPU {c:.2}"))
                                .unwrap_or_default(),
                            if p.latency {
                                s.write_p99_us
                                    .map(|v| format!("  p99 {v:.0} µs"))
                                    .unwrap_or_default()
                            } else {
                                String::new()
                            }
                        ));
                        entry.rounds.push(s);
                    }
                    Err(e) => {
                        check_stop()?;
                        let msg = format!("round {round}: {e:#}");
                        pg.note(format!(
                            "  r{round} {:<21} {:<14} FAILED: {e:#}",
                            p.title,
                            t.kind.name()
                        ));
                        entry.errors.push(msg);
                    }
                }
                pg.done(per_job);
            }
        }
    }
    memory.daemon_after_io_kib = rss(&d);
    memory.engine_daemon_after_io_kib = rss(&de);
    memory.ublk_daemon_after_io_kib = rss(&du);
    memory.features_daemon_after_io_kib = rss(&df);
    memory.qemu_storage_daemon_after_io_kib = qsd_pid.and_then(rss_kib);
    if let (Some(vol), Some(setup), Some(df)) = (
        Kind::DunnageSnaps.volume(),
        snap_setup.as_mut(),
        df.as_ref(),
    ) {
        match targets::space(df, vol) {
            Ok(s) => setup.space_after_io = Some(s),
            Err(e) => problems.push(format!(
                "{}: space after the IO run: {e:#}",
                Kind::DunnageSnaps.name()
            )),
        }
    }
    let delta = |a: Option<u64>, b: Option<u64>| Some(a? as i64 - b? as i64);
    memory.extra_attached_kib = delta(memory.daemon_attached_kib, memory.daemon_idle_kib);
    memory.extra_after_io_kib = delta(memory.daemon_after_io_kib, memory.daemon_idle_kib);
    memory.engine_extra_after_io_kib = delta(
        memory.engine_daemon_after_io_kib,
        memory.engine_daemon_idle_kib,
    );
    memory.ublk_extra_after_io_kib =
        delta(memory.ublk_daemon_after_io_kib, memory.ublk_daemon_idle_kib);
    memory.features_extra_attached_kib = delta(
        memory.features_daemon_attached_kib,
        memory.features_daemon_idle_kib,
    );
    memory.features_extra_after_io_kib = delta(
        memory.features_daemon_after_io_kib,
        memory.features_daemon_idle_kib,
    );
    let cpu_median = |k: Kind| {
        job::median(
            samples
                .iter()
                .filter(|((_, t), _)| *t == k.name())
                .flat_map(|(_, e)| e.rounds.iter().filter_map(|s| s.server_cpu_cores))
                .collect(),
        )
    };
    let target_infos: Vec<report::TargetInfo> = all
        .iter()
        .map(|t| {
            let cpu = cpu_median(t.kind);
            report::TargetInfo {
                name: t.kind.name(),
                what: t.kind.describe(),
                device: t.info.clone(),
                server_cpu_cores_median: cpu,
                io_path: t.io_path.clone().map(|mut p| {
                    p.cpu_says_daemon_did_io = cpu.map(|c| c >= targets::DAEMON_DID_IO_CORES);
                    p
                }),
                snapshots: snap_setup.clone().filter(|_| t.kind == Kind::DunnageSnaps),
            }
        })
        .collect();

    // Take the devices and the other daemons down before the control-plane part.
    pg.step("detaching the bench devices, stopping the other daemons".into());
    let before = td.problems.len();
    td.unwind_to(data_plane);
    problems.extend(td.problems[before..].iter().cloned());
    check_stop()?;

    // Control plane (1): plugin calls on the daemon's socket.
    let skipped = || {
        format!(
            "skipped: --only without {} (these timings use its daemon)",
            Kind::Dunnage.name()
        )
    };
    let plugin = match &d {
        Some(d) => {
            pg.step(format!(
                "plugin Create/Mount/Unmount/Remove of a 1 GiB ext4 volume, {PLUGIN_CYCLES} times"
            ));
            match control::plugin_cycles(&d.plugin_socket(), PLUGIN_CYCLES, |_| pg.done(1)) {
                Ok(t) => Outcome::Measured(t),
                Err(e) => {
                    check_stop()?;
                    pg.note(format!("plugin timing FAILED: {e:#}"));
                    Outcome::NotMeasured(format!("{e:#}"))
                }
            }
        }
        None => Outcome::NotMeasured(skipped()),
    };

    // Control plane (2): docker run with a dunnage volume vs a local one.
    let docker_run = if o.docker && control {
        let mut spent = 0;
        let res = control::docker_runs(
            &bin,
            &root,
            &out.join("dunnage-docker.log"),
            DOCKER_RUNS,
            td,
            |msg| {
                pg.step(msg.to_string());
                pg.done(2);
                spent += 2;
            },
        )?;
        pg.done(docker_work.saturating_sub(spent));
        match res {
            Ok(t) => Outcome::Measured(t),
            Err(why) => {
                pg.note(format!("docker run timing not measured: {why}"));
                Outcome::NotMeasured(why)
            }
        }
    } else if !o.docker {
        Outcome::NotMeasured("--no-docker".into())
    } else {
        Outcome::NotMeasured(skipped())
    };
    pg.bar.finish_and_clear();

    // Results.
    let mut notes = Vec::new();
    if o.only.is_some() {
        let left_out: Vec<&str> = Kind::selected(ublk)
            .into_iter()
            .filter(|k| !kinds.contains(k))
            .map(|k| k.name())
            .collect();
        notes.push(format!(
            "--only: this run set up and measured only {}{}, and started only what serves them",
            kinds
                .iter()
                .map(|k| k.name())
                .collect::<Vec<_>>()
                .join(", "),
            if left_out.is_empty() {
                String::new()
            } else {
                format!(" (not {})", left_out.join(", "))
            }
        ));
        if !control {
            notes.push(format!(
                "the control-plane timings (plugin Create/Mount/Unmount/Remove, `docker run`) and the memory figures of {}'s daemon were skipped because of --only: they need that daemon, which only runs when {} is among the targets",
                Kind::Dunnage.name(),
                Kind::Dunnage.name()
            ));
        }
    }
    if !ublk {
        // `just test-ublk` exercises ublk in an emulated VM; its timings are not performance.
        notes.push(
            "no ublk rows: this host's kernel has no ublk_drv (/dev/ublk-control is missing), so dunnage serves volumes through FUSE + loop here"
                .to_string(),
        );
    }
    if needs(Server::Cluster) {
        notes.push(format!(
            "{} and {} keep every replica on this host (each node's data directory on the same backing filesystem) and replicate over veth pairs, so they measure dunnage's replication path (a round trip to each replica per write), not a network; compare them with {}, the same engine path with one copy. Their server CPU is all three nodes' daemons together: every replica's work shares this host's cores with the primary and fio",
        Kind::DunnageRepl2.name(),
        Kind::DunnageRepl3.name(),
        Kind::DunnageEngine.name()
    ));
    }
    if !tmpfs {
        notes.push(
            "on a real filesystem the peer (cache.direct=off) and dunnage (buffered image files) go through the host's page cache while the limit does direct IO to the disk, so their reads and writes may beat the limit; use the default tmpfs to compare the IO paths"
                .to_string(),
        );
    }
    let dun_info = results_target(&target_infos, Kind::Dunnage);
    let cpu_of = |k: Kind| {
        results_target(&target_infos, k)
            .and_then(|t| t.server_cpu_cores_median)
            .map(|c| format!("{c:.2}"))
            .unwrap_or_else(|| "n/a".into())
    };
    let dun_path = dun_info.and_then(|t| t.io_path.as_ref());
    // What the daemon said about passthrough, where there was a dunnage row.
    match (
        dun_path.and_then(|p| p.passthrough),
        dun_path.and_then(|p| p.cpu_says_daemon_did_io),
    ) {
        (Some(false), _) => notes.push(
            "the daemon served the dunnage volume without passthrough, so dunnage and dunnage-engine took the same path".to_string(),
        ),
        (Some(true), _) => {}
        (None, Some(true)) => notes.push(format!(
            "the daemon does not report whether passthrough served the dunnage volume, but its CPU while fio ran (median {} cores over the jobs; dunnage-engine {}) says the IO went through it: dunnage and dunnage-engine took the same path in this run",
            cpu_of(Kind::Dunnage),
            cpu_of(Kind::DunnageEngine)
        )),
        (None, Some(false)) => notes.push(format!(
            "the daemon does not report whether passthrough served the dunnage volume; its CPU while fio ran (median {} cores over the jobs; dunnage-engine {}) says the kernel did the IO on the data file",
            cpu_of(Kind::Dunnage),
            cpu_of(Kind::DunnageEngine)
        )),
        (None, None) if dun_info.is_some() => notes.push(
            "the daemon does not report whether passthrough served the dunnage volume, and its CPU was not measured".to_string(),
        ),
        (None, None) => {}
    }
    let profiles: Vec<ProfileResult> = o
        .profiles
        .iter()
        .map(|p| {
            let mut results = BTreeMap::new();
            for &k in &kinds {
                let mut t = samples.remove(&(p.id, k.name())).unwrap_or_default();
                t.median = job::median_sample(&t.rounds);
                results.insert(k.name(), t);
            }
            let ratios = report::ratios(&results, p.latency);
            ProfileResult {
                id: p.id,
                title: p.title,
                job: format!("fixtures/fio/{}.fio", p.id),
                results,
                ratios,
            }
        })
        .collect();
    for p in &profiles {
        for (k, t) in &p.results {
            if t.median.is_none() {
                problems.push(format!("{} on {k}: no result", p.title));
            }
        }
    }
    // dunnage-secure's passphrase went to its daemon in a request body only;
    // check that no log of the run holds it (there is none without that row).
    let found = |b: &[u8]| secret.as_ref().is_some_and(|s| s.found_in(b));
    let redact = |text: &str| match &secret {
        Some(s) => s.redact(text),
        None => text.to_string(),
    };
    let mut leaks = Vec::new();
    if let Ok(dir) = std::fs::read_dir(&out) {
        for e in dir.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "log")
                && std::fs::read(&p).is_ok_and(|b| found(&b))
            {
                leaks.push(p.display().to_string());
            }
        }
    }
    let mut results = Results {
        mode: if o.quick { "quick" } else { "full" }.into(),
        machine,
        backing,
        params: report::RunParams {
            rounds: o.rounds,
            runtime_s: o.runtime,
            ramp_s: o.ramp,
            device_size_bytes: o.size,
            figure: "median over rounds, each figure on its own",
            order: Kind::order(&kinds),
        },
        versions,
        targets: target_infos,
        profiles,
        control_plane: report::ControlPlane { plugin, docker_run },
        memory,
        notes,
        problems,
    };
    if found(report::json_text(&results)?.as_bytes())
        || found(report::markdown(&results).as_bytes())
    {
        leaks.push("the results (blotted out there as [secret])".into());
    }
    if secret.is_some() {
        if leaks.is_empty() {
            results.notes.push(format!(
                "{}'s passphrase was made up for this run and given to its daemon in the body of a request on the control socket, on no command line; it is in none of the run's logs ({}) nor in the results",
                Kind::DunnageSecure.name(),
                out.display()
            ));
        } else {
            results.problems.push(format!(
                "{}'s passphrase appears in: {}",
                Kind::DunnageSecure.name(),
                leaks.join(", ")
            ));
        }
    }
    std::fs::write(
        out.join("results.json"),
        redact(&report::json_text(&results)?),
    )
    .context("write results.json")?;
    std::fs::write(out.join("results.md"), redact(&report::markdown(&results)))
        .context("write results.md")?;
    let chart = out.join("chart.png");
    let chart_note = match report::chart(&results, &chart) {
        Ok(()) => chart.display().to_string(),
        Err(e) => {
            // Not a previous run's chart next to this run's results.
            let _ = std::fs::remove_file(&chart);
            format!("not drawn: {e:#}")
        }
    };

    println!();
    println!("{}", report::summary_line(&results));
    for n in &results.notes {
        println!("note: {n}");
    }
    for l in report::io_path_lines(&results) {
        println!("io path: {}", redact(&l));
    }
    for l in report::snapshot_lines(&results) {
        println!("snapshots: {l}");
    }
    println!("{}", report::main_table(&results, false));
    println!("{}", report::side_table(&results, false));
    for p in &results.problems {
        println!("problem: {}", redact(p));
    }
    println!(
        "results: {}, {}; chart: {chart_note}; logs: {}",
        out.join("results.json").display(),
        out.join("results.md").display(),
        out.display()
    );
    Ok(())
}

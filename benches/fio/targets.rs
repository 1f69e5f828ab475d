//! The targets: the kernel loop device over a raw file (limit),
//! qemu-storage-daemon's FUSE export on a loop device (peer), and a dunnage
//! volume attached with `dunnage attach` from two FUSE daemons: one with
//! FUSE passthrough allowed (dunnage), one with it off (dunnage-engine), so
//! that every IO of the latter goes through dunnage's FUSE threads and
//! engine; an encrypted volume (dunnage-secure) and a volume with 10
//! snapshots (dunnage-10snaps) from a further FUSE daemon with the default
//! flags; replicated volumes (dunnage-repl2, dunnage-repl3) from a
//! three-node cluster on a private veth network with its own etcd; and where
//! the kernel has ublk, from a daemon with `--export ublk` (dunnage-ublk).

use crate::control::plugin_post;
use crate::host::{self, DeviceInfo};
use crate::job;
use crate::netns::{Etcd, Net};
use crate::proc::{check_stop, nap, run_ok, Server, Teardown};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::rc::Rc;
use std::time::{Duration, Instant};

const START_TIMEOUT: Duration = Duration::from_secs(30);

pub use crate::kind::{tenth, Kind, SNAPSHOTS};

pub struct Target {
    pub kind: Kind,
    pub dev: PathBuf,
    pub info: DeviceInfo,
    /// The user-space servers behind the device, whose CPU the results
    /// count: none for the limit, every node's daemon for a replicated
    /// volume (its replicas' work runs on the same cores here).
    pub server_pids: Vec<u32>,
    /// Which path served IO, for the dunnage targets.
    pub io_path: Option<IoPath>,
}

/// Which path served a dunnage volume's IO, as far as the daemon says.
#[derive(Debug, Clone, Serialize)]
pub struct IoPath {
    /// The daemon's `--fuse-passthrough`.
    pub fuse_passthrough_flag: &'static str,
    /// Whether passthrough was on, when the daemon reports it (a field of
    /// `dunnage volume inspect`); `None` when it does not say.
    pub passthrough: Option<bool>,
    /// Where `passthrough` comes from, or why it is unknown.
    pub source: String,
    /// Daemon log lines about passthrough since the attach.
    pub log_lines: Vec<String>,
    /// What the daemon's CPU says, whatever the daemon reports: whether the IO
    /// went through it (its median CPU over the profiles at least
    /// `DAEMON_DID_IO_CORES`) rather than straight to the data file.
    pub cpu_says_daemon_did_io: Option<bool>,
}

/// Daemon CPU, in cores, above which the daemon served the IO itself: with
/// passthrough it sees no reads or writes and stays near 0 while fio runs.
pub const DAEMON_DID_IO_CORES: f64 = 0.1;

/// `dunnage serve` with its own directories, and its CLI.
pub struct Dunnage {
    pub bin: PathBuf,
    pub name: String,
    pub plugin_dir: PathBuf,
    pub run_dir: PathBuf,
    pub log: PathBuf,
    /// Its `--export`.
    pub export: String,
    pub server: Rc<RefCell<Server>>,
}

/// A cluster member's part of `dunnage serve`: the network namespace it
/// runs in and its cluster flags.
pub struct Member {
    pub netns: String,
    pub args: Vec<String>,
}

impl Dunnage {
    /// Starts `dunnage serve --export EXPORT` with data and run dirs under
    /// `root` (and `--fuse-passthrough` if given) and waits until its plugin
    /// socket answers. Teardown stops it (SIGTERM: it detaches and unmounts
    /// its volumes) and sweeps anything it left.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        bin: &Path,
        name: &str,
        root: &Path,
        plugin_dir: &Path,
        export: &str,
        fuse_passthrough: Option<&str>,
        log: &Path,
        td: &mut Teardown,
    ) -> Result<Dunnage> {
        Dunnage::start_member(
            bin,
            name,
            root,
            plugin_dir,
            export,
            fuse_passthrough,
            log,
            None,
            td,
        )
    }

    /// [`Dunnage::start`], as a cluster member if `member` is given: in its
    /// network namespace (`nsenter --net`, which execs: the pid stays the
    /// daemon's) with its cluster flags.
    #[allow(clippy::too_many_arguments)]
    pub fn start_member(
        bin: &Path,
        name: &str,
        root: &Path,
        plugin_dir: &Path,
        export: &str,
        fuse_passthrough: Option<&str>,
        log: &Path,
        member: Option<&Member>,
        td: &mut Teardown,
    ) -> Result<Dunnage> {
        let data_dir = root.join("data");
        let run_dir = root.join("run");
        for d in [&data_dir, &run_dir, &plugin_dir.to_path_buf()] {
            std::fs::create_dir_all(d).with_context(|| format!("create {}", d.display()))?;
        }
        let mut cmd =
            crate::netns::command_in(member.map(|m| m.netns.as_str()), &bin.to_string_lossy());
        cmd.arg("serve")
            .args(["--name", name])
            .arg("--plugin-dir")
            .arg(plugin_dir)
            .arg("--data-dir")
            .arg(&data_dir)
            .arg("--run-dir")
            .arg(&run_dir)
            .args(["--export", export])
            .env_remove("DUNNAGE_RUN_DIR")
            // Plain log lines, for reading them back.
            .env("NO_COLOR", "1");
        if let Some(p) = fuse_passthrough {
            cmd.args(["--fuse-passthrough", p]);
        }
        if let Some(m) = member {
            cmd.args(&m.args);
        }
        let server = Server::spawn(&format!("dunnage serve --name {name}"), &mut cmd, log)?;
        let server = Rc::new(RefCell::new(server));
        let (s, sweep_root) = (server.clone(), run_dir.clone());
        td.push(format!("stop dunnage serve --name {name}"), move || {
            let how = s.borrow_mut().stop(Duration::from_secs(60));
            let leftovers = sweep(&sweep_root);
            // A daemon that had already exited is reported where that mattered.
            if how.contains("killed") || !leftovers.is_empty() {
                bail!("dunnage serve {how}; {}", leftovers.join("; "));
            }
            Ok(())
        });
        let d = Dunnage {
            bin: bin.to_path_buf(),
            name: name.to_string(),
            plugin_dir: plugin_dir.to_path_buf(),
            run_dir,
            log: log.to_path_buf(),
            export: export.to_string(),
            server,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            check_stop()?;
            if let Ok((200, _)) = plugin_post(&d.plugin_socket(), "/Plugin.Activate", "{}") {
                if d.run_dir.join("control.sock").exists() {
                    break;
                }
            }
            d.server.borrow_mut().check_alive()?;
            if Instant::now() > deadline {
                bail!(
                    "dunnage serve did not answer on {} within {START_TIMEOUT:?}",
                    d.plugin_socket().display()
                );
            }
            nap(Duration::from_millis(50));
        }
        Ok(d)
    }

    pub fn plugin_socket(&self) -> PathBuf {
        self.plugin_dir.join(format!("{}.sock", self.name))
    }

    pub fn pid(&self) -> u32 {
        self.server.borrow().pid()
    }

    /// `dunnage --run-dir RUN ARGS...`; its stdout.
    pub fn cli(&self, args: &[&str]) -> Result<String> {
        run_ok(
            Command::new(&self.bin)
                .arg("--run-dir")
                .arg(&self.run_dir)
                .args(args),
            Duration::from_secs(300),
        )
    }
}

/// Unmounts what is mounted under `root` and detaches loop devices backed by
/// files under it; returns what it had to clean.
pub fn sweep(root: &Path) -> Vec<String> {
    let mut done = Vec::new();
    for (dev, back) in host::loops_backed_under(root) {
        let r = host::loop_detach(&dev);
        done.push(format!(
            "detached leftover {} ({}){}",
            dev.display(),
            back.display(),
            r.err().map(|e| format!(": {e:#}")).unwrap_or_default()
        ));
    }
    for m in host::mounts_under(root).into_iter().filter(|m| m != root) {
        let r = host::umount(&m, true);
        done.push(format!(
            "unmounted leftover {}{}",
            m.display(),
            r.err().map(|e| format!(": {e:#}")).unwrap_or_default()
        ));
    }
    done
}

fn loop_target(kind: Kind, file: &Path, td: &mut Teardown) -> Result<Target> {
    let dev = host::loop_attach(file)?;
    let d = dev.clone();
    td.push(
        format!("detach {} ({})", dev.display(), kind.name()),
        move || host::loop_detach(&d),
    );
    let info = host::device_info(&dev)?;
    Ok(Target {
        kind,
        dev,
        info,
        server_pids: Vec::new(),
        io_path: None,
    })
}

/// (a) `losetup --direct-io=on` over a raw file.
pub fn limit(root: &Path, size: u64, td: &mut Teardown) -> Result<Target> {
    let raw = root.join("limit.raw");
    host::sparse_file(&raw, size)?;
    loop_target(Kind::Limit, &raw, td)
}

/// (b) qemu-storage-daemon exports a raw file over FUSE, mounted over a regular
/// file; a loop device with direct IO on that file.
pub fn peer(root: &Path, size: u64, log: &Path, td: &mut Teardown) -> Result<(Target, u32)> {
    let raw = root.join("peer.raw");
    let mnt = root.join("peer.fuse");
    host::sparse_file(&raw, size)?;
    host::sparse_file(&mnt, 0)?;
    let mut server = Server::spawn(
        "qemu-storage-daemon",
        Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=disk,filename={},cache.direct=off",
                raw.display()
            ))
            .arg("--export")
            .arg(format!(
                "type=fuse,id=exp,node-name=disk,mountpoint={},writable=on",
                mnt.display()
            )),
        log,
    )?;
    let pid = server.pid();
    let deadline = Instant::now() + START_TIMEOUT;
    while !host::is_mount_point(&mnt) {
        if let Err(e) = check_stop().and_then(|_| server.check_alive()) {
            let _ = server.stop(Duration::from_secs(5));
            return Err(e);
        }
        if Instant::now() > deadline {
            server.stop(Duration::from_secs(5));
            bail!(
                "qemu-storage-daemon did not mount its FUSE export on {} within {START_TIMEOUT:?}",
                mnt.display()
            );
        }
        nap(Duration::from_millis(50));
    }
    let m = mnt.clone();
    td.push("stop qemu-storage-daemon", move || {
        let how = server.stop(Duration::from_secs(20));
        if host::is_mount_point(&m) {
            host::umount(&m, true)?;
            bail!("qemu-storage-daemon {how} and left its FUSE mount; unmounted it");
        }
        if how.contains("killed") {
            bail!("qemu-storage-daemon {how}");
        }
        Ok(())
    });
    let mut t = loop_target(Kind::Peer, &mnt, td)?;
    t.server_pids = vec![pid];
    Ok((t, pid))
}

/// (c) a raw dunnage volume of `size` bytes from daemon `d`, attached on this host.
pub fn dunnage(d: &Dunnage, kind: Kind, size: u64, td: &mut Teardown) -> Result<Target> {
    let vol = volume_of(d, kind)?;
    // Passthrough is a volume's choice; the engine-path daemon
    // (--fuse-passthrough off) overrides it.
    create_raw(d, vol, size, &["passthrough=true"], td)?;
    attach(d, kind, vol, td)
}

/// Members of the bench cluster, for dunnage-repl2 and dunnage-repl3.
pub const CLUSTER_NODES: usize = 3;

/// Three `dunnage serve` in cluster mode, each in a network namespace of its
/// own on a private bridge (tests/common/netns.rs), with an etcd in the
/// bridge's namespace. Nothing touches the host's network.
pub struct Cluster {
    /// n1, n2, n3; volumes are attached on n1.
    pub nodes: Vec<Dunnage>,
}

/// Runs `f`, turning a panic of the network harness (it asserts) into an error.
fn harness<T>(what: &str, f: impl FnOnce() -> T) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|e| {
        let msg = e
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        anyhow::anyhow!("{what}: {msg}")
    })
}

/// Starts the cluster: the network, etcd, then the members, each with data
/// and run dirs under `root/<node>`; waits until n1 sees every member up.
/// Teardown stops the members, then etcd, then removes the network.
pub fn cluster(
    bin: &Path,
    name: &str,
    root: &Path,
    plugin_dir: &Path,
    logs: &Path,
    td: &mut Teardown,
) -> Result<Cluster> {
    let net = harness("build the veth network", || Net::new(CLUSTER_NODES))?;
    let (hub_ip, hub_ns) = (net.hub_ip(), net.hub_ns().to_string());
    let members: Vec<(String, String)> = (0..CLUSTER_NODES)
        .map(|i| {
            (
                net.node_ns(i).to_string(),
                format!("{}:7400", net.node_ip(i)),
            )
        })
        .collect();
    td.push("remove the cluster's network namespaces", move || {
        drop(net);
        Ok(())
    });
    let etcd = harness("start etcd", || Etcd::start(hub_ip, Some(&hub_ns)))?;
    let url = etcd.client_url.clone();
    td.push("stop the cluster's etcd", move || {
        drop(etcd);
        Ok(())
    });
    let mut nodes = Vec::new();
    for (i, (netns, listen)) in members.into_iter().enumerate() {
        check_stop()?;
        let node = format!("n{}", i + 1);
        let member = Member {
            netns,
            args: vec![
                "--node".into(),
                node.clone(),
                "--listen".into(),
                listen,
                "--etcd".into(),
                url.clone(),
            ],
        };
        nodes.push(Dunnage::start_member(
            bin,
            &format!("{name}-{node}"),
            &root.join(&node),
            plugin_dir,
            "fuse",
            Kind::DunnageRepl2.fuse_passthrough(),
            &logs.join(format!("dunnage-{node}.log")),
            Some(&member),
            td,
        )?);
    }
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        check_stop()?;
        let out = nodes[0].cli(&["node", "ls", "--json"])?;
        let v: Value =
            serde_json::from_str(&out).context("`dunnage node ls --json` is not JSON")?;
        let up = v
            .as_array()
            .map(|a| a.iter().filter(|m| m["up"] == Value::Bool(true)).count())
            .unwrap_or(0);
        if up == CLUSTER_NODES {
            break;
        }
        if Instant::now() > deadline {
            bail!("the cluster's nodes are not all up after {START_TIMEOUT:?}: {out}");
        }
        nap(Duration::from_millis(200));
    }
    Ok(Cluster { nodes })
}

/// (f) a replicated volume of `size` bytes (`repl` and `nodes` from
/// `kind`) created on the cluster and attached on n1.
pub fn dunnage_repl(c: &Cluster, kind: Kind, size: u64, td: &mut Teardown) -> Result<Target> {
    let d = &c.nodes[0];
    let vol = volume_of(d, kind)?;
    let n = kind.replicas();
    let nodes: Vec<String> = (1..=n).map(|i| format!("n{i}")).collect();
    let (repl, placed_on) = (format!("repl={n}"), format!("nodes={}", nodes.join(",")));
    create_raw(d, vol, size, &[&repl, &placed_on], td)?;
    let out = d.cli(&["volume", "inspect", vol])?;
    let v: Value = serde_json::from_str(&out)
        .with_context(|| format!("`dunnage volume inspect {vol}` is not JSON"))?;
    let mut placed: Vec<String> = v["cluster"]["replicas"]
        .as_array()
        .map(|rs| {
            rs.iter()
                .filter_map(|r| r["node"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    placed.sort();
    if placed != nodes {
        bail!("{vol}: replicas on {placed:?}, not {nodes:?}");
    }
    let mut t = attach(d, kind, vol, td)?;
    t.server_pids = c.nodes.iter().map(Dunnage::pid).collect();
    Ok(t)
}

/// The volume name of a dunnage target, which daemon `d` can serve.
fn volume_of(d: &Dunnage, kind: Kind) -> Result<&'static str> {
    if kind.export() != Some(d.export.as_str()) {
        bail!(
            "{} needs a daemon with --export {}, not {}",
            kind.name(),
            kind.export().unwrap_or("none"),
            d.export
        );
    }
    kind.volume()
        .with_context(|| format!("{} is not a dunnage volume", kind.name()))
}

/// `dunnage volume create VOL -o size=SIZE -o fs=none [-o OPT]...` on `d`;
/// the volume is removed at teardown.
fn create_raw(
    d: &Dunnage,
    vol: &'static str,
    size: u64,
    opts: &[&str],
    td: &mut Teardown,
) -> Result<()> {
    let size = size_opt(size);
    let mut args = vec!["volume", "create", vol, "-o", &size, "-o", "fs=none"];
    for o in opts {
        args.extend(["-o", o]);
    }
    d.cli(&args)?;
    push_rm(d, vol, td);
    Ok(())
}

fn size_opt(size: u64) -> String {
    format!("size={}M", size >> 20)
}

/// A CLI of daemon `d` for teardown steps, which outlive it.
fn teardown_cli(d: &Dunnage) -> impl Fn(&[&str]) -> Result<()> + Clone + 'static {
    let (bin, run_dir) = (d.bin.clone(), d.run_dir.clone());
    move |args: &[&str]| {
        run_ok(
            Command::new(&bin).arg("--run-dir").arg(&run_dir).args(args),
            Duration::from_secs(120),
        )
        .map(drop)
    }
}

fn push_rm(d: &Dunnage, vol: &'static str, td: &mut Teardown) {
    let rm = teardown_cli(d);
    td.push(format!("dunnage volume rm {vol} ({})", d.name), move || {
        rm(&["volume", "rm", vol])
    });
}

/// `dunnage attach VOL`: the device it prints.
fn attach_dev(d: &Dunnage, vol: &str) -> Result<PathBuf> {
    let out = d.cli(&["attach", vol])?;
    let dev = PathBuf::from(out.trim());
    if !dev.starts_with("/dev/") {
        bail!("dunnage attach printed {out:?}, not a device path");
    }
    Ok(dev)
}

/// Attaches `vol` of daemon `d` for the whole run (teardown detaches it).
fn attach(d: &Dunnage, kind: Kind, vol: &'static str, td: &mut Teardown) -> Result<Target> {
    let log_from = std::fs::metadata(&d.log).map(|m| m.len()).unwrap_or(0);
    let dev = attach_dev(d, vol)?;
    let detach = teardown_cli(d);
    td.push(format!("dunnage detach {vol} ({})", d.name), move || {
        detach(&["detach", vol])
    });
    let info = host::device_info(&dev)?;
    // Passthrough (FUSE only) is decided when the loop device opens the
    // image, i.e. during the attach; give the log a moment to show it.
    let io_path = kind.fuse_passthrough().map(|_| {
        nap(Duration::from_millis(200));
        io_path(d, kind, vol, log_from)
    });
    Ok(Target {
        kind,
        dev,
        info,
        server_pids: vec![d.pid()],
        io_path,
    })
}

/// A passphrase made up for one run, for the encrypted volume. It goes to
/// the daemon in the body of a request on its control socket, never on a
/// command line (`ps`, the logs, error messages show those), and is not
/// `Display`: nothing prints it by mistake.
pub struct Secret(String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(hidden)")
    }
}

impl Secret {
    /// 32 random bytes from the kernel, as hex.
    pub fn random() -> Result<Secret> {
        use std::io::Read;
        let mut b = [0u8; 32];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut b))
            .context("read /dev/urandom")?;
        Ok(Secret(b.iter().map(|x| format!("{x:02x}")).collect()))
    }

    /// Whether `text` holds the passphrase.
    pub fn found_in(&self, text: &[u8]) -> bool {
        text.windows(self.0.len()).any(|w| w == self.0.as_bytes())
    }

    /// `text` with the passphrase, should it be there, blotted out.
    pub fn redact(&self, text: &str) -> String {
        text.replace(&self.0, "[secret]")
    }
}

/// (d) an encrypted volume (`secure=true` with its own `secret_key`, a
/// passphrase made up now) from daemon `d`, attached on this host. Created
/// over the control socket, as `dunnage volume create` does, so that the
/// passphrase is on no command line.
pub fn dunnage_secure(d: &Dunnage, size: u64, td: &mut Teardown) -> Result<(Target, Secret)> {
    let kind = Kind::DunnageSecure;
    let vol = volume_of(d, kind)?;
    let secret = Secret::random()?;
    let mut opts = BTreeMap::new();
    opts.insert("size", format!("{}M", size >> 20));
    opts.insert("fs", "none".to_string());
    opts.insert("secure", "true".to_string());
    opts.insert("secret_key", secret.0.clone());
    let body = json!({ "name": vol, "opts": opts }).to_string();
    let sock = d.run_dir.join("control.sock");
    match plugin_post(&sock, "/v1/volume/create", &body) {
        Ok((200, _)) => {}
        Ok((status, v)) => bail!(
            "create the encrypted volume {vol} on {}: HTTP {status}: {}",
            sock.display(),
            secret.redact(
                &v["error"]
                    .as_str()
                    .map_or_else(|| v.to_string(), str::to_string)
            )
        ),
        Err(e) => bail!(
            "create the encrypted volume {vol} on {}: {}",
            sock.display(),
            secret.redact(&format!("{e:#}"))
        ),
    }
    push_rm(d, vol, td);
    let out = d.cli(&["volume", "inspect", vol])?;
    let v: Value = serde_json::from_str(&out)
        .with_context(|| format!("`dunnage volume inspect {vol}` is not JSON"))?;
    if v["encrypted"] != Value::Bool(true) {
        bail!("`dunnage volume inspect {vol}` does not say the volume is encrypted");
    }
    let t = attach(d, kind, vol, td)?;
    Ok((t, secret))
}

/// Space of a volume and its snapshots, from `dunnage volume inspect`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Space {
    pub used_bytes: u64,
    pub shared_bytes: u64,
    pub snapshot_bytes: u64,
    pub snapshots: u64,
}

/// Reads the `space` of `dunnage volume inspect VOL`.
pub fn space(d: &Dunnage, vol: &str) -> Result<Space> {
    let out = d.cli(&["volume", "inspect", vol])?;
    let v: Value = serde_json::from_str(&out)
        .with_context(|| format!("`dunnage volume inspect {vol}` is not JSON"))?;
    serde_json::from_value(v["space"].clone())
        .with_context(|| format!("`dunnage volume inspect {vol}` has no usable space field"))
}

/// How the dunnage-10snaps volume was set up, for the results.
#[derive(Debug, Clone, Serialize)]
pub struct SnapSetup {
    pub scheme: String,
    pub snapshots: Vec<String>,
    /// The sequential write over the whole volume, before any snapshot.
    pub prefill_mib_s: f64,
    /// Each tenth's overwrite, (offset, length) in bytes, after the
    /// snapshot of the same index.
    pub overwrites: Vec<(u64, u64)>,
    /// The overwrites' median bandwidth: the first writes to shared blocks.
    pub overwrite_mib_s_median: Option<f64>,
    pub setup_s: f64,
    /// `volume inspect`'s space when the setup is done, and after the
    /// profiles.
    pub space_at_start: Option<Space>,
    pub space_after_io: Option<Space>,
    /// Per job: what the volume shared with its snapshots when the job
    /// began (after snap10 was taken again) and when it ended.
    pub jobs: Vec<SnapJob>,
}

/// Shared bytes around one job on dunnage-10snaps.
#[derive(Debug, Clone, Serialize)]
pub struct SnapJob {
    pub profile: &'static str,
    pub round: usize,
    pub shared_bytes_at_start: u64,
    pub shared_bytes_at_end: Option<u64>,
}

/// Before a job on dunnage-10snaps: deletes its newest snapshot and takes
/// it again, so that the job starts with the whole volume shared and its
/// writes copy (earlier jobs' writes have copied the blocks they touched).
/// The snapshots stay 10, the space bounded. Returns the bytes shared now.
pub fn retake_newest(d: &Dunnage, setup: &SnapSetup) -> Result<u64> {
    let vol = volume_of(d, Kind::DunnageSnaps)?;
    let name = setup.snapshots.last().context("no snapshots")?;
    d.cli(&["snapshot", "rm", vol, name])?;
    d.cli(&["snapshot", "create", vol, name])?;
    Ok(space(d, vol)?.shared_bytes)
}

/// (e) a volume with `SNAPSHOTS` snapshots from daemon `d`, attached on
/// this host: prefilled over its whole size by one sequential fio write,
/// then `SNAPSHOTS` × (`dunnage snapshot create`, a sequential overwrite of
/// the next tenth). The daemon refuses a snapshot while the kernel writes
/// the data file (passthrough, which a fresh volume gets when the daemon
/// allows it), so the prefill has an attach of its own, and the first
/// snapshot is taken detached; from then on the volume has snapshots and
/// is served by the engine, and the rest happens in the attach that stays.
pub fn dunnage_snaps(d: &Dunnage, size: u64, td: &mut Teardown) -> Result<(Target, SnapSetup)> {
    let kind = Kind::DunnageSnaps;
    let vol = volume_of(d, kind)?;
    let t0 = Instant::now();
    create_raw(d, vol, size, &[], td)?;
    let fill_timeout = Duration::from_secs(120 + (size >> 20) / 20);
    let dev = attach_dev(d, vol)?;
    let prefill = job::run_fio(
        &job::job_file("precondition"),
        &job::Params {
            dev: &dev,
            size,
            runtime: 0,
            ramp: 0,
        },
        fill_timeout,
    );
    let detached = d.cli(&["detach", vol]);
    let prefill = prefill.context("prefill")?;
    detached?;
    let names: Vec<String> = (1..=SNAPSHOTS).map(|i| format!("snap{i:02}")).collect();
    let mut overwrites = Vec::new();
    let mut mib_s = Vec::new();
    let snapshot = |name: &str| d.cli(&["snapshot", "create", vol, name]).map(drop);
    snapshot(&names[0])?;
    let target = attach(d, kind, vol, td)?;
    for (i, name) in names.iter().enumerate() {
        check_stop()?;
        if i > 0 {
            snapshot(name)?;
        }
        let (offset, len) = tenth(size, i);
        let s = job::write_range(&target.dev, offset, len, fill_timeout)
            .with_context(|| format!("overwrite of tenth {} after {name}", i + 1))?;
        overwrites.push((offset, len));
        mib_s.push(s.mib_s);
    }
    let setup = SnapSetup {
        scheme: format!(
            "prefill: one sequential fio write over the whole volume (1 MiB, QD8); then {SNAPSHOTS} × (`dunnage snapshot create`, a sequential 1 MiB QD8 overwrite of the next tenth), so that snapshot k holds the data of the overwrites before it; before each job {} is deleted and taken again, so each job starts with the whole volume shared with it",
            names.last().map_or("", String::as_str)
        ),
        snapshots: names,
        prefill_mib_s: prefill.mib_s,
        overwrites,
        overwrite_mib_s_median: job::median(mib_s),
        setup_s: t0.elapsed().as_secs_f64(),
        space_at_start: space(d, vol).ok(),
        space_after_io: None,
        jobs: Vec::new(),
    };
    Ok((target, setup))
}

/// Reads whether passthrough serves `vol`: a `passthrough` field of `volume
/// inspect` if the daemon has one, and the log lines about it since `log_from`.
fn io_path(d: &Dunnage, kind: Kind, vol: &str, log_from: u64) -> IoPath {
    let flag = kind.fuse_passthrough().unwrap_or("default");
    let log_lines = log_lines_since(&d.log, log_from, "passthrough");
    let (passthrough, source) = match d.cli(&["volume", "inspect", vol]) {
        Ok(out) => match serde_json::from_str::<Value>(&out) {
            Ok(v) => match v["io_path"]
                .as_str()
                .map(|p| ("io_path".to_string(), p == "passthrough"))
                .or_else(|| find_bool(&v, "passthrough", ""))
            {
                Some((key, b)) => (Some(b), format!("`dunnage volume inspect {vol}`: {key}")),
                None => match passthrough_from_log(&log_lines) {
                    Some((on, line)) => (
                        Some(on),
                        format!("daemon log (`volume inspect` has no passthrough field): {line}"),
                    ),
                    None => (
                        None,
                        format!(
                            "not reported: `dunnage volume inspect` has no passthrough field{}",
                            if log_lines.is_empty() {
                                " and the daemon log does not mention passthrough"
                            } else {
                                "; see log_lines"
                            }
                        ),
                    ),
                },
            },
            Err(e) => (
                None,
                format!("`dunnage volume inspect {vol}` is not JSON: {e}"),
            ),
        },
        Err(e) => (
            None,
            format!("`dunnage volume inspect {vol}` failed: {e:#}"),
        ),
    };
    IoPath {
        fuse_passthrough_flag: flag,
        passthrough,
        source,
        log_lines,
        cpu_says_daemon_did_io: None,
    }
}

/// Whether passthrough is on after the attach, from the daemon's log lines
/// about it (in order, the last change decides): it begins, or the kernel
/// refused it, or it ended. With the line that made that change.
fn passthrough_from_log(lines: &[String]) -> Option<(bool, &str)> {
    let mut state: Option<(bool, &str)> = None;
    for l in lines {
        let low = l.to_ascii_lowercase();
        let on = if low.contains("refused")
            || low.contains("serving io ourselves")
            || low.contains("passthrough ends")
        {
            false
        } else if low.contains("passthrough begins") {
            true
        } else {
            continue;
        };
        // Keep the line that made the change ("refused" rather than the "ends" after it).
        if state.map(|(was, _)| was) != Some(on) {
            state = Some((on, l.as_str()));
        }
    }
    state
}

/// The first boolean whose key contains `word` (case-insensitive), depth first,
/// with its dotted path.
fn find_bool(v: &Value, word: &str, at: &str) -> Option<(String, bool)> {
    let Value::Object(map) = v else {
        return None;
    };
    for (k, x) in map {
        let path = if at.is_empty() {
            k.clone()
        } else {
            format!("{at}.{k}")
        };
        if k.to_ascii_lowercase().contains(word) {
            if let Some(b) = x.as_bool() {
                return Some((path, b));
            }
        }
        if let Some(found) = find_bool(x, word, &path) {
            return Some(found);
        }
    }
    None
}

/// Lines of a log written after byte `from` that mention `word`, without
/// terminal colours.
fn log_lines_since(log: &Path, from: u64, word: &str) -> Vec<String> {
    let Ok(bytes) = std::fs::read(log) else {
        return Vec::new();
    };
    let tail = bytes.get(from as usize..).unwrap_or_default();
    String::from_utf8_lossy(tail)
        .lines()
        .map(crate::netns::strip_ansi)
        .filter(|l| l.to_ascii_lowercase().contains(word))
        .map(|l| l.trim().to_string())
        .collect()
}

//! A cluster of `dunnage serve` daemons in cluster mode sharing one etcd, for
//! the replication tests.
//!
//! Two ways to wire it ([`Mode`]):
//! - [`Mode::Veth`]: each daemon runs in a network namespace of its own on a
//!   private bridge ([`super::netns::Net`]), `--listen` on its veth address;
//!   etcd runs in the hub namespace. A cut-off is real: the node's cable is
//!   pulled (the hub end of its veth goes down).
//! - [`Mode::Loopback`]: every daemon in the test's namespace, `--listen` on
//!   127.0.0.1 with distinct free ports, one etcd on 127.0.0.1. There is no
//!   network to cut, so a cut-off is the daemon (and its FUSE keeper) stopped
//!   with SIGSTOP: it renews no lease and answers no peer, exactly like a
//!   partitioned node, and SIGCONT brings it back unaware of the time it
//!   missed, like a healed partition. Kernel state (its loop device, its
//!   TCP sockets) stays, as it would on a partitioned machine.
//!
//! Node `i` (0-based) is named `n{i+1}`. Block IO helpers ([`BlockDev`]) use
//! O_DIRECT with page-aligned buffers, so reads and writes reach the daemon.

use std::fs::{File, OpenOptions};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::process::Stdio;
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

use super::netns::{command_in, Etcd, Net};
use super::{is_loop_path, keeper_pids, pattern, run_with_timeout, CliOut, Daemon, Opts, BIN};

/// How the nodes are connected: see the module documentation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Veth,
    Loopback,
}

/// `--lease-ttl` of the test clusters (seconds): short, so that takeovers are quick.
pub const LEASE_TTL: u64 = 3;
/// `--replica-timeout` (seconds).
pub const REPLICA_TIMEOUT: u64 = 2;
/// The port replica traffic uses on a veth address (each node has its own address).
pub const REPLICA_PORT: u16 = 7400;
/// The IO unit of the helpers.
pub const BLOCK: usize = 4096;
/// How long to wait for cluster state to converge (membership, catalog, leases).
pub const CONVERGE: Duration = Duration::from_secs(60);

/// A CLI call may wait for a lease to expire or a resync to finish.
const CLI_TIMEOUT: Duration = Duration::from_secs(300);

const LOCALHOST: Ipv4Addr = Ipv4Addr::LOCALHOST;

pub struct Node {
    /// `--node`: `n1`, `n2`, ...
    pub name: String,
    /// `--listen`.
    pub addr: SocketAddr,
    pub daemon: Daemon,
    /// Pids stopped by a loopback cut-off (daemon and keeper), to continue on heal.
    stopped: Vec<Pid>,
}

/// N daemons and their etcd. Dropping it heals every cut, stops the daemons
/// (SIGTERM, then SIGKILL after a minute), then etcd, then the network.
pub struct Cluster {
    pub mode: Mode,
    // Field order is drop order: daemons, then etcd, then the namespaces.
    nodes: Vec<Node>,
    pub etcd: Etcd,
    net: Option<Net>,
    cut: Vec<bool>,
    /// Holds the cluster secret every node is started with.
    secret_dir: tempfile::TempDir,
}

impl Cluster {
    /// Starts `n` nodes with [`LEASE_TTL`] and [`REPLICA_TIMEOUT`] and waits
    /// until every node sees every other one up in `node ls`.
    pub fn start(mode: Mode, n: usize) -> Cluster {
        Cluster::start_with(mode, n, |_| Vec::new())
    }

    /// [`Cluster::start`] with more `serve` flags for node `i`: `more(i)`.
    pub fn start_with(mode: Mode, n: usize, more: impl Fn(usize) -> Vec<String>) -> Cluster {
        Self::start_custom(mode, n, more, |_| Opts::default())
    }

    /// [`Cluster::start_with`], node `i`'s daemon started from `base(i)`
    /// (e.g. a plugin dir dockerd watches) plus the cluster's flags.
    pub fn start_custom(
        mode: Mode,
        n: usize,
        more: impl Fn(usize) -> Vec<String>,
        base: impl Fn(usize) -> Opts,
    ) -> Cluster {
        super::require_host();
        let net = match mode {
            Mode::Veth => Some(Net::new(n)),
            Mode::Loopback => None,
        };
        let etcd = match &net {
            Some(net) => Etcd::start(net.hub_ip(), Some(net.hub_ns())),
            None => Etcd::start(LOCALHOST, None),
        };
        let addrs: Vec<SocketAddr> = match &net {
            Some(net) => (0..n)
                .map(|i| SocketAddr::from((net.node_ip(i), REPLICA_PORT)))
                .collect(),
            None => {
                // Hold every listener until all are picked: distinct ports.
                let held: Vec<TcpListener> = (0..n)
                    .map(|_| super::netns::listen_port(LOCALHOST))
                    .collect();
                held.iter()
                    .map(|l| l.local_addr().expect("local addr"))
                    .collect()
            }
        };
        // Every cluster authenticates its replica traffic, as one should.
        let secret_dir = tempfile::Builder::new()
            .prefix("dunnage-secret")
            .tempdir()
            .expect("create temp dir");
        let secret = secret_dir.path().join("cluster.secret");
        std::fs::write(&secret, format!("{:032x}\n", rand::random::<u128>()))
            .expect("write the cluster secret");
        std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .expect("chmod 600 the cluster secret");
        let mut nodes = Vec::with_capacity(n);
        for (i, addr) in addrs.into_iter().enumerate() {
            let name = format!("n{}", i + 1);
            let base = base(i);
            let opts = Opts {
                netns: net.as_ref().map(|net| net.node_ns(i).to_string()),
                extra_args: vec![
                    "--node".into(),
                    name.clone(),
                    "--listen".into(),
                    addr.to_string(),
                    "--etcd".into(),
                    etcd.client_url.clone(),
                    "--lease-ttl".into(),
                    LEASE_TTL.to_string(),
                    "--replica-timeout".into(),
                    REPLICA_TIMEOUT.to_string(),
                    "--cluster-secret-file".into(),
                    secret.display().to_string(),
                ]
                .into_iter()
                .chain(more(i))
                .chain(base.extra_args.iter().cloned())
                .collect(),
                ..base
            };
            nodes.push(Node {
                name,
                addr,
                daemon: Daemon::spawn_only(opts),
                stopped: Vec::new(),
            });
        }
        let mut c = Cluster {
            mode,
            nodes,
            etcd,
            net,
            cut: vec![false; n],
            secret_dir,
        };
        for node in &mut c.nodes {
            node.daemon.wait_ready();
        }
        for i in 0..n {
            for j in 0..n {
                c.wait_node_up(i, j, true);
            }
        }
        c
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Node `i`'s `--node` name.
    pub fn name(&self, i: usize) -> &str {
        &self.nodes[i].name
    }

    /// The index of the node called `name`.
    pub fn index_of(&self, name: &str) -> usize {
        self.nodes
            .iter()
            .position(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node called {name:?}"))
    }

    pub fn node(&self, i: usize) -> &Daemon {
        &self.nodes[i].daemon
    }

    pub fn node_mut(&mut self, i: usize) -> &mut Daemon {
        &mut self.nodes[i].daemon
    }

    pub fn addr(&self, i: usize) -> SocketAddr {
        self.nodes[i].addr
    }

    pub fn net(&self) -> Option<&Net> {
        self.net.as_ref()
    }

    /// Every daemon's log tail, for failure messages.
    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("===== node {} =====\n{}", n.name, n.daemon.log_tail()))
            .collect::<Vec<_>>()
            .join("\n")
    }

    // ---- CLI on a node -----------------------------------------------------------------

    /// Runs `dunnage --run-dir <node i's run dir> ARGS...` the way an operator on
    /// node `i` would: in the node's network namespace (veth mode), so that
    /// nothing works only because the test process sits in the root namespace.
    pub fn cli(&self, i: usize, args: &[&str]) -> CliOut {
        let ns = self.net.as_ref().map(|net| net.node_ns(i));
        let mut cmd = command_in(ns, BIN);
        cmd.arg("--run-dir")
            .arg(&self.node(i).run_dir)
            .args(args)
            .env_remove("DUNNAGE_RUN_DIR")
            .stdin(Stdio::null());
        let out = run_with_timeout(cmd, CLI_TIMEOUT);
        CliOut {
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Runs the CLI on node `i`, asserting success; returns stdout.
    pub fn cli_ok(&self, i: usize, args: &[&str]) -> String {
        let out = self.cli(i, args);
        assert!(
            out.status.success(),
            "dunnage {args:?} on {} failed ({}): stderr: {}\nstdout: {}\n{}",
            self.name(i),
            out.status,
            out.stderr,
            out.stdout,
            self.logs()
        );
        out.stdout
    }

    /// Runs the CLI on node `i`, asserting failure with a message; returns stderr.
    pub fn cli_err(&self, i: usize, args: &[&str]) -> String {
        let out = self.cli(i, args);
        assert!(
            !out.status.success(),
            "dunnage {args:?} on {} succeeded but should fail; stdout: {}",
            self.name(i),
            out.stdout
        );
        assert!(
            !out.stderr.trim().is_empty(),
            "dunnage {args:?} on {} failed ({}) without a message on stderr",
            self.name(i),
            out.status
        );
        out.stderr
    }

    fn json(&self, i: usize, args: &[&str]) -> Value {
        let out = self.cli_ok(i, args);
        serde_json::from_str(&out).unwrap_or_else(|e| {
            panic!(
                "dunnage {args:?} on {}: not JSON ({e}): {out:?}",
                self.name(i)
            )
        })
    }

    /// Names in `volume ls --json` on node `i`.
    pub fn volume_names(&self, i: usize) -> Vec<String> {
        let v = self.json(i, &["volume", "ls", "--json"]);
        let arr = v
            .as_array()
            .unwrap_or_else(|| panic!("volume ls --json: not an array: {v}"));
        let mut names: Vec<String> = arr
            .iter()
            .map(|e| {
                e["name"]
                    .as_str()
                    .unwrap_or_else(|| panic!("volume ls entry without a name: {e}"))
                    .to_string()
            })
            .collect();
        names.sort();
        names
    }

    /// `volume create NAME -o repl=R -o size=SIZE [-o more...]` on node
    /// `on`, with `fs=none` unless `more` names an fs; waits until every
    /// running node lists it.
    pub fn create(&self, on: usize, vol: &str, repl: u32, size: &str, more: &[(&str, &str)]) {
        let repl = format!("repl={repl}");
        let size = format!("size={size}");
        let mut args: Vec<String> = ["volume", "create", vol, "-o", &repl, "-o", &size]
            .iter()
            .map(|s| s.to_string())
            .collect();
        if !more.iter().any(|(k, _)| *k == "fs") {
            args.extend(["-o".to_string(), "fs=none".to_string()]);
        }
        for (k, v) in more {
            args.push("-o".into());
            args.push(format!("{k}={v}"));
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.cli_ok(on, &args);
        for i in 0..self.len() {
            self.wait_for(&format!("volume {vol} listed on {}", self.name(i)), || {
                self.volume_names(i).iter().any(|n| n == vol)
            });
        }
    }

    /// `volume rm` on node `on`; waits until no node lists it.
    pub fn remove(&self, on: usize, vol: &str) {
        self.cli_ok(on, &["volume", "rm", vol]);
        for i in 0..self.len() {
            self.wait_for(&format!("volume {vol} gone on {}", self.name(i)), || {
                !self.volume_names(i).iter().any(|n| n == vol)
            });
        }
    }

    /// `attach VOL` on node `i`; returns the device (`/dev/loopN`).
    pub fn attach_on(&self, i: usize, vol: &str) -> String {
        let dev = self.cli_ok(i, &["attach", vol]).trim().to_string();
        assert!(
            is_loop_path(&dev),
            "attach {vol} on {} printed {dev:?}, not /dev/loopN",
            self.name(i)
        );
        dev
    }

    /// Attaches `vol` on node `i` while node `holder` still holds it but is dead
    /// or cut off: retries until the holder's lease has expired (the CLI may
    /// also wait by itself); every refusal meanwhile must name the holder.
    pub fn attach_taking_over(&self, i: usize, vol: &str, holder: usize) -> String {
        let deadline = Instant::now() + CONVERGE;
        loop {
            let out = self.cli(i, &["attach", vol]);
            if out.status.success() {
                let dev = out.stdout.trim().to_string();
                assert!(
                    is_loop_path(&dev),
                    "attach {vol} on {} printed {dev:?}, not /dev/loopN",
                    self.name(i)
                );
                return dev;
            }
            assert!(
                out.stderr.contains(self.name(holder)),
                "attach {vol} on {} refused without naming the holder {}: {}",
                self.name(i),
                self.name(holder),
                out.stderr
            );
            assert!(
                Instant::now() < deadline,
                "attach {vol} on {} still refused {CONVERGE:?} after {} was lost: {}\n{}",
                self.name(i),
                self.name(holder),
                out.stderr,
                self.logs()
            );
            thread::sleep(Duration::from_millis(500));
        }
    }

    pub fn detach_on(&self, i: usize, vol: &str) {
        self.cli_ok(i, &["detach", vol]);
    }

    /// `volume inspect VOL` on node `i`.
    pub fn inspect_on(&self, i: usize, vol: &str) -> Value {
        let v = self.json(i, &["volume", "inspect", vol]);
        assert!(v.is_object(), "volume inspect {vol}: not an object: {v}");
        v
    }

    /// The `cluster` object of `volume inspect VOL` on node `i`.
    pub fn cluster_info(&self, i: usize, vol: &str) -> Value {
        let v = self.inspect_on(i, vol);
        let c = v["cluster"].clone();
        assert!(
            c.is_object() && c["replicas"].is_array(),
            "volume inspect {vol} on {}: no cluster object with replicas: {v}",
            self.name(i)
        );
        c
    }

    /// Node names of the volume's replicas, as node `i` sees them.
    pub fn placement(&self, i: usize, vol: &str) -> Vec<String> {
        let c = self.cluster_info(i, vol);
        let mut names: Vec<String> = c["replicas"]
            .as_array()
            .expect("replicas")
            .iter()
            .map(|r| {
                r["node"]
                    .as_str()
                    .unwrap_or_else(|| panic!("replica without node: {c}"))
                    .to_string()
            })
            .collect();
        names.sort();
        names
    }

    /// The replica entry of node `node` in `volume inspect` on node `i`.
    pub fn replica_info(&self, i: usize, vol: &str, node: &str) -> Value {
        let c = self.cluster_info(i, vol);
        c["replicas"]
            .as_array()
            .expect("replicas")
            .iter()
            .find(|r| r["node"] == node)
            .cloned()
            .unwrap_or_else(|| panic!("no replica on {node} in {c}"))
    }

    /// `volume resync VOL --timeout SECS` on node `i` (the attached node), asserting success.
    pub fn resync_on(&self, i: usize, vol: &str, timeout_secs: u64) {
        self.cli_ok(
            i,
            &[
                "volume",
                "resync",
                vol,
                "--timeout",
                &timeout_secs.to_string(),
            ],
        );
    }

    /// `replica checksum VOL` on node `i`: 64 lowercase hex digits.
    pub fn checksum_on(&self, i: usize, vol: &str) -> String {
        let sum = self
            .cli_ok(i, &["replica", "checksum", vol])
            .trim()
            .to_string();
        assert!(
            sum.len() == 64 && sum.bytes().all(|b| b.is_ascii_hexdigit()),
            "replica checksum {vol} on {} printed {sum:?}, not a sha256 in hex",
            self.name(i)
        );
        sum.to_ascii_lowercase()
    }

    /// `node ls --json` on node `i`.
    pub fn node_ls(&self, i: usize) -> Vec<Value> {
        let v = self.json(i, &["node", "ls", "--json"]);
        v.as_array()
            .unwrap_or_else(|| panic!("node ls --json: not an array: {v}"))
            .clone()
    }

    /// Node `of`'s entry in `node ls --json` on node `from`, if listed.
    pub fn node_entry(&self, from: usize, of: usize) -> Option<Value> {
        let name = self.name(of).to_string();
        self.node_ls(from).into_iter().find(|e| e["name"] == name)
    }

    /// Waits until node `from` lists node `of` with `up == up`.
    pub fn wait_node_up(&self, from: usize, of: usize, up: bool) {
        self.wait_for(
            &format!(
                "node ls on {} to show {} {}",
                self.name(from),
                self.name(of),
                if up { "up" } else { "down" }
            ),
            || {
                self.node_entry(from, of)
                    .map(|e| e["up"] == Value::Bool(up))
                    .unwrap_or(false)
            },
        );
    }

    /// Polls `cond` every 200 ms for up to [`CONVERGE`]; panics (with the logs) if it stays false.
    pub fn wait_for(&self, what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + CONVERGE;
        while !cond() {
            assert!(
                Instant::now() < deadline,
                "timed out after {CONVERGE:?} waiting for {what}\n{}",
                self.logs()
            );
            thread::sleep(Duration::from_millis(200));
        }
    }

    // ---- faults ------------------------------------------------------------------------

    /// SIGKILL node `i`'s daemon (its keeper, loop devices and mounts stay).
    pub fn kill9(&mut self, i: usize) {
        assert!(!self.cut[i], "heal {} before killing it", self.name(i));
        self.nodes[i].daemon.kill9();
    }

    /// Starts node `i`'s daemon again with the same directories and flags.
    pub fn start_again(&mut self, i: usize) {
        self.nodes[i].daemon.start_again();
    }

    /// The cluster secret's file, which every node is started with.
    pub fn secret_file(&self) -> std::path::PathBuf {
        self.secret_dir.path().join("cluster.secret")
    }

    /// Partitions node `i` from everyone: veth: its cable is pulled;
    /// loopback: its daemon and keeper are stopped (see the module docs).
    pub fn cut_off(&mut self, i: usize) {
        assert!(!self.cut[i], "{} is already cut off", self.name(i));
        match self.mode {
            Mode::Veth => self.net.as_mut().expect("veth net").link_down(i),
            Mode::Loopback => {
                let node = &mut self.nodes[i];
                let mut pids = vec![node.daemon.pid()];
                pids.extend(keeper_pids(node.daemon.root()));
                for pid in &pids {
                    kill(*pid, Signal::SIGSTOP)
                        .unwrap_or_else(|e| panic!("SIGSTOP {pid} ({}): {e}", node.name));
                }
                node.stopped = pids;
            }
        }
        self.cut[i] = true;
    }

    /// Ends node `i`'s partition.
    pub fn heal(&mut self, i: usize) {
        assert!(self.cut[i], "{} is not cut off", self.name(i));
        match self.mode {
            Mode::Veth => self.net.as_mut().expect("veth net").link_up(i),
            Mode::Loopback => {
                for pid in std::mem::take(&mut self.nodes[i].stopped) {
                    let _ = kill(pid, Signal::SIGCONT);
                }
            }
        }
        self.cut[i] = false;
    }

    pub fn is_cut(&self, i: usize) -> bool {
        self.cut[i]
    }

    /// Stops every daemon with SIGTERM (asserting exit 0) and asserts that none
    /// left a mount, a loop device or a keeper behind; then etcd and the network go.
    pub fn shutdown(mut self) {
        for i in 0..self.len() {
            if self.cut[i] {
                self.heal(i);
            }
        }
        for node in &mut self.nodes {
            if node.daemon.is_running() {
                node.daemon.sigterm_and_wait();
            }
        }
        for node in &self.nodes {
            let l = node.daemon.leftovers_stopped();
            assert!(
                l.is_empty(),
                "{} left {l:?} behind after a clean stop\n{}",
                node.name,
                node.daemon.log_tail()
            );
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // A stopped daemon cannot act on SIGTERM, and one cut off may wait on
        // etcd while it shuts down: end every partition first.
        for i in 0..self.cut.len() {
            if self.cut[i] {
                self.heal(i);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Block IO with O_DIRECT
// ---------------------------------------------------------------------------------------

/// A page-aligned buffer (O_DIRECT needs aligned memory), without unsafe:
/// over-allocate and start at the first aligned byte.
pub struct Aligned {
    buf: Vec<u8>,
    off: usize,
    len: usize,
}

impl Aligned {
    pub fn zeroed(len: usize) -> Aligned {
        let buf = vec![0u8; len + BLOCK];
        let off = buf.as_ptr().align_offset(BLOCK);
        assert!(off < BLOCK, "cannot align a buffer");
        Aligned { buf, off, len }
    }

    pub fn from_slice(data: &[u8]) -> Aligned {
        let mut a = Aligned::zeroed(data.len());
        a.as_mut().copy_from_slice(data);
        a
    }

    pub fn as_mut(&mut self) -> &mut [u8] {
        &mut self.buf[self.off..self.off + self.len]
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.buf[self.off..self.off + self.len]
    }
}

/// A block device opened read-write with O_DIRECT.
pub struct BlockDev {
    pub path: String,
    file: File,
}

impl BlockDev {
    pub fn open(path: &str) -> BlockDev {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .unwrap_or_else(|e| panic!("open {path} with O_DIRECT: {e}"));
        BlockDev {
            path: path.to_string(),
            file,
        }
    }

    /// Writes `data` (a multiple of 4 KiB) at `offset` (4 KiB aligned).
    pub fn write_at(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        assert!(data.len() % BLOCK == 0 && offset % BLOCK as u64 == 0);
        let buf = Aligned::from_slice(data);
        self.file.write_all_at(buf.as_slice(), offset)
    }

    /// Reads `len` bytes (a multiple of 4 KiB) at `offset` (4 KiB aligned).
    pub fn read_at(&self, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
        assert!(len % BLOCK == 0 && offset % BLOCK as u64 == 0);
        let mut buf = Aligned::zeroed(len);
        self.file.read_exact_at(buf.as_mut(), offset)?;
        Ok(buf.as_slice().to_vec())
    }

    /// fdatasync.
    pub fn sync(&self) -> std::io::Result<()> {
        self.file.sync_data()
    }

    /// Writes 4 KiB block number `index`.
    pub fn write_block(&self, index: u64, data: &[u8]) -> std::io::Result<()> {
        assert_eq!(data.len(), BLOCK);
        self.write_at(index * BLOCK as u64, data)
    }

    /// Reads 4 KiB block number `index`.
    pub fn read_block(&self, index: u64) -> std::io::Result<Vec<u8>> {
        self.read_at(index * BLOCK as u64, BLOCK)
    }
}

/// The 4 KiB content the tests write to block `index` in round `seed`: a
/// header naming both, then bytes derived from both, so that a block read
/// back can only match if exactly this write landed there.
pub fn block_data(index: u64, seed: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(BLOCK);
    b.extend_from_slice(b"DUNNAGE\0");
    b.extend_from_slice(&index.to_le_bytes());
    b.extend_from_slice(&seed.to_le_bytes());
    b.extend_from_slice(&pattern(
        BLOCK - 24,
        index.wrapping_mul(1_000_003).wrapping_add(seed),
    ));
    b
}

/// Writes `block_data(i, seed)` to every block in `indexes`, then fdatasync;
/// panics on error.
pub fn write_blocks(dev: &BlockDev, indexes: impl IntoIterator<Item = u64>, seed: u64) {
    for i in indexes {
        dev.write_block(i, &block_data(i, seed))
            .unwrap_or_else(|e| panic!("write block {i} on {}: {e}", dev.path));
    }
    dev.sync()
        .unwrap_or_else(|e| panic!("fdatasync {}: {e}", dev.path));
}

/// Asserts that every block in `indexes` holds `block_data(i, seed)`.
pub fn verify_blocks(dev: &BlockDev, indexes: impl IntoIterator<Item = u64>, seed: u64) {
    for i in indexes {
        let got = dev
            .read_block(i)
            .unwrap_or_else(|e| panic!("read block {i} on {}: {e}", dev.path));
        if got != block_data(i, seed) {
            panic!(
                "block {i} on {} does not hold round {seed}'s data; it starts {:?}",
                dev.path,
                &got[..24]
            );
        }
    }
}

/// sha256 (lowercase hex) of a whole block device, read with O_DIRECT in 1 MiB chunks.
pub fn device_sha256(path: &str) -> String {
    use sha2::{Digest, Sha256};
    use std::io::{Seek, SeekFrom};
    const CHUNK: usize = 1 << 20;
    let dev = BlockDev::open(path);
    let size = (&dev.file)
        .seek(SeekFrom::End(0))
        .unwrap_or_else(|e| panic!("size of {path}: {e}"));
    let mut hash = Sha256::new();
    let mut off = 0;
    while off < size {
        let n = (CHUNK as u64).min(size - off) as usize;
        let buf = dev
            .read_at(off, n)
            .unwrap_or_else(|e| panic!("read {path} at {off}: {e}"));
        hash.update(&buf);
        off += n as u64;
    }
    hash.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

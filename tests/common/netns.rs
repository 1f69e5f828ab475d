//! A private test network and an etcd to go with it.
//!
//! [`Net`] builds, per test, a hub network namespace holding a bridge (`br0`,
//! the hub address `.1`) and N node namespaces, each joined to the bridge by a
//! veth pair (`v<i>` in the hub, `eth0` in the node, address `.<10+i>`). Nothing
//! is created in the root namespace: every interface lives in a namespace of
//! its own test, so names (`br0`, `v0`, `eth0`) never collide between tests and
//! the host's routes, links and firewall are never touched. Namespace names
//! carry the test process id and a per-process index; the /24 (`10.A.B.0/24`)
//! is derived from both as well, so two tests never share one either.
//!
//! Faults: [`Net::link_down`] sets the hub end of a node's veth down (a cable
//! pulled at the switch: the node sees no error, its packets just vanish), and
//! [`Net::drop_all`] loads an nftables table in the node's namespace that drops
//! everything except loopback. Dropping the `Net` removes the nft tables, the
//! veths, the bridge and the namespaces, also when the test panics.
//!
//! [`Etcd`] runs Debian's `/usr/bin/etcd` (3.4) on an address, in a namespace
//! or not, with a temporary data directory, and kills it on drop.
//!
//! This file is self-contained (std, nix, tempfile) so that the fio bench can
//! include it with `#[path]`.

#![allow(dead_code)]

use std::fs;
use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use nix::sched::{setns, CloneFlags};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Prefix of every namespace this harness creates (`dnt<pid>x<index>...`).
pub const NS_PREFIX: &str = "dnt";
/// Name of the nftables table [`Net::drop_all`] loads into a node namespace.
pub const CUT_TABLE: &str = "dunnage_cut";
/// The etcd binary of Debian's etcd-server package.
pub const ETCD: &str = "/usr/bin/etcd";
pub const ETCDCTL: &str = "/usr/bin/etcdctl";

const CMD_TIMEOUT: Duration = Duration::from_secs(30);
const ETCD_START_TIMEOUT: Duration = Duration::from_secs(30);

static NET_INDEX: AtomicUsize = AtomicUsize::new(0);

/// `/run/netns/<ns>`, what `nsenter --net=` and `setns` take.
pub fn ns_path(ns: &str) -> PathBuf {
    Path::new("/run/netns").join(ns)
}

/// A command that runs `program` inside network namespace `ns` (and only its
/// network namespace: mounts stay shared). `nsenter` execs the program, so the
/// child's pid is the program's own.
pub fn command_in(ns: Option<&str>, program: &str) -> Command {
    match ns {
        Some(ns) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net={}", ns_path(ns).display()))
                .arg("--")
                .arg(program);
            c
        }
        None => Command::new(program),
    }
}

/// Runs a command to completion with a time limit; panics if it hangs.
/// (The tests' `common::run_with_timeout`: this file also serves the bench.)
pub fn run_with_timeout(mut cmd: Command, timeout: Duration) -> Output {
    let desc = format!("{cmd:?}");
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {desc}: {e}"));
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let out_t = thread::spawn(move || {
        let mut b = Vec::new();
        let _ = out.read_to_end(&mut b);
        b
    });
    let err_t = thread::spawn(move || {
        let mut b = Vec::new();
        let _ = err.read_to_end(&mut b);
        b
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait().expect("wait") {
            Some(s) => break s,
            None if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{desc} did not finish within {timeout:?}");
            }
        }
    };
    Output {
        status,
        stdout: out_t.join().unwrap_or_default(),
        stderr: err_t.join().unwrap_or_default(),
    }
}

/// Runs `program args...` (in `ns` if given) and panics unless it succeeds.
fn run_ok(ns: Option<&str>, program: &str, args: &[&str]) -> String {
    let mut cmd = command_in(ns, program);
    cmd.args(args).stdin(Stdio::null());
    let out = run_with_timeout(cmd, CMD_TIMEOUT);
    assert!(
        out.status.success(),
        "{program} {args:?} (netns {ns:?}) failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Like [`run_ok`] but only reports failure (for teardown).
fn run_quiet(ns: Option<&str>, program: &str, args: &[&str]) -> bool {
    let mut cmd = command_in(ns, program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cmd.status().map(|s| s.success()).unwrap_or(false)
}

/// `ip -n <ns> args...`
fn ip(ns: &str, args: &[&str]) {
    let mut all = vec!["-n", ns];
    all.extend_from_slice(args);
    run_ok(None, "ip", &all);
}

/// Runs `f` on a fresh thread that has entered network namespace `ns`
/// (`setns` changes only the calling thread, which ends with `f`).
pub fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = ns_path(ns);
    thread::spawn(move || {
        let file = fs::File::open(&path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        setns(&file, CloneFlags::CLONE_NEWNET)
            .unwrap_or_else(|e| panic!("setns {}: {e}", path.display()));
        f()
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e))
}

/// Can a TCP connection to `addr` be made from namespace `ns` within `timeout`?
pub fn tcp_reachable(ns: &str, addr: SocketAddr, timeout: Duration) -> bool {
    in_ns(ns, move || {
        TcpStream::connect_timeout(&addr, timeout).is_ok()
    })
}

/// The inode of a network namespace file (to find processes still in it).
pub fn ns_inode(path: &Path) -> Option<u64> {
    fs::metadata(path).ok().map(|m| m.ino())
}

/// Pids of processes whose network namespace has inode `ino`.
pub fn pids_in_netns(ino: u64) -> Vec<i32> {
    let want = format!("net:[{ino}]");
    let Ok(rd) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<i32>().ok())
        .filter(|pid| {
            fs::read_link(format!("/proc/{pid}/ns/net"))
                .map(|l| l.to_string_lossy() == want)
                .unwrap_or(false)
        })
        .collect()
}

/// Names in /run/netns.
pub fn netns_names() -> Vec<String> {
    let Ok(rd) = fs::read_dir("/run/netns") else {
        return Vec::new();
    };
    rd.flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

/// Removes namespaces left by test processes that no longer exist (a test
/// binary killed before its `Drop`s ran). Only `dnt<pid>x...` names whose pid
/// is gone; the bridge and veths inside go with them.
fn remove_stale_namespaces() {
    for name in netns_names() {
        let Some(rest) = name.strip_prefix(NS_PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('x').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            run_quiet(None, "ip", &["netns", "del", &name]);
        }
    }
}

/// A per-test network: a hub namespace with a bridge, N node namespaces on it.
pub struct Net {
    /// `dnt<pid>x<index>`: the prefix of this network's namespace names.
    pub id: String,
    hub: String,
    nodes: Vec<String>,
    /// The first two octets after `10.`: the network is `10.A.B.0/24`.
    octets: (u8, u8),
    down: Vec<bool>,
    dropped: Vec<bool>,
}

impl Net {
    /// Builds the hub and `n` node namespaces (at most 200), all links up.
    pub fn new(n: usize) -> Net {
        assert!((1..=200).contains(&n), "Net::new({n}): 1..=200 nodes");
        assert!(
            nix::unistd::geteuid().is_root(),
            "network namespaces need root"
        );
        for tool in ["ip", "nsenter", "nft"] {
            assert!(
                which(tool),
                "required tool `{tool}` not found: run `just deps` (iproute2, util-linux, nftables)"
            );
        }
        remove_stale_namespaces();
        let pid = std::process::id();
        let index = NET_INDEX.fetch_add(1, Ordering::SeqCst);
        let id = format!("{NS_PREFIX}{pid}x{index}");
        let octets = (100 + (pid % 100) as u8, (index % 256) as u8);
        let mut net = Net {
            hub: format!("{id}h"),
            nodes: (0..n).map(|i| format!("{id}n{i}")).collect(),
            id,
            octets,
            down: vec![false; n],
            dropped: vec![false; n],
        };
        // From here on, Drop cleans up whatever was made if a step panics.
        net.build();
        net
    }

    fn build(&mut self) {
        let hub = self.hub.clone();
        run_ok(None, "ip", &["netns", "add", &hub]);
        ip(&hub, &["link", "set", "lo", "up"]);
        ip(&hub, &["link", "add", "br0", "type", "bridge"]);
        let hub_cidr = format!("{}/24", self.hub_ip());
        ip(&hub, &["addr", "add", &hub_cidr, "dev", "br0"]);
        ip(&hub, &["link", "set", "br0", "up"]);
        for i in 0..self.nodes.len() {
            let ns = self.nodes[i].clone();
            run_ok(None, "ip", &["netns", "add", &ns]);
            ip(&ns, &["link", "set", "lo", "up"]);
            let v = format!("v{i}");
            ip(
                &hub,
                &[
                    "link", "add", &v, "type", "veth", "peer", "name", "eth0", "netns", &ns,
                ],
            );
            ip(&hub, &["link", "set", &v, "master", "br0", "up"]);
            let cidr = format!("{}/24", self.node_ip(i));
            ip(&ns, &["addr", "add", &cidr, "dev", "eth0"]);
            ip(&ns, &["link", "set", "eth0", "up"]);
        }
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The hub namespace's name (holds the bridge; run etcd there).
    pub fn hub_ns(&self) -> &str {
        &self.hub
    }

    /// The bridge's address in the hub namespace.
    pub fn hub_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, self.octets.0, self.octets.1, 1)
    }

    /// Node `i`'s namespace name.
    pub fn node_ns(&self, i: usize) -> &str {
        &self.nodes[i]
    }

    /// Node `i`'s address (on `eth0` in its namespace).
    pub fn node_ip(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, self.octets.0, self.octets.1, 10 + i as u8)
    }

    /// Every namespace of this network, hub first.
    pub fn namespaces(&self) -> Vec<String> {
        std::iter::once(self.hub.clone())
            .chain(self.nodes.iter().cloned())
            .collect()
    }

    /// Cuts node `i`'s cable: the hub end of its veth goes down, so the
    /// node's packets vanish (no error on its side) and nothing reaches it.
    pub fn link_down(&mut self, i: usize) {
        ip(&self.hub, &["link", "set", &format!("v{i}"), "down"]);
        self.down[i] = true;
    }

    /// Plugs node `i`'s cable back in.
    pub fn link_up(&mut self, i: usize) {
        ip(&self.hub, &["link", "set", &format!("v{i}"), "up"]);
        self.down[i] = false;
    }

    /// Drops every packet in and out of node `i`'s namespace except on
    /// loopback: an inet table with input and output chains, policy drop.
    pub fn drop_all(&mut self, i: usize) {
        let rules = format!(
            "table inet {CUT_TABLE} {{\n\
             \tchain input {{ type filter hook input priority -300; policy drop; iifname \"lo\" accept; }}\n\
             \tchain output {{ type filter hook output priority -300; policy drop; oifname \"lo\" accept; }}\n\
             }}\n"
        );
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("cut.nft");
        fs::write(&file, rules).expect("write nft rules");
        run_ok(
            Some(&self.nodes[i]),
            "nft",
            &["-f", &file.display().to_string()],
        );
        self.dropped[i] = true;
    }

    /// Removes node `i`'s drop table.
    pub fn undrop(&mut self, i: usize) {
        run_ok(
            Some(&self.nodes[i]),
            "nft",
            &["delete", "table", "inet", CUT_TABLE],
        );
        self.dropped[i] = false;
    }

    /// Is node `i` cut off by [`Net::link_down`] or [`Net::drop_all`]?
    pub fn is_cut(&self, i: usize) -> bool {
        self.down[i] || self.dropped[i]
    }

    /// The nft tables in node `i`'s namespace (`inet dunnage_cut` etc.).
    pub fn nft_tables(&self, i: usize) -> Vec<String> {
        run_ok(Some(&self.nodes[i]), "nft", &["list", "tables"])
            .lines()
            .map(|l| l.trim().trim_start_matches("table ").to_string())
            .filter(|l| !l.is_empty())
            .collect()
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        // Explicitly, so that nothing survives even if a process (a daemon
        // that escaped its Drop) still holds a namespace open: the veths and
        // the bridge are deleted, the nft tables too, then the names.
        for i in 0..self.nodes.len() {
            if self.dropped[i] {
                run_quiet(
                    Some(&self.nodes[i]),
                    "nft",
                    &["delete", "table", "inet", CUT_TABLE],
                );
            }
            run_quiet(
                None,
                "ip",
                &["-n", &self.hub, "link", "del", &format!("v{i}")],
            );
        }
        run_quiet(None, "ip", &["-n", &self.hub, "link", "del", "br0"]);
        for ns in self.namespaces() {
            if ns_path(&ns).exists() && !run_quiet(None, "ip", &["netns", "del", &ns]) {
                eprintln!("warning: could not delete network namespace {ns}");
            }
        }
    }
}

fn which(tool: &str) -> bool {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"])
        .any(|d| Path::new(d).join(tool).is_file());
    found
}

/// A TCP port on `ip` that nobody listened on a moment ago (in the caller's
/// namespace). Racy by nature; good enough for tests.
pub fn free_port(ip: Ipv4Addr) -> u16 {
    listen_port(ip).local_addr().expect("local addr").port()
}

/// A bound listener on a free port below the kernel's ephemeral range
/// (32768 and up here): a port handed to a server after the pick can't be
/// taken meanwhile as the local port of some outgoing connection, as an
/// ephemeral one can. Each call of a process tries other ports than the
/// last, and processes start apart (by pid).
pub fn listen_port(ip: Ipv4Addr) -> TcpListener {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    let base = std::process::id().wrapping_mul(2_654_435_761) % SPAN;
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (LOW + (base + n) % SPAN) as u16;
        if let Ok(l) = TcpListener::bind((ip, port)) {
            return l;
        }
    }
    panic!("no free TCP port on {ip} in {LOW}..{}", LOW + SPAN)
}

/// A single-member etcd cluster for one test.
pub struct Etcd {
    /// `http://IP:PORT`, what `--etcd` and `--endpoints` take.
    pub client_url: String,
    pub client_addr: SocketAddr,
    netns: Option<String>,
    child: Option<Child>,
    pub log_path: PathBuf,
    // Last: removed after etcd is dead.
    dir: tempfile::TempDir,
}

impl Etcd {
    /// Starts etcd on `ip` (inside network namespace `netns` if given) and
    /// waits until `etcdctl endpoint health` answers. In a namespace of the
    /// test's own the standard ports 2379/2380 are free by construction;
    /// elsewhere free ports are picked, and picked again when another
    /// process took one between the pick and etcd's bind.
    pub fn start(ip: Ipv4Addr, netns: Option<&str>) -> Etcd {
        for bin in [ETCD, ETCDCTL] {
            assert!(
                Path::new(bin).is_file(),
                "{bin} is missing: run `just deps` (Debian package etcd-server and etcd-client)"
            );
        }
        let mut attempt = 1;
        loop {
            let mut etcd = Etcd::spawn(ip, netns);
            match etcd.wait_healthy() {
                Ok(()) => return etcd,
                Err(log)
                    if netns.is_none() && attempt < 5 && log.contains("address already in use") =>
                {
                    eprintln!("etcd: a picked port was taken meanwhile; picking again");
                    attempt += 1;
                }
                Err(log) => panic!("{log}"),
            }
        }
    }

    fn spawn(ip: Ipv4Addr, netns: Option<&str>) -> Etcd {
        let (client_port, peer_port) = match netns {
            Some(_) => (2379, 2380),
            None => {
                // Hold the first so the second cannot be the same port.
                let a = listen_port(ip);
                let b = listen_port(ip);
                (
                    a.local_addr().expect("addr").port(),
                    b.local_addr().expect("addr").port(),
                )
            }
        };
        let dir = tempfile::Builder::new()
            .prefix("dunnage-etcd")
            .tempdir()
            .expect("temp dir");
        let client_url = format!("http://{ip}:{client_port}");
        let peer_url = format!("http://{ip}:{peer_port}");
        let log_path = dir.path().join("etcd.log");
        let log = fs::File::create(&log_path).expect("create etcd log");
        let mut cmd = command_in(netns, ETCD);
        cmd.args([
            "--name",
            "t",
            "--data-dir",
            &dir.path().join("data").display().to_string(),
            "--listen-client-urls",
            &client_url,
            "--advertise-client-urls",
            &client_url,
            "--listen-peer-urls",
            &peer_url,
            "--initial-advertise-peer-urls",
            &peer_url,
            "--initial-cluster",
            &format!("t={peer_url}"),
            "--initial-cluster-state",
            "new",
            "--initial-cluster-token",
            &format!("dunnage-test-{}", std::process::id()),
            "--logger",
            "zap",
            "--log-outputs",
            "stderr",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::from(log.try_clone().expect("dup log")))
        .stderr(Stdio::from(log))
        // A group of its own: a Ctrl-C on the terminal (the fio bench) must
        // not kill etcd before the daemons that use it have stopped.
        .process_group(0);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {ETCD}: {e}"));
        Etcd {
            client_url,
            client_addr: SocketAddr::from((ip, client_port)),
            netns: netns.map(str::to_string),
            child: Some(child),
            log_path,
            dir,
        }
    }

    /// Wait until etcd answers healthy; its log when it exited instead.
    fn wait_healthy(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + ETCD_START_TIMEOUT;
        loop {
            if self.healthy_from(self.netns.as_deref()) {
                return Ok(());
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                self.child = None;
                return Err(format!(
                    "etcd exited ({status}) while starting\n{}",
                    self.log_tail()
                ));
            }
            assert!(
                Instant::now() < deadline,
                "etcd at {} not healthy within {ETCD_START_TIMEOUT:?}\n{}",
                self.client_url,
                self.log_tail()
            );
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// `etcdctl endpoint health` against this etcd, run in namespace `ns`
    /// (or the caller's): true if it answered healthy within ~2 s.
    pub fn healthy_from(&self, ns: Option<&str>) -> bool {
        let mut cmd = command_in(ns, ETCDCTL);
        cmd.env("ETCDCTL_API", "3").args([
            "--endpoints",
            &self.client_url,
            "--dial-timeout=1s",
            "--command-timeout=2s",
            "endpoint",
            "health",
        ]);
        cmd.stdin(Stdio::null());
        run_with_timeout(cmd, CMD_TIMEOUT).status.success()
    }

    /// The etcd child's pid (nsenter execs, so it is etcd's own).
    pub fn pid(&self) -> Option<Pid> {
        self.child.as_ref().map(|c| Pid::from_raw(c.id() as i32))
    }

    pub fn log_tail(&self) -> String {
        let log = fs::read_to_string(&self.log_path).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let from = lines.len().saturating_sub(60);
        format!(
            "----- etcd log {} (last {} lines) -----\n{}\n----- end of etcd log -----",
            self.log_path.display(),
            lines.len() - from,
            lines[from..].join("\n")
        )
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
            let _ = child.wait();
        }
        if thread::panicking() {
            eprintln!("{}", self.log_tail());
        }
    }
}

/// `s` without its terminal colour codes (a daemon's log lines).
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            // CSI: ESC [ parameters, ended by a letter.
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

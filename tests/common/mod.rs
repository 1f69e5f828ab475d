//! Test harness shared by the integration tests: a `dunnage serve` child process in its
//! own temporary directories, an HTTP/1.1 client that talks to the plugin socket exactly
//! like dockerd does, the CLI runner, and leak checks (mounts, loop devices).
//!
//! Everything here needs root, /dev/fuse and loop devices; a missing prerequisite is a
//! test failure with a message saying what to install, never a silent skip.

#![allow(dead_code)]

pub mod cluster;
pub mod netns;
pub mod tmpfs;

use std::collections::BTreeSet;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_dunnage");
/// Debian's docker client, matching the 20.10 engine (never /usr/local/bin/docker).
pub const DOCKER: &str = "/usr/bin/docker";
/// The local test image built by scripts/test-image.sh.
pub const TEST_IMAGE: &str = "dunnage-test-busybox:latest";

const START_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_TIMEOUT: Duration = Duration::from_secs(60);
/// dockerd allows 2 minutes for Create/Mount; be as patient as it is.
const HTTP_TIMEOUT: Duration = Duration::from_secs(150);

pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A name unique to this test process: `<prefix>-t<pid>-<counter>`.
pub fn unique(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    format!("{prefix}-t{}-{n}", std::process::id())
}

/// A 64-hex mount ID, like dockerd's `stringid.GenerateRandomID()`.
pub fn mount_id(seed: &str) -> String {
    // FNV-1a over the seed, stretched to 32 bytes; deterministic and distinct per seed.
    let mut out = String::with_capacity(64);
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for round in 0u8..4 {
        for b in seed.bytes().chain([round]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        out.push_str(&format!("{h:016x}"));
    }
    out
}

/// Paths relative to the fixtures directory.
pub fn fixture(rel: &str) -> Vec<u8> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(rel);
    fs::read(&p).unwrap_or_else(|e| panic!("cannot read fixture {}: {e}", p.display()))
}

// ---------------------------------------------------------------------------------------
// Prerequisites
// ---------------------------------------------------------------------------------------

/// Panics with a clear message unless the host can run the daemon's data path.
pub fn require_host() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests need root (mounts, loop devices, FUSE); run them with `just test` as root"
    );
    for dev in ["/dev/fuse", "/dev/loop-control"] {
        let ok = fs::metadata(dev)
            .map(|m| m.file_type().is_char_device())
            .unwrap_or(false);
        assert!(
            ok,
            "{dev} is missing: run scripts/kernel-prep.sh (or `just test`), the kernel needs fuse and loop"
        );
    }
    require_tools(&["mkfs.ext4", "mkfs.xfs", "losetup", "blkid"]);
}

/// Panics unless every tool is found on PATH (or in the sbin directories).
pub fn require_tools(tools: &[&str]) {
    for tool in tools {
        assert!(
            which(tool).is_some(),
            "required tool `{tool}` not found: run `just deps` (scripts/install-deps.sh)"
        );
    }
}

pub fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"])
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.is_file());
    found
}

// ---------------------------------------------------------------------------------------
// The daemon
// ---------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
pub struct Opts {
    /// `--plugin-dir`; default `<tmp>/plugins`.
    pub plugin_dir: Option<PathBuf>,
    /// Pass `--mount-dir <tmp>/mnt`; otherwise the daemon's default `<run-dir>/mounts`.
    pub custom_mount_dir: bool,
    /// `--export`.
    pub export: String,
    /// Driver name; default `unique("dunnage")`.
    pub name: Option<String>,
    /// `--fuse-passthrough`: `auto` (the default) or `off` (every IO through dunnage's engine).
    pub passthrough: &'static str,
    /// More `serve` flags (e.g. `--secret-file`).
    pub extra_args: Vec<String>,
    /// Run the daemon in this network namespace (`/run/netns/NS`, via `nsenter --net`;
    /// only the network namespace: mounts and devices stay shared with the test).
    pub netns: Option<String>,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            plugin_dir: None,
            custom_mount_dir: true,
            export: "fuse".into(),
            name: None,
            passthrough: "auto",
            extra_args: Vec::new(),
            netns: None,
        }
    }
}

impl Opts {
    /// Every IO through dunnage's own FUSE threads and engine, no passthrough.
    pub fn engine_path() -> Opts {
        Opts {
            passthrough: "off",
            ..Opts::default()
        }
    }
}

/// A `dunnage serve` child with its own data, run and (by default) plugin directories.
pub struct Daemon {
    pub name: String,
    pub plugin_dir: PathBuf,
    pub data_dir: PathBuf,
    pub run_dir: PathBuf,
    /// The effective mount directory (explicit or the default `<run-dir>/mounts`).
    pub mount_dir: PathBuf,
    explicit_mount_dir: bool,
    export: String,
    passthrough: &'static str,
    extra_args: Vec<String>,
    netns: Option<String>,
    pub log_path: PathBuf,
    child: Option<Child>,
    // Last, so it is dropped after the daemon is stopped.
    tmp: tempfile::TempDir,
}

impl Daemon {
    /// Starts a daemon and waits until its socket answers `/Plugin.Activate`.
    pub fn start(opts: Opts) -> Daemon {
        let mut d = Daemon::spawn_only(opts);
        d.wait_ready();
        d
    }

    /// Spawns the daemon without waiting for it.
    pub fn spawn_only(opts: Opts) -> Daemon {
        require_host();
        let tmp = tempfile::Builder::new()
            .prefix("dunnage-t")
            .tempdir()
            .expect("create temp dir");
        let root = tmp.path().to_path_buf();
        let plugin_dir = opts.plugin_dir.unwrap_or_else(|| root.join("plugins"));
        fs::create_dir_all(&plugin_dir).expect("create plugin dir");
        let run_dir = root.join("run");
        let mount_dir = if opts.custom_mount_dir {
            root.join("mnt")
        } else {
            run_dir.join("mounts")
        };
        let mut d = Daemon {
            name: opts.name.unwrap_or_else(|| unique("dunnage")),
            plugin_dir,
            data_dir: root.join("data"),
            run_dir,
            mount_dir,
            explicit_mount_dir: opts.custom_mount_dir,
            export: opts.export,
            passthrough: opts.passthrough,
            extra_args: opts.extra_args,
            netns: opts.netns,
            log_path: root.join("daemon.log"),
            child: None,
            tmp,
        };
        d.spawn();
        d
    }

    pub fn root(&self) -> &Path {
        self.tmp.path()
    }

    /// Set `flag`'s value among the extra arguments (or drop the flag), for
    /// the next spawn.
    pub fn set_arg(&mut self, flag: &str, value: Option<&str>) {
        if let Some(i) = self.extra_args.iter().position(|a| a == flag) {
            self.extra_args.drain(i..(i + 2).min(self.extra_args.len()));
        }
        if let Some(v) = value {
            self.extra_args.push(flag.to_string());
            self.extra_args.push(v.to_string());
        }
    }

    pub fn socket(&self) -> PathBuf {
        self.plugin_dir.join(format!("{}.sock", self.name))
    }

    pub fn control_socket(&self) -> PathBuf {
        self.run_dir.join("control.sock")
    }

    /// The Mountpoint that Mount must return for `vol`.
    pub fn mountpoint(&self, vol: &str) -> PathBuf {
        self.mount_dir.join(vol).join("data")
    }

    /// Where the volume's filesystem itself is mounted.
    pub fn fs_mount(&self, vol: &str) -> PathBuf {
        self.mount_dir.join(vol)
    }

    pub fn serve_args(&self) -> Vec<String> {
        let mut args = vec![
            "serve".to_string(),
            "--name".into(),
            self.name.clone(),
            "--plugin-dir".into(),
            self.plugin_dir.display().to_string(),
            "--data-dir".into(),
            self.data_dir.display().to_string(),
            "--run-dir".into(),
            self.run_dir.display().to_string(),
        ];
        if self.explicit_mount_dir {
            args.push("--mount-dir".into());
            args.push(self.mount_dir.display().to_string());
        }
        args.push("--export".into());
        args.push(self.export.clone());
        args.push("--fuse-passthrough".into());
        args.push(self.passthrough.into());
        args.extend(self.extra_args.iter().cloned());
        args
    }

    fn log_file(&self) -> fs::File {
        fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("open daemon log")
    }

    /// Spawns `dunnage serve` again with the same directories (the previous child must be gone).
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "daemon already running");
        let mut log = self.log_file();
        let _ = writeln!(
            log,
            "===== spawn {} {:?} (netns {:?})",
            BIN,
            self.serve_args(),
            self.netns
        );
        let stderr = log.try_clone().expect("dup log");
        // nsenter execs the daemon, so the child's pid stays the daemon's.
        let child = netns::command_in(self.netns.as_deref(), BIN)
            .args(self.serve_args())
            .env("RUST_BACKTRACE", "1")
            .env_remove("DUNNAGE_RUN_DIR")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(stderr))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {BIN}: {e}"));
        self.child = Some(child);
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.as_ref().expect("daemon not running").id() as i32)
    }

    /// Panics (with the log) if the child has exited.
    fn check_alive(&mut self, what: &str) {
        if let Some(child) = self.child.as_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                panic!(
                    "dunnage serve exited ({status}) while {what}\n{}",
                    self.log_tail()
                );
            }
        }
    }

    /// Waits until the plugin socket answers `/Plugin.Activate` with 200.
    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok((200, _)) = try_post(&self.socket(), "/Plugin.Activate", b"") {
                return;
            }
            self.check_alive("waiting for its socket to answer /Plugin.Activate");
            if Instant::now() > deadline {
                panic!(
                    "socket {} did not answer /Plugin.Activate within {:?}\n{}",
                    self.socket().display(),
                    START_TIMEOUT,
                    self.log_tail()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the socket file exists (not for it to answer).
    pub fn wait_socket_file(&mut self) {
        let deadline = Instant::now() + START_TIMEOUT;
        while !self.socket().exists() {
            self.check_alive("waiting for its socket file");
            assert!(
                Instant::now() < deadline,
                "socket {} did not appear within {:?}\n{}",
                self.socket().display(),
                START_TIMEOUT,
                self.log_tail()
            );
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits for the child to exit on its own (e.g. a refused start); returns its status.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("daemon not running");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "dunnage serve still running after {timeout:?}\n{}",
                    self.log_tail()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends SIGTERM and waits; asserts the daemon exits with status 0.
    pub fn sigterm_and_wait(&mut self) {
        let status = self.signal_and_wait(Signal::SIGTERM);
        assert!(
            status.success(),
            "dunnage serve exited with {status} after SIGTERM (expected 0)\n{}",
            self.log_tail()
        );
    }

    /// SIGKILL, like a crash. Mounts and devices of the dead daemon stay behind.
    pub fn kill9(&mut self) {
        self.signal_and_wait(Signal::SIGKILL);
    }

    fn signal_and_wait(&mut self, sig: Signal) -> ExitStatus {
        let mut child = self.child.take().expect("daemon not running");
        let _ = kill(Pid::from_raw(child.id() as i32), sig);
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return status,
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
                Ok(None) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "dunnage serve did not exit within {STOP_TIMEOUT:?} after {sig}\n{}",
                        self.log_tail()
                    );
                }
                Err(e) => panic!("wait for dunnage serve: {e}"),
            }
        }
    }

    /// SIGTERM (asserting exit 0), then start again with the same directories.
    pub fn restart(&mut self) {
        self.sigterm_and_wait();
        self.start_again();
    }

    /// Spawns again (after `kill9` or `sigterm_and_wait`) and waits until ready.
    pub fn start_again(&mut self) {
        self.spawn();
        self.wait_ready();
    }

    pub fn is_running(&mut self) -> bool {
        self.check_alive("checking liveness");
        self.child.is_some()
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        let from = lines.len().saturating_sub(200);
        format!(
            "----- daemon log {} (last {} lines) -----\n{}\n----- end of daemon log -----",
            self.log_path.display(),
            lines.len() - from,
            lines[from..].join("\n")
        )
    }

    // ---- plugin socket -----------------------------------------------------------------

    /// POSTs `body` (JSON, sent with a trailing newline like Go's json.Encoder) to `endpoint`.
    pub fn call(&self, endpoint: &str, body: &Value) -> (u16, Value) {
        let mut raw = serde_json::to_vec(body).expect("encode");
        raw.push(b'\n');
        self.call_raw(endpoint, &raw)
    }

    /// POSTs raw bytes; the response body must be JSON.
    pub fn call_raw(&self, endpoint: &str, body: &[u8]) -> (u16, Value) {
        let (status, text) = post(&self.socket(), endpoint, body)
            .unwrap_or_else(|e| panic!("POST {endpoint}: {e}\n{}", self.log_tail()));
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| {
            panic!("POST {endpoint}: status {status}, body is not JSON ({e}): {text:?}")
        });
        (status, v)
    }

    /// Calls `endpoint` and asserts 200 with no error; returns the JSON.
    pub fn ok(&self, endpoint: &str, body: &Value) -> Value {
        let (status, v) = self.call(endpoint, body);
        assert_eq!(
            status,
            200,
            "{endpoint} {body} failed: {v}\n{}",
            self.log_tail()
        );
        assert_no_err(endpoint, &v);
        v
    }

    /// Calls `endpoint` and asserts an error (non-200, non-empty Err); returns Err.
    pub fn err(&self, endpoint: &str, body: &Value) -> String {
        let (status, v) = self.call(endpoint, body);
        expect_err(endpoint, status, &v)
    }

    pub fn create(&self, name: &str, opts: &[(&str, &str)]) -> Value {
        let opts: serde_json::Map<String, Value> = opts
            .iter()
            .map(|(k, v)| ((*k).to_string(), Value::String((*v).to_string())))
            .collect();
        self.ok(
            "/VolumeDriver.Create",
            &serde_json::json!({"Name": name, "Opts": opts}),
        )
    }

    pub fn mount(&self, name: &str, id: &str) -> PathBuf {
        let v = self.ok(
            "/VolumeDriver.Mount",
            &serde_json::json!({"Name": name, "ID": id}),
        );
        let mp = v["Mountpoint"]
            .as_str()
            .unwrap_or_else(|| panic!("Mount response without Mountpoint: {v}"));
        PathBuf::from(mp)
    }

    pub fn unmount(&self, name: &str, id: &str) {
        self.ok(
            "/VolumeDriver.Unmount",
            &serde_json::json!({"Name": name, "ID": id}),
        );
    }

    pub fn remove(&self, name: &str) {
        self.ok("/VolumeDriver.Remove", &serde_json::json!({"Name": name}));
    }

    pub fn get(&self, name: &str) -> (u16, Value) {
        self.call("/VolumeDriver.Get", &serde_json::json!({"Name": name}))
    }

    /// Names returned by `/VolumeDriver.List`, sorted.
    pub fn list_names(&self) -> Vec<String> {
        let v = self.ok("/VolumeDriver.List", &serde_json::json!({}));
        let vols = v["Volumes"]
            .as_array()
            .unwrap_or_else(|| panic!("List response without a Volumes array: {v}"));
        let mut names: Vec<String> = vols
            .iter()
            .map(|e| {
                e["Name"]
                    .as_str()
                    .unwrap_or_else(|| panic!("List entry without Name: {e}"))
                    .to_string()
            })
            .collect();
        names.sort();
        names
    }

    // ---- CLI ---------------------------------------------------------------------------

    /// Runs `dunnage --run-dir <run> ARGS...`.
    pub fn cli(&self, args: &[&str]) -> CliOut {
        let mut all = vec!["--run-dir".to_string(), self.run_dir.display().to_string()];
        all.extend(args.iter().map(|s| s.to_string()));
        run_cli(&all, &[])
    }

    /// Runs `DUNNAGE_RUN_DIR=<run> dunnage ARGS...`.
    pub fn cli_env(&self, args: &[&str]) -> CliOut {
        let all: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        run_cli(
            &all,
            &[("DUNNAGE_RUN_DIR", self.run_dir.display().to_string())],
        )
    }

    /// Runs the CLI and asserts success; returns stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "dunnage {args:?} failed ({}): stderr: {}\nstdout: {}\n{}",
            out.status,
            out.stderr,
            out.stdout,
            self.log_tail()
        );
        out.stdout
    }

    /// Runs the CLI and asserts failure with a message on stderr; returns stderr.
    pub fn cli_err(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            !out.status.success(),
            "dunnage {args:?} succeeded but should fail; stdout: {}",
            out.stdout
        );
        assert!(
            !out.stderr.trim().is_empty(),
            "dunnage {args:?} failed ({}) without a message on stderr",
            out.status
        );
        out.stderr
    }

    /// `volume inspect NAME` as JSON.
    pub fn inspect(&self, name: &str) -> Value {
        let out = self.cli_ok(&["volume", "inspect", name]);
        let v: Value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("volume inspect {name}: not JSON ({e}): {out:?}"));
        assert!(v.is_object(), "volume inspect {name}: not an object: {v}");
        v
    }

    // ---- leak checks -------------------------------------------------------------------

    /// Everything under this daemon's run and mount directories: see [`leftovers`].
    pub fn leftovers(&self) -> Vec<String> {
        leftovers(&self.run_dir, &self.mount_dir)
    }

    /// Leftovers once the daemon stopped cleanly: also its FUSE keeper,
    /// which must have exited (it had nothing left to hold).
    pub fn leftovers_stopped(&self) -> Vec<String> {
        let mut l = self.leftovers();
        // The keeper exits right after answering the daemon's bye.
        for _ in 0..100 {
            if keeper_pids(&self.run_dir).is_empty() {
                break;
            }
            thread::sleep(Duration::from_millis(20));
        }
        l.extend(
            keeper_pids(&self.run_dir)
                .into_iter()
                .map(|p| format!("fuse-keeper process {p}")),
        );
        l
    }

    /// Leftovers while the daemon still runs: like [`Daemon::leftovers`] but tolerating one
    /// daemon-wide FUSE mount exactly at `<run-dir>/fuse` (the export's root), which may
    /// live as long as the daemon. Per-volume mounts and loop devices are never tolerated.
    pub fn leftovers_running(&self) -> Vec<String> {
        let fuse_root = format!("mount {}", self.run_dir.join("fuse").display());
        self.leftovers()
            .into_iter()
            .filter(|l| *l != fuse_root)
            .collect()
    }

    /// Mounts and loop devices that belong to one volume.
    pub fn volume_leftovers(&self, vol: &str) -> Vec<String> {
        let fs_mount = self.fs_mount(vol);
        let fuse_dir = self.run_dir.join("fuse").join(vol);
        let mut out: Vec<String> = mounts_under(&fs_mount)
            .into_iter()
            .chain(mounts_under(&fuse_dir))
            .map(|m| format!("mount {}", m.display()))
            .collect();
        out.extend(
            loop_devices()
                .into_iter()
                .filter(|(_, b)| b.starts_with(&fuse_dir))
                .map(|(dev, b)| format!("loop {} -> {}", dev, b.display())),
        );
        out
    }

    /// Is the volume's filesystem mounted (at `<mount-dir>/<vol>`)?
    pub fn is_mounted(&self, vol: &str) -> bool {
        mount_entries()
            .iter()
            .any(|m| m.mount_point == self.fs_mount(vol))
    }

    /// Snapshot of every path under the data directory.
    pub fn data_paths(&self) -> BTreeSet<PathBuf> {
        tree(&self.data_dir)
    }

    /// Sum of allocated bytes (st_blocks * 512) of the files under the data directory.
    pub fn data_allocated(&self) -> u64 {
        allocated(&self.data_dir)
    }

    /// Name of the volume [`Daemon::data_baseline`] creates.
    pub const BASELINE: &'static str = "baseline";

    /// Snapshot of the data directory to compare against after a removal. Creates the
    /// small volume [`Daemon::BASELINE`] first (a no-op if it exists), because the daemon may
    /// create its catalog and directory layout lazily on the first Create.
    pub fn data_baseline(&self) -> BTreeSet<PathBuf> {
        self.create(Self::BASELINE, &[("size", "64M")]);
        self.data_paths()
    }

    /// Asserts that the data directory has no path that `before` lacked, except directories
    /// (layout), and no new path at all containing one of `needles` (volume names, ids).
    pub fn assert_no_new_data(&self, before: &BTreeSet<PathBuf>, needles: &[&str], context: &str) {
        let after = self.data_paths();
        let bad: Vec<&PathBuf> = after
            .difference(before)
            .filter(|p| {
                let text = p.to_string_lossy();
                !self.data_dir.join(p).is_dir() || needles.iter().any(|n| text.contains(n))
            })
            .collect();
        assert!(
            bad.is_empty(),
            "{context}: new files left in the data dir {}: {bad:?}",
            self.data_dir.display()
        );
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let panicking = thread::panicking();
        let was_running = self.child.is_some();
        if let Some(mut child) = self.child.take() {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
            let deadline = Instant::now() + STOP_TIMEOUT;
            loop {
                match child.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if Instant::now() < deadline => {
                        thread::sleep(Duration::from_millis(20))
                    }
                    _ => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                }
            }
        }
        if panicking {
            eprintln!("{}", self.log_tail());
        }
        // Best effort so that a failed test does not leave the machine dirty (the tests
        // assert on leftovers themselves before this point).
        cleanup_under(self.root());
        // Do not leave a socket file behind in a shared plugin directory (dockerd scans
        // /run/docker/plugins), but never remove one that another daemon serves.
        let sock = self.socket();
        if !sock.starts_with(self.root()) && sock.exists() {
            let stale = matches!(
                UnixStream::connect(&sock),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused
            );
            if was_running || stale {
                let _ = fs::remove_file(sock);
            }
        }
    }
}

/// Lazily unmounts everything under `root` (deepest first) and detaches loop devices
/// whose backing file is under `root`.
pub fn cleanup_under(root: &Path) {
    // A FUSE keeper left by a failed test keeps dead connections hanging:
    // kill it first so the unmounts below cannot block on them.
    for pid in keeper_pids(root) {
        let _ = kill(pid, Signal::SIGKILL);
    }
    for _ in 0..3 {
        let mut mounts = mounts_under(root);
        if mounts.is_empty() {
            break;
        }
        mounts.sort_by_key(|m| std::cmp::Reverse(m.as_os_str().len()));
        for m in mounts {
            let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
        }
    }
    for (dev, _) in loop_devices()
        .into_iter()
        .filter(|(_, b)| b.starts_with(root))
    {
        let _ = Command::new("losetup")
            .args(["-d", &dev])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

// ---------------------------------------------------------------------------------------
// HTTP over the unix socket, the way dockerd talks
// ---------------------------------------------------------------------------------------

/// One request; connection errors are returned (not retried).
pub fn try_post(sock: &Path, endpoint: &str, body: &[u8]) -> std::io::Result<(u16, String)> {
    let mut s = UnixStream::connect(sock)?;
    s.set_read_timeout(Some(HTTP_TIMEOUT))?;
    s.set_write_timeout(Some(HTTP_TIMEOUT))?;
    let mut req = format!(
        "POST {endpoint} HTTP/1.1\r\n\
         Host: plugin.moby.localhost\r\n\
         User-Agent: Go-http-client/1.1\r\n\
         Content-Length: {}\r\n\
         Accept: application/vnd.docker.plugins.v1.2+json\r\n\
         Accept-Encoding: gzip\r\n\
         Connection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    s.write_all(&req)?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)?;
    parse_response(&resp).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// Like dockerd: connection errors (socket not there yet, refused) are retried for a while.
pub fn post(sock: &Path, endpoint: &str, body: &[u8]) -> Result<(u16, String), String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match try_post(sock, endpoint, body) {
            Ok(r) => return Ok(r),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) && Instant::now() < deadline =>
            {
                thread::sleep(Duration::from_millis(50))
            }
            Err(e) => return Err(format!("{} {endpoint}: {e}", sock.display())),
        }
    }
}

fn parse_response(resp: &[u8]) -> Result<(u16, String), String> {
    if resp.is_empty() {
        return Err("connection closed without a response".into());
    }
    let head_end = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("no end of headers in {:?}", String::from_utf8_lossy(resp)))?;
    let head = std::str::from_utf8(&resp[..head_end]).map_err(|e| e.to_string())?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(format!("bad status line {status_line:?}"));
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let mut chunked = false;
    let mut length: Option<usize> = None;
    for l in lines {
        let Some((k, v)) = l.split_once(':') else {
            continue;
        };
        let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
        if k == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked") {
            chunked = true;
        } else if k == "content-length" {
            length = v.parse().ok();
        } else if k == "content-encoding" && !v.eq_ignore_ascii_case("identity") {
            return Err(format!("unexpected Content-Encoding {v}"));
        }
    }
    let raw = &resp[head_end + 4..];
    let body = if chunked {
        dechunk(raw)?
    } else if let Some(n) = length {
        if raw.len() < n {
            return Err(format!(
                "body shorter ({}) than Content-Length {n}",
                raw.len()
            ));
        }
        raw[..n].to_vec()
    } else {
        raw.to_vec()
    };
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

fn dechunk(mut raw: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let eol = raw
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("bad chunk header")?;
        let size_str = std::str::from_utf8(&raw[..eol]).map_err(|e| e.to_string())?;
        let size = usize::from_str_radix(size_str.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|e| format!("bad chunk size {size_str:?}: {e}"))?;
        raw = &raw[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        if raw.len() < size + 2 {
            return Err("truncated chunk".into());
        }
        out.extend_from_slice(&raw[..size]);
        raw = &raw[size + 2..];
    }
}

/// Success responses may carry `"Err": ""` but never a non-empty Err (dockerd would fail).
pub fn assert_no_err(endpoint: &str, v: &Value) {
    match v.get("Err") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) if s.is_empty() => {}
        Some(e) => panic!("{endpoint}: 200 with an error: {e}"),
    }
}

/// Asserts an error response (non-200 and a non-empty string Err); returns Err.
pub fn expect_err(endpoint: &str, status: u16, v: &Value) -> String {
    assert_ne!(status, 200, "{endpoint} should fail but answered 200: {v}");
    let err = v["Err"]
        .as_str()
        .unwrap_or_else(|| panic!("{endpoint}: error response without a string Err: {v}"));
    assert!(
        !err.trim().is_empty(),
        "{endpoint}: error response with an empty Err: {v}"
    );
    err.to_string()
}

/// A listener bound at `path` and then dropped: leaves a stale socket file behind.
pub fn make_stale_socket(path: &Path) {
    let l = UnixListener::bind(path).expect("bind stale socket");
    drop(l);
    assert!(path.exists(), "stale socket file should remain");
}

// ---------------------------------------------------------------------------------------
// CLI
// ---------------------------------------------------------------------------------------

#[derive(Debug)]
pub struct CliOut {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

pub fn run_cli(args: &[String], env: &[(&str, String)]) -> CliOut {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_remove("DUNNAGE_RUN_DIR")
        .stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = run_with_timeout(cmd, Duration::from_secs(150));
    CliOut {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs a command to completion, killing it (and failing) after `timeout`.
pub use netns::run_with_timeout;

/// fio writing 4 KiB blocks at random over the first `size` of `device`
/// with crc32c checksums, then reading every one back to verify (`extra`
/// adds a rate limit, `--verify_only`...).
pub fn fio_verify(name: &str, device: &str, size: &str, extra: &[&str]) -> Command {
    let mut cmd = Command::new("fio");
    cmd.args([
        &format!("--name={name}"),
        &format!("--filename={device}"),
        "--rw=randwrite",
        "--bs=4k",
        &format!("--size={size}"),
        "--ioengine=libaio",
        "--iodepth=16",
        "--direct=1",
        "--verify=crc32c",
        "--verify_fatal=1",
        "--randrepeat=1",
        "--verify_state_save=0",
        "--output-format=normal",
    ])
    .args(extra)
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    cmd
}

/// Wait for a fio (or any child) that must end once IO resumes: whether
/// it succeeded, and its output. After `timeout` it is killed and the test
/// fails, with `context()` (daemon logs) in the message.
pub fn wait_child(
    mut child: Child,
    what: &str,
    timeout: std::time::Duration,
    context: impl Fn() -> String,
) -> (bool, String) {
    let deadline = std::time::Instant::now() + timeout;
    while child.try_wait().expect("wait").is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "{what} hung for {timeout:?}: IO did not resume\n{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                context()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = child.wait_with_output().expect("output");
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Runs a command and asserts success; returns stdout.
pub fn sh(program: &str, args: &[&str]) -> String {
    let mut cmd = Command::new(program);
    cmd.args(args).stdin(Stdio::null());
    let out = run_with_timeout(cmd, Duration::from_secs(300));
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

// ---------------------------------------------------------------------------------------
// Mounts, loop devices, files
// ---------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
pub struct MountEntry {
    pub mount_point: PathBuf,
    pub fs_type: String,
    pub source: String,
}

/// Unescapes the octal escapes (`\040` etc.) of /proc/self/mountinfo.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 4 <= b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            if let Ok(n) = u8::from_str_radix(&s[i + 1..i + 4], 8) {
                out.push(n);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The entries of /proc/self/mountinfo.
pub fn mount_entries() -> Vec<MountEntry> {
    let info = fs::read_to_string("/proc/self/mountinfo").expect("read /proc/self/mountinfo");
    info.lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let mount_point = unescape_mountinfo(pre.split(' ').nth(4)?);
            let mut post = post.split(' ');
            let fs_type = post.next()?.to_string();
            let source = unescape_mountinfo(post.next().unwrap_or(""));
            Some(MountEntry {
                mount_point: PathBuf::from(mount_point),
                fs_type,
                source,
            })
        })
        .collect()
}

/// Mount points at or under `dir`.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    mount_entries()
        .into_iter()
        .map(|m| m.mount_point)
        .filter(|m| m.starts_with(dir))
        .collect()
}

/// Bound loop devices as (`/dev/loopN`, backing file).
pub fn loop_devices() -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    let Ok(rd) = fs::read_dir("/sys/block") else {
        return out;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        if let Ok(b) = fs::read_to_string(e.path().join("loop/backing_file")) {
            let b = b.trim_end_matches('\n');
            let b = b.strip_suffix(" (deleted)").unwrap_or(b);
            out.push((format!("/dev/{name}"), PathBuf::from(b)));
        }
    }
    out
}

/// Mounts in /proc/self/mountinfo under `run_dir` or `mount_dir`, plus loop devices whose
/// backing file is under `run_dir`. Each entry is `mount <path>` or `loop <dev> -> <file>`.
pub fn leftovers(run_dir: &Path, mount_dir: &Path) -> Vec<String> {
    let mut out: Vec<String> = mount_entries()
        .into_iter()
        .map(|m| m.mount_point)
        .filter(|m| m.starts_with(run_dir) || m.starts_with(mount_dir))
        .map(|m| format!("mount {}", m.display()))
        .collect();
    out.extend(
        loop_devices()
            .into_iter()
            .filter(|(_, b)| b.starts_with(run_dir))
            .map(|(dev, b)| format!("loop {} -> {}", dev, b.display())),
    );
    out
}

/// `dunnage fuse-keeper` processes whose run dir lies under `root`.
pub fn keeper_pids(root: &Path) -> Vec<Pid> {
    let mut out = Vec::new();
    let Ok(rd) = fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmdline) = fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if args.iter().any(|a| a == "fuse-keeper")
            && args.iter().any(|a| Path::new(a).starts_with(root))
        {
            out.push(Pid::from_raw(pid));
        }
    }
    out
}

/// Every path under `dir`, relative to it.
pub fn tree(dir: &Path) -> BTreeSet<PathBuf> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeSet<PathBuf>) {
        let Ok(rd) = fs::read_dir(dir) else { return };
        for e in rd.flatten() {
            let p = e.path();
            out.insert(p.strip_prefix(root).unwrap_or(&p).to_path_buf());
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                walk(root, &p, out);
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(dir, dir, &mut out);
    out
}

/// Sum of st_blocks * 512 of the regular files under `dir` (does not cross into mounts
/// of other devices).
pub fn allocated(dir: &Path) -> u64 {
    let Ok(root_dev) = fs::metadata(dir).map(|m| m.dev()) else {
        return 0;
    };
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let Ok(m) = fs::symlink_metadata(e.path()) else {
                continue;
            };
            if m.dev() != root_dev {
                continue;
            }
            if m.is_dir() {
                stack.push(e.path());
            } else if m.is_file() {
                total += m.blocks() * 512;
            }
        }
    }
    total
}

/// Writes `data` to `path`, fsyncs the file and its directory.
pub fn write_durably(path: &Path, data: &[u8]) {
    let mut f = fs::File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    f.write_all(data)
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    f.sync_all()
        .unwrap_or_else(|e| panic!("fsync {}: {e}", path.display()));
    let dir = path.parent().expect("parent");
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .unwrap_or_else(|e| panic!("fsync dir {}: {e}", dir.display()));
}

/// Deterministic, incompressible-looking test data.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// Small validators
// ---------------------------------------------------------------------------------------

/// Strict RFC 3339 date-time (what Go's `time.Time` JSON decoding accepts):
/// `YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)`.
pub fn is_rfc3339(s: &str) -> bool {
    let b = s.as_bytes();
    let digits = |r: std::ops::Range<usize>| {
        b.get(r.clone())
            .map(|x| x.iter().all(u8::is_ascii_digit))
            .unwrap_or(false)
    };
    let num = |r: std::ops::Range<usize>| s[r].parse::<u32>().unwrap_or(u32::MAX);
    if b.len() < 20
        || !digits(0..4)
        || b[4] != b'-'
        || !digits(5..7)
        || b[7] != b'-'
        || !digits(8..10)
        || b[10] != b'T'
        || !digits(11..13)
        || b[13] != b':'
        || !digits(14..16)
        || b[16] != b':'
        || !digits(17..19)
    {
        return false;
    }
    let (mo, d, h, mi, se) = (num(5..7), num(8..10), num(11..13), num(14..16), num(17..19));
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
        return false;
    }
    let mut i = 19;
    if b[i] == b'.' {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == start {
            return false;
        }
    }
    match &s[i..] {
        "Z" => true,
        off if off.len() == 6 => {
            let ob = off.as_bytes();
            (ob[0] == b'+' || ob[0] == b'-')
                && ob[1..3].iter().all(u8::is_ascii_digit)
                && ob[3] == b':'
                && ob[4..6].iter().all(u8::is_ascii_digit)
                && off[1..3].parse::<u32>().unwrap_or(99) <= 23
                && off[4..6].parse::<u32>().unwrap_or(99) <= 59
        }
        _ => false,
    }
}

/// Is `dev` a loop device path (`/dev/loopN`)?
pub fn is_loop_path(dev: &str) -> bool {
    dev.strip_prefix("/dev/loop")
        .map(|n| !n.is_empty() && n.bytes().all(|c| c.is_ascii_digit()))
        .unwrap_or(false)
}

// ---------------------------------------------------------------------------------------
// Docker
// ---------------------------------------------------------------------------------------

/// Panics with a clear message unless dockerd answers and the test image exists.
pub fn require_docker() {
    let mut cmd = Command::new(DOCKER);
    cmd.arg("info").stdin(Stdio::null());
    let out = run_with_timeout(cmd, Duration::from_secs(60));
    assert!(
        out.status.success(),
        "dockerd does not answer `{DOCKER} info` (start it with scripts/dockerd.sh, or run `just test`): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut cmd = Command::new(DOCKER);
    cmd.args(["image", "inspect", TEST_IMAGE])
        .stdin(Stdio::null());
    let out = run_with_timeout(cmd, Duration::from_secs(60));
    assert!(
        out.status.success(),
        "image {TEST_IMAGE} is missing: build it with scripts/test-image.sh (or run `just test`)"
    );
}

/// Runs `/usr/bin/docker ARGS...` (3 minute limit).
pub fn docker(args: &[&str]) -> CliOut {
    let mut cmd = Command::new(DOCKER);
    cmd.args(args).stdin(Stdio::null());
    let out = run_with_timeout(cmd, Duration::from_secs(180));
    CliOut {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Removes the containers and volumes a test made if it fails half way.
/// Call [`DockerGuard::done`] once the test removed them itself: dockerd
/// asked about a volume it no longer knows probes every plugin it ever saw.
pub struct DockerGuard {
    pub containers: Vec<String>,
    pub volumes: Vec<String>,
}

impl DockerGuard {
    pub fn volumes(volumes: &[&str]) -> DockerGuard {
        DockerGuard {
            containers: Vec::new(),
            volumes: volumes.iter().map(|v| v.to_string()).collect(),
        }
    }

    pub fn done(self) {
        std::mem::forget(self);
    }
}

impl Drop for DockerGuard {
    fn drop(&mut self) {
        for c in &self.containers {
            let _ = docker(&["rm", "-f", c]);
        }
        for v in &self.volumes {
            let _ = docker(&["volume", "rm", "-f", v]);
        }
    }
}

/// Runs docker and asserts success; returns stdout.
pub fn docker_ok(args: &[&str]) -> String {
    let out = docker(args);
    assert!(
        out.status.success(),
        "docker {args:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        out.stdout,
        out.stderr
    );
    out.stdout
}

/// `GET path` over `stream` (TCP or a unix socket): the status line and
/// the body.
pub fn http_get(mut stream: impl std::io::Read + std::io::Write, path: &str) -> (String, String) {
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .expect("send the request");
    let mut out = String::new();
    stream.read_to_string(&mut out).expect("read the reply");
    let (head, body) = out.split_once("\r\n\r\n").expect("an HTTP reply");
    let status = head.lines().next().unwrap_or_default().to_string();
    (status, body.to_string())
}

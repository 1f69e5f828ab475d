//! Child processes, Ctrl-C, and the teardown stack.
//!
//! Every child runs in its own process group, so a Ctrl-C on the terminal reaches
//! only the harness: it stops the running job (fio, docker) and then tears down in
//! order (loop devices before the servers behind them, servers before the tmpfs).

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

/// Set by SIGINT/SIGTERM: the run stops at the next check and tears down.
static STOP: AtomicBool = AtomicBool::new(false);
/// Set while teardown steps run: they must run to the end even after a stop.
static TEARING_DOWN: AtomicBool = AtomicBool::new(false);
/// Process groups of short-lived jobs to terminate on SIGINT/SIGTERM.
static JOBS: Mutex<Vec<i32>> = Mutex::new(Vec::new());

/// Whether SIGINT/SIGTERM has arrived.
pub fn stopped() -> bool {
    STOP.load(Ordering::SeqCst)
}

/// Whether the current work should give up: stopped, and not tearing down.
fn interrupting() -> bool {
    stopped() && !TEARING_DOWN.load(Ordering::SeqCst)
}

/// Fails once SIGINT/SIGTERM has arrived (never during teardown).
pub fn check_stop() -> Result<()> {
    if interrupting() {
        bail!("interrupted");
    }
    Ok(())
}

/// Sleeps, waking early on SIGINT/SIGTERM (except during teardown).
pub fn nap(d: Duration) {
    let end = Instant::now() + d;
    while !interrupting() && Instant::now() < end {
        thread::sleep(Duration::from_millis(20).min(end - Instant::now()));
    }
}

/// Handles SIGINT and SIGTERM on a thread of its own: flag the run as stopped
/// and terminate the running job, so the main thread unwinds into teardown.
pub fn install_signal_handler() -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("signal runtime")?;
    // Register in this thread, before any child exists.
    let (mut int, mut term) = rt.block_on(async {
        Ok::<_, std::io::Error>((
            signal(SignalKind::interrupt())?,
            signal(SignalKind::terminate())?,
        ))
    })?;
    thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            rt.block_on(async move {
                loop {
                    tokio::select! {
                        _ = int.recv() => {}
                        _ = term.recv() => {}
                    }
                    let first = !STOP.swap(true, Ordering::SeqCst);
                    if first {
                        eprintln!("\nfio bench: interrupted; stopping the current job and tearing down...");
                    } else {
                        eprintln!("fio bench: still tearing down, please wait");
                    }
                    // Teardown's own commands (losetup -d, umount) must finish.
                    if TEARING_DOWN.load(Ordering::SeqCst) {
                        continue;
                    }
                    for pgid in JOBS.lock().unwrap_or_else(|e| e.into_inner()).iter() {
                        let _ = kill(Pid::from_raw(-pgid), Signal::SIGTERM);
                    }
                }
            })
        })
        .context("spawn the signal thread")?;
    Ok(())
}

/// What a finished command left.
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Output {
    /// The last lines of stderr (or stdout), for error messages.
    pub fn tail(&self) -> String {
        let text = if self.stderr.trim().is_empty() {
            &self.stdout
        } else {
            &self.stderr
        };
        let lines: Vec<&str> = text.trim().lines().collect();
        lines[lines.len().saturating_sub(6)..].join("\n")
    }
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs a command to completion in its own process group, capturing its output;
/// kills it after `timeout` and on SIGINT/SIGTERM. Returns even on failure status.
pub fn run(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    check_stop()?;
    let what = describe(cmd);
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .with_context(|| format!("cannot run {what}"))?;
    let pgid = child.id() as i32;
    JOBS.lock().unwrap_or_else(|e| e.into_inner()).push(pgid);
    let reader = |mut r: Box<dyn Read + Send>| {
        thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let out = reader(Box::new(child.stdout.take().expect("piped stdout")));
    let err = reader(Box::new(child.stderr.take().expect("piped stderr")));
    let mut timed_out = false;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if start.elapsed() > timeout && !timed_out {
            timed_out = true;
            let _ = kill(Pid::from_raw(-pgid), Signal::SIGKILL);
        }
        thread::sleep(Duration::from_millis(10));
    };
    let elapsed = start.elapsed();
    JOBS.lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|p| *p != pgid);
    let output = Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
        elapsed,
    };
    check_stop()?;
    if timed_out {
        bail!("{what} did not finish within {timeout:?}; killed");
    }
    Ok(output)
}

/// Runs a command that must succeed; returns its stdout.
pub fn run_ok(cmd: &mut Command, timeout: Duration) -> Result<String> {
    let what = describe(cmd);
    let out = run(cmd, timeout)?;
    if !out.status.success() {
        bail!("{what} failed ({}):\n{}", out.status, out.tail());
    }
    Ok(out.stdout)
}

/// A long-running server (dunnage serve, qemu-storage-daemon) in its own process
/// group, its output appended to a log file.
pub struct Server {
    pub name: String,
    pub child: Child,
    pub log: std::path::PathBuf,
}

impl Server {
    pub fn spawn(name: &str, cmd: &mut Command, log: &Path) -> Result<Server> {
        check_stop()?;
        let what = describe(cmd);
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("open {}", log.display()))?;
        use std::io::Write;
        writeln!(file, "===== {} {what}", chrono::Utc::now().to_rfc3339())?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::from(file.try_clone()?))
            .stderr(Stdio::from(file))
            .process_group(0)
            .spawn()
            .with_context(|| format!("cannot start {what}"))?;
        Ok(Server {
            name: name.to_string(),
            child,
            log: log.to_path_buf(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails (with the log's tail) if the server has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited ({status}); last lines of {}:\n{}",
                self.name,
                self.log.display(),
                log_tail(&self.log)
            );
        }
        Ok(())
    }

    /// SIGTERM, then SIGKILL after `grace`. Returns how it ended.
    pub fn stop(&mut self, grace: Duration) -> String {
        if let Ok(Some(status)) = self.child.try_wait() {
            return format!("had already exited ({status})");
        }
        let pid = Pid::from_raw(self.child.id() as i32);
        let _ = kill(pid, Signal::SIGTERM);
        let end = Instant::now() + grace;
        while Instant::now() < end {
            if let Ok(Some(status)) = self.child.try_wait() {
                return format!("stopped ({status})");
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = kill(Pid::from_raw(-pid.as_raw()), Signal::SIGKILL);
        let _ = self.child.wait();
        format!("did not stop within {grace:?} of SIGTERM; killed")
    }
}

pub fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// Resident set size of a process, in KiB (VmRSS of /proc/PID/status).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// CPU time (user + system, all threads, exited ones included) a process has
/// used, in seconds (utime and stime of /proc/PID/stat).
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields follow the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After ')': state is field 3 of stat(5), so utime (14) and stime (15) are at 11 and 12.
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // In USER_HZ, which is 100 on every architecture this runs on.
    Some(ticks as f64 / 100.0)
}

type Undo = Box<dyn FnOnce() -> Result<()>>;

/// Teardown actions, run last-in first-out: by `unwind_to` for a finished stage,
/// and by `Drop` for whatever is left (on success, error, panic or Ctrl-C).
#[derive(Default)]
pub struct Teardown {
    steps: Vec<(String, Undo)>,
    /// Problems met while tearing down, reported at the end.
    pub problems: Vec<String>,
}

impl Teardown {
    pub fn push(&mut self, what: impl Into<String>, undo: impl FnOnce() -> Result<()> + 'static) {
        self.steps.push((what.into(), Box::new(undo)));
    }

    pub fn mark(&self) -> usize {
        self.steps.len()
    }

    /// Runs the steps pushed since `mark`, newest first.
    pub fn unwind_to(&mut self, mark: usize) {
        let outer = TEARING_DOWN.swap(true, Ordering::SeqCst);
        while self.steps.len() > mark {
            let (what, undo) = self.steps.pop().expect("non-empty");
            if let Err(e) = undo() {
                let msg = format!("teardown: {what}: {e:#}");
                eprintln!("fio bench: {msg}");
                self.problems.push(msg);
            }
        }
        TEARING_DOWN.store(outer, Ordering::SeqCst);
    }
}

impl Drop for Teardown {
    fn drop(&mut self) {
        self.unwind_to(0);
    }
}

//! The host side: the backing directory (a tmpfs of our own, or `--dir`), loop
//! devices, mounts, and facts about the machine.

use crate::proc::{run, run_ok};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const QUICK: Duration = Duration::from_secs(30);

/// Mount points at or below `root`, deepest first (from /proc/self/mountinfo).
pub fn mounts_under(root: &Path) -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut found: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mount_path)
        .filter(|p| p.starts_with(root))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found.dedup();
    found
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape_mount_path(s: &str) -> PathBuf {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    use std::os::unix::ffi::OsStringExt;
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

pub fn is_mount_point(p: &Path) -> bool {
    mounts_under(p).iter().any(|m| m == p)
}

pub fn umount(p: &Path, lazy: bool) -> Result<()> {
    let mut cmd = Command::new("umount");
    if lazy {
        cmd.arg("-l");
    }
    run_ok(cmd.arg(p), QUICK).map(drop)
}

/// Mounts a tmpfs of `size` bytes on `dir`.
pub fn mount_tmpfs(dir: &Path, size: u64) -> Result<()> {
    run_ok(
        Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={size},mode=0700"))
            .arg("dunnage-bench")
            .arg(dir),
        QUICK,
    )
    .map(drop)
}

/// Creates a sparse file of `size` bytes.
pub fn sparse_file(path: &Path, size: u64) -> Result<()> {
    let f = std::fs::File::create(path).with_context(|| format!("create {}", path.display()))?;
    f.set_len(size)
        .with_context(|| format!("size {}", path.display()))?;
    Ok(())
}

/// `losetup --direct-io=on --show -f FILE`: the new device.
pub fn loop_attach(file: &Path) -> Result<PathBuf> {
    let out = run_ok(
        Command::new("losetup")
            .args(["--direct-io=on", "--show", "-f"])
            .arg(file),
        QUICK,
    )?;
    let dev = out.trim();
    if !dev.starts_with("/dev/loop") {
        bail!("losetup printed {dev:?}, not a loop device");
    }
    Ok(PathBuf::from(dev))
}

pub fn loop_detach(dev: &Path) -> Result<()> {
    // A device that was just closed can be busy for a moment (udev probing it).
    let mut last = String::new();
    for _ in 0..50 {
        let out = run(Command::new("losetup").arg("-d").arg(dev), QUICK)?;
        if out.status.success() {
            return Ok(());
        }
        last = out.tail();
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("losetup -d {}: {last}", dev.display())
}

/// Loop devices whose backing file lies under `root` (a safety net for teardown).
pub fn loops_backed_under(root: &Path) -> Vec<(PathBuf, PathBuf)> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/sys/block") else {
        return found;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        let Ok(back) = std::fs::read_to_string(e.path().join("loop/backing_file")) else {
            continue;
        };
        let back = PathBuf::from(back.trim().trim_end_matches(" (deleted)"));
        if back.starts_with(root) {
            found.push((PathBuf::from("/dev").join(&name), back));
        }
    }
    found
}

/// What the kernel says about a block device: size, logical block size, and
/// (for a loop device) whether direct IO is really on.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeviceInfo {
    pub device: String,
    pub size_bytes: u64,
    pub logical_block_size: u64,
    pub direct_io: Option<bool>,
    pub backing_file: Option<String>,
}

pub fn device_info(dev: &Path) -> Result<DeviceInfo> {
    let name = dev
        .file_name()
        .context("device name")?
        .to_string_lossy()
        .into_owned();
    let sys = Path::new("/sys/block").join(&name);
    let read = |rel: &str| {
        std::fs::read_to_string(sys.join(rel))
            .map(|s| s.trim().to_string())
            .ok()
    };
    let sectors: u64 = read("size")
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("{}/size", sys.display()))?;
    Ok(DeviceInfo {
        device: dev.display().to_string(),
        size_bytes: sectors * 512,
        logical_block_size: read("queue/logical_block_size")
            .and_then(|s| s.parse().ok())
            .unwrap_or(512),
        direct_io: read("loop/dio").map(|s| s == "1"),
        backing_file: read("loop/backing_file"),
    })
}

pub fn mem_available_bytes() -> Option<u64> {
    meminfo("MemAvailable:")
}

fn meminfo(key: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with(key))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}

/// The machine, for results.json.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Machine {
    pub kernel: String,
    pub cpu_model: String,
    pub nproc: usize,
    pub mem_total_bytes: Option<u64>,
    pub date: String,
    pub hostname: String,
}

impl Machine {
    pub fn probe() -> Machine {
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".into());
        let read = |p: &str| {
            std::fs::read_to_string(p)
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "unknown".into())
        };
        Machine {
            kernel: read("/proc/sys/kernel/osrelease"),
            cpu_model,
            nproc: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            mem_total_bytes: meminfo("MemTotal:"),
            date: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            hostname: read("/proc/sys/kernel/hostname"),
        }
    }
}

/// `findmnt --target`: filesystem type and source of the filesystem holding `p`.
pub fn fs_of(p: &Path) -> String {
    let out = run(
        Command::new("findmnt")
            .args(["-n", "-o", "FSTYPE,SOURCE,TARGET", "--target"])
            .arg(p),
        QUICK,
    );
    match out {
        Ok(o) if o.status.success() => {
            let v: Vec<&str> = o.stdout.split_whitespace().collect();
            match v.as_slice() {
                [fstype, source, target, ..] => format!("{fstype} ({source} on {target})"),
                _ => o.stdout.trim().to_string(),
            }
        }
        _ => "unknown".into(),
    }
}

/// First line of `TOOL --version`, or why not.
pub fn version_of(tool: &str) -> String {
    match run(Command::new(tool).arg("--version"), QUICK) {
        Ok(o) if o.status.success() => o.stdout.lines().next().unwrap_or("").trim().to_string(),
        Ok(o) => format!("unknown ({})", o.tail()),
        Err(e) => format!("unknown ({e:#})"),
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

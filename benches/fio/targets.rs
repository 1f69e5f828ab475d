//! The three targets: the kernel loop device over a raw file (limit),
//! qemu-storage-daemon's FUSE export on a loop device (peer), and a dunnage
//! volume attached with `dunnage attach`.

use crate::control::plugin_post;
use crate::host::{self, DeviceInfo};
use crate::proc::{check_stop, nap, run_ok, Server, Teardown};
use anyhow::{bail, Context, Result};
use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::rc::Rc;
use std::time::{Duration, Instant};

const START_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Limit,
    Peer,
    Dunnage,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Limit, Kind::Peer, Kind::Dunnage];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Limit => "limit",
            Kind::Peer => "peer",
            Kind::Dunnage => "dunnage",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Kind::Limit => "kernel loop device, direct IO, over a raw file",
            Kind::Peer => {
                "qemu-storage-daemon FUSE export of a raw file (cache.direct=off), loop device with direct IO"
            }
            Kind::Dunnage => "dunnage volume (fs=none, FUSE export), `dunnage attach`",
        }
    }
}

pub struct Target {
    pub kind: Kind,
    pub dev: PathBuf,
    pub info: DeviceInfo,
}

/// `dunnage serve` with its own directories, and its CLI.
pub struct Dunnage {
    pub bin: PathBuf,
    pub name: String,
    pub plugin_dir: PathBuf,
    pub run_dir: PathBuf,
    pub server: Rc<RefCell<Server>>,
}

impl Dunnage {
    /// Starts `dunnage serve --export fuse` with data and run dirs under `root`
    /// and waits until its plugin socket answers. Teardown stops it (SIGTERM: it
    /// detaches and unmounts its volumes) and sweeps anything it left.
    pub fn start(
        bin: &Path,
        name: &str,
        root: &Path,
        plugin_dir: &Path,
        log: &Path,
        td: &mut Teardown,
    ) -> Result<Dunnage> {
        let data_dir = root.join("data");
        let run_dir = root.join("run");
        for d in [&data_dir, &run_dir, &plugin_dir.to_path_buf()] {
            std::fs::create_dir_all(d).with_context(|| format!("create {}", d.display()))?;
        }
        let server = Server::spawn(
            &format!("dunnage serve --name {name}"),
            Command::new(bin)
                .arg("serve")
                .args(["--name", name])
                .arg("--plugin-dir")
                .arg(plugin_dir)
                .arg("--data-dir")
                .arg(&data_dir)
                .arg("--run-dir")
                .arg(&run_dir)
                .args(["--export", "fuse"])
                .env_remove("DUNNAGE_RUN_DIR"),
            log,
        )?;
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
    Ok(Target { kind, dev, info })
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
    Ok((loop_target(Kind::Peer, &mnt, td)?, pid))
}

/// (c) a raw dunnage volume of `size` bytes, attached on this host.
pub fn dunnage(d: &Dunnage, size: u64, td: &mut Teardown) -> Result<Target> {
    let vol = "benchvol";
    let size_opt = format!("size={}M", size >> 20);
    d.cli(&["volume", "create", vol, "-o", &size_opt, "-o", "fs=none"])?;
    let (bin, run_dir) = (d.bin.clone(), d.run_dir.clone());
    let cli = move |args: &[&str]| {
        run_ok(
            Command::new(&bin).arg("--run-dir").arg(&run_dir).args(args),
            Duration::from_secs(120),
        )
        .map(drop)
    };
    let rm = cli.clone();
    td.push("dunnage volume rm benchvol", move || {
        rm(&["volume", "rm", vol])
    });
    let out = d.cli(&["attach", vol])?;
    let dev = PathBuf::from(out.trim());
    if !dev.starts_with("/dev/") {
        bail!("dunnage attach printed {out:?}, not a device path");
    }
    td.push(format!("dunnage detach {vol}"), move || {
        cli(&["detach", vol])
    });
    let info = host::device_info(&dev)?;
    Ok(Target {
        kind: Kind::Dunnage,
        dev,
        info,
    })
}

//! Stage 5: hand an engine to the kernel as a block device.
//!
//! Two kinds behind the one [`Export`] type: ublk (`/dev/ublkbN`, queue
//! threads call the engine per request) where the kernel has ublk_drv, and
//! FUSE + loop elsewhere (FUSE serves the volume as one file, a loop device
//! with direct IO sits on it). Exports are thin: no policy, just plumbing.

pub mod fuse;
pub mod share;
pub mod ublk;

use crate::engine::BlockEngine;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Which kernel interface serves the volumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ExportKind {
    /// ublk when /dev/ublk-control exists, else FUSE + loop.
    Auto,
    /// ublk (`/dev/ublkbN`); needs the ublk_drv kernel module.
    Ublk,
    /// A FUSE-served image file on a loop device (`/dev/loopN`).
    Fuse,
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("ublk is not available on this kernel (/dev/ublk-control is missing; `modprobe ublk_drv` needs Linux 6.0+ built with CONFIG_BLK_DEV_UBLK); use --export fuse or auto")]
    UblkUnavailable,
    #[error("FUSE is not available: {0} (load it with `modprobe fuse`)")]
    FuseUnavailable(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl ExportError {
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        ExportError::Io {
            what: what.into(),
            source,
        }
    }
}

/// Resolve `auto` against what this kernel offers, and check the choice can work.
pub fn resolve(kind: ExportKind) -> Result<ExportKind, ExportError> {
    let ublk = ublk::available();
    match kind {
        ExportKind::Ublk if !ublk => Err(ExportError::UblkUnavailable),
        ExportKind::Ublk | ExportKind::Auto if ublk => Ok(ExportKind::Ublk),
        ExportKind::Ublk | ExportKind::Auto | ExportKind::Fuse => {
            if !Path::new("/dev/fuse").exists() {
                return Err(ExportError::FuseUnavailable("/dev/fuse is missing".into()));
            }
            if !Path::new("/dev/loop-control").exists() {
                return Err(ExportError::io(
                    "loop devices are not available (/dev/loop-control is missing; `modprobe loop`)",
                    std::io::Error::from(std::io::ErrorKind::NotFound),
                ));
            }
            Ok(ExportKind::Fuse)
        }
    }
}

/// What a restarted daemon needs to take a live export back: persisted per
/// attached volume in the run dir by the volume actor.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Handover {
    Fuse(fuse::FuseHandover),
    Ublk(ublk::UblkHandover),
}

impl Handover {
    pub fn device(&self) -> &Path {
        match self {
            Handover::Fuse(f) => &f.device,
            Handover::Ublk(u) => &u.device,
        }
    }
}

/// The node's way of exporting volumes: the resolved kind, whether FUSE
/// passthrough is wanted, and (FUSE) the keeper that holds connections
/// across a daemon crash.
pub struct Exporter {
    pub kind: ExportKind,
    pub passthrough: bool,
    keeper: Option<Arc<fuse::keeper::Keeper>>,
    /// Canonical, so that the owner recorded on a ublk device compares
    /// equal however the next daemon spells its --run-dir.
    run_dir: PathBuf,
}

impl Exporter {
    /// `kind` is what [`resolve`] returned. For FUSE, connects to the run
    /// dir's keeper (starting it if needed).
    pub fn new(kind: ExportKind, passthrough: bool, run_dir: &Path) -> Result<Self, ExportError> {
        let keeper = match kind {
            ExportKind::Ublk => None,
            ExportKind::Fuse | ExportKind::Auto => Some(Arc::new(
                fuse::keeper::Keeper::connect(run_dir)
                    .map_err(|e| ExportError::io("start the FUSE keeper", e))?,
            )),
        };
        Ok(Exporter {
            kind,
            passthrough,
            keeper,
            run_dir: std::fs::canonicalize(run_dir).unwrap_or_else(|_| run_dir.to_path_buf()),
        })
    }

    /// An exporter without a keeper (tests, tools): crashes are not survived.
    /// Its ublk devices name no run dir, so no daemon's cleanup claims them.
    pub fn without_keeper(kind: ExportKind, passthrough: bool) -> Self {
        Exporter {
            kind,
            passthrough,
            keeper: None,
            run_dir: PathBuf::new(),
        }
    }

    /// The run dir this exporter's devices are recorded under.
    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// Who owns the ublk device of volume `key` (its id) on this node.
    fn ublk_owner(&self, key: &str) -> ublk::Owner {
        ublk::Owner {
            volume_id: key.to_string(),
            run_dir: self.run_dir.clone(),
        }
    }

    pub fn keeper(&self) -> Option<&Arc<fuse::keeper::Keeper>> {
        self.keeper.as_ref()
    }

    /// Start serving `engine` as a block device. `key` names it to the
    /// keeper (the volume id); `work_dir` is the volume's private directory
    /// under the run dir (the FUSE mount lives there).
    pub fn start(
        &self,
        key: &str,
        volume: &str,
        engine: Arc<dyn BlockEngine>,
        work_dir: &Path,
    ) -> Result<Export, ExportError> {
        let inner = match self.kind {
            ExportKind::Fuse | ExportKind::Auto => Inner::Fuse(fuse::FuseLoopExport::start(
                key,
                volume,
                engine,
                work_dir,
                self.passthrough,
                self.keeper.clone(),
            )?),
            ExportKind::Ublk => Inner::Ublk(ublk::UblkExport::start(
                volume,
                self.ublk_owner(key),
                engine,
            )?),
        };
        Ok(Export::new(inner))
    }

    /// Take back an export a crashed daemon left live. `inherited_passthrough`:
    /// the engine reopened still in passthrough.
    pub fn resume(
        &self,
        key: &str,
        volume: &str,
        engine: Arc<dyn BlockEngine>,
        handover: &Handover,
        inherited_passthrough: bool,
    ) -> Result<Export, ExportError> {
        let inner = match handover {
            Handover::Fuse(h) => {
                let missing = || {
                    ExportError::io(
                        format!("resume {volume}: the FUSE keeper holds nothing for it"),
                        std::io::Error::from(std::io::ErrorKind::NotFound),
                    )
                };
                let keeper = self.keeper.as_ref().ok_or_else(missing)?;
                let fds = keeper
                    .fetch(key)
                    .map_err(|e| ExportError::io("ask the FUSE keeper", e))?
                    .ok_or_else(missing)?;
                Inner::Fuse(fuse::FuseLoopExport::resume(
                    key,
                    engine,
                    h,
                    fds,
                    inherited_passthrough,
                    self.keeper.clone(),
                )?)
            }
            Handover::Ublk(h) => Inner::Ublk(ublk::UblkExport::recover(
                volume,
                self.ublk_owner(key),
                engine,
                h,
            )?),
        };
        Ok(Export::new(inner))
    }

    /// Give up a volume that could not be taken back after a crash: cut
    /// its device first (so nothing below waits on a server that is gone),
    /// then unmount its filesystem, then remove the device.
    pub fn abandon(&self, key: &str, handover: &Handover, fs_mount: Option<&Path>) {
        match handover {
            Handover::Fuse(h) => {
                let _ = crate::sys::fuse::abort_connection(&h.mount_dir);
            }
            Handover::Ublk(h) => ublk::cut(h, &self.ublk_owner(key)),
        }
        if let Some(m) = fs_mount {
            if let Err(e) = crate::sys::mount::unmount(m, true) {
                tracing::warn!(mount = %m.display(), error = %e, "cannot unmount an abandoned volume");
            }
            let _ = std::fs::remove_dir(m);
        }
        match handover {
            Handover::Fuse(h) => {
                let _ = crate::sys::loopdev::detach_path(&h.device);
                if let Some(k) = &self.keeper {
                    let _ = k.release(key);
                }
                let _ = crate::sys::mount::unmount(&h.mount_dir, true);
                let _ = std::fs::remove_dir(&h.mount_dir);
            }
            Handover::Ublk(h) => ublk::remove(h, &self.ublk_owner(key)),
        }
    }

    /// Clean shutdown: the keeper may go if it holds nothing.
    pub fn shutdown(&self) {
        if let Some(k) = &self.keeper {
            if let Err(e) = k.bye() {
                tracing::warn!(error = %e, "could not say bye to the FUSE keeper");
            }
        }
    }
}

/// A live block device serving one volume.
pub struct Export {
    device: PathBuf,
    inner: Inner,
}

enum Inner {
    Fuse(fuse::FuseLoopExport),
    Ublk(ublk::UblkExport),
}

impl Export {
    fn new(inner: Inner) -> Export {
        let device = match &inner {
            Inner::Fuse(f) => f.device().to_path_buf(),
            Inner::Ublk(u) => u.device().to_path_buf(),
        };
        Export { device, inner }
    }

    pub fn device(&self) -> &Path {
        &self.device
    }

    /// Which path serves IO: `passthrough` (the kernel on the engine's
    /// file) or `engine` (dunnage's own threads).
    pub fn io_path(&self) -> &'static str {
        match &self.inner {
            Inner::Fuse(f) if f.passthrough() => "passthrough",
            Inner::Fuse(_) | Inner::Ublk(_) => "engine",
        }
    }

    /// The engine, replaceable while the export runs; `None` where the
    /// device cannot change size while live (ublk: its size is fixed at
    /// add on the kernels these hosts have).
    pub fn engine_slot(&self) -> Option<&Arc<fuse::EngineSlot>> {
        match &self.inner {
            Inner::Fuse(f) => Some(f.engine_slot()),
            Inner::Ublk(_) => None,
        }
    }

    /// The engine grew: the device takes its new size.
    pub fn refresh_size(&self) -> Result<(), ExportError> {
        match &self.inner {
            Inner::Fuse(f) => f.refresh_size(),
            Inner::Ublk(_) => Err(ExportError::io(
                "grow a live ublk device",
                std::io::Error::from(std::io::ErrorKind::Unsupported),
            )),
        }
    }

    pub fn handover(&self) -> Handover {
        match &self.inner {
            Inner::Fuse(f) => Handover::Fuse(f.handover()),
            Inner::Ublk(u) => Handover::Ublk(u.handover()),
        }
    }

    /// Stop serving: detach the device and end the export. The device must
    /// no longer be mounted.
    pub fn stop(self) -> Result<(), ExportError> {
        match self.inner {
            Inner::Fuse(f) => f.stop(),
            Inner::Ublk(u) => u.stop(),
        }
    }
}

/// Remove what a crashed run left under `run_dir`: loop devices on our FUSE
/// files and dead FUSE mounts. Filesystem mounts are the caller's (they live
/// in the mount dir) and must be unmounted first.
pub fn cleanup_leftovers(fuse_root: &Path, protected: &dyn Fn(&Path) -> bool) -> Vec<String> {
    fuse::cleanup_leftovers(fuse_root, protected)
}

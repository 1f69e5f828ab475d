//! Stage 5: hand an engine to the kernel as a block device.
//!
//! Two kinds behind the one [`Export`] type: ublk (`/dev/ublkbN`, queue
//! threads call the engine per request) where the kernel has ublk_drv, and
//! FUSE + loop elsewhere (FUSE serves the volume as one file, a loop device
//! with direct IO sits on it). Exports are thin: no policy, just plumbing.

pub mod fuse;
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
    /// Start serving `engine` as a block device. `work_dir` is this volume's
    /// private directory under the run dir (the FUSE mount lives there).
    /// `passthrough` lets the kernel do IO on the engine's file directly
    /// when the engine allows it (FUSE passthrough; ublk ignores it).
    /// `kind` is what [`resolve`] returned: `Auto` is taken as FUSE.
    pub fn start(
        kind: ExportKind,
        volume: &str,
        engine: Arc<dyn BlockEngine>,
        work_dir: &Path,
        passthrough: bool,
    ) -> Result<Export, ExportError> {
        match kind {
            ExportKind::Fuse | ExportKind::Auto => {
                let inner = fuse::FuseLoopExport::start(volume, engine, work_dir, passthrough)?;
                Ok(Export {
                    device: inner.device().to_path_buf(),
                    inner: Inner::Fuse(inner),
                })
            }
            ExportKind::Ublk => {
                let inner = ublk::UblkExport::start(volume, engine)?;
                Ok(Export {
                    device: inner.device().to_path_buf(),
                    inner: Inner::Ublk(inner),
                })
            }
        }
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
pub fn cleanup_leftovers(fuse_root: &Path) -> Vec<String> {
    fuse::cleanup_leftovers(fuse_root)
}

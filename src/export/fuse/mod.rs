//! FUSE + loop export: a one-file FUSE filesystem per volume, and a loop
//! device with direct IO on that file.

mod fs;

use super::ExportError;
use crate::engine::BlockEngine;
use crate::sys::{loopdev, mount};
use fuser::{BackgroundSession, Config, MountOption, Session, SessionACL};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Name of the image file inside the FUSE mount.
pub const IMAGE: &str = "image";
/// FUSE worker threads per volume; each has its own /dev/fuse clone.
const FUSE_THREADS: usize = 4;
/// Logical block size of the loop device: filesystems are made with 4 KiB
/// blocks, and it keeps every request 4 KiB aligned.
const LOOP_BLOCK_SIZE: u32 = 4096;

pub struct FuseLoopExport {
    engine: Arc<dyn BlockEngine>,
    passthrough: Arc<AtomicBool>,
    mount_dir: PathBuf,
    session: Option<BackgroundSession>,
    loop_dev: Option<loopdev::LoopDevice>,
    device: PathBuf,
}

impl FuseLoopExport {
    pub fn start(
        volume: &str,
        engine: Arc<dyn BlockEngine>,
        mount_dir: &Path,
        passthrough: bool,
    ) -> Result<Self, ExportError> {
        std::fs::create_dir_all(mount_dir)
            .map_err(|e| ExportError::io(format!("create {}", mount_dir.display()), e))?;
        if mount::is_mount_point(mount_dir) {
            let _ = mount::unmount(mount_dir, true);
        }
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName(format!("dunnage:{volume}")),
            MountOption::Subtype("dunnage".into()),
            MountOption::RW,
            MountOption::NoDev,
            MountOption::NoSuid,
            MountOption::NoExec,
        ];
        config.acl = SessionACL::Owner;
        config.n_threads = Some(FUSE_THREADS);
        config.clone_fd = true;
        let active = Arc::new(AtomicBool::new(false));
        let image = fs::ImageFs::new(engine.clone(), passthrough, active.clone());
        let session = Session::new(image, mount_dir, &config).map_err(|e| {
            ExportError::FuseUnavailable(format!("mount FUSE at {}: {e}", mount_dir.display()))
        })?;
        let session = session
            .spawn()
            .map_err(|e| ExportError::io("start the FUSE session", e))?;
        let mut this = FuseLoopExport {
            engine,
            passthrough: active,
            mount_dir: mount_dir.to_path_buf(),
            session: Some(session),
            loop_dev: None,
            device: PathBuf::new(),
        };
        let image = mount_dir.join(IMAGE);
        match loopdev::LoopDevice::attach(&image, LOOP_BLOCK_SIZE, true) {
            Ok(dev) => {
                this.device = dev.path().to_path_buf();
                this.loop_dev = Some(dev);
                Ok(this)
            }
            Err(e) => {
                let _ = this.stop_session();
                Err(ExportError::io(
                    format!("attach a loop device to {}", image.display()),
                    e,
                ))
            }
        }
    }

    pub fn device(&self) -> &Path {
        &self.device
    }

    /// Whether the kernel does this volume's IO on the data file itself.
    pub fn passthrough(&self) -> bool {
        self.passthrough.load(Ordering::Relaxed)
    }

    fn stop_session(&mut self) -> Result<(), ExportError> {
        if let Some(session) = self.session.take() {
            if let Err(e) = session.umount_and_join() {
                // Worker threads reading cloned /dev/fuse fds may see the
                // connection end as ECONNABORTED or ENODEV while the unmount
                // itself succeeded: only a mount still in place is a failure.
                if mount::is_mount_point(&self.mount_dir) {
                    return Err(ExportError::io(
                        format!("unmount FUSE at {}", self.mount_dir.display()),
                        e,
                    ));
                }
                tracing::debug!(error = %e, "FUSE session ended with an error after its unmount");
            }
        }
        let _ = std::fs::remove_dir(&self.mount_dir);
        // No IO can bypass the engine once the session is over.
        self.engine.end_passthrough();
        Ok(())
    }

    pub fn stop(mut self) -> Result<(), ExportError> {
        if let Some(dev) = self.loop_dev.take() {
            let path = dev.path().to_path_buf();
            dev.detach()
                .map_err(|e| ExportError::io(format!("detach {}", path.display()), e))?;
        }
        self.stop_session()
    }
}

impl Drop for FuseLoopExport {
    fn drop(&mut self) {
        if let Some(dev) = self.loop_dev.take() {
            let _ = dev.detach();
        }
        let _ = self.stop_session();
    }
}

pub fn cleanup_leftovers(fuse_root: &Path) -> Vec<String> {
    let mut done = Vec::new();
    for (dev, backing) in loopdev::attached_under(fuse_root) {
        match loopdev::detach_path(&dev) {
            Ok(()) => done.push(format!(
                "detached {} (on {})",
                dev.display(),
                backing.display()
            )),
            Err(e) => done.push(format!("could not detach {}: {e}", dev.display())),
        }
    }
    for m in mount::mounts_under(fuse_root) {
        match mount::unmount(&m.mount_point, true) {
            Ok(()) => done.push(format!(
                "unmounted dead FUSE mount {}",
                m.mount_point.display()
            )),
            Err(e) => done.push(format!(
                "could not unmount {}: {e}",
                m.mount_point.display()
            )),
        }
    }
    if let Ok(entries) = std::fs::read_dir(fuse_root) {
        for e in entries.flatten() {
            let _ = std::fs::remove_dir(e.path());
        }
    }
    done
}

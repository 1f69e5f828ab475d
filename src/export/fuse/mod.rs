//! FUSE + loop export: a one-file FUSE filesystem per volume, and a loop
//! device with direct IO on that file.
//!
//! We mount with a `/dev/fuse` descriptor of our own (not fuser's mount
//! helper), so that a copy can go to the [`keeper`]: the connection then
//! outlives a crashed daemon, and [`FuseLoopExport::resume`] serves it again.

mod fs;
pub mod keeper;

use super::ExportError;
use crate::engine::BlockEngine;
use crate::sys::{self, loopdev, mount};
use fuser::{BackgroundSession, Config, InitFlags, Session, SessionACL};
use keeper::Keeper;
use parking_lot::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Name of the image file inside the FUSE mount.
pub const IMAGE: &str = "image";
/// FUSE worker threads per volume: the engine's
/// [`BlockEngine::io_parallelism`], at most this many. They share one
/// `/dev/fuse` descriptor (no per-thread clones): requests read through a
/// clone die with it, while those read through the shared one are kept by
/// the keeper's copy and resent after a crash.
const MAX_FUSE_THREADS: usize = 32;
/// Logical block size of the loop device: filesystems are made with 4 KiB
/// blocks, and it keeps every request 4 KiB aligned.
const LOOP_BLOCK_SIZE: u32 = 4096;
/// Largest readahead the synthetic INIT of a resume offers (the kernel's).
const RESUME_READAHEAD: u32 = 1 << 20;

/// What a new daemon needs to serve this export again after a crash.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FuseHandover {
    pub mount_dir: PathBuf,
    pub device: PathBuf,
    /// The kernel granted passthrough at INIT (a resume must ask the same).
    pub passthrough_granted: bool,
}

/// The engine a FUSE export serves, which can be replaced while it runs
/// (an online grow reopens the image): every request holds the read side
/// for its IO, so whoever holds the write side knows that no IO is in
/// flight on the engine and none starts. (A replicated write answered
/// later by a link's reader outlives its request's hold: a mirror is
/// never replaced this way.)
pub struct EngineSlot(RwLock<Arc<dyn BlockEngine>>);

impl EngineSlot {
    pub fn new(engine: Arc<dyn BlockEngine>) -> EngineSlot {
        EngineSlot(RwLock::new(engine))
    }

    /// The engine, for one request's IO.
    pub fn get(&self) -> RwLockReadGuard<'_, Arc<dyn BlockEngine>> {
        self.0.read()
    }

    /// The engine with no IO in flight, to replace it; IO waits meanwhile.
    pub fn exclusive(&self) -> RwLockWriteGuard<'_, Arc<dyn BlockEngine>> {
        self.0.write()
    }
}

pub struct FuseLoopExport {
    key: String,
    keeper: Option<Arc<Keeper>>,
    engine: Arc<EngineSlot>,
    status: Arc<fs::Status>,
    mount_dir: PathBuf,
    session: Option<BackgroundSession>,
    loop_dev: Option<loopdev::LoopDevice>,
    device: PathBuf,
}

fn session_config(engine: &dyn BlockEngine) -> Config {
    let mut config = Config::default();
    config.acl = SessionACL::Owner;
    config.n_threads = Some(engine.io_parallelism().clamp(1, MAX_FUSE_THREADS));
    config.clone_fd = false;
    config
}

impl FuseLoopExport {
    /// Mount a fresh FUSE filesystem at `mount_dir`, attach a loop device to
    /// its image, and give the keeper (if any) copies of both descriptors
    /// under `key`.
    pub fn start(
        key: &str,
        volume: &str,
        engine: Arc<dyn BlockEngine>,
        mount_dir: &Path,
        passthrough: bool,
        keeper: Option<Arc<Keeper>>,
    ) -> Result<Self, ExportError> {
        std::fs::create_dir_all(mount_dir)
            .map_err(|e| ExportError::io(format!("create {}", mount_dir.display()), e))?;
        if mount::is_mount_point(mount_dir) {
            let _ = sys::fuse::abort_connection(mount_dir);
            let _ = mount::unmount(mount_dir, true);
        }
        let dev = sys::fuse::open_dev()
            .map_err(|e| ExportError::FuseUnavailable(format!("open /dev/fuse: {e}")))?;
        sys::fuse::mount(&dev, mount_dir, &format!("dunnage:{volume}"), "dunnage").map_err(
            |e| ExportError::FuseUnavailable(format!("mount FUSE at {}: {e}", mount_dir.display())),
        )?;
        let status = Arc::new(fs::Status::default());
        let config = session_config(&*engine);
        let engine = Arc::new(EngineSlot::new(engine));
        let mut this = FuseLoopExport {
            key: key.to_string(),
            keeper,
            engine: engine.clone(),
            status: status.clone(),
            mount_dir: mount_dir.to_path_buf(),
            session: None,
            loop_dev: None,
            device: PathBuf::new(),
        };
        let held = dev
            .try_clone()
            .map_err(|e| ExportError::io("duplicate the /dev/fuse descriptor", e))?;
        let image = fs::ImageFs::new(engine, passthrough, status);
        // The kernel sent INIT when it mounted: fuser's handshake answers it.
        let session = Session::from_fd(image, OwnedFd::from(dev), SessionACL::Owner, config)
            .map_err(|e| ExportError::io("answer the FUSE INIT", e))?;
        this.session = Some(
            session
                .spawn()
                .map_err(|e| ExportError::io("start the FUSE session", e))?,
        );
        this.attach_loop()?;
        if let (Some(k), Some(l)) = (&this.keeper, &this.loop_dev) {
            if let Err(e) = k.hold(key, &[held.as_fd(), l.file().as_fd()]) {
                tracing::warn!(volume, error = %e, "the FUSE keeper refused the descriptors: a crash of this daemon will break this volume's mount");
            }
        }
        Ok(this)
    }

    fn attach_loop(&mut self) -> Result<(), ExportError> {
        let image = self.mount_dir.join(IMAGE);
        match loopdev::LoopDevice::attach(&image, LOOP_BLOCK_SIZE, true) {
            Ok(dev) => {
                self.device = dev.path().to_path_buf();
                self.loop_dev = Some(dev);
                Ok(())
            }
            Err(e) => {
                let _ = self.stop_session();
                Err(ExportError::io(
                    format!("attach a loop device to {}", image.display()),
                    e,
                ))
            }
        }
    }

    /// Serve again a connection a crashed daemon left with the keeper:
    /// `fds` are the `/dev/fuse` and loop descriptors it held for us.
    /// `inherited_passthrough`: the engine is still in passthrough (the
    /// kernel went on doing the IO itself while no daemon ran).
    pub fn resume(
        key: &str,
        engine: Arc<dyn BlockEngine>,
        handover: &FuseHandover,
        fds: Vec<OwnedFd>,
        inherited_passthrough: bool,
        keeper: Option<Arc<Keeper>>,
    ) -> Result<Self, ExportError> {
        let mut fds = fds.into_iter();
        let (Some(dev), Some(loop_fd)) = (fds.next(), fds.next()) else {
            return Err(ExportError::io(
                "resume: the keeper holds too few descriptors",
                std::io::Error::from(std::io::ErrorKind::NotFound),
            ));
        };
        let dev = File::from(dev);
        let status = Arc::new(fs::Status::default());
        let config = session_config(&*engine);
        let engine = Arc::new(EngineSlot::new(engine));
        let image = fs::ImageFs::resumed(
            engine.clone(),
            handover.passthrough_granted,
            inherited_passthrough,
            status.clone(),
        );
        // fuser can only start a session with a handshake, and the kernel
        // sends INIT once per connection (the dead daemon answered it). So
        // fuser gets a socket for the handshake, fed an INIT offering what
        // the kernel granted then, and the live connection is put in the
        // socket's place (dup2) before any worker thread reads.
        let (ours, theirs) =
            sys::fuse::handshake_pair().map_err(|e| ExportError::io("socketpair", e))?;
        let mut offered = InitFlags::FUSE_ASYNC_DIO | InitFlags::FUSE_INIT_EXT;
        if handover.passthrough_granted {
            offered |= InitFlags::FUSE_PASSTHROUGH;
        }
        File::from(ours.try_clone().map_err(|e| ExportError::io("dup", e))?)
            .write_all(&sys::fuse::synthetic_init(offered.bits(), RESUME_READAHEAD))
            .map_err(|e| ExportError::io("feed the resume handshake", e))?;
        let slot = theirs.as_raw_fd();
        let session = Session::from_fd(image, theirs, SessionACL::Owner, config)
            .map_err(|e| ExportError::io("resume handshake", e))?;
        drop(ours);
        // The session has not started: no thread uses `slot` yet.
        sys::fuse::swap_in(&dev, slot).map_err(|e| ExportError::io("dup2 /dev/fuse", e))?;
        if let Err(e) = sys::fuse::notify_resend(&dev) {
            // Before Linux 6.9: requests the dead daemon had read stay lost.
            tracing::warn!(error = %e, "FUSE_NOTIFY_RESEND failed: IO the crashed daemon had taken may hang");
        }
        let session = session
            .spawn()
            .map_err(|e| ExportError::io("start the FUSE session", e))?;
        Ok(FuseLoopExport {
            key: key.to_string(),
            keeper,
            engine,
            status,
            mount_dir: handover.mount_dir.clone(),
            session: Some(session),
            loop_dev: Some(loopdev::LoopDevice::adopt(
                handover.device.clone(),
                File::from(loop_fd),
            )),
            device: handover.device.clone(),
        })
    }

    pub fn device(&self) -> &Path {
        &self.device
    }

    /// The engine this export serves, to replace it.
    pub fn engine_slot(&self) -> &Arc<EngineSlot> {
        &self.engine
    }

    /// The engine grew: tell the kernel. The FUSE file's cached attributes
    /// are dropped and read again (a stat, from this thread: a FUSE worker
    /// answers it), then the loop device takes the file's new size.
    pub fn refresh_size(&self) -> Result<(), ExportError> {
        if let Some(s) = &self.session {
            s.notifier()
                .inval_inode(fs::IMAGE_INO, -1, 0)
                .map_err(|e| ExportError::io("invalidate the FUSE file's size", e))?;
        }
        let image = self.mount_dir.join(IMAGE);
        std::fs::metadata(&image)
            .map_err(|e| ExportError::io(format!("stat {}", image.display()), e))?;
        if let Some(l) = &self.loop_dev {
            l.set_capacity().map_err(|e| {
                ExportError::io(format!("set the capacity of {}", self.device.display()), e)
            })?;
        }
        Ok(())
    }

    /// Whether the kernel does this volume's IO on the data file itself.
    pub fn passthrough(&self) -> bool {
        self.status.active.load(Ordering::Relaxed)
    }

    pub fn handover(&self) -> FuseHandover {
        FuseHandover {
            mount_dir: self.mount_dir.clone(),
            device: self.device.clone(),
            passthrough_granted: self.status.granted.load(Ordering::Relaxed),
        }
    }

    fn stop_session(&mut self) -> Result<(), ExportError> {
        if let Some(session) = self.session.take() {
            // Unmounting ends the connection; the workers then see ENODEV.
            // Busy for a moment while the loop device's last opener (udev's
            // probe after a resize, say) delays its autoclear.
            let mut unmounted = mount::unmount(&self.mount_dir, false);
            for _ in 0..50 {
                match &unmounted {
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                        std::thread::sleep(std::time::Duration::from_millis(40));
                        unmounted = mount::unmount(&self.mount_dir, false);
                    }
                    _ => break,
                }
            }
            if let Err(e) = unmounted {
                if mount::is_mount_point(&self.mount_dir) {
                    self.session = Some(session);
                    return Err(ExportError::io(
                        format!("unmount FUSE at {}", self.mount_dir.display()),
                        e,
                    ));
                }
            }
            if let Err(e) = session.join() {
                tracing::debug!(error = %e, "FUSE session ended with an error after its unmount");
            }
        }
        let _ = std::fs::remove_dir(&self.mount_dir);
        // No IO can bypass the engine once the session is over.
        self.engine.get().end_passthrough();
        Ok(())
    }

    fn release_keeper(&mut self) {
        if let Some(k) = self.keeper.take() {
            if let Err(e) = k.release(&self.key) {
                tracing::warn!(key = %self.key, error = %e, "the FUSE keeper did not release the volume");
            }
        }
    }

    pub fn stop(mut self) -> Result<(), ExportError> {
        // The keeper's copies first: they would keep the device and the
        // connection alive after we let go.
        self.release_keeper();
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
        self.release_keeper();
        if let Some(dev) = self.loop_dev.take() {
            let _ = dev.detach();
        }
        let _ = self.stop_session();
    }
}

/// Detach loop devices on our FUSE files and unmount FUSE mounts, except
/// what `protected` says a resumed volume still uses.
pub fn cleanup_leftovers(fuse_root: &Path, protected: &dyn Fn(&Path) -> bool) -> Vec<String> {
    let mut done = Vec::new();
    for (dev, backing) in loopdev::attached_under(fuse_root) {
        if protected(&dev) {
            continue;
        }
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
        if protected(&m.mount_point) {
            continue;
        }
        let _ = sys::fuse::abort_connection(&m.mount_point);
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
            if protected(&e.path()) {
                continue;
            }
            let _ = std::fs::remove_dir(e.path());
        }
    }
    done
}

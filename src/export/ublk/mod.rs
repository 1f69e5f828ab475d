//! ublk export: the kernel's userspace block driver (`/dev/ublkbN`).
//!
//! One server thread per volume owns the ublk control device and runs
//! libublk's `run_target`, which spawns one OS thread per hardware queue.
//! Queue threads call the engine directly for every request, in the
//! request's own io buffer. None of this runs on an actix thread.
//!
//! Devices outlive a killed daemon (user recovery): the kernel quiesces the
//! device and holds its IO until the next daemon takes it back with
//! START/END_USER_RECOVERY ([`UblkExport::recover`]). Each device names its
//! owner (volume id and run dir) in libublk's per-device JSON, so a new
//! daemon tells its own leftovers from anybody else's devices.
//!
//! libublk is used only in this module (pinned in Cargo.toml: its API moves
//! between minor versions).

use super::ExportError;
use crate::engine::BlockEngine;
use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::helpers::IoBuf;
use libublk::io::{BufDescList, UblkDev, UblkIOCtx, UblkQueue};
use libublk::{sys, BufDesc, UblkError, UblkFlags, UblkIORes};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

/// The ublk control device; its presence means ublk_drv is loaded.
pub const CONTROL: &str = "/dev/ublk-control";
/// Where the kernel lists ublk character devices (`ublkcN`).
const CHAR_CLASS: &str = "/sys/class/ublk-char";
/// libublk's target type name, recorded in its JSON.
const TARGET: &str = "dunnage";
/// Hardware queues per device, each served by its own OS thread.
const NR_QUEUES: u16 = 2;
/// In-flight requests per queue; each has its own io buffer.
const QUEUE_DEPTH: u16 = 64;
/// Largest request, and the size of each io buffer.
const IO_BUF_BYTES: u32 = 512 << 10;
/// Logical (and physical) block size, as for the FUSE export's loop device.
const BLOCK_SHIFT: u8 = 12;
/// How long `start` and `recover` wait for the device to come up.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Driver features of every device.
///
/// `UBLK_F_USER_RECOVERY`: when the daemon dies the kernel quiesces the
/// device and queues its IO until a new daemon recovers it, so users see a
/// pause instead of EIO (not `..._FAIL_IO`, which would fail that IO).
///
/// `UBLK_F_USER_RECOVERY_REISSUE`: requests the dead daemon had fetched but
/// not completed go to the new daemon again instead of failing with EIO
/// (which ext4 answers by going read-only). Safe because every request is
/// idempotent on the engine: a write puts the same bytes at the same
/// offsets again (allocation is write-through and crash-consistent, so a
/// block half written by the dead daemon is simply written once more),
/// discard and write-zeroes leave the same zeros, read and flush change
/// nothing. A request is only reissued because it never completed, so no
/// user can have seen its result or issued anything that depends on it.
const DEV_FLAGS: u64 = (sys::UBLK_F_USER_RECOVERY | sys::UBLK_F_USER_RECOVERY_REISSUE) as u64;

/// The key of [`Owner`] in libublk's `target_data`.
const OWNER_KEY: &str = "dunnage";

/// Who a device belongs to, kept in libublk's per-device JSON
/// (`target_data`), which lives as long as the device does: a new daemon
/// recognises its own devices among all ublk devices by it, and never
/// touches anybody else's.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Owner {
    /// The volume's id (per creation, unlike its name).
    pub volume_id: String,
    /// The run dir of the daemon serving it (one daemon per run dir).
    pub run_dir: PathBuf,
}

impl Owner {
    /// The value for libublk's `target_data`.
    fn target_data(&self) -> serde_json::Value {
        serde_json::json!({ OWNER_KEY: self })
    }

    /// The owner in a device's `target_data`; `None` when the device is
    /// not one of ours.
    fn from_target_data(data: &serde_json::Value) -> Option<Owner> {
        serde_json::from_value(data.get(OWNER_KEY)?.clone()).ok()
    }
}

/// What a new daemon needs to take the device back after a crash.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UblkHandover {
    pub dev_id: u32,
    pub device: PathBuf,
}

pub struct UblkExport {
    dev_id: u32,
    device: PathBuf,
    server: Option<JoinHandle<()>>,
}

/// What the server thread reports once the device is live, or why not.
type Started = Result<u32, String>;

/// Where the server thread gets its device from.
#[derive(Debug, Clone, Copy)]
enum Origin {
    /// ADD_DEV a new one.
    Add,
    /// A device a dead daemon left, after START_USER_RECOVERY: the same id
    /// and queue geometry, which the kernel keeps.
    Recover {
        dev_id: u32,
        nr_queues: u16,
        depth: u16,
        io_buf_bytes: u32,
    },
}

impl UblkExport {
    pub fn start(
        volume: &str,
        owner: Owner,
        engine: Arc<dyn BlockEngine>,
    ) -> Result<Self, ExportError> {
        let size = engine.size();
        if size == 0 || size % (1 << BLOCK_SHIFT) != 0 {
            return Err(ExportError::io(
                format!(
                    "ublk export of {volume}: size {size} is not a whole number of 4 KiB blocks"
                ),
                io::Error::from(io::ErrorKind::InvalidInput),
            ));
        }
        launch(
            format!("start the ublk device for {volume}"),
            volume,
            owner,
            engine,
            Origin::Add,
        )
    }

    pub fn device(&self) -> &Path {
        &self.device
    }

    pub fn handover(&self) -> UblkHandover {
        UblkHandover {
            dev_id: self.dev_id,
            device: self.device.clone(),
        }
    }

    /// Take back a device a killed daemon left quiesced (user recovery):
    /// check it is this volume's and in a state recovery accepts, send
    /// START_USER_RECOVERY (libublk retries while the dead daemon's
    /// character device is still open), then serve it from a new server
    /// thread whose `start_dev` sends END_USER_RECOVERY, which lets the
    /// held IO flow again.
    pub fn recover(
        volume: &str,
        owner: Owner,
        engine: Arc<dyn BlockEngine>,
        handover: &UblkHandover,
    ) -> Result<Self, ExportError> {
        let what = format!("recover {} for {volume}", handover.device.display());
        let refuse = |why: String, kind: io::ErrorKind| {
            ExportError::io(format!("{what}: {why}"), io::Error::from(kind))
        };
        if !has_json(handover.dev_id) {
            return Err(refuse(
                "the device is gone, or has no libublk JSON".into(),
                io::ErrorKind::NotFound,
            ));
        }
        let ctrl = UblkCtrl::new_simple(handover.dev_id as i32)
            .map_err(|e| ExportError::io(format!("{what}: the device is gone"), os_error(e)))?;
        match ctrl
            .get_target_data_from_json()
            .and_then(|d| Owner::from_target_data(&d))
        {
            Some(o) if o == owner => {}
            Some(o) => {
                return Err(refuse(
                    format!(
                        "the device belongs to volume id {} of run dir {}",
                        o.volume_id,
                        o.run_dir.display()
                    ),
                    io::ErrorKind::PermissionDenied,
                ))
            }
            None => {
                return Err(refuse(
                    "the device is not a dunnage device (no owner in its libublk JSON)".into(),
                    io::ErrorKind::PermissionDenied,
                ))
            }
        }
        let info = ctrl.dev_info();
        recoverable(info.state, info.flags)
            .map_err(|why| refuse(why, io::ErrorKind::Unsupported))?;
        let size = engine.size();
        match ctrl.get_target_from_json() {
            Ok(t) if t.dev_size == size => {}
            Ok(t) => {
                return Err(refuse(
                    format!("the device has {} bytes, the volume {size}", t.dev_size),
                    io::ErrorKind::InvalidData,
                ))
            }
            Err(e) => {
                return Err(ExportError::io(
                    format!("{what}: read the device's size from its libublk JSON"),
                    os_error(e),
                ))
            }
        }
        match ctrl.start_user_recover() {
            Ok(r) if r >= 0 => {}
            // libublk retried EBUSY for 30 s: the dead daemon's /dev/ublkcN
            // is still open, or the device never quiesced.
            Ok(r) => {
                return Err(ExportError::io(
                    format!(
                        "{what}: START_USER_RECOVERY: /dev/ublkc{} is still open or the device is not quiesced",
                        handover.dev_id
                    ),
                    io::Error::from_raw_os_error(-r),
                ))
            }
            Err(e) => {
                return Err(ExportError::io(
                    format!("{what}: START_USER_RECOVERY"),
                    os_error(e),
                ))
            }
        }
        drop(ctrl);
        launch(
            what,
            volume,
            owner,
            engine,
            Origin::Recover {
                dev_id: info.dev_id,
                nr_queues: info.nr_hw_queues,
                depth: info.queue_depth,
                io_buf_bytes: info.max_io_buf_bytes,
            },
        )
    }

    /// Stop the device (the queue threads see their commands aborted and
    /// return), then wait for the server thread, which deletes the device.
    pub fn stop(mut self) -> Result<(), ExportError> {
        self.shut_down()
    }

    fn shut_down(&mut self) -> Result<(), ExportError> {
        let Some(server) = self.server.take() else {
            return Ok(());
        };
        let stopped = UblkCtrl::new_simple(self.dev_id as i32).and_then(|c| c.kill_dev());
        if let Err(e) = stopped {
            // Leave the thread running: joining would wait for a device
            // that is still live.
            return Err(ExportError::io(
                format!("stop {}", self.device.display()),
                os_error(e),
            ));
        }
        server.join().map_err(|_| {
            ExportError::io(
                format!("the ublk server of {} panicked", self.device.display()),
                io::Error::other("panic"),
            )
        })
    }
}

impl Drop for UblkExport {
    fn drop(&mut self) {
        let _ = self.shut_down();
    }
}

/// Spawn the server thread and wait until its device is live. `what`
/// prefixes errors (it names the volume, and the device when known).
fn launch(
    what: String,
    volume: &str,
    owner: Owner,
    engine: Arc<dyn BlockEngine>,
    origin: Origin,
) -> Result<UblkExport, ExportError> {
    let size = engine.size();
    let (tx, rx) = mpsc::sync_channel::<Started>(1);
    let name = volume.to_string();
    let server = std::thread::Builder::new()
        .name(format!("ublk-{volume}"))
        .spawn(move || serve(&name, owner, engine, size, origin, tx))
        .map_err(|e| ExportError::io(format!("{what}: spawn the ublk server thread"), e))?;
    match rx.recv_timeout(START_TIMEOUT) {
        Ok(Ok(dev_id)) => Ok(UblkExport {
            dev_id,
            device: PathBuf::from(format!("/dev/ublkb{dev_id}")),
            server: Some(server),
        }),
        Ok(Err(msg)) => {
            let _ = server.join();
            Err(ExportError::io(what, io::Error::other(msg)))
        }
        // The thread is stuck (or gone without a word): leave it, it owns
        // the control device and deletes it if it ever gets out.
        Err(_) => Err(ExportError::io(
            what,
            io::Error::from(io::ErrorKind::TimedOut),
        )),
    }
}

/// Whether a device a dead daemon left can be recovered, from the state
/// and flags the kernel reports.
fn recoverable(state: u16, flags: u64) -> Result<(), String> {
    if flags & u64::from(sys::UBLK_F_USER_RECOVERY) == 0 {
        return Err(
            "the device was created without user recovery, so the kernel stopped it when its daemon died"
                .into(),
        );
    }
    match u32::from(state) {
        sys::UBLK_S_DEV_QUIESCED => Ok(()),
        // The dead daemon's queues are still being torn down; the kernel
        // quiesces the device once they are, and START_USER_RECOVERY
        // (retried on EBUSY) waits for that.
        sys::UBLK_S_DEV_LIVE => Ok(()),
        sys::UBLK_S_DEV_DEAD => Err("the device was stopped (state DEAD): its disk is gone".into()),
        sys::UBLK_S_DEV_FAIL_IO => Err("the device fails its IO (state FAIL_IO)".into()),
        s => Err(format!("the device is in unknown state {s}")),
    }
}

/// The device's owner, from its libublk JSON; `None` if it has none.
fn owner_of(ctrl: &UblkCtrl) -> Option<Owner> {
    Owner::from_target_data(&ctrl.get_target_data_from_json()?)
}

/// Whether device `dev_id` exists and has libublk's JSON. Checked before
/// opening a control for it: libublk prints to stderr when it finds no
/// JSON for a device (the file name is libublk's, pinned in Cargo.toml).
fn has_json(dev_id: u32) -> bool {
    Path::new(&format!("{CHAR_CLASS}/ublkc{dev_id}")).exists()
        && Path::new(&format!("{}/{dev_id:04}.json", UblkCtrl::run_dir())).exists()
}

/// A control for `dev_id` if the device exists and is `owner`'s.
fn owned(dev_id: u32, owner: &Owner) -> Option<UblkCtrl> {
    if !has_json(dev_id) {
        return None;
    }
    let ctrl = UblkCtrl::new_simple(dev_id as i32).ok()?;
    match owner_of(&ctrl) {
        Some(o) if &o == owner => Some(ctrl),
        found => {
            tracing::warn!(device = %format!("/dev/ublkb{dev_id}"), volume_id = %owner.volume_id, ?found, "not touching a ublk device that is not this volume's");
            None
        }
    }
}

/// Make a device nobody will recover fail its IO instead of queueing it
/// (STOP_DEV: the kernel fails what it holds and removes the disk), so that
/// nothing waits on it. Leaves devices that are not `owner`'s alone.
pub fn cut(handover: &UblkHandover, owner: &Owner) {
    if let Some(c) = owned(handover.dev_id, owner) {
        if let Err(e) = c.kill_dev() {
            tracing::warn!(device = %handover.device.display(), volume_id = %owner.volume_id, error = %os_error(e), "cannot stop the ublk device");
        }
    }
}

/// Delete a device nobody will recover (after [`cut`]). Leaves devices
/// that are not `owner`'s alone.
pub fn remove(handover: &UblkHandover, owner: &Owner) {
    if let Some(c) = owned(handover.dev_id, owner) {
        if let Err(e) = delete(&c) {
            tracing::warn!(device = %handover.device.display(), volume_id = %owner.volume_id, error = %os_error(e), "cannot delete the ublk device");
        }
    }
}

/// Remove the devices a crashed daemon of `run_dir` left that nobody takes
/// back (`keep` says which ids are taken back): each is stopped first, so
/// that IO the kernel holds for it fails rather than waits, then deleted.
/// Devices of other run dirs and other programs are never touched. Returns
/// lines to log.
pub fn cleanup_orphans(run_dir: &Path, keep: &dyn Fn(u32) -> bool) -> Vec<String> {
    let mut lines = Vec::new();
    let Ok(entries) = std::fs::read_dir(CHAR_CLASS) else {
        return lines;
    };
    let mut ids: Vec<u32> = entries
        .flatten()
        .filter_map(|e| char_dev_id(&e.file_name().to_string_lossy()))
        .collect();
    ids.sort_unstable();
    for dev_id in ids.into_iter().filter(|id| !keep(*id) && has_json(*id)) {
        let Ok(ctrl) = UblkCtrl::new_simple(dev_id as i32) else {
            continue;
        };
        let Some(owner) = owner_of(&ctrl).filter(|o| o.run_dir == run_dir) else {
            continue;
        };
        let mut problems = Vec::new();
        if let Err(e) = ctrl.kill_dev() {
            problems.push(format!("stop: {}", os_error(e)));
        }
        if let Err(e) = delete(&ctrl) {
            problems.push(format!("delete: {}", os_error(e)));
        }
        lines.push(if problems.is_empty() {
            format!(
                "removed /dev/ublkb{dev_id} (volume id {}), left by a crashed run",
                owner.volume_id
            )
        } else {
            format!(
                "could not remove /dev/ublkb{dev_id} (volume id {}), left by a crashed run: {}",
                owner.volume_id,
                problems.join("; ")
            )
        });
    }
    lines
}

/// The id of a ublk character device from its name (`ublkc3` → 3).
fn char_dev_id(name: &str) -> Option<u32> {
    name.strip_prefix("ublkc")?.parse().ok()
}

/// Delete a device without waiting for its last opener (DEL_DEV_ASYNC):
/// DEL_DEV would block until a filesystem still mounted on it, perhaps
/// lazily detached, lets go. Kernels before 6.9 lack the async command
/// and answer EOPNOTSUPP.
fn delete(ctrl: &UblkCtrl) -> Result<(), UblkError> {
    match ctrl.del_dev_async() {
        Err(e) if errno(&e) == Some(libc::EOPNOTSUPP) => ctrl.del_dev().map(drop),
        r => r.map(drop),
    }
}

fn errno(e: &UblkError) -> Option<i32> {
    match e {
        UblkError::UringIOError(r) | UblkError::OtherError(r) => Some(-r),
        UblkError::IOError(e) => e.raw_os_error(),
        _ => None,
    }
}

/// libublk's error as an io::Error with the kernel's errno when there is
/// one (its own messages leave the errno out).
fn os_error(e: UblkError) -> io::Error {
    match (errno(&e), e) {
        (_, UblkError::IOError(e)) => e,
        (Some(n), _) if n > 0 => io::Error::from_raw_os_error(n),
        (_, e) => io::Error::other(e.to_string()),
    }
}

/// Server thread: add (or take back) the device, serve it until it is
/// stopped, then delete it.
fn serve(
    volume: &str,
    owner: Owner,
    engine: Arc<dyn BlockEngine>,
    size: u64,
    origin: Origin,
    tx: mpsc::SyncSender<Started>,
) {
    let builder = UblkCtrlBuilder::default()
        .name(TARGET)
        .nr_queues(NR_QUEUES)
        .depth(QUEUE_DEPTH)
        .io_buf_bytes(IO_BUF_BYTES);
    let built = match origin {
        Origin::Add => builder
            .ctrl_flags(DEV_FLAGS)
            .dev_flags(UblkFlags::UBLK_DEV_F_ADD_DEV)
            .build(),
        // The kernel kept the device's flags; the geometry must be the
        // device's, queue for queue.
        Origin::Recover {
            dev_id,
            nr_queues,
            depth,
            io_buf_bytes,
        } => builder
            .id(dev_id as i32)
            .nr_queues(nr_queues)
            .depth(depth)
            .io_buf_bytes(io_buf_bytes)
            .dev_flags(UblkFlags::UBLK_DEV_F_RECOVER_DEV)
            .build(),
    };
    let ctrl = match built {
        Ok(c) => c,
        Err(e) => {
            let _ = tx.send(Err(format!("open the device: {}", os_error(e))));
            return;
        }
    };
    let started = tx.clone();
    let target_data = owner.target_data();
    let result = ctrl.run_target(
        move |dev: &mut UblkDev| {
            set_params(dev, size);
            // libublk writes it to the device's JSON before START_DEV. A
            // recovered device keeps the JSON it had (libublk reloads it).
            dev.set_target_json(target_data);
            Ok(())
        },
        move |qid: u16, dev: &UblkDev| serve_queue(qid, dev, &*engine),
        move |ctrl: &UblkCtrl| {
            let _ = started.send(Ok(ctrl.dev_info().dev_id));
        },
    );
    match result {
        Ok(_) => tracing::debug!(volume, "ublk device stopped"),
        Err(e) => {
            let e = os_error(e);
            tracing::warn!(volume, error = %e, "ublk device failed");
            // No-op if the device had come up: the receiver has its answer.
            let _ = tx.try_send(Err(e.to_string()));
        }
    }
    // Every way out of here deletes the device: a clean stop, a failed
    // start or recovery, a device stopped by someone else. Only a killed
    // daemon, which runs no code at all, leaves it behind, quiesced for the
    // next daemon to recover. Deleted explicitly because a recovered
    // control (RECOVER_DEV) never deletes on drop, and an added one would
    // with a DEL_DEV that waits for the device's last opener; after this
    // the added control's drop finds it deleted and does nothing.
    if let Err(e) = delete(&ctrl) {
        tracing::warn!(volume, device = %format!("/dev/ublkb{}", ctrl.dev_info().dev_id), error = %os_error(e), "cannot delete the ublk device");
    }
}

fn set_params(dev: &mut UblkDev, size: u64) {
    dev.set_default_params(size);
    let max_sectors = dev.dev_info.max_io_buf_bytes >> 9;
    let p = &mut dev.tgt.params;
    p.types |= sys::UBLK_PARAM_TYPE_DISCARD;
    p.basic.logical_bs_shift = BLOCK_SHIFT;
    p.basic.physical_bs_shift = BLOCK_SHIFT;
    p.basic.io_min_shift = BLOCK_SHIFT;
    p.basic.io_opt_shift = BLOCK_SHIFT;
    p.discard.discard_granularity = 1 << BLOCK_SHIFT;
    p.discard.max_discard_sectors = max_sectors;
    p.discard.max_write_zeroes_sectors = max_sectors;
    p.discard.max_discard_segments = 1;
}

/// One queue thread: fetch requests, serve each from the engine in place.
fn serve_queue(qid: u16, dev: &UblkDev, engine: &dyn BlockEngine) {
    let mut bufs = dev.alloc_queue_io_bufs();
    let queue = match UblkQueue::new(qid, dev)
        .and_then(|q| q.submit_fetch_commands_unified(BufDescList::Slices(Some(&bufs))))
    {
        Ok(q) => q,
        Err(e) => {
            tracing::error!(qid, error = %e, "ublk queue setup failed");
            return;
        }
    };
    queue.wait_and_handle_io(|q: &UblkQueue, tag: u16, _io: &UblkIOCtx| {
        let buf: &mut IoBuf<u8> = &mut bufs[usize::from(tag)];
        let iod = q.get_iod(tag);
        let req = Request {
            op: iod.op_flags & 0xff,
            flags: iod.op_flags,
            offset: iod.start_sector << 9,
            len: u64::from(iod.nr_sectors) << 9,
        };
        let res = handle(engine, req, buf.as_mut_slice());
        if let Err(e) = q.complete_io_cmd_unified(
            tag,
            BufDesc::Slice(buf.as_slice()),
            Ok(UblkIORes::Result(res)),
        ) {
            tracing::error!(qid, tag, error = %e, "ublk complete failed");
        }
    });
}

/// One block request, as the driver describes it (bytes, not sectors).
#[derive(Debug, Clone, Copy)]
struct Request {
    op: u32,
    flags: u32,
    offset: u64,
    len: u64,
}

/// Serve one request; returns bytes done or a negative errno.
fn handle(engine: &dyn BlockEngine, req: Request, buf: &mut [u8]) -> i32 {
    let Ok(len) = usize::try_from(req.len) else {
        return -libc::EINVAL;
    };
    let result = match req.op {
        sys::UBLK_IO_OP_READ | sys::UBLK_IO_OP_WRITE if len > buf.len() => {
            return -libc::EINVAL;
        }
        sys::UBLK_IO_OP_READ => engine.read_at(&mut buf[..len], req.offset),
        sys::UBLK_IO_OP_WRITE => engine.write_at(&buf[..len], req.offset).and_then(|()| {
            if req.flags & sys::UBLK_IO_F_FUA != 0 {
                engine.flush()
            } else {
                Ok(())
            }
        }),
        sys::UBLK_IO_OP_FLUSH => engine.flush(),
        // Discarded ranges read as zeros, so the engine's discard is a
        // valid WRITE_ZEROES too.
        sys::UBLK_IO_OP_DISCARD | sys::UBLK_IO_OP_WRITE_ZEROES => {
            engine.discard(req.offset, req.len)
        }
        _ => return -libc::EOPNOTSUPP,
    };
    match result {
        Ok(()) => i32::try_from(len).unwrap_or(i32::MAX),
        Err(e) => {
            tracing::warn!(?req, error = %e, "ublk request failed");
            -e.errno()
        }
    }
}

/// Whether this kernel offers ublk.
pub fn available() -> bool {
    Path::new(CONTROL).exists()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::EngineError;
    use parking_lot::Mutex;

    /// A RAM engine, to test request handling without a kernel.
    struct Ram {
        data: Mutex<Vec<u8>>,
        flushes: Mutex<u32>,
    }

    impl Ram {
        fn new(size: usize) -> Self {
            Ram {
                data: Mutex::new(vec![0; size]),
                flushes: Mutex::new(0),
            }
        }
        fn range(&self, offset: u64, len: usize) -> Result<std::ops::Range<usize>, EngineError> {
            let size = self.data.lock().len();
            let start = offset as usize;
            if start + len > size {
                return Err(EngineError::OutOfRange {
                    offset,
                    len: len as u64,
                    size: size as u64,
                });
            }
            Ok(start..start + len)
        }
    }

    impl BlockEngine for Ram {
        fn size(&self) -> u64 {
            self.data.lock().len() as u64
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), EngineError> {
            let r = self.range(offset, buf.len())?;
            buf.copy_from_slice(&self.data.lock()[r]);
            Ok(())
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), EngineError> {
            let r = self.range(offset, buf.len())?;
            self.data.lock()[r].copy_from_slice(buf);
            Ok(())
        }
        fn flush(&self) -> Result<(), EngineError> {
            *self.flushes.lock() += 1;
            Ok(())
        }
        fn discard(&self, offset: u64, len: u64) -> Result<(), EngineError> {
            let r = self.range(offset, len as usize)?;
            self.data.lock()[r].fill(0);
            Ok(())
        }
    }

    fn req(op: u32, offset: u64, len: u64) -> Request {
        Request {
            op,
            flags: op,
            offset,
            len,
        }
    }

    #[test]
    fn requests_reach_the_engine() {
        let ram = Ram::new(64 << 10);
        let mut buf = vec![0xa5u8; 8192];
        assert_eq!(
            handle(&ram, req(sys::UBLK_IO_OP_WRITE, 4096, 8192), &mut buf),
            8192
        );
        let mut back = vec![0u8; 8192];
        assert_eq!(
            handle(&ram, req(sys::UBLK_IO_OP_READ, 4096, 8192), &mut back),
            8192
        );
        assert_eq!(back, buf);

        assert_eq!(
            handle(&ram, req(sys::UBLK_IO_OP_DISCARD, 4096, 4096), &mut []),
            4096
        );
        handle(&ram, req(sys::UBLK_IO_OP_READ, 4096, 8192), &mut back);
        assert!(back[..4096].iter().all(|&b| b == 0));
        assert!(back[4096..].iter().all(|&b| b == 0xa5));

        assert_eq!(handle(&ram, req(sys::UBLK_IO_OP_FLUSH, 0, 0), &mut []), 0);
        let fua = Request {
            flags: sys::UBLK_IO_OP_WRITE | sys::UBLK_IO_F_FUA,
            ..req(sys::UBLK_IO_OP_WRITE, 0, 4096)
        };
        assert_eq!(handle(&ram, fua, &mut buf), 4096);
        assert_eq!(*ram.flushes.lock(), 2);
    }

    fn owner() -> Owner {
        Owner {
            volume_id: "af9863f56c6a0f4345b8e51b7581377e".into(),
            run_dir: PathBuf::from("/run/dunnage"),
        }
    }

    #[test]
    fn owner_round_trips_through_the_device_json() {
        // As libublk writes the device's JSON file and reads it back.
        let json = serde_json::json!({
            "dev_info": { "dev_id": 3 },
            "target": { "tgt_type": TARGET, "dev_size": 1u64 << 30 },
            "target_data": owner().target_data(),
        });
        let text = json.to_string();
        let back: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(Owner::from_target_data(&back["target_data"]), Some(owner()));
    }

    #[test]
    fn other_devices_have_no_owner() {
        for data in [
            serde_json::json!({ "loop": { "backing_file": "/x" } }),
            serde_json::json!({ OWNER_KEY: { "volume_id": 7 } }),
            serde_json::json!("dunnage"),
            serde_json::Value::Null,
        ] {
            assert_eq!(Owner::from_target_data(&data), None, "{data}");
        }
    }

    #[test]
    fn devices_carry_recovery_with_reissue() {
        assert_ne!(DEV_FLAGS & u64::from(sys::UBLK_F_USER_RECOVERY), 0);
        assert_ne!(DEV_FLAGS & u64::from(sys::UBLK_F_USER_RECOVERY_REISSUE), 0);
        assert_eq!(DEV_FLAGS & u64::from(sys::UBLK_F_USER_RECOVERY_FAIL_IO), 0);
    }

    #[test]
    fn recovery_wants_a_quiesced_or_quiescing_device() {
        let state = |s: u32| u16::try_from(s).unwrap();
        assert!(recoverable(state(sys::UBLK_S_DEV_QUIESCED), DEV_FLAGS).is_ok());
        assert!(recoverable(state(sys::UBLK_S_DEV_LIVE), DEV_FLAGS).is_ok());
        let dead = recoverable(state(sys::UBLK_S_DEV_DEAD), DEV_FLAGS).unwrap_err();
        assert!(dead.contains("DEAD"), "{dead}");
        assert!(recoverable(state(sys::UBLK_S_DEV_FAIL_IO), DEV_FLAGS).is_err());
        let old = recoverable(state(sys::UBLK_S_DEV_QUIESCED), 0).unwrap_err();
        assert!(old.contains("without user recovery"), "{old}");
    }

    #[test]
    fn char_device_names() {
        assert_eq!(char_dev_id("ublkc0"), Some(0));
        assert_eq!(char_dev_id("ublkc17"), Some(17));
        assert_eq!(char_dev_id("ublkb1"), None);
        assert_eq!(char_dev_id("ublk-control"), None);
        assert_eq!(char_dev_id("ublkc"), None);
    }

    #[test]
    fn bad_requests_get_an_errno() {
        let ram = Ram::new(64 << 10);
        let mut buf = vec![0u8; 4096];
        assert_eq!(
            handle(&ram, req(sys::UBLK_IO_OP_READ, 0, 8192), &mut buf),
            -libc::EINVAL
        );
        assert_eq!(
            handle(&ram, req(sys::UBLK_IO_OP_READ, 64 << 10, 4096), &mut buf),
            -libc::EINVAL
        );
        assert_eq!(
            handle(&ram, req(sys::UBLK_IO_OP_ZONE_OPEN, 0, 4096), &mut buf),
            -libc::EOPNOTSUPP
        );
    }
}

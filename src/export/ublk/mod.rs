//! ublk export: the kernel's userspace block driver (`/dev/ublkbN`).
//!
//! One server thread per volume owns the ublk control device and runs
//! libublk's `run_target`, which spawns one OS thread per hardware queue.
//! Queue threads call the engine directly for every request, in the
//! request's own io buffer. None of this runs on an actix thread.
//!
//! libublk is used only in this module (pinned in Cargo.toml: its API moves
//! between minor versions).

use super::ExportError;
use crate::engine::BlockEngine;
use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::helpers::IoBuf;
use libublk::io::{BufDescList, UblkDev, UblkIOCtx, UblkQueue};
use libublk::{sys, BufDesc, UblkIORes};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

/// The ublk control device; its presence means ublk_drv is loaded.
pub const CONTROL: &str = "/dev/ublk-control";
/// Hardware queues per device, each served by its own OS thread.
const NR_QUEUES: u16 = 2;
/// In-flight requests per queue; each has its own io buffer.
const QUEUE_DEPTH: u16 = 64;
/// Largest request, and the size of each io buffer.
const IO_BUF_BYTES: u32 = 512 << 10;
/// Logical (and physical) block size, as for the FUSE export's loop device.
const BLOCK_SHIFT: u8 = 12;
/// How long `start` waits for the device to come up.
const START_TIMEOUT: Duration = Duration::from_secs(30);

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

impl UblkExport {
    pub fn start(volume: &str, engine: Arc<dyn BlockEngine>) -> Result<Self, ExportError> {
        let size = engine.size();
        if size == 0 || size % (1 << BLOCK_SHIFT) != 0 {
            return Err(ExportError::io(
                format!(
                    "ublk export of {volume}: size {size} is not a whole number of 4 KiB blocks"
                ),
                std::io::Error::from(std::io::ErrorKind::InvalidInput),
            ));
        }
        let (tx, rx) = mpsc::sync_channel::<Started>(1);
        let name = volume.to_string();
        let server = std::thread::Builder::new()
            .name(format!("ublk-{volume}"))
            .spawn(move || serve(&name, engine, size, tx))
            .map_err(|e| ExportError::io("spawn the ublk server thread", e))?;
        match rx.recv_timeout(START_TIMEOUT) {
            Ok(Ok(dev_id)) => Ok(UblkExport {
                dev_id,
                device: PathBuf::from(format!("/dev/ublkb{dev_id}")),
                server: Some(server),
            }),
            Ok(Err(msg)) => {
                let _ = server.join();
                Err(ExportError::io(
                    format!("start the ublk device for {volume}: {msg}"),
                    std::io::Error::other(msg.clone()),
                ))
            }
            // The thread is stuck (or gone without a word): leave it, it owns
            // the control device and deletes it if it ever gets out.
            Err(_) => Err(ExportError::io(
                format!("start the ublk device for {volume}"),
                std::io::Error::from(std::io::ErrorKind::TimedOut),
            )),
        }
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

    /// Take back a device a crashed daemon left quiesced (user recovery).
    pub fn recover(
        volume: &str,
        _engine: Arc<dyn BlockEngine>,
        handover: &UblkHandover,
    ) -> Result<Self, ExportError> {
        Err(ExportError::io(
            format!(
                "recover {} for {volume}: ublk user recovery is not built yet",
                handover.device.display()
            ),
            std::io::Error::from(std::io::ErrorKind::Unsupported),
        ))
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
                std::io::Error::other(e.to_string()),
            ));
        }
        server.join().map_err(|_| {
            ExportError::io(
                format!("the ublk server of {} panicked", self.device.display()),
                std::io::Error::other("panic"),
            )
        })
    }
}

impl Drop for UblkExport {
    fn drop(&mut self) {
        let _ = self.shut_down();
    }
}

/// Make a device nobody will recover fail its IO instead of queueing it.
pub fn cut(handover: &UblkHandover) {
    if let Ok(c) = UblkCtrl::new_simple(handover.dev_id as i32) {
        let _ = c.kill_dev();
    }
}

/// Delete a device nobody will recover.
pub fn remove(handover: &UblkHandover) {
    if let Ok(c) = UblkCtrl::new_simple(handover.dev_id as i32) {
        let _ = c.del_dev();
    }
}

/// Server thread: add the device, run it until it is stopped, delete it.
fn serve(volume: &str, engine: Arc<dyn BlockEngine>, size: u64, tx: mpsc::SyncSender<Started>) {
    let ctrl = match UblkCtrlBuilder::default()
        .name("dunnage")
        .nr_queues(NR_QUEUES)
        .depth(QUEUE_DEPTH)
        .io_buf_bytes(IO_BUF_BYTES)
        // No UBLK_F_USER_RECOVERY yet: without a daemon that recovers the
        // device after a crash, a quiesced device would hang its users
        // forever; without the flag the kernel removes it and IO fails.
        .dev_flags(libublk::UblkFlags::UBLK_DEV_F_ADD_DEV)
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            let _ = tx.send(Err(format!("add the device: {e}")));
            return;
        }
    };
    let started = tx.clone();
    let result = ctrl.run_target(
        |dev: &mut UblkDev| {
            set_params(dev, size);
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
            tracing::warn!(volume, error = %e, "ublk device failed");
            // No-op if the device had come up: the receiver has its answer.
            let _ = tx.try_send(Err(e.to_string()));
        }
    }
    // Dropping `ctrl` (added by us, not disowned) deletes the device.
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

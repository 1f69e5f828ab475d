//! The one-file filesystem: a root directory holding `image`, whose bytes are
//! the engine's. Requests are answered on fuser's worker threads by calling
//! the engine directly; read buffers are per-thread and reused.

use super::{EngineSlot, IMAGE};
use fuser::{
    BackingId, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    InitFlags, KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, WriteFlags,
};
use parking_lot::Mutex;
use std::cell::RefCell;
use std::ffi::OsStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

pub(super) const IMAGE_INO: INodeNo = INodeNo(2);
/// File handle of opens served by passthrough (others are 0).
const PASSTHROUGH_FH: FileHandle = FileHandle(1);
/// Nothing here ever changes but through us, so the kernel may cache freely.
const TTL: Duration = Duration::from_secs(3600);
/// Largest request we ask the kernel for (also bounds the read buffer).
const MAX_IO: u32 = 1 << 20;
/// Background requests (async direct IO) the kernel lets in flight.
const MAX_BACKGROUND: u16 = 64;

thread_local! {
    static READ_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Passthrough opens: the kernel reads and writes the engine's file itself.
#[derive(Default)]
struct Backing {
    /// The kernel's handle on that file; `None` after a resume, until an
    /// open needs one (the old daemon's registration lives on in the kernel
    /// for the files it opened).
    id: Option<BackingId>,
    /// Kept open as long as the kernel may use it.
    file: Option<std::fs::File>,
    opens: u32,
}

/// What the export reports about its filesystem.
#[derive(Debug, Default)]
pub struct Status {
    /// The kernel does this volume's IO itself right now.
    pub active: AtomicBool,
    /// Passthrough was wanted and the kernel agreed at INIT.
    pub granted: AtomicBool,
}

pub struct ImageFs {
    engine: Arc<EngineSlot>,
    started: SystemTime,
    /// Passthrough wanted (by configuration) and granted (by the kernel at init).
    passthrough: bool,
    backing: Mutex<Option<Backing>>,
    status: Arc<Status>,
}

impl ImageFs {
    pub fn new(engine: Arc<EngineSlot>, passthrough: bool, status: Arc<Status>) -> Self {
        ImageFs {
            engine,
            started: SystemTime::now(),
            passthrough,
            backing: Mutex::new(None),
            status,
        }
    }

    /// Serve a connection an earlier daemon set up. `inherited` when the
    /// engine is still in passthrough: the loop device's open (the one
    /// user of the image) goes on bypassing us, and its release ends it.
    pub fn resumed(
        engine: Arc<EngineSlot>,
        passthrough: bool,
        inherited: bool,
        status: Arc<Status>,
    ) -> Self {
        let fs = ImageFs::new(engine, passthrough, status);
        if inherited {
            fs.status.active.store(true, Ordering::Relaxed);
            *fs.backing.lock() = Some(Backing {
                opens: 1,
                ..Backing::default()
            });
        }
        fs
    }

    /// Make sure the kernel has a backing file for a new passthrough open.
    /// False when the engine (or the kernel) refuses passthrough now.
    fn ensure_backing(&self, backing: &mut Option<Backing>, reply: &ReplyOpen) -> bool {
        if backing.as_ref().is_some_and(|b| b.id.is_some()) {
            return true;
        }
        let Some(file) = self.engine.get().begin_passthrough() else {
            return false;
        };
        match reply.open_backing(&file) {
            Ok(id) => {
                self.status.active.store(true, Ordering::Relaxed);
                let b = backing.get_or_insert_with(Backing::default);
                b.id = Some(id);
                b.file = Some(file);
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "the kernel refused FUSE passthrough; serving IO ourselves");
                if backing.is_none() {
                    self.engine.get().end_passthrough();
                }
                false
            }
        }
    }

    fn attr(&self, ino: INodeNo) -> Option<FileAttr> {
        let (kind, perm, size, nlink) = match ino {
            INodeNo::ROOT => (FileType::Directory, 0o700, 0, 2),
            IMAGE_INO => (FileType::RegularFile, 0o600, self.engine.get().size(), 1),
            _ => return None,
        };
        Some(FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: self.started,
            mtime: self.started,
            ctime: self.started,
            crtime: self.started,
            kind,
            perm,
            nlink,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        })
    }
}

fn errno(e: &crate::engine::EngineError) -> Errno {
    tracing::warn!(error = %e, "engine error answered to the kernel");
    Errno::from_i32(e.errno())
}

impl Filesystem for ImageFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Both are best effort: the kernel answers with what it can do.
        let _ = config.set_max_write(MAX_IO);
        let _ = config.set_max_readahead(MAX_IO);
        // Without async direct IO every loop request would be a synchronous
        // FUSE round trip on the loop worker: queue depth 1 whatever fio asks.
        if let Err(missing) = config.add_capabilities(InitFlags::FUSE_ASYNC_DIO) {
            tracing::warn!(
                ?missing,
                "the kernel's FUSE lacks async direct IO: expect queue depth 1"
            );
        }
        // The loop device's direct IO arrives as background requests, which
        // the kernel caps at 12 in flight by default: fewer than a volume
        // that waits on replicas has threads.
        let _ = config.set_max_background(MAX_BACKGROUND);
        let _ = config.set_congestion_threshold(MAX_BACKGROUND * 3 / 4);
        if self.passthrough {
            // Depth 2: the data dir may itself be on a stacked fs (overlayfs).
            let granted = config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
                && config.set_max_stack_depth(2).is_ok();
            if !granted {
                tracing::info!("this kernel's FUSE has no passthrough; serving IO ourselves");
                self.passthrough = false;
            }
        }
        self.status
            .granted
            .store(self.passthrough, Ordering::Relaxed);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match (parent, self.attr(IMAGE_INO)) {
            (INodeNo::ROOT, Some(attr)) if name == IMAGE => reply.entry(&TTL, &attr, Generation(0)),
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino) {
            Some(attr) => reply.attr(&TTL, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if ino != IMAGE_INO {
            return reply.error(Errno::EISDIR);
        }
        if self.passthrough {
            let mut backing = self.backing.lock();
            if self.ensure_backing(&mut backing, &reply) {
                let b = backing.as_mut().expect("ensured");
                b.opens += 1;
                let id = b.id.as_ref().expect("ensured");
                // The kernel reads and writes the engine's data file itself.
                return reply.opened_passthrough(PASSTHROUGH_FH, FopenFlags::empty(), id);
            }
        }
        // Direct IO: the loop device above is the only cache; parallel direct
        // writes: the kernel must not serialise writes on the inode lock.
        reply.opened(
            FileHandle(0),
            FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES,
        );
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        if fh == PASSTHROUGH_FH {
            let mut backing = self.backing.lock();
            if let Some(b) = backing.as_mut() {
                b.opens = b.opens.saturating_sub(1);
                if b.opens == 0 {
                    // The last user is gone, so no IO bypasses us any more.
                    *backing = None;
                    self.status.active.store(false, Ordering::Relaxed);
                    self.engine.get().end_passthrough();
                }
            }
        }
        reply.ok()
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        if ino != IMAGE_INO {
            return reply.error(Errno::EISDIR);
        }
        let engine = self.engine.get();
        let end = engine.size();
        let len = (size as u64).min(end.saturating_sub(offset)) as usize;
        READ_BUF.with(|buf| {
            let mut buf = buf.borrow_mut();
            if buf.len() < len {
                buf.resize(len.max(MAX_IO as usize), 0);
            }
            match engine.read_at(&mut buf[..len], offset) {
                Ok(()) => reply.data(&buf[..len]),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if ino != IMAGE_INO {
            return reply.error(Errno::EISDIR);
        }
        // Answered when the engine is done, maybe from another thread (a
        // replicated write: the link's reader), so this thread can take
        // the next request meanwhile.
        let len = data.len() as u32;
        self.engine.get().write_then(
            data,
            offset,
            Box::new(move |res| match res {
                Ok(()) => reply.written(len),
                Err(e) => reply.error(errno(&e)),
            }),
        );
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close(2) of the image: nothing is buffered here, fsync makes durable.
        reply.ok()
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.engine.get().flush() {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        if ino != IMAGE_INO {
            return reply.error(Errno::EISDIR);
        }
        // The loop device turns discard into PUNCH_HOLE and write-zeroes into
        // ZERO_RANGE (or PUNCH_HOLE); both mean "reads as zeros" to a thin image.
        let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        let zero = libc::FALLOC_FL_ZERO_RANGE;
        let ok = mode == punch
            || mode & !libc::FALLOC_FL_KEEP_SIZE == zero
            || mode == 0 && offset.saturating_add(length) <= self.engine.get().size();
        if !ok {
            return reply.error(Errno::EOPNOTSUPP);
        }
        if mode == 0 {
            // Plain allocate within the size: a thin image allocates on write.
            return reply.ok();
        }
        match self.engine.get().discard(offset, length) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if ino != INodeNo::ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        reply.opened(FileHandle(0), FopenFlags::empty())
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino != INodeNo::ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let entries = [
            (INodeNo::ROOT, FileType::Directory, "."),
            (INodeNo::ROOT, FileType::Directory, ".."),
            (IMAGE_INO, FileType::RegularFile, IMAGE),
        ];
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(*ino, (i + 1) as u64, *kind, name) {
                break;
            }
        }
        reply.ok()
    }

    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: ReplyXattr,
    ) {
        // ENOSYS makes the kernel stop asking (e.g. security.capability on every write).
        reply.error(Errno::ENOSYS)
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, _size: u32, reply: ReplyXattr) {
        reply.error(Errno::ENOSYS)
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let blocks = self.engine.get().size() / 4096;
        reply.statfs(blocks, 0, 0, 2, 0, 4096, 255, 4096)
    }
}

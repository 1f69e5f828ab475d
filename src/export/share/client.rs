//! The client side of a shared volume: a FUSE filesystem on a node that
//! does not hold the volume, whose every operation becomes one
//! [`proto::Request`] to the holder, run there on the real filesystem.
//!
//! Consistency is NFS's close-to-open, which is what the kernel's FUSE
//! caching gives with these choices:
//! - opens never set `keep_cache`, so each open drops the file's page cache
//!   and reads what the holder has now (and no `direct_io`: within one
//!   open, reads are cached and writes go through the page cache to us);
//! - names live one second (`ENTRY_TTL`), attributes not at all
//!   (`ATTR_TTL`): a file another node grew must show its new size at once,
//!   or reads would stop at the old one;
//! - no writeback cache: every write reaches the holder before `write(2)`
//!   returns, and is there for the next open on any node.
//!
//! The kernel checks permissions itself (`default_permissions`) against
//! the holder's modes and owners, for any local uid (`allow_other`: the
//! containers using the volume run as whoever they like); creating
//! operations carry the caller's uid and gid so that the holder makes
//! files theirs. Locks (`flock`, `fcntl`) stay local to this node.

use super::proto::{self, Attr, Caller, Reply, Request as Op, SetTime};
use crate::sys::{self, mount};
use fuser::{
    BackgroundSession, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request,
    Session, SessionACL, TimeOrNow, WriteFlags,
};
use std::ffi::OsStr;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How long the kernel may trust a name's entry without asking.
const ENTRY_TTL: Duration = Duration::from_secs(1);
/// Attributes are never trusted: another node may have grown the file,
/// and a read stops at the size the kernel has (close-to-open needs the
/// holder's size at each open).
const ATTR_TTL: Duration = Duration::ZERO;
/// FUSE worker threads per mount: requests wait on the network, so a few
/// run at once (the transport is shared by all of them).
const THREADS: usize = 4;

/// How requests reach the holder (a TCP session in production, a ShareServer in tests).
pub trait Transport: Send + Sync + 'static {
    /// Send `req` and wait for its reply. Err: the session is gone (every later call fails too).
    fn call(&self, req: proto::Request) -> io::Result<Reply>;
    /// Send `req` with no reply expected (Forget).
    fn cast(&self, req: proto::Request) -> io::Result<()>;
}

/// A mounted client; unmounts (lazily if busy) and stops its session on drop, or by `unmount()`.
pub struct ShareMount {
    mount_point: PathBuf,
    session: Option<BackgroundSession>,
    /// Set once the session to the holder failed.
    gone: Arc<AtomicBool>,
}

impl ShareMount {
    /// Mount at `mount_point` (an existing empty directory) a filesystem served by `transport`.
    /// `fsname` is shown in /proc/mounts (e.g. "dunnage:VOLUME@NODE").
    pub fn mount(
        transport: Box<dyn Transport>,
        mount_point: &Path,
        fsname: &str,
    ) -> io::Result<ShareMount> {
        let dev = sys::fuse::open_dev()?;
        sys::fuse::mount_shared(&dev, mount_point, fsname)?;
        let gone = Arc::new(AtomicBool::new(false));
        let fs = ShareFs {
            transport,
            gone: gone.clone(),
        };
        let mut config = Config::default();
        config.acl = SessionACL::All;
        config.n_threads = Some(THREADS);
        // The kernel sent INIT when it mounted: fuser's handshake answers it.
        let session = Session::from_fd(fs, OwnedFd::from(dev), SessionACL::All, config)
            .and_then(Session::spawn);
        match session {
            Ok(session) => Ok(ShareMount {
                mount_point: mount_point.to_path_buf(),
                session: Some(session),
                gone,
            }),
            Err(e) => {
                let _ = mount::unmount(mount_point, true);
                Err(e)
            }
        }
    }

    pub fn mount_point(&self) -> &Path {
        &self.mount_point
    }

    /// Whether the session to the holder still works (as far as known:
    /// it fails at the first request after the holder went).
    pub fn is_alive(&self) -> bool {
        !self.gone.load(Ordering::Relaxed)
    }

    /// Unmount now; an error if it is busy (then nothing changed: callers
    /// may retry, or drop it to detach lazily).
    pub fn unmount(&mut self) -> io::Result<()> {
        match mount::unmount(&self.mount_point, false) {
            Ok(()) => self.join(),
            // Unmounted by someone else, maybe lazily: not waited for.
            Err(e) if not_mounted(&e) => drop(self.session.take()),
            Err(e) => return Err(e),
        }
        Ok(())
    }

    /// Wait for the session's end: the workers see ENODEV once unmounted.
    fn join(&mut self) {
        if let Some(session) = self.session.take() {
            if let Err(e) = session.join() {
                tracing::debug!(error = %e, "shared-volume FUSE session ended with an error");
            }
        }
    }
}

/// EINVAL from umount2: not (or no longer) a mount point.
fn not_mounted(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EINVAL)
}

impl Drop for ShareMount {
    fn drop(&mut self) {
        if self.session.is_none() {
            return;
        }
        match mount::unmount(&self.mount_point, false) {
            Ok(()) => self.join(),
            Err(e) if not_mounted(&e) => {}
            Err(_) => {
                // Busy: detach it; the session ends when its last user lets
                // go, which we do not wait for.
                if let Err(e) = mount::unmount(&self.mount_point, true) {
                    tracing::warn!(mount_point = %self.mount_point.display(), error = %e,
                        "could not unmount a shared volume's client");
                }
            }
        }
        // Still running (detached): it ends with the connection.
        drop(self.session.take());
    }
}

/// The filesystem fuser serves: every operation asks the holder.
struct ShareFs {
    transport: Box<dyn Transport>,
    /// The session to the holder failed once (warned about).
    gone: Arc<AtomicBool>,
}

impl ShareFs {
    fn lost(&self, e: &io::Error) {
        if !self.gone.swap(true, Ordering::Relaxed) {
            tracing::warn!(error = %e, "the session to the shared volume's holder is gone: its files now fail with EIO");
        }
    }

    /// Ask the holder; its errno, or EIO if it cannot be reached.
    fn call(&self, req: Op) -> Result<Reply, Errno> {
        match self.transport.call(req) {
            Ok(Reply::Errno(e)) => Err(Errno::from_i32(e)),
            Ok(reply) => Ok(reply),
            Err(e) => {
                self.lost(&e);
                Err(Errno::EIO)
            }
        }
    }

    /// Ask the holder for a reply of the kind `pick` accepts (else EIO).
    fn expect<T>(&self, req: Op, pick: impl FnOnce(Reply) -> Option<T>) -> Result<T, Errno> {
        pick(self.call(req)?).ok_or_else(unexpected)
    }

    fn entry(&self, req: Op, reply: ReplyEntry) {
        match self.expect(req, |r| match r {
            Reply::Entry(a) => Some(a),
            _ => None,
        }) {
            Ok(a) => reply.entry_with_ttls(&ATTR_TTL, &ENTRY_TTL, &file_attr(&a), Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn attr(&self, req: Op, reply: ReplyAttr) {
        match self.expect(req, |r| match r {
            Reply::Attr(a) => Some(a),
            _ => None,
        }) {
            Ok(a) => reply.attr(&ATTR_TTL, &file_attr(&a)),
            Err(e) => reply.error(e),
        }
    }

    fn done(&self, req: Op, reply: ReplyEmpty) {
        match self.expect(req, |r| matches!(r, Reply::Done).then_some(())) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn opened(&self, req: Op, reply: ReplyOpen) {
        match self.expect(req, |r| match r {
            Reply::Opened { fh } => Some(fh),
            _ => None,
        }) {
            // No keep_cache: the page cache goes at each open (close-to-open).
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn data(&self, req: Op) -> Result<Vec<u8>, Errno> {
        self.expect(req, |r| match r {
            Reply::Data(d) => Some(d),
            _ => None,
        })
    }
}

/// A reply of the wrong kind: EIO.
fn unexpected() -> Errno {
    tracing::warn!("unexpected reply from a shared volume's holder");
    Errno::EIO
}

fn caller(req: &Request) -> Caller {
    Caller {
        uid: req.uid(),
        gid: req.gid(),
    }
}

fn bytes(name: &OsStr) -> Vec<u8> {
    name.as_bytes().to_vec()
}

/// The file type of `st_mode`'s type bits.
fn file_type(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        _ => FileType::RegularFile,
    }
}

/// A timespec (`secs` may be negative, `nanos` adds to it); the epoch if
/// out of range.
fn system_time((secs, nanos): (i64, u32)) -> SystemTime {
    let nanos = Duration::from_nanos(u64::from(nanos.min(999_999_999)));
    let whole = Duration::from_secs(secs.unsigned_abs());
    let t = if secs >= 0 {
        UNIX_EPOCH.checked_add(whole)
    } else {
        UNIX_EPOCH.checked_sub(whole)
    };
    t.and_then(|t| t.checked_add(nanos)).unwrap_or(UNIX_EPOCH)
}

fn file_attr(a: &Attr) -> FileAttr {
    let ctime = system_time(a.ctime);
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.blocks,
        atime: system_time(a.atime),
        mtime: system_time(a.mtime),
        ctime,
        crtime: ctime,
        kind: file_type(a.mode),
        perm: (a.mode & 0o7777) as u16,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: if a.blksize == 0 { 4096 } else { a.blksize },
        flags: 0,
    }
}

fn set_time(t: TimeOrNow) -> SetTime {
    let TimeOrNow::SpecificTime(t) = t else {
        return SetTime::Now;
    };
    let (secs, nanos) = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => (
            i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            d.subsec_nanos(),
        ),
        Err(before) => {
            let d = before.duration();
            let secs = i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
            match d.subsec_nanos() {
                0 => (-secs, 0),
                n => (-secs - 1, 1_000_000_000 - n),
            }
        }
    };
    SetTime::At { secs, nanos }
}

impl Filesystem for ShareFs {
    fn init(&mut self, _: &Request, config: &mut KernelConfig) -> io::Result<()> {
        // Writes of up to one request each; no writeback cache (the default).
        let _ = config.set_max_write(proto::MAX_IO);
        Ok(())
    }

    fn lookup(&self, _: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let (parent, name) = (parent.0, bytes(name));
        self.entry(Op::Lookup { parent, name }, reply);
    }

    // batch_forget: fuser's default calls this for each inode.
    fn forget(&self, _: &Request, ino: INodeNo, n: u64) {
        let ino = ino.0;
        if let Err(e) = self.transport.cast(Op::Forget { ino, n }) {
            self.lost(&e);
        }
    }

    fn getattr(&self, _: &Request, ino: INodeNo, _: Option<FileHandle>, reply: ReplyAttr) {
        self.attr(Op::GetAttr { ino: ino.0 }, reply);
    }

    fn setattr(
        &self,
        _: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let req = Op::SetAttr {
            ino: ino.0,
            fh: fh.map(|f| f.0),
            mode,
            uid,
            gid,
            size,
            atime: atime.map(set_time),
            mtime: mtime.map(set_time),
        };
        self.attr(req, reply);
    }

    fn readlink(&self, _: &Request, ino: INodeNo, reply: ReplyData) {
        match self.data(Op::ReadLink { ino: ino.0 }) {
            Ok(target) => reply.data(&target),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let (parent, name, caller) = (parent.0, bytes(name), caller(req));
        let op = Op::MkNod {
            parent,
            name,
            mode,
            umask,
            rdev,
            caller,
        };
        self.entry(op, reply);
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let (parent, name, caller) = (parent.0, bytes(name), caller(req));
        self.entry(
            Op::MkDir {
                parent,
                name,
                mode,
                umask,
                caller,
            },
            reply,
        );
    }

    fn unlink(&self, _: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let (parent, name) = (parent.0, bytes(name));
        self.done(Op::Unlink { parent, name }, reply);
    }

    fn rmdir(&self, _: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let (parent, name) = (parent.0, bytes(name));
        self.done(Op::RmDir { parent, name }, reply);
    }

    fn symlink(&self, req: &Request, parent: INodeNo, name: &OsStr, to: &Path, reply: ReplyEntry) {
        let (parent, name, caller) = (parent.0, bytes(name), caller(req));
        let target = bytes(to.as_os_str());
        self.entry(
            Op::Symlink {
                parent,
                name,
                target,
                caller,
            },
            reply,
        );
    }

    fn rename(
        &self,
        _: &Request,
        parent: INodeNo,
        name: &OsStr,
        new_parent: INodeNo,
        new_name: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let (parent, name, flags) = (parent.0, bytes(name), flags.bits());
        let (new_parent, new_name) = (new_parent.0, bytes(new_name));
        self.done(
            Op::Rename {
                parent,
                name,
                new_parent,
                new_name,
                flags,
            },
            reply,
        );
    }

    fn link(&self, _: &Request, ino: INodeNo, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let (ino, new_parent, new_name) = (ino.0, parent.0, bytes(name));
        self.entry(
            Op::Link {
                ino,
                new_parent,
                new_name,
            },
            reply,
        );
    }

    fn open(&self, _: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let (ino, flags) = (ino.0, flags.0);
        self.opened(Op::Open { ino, flags }, reply);
    }

    fn read(
        &self,
        _: &Request,
        _: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _: OpenFlags,
        _: Option<LockOwner>,
        reply: ReplyData,
    ) {
        // One request carries MAX_IO at most; a shorter answer is the end.
        let (fh, size) = (fh.0, size as usize);
        let mut data = Vec::new();
        while data.len() < size {
            let want = (size - data.len()).min(proto::MAX_IO as usize);
            let at = offset + data.len() as u64;
            match self.data(Op::Read {
                fh,
                offset: at,
                size: want as u32,
            }) {
                Ok(chunk) => {
                    data.extend_from_slice(&chunk);
                    if chunk.len() < want {
                        break;
                    }
                }
                Err(e) if data.is_empty() => return reply.error(e),
                Err(_) => break,
            }
        }
        data.truncate(size);
        reply.data(&data);
    }

    fn write(
        &self,
        _: &Request,
        _: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _: WriteFlags,
        _: OpenFlags,
        _: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let mut done = 0;
        for chunk in data.chunks(proto::MAX_IO as usize) {
            let (offset, data) = (offset + done as u64, chunk.to_vec());
            let written = self.expect(
                Op::Write {
                    fh: fh.0,
                    offset,
                    data,
                },
                |r| match r {
                    Reply::Written(n) => Some(n as usize),
                    _ => None,
                },
            );
            match written {
                Ok(n) => {
                    done += n.min(chunk.len());
                    if n < chunk.len() {
                        break;
                    }
                }
                Err(e) if done == 0 => return reply.error(e),
                Err(_) => break,
            }
        }
        reply.written(done as u32);
    }

    fn flush(&self, _: &Request, _: INodeNo, _: FileHandle, _: LockOwner, reply: ReplyEmpty) {
        // Writes are on the holder already (no writeback cache).
        reply.ok();
    }

    fn release(
        &self,
        _: &Request,
        _: INodeNo,
        fh: FileHandle,
        _: OpenFlags,
        _: Option<LockOwner>,
        _: bool,
        reply: ReplyEmpty,
    ) {
        self.done(Op::Release { fh: fh.0 }, reply);
    }

    fn fsync(&self, _: &Request, _: INodeNo, fh: FileHandle, datasync: bool, reply: ReplyEmpty) {
        self.done(Op::Fsync { fh: fh.0, datasync }, reply);
    }

    fn opendir(&self, _: &Request, ino: INodeNo, _: OpenFlags, reply: ReplyOpen) {
        self.opened(Op::OpenDir { ino: ino.0 }, reply);
    }

    fn readdir(&self, _: &Request, _: INodeNo, fh: FileHandle, offset: u64, reply: ReplyDirectory) {
        let page = self.expect(Op::ReadDir { fh: fh.0, offset }, |r| match r {
            Reply::Dir(entries) => Some(entries),
            _ => None,
        });
        let mut reply = reply;
        match page {
            Ok(entries) => {
                for e in entries {
                    let (ino, kind) = (INodeNo(e.ino), file_type(e.kind));
                    // Full: the kernel comes back from the last entry added.
                    if reply.add(ino, e.offset, kind, OsStr::from_bytes(&e.name)) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(e),
        }
    }

    fn releasedir(&self, _: &Request, _: INodeNo, fh: FileHandle, _: OpenFlags, reply: ReplyEmpty) {
        self.done(Op::ReleaseDir { fh: fh.0 }, reply);
    }

    fn fsyncdir(&self, _: &Request, _: INodeNo, _: FileHandle, _: bool, reply: ReplyEmpty) {
        // The protocol has no directory fsync: nothing to forward.
        reply.ok();
    }

    fn statfs(&self, _: &Request, _: INodeNo, reply: ReplyStatfs) {
        match self.call(Op::StatFs) {
            Ok(Reply::StatFs {
                blocks,
                bfree,
                bavail,
                files,
                ffree,
                bsize,
                namelen,
                frsize,
            }) => reply.statfs(blocks, bfree, bavail, files, ffree, bsize, namelen, frsize),
            Ok(_) => reply.error(unexpected()),
            Err(e) => reply.error(e),
        }
    }

    // No extended attributes: ENOSYS tells the kernel once for the whole
    // mount (it then answers EOPNOTSUPP / ENODATA itself), without
    // fuser's warning for each call.
    fn getxattr(&self, _: &Request, _: INodeNo, _: &OsStr, _: u32, reply: fuser::ReplyXattr) {
        reply.error(Errno::ENOSYS);
    }

    fn listxattr(&self, _: &Request, _: INodeNo, _: u32, reply: fuser::ReplyXattr) {
        reply.error(Errno::ENOSYS);
    }

    fn setxattr(
        &self,
        _: &Request,
        _: INodeNo,
        _: &OsStr,
        _: &[u8],
        _: i32,
        _: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn removexattr(&self, _: &Request, _: INodeNo, _: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::ENOSYS);
    }

    fn access(&self, _: &Request, _: INodeNo, _: fuser::AccessFlags, reply: ReplyEmpty) {
        // default_permissions: the kernel has checked already.
        reply.ok();
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let (parent, name, caller) = (parent.0, bytes(name), caller(req));
        let op = Op::Create {
            parent,
            name,
            mode,
            umask,
            flags,
            caller,
        };
        let created = self.expect(op, |r| match r {
            Reply::Created { attr, fh } => Some((file_attr(&attr), FileHandle(fh))),
            _ => None,
        });
        match created {
            // No keep_cache, as for an open.
            Ok((attr, fh)) => {
                reply.created(&ATTR_TTL, &attr, Generation(0), fh, FopenFlags::empty())
            }
            Err(e) => reply.error(e),
        }
    }

    fn fallocate(
        &self,
        _: &Request,
        _: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let fh = fh.0;
        self.done(
            Op::Fallocate {
                fh,
                offset,
                length,
                mode,
            },
            reply,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::super::server::ShareServer;
    use super::*;
    use std::fs;
    use std::io::ErrorKind;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    fn attr(ino: u64, mode: u32) -> Attr {
        Attr {
            ino,
            size: 3,
            blocks: 8,
            atime: (1_700_000_000, 5),
            mtime: (1_700_000_001, 999_999_999),
            ctime: (1_700_000_002, 0),
            mode,
            nlink: 1,
            uid: 1000,
            gid: 100,
            rdev: 0,
            blksize: 4096,
        }
    }

    #[test]
    fn attrs_convert_for_a_dir_a_file_and_a_symlink() {
        let d = file_attr(&attr(1, libc::S_IFDIR | 0o1777));
        assert_eq!(
            (d.ino, d.kind, d.perm),
            (INodeNo(1), FileType::Directory, 0o1777)
        );
        let f = file_attr(&attr(7, libc::S_IFREG | 0o4755));
        assert_eq!(
            (f.kind, f.perm, f.size, f.blocks),
            (FileType::RegularFile, 0o4755, 3, 8)
        );
        assert_eq!((f.uid, f.gid, f.nlink, f.blksize), (1000, 100, 1, 4096));
        assert_eq!(
            f.mtime,
            UNIX_EPOCH + Duration::new(1_700_000_001, 999_999_999)
        );
        assert_eq!(f.atime, UNIX_EPOCH + Duration::new(1_700_000_000, 5));
        let l = file_attr(&attr(9, libc::S_IFLNK | 0o777));
        assert_eq!((l.kind, l.perm), (FileType::Symlink, 0o777));
        let c = file_attr(&Attr {
            rdev: 0x0103,
            blksize: 0,
            ..attr(3, libc::S_IFCHR | 0o666)
        });
        assert_eq!(
            (c.kind, c.rdev, c.blksize),
            (FileType::CharDevice, 0x0103, 4096)
        );
    }

    #[test]
    fn odd_times_convert_safely() {
        // -2 s + 0.3 s: 1.7 s before the epoch.
        let t = system_time((-2, 300_000_000));
        assert_eq!(t, UNIX_EPOCH - Duration::from_millis(1700));
        assert_eq!(system_time((-1, 0)), UNIX_EPOCH - Duration::from_secs(1));
        // Out of range or malformed: never a panic.
        let _ = system_time((i64::MIN, 999_999_999));
        let _ = system_time((i64::MAX, u32::MAX));
        assert_eq!(
            system_time((0, u32::MAX)),
            UNIX_EPOCH + Duration::new(0, 999_999_999)
        );
    }

    #[test]
    fn set_times_convert() {
        assert_eq!(set_time(TimeOrNow::Now), SetTime::Now);
        let at = |t| set_time(TimeOrNow::SpecificTime(t));
        assert_eq!(
            at(UNIX_EPOCH + Duration::new(1_700_000_000, 42)),
            SetTime::At {
                secs: 1_700_000_000,
                nanos: 42
            }
        );
        assert_eq!(
            at(UNIX_EPOCH - Duration::from_millis(1700)),
            SetTime::At {
                secs: -2,
                nanos: 300_000_000
            }
        );
        assert_eq!(
            at(UNIX_EPOCH - Duration::from_secs(5)),
            SetTime::At { secs: -5, nanos: 0 }
        );
        // Round trip through the attribute conversion.
        let t = UNIX_EPOCH - Duration::new(3, 1);
        let SetTime::At { secs, nanos } = at(t) else {
            panic!()
        };
        assert_eq!(system_time((secs, nanos)), t);
    }

    /// A holder serving a root directory that holds "hello" ("hi\n").
    struct Fake;

    const HELLO: &[u8] = b"hi\n";

    impl Transport for Fake {
        fn call(&self, req: Op) -> io::Result<Reply> {
            use Op as R;
            let root = Attr {
                size: 4096,
                nlink: 2,
                ..attr(1, libc::S_IFDIR | 0o755)
            };
            let hello = Attr {
                size: HELLO.len() as u64,
                ..attr(2, libc::S_IFREG | 0o644)
            };
            let entry = |ino, kind, name: &str| proto::DirEntry {
                ino,
                offset: ino,
                kind,
                name: name.into(),
            };
            Ok(match req {
                R::Lookup { parent: 1, name } if name == b"hello" => Reply::Entry(hello),
                R::Lookup { .. } => Reply::Errno(libc::ENOENT),
                R::GetAttr { ino: 1 } => Reply::Attr(root),
                R::GetAttr { ino: 2 } => Reply::Attr(hello),
                R::Open { ino: 2, .. } => Reply::Opened { fh: 10 },
                R::Read {
                    fh: 10,
                    offset,
                    size,
                } => {
                    let from = (offset as usize).min(HELLO.len());
                    let to = (from + size as usize).min(HELLO.len());
                    Reply::Data(HELLO[from..to].to_vec())
                }
                R::Release { fh: 10 } | R::ReleaseDir { fh: 20 } => Reply::Done,
                R::OpenDir { ino: 1 } => Reply::Opened { fh: 20 },
                R::ReadDir { fh: 20, offset } => Reply::Dir(
                    [
                        entry(1, libc::S_IFDIR, "."),
                        entry(1, libc::S_IFDIR, ".."),
                        entry(2, libc::S_IFREG, "hello"),
                    ]
                    .into_iter()
                    .enumerate()
                    .map(|(i, e)| proto::DirEntry {
                        offset: i as u64 + 1,
                        ..e
                    })
                    .skip(offset as usize)
                    .collect(),
                ),
                R::StatFs => Reply::StatFs {
                    blocks: 100,
                    bfree: 50,
                    bavail: 40,
                    files: 10,
                    ffree: 8,
                    bsize: 4096,
                    namelen: 255,
                    frsize: 4096,
                },
                _ => Reply::Errno(libc::ENOSYS),
            })
        }

        fn cast(&self, _req: Op) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_mounted_client_lists_and_reads_the_holders_files() {
        let dir = tempfile::tempdir().unwrap();
        let mnt = dir.path().canonicalize().unwrap();
        let mut share = ShareMount::mount(Box::new(Fake), &mnt, "dunnage:test@here").unwrap();
        assert_eq!(share.mount_point(), mnt);
        assert!(mount::is_mount_point(&mnt));

        let names: Vec<_> = fs::read_dir(&mnt)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, ["hello"]);
        assert_eq!(fs::read_to_string(mnt.join("hello")).unwrap(), "hi\n");
        let meta = fs::metadata(mnt.join("hello")).unwrap();
        assert_eq!(meta.len(), 3);
        let err = fs::metadata(mnt.join("nope")).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound);
        let err = fs::create_dir(mnt.join("new")).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOSYS));
        let st = nix::sys::statvfs::statvfs(&mnt).unwrap();
        assert_eq!((st.blocks(), st.blocks_available()), (100, 40));

        // Busy: nothing changes, and the mount comes back.
        let open = fs::File::open(mnt.join("hello")).unwrap();
        let e = share.unmount().unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EBUSY));
        assert!(mount::is_mount_point(&mnt));
        drop(open);
        share.unmount().unwrap();
        assert!(!mount::is_mount_point(&mnt));
    }

    /// The real holder's side, run in process.
    struct Local(parking_lot::Mutex<ShareServer>);

    impl Transport for Local {
        fn call(&self, req: proto::Request) -> io::Result<Reply> {
            Ok(self.0.lock().handle(req).unwrap_or(Reply::Done))
        }
        fn cast(&self, req: proto::Request) -> io::Result<()> {
            self.0.lock().handle(req);
            Ok(())
        }
    }

    #[test]
    fn a_client_works_on_the_holders_tree() {
        let (held, dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let mnt = dir.path().canonicalize().unwrap();
        let server = Local(parking_lot::Mutex::new(
            ShareServer::new(held.path()).unwrap(),
        ));
        let share = ShareMount::mount(Box::new(server), &mnt, "t").unwrap();
        let (m, h) = (|p: &str| mnt.join(p), |p: &str| held.path().join(p));

        // Several requests each way (MAX_IO apiece).
        let big: Vec<u8> = (0..3_000_000u32).map(|i| (i ^ (i >> 12)) as u8).collect();
        fs::write(m("big"), &big).unwrap();
        assert_eq!(fs::read(h("big")).unwrap(), big);
        assert_eq!(fs::read(m("big")).unwrap(), big);
        // More entries than a page of the holder's, or of the kernel's.
        fs::create_dir(m("d")).unwrap();
        for i in 0..1200 {
            fs::write(m(&format!("d/a-rather-long-file-name-{i:05}")), b"x").unwrap();
        }
        assert_eq!(fs::read_dir(m("d")).unwrap().count(), 1200);
        fs::rename(m("d/a-rather-long-file-name-00000"), m("moved")).unwrap();
        assert_eq!(fs::read_dir(h("d")).unwrap().count(), 1199);
        std::os::unix::fs::symlink("moved", m("ln")).unwrap();
        assert_eq!(fs::read_link(m("ln")).unwrap(), Path::new("moved"));
        assert_eq!(fs::read_to_string(m("ln")).unwrap(), "x");
        fs::hard_link(m("moved"), m("hard")).unwrap();
        assert_eq!(fs::metadata(m("hard")).unwrap().nlink(), 2);
        fs::set_permissions(m("moved"), fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(fs::metadata(h("moved")).unwrap().mode() & 0o7777, 0o600);
        let f = fs::File::options().write(true).open(m("big")).unwrap();
        f.set_len(10).unwrap();
        let t = UNIX_EPOCH + Duration::new(1_000_000, 5);
        f.set_modified(t).unwrap();
        f.sync_all().unwrap();
        drop(f);
        assert_eq!(fs::metadata(m("big")).unwrap().len(), 10);
        assert_eq!(fs::metadata(h("big")).unwrap().modified().unwrap(), t);
        fs::remove_file(m("hard")).unwrap();
        fs::remove_dir(m("d")).unwrap_err();
        fs::remove_dir_all(m("d")).unwrap();
        assert!(!h("d").exists());
        assert!(nix::sys::statvfs::statvfs(&mnt).unwrap().blocks() > 0);

        // Dropped while busy: detached at once, still served for its user.
        let mut open = fs::File::open(m("moved")).unwrap();
        drop(share);
        assert!(!mount::is_mount_point(&mnt));
        let mut text = String::new();
        io::Read::read_to_string(&mut open, &mut text).unwrap();
        assert_eq!(text, "x");
    }
}

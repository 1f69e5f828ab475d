//! The holder's side of a shared volume: runs one client session's
//! [`Request`]s against the mounted filesystem, as virtiofsd's passthrough
//! filesystem does.
//!
//! Every inode the client knows is held open `O_PATH`, so its number stays
//! bound to the same file across renames, and the file's inode cannot be
//! reused while the client may still name it. Operations go through those
//! descriptors (`*at()` calls on a single checked name, or
//! `/proc/self/fd/N` where a call takes no `O_PATH` descriptor): no client
//! path is resolved from the root and no symlink is followed, so a client
//! cannot reach outside the tree. We run as root; what a client creates is
//! chowned to its caller, with the caller's umask applied here.

use super::proto::{Attr, Caller, DirEntry, Reply, Request, SetTime, DIR_PAGE, MAX_IO};
use nix::errno::Errno;
use nix::fcntl::{self, AtFlags, FallocateFlags, OFlag, RenameFlags, AT_FDCWD};
use nix::sys::stat::{self, FchmodatFlags, FileStat, Mode, SFlag, UtimensatFlags};
use nix::sys::statvfs::fstatvfs;
use nix::sys::time::TimeSpec;
use nix::sys::uio::{pread, pwrite};
use nix::unistd::{self, Gid, Uid, UnlinkatFlags};
use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{DirEntryExt, FileTypeExt};
use std::path::Path;

const ROOT: u64 = 1;
/// How every inode is held.
const PATH_FLAGS: OFlag = OFlag::O_PATH
    .union(OFlag::O_NOFOLLOW)
    .union(OFlag::O_CLOEXEC);
/// Open flags never passed on: creation is Create's, the client's kernel
/// already did O_DIRECT's work (and our buffers are not aligned), and the
/// client already resolved the path.
const DROPPED_FLAGS: OFlag = OFlag::O_CREAT
    .union(OFlag::O_EXCL)
    .union(OFlag::O_NOCTTY)
    .union(OFlag::O_DIRECT)
    .union(OFlag::O_NOFOLLOW);

type Res<T> = Result<T, Errno>;

struct Node {
    fd: OwnedFd,
    /// `st_dev`, `st_ino` of the real file.
    dev: u64,
    ino: u64,
    /// Lookups the client's kernel holds (it Forgets them).
    lookups: u64,
}

/// One client session's view of the tree at its root.
pub struct ShareServer {
    nodes: HashMap<u64, Node>,
    by_file: HashMap<(u64, u64), u64>,
    next_ino: u64,
    files: HashMap<u64, OwnedFd>,
    dirs: HashMap<u64, Vec<DirEntry>>,
    next_fh: u64,
}

impl ShareServer {
    /// Serve the tree at `root` (a directory).
    pub fn new(root: &Path) -> io::Result<ShareServer> {
        let flags = OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
        let fd = fcntl::open(root, flags, Mode::empty())?;
        let st = stat_of(&fd)?;
        let root = Node {
            fd,
            dev: st.st_dev,
            ino: st.st_ino,
            lookups: 1,
        };
        Ok(ShareServer {
            by_file: HashMap::from([((root.dev, root.ino), ROOT)]),
            nodes: HashMap::from([(ROOT, root)]),
            next_ino: ROOT + 1,
            files: HashMap::new(),
            dirs: HashMap::new(),
            next_fh: 1,
        })
    }

    /// Run one request; `None` for `Request::Forget` (no reply is sent for it).
    pub fn handle(&mut self, req: Request) -> Option<Reply> {
        let forget = matches!(req, Request::Forget { .. });
        let reply = self.run(req).unwrap_or_else(|e| Reply::Errno(e as i32));
        (!forget).then_some(reply)
    }

    fn run(&mut self, req: Request) -> Res<Reply> {
        Ok(match req {
            Request::Forget { ino, n } => {
                self.forget(ino, n);
                Reply::Done
            }
            Request::Lookup { parent, name } => Reply::Entry(self.lookup(parent, &name)?),
            Request::GetAttr { ino } => Reply::Attr(self.getattr(ino)?),
            Request::SetAttr {
                ino,
                fh,
                mode,
                uid,
                gid,
                size,
                atime,
                mtime,
            } => {
                let node = self.node(ino)?;
                let is_link = stat_of(&node.fd)?.st_mode & libc::S_IFMT == libc::S_IFLNK;
                // A symlink has no mode of its own to set.
                if let (Some(mode), false) = (mode, is_link) {
                    chmod(&node.fd, mode)?;
                }
                if uid.is_some() || gid.is_some() {
                    let (uid, gid) = (uid.map(Uid::from_raw), gid.map(Gid::from_raw));
                    unistd::fchownat(&node.fd, "", uid, gid, AtFlags::AT_EMPTY_PATH)?;
                }
                if let Some(size) = size {
                    let len = off(size)?;
                    match fh {
                        Some(fh) => unistd::ftruncate(self.file(fh)?, len)?,
                        None => {
                            let flags = OFlag::O_WRONLY | OFlag::O_CLOEXEC;
                            let file =
                                fcntl::open(proc_path(&node.fd).as_str(), flags, Mode::empty())?;
                            unistd::ftruncate(&file, len)?;
                        }
                    }
                }
                // Times of a symlink itself are not worth a workaround: skipped.
                if (atime.is_some() || mtime.is_some()) && !is_link {
                    stat::utimensat(
                        AT_FDCWD,
                        proc_path(&node.fd).as_str(),
                        &timespec(atime),
                        &timespec(mtime),
                        UtimensatFlags::FollowSymlink,
                    )?;
                }
                Reply::Attr(self.getattr(ino)?)
            }
            Request::ReadLink { ino } => {
                let target = fcntl::readlinkat(&self.node(ino)?.fd, "")?;
                Reply::Data(target.into_vec())
            }
            Request::MkNod {
                parent,
                name,
                mode,
                umask,
                rdev,
                caller,
            } => {
                let perm = mode & !umask & 0o7777;
                let kind = SFlag::from_bits_retain(mode & libc::S_IFMT);
                // Device nodes would be the holder's devices, opened as root.
                if kind == SFlag::S_IFBLK || kind == SFlag::S_IFCHR {
                    return Err(Errno::EPERM);
                }
                let name = new_name(&name)?;
                let pfd = &self.node(parent)?.fd;
                stat::mknodat(pfd, name, kind, Mode::from_bits_retain(perm), rdev.into())?;
                Reply::Entry(self.made(parent, name, caller, Some(perm))?)
            }
            Request::MkDir {
                parent,
                name,
                mode,
                umask,
                caller,
            } => {
                let perm = mode & !umask & 0o7777;
                let name = new_name(&name)?;
                stat::mkdirat(&self.node(parent)?.fd, name, Mode::from_bits_retain(perm))?;
                Reply::Entry(self.made(parent, name, caller, Some(perm))?)
            }
            Request::Unlink { parent, name } => {
                let pfd = &self.node(parent)?.fd;
                unistd::unlinkat(pfd, check_name(&name)?, UnlinkatFlags::NoRemoveDir)?;
                Reply::Done
            }
            Request::RmDir { parent, name } => {
                let pfd = &self.node(parent)?.fd;
                unistd::unlinkat(pfd, check_name(&name)?, UnlinkatFlags::RemoveDir)?;
                Reply::Done
            }
            Request::Symlink {
                parent,
                name,
                target,
                caller,
            } => {
                let name = new_name(&name)?;
                unistd::symlinkat(&target[..], &self.node(parent)?.fd, name)?;
                Reply::Entry(self.made(parent, name, caller, None)?)
            }
            Request::Rename {
                parent,
                name,
                new_parent,
                new_name,
                flags,
            } => {
                let (name, new_name) = (check_name(&name)?, check_name(&new_name)?);
                let (from, to) = (&self.node(parent)?.fd, &self.node(new_parent)?.fd);
                let flags = RenameFlags::from_bits_retain(flags);
                fcntl::renameat2(from, name, to, new_name, flags)?;
                Reply::Done
            }
            Request::Link {
                ino,
                new_parent,
                new_name: name,
            } => {
                let name = new_name(&name)?;
                let src = proc_path(&self.node(ino)?.fd);
                let pfd = &self.node(new_parent)?.fd;
                unistd::linkat(
                    AT_FDCWD,
                    src.as_str(),
                    pfd,
                    name,
                    AtFlags::AT_SYMLINK_FOLLOW,
                )?;
                let fd = fcntl::openat(pfd, name, PATH_FLAGS, Mode::empty())?;
                Reply::Entry(self.adopt(fd)?)
            }
            Request::Open { ino, flags } => {
                let flags = (OFlag::from_bits_retain(flags) - DROPPED_FLAGS) | OFlag::O_CLOEXEC;
                let node = self.node(ino)?;
                // The kernel opens only files and directories through FUSE;
                // a FIFO would block this session, a device is not ours.
                let kind = stat_of(&node.fd)?.st_mode & libc::S_IFMT;
                if kind != libc::S_IFREG && kind != libc::S_IFDIR {
                    return Err(Errno::EACCES);
                }
                let path = proc_path(&node.fd);
                let file = fcntl::open(path.as_str(), flags, Mode::empty())?;
                Reply::Opened {
                    fh: self.add_file(file),
                }
            }
            Request::Create {
                parent,
                name,
                mode,
                umask,
                flags,
                caller,
            } => self.create(parent, &name, mode & !umask & 0o7777, flags, caller)?,
            Request::Read { fh, offset, size } => {
                let file = self.file(fh)?;
                let mut buf = vec![0u8; size.min(MAX_IO) as usize];
                let mut done = 0;
                while done < buf.len() {
                    match pread(
                        file,
                        &mut buf[done..],
                        off(offset.saturating_add(done as u64))?,
                    ) {
                        Ok(0) => break,
                        Ok(n) => done += n,
                        Err(Errno::EINTR) => {}
                        Err(e) => return Err(e),
                    }
                }
                buf.truncate(done);
                Reply::Data(buf)
            }
            Request::Write { fh, offset, data } => {
                let file = self.file(fh)?;
                let len = u32::try_from(data.len()).map_err(|_| Errno::EINVAL)?;
                let mut done = 0;
                while done < data.len() {
                    match pwrite(
                        file,
                        &data[done..],
                        off(offset.saturating_add(done as u64))?,
                    ) {
                        Ok(0) => return Err(Errno::EIO),
                        Ok(n) => done += n,
                        Err(Errno::EINTR) => {}
                        Err(e) => return Err(e),
                    }
                }
                Reply::Written(len)
            }
            Request::Fsync { fh, datasync } => {
                let file = self.file(fh)?;
                if datasync {
                    unistd::fdatasync(file)?;
                } else {
                    unistd::fsync(file)?;
                }
                Reply::Done
            }
            Request::Fallocate {
                fh,
                offset,
                length,
                mode,
            } => {
                let mode = FallocateFlags::from_bits_retain(mode);
                fcntl::fallocate(self.file(fh)?, mode, off(offset)?, off(length)?)?;
                Reply::Done
            }
            Request::Release { fh } => {
                self.files.remove(&fh).ok_or(Errno::EBADF)?;
                Reply::Done
            }
            Request::OpenDir { ino } => {
                let list = self.list(ino)?;
                let fh = self.next_fh;
                self.next_fh += 1;
                self.dirs.insert(fh, list);
                Reply::Opened { fh }
            }
            Request::ReadDir { fh, offset } => {
                let list = self.dirs.get(&fh).ok_or(Errno::EBADF)?;
                let start = usize::try_from(offset)
                    .unwrap_or(usize::MAX)
                    .min(list.len());
                Reply::Dir(list[start..].iter().take(DIR_PAGE).cloned().collect())
            }
            Request::ReleaseDir { fh } => {
                self.dirs.remove(&fh).ok_or(Errno::EBADF)?;
                Reply::Done
            }
            Request::StatFs => {
                let st = fstatvfs(&self.node(ROOT)?.fd)?;
                Reply::StatFs {
                    blocks: st.blocks(),
                    bfree: st.blocks_free(),
                    bavail: st.blocks_available(),
                    files: st.files(),
                    ffree: st.files_free(),
                    bsize: st.block_size() as u32,
                    namelen: st.name_max() as u32,
                    frsize: st.fragment_size() as u32,
                }
            }
        })
    }

    fn node(&self, ino: u64) -> Res<&Node> {
        self.nodes.get(&ino).ok_or(Errno::ESTALE)
    }

    fn file(&self, fh: u64) -> Res<&OwnedFd> {
        self.files.get(&fh).ok_or(Errno::EBADF)
    }

    fn add_file(&mut self, file: OwnedFd) -> u64 {
        let fh = self.next_fh;
        self.next_fh += 1;
        self.files.insert(fh, file);
        fh
    }

    fn getattr(&self, ino: u64) -> Res<Attr> {
        Ok(attr(ino, &stat_of(&self.node(ino)?.fd)?))
    }

    fn lookup(&mut self, parent: u64, name: &[u8]) -> Res<Attr> {
        let name = check_name(name)?;
        if name == b"." || (name == b".." && parent == ROOT) {
            let attr = self.getattr(parent)?;
            self.count(parent);
            return Ok(attr);
        }
        let fd = fcntl::openat(&self.node(parent)?.fd, name, PATH_FLAGS, Mode::empty())?;
        self.adopt(fd)
    }

    /// Number a file the client is told about (one lookup more), or find
    /// the number it already has.
    fn adopt(&mut self, fd: OwnedFd) -> Res<Attr> {
        let st = stat_of(&fd)?;
        if let Some(&ino) = self.by_file.get(&(st.st_dev, st.st_ino)) {
            self.count(ino);
            return Ok(attr(ino, &st));
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        self.by_file.insert((st.st_dev, st.st_ino), ino);
        self.nodes.insert(
            ino,
            Node {
                fd,
                dev: st.st_dev,
                ino: st.st_ino,
                lookups: 1,
            },
        );
        Ok(attr(ino, &st))
    }

    fn count(&mut self, ino: u64) {
        if let Some(node) = self.nodes.get_mut(&ino) {
            node.lookups = node.lookups.saturating_add(1);
        }
    }

    fn forget(&mut self, ino: u64, n: u64) {
        let Some(node) = self.nodes.get_mut(&ino) else {
            return;
        };
        node.lookups = node.lookups.saturating_sub(n);
        if node.lookups == 0 && ino != ROOT {
            if let Some(node) = self.nodes.remove(&ino) {
                self.by_file.remove(&(node.dev, node.ino));
            }
        }
    }

    /// Hand a just-made entry of `parent` to its caller and adopt it.
    fn made(&mut self, parent: u64, name: &[u8], caller: Caller, perm: Option<u32>) -> Res<Attr> {
        let pfd = &self.node(parent)?.fd;
        let fd = fcntl::openat(pfd, name, PATH_FLAGS, Mode::empty())?;
        give(&fd, &stat_of(pfd)?, caller, perm)?;
        self.adopt(fd)
    }

    fn create(
        &mut self,
        parent: u64,
        name: &[u8],
        perm: u32,
        flags: i32,
        caller: Caller,
    ) -> Res<Reply> {
        let name = new_name(name)?;
        let pfd = &self.node(parent)?.fd;
        let pst = stat_of(pfd)?;
        let flags = OFlag::from_bits_retain(flags);
        let excl = flags.contains(OFlag::O_EXCL);
        let flags = (flags - DROPPED_FLAGS) | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        // O_EXCL always: a file someone else made meanwhile is opened, not
        // given to this caller.
        let new = flags | OFlag::O_CREAT | OFlag::O_EXCL;
        let (file, fresh) = match fcntl::openat(pfd, name, new, Mode::from_bits_retain(perm)) {
            Ok(file) => (file, true),
            Err(Errno::EEXIST) if !excl => (open_existing(pfd, name, flags, caller)?, false),
            Err(e) => return Err(e),
        };
        // Following the magic link (no O_NOFOLLOW) reaches the file itself.
        let flags = OFlag::O_PATH | OFlag::O_CLOEXEC;
        let fd = fcntl::open(proc_path(&file).as_str(), flags, Mode::empty())?;
        if fresh {
            give(&fd, &pst, caller, Some(perm))?;
        }
        let attr = self.adopt(fd)?;
        let fh = self.add_file(file);
        Ok(Reply::Created { attr, fh })
    }

    /// The whole of a directory, "." and ".." included.
    fn list(&self, ino: u64) -> Res<Vec<DirEntry>> {
        let fd = &self.node(ino)?.fd;
        let parent = stat::fstatat(fd, "..", AtFlags::AT_SYMLINK_NOFOLLOW)?;
        let mut list = Vec::new();
        let mut push = |ino, kind, name: &[u8]| {
            let offset = list.len() as u64 + 1;
            list.push(DirEntry {
                ino,
                offset,
                kind,
                name: name.to_vec(),
            })
        };
        push(stat_of(fd)?.st_ino, libc::S_IFDIR, b".");
        push(parent.st_ino, libc::S_IFDIR, b"..");
        for entry in std::fs::read_dir(proc_path(fd)).map_err(errno)? {
            let entry = entry.map_err(errno)?;
            // Gone since it was listed: still listed, of no known type.
            let kind = entry.file_type().map_or(0, kind_of);
            push(entry.ino(), kind, entry.file_name().as_bytes());
        }
        Ok(list)
    }
}

/// Make a new entry its caller's, with mode bits exactly `perm` (`None`:
/// a symlink, which has none).
fn give(fd: &OwnedFd, parent: &FileStat, caller: Caller, perm: Option<u32>) -> Res<()> {
    // A set-group-ID directory gives its own group, as the kernel would.
    let gid = (parent.st_mode & libc::S_ISGID == 0).then_some(Gid::from_raw(caller.gid));
    unistd::fchownat(
        fd,
        "",
        Some(Uid::from_raw(caller.uid)),
        gid,
        AtFlags::AT_EMPTY_PATH,
    )?;
    if let Some(perm) = perm {
        // Our process umask was applied too; chown may have cleared set-ID bits.
        let st = stat_of(fd)?;
        let mut want = perm;
        if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
            want |= st.st_mode & libc::S_ISGID;
        }
        if st.st_mode & 0o7777 != want {
            chmod(fd, want)?;
        }
    }
    Ok(())
}

fn check_name(name: &[u8]) -> Res<&[u8]> {
    if name.is_empty() || name.contains(&b'/') || name.contains(&0) {
        return Err(Errno::EINVAL);
    }
    Ok(name)
}

/// A name to create.
fn new_name(name: &[u8]) -> Res<&[u8]> {
    match check_name(name)? {
        b"." | b".." => Err(Errno::EEXIST),
        name => Ok(name),
    }
}

/// The path that reaches `fd`'s file for calls that take no `O_PATH` fd.
fn proc_path(fd: &OwnedFd) -> String {
    format!("/proc/self/fd/{}", fd.as_raw_fd())
}

fn stat_of(fd: &OwnedFd) -> Res<FileStat> {
    stat::fstatat(
        fd,
        "",
        AtFlags::AT_EMPTY_PATH | AtFlags::AT_SYMLINK_NOFOLLOW,
    )
}

fn chmod(fd: &OwnedFd, mode: u32) -> Res<()> {
    let mode = Mode::from_bits_retain(mode & 0o7777);
    stat::fchmodat(
        AT_FDCWD,
        proc_path(fd).as_str(),
        mode,
        FchmodatFlags::FollowSymlink,
    )
}

fn off(offset: u64) -> Res<i64> {
    i64::try_from(offset).map_err(|_| Errno::EINVAL)
}

fn timespec(t: Option<SetTime>) -> TimeSpec {
    match t {
        None => TimeSpec::UTIME_OMIT,
        Some(SetTime::Now) => TimeSpec::UTIME_NOW,
        Some(SetTime::At { secs, nanos }) => TimeSpec::new(secs, nanos.into()),
    }
}

fn kind_of(t: std::fs::FileType) -> u32 {
    match () {
        _ if t.is_dir() => libc::S_IFDIR,
        _ if t.is_file() => libc::S_IFREG,
        _ if t.is_symlink() => libc::S_IFLNK,
        _ if t.is_fifo() => libc::S_IFIFO,
        _ if t.is_char_device() => libc::S_IFCHR,
        _ if t.is_block_device() => libc::S_IFBLK,
        _ if t.is_socket() => libc::S_IFSOCK,
        _ => 0,
    }
}

fn errno(e: io::Error) -> Errno {
    Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))
}

fn attr(ino: u64, st: &FileStat) -> Attr {
    Attr {
        ino,
        size: st.st_size as u64,
        blocks: st.st_blocks as u64,
        atime: (st.st_atime, st.st_atime_nsec as u32),
        mtime: (st.st_mtime, st.st_mtime_nsec as u32),
        ctime: (st.st_ctime, st.st_ctime_nsec as u32),
        mode: st.st_mode,
        nlink: st.st_nlink as u32,
        uid: st.st_uid,
        gid: st.st_gid,
        // Truncation is the kernel's 32-bit device encoding.
        rdev: st.st_rdev as u32,
        blksize: st.st_blksize as u32,
    }
}

/// Open the file that took `name` between the client's lookup and its
/// create (another node made it): only a regular file (never blocking on
/// a FIFO, never a device), and only if its owner, group or others' bits
/// let the caller open it so (the client's kernel checked nothing: it
/// thought the name free). Supplementary groups are not known here.
fn open_existing(pfd: &OwnedFd, name: &[u8], flags: OFlag, caller: Caller) -> Res<OwnedFd> {
    let file = fcntl::openat(pfd, name, flags | OFlag::O_NONBLOCK, Mode::empty())?;
    let st = stat_of(&file)?;
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(Errno::EEXIST);
    }
    let want = match flags & OFlag::O_ACCMODE {
        OFlag::O_RDONLY => 0o4,
        OFlag::O_WRONLY => 0o2,
        _ => 0o6,
    } | if flags.contains(OFlag::O_TRUNC) {
        0o2
    } else {
        0
    };
    let granted = if caller.uid == 0 {
        0o7
    } else if caller.uid == st.st_uid {
        (st.st_mode >> 6) & 0o7
    } else if caller.gid == st.st_gid {
        (st.st_mode >> 3) & 0o7
    } else {
        st.st_mode & 0o7
    };
    if granted & want != want {
        return Err(Errno::EACCES);
    }
    // Back to the caller's blocking mode.
    fcntl::fcntl(
        &file,
        fcntl::FcntlArg::F_SETFL(flags - OFlag::O_ACCMODE - OFlag::O_CLOEXEC),
    )?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    const ROOT_CALLER: Caller = Caller { uid: 0, gid: 0 };

    fn server() -> (tempfile::TempDir, ShareServer) {
        let dir = tempfile::tempdir().unwrap();
        let server = ShareServer::new(dir.path()).unwrap();
        (dir, server)
    }

    fn call(s: &mut ShareServer, req: Request) -> Reply {
        s.handle(req).expect("a reply")
    }

    fn entry(s: &mut ShareServer, req: Request) -> Attr {
        match call(s, req) {
            Reply::Entry(a) => a,
            other => panic!("expected an entry, got {other:?}"),
        }
    }

    fn lookup(s: &mut ShareServer, parent: u64, name: &str) -> Reply {
        let name = name.as_bytes().to_vec();
        call(s, Request::Lookup { parent, name })
    }

    fn create(s: &mut ShareServer, parent: u64, name: &str, caller: Caller) -> (Attr, u64) {
        let req = Request::Create {
            parent,
            name: name.as_bytes().to_vec(),
            mode: libc::S_IFREG | 0o666,
            umask: 0o026,
            flags: libc::O_RDWR,
            caller,
        };
        match call(s, req) {
            Reply::Created { attr, fh } => (attr, fh),
            other => panic!("expected Created, got {other:?}"),
        }
    }

    fn mkdir(s: &mut ShareServer, parent: u64, name: &str, mode: u32, umask: u32) -> Attr {
        let name = name.as_bytes().to_vec();
        let caller = ROOT_CALLER;
        entry(
            s,
            Request::MkDir {
                parent,
                name,
                mode,
                umask,
                caller,
            },
        )
    }

    fn getattr(s: &mut ShareServer, ino: u64) -> Reply {
        call(s, Request::GetAttr { ino })
    }

    #[test]
    fn created_file_is_written_read_back_synced_and_released() {
        let (dir, mut s) = server();
        let (attr, fh) = create(&mut s, ROOT, "f", ROOT_CALLER);
        assert_ne!(attr.ino, ROOT);
        assert_eq!(attr.mode & libc::S_IFMT, libc::S_IFREG);
        let write = |offset, data: &[u8]| Request::Write {
            fh,
            offset,
            data: data.to_vec(),
        };
        assert_eq!(call(&mut s, write(0, b"hello")), Reply::Written(5));
        assert_eq!(call(&mut s, write(5, b" world")), Reply::Written(6));
        let read = |offset, size| Request::Read { fh, offset, size };
        assert_eq!(
            call(&mut s, read(0, 100)),
            Reply::Data(b"hello world".to_vec())
        );
        assert_eq!(call(&mut s, read(6, 5)), Reply::Data(b"world".to_vec()));
        assert_eq!(call(&mut s, read(50, 5)), Reply::Data(Vec::new()));
        for datasync in [false, true] {
            assert_eq!(call(&mut s, Request::Fsync { fh, datasync }), Reply::Done);
        }
        let alloc = Request::Fallocate {
            fh,
            offset: 0,
            length: 8192,
            mode: 0,
        };
        assert_eq!(call(&mut s, alloc), Reply::Done);
        assert_eq!(fs::metadata(dir.path().join("f")).unwrap().len(), 8192);
        assert_eq!(
            &fs::read(dir.path().join("f")).unwrap()[..11],
            b"hello world"
        );
        assert_eq!(call(&mut s, Request::Release { fh }), Reply::Done);
        assert_eq!(call(&mut s, read(0, 5)), Reply::Errno(libc::EBADF));
    }

    #[test]
    fn lookups_share_one_number_until_forgotten() {
        let (dir, mut s) = server();
        fs::write(dir.path().join("f"), b"abc").unwrap();
        let a = entry(
            &mut s,
            Request::Lookup {
                parent: ROOT,
                name: b"f".to_vec(),
            },
        );
        let b = entry(
            &mut s,
            Request::Lookup {
                parent: ROOT,
                name: b"f".to_vec(),
            },
        );
        assert_eq!(a.ino, b.ino);
        assert_ne!(a.ino, ROOT);
        assert_eq!(a.size, 3);
        assert_eq!(s.handle(Request::Forget { ino: a.ino, n: 1 }), None);
        assert!(matches!(getattr(&mut s, a.ino), Reply::Attr(at) if at.ino == a.ino));
        assert_eq!(s.handle(Request::Forget { ino: a.ino, n: 1 }), None);
        assert_eq!(getattr(&mut s, a.ino), Reply::Errno(libc::ESTALE));
        let c = entry(
            &mut s,
            Request::Lookup {
                parent: ROOT,
                name: b"f".to_vec(),
            },
        );
        assert!(c.ino > a.ino, "{} after {}", c.ino, a.ino);
        // The root is never dropped.
        assert_eq!(s.handle(Request::Forget { ino: ROOT, n: 1000 }), None);
        assert!(matches!(getattr(&mut s, ROOT), Reply::Attr(at) if at.ino == ROOT));
        assert_eq!(lookup(&mut s, ROOT, "missing"), Reply::Errno(libc::ENOENT));
    }

    #[test]
    fn directories_list_dot_entries_and_page() {
        let (dir, mut s) = server();
        let d = mkdir(&mut s, ROOT, "d", 0o755, 0);
        assert_eq!(d.mode & libc::S_IFMT, libc::S_IFDIR);
        let count = DIR_PAGE + 10;
        for i in 0..count {
            fs::write(dir.path().join("d").join(format!("f{i}")), b"").unwrap();
        }
        let Reply::Opened { fh } = call(&mut s, Request::OpenDir { ino: d.ino }) else {
            panic!("OpenDir failed");
        };
        let mut all = Vec::new();
        let mut offset = 0;
        loop {
            let Reply::Dir(page) = call(&mut s, Request::ReadDir { fh, offset }) else {
                panic!("ReadDir failed");
            };
            assert!(page.len() <= DIR_PAGE);
            let Some(last) = page.last() else { break };
            offset = last.offset;
            all.extend(page);
        }
        assert_eq!(all.len(), count + 2);
        let names: Vec<_> = all
            .iter()
            .map(|e| String::from_utf8(e.name.clone()).unwrap())
            .collect();
        assert!(names.contains(&".".to_string()) && names.contains(&"..".to_string()));
        for i in 0..count {
            assert!(names.contains(&format!("f{i}")), "f{i} missing");
        }
        for e in &all {
            let want = if e.name.starts_with(b".") {
                libc::S_IFDIR
            } else {
                libc::S_IFREG
            };
            assert_eq!(e.kind, want, "{:?}", e.name);
        }
        assert_eq!(call(&mut s, Request::ReleaseDir { fh }), Reply::Done);
        assert_eq!(
            call(&mut s, Request::ReadDir { fh, offset: 0 }),
            Reply::Errno(libc::EBADF)
        );
    }

    #[test]
    fn rename_noreplace_refuses_and_plain_rename_moves() {
        let (dir, mut s) = server();
        fs::write(dir.path().join("a"), b"A").unwrap();
        fs::write(dir.path().join("b"), b"B").unwrap();
        let a = entry(
            &mut s,
            Request::Lookup {
                parent: ROOT,
                name: b"a".to_vec(),
            },
        );
        let rename = |new_name: &[u8], flags| Request::Rename {
            parent: ROOT,
            name: b"a".to_vec(),
            new_parent: ROOT,
            new_name: new_name.to_vec(),
            flags,
        };
        let noreplace = RenameFlags::RENAME_NOREPLACE.bits();
        assert_eq!(
            call(&mut s, rename(b"b", noreplace)),
            Reply::Errno(libc::EEXIST)
        );
        assert_eq!(fs::read(dir.path().join("b")).unwrap(), b"B");
        assert_eq!(call(&mut s, rename(b"c", 0)), Reply::Done);
        assert!(!dir.path().join("a").exists());
        assert_eq!(fs::read(dir.path().join("c")).unwrap(), b"A");
        // The number follows the file.
        let c = entry(
            &mut s,
            Request::Lookup {
                parent: ROOT,
                name: b"c".to_vec(),
            },
        );
        assert_eq!(c.ino, a.ino);
    }

    #[test]
    fn unlink_removes_and_rmdir_refuses_a_full_directory() {
        let (dir, mut s) = server();
        let d = mkdir(&mut s, ROOT, "d", 0o755, 0);
        fs::write(dir.path().join("d/x"), b"").unwrap();
        let rmdir = || Request::RmDir {
            parent: ROOT,
            name: b"d".to_vec(),
        };
        assert_eq!(call(&mut s, rmdir()), Reply::Errno(libc::ENOTEMPTY));
        let unlink = Request::Unlink {
            parent: d.ino,
            name: b"x".to_vec(),
        };
        assert_eq!(call(&mut s, unlink), Reply::Done);
        assert_eq!(lookup(&mut s, d.ino, "x"), Reply::Errno(libc::ENOENT));
        assert_eq!(call(&mut s, rmdir()), Reply::Done);
        assert!(!dir.path().join("d").exists());
    }

    #[test]
    fn symlink_is_made_for_its_caller_and_read_back() {
        let (dir, mut s) = server();
        let caller = Caller {
            uid: 1000,
            gid: 1001,
        };
        let req = Request::Symlink {
            parent: ROOT,
            name: b"l".to_vec(),
            target: b"some/where".to_vec(),
            caller,
        };
        let l = entry(&mut s, req);
        assert_eq!(l.mode & libc::S_IFMT, libc::S_IFLNK);
        assert_eq!((l.uid, l.gid), (1000, 1001));
        let meta = fs::symlink_metadata(dir.path().join("l")).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (1000, 1001));
        assert_eq!(
            call(&mut s, Request::ReadLink { ino: l.ino }),
            Reply::Data(b"some/where".to_vec())
        );
        // Lookups never follow it.
        assert_eq!(
            entry(
                &mut s,
                Request::Lookup {
                    parent: ROOT,
                    name: b"l".to_vec()
                }
            )
            .ino,
            l.ino
        );
    }

    #[test]
    fn link_shares_the_number_and_counts_two_links() {
        let (dir, mut s) = server();
        let (f, fh) = create(&mut s, ROOT, "f", ROOT_CALLER);
        call(&mut s, Request::Release { fh });
        assert_eq!(f.nlink, 1);
        let req = Request::Link {
            ino: f.ino,
            new_parent: ROOT,
            new_name: b"g".to_vec(),
        };
        let g = entry(&mut s, req);
        assert_eq!((g.ino, g.nlink), (f.ino, 2));
        assert_eq!(fs::metadata(dir.path().join("g")).unwrap().nlink(), 2);
        assert_eq!(
            entry(
                &mut s,
                Request::Lookup {
                    parent: ROOT,
                    name: b"g".to_vec()
                }
            )
            .ino,
            f.ino
        );
    }

    #[test]
    fn setattr_truncates_chmods_chowns_and_sets_times() {
        let (dir, mut s) = server();
        let path = dir.path().join("f");
        fs::write(&path, [7u8; 100]).unwrap();
        let f = entry(
            &mut s,
            Request::Lookup {
                parent: ROOT,
                name: b"f".to_vec(),
            },
        );
        let req = Request::SetAttr {
            ino: f.ino,
            fh: None,
            mode: Some(libc::S_IFREG | 0o600),
            uid: Some(1234),
            gid: None,
            size: Some(10),
            atime: Some(SetTime::Now),
            mtime: Some(SetTime::At {
                secs: 1_000_000,
                nanos: 5,
            }),
        };
        let Reply::Attr(a) = call(&mut s, req) else {
            panic!("SetAttr failed")
        };
        assert_eq!(a.ino, f.ino);
        assert_eq!(
            (a.size, a.mode & 0o7777, a.uid, a.gid),
            (10, 0o600, 1234, 0)
        );
        assert_eq!(a.mtime, (1_000_000, 5));
        assert!(a.atime.0 > 1_000_000);
        let meta = fs::metadata(&path).unwrap();
        assert_eq!(
            (meta.len(), meta.mode() & 0o7777, meta.uid()),
            (10, 0o600, 1234)
        );
        assert_eq!((meta.mtime(), meta.mtime_nsec()), (1_000_000, 5));

        // Through an open handle.
        let Reply::Opened { fh } = call(
            &mut s,
            Request::Open {
                ino: f.ino,
                flags: libc::O_RDWR,
            },
        ) else {
            panic!("Open failed");
        };
        let req = Request::SetAttr {
            ino: f.ino,
            fh: Some(fh),
            mode: None,
            uid: None,
            gid: None,
            size: Some(3),
            atime: None,
            mtime: None,
        };
        assert!(
            matches!(call(&mut s, req), Reply::Attr(a) if a.size == 3 && a.mtime.0 != 1_000_000)
        );
        assert_eq!(fs::metadata(&path).unwrap().len(), 3);
    }

    #[test]
    fn creations_belong_to_the_caller_with_the_umask_applied() {
        let (dir, mut s) = server();
        let caller = Caller {
            uid: 1000,
            gid: 1000,
        };
        let (a, fh) = create(&mut s, ROOT, "f", caller);
        assert_eq!((a.uid, a.gid, a.mode & 0o7777), (1000, 1000, 0o640));
        let meta = fs::metadata(dir.path().join("f")).unwrap();
        assert_eq!(
            (meta.uid(), meta.gid(), meta.mode() & 0o7777),
            (1000, 1000, 0o640)
        );
        assert_eq!(call(&mut s, Request::Release { fh }), Reply::Done);

        // Exactly the mode asked for, whatever our own umask.
        let d = mkdir(&mut s, ROOT, "d", 0o777, 0);
        assert_eq!(d.mode & 0o7777, 0o777);
        let meta = fs::metadata(dir.path().join("d")).unwrap();
        assert_eq!(meta.permissions().mode() & 0o7777, 0o777);
        let req = Request::MkNod {
            parent: d.ino,
            name: b"p".to_vec(),
            mode: libc::S_IFIFO | 0o666,
            umask: 0o002,
            rdev: 0,
            caller,
        };
        let p = entry(&mut s, req);
        assert_eq!((p.mode, p.uid, p.gid), (libc::S_IFIFO | 0o664, 1000, 1000));

        // Creating an existing name without O_EXCL opens it, leaving it be.
        fs::write(dir.path().join("mine"), b"x").unwrap();
        fs::set_permissions(dir.path().join("mine"), fs::Permissions::from_mode(0o666)).unwrap();
        let (m, _) = create(&mut s, ROOT, "mine", caller);
        assert_eq!((m.uid, m.size), (0, 1));
        let excl = Request::Create {
            parent: ROOT,
            name: b"mine".to_vec(),
            mode: 0o644,
            umask: 0,
            flags: libc::O_RDWR | libc::O_EXCL,
            caller,
        };
        assert_eq!(call(&mut s, excl), Reply::Errno(libc::EEXIST));
    }

    #[test]
    fn bad_names_are_refused() {
        let (_dir, mut s) = server();
        assert_eq!(lookup(&mut s, ROOT, "a/b"), Reply::Errno(libc::EINVAL));
        assert_eq!(lookup(&mut s, ROOT, ""), Reply::Errno(libc::EINVAL));
        assert_eq!(lookup(&mut s, ROOT, "a\0b"), Reply::Errno(libc::EINVAL));
        let mk = |name: &[u8]| Request::MkDir {
            parent: ROOT,
            name: name.to_vec(),
            mode: 0o755,
            umask: 0,
            caller: ROOT_CALLER,
        };
        assert_eq!(call(&mut s, mk(b"../x")), Reply::Errno(libc::EINVAL));
        assert_eq!(call(&mut s, mk(b".")), Reply::Errno(libc::EEXIST));
        assert_eq!(call(&mut s, mk(b"..")), Reply::Errno(libc::EEXIST));
        let unlink = Request::Unlink {
            parent: ROOT,
            name: b"/etc/passwd".to_vec(),
        };
        assert_eq!(call(&mut s, unlink), Reply::Errno(libc::EINVAL));
    }

    #[test]
    fn dot_dot_never_leaves_the_root() {
        let (_dir, mut s) = server();
        for name in [".", ".."] {
            assert!(
                matches!(lookup(&mut s, ROOT, name), Reply::Entry(a) if a.ino == ROOT),
                "{name}"
            );
        }
        let d = mkdir(&mut s, ROOT, "d", 0o755, 0);
        let e = mkdir(&mut s, d.ino, "e", 0o755, 0);
        assert!(matches!(lookup(&mut s, e.ino, ".."), Reply::Entry(a) if a.ino == d.ino));
        assert!(matches!(lookup(&mut s, d.ino, "."), Reply::Entry(a) if a.ino == d.ino));
        assert!(matches!(lookup(&mut s, d.ino, ".."), Reply::Entry(a) if a.ino == ROOT));
    }

    #[test]
    fn statfs_reports_the_filesystem() {
        let (_dir, mut s) = server();
        let Reply::StatFs {
            blocks,
            bsize,
            namelen,
            ..
        } = call(&mut s, Request::StatFs)
        else {
            panic!("StatFs failed");
        };
        assert!(blocks > 0 && bsize > 0 && namelen > 0);
    }

    #[test]
    fn open_drops_o_direct() {
        let (dir, mut s) = server();
        fs::write(dir.path().join("f"), b"0123456789").unwrap();
        let f = entry(
            &mut s,
            Request::Lookup {
                parent: ROOT,
                name: b"f".to_vec(),
            },
        );
        let open = Request::Open {
            ino: f.ino,
            flags: libc::O_RDWR | libc::O_DIRECT,
        };
        let Reply::Opened { fh } = call(&mut s, open) else {
            panic!("Open failed")
        };
        // Unaligned: O_DIRECT would refuse it.
        assert_eq!(
            call(
                &mut s,
                Request::Read {
                    fh,
                    offset: 1,
                    size: 3
                }
            ),
            Reply::Data(b"123".to_vec())
        );
        let write = Request::Write {
            fh,
            offset: 3,
            data: b"x".to_vec(),
        };
        assert_eq!(call(&mut s, write), Reply::Written(1));
        assert_eq!(fs::read(dir.path().join("f")).unwrap(), b"012x456789");
    }

    #[test]
    fn unknown_handles_and_inodes_are_errors() {
        let (_dir, mut s) = server();
        let ebadf = Reply::Errno(libc::EBADF);
        assert_eq!(
            call(
                &mut s,
                Request::Read {
                    fh: 999,
                    offset: 0,
                    size: 1
                }
            ),
            ebadf
        );
        assert_eq!(
            call(
                &mut s,
                Request::Write {
                    fh: 999,
                    offset: 0,
                    data: vec![1]
                }
            ),
            ebadf
        );
        assert_eq!(
            call(
                &mut s,
                Request::Fsync {
                    fh: 999,
                    datasync: false
                }
            ),
            ebadf
        );
        assert_eq!(call(&mut s, Request::Release { fh: 999 }), ebadf);
        assert_eq!(call(&mut s, Request::ReadDir { fh: 999, offset: 0 }), ebadf);
        assert_eq!(call(&mut s, Request::ReleaseDir { fh: 999 }), ebadf);
        assert_eq!(getattr(&mut s, 999), Reply::Errno(libc::ESTALE));
        assert_eq!(lookup(&mut s, 999, "x"), Reply::Errno(libc::ESTALE));
        assert_eq!(
            call(&mut s, Request::OpenDir { ino: 999 }),
            Reply::Errno(libc::ESTALE)
        );
        let (f, fh) = create(&mut s, ROOT, "f", ROOT_CALLER);
        // Offsets past what a file can hold are refused, not overflowed.
        let read = Request::Read {
            fh,
            offset: u64::MAX,
            size: 10,
        };
        assert_eq!(call(&mut s, read), Reply::Errno(libc::EINVAL));
        let write = Request::Write {
            fh,
            offset: u64::MAX - 1,
            data: vec![1; 4],
        };
        assert_eq!(call(&mut s, write), Reply::Errno(libc::EINVAL));
        let req = Request::SetAttr {
            ino: f.ino,
            fh: Some(999),
            mode: None,
            uid: None,
            gid: None,
            size: Some(0),
            atime: None,
            mtime: None,
        };
        assert_eq!(call(&mut s, req), ebadf);
        assert_eq!(s.handle(Request::Forget { ino: 999, n: 1 }), None);
    }

    /// What a client must not get the holder to do as root: open a FIFO
    /// (the session would block), make or open a device, or open through
    /// Create a file that another node put in place which the caller may
    /// not open so.
    #[test]
    fn special_files_and_others_files_are_refused() {
        let (dir, mut s) = server();
        let caller = Caller {
            uid: 1000,
            gid: 1000,
        };
        nix::unistd::mkfifo(&dir.path().join("fifo"), Mode::from_bits_retain(0o666)).unwrap();
        let Reply::Entry(f) = lookup(&mut s, ROOT, "fifo") else {
            panic!("no fifo")
        };
        let open = |ino, flags| Request::Open { ino, flags };
        assert_eq!(
            call(&mut s, open(f.ino, libc::O_RDONLY)),
            Reply::Errno(libc::EACCES)
        );
        let dev = Request::MkNod {
            parent: ROOT,
            name: b"sda".to_vec(),
            mode: libc::S_IFBLK | 0o666,
            umask: 0,
            rdev: libc::makedev(8, 0) as u32,
            caller: ROOT_CALLER,
        };
        assert_eq!(call(&mut s, dev), Reply::Errno(libc::EPERM));
        assert!(!dir.path().join("sda").exists());
        let create_as = |name: &str, who: Caller, flags| Request::Create {
            parent: ROOT,
            name: name.as_bytes().to_vec(),
            mode: libc::S_IFREG | 0o644,
            umask: 0,
            flags,
            caller: who,
        };
        // A FIFO where a file was to be created: refused, not opened.
        let req = create_as("fifo", caller, libc::O_RDWR);
        assert_eq!(call(&mut s, req), Reply::Errno(libc::EEXIST));
        // Root's file, 0600: not for uid 1000, fine for root.
        fs::write(dir.path().join("secret"), b"s").unwrap();
        fs::set_permissions(dir.path().join("secret"), fs::Permissions::from_mode(0o600)).unwrap();
        let req = create_as("secret", caller, libc::O_RDONLY);
        assert_eq!(call(&mut s, req), Reply::Errno(libc::EACCES));
        let req = create_as("secret", ROOT_CALLER, libc::O_RDWR);
        assert!(matches!(call(&mut s, req), Reply::Created { .. }));
        // Readable by others: uid 1000 may read it, not write it.
        fs::set_permissions(dir.path().join("secret"), fs::Permissions::from_mode(0o644)).unwrap();
        let req = create_as("secret", caller, libc::O_RDONLY);
        assert!(matches!(call(&mut s, req), Reply::Created { .. }));
        let req = create_as("secret", caller, libc::O_WRONLY);
        assert_eq!(call(&mut s, req), Reply::Errno(libc::EACCES));
    }
}

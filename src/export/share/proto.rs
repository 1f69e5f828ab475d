//! What a shared volume's clients and its holder say to each other: one
//! [`Request`] and one [`Reply`] per FUSE operation, postcard-encoded,
//! each in a frame of its own (`u32` length, little-endian, then the
//! bytes). Inode numbers and handles are the holder's, valid for one
//! session (one connection); 1 is the volume's root directory.

use serde::{Deserialize, Serialize};
use std::io::{self, Read, Write};

/// Largest frame either side accepts: a read or write of up to 1 MiB
/// plus its header, or a big directory listing page.
pub const MAX_FRAME: usize = 2 << 20;
/// Largest read or write one request carries (the client mounts with
/// this as its `max_write`).
pub const MAX_IO: u32 = 1 << 20;
/// Directory entries per [`Reply::Dir`] page.
pub const DIR_PAGE: usize = 512;

/// A time as `utimensat(2)` takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SetTime {
    Now,
    At { secs: i64, nanos: u32 },
}

/// The fields of `stat(2)` that FUSE hands on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Attr {
    pub ino: u64,
    pub size: u64,
    pub blocks: u64,
    pub atime: (i64, u32),
    pub mtime: (i64, u32),
    pub ctime: (i64, u32),
    /// `st_mode`: file type bits and permissions.
    pub mode: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
    pub blksize: u32,
}

/// One directory entry; `offset` is where the next page starts after it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEntry {
    pub ino: u64,
    pub offset: u64,
    /// `st_mode`'s file type bits (`S_IFDIR`, ...).
    pub kind: u32,
    pub name: Vec<u8>,
}

/// The caller of a creating operation, so that what it makes is its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    Lookup {
        parent: u64,
        name: Vec<u8>,
    },
    /// The kernel dropped `n` lookups of `ino`: no reply.
    Forget {
        ino: u64,
        n: u64,
    },
    GetAttr {
        ino: u64,
    },
    SetAttr {
        ino: u64,
        /// An open handle, when the kernel gave one (ftruncate).
        fh: Option<u64>,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<SetTime>,
        mtime: Option<SetTime>,
    },
    ReadLink {
        ino: u64,
    },
    MkNod {
        parent: u64,
        name: Vec<u8>,
        mode: u32,
        umask: u32,
        rdev: u32,
        caller: Caller,
    },
    MkDir {
        parent: u64,
        name: Vec<u8>,
        mode: u32,
        umask: u32,
        caller: Caller,
    },
    Unlink {
        parent: u64,
        name: Vec<u8>,
    },
    RmDir {
        parent: u64,
        name: Vec<u8>,
    },
    Symlink {
        parent: u64,
        name: Vec<u8>,
        target: Vec<u8>,
        caller: Caller,
    },
    /// `renameat2(2)`; `flags` as it takes them (RENAME_NOREPLACE, ...).
    Rename {
        parent: u64,
        name: Vec<u8>,
        new_parent: u64,
        new_name: Vec<u8>,
        flags: u32,
    },
    Link {
        ino: u64,
        new_parent: u64,
        new_name: Vec<u8>,
    },
    /// `flags` as open(2) takes them (never O_CREAT: that is Create).
    Open {
        ino: u64,
        flags: i32,
    },
    Create {
        parent: u64,
        name: Vec<u8>,
        mode: u32,
        umask: u32,
        flags: i32,
        caller: Caller,
    },
    Read {
        fh: u64,
        offset: u64,
        size: u32,
    },
    Write {
        fh: u64,
        offset: u64,
        data: Vec<u8>,
    },
    Fsync {
        fh: u64,
        datasync: bool,
    },
    Fallocate {
        fh: u64,
        offset: u64,
        length: u64,
        mode: i32,
    },
    Release {
        fh: u64,
    },
    OpenDir {
        ino: u64,
    },
    /// Up to [`DIR_PAGE`] entries of an open directory from `offset`
    /// (0: the start; else an entry's `offset`).
    ReadDir {
        fh: u64,
        offset: u64,
    },
    ReleaseDir {
        fh: u64,
    },
    StatFs,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// Lookup, MkNod, MkDir, Symlink, Link: the entry now known by `attr.ino`.
    Entry(Attr),
    /// GetAttr, SetAttr.
    Attr(Attr),
    /// ReadLink, Read (shorter than asked at the end of the file).
    Data(Vec<u8>),
    /// Write: bytes written.
    Written(u32),
    /// Open, OpenDir.
    Opened {
        fh: u64,
    },
    Created {
        attr: Attr,
        fh: u64,
    },
    /// ReadDir: empty at the end.
    Dir(Vec<DirEntry>),
    StatFs {
        blocks: u64,
        bfree: u64,
        bavail: u64,
        files: u64,
        ffree: u64,
        bsize: u32,
        namelen: u32,
        frsize: u32,
    },
    /// Unlink, RmDir, Rename, Fsync, Fallocate, Release, ReleaseDir.
    Done,
    /// The operation failed with this errno.
    Errno(i32),
}

/// Write one message as a frame.
pub fn send<T: Serialize>(w: &mut impl Write, msg: &T) -> io::Result<()> {
    let body = postcard::to_stdvec(msg).map_err(|e| io::Error::other(e.to_string()))?;
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
    frame.extend_from_slice(&body);
    w.write_all(&frame)
}

/// Read one frame's message; `UnexpectedEof` when the peer closed between
/// frames.
pub fn recv<T: for<'de> Deserialize<'de>>(r: &mut impl Read) -> io::Result<T> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("shared-volume frame of {len} bytes (at most {MAX_FRAME})"),
        ));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    postcard::from_bytes(&body).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("malformed shared-volume message: {e}"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_survive_a_round_trip_and_garbage_is_refused() {
        let req = Request::Write {
            fh: 7,
            offset: 1 << 40,
            data: vec![0xab; 70_000],
        };
        let mut buf = Vec::new();
        send(&mut buf, &req).unwrap();
        send(&mut buf, &Reply::Errno(libc::ENOENT)).unwrap();
        let mut r = &buf[..];
        assert_eq!(recv::<Request>(&mut r).unwrap(), req);
        assert_eq!(recv::<Reply>(&mut r).unwrap(), Reply::Errno(libc::ENOENT));
        assert_eq!(
            recv::<Reply>(&mut r).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );

        let huge = ((MAX_FRAME + 1) as u32).to_le_bytes();
        let err = recv::<Request>(&mut &huge[..]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        let junk = [3u8, 0, 0, 0, 0xff, 0xff, 0xff];
        let err = recv::<Request>(&mut &junk[..]).unwrap_err();
        assert!(err.to_string().contains("malformed"), "{err}");
    }
}

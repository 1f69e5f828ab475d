//! The raw FUSE plumbing that fuser does not cover: mounting on a
//! `/dev/fuse` fd we own (so the fd can outlive the daemon), resuming a
//! connection whose INIT another process answered, and asking the kernel to
//! resend the requests a dead daemon had read but not answered.

use nix::mount::MsFlags;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// `FUSE_INIT` opcode.
const FUSE_INIT: u32 = 26;
/// `FUSE_NOTIFY_RESEND` notify code (Linux 6.9, protocol 7.40).
const FUSE_NOTIFY_RESEND: i32 = 7;
/// Protocol version of the synthetic INIT: the one fuser speaks.
const PROTO_MINOR: u32 = 40;
/// `sizeof(struct fuse_in_header)` + `sizeof(struct fuse_init_in)`.
const INIT_LEN: usize = 40 + 64;

/// Open `/dev/fuse` (close-on-exec, so mkfs and friends never inherit it).
pub fn open_dev() -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/fuse")
}

/// Mount a FUSE filesystem served through `dev` at `target`. Only root (the
/// mounting user) may use it: the kernel then checks permissions itself.
pub fn mount(dev: &File, target: &Path, fsname: &str, subtype: &str) -> io::Result<()> {
    let data = format!("fd={},rootmode=40000,user_id=0,group_id=0", dev.as_raw_fd());
    nix::mount::mount(
        Some(fsname),
        target,
        Some(format!("fuse.{subtype}").as_str()),
        MsFlags::MS_NODEV | MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some(data.as_str()),
    )
    .map_err(io::Error::from)
}

/// Mount a shared volume's client filesystem served through `dev` at
/// `target`. Anyone may use it (containers run as any uid): the kernel
/// checks permissions against the holder's modes (`default_permissions`).
/// Unlike [`mount`], executables on it may run.
pub fn mount_shared(dev: &File, target: &Path, fsname: &str) -> io::Result<()> {
    let data = format!(
        "fd={},rootmode=40000,user_id=0,group_id=0,default_permissions,allow_other,max_read=1048576",
        dev.as_raw_fd()
    );
    nix::mount::mount(
        Some(fsname),
        target,
        Some("fuse.dunnage-share"),
        MsFlags::MS_NODEV | MsFlags::MS_NOSUID,
        Some(data.as_str()),
    )
    .map_err(io::Error::from)
}

/// The bytes of a FUSE_INIT request as the kernel would send it, offering
/// `flags` (fuser's `InitFlags` bits, 64 of them: the high half goes in
/// `flags2` with `FUSE_INIT_EXT` set by the caller).
pub fn synthetic_init(flags: u64, max_readahead: u32) -> Vec<u8> {
    let mut b = Vec::with_capacity(INIT_LEN);
    // struct fuse_in_header
    b.extend_from_slice(&(INIT_LEN as u32).to_ne_bytes());
    b.extend_from_slice(&FUSE_INIT.to_ne_bytes());
    b.extend_from_slice(&1u64.to_ne_bytes()); // unique
    b.extend_from_slice(&0u64.to_ne_bytes()); // nodeid
    b.extend_from_slice(&[0u8; 16]); // uid, gid, pid, total_extlen + padding
                                     // struct fuse_init_in
    b.extend_from_slice(&7u32.to_ne_bytes());
    b.extend_from_slice(&PROTO_MINOR.to_ne_bytes());
    b.extend_from_slice(&max_readahead.to_ne_bytes());
    b.extend_from_slice(&(flags as u32).to_ne_bytes());
    b.extend_from_slice(&((flags >> 32) as u32).to_ne_bytes());
    b.extend_from_slice(&[0u8; 44]); // unused[11]
    debug_assert_eq!(b.len(), INIT_LEN);
    b
}

/// A socket pair standing in for `/dev/fuse` during a handshake: fuser
/// reads the INIT written to the peer and answers it there.
pub fn handshake_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(io::Error::from)
}

/// Make file descriptor `slot` refer to `dev` from now on (dup2): fuser
/// keeps reading and writing `slot`, which now is the live connection.
///
/// # Safety contract (checked by the caller)
/// `slot` is an open descriptor owned by a fuser `Session` that is not
/// running yet, so no thread uses it while it is replaced.
pub fn swap_in(dev: &File, slot: i32) -> io::Result<()> {
    // SAFETY: dup2 on two valid descriptors; it atomically closes `slot` and
    // makes it a duplicate of `dev`. `slot` stays owned by fuser's Session
    // (which closes it exactly once); nobody else reads or writes it
    // meanwhile (caller's contract), so no IO can hit the closed file.
    let rc = unsafe { libc::dup2(dev.as_raw_fd(), slot) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Ask the kernel to queue again every request that was read from this
/// connection but never answered (the daemon that read it died).
/// Linux 6.9+; older kernels answer ENOSYS/EINVAL.
pub fn notify_resend(mut dev: &File) -> io::Result<()> {
    let mut msg = Vec::with_capacity(16);
    msg.extend_from_slice(&16u32.to_ne_bytes()); // fuse_out_header.len
    msg.extend_from_slice(&FUSE_NOTIFY_RESEND.to_ne_bytes()); // .error = notify code
    msg.extend_from_slice(&0u64.to_ne_bytes()); // .unique = 0: a notification
    let n = dev.write(&msg)?;
    if n != msg.len() {
        return Err(io::Error::other("short write of FUSE_NOTIFY_RESEND"));
    }
    Ok(())
}

/// Abort a FUSE connection whose server will never come back: every
/// pending and future request fails with ENOTCONN instead of hanging.
/// Found through the mount table: a stat of the mount itself would hang.
pub fn abort_connection(mount_point: &Path) -> io::Result<()> {
    let entry = super::mount::mounts_under(mount_point)
        .into_iter()
        .find(|m| m.mount_point == mount_point)
        .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
    let minor = entry
        .dev
        .split_once(':')
        .map(|(_, m)| m)
        .ok_or_else(|| io::Error::other(format!("odd device {:?} in mountinfo", entry.dev)))?;
    let abort = format!("{FUSECTL}/{minor}/abort");
    match std::fs::write(&abort, "1") {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            // Many hosts never mount the FUSE control filesystem. One
            // mount of it, even when two volumes are abandoned at once.
            static MOUNTING: std::sync::Mutex<()> = std::sync::Mutex::new(());
            let _one = MOUNTING.lock().unwrap_or_else(|p| p.into_inner());
            if super::mount::is_mount_point(Path::new(FUSECTL)) {
                return std::fs::write(&abort, "1");
            }
            nix::mount::mount(
                Some("fusectl"),
                FUSECTL,
                Some("fusectl"),
                MsFlags::empty(),
                None::<&str>,
            )
            .map_err(io::Error::from)?;
            std::fs::write(&abort, "1")
        }
        r => r,
    }
}

/// Where the kernel's FUSE control filesystem lists the connections.
const FUSECTL: &str = "/sys/fs/fuse/connections";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_init_has_the_kernel_layout() {
        let b = synthetic_init(0x1234_5678_9abc_def0, 1 << 20);
        assert_eq!(b.len(), INIT_LEN);
        assert_eq!(u32::from_ne_bytes(b[0..4].try_into().unwrap()), 104);
        assert_eq!(u32::from_ne_bytes(b[4..8].try_into().unwrap()), FUSE_INIT);
        assert_eq!(u32::from_ne_bytes(b[40..44].try_into().unwrap()), 7);
        assert_eq!(u32::from_ne_bytes(b[48..52].try_into().unwrap()), 1 << 20);
        assert_eq!(
            u32::from_ne_bytes(b[52..56].try_into().unwrap()),
            0x9abc_def0
        );
        assert_eq!(
            u32::from_ne_bytes(b[56..60].try_into().unwrap()),
            0x1234_5678
        );
    }
}

//! Loop devices through their ioctls (`LOOP_CTL_GET_FREE`, `LOOP_CONFIGURE`,
//! `LOOP_CLR_FD`), so that attach is one atomic configure with direct IO and
//! the logical block size set, instead of losetup's several steps.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LOOP_CLR_FD: libc::c_ulong = 0x4C01;
const LOOP_SET_CAPACITY: libc::c_ulong = 0x4C07;
const LO_FLAGS_AUTOCLEAR: u32 = 4;
const LO_FLAGS_DIRECT_IO: u32 = 16;
const LO_NAME_SIZE: usize = 64;

/// `struct loop_info64` from linux/loop.h.
#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; LO_NAME_SIZE],
    lo_crypt_name: [u8; LO_NAME_SIZE],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

/// `struct loop_config` from linux/loop.h.
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

/// An attached loop device. Dropping it does not detach: call [`LoopDevice::detach`].
/// It is configured with autoclear, so the kernel also detaches it when the last
/// opener goes away (a crashed daemon's devices free themselves once unmounted).
#[derive(Debug)]
pub struct LoopDevice {
    path: PathBuf,
    file: File,
}

impl LoopDevice {
    /// Attach `backing` to a free loop device with direct IO and `block_size`
    /// logical sectors.
    pub fn attach(backing: &Path, block_size: u32, direct_io: bool) -> io::Result<LoopDevice> {
        let mut open = OpenOptions::new();
        open.read(true).write(true);
        if direct_io {
            open.custom_flags(libc::O_DIRECT);
        }
        let backing_file = open.open(backing)?;
        let control = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/loop-control")?;
        // Another process may take the free device between GET_FREE and
        // CONFIGURE; the kernel then answers EBUSY and we ask again.
        for _ in 0..32 {
            // SAFETY: LOOP_CTL_GET_FREE takes no argument and only returns an int.
            let n = unsafe { libc::ioctl(control.as_raw_fd(), LOOP_CTL_GET_FREE) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let path = PathBuf::from(format!("/dev/loop{n}"));
            let dev = match OpenOptions::new().read(true).write(true).open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            let mut name = [0u8; LO_NAME_SIZE];
            let bytes = backing.as_os_str().as_encoded_bytes();
            let len = bytes.len().min(LO_NAME_SIZE - 1);
            name[..len].copy_from_slice(&bytes[..len]);
            let config = LoopConfig {
                fd: backing_file.as_raw_fd() as u32,
                block_size,
                info: LoopInfo64 {
                    lo_device: 0,
                    lo_inode: 0,
                    lo_rdevice: 0,
                    lo_offset: 0,
                    lo_sizelimit: 0,
                    lo_number: 0,
                    lo_encrypt_type: 0,
                    lo_encrypt_key_size: 0,
                    lo_flags: LO_FLAGS_AUTOCLEAR | if direct_io { LO_FLAGS_DIRECT_IO } else { 0 },
                    lo_file_name: name,
                    lo_crypt_name: [0; LO_NAME_SIZE],
                    lo_encrypt_key: [0; 32],
                    lo_init: [0; 2],
                },
                reserved: [0; 8],
            };
            // SAFETY: `config` is a fully initialised `struct loop_config` that
            // lives across the call; the kernel only reads it.
            let rc = unsafe {
                libc::ioctl(
                    dev.as_raw_fd(),
                    LOOP_CONFIGURE,
                    &config as *const LoopConfig,
                )
            };
            if rc == 0 {
                return Ok(LoopDevice { path, file: dev });
            }
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EBUSY) {
                return Err(err);
            }
        }
        Err(io::Error::other("no free loop device after 32 tries"))
    }

    /// A device attached by an earlier run, through a descriptor of it that
    /// survived that run (held by the FUSE keeper).
    pub fn adopt(path: PathBuf, file: File) -> LoopDevice {
        LoopDevice { path, file }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open device, to hand a copy to the FUSE keeper.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Read the backing file's size again (it grew): the device takes it.
    pub fn set_capacity(&self) -> io::Result<()> {
        // SAFETY: LOOP_SET_CAPACITY takes no argument.
        let rc = unsafe { libc::ioctl(self.file.as_raw_fd(), LOOP_SET_CAPACITY, 0) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Detach now. Fails with EBUSY while someone else holds the device open
    /// exclusively, e.g. a filesystem still mounted on it.
    pub fn detach(self) -> io::Result<()> {
        clear_fd(&self.file)
    }
}

fn clear_fd(file: &File) -> io::Result<()> {
    for attempt in 0..50 {
        // SAFETY: LOOP_CLR_FD takes no argument.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), LOOP_CLR_FD, 0) };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            // Not attached any more (autoclear already did it).
            Some(libc::ENXIO) => return Ok(()),
            // udev or blkid may hold it for a moment after an unmount.
            Some(libc::EBUSY) if attempt < 49 => {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            _ => return Err(err),
        }
    }
    unreachable!()
}

/// Loop devices whose backing file lies under `dir`, as (device, backing file).
pub fn attached_under(dir: &Path) -> Vec<(PathBuf, PathBuf)> {
    let mut found = Vec::new();
    let Ok(entries) = fs::read_dir("/sys/block") else {
        return found;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if !name.starts_with("loop") {
            continue;
        }
        let Ok(backing) = fs::read_to_string(entry.path().join("loop/backing_file")) else {
            continue;
        };
        // The kernel appends " (deleted)" when the backing file is gone.
        let backing = PathBuf::from(backing.trim_end().trim_end_matches(" (deleted)"));
        if backing.starts_with(dir) {
            found.push((PathBuf::from(format!("/dev/{name}")), backing));
        }
    }
    found
}

/// Detach the loop device at `dev` (best effort for crash cleanup).
pub fn detach_path(dev: &Path) -> io::Result<()> {
    let f = OpenOptions::new().read(true).open(dev)?;
    clear_fd(&f)
}

/// Whether a block device is free: an exclusive open fails with EBUSY while
/// it is mounted or held exclusively by another program.
pub fn is_in_use(dev: &Path) -> bool {
    match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_EXCL)
        .open(dev)
    {
        Ok(_) => false,
        Err(e) => e.raw_os_error() == Some(libc::EBUSY),
    }
}

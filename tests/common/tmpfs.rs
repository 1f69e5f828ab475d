//! A tmpfs of a given size: a disk that fills up (ENOSPC) on cue, and
//! grows again. Used by tests/replication.rs (which includes this file
//! alone) and, through `common`, by the daemon tests.

use std::path::{Path, PathBuf};

pub struct SmallTmpfs {
    path: PathBuf,
    /// A temporary directory this mount owns (removed after the unmount).
    _owned: Option<tempfile::TempDir>,
}

fn mount(dir: &Path, size: u64, flags: nix::mount::MsFlags) -> nix::Result<()> {
    let data = format!("size={size}");
    let fstype = if flags.is_empty() {
        Some("tmpfs")
    } else {
        None
    };
    nix::mount::mount(fstype, dir, fstype, flags, Some(data.as_str()))
}

impl SmallTmpfs {
    /// On a new temporary directory.
    pub fn new(size: u64) -> SmallTmpfs {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut fs = SmallTmpfs::mount_at(dir.path(), size);
        fs._owned = Some(dir);
        fs
    }

    /// On `dir` (made if absent).
    pub fn mount_at(dir: &Path, size: u64) -> SmallTmpfs {
        std::fs::create_dir_all(dir).expect("mkdir");
        mount(dir, size, nix::mount::MsFlags::empty()).expect("mount a tmpfs (tests run as root)");
        SmallTmpfs {
            path: dir.to_path_buf(),
            _owned: None,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn resize(&self, size: u64) {
        mount(&self.path, size, nix::mount::MsFlags::MS_REMOUNT).expect("remount the tmpfs");
    }
}

impl Drop for SmallTmpfs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.path, nix::mount::MntFlags::MNT_DETACH);
    }
}

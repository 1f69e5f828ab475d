//! mkfs on first use, and mounting the filesystem where Docker looks for it.

use crate::spec::{FsType, VolumeSpec};
use crate::sys::mount;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Docker gets this subdirectory of the filesystem, so a new volume looks
/// empty to containers (no lost+found: initdb and friends refuse non-empty dirs).
pub const DATA_SUBDIR: &str = "data";

/// Make the filesystem. Returns mkfs's complaint on failure.
pub fn mkfs(device: &Path, spec: &VolumeSpec) -> Result<(), String> {
    // The device reads zeros where never written, so ext4's journal and
    // inode tables need not be written out now: the volume stays thin.
    let (mut cmd, extended) = match spec.fs {
        FsType::Ext4 => {
            let mut c = Command::new("mkfs.ext4");
            c.args(["-q", "-F"]);
            (c, "lazy_itable_init=1,lazy_journal_init=1")
        }
        FsType::Xfs => {
            let mut c = Command::new("mkfs.xfs");
            c.args(["-q", "-f"]);
            (c, "")
        }
        FsType::None => return Ok(()),
    };
    let opts =
        crate::spec::mkfs_args(spec.fs, &spec.fsopts, extended).map_err(|e| e.to_string())?;
    cmd.args(&opts).arg(device);
    let out = cmd.output().map_err(|e| {
        format!(
            "cannot run mkfs for {}: {e} (install e2fsprogs / xfsprogs)",
            spec.fs
        )
    })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "mkfs.{} {} failed ({}): {}",
            spec.fs,
            spec.fsopts.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Run a helper (mount, umount, mkdir) as a child process. Whatever does IO
/// on a dunnage device runs outside the daemon: a thread of ours blocked on
/// our own device would keep a killed daemon from ever exiting, and with it
/// the ublk character device a new daemon needs to recover the device.
fn helper(program: &str, args: &[&std::ffi::OsStr]) -> Result<(), String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run {program}: {e} (install util-linux)"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// Mount `device` at `target` and return the directory to hand to Docker.
pub fn mount_for_docker(device: &Path, target: &Path, fs: FsType) -> Result<PathBuf, String> {
    std::fs::create_dir_all(target).map_err(|e| format!("create {}: {e}", target.display()))?;
    if mount::is_mount_point(target) {
        // Left by a crash that cleanup could not remove: never stack mounts.
        mount::unmount(target, true)
            .map_err(|e| format!("unmount stale {}: {e}", target.display()))?;
    }
    let fstype = fs.to_string();
    helper(
        "mount",
        &[
            "-t".as_ref(),
            fstype.as_ref(),
            "-o".as_ref(),
            "noatime".as_ref(),
            device.as_os_str(),
            target.as_os_str(),
        ],
    )
    .map_err(|e| format!("mount {} on {}: {e}", device.display(), target.display()))?;
    let data = target.join(DATA_SUBDIR);
    if let Err(e) = helper("mkdir", &["-p".as_ref(), data.as_os_str()]) {
        let _ = unmount(target, true);
        return Err(format!("create {}: {e}", data.display()));
    }
    Ok(data)
}

/// Whether `fs` grows while mounted (xfs: `xfs_growfs` works only on a
/// mounted filesystem) rather than before (ext4: online growth needs
/// `CAP_SYS_RESOURCE`, which containers and sandboxes often lack; offline
/// needs a check first, and a volume about to be mounted is unmounted).
pub fn grows_mounted(fs: FsType) -> bool {
    fs == FsType::Xfs
}

/// Grow the filesystem on `device` to the device's size: ext4 before it is
/// mounted (`e2fsck -f -p`, which resize2fs requires, then `resize2fs`),
/// or while mounted (`resize2fs` alone: online, needs CAP_SYS_RESOURCE);
/// xfs mounted at `target` (`xfs_growfs -d`). A filesystem that fills its
/// device already is left as it is.
pub fn grow_fs(device: &Path, target: &Path, fs: FsType, mounted: bool) -> Result<(), String> {
    let run = |program: &str, args: &[&std::ffi::OsStr], ok: &[i32]| -> Result<(), String> {
        let out = Command::new(program)
            .args(args)
            .output()
            .map_err(|e| format!("cannot run {program}: {e} (install e2fsprogs / xfsprogs)"))?;
        if out.status.code().is_some_and(|c| ok.contains(&c)) {
            return Ok(());
        }
        Err(format!(
            "{program} {} failed ({}): {}{}",
            args.last().map_or("".into(), |a| a.to_string_lossy()),
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    };
    match fs {
        FsType::Ext4 => {
            if !mounted {
                // 1: errors were fixed (preen), which is fine to go on from.
                run(
                    "e2fsck",
                    &["-f".as_ref(), "-p".as_ref(), device.as_os_str()],
                    &[0, 1],
                )?;
            }
            run("resize2fs", &[device.as_os_str()], &[0])
        }
        FsType::Xfs => run("xfs_growfs", &["-d".as_ref(), target.as_os_str()], &[0]),
        FsType::None => Ok(()),
    }
}

/// Unmount the filesystem at `target` and remove the mount point. A busy
/// filesystem is retried briefly (udev and blkid hold it for a moment after
/// a container stops); `force` then detaches it lazily (shutdown only).
pub fn unmount(target: &Path, force: bool) -> Result<(), String> {
    let mut last = None;
    for _ in 0..25 {
        if !mount::is_mount_point(target) {
            last = None;
            break;
        }
        match helper("umount", &[target.as_os_str()]) {
            Ok(()) => {
                last = None;
                break;
            }
            Err(e) if e.contains("busy") => {
                last = Some(e);
                std::thread::sleep(std::time::Duration::from_millis(40));
            }
            Err(e) => return Err(format!("unmount {}: {e}", target.display())),
        }
    }
    if let Some(e) = last {
        if !force {
            return Err(format!(
                "unmount {}: {e}; something on this host still uses the volume's files",
                target.display()
            ));
        }
        helper("umount", &["-l".as_ref(), target.as_os_str()])
            .map_err(|e| format!("unmount {}: {e}", target.display()))?;
    }
    let _ = std::fs::remove_dir(target);
    Ok(())
}

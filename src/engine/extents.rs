//! Where a sparse file holds data: its extents by `SEEK_DATA`/`SEEK_HOLE`.

use nix::errno::Errno;
use nix::unistd::{lseek, Whence};
use std::fs::File;
use std::io;

/// The data extents of `file` below `limit`, as `[start, end)` byte ranges in
/// order. A filesystem without hole reporting shows the whole file as data.
pub fn data_extents(file: &File, limit: u64) -> io::Result<Vec<(u64, u64)>> {
    let mut extents = Vec::new();
    let mut pos = 0u64;
    while pos < limit {
        let start = match lseek(file, pos as i64, Whence::SeekData) {
            Ok(off) => off as u64,
            Err(Errno::ENXIO) => break,
            Err(errno) => return Err(errno.into()),
        };
        if start >= limit {
            break;
        }
        let end = (lseek(file, start as i64, Whence::SeekHole)? as u64).min(limit);
        extents.push((start, end));
        pos = end;
    }
    Ok(extents)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn finds_written_ranges_of_a_sparse_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("f"))
            .unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(&[1u8; 4096], 8 << 20).unwrap();
        f.write_all_at(&[1u8; 4096], 32 << 20).unwrap();
        let e = data_extents(&f, 64 << 20).unwrap();
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(e[0].0 <= 8 << 20 && e[0].1 >= (8 << 20) + 4096, "{e:?}");
        assert!(e[1].0 <= 32 << 20 && e[1].1 >= (32 << 20) + 4096, "{e:?}");
        // The limit cuts extents.
        assert_eq!(data_extents(&f, 8 << 20).unwrap(), vec![]);
    }
}

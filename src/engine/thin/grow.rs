//! Growing an image, while it is closed (see *Growing* in the module doc).

use super::snap::read_header;
use super::*;

/// The new header, before it is renamed over `header`.
const HEADER_TMP: &str = "header.tmp";

impl ThinImage {
    /// Grow the image in `dir`, which must not be open, to `size` bytes:
    /// the map file is extended (sparse), then the header is replaced by
    /// one with the new size (temp file, fsync, rename, fsync of the
    /// directory). The new blocks read zeros. Returns the old size, or
    /// `None` when the image already has `size` bytes or more: it never
    /// shrinks. Snapshots and clones keep their own sizes.
    pub fn grow(dir: &Path, size: u64) -> Result<Option<u64>, EngineError> {
        // A crash in passthrough left writes that only the data file
        // knows: open adopts them (and removes the marker) before the map
        // is touched.
        let marker = dir.join(PASSTHROUGH_FILE);
        if marker.try_exists().map_err(io_error("stat", &marker))? {
            drop(Self::open(dir)?);
        }
        let _lock = lock_header(dir, "lock (is the image open? close it to grow it)")?;
        Self::grow_files(dir, size)
    }

    /// Grow the files of this open image (see [`ThinImage::grow`]), for a
    /// grow while it is in use: the caller has stopped its IO and flushed
    /// it, then opens the image again (the new header is a new file, which
    /// that open locks) and retires this one ([`ThinImage::retire`]),
    /// which keeps its old size meanwhile.
    pub fn grow_open(&self, size: u64) -> Result<Option<u64>, EngineError> {
        Self::grow_files(&self.dir, size)
    }

    /// A newer open of this image replaced it: it writes nothing more,
    /// not even the flush at drop. Its IO must have stopped.
    pub fn retire(&self) {
        self.retired.store(true, Ordering::Release);
    }

    /// [`ThinImage::grow`] with the header's lock held.
    fn grow_files(dir: &Path, size: u64) -> Result<Option<u64>, EngineError> {
        let header = read_header(dir)?;
        if size <= header.size {
            return Ok(None);
        }
        ThinParams {
            size,
            block_size: header.block_size,
        }
        .validate()
        .map_err(EngineError::InvalidParams)?;
        let grown = Header { size, ..header };

        // The map first: a crash before the rename leaves the old header
        // and a longer map, whose tail holds nothing (open accepts it).
        let map_path = dir.join(MAP_FILE);
        let map = File::options()
            .write(true)
            .open(&map_path)
            .map_err(io_error("open", &map_path))?;
        let want = BlockMap::file_len(grown.nblocks());
        let have = map.metadata().map_err(io_error("stat", &map_path))?.len();
        if have < want {
            map.set_len(want).map_err(io_error("truncate", &map_path))?;
            map.sync_all().map_err(io_error("fsync", &map_path))?;
        }

        // Never rewritten in place: a torn header would lose the image.
        let tmp = dir.join(HEADER_TMP);
        let file = File::options()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(io_error("create", &tmp))?;
        file.write_all_at(&grown.encode(), 0)
            .map_err(io_error("write", &tmp))?;
        file.sync_all().map_err(io_error("fsync", &tmp))?;
        drop(file);
        let hdr_path = dir.join(HEADER_FILE);
        std::fs::rename(&tmp, &hdr_path).map_err(io_error("rename", &hdr_path))?;
        sync_dir(dir)?;
        tracing::info!(image = %dir.display(), from = header.size, to = size, "grew");
        Ok(Some(header.size))
    }

    /// The size and block size of the image in `dir`, from its header
    /// (the image may be open).
    pub fn params_of(dir: &Path) -> Result<ThinParams, EngineError> {
        let h = read_header(dir)?;
        Ok(ThinParams {
            size: h.size,
            block_size: h.block_size,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{new_image, read_vec, KIB, MIB};
    use super::*;
    use crate::engine::pattern::pattern;
    use crate::engine::BlockEngine;

    fn view_vec(img: &ThinImage, name: &str, offset: u64, len: usize) -> Vec<u8> {
        let view = img.snapshot_view(name).unwrap();
        let mut buf = vec![0xAA; len];
        view.read_at(&mut buf, offset).unwrap();
        buf
    }

    #[test]
    fn grown_image_keeps_its_data_snapshots_and_reads_zeros_past_the_old_end() {
        let bs = 16 * KIB;
        let (old, new) = (2 * MIB, 5 * MIB);
        let (dir, img) = new_image(old, bs as u32);
        let v1 = pattern(1, old as usize);
        img.write_at(&v1, 0).unwrap();
        img.snapshot("before").unwrap();
        // Copy-on-write copies land at or above the old block count, where
        // the grown image's new blocks have their identity homes.
        let v2 = pattern(2, 8 * bs as usize);
        img.write_at(&v2, 0).unwrap();
        let mut head = v1.clone();
        head[..v2.len()].copy_from_slice(&v2);
        img.flush().unwrap();

        // Not while open.
        assert!(matches!(
            ThinImage::grow(dir.path(), new),
            Err(EngineError::Io { .. })
        ));
        drop(img);
        assert_eq!(ThinImage::grow(dir.path(), new).unwrap(), Some(old));
        assert_eq!(ThinImage::params_of(dir.path()).unwrap().size, new);
        // Never shrinks; the same size again is nothing to do.
        assert_eq!(ThinImage::grow(dir.path(), new).unwrap(), None);
        assert_eq!(ThinImage::grow(dir.path(), old).unwrap(), None);
        assert_eq!(ThinImage::params_of(dir.path()).unwrap().size, new);

        let img = ThinImage::open(dir.path()).unwrap();
        assert_eq!(img.size(), new);
        let mut want = head.clone();
        want.resize(new as usize, 0);
        assert_eq!(read_vec(&img, 0, new as usize), want);
        // The new space is writable, whole blocks and partial ones, across
        // the old end too.
        let writes = [
            (old - 100, pattern(3, 300)),
            (3 * MIB + 5, pattern(4, 3 * bs as usize)),
            (new - bs, pattern(5, bs as usize)),
        ];
        for (at, data) in &writes {
            img.write_at(data, *at).unwrap();
            want[*at as usize..][..data.len()].copy_from_slice(data);
        }
        assert_eq!(read_vec(&img, 0, new as usize), want);
        // The snapshot from before reads as it was, zeros past its end.
        let mut snap = v1.clone();
        snap.resize(new as usize, 0);
        assert_eq!(view_vec(&img, "before", 0, new as usize), snap);
        img.snapshot("after").unwrap();
        assert!(img.write_at(&[1], new).is_err());
        drop(img);

        let img = ThinImage::open(dir.path()).unwrap();
        assert_eq!(read_vec(&img, 0, new as usize), want);
        assert_eq!(view_vec(&img, "after", 0, new as usize), want);
        drop(img);
        // Restoring the older, shorter snapshot keeps the size.
        ThinImage::restore(dir.path(), "before").unwrap();
        let img = ThinImage::open(dir.path()).unwrap();
        assert_eq!(img.size(), new);
        assert_eq!(read_vec(&img, 0, new as usize), snap);
        img.delete_snapshot("before").unwrap();
        img.delete_snapshot("after").unwrap();
        drop(img);
        let img = ThinImage::open(dir.path()).unwrap();
        assert_eq!(read_vec(&img, 0, new as usize), snap);
    }

    #[test]
    fn an_open_image_grows_and_is_replaced_by_a_new_open() {
        let (dir, img) = new_image(MIB, 4 * KIB as u32);
        let v = pattern(13, MIB as usize);
        img.write_at(&v, 0).unwrap();
        img.flush().unwrap();
        // Not while open, except by the image itself.
        assert!(ThinImage::grow(dir.path(), 2 * MIB).is_err());
        assert_eq!(img.grow_open(2 * MIB).unwrap(), Some(MIB));
        assert_eq!(img.size(), MIB, "the old open keeps its size");
        let new = ThinImage::open(dir.path()).unwrap();
        img.retire();
        drop(img);
        assert_eq!(new.size(), 2 * MIB);
        assert_eq!(read_vec(&new, 0, MIB as usize), v);
        new.write_at(&v, MIB).unwrap();
        drop(new);
        let img = ThinImage::open(dir.path()).unwrap();
        assert_eq!(read_vec(&img, MIB, MIB as usize), v);
    }

    #[test]
    fn bad_sizes_are_refused_and_change_nothing() {
        let (dir, img) = new_image(MIB, 4 * KIB as u32);
        drop(img);
        for size in [MIB + 512, 65 << 40] {
            assert!(matches!(
                ThinImage::grow(dir.path(), size),
                Err(EngineError::InvalidParams(_))
            ));
        }
        assert_eq!(ThinImage::params_of(dir.path()).unwrap().size, MIB);
        assert_eq!(ThinImage::open(dir.path()).unwrap().size(), MIB);
    }

    #[test]
    fn an_interrupted_grow_leaves_an_image_that_opens_at_its_old_size() {
        let bs = 4 * KIB;
        let (dir, img) = new_image(MIB, bs as u32);
        let v = pattern(7, MIB as usize);
        img.write_at(&v, 0).unwrap();
        drop(img);
        // The map was extended, the header not yet replaced.
        let map_path = dir.path().join(MAP_FILE);
        let map = File::options().write(true).open(&map_path).unwrap();
        let longer = BlockMap::file_len(4 * MIB / bs);
        map.set_len(longer).unwrap();
        std::fs::write(dir.path().join(HEADER_TMP), b"half").unwrap();
        let img = ThinImage::open(dir.path()).unwrap();
        assert_eq!(img.size(), MIB);
        assert_eq!(read_vec(&img, 0, MIB as usize), v);
        drop(img);
        // Growing again finishes it.
        assert_eq!(ThinImage::grow(dir.path(), 4 * MIB).unwrap(), Some(MIB));
        let img = ThinImage::open(dir.path()).unwrap();
        assert_eq!(read_vec(&img, 0, MIB as usize), v);
        assert_eq!(
            read_vec(&img, MIB, 3 * MIB as usize),
            vec![0; 3 * MIB as usize]
        );
        drop(img);
        // An entry past the header's blocks is damage, not a grow.
        map.set_len(BlockMap::file_len(8 * MIB / bs)).unwrap();
        map.write_all_at(&1u64.to_le_bytes(), BlockMap::file_len(4 * MIB / bs) + 8)
            .unwrap();
        assert!(matches!(
            ThinImage::open(dir.path()),
            Err(EngineError::Corrupt { .. })
        ));
    }

    #[test]
    fn a_clone_and_its_base_grow_apart() {
        let bs = 8 * KIB;
        let (bdir, base) = new_image(MIB, bs as u32);
        let v = pattern(8, MIB as usize);
        base.write_at(&v, 0).unwrap();
        base.snapshot("s").unwrap();
        let cdir = tempfile::tempdir().unwrap();
        drop(ThinImage::create_clone(cdir.path(), bdir.path(), "s").unwrap());
        drop(base);

        assert_eq!(ThinImage::grow(cdir.path(), 3 * MIB).unwrap(), Some(MIB));
        let clone = ThinImage::open(cdir.path()).unwrap();
        let mut want = v.clone();
        want.resize(3 * MIB as usize, 0);
        assert_eq!(read_vec(&clone, 0, want.len()), want);
        let w = pattern(9, 2 * bs as usize);
        clone.write_at(&w, 2 * MIB).unwrap();
        want[2 * MIB as usize..][..w.len()].copy_from_slice(&w);
        drop(clone);

        // The base grows too, past the clone: the clone still reads the
        // snapshot it was made from.
        assert_eq!(ThinImage::grow(bdir.path(), 6 * MIB).unwrap(), Some(MIB));
        let base = ThinImage::open(bdir.path()).unwrap();
        base.write_at(&pattern(10, MIB as usize), 0).unwrap();
        let clone = ThinImage::open(cdir.path()).unwrap();
        assert_eq!(read_vec(&clone, 0, want.len()), want);
        // A clone made from the old snapshot now has the base's new size.
        let c2 = tempfile::tempdir().unwrap();
        let young = ThinImage::create_clone(c2.path(), bdir.path(), "s").unwrap();
        assert_eq!(young.size(), 6 * MIB);
        let mut head = v.clone();
        head.resize(6 * MIB as usize, 0);
        assert_eq!(read_vec(&young, 0, head.len()), head);
    }
}

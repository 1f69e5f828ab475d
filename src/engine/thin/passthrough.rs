//! Passthrough: handing the data file to the kernel while the image is
//! identity, and taking it back (see *Passthrough* in the module doc).

use super::*;

impl ThinImage {
    /// Whether the data file is handed out (see the module doc).
    pub fn is_passthrough(&self) -> bool {
        self.passthrough.load(Ordering::Acquire)
    }

    /// Hand out the data file for passthrough IO, if the image is identity
    /// (else `Ok(None)`): durably mark the image as in passthrough and
    /// switch the engine's own IO to the data file at device offsets. The
    /// returned file is a duplicate of the engine's, open read-write. Call
    /// again while in passthrough: another duplicate. Refused
    /// ([`EngineError::Shared`]) while the image has snapshots: the kernel
    /// would overwrite the blocks they share in place.
    pub fn begin_passthrough(&self) -> Result<Option<File>, EngineError> {
        self.with_all_write_locks(|| {
            let dup = || {
                self.data
                    .try_clone()
                    .map_err(io_error("dup", &self.data_path))
            };
            if self.passthrough.load(Ordering::Acquire) {
                return dup().map(Some);
            }
            if self.snapshot_count.load(Ordering::Acquire) > 0
                || self.shared_count.load(Ordering::Acquire) > 0
            {
                return Err(EngineError::Shared {
                    dir: self.dir.clone(),
                });
            }
            if !self.is_identity() {
                return Ok(None);
            }
            // The on-disk map becomes the in-memory one, and every deferred
            // block is released: no map, on disk or not, then references a
            // block from another logical block (invariant 7).
            self.flush_inner()?;
            // A raw image of the device's size: the kernel would read short
            // past the end of the file.
            let len = self
                .data
                .metadata()
                .map_err(io_error("stat", &self.data_path))?
                .len();
            if len < self.size {
                self.data
                    .set_len(self.size)
                    .map_err(io_error("truncate", &self.data_path))?;
                self.data
                    .sync_all()
                    .map_err(io_error("fsync", &self.data_path))?;
            }
            let file = dup()?;
            if let Err(e) = self.write_marker() {
                // Best effort: a stray marker only makes the next open adopt
                // extents of an identity image, which are its own blocks.
                let _ = std::fs::remove_file(self.dir.join(PASSTHROUGH_FILE));
                return Err(e);
            }
            self.passthrough.store(true, Ordering::Release);
            tracing::info!(data = %self.data_path.display(), "passthrough begins");
            Ok(Some(file))
        })
    }

    /// Leave passthrough (nothing to do if not in it): map every block the
    /// data file holds data in to itself, flush, remove the marker. On
    /// error the image stays in passthrough, marker included.
    pub fn end_passthrough(&self) -> Result<(), EngineError> {
        self.with_all_write_locks(|| {
            if !self.passthrough.load(Ordering::Acquire) {
                return Ok(());
            }
            let adopted = self.adopt_extents()?;
            // In passthrough a flush always syncs the data file first.
            self.flush_inner()?;
            self.remove_marker()?;
            self.passthrough.store(false, Ordering::Release);
            tracing::info!(
                data = %self.data_path.display(),
                adopted,
                "passthrough ends"
            );
            Ok(())
        })
    }

    fn write_marker(&self) -> Result<(), EngineError> {
        let path = self.dir.join(PASSTHROUGH_FILE);
        let file = File::create(&path).map_err(io_error("create", &path))?;
        file.write_all_at(b"the data file is written through passthrough\n", 0)
            .map_err(io_error("write", &path))?;
        file.sync_all().map_err(io_error("fsync", &path))?;
        sync_dir(&self.dir)
    }

    pub(super) fn remove_marker(&self) -> Result<(), EngineError> {
        let path = self.dir.join(PASSTHROUGH_FILE);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error("remove", &path)(e)),
        }
        sync_dir(&self.dir)
    }

    /// Map every unmapped block that an extent of the data file touches to
    /// itself (block granularity). The caller excludes IO, or runs before
    /// any. Returns how many blocks were mapped.
    pub(super) fn adopt_extents(&self) -> Result<u64, EngineError> {
        let bs = u64::from(self.block_size);
        let limit = self.nblocks * bs;
        let corrupt = |reason: String| EngineError::Corrupt {
            path: self.data_path.clone(),
            reason,
        };
        let mut adopted = 0u64;
        let mut alloc = self.alloc.lock();
        let extents = data_extents(&self.data, limit).map_err(io_error("seek", &self.data_path))?;
        for (start, end) in extents {
            for block in start / bs..end.div_ceil(bs) {
                match self.map.get(block).phys() {
                    Some(phys) if phys == block => continue,
                    Some(phys) => {
                        return Err(corrupt(format!(
                            "passthrough image maps block {block} to physical block {phys}"
                        )))
                    }
                    None => {}
                }
                if !(alloc.claim(block) || alloc.revive(block)) {
                    return Err(corrupt(format!(
                        "passthrough image: physical block {block} holds data but is in use"
                    )));
                }
                if self.map.try_map(block, Entry::mapped(block)).is_err() {
                    return Err(corrupt(format!("block {block} mapped while adopting")));
                }
                self.allocated.fetch_add(1, Ordering::Relaxed);
                adopted += 1;
            }
        }
        Ok(adopted)
    }
}

//! Discards and zeroing: unmap, punch and defer the freed blocks
//! (invariant 2).

use super::*;

impl ThinImage {
    /// Zero a range of the data file: punch a hole, or write zeros where
    /// the filesystem cannot punch.
    pub(super) fn zero_phys(&self, offset: u64, len: u64) -> Result<(), EngineError> {
        if self.can_punch.load(Ordering::Relaxed) {
            let mode = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
            match fallocate(&self.data, mode, offset as i64, len as i64) {
                Ok(()) => {
                    self.punched.fetch_or(true, Ordering::AcqRel);
                    return Ok(());
                }
                Err(Errno::EOPNOTSUPP) => {
                    tracing::warn!(
                        data = %self.data_path.display(),
                        "filesystem cannot punch holes: discarded space is zeroed, not returned"
                    );
                    self.can_punch.store(false, Ordering::Relaxed);
                }
                Err(errno) => return Err(io_error("punch hole", &self.data_path)(errno.into())),
            }
        }
        static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(ZEROS.len() as u64) as usize;
            self.data
                .write_all_at(&ZEROS[..n], offset + done)
                .map_err(io_error("write", &self.data_path))?;
            done += n as u64;
        }
        self.data_dirty.fetch_or(true, Ordering::AcqRel);
        Ok(())
    }

    /// Zero part of a block in place (a discard that does not cover it).
    /// A block shared with a snapshot, or a clone's block still in its
    /// base, is not changed in place: zeros are written (and copied).
    pub(super) fn zero_in_block(
        &self,
        block: u64,
        in_block: usize,
        len: usize,
    ) -> Result<(), EngineError> {
        {
            let _io = self.stripe(block).read();
            if self.passthrough.load(Ordering::Acquire) {
                // The data file may hold data the map does not know of.
                return self.zero_phys(self.phys_offset(block, in_block), len as u64);
            }
            if self.copy_source(block).is_none() {
                if let Some(phys) = self.map.get(block).phys() {
                    self.zero_phys(self.phys_offset(phys, in_block), len as u64)?;
                }
                return Ok(());
            }
        }
        let zeros = vec![0u8; len];
        self.write_at(&zeros, (block << self.shift) + in_block as u64)
    }

    /// What a discarded logical block becomes: unmapped, or in a clone
    /// whose base has data there, [`Entry::ZERO`] (so it reads zeros, not
    /// the base).
    fn discarded_entry(&self, block: u64) -> Entry {
        match &self.base {
            Some(base) if base.lookup(block).is_some() => Entry::ZERO,
            _ => Entry::UNMAPPED,
        }
    }

    /// The first block in `[block, end)` with an entry, in the head or (a
    /// clone) in its base, skipping map pages never mapped into.
    fn next_mapped(&self, block: u64, end: u64) -> Option<u64> {
        let head = self.map.next_entry(block, end);
        match &self.base {
            Some(base) => {
                let end = head.map_or(end, |h| h + 1);
                match base.next_entry(block, end) {
                    Some(b) => Some(head.map_or(b, |h| h.min(b))),
                    None => head,
                }
            }
            None => head,
        }
    }

    /// Unmap the whole blocks `[first, end)`, punch their space (unless
    /// `punch` is false: the caller punched it) and defer their reuse to
    /// the next flush. Each window of blocks is unmapped, punched and
    /// deferred under the write side of its stripes.
    pub(super) fn unmap_blocks(
        &self,
        first: u64,
        end: u64,
        punch: bool,
    ) -> Result<(), EngineError> {
        let window = (UNMAP_WINDOW_BYTES >> self.shift).max(1);
        let mut block = first;
        while let Some(start) = self.next_mapped(block, end) {
            let stop = (start + window).min(end);
            self.with_write_locks(start, stop - 1, || self.unmap_window(start, stop, punch))?;
            block = stop;
        }
        Ok(())
    }

    fn unmap_window(&self, first: u64, end: u64, punch: bool) -> Result<(), EngineError> {
        // A run of physically contiguous freed blocks: (first, count, own).
        let mut run: Option<(u64, u64, bool)> = None;
        let finish = |(phys, count, own): (u64, u64, bool)| -> Result<(), EngineError> {
            if punch {
                self.zero_phys(phys << self.shift, count << self.shift)?;
            }
            if own {
                self.alloc.defer_free_own(phys..phys + count);
            } else {
                self.alloc.defer_free(phys..phys + count);
            }
            Ok(())
        };
        for block in first..end {
            let entry = self.discarded_entry(block);
            let Some(phys) = self.map.swap(block, entry).phys() else {
                continue;
            };
            self.allocated.fetch_sub(1, Ordering::Relaxed);
            let own = phys == block;
            if !own {
                self.non_identity.fetch_sub(1, Ordering::Relaxed);
            }
            if self.shared.get(phys) {
                // A snapshot holds it: neither punched nor freed (invariant 10).
                self.head_shared.fetch_sub(1, Ordering::Relaxed);
                if let Some(done) = run.take() {
                    finish(done)?;
                }
                continue;
            }
            run = match run {
                Some((s, n, o)) if s + n == phys && o == own => Some((s, n + 1, o)),
                Some(done) => {
                    finish(done)?;
                    Some((phys, 1, own))
                }
                None => Some((phys, 1, own)),
            };
        }
        if let Some(done) = run {
            finish(done)?;
        }
        self.map
            .write_through(&self.map_file, first, end)
            .map_err(io_error("write", &self.map_path))
    }
}

//! Writes: in place where the block is this image's alone, else
//! copy-on-write to a new block (invariants 9 and 10); allocation.

use super::*;

impl ThinImage {
    /// Write `buf` to the data file at `offset` (one positional write).
    pub(super) fn write_data(&self, buf: &[u8], offset: u64) -> Result<(), EngineError> {
        #[cfg(test)]
        self.counters.pwrites.fetch_add(1, Ordering::Relaxed);
        self.data
            .write_all_at(buf, offset)
            .map_err(io_error("write", &self.data_path))
    }

    /// Write through the map, allocating on first write, one system call
    /// per physically contiguous run. The caller holds the stripes. Sets
    /// `wrote` once any data was written.
    pub(super) fn write_mapped(
        &self,
        buf: &[u8],
        offset: u64,
        wrote: &mut bool,
    ) -> Result<(), EngineError> {
        // Held across the first writes of a run, dropped before a syscall.
        let mut alloc: Option<AllocGuard<'_>> = None;
        let mut run: Option<(u64, Range<usize>)> = None;
        let mut finish = |run: Option<(u64, Range<usize>)>| -> Result<(), EngineError> {
            if let Some((at, range)) = run {
                self.write_data(&buf[range], at)?;
                *wrote = true;
            }
            Ok(())
        };
        self.split(offset, buf.len(), |block, in_block, range| {
            let phys = match self.map.get(block).phys() {
                Some(phys) => phys,
                // An all-zero piece of an unmapped block: it already reads
                // as zeros, nothing to write.
                None if is_zero(&buf[range.clone()]) => {
                    alloc = None;
                    return finish(run.take());
                }
                None => {
                    let guard = alloc.get_or_insert_with(|| self.alloc.lock());
                    self.map_block(guard, block)?
                }
            };
            let file = self.phys_offset(phys, in_block);
            if let Some((at, r)) = &mut run {
                if *at + r.len() as u64 == file && r.end == range.start {
                    r.end = range.end;
                    return Ok(());
                }
            }
            alloc = None;
            finish(run.replace((file, range)))
        })?;
        drop(alloc);
        finish(run)
    }

    /// Give unmapped `block` a physical block and publish the mapping,
    /// under the allocator's lock (so no other first write interleaves).
    fn map_block(&self, alloc: &mut AllocGuard<'_>, block: u64) -> Result<u64, EngineError> {
        // Unmapped, or Entry::ZERO (a clone's discarded block).
        let current = self.map.get(block);
        if let Some(phys) = current.phys() {
            return Ok(phys); // another writer mapped it meanwhile
        }
        let (phys, revived) = if !self.identity_placement {
            (alloc.alloc().ok_or(EngineError::NoSpace)?, false)
        } else if alloc.claim(block) {
            (block, false)
        } else if alloc.revive(block) {
            (block, true) // invariant 6
        } else {
            // Its home is held (by a snapshot, or by another logical block
            // in an image of an earlier build): stay off the other homes.
            let phys = alloc.alloc_above(self.nblocks);
            (phys.ok_or(EngineError::NoSpace)?, false)
        };
        if let Err(won) = self.map.try_replace(block, current, Entry::mapped(phys)) {
            // Unreachable: first mappings are made under the allocator lock.
            if revived {
                alloc.defer_own(phys);
            } else {
                alloc.give_back(phys);
            }
            return won.phys().ok_or(EngineError::Corrupt {
                path: self.map_path.clone(),
                reason: format!("block {block} raced to an invalid entry"),
            });
        }
        self.allocated.fetch_add(1, Ordering::Relaxed);
        if phys != block {
            self.non_identity.fetch_add(1, Ordering::Relaxed);
        }
        self.map
            .write_through(&self.map_file, block, block + 1)
            .map_err(io_error("write", &self.map_path))?;
        Ok(phys)
    }

    /// Whether any block may need copying before a write: the image has
    /// shared blocks or is a clone. Cheap; under the read side of a stripe
    /// it cannot turn true (taking a snapshot excludes all IO).
    #[inline]
    pub(super) fn may_copy(&self) -> bool {
        self.base.is_some() || self.shared_count.load(Ordering::Acquire) > 0
    }

    /// What a write to logical `block` must copy first, if anything: its
    /// own physical block when a snapshot shares it (copy-on-write), or
    /// its base's block when it is a clone's block not written yet
    /// (copy-up). As (source, physical block, current entry).
    pub(super) fn copy_source(&self, block: u64) -> Option<(usize, u64, Entry)> {
        let entry = self.map.get(block);
        match entry.phys() {
            Some(phys) => self.shared.get(phys).then_some((0, phys, entry)),
            None if entry == Entry::UNMAPPED => {
                let (level, phys) = self.base.as_ref()?.lookup(block)?;
                Some((level + 1, phys, entry))
            }
            None => None,
        }
    }

    /// Whether a write of `offset..offset+len` would copy a block first:
    /// it reads and writes whole blocks, and waits for a flush in progress
    /// (advisory: unlocked).
    pub fn write_may_wait(&self, offset: u64, len: u64) -> bool {
        if len == 0 || offset.saturating_add(len) > self.size() || !self.may_copy() {
            return false;
        }
        let (first, last) = self.span(offset, len);
        self.needs_copy(first, last)
    }

    pub(super) fn needs_copy(&self, first: u64, last: u64) -> bool {
        (first..=last).any(|block| self.copy_source(block).is_some())
    }

    /// The number of blocks from `block` to `last` in a row that a write
    /// must copy.
    fn copies_from(&self, block: u64, last: u64) -> u64 {
        (block..=last)
            .take_while(|&b| self.copy_source(b).is_some())
            .count() as u64
    }

    /// A block for the copy of logical `block`: its own index when free
    /// (a clone's copy-up, mostly), else one above the identity homes.
    /// The copies of the next blocks of the same write (up to `last`) are
    /// reserved with it in `reserved` (next block, count left) when a run
    /// of free blocks is found, so that one `pwritev` writes them all now
    /// and one `pwrite` again once they are mapped. Returns (block, revived).
    fn copy_alloc(
        &self,
        block: u64,
        last: u64,
        reserved: &mut (u64, u64),
    ) -> Result<(u64, bool), EngineError> {
        if self.identity_placement {
            let mut alloc = self.alloc.lock();
            if alloc.claim(block) {
                return Ok((block, false));
            }
            if alloc.revive(block) {
                return Ok((block, true)); // invariant 6
            }
        }
        let (next, left) = reserved;
        if *left > 0 {
            *left -= 1;
            *next += 1;
            return Ok((*next - 1, false));
        }
        let want = self.copies_from(block, last).max(1);
        let (first, count) = self
            .alloc
            .lock()
            .alloc_run_above(self.nblocks, want)
            .ok_or(EngineError::NoSpace)?;
        *reserved = (first + 1, count - 1);
        Ok((first, false))
    }

    /// [`BlockEngine::write_at`] when some block must be copied first,
    /// under the write side of the stripes (invariant 10): each such block
    /// is written whole to a new block (the bytes outside the write read
    /// from its source; a block written whole is not read), then the new
    /// blocks are journaled and mapped in memory; the next flush syncs
    /// them and writes their entries. Other blocks are written as usual.
    /// The copies of consecutive blocks go to consecutive new blocks when
    /// a run is free: one `pwritev` for them, with the old bytes around.
    pub(super) fn write_copying(
        &self,
        buf: &[u8],
        offset: u64,
        wrote: &mut bool,
    ) -> Result<(), EngineError> {
        if self.passthrough.load(Ordering::Acquire) {
            *wrote = true;
            return self.write_data(buf, offset);
        }
        // Taken out for the call, so that a nested use (none today) would
        // find an empty one rather than a borrowed one.
        let mut scratch = COPY_SCRATCH.with(|s| std::mem::take(&mut *s.borrow_mut()));
        let result = self.copy_and_write(buf, offset, wrote, &mut scratch);
        scratch.copied.clear();
        COPY_SCRATCH.with(|s| *s.borrow_mut() = scratch);
        result
    }

    fn copy_and_write(
        &self,
        buf: &[u8],
        offset: u64,
        wrote: &mut bool,
        s: &mut CopyScratch,
    ) -> Result<(), EngineError> {
        let bs = self.block_size as usize;
        if s.old.len() < 2 * bs {
            s.old.resize(2 * bs, 0);
        }
        let (_, last) = self.span(offset, buf.len() as u64);
        let mut run: Option<CopyRun> = None;
        let mut reserved = (0u64, 0u64);
        let result = self.split(offset, buf.len(), |block, in_block, range| {
            let Some((src, from, old)) = self.copy_source(block) else {
                if let Some(done) = run.take() {
                    self.write_run(buf, &s.old, &done)?;
                }
                let at = (block << self.shift) + in_block as u64;
                return self.write_mapped(&buf[range], at, wrote);
            };
            let (new, revived) = self.copy_alloc(block, last, &mut reserved)?;
            s.copied.push(Copied {
                block,
                old,
                new,
                revived,
            });
            *wrote = true;
            // The old bytes around the write: only the first and the last
            // block of a write can be partly written.
            let (end, from) = (in_block + range.len(), from << self.shift);
            let (head, tail) = match (in_block > 0, end < bs) {
                (false, false) => (0..0, 0..0),
                (true, false) => {
                    self.read_source(src, &mut s.old[..in_block], from)?;
                    (0..in_block, 0..0)
                }
                (false, true) => {
                    self.read_source(src, &mut s.old[bs + end..2 * bs], from + end as u64)?;
                    (0..0, bs + end..2 * bs)
                }
                // Inside one block: one read of it all.
                (true, true) => {
                    self.read_source(src, &mut s.old[..bs], from)?;
                    (0..in_block, end..bs)
                }
            };
            let at = new << self.shift;
            if let Some(r) = &mut run {
                if head.is_empty() && r.tail.is_empty() && r.end() == at {
                    r.body.end = range.end;
                    r.tail = tail;
                    return Ok(());
                }
            }
            let body = range;
            match run.replace(CopyRun {
                at,
                head,
                body,
                tail,
            }) {
                Some(done) => self.write_run(buf, &s.old, &done),
                None => Ok(()),
            }
        });
        let result = result.and_then(|()| match run.take() {
            Some(done) => self.write_run(buf, &s.old, &done),
            None => Ok(()),
        });
        let (next, left) = reserved;
        if left > 0 {
            // Reserved for copies not made (their blocks were claimed).
            let mut alloc = self.alloc.lock();
            for block in next..next + left {
                alloc.give_back(block);
            }
        }
        if let Err(e) = result {
            self.abandon_copies(&s.copied);
            return Err(e);
        }
        if s.copied.is_empty() {
            return Ok(());
        }
        // Mapped in memory and journaled, not written to the map file: the
        // next flush does that after its data sync (invariant 10).
        let mut journal = self.copies.lock();
        let journaled = journal.append(
            s.copied
                .iter()
                .map(|c| (c.block, c.old, Entry::mapped(c.new))),
        );
        if let Err(e) = journaled {
            let e = io_error("write", journal.path())(e);
            drop(journal);
            self.abandon_copies(&s.copied);
            return Err(e);
        }
        // Before the journal lock goes: a flush that finds these copies
        // mapped finds the data dirty too.
        self.data_dirty.store(true, Ordering::Release);
        for c in &s.copied {
            self.publish_copy(c);
        }
        let full = journal.wants_flush();
        drop(journal);
        if full {
            self.flush_inner()?;
        }
        Ok(())
    }

    /// Write a [`CopyRun`] (one `pwritev`, more only after a short write).
    fn write_run(&self, buf: &[u8], old: &[u8], run: &CopyRun) -> Result<(), EngineError> {
        let mut parts = [
            &old[run.head.clone()],
            &buf[run.body.clone()],
            &old[run.tail.clone()],
        ];
        let mut at = run.at;
        loop {
            let mut iov = [IoSlice::new(&[]); 3];
            let mut n = 0;
            for part in parts.iter().filter(|p| !p.is_empty()) {
                iov[n] = IoSlice::new(part);
                n += 1;
            }
            if n == 0 {
                return Ok(());
            }
            #[cfg(test)]
            self.counters.pwrites.fetch_add(1, Ordering::Relaxed);
            let mut done = match nix::sys::uio::pwritev(&self.data, &iov[..n], at as i64) {
                Ok(0) => {
                    let zero = io::Error::from(io::ErrorKind::WriteZero);
                    return Err(io_error("write", &self.data_path)(zero));
                }
                Ok(done) => done,
                Err(Errno::EINTR) => continue,
                Err(errno) => return Err(io_error("write", &self.data_path)(errno.into())),
            };
            at += done as u64;
            for part in &mut parts {
                let skip = done.min(part.len());
                *part = &part[skip..];
                done -= skip;
            }
        }
    }

    /// Map a copied block in place of what its logical block had (in
    /// memory; the next flush writes the entry).
    fn publish_copy(&self, c: &Copied) {
        let old = self.map.swap(c.block, Entry::mapped(c.new));
        debug_assert_eq!(old, c.old, "block {} changed under its write lock", c.block);
        match old.phys() {
            Some(phys) => {
                // Stays used: a snapshot holds it.
                self.head_shared.fetch_sub(1, Ordering::Relaxed);
                if phys != c.block {
                    self.non_identity.fetch_sub(1, Ordering::Relaxed);
                }
            }
            None => {
                self.allocated.fetch_add(1, Ordering::Relaxed);
            }
        }
        if c.new != c.block {
            self.non_identity.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Undo the allocations of copies that will not be mapped: punch what
    /// they may hold (invariant 1), then free them. A block that cannot be
    /// punched stays used (the next open frees it).
    fn abandon_copies(&self, copied: &[Copied]) {
        for c in copied {
            if let Err(e) = self.zero_phys(c.new << self.shift, u64::from(self.block_size)) {
                tracing::warn!(data = %self.data_path.display(), error = %e,
                    block = c.new, "could not punch an abandoned copy; it stays used");
                continue;
            }
            let mut alloc = self.alloc.lock();
            if c.revived {
                alloc.defer_own(c.new);
            } else {
                alloc.give_back(c.new);
            }
        }
    }
}

/// A block copied by a write (copy-on-write or a clone's copy-up): written
/// to `new`, not yet mapped.
pub(super) struct Copied {
    block: u64,
    old: Entry,
    new: u64,
    revived: bool,
}

/// Per-thread buffers of [`ThinImage::write_copying`]: once a thread made
/// a copying write, the next ones allocate nothing on the heap.
#[derive(Default)]
struct CopyScratch {
    /// The old bytes of partly written blocks: the first block's in
    /// `[0, block_size)`, the last block's in `[block_size, 2 * block_size)`.
    old: Vec<u8>,
    copied: Vec<Copied>,
}

thread_local! {
    static COPY_SCRATCH: RefCell<CopyScratch> = RefCell::default();
}

/// A pending write of [`ThinImage::write_copying`] to the data file at
/// `at`: `old[head]`, `buf[body]`, `old[tail]`, back to back (one `pwritev`).
struct CopyRun {
    at: u64,
    head: Range<usize>,
    body: Range<usize>,
    tail: Range<usize>,
}

impl CopyRun {
    fn end(&self) -> u64 {
        self.at + (self.head.len() + self.body.len() + self.tail.len()) as u64
    }
}

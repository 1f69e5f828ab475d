//! Reads: each block from where its map entry points (this image's data
//! file, a clone's base), zeros where nothing is mapped; runs coalesced.

use super::*;

impl ThinImage {
    /// Fill `buf` from the data file at `offset` (one positional read; past
    /// the end of the file reads zeros).
    pub(super) fn read_data(&self, buf: &mut [u8], offset: u64) -> Result<(), EngineError> {
        #[cfg(test)]
        self.counters.preads.fetch_add(1, Ordering::Relaxed);
        let n = read_full(&self.data, buf, offset).map_err(io_error("read", &self.data_path))?;
        // Past the end of the data file: a block allocated but not yet
        // written to there.
        buf[n..].fill(0);
        Ok(())
    }

    /// Fill `buf` from source `src` (see [`ReadRun`]) at `offset`.
    pub(super) fn read_source(
        &self,
        src: usize,
        buf: &mut [u8],
        offset: u64,
    ) -> Result<(), EngineError> {
        match (src, &self.base) {
            (0, _) => self.read_data(buf, offset),
            (k, Some(base)) => {
                #[cfg(test)]
                self.counters.preads.fetch_add(1, Ordering::Relaxed);
                base.read(k - 1, buf, offset)
            }
            (_, None) => unreachable!("a base source in an image without a base"),
        }
    }

    /// Where logical `block` reads from: (source, physical block), or
    /// `None` for zeros. A clone's unmapped block reads through to its base.
    #[inline]
    fn locate(&self, block: u64) -> Option<(usize, u64)> {
        let entry = self.map.get(block);
        match entry.phys() {
            Some(phys) => Some((0, phys)),
            None if entry == Entry::UNMAPPED => self
                .base
                .as_ref()?
                .lookup(block)
                .map(|(level, phys)| (level + 1, phys)),
            None => None, // Entry::ZERO
        }
    }

    fn finish_read(&self, buf: &mut [u8], run: ReadRun) -> Result<(), EngineError> {
        match run.file {
            Some((src, at)) => self.read_source(src, &mut buf[run.buf], at),
            None => {
                #[cfg(test)]
                self.counters.zero_fills.fetch_add(1, Ordering::Relaxed);
                buf[run.buf].fill(0);
                Ok(())
            }
        }
    }

    /// Read through the map, one system call per physically contiguous run
    /// and one fill per unmapped run. The caller holds the stripes.
    pub(super) fn read_mapped(&self, buf: &mut [u8], offset: u64) -> Result<(), EngineError> {
        let mut run: Option<ReadRun> = None;
        self.split(offset, buf.len(), |block, in_block, range| {
            let file = self
                .locate(block)
                .map(|(src, phys)| (src, self.phys_offset(phys, in_block)));
            if let Some(run) = &mut run {
                let joins = match (run.file, file) {
                    (None, None) => true,
                    (Some((src, at)), Some((to, file))) => {
                        src == to && at + run.buf.len() as u64 == file
                    }
                    _ => false,
                };
                if joins {
                    run.buf.end = range.end;
                    return Ok(());
                }
            }
            match run.replace(ReadRun { file, buf: range }) {
                Some(done) => self.finish_read(buf, done),
                None => Ok(()),
            }
        })?;
        match run {
            Some(done) => self.finish_read(buf, done),
            None => Ok(()),
        }
    }
}

/// A pending run of a read: `buf` from `file` in the data file, or zeros.
struct ReadRun {
    /// (source, offset): source 0 is the image's data file, `k` the
    /// data file of base level `k - 1` (clones).
    file: Option<(usize, u64)>,
    buf: Range<usize>,
}

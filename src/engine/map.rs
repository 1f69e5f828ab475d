//! The logical → physical block map of a thin image, held in memory and
//! persisted page by page to the `map` file.
//!
//! The map file is an array of little-endian u64 entries, one per logical
//! block, in 4 KiB pages of 512 entries; its length is fixed at create
//! (rounded up to whole pages) and it is sparse: pages never written cost
//! nothing on disk. In memory the map is the same array of pages, each page
//! allocated on its first mapping, so memory also follows what was written.
//!
//! An entry is an [`Entry`]: bits 0..48 hold the physical block index plus
//! one (0 = unmapped), bits 48..64 are flags. One flag is defined:
//! [`Entry::ZERO`] (bit 48, with physical bits 0) means "reads zeros": in a
//! clone it hides the base's data where the clone discarded it (see
//! thin.rs, *Clones*). Any other flag is unknown, and an opener refuses it
//! (so do builds older than clones, which know no flag at all).
//!
//! The map knows nothing of data or allocation: it offers lock-free lookups,
//! a compare-and-swap for first mapping, a swap for unmapping, and tracks
//! which pages changed since they were last written ([`BlockMap::write_dirty`]).
//! A frozen (snapshot) map is the same type loaded from another file and
//! never mapped into.

use super::extents::data_extents;
use super::EngineError;
use parking_lot::Mutex;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// Bytes in one map page (the unit of persistence).
pub(crate) const MAP_PAGE_BYTES: usize = 4096;
/// Entries in one map page.
pub(crate) const ENTRIES_PER_PAGE: usize = MAP_PAGE_BYTES / 8;
const PAGE_SHIFT: u32 = ENTRIES_PER_PAGE.trailing_zeros();
const PAGE_MASK: u64 = ENTRIES_PER_PAGE as u64 - 1;

/// One map entry (see the module doc for the encoding).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Entry(u64);

impl Entry {
    pub const UNMAPPED: Entry = Entry(0);
    const PHYS_BITS: u32 = 48;
    const PHYS_MASK: u64 = (1 << Self::PHYS_BITS) - 1;
    /// The largest physical block index an entry can hold.
    pub const MAX_PHYS: u64 = Self::PHYS_MASK - 1;

    /// An entry mapping to physical block `phys` (no flags).
    pub fn mapped(phys: u64) -> Entry {
        debug_assert!(phys <= Self::MAX_PHYS);
        Entry(phys + 1)
    }

    pub fn from_raw(raw: u64) -> Entry {
        Entry(raw)
    }

    pub fn raw(self) -> u64 {
        self.0
    }

    /// The physical block index, or `None` if unmapped.
    pub fn phys(self) -> Option<u64> {
        (self.0 & Self::PHYS_MASK).checked_sub(1)
    }

    /// The flag bits (48..64), shifted down.
    pub fn flags(self) -> u64 {
        self.0 >> Self::PHYS_BITS
    }

    /// "Reads zeros, no fall-through to a clone's base": no physical block.
    pub const ZERO: Entry = Entry(Self::FLAG_ZERO << Self::PHYS_BITS);
    /// The flag of [`Entry::ZERO`], as [`Entry::flags`] shows it.
    pub const FLAG_ZERO: u64 = 1;

    /// Whether this is [`Entry::ZERO`].
    pub fn is_zero(self) -> bool {
        self == Self::ZERO
    }

    /// Whether the entry is well formed: unmapped, mapped without flags,
    /// or (when `zero_ok`) exactly [`Entry::ZERO`].
    pub fn is_valid(self, zero_ok: bool) -> bool {
        match self.flags() {
            0 => true,
            Self::FLAG_ZERO => zero_ok && self.is_zero(),
            _ => false,
        }
    }
}

type Page = [AtomicU64; ENTRIES_PER_PAGE];

fn new_page() -> Box<Page> {
    Box::new([const { AtomicU64::new(0) }; ENTRIES_PER_PAGE])
}

/// Stripes of locks over map pages for writing them to the file.
const PAGE_LOCKS: usize = 64;

/// The in-memory map: pages allocated on first use, plus one dirty bit per page.
pub(crate) struct BlockMap {
    nblocks: u64,
    pages: Box<[OnceLock<Box<Page>>]>,
    /// Bit `p % 64` of word `p / 64` is set when page `p` changed since it was last written.
    dirty: Box<[AtomicU64]>,
    /// Whoever copies entries of a page to the file holds its stripe, and
    /// reads them from memory under it: the last copy in the file is then
    /// never older than the memory was when the copy began.
    page_locks: Box<[Mutex<()>]>,
}

impl BlockMap {
    /// An empty (all unmapped) map of `nblocks` entries.
    pub fn new(nblocks: u64) -> BlockMap {
        let npages = Self::pages_for(nblocks);
        BlockMap {
            nblocks,
            pages: (0..npages).map(|_| OnceLock::new()).collect(),
            dirty: (0..npages.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            page_locks: (0..PAGE_LOCKS).map(|_| Mutex::new(())).collect(),
        }
    }

    /// Copy the entries of blocks `[first, end)` from memory to `file`
    /// now, without syncing: the file's page cache then holds every
    /// mapping, and a process killed before its next flush loses none (a
    /// restarted daemon serving the same live device must see every write
    /// the kernel was told is done). Persisting entries before their data
    /// is safe: a block handed out reads zeros until written (invariant 1
    /// of thin.rs), so an early entry reads as an absent write.
    pub fn write_through(&self, file: &File, first: u64, end: u64) -> io::Result<()> {
        let mut buf = [0u8; MAP_PAGE_BYTES];
        let mut block = first;
        while block < end {
            let page = (block >> PAGE_SHIFT) as usize;
            let stop = end.min(((page as u64) + 1) << PAGE_SHIFT);
            let n = (stop - block) as usize;
            let _copy = self.page_locks[page % PAGE_LOCKS].lock();
            for (i, out) in buf[..n * 8].chunks_exact_mut(8).enumerate() {
                out.copy_from_slice(&self.get(block + i as u64).0.to_le_bytes());
            }
            file.write_all_at(&buf[..n * 8], block * 8)?;
            block = stop;
        }
        Ok(())
    }

    /// Map pages needed for `nblocks` entries.
    pub fn pages_for(nblocks: u64) -> usize {
        usize::try_from(nblocks.div_ceil(ENTRIES_PER_PAGE as u64))
            .expect("map page count fits in usize")
    }

    /// Length of the map file for `nblocks` entries.
    pub fn file_len(nblocks: u64) -> u64 {
        Self::pages_for(nblocks) as u64 * MAP_PAGE_BYTES as u64
    }

    fn slot(&self, block: u64) -> Option<&AtomicU64> {
        let page = self.pages[(block >> PAGE_SHIFT) as usize].get()?;
        Some(&page[(block & PAGE_MASK) as usize])
    }

    fn slot_or_init(&self, block: u64) -> &AtomicU64 {
        let page = self.pages[(block >> PAGE_SHIFT) as usize].get_or_init(new_page);
        &page[(block & PAGE_MASK) as usize]
    }

    /// Whether the page holding `block` has ever been mapped into (in memory).
    #[cfg(test)]
    pub fn page_present(&self, block: u64) -> bool {
        self.pages[(block >> PAGE_SHIFT) as usize].get().is_some()
    }

    /// The entry of logical `block` (which must be < nblocks).
    #[inline]
    pub fn get(&self, block: u64) -> Entry {
        match self.slot(block) {
            Some(slot) => Entry(slot.load(Ordering::Acquire)),
            None => Entry::UNMAPPED,
        }
    }

    /// Map an unmapped `block` to `entry`. Exactly one of several racing
    /// callers succeeds; the others get the entry that won.
    pub fn try_map(&self, block: u64, entry: Entry) -> Result<(), Entry> {
        let slot = self.slot_or_init(block);
        match slot.compare_exchange(0, entry.0, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => {
                self.mark_dirty(block);
                Ok(())
            }
            Err(current) => Err(Entry(current)),
        }
    }

    /// Replace the entry `old` of `block` by `new`. Exactly one of several
    /// racing callers succeeds; the others get the entry that won.
    pub fn try_replace(&self, block: u64, old: Entry, new: Entry) -> Result<(), Entry> {
        let slot = self.slot_or_init(block);
        match slot.compare_exchange(old.0, new.0, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => {
                if old != new {
                    self.mark_dirty(block);
                }
                Ok(())
            }
            Err(current) => Err(Entry(current)),
        }
    }

    /// Set the entry of `block`, returning what it was. The caller must
    /// exclude IO on the block while doing this (the engine's stripe lock).
    pub fn swap(&self, block: u64, entry: Entry) -> Entry {
        let slot = match (entry, self.slot(block)) {
            (_, Some(slot)) => slot,
            (Entry::UNMAPPED, None) => return Entry::UNMAPPED,
            (_, None) => self.slot_or_init(block),
        };
        let old = Entry(slot.swap(entry.0, Ordering::AcqRel));
        if old != entry {
            self.mark_dirty(block);
        }
        old
    }

    /// Unmap `block`, returning what it was mapped to. The caller must
    /// exclude IO on the block while doing this (the engine's stripe lock).
    #[cfg(test)]
    pub fn unmap(&self, block: u64) -> Entry {
        self.swap(block, Entry::UNMAPPED)
    }

    /// Write every page holding an entry to `file` (positional writes, no
    /// sync): a copy of the whole map into a new sparse file of
    /// [`BlockMap::file_len`], costing what the map holds. The caller
    /// excludes changes to the map while it copies.
    pub fn write_all_pages(&self, file: &File) -> io::Result<()> {
        let mut buf = [0u8; MAP_PAGE_BYTES];
        for (page, entries) in self.pages.iter().enumerate() {
            let Some(entries) = entries.get() else {
                continue;
            };
            if entries.iter().all(|e| e.load(Ordering::Acquire) == 0) {
                continue; // mapped once, all unmapped since: leave a hole
            }
            self.write_page(file, page, &mut buf)?;
        }
        Ok(())
    }

    fn mark_dirty(&self, block: u64) {
        let page = block >> PAGE_SHIFT;
        self.dirty[(page / 64) as usize].fetch_or(1 << (page % 64), Ordering::AcqRel);
    }

    /// The first block in `[block, end)` whose entry is not unmapped,
    /// skipping pages never mapped into.
    pub fn next_entry(&self, mut block: u64, end: u64) -> Option<u64> {
        let end = end.min(self.nblocks);
        while block < end {
            let Some(page) = self.pages[(block >> PAGE_SHIFT) as usize].get() else {
                block = ((block >> PAGE_SHIFT) + 1) << PAGE_SHIFT;
                continue;
            };
            if page[(block & PAGE_MASK) as usize].load(Ordering::Acquire) != 0 {
                return Some(block);
            }
            block += 1;
        }
        None
    }

    /// Call `f(block, entry)` for every mapped entry, in block order.
    pub fn for_each_mapped(&self, mut f: impl FnMut(u64, Entry)) {
        for (p, page) in self.pages.iter().enumerate() {
            let Some(page) = page.get() else { continue };
            for (i, slot) in page.iter().enumerate() {
                let raw = slot.load(Ordering::Acquire);
                if raw != 0 {
                    f(((p as u64) << PAGE_SHIFT) | i as u64, Entry(raw));
                }
            }
        }
    }

    /// Write every page that changed since it was last written to `file`
    /// (positional writes; the caller syncs). Returns how many pages were
    /// written. A change racing with this call is either in the page
    /// written now or leaves the page dirty for the next call: the dirty
    /// bit is cleared before the page is read. On error the unwritten
    /// pages stay dirty.
    pub fn write_dirty(&self, file: &File) -> io::Result<usize> {
        let mut buf = [0u8; MAP_PAGE_BYTES];
        let mut written = 0;
        for (w, word) in self.dirty.iter().enumerate() {
            if word.load(Ordering::Relaxed) == 0 {
                continue;
            }
            let mut bits = word.swap(0, Ordering::AcqRel);
            while bits != 0 {
                let bit = bits.trailing_zeros();
                let page = w * 64 + bit as usize;
                if let Err(e) = self.write_page(file, page, &mut buf) {
                    // Keep this page and the rest of the word dirty.
                    word.fetch_or(bits, Ordering::AcqRel);
                    return Err(e);
                }
                bits &= bits - 1;
                written += 1;
            }
        }
        Ok(written)
    }

    fn write_page(
        &self,
        file: &File,
        page: usize,
        buf: &mut [u8; MAP_PAGE_BYTES],
    ) -> io::Result<()> {
        // A dirty page is always allocated (it was mapped into).
        let Some(entries) = self.pages[page].get() else {
            return Ok(());
        };
        let _copy = self.page_locks[page % PAGE_LOCKS].lock();
        for (slot, out) in entries.iter().zip(buf.chunks_exact_mut(8)) {
            out.copy_from_slice(&slot.load(Ordering::Acquire).to_le_bytes());
        }
        file.write_all_at(buf, page as u64 * MAP_PAGE_BYTES as u64)
    }

    /// Read an image's head map of `nblocks` entries from `file`, skipping
    /// holes, so the cost follows the written part of the map. Checks the
    /// file length and that entries past `nblocks` are zero; entry contents
    /// are checked by the caller. The file may be longer than `nblocks`
    /// needs, when a grow was interrupted after it extended the map and
    /// before it wrote the header (see `thin/grow.rs`): that tail must hold
    /// nothing.
    pub fn load(file: &File, path: &Path, nblocks: u64) -> Result<BlockMap, EngineError> {
        Self::load_inner(file, path, nblocks, false)
    }

    /// [`BlockMap::load`] for a frozen (snapshot) map, which may be shorter
    /// than `nblocks` needs: it was taken before the image grew, and its
    /// missing entries are unmapped.
    pub fn load_frozen(file: &File, path: &Path, nblocks: u64) -> Result<BlockMap, EngineError> {
        Self::load_inner(file, path, nblocks, true)
    }

    fn load_inner(
        file: &File,
        path: &Path,
        nblocks: u64,
        frozen: bool,
    ) -> Result<BlockMap, EngineError> {
        let io_err = |op: &'static str| {
            move |source: io::Error| EngineError::Io {
                op,
                path: path.to_path_buf(),
                source,
            }
        };
        let corrupt = |reason: String| EngineError::Corrupt {
            path: path.to_path_buf(),
            reason,
        };
        let expected = Self::file_len(nblocks);
        let len = file.metadata().map_err(io_err("stat"))?.len();
        let fits = if frozen {
            len <= expected && len % MAP_PAGE_BYTES as u64 == 0
        } else {
            len >= expected
        };
        if !fits {
            let want = if frozen { "at most" } else { "at least" };
            return Err(corrupt(format!(
                "map file is {len} bytes, expected {want} {expected} for {nblocks} blocks"
            )));
        }
        if len > expected {
            for (start, end) in data_extents(file, len).map_err(io_err("seek"))? {
                let (start, end) = (start.max(expected), end);
                if start >= end {
                    continue;
                }
                let mut tail = vec![0u8; (end - start) as usize];
                file.read_exact_at(&mut tail, start)
                    .map_err(io_err("read"))?;
                if tail.iter().any(|&b| b != 0) {
                    return Err(corrupt(format!(
                        "map file is {len} bytes, and holds entries past the {expected} \
                         that {nblocks} blocks need"
                    )));
                }
            }
        }
        let len = len.min(expected);
        let map = BlockMap::new(nblocks);
        const CHUNK: usize = 256 * MAP_PAGE_BYTES;
        let mut buf = vec![0u8; CHUNK];
        // Pages already read: extents may share a partly written page.
        let mut done: u64 = 0;
        for (start, end) in data_extents(file, len).map_err(io_err("seek"))? {
            let mut at = (start - start % MAP_PAGE_BYTES as u64).max(done);
            let stop = end.div_ceil(MAP_PAGE_BYTES as u64) * MAP_PAGE_BYTES as u64;
            let stop = stop.min(len);
            while at < stop {
                let n = ((stop - at) as usize).min(CHUNK);
                file.read_exact_at(&mut buf[..n], at)
                    .map_err(io_err("read"))?;
                for (i, page_bytes) in buf[..n].chunks_exact(MAP_PAGE_BYTES).enumerate() {
                    let page = (at / MAP_PAGE_BYTES as u64) as usize + i;
                    map.fill_page(page, page_bytes).map_err(corrupt)?;
                }
                at += n as u64;
            }
            done = done.max(stop);
        }
        Ok(map)
    }

    fn fill_page(&self, page: usize, bytes: &[u8]) -> Result<(), String> {
        if bytes.iter().all(|&b| b == 0) {
            return Ok(());
        }
        let first = (page as u64) << PAGE_SHIFT;
        let entries = self.pages[page].get_or_init(new_page);
        for (i, (slot, raw)) in entries.iter().zip(bytes.chunks_exact(8)).enumerate() {
            let mut b = [0u8; 8];
            b.copy_from_slice(raw);
            let raw = u64::from_le_bytes(b);
            if raw != 0 && first + i as u64 >= self.nblocks {
                return Err(format!(
                    "map entry for block {} beyond the last block {}",
                    first + i as u64,
                    self.nblocks - 1
                ));
            }
            slot.store(raw, Ordering::Relaxed);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_encoding() {
        assert_eq!(Entry::UNMAPPED.phys(), None);
        assert_eq!(Entry::mapped(0).raw(), 1);
        assert_eq!(Entry::mapped(41).phys(), Some(41));
        assert_eq!(Entry::mapped(Entry::MAX_PHYS).phys(), Some(Entry::MAX_PHYS));
        let flagged = Entry::from_raw(Entry::mapped(7).raw() | (3 << 48));
        assert_eq!(flagged.phys(), Some(7));
        assert_eq!(flagged.flags(), 3);
        assert!(!flagged.is_valid(true));
        assert_eq!(Entry::ZERO.phys(), None);
        assert_eq!(Entry::ZERO.flags(), Entry::FLAG_ZERO);
        assert!(Entry::ZERO.is_valid(true) && !Entry::ZERO.is_valid(false));
        // ZERO with a physical block is malformed.
        assert!(!Entry::from_raw(Entry::ZERO.raw() | 5).is_valid(true));
        assert!(Entry::mapped(3).is_valid(false) && Entry::UNMAPPED.is_valid(false));
    }

    #[test]
    fn map_cas_unmap_and_persist() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("map");
        let nblocks = 3 * ENTRIES_PER_PAGE as u64 + 5;
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        file.set_len(BlockMap::file_len(nblocks)).unwrap();

        let map = BlockMap::new(nblocks);
        assert!(map.try_map(3, Entry::mapped(10)).is_ok());
        assert_eq!(map.try_map(3, Entry::mapped(11)), Err(Entry::mapped(10)));
        assert!(map.try_map(nblocks - 1, Entry::mapped(12)).is_ok());
        assert!(map.try_map(700, Entry::mapped(13)).is_ok());
        assert_eq!(map.unmap(700), Entry::mapped(13));
        assert_eq!(map.unmap(700), Entry::UNMAPPED);
        assert!(!map.page_present(2 * ENTRIES_PER_PAGE as u64));
        assert_eq!(map.write_dirty(&file).unwrap(), 3);
        assert_eq!(map.write_dirty(&file).unwrap(), 0);

        let loaded = BlockMap::load(&file, &path, nblocks).unwrap();
        let mut seen = Vec::new();
        loaded.for_each_mapped(|b, e| seen.push((b, e.phys().unwrap())));
        assert_eq!(seen, vec![(3, 10), (nblocks - 1, 12)]);
        // The never-written page stays unallocated after a load.
        assert!(!loaded.page_present(2 * ENTRIES_PER_PAGE as u64));

        // A stray entry past the last block is corruption.
        let mut stray = [0u8; 8];
        stray.copy_from_slice(&Entry::mapped(1).raw().to_le_bytes());
        file.write_all_at(&stray, BlockMap::file_len(nblocks) - 8)
            .unwrap();
        assert!(matches!(
            BlockMap::load(&file, &path, nblocks),
            Err(EngineError::Corrupt { .. })
        ));
    }
}

//! The physical block allocator of a thin image.
//!
//! A bitmap of physical blocks below the high-water mark (`next`): a set bit
//! is a block that is referenced by the map, or was freed but is not
//! reusable yet. New blocks come from the lowest clear bit at or after a
//! roving cursor (next fit), or, when no bit is clear, from the high-water
//! mark. A block freed by a discard is *deferred*: it stays set until the
//! flush that makes its unmapping durable releases it ([`PhysAlloc::take_pending`]
//! / [`PhysAlloc::release`]), so an on-disk map can never point at a block
//! that was handed to another logical block.
//!
//! The bitmap is rebuilt from the map on open; the allocator itself is never
//! persisted. All methods take one short mutex: allocation only happens on
//! the first write to a logical block, never on the IO path of mapped blocks.

use parking_lot::Mutex;

pub(crate) struct PhysAlloc {
    inner: Mutex<Inner>,
}

struct Inner {
    /// One bit per physical block below `next`.
    used: Vec<u64>,
    /// High-water mark: blocks at or above it were never handed out.
    next: u64,
    /// Clear bits below `next`.
    free: u64,
    /// Where the next search for a clear bit starts (a word index).
    cursor: usize,
    /// Freed blocks waiting for the flush that makes their unmapping durable.
    pending: Vec<u64>,
    /// Blocks at or above this are never handed out.
    limit: u64,
}

impl PhysAlloc {
    /// An allocator whose referenced blocks are the set bits of `used`
    /// (blocks below `next`; bits at or above `next` must be clear).
    pub fn new(used: Vec<u64>, next: u64, limit: u64) -> PhysAlloc {
        let set: u64 = used.iter().map(|w| u64::from(w.count_ones())).sum();
        debug_assert!(set <= next);
        PhysAlloc {
            inner: Mutex::new(Inner {
                used,
                next,
                free: next - set,
                cursor: 0,
                pending: Vec::new(),
                limit,
            }),
        }
    }

    /// Hand out one physical block, or `None` when the address space is exhausted.
    pub fn alloc(&self) -> Option<u64> {
        let mut inner = self.inner.lock();
        if inner.free > 0 {
            if let Some(block) = inner.take_clear_bit() {
                return Some(block);
            }
        }
        if inner.next >= inner.limit {
            return None;
        }
        let block = inner.next;
        inner.next += 1;
        inner.set(block);
        Some(block)
    }

    /// Return a block that was handed out but never published in the map
    /// nor written: it is reusable at once.
    pub fn give_back(&self, block: u64) {
        let mut inner = self.inner.lock();
        inner.clear(block);
    }

    /// Free blocks whose unmapping is not durable yet: they become reusable
    /// when a later flush hands them to [`PhysAlloc::release`].
    pub fn defer_free(&self, blocks: impl IntoIterator<Item = u64>) {
        self.inner.lock().pending.extend(blocks);
    }

    /// Take the deferred blocks, at the start of a flush.
    pub fn take_pending(&self) -> Vec<u64> {
        std::mem::take(&mut self.inner.lock().pending)
    }

    /// Put back blocks taken by [`PhysAlloc::take_pending`] when the flush failed.
    pub fn restore_pending(&self, blocks: Vec<u64>) {
        self.inner.lock().pending.extend(blocks);
    }

    /// Make blocks reusable, once the flush that unmapped them is durable.
    pub fn release(&self, blocks: Vec<u64>) {
        let mut inner = self.inner.lock();
        for block in blocks {
            inner.clear(block);
        }
    }

    /// Whether `block` is referenced or deferred (not free).
    #[cfg(test)]
    pub fn is_used(&self, block: u64) -> bool {
        let inner = self.inner.lock();
        let w = (block / 64) as usize;
        w < inner.used.len() && inner.used[w] & (1 << (block % 64)) != 0
    }

    /// Runs `(first, count)` of free blocks in `[start, end)`, in order
    /// (one lock for the whole scan; full words are skipped).
    pub fn free_runs(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let inner = self.inner.lock();
        let mut runs: Vec<(u64, u64)> = Vec::new();
        let mut block = start;
        while block < end {
            let word = inner.used.get((block / 64) as usize).copied().unwrap_or(0);
            if word == u64::MAX && block % 64 == 0 {
                block += 64;
                continue;
            }
            if word & (1 << (block % 64)) == 0 {
                match runs.last_mut() {
                    Some((first, count)) if *first + *count == block => *count += 1,
                    _ => runs.push((block, 1)),
                }
            }
            block += 1;
        }
        runs
    }

    /// The high-water mark (physical blocks ever handed out since open).
    #[cfg(test)]
    pub fn high_water(&self) -> u64 {
        self.inner.lock().next
    }
}

impl Inner {
    fn set(&mut self, block: u64) {
        let w = (block / 64) as usize;
        if w >= self.used.len() {
            let grow = (self.used.len() * 2).max(w + 1);
            self.used.resize(grow, 0);
        }
        debug_assert_eq!(
            self.used[w] & (1 << (block % 64)),
            0,
            "block {block} handed out twice"
        );
        self.used[w] |= 1 << (block % 64);
    }

    fn clear(&mut self, block: u64) {
        let w = (block / 64) as usize;
        let bit = 1u64 << (block % 64);
        debug_assert_ne!(self.used[w] & bit, 0, "block {block} freed twice");
        if self.used[w] & bit != 0 {
            self.used[w] &= !bit;
            self.free += 1;
            if w < self.cursor {
                self.cursor = w;
            }
        }
    }

    /// The first clear bit below `next` at or after the cursor, wrapping once.
    fn take_clear_bit(&mut self) -> Option<u64> {
        let words = self.next.div_ceil(64) as usize;
        let start = self.cursor.min(words);
        for w in (start..words).chain(0..start) {
            let word = self.used[w];
            if word == u64::MAX {
                continue;
            }
            let block = w as u64 * 64 + u64::from((!word).trailing_zeros());
            if block >= self.next {
                continue;
            }
            self.used[w] |= 1 << (block % 64);
            self.free -= 1;
            self.cursor = w;
            return Some(block);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_fresh_then_reuses_released() {
        let a = PhysAlloc::new(Vec::new(), 0, 1000);
        let got: Vec<u64> = (0..130).map(|_| a.alloc().unwrap()).collect();
        assert_eq!(got, (0..130).collect::<Vec<_>>());
        a.defer_free([5, 70]);
        // Deferred blocks are not reused before release.
        assert_eq!(a.alloc(), Some(130));
        let pending = a.take_pending();
        assert_eq!(pending, vec![5, 70]);
        a.release(pending);
        assert_eq!(a.alloc(), Some(5));
        assert_eq!(a.alloc(), Some(70));
        assert_eq!(a.alloc(), Some(131));
        a.give_back(131);
        assert_eq!(a.alloc(), Some(131));
        a.defer_free([0, 1, 2, 64, 100]);
        a.release(a.take_pending());
        assert_eq!(
            a.free_runs(0, 200),
            vec![(0, 3), (64, 1), (100, 1), (132, 68)]
        );
        assert_eq!(a.free_runs(1, 65), vec![(1, 2), (64, 1)]);
        assert!(a.is_used(3) && !a.is_used(64));
    }

    #[test]
    fn rebuilt_bitmap_hands_out_holes_and_respects_limit() {
        // Blocks 0, 2, 3 referenced; 1 free; next = 4.
        let a = PhysAlloc::new(vec![0b1101], 4, 6);
        assert_eq!(a.alloc(), Some(1));
        assert_eq!(a.alloc(), Some(4));
        assert_eq!(a.alloc(), Some(5));
        assert_eq!(a.alloc(), None);
        assert_eq!(a.high_water(), 6);
    }
}

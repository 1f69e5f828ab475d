//! The physical block allocator of a thin image.
//!
//! A bitmap of physical blocks below the high-water mark (`next`): a set bit
//! is a block that is referenced by the map, or was freed but is not
//! reusable yet. The engine asks first for a *given* block
//! ([`AllocGuard::claim`]: identity placement, physical == logical), and
//! otherwise for any block ([`AllocGuard::alloc`]): the lowest clear bit at
//! or after a roving cursor (next fit), or, when no bit is clear, the
//! high-water mark. Claiming a block at or above the high-water mark moves
//! the mark past it; the blocks skipped become free. Copies (copy-on-write)
//! take blocks above the identity homes ([`AllocGuard::alloc_above`]), the
//! copies of consecutive blocks of one write a run of them when one is free
//! ([`AllocGuard::alloc_run_above`]), so that they stay one system call.
//!
//! A block freed by a discard is *deferred*: it stays set until the flush
//! that makes its unmapping durable releases it ([`PhysAlloc::take_pending`]
//! / [`PhysAlloc::release`]), so an on-disk map can never point at a block
//! that was handed to another logical block. A deferred block freed from
//! the logical block of the same index (an identity mapping) may be
//! *revived* by that same logical block ([`AllocGuard::revive`]) before it
//! is released: it then stays set, and the flush that took it skips it.
//! Deferred blocks are tracked by bitmaps (waiting for a flush / taken by
//! the flush in progress / revivable); the lists handed to a flush may hold
//! stale entries (revived blocks), which the bitmaps filter out.
//!
//! The bitmap is rebuilt from the map on open; the allocator itself is never
//! persisted. All methods take one short mutex: allocation only happens on
//! the first write to a logical block, never on the IO path of mapped blocks.
//! The engine holds that mutex ([`PhysAlloc::lock`]) across the check that
//! a logical block is unmapped, the choice of its physical block and the
//! publication of the mapping, so every first mapping is decided by one
//! thread and racing writers of one block agree on its identity placement.

use parking_lot::{Mutex, MutexGuard};

pub(crate) struct PhysAlloc {
    inner: Mutex<Inner>,
}

/// The allocator, locked: see [`PhysAlloc::lock`].
pub(crate) struct AllocGuard<'a>(MutexGuard<'a, Inner>);

/// A growable bitmap (clear past its end).
#[derive(Default)]
struct Bits(Vec<u64>);

impl Bits {
    #[inline]
    fn get(&self, bit: u64) -> bool {
        self.0
            .get((bit / 64) as usize)
            .is_some_and(|w| w & (1 << (bit % 64)) != 0)
    }

    fn set(&mut self, bit: u64) {
        let w = (bit / 64) as usize;
        if w >= self.0.len() {
            let grow = (self.0.len() * 2).max(w + 1);
            self.0.resize(grow, 0);
        }
        self.0[w] |= 1 << (bit % 64);
    }

    fn clear(&mut self, bit: u64) {
        if let Some(w) = self.0.get_mut((bit / 64) as usize) {
            *w &= !(1 << (bit % 64));
        }
    }
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
    /// Freed blocks waiting for the flush that makes their unmapping
    /// durable (entries whose `waiting` bit is clear are stale).
    pending: Vec<u64>,
    /// Deferred blocks not yet taken by a flush.
    waiting: Bits,
    /// Deferred blocks taken by the flush in progress.
    taken: Bits,
    /// Deferred blocks freed from the logical block of the same index.
    own: Bits,
    /// Blocks at or above this are never handed out.
    limit: u64,
    /// Where [`AllocGuard::alloc_above`] searches from (its `min`, kept).
    hi_base: u64,
    /// Where its next search starts (a word index).
    hi_cursor: usize,
    /// A block at or above `hi_base` may be clear below `next`: false
    /// after a search found none, until one is cleared.
    hi_hint: bool,
    /// The shortest run [`AllocGuard::alloc_run_above`] searched for and
    /// did not find, until a block at or above `hi_base` is cleared: a
    /// longer one is not searched for either.
    hi_run_missing: u64,
}

impl PhysAlloc {
    /// An allocator whose referenced blocks are the set bits of `used`
    /// (blocks below `next`; bits at or above `next` must be clear).
    pub fn new(mut used: Vec<u64>, next: u64, limit: u64) -> PhysAlloc {
        let set: u64 = used.iter().map(|w| u64::from(w.count_ones())).sum();
        debug_assert!(set <= next);
        let words = next.div_ceil(64) as usize;
        if used.len() < words {
            used.resize(words, 0);
        }
        PhysAlloc {
            inner: Mutex::new(Inner {
                used,
                next,
                free: next - set,
                cursor: 0,
                pending: Vec::new(),
                waiting: Bits::default(),
                taken: Bits::default(),
                own: Bits::default(),
                limit,
                hi_base: u64::MAX,
                hi_cursor: 0,
                hi_hint: true,
                hi_run_missing: u64::MAX,
            }),
        }
    }

    /// Lock the allocator, for several decisions in a row.
    pub fn lock(&self) -> AllocGuard<'_> {
        AllocGuard(self.inner.lock())
    }

    /// Hand out one physical block, or `None` when the address space is exhausted.
    #[cfg(test)]
    pub fn alloc(&self) -> Option<u64> {
        self.lock().alloc()
    }

    /// Return a block that was handed out but never published in the map
    /// nor written: it is reusable at once.
    #[cfg(test)]
    pub fn give_back(&self, block: u64) {
        self.lock().give_back(block)
    }

    /// Free blocks whose unmapping is not durable yet: they become reusable
    /// when a later flush hands them to [`PhysAlloc::release`].
    pub fn defer_free(&self, blocks: impl IntoIterator<Item = u64>) {
        self.inner.lock().defer(blocks, false);
    }

    /// [`PhysAlloc::defer_free`] for blocks each freed from the logical
    /// block of the same index: that logical block may revive its own.
    pub fn defer_free_own(&self, blocks: impl IntoIterator<Item = u64>) {
        self.inner.lock().defer(blocks, true);
    }

    /// Take the deferred blocks, at the start of a flush. They stay
    /// unusable until [`PhysAlloc::release`] (or go back to waiting with
    /// [`PhysAlloc::restore_pending`]); a block revived meanwhile is skipped
    /// by both.
    pub fn take_pending(&self) -> Vec<u64> {
        let mut guard = self.inner.lock();
        let inner = &mut *guard;
        let mut pending = std::mem::take(&mut inner.pending);
        pending.retain(|&block| {
            if !inner.waiting.get(block) {
                return false; // revived, or listed twice
            }
            inner.waiting.clear(block);
            inner.taken.set(block);
            true
        });
        pending
    }

    /// Put back blocks taken by [`PhysAlloc::take_pending`] when the flush failed.
    pub fn restore_pending(&self, blocks: Vec<u64>) {
        let mut inner = self.inner.lock();
        for block in blocks {
            if inner.taken.get(block) {
                inner.taken.clear(block);
                inner.waiting.set(block);
                inner.pending.push(block);
            }
        }
    }

    /// Make blocks reusable, once the flush that unmapped them is durable.
    pub fn release(&self, blocks: Vec<u64>) {
        let mut inner = self.inner.lock();
        for block in blocks {
            if inner.taken.get(block) {
                inner.taken.clear(block);
                inner.own.clear(block);
                inner.clear(block);
            }
        }
    }

    /// Whether `block` is referenced or deferred (not free).
    #[cfg(test)]
    pub fn is_used(&self, block: u64) -> bool {
        self.inner.lock().is_set(block)
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

    /// The high-water mark: one past the highest block ever handed out
    /// (or referenced at open).
    pub fn high_water(&self) -> u64 {
        self.inner.lock().next
    }
}

impl AllocGuard<'_> {
    /// Hand out `block` itself if it is free (identity placement).
    pub fn claim(&mut self, block: u64) -> bool {
        let inner = &mut *self.0;
        if block >= inner.limit || inner.is_set(block) {
            return false;
        }
        if block < inner.next {
            inner.free -= 1;
        } else {
            inner.free += block - inner.next;
            inner.next = block + 1;
        }
        inner.set(block);
        true
    }

    /// Take back a deferred block freed from the logical block of the same
    /// index, for that logical block: it stays used, and is no longer
    /// released by a flush.
    pub fn revive(&mut self, block: u64) -> bool {
        let inner = &mut *self.0;
        if !inner.own.get(block) || !(inner.waiting.get(block) || inner.taken.get(block)) {
            return false;
        }
        debug_assert!(inner.is_set(block));
        inner.own.clear(block);
        inner.waiting.clear(block);
        inner.taken.clear(block);
        true
    }

    /// Hand out any free block (next fit, then the high-water mark), or
    /// `None` when the address space is exhausted.
    pub fn alloc(&mut self) -> Option<u64> {
        let inner = &mut *self.0;
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

    /// Hand out a free block at or above `min` (next fit there, then the
    /// high-water mark, then `min` itself), or `None` when the address
    /// space is exhausted. Copy-on-write takes its blocks here: below
    /// `min` (the device's block count) lie the identity homes of logical
    /// blocks (the snapshot's copy already holds this block's own).
    /// Callers pass the same `min` every time.
    pub fn alloc_above(&mut self, min: u64) -> Option<u64> {
        let inner = &mut *self.0;
        inner.set_hi_base(min);
        if inner.next > min && inner.hi_hint {
            if let Some(block) = inner.take_clear_bit_above(min) {
                return Some(block);
            }
            inner.hi_hint = false;
        }
        if inner.next >= inner.limit {
            return None;
        }
        if inner.next >= min {
            let block = inner.next;
            inner.next += 1;
            inner.set(block);
            return Some(block);
        }
        self.claim(min).then_some(min)
    }

    /// Hand out up to `want` free blocks in a row at or above `min`, for
    /// the copies of consecutive logical blocks (one system call then
    /// writes them all, and will again once they are mapped): a run of
    /// `want` free blocks found by next fit from where the last search
    /// stopped, else the run at the high-water mark (or at `min`, when
    /// the mark is below it); when that passes the limit, one block as
    /// [`AllocGuard::alloc_above`] gives it. Returns (first block, count),
    /// or `None` when the address space is exhausted. Callers pass the
    /// same `min` every time (the one of `alloc_above`).
    pub fn alloc_run_above(&mut self, min: u64, want: u64) -> Option<(u64, u64)> {
        if want <= 1 {
            return self.alloc_above(min).map(|block| (block, 1));
        }
        let inner = &mut *self.0;
        inner.set_hi_base(min);
        if inner.next > min && inner.hi_hint && want < inner.hi_run_missing {
            if let Some(first) = inner.take_clear_run_above(min, want) {
                return Some((first, want));
            }
            inner.hi_run_missing = want;
        }
        let first = inner.next.max(min);
        if first + want <= inner.limit {
            // The blocks skipped below `min`, if any, become free.
            inner.free += first - inner.next;
            inner.next = first + want;
            for block in first..first + want {
                inner.set(block);
            }
            return Some((first, want));
        }
        self.alloc_above(min).map(|block| (block, 1))
    }

    /// See [`PhysAlloc::give_back`].
    pub fn give_back(&mut self, block: u64) {
        self.0.clear(block);
    }

    /// Defer `block` again (undo a [`AllocGuard::revive`] whose mapping
    /// was not published).
    pub fn defer_own(&mut self, block: u64) {
        self.0.defer([block], true);
    }
}

impl Inner {
    fn is_set(&self, block: u64) -> bool {
        let w = (block / 64) as usize;
        w < self.used.len() && self.used[w] & (1 << (block % 64)) != 0
    }

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
            if block >= self.hi_base {
                self.hi_hint = true;
                self.hi_run_missing = u64::MAX;
                self.hi_cursor = self.hi_cursor.min(w);
            }
        }
    }

    fn defer(&mut self, blocks: impl IntoIterator<Item = u64>, own: bool) {
        for block in blocks {
            debug_assert!(self.is_set(block), "deferring free block {block}");
            debug_assert!(
                !self.waiting.get(block) && !self.taken.get(block),
                "block {block} deferred twice"
            );
            self.waiting.set(block);
            if own {
                self.own.set(block);
            }
            self.pending.push(block);
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

impl Inner {
    /// Searches above `min` from now on (see [`AllocGuard::alloc_above`]).
    fn set_hi_base(&mut self, min: u64) {
        if self.hi_base != min {
            self.hi_base = min;
            self.hi_cursor = (min / 64) as usize;
            self.hi_hint = true;
            self.hi_run_missing = u64::MAX;
        }
    }

    /// The first run of `want` clear bits in `[min, next)` at or after the
    /// high cursor, wrapping once (a run across the wrap is not seen);
    /// sets them and returns the first. A few word operations per word.
    fn take_clear_run_above(&mut self, min: u64, want: u64) -> Option<u64> {
        let words = self.next.div_ceil(64) as usize;
        let first = (min / 64) as usize;
        let start = self.hi_cursor.clamp(first, words);
        for (from, to) in [(start, words), (first, start)] {
            // The clear bits in a row up to the word looked at.
            let (mut run_start, mut run) = (0u64, 0u64);
            for w in from..to {
                let base = w as u64 * 64;
                let mut word = self.used[w];
                if w == first {
                    word |= (1u64 << (min % 64)) - 1; // below min: not ours
                }
                if base + 64 > self.next {
                    word |= u64::MAX << (self.next - base); // not handed out yet
                }
                let free = !word;
                // The run so far goes on with the clear bits at the bottom.
                let low = u64::from(free.trailing_ones());
                if run == 0 {
                    run_start = base;
                }
                let found = if run + low >= want {
                    Some(run_start)
                } else if want <= 64 {
                    // Bit i of `inside` is set when bits i..i + want are clear.
                    let (mut inside, mut len) = (free, 1);
                    while len < want {
                        let shift = len.min(want - len);
                        inside &= inside >> shift;
                        len += shift;
                    }
                    (inside != 0).then(|| base + u64::from(inside.trailing_zeros()))
                } else {
                    None
                };
                if let Some(block) = found {
                    for b in block..block + want {
                        self.used[(b / 64) as usize] |= 1 << (b % 64);
                    }
                    self.free -= want;
                    self.hi_cursor = w;
                    return Some(block);
                }
                if low == 64 {
                    run += 64;
                } else {
                    run = u64::from(free.leading_ones());
                    run_start = base + 64 - run;
                }
            }
        }
        None
    }

    /// The first clear bit in `[min, next)` at or after the high cursor,
    /// wrapping once.
    fn take_clear_bit_above(&mut self, min: u64) -> Option<u64> {
        let words = self.next.div_ceil(64) as usize;
        let first = (min / 64) as usize;
        let start = self.hi_cursor.clamp(first, words);
        for w in (start..words).chain(first..start) {
            let mut word = self.used[w];
            if w == first {
                word |= (1u64 << (min % 64)) - 1; // below min: not ours
            }
            if word == u64::MAX {
                continue;
            }
            let block = w as u64 * 64 + u64::from((!word).trailing_zeros());
            if block >= self.next {
                continue;
            }
            self.used[w] |= 1 << (block % 64);
            self.free -= 1;
            self.hi_cursor = w;
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

    #[test]
    fn claim_takes_a_given_block_and_moves_the_high_water_mark() {
        let a = PhysAlloc::new(Vec::new(), 0, 1000);
        let mut g = a.lock();
        assert!(g.claim(100));
        assert!(!g.claim(100), "claimed twice");
        assert!(!g.claim(1000), "claimed past the limit");
        drop(g);
        assert_eq!(a.high_water(), 101);
        // The blocks skipped are free, below the mark: next fit finds them.
        assert_eq!(a.alloc(), Some(0));
        assert!(a.lock().claim(50));
        assert_eq!(a.free_runs(0, 102), vec![(1, 49), (51, 49), (101, 1)]);
        assert!(a.is_used(100) && a.is_used(50) && !a.is_used(49));
    }

    #[test]
    fn alloc_above_leaves_the_identity_homes_alone() {
        let a = PhysAlloc::new(Vec::new(), 0, 1000);
        assert!(a.lock().claim(3));
        // The high-water mark is below min: min itself, then onwards.
        assert_eq!(a.lock().alloc_above(100), Some(100));
        assert_eq!(a.lock().alloc_above(100), Some(101));
        assert_eq!(a.lock().alloc_above(100), Some(102));
        // A released block at or above min is found again; blocks below
        // min never are.
        a.defer_free([101]);
        a.release(a.take_pending());
        assert_eq!(a.lock().alloc_above(100), Some(101));
        assert_eq!(a.lock().alloc_above(100), Some(103));
        assert!(!a.is_used(0) && !a.is_used(50));
        // Plain allocation still fills the holes below.
        assert_eq!(a.alloc(), Some(0));
        // The limit holds.
        let b = PhysAlloc::new(Vec::new(), 0, 10);
        assert_eq!(b.lock().alloc_above(9), Some(9));
        assert_eq!(b.lock().alloc_above(9), None);
    }

    #[test]
    fn alloc_run_above_finds_a_run_or_takes_one_at_the_high_water_mark() {
        let a = PhysAlloc::new(Vec::new(), 0, 1000);
        // Below min: the run starts at min.
        assert_eq!(a.lock().alloc_run_above(100, 4), Some((100, 4)));
        assert_eq!(a.high_water(), 104);
        assert!((100..104).all(|b| a.is_used(b)) && !a.is_used(99));
        // At the high-water mark.
        assert_eq!(a.lock().alloc_run_above(100, 200), Some((104, 200)));
        // Free single blocks and a run of 70 (across words) above min.
        a.defer_free([110, 120]);
        a.defer_free(200..270);
        a.release(a.take_pending());
        // Too long for any hole: at the mark; the holes stay free.
        assert_eq!(a.lock().alloc_run_above(100, 71), Some((304, 71)));
        assert!(!a.is_used(110) && !a.is_used(200));
        // A run of 70 fits the hole exactly; the single holes are skipped.
        assert_eq!(a.lock().alloc_run_above(100, 70), Some((200, 70)));
        assert!((200..270).all(|b| a.is_used(b)));
        // Single blocks (want 1) take the holes.
        assert_eq!(a.lock().alloc_run_above(100, 1), Some((110, 1)));
        // A run of 2 finds no hole (known after one search): the mark.
        assert_eq!(a.lock().alloc_run_above(100, 2), Some((375, 2)));
        assert_eq!(a.lock().alloc_run_above(100, 3), Some((377, 3)));
        // Freeing makes runs findable again.
        a.defer_free(130..133);
        a.release(a.take_pending());
        assert_eq!(a.lock().alloc_run_above(100, 3), Some((130, 3)));
        // Near the limit: what fits, else single blocks, else nothing.
        let b = PhysAlloc::new(Vec::new(), 0, 10);
        assert_eq!(b.lock().alloc_run_above(5, 4), Some((5, 4)));
        assert_eq!(b.lock().alloc_run_above(5, 4), Some((9, 1)));
        assert_eq!(b.lock().alloc_run_above(5, 4), None);
        // Blocks below min are never part of a run.
        let c = PhysAlloc::new(vec![0, 0], 128, 1000);
        assert_eq!(c.lock().alloc_run_above(60, 10), Some((60, 10)));
        assert!(!c.is_used(59));
    }

    #[test]
    fn alloc_run_above_takes_the_first_free_run_of_a_random_bitmap() {
        let mut rng = crate::engine::pattern::Rng(5);
        for _ in 0..2000 {
            let next = 1 + rng.below(700);
            let density = rng.below(100);
            let mut used = vec![0u64; next.div_ceil(64) as usize];
            for b in 0..next {
                if rng.below(100) < density {
                    used[(b / 64) as usize] |= 1 << (b % 64);
                }
            }
            let (min, want) = (rng.below(next + 10), 1 + rng.below(150));
            let clear = |b: u64| used[(b / 64) as usize] & (1 << (b % 64)) == 0;
            let expect = (min..next.saturating_sub(want - 1))
                .find(|&s| (s..s + want).all(clear))
                .unwrap_or(next.max(min));
            let a = PhysAlloc::new(used.clone(), next, 10_000);
            let got = a.lock().alloc_run_above(min, want);
            assert_eq!(
                got,
                Some((expect, want)),
                "next {next} min {min} want {want}"
            );
            assert!((expect..expect + want).all(|b| a.is_used(b)));
        }
    }

    #[test]
    fn revive_own_deferred_block_survives_the_flush_that_took_it() {
        let a = PhysAlloc::new(Vec::new(), 0, 1000);
        for b in [3, 4, 5, 9] {
            assert!(a.lock().claim(b));
        }
        a.defer_free_own([3, 4]);
        a.defer_free([9]);
        // Not own: never revived (another logical block freed it).
        assert!(!a.lock().revive(9));
        // Waiting for a flush: revived, and the flush skips it.
        assert!(a.lock().revive(3));
        assert!(!a.lock().revive(3), "revived twice");
        // Freed again before the flush: listed twice, taken once.
        a.defer_free_own([3]);
        let taken = a.take_pending();
        assert_eq!(taken, vec![3, 4, 9]);
        // Taken by the flush in progress: revived; release skips it.
        assert!(a.lock().revive(4));
        a.release(taken);
        assert!(a.is_used(4), "revived block released by the flush");
        assert!(!a.is_used(3) && !a.is_used(9));
        assert!(a.is_used(5));
        // A failed flush puts back only what is still deferred.
        a.defer_free_own([5]);
        let taken = a.take_pending();
        assert_eq!(taken, vec![5]);
        a.restore_pending(taken);
        assert!(a.lock().revive(5));
        assert_eq!(a.take_pending(), Vec::<u64>::new());
        assert!(a.is_used(5));
        // Released blocks are free again, and no longer revivable.
        a.defer_free_own([5]);
        a.release(a.take_pending());
        assert!(!a.lock().revive(5));
        assert!(a.lock().claim(5));
    }
}

//! Exclusive locks on ranges of units. A write holds its range while it is
//! applied to every replica, and the resync holds the run it copies, so a
//! copy never interleaves with a write to the same range (and overlapping
//! writes reach every replica in the same order). Writes to other ranges
//! proceed.

use parking_lot::{Condvar, Mutex};

#[derive(Default)]
pub struct RangeLocks {
    held: Mutex<Vec<(u64, u64)>>,
    released: Condvar,
}

/// A held range; released on drop.
pub struct RangeGuard<'a> {
    locks: &'a RangeLocks,
    range: (u64, u64),
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.1 && b.0 < a.1
}

impl RangeLocks {
    pub fn new() -> RangeLocks {
        RangeLocks::default()
    }

    /// Wait until `start..end` overlaps no held range, then hold it. An
    /// empty range is widened to one unit so it still orders.
    pub fn lock(&self, start: u64, end: u64) -> RangeGuard<'_> {
        let range = (start, end.max(start + 1));
        let mut held = self.held.lock();
        while held.iter().any(|&h| overlaps(h, range)) {
            self.released.wait(&mut held);
        }
        held.push(range);
        RangeGuard { locks: self, range }
    }

    /// Hold `start..end` if nothing overlapping is held.
    #[cfg(test)]
    pub fn try_lock(&self, start: u64, end: u64) -> Option<RangeGuard<'_>> {
        let range = (start, end.max(start + 1));
        let mut held = self.held.lock();
        if held.iter().any(|&h| overlaps(h, range)) {
            return None;
        }
        held.push(range);
        Some(RangeGuard { locks: self, range })
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut held = self.locks.held.lock();
        if let Some(i) = held.iter().position(|&h| h == self.range) {
            held.swap_remove(i);
        }
        drop(held);
        self.locks.released.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    #[test]
    fn overlapping_ranges_exclude_each_other() {
        let l = RangeLocks::new();
        let a = l.lock(0, 4);
        assert!(l.try_lock(3, 5).is_none());
        assert!(l.try_lock(0, 0).is_none(), "an empty range still orders");
        let b = l.try_lock(4, 8).expect("adjacent ranges do not overlap");
        drop(a);
        assert!(l.try_lock(0, 4).is_some());
        assert!(l.try_lock(7, 9).is_none());
        drop(b);
        assert!(l.try_lock(0, 100).is_some());
    }

    #[test]
    fn a_waiter_gets_the_range_when_it_is_released() {
        let l = Arc::new(RangeLocks::new());
        let g = l.lock(10, 20);
        let got = Arc::new(AtomicBool::new(false));
        let t = {
            let (l, got) = (l.clone(), got.clone());
            std::thread::spawn(move || {
                let _g = l.lock(15, 16);
                got.store(true, Ordering::SeqCst);
            })
        };
        // A disjoint range is not held up by the waiter.
        drop(l.lock(0, 10));
        assert!(!got.load(Ordering::SeqCst));
        drop(g);
        t.join().unwrap();
        assert!(got.load(Ordering::SeqCst));
    }
}

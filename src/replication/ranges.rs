//! Exclusive locks on ranges of units. A write holds its range while it is
//! applied to every replica, and the resync holds the run it copies, so a
//! copy never interleaves with a write to the same range (and overlapping
//! writes reach every replica in the same order). Writes to other ranges
//! proceed.
//!
//! Overlapping requests are served in the order they came: a waiter holds
//! off later requests that overlap it. Otherwise a wide range (a snapshot
//! locks the whole device) would wait for as long as narrow writes keep
//! coming, each taking its range while another's is still held.

use parking_lot::{Condvar, Mutex};
use std::sync::Arc;

#[derive(Default)]
pub struct RangeLocks {
    state: Mutex<State>,
    released: Condvar,
}

#[derive(Default)]
struct State {
    held: Vec<(u64, u64)>,
    /// Requests waiting, with their tickets (in the order they came).
    waiting: Vec<(u64, (u64, u64))>,
    next_ticket: u64,
}

impl State {
    /// Whether `range` may be taken by the request with `ticket` (`None`:
    /// a new one, behind every waiter).
    fn free(&self, range: (u64, u64), ticket: Option<u64>) -> bool {
        !self.held.iter().any(|&h| overlaps(h, range))
            && !self.waiting.iter().any(|&(t, w)| {
                let ahead = match ticket {
                    Some(mine) => t < mine,
                    None => true,
                };
                ahead && overlaps(w, range)
            })
    }
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
        let mut s = self.state.lock();
        if !s.free(range, None) {
            let ticket = s.next_ticket;
            s.next_ticket += 1;
            s.waiting.push((ticket, range));
            while !s.free(range, Some(ticket)) {
                self.released.wait(&mut s);
            }
            s.waiting.retain(|&(t, _)| t != ticket);
        }
        s.held.push(range);
        RangeGuard { locks: self, range }
    }

    /// Hold `start..end` if nothing overlapping is held.
    #[cfg(test)]
    pub fn try_lock(&self, start: u64, end: u64) -> Option<RangeGuard<'_>> {
        let range = (start, end.max(start + 1));
        let mut s = self.state.lock();
        if !s.free(range, None) {
            return None;
        }
        s.held.push(range);
        Some(RangeGuard { locks: self, range })
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        self.locks.release(self.range);
    }
}

/// A locked range whose holder outlives the call that locked it (a write
/// waiting for its replicas' replies); released on drop.
pub struct OwnedRange {
    locks: Arc<RangeLocks>,
    range: (u64, u64),
}

impl RangeLocks {
    /// [`RangeLocks::lock`], for an owner that keeps it.
    pub fn lock_owned(self: &Arc<Self>, start: u64, end: u64) -> OwnedRange {
        let guard = self.lock(start, end);
        let range = guard.range;
        std::mem::forget(guard);
        OwnedRange {
            locks: self.clone(),
            range,
        }
    }

    fn release(&self, range: (u64, u64)) {
        let mut s = self.state.lock();
        if let Some(i) = s.held.iter().position(|&h| h == range) {
            s.held.swap_remove(i);
        }
        let wake = !s.waiting.is_empty();
        drop(s);
        if wake {
            self.released.notify_all();
        }
    }
}

impl Drop for OwnedRange {
    fn drop(&mut self) {
        self.locks.release(self.range);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

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

    #[test]
    fn a_wide_waiter_holds_off_later_overlapping_requests() {
        let l = Arc::new(RangeLocks::new());
        let narrow = l.lock(0, 1);
        let got = Arc::new(AtomicBool::new(false));
        let t = {
            let (l, got) = (l.clone(), got.clone());
            std::thread::spawn(move || {
                let _all = l.lock(0, 100);
                got.store(true, Ordering::SeqCst);
            })
        };
        // Once the whole-range request waits, a new narrow one inside it
        // waits behind it (else a stream of them would starve it); one
        // outside does not.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while l.try_lock(50, 51).is_some() {
            assert!(
                std::time::Instant::now() < deadline,
                "the wide request never queued"
            );
            std::thread::yield_now();
        }
        assert!(l.try_lock(100, 200).is_some());
        assert!(!got.load(Ordering::SeqCst));
        drop(narrow);
        t.join().unwrap();
        assert!(got.load(Ordering::SeqCst));
        assert!(l.try_lock(50, 51).is_some(), "served, then released");
    }

    #[test]
    fn an_owned_range_is_held_until_dropped_on_another_thread() {
        // As a write answered by callback holds its range until the thread
        // that reads its last ack drops it.
        let l = Arc::new(RangeLocks::new());
        let owned = l.lock_owned(10, 20);
        assert!(l.try_lock(15, 16).is_none());
        assert!(
            l.try_lock(20, 30).is_some(),
            "adjacent ranges do not overlap"
        );
        let got = Arc::new(AtomicBool::new(false));
        let waiter = {
            let (l, got) = (l.clone(), got.clone());
            std::thread::spawn(move || {
                let _g = l.lock(0, 15);
                got.store(true, Ordering::SeqCst);
            })
        };
        assert!(!got.load(Ordering::SeqCst));
        std::thread::spawn(move || drop(owned)).join().unwrap();
        waiter.join().unwrap();
        assert!(got.load(Ordering::SeqCst));
        assert!(l.try_lock(10, 20).is_some(), "released");
    }
}

//! `io_priority`: a node-wide share of engine IO by class, high / medium /
//! low with weights 8 / 4 / 1.
//!
//! Fair queueing by virtual time ([`FairShare`]): every read and write
//! charges its class `bytes / weight` of virtual time. A class may go ahead
//! of the slowest *other* class that is busy by at most a small window;
//! beyond that its IO waits until the others catch up. So when a high and a
//! low volume both keep the engine busy, the high one moves 8 bytes for
//! every byte of the low one, and the low one's threads sleep instead of
//! taking CPU from it; a class alone is never held back, and a class that
//! was idle comes back at the others' pace rather than with banked credit.
//! Flush and discard pass through. The admission rule is a plain struct,
//! unit-tested with a fake clock.

use super::{BlockEngine, EngineError};
use parking_lot::{Condvar, Mutex};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The three classes of DESIGN §1, as Portworx names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IoPriority {
    High,
    #[default]
    Medium,
    Low,
}

impl IoPriority {
    pub const ALL: [IoPriority; 3] = [IoPriority::High, IoPriority::Medium, IoPriority::Low];

    fn index(self) -> usize {
        self as usize
    }

    /// Relative share under contention.
    pub fn weight(self) -> u64 {
        match self {
            IoPriority::High => 8,
            IoPriority::Medium => 4,
            IoPriority::Low => 1,
        }
    }

    pub fn parse(value: &str) -> Option<IoPriority> {
        match value.trim().to_ascii_lowercase().as_str() {
            "high" => Some(IoPriority::High),
            "medium" => Some(IoPriority::Medium),
            "low" => Some(IoPriority::Low),
            _ => None,
        }
    }
}

impl std::fmt::Display for IoPriority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            IoPriority::High => "high",
            IoPriority::Medium => "medium",
            IoPriority::Low => "low",
        })
    }
}

/// A class with no IO (admitted or waiting) for this long is idle.
const IDLE: Duration = Duration::from_millis(50);
/// How far (in virtual bytes) a class may run ahead of the slowest busy one.
const WINDOW: u64 = 4 << 20;
/// Virtual time per byte is `SCALE / weight` (8 = the largest weight).
const SCALE: u64 = 8;

/// The admission rule: virtual time per class and when each was last busy.
#[derive(Debug, Default)]
pub struct FairShare {
    vtime: [u64; 3],
    last: [Option<Instant>; 3],
}

impl FairShare {
    fn busy(&self, i: usize, now: Instant) -> bool {
        self.last[i].is_some_and(|t| now.saturating_duration_since(t) < IDLE)
    }

    /// May an IO of `bytes` for `class` go now? If so it is charged; if not
    /// the class still counts as busy, holding the others to its pace.
    pub fn admit(&mut self, class: IoPriority, bytes: u64, now: Instant) -> bool {
        let c = class.index();
        let floor = (0..3)
            .filter(|&i| i != c && self.busy(i, now))
            .map(|i| self.vtime[i])
            .min();
        if !self.busy(c, now) {
            // Back from idle: no banked credit.
            if let Some(f) = floor {
                self.vtime[c] = self.vtime[c].max(f);
            }
        }
        self.last[c] = Some(now);
        if floor.is_some_and(|f| self.vtime[c] > f + WINDOW) {
            return false;
        }
        self.vtime[c] += bytes.max(4096) * SCALE / class.weight();
        true
    }
}

/// The node's arbiter of engine IO between classes.
#[derive(Debug, Default)]
pub struct IoArbiter {
    share: Mutex<FairShare>,
    wake: Condvar,
}

impl IoArbiter {
    pub fn new() -> Arc<IoArbiter> {
        Arc::new(IoArbiter::default())
    }

    /// Wait until an IO of `bytes` for `class` may go.
    pub fn admit(&self, class: IoPriority, bytes: u64) {
        let mut s = self.share.lock();
        while !s.admit(class, bytes, Instant::now()) {
            // Woken when others make progress; the timeout re-checks idleness.
            self.wake.wait_for(&mut s, Duration::from_millis(1));
        }
        drop(s);
        self.wake.notify_all();
    }
}

/// An engine whose reads and writes are admitted by the volume's caps,
/// then by the node's arbiter.
pub struct PriorityEngine {
    inner: Arc<dyn BlockEngine>,
    arbiter: Arc<IoArbiter>,
    class: IoPriority,
    passthrough: bool,
    limiter: Arc<super::limit::Limiter>,
}

impl PriorityEngine {
    /// `passthrough`: whether the volume may hand its IO to the kernel at
    /// all (not when scheduled snapshots need every write to pass here).
    pub fn new(
        inner: Arc<dyn BlockEngine>,
        arbiter: Arc<IoArbiter>,
        class: IoPriority,
        passthrough: bool,
        limiter: Arc<super::limit::Limiter>,
    ) -> Self {
        PriorityEngine {
            inner,
            arbiter,
            class,
            passthrough,
            limiter,
        }
    }
}

impl BlockEngine for PriorityEngine {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), EngineError> {
        self.limiter.admit(buf.len() as u64);
        self.arbiter.admit(self.class, buf.len() as u64);
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), EngineError> {
        self.limiter.admit(buf.len() as u64);
        self.arbiter.admit(self.class, buf.len() as u64);
        self.inner.write_at(buf, offset)
    }
    fn write_then(&self, buf: &[u8], offset: u64, done: super::WriteDone) {
        self.limiter.admit(buf.len() as u64);
        self.arbiter.admit(self.class, buf.len() as u64);
        self.inner.write_then(buf, offset, done)
    }
    fn flush(&self) -> Result<(), EngineError> {
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), EngineError> {
        self.limiter.admit(0);
        self.inner.discard(offset, len)
    }
    /// Only the default class, uncapped, may hand IO to the kernel:
    /// passthrough IO bypasses the shares and caps, so a volume asking for
    /// high or low, or capped, stays on the engine path where they apply.
    fn begin_passthrough(&self) -> Option<std::fs::File> {
        match self.class {
            IoPriority::Medium if self.passthrough && self.limiter.limits().is_none() => {
                self.inner.begin_passthrough()
            }
            IoPriority::Medium => None,
            IoPriority::High | IoPriority::Low => None,
        }
    }
    fn end_passthrough(&self) {
        self.inner.end_passthrough()
    }
    fn io_parallelism(&self) -> usize {
        self.inner.io_parallelism()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both classes always want to go; count what each gets admitted.
    fn compete(a: IoPriority, b: IoPriority, rounds: u32) -> (u64, u64) {
        let mut f = FairShare::default();
        let t0 = Instant::now();
        let (mut got_a, mut got_b) = (0, 0);
        for r in 0..rounds {
            let now = t0 + Duration::from_micros(u64::from(r));
            if f.admit(a, 4096, now) {
                got_a += 1;
            }
            if f.admit(b, 4096, now) {
                got_b += 1;
            }
        }
        (got_a, got_b)
    }

    #[test]
    fn busy_classes_share_by_weight() {
        let (high, low) = compete(IoPriority::High, IoPriority::Low, 90_000);
        assert!((7..=9).contains(&(high / low)), "high {high}, low {low}");
        let (high, med) = compete(IoPriority::High, IoPriority::Medium, 90_000);
        assert_eq!(
            (high as f64 / med as f64).round(),
            2.0,
            "high {high}, medium {med}"
        );
        let (x, y) = compete(IoPriority::Low, IoPriority::Low, 1000);
        assert_eq!(
            (x, y),
            (1000, 1000),
            "one class is never held back by itself"
        );
    }

    #[test]
    fn a_class_alone_is_never_held_back() {
        let mut f = FairShare::default();
        let t0 = Instant::now();
        assert!((0..100_000).all(|i| f.admit(
            IoPriority::Low,
            1 << 20,
            t0 + Duration::from_micros(i)
        )));
    }

    #[test]
    fn idle_time_is_not_banked() {
        let mut f = FairShare::default();
        let t0 = Instant::now();
        // High runs alone for a long while, then low arrives after idling.
        for i in 0..10_000 {
            assert!(f.admit(IoPriority::High, 1 << 20, t0 + Duration::from_micros(i)));
        }
        let t1 = t0 + Duration::from_millis(10);
        // Low starts at high's pace: it may use its window, then waits.
        let admitted = (0..10_000)
            .take_while(|&i| f.admit(IoPriority::Low, 4096, t1 + Duration::from_nanos(i)))
            .count();
        assert!(
            admitted > 0 && admitted < 200,
            "low got {admitted} IOs straight away"
        );
        // Once high goes idle, low runs freely.
        let t2 = t1 + IDLE * 2;
        assert!((0..1000).all(|i| f.admit(IoPriority::Low, 4096, t2 + Duration::from_nanos(i))));
    }
}

//! `max_iops` and `max_bandwidth`: hard caps on one volume's engine IO
//! (Portworx's options of these names), where `io_priority` only shares
//! the node's IO out under contention.
//!
//! Each cap is a GCRA (a virtual clock): an IO of cost c at rate r moves
//! the clock on by c / r, and may start once the clock is within a tenth
//! of a second's worth of burst of now. An IO reserves its slot under a
//! short lock and sleeps outside it, so concurrent IOs queue in order.
//! Reads, writes and discards count as IOs; reads and writes count their
//! bytes. The rule is a plain struct, unit-tested with a fake clock.

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How far ahead of its rate a volume may run after idling.
const BURST: Duration = Duration::from_millis(100);

/// A volume's caps; `None`: none.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoLimits {
    /// IOs per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iops: Option<u32>,
    /// Bytes per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<u64>,
}

impl IoLimits {
    pub fn is_none(&self) -> bool {
        self.iops.is_none() && self.bandwidth.is_none()
    }
}

/// The admission rule: when each IO may start.
#[derive(Debug, Default)]
pub struct Shaper {
    limits: IoLimits,
    /// Theoretical arrival times of the next IO (per cap).
    iops_at: Option<Instant>,
    bytes_at: Option<Instant>,
}

/// Reserve a slot of `cost` at `rate` per second on the clock `tat`; how
/// long to wait from `now` before starting.
fn reserve(tat: &mut Option<Instant>, now: Instant, cost: f64, rate: f64) -> Duration {
    let t = tat.map_or(now, |t| t.max(now));
    let start = t.checked_sub(BURST).map_or(now, |s| s.max(now));
    *tat = Some(t + Duration::from_secs_f64(cost / rate));
    start - now
}

impl Shaper {
    pub fn new(limits: IoLimits) -> Shaper {
        Shaper {
            limits,
            ..Shaper::default()
        }
    }

    /// New caps; IO already reserved keeps its slot.
    pub fn set(&mut self, limits: IoLimits) {
        if limits != self.limits {
            *self = Shaper::new(limits);
        }
    }

    /// An IO of `bytes` arrives at `now`: how long it waits.
    pub fn take(&mut self, now: Instant, bytes: u64) -> Duration {
        let mut wait = Duration::ZERO;
        if let Some(iops) = self.limits.iops {
            wait = wait.max(reserve(&mut self.iops_at, now, 1.0, f64::from(iops)));
        }
        if let (Some(bw), true) = (self.limits.bandwidth, bytes > 0) {
            wait = wait.max(reserve(&mut self.bytes_at, now, bytes as f64, bw as f64));
        }
        wait
    }
}

/// A volume's caps, shared by its served engine and whoever changes them.
#[derive(Debug, Default)]
pub struct Limiter {
    shaper: Mutex<Shaper>,
    /// Caps set: IO without takes no lock.
    active: AtomicBool,
    /// Time IOs spent waiting, in nanoseconds (metrics).
    throttled: AtomicU64,
}

impl Limiter {
    pub fn new(limits: IoLimits) -> Limiter {
        let l = Limiter::default();
        l.set(limits);
        l
    }

    pub fn set(&self, limits: IoLimits) {
        self.shaper.lock().set(limits);
        self.active.store(!limits.is_none(), Ordering::Release);
    }

    pub fn limits(&self) -> IoLimits {
        self.shaper.lock().limits
    }

    /// Wait until an IO of `bytes` may go.
    pub fn admit(&self, bytes: u64) {
        if !self.active.load(Ordering::Acquire) {
            return;
        }
        let wait = self.shaper.lock().take(Instant::now(), bytes);
        if !wait.is_zero() {
            self.throttled
                .fetch_add(wait.as_nanos() as u64, Ordering::Relaxed);
            std::thread::sleep(wait);
        }
    }

    /// Time IOs have spent held back.
    pub fn throttled(&self) -> Duration {
        Duration::from_nanos(self.throttled.load(Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// IOs admitted in `secs` of always-waiting IO of `bytes` each.
    fn run(limits: IoLimits, bytes: u64, secs: u64) -> u64 {
        let mut s = Shaper::new(limits);
        let t0 = Instant::now();
        let end = t0 + Duration::from_secs(secs);
        let mut now = t0;
        let mut n = 0;
        while now < end {
            now += s.take(now, bytes);
            if now < end {
                n += 1;
            }
        }
        n
    }

    #[test]
    fn iops_are_capped_with_a_tenth_of_a_second_of_burst() {
        let n = run(
            IoLimits {
                iops: Some(500),
                bandwidth: None,
            },
            4096,
            10,
        );
        // 500 per second, plus the burst (50) once.
        assert!((5000..=5052).contains(&n), "{n}");
    }

    #[test]
    fn bandwidth_is_capped_whatever_the_io_size() {
        let mib = 1 << 20;
        let limits = IoLimits {
            iops: None,
            bandwidth: Some(4 * mib),
        };
        let big = run(limits, mib, 10);
        assert!((40..=41).contains(&big), "{big} MiB IOs");
        let small = run(limits, 4096, 10);
        assert!((10240..=10345).contains(&small), "{small} 4 KiB IOs");
        // The tighter of two caps wins.
        let both = IoLimits {
            iops: Some(100),
            bandwidth: Some(4 * mib),
        };
        assert!(run(both, 4096, 10) <= 1012);
    }

    #[test]
    fn idle_time_is_banked_only_up_to_the_burst() {
        let mut s = Shaper::new(IoLimits {
            iops: Some(100),
            bandwidth: None,
        });
        let t0 = Instant::now();
        assert_eq!(s.take(t0, 0), Duration::ZERO);
        // A minute idle: the IO due now and 0.1 s worth more go at once,
        // the next waits.
        let later = t0 + Duration::from_secs(60);
        let waits: Vec<Duration> = (0..13).map(|_| s.take(later, 0)).collect();
        assert!(waits[..11].iter().all(|w| w.is_zero()), "{waits:?}");
        assert!(
            waits[11] > Duration::ZERO && waits[12] > waits[11],
            "{waits:?}"
        );
    }

    #[test]
    fn no_caps_never_wait_and_new_caps_apply_at_once() {
        let mut s = Shaper::new(IoLimits::default());
        let t0 = Instant::now();
        assert!((0..10_000).all(|_| s.take(t0, 1 << 20).is_zero()));
        s.set(IoLimits {
            iops: Some(10),
            bandwidth: None,
        });
        let waited: Duration = (0..12).map(|_| s.take(t0, 0)).sum();
        assert!(waited > Duration::ZERO);
        let l = Limiter::new(IoLimits::default());
        l.admit(1 << 30);
        assert_eq!(l.throttled(), Duration::ZERO);
    }
}

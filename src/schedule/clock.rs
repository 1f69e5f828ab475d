//! Where `now` comes from: the system clock in production, a settable clock
//! in tests so that no test sleeps or depends on how fast the machine is.

use chrono::{DateTime, TimeDelta, Utc};
use parking_lot::Mutex;
use std::sync::Arc;

pub trait Clock: Send + Sync {
    fn now(&self) -> DateTime<Utc>;
}

/// The real wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// A clock that only moves when told to. Clones share one time, so a test can
/// hand a clone to another thread (or an actor) and move time from outside.
#[derive(Debug, Clone)]
pub struct FakeClock {
    now: Arc<Mutex<DateTime<Utc>>>,
}

impl FakeClock {
    pub fn new(start: DateTime<Utc>) -> Self {
        FakeClock {
            now: Arc::new(Mutex::new(start)),
        }
    }

    pub fn set(&self, t: DateTime<Utc>) {
        *self.now.lock() = t;
    }

    /// Move forward (or back, with a negative delta: clocks do step back).
    pub fn advance(&self, by: TimeDelta) {
        let mut now = self.now.lock();
        *now += by;
    }
}

impl Clock for FakeClock {
    fn now(&self) -> DateTime<Utc> {
        *self.now.lock()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn fake_clock_is_shared_by_clones_and_threads() {
        let t0 = Utc.with_ymd_and_hms(2026, 11, 21, 12, 0, 0).unwrap();
        let clock = FakeClock::new(t0);
        assert_eq!(clock.now(), t0);
        let other = clock.clone();
        std::thread::spawn(move || other.advance(TimeDelta::minutes(90)))
            .join()
            .unwrap();
        assert_eq!(clock.now(), t0 + TimeDelta::minutes(90));
        clock.set(t0);
        assert_eq!(clock.now(), t0);
        clock.advance(TimeDelta::seconds(-1));
        assert_eq!(clock.now(), t0 - TimeDelta::seconds(1));
        // Usable behind the trait object an actor would hold.
        let dynamic: Arc<dyn Clock> = Arc::new(clock.clone());
        assert_eq!(dynamic.now(), clock.now());
    }
}

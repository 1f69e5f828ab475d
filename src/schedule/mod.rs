//! Snapshot schedules: `snap_interval` and `snap_schedule` (Portworx's
//! formats) parsed into a [`SnapPolicy`], and a pure [`Scheduler`] that says
//! which snapshots to take and which to delete at a given instant.
//!
//! Nothing here does IO, sleeps or reads the clock by itself: the caller
//! passes `now` (from a [`Clock`]), carries out the returned [`Action`]s and
//! reports back, so every rule is unit-tested with a [`FakeClock`].

pub mod actor;
mod clock;
mod error;
mod policy;
mod scheduler;
#[cfg(test)]
mod tests;

pub use clock::{Clock, FakeClock, SystemClock};
pub use error::ScheduleError;
pub use policy::{Rule, RuleKind, SnapPolicy, MAX_KEEP, MAX_PERIODIC_MINS};
pub use scheduler::{parse_snapshot_name, snapshot_name, Action, ScheduledSnapshot, Scheduler};

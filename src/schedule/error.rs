//! The one error type of the schedule module: what the user wrote wrong in
//! `snap_interval` or `snap_schedule`. Every message names the faulty part and
//! ends with the accepted forms and an example, so a refusal from
//! `docker volume create` is enough to fix the option without the docs.

/// Appended to every schedule error.
pub(crate) const FORMS: &str = "accepted forms, several joined by ';': \
periodic=MINUTES[,KEEP], daily=HH:MM[,KEEP], weekly=WEEKDAY@HH:MM[,KEEP], monthly=DAY@HH:MM[,KEEP] \
(KEEP defaults to 5, 7, 5 and 12; WEEKDAY is an English day name in full or 3 letters; DAY is 1 to 31); \
example: periodic=60,10;daily=12:00,4;weekly=sunday@12:00,2;monthly=15@12:00";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    #[error("the schedule is empty; {FORMS}")]
    Empty,
    #[error("{input:?} has an empty rule (a ';' with nothing before or after it); {FORMS}")]
    EmptyRule { input: String },
    #[error("rule {rule:?} has no '=' between the kind and its value; {FORMS}")]
    NoEquals { rule: String },
    #[error(
        "unknown rule kind {kind:?}; the kinds are periodic, daily, weekly and monthly; {FORMS}"
    )]
    UnknownKind { kind: String },
    #[error("there are two {kind} rules; give each kind at most once; {FORMS}")]
    Duplicate { kind: String },
    #[error(
        "rule {rule:?} has more than one ','; only the keep count may follow the ','; {FORMS}"
    )]
    TooManyFields { rule: String },
    #[error("keep {keep:?} in {rule:?} must be a whole number from 1 to {max}; {FORMS}", max = super::MAX_KEEP)]
    Keep { rule: String, keep: String },
    #[error("{value:?} in {rule:?} must be whole minutes from 1 to {max} (one year); {FORMS}", max = super::MAX_PERIODIC_MINS)]
    Minutes { rule: String, value: String },
    #[error(
        "{value:?} in {rule:?} is not a time of day; write HH:MM from 00:00 to 23:59; {FORMS}"
    )]
    Time { rule: String, value: String },
    #[error("{rule:?} needs '@' between the day and the time, like {example}; {FORMS}")]
    MissingAt { rule: String, example: &'static str },
    #[error("{value:?} in {rule:?} is not a weekday; write an English day name in full or as 3 letters (sunday or sun, any case); {FORMS}")]
    Weekday { rule: String, value: String },
    #[error("{value:?} in {rule:?} is not a day of the month from 1 to 31 (29 to 31 fall on the last day of shorter months); {FORMS}")]
    MonthDay { rule: String, value: String },
    #[error("snap_interval {value:?} must be whole minutes between snapshots, from 1 to {max} (one year), or 0 for off, e.g. snap_interval=60; for more control use snap_schedule, {FORMS}", max = super::MAX_PERIODIC_MINS)]
    Interval { value: String },
    #[error("snap_interval={interval} and the periodic rule in snap_schedule both set the periodic snapshots; give only one of them (snap_interval=N means periodic=N,5); {FORMS}")]
    PeriodicTwice { interval: String },
}

impl ScheduleError {
    /// The volume option at fault, for callers that report per option.
    pub fn option(&self) -> &'static str {
        match self {
            ScheduleError::Interval { .. } => "snap_interval",
            _ => "snap_schedule",
        }
    }
}

/// User input echoed in an error, cut short: options come from the wire.
pub(crate) fn clip(s: &str) -> String {
    const MAX: usize = 64;
    if s.chars().count() <= MAX {
        s.to_string()
    } else {
        let mut c: String = s.chars().take(MAX).collect();
        c.push('…');
        c
    }
}

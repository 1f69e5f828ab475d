//! The scheduler driven through its public API with a fake clock: no test
//! sleeps, every instant is exact.

use super::*;
use chrono::{
    DateTime, FixedOffset, MappedLocalTime, NaiveDate, NaiveDateTime, TimeDelta, TimeZone, Utc,
};

fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(y, mo, d, h, mi, s).unwrap()
}

fn policy(s: &str) -> SnapPolicy {
    s.parse().unwrap()
}

fn east(hours: i32) -> FixedOffset {
    FixedOffset::east_opt(hours * 3600).unwrap()
}

/// A scheduler in `tz` with volume `v` under `p`, attached at `at`, and a
/// fake clock standing at `at`.
fn attached<Tz: TimeZone>(tz: Tz, p: &str, at: DateTime<Utc>) -> (Scheduler<Tz>, FakeClock) {
    let clock = FakeClock::new(at);
    let mut s = Scheduler::new(tz);
    s.set_policy("v", Some(policy(p)), at);
    s.attached("v", at);
    (s, clock)
}

fn take(name: &str) -> Action {
    Action::Take {
        volume: "v".into(),
        name: name.into(),
        rule: parse_snapshot_name(name).unwrap().0,
    }
}

fn delete(name: &str) -> Action {
    Action::Delete {
        volume: "v".into(),
        name: name.into(),
    }
}

/// Play the actor until `until`: sleep to each `next_wake`, carry out every
/// action successfully, report it. Returns the actions in order.
fn run<Tz: TimeZone>(
    s: &mut Scheduler<Tz>,
    clock: &FakeClock,
    until: DateTime<Utc>,
) -> Vec<Action> {
    let mut log = Vec::new();
    while let Some(wake) = s.next_wake(clock.now()) {
        if wake > until {
            break;
        }
        clock.set(wake);
        let actions = s.due(clock.now());
        assert!(!actions.is_empty(), "woken at {wake} for nothing");
        for a in actions {
            match &a {
                Action::Take { volume, name, .. } => assert!(s.snapshot_taken(volume, name)),
                Action::Delete { volume, name } => s.snapshot_removed(volume, name),
            }
            log.push(a);
        }
    }
    clock.set(until);
    log
}

fn take_names(actions: &[Action]) -> Vec<String> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Take { name, .. } => Some(name.clone()),
            Action::Delete { .. } => None,
        })
        .collect()
}

fn held(s: &Scheduler<impl TimeZone>) -> Vec<String> {
    s.snapshots("v").into_iter().map(|x| x.name).collect()
}

#[test]
fn periodic_fires_one_interval_after_attach_and_not_before() {
    let t0 = utc(2026, 11, 21, 10, 0, 0);
    let (mut s, clock) = attached(east(2), "periodic=60", t0);
    assert_eq!(s.next_wake(clock.now()), Some(utc(2026, 11, 21, 11, 0, 0)));
    // A second attach report (another mount of the same volume) keeps the first time.
    s.attached("v", utc(2026, 11, 21, 10, 30, 0));
    assert_eq!(s.attached_since("v"), Some(t0));
    clock.set(utc(2026, 11, 21, 10, 59, 59));
    assert_eq!(s.due(clock.now()), []);
    clock.advance(TimeDelta::seconds(1));
    assert_eq!(
        s.due(clock.now()),
        [take("periodic-20261121T110000Z")],
        "fires exactly at attach + 60 min"
    );
    // Handed out once, even before the snapshot is reported.
    assert_eq!(s.due(clock.now()), []);
    assert!(s.snapshot_taken("v", "periodic-20261121T110000Z"));
    assert_eq!(s.next_wake(clock.now()), Some(utc(2026, 11, 21, 12, 0, 0)));
    clock.set(utc(2026, 11, 21, 11, 59, 59));
    assert_eq!(s.due(clock.now()), []);
}

#[test]
fn periodic_counts_from_the_last_snapshot_then_restarts_on_reattach() {
    let t0 = utc(2026, 11, 21, 10, 0, 0);
    let (mut s, clock) = attached(east(0), "periodic=60", t0);
    let log = run(&mut s, &clock, utc(2026, 11, 21, 12, 10, 0));
    assert_eq!(
        take_names(&log),
        ["periodic-20261121T110000Z", "periodic-20261121T120000Z"]
    );
    s.detached("v");
    assert_eq!(
        s.next_wake(clock.now()),
        None,
        "detached: nothing to wake for"
    );
    clock.set(utc(2026, 11, 21, 14, 0, 0));
    assert_eq!(s.due(clock.now()), [], "detached volumes fire nothing");
    // Re-attached at 14:20: the interval restarts from the attach, not from
    // the 12:00 snapshot, and the detached time is not caught up.
    clock.set(utc(2026, 11, 21, 14, 20, 0));
    s.attached("v", clock.now());
    assert_eq!(s.due(clock.now()), []);
    assert_eq!(s.next_wake(clock.now()), Some(utc(2026, 11, 21, 15, 20, 0)));
    clock.set(utc(2026, 11, 21, 15, 19, 59));
    assert_eq!(s.due(clock.now()), []);
    clock.set(utc(2026, 11, 21, 15, 20, 0));
    assert_eq!(s.due(clock.now()), [take("periodic-20261121T152000Z")]);
}

#[test]
fn periodic_late_due_fires_once_on_its_grid() {
    let t0 = utc(2026, 11, 21, 10, 0, 0);
    let (mut s, clock) = attached(east(0), "periodic=10", t0);
    // The timer was 35 minutes late: one snapshot for the latest grid point,
    // not a burst of three.
    clock.set(utc(2026, 11, 21, 10, 35, 0));
    assert_eq!(s.due(clock.now()), [take("periodic-20261121T103000Z")]);
    assert_eq!(s.due(clock.now()), []);
    assert_eq!(s.next_wake(clock.now()), Some(utc(2026, 11, 21, 10, 40, 0)));
}

#[test]
fn daily_fires_at_its_local_slot_once() {
    // 12:00 at +02:00 is 10:00 UTC.
    let (mut s, clock) = attached(east(2), "daily=12:00", utc(2026, 11, 21, 8, 0, 0));
    assert_eq!(s.next_wake(clock.now()), Some(utc(2026, 11, 21, 10, 0, 0)));
    clock.set(utc(2026, 11, 21, 9, 59, 59));
    assert_eq!(s.due(clock.now()), []);
    clock.advance(TimeDelta::seconds(1));
    assert_eq!(s.due(clock.now()), [take("daily-20261121T100000Z")]);
    for later in [0, 1, 3600, 13 * 3600] {
        assert_eq!(
            s.due(clock.now() + TimeDelta::seconds(later)),
            [],
            "{later}s after the slot"
        );
    }
    // Still exactly once even though the take was never reported.
    assert_eq!(s.next_wake(clock.now()), Some(utc(2026, 11, 22, 10, 0, 0)));
}

#[test]
fn late_due_within_the_window_fires_once_and_skipped_days_are_not_replayed() {
    let (mut s, clock) = attached(east(2), "daily=12:00", utc(2026, 11, 21, 8, 0, 0));
    // First call eight hours after the slot: still today's window.
    clock.set(utc(2026, 11, 21, 18, 0, 0));
    assert_eq!(s.due(clock.now()), [take("daily-20261121T100000Z")]);
    clock.set(utc(2026, 11, 21, 23, 0, 0));
    assert_eq!(s.due(clock.now()), []);
    // Next call three days later (attached all along): only the latest slot.
    clock.set(utc(2026, 11, 24, 11, 0, 0));
    assert_eq!(s.due(clock.now()), [take("daily-20261124T100000Z")]);
    assert_eq!(s.due(clock.now()), []);
}

#[test]
fn wall_clock_slots_need_the_volume_attached_at_the_slot() {
    // Attached half an hour after today's slot: it waits for tomorrow's.
    let (mut s, clock) = attached(east(2), "daily=12:00", utc(2026, 11, 21, 10, 30, 0));
    assert_eq!(s.due(clock.now()), []);
    assert_eq!(s.next_wake(clock.now()), Some(utc(2026, 11, 22, 10, 0, 0)));
    // Detached over the next two slots, back after the second: not caught up.
    clock.set(utc(2026, 11, 21, 11, 0, 0));
    s.detached("v");
    clock.set(utc(2026, 11, 23, 11, 0, 0));
    s.attached("v", clock.now());
    assert_eq!(s.due(clock.now()), []);
    assert_eq!(s.next_wake(clock.now()), Some(utc(2026, 11, 24, 10, 0, 0)));
    // Attached exactly at the slot counts as attached at it.
    clock.set(utc(2026, 11, 24, 10, 0, 0));
    s.detached("v");
    s.attached("v", clock.now());
    assert_eq!(s.due(clock.now()), [take("daily-20261124T100000Z")]);
}

#[test]
fn detached_volumes_fire_nothing() {
    let t0 = utc(2026, 11, 21, 0, 0, 0);
    let clock = FakeClock::new(t0);
    let mut s = Scheduler::new(east(0));
    s.set_policy(
        "v",
        Some(policy(
            "periodic=1;daily=0:00;weekly=sat@0:00;monthly=1@0:00",
        )),
        t0,
    );
    for _ in 0..24 * 40 {
        assert_eq!(s.due(clock.now()), [], "at {}", clock.now());
        clock.advance(TimeDelta::hours(1));
    }
    assert_eq!(s.next_wake(clock.now()), None);
    // A volume never heard of: nothing either.
    s.detached("other");
    assert_eq!(s.due(clock.now()), []);
}

#[test]
fn weekly_fires_on_the_local_weekday() {
    // Sunday 23:00 at -05:00 is Monday 04:00 UTC.
    let (mut s, clock) = attached(
        east(-5),
        "weekly=sunday@23:00,2",
        utc(2026, 11, 21, 12, 0, 0), // a Saturday
    );
    assert_eq!(s.next_wake(clock.now()), Some(utc(2026, 11, 23, 4, 0, 0)));
    clock.set(utc(2026, 11, 22, 23, 0, 0)); // Sunday 23:00 UTC, 18:00 local
    assert_eq!(s.due(clock.now()), []);
    clock.set(utc(2026, 11, 23, 3, 59, 59));
    assert_eq!(s.due(clock.now()), []);
    clock.set(utc(2026, 11, 23, 4, 0, 0));
    assert_eq!(s.due(clock.now()), [take("weekly-20261123T040000Z")]);
    assert_eq!(s.next_wake(clock.now()), Some(utc(2026, 11, 30, 4, 0, 0)));
    let log = run(&mut s, &clock, utc(2026, 12, 31, 0, 0, 0));
    assert_eq!(
        take_names(&log),
        [
            "weekly-20261130T040000Z",
            "weekly-20261207T040000Z",
            "weekly-20261214T040000Z",
            "weekly-20261221T040000Z",
            "weekly-20261228T040000Z",
        ]
    );
}

#[test]
fn monthly_on_31_falls_on_the_last_day_of_shorter_months() {
    let (mut s, clock) = attached(east(0), "monthly=31@12:00", utc(2027, 1, 1, 0, 0, 0));
    let log = run(&mut s, &clock, utc(2028, 4, 1, 0, 0, 0));
    assert_eq!(
        take_names(&log),
        [
            "monthly-20270131T120000Z",
            "monthly-20270228T120000Z", // not a leap year
            "monthly-20270331T120000Z",
            "monthly-20270430T120000Z",
            "monthly-20270531T120000Z",
            "monthly-20270630T120000Z",
            "monthly-20270731T120000Z",
            "monthly-20270831T120000Z",
            "monthly-20270930T120000Z",
            "monthly-20271031T120000Z",
            "monthly-20271130T120000Z",
            "monthly-20271231T120000Z",
            "monthly-20280131T120000Z",
            "monthly-20280229T120000Z", // leap year
            "monthly-20280331T120000Z",
        ]
    );
    // And not a second before: the day before and the minute before are quiet.
    let (mut s, clock) = attached(east(0), "monthly=31@12:00", utc(2027, 2, 1, 0, 0, 0));
    clock.set(utc(2027, 2, 27, 12, 0, 0));
    assert_eq!(s.due(clock.now()), []);
    clock.set(utc(2027, 2, 28, 11, 59, 59));
    assert_eq!(s.due(clock.now()), []);
    clock.set(utc(2027, 2, 28, 12, 0, 0));
    assert_eq!(s.due(clock.now()), [take("monthly-20270228T120000Z")]);
    // March has a 31st: the 28th is not a slot there.
    assert_eq!(s.next_wake(clock.now()), Some(utc(2027, 3, 31, 12, 0, 0)));
}

#[test]
fn monthly_on_an_ordinary_day_and_on_29_in_february() {
    let (mut s, clock) = attached(east(0), "monthly=15@00:00", utc(2027, 1, 1, 0, 0, 0));
    assert_eq!(s.next_wake(clock.now()), Some(utc(2027, 1, 15, 0, 0, 0)));
    clock.set(utc(2027, 1, 14, 23, 59, 59));
    assert_eq!(s.due(clock.now()), []);
    let (mut s, clock) = attached(east(0), "monthly=29@06:00", utc(2027, 2, 1, 0, 0, 0));
    let log = run(&mut s, &clock, utc(2027, 4, 1, 0, 0, 0));
    assert_eq!(
        take_names(&log),
        ["monthly-20270228T060000Z", "monthly-20270329T060000Z"]
    );
}

#[test]
fn retention_keeps_the_newest_per_kind_and_leaves_manual_snapshots() {
    let (mut s, clock) = attached(
        east(0),
        "periodic=60,2;daily=12:00,1",
        utc(2026, 11, 21, 9, 0, 0),
    );
    // Manual snapshots, including a look-alike name, are not retention's.
    assert!(!s.snapshot_taken("v", "before-upgrade"));
    assert!(!s.snapshot_taken("v", "daily-backup"));
    let log = run(&mut s, &clock, utc(2026, 11, 22, 13, 30, 0));
    assert_eq!(
        held(&s),
        [
            "daily-20261122T120000Z",
            "periodic-20261122T120000Z",
            "periodic-20261122T130000Z",
        ]
    );
    // Each delete came right after the take that pushed its kind over keep.
    let pos = |a: &Action| log.iter().position(|x| x == a).unwrap();
    assert!(pos(&delete("daily-20261121T120000Z")) > pos(&take("daily-20261122T120000Z")));
    assert!(pos(&delete("periodic-20261121T100000Z")) > pos(&take("periodic-20261121T120000Z")));
    assert!(pos(&delete("periodic-20261121T100000Z")) < pos(&take("periodic-20261121T130000Z")));
    let deletes = log.len() - take_names(&log).len();
    assert_eq!(deletes, take_names(&log).len() - 3, "only the excess went");
}

#[test]
fn deletes_are_handed_out_once_and_a_failed_one_waits_for_the_next_take() {
    let t0 = utc(2026, 11, 21, 10, 0, 0);
    let (mut s, clock) = attached(east(0), "periodic=60,1", t0);
    for name in ["periodic-20261121T080000Z", "periodic-20261121T090000Z"] {
        assert!(s.snapshot_taken("v", name));
    }
    // Two known, keep 1: the older goes, at once.
    assert_eq!(s.next_wake(clock.now()), Some(clock.now()));
    assert_eq!(s.due(clock.now()), [delete("periodic-20261121T080000Z")]);
    assert_eq!(s.due(clock.now()), [], "handed out once");
    s.delete_failed("v", "periodic-20261121T080000Z");
    // No retry loop: the next wake is the next take.
    assert_eq!(s.next_wake(clock.now()), Some(utc(2026, 11, 21, 11, 0, 0)));
    assert_eq!(s.due(clock.now()), []);
    clock.set(utc(2026, 11, 21, 11, 0, 0));
    assert_eq!(s.due(clock.now()), [take("periodic-20261121T110000Z")]);
    s.snapshot_taken("v", "periodic-20261121T110000Z");
    // The new snapshot retries the failed delete along with the new excess.
    assert_eq!(
        s.due(clock.now()),
        [
            delete("periodic-20261121T090000Z"),
            delete("periodic-20261121T080000Z"),
        ]
    );
    s.snapshot_removed("v", "periodic-20261121T080000Z");
    s.snapshot_removed("v", "periodic-20261121T090000Z");
    assert_eq!(held(&s), ["periodic-20261121T110000Z"]);
    assert_eq!(s.next_wake(clock.now()), Some(utc(2026, 11, 21, 12, 0, 0)));
}

#[test]
fn known_snapshots_restore_state_after_a_restart() {
    // A restarted daemon reports what exists; the 12:00 slot of the day was
    // taken before the restart and must not be taken again.
    let t0 = utc(2026, 11, 21, 12, 30, 0);
    let clock = FakeClock::new(t0);
    let mut s = Scheduler::new(east(0));
    s.set_policy(
        "v",
        Some(policy("daily=12:00,7")),
        utc(2026, 11, 1, 0, 0, 0),
    );
    s.attached("v", utc(2026, 11, 21, 11, 0, 0));
    assert!(s.snapshot_taken("v", "daily-20261121T120000Z"));
    assert_eq!(s.due(clock.now()), []);
    assert_eq!(s.next_wake(clock.now()), Some(utc(2026, 11, 22, 12, 0, 0)));
    // Periodic: the newest reported snapshot is the base when it is later
    // than the attach.
    let mut s = Scheduler::new(east(0));
    s.set_policy(
        "v",
        Some(policy("periodic=60,5")),
        utc(2026, 11, 1, 0, 0, 0),
    );
    s.attached("v", utc(2026, 11, 21, 12, 0, 0));
    for h in 5..=12 {
        s.snapshot_taken("v", &format!("periodic-20261121T{h:02}1500Z"));
    }
    assert_eq!(
        s.due(clock.now()),
        [
            delete("periodic-20261121T071500Z"),
            delete("periodic-20261121T061500Z"),
            delete("periodic-20261121T051500Z"),
        ]
    );
    assert_eq!(s.next_wake(clock.now()), Some(utc(2026, 11, 21, 13, 15, 0)));
}

#[test]
fn a_clock_stepping_back_never_fires_a_slot_twice() {
    let (mut s, clock) = attached(
        east(0),
        "periodic=60;daily=12:00",
        utc(2026, 11, 21, 11, 0, 0),
    );
    clock.set(utc(2026, 11, 21, 12, 0, 0));
    assert_eq!(
        s.due(clock.now()),
        [
            take("periodic-20261121T120000Z"),
            take("daily-20261121T120000Z")
        ]
    );
    clock.advance(TimeDelta::minutes(-5));
    assert_eq!(s.due(clock.now()), []);
    assert_eq!(s.next_wake(clock.now()), Some(utc(2026, 11, 21, 13, 0, 0)));
    clock.advance(TimeDelta::minutes(10));
    assert_eq!(s.due(clock.now()), []);
}

#[test]
fn a_policy_set_while_attached_counts_from_then() {
    let t0 = utc(2026, 11, 21, 8, 0, 0);
    let clock = FakeClock::new(t0);
    let mut s = Scheduler::new(east(0));
    s.attached("v", t0);
    clock.set(utc(2026, 11, 21, 12, 30, 0));
    s.set_policy("v", Some(policy("periodic=60;daily=12:00")), clock.now());
    assert_eq!(s.due(clock.now()), [], "12:00 was before the policy");
    assert_eq!(s.next_wake(clock.now()), Some(utc(2026, 11, 21, 13, 30, 0)));
    // Setting the same policy again changes nothing.
    clock.set(utc(2026, 11, 21, 13, 0, 0));
    s.set_policy("v", Some(policy("periodic=60;daily=12:00")), clock.now());
    assert_eq!(s.next_wake(clock.now()), Some(utc(2026, 11, 21, 13, 30, 0)));
    // Clearing it stops everything.
    s.set_policy("v", None, clock.now());
    assert_eq!(s.next_wake(clock.now()), None);
    assert_eq!(s.policy("v"), None);
}

#[test]
fn next_wake_is_the_earliest_over_volumes_and_rules() {
    let t0 = utc(2026, 11, 21, 8, 0, 0);
    let clock = FakeClock::new(t0);
    let mut s = Scheduler::new(east(2));
    s.set_policy("a", Some(policy("periodic=210")), t0);
    s.set_policy("b", Some(policy("daily=12:00;weekly=sat@11:00")), t0);
    s.set_policy("c", Some(policy("periodic=1")), t0); // never attached
    s.attached("a", t0);
    s.attached("b", t0);
    // b's weekly (09:00 UTC) before b's daily (10:00 UTC) before a (11:30).
    assert_eq!(s.next_wake(clock.now()), Some(utc(2026, 11, 21, 9, 0, 0)));
    clock.set(utc(2026, 11, 21, 9, 0, 0));
    assert_eq!(s.due(clock.now()).len(), 1);
    assert_eq!(s.next_wake(clock.now()), Some(utc(2026, 11, 21, 10, 0, 0)));
    clock.set(utc(2026, 11, 21, 10, 0, 0));
    assert_eq!(s.due(clock.now()).len(), 1);
    assert_eq!(s.next_wake(clock.now()), Some(utc(2026, 11, 21, 11, 30, 0)));
    // Overdue work means now.
    clock.set(utc(2026, 11, 21, 11, 45, 0));
    assert_eq!(s.next_wake(clock.now()), Some(clock.now()));
    s.forget("a");
    s.forget("b");
    assert_eq!(s.next_wake(clock.now()), None);
}

#[test]
fn names_are_valid_deterministic_and_sortable() {
    let a = utc(2026, 11, 21, 12, 0, 0);
    let name = snapshot_name(RuleKind::Daily, a);
    assert_eq!(name, "daily-20261121T120000Z");
    assert_eq!(parse_snapshot_name(&name), Some((RuleKind::Daily, a)));
    let mut names: Vec<String> = [
        utc(2027, 1, 1, 0, 0, 0),
        utc(2026, 11, 21, 12, 0, 1),
        utc(2026, 2, 3, 4, 5, 6),
        a,
    ]
    .into_iter()
    .map(|t| snapshot_name(RuleKind::Periodic, t))
    .collect();
    let by_time = {
        let mut v = names.clone();
        v.sort_by_key(|n| parse_snapshot_name(n).unwrap().1);
        v
    };
    names.sort();
    assert_eq!(names, by_time, "string order is time order");
    for kind in RuleKind::ALL {
        let n = snapshot_name(kind, a);
        crate::spec::validate_name(&n).unwrap();
        assert_eq!(parse_snapshot_name(&n), Some((kind, a)));
    }
    for other in [
        "daily",
        "daily-",
        "daily-backup",
        "hourly-20261121T120000Z",
        "Daily-20261121T120000Z",
        "daily-20261121T120000",
        "daily-20261321T120000Z",
        "daily-2026112T120000Z",
        "daily-20261121T120000Z.old",
    ] {
        assert_eq!(parse_snapshot_name(other), None, "{other:?}");
    }
}

/// A zone like central Europe in 2026: +01:00, +02:00 from 29 March 01:00 UTC
/// (local 02:00 jumps to 03:00) to 25 October 01:00 UTC (local 03:00 falls
/// back to 02:00). Written here so DST is tested without a tz database.
#[derive(Debug, Clone, Copy)]
struct Cet;

impl Cet {
    fn winter() -> FixedOffset {
        east(1)
    }
    fn summer() -> FixedOffset {
        east(2)
    }
}

impl TimeZone for Cet {
    type Offset = FixedOffset;

    fn from_offset(_: &FixedOffset) -> Self {
        Cet
    }

    fn offset_from_local_date(&self, local: &NaiveDate) -> MappedLocalTime<FixedOffset> {
        self.offset_from_local_datetime(&local.and_hms_opt(0, 0, 0).unwrap())
    }

    fn offset_from_local_datetime(&self, local: &NaiveDateTime) -> MappedLocalTime<FixedOffset> {
        let fits = |off: FixedOffset| {
            let utc = *local - TimeDelta::seconds(off.local_minus_utc().into());
            self.offset_from_utc_datetime(&utc) == off
        };
        match (fits(Cet::summer()), fits(Cet::winter())) {
            (true, true) => MappedLocalTime::Ambiguous(Cet::summer(), Cet::winter()),
            (true, false) => MappedLocalTime::Single(Cet::summer()),
            (false, true) => MappedLocalTime::Single(Cet::winter()),
            (false, false) => MappedLocalTime::None,
        }
    }

    fn offset_from_utc_date(&self, utc: &NaiveDate) -> FixedOffset {
        self.offset_from_utc_datetime(&utc.and_hms_opt(0, 0, 0).unwrap())
    }

    fn offset_from_utc_datetime(&self, utc: &NaiveDateTime) -> FixedOffset {
        let spring = utc_naive(2026, 3, 29, 1);
        let fall = utc_naive(2026, 10, 25, 1);
        if (spring..fall).contains(utc) {
            Cet::summer()
        } else {
            Cet::winter()
        }
    }
}

fn utc_naive(y: i32, mo: u32, d: u32, h: u32) -> NaiveDateTime {
    utc(y, mo, d, h, 0, 0).naive_utc()
}

#[test]
fn toy_zone_is_right() {
    let at = |h, m| {
        NaiveDate::from_ymd_opt(2026, 3, 29)
            .unwrap()
            .and_hms_opt(h, m, 0)
            .unwrap()
    };
    assert_eq!(
        Cet.from_local_datetime(&at(1, 59))
            .single()
            .unwrap()
            .offset(),
        &Cet::winter()
    );
    assert!(matches!(
        Cet.from_local_datetime(&at(2, 30)),
        MappedLocalTime::None
    ));
    assert_eq!(
        Cet.from_local_datetime(&at(3, 0))
            .single()
            .unwrap()
            .offset(),
        &Cet::summer()
    );
    let at = |h, m| {
        NaiveDate::from_ymd_opt(2026, 10, 25)
            .unwrap()
            .and_hms_opt(h, m, 0)
            .unwrap()
    };
    assert!(matches!(
        Cet.from_local_datetime(&at(2, 30)),
        MappedLocalTime::Ambiguous(..)
    ));
    assert_eq!(
        Cet.from_local_datetime(&at(3, 0))
            .single()
            .unwrap()
            .offset(),
        &Cet::winter()
    );
}

#[test]
fn daily_follows_local_time_across_dst() {
    let (mut s, clock) = attached(Cet, "daily=12:00", utc(2026, 3, 27, 0, 0, 0));
    let log = run(&mut s, &clock, utc(2026, 3, 31, 0, 0, 0));
    assert_eq!(
        take_names(&log),
        [
            "daily-20260327T110000Z",
            "daily-20260328T110000Z",
            "daily-20260329T100000Z", // now CEST
            "daily-20260330T100000Z",
        ]
    );
}

#[test]
fn a_slot_in_the_spring_forward_gap_fires_as_late_as_the_gap() {
    let (mut s, clock) = attached(Cet, "daily=02:30", utc(2026, 3, 28, 12, 0, 0));
    // 02:30 does not exist on the 29th; it fires at 01:30 UTC = 03:30 CEST.
    assert_eq!(s.next_wake(clock.now()), Some(utc(2026, 3, 29, 1, 30, 0)));
    let log = run(&mut s, &clock, utc(2026, 3, 31, 0, 0, 0));
    assert_eq!(
        take_names(&log),
        ["daily-20260329T013000Z", "daily-20260330T003000Z"]
    );
}

#[test]
fn a_slot_in_the_repeated_fall_back_hour_fires_once() {
    let (mut s, clock) = attached(Cet, "daily=02:30", utc(2026, 10, 24, 12, 0, 0));
    // 02:30 happens at 00:30 UTC (CEST) and again at 01:30 UTC (CET).
    assert_eq!(s.next_wake(clock.now()), Some(utc(2026, 10, 25, 0, 30, 0)));
    clock.set(utc(2026, 10, 25, 0, 30, 0));
    assert_eq!(s.due(clock.now()), [take("daily-20261025T003000Z")]);
    clock.set(utc(2026, 10, 25, 1, 30, 0));
    assert_eq!(s.due(clock.now()), [], "the second 02:30 is the same slot");
    assert_eq!(s.next_wake(clock.now()), Some(utc(2026, 10, 26, 1, 30, 0)));
}

#[test]
fn periodic_ignores_dst() {
    let (mut s, clock) = attached(Cet, "periodic=60", utc(2026, 3, 29, 0, 0, 0));
    let log = run(&mut s, &clock, utc(2026, 3, 29, 3, 0, 0));
    assert_eq!(
        take_names(&log),
        [
            "periodic-20260329T010000Z",
            "periodic-20260329T020000Z",
            "periodic-20260329T030000Z",
        ]
    );
}

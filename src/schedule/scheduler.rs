//! Which scheduled snapshots to take or delete, and when to look again: a
//! plain struct fed with events and `now`, so an actor can own it and tests
//! can drive it with a fake clock.

use super::policy::{Rule, RuleKind, SnapPolicy};
use chrono::{
    DateTime, Datelike, Days, MappedLocalTime, NaiveDate, NaiveDateTime, Offset, TimeDelta,
    TimeZone, Utc,
};
use std::collections::BTreeMap;

/// What the owner of the scheduler should do now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Take a snapshot of `volume` named `name`, then report it with
    /// [`Scheduler::snapshot_taken`].
    Take {
        volume: String,
        name: String,
        rule: RuleKind,
    },
    /// Delete snapshot `name` of `volume` (retention), then report
    /// [`Scheduler::snapshot_removed`] or [`Scheduler::delete_failed`].
    Delete { volume: String, name: String },
}

/// A scheduled snapshot the scheduler knows of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduledSnapshot {
    pub name: String,
    pub kind: RuleKind,
    /// The slot it was taken for, from its name (the take itself may have
    /// completed a little later; schedule and retention go by the slot).
    pub at: DateTime<Utc>,
}

const STAMP: &str = "%Y%m%dT%H%M%SZ";

/// The name of the snapshot `kind` takes for the slot at `at`.
pub fn snapshot_name(kind: RuleKind, at: DateTime<Utc>) -> String {
    format!("{kind}-{}", at.format(STAMP))
}

/// The kind and slot of a scheduled snapshot's name; `None` for any other
/// name (a manual snapshot).
pub fn parse_snapshot_name(name: &str) -> Option<(RuleKind, DateTime<Utc>)> {
    let (kind, stamp) = name.split_once('-')?;
    let kind = RuleKind::ALL.into_iter().find(|k| k.as_str() == kind)?;
    let at = NaiveDateTime::parse_from_str(stamp, STAMP).ok()?.and_utc();
    // Only the exact form we write: no "daily-2026112T1200Z" look-alikes.
    (snapshot_name(kind, at) == name).then_some((kind, at))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Retention {
    Kept,
    /// Handed out as a Delete, not reported back yet.
    Deleting,
    /// Its delete failed; left alone until the next snapshot of its kind.
    DeleteFailed,
}

#[derive(Debug, Clone)]
struct Tracked {
    kind: RuleKind,
    at: DateTime<Utc>,
    retention: Retention,
}

#[derive(Debug, Clone, Default)]
struct VolumeState {
    policy: Option<SnapPolicy>,
    policy_since: Option<DateTime<Utc>>,
    attached_since: Option<DateTime<Utc>>,
    /// The latest slot handed out per kind, so it is never handed out again.
    fired: BTreeMap<RuleKind, DateTime<Utc>>,
    /// Scheduled snapshots by name.
    snapshots: BTreeMap<String, Tracked>,
}

impl VolumeState {
    /// Since when slots count: attached, under the current policy.
    fn active_since(&self) -> Option<DateTime<Utc>> {
        let attached = self.attached_since?;
        Some(self.policy_since.map_or(attached, |p| p.max(attached)))
    }

    /// The latest slot of `kind` already taken or handed out.
    fn last_slot(&self, kind: RuleKind) -> Option<DateTime<Utc>> {
        let newest = self
            .snapshots
            .values()
            .filter(|s| s.kind == kind)
            .map(|s| s.at)
            .max();
        newest.max(self.fired.get(&kind).copied())
    }

    /// Snapshots of `rule`'s kind beyond its keep that are still to delete.
    fn excess(&self, rule: &Rule) -> Vec<String> {
        let mut of_kind: Vec<(&String, &Tracked)> = self
            .snapshots
            .iter()
            .filter(|(_, s)| s.kind == rule.kind())
            .collect();
        of_kind.sort_by(|a, b| b.1.at.cmp(&a.1.at).then(b.0.cmp(a.0)));
        of_kind
            .into_iter()
            .skip(rule.keep() as usize)
            .filter(|(_, s)| s.retention == Retention::Kept)
            .map(|(n, _)| n.clone())
            .collect()
    }
}

/// Per-volume schedule state for one node.
///
/// # Semantics
///
/// - **Only attached volumes fire** (as in Portworx): a detached volume's
///   data cannot change, so its snapshot would repeat the previous one.
/// - **Periodic** fires one interval after the latest of: the attach time, the
///   moment the policy was set (if later), and the last periodic slot (fired
///   here, or the newest periodic snapshot reported). Re-attaching therefore
///   restarts the interval. Periodic slots lie on that grid: a late `due`
///   fires the latest grid point passed, once, and the grid continues from it.
/// - **Daily, weekly, monthly** fire at their wall-clock slot, in the
///   scheduler's time zone, only if the volume has been attached, under this
///   policy, without a break from before the slot until `due` is called.
///   Slots missed while detached are not caught up. A `due` call that comes
///   late still fires the latest passed slot, once, as long as the volume was
///   attached at the slot; slots older than the latest are skipped, never
///   replayed in a burst.
/// - **A slot fires at most once**: `due` records it when it hands out the
///   `Take`, before the snapshot exists, so repeated calls and a
///   clock stepping back cannot fire it again. A take that fails is not retried
///   for that slot; the next slot tries again.
/// - **Monthly day 29..=31** falls on the month's last day in shorter months.
/// - **Names** are `<kind>-<slot in UTC, YYYYMMDDTHHMMSSZ>`, e.g.
///   `daily-20261121T120000Z`: deterministic, valid snapshot names, and
///   sortable by time within a kind. The name is the record: after a restart,
///   reporting the existing snapshots with [`Scheduler::snapshot_taken`]
///   restores retention and "never twice". Two rules due at the same instant
///   take two snapshots (different names).
/// - **Retention** is per kind: once a new snapshot of a kind is reported, the
///   newest `keep` of that kind stay and older ones are deleted. Only names of
///   the scheduled form count; a manual snapshot is never touched. Snapshots
///   of a kind the policy no longer has are kept (removing a rule never deletes
///   data). Retention runs whether or not the volume is attached. A delete is
///   handed out once; if it fails ([`Scheduler::delete_failed`]) it is retried
///   after the next snapshot of its kind, not in a loop.
///
/// # Time zones and DST
///
/// The scheduler is generic over chrono's [`TimeZone`]: tests use a
/// [`chrono::FixedOffset`], production uses [`chrono::Local`], the node's
/// zone from the system's tz database. `Local` rather than a `FixedOffset`
/// taken from it at start: a fixed offset would put every wall-clock rule an
/// hour off after each DST change until the daemon restarts. Around a change:
/// - a slot inside the spring-forward gap (02:30 when clocks jump from 02:00
///   to 03:00) fires at the instant it would have without the jump, i.e. as
///   late as the gap is long (03:30);
/// - a slot in the repeated fall-back hour (01:30 twice) fires at its first
///   occurrence only;
/// - periodic rules count real elapsed time and ignore DST.
#[derive(Debug, Clone)]
pub struct Scheduler<Tz: TimeZone> {
    tz: Tz,
    volumes: BTreeMap<String, VolumeState>,
}

impl<Tz: TimeZone> Scheduler<Tz> {
    /// Wall-clock rules are evaluated in `tz`: `chrono::Local` in production,
    /// a `FixedOffset` in tests (see the type's docs on DST).
    pub fn new(tz: Tz) -> Self {
        Scheduler {
            tz,
            volumes: BTreeMap::new(),
        }
    }

    fn volume(&mut self, volume: &str) -> &mut VolumeState {
        self.volumes.entry(volume.to_string()).or_default()
    }

    /// Set (or clear, with `None`) a volume's policy. A changed policy counts
    /// from `now`: slots before it do not fire under it.
    pub fn set_policy(&mut self, volume: &str, policy: Option<SnapPolicy>, now: DateTime<Utc>) {
        let v = self.volume(volume);
        if v.policy != policy {
            v.policy = policy;
            v.policy_since = Some(now);
        }
    }

    pub fn policy(&self, volume: &str) -> Option<&SnapPolicy> {
        self.volumes.get(volume)?.policy.as_ref()
    }

    /// The volume is removed: forget everything about it.
    pub fn forget(&mut self, volume: &str) {
        self.volumes.remove(volume);
    }

    /// The volume was attached at `now`. Repeated calls keep the first time.
    pub fn attached(&mut self, volume: &str, now: DateTime<Utc>) {
        let v = self.volume(volume);
        v.attached_since.get_or_insert(now);
    }

    pub fn detached(&mut self, volume: &str) {
        if let Some(v) = self.volumes.get_mut(volume) {
            v.attached_since = None;
        }
    }

    pub fn attached_since(&self, volume: &str) -> Option<DateTime<Utc>> {
        self.volumes.get(volume)?.attached_since
    }

    /// A snapshot of `volume` exists: one just taken for a `Take`, or one
    /// found at start. Returns false, and records nothing, for names not of
    /// the scheduled form (manual snapshots are none of retention's business).
    pub fn snapshot_taken(&mut self, volume: &str, name: &str) -> bool {
        let Some((kind, at)) = parse_snapshot_name(name) else {
            return false;
        };
        let v = self.volume(volume);
        v.snapshots.entry(name.to_string()).or_insert(Tracked {
            kind,
            at,
            retention: Retention::Kept,
        });
        // A new snapshot is the moment to retry deletes that failed before.
        for s in v.snapshots.values_mut() {
            if s.kind == kind && s.retention == Retention::DeleteFailed {
                s.retention = Retention::Kept;
            }
        }
        true
    }

    /// A snapshot is gone (deleted for a `Delete`, or removed by hand).
    pub fn snapshot_removed(&mut self, volume: &str, name: &str) {
        if let Some(v) = self.volumes.get_mut(volume) {
            v.snapshots.remove(name);
        }
    }

    /// A `Delete` failed: the snapshot stays known and is retried after the
    /// next snapshot of its kind.
    pub fn delete_failed(&mut self, volume: &str, name: &str) {
        if let Some(s) = self
            .volumes
            .get_mut(volume)
            .and_then(|v| v.snapshots.get_mut(name))
        {
            s.retention = Retention::DeleteFailed;
        }
    }

    /// The scheduled snapshots of a volume, oldest first.
    pub fn snapshots(&self, volume: &str) -> Vec<ScheduledSnapshot> {
        let mut out: Vec<ScheduledSnapshot> = self
            .volumes
            .get(volume)
            .map(|v| {
                v.snapshots
                    .iter()
                    .map(|(name, s)| ScheduledSnapshot {
                        name: name.clone(),
                        kind: s.kind,
                        at: s.at,
                    })
                    .collect()
            })
            .unwrap_or_default();
        out.sort_by(|a, b| a.at.cmp(&b.at).then_with(|| a.name.cmp(&b.name)));
        out
    }

    /// What to do at `now`: takes first (volume by volume, rules in kind
    /// order), then retention deletes. Each slot and each delete is handed out
    /// once, so calling this again at once returns nothing new.
    pub fn due(&mut self, now: DateTime<Utc>) -> Vec<Action> {
        let mut actions = Vec::new();
        let tz = &self.tz;
        for (volume, v) in &mut self.volumes {
            let Some(policy) = v.policy.clone() else {
                continue;
            };
            for rule in policy.rules() {
                if let Some(slot) = pending_slot(tz, v, rule, now) {
                    v.fired.insert(rule.kind(), slot);
                    actions.push(Action::Take {
                        volume: volume.clone(),
                        name: snapshot_name(rule.kind(), slot),
                        rule: rule.kind(),
                    });
                }
            }
            for rule in policy.rules() {
                for name in v.excess(rule) {
                    if let Some(s) = v.snapshots.get_mut(&name) {
                        s.retention = Retention::Deleting;
                    }
                    actions.push(Action::Delete {
                        volume: volume.clone(),
                        name,
                    });
                }
            }
        }
        actions
    }

    /// When `due` will next have something to do, if nothing else changes
    /// (attach, detach, policy, snapshot reports): `now` itself if something
    /// is due already, `None` if nothing ever will be.
    pub fn next_wake(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let mut wake: Option<DateTime<Utc>> = None;
        for v in self.volumes.values() {
            let Some(policy) = &v.policy else { continue };
            for rule in policy.rules() {
                let at = if !v.excess(rule).is_empty()
                    || pending_slot(&self.tz, v, rule, now).is_some()
                {
                    Some(now)
                } else {
                    next_slot(&self.tz, v, rule, now)
                };
                if let Some(at) = at {
                    wake = Some(wake.map_or(at, |w| w.min(at)));
                }
            }
        }
        wake
    }
}

/// The slot of `rule` to fire at `now`, if one is due and not yet fired.
fn pending_slot<Tz: TimeZone>(
    tz: &Tz,
    v: &VolumeState,
    rule: &Rule,
    now: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    let since = v.active_since()?;
    let last = v.last_slot(rule.kind());
    if let Rule::Periodic { every_mins, .. } = *rule {
        let base = last.map_or(since, |l| l.max(since));
        let every = TimeDelta::minutes(every_mins.into());
        if now < base + every {
            return None;
        }
        // The latest grid point passed: a late call fires once, no burst.
        let steps = (now - base).num_seconds() / every.num_seconds();
        return Some(base + TimeDelta::seconds(steps * every.num_seconds()));
    }
    let slot = latest_wall_slot(tz, rule, now)?;
    (slot >= since && last.map_or(true, |l| slot > l)).then_some(slot)
}

/// The next instant after `now` at which `rule` would fire, assuming the
/// volume stays as it is.
fn next_slot<Tz: TimeZone>(
    tz: &Tz,
    v: &VolumeState,
    rule: &Rule,
    now: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    let since = v.active_since()?;
    let last = v.last_slot(rule.kind());
    if let Rule::Periodic { every_mins, .. } = *rule {
        let base = last.map_or(since, |l| l.max(since));
        return Some(base + TimeDelta::minutes(every_mins.into()));
    }
    // After now and after the last fired slot (the clock may have stepped
    // back past it), and not before the volume became active.
    let after = last.map_or(now, |l| l.max(now));
    let slot = first_wall_slot(tz, rule, after, false)?;
    if slot >= since {
        Some(slot)
    } else {
        first_wall_slot(tz, rule, since, true)
    }
}

/// Enough days to find one slot of any rule: monthly slots are at most 31
/// days apart; the margin covers zones whose dates shift around DST.
const SCAN_DAYS: u64 = 40;

/// The latest slot of a wall-clock rule at or before `t`.
fn latest_wall_slot<Tz: TimeZone>(tz: &Tz, rule: &Rule, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
    // Start a day ahead: after a fall-back across midnight, a slot dated
    // tomorrow can already be past.
    let start = t
        .with_timezone(tz)
        .date_naive()
        .checked_add_days(Days::new(1))?;
    (0..SCAN_DAYS)
        .filter_map(|i| start.checked_sub_days(Days::new(i)))
        .filter_map(|d| wall_slot_on(tz, rule, d))
        .find(|s| *s <= t)
}

/// The first slot of a wall-clock rule after `t` (or at `t` if `inclusive`).
fn first_wall_slot<Tz: TimeZone>(
    tz: &Tz,
    rule: &Rule,
    t: DateTime<Utc>,
    inclusive: bool,
) -> Option<DateTime<Utc>> {
    let start = t
        .with_timezone(tz)
        .date_naive()
        .checked_sub_days(Days::new(1))?;
    (0..SCAN_DAYS)
        .filter_map(|i| start.checked_add_days(Days::new(i)))
        .filter_map(|d| wall_slot_on(tz, rule, d))
        .find(|s| *s > t || (inclusive && *s == t))
}

/// The instant of `rule`'s slot on local date `date`, if it has one that day.
fn wall_slot_on<Tz: TimeZone>(tz: &Tz, rule: &Rule, date: NaiveDate) -> Option<DateTime<Utc>> {
    let at = match *rule {
        Rule::Periodic { .. } => return None,
        Rule::Daily { at, .. } => at,
        Rule::Weekly { weekday, at, .. } => {
            if date.weekday() != weekday {
                return None;
            }
            at
        }
        Rule::Monthly { day, at, .. } => {
            if date.day() != day.min(date.num_days_in_month().into()) {
                return None;
            }
            at
        }
    };
    local_instant(tz, date.and_time(at))
}

/// A local wall-clock time as an instant, resolving DST as [`Scheduler`]'s docs say.
fn local_instant<Tz: TimeZone>(tz: &Tz, local: NaiveDateTime) -> Option<DateTime<Utc>> {
    match tz.from_local_datetime(&local) {
        MappedLocalTime::Single(t) => Some(t.with_timezone(&Utc)),
        MappedLocalTime::Ambiguous(first, _) => Some(first.with_timezone(&Utc)),
        MappedLocalTime::None => {
            // In a gap: read the time with the offset in force before the
            // jump (a day earlier), which lands as far past the gap's start
            // as the slot was meant to be.
            let before = local.checked_sub_days(Days::new(1))?;
            let offset = tz.offset_from_local_datetime(&before).earliest()?.fix();
            offset
                .from_local_datetime(&local)
                .single()
                .map(|t| t.with_timezone(&Utc))
        }
    }
}

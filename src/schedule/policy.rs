//! `snap_interval` and `snap_schedule`, in Portworx's formats, parsed into a
//! [`SnapPolicy`] whose `Display` is the canonical form `volume inspect` shows
//! and the catalog stores.

use super::error::{clip, ScheduleError};
use chrono::{NaiveTime, Timelike, Weekday};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Most snapshots one rule may keep: beyond this a typo (`keep=50000`) is
/// likelier than intent, and every kept snapshot pins space.
pub const MAX_KEEP: u32 = 1000;
/// Longest periodic interval, one (365-day) year in minutes.
pub const MAX_PERIODIC_MINS: u32 = 365 * 24 * 60;

/// The kinds of rule; also the prefix of a scheduled snapshot's name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RuleKind {
    Periodic,
    Daily,
    Weekly,
    Monthly,
}

impl RuleKind {
    pub const ALL: [RuleKind; 4] = [
        RuleKind::Periodic,
        RuleKind::Daily,
        RuleKind::Weekly,
        RuleKind::Monthly,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RuleKind::Periodic => "periodic",
            RuleKind::Daily => "daily",
            RuleKind::Weekly => "weekly",
            RuleKind::Monthly => "monthly",
        }
    }

    /// Portworx's defaults when a rule gives no keep count.
    pub fn default_keep(self) -> u32 {
        match self {
            RuleKind::Periodic => 5,
            RuleKind::Daily => 7,
            RuleKind::Weekly => 5,
            RuleKind::Monthly => 12,
        }
    }

    pub fn from_name(s: &str) -> Option<RuleKind> {
        RuleKind::ALL
            .into_iter()
            .find(|k| k.as_str().eq_ignore_ascii_case(s))
    }
}

impl fmt::Display for RuleKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One rule of a policy. Times are wall-clock times in the scheduler's time
/// zone, whole minutes (`at` never has seconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// Every `every_mins` minutes while attached.
    Periodic {
        every_mins: u32,
        keep: u32,
    },
    Daily {
        at: NaiveTime,
        keep: u32,
    },
    Weekly {
        weekday: Weekday,
        at: NaiveTime,
        keep: u32,
    },
    /// `day` is 1..=31; in shorter months 29..=31 mean the month's last day.
    Monthly {
        day: u32,
        at: NaiveTime,
        keep: u32,
    },
}

impl Rule {
    pub fn kind(&self) -> RuleKind {
        match self {
            Rule::Periodic { .. } => RuleKind::Periodic,
            Rule::Daily { .. } => RuleKind::Daily,
            Rule::Weekly { .. } => RuleKind::Weekly,
            Rule::Monthly { .. } => RuleKind::Monthly,
        }
    }

    /// How many of this rule's snapshots retention keeps (newest first).
    pub fn keep(&self) -> u32 {
        match *self {
            Rule::Periodic { keep, .. }
            | Rule::Daily { keep, .. }
            | Rule::Weekly { keep, .. }
            | Rule::Monthly { keep, .. } => keep,
        }
    }

    /// One `kind=value[,keep]` part of `snap_schedule`.
    fn parse(rule: &str) -> Result<Rule, ScheduleError> {
        let (kind_s, rest) = rule
            .split_once('=')
            .ok_or_else(|| ScheduleError::NoEquals { rule: clip(rule) })?;
        let kind =
            RuleKind::from_name(kind_s.trim()).ok_or_else(|| ScheduleError::UnknownKind {
                kind: clip(kind_s.trim()),
            })?;
        let (value, keep) = match rest.split_once(',') {
            None => (rest.trim(), kind.default_keep()),
            Some((_, k)) if k.contains(',') => {
                return Err(ScheduleError::TooManyFields { rule: clip(rule) })
            }
            Some((v, k)) => (v.trim(), parse_keep(rule, k.trim())?),
        };
        Ok(match kind {
            RuleKind::Periodic => Rule::Periodic {
                every_mins: number(value)
                    .filter(|m| (1..=MAX_PERIODIC_MINS).contains(m))
                    .ok_or_else(|| ScheduleError::Minutes {
                        rule: clip(rule),
                        value: clip(value),
                    })?,
                keep,
            },
            RuleKind::Daily => Rule::Daily {
                at: parse_time(rule, value)?,
                keep,
            },
            RuleKind::Weekly => {
                let (day, at) = split_at_sign(rule, value, "weekly=sunday@12:00")?;
                // chrono takes exactly the full English name or its first three
                // letters, any case; "tues" or "dimanche" are refused.
                let weekday = Weekday::from_str(day).map_err(|_| ScheduleError::Weekday {
                    rule: clip(rule),
                    value: clip(day),
                })?;
                Rule::Weekly {
                    weekday,
                    at: parse_time(rule, at)?,
                    keep,
                }
            }
            RuleKind::Monthly => {
                let (day, at) = split_at_sign(rule, value, "monthly=15@12:00")?;
                Rule::Monthly {
                    day: number(day)
                        .filter(|d| (1..=31).contains(d))
                        .ok_or_else(|| ScheduleError::MonthDay {
                            rule: clip(rule),
                            value: clip(day),
                        })?,
                    at: parse_time(rule, at)?,
                    keep,
                }
            }
        })
    }
}

/// Canonical: lowercase, zero-padded times, full weekday names, keep always
/// written out so `inspect` shows what retention will do.
impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hm = |t: &NaiveTime| format!("{:02}:{:02}", t.hour(), t.minute());
        match self {
            Rule::Periodic { every_mins, keep } => write!(f, "periodic={every_mins},{keep}"),
            Rule::Daily { at, keep } => write!(f, "daily={},{keep}", hm(at)),
            Rule::Weekly { weekday, at, keep } => {
                write!(f, "weekly={}@{},{keep}", weekday_name(*weekday), hm(at))
            }
            Rule::Monthly { day, at, keep } => write!(f, "monthly={day}@{},{keep}", hm(at)),
        }
    }
}

fn weekday_name(w: Weekday) -> &'static str {
    match w {
        Weekday::Mon => "monday",
        Weekday::Tue => "tuesday",
        Weekday::Wed => "wednesday",
        Weekday::Thu => "thursday",
        Weekday::Fri => "friday",
        Weekday::Sat => "saturday",
        Weekday::Sun => "sunday",
    }
}

/// Plain decimal digits only: `str::parse` would also take `+5`.
fn number(s: &str) -> Option<u32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn parse_keep(rule: &str, keep: &str) -> Result<u32, ScheduleError> {
    number(keep)
        .filter(|k| (1..=MAX_KEEP).contains(k))
        .ok_or_else(|| ScheduleError::Keep {
            rule: clip(rule),
            keep: clip(keep),
        })
}

/// `H:MM` or `HH:MM`, 00:00..=23:59.
fn parse_time(rule: &str, s: &str) -> Result<NaiveTime, ScheduleError> {
    let bad = || ScheduleError::Time {
        rule: clip(rule),
        value: clip(s),
    };
    let (h, m) = s.trim().split_once(':').ok_or_else(bad)?;
    if !(1..=2).contains(&h.len()) || m.len() != 2 {
        return Err(bad());
    }
    let (h, m) = (number(h).ok_or_else(bad)?, number(m).ok_or_else(bad)?);
    NaiveTime::from_hms_opt(h, m, 0).ok_or_else(bad)
}

fn split_at_sign<'a>(
    rule: &str,
    value: &'a str,
    example: &'static str,
) -> Result<(&'a str, &'a str), ScheduleError> {
    value
        .split_once('@')
        .map(|(d, t)| (d.trim(), t.trim()))
        .ok_or_else(|| ScheduleError::MissingAt {
            rule: clip(rule),
            example,
        })
}

/// A volume's snapshot rules, at most one per kind, kept in kind order so that
/// equality and `Display` do not depend on how the user ordered them.
///
/// Serialized as its canonical string: the catalog stays readable and an
/// older policy re-parses under the same rules as a new one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct SnapPolicy {
    rules: Vec<Rule>,
}

impl SnapPolicy {
    /// Combine the two volume options. `None` when neither asks for anything:
    /// `snap_interval=0` and an empty `snap_schedule` mean off, as in Portworx.
    /// `snap_interval=N` is `periodic=N` with the default keep; giving it
    /// together with a periodic rule is refused rather than one silently winning.
    pub fn from_options(
        interval: Option<&str>,
        schedule: Option<&str>,
    ) -> Result<Option<SnapPolicy>, ScheduleError> {
        let mut rules = match schedule.map(str::trim) {
            None | Some("") => Vec::new(),
            Some(s) => s.parse::<SnapPolicy>()?.rules,
        };
        if let Some(iv) = interval {
            let every_mins = number(iv.trim())
                .filter(|m| *m <= MAX_PERIODIC_MINS)
                .ok_or_else(|| ScheduleError::Interval { value: clip(iv) })?;
            if every_mins > 0 {
                if rules.iter().any(|r| r.kind() == RuleKind::Periodic) {
                    return Err(ScheduleError::PeriodicTwice {
                        interval: clip(iv.trim()),
                    });
                }
                rules.insert(
                    0,
                    Rule::Periodic {
                        every_mins,
                        keep: RuleKind::Periodic.default_keep(),
                    },
                );
            }
        }
        Ok((!rules.is_empty()).then_some(SnapPolicy { rules }))
    }

    /// The rules, in kind order (periodic, daily, weekly, monthly).
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    pub fn rule(&self, kind: RuleKind) -> Option<&Rule> {
        self.rules.iter().find(|r| r.kind() == kind)
    }
}

/// The `snap_schedule` syntax. Whitespace around parts is ignored and kinds
/// are case-insensitive; an empty string is refused (use
/// [`SnapPolicy::from_options`] for "off").
impl FromStr for SnapPolicy {
    type Err = ScheduleError;

    fn from_str(input: &str) -> Result<Self, ScheduleError> {
        if input.trim().is_empty() {
            return Err(ScheduleError::Empty);
        }
        let mut rules: Vec<Rule> = Vec::new();
        for part in input.split(';').map(str::trim) {
            if part.is_empty() {
                return Err(ScheduleError::EmptyRule { input: clip(input) });
            }
            let rule = Rule::parse(part)?;
            if rules.iter().any(|r| r.kind() == rule.kind()) {
                return Err(ScheduleError::Duplicate {
                    kind: rule.kind().to_string(),
                });
            }
            rules.push(rule);
        }
        rules.sort_by_key(Rule::kind);
        Ok(SnapPolicy { rules })
    }
}

impl fmt::Display for SnapPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, r) in self.rules.iter().enumerate() {
            if i > 0 {
                f.write_str(";")?;
            }
            write!(f, "{r}")?;
        }
        Ok(())
    }
}

impl From<SnapPolicy> for String {
    fn from(p: SnapPolicy) -> String {
        p.to_string()
    }
}

impl TryFrom<String> for SnapPolicy {
    type Error = ScheduleError;

    fn try_from(s: String) -> Result<Self, ScheduleError> {
        s.parse()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(h: u32, m: u32) -> NaiveTime {
        NaiveTime::from_hms_opt(h, m, 0).unwrap()
    }

    fn parse(s: &str) -> SnapPolicy {
        s.parse().unwrap_or_else(|e| panic!("{s:?} refused: {e}"))
    }

    #[test]
    fn every_documented_form() {
        let p = parse("periodic=60,10;daily=12:00,4;weekly=sunday@12:00,2;monthly=15@12:00");
        assert_eq!(
            p.rules(),
            &[
                Rule::Periodic {
                    every_mins: 60,
                    keep: 10
                },
                Rule::Daily {
                    at: t(12, 0),
                    keep: 4
                },
                Rule::Weekly {
                    weekday: Weekday::Sun,
                    at: t(12, 0),
                    keep: 2
                },
                Rule::Monthly {
                    day: 15,
                    at: t(12, 0),
                    keep: 12
                },
            ]
        );
    }

    #[test]
    fn default_keeps_are_portworx_ones() {
        let p = parse("periodic=30;daily=1:05;weekly=mon@23:59;monthly=31@00:00");
        let keeps: Vec<u32> = p.rules().iter().map(Rule::keep).collect();
        assert_eq!(keeps, [5, 7, 5, 12]);
        assert_eq!(
            p.rule(RuleKind::Daily),
            Some(&Rule::Daily {
                at: t(1, 5),
                keep: 7
            })
        );
    }

    #[test]
    fn lenient_spelling_canonical_display() {
        for (input, canonical) in [
            ("periodic=60,10", "periodic=60,10"),
            ("periodic=060", "periodic=60,5"),
            ("daily=9:05", "daily=09:05,7"),
            (" Daily = 12:00 , 4 ", "daily=12:00,4"),
            ("weekly=SUN@12:00", "weekly=sunday@12:00,5"),
            ("weekly=Wednesday@7:30,3", "weekly=wednesday@07:30,3"),
            ("weekly=thu@00:00", "weekly=thursday@00:00,5"),
            ("monthly=1@23:59,1000", "monthly=1@23:59,1000"),
            // Order given does not matter; canonical order is by kind.
            (
                "monthly=15@12:00;weekly=sat@1:00;daily=12:00;periodic=1",
                "periodic=1,5;daily=12:00,7;weekly=saturday@01:00,5;monthly=15@12:00,12",
            ),
            ("periodic=525600,1", "periodic=525600,1"),
        ] {
            let p = parse(input);
            assert_eq!(p.to_string(), canonical, "{input:?}");
            // Round trip: the canonical form parses back to the same policy.
            assert_eq!(parse(canonical), p, "{canonical:?}");
            assert_eq!(parse(canonical).to_string(), canonical);
        }
        for day in [
            "monday",
            "tuesday",
            "wednesday",
            "thursday",
            "friday",
            "saturday",
            "sunday",
        ] {
            let full = parse(&format!("weekly={day}@12:00"));
            let short = parse(&format!("weekly={}@12:00", &day[..3]));
            assert_eq!(full, short);
            assert_eq!(full.to_string(), format!("weekly={day}@12:00,5"));
        }
    }

    #[test]
    fn serde_as_the_canonical_string() {
        let p = parse("daily=12:00,4;periodic=60");
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(json, "\"periodic=60,5;daily=12:00,4\"");
        assert_eq!(serde_json::from_str::<SnapPolicy>(&json).unwrap(), p);
        let err = serde_json::from_str::<SnapPolicy>("\"daily=25:00\"").unwrap_err();
        assert!(err.to_string().contains("HH:MM"), "{err}");
    }

    #[test]
    fn options_combined() {
        let f = SnapPolicy::from_options;
        assert_eq!(f(None, None).unwrap(), None);
        assert_eq!(f(Some("0"), None).unwrap(), None);
        assert_eq!(f(Some(" 0 "), Some("  ")).unwrap(), None);
        assert_eq!(f(None, Some("")).unwrap(), None);
        assert_eq!(f(Some("15"), None).unwrap(), Some(parse("periodic=15,5")));
        assert_eq!(
            f(Some("15"), Some("daily=12:00")).unwrap(),
            Some(parse("periodic=15;daily=12:00"))
        );
        assert_eq!(
            f(Some("0"), Some("periodic=10,2")).unwrap(),
            Some(parse("periodic=10,2"))
        );
        let err = f(Some("15"), Some("periodic=10")).unwrap_err().to_string();
        assert!(
            err.contains("snap_interval=15") && err.contains("only one"),
            "{err}"
        );
        for bad in ["", "x", "-5", "+5", "1.5", "525601", "99999999999"] {
            let err = f(Some(bad), None).unwrap_err().to_string();
            assert!(err.contains("snap_interval"), "{bad:?}: {err}");
            assert!(err.contains("0 for off"), "{bad:?}: {err}");
            assert!(
                err.contains("example: periodic=60,10;daily"),
                "{bad:?}: {err}"
            );
        }
        // A bad schedule is reported even when the interval is fine.
        assert!(f(Some("5"), Some("daily=x")).is_err());
    }

    #[test]
    fn malformed_input_is_refused_helpfully() {
        let cases: &[(&str, &str)] = &[
            ("", "empty"),
            ("   ", "empty"),
            ("daily=12:00;;weekly=sun@1:00", "empty rule"),
            ("daily=12:00;", "empty rule"),
            (";daily=12:00", "empty rule"),
            ("daily", "no '='"),
            ("12:00", "no '='"),
            ("hourly=5", "unknown rule kind \"hourly\""),
            ("=5", "unknown rule kind \"\""),
            ("daily=12:00;daily=13:00", "two daily rules"),
            ("periodic=5;PERIODIC=6", "two periodic rules"),
            ("daily=12:00,4,5", "more than one ','"),
            ("periodic=60,0", "keep \"0\""),
            ("periodic=60,1001", "from 1 to 1000"),
            ("daily=12:00,x", "keep \"x\""),
            ("daily=12:00,-1", "keep \"-1\""),
            ("daily=12:00,", "keep \"\""),
            (
                "periodic=0",
                "\"0\" in \"periodic=0\" must be whole minutes",
            ),
            ("periodic=525601", "one year"),
            ("periodic=abc", "whole minutes"),
            ("periodic=", "whole minutes"),
            ("periodic=1.5", "whole minutes"),
            (
                "daily=24:00",
                "\"24:00\" in \"daily=24:00\" is not a time of day",
            ),
            ("daily=12:60", "not a time of day"),
            ("daily=1200", "not a time of day"),
            ("daily=12:5", "not a time of day"),
            ("daily=123:00", "not a time of day"),
            ("daily=12:00:00", "not a time of day"),
            ("daily=noon", "not a time of day"),
            ("daily=-1:00", "not a time of day"),
            ("weekly=12:00", "needs '@'"),
            ("weekly=12:00", "like weekly=sunday@12:00"),
            ("monthly=15", "like monthly=15@12:00"),
            (
                "weekly=sundays@12:00",
                "\"sundays\" in \"weekly=sundays@12:00\" is not a weekday",
            ),
            ("weekly=sunda@12:00", "not a weekday"),
            ("weekly=tues@12:00", "not a weekday"),
            ("weekly=dimanche@12:00", "not a weekday"),
            ("weekly=@12:00", "not a weekday"),
            ("weekly=7@12:00", "not a weekday"),
            ("weekly=sunday@25:00", "not a time of day"),
            (
                "monthly=0@12:00",
                "\"0\" in \"monthly=0@12:00\" is not a day of the month",
            ),
            ("monthly=32@12:00", "from 1 to 31"),
            ("monthly=last@12:00", "not a day of the month"),
            ("monthly=15@", "not a time of day"),
        ];
        for (input, want) in cases {
            let err = input
                .parse::<SnapPolicy>()
                .expect_err(&format!("{input:?} accepted"))
                .to_string();
            assert!(err.contains(want), "{input:?}: {err}");
            // Every refusal teaches the syntax.
            for form in [
                "periodic=MINUTES[,KEEP]",
                "daily=HH:MM[,KEEP]",
                "weekly=WEEKDAY@HH:MM[,KEEP]",
                "monthly=DAY@HH:MM[,KEEP]",
                "example: periodic=60,10;daily=12:00,4;weekly=sunday@12:00,2;monthly=15@12:00",
            ] {
                assert!(err.contains(form), "{input:?}: {err}");
            }
        }
    }

    #[test]
    fn huge_input_is_clipped_in_errors() {
        let input = format!("periodic={}", "9".repeat(10_000));
        let err = input.parse::<SnapPolicy>().unwrap_err().to_string();
        assert!(err.len() < 1000, "{} bytes", err.len());
    }
}

//! What a volume is asked to be: names, sizes and `--opt` options, parsed and
//! validated before anything is touched. Every refusal says what is wrong and
//! what would be accepted.

mod fsopts;

pub use fsopts::{accepted_fsopts, check_fsopts, mkfs_args};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

pub const KIB: u64 = 1 << 10;
pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;
pub const TIB: u64 = 1 << 40;

/// Largest volume: the engine's address space, and far beyond any test.
pub const MAX_SIZE: u64 = 64 * TIB;
/// Smallest volume: below this mkfs.ext4 makes a uselessly small filesystem.
pub const MIN_SIZE: u64 = 16 * MIB;
/// mkfs.xfs refuses filesystems under 300 MiB.
pub const MIN_XFS_SIZE: u64 = 300 * MIB;
pub const MAX_NAME_LEN: usize = 128;
pub const DEFAULT_SIZE: u64 = GIB;
pub const DEFAULT_BLOCK_SIZE_KIB: u32 = 32;

/// Options this build honours.
pub const SUPPORTED_OPTIONS: &[&str] = &[
    "size",
    "fs",
    "fsopts",
    "block_size",
    "sticky",
    "label",
    "secure",
    "secret_key",
    "io_priority",
    "group",
    "fg",
    "parent",
    "snap_interval",
    "snap_schedule",
    "passthrough",
    "max_iops",
    "max_bandwidth",
    "repl",
    "replicas",
    "nodes",
    "hosts",
    "shared",
];

/// The option carrying a volume's own passphrase. It is taken out of the
/// options (see [`take_secret`]) before anything stores or logs them.
pub const SECRET_OPTION: &str = "secret_key";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("invalid volume name {name:?}: {reason}")]
    Name { name: String, reason: String },
    #[error("invalid size {value:?}: {reason} (examples: 512M, 10G, 1T, 2Gi, 5GB; a bare number is GiB)")]
    Size { value: String, reason: String },
    #[error("invalid value {value:?} for option {option}: {reason}")]
    Value {
        option: String,
        value: String,
        reason: String,
    },
    #[error("unknown option {option:?}; valid options are: {valid}")]
    Unknown { option: String, valid: String },
    #[error("size given twice: {shorthand:?} in the name and size={option:?}; use one")]
    SizeTwice { shorthand: String, option: String },
}

/// Filesystem made on first mount.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsType {
    Ext4,
    Xfs,
    /// Raw block device only (`dunnage attach`); Docker cannot mount it.
    None,
}

impl fmt::Display for FsType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FsType::Ext4 => "ext4",
            FsType::Xfs => "xfs",
            FsType::None => "none",
        })
    }
}

/// A validated volume specification.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeSpec {
    /// Bytes, a multiple of 4 KiB.
    pub size: u64,
    pub fs: FsType,
    /// Extra mkfs arguments, split on whitespace.
    pub fsopts: Vec<String>,
    pub block_size_kib: u32,
    /// Scheduled snapshots (`snap_interval`, `snap_schedule`); `None` = off.
    /// Defaulted so catalogs written before it existed still load.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snap: Option<crate::schedule::SnapPolicy>,
    pub sticky: bool,
    pub labels: BTreeMap<String, String>,
    /// Encrypted (AES-256-XTS); the key is never part of the spec.
    #[serde(default)]
    pub secure: bool,
    /// Share of the node's engine IO under contention.
    #[serde(default)]
    pub io_priority: crate::engine::priority::IoPriority,
    /// Replica placement group, and whether replication must keep this
    /// volume's replicas apart from other volumes of the group (`fg`).
    /// Recorded now; enforced when replication places replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default)]
    pub fg: bool,
    /// Made as a writable clone of this volume (its name at the time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// ...of this snapshot of it (`parent=SRC@SNAP`), not of its state now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_snapshot: Option<String>,
    /// Let the kernel read and write the data file directly (FUSE
    /// passthrough): loop-device speed, but the volume can't be snapshotted
    /// or cloned while it is attached. Off unless asked for.
    #[serde(default)]
    pub passthrough: bool,
    /// Caps on the volume's IO (`max_iops`, `max_bandwidth`); none by default.
    #[serde(
        default,
        skip_serializing_if = "crate::engine::limit::IoLimits::is_none"
    )]
    pub limits: crate::engine::limit::IoLimits,
    /// Copies of the data, on distinct nodes (cluster mode only beyond 1).
    #[serde(default = "one")]
    pub repl: u8,
    /// Nodes wanted for the replicas (`nodes`/`hosts`); the rest are picked.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<String>,
    /// Several nodes may mount it at once (`export::share`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shared: bool,
}

fn one() -> u8 {
    1
}

impl Default for VolumeSpec {
    fn default() -> Self {
        VolumeSpec {
            size: DEFAULT_SIZE,
            fs: FsType::Ext4,
            fsopts: Vec::new(),
            block_size_kib: DEFAULT_BLOCK_SIZE_KIB,
            snap: None,
            sticky: false,
            labels: BTreeMap::new(),
            secure: false,
            io_priority: Default::default(),
            group: None,
            fg: false,
            parent: None,
            parent_snapshot: None,
            passthrough: false,
            limits: Default::default(),
            repl: 1,
            nodes: Vec::new(),
            shared: false,
        }
    }
}

impl VolumeSpec {
    pub fn block_size_bytes(&self) -> u32 {
        self.block_size_kib * 1024
    }
}

/// Validate a volume name: it becomes a directory name and a mount point.
pub fn validate_name(name: &str) -> Result<(), SpecError> {
    let fail = |reason: &str| {
        Err(SpecError::Name {
            name: name.chars().take(80).collect(),
            reason: reason.to_string(),
        })
    };
    if name.is_empty() {
        return fail("it is empty");
    }
    if name.len() > MAX_NAME_LEN {
        return fail(&format!(
            "it is {} characters long, the limit is {MAX_NAME_LEN}",
            name.len()
        ));
    }
    if name.contains('\0') {
        return fail("it contains a NUL byte");
    }
    if name.contains('/') {
        return fail("it contains '/'");
    }
    if name == "." || name == ".." || name.contains("..") {
        return fail("it contains '..'");
    }
    if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return fail("it must start with a letter or digit");
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return fail(&format!(
            "{c:?} is not allowed; use letters, digits, '_', '.' and '-'"
        ));
    }
    Ok(())
}

/// Split Docker's `name@size` shorthand (from rbd-docker-plugin).
pub fn split_shorthand(name: &str) -> (&str, Option<&str>) {
    match name.split_once('@') {
        Some((n, s)) => (n, Some(s)),
        None => (name, None),
    }
}

/// Parse a size: binary units, `G`, `Gi`, `GiB` and `GB` all mean GiB; a bare
/// number is GiB. The result is rounded up to 4 KiB and range-checked.
pub fn parse_size(value: &str) -> Result<u64, SpecError> {
    let fail = |reason: &str| {
        Err(SpecError::Size {
            value: value.chars().take(40).collect(),
            reason: reason.to_string(),
        })
    };
    let v = value.trim();
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (digits, unit) = v.split_at(split);
    if digits.is_empty() {
        return fail("it must start with a whole number");
    }
    let n: u64 = match digits.parse() {
        Ok(n) => n,
        Err(_) => return fail("the number is too large"),
    };
    let mult = match unit.to_ascii_lowercase().as_str() {
        "" | "g" | "gi" | "gib" | "gb" => GIB,
        "b" => 1,
        "k" | "ki" | "kib" | "kb" => KIB,
        "m" | "mi" | "mib" | "mb" => MIB,
        "t" | "ti" | "tib" | "tb" => TIB,
        _ => return fail(&format!("unknown unit {unit:?}; use K, M, G or T")),
    };
    let bytes = match n.checked_mul(mult) {
        Some(b) if b <= MAX_SIZE => b,
        _ => return fail("larger than the 64 TiB limit"),
    };
    let bytes = bytes.div_ceil(4096) * 4096;
    if bytes < MIN_SIZE {
        return fail("smaller than the 16 MiB minimum");
    }
    Ok(bytes)
}

fn parse_bool(option: &str, value: &str) -> Result<bool, SpecError> {
    match value.to_ascii_lowercase().as_str() {
        "true" | "yes" | "on" | "1" => Ok(true),
        "false" | "no" | "off" | "0" => Ok(false),
        _ => Err(SpecError::Value {
            option: option.to_string(),
            value: value.to_string(),
            reason: "expected true or false".into(),
        }),
    }
}

fn parse_labels(value: &str) -> Result<BTreeMap<String, String>, SpecError> {
    let mut labels = BTreeMap::new();
    for pair in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').ok_or_else(|| SpecError::Value {
            option: "label".into(),
            value: value.to_string(),
            reason: format!("{pair:?} is not key=value; write label=k=v,k2=v2"),
        })?;
        let k = k.trim();
        if k.is_empty() || k.contains(|c: char| c.is_control()) || v.contains(char::is_control) {
            return Err(SpecError::Value {
                option: "label".into(),
                value: value.to_string(),
                reason: format!("{pair:?} has an empty key or control characters"),
            });
        }
        labels.insert(k.to_string(), v.trim().to_string());
    }
    Ok(labels)
}

/// Take the volume's own passphrase out of `opts` (any key case), so that
/// the options can be stored and logged. An empty value is an error.
pub fn take_secret(
    opts: &mut BTreeMap<String, String>,
) -> Result<Option<crate::engine::Secret>, SpecError> {
    let Some(key) = opts
        .keys()
        .find(|k| k.trim().eq_ignore_ascii_case(SECRET_OPTION))
        .cloned()
    else {
        return Ok(None);
    };
    let value = opts.remove(&key).unwrap_or_default();
    if value.is_empty() {
        return Err(SpecError::Value {
            option: SECRET_OPTION.into(),
            value: String::new(),
            reason: "the passphrase is empty".into(),
        });
    }
    Ok(Some(crate::engine::Secret::new(value)))
}

/// Errors are reported against the option at fault, with its value.
fn snap_policy(
    opts: &BTreeMap<String, String>,
) -> Result<Option<crate::schedule::SnapPolicy>, SpecError> {
    let get = |name: &str| {
        opts.iter()
            .find(|(k, _)| k.trim().eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    };
    let (interval, schedule) = (get("snap_interval"), get("snap_schedule"));
    crate::schedule::SnapPolicy::from_options(interval, schedule).map_err(|e| {
        let value = if e.option() == "snap_interval" {
            interval
        } else {
            schedule
        };
        SpecError::Value {
            option: e.option().to_string(),
            value: value.unwrap_or_default().chars().take(64).collect(),
            reason: e.to_string(),
        }
    })
}

/// Build a spec from Docker's `Opts` (plus the size from a `name@size` shorthand).
pub fn parse_options(
    opts: &BTreeMap<String, String>,
    shorthand_size: Option<&str>,
) -> Result<VolumeSpec, SpecError> {
    let mut spec = VolumeSpec::default();
    // One option under two spellings (`repl` and `replicas`, `Size` and
    // `size`) would otherwise be decided by the map's order.
    let mut spelled: BTreeMap<&str, &str> = BTreeMap::new();
    for key in opts.keys() {
        let canon = match key.trim().to_ascii_lowercase().as_str() {
            "replicas" => "repl",
            "hosts" => "nodes",
            "labels" => "label",
            "priority_io" => "io_priority",
            other => SUPPORTED_OPTIONS
                .iter()
                .copied()
                .find(|o| *o == other)
                .unwrap_or(""),
        };
        if canon.is_empty() {
            continue; // unknown: refused below, with the list
        }
        if let Some(first) = spelled.insert(canon, key) {
            return Err(SpecError::Value {
                option: canon.into(),
                value: format!("{}, {}", opts[first], opts[key]),
                reason: format!("given twice, as {first} and as {key}; give it once"),
            });
        }
    }
    for (key, value) in opts {
        let key_l = key.trim().to_ascii_lowercase();
        match key_l.as_str() {
            "size" => {
                if let Some(s) = shorthand_size {
                    return Err(SpecError::SizeTwice {
                        shorthand: s.to_string(),
                        option: value.clone(),
                    });
                }
                spec.size = parse_size(value)?;
            }
            "fs" => {
                spec.fs = match value.trim().to_ascii_lowercase().as_str() {
                    "ext4" => FsType::Ext4,
                    "xfs" => FsType::Xfs,
                    "none" | "raw" => FsType::None,
                    _ => {
                        return Err(SpecError::Value {
                            option: "fs".into(),
                            value: value.clone(),
                            reason: "supported filesystems are ext4, xfs and none (raw block)"
                                .into(),
                        })
                    }
                }
            }
            "fsopts" => {
                spec.fsopts = value.split_whitespace().map(str::to_string).collect();
            }
            "block_size" => {
                let kib: u32 = value.trim().parse().map_err(|_| SpecError::Value {
                    option: "block_size".into(),
                    value: value.clone(),
                    reason: "expected a number of KiB: 4, 8, 16, 32, 64 ... 1024".into(),
                })?;
                if !(4..=1024).contains(&kib) || !kib.is_power_of_two() {
                    return Err(SpecError::Value {
                        option: "block_size".into(),
                        value: value.clone(),
                        reason: "must be a power of two between 4 and 1024 (KiB)".into(),
                    });
                }
                spec.block_size_kib = kib;
            }
            "sticky" => spec.sticky = parse_bool("sticky", value)?,
            // The two options make one policy, built from the whole map
            // whichever of them this is (same result if both are given).
            "snap_interval" | "snap_schedule" => spec.snap = snap_policy(opts)?,
            "secure" => spec.secure = parse_bool("secure", value)?,
            "io_priority" | "priority_io" => {
                spec.io_priority =
                    crate::engine::priority::IoPriority::parse(value).ok_or_else(|| {
                        SpecError::Value {
                            option: key_l.clone(),
                            value: value.clone(),
                            reason: "expected high, medium or low".into(),
                        }
                    })?
            }
            "group" => {
                let g = value.trim();
                if !g.is_empty() {
                    validate_name(g).map_err(|_| SpecError::Value {
                        option: "group".into(),
                        value: value.clone(),
                        reason: "a group name is letters, digits, '_', '.', '-' (at most 128)"
                            .into(),
                    })?;
                    spec.group = Some(g.to_string());
                }
            }
            "fg" => spec.fg = parse_bool("fg", value)?,
            "parent" => {
                let (p, snap) = match value.trim().split_once('@') {
                    Some((p, snap)) => (p, Some(snap)),
                    None => (value.trim(), None),
                };
                validate_name(p)?;
                if let Some(snap) = snap {
                    validate_name(snap).map_err(|_| SpecError::Value {
                        option: key_l.clone(),
                        value: value.clone(),
                        reason: "SRC@SNAP names a snapshot of SRC: letters, digits, '_', '.', '-', starting with a letter or digit (`dunnage snapshot ls SRC` lists them)".into(),
                    })?;
                    spec.parent_snapshot = Some(snap.to_string());
                }
                spec.parent = Some(p.to_string());
            }
            // Taken out by `take_secret` before parsing; never stored.
            SECRET_OPTION => {}
            "label" | "labels" => spec.labels = parse_labels(value)?,
            "repl" | "replicas" => {
                let n: u32 = value.trim().parse().unwrap_or(0);
                if !(1..=3).contains(&n) {
                    return Err(SpecError::Value {
                        option: key_l,
                        value: value.clone(),
                        reason: "copies of the data must be 1, 2 or 3".into(),
                    });
                }
                spec.repl = n as u8;
            }
            "nodes" | "hosts" => spec.nodes = parse_nodes(&key_l, value)?,
            "passthrough" => spec.passthrough = parse_bool("passthrough", value)?,
            "max_iops" => spec.limits.iops = parse_max_iops(value)?,
            "max_bandwidth" => spec.limits.bandwidth = parse_max_bandwidth(value)?,
            "shared" => spec.shared = parse_bool("shared", value)?,
            _ => {
                return Err(SpecError::Unknown {
                    option: key.chars().take(64).collect(),
                    valid: SUPPORTED_OPTIONS.join(", "),
                })
            }
        }
    }
    if let Some(s) = shorthand_size {
        spec.size = parse_size(s)?;
    }
    if spec.fs == FsType::Xfs && spec.size < MIN_XFS_SIZE {
        return Err(SpecError::Value {
            option: "size".into(),
            value: format!("{} MiB", spec.size / MIB),
            reason: "xfs needs at least 300 MiB; use a larger size or fs=ext4".into(),
        });
    }
    if spec.passthrough {
        check_passthrough(&spec)?;
    }
    if spec.nodes.len() > spec.repl as usize {
        return Err(SpecError::Value {
            option: "nodes".into(),
            value: spec.nodes.join(","),
            reason: format!(
                "{} nodes named for repl={} copies; name at most repl nodes",
                spec.nodes.len(),
                spec.repl
            ),
        });
    }
    if spec.shared && spec.fs == FsType::None {
        return Err(SpecError::Value {
            option: "shared".into(),
            value: "true".into(),
            reason:
                "nodes share a volume's filesystem, and fs=none makes none; use fs=ext4 or fs=xfs"
                    .into(),
        });
    }
    if spec.shared && spec.secure {
        return Err(SpecError::Value {
            option: "shared".into(),
            value: "true".into(),
            reason: "other nodes read a shared volume's files in clear over the replica port, which encryption at rest would not cover; drop secure=true or shared=true".into(),
        });
    }
    if spec.fs == FsType::None && !spec.fsopts.is_empty() {
        return Err(SpecError::Value {
            option: "fsopts".into(),
            value: spec.fsopts.join(" "),
            reason: "fs=none makes no filesystem, so fsopts has nothing to apply to".into(),
        });
    }
    // After the loop: `fs` may come after `fsopts`, or not at all (ext4).
    check_fsopts(spec.fs, &spec.fsopts)?;
    Ok(spec)
}

/// `nodes=a;b` or `a,b`: distinct node names.
fn parse_nodes(option: &str, value: &str) -> Result<Vec<String>, SpecError> {
    let mut nodes: Vec<String> = Vec::new();
    for n in value
        .split([';', ','])
        .map(str::trim)
        .filter(|n| !n.is_empty())
    {
        let bad = |reason: String| SpecError::Value {
            option: option.to_string(),
            value: value.chars().take(64).collect(),
            reason,
        };
        validate_name(n).map_err(|_| {
            bad(format!(
                "{n:?} is not a node name (letters, digits, '_', '.', '-')"
            ))
        })?;
        if nodes.iter().any(|m| m == n) {
            return Err(bad(format!(
                "{n} is named twice; replicas live on distinct nodes"
            )));
        }
        nodes.push(n.to_string());
    }
    Ok(nodes)
}

fn is_unlimited(value: &str) -> bool {
    matches!(
        value.trim().to_ascii_lowercase().as_str(),
        "0" | "none" | "off" | "unlimited"
    )
}

/// `max_iops`: IOs per second, or `0`/`none` for no cap.
pub fn parse_max_iops(value: &str) -> Result<Option<u32>, SpecError> {
    if is_unlimited(value) {
        return Ok(None);
    }
    match value.trim().parse::<u32>() {
        Ok(n) if (1..=10_000_000).contains(&n) => Ok(Some(n)),
        _ => Err(SpecError::Value {
            option: "max_iops".into(),
            value: value.chars().take(40).collect(),
            reason: "expected IOs per second, 1 to 10000000, or 0 (or none) for no cap".into(),
        }),
    }
}

/// `max_bandwidth`: bytes per second as a size (`100M`, `1G`; a bare
/// number is MiB), or `0`/`none` for no cap.
pub fn parse_max_bandwidth(value: &str) -> Result<Option<u64>, SpecError> {
    if is_unlimited(value) {
        return Ok(None);
    }
    let v = value.trim();
    let bare = !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit());
    let bytes = if bare {
        v.parse::<u64>().ok().and_then(|n| n.checked_mul(MIB))
    } else {
        let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
        let (digits, unit) = v.split_at(split);
        let mult = match unit.trim_end_matches("/s").to_ascii_lowercase().as_str() {
            "k" | "ki" | "kib" | "kb" => Some(KIB),
            "m" | "mi" | "mib" | "mb" => Some(MIB),
            "g" | "gi" | "gib" | "gb" => Some(GIB),
            _ => None,
        };
        digits
            .parse::<u64>()
            .ok()
            .zip(mult)
            .and_then(|(n, m)| n.checked_mul(m))
    };
    match bytes {
        Some(b) if (64 * KIB..=TIB).contains(&b) => Ok(Some(b)),
        _ => Err(SpecError::Value {
            option: "max_bandwidth".into(),
            value: value.chars().take(40).collect(),
            reason: "expected bytes per second from 64K to 1T (`100M`, `1G`; a bare number is MiB), or 0 (or none) for no cap".into(),
        }),
    }
}

/// Passthrough hands the volume's IO to the kernel, which bypasses every
/// feature that needs to see the writes.
pub fn check_passthrough(spec: &VolumeSpec) -> Result<(), SpecError> {
    let clash = if spec.secure {
        Some("secure=true (the kernel would write plaintext)")
    } else if spec.snap.is_some() {
        Some("scheduled snapshots (they are taken while the volume is in use)")
    } else if spec.io_priority != crate::engine::priority::IoPriority::Medium {
        Some("an io_priority other than medium (the kernel's IO is not shared out)")
    } else if !spec.limits.is_none() {
        Some("max_iops or max_bandwidth (the kernel's IO is not capped)")
    } else if spec.repl > 1 {
        Some("repl above 1 (every write must reach the replicas)")
    } else if spec.parent.is_some() {
        Some("parent= (a clone shares blocks with its source)")
    } else {
        None
    };
    match clash {
        Some(what) => Err(SpecError::Value {
            option: "passthrough".into(),
            value: "true".into(),
            reason: format!("it cannot be combined with {what}; drop one of the two"),
        }),
        None => Ok(()),
    }
}

/// `1.0 GiB`-style rendering for tables and Docker's Status.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn a_parent_may_name_one_of_its_snapshots() {
        let spec = parse_options(&opts(&[("parent", "pg@nightly-1")]), None).unwrap();
        assert_eq!(spec.parent.as_deref(), Some("pg"));
        assert_eq!(spec.parent_snapshot.as_deref(), Some("nightly-1"));
        let spec = parse_options(&opts(&[("parent", "pg")]), None).unwrap();
        assert_eq!(spec.parent_snapshot, None);
    }

    #[test]
    fn io_caps_parse_and_refuse_what_makes_no_sense() {
        let spec = parse_options(
            &opts(&[("max_iops", "500"), ("max_bandwidth", "100M")]),
            None,
        )
        .unwrap();
        assert_eq!(spec.limits.iops, Some(500));
        assert_eq!(spec.limits.bandwidth, Some(100 * MIB));
        assert_eq!(
            parse_max_bandwidth("20").unwrap(),
            Some(20 * MIB),
            "a bare number is MiB"
        );
        assert_eq!(parse_max_bandwidth("1G/s").unwrap(), Some(GIB));
        assert_eq!(parse_max_bandwidth("512k").unwrap(), Some(512 * KIB));
        for off in ["0", "none", "Unlimited"] {
            assert_eq!(parse_max_iops(off).unwrap(), None);
            assert_eq!(parse_max_bandwidth(off).unwrap(), None);
        }
        for bad in ["-5", "1.5", "abc", "10000001", ""] {
            let e = parse_max_iops(bad).unwrap_err().to_string();
            assert!(
                e.contains("max_iops") && e.contains("IOs per second"),
                "{bad}: {e}"
            );
        }
        for bad in ["12Q", "1K", "2T", "-1M", "M"] {
            let e = parse_max_bandwidth(bad).unwrap_err().to_string();
            assert!(
                e.contains("max_bandwidth") && e.contains("64K to 1T"),
                "{bad}: {e}"
            );
        }
        let both = parse_options(&opts(&[("max_iops", "100"), ("passthrough", "true")]), None);
        assert!(both.is_err() || check_passthrough(&both.clone().unwrap()).is_err());
        let spec = parse_options(&opts(&[("max_iops", "100")]), None).unwrap();
        let err = check_passthrough(&VolumeSpec {
            passthrough: true,
            ..spec
        })
        .unwrap_err();
        assert!(err.to_string().contains("max_iops"), "{err}");
    }

    #[test]
    fn sizes_in_binary_units() {
        assert_eq!(parse_size("10G").unwrap(), 10 * GIB);
        assert_eq!(parse_size("10Gi").unwrap(), 10 * GIB);
        assert_eq!(parse_size("10GB").unwrap(), 10 * GIB);
        assert_eq!(parse_size("10gib").unwrap(), 10 * GIB);
        assert_eq!(parse_size("512M").unwrap(), 512 * MIB);
        assert_eq!(parse_size("1T").unwrap(), TIB);
        assert_eq!(parse_size("3").unwrap(), 3 * GIB);
        assert_eq!(parse_size("20000K").unwrap(), 20000 * KIB);
        // Rounded up to 4 KiB.
        assert_eq!(parse_size("16777217B").unwrap(), 16 * MIB + 4096);
    }

    #[test]
    fn bad_sizes_are_refused_with_a_reason() {
        for bad in ["-1", "1Q", "99999999T", "", "G", "1.5G", "0", "1K", "65T"] {
            let err = parse_size(bad).unwrap_err().to_string();
            assert!(err.contains("invalid size"), "{bad}: {err}");
            assert!(err.contains("examples"), "{bad}: {err}");
        }
        assert!(parse_size("99999999T")
            .unwrap_err()
            .to_string()
            .contains("64 TiB"));
    }

    #[test]
    fn names() {
        for good in ["a", "pgdata", "my-vol_1.2", &"x".repeat(128)] {
            validate_name(good).unwrap();
        }
        let long = "x".repeat(300);
        for bad in [
            "", "a/b", "..", "a..b", "a\0b", &long, "-x", ".x", "a b", "a@b",
        ] {
            assert!(validate_name(bad).is_err(), "{bad:?} accepted");
        }
        assert!(validate_name(&long)
            .unwrap_err()
            .to_string()
            .contains("300 characters"));
    }

    #[test]
    fn shorthand() {
        assert_eq!(split_shorthand("data@2G"), ("data", Some("2G")));
        assert_eq!(split_shorthand("data"), ("data", None));
        let spec = parse_options(&BTreeMap::new(), Some("2G")).unwrap();
        assert_eq!(spec.size, 2 * GIB);
        let err = parse_options(&opts(&[("size", "1G")]), Some("2G")).unwrap_err();
        assert!(matches!(err, SpecError::SizeTwice { .. }));
    }

    #[test]
    fn defaults() {
        let spec = parse_options(&BTreeMap::new(), None).unwrap();
        assert_eq!(spec, VolumeSpec::default());
        assert_eq!(spec.size, GIB);
        assert_eq!(spec.fs, FsType::Ext4);
        assert_eq!(spec.block_size_bytes(), 32 * 1024);
    }

    #[test]
    fn all_supported_options() {
        let spec = parse_options(
            &opts(&[
                ("size", "2G"),
                ("fs", "xfs"),
                ("fsopts", "-m  crc=1"),
                ("block_size", "64"),
                ("sticky", "true"),
                ("label", "app=pg, tier=db"),
            ]),
            None,
        )
        .unwrap();
        assert_eq!(spec.size, 2 * GIB);
        assert_eq!(spec.fs, FsType::Xfs);
        assert_eq!(spec.fsopts, vec!["-m", "crc=1"]);
        assert_eq!(spec.block_size_kib, 64);
        assert!(spec.sticky);
        assert_eq!(spec.labels.get("tier").map(String::as_str), Some("db"));
    }

    #[test]
    fn refusals() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[("fs", "ntfs")], "ext4, xfs and none"),
            (&[("repl", "7")], "1, 2 or 3"),
            (&[("repl", "2"), ("nodes", "a;b;c")], "at most repl"),
            (&[("repl", "2"), ("nodes", "a,a")], "named twice"),
            (&[("nodes", "a/b")], "not a node name"),
            (
                &[("passthrough", "true"), ("secure", "true")],
                "secure=true",
            ),
            (&[("passthrough", "true"), ("repl", "2")], "repl above 1"),
            (
                &[("passthrough", "true"), ("io_priority", "high")],
                "io_priority",
            ),
            (
                &[("passthrough", "true"), ("snap_interval", "5")],
                "scheduled",
            ),
            (&[("secure", "perhaps")], "true or false"),
            (&[("parent", "a/b")], "invalid volume name"),
            (&[("parent", "a@")], "names a snapshot of SRC"),
            (&[("parent", "a@b@c")], "names a snapshot of SRC"),
            (&[("io_priority", "urgent")], "high, medium or low"),
            (&[("group", "a b")], "group name"),
            (&[("shared", "perhaps")], "true or false"),
            (&[("shared", "true"), ("fs", "none")], "fs=none makes none"),
            (
                &[("shared", "true"), ("secure", "true")],
                "in clear over the replica port",
            ),
            (&[("colour", "blue")], "valid options are: size, fs"),
            (&[("block_size", "48")], "power of two"),
            (&[("block_size", "2048")], "power of two"),
            (&[("block_size", "x")], "KiB"),
            (&[("sticky", "maybe")], "true or false"),
            (&[("label", "novalue")], "key=value"),
            (&[("fs", "xfs"), ("size", "100M")], "300 MiB"),
            (&[("fs", "none"), ("fsopts", "-F")], "nothing to apply"),
        ];
        for (o, want) in cases {
            let err = parse_options(&opts(o), None).unwrap_err().to_string();
            assert!(err.contains(want), "{o:?}: {err}");
        }
    }

    #[test]
    fn replication_and_passthrough_options() {
        let spec = parse_options(&opts(&[("repl", "3"), ("hosts", " n1; n2 ")]), None).unwrap();
        assert_eq!(
            (spec.repl, spec.nodes.clone()),
            (3, vec!["n1".into(), "n2".into()])
        );
        assert!(!spec.passthrough);
        let spec = parse_options(&opts(&[("passthrough", "yes")]), None).unwrap();
        assert!(spec.passthrough && spec.repl == 1);
        // Catalogs written before these options existed still load.
        let old: VolumeSpec = serde_json::from_value(serde_json::json!({
            "size": 1u64 << 30, "fs": "ext4", "fsopts": [], "block_size_kib": 32,
            "sticky": false, "labels": {}
        }))
        .unwrap();
        assert_eq!((old.repl, old.passthrough), (1, false));
    }

    #[test]
    fn default_values_are_accepted_and_shared_is_recorded() {
        let spec = parse_options(
            &opts(&[
                ("repl", "1"),
                ("secure", "false"),
                ("snap_interval", "0"),
                ("shared", "false"),
            ]),
            None,
        )
        .unwrap();
        assert!(!spec.shared);
        let spec = parse_options(&opts(&[("shared", "yes"), ("repl", "2")]), None).unwrap();
        assert!(spec.shared);
        let json = serde_json::to_value(&spec).unwrap();
        assert_eq!(json["shared"], true);
        let back: VolumeSpec = serde_json::from_value(json).unwrap();
        assert_eq!(back, spec);
    }

    #[test]
    fn the_secret_is_taken_out_before_anything_stores_the_options() {
        let mut o = opts(&[("secure", "true"), ("Secret_Key", "hunter2")]);
        let secret = take_secret(&mut o).unwrap().expect("a secret");
        assert!(!format!("{secret:?}").contains("hunter2"));
        assert_eq!(o.keys().collect::<Vec<_>>(), ["secure"]);
        assert!(parse_options(&o, None).unwrap().secure);
        let mut empty = opts(&[("secret_key", "")]);
        assert!(take_secret(&mut empty)
            .unwrap_err()
            .to_string()
            .contains("empty"));
        assert!(take_secret(&mut opts(&[("size", "1G")])).unwrap().is_none());
    }

    #[test]
    fn snapshot_schedules() {
        let spec = parse_options(
            &opts(&[
                ("snap_interval", "30"),
                ("Snap_Schedule", "weekly=sun@2:00;daily=12:00,4"),
            ]),
            None,
        )
        .unwrap();
        let snap = spec.snap.as_ref().expect("a policy");
        assert_eq!(
            snap.to_string(),
            "periodic=30,5;daily=12:00,4;weekly=sunday@02:00,5"
        );
        // Persisted in the catalog as the canonical string, read back equal.
        let json = serde_json::to_value(&spec).unwrap();
        assert_eq!(json["snap"], snap.to_string());
        assert_eq!(serde_json::from_value::<VolumeSpec>(json).unwrap(), spec);
        // "Off" values mean no policy, and a catalog from before has none.
        for off in [&[("snap_interval", "0")][..], &[("snap_schedule", "")][..]] {
            assert_eq!(parse_options(&opts(off), None).unwrap().snap, None);
        }
        let old = r#"{"size":1073741824,"fs":"ext4","fsopts":[],"block_size_kib":32,"sticky":false,"labels":{}}"#;
        let old: VolumeSpec = serde_json::from_str(old).unwrap();
        assert_eq!(old, VolumeSpec::default());
        // And a spec without a policy is written as before.
        let json = serde_json::to_value(VolumeSpec::default()).unwrap();
        assert!(json.get("snap").is_none(), "{json}");
        // Refusals name the option and teach the syntax.
        for (o, want) in [
            (("snap_interval", "5m"), "option snap_interval"),
            (("snap_schedule", "daily=25:00"), "option snap_schedule"),
            (("snap_schedule", "daily=25:00"), "HH:MM"),
            (("snap_schedule", "hourly=5"), "example: periodic=60,10"),
        ] {
            let err = parse_options(&opts(&[o]), None).unwrap_err().to_string();
            assert!(err.contains(want), "{o:?}: {err}");
        }
        let err = parse_options(
            &opts(&[("snap_interval", "5"), ("snap_schedule", "periodic=10")]),
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("only one"), "{err}");
    }

    fn fsopts_err(fs: Option<&str>, fsopts: &str) -> String {
        let mut o = opts(&[("fsopts", fsopts), ("size", "1G")]);
        if let Some(fs) = fs {
            o.insert("fs".into(), fs.into());
        }
        parse_options(&o, None)
            .map(|s| panic!("{fs:?} {fsopts:?} accepted: {:?}", s.fsopts))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn fsopts_that_reach_outside_the_volume_are_refused() {
        let cases: &[(&str, &str, &[&str])] = &[
            ("ext4", "-d /etc", &["\"-d /etc\"", "host path"]),
            ("ext4", "-d/etc", &["\"-d /etc\"", "host path"]),
            ("ext4", "-qd /etc", &["\"-d /etc\"", "host path"]),
            ("ext4", "-z /some/path", &["\"-z /some/path\"", "host path"]),
            (
                "ext4",
                "-l /etc/shadow",
                &["\"-l /etc/shadow\"", "host path"],
            ),
            (
                "ext4",
                "-J device=/dev/sdb",
                &["device=/dev/sdb", "host device"],
            ),
            ("ext4", "-J size=64,device=/dev/sdb", &["host device"]),
            ("ext4", "-E offset=4096", &["offset", "start of the device"]),
            ("ext4", "-E stride=4 -E stripe_width=8", &["given twice"]),
            (
                "ext4",
                "-O journal_dev",
                &["journal_dev", "never be mounted"],
            ),
            (
                "ext4",
                "-O ^has_journal,bogus",
                &["\"bogus\"", "not an ext4 feature"],
            ),
            ("ext4", "-c", &["\"-c\"", "badblocks"]),
            ("ext4", "-F", &["\"-F\"", "already passes -F"]),
            ("ext4", "-n", &["dry run"]),
            ("ext4", "-S", &["\"-S\""]),
            ("ext4", "-V", &["version"]),
            ("ext4", "-t ext2", &["\"-t ext2\"", "fs=ext4"]),
            ("ext4", "-e panic", &["panic the host"]),
            ("ext4", "-b 65536", &["\"-b 65536\"", "4 KiB page"]),
            ("ext4", "-b 8192", &["4 KiB page"]),
            ("ext4", "--bogus", &["\"--bogus\"", "long options"]),
            (
                "ext4",
                "-x",
                &["\"-x\"", "not an option dunnage passes to mkfs.ext4"],
            ),
            ("ext4", "/dev/sda", &["\"/dev/sda\"", "device to format"]),
            ("ext4", "-", &["device to format"]),
            ("ext4", "-b", &["\"-b\"", "needs a value"]),
            ("ext4", "-m crc=1", &["\"-m crc=1\"", "percentage"]),
            ("ext4", "-m 60", &["percentage"]),
            ("ext4", "-I 0100", &["power of two"]),
            ("ext4", "-T bogus", &["usage types"]),
            ("ext4", "-L 12345678901234567", &["16 bytes"]),
            ("ext4", "-E android_sparse", &["sparse image"]),
            (
                "xfs",
                "-p /etc/protofile",
                &["\"-p /etc/protofile\"", "host path"],
            ),
            ("xfs", "-c options=/etc/x.conf", &["host path"]),
            ("xfs", "-l logdev=/dev/sda", &["logdev", "host device"]),
            (
                "xfs",
                "-l internal,logdev=/dev/sda,size=64m",
                &["host device"],
            ),
            ("xfs", "-l internal=0", &["host device"]),
            ("xfs", "-d name=/tmp/img", &["name", "host path"]),
            (
                "xfs",
                "-dname=/tmp/img",
                &["\"-d name=/tmp/img\"", "host path"],
            ),
            ("xfs", "-d file,name=/tmp/img,size=1g", &["host file"]),
            ("xfs", "-d size=1g", &["volume's size"]),
            ("xfs", "-r rtdev=/dev/sdc", &["realtime", "host device"]),
            ("xfs", "-N", &["dry run"]),
            ("xfs", "-b size=65536", &["4 KiB page"]),
            ("xfs", "-m crc=1,crc=1", &["given twice"]),
            ("xfs", "-m crc=1 -m crc=0", &["given twice"]),
            ("xfs", "-m crc=2", &["=0 or =1"]),
            ("xfs", "-m bogus=1", &["not a -m suboption", "crc"]),
            ("xfs", "-m crc=1,,reflink=1", &["empty suboption"]),
            ("xfs", "-L abcdefghijklm", &["12 bytes"]),
            ("xfs", "--bogus", &["long options"]),
            ("xfs", "-F", &["\"-F\"", "mkfs.xfs"]),
            // ext4's options are not xfs's, and the other way round.
            ("xfs", "-E stride=4", &["\"-E\"", "mkfs.xfs"]),
            ("ext4", "-m reflink=1", &["percentage"]),
        ];
        for (fs, fsopts, wants) in cases {
            let err = fsopts_err(Some(fs), fsopts);
            for want in *wants {
                assert!(err.contains(want), "{fs} {fsopts:?}: {err}");
            }
            assert!(err.contains("option fsopts"), "{err}");
            assert!(err.contains("others are refused"), "{err}");
            let tool_list = if *fs == "xfs" {
                "-m crc,"
            } else {
                "-E stride="
            };
            assert!(err.contains(tool_list), "lists what is accepted: {err}");
        }
    }

    #[test]
    fn realistic_fsopts_are_accepted_and_kept_as_given() {
        let ok: &[(&str, &str)] = &[
            ("ext4", "-b 4096 -i 16384 -I 256 -m 1 -L pgdata -O ^has_journal"),
            ("ext4", "-b4096 -m0.5 -jqv -D -e remount-ro -T largefile4"),
            ("ext4", "-E stride=16,stripe_width=64,lazy_itable_init=1,nodiscard,root_owner=999:999"),
            ("ext4", "-E stripe-width=8,root_owner,encoding=utf8,quotatype=usrquota:grpquota -O quota,casefold"),
            ("ext4", "-O bigalloc -C 64k -G 32 -M /srv/data"),
            ("ext4", "-g 8192 -N 100000 -O ^resize_inode,meta_bg"),
            ("ext4", "-O fast_commit -J size=64,fast_commit_size=256 -U random"),
            ("ext4", "-U c1b9d5a2-f162-11cf-9ece-0020afc76f16 -b 1k -L -d"),
            ("xfs", "-m  crc=1"),
            ("xfs", "-m crc=1,reflink=1,bigtime=1 -i sparse -l internal,size=64m -n ftype=1"),
            ("xfs", "-mcrc=1 -mreflink=0 -b size=4k -s size=4096 -K -f -q -L data"),
            ("xfs", "-d agcount=4,su=64k,sw=2 -i size=512,maxpct=5 -l su=64k,lazy-count=1 -n size=8192,version=ci"),
            ("xfs", "-d sunit=128,swidth=256 -m uuid=c1b9d5a2-f162-11cf-9ece-0020afc76f16"),
        ];
        // Each set also makes a filesystem with mke2fs 1.47.0 / mkfs.xfs 6.1.0
        // on a 1 GiB file.
        for (fs, fsopts) in ok {
            let spec = parse_options(
                &opts(&[("fs", fs), ("fsopts", fsopts), ("size", "1G")]),
                None,
            )
            .unwrap_or_else(|e| panic!("{fs} {fsopts:?}: {e}"));
            assert_eq!(
                spec.fsopts.join(" "),
                fsopts.split_whitespace().collect::<Vec<_>>().join(" ")
            );
        }
    }

    #[test]
    fn fsopts_are_checked_for_the_fs_whatever_the_order_and_ext4_by_default() {
        // BTreeMap orders "fs" before "fsopts"; the check must not depend on it.
        assert!(fsopts_err(None, "-m crc=1").contains("mkfs.ext4"));
        assert!(parse_options(&opts(&[("fsopts", "-m 1 -L db")]), None).is_ok());
        for o in [
            opts(&[("fsopts", "-m crc=1"), ("fs", "xfs")]),
            opts(&[("Fs", "xfs"), ("fsopts", "-m crc=1")]),
            opts(&[("fsopts", "-m crc=1"), ("FS", "xfs")]),
        ] {
            assert_eq!(parse_options(&o, None).unwrap().fs, FsType::Xfs);
        }
        assert!(check_fsopts(FsType::Ext4, &[]).is_ok());
        assert!(check_fsopts(FsType::None, &[]).is_ok());
        assert!(check_fsopts(FsType::None, &["-q".to_string()]).is_err());
    }

    #[test]
    fn an_option_given_under_two_spellings_is_refused() {
        for pair in [
            ("repl", "replicas"),
            ("size", "Size"),
            ("label", "labels"),
            ("nodes", "hosts"),
        ] {
            let mut o = BTreeMap::new();
            o.insert(pair.0.to_string(), "1".to_string());
            o.insert(pair.1.to_string(), "2".to_string());
            let err = parse_options(&o, None).unwrap_err().to_string();
            assert!(err.contains("given twice"), "{pair:?}: {err}");
        }
    }

    #[test]
    fn stored_fsopts_load_without_being_checked_again() {
        // A catalog record from an older build, with options now refused.
        let old: VolumeSpec = serde_json::from_value(serde_json::json!({
            "size": 1u64 << 30, "fs": "ext4", "fsopts": ["-b", "65536"],
            "block_size_kib": 32, "sticky": false, "labels": {}
        }))
        .unwrap();
        assert_eq!(old.fsopts, ["-b", "65536"]);
    }

    #[test]
    fn human() {
        assert_eq!(human_bytes(GIB), "1.0 GiB");
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(3 * MIB / 2), "1.5 MiB");
    }
}

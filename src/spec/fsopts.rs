//! `fsopts`: the mkfs options a volume may carry.
//!
//! mkfs runs as root on the daemon's host, so `fsopts` is an allow-list:
//! only options that shape the filesystem on the volume's own device pass.
//! Anything that names a host path or device (`-d`, `-z`, `-l`, `-J device=`,
//! `-p`, `-c`, `-l logdev=`, `-d name=` ...), that makes no mountable
//! filesystem (dry runs, `journal_dev`, blocks above the 4 KiB page), or
//! that mkfs does not know, is refused at create. The arguments are read the
//! way mkfs's getopt reads them: bundled flags (`-qv`), values in the same
//! argument (`-b4096`, `-mcrc=1`) or the next (`-b 4096`).

use super::{FsType, SpecError};

/// What dunnage does with one mkfs option letter.
#[derive(Clone, Copy)]
enum MkfsOpt {
    /// A flag, passed on.
    Flag,
    /// Takes a value, passed on if `rule` accepts it. `once`: mkfs keeps
    /// only the last, so a second would silently drop the first.
    Value { rule: Rule, once: bool },
    /// Refused, with why; `value`: mkfs would take a value with it.
    Refused { value: bool, why: &'static str },
}

#[derive(Clone, Copy)]
enum Rule {
    One(Check),
    /// Comma-separated `name[=value]` suboptions from `table`. `unique`: each
    /// at most once in all of fsopts (mkfs.xfs refuses a respecified one).
    Subs {
        table: &'static [SubOpt],
        unique: bool,
    },
}

#[derive(Clone, Copy)]
struct SubOpt {
    name: &'static str,
    rule: SubRule,
}

/// A refused option letter.
const fn no(value: bool, why: &'static str) -> MkfsOpt {
    MkfsOpt::Refused { value, why }
}

/// An option letter taking suboptions.
const fn subs(table: &'static [SubOpt], unique: bool, once: bool) -> MkfsOpt {
    MkfsOpt::Value {
        rule: Rule::Subs { table, unique },
        once,
    }
}

const fn sub(name: &'static str, rule: SubRule) -> SubOpt {
    SubOpt { name, rule }
}

#[derive(Clone, Copy)]
enum SubRule {
    /// No value.
    Flag,
    /// No value, `=0` or `=1`.
    Bool,
    /// No value or `=1`; `=0` is refused with the reason.
    On(&'static str),
    /// `=value`, checked.
    Value(Check),
    /// No value, or `=value` checked.
    Maybe(Check),
    Refused(&'static str),
}

#[derive(Clone, Copy)]
enum Check {
    /// A decimal number in the range (no leading zeros: mkfs reads those
    /// as octal).
    Num(u64, u64),
    /// A power of two in the range (bytes); `units`: a k or m suffix may
    /// scale it.
    Pow2 {
        min: u64,
        max: u64,
        units: bool,
    },
    /// A number with an optional unit suffix (one of these letters, either case).
    Sized(&'static str),
    OneOf(&'static [&'static str]),
    /// At most this many bytes of text (no whitespace: fsopts is split on it).
    Text(usize),
    Custom(fn(&str) -> Result<(), String>),
}

impl Check {
    fn check(self, v: &str) -> Result<(), String> {
        match self {
            Check::Num(min, max) => match decimal(v) {
                Some(n) if (min..=max).contains(&n) => Ok(()),
                _ => Err(format!("expected a whole number from {min} to {max}")),
            },
            Check::Pow2 { min, max, units } => {
                let n = if units { scaled(v, "km") } else { decimal(v) };
                match n {
                    Some(n) if n.is_power_of_two() && (min..=max).contains(&n) => Ok(()),
                    _ => Err(format!(
                        "expected a power of two from {min} to {max}{}",
                        if units {
                            " (bytes; k and m suffixes allowed)"
                        } else {
                            ""
                        }
                    )),
                }
            }
            Check::Sized(units) => match scaled_syntax(v, units) {
                true => Ok(()),
                false => Err(format!(
                    "expected a number, optionally with one of the suffixes {units}"
                )),
            },
            Check::OneOf(choices) => match choices.contains(&v) {
                true => Ok(()),
                false => Err(format!("expected one of {}", choices.join(", "))),
            },
            Check::Text(max) => match v.len() <= max {
                true => Ok(()),
                false => Err(format!("at most {max} bytes")),
            },
            Check::Custom(f) => f(v),
        }
    }
}

/// `0` or a decimal number without leading zeros.
fn decimal(v: &str) -> Option<u64> {
    let ok =
        !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) && (v == "0" || !v.starts_with('0'));
    ok.then(|| v.parse().ok()).flatten()
}

/// A decimal number with an optional k/m/g/t suffix, in bytes.
fn scaled(v: &str, units: &str) -> Option<u64> {
    let (digits, shift) = match v.chars().last() {
        Some(c) if units.contains(c.to_ascii_lowercase()) => {
            let shift = match c.to_ascii_lowercase() {
                'k' => 10,
                'm' => 20,
                'g' => 30,
                't' => 40,
                _ => return None,
            };
            (&v[..v.len() - 1], shift)
        }
        _ => (v, 0),
    };
    decimal(digits)?.checked_mul(1 << shift)
}

fn scaled_syntax(v: &str, units: &str) -> bool {
    let digits = match v.chars().last() {
        Some(c) if units.contains(c.to_ascii_lowercase()) => &v[..v.len() - 1],
        _ => v,
    };
    decimal(digits).is_some()
}

fn uuid(v: &str) -> bool {
    let groups: Vec<&str> = v.split('-').collect();
    groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12])
        && groups
            .iter()
            .all(|g| g.bytes().all(|b| b.is_ascii_hexdigit()))
}

const U32: u64 = u32::MAX as u64;

const EXT4_EXTENDED: &[SubOpt] = &[
    sub("stride", SubRule::Value(Check::Num(1, U32))),
    sub("stripe_width", SubRule::Value(Check::Num(1, U32))),
    sub("stripe-width", SubRule::Value(Check::Num(1, U32))),
    sub("resize", SubRule::Value(Check::Num(1, u64::MAX))),
    sub("lazy_itable_init", SubRule::Bool),
    sub("lazy_journal_init", SubRule::Bool),
    sub("assume_storage_prezeroed", SubRule::Bool),
    sub("packed_meta_blocks", SubRule::Bool),
    sub("discard", SubRule::Flag),
    sub("nodiscard", SubRule::Flag),
    sub("test_fs", SubRule::Flag),
    sub(
        "num_backup_sb",
        SubRule::Value(Check::OneOf(&["0", "1", "2"])),
    ),
    sub("root_owner", SubRule::Maybe(Check::Custom(uid_gid))),
    sub(
        "encoding",
        SubRule::Value(Check::OneOf(&["utf8", "utf8-12.1"])),
    ),
    sub(
        "encoding_flags",
        SubRule::Value(Check::OneOf(&["strict", "nostrict"])),
    ),
    sub("quotatype", SubRule::Value(Check::Custom(quota_types))),
    sub("mmp_update_interval", SubRule::Value(Check::Num(0, 299))),
    sub("orphan_file_size", SubRule::Value(Check::Sized("kmgt"))),
    sub(
        "offset",
        SubRule::Refused(
            "it moves the filesystem away from the start of the device, where mount looks for it",
        ),
    ),
    sub(
        "android_sparse",
        SubRule::Refused("it writes an Android sparse image, not a filesystem that can be mounted"),
    ),
];

const EXT4_JOURNAL: &[SubOpt] = &[
    sub("size", SubRule::Value(Check::Num(1, 10_240_000))),
    sub(
        "fast_commit_size",
        SubRule::Value(Check::Num(1, 10_240_000)),
    ),
    sub("location", SubRule::Value(Check::Sized("kmgt"))),
    sub(
        "device",
        SubRule::Refused("it names a host device: the journal would live outside the volume"),
    ),
];

const EXT4_FEATURES: &[&str] = &[
    "64bit",
    "bigalloc",
    "casefold",
    "dir_index",
    "dir_nlink",
    "ea_inode",
    "encrypt",
    "ext_attr",
    "extent",
    "extents",
    "extra_isize",
    "fast_commit",
    "filetype",
    "flex_bg",
    "has_journal",
    "huge_file",
    "inline_data",
    "large_dir",
    "large_file",
    "meta_bg",
    "metadata_csum",
    "metadata_csum_seed",
    "mmp",
    "orphan_file",
    "project",
    "quota",
    "resize_inode",
    "sparse_super",
    "sparse_super2",
    "stable_inodes",
    "uninit_bg",
    "verity",
];

/// Usage types of the stock /etc/mke2fs.conf.
const EXT4_USAGE_TYPES: &[&str] = &[
    "floppy",
    "small",
    "default",
    "big",
    "huge",
    "news",
    "largefile",
    "largefile4",
];

fn uid_gid(v: &str) -> Result<(), String> {
    match v.split_once(':') {
        Some((u, g)) if decimal(u).is_some() && decimal(g).is_some() => Ok(()),
        _ => Err("expected numeric UID:GID".into()),
    }
}

fn quota_types(v: &str) -> Result<(), String> {
    match v
        .split(':')
        .all(|t| ["usrquota", "grpquota", "prjquota"].contains(&t))
    {
        true => Ok(()),
        false => Err("expected usrquota, grpquota, prjquota joined by ':'".into()),
    }
}

fn ext4_block_size(v: &str) -> Result<(), String> {
    match scaled(v, "k") {
        Some(1024 | 2048 | 4096) => Ok(()),
        _ => Err("expected 1024, 2048 or 4096: the kernel mounts no ext4 block larger than its 4 KiB page".into()),
    }
}

fn ext4_blocks_per_group(v: &str) -> Result<(), String> {
    match decimal(v) {
        Some(n) if n % 8 == 0 && (256..=32768).contains(&n) => Ok(()),
        _ => Err("expected a multiple of 8 from 256 to 32768".into()),
    }
}

fn ext4_errors(v: &str) -> Result<(), String> {
    match v {
        "continue" | "remount-ro" => Ok(()),
        "panic" => Err("it would panic the host's kernel on any error in this volume's filesystem; use continue or remount-ro".into()),
        _ => Err("expected continue or remount-ro".into()),
    }
}

fn ext4_features(v: &str) -> Result<(), String> {
    for f in v.split(',') {
        let name = f.strip_prefix('^').unwrap_or(f);
        if name == "journal_dev" {
            return Err("journal_dev makes an external journal device, not a filesystem: the volume could never be mounted".into());
        }
        if !EXT4_FEATURES.contains(&name) {
            return Err(format!(
                "{f:?} is not an ext4 feature dunnage passes on (features, each may be prefixed with ^ to turn it off: {})",
                EXT4_FEATURES.join(", ")
            ));
        }
    }
    Ok(())
}

fn ext4_usage_types(v: &str) -> Result<(), String> {
    match v.split(',').all(|t| EXT4_USAGE_TYPES.contains(&t)) {
        true => Ok(()),
        false => Err(format!(
            "expected usage types from {}, joined by ','",
            EXT4_USAGE_TYPES.join(", ")
        )),
    }
}

fn ext4_uuid(v: &str) -> Result<(), String> {
    match matches!(v, "clear" | "random" | "time") || uuid(v) {
        true => Ok(()),
        false => Err("expected a UUID (8-4-4-4-12 hex digits), clear, random or time".into()),
    }
}

fn reserved_percent(v: &str) -> Result<(), String> {
    let ok = !v.is_empty()
        && v.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        && matches!(v.parse::<f64>(), Ok(p) if (0.0..=50.0).contains(&p));
    match ok {
        true => Ok(()),
        false => Err("expected a percentage from 0 to 50".into()),
    }
}

/// mke2fs's options (its getopt string is
/// `b:cd:e:g:i:jl:m:no:qr:s:t:vC:DE:FG:I:J:KL:M:N:O:R:ST:U:Vz:`).
fn ext4_opt(c: char) -> Option<MkfsOpt> {
    use MkfsOpt::*;
    let one = |check| Value {
        rule: Rule::One(check),
        once: false,
    };
    let other = no(true, "not an option dunnage passes to mkfs.ext4");
    Some(match c {
        'j' | 'q' | 'v' | 'D' => Flag,
        'b' => one(Check::Custom(ext4_block_size)),
        'C' => one(Check::Pow2 { min: 2048, max: 256 << 20, units: true }),
        'e' => one(Check::Custom(ext4_errors)),
        'E' => subs(EXT4_EXTENDED, false, true),
        'g' => one(Check::Custom(ext4_blocks_per_group)),
        'G' => one(Check::Pow2 { min: 1, max: 1 << 31, units: false }),
        'i' => one(Check::Sized("km")),
        'I' => one(Check::Pow2 { min: 128, max: 4096, units: false }),
        'J' => subs(EXT4_JOURNAL, false, false),
        'L' => one(Check::Text(16)),
        'm' => one(Check::Custom(reserved_percent)),
        'M' => one(Check::Text(64)),
        'N' => one(Check::Num(1, U32)),
        'O' => one(Check::Custom(ext4_features)),
        'T' => one(Check::Custom(ext4_usage_types)),
        'U' => one(Check::Custom(ext4_uuid)),
        'd' => no(true, "it names a host path: mke2fs would copy that host directory into the volume"),
        'l' => no(true, "it names a host path: mke2fs would read a bad-blocks list from that host file"),
        'z' => no(true, "it names a host path: mke2fs would write an undo file there"),
        't' => no(true, "dunnage sets the filesystem type (fs=ext4)"),
        'R' => no(true, "the old spelling of -E; use -E"),
        'o' | 'r' | 's' => other,
        'c' => no(false, "it runs badblocks over the whole device (twice: writing every block), which fills a thin volume"),
        'F' => no(false, "dunnage already passes -F; a second makes mke2fs format even a device it finds mounted or in use"),
        'n' => no(false, "a dry run: no filesystem would be made and every mount would fail"),
        'S' => no(false, "it rewrites superblocks only, a recovery measure; a new volume has nothing to recover"),
        'V' => no(false, "it prints mke2fs's version and makes no filesystem"),
        'K' => no(false, "the old spelling of -E nodiscard; use -E nodiscard"),
        _ => return None,
    })
}

const XFS_BLOCK: &[SubOpt] = &[sub("size", SubRule::Value(Check::Custom(xfs_block_size)))];

const XFS_META: &[SubOpt] = &[
    sub("crc", SubRule::Bool),
    sub("finobt", SubRule::Bool),
    sub("rmapbt", SubRule::Bool),
    sub("reflink", SubRule::Bool),
    sub("bigtime", SubRule::Bool),
    sub("inobtcount", SubRule::Bool),
    sub("uuid", SubRule::Value(Check::Custom(xfs_uuid))),
];

const XFS_SIZES: &str = "sbkmgtp";

const XFS_DATA: &[SubOpt] = &[
    sub("agcount", SubRule::Value(Check::Num(1, U32))),
    sub("agsize", SubRule::Value(Check::Sized(XFS_SIZES))),
    sub("su", SubRule::Value(Check::Sized(XFS_SIZES))),
    sub("sw", SubRule::Value(Check::Num(1, U32))),
    sub("sunit", SubRule::Value(Check::Num(0, U32))),
    sub("swidth", SubRule::Value(Check::Num(0, U32))),
    sub(
        "name",
        SubRule::Refused("it names a host path: the data section would be that host file"),
    ),
    sub(
        "file",
        SubRule::Refused("it makes the data section a host file"),
    ),
    sub(
        "size",
        SubRule::Refused("the data section is the whole volume: its size is the volume's size"),
    ),
];

const XFS_INODE: &[SubOpt] = &[
    sub(
        "size",
        SubRule::Value(Check::Pow2 {
            min: 256,
            max: 2048,
            units: true,
        }),
    ),
    sub("perblock", SubRule::Value(Check::Num(1, 16))),
    sub("maxpct", SubRule::Value(Check::Num(0, 100))),
    sub("align", SubRule::Bool),
    sub("sparse", SubRule::Bool),
    sub("nrext64", SubRule::Bool),
];

const XFS_LOG: &[SubOpt] = &[
    sub(
        "internal",
        SubRule::On("internal=0 means a log on another device, a host device"),
    ),
    sub("size", SubRule::Value(Check::Sized(XFS_SIZES))),
    sub("version", SubRule::Value(Check::OneOf(&["1", "2"]))),
    sub("su", SubRule::Value(Check::Sized(XFS_SIZES))),
    sub("sunit", SubRule::Value(Check::Num(0, U32))),
    sub("lazy-count", SubRule::Value(Check::OneOf(&["0", "1"]))),
    sub(
        "logdev",
        SubRule::Refused("it names a host device: the log would live outside the volume"),
    ),
    sub(
        "name",
        SubRule::Refused("it names a host path: the log would live outside the volume"),
    ),
    sub("file", SubRule::Refused("it makes the log a host file")),
];

const XFS_NAMING: &[SubOpt] = &[
    sub(
        "size",
        SubRule::Value(Check::Pow2 {
            min: 512,
            max: 65536,
            units: true,
        }),
    ),
    sub("version", SubRule::Value(Check::OneOf(&["2", "ci"]))),
    sub("ftype", SubRule::Value(Check::OneOf(&["0", "1"]))),
];

const XFS_SECTOR: &[SubOpt] = &[sub(
    "size",
    SubRule::Value(Check::Pow2 {
        min: 512,
        max: 4096,
        units: true,
    }),
)];

fn xfs_block_size(v: &str) -> Result<(), String> {
    match scaled(v, "k") {
        Some(1024 | 2048 | 4096) => Ok(()),
        _ => Err("expected 1024, 2048 or 4096: the kernel mounts no xfs block larger than its 4 KiB page".into()),
    }
}

fn xfs_uuid(v: &str) -> Result<(), String> {
    match uuid(v) {
        true => Ok(()),
        false => Err("expected a UUID (8-4-4-4-12 hex digits)".into()),
    }
}

/// mkfs.xfs's options (its getopt string is `b:c:d:i:l:L:m:n:KNp:qr:s:CfV`).
fn xfs_opt(c: char) -> Option<MkfsOpt> {
    use MkfsOpt::*;
    Some(match c {
        'f' | 'q' | 'K' => Flag,
        'b' => subs(XFS_BLOCK, true, false),
        'd' => subs(XFS_DATA, true, false),
        'i' => subs(XFS_INODE, true, false),
        'l' => subs(XFS_LOG, true, false),
        'm' => subs(XFS_META, true, false),
        'n' => subs(XFS_NAMING, true, false),
        's' => subs(XFS_SECTOR, true, false),
        'L' => Value { rule: Rule::One(Check::Text(12)), once: false },
        'c' => no(true, "it names a host path: mkfs.xfs would read its configuration from that host file"),
        'p' => no(true, "it names a host path: mkfs.xfs would copy the host files that protofile names into the volume"),
        'r' => no(true, "a realtime section lives on another device (rtdev=), a host device"),
        'N' => no(false, "a dry run: no filesystem would be made and every mount would fail"),
        'V' => no(false, "it prints mkfs.xfs's version and makes no filesystem"),
        'C' => no(false, "not an option dunnage passes to mkfs.xfs"),
        _ => return None,
    })
}

fn sub_names(table: &[SubOpt]) -> String {
    table
        .iter()
        .filter_map(|s| match s.rule {
            SubRule::Refused(_) => None,
            SubRule::Value(_) => Some(format!("{}=", s.name)),
            SubRule::Flag | SubRule::Bool | SubRule::On(_) | SubRule::Maybe(_) => {
                Some(s.name.to_string())
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The options `fsopts` may carry for `fs`, for refusals and docs.
pub fn accepted_fsopts(fs: FsType) -> String {
    match fs {
        FsType::Ext4 => format!(
            "-b 1024|2048|4096, -C SIZE, -D, -e continue|remount-ro, -E {}, -g N, -G N, -i N, -I N, -j, -J {}, -L LABEL, -m PERCENT, -M DIR, -N N, -O [^]FEATURE,..., -q, -T {}, -U UUID, -v",
            sub_names(EXT4_EXTENDED).replace(' ', ","),
            sub_names(EXT4_JOURNAL).replace(' ', ","),
            EXT4_USAGE_TYPES.join("|"),
        ),
        FsType::Xfs => format!(
            "-b size=1024|2048|4096, -d {}, -i {}, -l {}, -m {}, -n {}, -s size=, -L LABEL, -K, -f, -q",
            sub_names(XFS_DATA).replace(' ', ","),
            sub_names(XFS_INODE).replace(' ', ","),
            sub_names(XFS_LOG).replace(' ', ","),
            sub_names(XFS_META).replace(' ', ","),
            sub_names(XFS_NAMING).replace(' ', ","),
        ),
        FsType::None => "none (fs=none makes no filesystem)".into(),
    }
}

impl Rule {
    fn check(
        self,
        letter: char,
        value: &str,
        seen: &mut std::collections::BTreeSet<String>,
    ) -> Result<(), String> {
        let (table, unique) = match self {
            Rule::One(check) => return check.check(value),
            Rule::Subs { table, unique } => (table, unique),
        };
        for item in value.split(',') {
            if item.is_empty() {
                return Err("an empty suboption (two commas, or one at an end)".into());
            }
            let (name, v) = match item.split_once('=') {
                Some((n, v)) => (n, Some(v)),
                None => (item, None),
            };
            let Some(sub) = table.iter().find(|s| s.name == name) else {
                return Err(format!(
                    "{name} is not a -{letter} suboption dunnage passes on (those are: {})",
                    sub_names(table)
                ));
            };
            if unique && !seen.insert(format!("-{letter} {name}")) {
                return Err(format!(
                    "-{letter} {name} is given twice, which mkfs.xfs refuses"
                ));
            }
            match (sub.rule, v) {
                (SubRule::Refused(why), _) => return Err(format!("{name}: {why}")),
                (SubRule::Flag | SubRule::Bool | SubRule::On(_) | SubRule::Maybe(_), None) => {}
                (SubRule::Flag, Some(_)) => return Err(format!("{name} takes no value")),
                (SubRule::Bool | SubRule::On(_), Some("1")) | (SubRule::Bool, Some("0")) => {}
                (SubRule::On(why), Some("0")) => return Err(why.to_string()),
                (SubRule::Bool, Some(_)) => return Err(format!("{name} takes no value, =0 or =1")),
                (SubRule::On(_), Some(_)) => return Err(format!("{name} takes no value or =1")),
                (SubRule::Value(_), None) => {
                    return Err(format!("{name} needs a value ({name}=...)"))
                }
                (SubRule::Value(check) | SubRule::Maybe(check), Some(v)) => {
                    check.check(v).map_err(|e| format!("{name}={v}: {e}"))?
                }
            }
        }
        Ok(())
    }
}

/// Check the extra mkfs arguments of a new `fs` volume against the
/// allow-list (see [`accepted_fsopts`]). Refusals name the argument and say
/// why. Volumes already in the catalog are not checked again.
pub fn check_fsopts(fs: FsType, args: &[String]) -> Result<(), SpecError> {
    parse(fs, args).map(drop)
}

/// The arguments mkfs gets for `args` (checked again, for volumes created
/// before the check existed), one option per argument with its value in
/// the next; `extended` (ext4's `-E` that dunnage always passes) goes
/// first in the one `-E`, so that the user's suboptions add to it (and win
/// where they name the same one): mke2fs keeps only the last `-E`.
pub fn mkfs_args(fs: FsType, args: &[String], extended: &str) -> Result<Vec<String>, SpecError> {
    let mut ext = extended.to_string();
    let mut out = Vec::new();
    for (c, value) in parse(fs, args)? {
        match value {
            Some(v) if c == 'E' => {
                ext.push(',');
                ext.push_str(v);
            }
            Some(v) => out.extend([format!("-{c}"), v.to_string()]),
            None => out.push(format!("-{c}")),
        }
    }
    if !ext.is_empty() {
        out.splice(
            0..0,
            ["-E".to_string(), ext.trim_start_matches(',').to_string()],
        );
    }
    Ok(out)
}

/// Each option of `args` as (letter, value), once checked.
fn parse(fs: FsType, args: &[String]) -> Result<Vec<(char, Option<&str>)>, SpecError> {
    let mut parsed = Vec::new();
    let (tool, table): (&str, fn(char) -> Option<MkfsOpt>) = match fs {
        FsType::Ext4 => ("mkfs.ext4", ext4_opt),
        FsType::Xfs => ("mkfs.xfs", xfs_opt),
        FsType::None if args.is_empty() => return Ok(parsed),
        FsType::None => ("mkfs", |_| None),
    };
    let refuse = |shown: &str, why: &str| SpecError::Value {
        option: "fsopts".into(),
        value: args.join(" "),
        reason: format!(
            "{shown:?} is refused: {why}. {tool} options dunnage passes on: {}; others are refused",
            accepted_fsopts(fs)
        ),
    };
    if let Some(bad) = args.iter().find(|a| a.chars().any(char::is_control)) {
        return Err(refuse(bad, "control characters"));
    }
    let mut seen = std::collections::BTreeSet::new();
    let mut i = 0;
    while i < args.len() {
        let arg = args[i].as_str();
        i += 1;
        if arg.starts_with("--") {
            return Err(refuse(
                arg,
                &format!("long options are not passed to {tool}"),
            ));
        }
        let letters = match arg.strip_prefix('-') {
            Some(l) if !l.is_empty() => l,
            _ => {
                return Err(refuse(
                    arg,
                    &format!("not an option: {tool} would take it for the device to format (dunnage names the volume's own device)"),
                ))
            }
        };
        for (pos, c) in letters.char_indices() {
            let Some(opt) = table(c) else {
                return Err(refuse(
                    &format!("-{c}"),
                    &format!("not an option dunnage passes to {tool}"),
                ));
            };
            let (rule, once) = match opt {
                MkfsOpt::Flag => {
                    parsed.push((c, None));
                    continue;
                }
                MkfsOpt::Refused { value: false, why } => {
                    return Err(refuse(&format!("-{c}"), why))
                }
                MkfsOpt::Refused { value: true, .. } => (None, false),
                MkfsOpt::Value { rule, once } => (Some(rule), once),
            };
            // Like getopt: the rest of this argument, or else the next one.
            let rest = &letters[pos + c.len_utf8()..];
            let value = if !rest.is_empty() {
                rest
            } else if let Some(next) = args.get(i) {
                i += 1;
                next.as_str()
            } else {
                return Err(refuse(&format!("-{c}"), "it needs a value"));
            };
            let shown = format!("-{c} {value}");
            let Some(rule) = rule else {
                let MkfsOpt::Refused { why, .. } = opt else {
                    unreachable!()
                };
                return Err(refuse(&shown, why));
            };
            if once && !seen.insert(format!("-{c}")) {
                return Err(refuse(
                    &shown,
                    &format!("-{c} is given twice and {tool} would keep only the last; join them with commas"),
                ));
            }
            rule.check(c, value, &mut seen)
                .map_err(|why| refuse(&shown, &why))?;
            parsed.push((c, Some(value)));
            break;
        }
    }
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    #[test]
    fn mkfs_gets_one_option_per_argument_and_one_extended_option() {
        let lazy = "lazy_itable_init=1";
        let got = mkfs_args(FsType::Ext4, &args("-qv -b4096 -E stride=16 -L data"), lazy).unwrap();
        assert_eq!(
            got,
            args("-E lazy_itable_init=1,stride=16 -q -v -b 4096 -L data")
        );
        // The user's value of a suboptions dunnage sets comes last: it wins.
        let got = mkfs_args(FsType::Ext4, &args("-Elazy_itable_init=0"), lazy).unwrap();
        assert_eq!(got, args("-E lazy_itable_init=1,lazy_itable_init=0"));
        assert_eq!(
            mkfs_args(FsType::Ext4, &[], lazy).unwrap(),
            args("-E lazy_itable_init=1")
        );
        assert_eq!(
            mkfs_args(FsType::Xfs, &args("-m crc=1,reflink=1 -K"), "").unwrap(),
            args("-m crc=1,reflink=1 -K")
        );
        // Checked here too: a volume stored by an older build.
        assert!(mkfs_args(FsType::Ext4, &args("-d /etc"), lazy).is_err());
    }
}

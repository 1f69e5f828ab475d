//! Snapshots and clones of a thin image: see *Snapshots* and *Clones* in
//! the module doc of `thin.rs`, which holds the invariants.

use super::{
    io_error, lock_header, read_full, sync_dir, CopyJournal, ThinImage, DATA_FILE, HEADER_FILE,
    MAP_FILE, PASSTHROUGH_FILE, UNMAP_WINDOW_BYTES,
};
use crate::engine::header::{Header, FEATURE_CLONE, HEADER_BYTES};
use crate::engine::map::{BlockMap, Entry};
use crate::engine::EngineError;
use nix::fcntl::{Flock, FlockArg};
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

/// The directory of an image's snapshots.
pub(super) const SNAPS_DIR: &str = "snaps";
const SNAP_EXT: &str = ".map";
const PINS_EXT: &str = ".pins";
/// A pin in `<snapshot>.pins/`: `<clone directory name>.pin`.
const PIN_EXT: &str = ".pin";
/// A clone's record of its base.
pub(super) const BASE_FILE: &str = "base";
const BASE_TMP: &str = "base.tmp";
const MAP_TMP: &str = "map.tmp";
/// Longest snapshot name.
pub const MAX_SNAPSHOT_NAME: usize = 128;
/// Most levels of base a clone may read through (clones of clones).
const MAX_CHAIN: usize = 16;

/// Check a snapshot name: `[A-Za-z0-9][A-Za-z0-9_.-]*`, at most 128 bytes.
pub(super) fn validate_name(name: &str) -> Result<(), EngineError> {
    let ok = name.len() <= MAX_SNAPSHOT_NAME
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(EngineError::BadSnapshotName { name: name.into() })
    }
}

fn snap_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(SNAPS_DIR).join(format!("{name}{SNAP_EXT}"))
}

fn pins_dir(dir: &Path, name: &str) -> PathBuf {
    dir.join(SNAPS_DIR).join(format!("{name}{PINS_EXT}"))
}

/// The names of the snapshots of the image in `dir`, sorted.
fn list_snapshots(dir: &Path) -> Result<Vec<String>, EngineError> {
    let snaps = dir.join(SNAPS_DIR);
    let entries = match std::fs::read_dir(&snaps) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_error("list", &snaps)(e)),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_error("list", &snaps))?;
        let file_name = entry.file_name();
        let Some(name) = file_name.to_str().and_then(|n| n.strip_suffix(SNAP_EXT)) else {
            continue;
        };
        if validate_name(name).is_ok() {
            names.push(name.to_string());
        }
    }
    names.sort();
    Ok(names)
}

/// Remove temp files a crash left in the snapshot directory (a snapshot
/// being written: it never existed).
fn remove_stale_temps(dir: &Path) -> Result<(), EngineError> {
    let snaps = dir.join(SNAPS_DIR);
    let Ok(entries) = std::fs::read_dir(&snaps) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') && name.ends_with(".tmp") {
            let path = entry.path();
            std::fs::remove_file(&path).map_err(io_error("remove", &path))?;
        }
    }
    Ok(())
}

fn bit(words: &[u64], bit: u64) -> bool {
    words
        .get((bit / 64) as usize)
        .is_some_and(|w| w & (1 << (bit % 64)) != 0)
}

/// Set a bit, growing the bitmap; returns whether it was set already.
fn test_and_set(words: &mut Vec<u64>, bit: u64) -> bool {
    let w = (bit / 64) as usize;
    if w >= words.len() {
        words.resize((words.len() * 2).max(w + 1), 0);
    }
    let was = words[w] & (1 << (bit % 64)) != 0;
    words[w] |= 1 << (bit % 64);
    was
}

fn load_map(path: &Path, nblocks: u64) -> Result<BlockMap, EngineError> {
    let file = File::open(path).map_err(io_error("open", path))?;
    BlockMap::load_frozen(&file, path, nblocks)
}

/// The physical blocks some snapshot references, one bit each: set only
/// while every IO is excluded (taking a snapshot) or at open, cleared
/// under the write side of the stripe of the block's logical home
/// (invariant 9), read under its read side. Lock-free to read: pages of
/// atomic words, allocated on first use.
pub(super) struct SharedBits {
    /// log2 of the bits in one page.
    shift: u32,
    pages: Box<[OnceLock<Box<[AtomicU64]>>]>,
}

impl SharedBits {
    /// Room for bits `0..limit`.
    pub fn new(limit: u64) -> SharedBits {
        // At least 32 Ki bits a page, and at most about 64 Ki pages.
        let mut shift = 15;
        while limit >> shift > 1 << 16 {
            shift += 1;
        }
        let npages = limit.div_ceil(1 << shift) as usize;
        SharedBits {
            shift,
            pages: (0..npages).map(|_| OnceLock::new()).collect(),
        }
    }

    /// Room for bits `0..limit`, those of `words` set.
    pub fn from_words(limit: u64, words: &[u64]) -> SharedBits {
        let bits = SharedBits::new(limit);
        for (w, &word) in words.iter().enumerate() {
            if word != 0 {
                bits.word_or_init(w as u64 * 64)
                    .fetch_or(word, Ordering::Relaxed);
            }
        }
        bits
    }

    fn page_words(&self) -> usize {
        1 << (self.shift - 6)
    }

    fn word(&self, bit: u64) -> Option<&AtomicU64> {
        let page = self.pages.get((bit >> self.shift) as usize)?.get()?;
        Some(&page[((bit >> 6) as usize) & (self.page_words() - 1)])
    }

    fn word_or_init(&self, bit: u64) -> &AtomicU64 {
        let words = self.page_words();
        let page = self.pages[(bit >> self.shift) as usize]
            .get_or_init(|| (0..words).map(|_| AtomicU64::new(0)).collect());
        &page[((bit >> 6) as usize) & (words - 1)]
    }

    #[inline]
    pub fn get(&self, bit: u64) -> bool {
        self.word(bit)
            .is_some_and(|w| w.load(Ordering::Acquire) & (1 << (bit % 64)) != 0)
    }

    /// Set a bit; returns whether it was clear.
    pub fn set(&self, bit: u64) -> bool {
        let mask = 1 << (bit % 64);
        self.word_or_init(bit).fetch_or(mask, Ordering::AcqRel) & mask == 0
    }

    /// Clear a bit; returns whether it was set.
    pub fn clear(&self, bit: u64) -> bool {
        let mask = 1 << (bit % 64);
        self.word(bit)
            .is_some_and(|w| w.fetch_and(!mask, Ordering::AcqRel) & mask != 0)
    }
}

/// What open rebuilds from the head map and every snapshot map.
#[derive(Default)]
pub(super) struct Refs {
    /// Blocks the head or a snapshot references.
    pub used: Vec<u64>,
    pub next: u64,
    /// Head-mapped blocks.
    pub allocated: u64,
    pub non_identity: u64,
    /// Blocks a snapshot references.
    pub shared: Vec<u64>,
    pub shared_count: u64,
    /// Head-mapped blocks a snapshot references.
    pub head_shared: u64,
    pub snapshots: u64,
}

impl Refs {
    /// Check the head map and every snapshot map of the image in `dir`
    /// (invariants 5 and 9) and collect their references.
    pub fn build(
        dir: &Path,
        head: &BlockMap,
        head_path: &Path,
        nblocks: u64,
        limit: u64,
        clone: bool,
    ) -> Result<Refs, EngineError> {
        let corrupt = |path: &Path, reason: String| EngineError::Corrupt {
            path: path.to_path_buf(),
            reason,
        };
        let mut refs = Refs::default();
        let mut bad: Option<String> = None;
        // Entry::ZERO is valid in clones (and their snapshots) only.
        let check = |block: u64, entry: Entry| match entry.phys() {
            _ if !entry.is_valid(clone) => Err(format!(
                "map entry {:#x} of block {block} is invalid",
                entry.raw()
            )),
            Some(phys) if phys >= limit => Err(format!(
                "map entry {:#x} of block {block} is invalid",
                entry.raw()
            )),
            phys => Ok(phys),
        };
        head.for_each_mapped(|block, entry| {
            if bad.is_some() {
                return;
            }
            let phys = match check(block, entry) {
                Ok(Some(phys)) => phys,
                Ok(None) => return,
                Err(reason) => {
                    bad = Some(reason);
                    return;
                }
            };
            if test_and_set(&mut refs.used, phys) {
                bad = Some(format!(
                    "physical block {phys} is mapped twice (again by block {block})"
                ));
                return;
            }
            refs.next = refs.next.max(phys + 1);
            refs.allocated += 1;
            refs.non_identity += u64::from(phys != block);
        });
        if let Some(reason) = bad {
            return Err(corrupt(head_path, reason));
        }

        remove_stale_temps(dir)?;
        let head_used = refs.used.clone();
        // Blocks of the snapshot being read, to find one mapped twice in it.
        let mut this: Vec<u64> = Vec::new();
        for name in list_snapshots(dir)? {
            let path = snap_path(dir, &name);
            let map = load_map(&path, nblocks)?;
            this.fill(0);
            map.for_each_mapped(|block, entry| {
                if bad.is_some() {
                    return;
                }
                let phys = match check(block, entry) {
                    Ok(Some(phys)) => phys,
                    Ok(None) => return,
                    Err(reason) => {
                        bad = Some(reason);
                        return;
                    }
                };
                if test_and_set(&mut this, phys) {
                    bad = Some(format!(
                        "physical block {phys} is mapped twice (again by block {block})"
                    ));
                    return;
                }
                // Invariant 9: a block has one logical home.
                let in_head = bit(&head_used, phys);
                if in_head && head.get(block).phys() != Some(phys) {
                    bad = Some(format!(
                        "physical block {phys} is block {block} here but another block in the head"
                    ));
                    return;
                }
                if !test_and_set(&mut refs.shared, phys) {
                    refs.shared_count += 1;
                    refs.head_shared += u64::from(in_head);
                    test_and_set(&mut refs.used, phys);
                    refs.next = refs.next.max(phys + 1);
                }
            });
            if let Some(reason) = bad {
                return Err(corrupt(&path, reason));
            }
            refs.snapshots += 1;
        }
        Ok(refs)
    }
}

/// A clone's `base` file: the image and snapshot it reads through to.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct BaseRecord {
    version: u32,
    /// The base image's directory, canonical.
    dir: PathBuf,
    snapshot: String,
}

impl BaseRecord {
    /// The record of the clone in `dir`; `None` if it has none.
    fn load(dir: &Path) -> Result<Option<BaseRecord>, EngineError> {
        let path = dir.join(BASE_FILE);
        let text = match std::fs::read(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_error("read", &path)(e)),
        };
        let record: BaseRecord =
            serde_json::from_slice(&text).map_err(|e| EngineError::BadClone {
                dir: dir.to_path_buf(),
                reason: format!("{} is unreadable: {e}", path.display()),
            })?;
        if record.version != 1 || validate_name(&record.snapshot).is_err() {
            return Err(EngineError::BadClone {
                dir: dir.to_path_buf(),
                reason: format!("{} is not a base record this build reads", path.display()),
            });
        }
        Ok(Some(record))
    }

    fn store(&self, dir: &Path) -> Result<(), EngineError> {
        let mut json = serde_json::to_vec(self).expect("base record serializes");
        json.push(b'\n');
        write_durably(dir, BASE_TMP, BASE_FILE, &json)
    }
}

/// Write `name` in `dir` atomically and durably: temp file, fsync,
/// rename, fsync of the directory.
fn write_durably(dir: &Path, tmp: &str, name: &str, bytes: &[u8]) -> Result<(), EngineError> {
    let tmp = dir.join(tmp);
    let path = dir.join(name);
    let mut file = File::create(&tmp).map_err(io_error("create", &tmp))?;
    file.write_all(bytes).map_err(io_error("write", &tmp))?;
    file.sync_all().map_err(io_error("fsync", &tmp))?;
    drop(file);
    std::fs::rename(&tmp, &path).map_err(io_error("rename", &path))?;
    sync_dir(dir)
}

pub(super) fn read_header(dir: &Path) -> Result<Header, EngineError> {
    let path = dir.join(HEADER_FILE);
    let file = File::open(&path).map_err(io_error("open", &path))?;
    let mut buf = vec![0u8; HEADER_BYTES];
    let n = read_full(&file, &mut buf, 0).map_err(io_error("read", &path))?;
    Header::decode(&buf[..n]).map_err(|reason| EngineError::Corrupt { path, reason })
}

fn canonical(dir: &Path) -> Result<PathBuf, EngineError> {
    dir.canonicalize().map_err(io_error("resolve", dir))
}

/// One frozen level a clone or a snapshot view reads: a snapshot map and
/// the data file of the image it belongs to, read-only.
pub(super) struct Level {
    data: File,
    data_path: PathBuf,
    map: BlockMap,
}

impl Level {
    fn open(dir: &Path, name: &str, nblocks: u64) -> Result<Level, EngineError> {
        let data_path = dir.join(DATA_FILE);
        let data = File::open(&data_path).map_err(io_error("open", &data_path))?;
        let path = snap_path(dir, name);
        let map = match load_map(&path, nblocks) {
            Err(EngineError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                return Err(EngineError::NoSuchSnapshot {
                    dir: dir.to_path_buf(),
                    name: name.into(),
                })
            }
            other => other?,
        };
        // Its image checks it at open; a clone reads it without that
        // image's lock, so check what it relies on here too.
        let mut bad = None;
        map.for_each_mapped(|block, entry| {
            if bad.is_none() && !entry.is_valid(true) {
                bad = Some(format!(
                    "map entry {:#x} of block {block} is invalid",
                    entry.raw()
                ));
            }
        });
        if let Some(reason) = bad {
            return Err(EngineError::Corrupt { path, reason });
        }
        Ok(Level {
            data,
            data_path,
            map,
        })
    }
}

/// The levels a clone reads through, nearest first: its base snapshot,
/// then (a clone of a clone) that image's base, and so on.
pub(super) struct BaseChain {
    levels: Vec<Arc<Level>>,
}

impl BaseChain {
    /// The chain of the clone in `dir`, whose header is `header`. Pins the
    /// nearest base snapshot again if its pin is missing (invariant 12).
    pub fn open(dir: &Path, header: &Header) -> Result<BaseChain, EngineError> {
        let bad = |reason: String| EngineError::BadClone {
            dir: dir.to_path_buf(),
            reason,
        };
        let mut levels = Vec::new();
        let mut at = dir.to_path_buf();
        loop {
            let Some(record) = BaseRecord::load(&at)? else {
                return Err(bad(format!(
                    "{} has no base file: the clone was destroyed (or damaged); \
                     remove its directory",
                    at.display()
                )));
            };
            if levels.len() == MAX_CHAIN {
                return Err(bad(format!(
                    "more than {MAX_CHAIN} levels of clones of clones"
                )));
            }
            let base = read_header(&record.dir)?;
            // Sizes may differ: either may have grown since the clone was
            // made. The base snapshot's map is never longer than the
            // clone's (it was taken before the clone, at most as large),
            // and what lies past its end reads zeros.
            if base.block_size != header.block_size {
                return Err(bad(format!(
                    "its base {} has another block size",
                    record.dir.display()
                )));
            }
            if levels.is_empty() {
                let clone = canonical(dir)?;
                let pin = pin_path(&record.dir, &record.snapshot, &clone);
                if !pin.exists() {
                    tracing::warn!(pin = %pin.display(), "the pin of this clone was missing: pinning again");
                    let _held = lock_snapshot_shared(&record.dir, &record.snapshot)?;
                    pin_snapshot(&record.dir, &record.snapshot, &clone)?;
                }
            }
            let level = Level::open(&record.dir, &record.snapshot, header.nblocks())
                .map_err(|e| bad(format!("its base snapshot: {e}")))?;
            levels.push(Arc::new(level));
            if base.features & FEATURE_CLONE == 0 {
                break;
            }
            at = record.dir;
        }
        Ok(BaseChain { levels })
    }

    /// Where `block` reads from in the chain: (level, physical block), or
    /// `None` for zeros (unmapped everywhere, or [`Entry::ZERO`] first).
    #[inline]
    pub fn lookup(&self, block: u64) -> Option<(usize, u64)> {
        lookup(&self.levels, block)
    }

    /// The first block in `[block, end)` with an entry at some level.
    pub fn next_entry(&self, block: u64, end: u64) -> Option<u64> {
        self.levels
            .iter()
            .filter_map(|l| l.map.next_entry(block, end))
            .min()
    }

    /// Fill `buf` from the data file of `level` at `offset`.
    pub fn read(&self, level: usize, buf: &mut [u8], offset: u64) -> Result<(), EngineError> {
        read_level(&self.levels[level], buf, offset)
    }
}

fn lookup(levels: &[Arc<Level>], block: u64) -> Option<(usize, u64)> {
    for (k, level) in levels.iter().enumerate() {
        let entry = level.map.get(block);
        if let Some(phys) = entry.phys() {
            return Some((k, phys));
        }
        if entry.is_zero() {
            return None;
        }
    }
    None
}

fn read_level(level: &Level, buf: &mut [u8], offset: u64) -> Result<(), EngineError> {
    let n = read_full(&level.data, buf, offset).map_err(io_error("read", &level.data_path))?;
    buf[n..].fill(0);
    Ok(())
}

/// The pin file by which the clone in `clone` (canonical) holds snapshot
/// `name` of the image in `base`.
fn pin_path(base: &Path, name: &str, clone: &Path) -> PathBuf {
    let id = clone
        .file_name()
        .map_or_else(|| "root".into(), |n| n.to_string_lossy().into_owned());
    pins_dir(base, name).join(format!("{id}{PIN_EXT}"))
}

/// Durably pin snapshot `name` of `base` for the clone in `clone`
/// (canonical). Refuses when another live clone of the same directory
/// name holds the pin.
fn pin_snapshot(base: &Path, name: &str, clone: &Path) -> Result<(), EngineError> {
    let pins = pins_dir(base, name);
    match std::fs::create_dir(&pins) {
        Ok(()) => sync_dir(&base.join(SNAPS_DIR))?,
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io_error("create", &pins)(e)),
    }
    let pin = pin_path(base, name, clone);
    if let Some(other) = pin_holder(&pin)? {
        if other != clone && pin_is_live(&other, base, name) {
            return Err(EngineError::BadClone {
                dir: clone.to_path_buf(),
                reason: format!(
                    "the clone {} of the same directory name already pins snapshot {name:?} of {}: \
                     give the clone directory another name",
                    other.display(),
                    base.display()
                ),
            });
        }
    }
    let file_name = pin.file_name().expect("pin has a name").to_string_lossy();
    let mut text = clone.as_os_str().as_encoded_bytes().to_vec();
    text.push(b'\n');
    write_durably(&pins, &format!("{file_name}.tmp"), &file_name, &text)
}

/// Lock snapshot `name` of `base` against deletion (a shared `flock` on
/// its map file, which a delete takes exclusive), checking it still exists.
fn lock_snapshot_shared(base: &Path, name: &str) -> Result<Flock<File>, EngineError> {
    let path = snap_path(base, name);
    let missing = || EngineError::NoSuchSnapshot {
        dir: base.to_path_buf(),
        name: name.into(),
    };
    let file = match File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(missing()),
        Err(e) => return Err(io_error("open", &path)(e)),
    };
    let file = Flock::lock(file, FlockArg::LockShared)
        .map_err(|(_, errno)| io_error("lock", &path)(errno.into()))?;
    if file.metadata().map_err(io_error("stat", &path))?.nlink() == 0 {
        return Err(missing()); // deleted while we waited
    }
    Ok(file)
}

/// The clone directory a pin file names; `None` if there is no pin.
fn pin_holder(pin: &Path) -> Result<Option<PathBuf>, EngineError> {
    match std::fs::read_to_string(pin) {
        Ok(text) => Ok(Some(PathBuf::from(text.trim_end_matches('\n')))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_error("read", pin)(e)),
    }
}

/// Whether the clone in `clone` is complete and reads through to snapshot
/// `name` of `base` (canonical): its pin holds (invariant 12).
fn pin_is_live(clone: &Path, base: &Path, name: &str) -> bool {
    if !clone.join(HEADER_FILE).exists() {
        return false; // a create that never finished, or gone
    }
    match BaseRecord::load(clone) {
        Ok(Some(record)) => record.dir == base && record.snapshot == name,
        Ok(None) => false,
        // Unreadable: keep the pin, the safe side.
        Err(_) => true,
    }
}

/// The live clones of snapshot `name` of `base` (canonical). Pins of
/// clones gone or destroyed are removed (when `prune`).
fn live_clones(base: &Path, name: &str, prune: bool) -> Result<Vec<PathBuf>, EngineError> {
    let pins = pins_dir(base, name);
    let entries = match std::fs::read_dir(&pins) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_error("list", &pins)(e)),
    };
    let mut live = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_error("list", &pins))?;
        let path = entry.path();
        if !entry.file_name().to_string_lossy().ends_with(PIN_EXT) {
            continue; // a pin being written
        }
        let Some(clone) = pin_holder(&path)? else {
            continue;
        };
        if pin_is_live(&clone, base, name) {
            live.push(clone);
        } else if prune {
            std::fs::remove_file(&path).map_err(io_error("remove", &path))?;
        }
    }
    live.sort();
    Ok(live)
}

/// A snapshot, as [`ThinImage::snapshots`] lists it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SnapshotInfo {
    pub name: String,
    /// When it was taken (the modification time of its map file, which is
    /// written once, when it is taken).
    pub created: SystemTime,
    /// Physical blocks it references.
    pub blocks: u64,
    /// Of `blocks`, those no other snapshot and not the volume reference:
    /// what deleting it frees (in blocks of the image's block size).
    pub exclusive_blocks: u64,
    /// Live clones whose base it is (it cannot be deleted while any is).
    pub clones: Vec<PathBuf>,
}

/// A read-only view of one snapshot of an open image (see
/// [`ThinImage::snapshot_view`]). While it lives the snapshot cannot be
/// deleted.
pub struct SnapshotView<'a> {
    image: &'a ThinImage,
    name: String,
    /// The snapshot over the image's data file, then the image's base.
    levels: Vec<Arc<Level>>,
}

impl std::fmt::Debug for SnapshotView<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotView")
            .field("image", &self.image.dir)
            .field("name", &self.name)
            .finish()
    }
}

impl SnapshotView<'_> {
    /// The snapshot's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Size of the device in bytes.
    pub fn size(&self) -> u64 {
        self.image.size
    }

    /// The image's block size in bytes.
    pub fn block_size(&self) -> u64 {
        u64::from(self.image.block_size)
    }

    /// Runs of blocks `(first, count, mapped)` to export: those whose
    /// contents differ from snapshot `since` of the same image (`mapped`
    /// false: they read as zeros now), or without `since` every mapped
    /// block. A block is unchanged where both views reach the same
    /// physical block of the same level (a block a snapshot holds is never
    /// written again), or neither maps it. Runs hold at most `max` blocks.
    pub fn changes(&self, since: Option<&SnapshotView<'_>>, max: u64) -> Vec<(u64, u64, bool)> {
        let mut runs: Vec<(u64, u64, bool)> = Vec::new();
        for block in 0..self.image.nblocks {
            let now = lookup(&self.levels, block);
            let changed = match since {
                Some(old) => now != lookup(&old.levels, block),
                None => now.is_some(),
            };
            if !changed {
                continue;
            }
            let mapped = now.is_some();
            match runs.last_mut() {
                Some((first, count, m))
                    if *m == mapped && *first + *count == block && *count < max =>
                {
                    *count += 1
                }
                _ => runs.push((block, 1, mapped)),
            }
        }
        runs
    }

    /// Fill `buf` with the device's bytes at `offset` as they were when the
    /// snapshot was taken.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), EngineError> {
        self.image.check_range(offset, buf.len() as u64)?;
        let bs = u64::from(self.image.block_size);
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let in_block = pos % bs;
            let n = ((bs - in_block) as usize).min(buf.len() - done);
            let piece = &mut buf[done..done + n];
            match lookup(&self.levels, pos / bs) {
                Some((level, phys)) => {
                    read_level(&self.levels[level], piece, phys * bs + in_block)?
                }
                None => piece.fill(0),
            }
            done += n;
        }
        Ok(())
    }
}

impl Drop for SnapshotView<'_> {
    fn drop(&mut self) {
        let mut views = self.image.views.lock();
        if let Some(count) = views.get_mut(&self.name) {
            *count -= 1;
            if *count == 0 {
                views.remove(&self.name);
            }
        }
    }
}

impl ThinImage {
    /// Take a snapshot named `name` of the image as it is now: every write
    /// that completed before this call is in it, none that started after.
    /// Costs metadata only (a copy of the map, no data), made durable
    /// before this returns. IO waits while the map is copied (see
    /// *Snapshots*). Refused in passthrough ([`EngineError::InPassthrough`])
    /// and for a name taken ([`EngineError::SnapshotExists`]).
    pub fn snapshot(&self, name: &str) -> Result<(), EngineError> {
        validate_name(name)?;
        let _one = self.snap_lock.lock();
        let snaps = self.dir.join(SNAPS_DIR);
        match std::fs::create_dir(&snaps) {
            Ok(()) => sync_dir(&self.dir)?,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_error("create", &snaps)(e)),
        }
        let path = snap_path(&self.dir, name);
        if path.try_exists().map_err(io_error("stat", &path))? {
            return Err(EngineError::SnapshotExists {
                dir: self.dir.clone(),
                name: name.into(),
            });
        }
        let tmp = snaps.join(format!(".{name}{SNAP_EXT}.tmp"));
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(io_error("create", &tmp))?;
        let result = self.with_all_write_locks(|| {
            if self.passthrough.load(Ordering::Acquire) {
                return Err(EngineError::InPassthrough {
                    dir: self.dir.clone(),
                });
            }
            // Invariant 11: the data of every block the copy references
            // is durable before the copy is.
            self.flush_inner()?;
            file.set_len(BlockMap::file_len(self.nblocks))
                .map_err(io_error("truncate", &tmp))?;
            self.map
                .write_all_pages(&file)
                .map_err(io_error("write", &tmp))?;
            file.sync_all().map_err(io_error("fsync", &tmp))?;
            std::fs::rename(&tmp, &path).map_err(io_error("rename", &path))?;
            // The snapshot exists: from now on its blocks are shared, even
            // if the sync of the directory below fails.
            let mut newly = 0u64;
            let mut head = 0u64;
            self.map.for_each_mapped(|_, entry| {
                if let Some(phys) = entry.phys() {
                    head += 1;
                    newly += u64::from(self.shared.set(phys));
                }
            });
            self.shared_count.fetch_add(newly, Ordering::AcqRel);
            self.head_shared.store(head, Ordering::Release);
            self.snapshot_count.fetch_add(1, Ordering::AcqRel);
            sync_dir(&snaps)
        });
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }

    /// The snapshots of the image, by name, with what each holds alone.
    /// The counts are a moment's: IO racing with the listing may move a
    /// block between "shared" and "exclusive".
    pub fn snapshots(&self) -> Result<Vec<SnapshotInfo>, EngineError> {
        let _one = self.snap_lock.lock();
        let names = list_snapshots(&self.dir)?;
        let base = canonical(&self.dir)?;
        // Blocks referenced by one snapshot, and by more than one.
        let mut once: Vec<u64> = Vec::new();
        let mut twice: Vec<u64> = Vec::new();
        for name in &names {
            load_map(&snap_path(&self.dir, name), self.nblocks)?.for_each_mapped(|_, e| {
                if let Some(phys) = e.phys() {
                    if test_and_set(&mut once, phys) {
                        test_and_set(&mut twice, phys);
                    }
                }
            });
        }
        let mut infos = Vec::with_capacity(names.len());
        for name in names {
            let path = snap_path(&self.dir, &name);
            let created = std::fs::metadata(&path)
                .and_then(|m| m.modified())
                .map_err(io_error("stat", &path))?;
            let (mut blocks, mut exclusive_blocks) = (0u64, 0u64);
            load_map(&path, self.nblocks)?.for_each_mapped(|block, e| {
                if let Some(phys) = e.phys() {
                    blocks += 1;
                    let in_head = self.map.get(block).phys() == Some(phys);
                    exclusive_blocks += u64::from(!bit(&twice, phys) && !in_head);
                }
            });
            let clones = live_clones(&base, &name, false)?;
            infos.push(SnapshotInfo {
                name,
                created,
                blocks,
                exclusive_blocks,
                clones,
            });
        }
        Ok(infos)
    }

    /// A read-only view of snapshot `name`, for reading it while the image
    /// is in use (a backup, a check). The snapshot cannot be deleted while
    /// the view lives ([`EngineError::SnapshotBusy`]).
    pub fn snapshot_view(&self, name: &str) -> Result<SnapshotView<'_>, EngineError> {
        validate_name(name)?;
        let _one = self.snap_lock.lock();
        let path = snap_path(&self.dir, name);
        let map = match load_map(&path, self.nblocks) {
            Err(EngineError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                return Err(EngineError::NoSuchSnapshot {
                    dir: self.dir.clone(),
                    name: name.into(),
                })
            }
            other => other?,
        };
        let data = self
            .data
            .try_clone()
            .map_err(io_error("dup", &self.data_path))?;
        let mut levels = vec![Arc::new(Level {
            data,
            data_path: self.data_path.clone(),
            map,
        })];
        if let Some(base) = &self.base {
            levels.extend(base.levels.iter().cloned());
        }
        *self.views.lock().entry(name.to_string()).or_insert(0) += 1;
        Ok(SnapshotView {
            image: self,
            name: name.into(),
            levels,
        })
    }

    /// The names of the snapshots of the image in `dir`, sorted, without
    /// opening it (a directory listing).
    pub fn snapshot_names(dir: &Path) -> Result<Vec<String>, EngineError> {
        list_snapshots(dir)
    }

    /// Delete snapshot `name` and free the blocks only it held. Refused
    /// while a live clone has it as its base ([`EngineError::SnapshotPinned`],
    /// naming the clone) or a [`SnapshotView`] of it lives. See
    /// *Snapshots* for the order of the steps, and what a crash leaves.
    pub fn delete_snapshot(&self, name: &str) -> Result<(), EngineError> {
        validate_name(name)?;
        let _one = self.snap_lock.lock();
        let path = snap_path(&self.dir, name);
        let file = match File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(EngineError::NoSuchSnapshot {
                    dir: self.dir.clone(),
                    name: name.into(),
                })
            }
            Err(e) => return Err(io_error("open", &path)(e)),
        };
        // Invariant 12: no clone pins it while this lock is held.
        let file = Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, errno)| {
            io_error("lock (a clone of it is being created?)", &path)(errno.into())
        })?;
        if self.views.lock().contains_key(name) {
            return Err(EngineError::SnapshotBusy {
                dir: self.dir.clone(),
                name: name.into(),
            });
        }
        let base = canonical(&self.dir)?;
        if let Some(clone) = live_clones(&base, name, true)?.into_iter().next() {
            return Err(EngineError::SnapshotPinned {
                dir: self.dir.clone(),
                name: name.into(),
                clone,
            });
        }
        let doomed = BlockMap::load_frozen(&file, &path, self.nblocks)?;
        std::fs::remove_file(&path).map_err(io_error("remove", &path))?;
        let pins = pins_dir(&self.dir, name);
        if let Err(e) = std::fs::remove_dir_all(&pins) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!(pins = %pins.display(), error = %e, "could not remove stale pins");
            }
        }
        self.snapshot_count.fetch_sub(1, Ordering::AcqRel);
        sync_dir(&self.dir.join(SNAPS_DIR))?;
        drop(file);
        self.release_snapshot(&doomed)
    }

    /// The snapshot `doomed` is gone (durably): unshare the blocks no other
    /// snapshot references, and free those the head does not reference
    /// either (invariant 11).
    fn release_snapshot(&self, doomed: &BlockMap) -> Result<(), EngineError> {
        let mut still: Vec<u64> = Vec::new();
        for other in list_snapshots(&self.dir)? {
            load_map(&snap_path(&self.dir, &other), self.nblocks)?.for_each_mapped(|_, e| {
                if let Some(phys) = e.phys() {
                    test_and_set(&mut still, phys);
                }
            });
        }
        // (physical block, freed from the logical block of its index)
        let mut freed: Vec<(u64, bool)> = Vec::new();
        let window = (UNMAP_WINDOW_BYTES >> self.shift).max(1);
        let mut block = 0;
        while let Some(start) = doomed.next_entry(block, self.nblocks) {
            let stop = (start + window).min(self.nblocks);
            // The shared bit of a block is read under the stripe of its
            // logical home (invariant 9), which the doomed map tells.
            self.with_write_locks(start, stop - 1, || {
                for b in start..stop {
                    let Some(phys) = doomed.get(b).phys() else {
                        continue;
                    };
                    if bit(&still, phys) || !self.shared.clear(phys) {
                        continue;
                    }
                    self.shared_count.fetch_sub(1, Ordering::AcqRel);
                    if self.map.get(b).phys() == Some(phys) {
                        self.head_shared.fetch_sub(1, Ordering::AcqRel);
                    } else {
                        freed.push((phys, phys == b));
                    }
                }
            });
            block = stop;
        }
        if freed.is_empty() {
            return Ok(());
        }
        // The head's own copies of these blocks were mapped in memory; a
        // crash must not find an older head map pointing at them once they
        // are punched.
        self.flush_inner()?;
        freed.sort_unstable();
        let mut i = 0;
        while i < freed.len() {
            let (first, own) = freed[i];
            let mut n = 1;
            while i + (n as usize) < freed.len() && freed[i + n as usize] == (first + n, own) {
                n += 1;
            }
            self.zero_phys(first << self.shift, n << self.shift)?;
            if own {
                self.alloc.defer_free_own(first..first + n);
            } else {
                self.alloc.defer_free(first..first + n);
            }
            i += n as usize;
        }
        Ok(())
    }

    /// Make the image in `dir`, which must not be open, what snapshot
    /// `name` of it holds: its map becomes a copy of the snapshot's,
    /// durably (temp file, fsync, rename over `map`, fsync of the
    /// directory). The snapshot stays. Blocks only the old state held are
    /// freed by the next open (invariant 1's scrub).
    pub fn restore(dir: &Path, name: &str) -> Result<(), EngineError> {
        validate_name(name)?;
        let _lock = lock_header(dir, "lock (is the image open? close it to restore)")?;
        let header = read_header(dir)?;
        if dir.join(PASSTHROUGH_FILE).exists() {
            return Err(EngineError::InPassthrough {
                dir: dir.to_path_buf(),
            });
        }
        let src = snap_path(dir, name);
        let map = match load_map(&src, header.nblocks()) {
            Err(EngineError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                return Err(EngineError::NoSuchSnapshot {
                    dir: dir.to_path_buf(),
                    name: name.into(),
                })
            }
            other => other?,
        };
        // Copies a killed process made on the map being replaced: a record
        // must never meet the restored map (it may hold the old entry).
        CopyJournal::discard(dir)?;
        let tmp = dir.join(MAP_TMP);
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(io_error("create", &tmp))?;
        file.set_len(BlockMap::file_len(header.nblocks()))
            .map_err(io_error("truncate", &tmp))?;
        map.write_all_pages(&file)
            .map_err(io_error("write", &tmp))?;
        file.sync_all().map_err(io_error("fsync", &tmp))?;
        let path = dir.join(MAP_FILE);
        std::fs::rename(&tmp, &path).map_err(io_error("rename", &path))?;
        sync_dir(dir)
    }

    /// Create, in the existing directory `dir`, a clone of snapshot
    /// `snapshot` of the image in `base_dir` (which may be open elsewhere)
    /// and open it: a new writable image of the same size and block size
    /// whose blocks read the snapshot's until written. The snapshot is
    /// pinned (it cannot be deleted) until [`ThinImage::destroy_clone`].
    /// The base may itself be a clone (up to 16 levels). An encrypted
    /// base's `crypt` file must be copied to the clone by the caller.
    pub fn create_clone(
        dir: &Path,
        base_dir: &Path,
        snapshot: &str,
    ) -> Result<ThinImage, EngineError> {
        validate_name(snapshot)?;
        let base = canonical(base_dir)?;
        let clone = canonical(dir)?;
        if base == clone {
            return Err(EngineError::InvalidParams(
                "a clone needs a directory of its own, not its base's".into(),
            ));
        }
        if dir.join(HEADER_FILE).exists() {
            return Err(EngineError::InvalidParams(format!(
                "{} holds an image already: a clone needs a new directory",
                dir.display()
            )));
        }
        let base_header = read_header(&base)?;
        // Invariant 12: held until the clone is complete, so a delete of
        // the snapshot waits and then sees the pin.
        let held = lock_snapshot_shared(&base, snapshot)?;
        let pin = pin_path(&base, snapshot, &clone);
        let pinned_before = pin.exists();
        pin_snapshot(&base, snapshot, &clone)?;
        let header = Header {
            size: base_header.size,
            block_size: base_header.block_size,
            features: FEATURE_CLONE,
        };
        let record = BaseRecord {
            version: 1,
            dir: base.clone(),
            snapshot: snapshot.into(),
        };
        if let Err(e) = Self::write_new_image(dir, &header, || record.store(dir)) {
            if !pinned_before {
                let _ = std::fs::remove_file(&pin);
            }
            return Err(e);
        }
        drop(held);
        Self::open(dir)
    }

    /// Detach the clone in `dir` (not open) from its base, so that its
    /// base snapshot can be deleted: the clone's `base` file is removed
    /// (from then on the clone cannot be opened: remove its directory),
    /// then its pin. Refused while a snapshot of the clone is itself the
    /// base of a live clone. Nothing to do for a clone destroyed already.
    pub fn destroy_clone(dir: &Path) -> Result<(), EngineError> {
        let hdr_path = dir.join(HEADER_FILE);
        // A clone whose create never finished has no header: nothing to lock.
        let _lock = match File::open(&hdr_path) {
            Ok(hdr) => Some(Flock::lock(hdr, FlockArg::LockExclusiveNonblock).map_err(
                |(_, errno)| {
                    io_error("lock (is the clone open? close it first)", &hdr_path)(errno.into())
                },
            )?),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_error("open", &hdr_path)(e)),
        };
        let Some(record) = BaseRecord::load(dir)? else {
            return Ok(());
        };
        let clone = canonical(dir)?;
        for name in list_snapshots(dir)? {
            if let Some(other) = live_clones(&clone, &name, false)?.into_iter().next() {
                return Err(EngineError::SnapshotPinned {
                    dir: clone,
                    name,
                    clone: other,
                });
            }
        }
        let base_file = dir.join(BASE_FILE);
        std::fs::remove_file(&base_file).map_err(io_error("remove", &base_file))?;
        sync_dir(dir)?;
        let pin = pin_path(&record.dir, &record.snapshot, &clone);
        if pin_holder(&pin)?.as_deref() == Some(clone.as_path()) {
            std::fs::remove_file(&pin).map_err(io_error("remove", &pin))?;
            sync_dir(&pins_dir(&record.dir, &record.snapshot))?;
        }
        Ok(())
    }

    /// The live clones of every snapshot of the image in `dir`, as
    /// (snapshot, clone directory): while there is one, the image's
    /// directory must not be removed.
    pub fn clones_of(dir: &Path) -> Result<Vec<(String, PathBuf)>, EngineError> {
        let base = canonical(dir)?;
        let mut clones = Vec::new();
        for name in list_snapshots(dir)? {
            for clone in live_clones(&base, &name, false)? {
                clones.push((name.clone(), clone));
            }
        }
        Ok(clones)
    }
}

#[cfg(test)]
mod tests;

//! A replica's activity log (DRBD's, simplified): the extents of the device
//! that writes may have changed since every replica was last known equal.
//!
//! Each replica marks an extent active, durably, before the first write to
//! it changes its image, so a write that reached some replicas and not
//! others (in flight when the attached node died) lies in an extent active
//! on the replica it reached. The next attach compares only the extents
//! active somewhere instead of the whole device. The attached node clears
//! the logs when it detaches cleanly (every write acknowledged everywhere,
//! flushed); an attach that ends unreleased leaves them for the next one,
//! which clears them only once it has compared the replicas. Clearing
//! waits for a flush of every replica, so a set bit never hides a write a
//! replica's crash can still lose.
//!
//! Nothing is cleared while some replica is out of sync: the logs of the
//! others then also hold, on disk, every extent it missed (DRBD keeps a
//! bitmap for this), so after any crash it is resynced from them instead
//! of compared whole.
//!
//! Each clear is stamped (the attach generation, then a count within it),
//! and a log keeps the newest stamp it took. A replica whose stamp is older
//! than the others' missed a clear they had, so its log cannot tell what
//! it misses: its files were rolled back past a clear (a backup), or a
//! clear failed there. It is then not narrowed by the logs.
//!
//! The file is `<replica>/activity`: an 8-byte magic, the extent size, the
//! last clear's stamp (generation, count), each a little-endian u64, then
//! one bit per extent in little-endian u64 words.
//! Words are 8-byte aligned, so a torn page write leaves each old or new.
//! A missing or unreadable log of an image that was not just made is taken
//! as all active: nothing is known of its writes. So is a log of the first
//! format (`dunnal01`), whose extents were cleared while a replica was out
//! of sync.

use parking_lot::Mutex;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Extents of 4 MiB, as DRBD's.
pub const EXTENT_SHIFT: u32 = 22;
pub const EXTENT: u64 = 1 << EXTENT_SHIFT;
const FILE: &str = "activity";
const MAGIC: [u8; 8] = *b"dunnal02";
const HEADER: u64 = 32;
/// Where the stamp sits in the header.
const STAMP_AT: u64 = 16;

/// Which clear a log took last: the attach generation, then a count of
/// the clears within it. Ordered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Stamp {
    pub generation: u64,
    pub seq: u64,
}

impl Stamp {
    fn encode(self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&self.generation.to_le_bytes());
        b[8..].copy_from_slice(&self.seq.to_le_bytes());
        b
    }

    fn decode(b: &[u8]) -> Stamp {
        Stamp {
            generation: u64::from_le_bytes(b[..8].try_into().expect("8 bytes")),
            seq: u64::from_le_bytes(b[8..16].try_into().expect("8 bytes")),
        }
    }
}

/// A log as the `Activity` request's reply carries it: stamp, then words.
pub fn encode_reply(stamp: Stamp, words: &[u64]) -> Vec<u8> {
    let mut b = stamp.encode().to_vec();
    b.extend_from_slice(&encode(words));
    b
}

/// [`encode_reply`]'s bytes for a log of `extents` extents.
pub fn decode_reply(bytes: &[u8], extents: u64) -> Option<(Stamp, Vec<u64>)> {
    if bytes.len() < 16 {
        return None;
    }
    Some((Stamp::decode(&bytes[..16]), decode(&bytes[16..], extents)?))
}

/// The number of extents of a device of `size` bytes.
pub fn extents(size: u64) -> u64 {
    size.div_ceil(EXTENT)
}

/// The extents `[offset, offset + len)` touches (`len` > 0).
fn span(offset: u64, len: u64) -> (u64, u64) {
    // Saturating: a request past any device's end is the image's to refuse.
    (
        offset >> EXTENT_SHIFT,
        offset.saturating_add(len - 1) >> EXTENT_SHIFT,
    )
}

/// The words of a bitmap, as the wire and the file carry them.
pub fn encode(words: &[u64]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

/// A bitmap of `extents` bits from [`encode`]'s bytes.
pub fn decode(bytes: &[u8], extents: u64) -> Option<Vec<u64>> {
    let words = extents.div_ceil(64) as usize;
    if bytes.len() != words * 8 {
        return None;
    }
    let mut out: Vec<u64> = bytes
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect();
    // Bits past the last extent mean nothing: drop them.
    if let Some(last) = out.last_mut() {
        let used = extents % 64;
        if used != 0 {
            *last &= (1u64 << used) - 1;
        }
    }
    Some(out)
}

/// Word `i` of a bitmap of `extents` extents, all set.
fn all_bits(extents: u64, i: usize) -> u64 {
    let used = extents - 64 * i as u64;
    if used >= 64 {
        u64::MAX
    } else {
        (1u64 << used) - 1
    }
}

/// The set bits of a bitmap, in order.
pub fn set_bits(words: &[u64]) -> impl Iterator<Item = u64> + '_ {
    words.iter().enumerate().flat_map(|(i, &w)| {
        (0..64)
            .filter(move |b| w & (1 << b) != 0)
            .map(move |b| i as u64 * 64 + b)
    })
}

/// Drop the log in `dir`, durably: the image's content is changing
/// outside any write (a restore to a snapshot), so it is taken as all
/// active when next opened.
pub fn forget(dir: &Path) -> io::Result<()> {
    match std::fs::remove_file(dir.join(FILE)) {
        Ok(()) => File::open(dir)?.sync_all(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// The device of the log in `dir` grew from `old` to `new` bytes: its new
/// extents, never written, are inactive, durably. A log not of `old`'s
/// length (or none) is left as it is: open takes it as all active.
pub fn grow(dir: &Path, old: u64, new: u64) -> io::Result<()> {
    let path = dir.join(FILE);
    let file = match OpenOptions::new().read(true).write(true).open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let len = |extents: u64| HEADER + extents.div_ceil(64) * 8;
    let (was, now) = (extents(old), extents(new));
    if file.metadata()?.len() != len(was) || now <= was {
        return Ok(());
    }
    // Bits past the old last extent meant nothing; now they name extents.
    if was % 64 != 0 {
        let at = HEADER + (was / 64) * 8;
        let mut word = [0u8; 8];
        file.read_exact_at(&mut word, at)?;
        let kept = u64::from_le_bytes(word) & ((1u64 << (was % 64)) - 1);
        file.write_all_at(&kept.to_le_bytes(), at)?;
    }
    file.set_len(len(now))?;
    file.sync_all()
}

/// Where a replica's image comes from, for its log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Made {
    /// It was there: its log says what may differ.
    Before,
    /// Just made equal to the volume's other new replicas (an empty
    /// volume's, or a clone's from its base): nothing differs.
    Equal,
    /// Just made to be copied whole into (a replacement, a replica added):
    /// all active until every replica is in sync again, so that its log
    /// never hides an extent its copy skipped as equal.
    ToCopy,
}

pub struct ActivityLog {
    path: PathBuf,
    file: File,
    extents: u64,
    /// What the file says (a bit is set here only once it is durable
    /// there, and cleared here before it is cleared there).
    words: Vec<AtomicU64>,
    /// Serialises changes to the file (a write and its sync); holds the
    /// last clear's stamp.
    changing: Mutex<Stamp>,
}

impl std::fmt::Debug for ActivityLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ActivityLog")
            .field("path", &self.path)
            .field("active", &self.active_count())
            .finish()
    }
}

impl ActivityLog {
    /// Open the log in `dir` of a device of `size` bytes.
    pub fn open(dir: &Path, size: u64, made: Made) -> io::Result<ActivityLog> {
        let path = dir.join(FILE);
        let extents = extents(size);
        let nwords = extents.div_ceil(64) as usize;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        let found = match made {
            Made::Before => read(&file, extents),
            Made::Equal | Made::ToCopy => None,
        };
        let rewrite = found.is_none();
        let stamp = found.as_ref().map_or(Stamp::default(), |f| f.0);
        let words = found.map(|f| f.1).unwrap_or_else(|| {
            if made == Made::Equal {
                vec![0; nwords]
            } else {
                if made == Made::Before {
                    tracing::warn!(path = %path.display(),
                        "no readable activity log: every extent of this replica is taken as written");
                }
                (0..nwords).map(|i| all_bits(extents, i)).collect()
            }
        });
        let log = ActivityLog {
            path,
            file,
            extents,
            words: words.into_iter().map(AtomicU64::new).collect(),
            changing: Mutex::new(stamp),
        };
        if rewrite {
            log.write_all()?;
        }
        Ok(log)
    }

    /// Mark the extents `[offset, offset + len)` touches active, durably,
    /// before a write changes them. Free once they are.
    pub fn activate(&self, offset: u64, len: u64) -> io::Result<()> {
        let Some((first, last)) = self.extents_of(offset, len) else {
            return Ok(());
        };
        if (first..=last).all(|e| self.is_active(e)) {
            return Ok(());
        }
        // Set in memory only once durable: a concurrent writer of the same
        // extent waits on the lock, then finds it active.
        let _one = self.changing.lock();
        if (first..=last).all(|e| self.is_active(e)) {
            return Ok(());
        }
        let (w0, w1) = ((first / 64) as usize, (last / 64) as usize);
        let mut new: Vec<u64> = (w0..=w1)
            .map(|w| self.words[w].load(Ordering::Acquire))
            .collect();
        for e in first..=last {
            new[(e / 64) as usize - w0] |= 1 << (e % 64);
        }
        self.file
            .write_all_at(&encode(&new), HEADER + 8 * w0 as u64)?;
        self.file.sync_data()?;
        for (i, w) in new.into_iter().enumerate() {
            self.words[w0 + i].store(w, Ordering::Release);
        }
        Ok(())
    }

    /// Whether a write of `offset..offset+len` finds its extents active
    /// (so [`ActivityLog::activate`] would not write the log).
    pub fn covers(&self, offset: u64, len: u64) -> bool {
        match self.extents_of(offset, len) {
            Some((first, last)) => (first..=last).all(|e| self.is_active(e)),
            None => true,
        }
    }

    /// The extents `offset..offset+len` touches; `None` if none (empty, or
    /// past the end: the image refuses it).
    fn extents_of(&self, offset: u64, len: u64) -> Option<(u64, u64)> {
        if len == 0 {
            return None;
        }
        let (first, last) = span(offset, len);
        (first < self.extents).then(|| (first, last.min(self.extents - 1)))
    }

    /// Mark every extent active, durably.
    pub fn activate_all(&self) -> io::Result<()> {
        let stamp = self.changing.lock();
        if self.active_count() == self.extents {
            return Ok(());
        }
        let all: Vec<u64> = (0..self.words.len())
            .map(|i| all_bits(self.extents, i))
            .collect();
        self.write_file(*stamp, &all)?;
        for (w, a) in self.words.iter().zip(all) {
            w.store(a, Ordering::Release);
        }
        Ok(())
    }

    /// Clear `count` extents from `first` (past the end: up to it), durably,
    /// as the clear `stamp` (kept if newer than the last). A clear older
    /// than the last is not applied: it is a late one of a link that has
    /// since been replaced, and newer writes may rely on the bits.
    pub fn deactivate(&self, first: u64, count: u64, stamp: Stamp) -> io::Result<()> {
        let end = first.saturating_add(count).min(self.extents);
        let mut last = self.changing.lock();
        if stamp < *last {
            return Ok(());
        }
        if stamp > *last {
            // Before the bits: torn, the stamp says newer with bits still
            // set (safe); the other way round would claim less than done.
            self.file.write_all_at(&stamp.encode(), STAMP_AT)?;
            *last = stamp;
        }
        if first >= end {
            return self.file.sync_data();
        }
        for e in first..end {
            self.words[(e / 64) as usize].fetch_and(!(1 << (e % 64)), Ordering::AcqRel);
        }
        let (w0, w1) = ((first / 64) as usize, ((end - 1) / 64) as usize);
        let words: Vec<u64> = (w0..=w1)
            .map(|w| self.words[w].load(Ordering::Acquire))
            .collect();
        self.file
            .write_all_at(&encode(&words), HEADER + 8 * w0 as u64)?;
        self.file.sync_data()
    }

    pub fn is_active(&self, extent: u64) -> bool {
        self.words
            .get((extent / 64) as usize)
            .is_some_and(|w| w.load(Ordering::Acquire) & (1 << (extent % 64)) != 0)
    }

    /// The last clear's stamp.
    pub fn stamp(&self) -> Stamp {
        *self.changing.lock()
    }

    /// The active extents, as a bitmap.
    pub fn bitmap(&self) -> Vec<u64> {
        self.words
            .iter()
            .map(|w| w.load(Ordering::Acquire))
            .collect()
    }

    pub fn extents(&self) -> u64 {
        self.extents
    }

    pub fn active_count(&self) -> u64 {
        self.bitmap()
            .iter()
            .map(|w| u64::from(w.count_ones()))
            .sum()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Header and every word, synced (a new or unreadable log).
    fn write_all(&self) -> io::Result<()> {
        let stamp = self.changing.lock();
        self.write_file(*stamp, &self.bitmap())
    }

    /// The whole file with `words` (under `changing`).
    fn write_file(&self, stamp: Stamp, words: &[u64]) -> io::Result<()> {
        let mut bytes = Vec::with_capacity(HEADER as usize + words.len() * 8);
        bytes.extend_from_slice(&MAGIC);
        bytes.extend_from_slice(&EXTENT.to_le_bytes());
        bytes.extend_from_slice(&stamp.encode());
        bytes.extend_from_slice(&encode(words));
        self.file.set_len(bytes.len() as u64)?;
        self.file.write_all_at(&bytes, 0)?;
        self.file.sync_all()?;
        if let Some(dir) = self.path.parent() {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    }
}

/// The stamp and bitmap a log file holds, if it is one for `extents`
/// extents of [`EXTENT`] bytes.
fn read(file: &File, extents: u64) -> Option<(Stamp, Vec<u64>)> {
    let mut header = [0u8; HEADER as usize];
    file.read_exact_at(&mut header, 0).ok()?;
    if header[..8] != MAGIC || header[8..16] != EXTENT.to_le_bytes() {
        return None;
    }
    let mut bytes = vec![0u8; extents.div_ceil(64) as usize * 8];
    file.read_exact_at(&mut bytes, HEADER).ok()?;
    if file.metadata().ok()?.len() != HEADER + bytes.len() as u64 {
        return None;
    }
    Some((Stamp::decode(&header[16..]), decode(&bytes, extents)?))
}

/// Extents a log keeps active at most before the attached node clears
/// the least recently written (DRBD's `al-extents`, 1237 by default): what
/// an unreleased attach makes the next one compare, 4 GiB.
pub const HOT_MAX: u64 = 1024;

/// The attached node's view of the logs its writes set: which extents are
/// active and when each was last written, in flushes. Writes touch it
/// under their range lock; the extents it picks to clear are cleared under
/// theirs, so no write to them is in flight meanwhile.
pub struct Hot {
    max: u64,
    active: Vec<AtomicU64>,
    last: Vec<AtomicU64>,
    count: AtomicU64,
    /// Flushes so far.
    tick: AtomicU64,
}

impl Hot {
    pub fn new(size: u64, max: u64) -> Hot {
        let n = extents(size);
        Hot {
            max: max.max(1),
            active: (0..n.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            last: (0..n).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            tick: AtomicU64::new(0),
        }
    }

    /// A write to `[offset, offset + len)` is about to be sent.
    #[inline]
    pub fn touch(&self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let (first, last) = span(offset, len);
        let now = self.tick.load(Ordering::Relaxed);
        let n = self.last.len() as u64;
        if first >= n {
            return;
        }
        for e in first..=last.min(n - 1) {
            let at = &self.last[e as usize];
            if at.load(Ordering::Relaxed) != now {
                at.store(now, Ordering::Relaxed);
            }
            let (w, bit) = ((e / 64) as usize, 1u64 << (e % 64));
            if self.active[w].load(Ordering::Relaxed) & bit == 0
                && self.active[w].fetch_or(bit, Ordering::Relaxed) & bit == 0
            {
                self.count.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// A flush completed.
    pub fn tick(&self) {
        self.tick.fetch_add(1, Ordering::Relaxed);
    }

    pub fn over(&self) -> bool {
        self.count.load(Ordering::Relaxed) > self.max
    }

    pub fn is_active(&self, extent: u64) -> bool {
        self.active
            .get((extent / 64) as usize)
            .is_some_and(|w| w.load(Ordering::Relaxed) & (1 << (extent % 64)) != 0)
    }

    /// The extents to clear, least recently written first, down to three
    /// quarters of the most (so that clearing is not a step per flush).
    /// None written since the last flush: those may still be in flight.
    pub fn victims(&self) -> Vec<u64> {
        let count = self.count.load(Ordering::Relaxed);
        if count <= self.max {
            return Vec::new();
        }
        let now = self.tick.load(Ordering::Relaxed);
        let mut candidates: Vec<(u64, u64)> = (0..self.last.len() as u64)
            .filter(|&e| self.is_active(e))
            .map(|e| (self.last[e as usize].load(Ordering::Relaxed), e))
            .filter(|&(at, _)| at < now)
            .collect();
        candidates.sort_unstable();
        let want = (count - self.max * 3 / 4) as usize;
        candidates.into_iter().take(want).map(|(_, e)| e).collect()
    }

    /// Whether `extent` was written since flush `tick` (checked again
    /// under its range lock before it is cleared).
    pub fn written_since(&self, extent: u64, tick: u64) -> bool {
        self.last
            .get(extent as usize)
            .is_some_and(|at| at.load(Ordering::Relaxed) >= tick)
    }

    pub fn now(&self) -> u64 {
        self.tick.load(Ordering::Relaxed)
    }

    /// `extent` was cleared on the replicas (under its range lock).
    pub fn cleared(&self, extent: u64) {
        let (w, bit) = ((extent / 64) as usize, 1u64 << (extent % 64));
        if let Some(word) = self.active.get(w) {
            if word.fetch_and(!bit, Ordering::Relaxed) & bit != 0 {
                self.count.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    /// Maximal runs `(first, count)` of extents not active here.
    pub fn cold_runs(&self) -> Vec<(u64, u64)> {
        let n = self.last.len() as u64;
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for e in (0..n).filter(|&e| !self.is_active(e)) {
            match runs.last_mut() {
                Some((first, count)) if *first + *count == e => *count += 1,
                _ => runs.push((e, 1)),
            }
        }
        runs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grown_log_keeps_its_extents_and_adds_inactive_ones() {
        let dir = tempfile::tempdir().unwrap();
        let old = 10 * EXTENT - 4096; // 10 extents, the last partial
        let log = ActivityLog::open(dir.path(), old, Made::Equal).unwrap();
        log.activate(2 * EXTENT, 1).unwrap();
        log.activate(9 * EXTENT, 1).unwrap();
        drop(log);
        grow(dir.path(), old, 200 * EXTENT).unwrap();
        let log = ActivityLog::open(dir.path(), 200 * EXTENT, Made::Before).unwrap();
        assert_eq!(log.extents(), 200);
        assert_eq!(log.active_count(), 2);
        assert!(log.covers(2 * EXTENT, 1) && log.covers(9 * EXTENT, 1));
        assert!(!log.covers(10 * EXTENT, 1) && !log.covers(199 * EXTENT, 1));
        drop(log);
        // A log of another length than the old size's is left alone: it
        // opens as all active.
        grow(dir.path(), old, 400 * EXTENT).unwrap();
        let log = ActivityLog::open(dir.path(), 400 * EXTENT, Made::Before).unwrap();
        assert_eq!(log.active_count(), 400);
    }

    #[test]
    fn the_least_recently_written_extents_are_cleared_past_the_most() {
        let hot = Hot::new(16 * EXTENT, 4);
        for e in [3, 1, 7, 5] {
            hot.touch(e * EXTENT + 100, 4096);
            hot.tick();
        }
        assert!(!hot.over() && hot.victims().is_empty());
        hot.touch(16 * EXTENT, 4096); // past the end: nothing
        assert!(!hot.over() && hot.victims().is_empty());
        // Two more, one across a boundary: 7 active, 3 over.
        hot.touch(9 * EXTENT - 512, 1024);
        hot.touch(12 * EXTENT, 1);
        assert!(hot.over());
        // Not yet flushed: the new ones are not candidates; down to 3.
        assert_eq!(hot.victims(), [3, 1, 7, 5]);
        // Written again: 3 moves behind the older ones (ties by index).
        hot.touch(3 * EXTENT, 1);
        hot.tick();
        assert_eq!(hot.victims(), [1, 7, 5, 3]);
        let tick = hot.now();
        hot.touch(7 * EXTENT, 1);
        assert!(hot.written_since(7, tick) && !hot.written_since(1, tick));
        for e in [1, 5, 8] {
            hot.cleared(e);
        }
        hot.cleared(5);
        assert!(!hot.over(), "4 left");
        assert_eq!(
            hot.cold_runs(),
            [(0, 3), (4, 3), (8, 1), (10, 2), (13, 3)],
            "active: 3, 7, 9, 12"
        );
    }

    const SIZE: u64 = 100 * EXTENT + 4096;

    #[test]
    fn activations_are_durable_and_cleared_by_deactivate() {
        let dir = tempfile::tempdir().unwrap();
        let log = ActivityLog::open(dir.path(), SIZE, Made::Equal).unwrap();
        assert_eq!(log.extents(), 101);
        assert_eq!(log.active_count(), 0);
        // A write across an extent boundary marks both.
        assert!(!log.covers(3 * EXTENT - 512, 1024));
        log.activate(3 * EXTENT - 512, 1024).unwrap();
        assert!(log.covers(2 * EXTENT, 2 * EXTENT) && !log.covers(2 * EXTENT, 2 * EXTENT + 1));
        // Nothing to mark: empty, or past the end.
        assert!(log.covers(70 * EXTENT, 0) && log.covers(200 * EXTENT, 4096));
        log.activate(100 * EXTENT, 4096).unwrap();
        log.activate(70 * EXTENT, 0).unwrap();
        log.activate(200 * EXTENT, 4096).unwrap();
        let active: Vec<u64> = set_bits(&log.bitmap()).collect();
        assert_eq!(active, [2, 3, 100]);
        drop(log);

        let log = ActivityLog::open(dir.path(), SIZE, Made::Before).unwrap();
        assert_eq!(set_bits(&log.bitmap()).collect::<Vec<_>>(), [2, 3, 100]);
        log.deactivate(
            3,
            1000,
            Stamp {
                generation: 2,
                seq: 1,
            },
        )
        .unwrap();
        assert_eq!(set_bits(&log.bitmap()).collect::<Vec<_>>(), [2]);
        drop(log);
        let log = ActivityLog::open(dir.path(), SIZE, Made::Before).unwrap();
        assert_eq!(set_bits(&log.bitmap()).collect::<Vec<_>>(), [2]);
        assert_eq!(
            log.stamp(),
            Stamp {
                generation: 2,
                seq: 1
            },
            "durably"
        );
        log.deactivate(
            0,
            u64::MAX,
            Stamp {
                generation: 2,
                seq: 2,
            },
        )
        .unwrap();
        assert_eq!(log.active_count(), 0);
        // A late clear of an older stamp is not applied.
        let at = |generation, seq| Stamp { generation, seq };
        log.activate(0, 1).unwrap();
        log.deactivate(0, 1, at(1, 9)).unwrap();
        log.deactivate(0, 1, at(2, 1)).unwrap();
        assert_eq!(log.active_count(), 1);
        log.deactivate(0, 1, at(2, 2)).unwrap();
        assert_eq!(log.active_count(), 0, "the same stamp again is applied");
        drop(log);
        let log = ActivityLog::open(dir.path(), SIZE, Made::Before).unwrap();
        assert_eq!(
            log.stamp(),
            Stamp {
                generation: 2,
                seq: 2
            }
        );
        assert!(
            Stamp {
                generation: 3,
                seq: 1
            } > Stamp {
                generation: 2,
                seq: 9
            }
        );
        let (stamp, words) = decode_reply(&encode_reply(log.stamp(), &log.bitmap()), 101).unwrap();
        assert_eq!((stamp, words), (log.stamp(), log.bitmap()));
        assert_eq!(decode_reply(&[0; 8], 101), None);
    }

    #[test]
    fn an_unknown_log_of_an_existing_image_is_all_active() {
        let dir = tempfile::tempdir().unwrap();
        // No file: an image from before activity logs.
        let log = ActivityLog::open(dir.path(), SIZE, Made::Before).unwrap();
        assert_eq!(log.active_count(), 101);
        log.deactivate(0, 100, Stamp::default()).unwrap();
        drop(log);
        let log = ActivityLog::open(dir.path(), SIZE, Made::Before).unwrap();
        assert_eq!(set_bits(&log.bitmap()).collect::<Vec<_>>(), [100]);
        drop(log);
        // Damaged: the wrong magic, or a size for another device.
        let path = dir.path().join(FILE);
        std::fs::write(&path, b"not a log at all").unwrap();
        assert_eq!(
            ActivityLog::open(dir.path(), SIZE, Made::Before)
                .unwrap()
                .active_count(),
            101
        );
        let log = ActivityLog::open(dir.path(), 2 * EXTENT, Made::Before).unwrap();
        assert_eq!(log.active_count(), 2, "a log for 101 extents read for 2");
        drop(log);
        // The first format, kept under other rules: all active.
        drop(ActivityLog::open(dir.path(), SIZE, Made::Equal).unwrap());
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[..8].copy_from_slice(b"dunnal01");
        std::fs::write(&path, bytes).unwrap();
        let log = ActivityLog::open(dir.path(), SIZE, Made::Before).unwrap();
        assert_eq!(log.active_count(), 101);
    }

    #[test]
    fn a_forgotten_log_is_all_active() {
        let dir = tempfile::tempdir().unwrap();
        drop(ActivityLog::open(dir.path(), SIZE, Made::Equal).unwrap());
        forget(dir.path()).unwrap();
        forget(dir.path()).unwrap();
        let log = ActivityLog::open(dir.path(), SIZE, Made::Before).unwrap();
        assert_eq!(log.active_count(), 101);
    }

    #[test]
    fn an_image_to_be_copied_into_is_all_active() {
        let dir = tempfile::tempdir().unwrap();
        let log = ActivityLog::open(dir.path(), SIZE, Made::ToCopy).unwrap();
        assert_eq!(log.active_count(), 101);
        drop(log);
        let log = ActivityLog::open(dir.path(), SIZE, Made::Before).unwrap();
        assert_eq!(log.active_count(), 101, "durably");
        drop(log);
        // An existing image made all active.
        let dir = tempfile::tempdir().unwrap();
        let log = ActivityLog::open(dir.path(), SIZE, Made::Equal).unwrap();
        log.activate(EXTENT, 1).unwrap();
        log.activate_all().unwrap();
        assert_eq!(log.active_count(), 101);
        drop(log);
        let log = ActivityLog::open(dir.path(), SIZE, Made::Before).unwrap();
        assert_eq!(log.active_count(), 101, "durably");
    }

    #[test]
    fn bitmaps_cross_the_wire_and_drop_bits_past_the_end() {
        let words = vec![0b1010, 1 << 63 | 1];
        assert_eq!(decode(&encode(&words), 128), Some(words.clone()));
        assert_eq!(decode(&encode(&words), 65), Some(vec![0b1010, 1]));
        assert_eq!(decode(&encode(&words), 200), None, "wrong length");
        assert_eq!(set_bits(&words).collect::<Vec<_>>(), [1, 3, 64, 127]);
    }
}

//! The pure state of replication: which 4 KiB units a replica misses (the
//! dirty map), and the per-replica state machine the mirror drives. No IO
//! here: the mirror holds these under its locks and does the talking.

use super::ReplicaState;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// The granularity of dirty tracking and resync.
pub const UNIT: u64 = 4096;
/// Units per chunk of the sparse bitmap: 128 MiB of device per 4 KiB of bits.
const CHUNK_UNITS: u64 = 32768;
const WORDS: usize = (CHUNK_UNITS / 64) as usize;

#[derive(Clone)]
enum Chunk {
    /// Every unit of the chunk is set (a full resync costs no bitmap memory).
    Full,
    Bits(Box<[u64; WORDS]>),
}

/// A set of 4 KiB units of a device, kept as a sparse chunked bitmap.
#[derive(Clone)]
pub struct DirtyMap {
    units: u64,
    chunks: BTreeMap<u64, (Chunk, u64)>,
    count: u64,
}

impl std::fmt::Debug for DirtyMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyMap")
            .field("units", &self.units)
            .field("count", &self.count)
            .finish()
    }
}

/// The units covering `len` bytes at `offset`: `start..end`.
pub fn unit_span(offset: u64, len: u64) -> (u64, u64) {
    if len == 0 {
        return (offset / UNIT, offset / UNIT);
    }
    (offset / UNIT, (offset + len).div_ceil(UNIT))
}

/// Set bits `lo..hi` of `words`; returns how many were newly set.
fn set_bits(words: &mut [u64; WORDS], lo: u64, hi: u64) -> u64 {
    let mut added = 0;
    let mut b = lo;
    while b < hi {
        let w = (b / 64) as usize;
        let bit = b % 64;
        let n = (64 - bit).min(hi - b);
        let mask = if n == 64 {
            !0
        } else {
            ((1u64 << n) - 1) << bit
        };
        added += u64::from((!words[w] & mask).count_ones());
        words[w] |= mask;
        b += n;
    }
    added
}

/// Clear bits `lo..hi` of `words`; returns how many were set.
fn clear_bits(words: &mut [u64; WORDS], lo: u64, hi: u64) -> u64 {
    let mut removed = 0;
    let mut b = lo;
    while b < hi {
        let w = (b / 64) as usize;
        let bit = b % 64;
        let n = (64 - bit).min(hi - b);
        let mask = if n == 64 {
            !0
        } else {
            ((1u64 << n) - 1) << bit
        };
        removed += u64::from((words[w] & mask).count_ones());
        words[w] &= !mask;
        b += n;
    }
    removed
}

impl DirtyMap {
    /// An empty map of a device of `size` bytes.
    pub fn new(size: u64) -> DirtyMap {
        DirtyMap {
            units: size.div_ceil(UNIT),
            chunks: BTreeMap::new(),
            count: 0,
        }
    }

    pub fn units(&self) -> u64 {
        self.units
    }

    /// Units set.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Bytes covered by the units set.
    pub fn bytes(&self) -> u64 {
        self.count * UNIT
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    fn chunk_len(&self, ci: u64) -> u64 {
        CHUNK_UNITS.min(self.units - ci * CHUNK_UNITS)
    }

    /// Set the units covering `len` bytes at `offset`.
    pub fn mark_bytes(&mut self, offset: u64, len: u64) {
        let (s, e) = unit_span(offset, len);
        self.mark(s, e);
    }

    /// Set units `start..end` (clamped to the device).
    pub fn mark(&mut self, start: u64, end: u64) {
        let end = end.min(self.units);
        let mut u = start;
        while u < end {
            let ci = u / CHUNK_UNITS;
            let base = ci * CHUNK_UNITS;
            let clen = self.chunk_len(ci);
            let (lo, hi) = (u - base, (end - base).min(clen));
            u = base + hi;
            let whole = lo == 0 && hi == clen;
            match self.chunks.get_mut(&ci) {
                None if whole => {
                    self.chunks.insert(ci, (Chunk::Full, clen));
                    self.count += clen;
                }
                None => {
                    let mut words = Box::new([0u64; WORDS]);
                    let n = set_bits(&mut words, lo, hi);
                    self.chunks.insert(ci, (Chunk::Bits(words), n));
                    self.count += n;
                }
                Some((Chunk::Full, _)) => {}
                Some((Chunk::Bits(words), n)) => {
                    let added = set_bits(words, lo, hi);
                    *n += added;
                    self.count += added;
                    if *n == clen {
                        self.chunks.insert(ci, (Chunk::Full, clen));
                    }
                }
            }
        }
    }

    /// Clear units `start..end` (clamped to the device).
    pub fn clear(&mut self, start: u64, end: u64) {
        let end = end.min(self.units);
        let mut u = start;
        while u < end {
            let ci = u / CHUNK_UNITS;
            let base = ci * CHUNK_UNITS;
            let clen = self.chunk_len(ci);
            let (lo, hi) = (u - base, (end - base).min(clen));
            u = base + hi;
            let Some((chunk, n)) = self.chunks.get_mut(&ci) else {
                continue;
            };
            if lo == 0 && hi == clen {
                self.count -= *n;
                self.chunks.remove(&ci);
                continue;
            }
            if matches!(chunk, Chunk::Full) {
                let mut words = Box::new([0u64; WORDS]);
                set_bits(&mut words, 0, clen);
                *chunk = Chunk::Bits(words);
            }
            let Chunk::Bits(words) = chunk else {
                unreachable!("converted above")
            };
            let removed = clear_bits(words, lo, hi);
            *n -= removed;
            self.count -= removed;
            if *n == 0 {
                self.chunks.remove(&ci);
            }
        }
    }

    /// Set every unit (a full resync).
    pub fn mark_all(&mut self) {
        self.mark(0, self.units);
    }

    pub fn clear_all(&mut self) {
        self.chunks.clear();
        self.count = 0;
    }

    pub fn contains(&self, unit: u64) -> bool {
        if unit >= self.units {
            return false;
        }
        match self.chunks.get(&(unit / CHUNK_UNITS)) {
            None => false,
            Some((Chunk::Full, _)) => true,
            Some((Chunk::Bits(words), _)) => {
                let b = unit % CHUNK_UNITS;
                words[(b / 64) as usize] & (1 << (b % 64)) != 0
            }
        }
    }

    /// The first set unit at or after `from`.
    fn first_from(&self, from: u64) -> Option<u64> {
        for (&ci, (chunk, _)) in self.chunks.range(from / CHUNK_UNITS..) {
            let base = ci * CHUNK_UNITS;
            let lo = from.saturating_sub(base);
            match chunk {
                Chunk::Full => return Some(base + lo),
                Chunk::Bits(words) => {
                    let mut w = (lo / 64) as usize;
                    let mut mask = !0u64 << (lo % 64);
                    while w < WORDS {
                        let hit = words[w] & mask;
                        if hit != 0 {
                            return Some(base + w as u64 * 64 + u64::from(hit.trailing_zeros()));
                        }
                        w += 1;
                        mask = !0;
                    }
                }
            }
        }
        None
    }

    /// The next run of adjacent set units at or after `from` (wrapping to
    /// the start of the device), at most `max` units long: `start..end`.
    pub fn next_run(&self, from: u64, max: u64) -> Option<(u64, u64)> {
        if self.count == 0 || max == 0 {
            return None;
        }
        let start = self.first_from(from).or_else(|| self.first_from(0))?;
        let mut end = start + 1;
        while end - start < max && self.contains(end) {
            end += 1;
        }
        Some((start, end))
    }

    /// Keep only the units within `keep` (sorted, disjoint `start..end`
    /// runs of units).
    pub fn keep_only(&mut self, keep: &[(u64, u64)]) {
        let mut from = 0;
        for &(start, end) in keep {
            self.clear(from, start);
            from = from.max(end);
        }
        self.clear(from, self.units);
    }

    /// Add every unit of `other` (a map of the same device).
    pub fn union(&mut self, other: &DirtyMap) {
        debug_assert_eq!(self.units, other.units);
        for (&ci, (chunk, _)) in &other.chunks {
            let base = ci * CHUNK_UNITS;
            match chunk {
                Chunk::Full => self.mark(base, base + self.chunk_len(ci)),
                Chunk::Bits(words) => {
                    for (w, &word) in words.iter().enumerate() {
                        let mut bits = word;
                        while bits != 0 {
                            let b = u64::from(bits.trailing_zeros());
                            // Extend over the run of set bits in this word.
                            let run = u64::from((bits >> b).trailing_ones());
                            let u = base + w as u64 * 64 + b;
                            self.mark(u, u + run);
                            bits &= if b + run >= 64 { 0 } else { !0u64 << (b + run) };
                        }
                    }
                }
            }
        }
    }
}

/// Progress of a replica's resync, in bytes of device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ResyncProgress {
    pub done_bytes: u64,
    pub total_bytes: u64,
    /// Slowed down to `--resync-busy-rate` while the volume serves IO.
    #[serde(default)]
    pub yielding: bool,
}

/// One replica as [`crate::replication::Mirror::status`] reports it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ReplicaStatus {
    pub node: String,
    pub local: bool,
    pub state: ReplicaState,
    pub connected: bool,
    pub resync: Option<ResyncProgress>,
    /// Cumulative bytes of data sent by resync to this replica.
    pub resync_sent_bytes: u64,
    /// Cumulative bytes of device its resyncs compared or copied.
    pub resynced_bytes: u64,
}

/// Where a write goes for one replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Send it (over the link of this epoch).
    Send { epoch: u64 },
    /// The replica is recorded Outdated: the range was marked dirty.
    Skip,
    /// The replica is gone but not yet recorded Outdated: the range was
    /// marked dirty, and the write may not be acknowledged before the
    /// record is made.
    Record,
}

/// One replica's state machine: its recorded state, its link, what it
/// misses. `state` is always what the state store last accepted: it
/// changes only after a successful record.
#[derive(Debug)]
pub struct Track {
    state: ReplicaState,
    connected: bool,
    /// Bumped per connection: a failure of an old link does not touch a new one.
    epoch: u64,
    /// Units the replica misses.
    dirty: DirtyMap,
    /// Units acknowledged by the replica since its last flush (remote
    /// replicas only): a crash of its node can lose them, so they become
    /// dirty when it drops.
    unflushed: Option<DirtyMap>,
    sent_bytes: u64,
    /// Bytes copied by the current resync.
    done_bytes: u64,
    /// The current resync goes at its busy pace (see [`Pacer`]).
    yielding: bool,
    /// Bytes compared or copied by every resync so far.
    resynced_bytes: u64,
    /// What the replica holds is unknown (a full resync): compare before
    /// copying, as DRBD's checksum-based resync does.
    unknown: bool,
    /// Its image is the one recorded and nothing since was lost on it, so
    /// what it misses lies in the activity logs (see [`Track::narrow`]).
    narrowable: bool,
}

impl Track {
    /// A replica in recorded state `state` when a mirror opens. Its content
    /// is unknown unless it is in sync: a full resync.
    pub fn new(state: ReplicaState, size: u64, remote: bool) -> Track {
        let mut dirty = DirtyMap::new(size);
        let unknown = state != ReplicaState::InSync;
        if unknown {
            dirty.mark_all();
        }
        Track {
            state,
            connected: !remote,
            epoch: 0,
            dirty,
            unflushed: remote.then(|| DirtyMap::new(size)),
            sent_bytes: 0,
            done_bytes: 0,
            yielding: false,
            resynced_bytes: 0,
            unknown,
            narrowable: true,
        }
    }

    /// A replica whose log an attach that follows an unreleased one could
    /// not read (out of reach, dropped): writes then in flight may differ
    /// on it anywhere its own log says (which is read once it is back).
    pub fn in_doubt(&mut self) {
        self.dirty.mark_all();
        self.unknown = true;
    }

    /// Whether its missed units can be narrowed by the activity logs.
    pub fn narrowable(&self) -> bool {
        self.narrowable && self.unknown
    }

    /// Nothing is cleared from the logs while a replica is out of sync,
    /// and each replica marks an extent before writing it, so all it can
    /// differ in is the extents active in its own log or in those of the
    /// in-sync replicas: keep only those units (`keep`, runs of units).
    /// Returns whether it did (not once its image was replaced or its disk
    /// lost writes).
    pub fn narrow(&mut self, keep: &[(u64, u64)]) -> bool {
        if !self.narrowable() {
            return false;
        }
        self.dirty.keep_only(keep);
        true
    }

    /// Whether the resync must compare before it copies (see `unknown`).
    pub fn content_unknown(&self) -> bool {
        self.unknown
    }

    pub fn state(&self) -> ReplicaState {
        self.state
    }

    pub fn connected(&self) -> bool {
        self.connected
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn dirty(&self) -> &DirtyMap {
        &self.dirty
    }

    pub fn sent_bytes(&self) -> u64 {
        self.sent_bytes
    }

    pub fn resynced_bytes(&self) -> u64 {
        self.resynced_bytes
    }

    /// Holds every acknowledged write and may serve reads.
    pub fn readable(&self) -> bool {
        self.connected && self.state == ReplicaState::InSync
    }

    pub fn receives_writes(&self) -> bool {
        self.connected && matches!(self.state, ReplicaState::InSync | ReplicaState::Resyncing)
    }

    /// Route a write (or discard) of `len` bytes at `offset`.
    pub fn route(&mut self, offset: u64, len: u64) -> Route {
        if self.receives_writes() {
            return Route::Send { epoch: self.epoch };
        }
        self.dirty.mark_bytes(offset, len);
        if self.state == ReplicaState::Outdated {
            Route::Skip
        } else {
            Route::Record
        }
    }

    /// The replica acknowledged a write over the link of `epoch`. If that
    /// link is gone, its unflushed writes already became dirty: so does
    /// this one.
    pub fn acked(&mut self, epoch: u64, offset: u64, len: u64) {
        if let Some(u) = &mut self.unflushed {
            if epoch == self.epoch && self.connected {
                u.mark_bytes(offset, len);
            } else {
                self.dirty.mark_bytes(offset, len);
            }
        }
    }

    /// A flush starts: what it will make durable. Give it back with
    /// [`Track::flush_failed`] if the flush does not succeed.
    pub fn take_unflushed(&mut self) -> Option<DirtyMap> {
        let units = self.dirty.units() * UNIT;
        self.unflushed
            .as_mut()
            .map(|u| std::mem::replace(u, DirtyMap::new(units)))
    }

    /// A flush failed: what it should have made durable is missed.
    pub fn flush_failed(&mut self, taken: &DirtyMap) {
        self.dirty.union(taken);
    }

    /// Mark `offset..offset+len` missed.
    pub fn mark_dirty(&mut self, offset: u64, len: u64) {
        self.dirty.mark_bytes(offset, len);
    }

    /// The link of `epoch` failed. Returns whether this disconnected the
    /// replica (false if that link was already replaced or dropped).
    pub fn lost(&mut self, epoch: u64) -> bool {
        if !self.connected || epoch != self.epoch || self.unflushed.is_none() {
            return false;
        }
        self.connected = false;
        if let Some(u) = &mut self.unflushed {
            self.dirty.union(u);
            u.clear_all();
        }
        true
    }

    /// The local replica's disk failed an IO: it takes no more IO until
    /// reattached ([`Track::connect`]) and resynced, as DRBD detaches a
    /// failing disk. Returns whether this detached it (false for a remote
    /// replica, or one already detached).
    pub fn disk_failed(&mut self) -> bool {
        if self.unflushed.is_some() || !self.connected {
            return false;
        }
        self.connected = false;
        true
    }

    /// Everything is missed (a failed sync may have lost any write; its
    /// image is not the one recorded): not narrowed by the logs.
    pub fn mark_all_dirty(&mut self) {
        self.dirty.mark_all();
        self.unknown = true;
        self.narrowable = false;
    }

    /// Whether the replica is gone (not connected) but not yet recorded
    /// Outdated: nothing may be acknowledged before that record.
    pub fn needs_outdated_record(&self) -> bool {
        self.state != ReplicaState::Outdated && !self.connected
    }

    /// The store accepted `state`.
    pub fn recorded(&mut self, state: ReplicaState) {
        if state == ReplicaState::Resyncing && self.state != ReplicaState::Resyncing {
            self.done_bytes = 0;
            self.yielding = false;
        }
        if state == ReplicaState::InSync {
            self.unknown = false;
            self.narrowable = true;
        }
        self.state = state;
    }

    /// A new link is up; returns its epoch.
    pub fn connect(&mut self) -> u64 {
        self.epoch += 1;
        self.connected = true;
        if let Some(u) = &mut self.unflushed {
            u.clear_all();
        }
        self.epoch
    }

    /// The next run of at most `max` dirty units from `cursor`, taken out
    /// of the map (the caller copies it under a range lock, and gives it
    /// back with [`Track::run_failed`] if the copy fails).
    pub fn take_run(&mut self, cursor: u64, max: u64) -> Option<(u64, u64)> {
        let run = self.dirty.next_run(cursor, max)?;
        self.dirty.clear(run.0, run.1);
        Some(run)
    }

    pub fn run_failed(&mut self, run: (u64, u64)) {
        self.dirty.mark(run.0, run.1);
    }

    /// A run was copied: `bytes` of device, `data_bytes` of them sent as data.
    pub fn run_copied(&mut self, bytes: u64, data_bytes: u64) {
        self.done_bytes += bytes;
        self.resynced_bytes += bytes;
        self.sent_bytes += data_bytes;
    }

    /// The resync over the link of `epoch` may end: nothing is missed.
    pub fn may_finish(&self, epoch: u64) -> bool {
        self.connected
            && epoch == self.epoch
            && self.state == ReplicaState::Resyncing
            && self.dirty.is_empty()
    }

    pub fn progress(&self) -> Option<ResyncProgress> {
        (self.state == ReplicaState::Resyncing).then(|| ResyncProgress {
            done_bytes: self.done_bytes,
            total_bytes: self.done_bytes + self.dirty.bytes(),
            yielding: self.yielding,
        })
    }

    /// Whether the resync now goes at its busy pace.
    pub fn set_yielding(&mut self, yielding: bool) {
        self.yielding = yielding;
    }
}

/// How fast background copying (resync, verification) may go, per
/// replica: at most `max` bytes per second, and at most `busy` while the
/// volume serves its own IO (DRBD's `c-min-rate`: a resync leaves the
/// disks and the network to the application, and takes them all back
/// when it is idle). `None`: no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResyncPace {
    pub max: Option<u64>,
    pub busy: Option<u64>,
}

impl ResyncPace {
    /// The same limit whether the volume is busy or not.
    pub fn fixed(rate: Option<u64>) -> ResyncPace {
        ResyncPace {
            max: rate,
            busy: None,
        }
    }

    fn rate(&self, busy: bool) -> Option<u64> {
        let max = self.max.filter(|&r| r > 0);
        match self.busy.filter(|&r| r > 0) {
            Some(b) if busy => Some(max.map_or(b, |m| m.min(b))),
            _ => max,
        }
    }
}

/// How often a [`Pacer`] looks whether the volume served IO.
const LOOK_EVERY: Duration = Duration::from_millis(100);

/// Keeps background copying at or below the rate of its [`ResyncPace`]:
/// after `bytes` since `start`, wait until `bytes / rate` has passed. The
/// rate is chosen again every [`LOOK_EVERY`], from whether the volume's
/// IO count moved since the last look.
#[derive(Debug)]
pub struct Pacer {
    pace: ResyncPace,
    /// Since when `bytes` count, at the current rate.
    start: Instant,
    bytes: u64,
    busy: bool,
    looked: Instant,
    /// The volume's IO count at the last look.
    ios: u64,
}

impl Pacer {
    /// `ios`: the volume's IO count now.
    pub fn new(pace: ResyncPace, now: Instant, ios: u64) -> Pacer {
        Pacer {
            pace,
            start: now,
            bytes: 0,
            busy: false,
            looked: now,
            ios,
        }
    }

    /// `bytes` more were copied.
    pub fn add(&mut self, bytes: u64) {
        self.bytes += bytes;
    }

    /// Whether the pace is the busy one now.
    pub fn is_busy(&self) -> bool {
        self.busy
    }

    /// How long to wait at `now` before copying more; `ios`: the volume's
    /// IO count now.
    pub fn wait(&mut self, now: Instant, ios: u64) -> Duration {
        if now.saturating_duration_since(self.looked) >= LOOK_EVERY {
            let busy = ios != self.ios;
            (self.looked, self.ios) = (now, ios);
            if busy != self.busy {
                // A new rate counts from now.
                (self.busy, self.start, self.bytes) = (busy, now, 0);
            }
        }
        let Some(rate) = self.pace.rate(self.busy) else {
            return Duration::ZERO;
        };
        let due = Duration::from_secs_f64(self.bytes as f64 / rate as f64);
        due.saturating_sub(now.saturating_duration_since(self.start))
            .min(LOOK_EVERY)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pacer_waits_for_what_the_rate_allows() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let mut p = Pacer::new(ResyncPace::fixed(Some(100 * MIB)), t0, 0);
        assert_eq!(p.wait(t0, 0), Duration::ZERO);
        p.add(50 * MIB);
        // Waits in steps of at most LOOK_EVERY, so that a change of pace
        // is seen.
        assert_eq!(p.wait(t0, 0), LOOK_EVERY);
        assert_eq!(p.wait(ms(420), 0), Duration::from_millis(80));
        assert_eq!(p.wait(ms(1000), 0), Duration::ZERO);
        p.add(150 * MIB);
        assert_eq!(p.wait(ms(1950), 0), Duration::from_millis(50));
        // Unlimited, or a rate of 0: never waits.
        for rate in [None, Some(0)] {
            let mut p = Pacer::new(ResyncPace::fixed(rate), t0, 0);
            p.add(u64::MAX / 2);
            assert_eq!(p.wait(t0, 0), Duration::ZERO);
            assert_eq!(p.wait(ms(500), 7), Duration::ZERO);
        }
    }

    #[test]
    fn pacer_slows_down_while_the_volume_serves_io() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let pace = ResyncPace {
            max: None,
            busy: Some(10 * MIB),
        };
        let mut p = Pacer::new(pace, t0, 5);
        p.add(100 * MIB);
        assert_eq!(p.wait(t0, 9), Duration::ZERO, "idle until the first look");
        // IO seen at the look: 10 MiB/s from there.
        assert_eq!(
            p.wait(ms(100), 9),
            Duration::ZERO,
            "the new rate counts from now"
        );
        assert!(p.is_busy());
        p.add(MIB);
        assert_eq!(p.wait(ms(150), 9), Duration::from_millis(50));
        // The count moves on: still busy, the rate holds.
        assert_eq!(p.wait(ms(200), 12), Duration::ZERO);
        p.add(2 * MIB);
        assert_eq!(p.wait(ms(250), 12), LOOK_EVERY);
        // No IO since the last look: as fast as it goes again.
        assert_eq!(p.wait(ms(300), 12), Duration::ZERO);
        assert!(!p.is_busy());
        p.add(500 * MIB);
        assert_eq!(p.wait(ms(301), 30), Duration::ZERO);

        // A cap below the busy rate applies when busy too.
        let pace = ResyncPace {
            max: Some(MIB),
            busy: Some(10 * MIB),
        };
        assert_eq!(pace.rate(true), Some(MIB));
        assert_eq!(pace.rate(false), Some(MIB));
        let pace = ResyncPace {
            max: Some(100 * MIB),
            busy: Some(0),
        };
        assert_eq!(pace.rate(true), Some(100 * MIB), "busy 0: no back-off");
    }

    const MIB: u64 = 1 << 20;

    fn set_units(m: &DirtyMap) -> Vec<u64> {
        (0..m.units()).filter(|&u| m.contains(u)).collect()
    }

    #[test]
    fn span_covers_partial_units() {
        assert_eq!(unit_span(0, 4096), (0, 1));
        assert_eq!(unit_span(1, 4096), (0, 2));
        assert_eq!(unit_span(4095, 2), (0, 2));
        assert_eq!(unit_span(8192, 1), (2, 3));
        assert_eq!(unit_span(8192, 0), (2, 2));
    }

    #[test]
    fn mark_clear_count() {
        let mut m = DirtyMap::new(10 * UNIT);
        assert!(m.is_empty());
        m.mark_bytes(100, 5000);
        assert_eq!(set_units(&m), vec![0, 1]);
        m.mark(1, 4);
        assert_eq!(m.count(), 4);
        assert_eq!(m.bytes(), 4 * UNIT);
        m.clear(0, 2);
        assert_eq!(set_units(&m), vec![2, 3]);
        m.mark(8, 100); // clamped to the device
        assert_eq!(set_units(&m), vec![2, 3, 8, 9]);
        assert!(!m.contains(10));
        m.clear_all();
        assert!(m.is_empty());
        assert_eq!(m.next_run(0, 10), None);
    }

    #[test]
    fn full_chunks_and_partial_last_chunk() {
        // Two chunks and a bit: the last one is partial.
        let units = 2 * CHUNK_UNITS + 100;
        let mut m = DirtyMap::new(units * UNIT);
        m.mark_all();
        assert_eq!(m.count(), units);
        assert!(m.contains(units - 1));
        // Clearing inside a full chunk keeps the rest.
        m.clear(CHUNK_UNITS + 5, CHUNK_UNITS + 7);
        assert_eq!(m.count(), units - 2);
        assert!(!m.contains(CHUNK_UNITS + 5));
        assert!(m.contains(CHUNK_UNITS + 7));
        // Filling it again makes it full.
        m.mark(CHUNK_UNITS + 5, CHUNK_UNITS + 7);
        assert_eq!(m.count(), units);
        m.clear(0, units);
        assert!(m.is_empty());
        assert!(m.chunks.is_empty());
    }

    #[test]
    fn word_boundaries() {
        let mut m = DirtyMap::new(MIB * 4);
        m.mark(60, 200);
        assert_eq!(m.count(), 140);
        m.clear(63, 129);
        assert_eq!(m.count(), 140 - 66);
        assert!(m.contains(62) && !m.contains(63) && !m.contains(128) && m.contains(129));
        assert_eq!(m.next_run(0, 1000), Some((60, 63)));
        assert_eq!(m.next_run(63, 1000), Some((129, 200)));
        assert_eq!(m.next_run(129, 10), Some((129, 139)));
    }

    #[test]
    fn next_run_wraps_and_crosses_chunks() {
        let units = 3 * CHUNK_UNITS;
        let mut m = DirtyMap::new(units * UNIT);
        m.mark(CHUNK_UNITS - 3, CHUNK_UNITS + 2);
        m.mark(5, 6);
        assert_eq!(
            m.next_run(10, 256),
            Some((CHUNK_UNITS - 3, CHUNK_UNITS + 2))
        );
        // Past every set unit: wraps to the start.
        assert_eq!(m.next_run(CHUNK_UNITS + 2, 256), Some((5, 6)));
        m.mark_all();
        assert_eq!(m.next_run(units - 1, 256), Some((units - 1, units)));
        assert_eq!(m.next_run(0, 256), Some((0, 256)));
    }

    #[test]
    fn union_adds_every_unit() {
        let units = 2 * CHUNK_UNITS;
        let mut a = DirtyMap::new(units * UNIT);
        let mut b = DirtyMap::new(units * UNIT);
        a.mark(0, 3);
        b.mark(2, 70);
        b.mark(127, 129);
        b.mark(CHUNK_UNITS, 2 * CHUNK_UNITS);
        a.union(&b);
        let mut want: Vec<u64> = (0..70).collect();
        want.extend([127, 128]);
        want.extend(CHUNK_UNITS..2 * CHUNK_UNITS);
        assert_eq!(set_units(&a), want);
        assert_eq!(a.count(), want.len() as u64);
        // Full word of bits.
        let mut c = DirtyMap::new(units * UNIT);
        let mut d = DirtyMap::new(units * UNIT);
        d.mark(64, 128);
        c.union(&d);
        assert_eq!(set_units(&c), (64..128).collect::<Vec<_>>());
    }

    #[test]
    fn in_sync_replica_routes_and_tracks_unflushed() {
        let mut t = Track::new(ReplicaState::InSync, 16 * UNIT, true);
        assert!(!t.connected());
        assert!(t.dirty().is_empty());
        // Not connected yet, recorded in sync: must be recorded first.
        assert_eq!(t.route(0, 4096), Route::Record);
        assert_eq!(t.dirty().count(), 1);
        t.recorded(ReplicaState::Outdated);
        assert_eq!(t.route(4096, 4096), Route::Skip);
        assert_eq!(t.dirty().count(), 2);
        let e = t.connect();
        // Connected but outdated: still missed until it resyncs.
        assert_eq!(t.route(8192, 1), Route::Skip);
        t.recorded(ReplicaState::Resyncing);
        assert_eq!(t.route(8192, 1), Route::Send { epoch: e });
        assert!(!t.may_finish(e));
        while let Some(run) = t.take_run(0, 2) {
            t.run_copied((run.1 - run.0) * UNIT, (run.1 - run.0) * UNIT);
        }
        assert_eq!(
            t.progress(),
            Some(ResyncProgress {
                done_bytes: 3 * UNIT,
                total_bytes: 3 * UNIT,
                yielding: false,
            })
        );
        assert_eq!(t.sent_bytes(), 3 * UNIT);
        assert!(t.may_finish(e));
        assert!(!t.may_finish(e + 1));
        t.recorded(ReplicaState::InSync);
        assert_eq!(t.progress(), None);
        assert!(t.readable());

        // Acknowledged but unflushed writes become dirty when it drops.
        t.acked(e, 0, 8192);
        let taken = t.take_unflushed().unwrap();
        assert_eq!(taken.count(), 2);
        t.acked(e, 12 * 4096, 4096);
        t.flush_failed(&taken);
        assert_eq!(t.dirty().count(), 2);
        assert!(t.lost(e));
        assert!(!t.lost(e), "a second failure of the same link is not new");
        assert_eq!(
            (0..16)
                .filter(|&u| t.dirty().contains(u))
                .collect::<Vec<_>>(),
            vec![0, 1, 12]
        );
        assert!(t.needs_outdated_record());
        assert_eq!(t.route(0, 1), Route::Record);
        // After a drop, a late ack of that link marks dirty.
        t.acked(e, 5 * 4096, 1);
        assert!(t.dirty().contains(5));
        t.recorded(ReplicaState::Outdated);
        assert!(!t.needs_outdated_record());
        // A failure of an older link does not drop a newer one, nor
        // needs a record.
        let e2 = t.connect();
        assert!(!t.lost(e));
        assert!(t.connected());
        t.recorded(ReplicaState::Resyncing);
        assert!(!t.needs_outdated_record());
        assert!(t.lost(e2));
        assert!(t.needs_outdated_record());
    }

    #[test]
    fn what_a_replica_misses_is_narrowed_to_the_logged_units() {
        let mut m = DirtyMap::new(5000 * UNIT);
        m.mark_all();
        m.keep_only(&[(10, 20), (1000, 3000), (4990, 6000)]);
        assert_eq!(m.count(), 10 + 2000 + 10);
        assert!(m.contains(10) && m.contains(19) && !m.contains(20) && !m.contains(9));
        assert!(m.contains(1000) && m.contains(2999) && !m.contains(3000));
        assert!(m.contains(4999));
        m.keep_only(&[]);
        assert!(m.is_empty());

        // An outdated replica met with its recorded image: narrowed, and
        // again after a reconnect; a full resync still compares first.
        let mut t = Track::new(ReplicaState::Outdated, 64 * UNIT, true);
        assert!(t.narrowable());
        assert!(t.narrow(&[(4, 8)]));
        assert_eq!(t.dirty().count(), 4);
        assert!(t.content_unknown());
        // Another image, or a disk that lost writes: not narrowed.
        t.mark_all_dirty();
        assert!(!t.narrowable());
        assert!(!t.narrow(&[(4, 8)]));
        assert_eq!(t.dirty().count(), 64);
        // Once in sync, later doubts may be narrowed again.
        t.connect();
        t.recorded(ReplicaState::InSync);
        assert!(!t.narrowable(), "nothing to narrow");
        t.in_doubt();
        assert_eq!(t.dirty().count(), 64);
        assert!(t.narrow(&[(0, 1)]));
        assert_eq!(t.dirty().count(), 1);
    }

    #[test]
    fn outdated_at_open_needs_a_full_resync() {
        let mut t = Track::new(ReplicaState::Outdated, 8 * UNIT, true);
        assert_eq!(t.dirty().count(), 8);
        let e = t.connect();
        t.recorded(ReplicaState::Resyncing);
        let run = t.take_run(0, 5).unwrap();
        assert_eq!(run, (0, 5));
        assert_eq!(
            t.progress(),
            Some(ResyncProgress {
                done_bytes: 0,
                total_bytes: 3 * UNIT,
                yielding: false,
            })
        );
        t.run_failed(run);
        assert_eq!(t.dirty().count(), 8);
        assert!(!t.may_finish(e));
        // Acks of an old link are not unflushed on the new one: dirty.
        let run = t.take_run(0, 8).unwrap();
        assert_eq!(run, (0, 8));
        t.acked(e - 1, 0, 4096);
        assert_eq!(t.take_unflushed().unwrap().count(), 0);
        assert_eq!(t.dirty().count(), 1);
    }

    #[test]
    fn content_is_unknown_from_a_full_resync_until_in_sync() {
        let mut t = Track::new(ReplicaState::Outdated, 8 * UNIT, true);
        assert!(t.content_unknown());
        t.recorded(ReplicaState::Resyncing);
        assert!(t.content_unknown());
        t.recorded(ReplicaState::InSync);
        assert!(!t.content_unknown());
        t.mark_dirty(0, 10);
        assert!(!t.content_unknown(), "known writes missed: copy them");
        t.mark_all_dirty();
        assert!(t.content_unknown());
        assert!(!Track::new(ReplicaState::InSync, 8 * UNIT, true).content_unknown());
    }

    #[test]
    fn local_replica_detaches_on_a_disk_error_until_reattached() {
        let mut t = Track::new(ReplicaState::InSync, 8 * UNIT, false);
        assert!(t.disk_failed());
        assert!(!t.disk_failed(), "already detached");
        assert!(!t.readable() && !t.receives_writes());
        assert!(t.needs_outdated_record());
        assert_eq!(t.route(UNIT, 10), Route::Record);
        t.recorded(ReplicaState::Outdated);
        assert_eq!(t.route(3 * UNIT, 10), Route::Skip);
        assert_eq!(t.dirty().count(), 2);
        t.mark_all_dirty();
        assert_eq!(t.dirty().count(), 8);
        t.connect();
        assert!(
            t.connected() && !t.readable(),
            "back, but behind until resynced"
        );
        // A remote replica loses links, never its disk.
        let mut r = Track::new(ReplicaState::InSync, 8 * UNIT, true);
        r.connect();
        assert!(!r.disk_failed());
        assert!(r.connected());
    }

    #[test]
    fn local_replica_has_no_link_to_lose() {
        let mut t = Track::new(ReplicaState::InSync, 8 * UNIT, false);
        assert!(t.readable());
        assert_eq!(t.route(0, 4096), Route::Send { epoch: 0 });
        t.acked(0, 0, 4096);
        assert!(t.take_unflushed().is_none());
        assert!(!t.lost(0), "a local replica has no link to lose");
        let t = Track::new(ReplicaState::Outdated, 8 * UNIT, false);
        assert!(!t.readable() && !t.receives_writes());
    }
}

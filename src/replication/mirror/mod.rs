//! The attached node's engine for a replicated volume: every write goes to
//! the local replica (if any) and to every peer in parallel, and is
//! acknowledged only when every in-sync replica holds it (DRBD's protocol
//! C). A peer that fails is recorded Outdated in the state store *before*
//! anything more is acknowledged, and what it misses is tracked in a dirty
//! map; a background thread per replica reconnects it and copies the dirty
//! units over (resync) under range locks, then records it in sync again.
//!
//! Fencing: every request carries the attach generation; a replica that
//! has seen a newer one refuses, and the mirror then refuses all IO. So does
//! a state store that cannot record a failure: no acknowledgement leaves
//! without every in-sync replica holding the write or a recorded Outdated.
//!
//! This file holds the types and the public face; the rest is split by
//! concern, each an `impl` block over the same private state: `open.rs`
//! (the attach: which replicas to trust), `io.rs` (the data path),
//! `resync.rs` (a replica's background thread), `verify.rs` (the
//! comparison after an unreleased attach), `logs.rs` (activity log
//! upkeep) and `snapshot.rs`.

use super::activity::{self, Hot, EXTENT};
use super::link::{CallError, Callback, Link, Reply};
use super::local::{check_volume_id, LocalReplica, ReplicaBase};
use super::ranges::{OwnedRange, RangeLocks};
use super::state::{unit_span, Pacer, ReplicaStatus, ResyncPace, Route, Track, UNIT};
use super::wire::{ErrorCode, Hello, Request};
use super::{Generation, Incarnation, ReplicaState, ReplicationError, StateStore};
use crate::engine::{is_zero, BlockEngine, EngineError, ThinParams, WriteDone};
use crossbeam_channel::{Receiver, Sender};
use parking_lot::{Condvar, Mutex, RwLock};
use sha2::{Digest, Sha256};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

mod io;
mod logs;
mod open;
mod resync;
mod snapshot;
mod verify;

use io::ReadError;
use open::activate_all;

/// Longest pause between reconnect attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(1);
const MIN_BACKOFF: Duration = Duration::from_millis(50);
/// Largest run of dirty units one resync request copies (1 MiB).
const MAX_RUN_UNITS: u64 = 256;
/// Largest read sent to a peer in one request.
const MAX_READ: usize = 4 << 20;
/// Largest write replicated as one request (larger ones are split).
const MAX_WRITE: usize = 8 << 20;
/// What a verification compares at once (under a range lock).
const VERIFY_CHUNK: u64 = 1 << 20;

/// A peer holding a replica of the volume.
#[derive(Debug, Clone)]
pub struct PeerSpec {
    pub node: String,
    pub addr: SocketAddr,
    /// Its state as the cluster recorded it.
    pub state: ReplicaState,
    /// The incarnation the cluster recorded for it (`None`: never seen).
    pub incarnation: Option<Incarnation>,
}

/// The replicas a snapshot was taken on: each node and the incarnation
/// recorded for it then (`None`: none was).
pub type TakenFrom = Vec<(String, Option<Incarnation>)>;

/// What [`Mirror::open`] needs.
pub struct MirrorConfig {
    pub volume_id: String,
    /// The volume's name (for messages).
    pub volume: String,
    /// This node.
    pub node: String,
    pub generation: Generation,
    pub params: ThinParams,
    /// This node's replica, from [`super::LocalReplicas::open`]; `None`
    /// for a diskless attach.
    pub local: Option<Arc<LocalReplica>>,
    /// The local replica's recorded state and incarnation (ignored
    /// without one).
    pub local_state: ReplicaState,
    pub local_incarnation: Option<Incarnation>,
    /// The last attach ended without a release (its node was killed or cut
    /// off): compare the in-sync replicas in the background and repair
    /// where they differ (see [`Mirror::verification`]).
    pub verify: bool,
    /// How fast a resync or verification may copy or compare, per replica.
    pub resync: ResyncPace,
    pub peers: Vec<PeerSpec>,
    /// A clone's base: peers make their absent replicas clones of it.
    pub base: Option<ReplicaBase>,
    pub states: Arc<dyn StateStore>,
    /// How long a peer may take to answer one request (and to connect).
    pub io_timeout: Duration,
    /// Extents the replicas' activity logs keep active at most
    /// ([`activity::HOT_MAX`]; tests use fewer).
    pub hot_extents: u64,
    /// The generation of the last attach that reached every replica then
    /// in sync ([`StateStore::reached`]; 0: none recorded). An in-sync
    /// replica that has seen an older one was rolled back.
    pub reached: Generation,
}

/// Where a replica added to a running mirror lives.
pub enum NewReplica {
    /// This node's, from [`super::LocalReplicas::open`].
    Local(Arc<LocalReplica>),
    Remote(SocketAddr),
}

/// [`BlockEngine::io_parallelism`] of a mirror with a replica elsewhere.
const REMOTE_IO_PARALLELISM: usize = 8;

enum Endpoint {
    Local(Arc<LocalReplica>),
    Remote(SocketAddr),
}

struct Cell {
    track: Track,
    link: Option<Arc<Link>>,
    /// The incarnation recorded for it (`None`: not yet).
    incarnation: Option<Incarnation>,
    /// Writes and flushes routed to this replica and not yet settled.
    inflight: u64,
}

struct Replica {
    node: String,
    endpoint: Endpoint,
    cell: Mutex<Cell>,
    /// Signalled when `inflight` drops to 0.
    settled: Condvar,
    /// Serializes records of this replica's state in the store.
    transition: Mutex<()>,
    /// Taken out of the mirror (`dunnage replica rm`): its thread ends,
    /// and a late failure of a write to it records nothing.
    removed: AtomicBool,
    wake_tx: Sender<()>,
    wake_rx: Receiver<()>,
}

/// The mirror's replicas as one write sees them (the set can change while
/// it is attached: `dunnage replica add/rm`).
type Replicas = Arc<[Arc<Replica>]>;

impl Replica {
    fn is_local(&self) -> bool {
        matches!(self.endpoint, Endpoint::Local(_))
    }

    fn local(&self) -> Option<&Arc<LocalReplica>> {
        match &self.endpoint {
            Endpoint::Local(l) => Some(l),
            Endpoint::Remote(_) => None,
        }
    }

    fn is_removed(&self) -> bool {
        self.removed.load(Ordering::SeqCst)
    }

    /// Wake its background thread.
    fn wake(&self) {
        let _ = self.wake_tx.try_send(());
    }

    /// Sleep up to `d`, or until woken.
    fn sleep(&self, d: Duration) {
        let _ = self.wake_rx.recv_timeout(d);
    }
}

struct Inner {
    volume_id: String,
    volume: String,
    generation: Generation,
    size: u64,
    io_timeout: Duration,
    hello: Hello,
    /// The local replica (if any) first. Replaced whole when a replica is
    /// added or removed; each IO works on the set it read.
    replicas: RwLock<Replicas>,
    states: Arc<dyn StateStore>,
    ranges: Arc<RangeLocks>,
    /// Writes and discards between their begin and end.
    writes: Arc<AtomicUsize>,
    fenced: AtomicBool,
    closed: AtomicBool,
    verification: Mutex<Option<Verification>>,
    resync: ResyncPace,
    /// Reads, writes, discards and flushes the volume asked for (not the
    /// resync's own): a moving count slows resyncs down ([`Pacer`]).
    app_ios: AtomicU64,
    /// The extents this attach's writes made active in the replicas'
    /// activity logs (see [`Inner::keep_activity`]).
    hot: Hot,
    /// Wakes [`Inner::keep_activity`] (a flush found too many active, a
    /// replica came in sync).
    nudge: (Sender<()>, Receiver<()>),
    /// A replica came in sync: its resync's copies made extents active
    /// that no write of this attach did.
    resweep: AtomicBool,
    /// Clears of the activity logs so far (their stamps' count).
    clears: AtomicU64,
}

/// What a mirror's background thread does.
#[derive(Clone, Copy)]
enum Job<'a> {
    /// Connect, resync and reconnect this replica.
    Replica(&'a Arc<Replica>),
    /// Compare the replicas after an unreleased attach.
    Verify,
    /// Keep the replicas' activity logs short.
    Activity,
}

/// Progress of a comparison of the in-sync replicas: after an attach
/// that ended unreleased, or asked for (`dunnage volume verify`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Verification {
    pub done_bytes: u64,
    pub total_bytes: u64,
    /// Bytes found different on some replica and copied to it.
    pub repaired_bytes: u64,
    pub finished: bool,
    /// Asked for: the whole device, not the extents the logs name.
    #[serde(default)]
    pub requested: bool,
}

/// Why a background step stopped.
enum Stop {
    /// The mirror is fenced or closed: nothing more to do.
    Done,
    /// Try again after a pause.
    Retry(String),
}

/// A replicated volume's engine. See the module doc.
pub struct Mirror {
    inner: Arc<Inner>,
    /// Background threads. Its lock also serializes replica adds and removes.
    workers: Mutex<Vec<Worker>>,
}

/// A background thread and the replica it serves (`None`: the verification).
type Worker = (Option<Arc<Replica>>, JoinHandle<()>);

impl std::fmt::Debug for Mirror {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mirror")
            .field("volume", &self.inner.volume)
            .field("generation", &self.inner.generation)
            .finish()
    }
}

/// Settles the replicas a write or flush was routed to, however it ends.
struct Inflight {
    replicas: Vec<Arc<Replica>>,
}

impl Drop for Inflight {
    fn drop(&mut self) {
        for r in &self.replicas {
            let mut cell = r.cell.lock();
            cell.inflight -= 1;
            if cell.inflight == 0 {
                r.settled.notify_all();
            }
        }
    }
}

#[derive(Clone, Copy)]
enum WriteOp<'a> {
    Write(&'a [u8]),
    Discard(u64),
}

impl WriteOp<'_> {
    fn len(&self) -> u64 {
        match self {
            WriteOp::Write(b) => b.len() as u64,
            WriteOp::Discard(n) => *n,
        }
    }
}

/// What a replica's incarnation says about it, against the recorded one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Met {
    /// The image the cluster knows.
    Known,
    /// None was recorded (a new volume's or a new replica's first
    /// contact): record this one, trust the recorded state.
    First,
    /// Another image: its files were lost (a wiped data dir, a new disk)
    /// and it was made again empty. It holds none of what it was recorded
    /// to hold: outdated, and everything is to copy.
    Replaced,
}

fn meet(recorded: Option<Incarnation>, seen: Incarnation) -> Met {
    match recorded {
        Some(r) if r == seen => Met::Known,
        Some(_) => Met::Replaced,
        None => Met::First,
    }
}

/// How long a peer may take to answer a Hello: it may have to open a big
/// image first (rebuilding its free-block set), which an IO timeout does
/// not allow for.
fn handshake_timeout(io_timeout: Duration) -> Duration {
    io_timeout.max(Duration::from_secs(30))
}

impl Mirror {
    /// Every replica: state, link, resync progress.
    pub fn status(&self) -> Vec<ReplicaStatus> {
        self.inner
            .set()
            .iter()
            .map(|r| {
                let cell = r.cell.lock();
                ReplicaStatus {
                    node: r.node.clone(),
                    local: r.is_local(),
                    state: cell.track.state(),
                    connected: cell.track.connected(),
                    resync: cell.track.progress(),
                    resync_sent_bytes: cell.track.sent_bytes(),
                    resynced_bytes: cell.track.resynced_bytes(),
                }
            })
            .collect()
    }

    /// The comparison of the replicas after an unreleased attach, if this
    /// attach runs one.
    pub fn verification(&self) -> Option<Verification> {
        *self.inner.verification.lock()
    }

    /// Take snapshot `name` on every replica at one point of the write
    /// stream: no write runs while it is taken, and every write
    /// acknowledged before is in it on each replica. Refused unless every
    /// replica is in sync and reachable (a replica missing it could not
    /// get it later); if a replica fails, the others' are deleted again.
    /// Returns each replica's node and the incarnation recorded for it
    /// then, for the record of the snapshot to be held to
    /// (`Cluster::record_snapshot`).
    pub fn snapshot(&self, name: &str) -> Result<TakenFrom, ReplicationError> {
        self.inner.snapshot(name)
    }

    /// The volume is detached cleanly (its export is gone): flush and
    /// clear the replicas' activity logs if all are in sync, so that an
    /// unreleased attach later compares only what is written from then on.
    pub fn settle(&self) {
        self.inner.settle()
    }

    /// Delete snapshot `name` on every replica (those without it are
    /// fine). Refused unless every replica is reachable.
    pub fn delete_snapshot(&self, name: &str) -> Result<(), ReplicationError> {
        self.inner.delete_snapshot(name)
    }

    /// Add `node`'s replica while the volume is in use (`dunnage replica
    /// add`). The caller has recorded it Outdated. It starts with every unit
    /// to copy; its thread connects it and resyncs it in the background,
    /// comparing first, so what it already holds is not sent. A write
    /// running now does not reach it, and needs not: its resync takes each
    /// range under the range lock, after the writes to it.
    pub fn add_replica(&self, node: &str, at: NewReplica) -> Result<(), ReplicationError> {
        let inner = &self.inner;
        let refused = |why: String| ReplicationError::Membership {
            op: "add",
            volume: inner.volume.clone(),
            node: node.to_string(),
            why,
        };
        let mut workers = self.workers.lock();
        inner.check_open().map_err(ReplicationError::Engine)?;
        let set = inner.set();
        if set.iter().any(|r| r.node == node) {
            return Err(refused("it holds one already".into()));
        }
        let (endpoint, remote) = match at {
            NewReplica::Remote(addr) => (Endpoint::Remote(addr), true),
            NewReplica::Local(l) => {
                if set.iter().any(|r| r.is_local()) {
                    return Err(refused("this node's replica is open already".into()));
                }
                let have = l.params();
                if l.volume_id() != inner.volume_id || have.size != inner.size {
                    return Err(refused(format!(
                        "the replica opened ({} of {} bytes) is not this volume's",
                        l.volume_id(),
                        have.size
                    )));
                }
                l.advance(inner.generation)?;
                (Endpoint::Local(l), false)
            }
        };
        // A peer's is recorded when its thread connects it (and its log
        // made all active: it is copied whole).
        let incarnation = match &endpoint {
            Endpoint::Local(l) => {
                l.activate_all(inner.generation)?;
                if let Err(e) = inner.states.set_incarnation(node, l.incarnation(), false) {
                    if matches!(e, super::StateStoreError::Fenced { .. }) {
                        inner.fence(&e.to_string());
                    }
                    return Err(e.into());
                }
                Some(l.incarnation())
            }
            Endpoint::Remote(_) => None,
        };
        let mut track = Track::new(ReplicaState::Outdated, inner.size, remote);
        track.mark_all_dirty();
        let r = Arc::new(new_replica(node, endpoint, track, None, incarnation));
        let thread = inner.spawn(Job::Replica(&r))?;
        {
            let mut replicas = inner.replicas.write();
            let mut next: Vec<Arc<Replica>> = replicas.iter().cloned().collect();
            // Reads try the local replica first.
            if r.is_local() {
                next.insert(0, r.clone());
            } else {
                next.push(r.clone());
            }
            *replicas = next.into();
        }
        workers.push((Some(r), thread));
        tracing::info!(volume = %inner.volume, node, "replica added: resyncing it in the background");
        Ok(())
    }

    /// Take `node`'s replica out of the mirror (`dunnage replica rm`):
    /// recorded Outdated first, so that no later attach reads it, then no
    /// IO goes to it. Refused if no other replica is in sync and
    /// reachable, which would leave the volume without its data.
    pub fn remove_replica(&self, node: &str) -> Result<(), ReplicationError> {
        let inner = &self.inner;
        let refused = |why: &str| ReplicationError::Membership {
            op: "remove",
            volume: inner.volume.clone(),
            node: node.to_string(),
            why: why.to_string(),
        };
        let mut workers = self.workers.lock();
        inner.check_open().map_err(ReplicationError::Engine)?;
        // No write in flight while the others are checked and the set
        // changes: one routed before could still fail on every other
        // replica and be acknowledged by this one alone.
        let (s, e) = unit_span(0, inner.size);
        let all = inner.ranges.lock(s, e);
        inner.check_open().map_err(ReplicationError::Engine)?;
        let set = inner.set();
        let Some(r) = set.iter().find(|r| r.node == node).cloned() else {
            return Err(ReplicationError::NotFound(inner.volume.clone()));
        };
        let others_in_sync = set
            .iter()
            .any(|o| !Arc::ptr_eq(o, &r) && o.cell.lock().track.readable());
        if !others_in_sync {
            return Err(refused(
                "no other replica is in sync and reachable: it holds the only current copy of the data. Wait for a resync (`dunnage volume resync`), or add a replica first",
            ));
        }
        {
            let _t = r.transition.lock();
            if let Err(e) = inner.states.set_state(&r.node, ReplicaState::Outdated) {
                if matches!(e, super::StateStoreError::Fenced { .. }) {
                    inner.fence(&e.to_string());
                }
                return Err(e.into());
            }
            r.cell.lock().track.recorded(ReplicaState::Outdated);
            r.removed.store(true, Ordering::SeqCst);
        }
        {
            let mut replicas = inner.replicas.write();
            let next: Vec<Arc<Replica>> = replicas
                .iter()
                .filter(|o| !Arc::ptr_eq(o, &r))
                .cloned()
                .collect();
            *replicas = next.into();
        }
        // Its thread may wait on a range lock, or on its link: free both.
        drop(all);
        if let Some(link) = r.cell.lock().link.take() {
            link.kill();
        }
        r.wake();
        r.settled.notify_all();
        if let Some(at) = workers
            .iter()
            .position(|(o, _)| o.as_ref().is_some_and(|o| Arc::ptr_eq(o, &r)))
        {
            let (_, t) = workers.swap_remove(at);
            let _ = t.join();
        }
        tracing::info!(volume = %inner.volume, node, "replica removed");
        Ok(())
    }

    /// Refuse every further IO (this node lost its claim on the volume).
    pub fn fence(&self) {
        self.inner.fence("fenced by the caller");
    }

    pub fn is_fenced(&self) -> bool {
        self.inner.fenced.load(Ordering::SeqCst)
    }

    /// Stop the background threads and close the links. IO fails after.
    /// Call it after the export stopped and flushed. Idempotent.
    pub fn close(&self) {
        self.inner.closed.store(true, Ordering::SeqCst);
        let _ = self.inner.nudge.0.try_send(());
        let set = self.inner.set();
        for r in set.iter() {
            r.wake();
            r.settled.notify_all();
        }
        let workers = std::mem::take(&mut *self.workers.lock());
        for (_, t) in workers {
            let _ = t.join();
        }
        for r in set.iter() {
            let link = r.cell.lock().link.take();
            if let Some(l) = link {
                l.kill();
            }
        }
    }
}

impl Mirror {
    /// [`Mirror::close`], and let go of the replicas: the local one closes
    /// (and each peer's, once its link ends), so that a mirror opened
    /// again at a grown size grows them. Call it with no IO in flight.
    pub fn release(&self) {
        self.close();
        *self.inner.replicas.write() = Arc::from(Vec::new());
    }
}

impl Drop for Mirror {
    fn drop(&mut self) {
        self.close();
    }
}

fn new_replica(
    node: &str,
    endpoint: Endpoint,
    track: Track,
    link: Option<Arc<Link>>,
    incarnation: Option<Incarnation>,
) -> Replica {
    let (wake_tx, wake_rx) = crossbeam_channel::bounded(1);
    Replica {
        node: node.to_string(),
        endpoint,
        cell: Mutex::new(Cell {
            track,
            link,
            incarnation,
            inflight: 0,
        }),
        settled: Condvar::new(),
        transition: Mutex::new(()),
        removed: AtomicBool::new(false),
        wake_tx,
        wake_rx,
    }
}

impl Inner {
    /// The replicas now.
    fn set(&self) -> Replicas {
        self.replicas.read().clone()
    }

    /// The volume asked for an IO (counted for the resync's [`Pacer`]).
    #[inline]
    fn app_io(&self) {
        self.app_ios.fetch_add(1, Ordering::Relaxed);
    }

    fn app_ios(&self) -> u64 {
        self.app_ios.load(Ordering::Relaxed)
    }

    /// Start a background thread.
    fn spawn(self: &Arc<Self>, job: Job<'_>) -> Result<JoinHandle<()>, ReplicationError> {
        let inner = self.clone();
        let spawned = match job {
            Job::Replica(r) => {
                let r = r.clone();
                std::thread::Builder::new()
                    .name(format!("repl-{}", r.node))
                    .spawn(move || inner.background(&r))
            }
            Job::Verify => std::thread::Builder::new()
                .name("repl-verify".into())
                .spawn(move || inner.verify()),
            Job::Activity => std::thread::Builder::new()
                .name("repl-activity".into())
                .spawn(move || inner.keep_activity()),
        };
        spawned.map_err(|e| ReplicationError::Io {
            op: "spawn a replica thread for",
            path: PathBuf::from(&self.volume),
            source: e,
        })
    }

    fn is_fenced(&self) -> bool {
        self.fenced.load(Ordering::SeqCst)
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    fn fence(&self, why: &str) {
        if !self.fenced.swap(true, Ordering::SeqCst) {
            tracing::warn!(
                volume = %self.volume,
                generation = self.generation,
                why,
                "replicated volume fenced: refusing all IO"
            );
        }
        for r in self.set().iter() {
            r.wake();
        }
    }

    fn error(&self, msg: impl Into<String>) -> EngineError {
        EngineError::Io {
            op: "replicated volume",
            path: PathBuf::from(&self.volume),
            source: std::io::Error::other(msg.into()),
        }
    }

    fn fenced_error(&self) -> EngineError {
        self.error(format!(
            "fenced: generation {} no longer owns volume {} ({}); no IO is accepted",
            self.generation, self.volume, self.volume_id
        ))
    }

    fn check_open(&self) -> Result<(), EngineError> {
        if self.is_fenced() {
            return Err(self.fenced_error());
        }
        if self.is_closed() {
            return Err(self.error("closed"));
        }
        Ok(())
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), EngineError> {
        crate::engine::check_range(offset, len, self.size)
    }

    /// A local replica's error: fencing fences the mirror.
    fn local_error(&self, e: ReplicationError) -> EngineError {
        match e {
            ReplicationError::Fenced { .. } => {
                self.fence(&e.to_string());
                self.fenced_error()
            }
            ReplicationError::Engine(e) => e,
            e => self.error(e.to_string()),
        }
    }
}

/// Split `buf` into runs of whole units that are all zeros or not:
/// (offset in `buf`, range of `buf`, all zeros).
fn zero_segments(buf: &[u8]) -> Vec<(u64, std::ops::Range<usize>, bool)> {
    let mut out: Vec<(u64, std::ops::Range<usize>, bool)> = Vec::new();
    for (k, unit) in buf.chunks(UNIT as usize).enumerate() {
        let start = k * UNIT as usize;
        let zero = is_zero(unit);
        match out.last_mut() {
            Some(last) if last.2 == zero => last.1.end = start + unit.len(),
            _ => out.push((start as u64, start..start + unit.len(), zero)),
        }
    }
    out
}

impl BlockEngine for Mirror {
    fn size(&self) -> u64 {
        self.inner.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), EngineError> {
        self.inner.app_io();
        self.inner.read(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), EngineError> {
        self.inner.app_io();
        if buf.len() <= MAX_WRITE {
            return self.inner.replicate(offset, WriteOp::Write(buf));
        }
        self.inner.check_range(offset, buf.len() as u64)?;
        for (k, chunk) in buf.chunks(MAX_WRITE).enumerate() {
            let at = offset + (k * MAX_WRITE) as u64;
            self.inner.replicate(at, WriteOp::Write(chunk))?;
        }
        Ok(())
    }

    /// With other writes in flight, answered from the thread that reads
    /// the last replica's reply: the FUSE thread goes back to the kernel
    /// for the next request. Alone (queue depth 1), the calling thread
    /// waits and reads the reply itself: no other thread to wake.
    fn write_then(&self, buf: &[u8], offset: u64, done: WriteDone) {
        if buf.len() <= MAX_WRITE && self.inner.writes.load(Ordering::Relaxed) > 0 {
            self.inner.app_io();
            return self.inner.replicate_then(offset, buf, done);
        }
        done(self.write_at(buf, offset))
    }

    fn flush(&self) -> Result<(), EngineError> {
        self.inner.app_io();
        self.inner.flush()
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), EngineError> {
        self.inner.app_io();
        self.inner.replicate(offset, WriteOp::Discard(len))
    }

    /// Each write waits a network round trip: more in flight hide it.
    fn io_parallelism(&self) -> usize {
        if self.inner.set().iter().all(|r| r.is_local()) {
            crate::engine::DEFAULT_IO_PARALLELISM
        } else {
            REMOTE_IO_PARALLELISM
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replica_is_known_by_its_recorded_incarnation() {
        assert_eq!(meet(Some(7), 7), Met::Known);
        // Its files were lost and made again: whatever it holds, even
        // nothing, as a new volume's would.
        assert_eq!(meet(Some(7), 8), Met::Replaced);
        // Nothing recorded yet: a new volume, a new replica.
        assert_eq!(meet(None, 8), Met::First);
    }

    #[test]
    fn runs_split_into_zero_and_data_segments() {
        let u = UNIT as usize;
        let mut buf = vec![0u8; 5 * u + 100];
        buf[u + 7] = 1;
        buf[2 * u] = 1;
        buf[5 * u + 99] = 1;
        assert_eq!(
            zero_segments(&buf),
            vec![
                (0, 0..u, true),
                (u as u64, u..3 * u, false),
                (3 * u as u64, 3 * u..5 * u, true),
                (5 * u as u64, 5 * u..5 * u + 100, false),
            ]
        );
        assert_eq!(zero_segments(&[]), vec![]);
        assert!(is_zero(&[0; 13]) && !is_zero(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]));
    }
}

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

use super::activity::{self, Hot, EXTENT};
use super::link::{CallError, Link, Reply};
use super::local::{check_volume_id, LocalReplica, ReplicaBase};
use super::ranges::RangeLocks;
use super::state::{unit_span, Pacer, ReplicaStatus, Route, Track, UNIT};
use super::wire::{ErrorCode, Hello, Request};
use super::{Generation, Incarnation, ReplicaState, ReplicationError, StateStore};
use crate::engine::{BlockEngine, EngineError, ThinParams};
use crossbeam_channel::{Receiver, Sender};
use parking_lot::{Condvar, Mutex, RwLock};
use sha2::{Digest, Sha256};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

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
    /// Bytes per second a resync or verification may copy or compare, per
    /// replica; `None`: as fast as it goes.
    pub resync_rate: Option<u64>,
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
    ranges: RangeLocks,
    fenced: AtomicBool,
    closed: AtomicBool,
    verification: Mutex<Option<Verification>>,
    resync_rate: Option<u64>,
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

/// Progress of the comparison of the in-sync replicas after an attach
/// that ended unreleased.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Verification {
    pub done_bytes: u64,
    pub total_bytes: u64,
    /// Bytes found different on some replica and copied to it.
    pub repaired_bytes: u64,
    pub finished: bool,
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

fn is_zero(buf: &[u8]) -> bool {
    // Word-wise: the resync scans whole runs.
    let mut chunks = buf.chunks_exact(8);
    chunks.all(|c| u64::from_ne_bytes(c.try_into().unwrap()) == 0)
        && chunks.remainder().iter().all(|&b| b == 0)
}

impl Mirror {
    /// Connect to the peers and start serving. A peer that cannot be
    /// reached is recorded Outdated and retried in the background. Refused
    /// if no in-sync replica (local, or a peer reached) exists, or if a
    /// replica has seen a newer generation.
    pub fn open(cfg: MirrorConfig) -> Result<Arc<Mirror>, ReplicationError> {
        check_volume_id(&cfg.volume_id)?;
        let size = cfg.params.size;
        if size == 0 || size % UNIT != 0 {
            return Err(ReplicationError::Config(format!(
                "size {size} is not a non-zero multiple of {UNIT}"
            )));
        }
        if cfg.io_timeout.is_zero() {
            return Err(ReplicationError::Config("io_timeout must not be 0".into()));
        }
        if cfg.local.is_none() && cfg.peers.is_empty() {
            return Err(ReplicationError::Config(
                "a mirror needs a local replica or at least one peer".into(),
            ));
        }
        for (i, p) in cfg.peers.iter().enumerate() {
            if p.node == cfg.node || cfg.peers[..i].iter().any(|q| q.node == p.node) {
                return Err(ReplicationError::Config(format!(
                    "peer {} is this node or listed twice",
                    p.node
                )));
            }
        }
        if let Some(local) = &cfg.local {
            let have = local.params();
            if local.volume_id() != cfg.volume_id
                || have.size != size
                || have.block_size != cfg.params.block_size
            {
                return Err(ReplicationError::Config(format!(
                    "the local replica ({} of {} bytes) is not volume {} of {size} bytes",
                    local.volume_id(),
                    have.size,
                    cfg.volume_id
                )));
            }
        }
        let local_prior = cfg.local.as_ref().map_or(0, |l| l.generation());
        if let Some(local) = &cfg.local {
            local.advance(cfg.generation)?;
        }
        let hello = Hello {
            base: cfg.base.clone(),
            ..Hello::new(&cfg.volume_id, cfg.generation, &cfg.node, cfg.params)
        };
        let handshake = handshake_timeout(cfg.io_timeout);

        // Reach every peer at once.
        let links: Vec<Result<Link, ReplicationError>> = std::thread::scope(|s| {
            let handles: Vec<_> = cfg
                .peers
                .iter()
                .map(|p| {
                    // One not in sync is copied whole (Track::new); so is
                    // one met before whose image is gone: a new image meets
                    // as Replaced, outdated before any IO.
                    let hello = Hello {
                        copied_whole: p.state != ReplicaState::InSync || p.incarnation.is_some(),
                        ..hello.clone()
                    };
                    s.spawn(move || {
                        Link::connect(&p.node, p.addr, &hello, cfg.io_timeout, handshake)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("connect thread panicked"))
                .collect()
        });

        // A replica whose image is not the recorded one lost its files:
        // recorded outdated before any IO (then its new incarnation, so
        // that a crash between the two records finds it replaced again).
        // Each reached replica: node, recorded state, incarnation seen, how
        // it meets the record, generation before this attach.
        let met: Vec<(&str, ReplicaState, Incarnation, Met, Generation)> = cfg
            .local
            .as_ref()
            .map(|l| {
                let seen = l.incarnation();
                (
                    cfg.node.as_str(),
                    cfg.local_state,
                    seen,
                    meet(cfg.local_incarnation, seen),
                    local_prior,
                )
            })
            .into_iter()
            .chain(cfg.peers.iter().zip(&links).filter_map(|(p, l)| {
                l.as_ref().ok().map(|l| {
                    let seen = l.incarnation();
                    let met = meet(p.incarnation, seen);
                    (p.node.as_str(), p.state, seen, met, l.prior_generation())
                })
            }))
            .collect();
        // Every attach reaches each in-sync replica or records it outdated
        // before any IO, so an in-sync replica that missed an attach the
        // others had was rolled back: its files restored from a backup, a
        // disk or VM snapshot reverted. Its image is the recorded one, but
        // not its content. The last attach that got through is recorded
        // too: a lone in-sync replica has no other to be compared with.
        let newest = met
            .iter()
            .filter(|m| m.1 == ReplicaState::InSync && m.3 == Met::Known)
            .map(|m| m.4)
            .chain([cfg.reached])
            .max()
            .unwrap_or(0);
        let mut replaced = Vec::new();
        // Why each replica recorded in sync is not, for the error if none is.
        let mut lost = Vec::new();
        let mut whole = Vec::new();
        for &(node, state, seen, met, prior) in &met {
            let rolled_back = state == ReplicaState::InSync && met == Met::Known && prior < newest;
            if met == Met::Replaced || rolled_back {
                if rolled_back {
                    tracing::warn!(volume = %cfg.volume, node, generation = prior, newest,
                        "replica has not seen the last attach the others had (its files were restored from a backup, or its disk rolled back): recording it outdated; it is resynced whole");
                    lost.push(format!(
                        "{node}: it has seen attach generation {prior}, not {newest} (its files were restored from a backup, or its disk rolled back), so it lacks writes"
                    ));
                } else {
                    tracing::warn!(volume = %cfg.volume, node, "replica's image is not the one recorded (its files were lost or replaced): recording it outdated; it is resynced whole");
                    lost.push(format!(
                        "{node}: its image is not the one recorded (its files were lost or replaced)"
                    ));
                }
                if state != ReplicaState::Outdated {
                    cfg.states.set_state(node, ReplicaState::Outdated)?;
                }
                replaced.push(node.to_string());
            }
            // Copied whole: its log must hide nothing once it is recorded.
            if met == Met::Replaced
                || rolled_back
                || (met == Met::First && state != ReplicaState::InSync)
            {
                whole.push(node.to_string());
                let local = cfg.local.as_deref().filter(|_| node == cfg.node);
                let link = cfg
                    .peers
                    .iter()
                    .position(|p| p.node == node)
                    .and_then(|i| links[i].as_ref().ok());
                activate_all(local, link, node, cfg.generation, cfg.io_timeout)?;
            }
            if met != Met::Known {
                cfg.states
                    .set_incarnation(node, seen, met == Met::Replaced)?;
            }
        }
        // The one now recorded: the one seen, else (unreachable) as before.
        let recorded_incarnation = |node: &str, recorded: Option<Incarnation>| {
            met.iter().find(|m| m.0 == node).map(|m| m.2).or(recorded)
        };
        let state_of = |node: &str, state: ReplicaState| {
            if replaced.iter().any(|n| n == node) {
                ReplicaState::Outdated
            } else {
                state
            }
        };

        // Not in sync, and another image than recorded (or none was), or
        // rolled back: what it misses is everything, not what the activity
        // logs name.
        let track = |node: &str, state: ReplicaState, remote: bool| {
            let mut t = Track::new(state, size, remote);
            if state != ReplicaState::InSync && whole.iter().any(|n| n == node) {
                t.mark_all_dirty();
            }
            t
        };

        let mut replicas = Vec::new();
        let mut in_sync = Vec::new();
        if let Some(local) = &cfg.local {
            let state = state_of(&cfg.node, cfg.local_state);
            if state == ReplicaState::InSync {
                in_sync.push(cfg.node.clone());
            }
            replicas.push(new_replica(
                &cfg.node,
                Endpoint::Local(local.clone()),
                track(&cfg.node, state, false),
                None,
                recorded_incarnation(&cfg.node, cfg.local_incarnation),
            ));
        }
        let mut unreachable = Vec::new();
        for (p, link) in cfg.peers.iter().zip(links) {
            let state = state_of(&p.node, p.state);
            let mut track = track(&p.node, state, true);
            let link = match link {
                Ok(l) => {
                    track.connect();
                    if state == ReplicaState::InSync {
                        in_sync.push(p.node.clone());
                    }
                    Some(Arc::new(l))
                }
                Err(ReplicationError::Refused {
                    node,
                    code: ErrorCode::Fenced,
                    message,
                }) => {
                    return Err(ReplicationError::Refused {
                        node,
                        code: ErrorCode::Fenced,
                        message,
                    })
                }
                Err(e) => {
                    tracing::warn!(
                        volume = %cfg.volume,
                        peer = %p.node,
                        error = %e,
                        "replica unreachable at attach"
                    );
                    // Not compared with the others after an unreleased
                    // attach: writes then in flight may differ on it.
                    if cfg.verify && state == ReplicaState::InSync {
                        track.in_doubt();
                    }
                    unreachable.push(format!("{}: {e}", p.node));
                    None
                }
            };
            let incarnation = recorded_incarnation(&p.node, p.incarnation);
            replicas.push(new_replica(
                &p.node,
                Endpoint::Remote(p.addr),
                track,
                link,
                incarnation,
            ));
        }
        if in_sync.is_empty() {
            let mut why = lost;
            why.extend(unreachable);
            let detail = if why.is_empty() {
                "every replica is outdated".to_string()
            } else {
                why.join("; ")
            };
            return Err(ReplicationError::NoInSyncReplica {
                volume: cfg.volume,
                detail,
            });
        }
        // Unreachable peers miss every write from now on: record it first.
        for r in &replicas {
            let mut cell = r.cell.lock();
            if cell.track.needs_outdated_record() {
                cfg.states.set_state(&r.node, ReplicaState::Outdated)?;
                cell.track.recorded(ReplicaState::Outdated);
            }
        }
        // Every replica left in sync has seen this generation now.
        cfg.states.reached()?;

        let inner = Arc::new(Inner {
            volume_id: cfg.volume_id,
            volume: cfg.volume,
            generation: cfg.generation,
            size,
            io_timeout: cfg.io_timeout,
            hello,
            replicas: RwLock::new(replicas.into_iter().map(Arc::new).collect()),
            states: cfg.states,
            ranges: RangeLocks::new(),
            fenced: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            resync_rate: cfg.resync_rate,
            verification: Mutex::new(cfg.verify.then(|| Verification {
                total_bytes: size,
                ..Verification::default()
            })),
            hot: Hot::new(size, cfg.hot_extents),
            nudge: crossbeam_channel::bounded(1),
            resweep: AtomicBool::new(false),
            clears: AtomicU64::new(0),
        });
        let mut workers = Vec::new();
        let set = inner.set();
        let jobs = set
            .iter()
            .map(Job::Replica)
            .chain(cfg.verify.then_some(Job::Verify))
            .chain([Job::Activity]);
        for job in jobs {
            match inner.spawn(job) {
                Ok(t) => {
                    let r = match job {
                        Job::Replica(r) => Some(r.clone()),
                        _ => None,
                    };
                    workers.push((r, t))
                }
                Err(e) => {
                    inner.closed.store(true, Ordering::SeqCst);
                    for r in set.iter() {
                        r.wake();
                    }
                    for (_, t) in workers {
                        let _ = t.join();
                    }
                    return Err(e);
                }
            }
        }
        tracing::info!(
            volume = %inner.volume,
            generation = inner.generation,
            in_sync = ?in_sync,
            "replicated volume open"
        );
        if cfg.verify {
            tracing::warn!(volume = %inner.volume,
                "the last attach ended unreleased (its node was killed or cut off): comparing the replicas in the background");
        }
        Ok(Arc::new(Mirror {
            inner,
            workers: Mutex::new(workers),
        }))
    }

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
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(EngineError::OutOfRange {
                offset,
                len,
                size: self.size,
            }),
        }
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

    /// Replica `i` failed (its link of `epoch` if given, else it is known
    /// gone): `mark` what it missed, drop the link, and record it Outdated
    /// unless it is already. Fails (and fences the mirror) if the record
    /// cannot be made: then nothing may be acknowledged.
    fn replica_failed(
        &self,
        r: &Replica,
        epoch: Option<u64>,
        mark: impl FnOnce(&mut Track),
    ) -> Result<(), EngineError> {
        let _t = r.transition.lock();
        if r.is_removed() {
            // No longer one of the volume's replicas: nothing to record.
            if let Some(link) = r.cell.lock().link.take() {
                link.kill();
            }
            return Ok(());
        }
        let (need, dropped) = {
            let mut cell = r.cell.lock();
            mark(&mut cell.track);
            let dropped = match epoch {
                Some(e) if cell.track.lost(e) => cell.link.take(),
                _ => None,
            };
            if r.is_local() && cell.track.disk_failed() {
                tracing::error!(volume = %self.volume, node = %r.node,
                    "local replica detached after a disk error: IO goes on with the peers");
            }
            (cell.track.needs_outdated_record(), dropped)
        };
        if let Some(link) = dropped {
            tracing::warn!(volume = %self.volume, peer = %r.node, "replica dropped");
            link.kill();
        }
        if self.is_fenced() {
            return Err(self.fenced_error());
        }
        if self.is_closed() {
            // Links are cut at close: not a failure of the replica.
            return Err(self.error("closed"));
        }
        if need {
            if let Err(e) = self.states.set_state(&r.node, ReplicaState::Outdated) {
                self.fence(&format!("cannot record replica {} outdated: {e}", r.node));
                return Err(self.fenced_error());
            }
            r.cell.lock().track.recorded(ReplicaState::Outdated);
            tracing::warn!(volume = %self.volume, peer = %r.node, "replica recorded outdated");
        }
        // Its thread reconnects it.
        r.wake();
        Ok(())
    }

    /// A write or discard: to every replica that takes writes, in parallel.
    fn replicate(&self, offset: u64, op: WriteOp<'_>) -> Result<(), EngineError> {
        let len = op.len();
        self.check_open()?;
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let (s, e) = unit_span(offset, len);
        let _range = self.ranges.lock(s, e);
        self.check_open()?;
        self.hot.touch(offset, len);
        let deadline = Instant::now() + self.io_timeout;
        // Read under the range lock: a replica added later starts with
        // everything dirty, and its resync waits for this range.
        let set = self.set();
        let mut inflight = Inflight {
            replicas: Vec::new(),
        };
        let mut local: Option<(&Arc<Replica>, bool)> = None;
        let mut remote = Vec::new();
        let mut record = Vec::new();
        for r in set.iter() {
            let mut cell = r.cell.lock();
            let in_sync = cell.track.state() == ReplicaState::InSync;
            match cell.track.route(offset, len) {
                Route::Send { epoch } => {
                    cell.inflight += 1;
                    inflight.replicas.push(r.clone());
                    if r.is_local() {
                        local = Some((r, in_sync));
                    } else {
                        let link = cell.link.clone();
                        drop(cell);
                        let rx = link.and_then(|l| {
                            match op {
                                WriteOp::Write(buf) => l.submit_write(offset, buf),
                                WriteOp::Discard(n) => {
                                    l.submit(Request::Discard { offset, len: n })
                                }
                            }
                            .ok()
                        });
                        remote.push((r, epoch, in_sync, rx));
                    }
                }
                Route::Skip => {}
                Route::Record => record.push(r),
            }
        }

        let mut held_in_sync = 0;
        let mut fenced = None;
        let mut local_err = None;
        if let Some((r, in_sync)) = local {
            let l = r.local().expect("local replica");
            let res = match op {
                WriteOp::Write(buf) => l.write_at(self.generation, buf, offset),
                WriteOp::Discard(n) => l.discard(self.generation, offset, n),
            };
            match res {
                Ok(()) => held_in_sync += usize::from(in_sync),
                Err(e @ ReplicationError::Fenced { .. }) => fenced = Some(e.to_string()),
                Err(e) => local_err = Some((r, e)),
            }
        }
        let mut failed = Vec::new();
        for (r, epoch, in_sync, rx) in remote {
            let res = match rx {
                Some(rx) => rx.wait(deadline),
                None => Err(CallError::Down),
            };
            match res {
                Ok(Reply::Ok) => {
                    r.cell.lock().track.acked(epoch, offset, len);
                    held_in_sync += usize::from(in_sync);
                }
                Err(e) if e.is_fenced() => fenced = Some(format!("replica {}: {e}", r.node)),
                other => {
                    let why = match other {
                        Err(e) => e.to_string(),
                        Ok(_) => "unexpected reply".into(),
                    };
                    tracing::warn!(
                        volume = %self.volume,
                        peer = %r.node,
                        error = %why,
                        "write to replica failed"
                    );
                    failed.push((r, epoch));
                }
            }
        }
        if let Some(why) = fenced {
            self.fence(&why);
            return Err(self.fenced_error());
        }
        for (r, epoch) in failed {
            self.replica_failed(r, Some(epoch), |t| t.mark_dirty(offset, len))?;
        }
        for r in record {
            self.replica_failed(r, None, |_| {})?;
        }
        if let Some((r, e)) = local_err {
            self.local_failed(r, e, held_in_sync, |t| t.mark_dirty(offset, len))?;
        }
        if held_in_sync == 0 {
            return Err(self.error("no in-sync replica holds the write"));
        }
        Ok(())
    }

    /// The local replica `i` failed an IO with `e` (not fencing). With an
    /// in-sync peer holding the IO (`held_in_sync`), detach it (`mark`
    /// what it missed) and go on, as DRBD does on a disk error; its thread
    /// reattaches and resyncs it. Alone, the error is the IO's.
    fn local_failed(
        &self,
        r: &Replica,
        e: ReplicationError,
        held_in_sync: usize,
        mark: impl FnOnce(&mut Track),
    ) -> Result<(), EngineError> {
        if held_in_sync == 0 || matches!(e, ReplicationError::Fenced { .. }) {
            return Err(self.local_error(e));
        }
        tracing::error!(volume = %self.volume, node = %r.node, error = %e,
            "IO on the local replica failed");
        self.replica_failed(r, None, mark)
    }

    fn snapshot(&self, name: &str) -> Result<TakenFrom, ReplicationError> {
        self.check_open()?;
        let (s, e) = unit_span(0, self.size);
        // Waits for every write in flight and holds off new ones (resync
        // and verification copies included).
        let _all = self.ranges.lock(s, e);
        self.check_open()?;
        if self.verification.lock().is_some_and(|v| !v.finished) {
            // The attached node's mirror runs the comparison: name it.
            return Err(self.snapshot_refused(
                "take",
                name,
                &self.hello.from,
                "still being compared with the others after an attach that ended unreleased (`dunnage volume inspect` shows the verification)",
            ));
        }
        self.snapshot_op("take", name, Request::Snapshot { name: name.into() })
    }

    fn delete_snapshot(&self, name: &str) -> Result<(), ReplicationError> {
        self.check_open()?;
        self.snapshot_op(
            "delete",
            name,
            Request::DeleteSnapshot { name: name.into() },
        )
        .map(drop)
    }

    fn snapshot_refused(
        &self,
        op: &'static str,
        name: &str,
        node: &str,
        why: &str,
    ) -> ReplicationError {
        ReplicationError::SnapshotNeedsAll {
            op,
            volume: self.volume.clone(),
            snapshot: name.into(),
            node: node.into(),
            why: why.into(),
        }
    }

    /// Run a snapshot request on every replica at once; a take that fails
    /// anywhere is undone where it succeeded. A delete that finds no
    /// snapshot on a replica counts as done there.
    fn snapshot_op(
        &self,
        op: &'static str,
        name: &str,
        req: Request,
    ) -> Result<TakenFrom, ReplicationError> {
        let take = matches!(req, Request::Snapshot { .. });
        let set = self.set();
        let mut links = Vec::new();
        let mut taken_from = Vec::new();
        for r in set.iter() {
            let cell = r.cell.lock();
            taken_from.push((r.node.clone(), cell.incarnation));
            let state = cell.track.state();
            if take && state != ReplicaState::InSync {
                return Err(self.snapshot_refused(op, name, &r.node, &state.to_string()));
            }
            if !r.is_local() {
                match &cell.link {
                    Some(l) if cell.track.connected() => links.push((r.node.as_str(), l.clone())),
                    _ => return Err(self.snapshot_refused(op, name, &r.node, "unreachable")),
                }
            }
        }
        // Taking one copies the replica's map: allow for a big one.
        let deadline = Instant::now() + handshake_timeout(self.io_timeout);
        let tickets: Vec<_> = links
            .iter()
            .map(|(node, l)| (*node, l.submit(req.clone())))
            .collect();
        let mut done = Vec::new();
        let mut failed = None;
        if let Some(l) = self.local_replica() {
            let res = if take {
                l.snapshot(self.generation, name)
            } else {
                l.delete_snapshot(self.generation, name)
            };
            match res {
                Ok(()) => done.push(None),
                Err(ReplicationError::Engine(EngineError::NoSuchSnapshot { .. })) if !take => {}
                Err(e) => failed = Some(e),
            }
        }
        for ((node, link), (_, ticket)) in links.iter().zip(tickets) {
            let res = match ticket {
                Ok(t) => t.wait(deadline),
                Err(_) => Err(CallError::Down),
            };
            let err = match res {
                Ok(Reply::Ok) => {
                    done.push(Some(link.clone()));
                    continue;
                }
                Err(CallError::Refused { code, .. }) if code == ErrorCode::NotFound && !take => {
                    continue
                }
                Err(CallError::Refused { code, message }) => ReplicationError::Refused {
                    node: node.to_string(),
                    code,
                    message,
                },
                Ok(_) => {
                    self.snapshot_refused(op, name, node, "answering with an unexpected reply")
                }
                Err(e) => self.snapshot_refused(op, name, node, &format!("not answering ({e})")),
            };
            failed.get_or_insert(err);
        }
        let Some(err) = failed else {
            tracing::info!(volume = %self.volume, snapshot = name, op, "snapshot done on every replica");
            return Ok(taken_from);
        };
        if take {
            // Undo, so that no replica keeps a snapshot the others lack.
            let undo = Request::DeleteSnapshot { name: name.into() };
            for link in done {
                let res =
                    match link {
                        None => self
                            .local_replica()
                            .map_or(Ok(()), |l| l.delete_snapshot(self.generation, name)),
                        Some(l) => l.call(undo.clone(), deadline).map(drop).map_err(|e| {
                            ReplicationError::Io {
                                op: "delete the partial snapshot on",
                                path: PathBuf::from(&self.volume),
                                source: std::io::Error::other(e.to_string()),
                            }
                        }),
                    };
                if let Err(e) = res {
                    tracing::warn!(volume = %self.volume, snapshot = name, error = %e,
                        "could not delete a snapshot that failed on another replica");
                }
            }
        }
        if matches!(
            &err,
            ReplicationError::Fenced { .. }
                | ReplicationError::Refused {
                    code: ErrorCode::Fenced,
                    ..
                }
        ) {
            self.fence("a replica has seen a newer generation");
        }
        Err(err)
    }

    fn local_replica(&self) -> Option<Arc<LocalReplica>> {
        self.set().iter().find_map(|r| r.local().cloned())
    }

    fn flush(&self) -> Result<(), EngineError> {
        self.check_open()?;
        let deadline = Instant::now() + self.io_timeout;
        let set = self.set();
        let mut inflight = Inflight {
            replicas: Vec::new(),
        };
        let mut local = None;
        let mut remote = Vec::new();
        for r in set.iter() {
            let mut cell = r.cell.lock();
            if !cell.track.receives_writes() {
                continue;
            }
            let in_sync = cell.track.state() == ReplicaState::InSync;
            cell.inflight += 1;
            inflight.replicas.push(r.clone());
            if r.is_local() {
                local = Some((r, in_sync));
                continue;
            }
            let epoch = cell.track.epoch();
            let taken = cell.track.take_unflushed();
            let link = cell.link.clone();
            drop(cell);
            let rx = link.and_then(|l| l.submit(Request::Flush).ok());
            remote.push((r, epoch, in_sync, taken, rx));
        }
        let mut held_in_sync = 0;
        let mut fenced = None;
        let mut local_err = None;
        if let Some((r, in_sync)) = local {
            match r.local().expect("local").flush(self.generation) {
                Ok(()) => held_in_sync += usize::from(in_sync),
                Err(e @ ReplicationError::Fenced { .. }) => fenced = Some(e.to_string()),
                Err(e) => local_err = Some((r, e)),
            }
        }
        let mut failed = Vec::new();
        for (r, epoch, in_sync, taken, rx) in remote {
            let res = match rx {
                Some(rx) => rx.wait(deadline),
                None => Err(CallError::Down),
            };
            match res {
                Ok(Reply::Ok) => held_in_sync += usize::from(in_sync),
                Err(e) if e.is_fenced() => fenced = Some(format!("replica {}: {e}", r.node)),
                _ => failed.push((r, epoch, taken)),
            }
        }
        if let Some(why) = fenced {
            self.fence(&why);
            return Err(self.fenced_error());
        }
        for (r, epoch, taken) in failed {
            tracing::warn!(volume = %self.volume, peer = %r.node, "flush of replica failed");
            self.replica_failed(r, Some(epoch), |t| {
                if let Some(taken) = &taken {
                    t.flush_failed(taken);
                }
            })?;
        }
        if let Some((r, e)) = local_err {
            // A failed sync may have lost any write since the last one.
            self.local_failed(r, e, held_in_sync, Track::mark_all_dirty)?;
        }
        if held_in_sync == 0 {
            return Err(self.error("no in-sync replica completed the flush"));
        }
        self.hot.tick();
        if self.hot.over() {
            let _ = self.nudge.0.try_send(());
        }
        Ok(())
    }

    /// Keep the replicas' activity logs to what may differ, so that an
    /// unreleased attach makes the next compare little. Once no comparison
    /// is due (none was, or it is done), clear every extent this attach
    /// has not written (what earlier attaches left; again whenever a
    /// resync brought a replica in sync, its copies marked what they
    /// wrote); then, woken by a flush that finds more than the most
    /// active, the least recently written ones.
    fn keep_activity(&self) {
        let mut swept = false;
        loop {
            if self.is_closed() || self.is_fenced() {
                return;
            }
            let due = self.verification.lock().is_some_and(|v| !v.finished);
            if due || !self.all_in_sync() {
                // The logs say what to compare, or what a replica misses:
                // swept once that is done.
                swept = false;
            } else {
                if !swept || self.resweep.swap(false, Ordering::AcqRel) {
                    for (first, count) in self.hot.cold_runs() {
                        let cold = |hot: &Hot| (first..first + count).all(|e| !hot.is_active(e));
                        if !self.clear_extents(first, count, cold) {
                            return;
                        }
                    }
                    swept = true;
                }
                let tick = self.hot.now();
                for e in self.hot.victims() {
                    if !self.clear_extents(e, 1, |hot| !hot.written_since(e, tick)) {
                        return;
                    }
                }
            }
            let _ = self.nudge.1.recv_timeout(MAX_BACKOFF);
        }
    }

    /// Clear `count` extents from `first` in `r`'s activity log.
    fn deactivate_on(
        &self,
        r: &Replica,
        first: u64,
        count: u64,
        seq: u64,
        deadline: Instant,
    ) -> Result<(), String> {
        if let Some(l) = r.local() {
            return l
                .deactivate(self.generation, first, count, seq)
                .map_err(|e| e.to_string());
        }
        let Some(link) = r.cell.lock().link.clone() else {
            return Err("not connected".into());
        };
        match link.call(Request::Deactivate { first, count, seq }, deadline) {
            Ok(Reply::Ok) => Ok(()),
            Ok(_) => Err("unexpected reply".into()),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Clear `count` extents from `first` in every replica's activity log,
    /// under their range lock: no write to them is in flight, and once
    /// every replica is flushed and in sync they hold the same there,
    /// durably. Skipped unless `still` holds under the lock, and while a
    /// replica is out of sync ([`Inner::all_in_sync`]). False once the
    /// mirror is closed or fenced.
    fn clear_extents(&self, first: u64, count: u64, still: impl Fn(&Hot) -> bool) -> bool {
        if self.is_closed() || self.is_fenced() {
            return false;
        }
        let (start, end) = (first * EXTENT, ((first + count) * EXTENT).min(self.size));
        if start >= end {
            return true;
        }
        let (s, e) = unit_span(start, end - start);
        let _range = self.ranges.lock(s, e);
        if !still(&self.hot) || !self.all_in_sync() {
            return true;
        }
        // A write a replica acknowledged but has not synced would be lost
        // with its node, and then lie in no log.
        if let Err(e) = self.flush() {
            tracing::debug!(volume = %self.volume, error = %e, "activity logs kept: a flush failed");
            return true;
        }
        if !self.all_in_sync() {
            return true;
        }
        let deadline = Instant::now() + self.io_timeout;
        let seq = self.clears.fetch_add(1, Ordering::Relaxed) + 1;
        for r in self.set().iter() {
            if let Err(e) = self.deactivate_on(r, first, count, seq, deadline) {
                tracing::debug!(volume = %self.volume, peer = %r.node, first, count, error = %e,
                    "activity log not cleared there");
            }
        }
        for e in first..first + count {
            self.hot.cleared(e);
        }
        true
    }

    fn read(&self, buf: &mut [u8], offset: u64) -> Result<(), EngineError> {
        self.check_open()?;
        self.check_range(offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        match self.read_from_in_sync(None, buf, offset) {
            Ok(_) => Ok(()),
            Err(ReadError::Engine(e)) => Err(e),
            Err(ReadError::NoSource(why)) => Err(self.error(why)),
        }
    }

    /// Read from an in-sync replica other than `exclude`: the local one if
    /// it is, else a peer (failing replicas are dropped and the next tried).
    /// Returns the replica read.
    fn read_from_in_sync(
        &self,
        exclude: Option<&Replica>,
        buf: &mut [u8],
        offset: u64,
    ) -> Result<Arc<Replica>, ReadError> {
        let set = self.set();
        let excluded = |r: &Replica| exclude.is_some_and(|x| std::ptr::eq(x, r));
        for r in set.iter() {
            if excluded(r) {
                continue;
            }
            let (epoch, link) = {
                let cell = r.cell.lock();
                if !cell.track.readable() {
                    continue;
                }
                (cell.track.epoch(), cell.link.clone())
            };
            if let Endpoint::Local(l) = &r.endpoint {
                let e = match l.read_at(self.generation, buf, offset) {
                    Ok(()) => return Ok(r.clone()),
                    Err(e) => e,
                };
                let others = set.iter().any(|o| {
                    !std::ptr::eq(&**o, &**r) && !excluded(o) && o.cell.lock().track.readable()
                });
                let len = buf.len() as u64;
                self.local_failed(r, e, usize::from(others), |t| t.mark_dirty(offset, len))
                    .map_err(ReadError::Engine)?;
                continue;
            }
            let Some(link) = link else { continue };
            match self.read_remote(&link, buf, offset) {
                Ok(()) => return Ok(r.clone()),
                Err(e) if e.is_fenced() => {
                    self.fence(&format!("replica {}: {e}", r.node));
                    return Err(ReadError::Engine(self.fenced_error()));
                }
                Err(e) => {
                    tracing::warn!(volume = %self.volume, peer = %r.node, error = %e, "read from replica failed");
                    self.replica_failed(r, Some(epoch), |_| {})
                        .map_err(ReadError::Engine)?;
                }
            }
        }
        Err(ReadError::NoSource(
            "no in-sync replica can be read".to_string(),
        ))
    }

    fn read_remote(&self, link: &Link, buf: &mut [u8], offset: u64) -> Result<(), CallError> {
        let deadline = Instant::now() + self.io_timeout;
        let mut done = 0;
        while done < buf.len() {
            let n = (buf.len() - done).min(MAX_READ);
            let req = Request::Read {
                offset: offset + done as u64,
                len: n as u32,
            };
            match link.call(req, deadline)? {
                Reply::Data(d) if d.len() == n => buf[done..done + n].copy_from_slice(&d),
                _ => return Err(CallError::Unexpected),
            }
            done += n;
        }
        Ok(())
    }

    /// The background thread of replica `r`: reconnect it when it drops,
    /// resync it when it is behind.
    fn background(&self, r: &Arc<Replica>) {
        let mut backoff = MIN_BACKOFF;
        // Say it once per outage, not once per attempt.
        let mut warned = false;
        loop {
            if self.is_closed() || r.is_removed() {
                return;
            }
            if self.is_fenced() {
                r.sleep(MAX_BACKOFF);
                continue;
            }
            let (connected, state) = {
                let cell = r.cell.lock();
                (cell.track.connected(), cell.track.state())
            };
            if connected && state == ReplicaState::InSync {
                r.sleep(MAX_BACKOFF);
                continue;
            }
            let step = if connected {
                self.resync(r)
            } else {
                self.reconnect(r)
            };
            match step {
                Ok(()) => {
                    backoff = MIN_BACKOFF;
                    warned = false;
                }
                Err(Stop::Done) => {}
                Err(Stop::Retry(why)) => {
                    if warned {
                        tracing::debug!(volume = %self.volume, peer = %r.node, why, "replica not back yet");
                    } else {
                        tracing::warn!(volume = %self.volume, peer = %r.node, why, "replica not back yet; retrying");
                        warned = true;
                    }
                    r.sleep(backoff);
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    fn reconnect(&self, r: &Replica) -> Result<(), Stop> {
        let Endpoint::Remote(addr) = r.endpoint else {
            // A detached local disk: try it again (resync tells).
            let mut cell = r.cell.lock();
            if !cell.track.connected() && !self.is_closed() {
                cell.track.connect();
                tracing::info!(volume = %self.volume, node = %r.node, "local replica reattached");
            }
            return Ok(());
        };
        // Outdated here (recorded when it dropped, or at open), and an
        // image made for this Hello meets as Replaced or First: all dirty.
        let hello = Hello {
            copied_whole: true,
            ..self.hello.clone()
        };
        let link = match Link::connect(
            &r.node,
            addr,
            &hello,
            self.io_timeout,
            handshake_timeout(self.io_timeout),
        ) {
            Ok(l) => Arc::new(l),
            Err(ReplicationError::Refused {
                code: ErrorCode::Fenced,
                message,
                ..
            }) => {
                self.fence(&format!("replica {}: {message}", r.node));
                return Err(Stop::Done);
            }
            Err(e) => return Err(Stop::Retry(e.to_string())),
        };
        // Another image than before (the node lost its files while away):
        // what it missed is everything, not the dirty map. One never met
        // (a volume from before incarnations; a replica down since its
        // volume was made) is compared whole too: cheap where it holds
        // the data. Recorded before its resync can record it in sync.
        let seen = link.incarnation();
        let met = meet(r.cell.lock().incarnation, seen);
        if met != Met::Known {
            // Copied whole: its log must hide nothing once it is recorded.
            if let Err(e) =
                activate_all(None, Some(&link), &r.node, self.generation, self.io_timeout)
            {
                link.kill();
                if matches!(
                    e,
                    ReplicationError::Refused {
                        code: ErrorCode::Fenced,
                        ..
                    }
                ) {
                    self.fence(&e.to_string());
                    return Err(Stop::Done);
                }
                return Err(Stop::Retry(e.to_string()));
            }
            let _t = r.transition.lock();
            let replaced = met == Met::Replaced;
            if let Err(e) = self.states.set_incarnation(&r.node, seen, replaced) {
                link.kill();
                if matches!(e, super::StateStoreError::Fenced { .. }) {
                    self.fence(&e.to_string());
                    return Err(Stop::Done);
                }
                return Err(Stop::Retry(format!("cannot record its incarnation: {e}")));
            }
        }
        let mut cell = r.cell.lock();
        if self.is_closed() || r.is_removed() {
            drop(cell);
            link.kill();
            return Err(Stop::Done);
        }
        cell.link = Some(link);
        cell.incarnation = Some(seen);
        cell.track.connect();
        if met != Met::Known {
            cell.track.mark_all_dirty();
        }
        if met == Met::Replaced {
            tracing::warn!(volume = %self.volume, peer = %r.node, "replica reconnected with another image (its files were lost or replaced): resyncing it whole");
        } else {
            tracing::info!(volume = %self.volume, peer = %r.node, "replica reconnected");
        }
        Ok(())
    }

    /// Bring connected replica `r` up to date, then record it in sync.
    fn resync(&self, r: &Replica) -> Result<(), Stop> {
        // Writes routed over an older link settle first: a late ack or
        // failure of one marks its range dirty, which must happen before
        // the map is walked.
        let epoch = {
            let mut cell = r.cell.lock();
            while cell.inflight > 0 && !self.is_closed() && !r.is_removed() {
                r.settled.wait_for(&mut cell, Duration::from_millis(100));
            }
            if !cell.track.connected() {
                return Err(Stop::Retry("dropped".into()));
            }
            cell.track.epoch()
        };
        self.stop_check()?;
        self.narrow(r, epoch);
        if r.cell.lock().track.state() == ReplicaState::Outdated {
            let _t = r.transition.lock();
            if r.is_removed() {
                return Err(Stop::Done);
            }
            if !r.cell.lock().track.connected() {
                return Err(Stop::Retry("dropped".into()));
            }
            self.record(r, ReplicaState::Resyncing)?;
            let mut cell = r.cell.lock();
            cell.track.recorded(ReplicaState::Resyncing);
            tracing::info!(
                volume = %self.volume,
                peer = %r.node,
                dirty_bytes = cell.track.dirty().bytes(),
                "replica resyncing"
            );
        }

        let mut cursor = 0;
        let mut buf = Vec::new();
        let unknown = r.cell.lock().track.content_unknown();
        let mut pace = Pacer::new(self.resync_rate, Instant::now());
        loop {
            self.stop_check()?;
            if r.is_removed() {
                return Err(Stop::Done);
            }
            let wait = pace.wait(Instant::now());
            if !wait.is_zero() {
                r.sleep(wait.min(MAX_BACKOFF));
                continue;
            }
            let (run, link) = {
                let cell = r.cell.lock();
                if !cell.track.connected() || cell.track.epoch() != epoch {
                    return Err(Stop::Retry("dropped".into()));
                }
                match cell.track.dirty().next_run(cursor, MAX_RUN_UNITS) {
                    Some(run) => (run, cell.link.clone()),
                    None => break,
                }
            };
            let _range = self.ranges.lock(run.0, run.1);
            // No write to the run is in flight now: take it.
            let run = {
                let mut cell = r.cell.lock();
                if !cell.track.connected() || cell.track.epoch() != epoch {
                    return Err(Stop::Retry("dropped".into()));
                }
                match cell.track.take_run(run.0, run.1 - run.0) {
                    // Still the same start (nothing clears bits but us).
                    Some(taken) if taken.0 == run.0 => taken,
                    Some(other) => {
                        cell.track.run_failed(other);
                        continue;
                    }
                    None => break,
                }
            };
            let offset = run.0 * UNIT;
            let len = ((run.1 - run.0) * UNIT).min(self.size - offset) as usize;
            pace.add(len as u64);
            buf.resize(len, 0);
            if let Err(e) = self.read_from_in_sync(Some(r), &mut buf, offset) {
                r.cell.lock().track.run_failed(run);
                return Err(match e {
                    ReadError::Engine(e) if self.is_fenced() => {
                        tracing::debug!(error = %e, "resync source fenced");
                        Stop::Done
                    }
                    ReadError::Engine(e) => Stop::Retry(e.to_string()),
                    ReadError::NoSource(why) => Stop::Retry(why),
                });
            }
            // A full resync: most of it may be there already (a replica
            // that missed some writes under an earlier primary).
            if unknown && self.holds(r, link.as_deref(), &buf, offset) {
                let mut cell = r.cell.lock();
                cell.track.run_copied(len as u64, 0);
                cursor = run.1;
                continue;
            }
            let sent = self.copy_to(r, link.as_deref(), &buf, offset);
            match sent {
                Ok(data_bytes) => {
                    let mut cell = r.cell.lock();
                    cell.track.run_copied(len as u64, data_bytes);
                    cell.track.acked(epoch, offset, len as u64);
                }
                Err(e) => {
                    if e.is_fenced() {
                        r.cell.lock().track.run_failed(run);
                        self.fence(&format!("replica {}: {e}", r.node));
                        return Err(Stop::Done);
                    }
                    tracing::warn!(volume = %self.volume, peer = %r.node, error = %e, "resync write failed");
                    return Err(
                        match self.replica_failed(r, Some(epoch), |t| t.run_failed(run)) {
                            Ok(()) => Stop::Retry(e.to_string()),
                            Err(_) => Stop::Done,
                        },
                    );
                }
            }
            cursor = run.1;
        }

        // Everything copied: make it durable, then record it.
        let (taken, link) = {
            let mut cell = r.cell.lock();
            (cell.track.take_unflushed(), cell.link.clone())
        };
        let flushed = match &r.endpoint {
            Endpoint::Local(l) => l.flush(self.generation).map_err(|e| CallError::Refused {
                code: match e {
                    ReplicationError::Fenced { .. } => ErrorCode::Fenced,
                    _ => ErrorCode::Io,
                },
                message: e.to_string(),
            }),
            Endpoint::Remote(_) => match &link {
                Some(l) => l
                    .call(Request::Flush, Instant::now() + self.io_timeout)
                    .map(drop),
                None => Err(CallError::Down),
            },
        };
        if let Err(e) = flushed {
            if e.is_fenced() {
                self.fence(&format!("replica {}: {e}", r.node));
                return Err(Stop::Done);
            }
            return Err(
                match self.replica_failed(r, Some(epoch), |t| {
                    if let Some(taken) = &taken {
                        t.flush_failed(taken);
                    }
                }) {
                    Ok(()) => Stop::Retry(e.to_string()),
                    Err(_) => Stop::Done,
                },
            );
        }
        let _t = r.transition.lock();
        if r.is_removed() {
            return Err(Stop::Done);
        }
        if !r.cell.lock().track.may_finish(epoch) {
            return Ok(());
        }
        self.record(r, ReplicaState::InSync)?;
        let mut cell = r.cell.lock();
        cell.track.recorded(ReplicaState::InSync);
        tracing::info!(
            volume = %self.volume,
            peer = %r.node,
            sent_bytes = cell.track.sent_bytes(),
            "replica in sync"
        );
        // Its resync marked what it copied active: clear what this
        // attach has not written.
        self.resweep.store(true, Ordering::Release);
        let _ = self.nudge.0.try_send(());
        Ok(())
    }

    /// After an attach that ended unreleased, writes then in flight may
    /// have reached some replicas only (none was acknowledged). Make the
    /// in-sync replicas equal again: compare each with the one reads come
    /// from, a chunk at a time under its range lock (digests over the
    /// network, not data), and copy the chunk where it differs. DRBD
    /// bounds this with an activity log, and so does this: only the
    /// extents active in some replica's log are compared (the whole device
    /// when a log cannot be read). In the background, while the volume is
    /// in use.
    fn verify(&self) {
        let ranges = self.to_verify();
        let total: u64 = ranges.iter().map(|(s, e)| e - s).sum();
        if let Some(v) = self.verification.lock().as_mut() {
            v.total_bytes = total;
        }
        tracing::info!(volume = %self.volume, bytes = total, of = self.size,
            "comparing the extents the replicas' activity logs name");
        let mut buf = Vec::new();
        let mut pace = Pacer::new(self.resync_rate, Instant::now());
        let mut ranges = ranges.into_iter();
        let (mut offset, mut end) = ranges.next().unwrap_or((0, 0));
        loop {
            if offset >= end {
                match ranges.next() {
                    Some((s, e)) => (offset, end) = (s, e),
                    None => break,
                }
                continue;
            }
            if self.is_closed() || self.is_fenced() {
                return;
            }
            let wait = pace.wait(Instant::now());
            if !wait.is_zero() {
                std::thread::sleep(wait.min(MAX_BACKOFF));
                continue;
            }
            let len = VERIFY_CHUNK.min(end - offset);
            match self.verify_chunk(offset, len, &mut buf) {
                Some(repaired) => {
                    pace.add(len);
                    if let Some(v) = self.verification.lock().as_mut() {
                        v.done_bytes += len;
                        v.repaired_bytes += repaired;
                    }
                    offset += len;
                }
                // No replica to compare against now: later.
                None => std::thread::sleep(MAX_BACKOFF),
            }
        }
        let mut v = self.verification.lock();
        let Some(v) = v.as_mut() else { return };
        v.finished = true;
        tracing::info!(
            volume = %self.volume,
            compared_bytes = v.done_bytes,
            repaired_bytes = v.repaired_bytes,
            "replicas verified after the last attach ended unreleased"
        );
    }

    /// The byte ranges to compare after an unreleased attach: the extents
    /// active in the activity log of any replica reads may come from (each
    /// marked its extents before a write changed them), merged; the whole
    /// device when one of them cannot tell (not connected, an older log).
    fn to_verify(&self) -> Vec<(u64, u64)> {
        let whole = vec![(0, self.size)];
        let mut union = vec![0u64; activity::extents(self.size).div_ceil(64) as usize];
        let deadline = Instant::now() + self.io_timeout;
        for r in self.set().iter() {
            {
                let mut cell = r.cell.lock();
                if !cell.track.readable() {
                    // Its log is not read: a write in flight may have
                    // reached it alone. Compared once back, where its own
                    // log or the others' say (Inner::narrow).
                    cell.track.in_doubt();
                    continue;
                }
            }
            let Some((_, words)) = self.activity_of(r, deadline) else {
                tracing::info!(volume = %self.volume, peer = %r.node,
                    "cannot read this replica's activity log: comparing the whole device");
                return whole;
            };
            for (u, w) in union.iter_mut().zip(words) {
                *u |= w;
            }
        }
        self.extent_ranges(&union)
    }

    /// Replica `r`'s activity log, if it can be read.
    fn activity_of(&self, r: &Replica, deadline: Instant) -> Option<(activity::Stamp, Vec<u64>)> {
        if let Some(l) = r.local() {
            return l.activity_stamped(self.generation).ok();
        }
        let link = r.cell.lock().link.clone()?;
        match link.call(Request::Activity, deadline) {
            Ok(Reply::Data(bytes)) => activity::decode_reply(&bytes, activity::extents(self.size)),
            _ => None,
        }
    }

    /// The byte ranges of the extents set in `bitmap`, merged.
    fn extent_ranges(&self, bitmap: &[u64]) -> Vec<(u64, u64)> {
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for e in activity::set_bits(bitmap) {
            let (s, end) = (e * EXTENT, ((e + 1) * EXTENT).min(self.size));
            match ranges.last_mut() {
                Some(last) if last.1 == s => last.1 = end,
                _ => ranges.push((s, end)),
            }
        }
        ranges
    }

    /// What outdated replica `r` misses, narrowed from the whole device to
    /// the extents active in its own activity log or in those of the other
    /// replicas, when all of those are in sync, their logs can be read and
    /// its log took every clear theirs did (see [`Track::narrow`]; an older
    /// stamp: rolled back past a clear, or a clear failed there). Under the
    /// whole device's range lock, so that no write is between its mark in a
    /// log and its mark in the map.
    fn narrow(&self, r: &Replica, epoch: u64) {
        if !r.cell.lock().track.narrowable() {
            return;
        }
        let (s, e) = unit_span(0, self.size);
        let _all = self.ranges.lock(s, e);
        let mut union = vec![0u64; activity::extents(self.size).div_ceil(64) as usize];
        let deadline = Instant::now() + self.io_timeout;
        let (mut mine, mut newest) = (activity::Stamp::default(), activity::Stamp::default());
        for q in self.set().iter() {
            let me = std::ptr::eq(&**q, r);
            if !me && !q.cell.lock().track.readable() {
                tracing::debug!(volume = %self.volume, peer = %r.node, other = %q.node,
                    "not narrowing the resync: another replica is not in sync");
                return;
            }
            let Some((stamp, words)) = self.activity_of(q, deadline) else {
                tracing::debug!(volume = %self.volume, peer = %r.node, other = %q.node,
                    "not narrowing the resync: an activity log cannot be read");
                return;
            };
            if me {
                mine = stamp;
            } else {
                newest = newest.max(stamp);
            }
            for (u, w) in union.iter_mut().zip(words) {
                *u |= w;
            }
        }
        if mine < newest {
            tracing::warn!(volume = %self.volume, peer = %r.node, ?mine, ?newest,
                "the replica's activity log missed a clear the others took (its files were rolled back, or the clear failed there): resyncing it whole");
            return;
        }
        let keep: Vec<(u64, u64)> = self
            .extent_ranges(&union)
            .into_iter()
            .map(|(s, e)| unit_span(s, e - s))
            .collect();
        let mut cell = r.cell.lock();
        if !cell.track.connected() || cell.track.epoch() != epoch {
            return;
        }
        if cell.track.narrow(&keep) {
            tracing::info!(volume = %self.volume, peer = %r.node,
                bytes = cell.track.dirty().bytes(), of = self.size,
                "what the replica misses is what the activity logs name: resyncing only that");
        }
    }

    /// Every replica is in sync, connected and misses nothing: the only
    /// time extents may be cleared from the activity logs (otherwise they
    /// also record, on disk, what an out-of-sync replica misses).
    fn all_in_sync(&self) -> bool {
        self.set().iter().all(|r| {
            let cell = r.cell.lock();
            cell.track.readable() && cell.track.dirty().is_empty()
        })
    }

    /// The volume is detached cleanly: flush, then clear the activity logs
    /// of the replicas, which hold every acknowledged write. Not while a
    /// comparison is due (the logs say what it must compare), nor while a
    /// replica is out of sync (they say what it misses). Best effort: a
    /// log left set costs the next comparison time, nothing more.
    fn settle(&self) {
        if self.is_closed()
            || self.is_fenced()
            || self.verification.lock().is_some_and(|v| !v.finished)
        {
            return;
        }
        let (s, e) = unit_span(0, self.size);
        let _all = self.ranges.lock(s, e);
        if let Err(e) = self.flush() {
            tracing::warn!(volume = %self.volume, error = %e,
                "the last flush failed: activity logs kept");
            return;
        }
        if !self.all_in_sync() {
            tracing::info!(volume = %self.volume,
                "a replica is out of sync: activity logs kept (they record what it misses)");
            return;
        }
        let deadline = Instant::now() + self.io_timeout;
        let seq = self.clears.fetch_add(1, Ordering::Relaxed) + 1;
        for r in self.set().iter() {
            if let Err(e) = self.deactivate_on(r, 0, u64::MAX, seq, deadline) {
                tracing::info!(volume = %self.volume, peer = %r.node, error = %e,
                    "activity log not cleared: the next unreleased attach compares its extents");
            }
        }
    }

    /// Compare one chunk; the bytes repaired, or `None` if no replica can
    /// be read now.
    fn verify_chunk(&self, offset: u64, len: u64, buf: &mut Vec<u8>) -> Option<u64> {
        let (s, e) = unit_span(offset, len);
        let _range = self.ranges.lock(s, e);
        buf.resize(len as usize, 0);
        // The replica reads come from is the reference.
        let src = match self.read_from_in_sync(None, buf, offset) {
            Ok(src) => src,
            Err(e) => {
                tracing::debug!(volume = %self.volume, error = ?e, "verify: no replica to read");
                return None;
            }
        };
        let mut repaired = 0;
        for r in self.set().iter() {
            if Arc::ptr_eq(r, &src) {
                continue;
            }
            let (epoch, link) = {
                let mut cell = r.cell.lock();
                if !cell.track.readable() {
                    // Not compared (out of sync, or a resync copied this
                    // chunk before the others were made equal): copied.
                    cell.track.mark_dirty(offset, len);
                    continue;
                }
                (cell.track.epoch(), cell.link.clone())
            };
            // A peer without a link: its own thread reconnects and resyncs it.
            if !r.is_local() && link.is_none() {
                continue;
            }
            if self.holds(r, link.as_deref(), buf, offset) {
                continue;
            }
            tracing::info!(volume = %self.volume, peer = %r.node, offset, len,
                "replica differs after an unreleased attach: repairing it");
            match self.copy_to(r, link.as_deref(), buf, offset) {
                Ok(_) => repaired += len,
                Err(e) => {
                    tracing::warn!(volume = %self.volume, peer = %r.node, error = %e, "verify: repair failed");
                    let _ = self.replica_failed(r, Some(epoch), |t| t.mark_dirty(offset, len));
                }
            }
        }
        Some(repaired)
    }

    /// Whether replica `r` holds `buf` at `offset` already (by digest; an
    /// error says no, and the copy that follows meets it).
    fn holds(&self, r: &Replica, link: Option<&Link>, buf: &[u8], offset: u64) -> bool {
        let want = Sha256::digest(buf);
        let have = match (r.local(), link) {
            (Some(l), _) => {
                let mut mine = vec![0u8; buf.len()];
                match l.read_at(self.generation, &mut mine, offset) {
                    Ok(()) => Sha256::digest(&mine).to_vec(),
                    Err(_) => return false,
                }
            }
            (None, Some(link)) => {
                let req = Request::Digest {
                    offset,
                    len: buf.len() as u32,
                };
                match link.call(req, Instant::now() + self.io_timeout) {
                    Ok(Reply::Data(d)) => d,
                    _ => return false,
                }
            }
            (None, None) => return false,
        };
        have[..] == want[..]
    }

    fn stop_check(&self) -> Result<(), Stop> {
        if self.is_closed() || self.is_fenced() {
            Err(Stop::Done)
        } else {
            Ok(())
        }
    }

    /// Record `state` for replica `r` (the caller holds its transition lock).
    fn record(&self, r: &Replica, state: ReplicaState) -> Result<(), Stop> {
        match self.states.set_state(&r.node, state) {
            Ok(()) => Ok(()),
            Err(e @ super::StateStoreError::Fenced { .. }) => {
                self.fence(&e.to_string());
                Err(Stop::Done)
            }
            Err(e) => Err(Stop::Retry(format!("cannot record {state}: {e}"))),
        }
    }

    /// Write a resync run to replica `r`: its all-zero units as discards,
    /// the rest as data (requests pipelined). Returns the bytes of data sent.
    fn copy_to(
        &self,
        r: &Replica,
        link: Option<&Link>,
        buf: &[u8],
        offset: u64,
    ) -> Result<u64, CallError> {
        let segments = zero_segments(buf);
        let data_bytes = segments
            .iter()
            .filter(|s| !s.2)
            .map(|s| s.1.len() as u64)
            .sum();
        if let Some(l) = r.local() {
            for (at, range, zero) in segments {
                let off = offset + at;
                let res = if zero {
                    l.discard(self.generation, off, range.len() as u64)
                } else {
                    l.write_at(self.generation, &buf[range], off)
                };
                res.map_err(|e| CallError::Refused {
                    code: match e {
                        ReplicationError::Fenced { .. } => ErrorCode::Fenced,
                        _ => ErrorCode::Io,
                    },
                    message: e.to_string(),
                })?;
            }
            return Ok(data_bytes);
        }
        let link = link.ok_or(CallError::Down)?;
        let deadline = Instant::now() + self.io_timeout;
        let mut pending = Vec::new();
        for (at, range, zero) in segments {
            let off = offset + at;
            let rx = if zero {
                link.submit(Request::Discard {
                    offset: off,
                    len: range.len() as u64,
                })
            } else {
                link.submit_write(off, &buf[range])
            }
            .map_err(|_| CallError::Down)?;
            pending.push(rx);
        }
        for rx in pending {
            match rx.wait(deadline)? {
                Reply::Ok => {}
                _ => return Err(CallError::Unexpected),
            }
        }
        Ok(data_bytes)
    }
}

/// Mark the activity log of a replica (`local`, or over `link`) all active
/// before it is copied whole: an image of unknown content must not be
/// narrowed by its log later ([`Request::ActivateAll`]).
fn activate_all(
    local: Option<&LocalReplica>,
    link: Option<&Link>,
    node: &str,
    generation: Generation,
    io_timeout: Duration,
) -> Result<(), ReplicationError> {
    if let Some(l) = local {
        return l.activate_all(generation);
    }
    let Some(link) = link else {
        return Ok(()); // unreachable: marked when it reconnects
    };
    let (code, message) = match link.call(Request::ActivateAll, Instant::now() + io_timeout) {
        Ok(Reply::Ok) => return Ok(()),
        Ok(_) => (ErrorCode::Io, "unexpected reply".to_string()),
        Err(CallError::Refused { code, message }) => (code, message),
        Err(e) => (ErrorCode::Io, e.to_string()),
    };
    Err(ReplicationError::Refused {
        node: node.to_string(),
        code,
        message: format!(
            "cannot mark its activity log all active before copying it whole ({message}); \
             check that node's data disk and its daemon's log, then attach again"
        ),
    })
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

#[derive(Debug)]
enum ReadError {
    Engine(EngineError),
    NoSource(String),
}

impl BlockEngine for Mirror {
    fn size(&self) -> u64 {
        self.inner.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), EngineError> {
        self.inner.read(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), EngineError> {
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

    fn flush(&self) -> Result<(), EngineError> {
        self.inner.flush()
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), EngineError> {
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

//! Synchronous replication end to end: real replica servers on 127.0.0.1,
//! real thin images in temporary directories, a mirror writing through
//! them. The state store is an in-memory fake that records every call and
//! can be told to fail (the etcd one is tested with the cluster).

use dunnage::engine::pattern::pattern;
use dunnage::engine::{BlockEngine, ThinParams};
use dunnage::replication::activity;
use dunnage::replication::wire::{self, ErrorCode, Frame, Hello};
use dunnage::replication::Answer;
use dunnage::replication::{
    Generation, Incarnation, LocalReplica, LocalReplicas, Mirror, MirrorConfig, NewReplica,
    PeerSpec, ReplicaServer, ReplicaState, ReplicaStatus, ReplicationError, ResyncPace, StateStore,
    StateStoreError,
};
use parking_lot::Mutex;
#[path = "common/tmpfs.rs"]
mod tmpfs;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tmpfs::SmallTmpfs;

const MIB: u64 = 1 << 20;
const BLOCK: u64 = 4096;
const VOL: &str = "0123456789abcdef0123456789abcdef";
const PARAMS: ThinParams = ThinParams {
    size: 64 * MIB,
    block_size: 32 << 10,
};
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Guards against a hang only: every wait ends as soon as its condition holds.
const WAIT_LIMIT: Duration = Duration::from_secs(120);

/// A node: its replica directory, its replicas, its server.
struct Node {
    // Fields drop in order: the server stops before its directory goes.
    server: Option<ReplicaServer>,
    replicas: Arc<LocalReplicas>,
    dir: tempfile::TempDir,
    name: String,
    addr: SocketAddr,
}

impl Node {
    fn new(name: &str) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let replicas = LocalReplicas::new(dir.path().to_path_buf());
        let server = ReplicaServer::start(
            "127.0.0.1:0".parse().unwrap(),
            name.to_string(),
            replicas.clone(),
        )
        .unwrap();
        let addr = server.local_addr();
        Node {
            name: name.to_string(),
            dir,
            replicas,
            server: Some(server),
            addr,
        }
    }

    /// Stop the server: every link to it drops.
    fn stop(&mut self) {
        self.server.take().unwrap().shutdown();
    }

    /// A new server process, as it were: new replicas over the same
    /// directory, on the same port.
    fn restart(&mut self) {
        assert!(self.server.is_none());
        self.replicas = LocalReplicas::new(self.dir.path().to_path_buf());
        self.server = Some(
            ReplicaServer::start(self.addr, self.name.clone(), self.replicas.clone()).unwrap(),
        );
    }

    /// A node whose replica directory is inside `parent`.
    fn new_in(name: &str, parent: &std::path::Path) -> Node {
        let mut node = Node::new(name);
        node.stop();
        node.dir = tempfile::tempdir_in(parent).unwrap();
        node.restart();
        node
    }

    fn peer(&self, state: ReplicaState) -> PeerSpec {
        PeerSpec {
            node: self.name.clone(),
            addr: self.addr,
            state,
            incarnation: None,
        }
    }

    fn local(&self) -> Arc<LocalReplica> {
        self.replicas.open(VOL, PARAMS).unwrap()
    }

    fn checksum(&self) -> String {
        self.replicas.checksum(VOL, PARAMS).unwrap()
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Fail {
    Fenced,
    Unavailable,
}

/// The state store: records every state call, fails on demand. Keeps the
/// incarnations recorded, which [`config`] hands to the mirror as the
/// cluster would.
#[derive(Default)]
struct FakeStates {
    calls: Mutex<Vec<(String, ReplicaState, bool)>>,
    incarnations: Mutex<std::collections::HashMap<String, Incarnation>>,
    fail: Mutex<Option<Fail>>,
    /// The attach it is bound to (set by [`config`]), as the cluster's is.
    generation: Mutex<Generation>,
    /// What [`StateStore::reached`] recorded last.
    reached: Mutex<Generation>,
}

impl FakeStates {
    fn new() -> Arc<FakeStates> {
        Arc::new(FakeStates::default())
    }

    /// The store of a later attach: no calls yet, the same incarnations.
    fn next(&self) -> Arc<FakeStates> {
        Arc::new(FakeStates {
            incarnations: Mutex::new(self.incarnations.lock().clone()),
            reached: Mutex::new(*self.reached.lock()),
            ..FakeStates::default()
        })
    }

    fn incarnation(&self, node: &str) -> Option<Incarnation> {
        self.incarnations.lock().get(node).copied()
    }

    fn answer(&self) -> Result<(), StateStoreError> {
        match *self.fail.lock() {
            None => Ok(()),
            Some(Fail::Fenced) => Err(StateStoreError::Fenced {
                volume: "vol".into(),
                generation: 0,
            }),
            Some(Fail::Unavailable) => Err(StateStoreError::Unavailable("etcd is down".into())),
        }
    }

    /// Successful records, in order.
    fn recorded(&self) -> Vec<(String, ReplicaState)> {
        self.calls
            .lock()
            .iter()
            .filter(|c| c.2)
            .map(|c| (c.0.clone(), c.1))
            .collect()
    }

    fn recorded_for(&self, node: &str) -> Vec<ReplicaState> {
        self.recorded()
            .into_iter()
            .filter(|c| c.0 == node)
            .map(|c| c.1)
            .collect()
    }
}

impl StateStore for FakeStates {
    fn set_state(&self, node: &str, state: ReplicaState) -> Result<(), StateStoreError> {
        let answer = self.answer();
        self.calls
            .lock()
            .push((node.to_string(), state, answer.is_ok()));
        answer
    }

    fn set_incarnation(
        &self,
        node: &str,
        incarnation: Incarnation,
        _replaced: bool,
    ) -> Result<(), StateStoreError> {
        self.answer()?;
        self.incarnations
            .lock()
            .insert(node.to_string(), incarnation);
        Ok(())
    }

    fn reached(&self) -> Result<(), StateStoreError> {
        self.answer()?;
        *self.reached.lock() = *self.generation.lock();
        Ok(())
    }
}

fn config(
    node: &str,
    generation: Generation,
    local: Option<Arc<LocalReplica>>,
    local_state: ReplicaState,
    peers: Vec<PeerSpec>,
    states: Arc<FakeStates>,
) -> MirrorConfig {
    let peers = peers
        .into_iter()
        .map(|p| PeerSpec {
            incarnation: states.incarnation(&p.node),
            ..p
        })
        .collect();
    *states.generation.lock() = generation;
    let reached = *states.reached.lock();
    MirrorConfig {
        volume_id: VOL.into(),
        volume: "vol".into(),
        node: node.into(),
        generation,
        params: PARAMS,
        local,
        local_state,
        local_incarnation: states.incarnation(node),
        reached,
        peers,
        states,
        io_timeout: IO_TIMEOUT,
        verify: false,
        resync: ResyncPace::default(),
        base: None,
        hot_extents: activity::HOT_MAX,
    }
}

/// `a` attached with its own replica, `b` its in-sync peer.
fn config_a_b(nodes: &[Node], generation: Generation, states: Arc<FakeStates>) -> MirrorConfig {
    config(
        "a",
        generation,
        Some(nodes[0].local()),
        ReplicaState::InSync,
        vec![nodes[1].peer(ReplicaState::InSync)],
        states,
    )
}

/// `a` attached with its own replica, `b` and `c` its in-sync peers.
fn config_a_bc(nodes: &[Node], generation: Generation, states: Arc<FakeStates>) -> MirrorConfig {
    config(
        "a",
        generation,
        Some(nodes[0].local()),
        ReplicaState::InSync,
        vec![
            nodes[1].peer(ReplicaState::InSync),
            nodes[2].peer(ReplicaState::InSync),
        ],
        states,
    )
}

fn status_of(m: &Mirror, node: &str) -> ReplicaStatus {
    m.status().into_iter().find(|s| s.node == node).unwrap()
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < WAIT_LIMIT, "gave up waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_in_sync(m: &Mirror, node: &str) {
    wait_until(&format!("{node} in sync"), || {
        let s = status_of(m, node);
        s.state == ReplicaState::InSync && s.connected
    });
}

fn read_vec(e: &dyn BlockEngine, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0xAA; len];
    e.read_at(&mut buf, offset).unwrap();
    buf
}

/// Until `stop`: write 4 KiB block k (of pattern `seed + k`) at block
/// `k * stride` wrapping over the device, flushing every 64, counting them
/// in `written`. Every write and flush must succeed (`what`: meanwhile).
fn write_until(
    e: &dyn BlockEngine,
    stop: &AtomicBool,
    written: &AtomicU64,
    stride: u64,
    seed: u64,
    what: &str,
) {
    let blocks = PARAMS.size / BLOCK;
    let mut k = 0u64;
    while !stop.load(Ordering::SeqCst) {
        let block = (k * stride) % blocks;
        e.write_at(&pattern(seed + k, BLOCK as usize), block * BLOCK)
            .unwrap_or_else(|err| panic!("write {k} {what}: {err}"));
        if k % 64 == 63 {
            e.flush()
                .unwrap_or_else(|err| panic!("flush after write {k} {what}: {err}"));
        }
        k += 1;
        written.store(k, Ordering::SeqCst);
    }
}

/// Write 4 KiB blocks by [`BlockEngine::write_then`] from four threads
/// (block % 4 picks the thread), each with up to `window` in flight:
/// `(block, seed)` writes pattern(seed) there, after the earlier writes to
/// the same block were answered (as the kernel orders them). Panics on an
/// error; returns how many were answered, and how many of them from a
/// replica link's reader (the writer did not wait).
fn write_then_window(
    e: &dyn BlockEngine,
    window: usize,
    writes: impl Iterator<Item = (u64, u64)>,
) -> (u64, u64) {
    const THREADS: u64 = 4;
    let writes: Vec<(u64, u64)> = writes.collect();
    let answered = AtomicU64::new(0);
    let by_link = AtomicU64::new(0);
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let mine: Vec<(u64, u64)> = writes
                .iter()
                .copied()
                .filter(|(b, _)| b % THREADS == t)
                .collect();
            let (answered, by_link) = (&answered, &by_link);
            s.spawn(move || {
                let (tx, rx) = crossbeam_channel::unbounded::<(u64, bool, Result<(), String>)>();
                let mut in_flight = std::collections::HashMap::<u64, usize>::new();
                let settle = |in_flight: &mut std::collections::HashMap<u64, usize>| {
                    let (block, on_link, res) = rx
                        .recv_timeout(Duration::from_secs(60))
                        .expect("a write_then never answered");
                    res.unwrap_or_else(|e| panic!("write to block {block}: {e}"));
                    let n = in_flight.get_mut(&block).unwrap();
                    *n -= 1;
                    if *n == 0 {
                        in_flight.remove(&block);
                    }
                    answered.fetch_add(1, Ordering::SeqCst);
                    by_link.fetch_add(u64::from(on_link), Ordering::SeqCst);
                };
                for (block, seed) in mine {
                    while in_flight.values().sum::<usize>() >= window
                        || in_flight.contains_key(&block)
                    {
                        settle(&mut in_flight);
                    }
                    *in_flight.entry(block).or_default() += 1;
                    let tx = tx.clone();
                    e.write_then(
                        &pattern(seed, BLOCK as usize),
                        block * BLOCK,
                        Box::new(move |res| {
                            let name = std::thread::current().name().unwrap_or("").to_string();
                            let on_link = name.starts_with("link-") || name == "mirror-fail";
                            let _ = tx.send((block, on_link, res.map_err(|e| e.to_string())));
                        }),
                    );
                }
                while !in_flight.is_empty() {
                    settle(&mut in_flight);
                }
            });
        }
    });
    (answered.into_inner(), by_link.into_inner())
}

/// Write distinct 4 KiB blocks `blocks` (block k holds pattern(seed + k)).
fn write_blocks(e: &dyn BlockEngine, seed: u64, blocks: impl Iterator<Item = u64>) -> u64 {
    let mut n = 0;
    for k in blocks {
        e.write_at(&pattern(seed + k, BLOCK as usize), k * BLOCK)
            .unwrap();
        n += 1;
    }
    n
}

#[test]
fn writes_land_identically_on_every_replica() {
    for n_peers in [1, 2] {
        let nodes: Vec<Node> = ["a", "b", "c"][..=n_peers]
            .iter()
            .map(|n| Node::new(n))
            .collect();
        let states = FakeStates::new();
        let m = Mirror::open(config(
            "a",
            1,
            Some(nodes[0].local()),
            ReplicaState::InSync,
            nodes[1..]
                .iter()
                .map(|n| n.peer(ReplicaState::InSync))
                .collect(),
            states.clone(),
        ))
        .unwrap();

        // Four writers at once, unaligned and multi-block writes, discards;
        // sizes on both sides of what a replica's link reader runs itself
        // (64 KiB) and hands to its workers.
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let m = &m;
                s.spawn(move || {
                    for k in 0..200u64 {
                        let off = (t * 4000 + k * 17) * 997 % (PARAMS.size - 200_000);
                        let len = 1 + (k * 7919 + t) % 196_608;
                        m.write_at(&pattern(t * 1000 + k, len as usize), off)
                            .unwrap();
                        if k % 50 == 49 {
                            m.discard(off / 2, 12_345).unwrap();
                            m.flush().unwrap();
                        }
                    }
                });
            }
        });
        m.write_at(&pattern(99, 8192), PARAMS.size - 8192).unwrap();
        // Writes answered by callback (as FUSE's are), 32 in flight, some
        // over the same blocks as others in flight.
        let then_blocks = 1000u64;
        let (acked, by_link) =
            write_then_window(&*m, 32, (0..then_blocks).map(|k| (k * 13 % 200, 500 + k)));
        assert_eq!(acked, then_blocks);
        assert!(by_link > 0, "no write was answered by a link's reader");
        m.flush().unwrap();

        let sums: Vec<String> = nodes.iter().map(Node::checksum).collect();
        assert!(
            sums.iter().all(|s| *s == sums[0]),
            "{n_peers} peers: {sums:?}"
        );
        // The last write to each block is the one that reads back.
        for block in 0..200u64 {
            let k = (0..then_blocks)
                .rev()
                .find(|k| k * 13 % 200 == block)
                .unwrap();
            assert_eq!(
                read_vec(&*m, block * BLOCK, BLOCK as usize),
                pattern(500 + k, BLOCK as usize),
                "block {block}"
            );
        }
        let empty = tempfile::tempdir().unwrap();
        let zeros = LocalReplicas::new(empty.path().to_path_buf())
            .open(VOL, PARAMS)
            .unwrap()
            .checksum()
            .unwrap();
        assert_ne!(sums[0], zeros, "something was written");
        assert_eq!(read_vec(&*m, PARAMS.size - 8192, 8192), pattern(99, 8192));
        for s in m.status() {
            assert_eq!(s.state, ReplicaState::InSync, "{s:?}");
            assert!(s.connected, "{s:?}");
            assert_eq!(s.resync_sent_bytes, 0);
        }
        assert!(states.calls.lock().is_empty(), "nothing changed state");
        m.close();
        assert!(m.write_at(&[1; 512], 0).is_err(), "closed");
    }
}

#[test]
fn peer_down_mid_writes_is_outdated_then_resynced() {
    let mut nodes: Vec<Node> = ["a", "b", "c"].iter().map(|n| Node::new(n)).collect();
    let states = FakeStates::new();
    let m = Mirror::open(config_a_bc(&nodes, 1, states.clone())).unwrap();

    let written = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let writer = s.spawn(|| write_until(&*m, &stop, &written, 7, 0, "while a peer is down"));
        let at = |n: u64| {
            wait_until(&format!("{n} writes"), || {
                written.load(Ordering::SeqCst) >= n
            })
        };
        at(200);
        nodes[1].stop();
        wait_until("b outdated", || {
            status_of(&m, "b").state == ReplicaState::Outdated
        });
        let down_at = written.load(Ordering::SeqCst);
        at(down_at + 300);
        assert_eq!(status_of(&m, "b").state, ReplicaState::Outdated);
        assert!(!status_of(&m, "b").connected);
        nodes[1].restart();
        wait_in_sync(&m, "b");
        let back_at = written.load(Ordering::SeqCst);
        at(back_at + 100);
        stop.store(true, Ordering::SeqCst);
        writer.join().unwrap();
    });
    m.flush().unwrap();

    let sums: Vec<String> = nodes.iter().map(Node::checksum).collect();
    assert_eq!(sums[0], sums[1], "b resynced");
    assert_eq!(sums[0], sums[2]);
    assert_eq!(
        states.recorded_for("b"),
        vec![
            ReplicaState::Outdated,
            ReplicaState::Resyncing,
            ReplicaState::InSync
        ]
    );
    assert!(states.recorded_for("c").is_empty());
    let b = status_of(&m, "b");
    assert!(b.resync_sent_bytes > 0);
    assert!(b.resync.is_none());
    assert_eq!(status_of(&m, "c").resync_sent_bytes, 0);
}

#[test]
fn writes_in_flight_to_a_stopping_peer_are_held_by_the_others() {
    // Writes answered by callback from the links' readers: when b stops
    // with writes in flight, each is still answered (held by a and c), b
    // is recorded outdated (off the readers' threads), then resynced.
    let mut nodes: Vec<Node> = ["a", "b", "c"].iter().map(|n| Node::new(n)).collect();
    let states = FakeStates::new();
    let m = Mirror::open(config_a_bc(&nodes, 1, states.clone())).unwrap();
    let blocks = PARAMS.size / BLOCK;
    let writes = |from: u64, n: u64| (from..from + n).map(move |k| ((k * 7) % blocks, k));
    assert_eq!(write_then_window(&*m, 32, writes(0, 400)).0, 400);
    std::thread::scope(|s| {
        let stopper = s.spawn(|| {
            std::thread::sleep(Duration::from_millis(20));
            nodes[1].stop();
        });
        let (acked, by_link) = write_then_window(&*m, 32, writes(400, 3000));
        assert_eq!(acked, 3000);
        assert!(by_link > 0, "no write was answered by a link's reader");
        stopper.join().unwrap();
    });
    wait_until("b outdated", || {
        status_of(&m, "b").state == ReplicaState::Outdated
    });
    assert_eq!(write_then_window(&*m, 32, writes(3400, 300)).0, 300);
    nodes[1].restart();
    wait_in_sync(&m, "b");
    m.flush().unwrap();
    let sums: Vec<String> = nodes.iter().map(Node::checksum).collect();
    assert_eq!(sums[0], sums[1], "b resynced");
    assert_eq!(sums[0], sums[2]);
    assert_eq!(states.recorded_for("b")[0], ReplicaState::Outdated);
    assert!(states.recorded_for("c").is_empty());
}

#[test]
fn resync_sends_only_what_the_peer_missed() {
    let mut nodes: Vec<Node> = ["a", "b"].iter().map(|n| Node::new(n)).collect();
    let states = FakeStates::new();
    let m = Mirror::open(config_a_b(&nodes, 1, states.clone())).unwrap();
    // Data before the outage, flushed.
    write_blocks(&*m, 0, 0..2048);
    m.flush().unwrap();

    nodes[1].stop();
    // While b is down: distinct blocks, some runs of adjacent ones, some
    // scattered, some over the data written before.
    let mut down = 0;
    down += write_blocks(&*m, 10_000, 100..164);
    down += write_blocks(&*m, 20_000, (3000..9000).step_by(37));
    down += write_blocks(&*m, 30_000, 9001..9003);
    m.discard(5000 * BLOCK, BLOCK).unwrap();
    down += 1;
    let down_bytes = down * BLOCK;
    assert_eq!(status_of(&m, "b").state, ReplicaState::Outdated);
    assert!(!status_of(&m, "b").connected);
    // Everything missed is in the dirty map.
    let progress_total = down_bytes;

    nodes[1].restart();
    wait_in_sync(&m, "b");
    let b = status_of(&m, "b");
    assert!(
        b.resync_sent_bytes * 10 <= down_bytes * 11,
        "sent {} for {} written while down",
        b.resync_sent_bytes,
        down_bytes
    );
    // Every missed block that holds data was sent (the discard's is zeros).
    assert!(
        b.resync_sent_bytes >= progress_total - BLOCK,
        "sent {} of {}",
        b.resync_sent_bytes,
        progress_total
    );
    assert_eq!(nodes[0].checksum(), nodes[1].checksum());
    assert_eq!(
        states.recorded_for("b"),
        vec![
            ReplicaState::Outdated,
            ReplicaState::Resyncing,
            ReplicaState::InSync
        ]
    );
    // Back in sync, writes reach it directly again.
    write_blocks(&*m, 40_000, 12_000..12_010);
    m.flush().unwrap();
    assert_eq!(nodes[0].checksum(), nodes[1].checksum());
    assert_eq!(status_of(&m, "b").resync_sent_bytes, b.resync_sent_bytes);
}

/// A node that lost its replica's files (a wiped data dir, a new disk)
/// makes a new, empty image when asked: it is never taken for in sync,
/// whether it comes back under the running mirror or at the next attach.
#[test]
fn a_replica_whose_files_were_lost_is_resynced_whole() {
    let mut nodes: Vec<Node> = ["a", "b"].iter().map(|n| Node::new(n)).collect();
    let wipe = |n: &mut Node| {
        n.stop();
        std::fs::remove_dir_all(n.dir.path().join(VOL)).unwrap();
        n.restart();
    };
    let states = FakeStates::new();
    let m = Mirror::open(config_a_b(&nodes, 1, states.clone())).unwrap();
    // Met for the first time: recorded, trusted.
    assert!(states.incarnation("a").is_some() && states.incarnation("b").is_some());
    assert!(states.calls.lock().is_empty());
    write_blocks(&*m, 0, 0..512);
    m.flush().unwrap();
    // Under the running mirror: what b missed is more than its dirty map.
    let before = states.incarnation("b");
    nodes[1].stop();
    write_blocks(&*m, 1, 600..602);
    std::fs::remove_dir_all(nodes[1].dir.path().join(VOL)).unwrap();
    nodes[1].restart();
    wait_in_sync(&m, "b");
    assert_ne!(states.incarnation("b"), before, "the new image is recorded");
    assert_eq!(nodes[0].checksum(), nodes[1].checksum());
    m.close();
    drop(m);

    // Between attaches, etcd still saying in sync.
    wipe(&mut nodes[1]);
    let states = states.next();
    let m = Mirror::open(config_a_b(&nodes, 2, states.clone())).unwrap();
    assert_eq!(
        states.recorded_for("b").first(),
        Some(&ReplicaState::Outdated),
        "recorded before any IO"
    );
    wait_in_sync(&m, "b");
    assert_eq!(nodes[0].checksum(), nodes[1].checksum());
    m.close();
    drop(m);

    // The good copy is down and the only one reachable lost its files: it
    // holds nothing, as a new volume's would, and must not be taken for
    // the data. A diskless attach is refused, and says why.
    nodes[0].stop();
    wipe(&mut nodes[1]);
    // A diskless attach from d, a and b recorded as given.
    let from_d = |nodes: &[Node], generation, a, b, states: &Arc<FakeStates>| {
        Mirror::open(config(
            "d",
            generation,
            None,
            ReplicaState::InSync,
            vec![nodes[0].peer(a), nodes[1].peer(b)],
            states.clone(),
        ))
    };
    let states = states.next();
    let err = from_d(
        &nodes,
        3,
        ReplicaState::InSync,
        ReplicaState::InSync,
        &states,
    )
    .unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, ReplicationError::NoInSyncReplica { .. })
            && msg.contains("b: its image is not the one recorded")
            && msg.contains("a: "),
        "{msg}"
    );
    assert_eq!(states.recorded_for("b"), [ReplicaState::Outdated]);

    // Once a is back, b is resynced whole from it and nothing was lost.
    nodes[0].restart();
    let states = states.next();
    let m = from_d(
        &nodes,
        4,
        ReplicaState::InSync,
        ReplicaState::Outdated,
        &states,
    )
    .unwrap();
    wait_in_sync(&m, "b");
    for k in (0..512).chain(600..602) {
        let seed = if k < 512 { 0 } else { 1 };
        assert_eq!(
            read_vec(&*m, k * BLOCK, BLOCK as usize),
            pattern(seed + k, BLOCK as usize)
        );
    }
    m.close();
    assert_eq!(nodes[0].checksum(), nodes[1].checksum());
}

#[test]
fn a_newer_generation_fences_the_old_mirror() {
    let nodes: Vec<Node> = ["a", "b"].iter().map(|n| Node::new(n)).collect();
    let old_states = FakeStates::new();
    let old = Mirror::open(config(
        "a",
        5,
        Some(nodes[0].local()),
        ReplicaState::InSync,
        vec![nodes[1].peer(ReplicaState::InSync)],
        old_states.clone(),
    ))
    .unwrap();
    old.write_at(&pattern(1, 4096), 0).unwrap();
    old.flush().unwrap();

    // b takes the volume over with generation 6, a becomes its peer.
    let new_states = FakeStates::new();
    let new = Mirror::open(config(
        "b",
        6,
        Some(nodes[1].local()),
        ReplicaState::InSync,
        vec![nodes[0].peer(ReplicaState::InSync)],
        new_states.clone(),
    ))
    .unwrap();
    assert_eq!(nodes[0].local().generation(), 6);
    assert_eq!(nodes[1].local().generation(), 6);

    let err = old.write_at(&pattern(2, 4096), 0).unwrap_err();
    assert!(err.to_string().contains("fenced"), "{err}");
    assert!(old.is_fenced());
    // And it stays fenced: writes, flushes and reads are refused.
    assert!(old.write_at(&pattern(3, 4096), 8192).is_err());
    assert!(old.discard(0, 4096).is_err());
    assert!(old.flush().is_err());
    assert!(old.read_at(&mut [0; 4096], 0).is_err());
    // Fencing is not a replica failure: nothing was recorded.
    assert!(old_states.calls.lock().is_empty());

    // The refused writes changed nothing; the new owner works.
    assert_eq!(read_vec(&*new, 0, 4096), pattern(1, 4096));
    assert_eq!(read_vec(&*new, 8192, 4096), vec![0; 4096]);
    new.write_at(&pattern(4, 4096), 4096).unwrap();
    new.flush().unwrap();
    assert_eq!(nodes[0].checksum(), nodes[1].checksum());
    assert!(new_states.calls.lock().is_empty());
    for s in new.status() {
        assert_eq!(s.state, ReplicaState::InSync);
    }

    // An older generation cannot open any more either.
    let err = Mirror::open(config(
        "a",
        5,
        None,
        ReplicaState::InSync,
        vec![nodes[1].peer(ReplicaState::InSync)],
        FakeStates::new(),
    ))
    .unwrap_err();
    assert!(
        matches!(
            err,
            ReplicationError::Refused {
                code: ErrorCode::Fenced,
                ..
            }
        ),
        "{err}"
    );
    old.close();
    new.close();
}

#[test]
fn diskless_mirror_reads_and_writes_through_peers() {
    let mut nodes: Vec<Node> = ["b", "c"].iter().map(|n| Node::new(n)).collect();
    let states = FakeStates::new();
    let m = Mirror::open(config(
        "d",
        1,
        None,
        ReplicaState::InSync,
        vec![
            nodes[0].peer(ReplicaState::InSync),
            nodes[1].peer(ReplicaState::InSync),
        ],
        states.clone(),
    ))
    .unwrap();
    assert_eq!(m.size(), PARAMS.size);
    write_blocks(&*m, 0, 0..300);
    // Larger than one replicated write (8 MiB) and one peer read (4 MiB).
    let big = pattern(7, 9 * MIB as usize + 5);
    m.write_at(&big, 10 * MIB + 3).unwrap();
    m.flush().unwrap();
    assert_eq!(read_vec(&*m, 10 * MIB + 3, big.len()), big);
    assert_eq!(read_vec(&*m, 299 * BLOCK, 4096), pattern(299, 4096));
    assert_eq!(nodes[0].checksum(), nodes[1].checksum());
    assert!(m.status().iter().all(|s| !s.local));

    // One peer goes: reads and writes go on through the other.
    nodes[0].stop();
    write_blocks(&*m, 500, 1000..1010);
    assert_eq!(read_vec(&*m, 1005 * BLOCK, 4096), pattern(1505, 4096));
    assert_eq!(read_vec(&*m, 10 * MIB + 3, big.len()), big);
    assert_eq!(states.recorded_for("b"), vec![ReplicaState::Outdated]);
    nodes[0].restart();
    wait_in_sync(&m, "b");
    m.flush().unwrap();
    assert_eq!(nodes[0].checksum(), nodes[1].checksum());
    assert_eq!(status_of(&m, "b").resync_sent_bytes, 10 * BLOCK);

    // Both gone: IO fails, nothing is acknowledged.
    nodes[0].stop();
    nodes[1].stop();
    assert!(m.write_at(&[1; 4096], 0).is_err());
    assert!(m.read_at(&mut [0; 4096], 0).is_err());
    m.close();
}

#[test]
fn outdated_replicas_get_a_full_resync() {
    let nodes: Vec<Node> = ["a", "b", "c"].iter().map(|n| Node::new(n)).collect();
    // a holds data; b and c hold stale garbage.
    {
        let a = nodes[0].local();
        for k in 0..100u64 {
            a.write_at(1, &pattern(k, 4096), k * 3 * BLOCK).unwrap();
        }
        a.flush(1).unwrap();
        for n in &nodes[1..] {
            let r = n.local();
            r.write_at(1, &pattern(777, 64 << 10), 40 * MIB).unwrap();
            r.flush(1).unwrap();
        }
    }
    let data_bytes = 100 * BLOCK;

    // Diskless, a in sync, b outdated: b is resynced from a, peer to peer.
    let states = FakeStates::new();
    let m = Mirror::open(config(
        "d",
        2,
        None,
        ReplicaState::InSync,
        vec![
            nodes[0].peer(ReplicaState::InSync),
            nodes[1].peer(ReplicaState::Outdated),
        ],
        states.clone(),
    ))
    .unwrap();
    // Writes go on meanwhile.
    m.write_at(&pattern(5000, 4096), 50 * MIB).unwrap();
    wait_in_sync(&m, "b");
    m.flush().unwrap();
    assert_eq!(nodes[0].checksum(), nodes[1].checksum());
    let sent = status_of(&m, "b").resync_sent_bytes;
    // Zero ranges go as discards: only the data is sent (plus at most the
    // block written during the resync).
    assert!(
        (data_bytes..=data_bytes + BLOCK).contains(&sent),
        "sent {sent}"
    );
    assert_eq!(
        states.recorded_for("b"),
        vec![ReplicaState::Resyncing, ReplicaState::InSync]
    );
    m.close();
    drop(m);

    // c attaches with its own replica outdated: resynced from the peers.
    let states = FakeStates::new();
    let m = Mirror::open(config(
        "c",
        3,
        Some(nodes[2].local()),
        ReplicaState::Outdated,
        vec![
            nodes[0].peer(ReplicaState::InSync),
            nodes[1].peer(ReplicaState::InSync),
        ],
        states.clone(),
    ))
    .unwrap();
    // Reads come from an in-sync peer meanwhile.
    assert_eq!(read_vec(&*m, 3 * BLOCK, 4096), pattern(1, 4096));
    wait_in_sync(&m, "c");
    assert_eq!(nodes[0].checksum(), nodes[2].checksum());
    let c = status_of(&m, "c");
    assert!(c.local);
    assert_eq!(c.resync_sent_bytes, data_bytes + BLOCK);
    assert_eq!(
        states.recorded_for("c"),
        vec![ReplicaState::Resyncing, ReplicaState::InSync]
    );
    m.close();

    // Nothing in sync that can be reached: refused.
    let err = Mirror::open(config(
        "c",
        4,
        Some(nodes[2].local()),
        ReplicaState::Outdated,
        vec![nodes[1].peer(ReplicaState::Outdated)],
        FakeStates::new(),
    ))
    .unwrap_err();
    assert!(
        matches!(err, ReplicationError::NoInSyncReplica { .. }),
        "{err}"
    );
}

#[test]
fn a_state_store_that_cannot_record_fails_the_write() {
    for fail in [Fail::Fenced, Fail::Unavailable] {
        let mut nodes: Vec<Node> = ["a", "b"].iter().map(|n| Node::new(n)).collect();
        let states = FakeStates::new();
        let m = Mirror::open(config_a_b(&nodes, 1, states.clone())).unwrap();
        m.write_at(&pattern(1, 4096), 0).unwrap();
        m.flush().unwrap();

        *states.fail.lock() = Some(fail);
        nodes[1].stop();
        let err = m.write_at(&pattern(2, 4096), 4096).unwrap_err();
        assert!(err.to_string().contains("fenced"), "{fail:?}: {err}");
        assert!(m.is_fenced());
        // The failed record was attempted, and is the only call.
        assert_eq!(
            *states.calls.lock(),
            vec![("b".to_string(), ReplicaState::Outdated, false)]
        );
        // Nothing more is acknowledged, even once the store is back.
        *states.fail.lock() = None;
        assert!(m.write_at(&pattern(3, 4096), 8192).is_err());
        assert!(m.flush().is_err());
        assert!(m.discard(0, 4096).is_err());
        assert!(m.read_at(&mut [0; 4096], 0).is_err());
        m.close();
        assert!(states.recorded().is_empty(), "{fail:?}");
    }
}

#[test]
fn another_protocol_version_is_refused() {
    let node = Node::new("b");
    let mut s = TcpStream::connect(node.addr).unwrap();
    let mut hello = Hello::new(VOL, 1, "a", PARAMS);
    hello.version = wire::PROTOCOL_VERSION + 1;
    wire::write_frame(&mut s, &Frame::Hello(hello)).unwrap();
    match wire::read_frame(&mut s).unwrap() {
        Some(Frame::Error { code, message, .. }) => {
            assert_eq!(code, ErrorCode::Version);
            assert!(
                message.contains(&format!("version {}", wire::PROTOCOL_VERSION + 1)),
                "{message}"
            );
        }
        other => panic!("expected a version error, got {other:?}"),
    }
    // The connection is closed, and no replica was made.
    assert!(wire::read_frame(&mut s).unwrap().is_none());
    assert!(!node.dir.path().join(VOL).exists());

    // A current Hello is accepted and creates the replica.
    let mut s = TcpStream::connect(node.addr).unwrap();
    wire::write_frame(&mut s, &Frame::Hello(Hello::new(VOL, 1, "a", PARAMS))).unwrap();
    match wire::read_frame(&mut s).unwrap() {
        Some(Frame::HelloOk {
            version, node: n, ..
        }) => {
            assert_eq!(version, wire::PROTOCOL_VERSION);
            assert_eq!(n, "b");
        }
        other => panic!("expected HelloOk, got {other:?}"),
    }
    assert!(node.dir.path().join(VOL).join("header").exists());
    // Requests are answered by id, errors included.
    wire::write_frame(
        &mut s,
        &Frame::Request {
            id: 42,
            req: wire::Request::Read {
                offset: PARAMS.size,
                len: 4096,
            },
        },
    )
    .unwrap();
    match wire::read_frame(&mut s).unwrap() {
        Some(Frame::Error { id, code, .. }) => {
            assert_eq!(id, 42);
            assert_eq!(code, ErrorCode::Invalid);
        }
        other => panic!("expected an out-of-range error, got {other:?}"),
    }
    // Bad volume ids and garbage are refused.
    let mut s = TcpStream::connect(node.addr).unwrap();
    wire::write_frame(&mut s, &Frame::Hello(Hello::new("../etc", 1, "a", PARAMS))).unwrap();
    assert!(matches!(
        wire::read_frame(&mut s).unwrap(),
        Some(Frame::Error {
            code: ErrorCode::Invalid,
            ..
        })
    ));
    let mut s = TcpStream::connect(node.addr).unwrap();
    std::io::Write::write_all(&mut s, b"\x00\x00\x00\x05GET /").unwrap();
    assert!(matches!(
        wire::read_frame(&mut s).unwrap(),
        Some(Frame::Error {
            code: ErrorCode::Protocol,
            ..
        })
    ));
}

/// Say Hello for generation 1 on a new connection to `node`.
fn hello(node: &Node) -> TcpStream {
    let mut s = TcpStream::connect(node.addr).unwrap();
    wire::write_frame(&mut s, &Frame::Hello(Hello::new(VOL, 1, "a", PARAMS))).unwrap();
    let ok = wire::read_frame(&mut s).unwrap();
    assert!(matches!(ok, Some(Frame::HelloOk { .. })), "{ok:?}");
    s
}

/// Send `req` as request `id` and read the answer.
fn ask(s: &mut TcpStream, id: u64, req: wire::Request) -> Frame {
    wire::write_frame(s, &Frame::Request { id, req }).unwrap();
    wire::read_frame(s).unwrap().expect("an answer")
}

#[test]
fn a_link_replaced_by_a_newer_one_runs_nothing_more() {
    // The attached node gave up on a link and made a new one (same
    // generation): what still comes on the old one must not run, or a late
    // write or log clear could land after the new link's resync.
    let node = Node::new("b");
    let mut old = hello(&node);
    let write = |v: u8| wire::Request::Write {
        offset: 0,
        data: vec![v; 4096],
    };
    assert!(matches!(ask(&mut old, 1, write(1)), Frame::Ok { id: 1 }));
    let mut new = hello(&node);
    match ask(&mut old, 2, write(2)) {
        Frame::Error { id, code, message } => {
            assert_eq!((id, code), (2, ErrorCode::Busy));
            assert!(message.contains("replaced"), "{message}");
        }
        other => panic!("expected the old link's write refused, got {other:?}"),
    }
    let clear = wire::Request::Deactivate {
        first: 0,
        count: 1,
        seq: 1,
    };
    assert!(matches!(ask(&mut old, 3, clear), Frame::Error { .. }));
    let read = wire::Request::Read {
        offset: 0,
        len: 4096,
    };
    match ask(&mut new, 4, read) {
        Frame::Data { id: 4, data } => assert_eq!(data, [1; 4096], "the late write ran"),
        other => panic!("expected data, got {other:?}"),
    }
    assert_eq!(node.local().activity(1).unwrap(), [1], "the late clear ran");
    assert!(matches!(ask(&mut new, 5, write(3)), Frame::Ok { id: 5 }));
}

#[test]
fn a_failing_local_disk_is_detached_and_resynced_while_peers_carry_on() {
    // Node a's disk holds 8 MiB: a's writes fail (ENOSPC) past that.
    let small = SmallTmpfs::new(8 * MIB);
    let a = Node::new_in("a", small.path());
    let b = Node::new("b");
    let states = FakeStates::new();
    let m = Mirror::open(config(
        "a",
        1,
        Some(a.local()),
        ReplicaState::InSync,
        vec![b.peer(ReplicaState::InSync)],
        states.clone(),
    ))
    .unwrap();

    let chunk = MIB as usize;
    let total = 32 * MIB;
    for k in 0..total / MIB {
        m.write_at(&pattern(500 + k, chunk), k * MIB)
            .expect("writes go on with the peer when the local disk fails");
        if k % 8 == 7 {
            m.flush().expect("flushes go on with the peer");
        }
    }
    // Detached and recorded outdated (its thread may be retrying a resync
    // already, which fails while the disk is full).
    let sa = status_of(&m, "a");
    assert_ne!(sa.state, ReplicaState::InSync, "{sa:?}");
    assert_eq!(
        states.recorded_for("a").first(),
        Some(&ReplicaState::Outdated)
    );
    assert!(states.recorded_for("b").is_empty());
    // Reads come from b now: all of it, also what a never got.
    for k in 0..total / MIB {
        assert_eq!(
            read_vec(&*m, k * MIB, chunk),
            pattern(500 + k, chunk),
            "MiB {k}"
        );
    }

    // The disk gets room: a is reattached and resynced in the background.
    small.resize(256 * MIB);
    wait_in_sync(&m, "a");
    m.write_at(&pattern(9, chunk), 40 * MIB).unwrap();
    m.flush().unwrap();
    assert_eq!(a.checksum(), b.checksum(), "a resynced from b");
    assert_eq!(states.recorded_for("a").last(), Some(&ReplicaState::InSync));
    m.close();
}

#[test]
fn a_local_disk_error_without_an_in_sync_peer_fails_the_io_and_keeps_the_replica() {
    let small = SmallTmpfs::new(4 * MIB);
    let a = Node::new_in("a", small.path());
    let mut b = Node::new("b");
    // b is outdated and down (so it cannot catch up): a alone holds the volume.
    b.stop();
    let states = FakeStates::new();
    let m = Mirror::open(config(
        "a",
        1,
        Some(a.local()),
        ReplicaState::InSync,
        vec![b.peer(ReplicaState::Outdated)],
        states.clone(),
    ))
    .unwrap();
    m.write_at(&pattern(1, MIB as usize), 0).unwrap();
    let mut failed = false;
    for k in 1..16 {
        if m.write_at(&pattern(1 + k, MIB as usize), k * MIB).is_err() {
            failed = true;
            break;
        }
    }
    assert!(failed, "a full disk fails a write");
    // a stays the volume's replica: what it holds is still read.
    assert_eq!(status_of(&m, "a").state, ReplicaState::InSync);
    assert_eq!(read_vec(&*m, 0, MIB as usize), pattern(1, MIB as usize));
    assert!(states.recorded_for("a").is_empty());
    m.close();
}

#[test]
fn replicas_that_differ_after_an_unreleased_attach_are_repaired() {
    let nodes: Vec<Node> = ["a", "b", "c"].iter().map(|n| Node::new(n)).collect();
    let open = |generation: Generation, verify: bool| {
        let mut cfg = config_a_bc(&nodes, generation, FakeStates::new());
        cfg.verify = verify;
        Mirror::open(cfg).unwrap()
    };
    let wait_verified = |m: &Mirror| {
        wait_until("verification finished", || {
            m.verification().is_some_and(|v| v.finished)
        });
        m.verification().unwrap()
    };
    let m = open(1, false);
    assert_eq!(m.verification(), None);
    m.write_at(&pattern(1, (8 * MIB) as usize), 0).unwrap();
    m.flush().unwrap();
    // The attach ends unreleased with writes in flight: b got one that a
    // and c did not, c one that nobody else got.
    m.close();
    drop(m);
    let b = nodes[1].local();
    b.write_at(1, &pattern(2, 8192), 3 * MIB + 4096).unwrap();
    let c = nodes[2].local();
    c.write_at(1, &pattern(3, 4096), 40 * MIB).unwrap();
    drop((b, c));
    assert_ne!(nodes[0].checksum(), nodes[1].checksum());

    let m = open(2, true);
    let v = wait_verified(&m);
    // Only the extents some replica's activity log names: the first
    // attach's 8 MiB (extents 0 and 1) and c's lone write (extent 10).
    assert_eq!(v.total_bytes, 3 * activity::EXTENT, "{v:?}");
    assert_eq!(v.done_bytes, v.total_bytes);
    // One 1 MiB chunk on b, one on c.
    assert_eq!(v.repaired_bytes, 2 * MIB);
    let sums: Vec<String> = nodes.iter().map(Node::checksum).collect();
    assert!(sums.iter().all(|s| *s == sums[0]), "{sums:?}");
    // a, where reads come from, decided: the writes nobody acknowledged are gone.
    assert_eq!(
        read_vec(&*m, 0, (8 * MIB) as usize),
        pattern(1, (8 * MIB) as usize)
    );
    assert_eq!(read_vec(&*m, 40 * MIB, 4096), vec![0; 4096]);
    m.close();
    drop(m);

    // Equal replicas: nothing to repair. Detached cleanly (settled), the
    // logs are cleared, and what is written next is all they name.
    let m = open(3, true);
    assert_eq!(wait_verified(&m).repaired_bytes, 0);
    m.settle();
    m.close();
    drop(m);
    let m = open(4, true);
    let v = wait_verified(&m);
    assert_eq!((v.total_bytes, v.repaired_bytes), (0, 0), "{v:?}");
    m.write_at(&pattern(4, 4096), 20 * MIB).unwrap();
    m.close();
    drop(m);
    let b = nodes[1].local();
    b.write_at(4, &pattern(5, 4096), 50 * MIB).unwrap();
    drop(b);
    let m = open(5, true);
    let v = wait_verified(&m);
    assert_eq!(
        v.total_bytes,
        2 * activity::EXTENT,
        "extents 5 and 12: {v:?}"
    );
    assert_eq!(v.repaired_bytes, MIB);
    let sums: Vec<String> = nodes.iter().map(Node::checksum).collect();
    assert!(sums.iter().all(|s| *s == sums[0]), "{sums:?}");
    m.close();
}

/// The activity logs stay short while the volume is in use: what an
/// earlier attach left is cleared once compared, and past the most active
/// extents the least recently written are cleared; so an unreleased
/// attach makes the next one compare only the extents written last.
#[test]
fn activity_logs_keep_only_the_recently_written_extents() {
    let nodes: Vec<Node> = ["a", "b"].iter().map(|n| Node::new(n)).collect();
    let open = |generation: Generation, verify: bool| {
        let mut cfg = config_a_b(&nodes, generation, FakeStates::new());
        cfg.verify = verify;
        cfg.hot_extents = 4;
        Mirror::open(cfg).unwrap()
    };
    let active = |n: &Node, generation: Generation| -> Vec<u64> {
        activity::set_bits(&n.local().activity(generation).unwrap()).collect()
    };
    let m = open(1, false);
    for e in [2, 9, 4, 11, 6, 13, 8] {
        m.write_at(&pattern(e, 4096), e * activity::EXTENT + 8192)
            .unwrap();
        m.flush().unwrap();
    }
    // 7 active, more than 4: cleared (down to 3 each time it is over),
    // the least recently written first, on every replica alike.
    wait_until("the least recently written extents cleared", || {
        let kept = active(&nodes[0], 1);
        kept.len() <= 4 && kept == active(&nodes[1], 1)
    });
    // Ended unreleased. What the logs hold is read once the mirror is
    // closed: its thread may have been clearing one more extent (down to
    // 3) when the wait saw 4, and a clear cut by the close may have
    // reached one replica only; the next attach compares their union.
    m.close();
    drop(m);
    let mut kept = active(&nodes[0], 1);
    kept.extend(active(&nodes[1], 1));
    kept.sort_unstable();
    kept.dedup();
    assert!(kept.len() <= 4, "cleared down to the most active: {kept:?}");
    for e in [6, 8, 13] {
        assert!(kept.contains(&e), "{e}, written last, is kept: {kept:?}");
    }
    // b gets a write nobody acknowledged.
    nodes[1]
        .local()
        .write_at(1, &pattern(99, 4096), 15 * activity::EXTENT)
        .unwrap();
    let m = open(2, true);
    wait_until("verification finished", || {
        m.verification().is_some_and(|v| v.finished)
    });
    let v = m.verification().unwrap();
    assert_eq!(
        v.total_bytes,
        (kept.len() as u64 + 1) * activity::EXTENT,
        "{kept:?} and 15: {v:?}"
    );
    assert_eq!(v.repaired_bytes, MIB, "{v:?}");
    assert_eq!(nodes[0].checksum(), nodes[1].checksum());
    // Compared: the earlier attach's extents are cleared, this one's kept.
    m.write_at(&pattern(3, 4096), 0).unwrap();
    wait_until("the compared extents cleared", || {
        active(&nodes[0], 2) == [0] && active(&nodes[1], 2) == [0]
    });
    m.settle();
    m.close();
    drop(m);

    // b outdated, a holding a chunk it lacks: the resync copies it, which
    // marks it active on b; once b is in sync that is cleared too.
    nodes[0]
        .local()
        .write_at(2, &pattern(7, 4096), 14 * activity::EXTENT)
        .unwrap();
    let mut cfg = config(
        "a",
        3,
        Some(nodes[0].local()),
        ReplicaState::InSync,
        vec![nodes[1].peer(ReplicaState::Outdated)],
        FakeStates::new(),
    );
    cfg.hot_extents = 4;
    let m = Mirror::open(cfg).unwrap();
    wait_until("b resynced and its copies' extents cleared", || {
        status_of(&m, "b").state == ReplicaState::InSync
            && active(&nodes[1], 3).is_empty()
            && active(&nodes[0], 3).is_empty()
    });
    assert_eq!(nodes[0].checksum(), nodes[1].checksum());
    m.close();
}

/// The extents active in `n`'s activity log.
fn active(n: &Node, generation: Generation) -> Vec<u64> {
    activity::set_bits(&n.local().activity(generation).unwrap()).collect()
}

/// What an outdated replica misses stays on disk in the others' activity
/// logs (nothing is cleared from them while it is out of sync): through
/// clean detaches, attaches that cannot reach it and a crash of the
/// attached node alike, it is then resynced from them, not compared whole.
#[test]
fn an_outdated_replica_is_resynced_from_the_activity_logs() {
    let mut nodes: Vec<Node> = ["a", "b"].iter().map(|n| Node::new(n)).collect();
    let extent_block = |e: u64| e * activity::EXTENT / BLOCK + 3;
    let states = FakeStates::new();
    let m = Mirror::open(config_a_b(&nodes, 1, states.clone())).unwrap();
    m.write_at(&pattern(1, (8 * MIB) as usize), 0).unwrap();
    m.settle();
    assert!(active(&nodes[0], 1).is_empty() && active(&nodes[1], 1).is_empty());
    nodes[1].stop();
    write_blocks(&*m, 10, [extent_block(5)].into_iter());
    m.flush().unwrap();
    assert_eq!(status_of(&m, "b").state, ReplicaState::Outdated);
    m.settle();
    m.close();
    drop(m);
    assert_eq!(active(&nodes[0], 1), [5], "kept through a clean detach");

    let open = |generation: Generation, states: &Arc<FakeStates>, nodes: &[Node]| {
        Mirror::open(config(
            "a",
            generation,
            Some(nodes[0].local()),
            ReplicaState::InSync,
            vec![nodes[1].peer(ReplicaState::Outdated)],
            states.clone(),
        ))
        .unwrap()
    };
    let states = states.next();
    let m = open(2, &states, &nodes);
    write_blocks(&*m, 20, [extent_block(9)].into_iter());
    m.flush().unwrap();
    m.settle();
    m.close();
    drop(m);
    assert_eq!(active(&nodes[0], 2), [5, 9], "kept by an attach without b");
    let states = states.next();
    let m = open(3, &states, &nodes);
    write_blocks(&*m, 30, [extent_block(12)].into_iter());
    m.flush().unwrap();
    // Not settled: the attached node is killed.
    m.close();
    drop(m);
    assert_eq!(active(&nodes[0], 3), [5, 9, 12]);

    nodes[1].restart();
    let states = states.next();
    let m = open(4, &states, &nodes);
    wait_in_sync(&m, "b");
    m.flush().unwrap();
    assert_eq!(nodes[0].checksum(), nodes[1].checksum());
    let b = status_of(&m, "b");
    // The three extents the logs name were compared, not the 64 MiB
    // device, and only each one's written block was sent.
    assert_eq!(b.resynced_bytes, 3 * activity::EXTENT, "{b:?}");
    assert_eq!(b.resync_sent_bytes, 3 * BLOCK, "{b:?}");
    // Every replica in sync: the logs are cleared again.
    wait_until("the logs cleared once b is in sync", || {
        active(&nodes[0], 4).is_empty() && active(&nodes[1], 4).is_empty()
    });
    m.close();
}

/// An in-sync replica out of reach when the attach after an unreleased
/// one compares the replicas is compared once it is back, where its own
/// log or the others' say writes went: a write then in flight may have
/// reached it alone.
#[test]
fn a_replica_away_after_an_unreleased_attach_is_compared_once_back() {
    let mut nodes: Vec<Node> = ["a", "b"].iter().map(|n| Node::new(n)).collect();
    let states = FakeStates::new();
    let m = Mirror::open(config_a_b(&nodes, 1, states.clone())).unwrap();
    m.write_at(&pattern(1, (8 * MIB) as usize), 0).unwrap();
    m.settle();
    m.write_at(&pattern(2, 4096), 3 * activity::EXTENT).unwrap();
    m.flush().unwrap();
    m.close();
    drop(m);
    // Ended unreleased: b got a write nobody acknowledged, then went away.
    nodes[1]
        .local()
        .write_at(1, &pattern(3, 4096), 7 * activity::EXTENT + 8192)
        .unwrap();
    nodes[1].stop();

    let states = states.next();
    let mut cfg = config_a_b(&nodes, 2, states.clone());
    cfg.verify = true;
    let m = Mirror::open(cfg).unwrap();
    wait_until("verification finished", || {
        m.verification().is_some_and(|v| v.finished)
    });
    m.write_at(&pattern(4, 4096), 2 * activity::EXTENT).unwrap();
    m.flush().unwrap();
    nodes[1].restart();
    wait_in_sync(&m, "b");
    m.flush().unwrap();
    assert_eq!(nodes[0].checksum(), nodes[1].checksum());
    // a decided: the write nobody acknowledged is gone.
    assert_eq!(
        read_vec(&*m, 7 * activity::EXTENT + 8192, 4096),
        vec![0; 4096]
    );
    let b = status_of(&m, "b");
    assert_eq!(b.resynced_bytes, 3 * activity::EXTENT, "2, 3 and 7: {b:?}");
    m.close();
}

/// A replica added onto a node that still holds an old image of the
/// volume (a replica removed earlier, its files not yet swept) is copied
/// whole, and stays so for the attach after one that ended mid-copy: its
/// log, which knows nothing of what the volume got meanwhile, is made all
/// active before anything is recorded of it.
/// DRBD's c-min-rate: a resync slows to `--resync-busy-rate` while the
/// volume serves IO, and goes as fast as it can once the volume is idle.
#[test]
fn a_resync_yields_to_the_volumes_io_and_speeds_up_when_it_stops() {
    let nodes: Vec<Node> = ["a", "b"].iter().map(|n| Node::new(n)).collect();
    let states = FakeStates::new();
    let mut cfg = config(
        "a",
        1,
        Some(nodes[0].local()),
        ReplicaState::InSync,
        vec![],
        states,
    );
    // 16 MiB at 64 KiB/s: four minutes while the volume is busy.
    cfg.resync = ResyncPace {
        max: None,
        busy: Some(64 << 10),
    };
    let m = Arc::new(Mirror::open(cfg).unwrap());
    m.write_at(&pattern(1, (16 * MIB) as usize), 0).unwrap();
    m.flush().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (m, stop) = (m.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                m.read_at(&mut buf, (n % 4096) * 4096).unwrap();
                n += 1;
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    m.add_replica("b", NewReplica::Remote(nodes[1].addr))
        .unwrap();
    wait_until("b's resync yielding to the reads", || {
        status_of(&m, "b").resync.is_some_and(|p| p.yielding)
    });
    let during = status_of(&m, "b").resync.unwrap();
    assert!(during.done_bytes < during.total_bytes, "{during:?}");
    stop.store(true, Ordering::Relaxed);
    reader.join().unwrap();
    // Idle: the rest goes unpaced (at 64 KiB/s it would outlast the wait).
    wait_in_sync(&m, "b");
    m.close();
}

#[test]
fn a_replica_added_over_an_old_image_is_copied_whole_across_attaches() {
    let nodes: Vec<Node> = ["a", "b"].iter().map(|n| Node::new(n)).collect();
    {
        let b = nodes[1].local();
        b.write_at(1, &pattern(9, 4096), 30 * MIB).unwrap();
        b.deactivate(1, 0, u64::MAX, 1).unwrap();
    }
    let states = FakeStates::new();
    let mut cfg = config(
        "a",
        2,
        Some(nodes[0].local()),
        ReplicaState::InSync,
        vec![],
        states.clone(),
    );
    // Paced, so that the attach ends with b's copy under way.
    cfg.resync = ResyncPace::fixed(Some(8 * MIB));
    let m = Mirror::open(cfg).unwrap();
    m.write_at(&pattern(1, (8 * MIB) as usize), 0).unwrap();
    m.settle();
    m.add_replica("b", NewReplica::Remote(nodes[1].addr))
        .unwrap();
    wait_until("b resyncing", || {
        status_of(&m, "b").state == ReplicaState::Resyncing
    });
    assert_ne!(status_of(&m, "b").state, ReplicaState::InSync);
    m.close();
    drop(m);
    assert_eq!(active(&nodes[1], 2).len(), 16, "b's log: all active");

    let states = states.next();
    assert!(states.incarnation("b").is_some());
    let m = Mirror::open(config(
        "a",
        3,
        Some(nodes[0].local()),
        ReplicaState::InSync,
        vec![nodes[1].peer(ReplicaState::Resyncing)],
        states,
    ))
    .unwrap();
    wait_in_sync(&m, "b");
    m.flush().unwrap();
    assert_eq!(nodes[0].checksum(), nodes[1].checksum());
    assert_eq!(status_of(&m, "b").resynced_bytes, PARAMS.size);
    m.close();
}

/// A replica whose files are put back from a backup keeps its image's
/// incarnation, and its state says in sync; but it missed the attaches the
/// others had since (each reaches every in-sync replica or records it
/// outdated first), so its generation is older: it is recorded outdated
/// and resynced whole.
#[test]
fn an_in_sync_replica_rolled_back_to_a_backup_is_resynced_whole() {
    let mut nodes: Vec<Node> = ["a", "b"].iter().map(|n| Node::new(n)).collect();
    let states = FakeStates::new();
    detached_after_a_write(&nodes, 1, &states, 0);
    let backup = tempfile::tempdir().unwrap();
    cp_a(&nodes[1].replicas.dir(VOL).unwrap(), backup.path());

    let states = states.next();
    detached_after_a_write(&nodes, 2, &states, 5 * MIB);
    put_back(&mut nodes[1], backup.path());
    assert_ne!(nodes[0].checksum(), nodes[1].checksum());

    let states = states.next();
    let m = Mirror::open(config_a_b(&nodes, 3, states.clone())).unwrap();
    assert_eq!(states.recorded_for("b")[0], ReplicaState::Outdated);
    wait_in_sync(&m, "b");
    m.flush().unwrap();
    assert_eq!(nodes[0].checksum(), nodes[1].checksum());
    assert_eq!(status_of(&m, "b").resynced_bytes, PARAMS.size);
    assert_eq!(read_vec(&*m, 5 * MIB, 4096), pattern(2, 4096));
    m.close();
}

/// An outdated replica rolled back to a backup taken before the logs were
/// last cleared cannot be narrowed by them (they were cleared of what the
/// backup lacks): its log's stamp is older than the others', so it is
/// resynced whole.
#[test]
fn an_outdated_replica_rolled_back_past_a_clear_is_resynced_whole() {
    let mut nodes: Vec<Node> = ["a", "b"].iter().map(|n| Node::new(n)).collect();
    let (backup, states) = b_backed_up_before_a_write(&nodes);
    // b away for an attach (outdated), then put back from the backup.
    nodes[1].stop();
    let states = states.next();
    detached_after_a_write(&nodes, 3, &states, 5 * activity::EXTENT);
    put_back(&mut nodes[1], backup.path());

    let states = states.next();
    let m = Mirror::open(config(
        "a",
        4,
        Some(nodes[0].local()),
        ReplicaState::InSync,
        vec![nodes[1].peer(ReplicaState::Outdated)],
        states,
    ))
    .unwrap();
    wait_in_sync(&m, "b");
    m.flush().unwrap();
    assert_eq!(nodes[0].checksum(), nodes[1].checksum());
    assert_eq!(status_of(&m, "b").resynced_bytes, PARAMS.size);
    m.close();
}

/// The only in-sync replica, put back from a backup, has no other in-sync
/// one to be compared with: the attach that last got through is recorded
/// (`StateStore::reached`), so it is still found rolled back, recorded
/// outdated, and the attach refused, saying why and how to go on. Then,
/// accepted as the volume's data (what `dunnage replica accept` records:
/// it in sync, the others outdated with their incarnations forgotten, no
/// reached generation), the next attach copies the other replica whole
/// from it, although the logs were cleared of what the backup lacks.
#[test]
fn a_lone_in_sync_replica_rolled_back_is_refused_until_accepted() {
    let mut nodes: Vec<Node> = ["a", "b"].iter().map(|n| Node::new(n)).collect();
    let (backup, states) = b_backed_up_before_a_write(&nodes);
    let states = states.next();
    detached_after_a_write(&nodes, 3, &states, 5 * activity::EXTENT);
    assert_eq!(*states.reached.lock(), 3);
    put_back(&mut nodes[1], backup.path());

    // a is outdated (say it missed writes while away): b is the only
    // replica recorded in sync.
    let states = states.next();
    let open = |generation, states: &Arc<FakeStates>| {
        Mirror::open(config(
            "a",
            generation,
            Some(nodes[0].local()),
            ReplicaState::Outdated,
            vec![nodes[1].peer(ReplicaState::InSync)],
            states.clone(),
        ))
    };
    let Err(err) = open(4, &states) else {
        panic!("the attach served a rolled-back lone replica");
    };
    assert!(
        matches!(err, ReplicationError::NoInSyncReplica { .. }),
        "{err}"
    );
    let text = err.to_string();
    for want in [
        "b: it has seen attach generation 1, not 3",
        "dunnage replica accept",
    ] {
        assert!(text.contains(want), "{want:?} missing from: {text}");
    }
    assert_eq!(states.recorded_for("b"), vec![ReplicaState::Outdated]);
    assert_eq!(
        *states.reached.lock(),
        3,
        "a refused attach reached nothing"
    );

    let states = states.next();
    states.incarnations.lock().remove("a");
    *states.reached.lock() = 0;
    let m = open(5, &states).unwrap();
    wait_in_sync(&m, "a");
    m.flush().unwrap();
    assert_eq!(read_vec(&*m, 0, 4096), pattern(1, 4096));
    for at in [3, 5] {
        assert_eq!(read_vec(&*m, at * activity::EXTENT, 4096), vec![0; 4096]);
    }
    assert_eq!(nodes[0].checksum(), nodes[1].checksum());
    assert_eq!(status_of(&m, "a").resynced_bytes, PARAMS.size);
    m.close();
    assert_eq!(*states.reached.lock(), 5);
}

/// Attach 1 writes at 0, then b's replica is copied aside (returned), then
/// attach 2 writes at extent 3 (settled: cleared from the logs by the
/// next attach's). Returns the backup and attach 2's states.
fn b_backed_up_before_a_write(nodes: &[Node]) -> (tempfile::TempDir, Arc<FakeStates>) {
    let states = FakeStates::new();
    detached_after_a_write(nodes, 1, &states, 0);
    let backup = tempfile::tempdir().unwrap();
    cp_a(&nodes[1].replicas.dir(VOL).unwrap(), backup.path());
    let states = states.next();
    detached_after_a_write(nodes, 2, &states, 3 * activity::EXTENT);
    (backup, states)
}

/// An attach of a with b as its peer that writes block `pattern(generation)`
/// at `offset`, then detaches cleanly; b's replica is closed after.
fn detached_after_a_write(
    nodes: &[Node],
    generation: Generation,
    states: &Arc<FakeStates>,
    offset: u64,
) {
    let m = Mirror::open(config_a_b(nodes, generation, states.clone())).unwrap();
    m.write_at(&pattern(generation, 4096), offset).unwrap();
    m.settle();
    m.close();
    drop(m);
    b_closed(nodes);
}

/// Once b's replica is closed (its links gone).
fn b_closed(nodes: &[Node]) {
    wait_until("b's replica closed", || {
        nodes[1].replicas.get(VOL).is_none()
    })
}

/// Put `node`'s replica back from the copy in `backup`, its server stopped
/// meanwhile (if it runs).
fn put_back(node: &mut Node, backup: &std::path::Path) {
    if node.server.is_some() {
        node.stop();
    }
    let dir = node.replicas.dir(VOL).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    cp_a(&backup.join(VOL), &dir);
    node.restart();
}

/// `cp -a from to`.
fn cp_a(from: &std::path::Path, to: &std::path::Path) {
    let ok = std::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap()
        .success();
    assert!(ok, "cp -a {} {}", from.display(), to.display());
}

#[test]
fn a_full_resync_sends_only_the_chunks_that_differ() {
    let mut nodes: Vec<Node> = ["a", "b"].iter().map(|n| Node::new(n)).collect();
    let open = |nodes: &[Node], generation: Generation, b_state: ReplicaState| {
        let mut cfg = config(
            "a",
            generation,
            Some(nodes[0].local()),
            ReplicaState::InSync,
            vec![nodes[1].peer(b_state)],
            FakeStates::new(),
        );
        // Paced (64 MiB/s: about a second for the device): it still ends.
        cfg.resync = ResyncPace::fixed(Some(64 * MIB));
        Mirror::open(cfg).unwrap()
    };
    let m = open(&nodes, 1, ReplicaState::InSync);
    m.write_at(&pattern(1, (8 * MIB) as usize), 0).unwrap();
    m.flush().unwrap();
    // b misses two small writes, then this primary goes away: what b
    // missed is known nowhere any more.
    nodes[1].stop();
    m.write_at(&pattern(2, 4096), MIB + 4096).unwrap();
    m.write_at(&pattern(3, 8192), 5 * MIB + 8192).unwrap();
    m.flush().unwrap();
    m.close();
    drop(m);
    nodes[1].restart();

    let m = open(&nodes, 2, ReplicaState::Outdated);
    wait_in_sync(&m, "b");
    assert_eq!(nodes[0].checksum(), nodes[1].checksum());
    // The two 1 MiB chunks that differ, not the 8 MiB of data.
    assert_eq!(status_of(&m, "b").resync_sent_bytes, 2 * MIB);
    m.close();
}

/// The snapshot names each replica of `nodes` holds.
fn snapshot_names(nodes: &[Node]) -> Vec<Vec<String>> {
    nodes
        .iter()
        .map(|n| {
            let r = n.local();
            let names = r.image().snapshots().unwrap();
            names.into_iter().map(|s| s.name).collect()
        })
        .collect()
}

#[test]
fn a_snapshot_is_taken_on_every_replica_at_one_point_of_the_writes() {
    let mut nodes: Vec<Node> = ["a", "b", "c"].iter().map(|n| Node::new(n)).collect();
    let m = Mirror::open(config_a_bc(&nodes, 1, FakeStates::new())).unwrap();

    // Four writers each count up in their own block while the snapshot is
    // taken: it must hold, on every replica, the same count per block, and
    // at least the one acknowledged before the snapshot started.
    const WRITERS: u64 = 4;
    let acked: Vec<AtomicU64> = (0..WRITERS).map(|_| AtomicU64::new(0)).collect();
    let stop = AtomicBool::new(false);
    let before = std::thread::scope(|s| {
        for t in 0..WRITERS {
            let (m, acked, stop) = (&m, &acked, &stop);
            s.spawn(move || {
                let mut k = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    k += 1;
                    let mut block = vec![0u8; BLOCK as usize];
                    block[..8].copy_from_slice(&k.to_le_bytes());
                    m.write_at(&block, t * MIB).unwrap();
                    acked[t as usize].store(k, Ordering::SeqCst);
                }
            });
        }
        wait_until("writes under way", || {
            acked.iter().all(|a| a.load(Ordering::SeqCst) > 20)
        });
        let before: Vec<u64> = acked.iter().map(|a| a.load(Ordering::SeqCst)).collect();
        m.snapshot("s1").unwrap();
        wait_until("writes after the snapshot", || {
            acked.iter().all(|a| a.load(Ordering::SeqCst) > 40)
        });
        stop.store(true, Ordering::SeqCst);
        before
    });
    let counts = |n: &Node| -> Vec<u64> {
        let r = n.local();
        let view = r.image().snapshot_view("s1").unwrap();
        (0..WRITERS)
            .map(|t| {
                let mut b = [0u8; 8];
                view.read_at(&mut b, t * MIB).unwrap();
                u64::from_le_bytes(b)
            })
            .collect()
    };
    let in_snapshot: Vec<Vec<u64>> = nodes.iter().map(counts).collect();
    assert!(
        in_snapshot.iter().all(|c| *c == in_snapshot[0]),
        "every replica's snapshot holds the same writes: {in_snapshot:?}"
    );
    let last: Vec<u64> = {
        let head = read_vec(&*m, 0, 4 * MIB as usize);
        (0..WRITERS as usize)
            .map(|t| u64::from_le_bytes(head[t * MIB as usize..][..8].try_into().unwrap()))
            .collect()
    };
    for t in 0..WRITERS as usize {
        assert!(
            in_snapshot[0][t] >= before[t] && in_snapshot[0][t] < last[t],
            "writer {t}: acknowledged before {}, in the snapshot {}, last {}",
            before[t],
            in_snapshot[0][t],
            last[t]
        );
    }

    // A replica that cannot take it refuses the snapshot everywhere.
    nodes[2].stop();
    m.write_at(&pattern(7, 4096), 0).unwrap();
    let err = m.snapshot("s2").unwrap_err();
    assert!(
        matches!(&err, ReplicationError::SnapshotNeedsAll { node, .. } if node == "c"),
        "{err}"
    );
    assert!(err.to_string().contains("volume resync"), "{err}");
    // Nor is a snapshot deleted while a replica holding it is away.
    let err = m.delete_snapshot("s1").unwrap_err();
    assert!(err.to_string().contains("unreachable"), "{err}");
    nodes[2].restart();
    wait_in_sync(&m, "c");
    assert_eq!(snapshot_names(&nodes), vec![vec!["s1".to_string()]; 3]);

    // One replica fails the take (it has the name already): the others
    // delete theirs again, so no replica keeps a snapshot the rest lack.
    let c = nodes[2].local();
    c.snapshot(1, "s3").unwrap();
    drop(c);
    let err = m.snapshot("s3").unwrap_err();
    assert!(err.to_string().contains("s3"), "{err}");
    let names = snapshot_names(&nodes);
    assert_eq!(names[0], vec!["s1"], "{names:?}");
    assert_eq!(names[1], vec!["s1"], "{names:?}");

    // Delete: everywhere, and a replica without it is fine.
    m.delete_snapshot("s3").unwrap();
    m.delete_snapshot("s1").unwrap();
    assert_eq!(snapshot_names(&nodes), vec![Vec::<String>::new(); 3]);
    m.close();
}

#[test]
fn replicas_are_restored_to_a_snapshot_only_while_closed_and_current() {
    let nodes: Vec<Node> = ["a", "b"].iter().map(|n| Node::new(n)).collect();
    let open = |generation: Generation| {
        Mirror::open(config(
            "a",
            generation,
            Some(nodes[0].local()),
            ReplicaState::InSync,
            vec![nodes[1].peer(ReplicaState::InSync)],
            FakeStates::new(),
        ))
        .unwrap()
    };
    let m = open(1);
    m.write_at(&pattern(1, 4096), 0).unwrap();
    m.snapshot("s").unwrap();
    m.write_at(&pattern(2, 4096), 0).unwrap();
    m.flush().unwrap();
    let restore_b = |generation: Generation, snap: &str| {
        let hello = Hello::new(VOL, generation, "a", PARAMS);
        dunnage::replication::restore_replica("b", nodes[1].addr, hello, snap, IO_TIMEOUT)
    };
    // Open (the mirror's link holds it): refused, and nothing changed.
    let refused = |e: ReplicationError, want: ErrorCode| match e {
        ReplicationError::Refused { code, .. } if code == want => {}
        other => panic!("expected {want}: {other}"),
    };
    refused(restore_b(2, "s").unwrap_err(), ErrorCode::Busy);
    assert!(matches!(
        nodes[0].replicas.restore(VOL, 2, "s"),
        Err(ReplicationError::Busy(_))
    ));
    m.close();
    drop(m);
    wait_until("b's replica closed", || {
        nodes[1].replicas.get(VOL).is_none()
    });
    refused(restore_b(2, "nonesuch").unwrap_err(), ErrorCode::NotFound);
    restore_b(2, "s").unwrap();
    nodes[0].replicas.restore(VOL, 2, "s").unwrap();
    // What a restore changed lies in no log: all active.
    assert_eq!(active(&nodes[0], 2).len(), 16);
    nodes[0].replicas.close(VOL);
    // The restore's generation fenced older ones.
    refused(restore_b(1, "s").unwrap_err(), ErrorCode::Fenced);
    assert!(Mirror::open(config(
        "a",
        1,
        None,
        ReplicaState::InSync,
        vec![nodes[1].peer(ReplicaState::InSync)],
        FakeStates::new(),
    ))
    .is_err());
    let m = open(3);
    assert_eq!(read_vec(&*m, 0, 4096), pattern(1, 4096));
    m.close();
    drop(m);
    assert_eq!(nodes[0].checksum(), nodes[1].checksum());
}

/// `dunnage replica add` and `rm` on a running mirror. A replica added
/// while a writer runs is resynced in the background and then holds what
/// the others hold; a removed one is recorded outdated first and gets no
/// write after; the last in-sync replica cannot be removed.
#[test]
fn replicas_are_added_and_removed_while_writes_go_on() {
    let nodes: Vec<Node> = ["a", "b", "c"].iter().map(|n| Node::new(n)).collect();
    let states = FakeStates::new();
    let m = Mirror::open(config_a_b(&nodes, 1, states.clone())).unwrap();
    // Something for the new replica to copy.
    write_blocks(&*m, 0, 0..2048);

    let written = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            write_until(
                &*m,
                &stop,
                &written,
                13,
                1 << 20,
                "while replicas come and go",
            )
        });
        let more = |n: u64| {
            let target = written.load(Ordering::SeqCst) + n;
            wait_until(&format!("{target} writes"), || {
                written.load(Ordering::SeqCst) >= target
            })
        };
        more(100);
        m.add_replica("c", NewReplica::Remote(nodes[2].addr))
            .unwrap();
        assert!(matches!(
            m.add_replica("c", NewReplica::Remote(nodes[2].addr)),
            Err(ReplicationError::Membership { op: "add", .. })
        ));
        wait_in_sync(&m, "c");
        assert_eq!(
            states.recorded_for("c"),
            [ReplicaState::Resyncing, ReplicaState::InSync]
        );
        let sent = status_of(&m, "c").resync_sent_bytes;
        assert!(sent > 0 && sent <= PARAMS.size, "c was sent {sent} bytes");
        more(100);

        m.remove_replica("b").unwrap();
        assert_eq!(states.recorded_for("b"), [ReplicaState::Outdated]);
        assert!(m.status().iter().all(|s| s.node != "b"));
        assert!(matches!(
            m.remove_replica("b"),
            Err(ReplicationError::NotFound(_))
        ));
        more(100);

        // Diskless for a while: the writer goes on with c alone.
        m.remove_replica("a").unwrap();
        assert!(matches!(
            m.remove_replica("c"),
            Err(ReplicationError::Membership { op: "remove", .. })
        ));
        assert_eq!(
            states.recorded_for("c"),
            [ReplicaState::Resyncing, ReplicaState::InSync]
        );
        more(100);
        m.add_replica("a", NewReplica::Local(nodes[0].local()))
            .unwrap();
        wait_in_sync(&m, "a");
        more(100);
        stop.store(true, Ordering::SeqCst);
    });
    m.flush().unwrap();
    let statuses = m.status();
    assert_eq!(
        statuses.iter().map(|s| s.node.as_str()).collect::<Vec<_>>(),
        ["a", "c"],
        "the local replica is read first"
    );
    // b's server dropped the replica with its link: it got nothing since.
    wait_until("b's replica closed", || {
        nodes[1].replicas.get(VOL).is_none()
    });
    let b_sum = nodes[1].checksum();
    write_blocks(&*m, 7, 0..64);
    m.flush().unwrap();
    m.close();
    drop(m);
    wait_until("c's replica closed", || {
        nodes[2].replicas.get(VOL).is_none()
    });
    assert_eq!(
        nodes[1].checksum(),
        b_sum,
        "b took no write after its removal"
    );
    assert_eq!(nodes[0].checksum(), nodes[2].checksum());
    assert_ne!(nodes[0].checksum(), b_sum);
}

/// A request forwarded to another node's daemon (`volume::forward`) rides
/// a Hello on its replica port: refused as Busy until the daemon is up,
/// then answered with the daemon's reply or its refusal.
#[test]
fn a_forwarded_request_reaches_the_daemon_and_its_reply_comes_back() {
    let node = Node::new("holder");
    let server = node.server.as_ref().unwrap();
    let ask = |req: &str| {
        dunnage::replication::forward_request(
            "holder", node.addr, "asker", req, IO_TIMEOUT, IO_TIMEOUT,
        )
    };
    match ask("{}") {
        Err(ReplicationError::Refused { code, message, .. }) => {
            assert_eq!(code, ErrorCode::Busy);
            assert!(message.contains("holder"), "{message}");
        }
        other => panic!("no daemon yet: {other:?}"),
    }
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    server.set_forwarder(Arc::new(move |req: &str| {
        log.lock().push(req.to_string());
        match req {
            r#"{"op":"fail"}"# => Err((ErrorCode::NotFound, "no snapshot x".to_string())),
            // A session takes the connection over: it echoes one line.
            r#"{"op":"session"}"# => Ok(Answer::Session(Box::new(|stream| {
                let mut line = String::new();
                let mut r = std::io::BufReader::new(&stream);
                std::io::BufRead::read_line(&mut r, &mut line).unwrap();
                std::io::Write::write_all(&mut &stream, format!("echo {line}").as_bytes()).unwrap();
            }))),
            r => Ok(Answer::Reply(format!("{{\"echo\":{r}}}"))),
        }
    }));
    assert_eq!(
        ask(r#"{"op":"take"}"#).unwrap(),
        r#"{"echo":{"op":"take"}}"#
    );
    match ask(r#"{"op":"fail"}"#) {
        Err(ReplicationError::Refused {
            code,
            message,
            node,
        }) => {
            assert_eq!((code, node.as_str()), (ErrorCode::NotFound, "holder"));
            assert_eq!(message, "no snapshot x");
        }
        other => panic!("a refusal: {other:?}"),
    }
    let stream = dunnage::replication::open_session(
        "holder",
        node.addr,
        "asker",
        r#"{"op":"session"}"#,
        IO_TIMEOUT,
        IO_TIMEOUT,
    )
    .unwrap();
    std::io::Write::write_all(&mut &stream, b"ping\n").unwrap();
    let mut back = String::new();
    std::io::Read::read_to_string(&mut &stream, &mut back).unwrap();
    assert_eq!(
        back, "echo ping\n",
        "the session had the connection to itself"
    );
    assert_eq!(
        *seen.lock(),
        [
            r#"{"op":"take"}"#,
            r#"{"op":"fail"}"#,
            r#"{"op":"session"}"#
        ]
    );
    // No replica was opened for it.
    assert!(node.replicas.get("-").is_none());
}

/// The sweep's cleanup of snapshots etcd does not list: only with the
/// replica closed, only when told the volume is attached nowhere, and
/// only the unlisted ones.
#[test]
fn orphan_snapshots_are_dropped_only_from_a_closed_replica() {
    use std::collections::HashSet;
    let node = Node::new("a");
    let listed = |names: &[&str]| -> Result<Option<HashSet<String>>, String> {
        Ok(Some(names.iter().map(|s| s.to_string()).collect()))
    };
    let r = node.local();
    write_blocks(r.image(), 1, 0..8);
    for name in ["kept", "orphan"] {
        r.snapshot(1, name).unwrap();
    }
    assert!(matches!(
        node.replicas
            .drop_orphan_snapshots(VOL, || listed(&["kept"])),
        Err(ReplicationError::Busy(_))
    ));
    drop(r);
    wait_until("closed", || node.replicas.get(VOL).is_none());
    let attached = || -> Result<Option<HashSet<String>>, String> { Ok(None) };
    assert!(node
        .replicas
        .drop_orphan_snapshots(VOL, attached)
        .unwrap()
        .is_empty());
    assert!(node
        .replicas
        .drop_orphan_snapshots(VOL, || Err("etcd is down".to_string()))
        .is_err());
    assert_eq!(
        node.replicas
            .drop_orphan_snapshots(VOL, || listed(&["kept"]))
            .unwrap(),
        ["orphan"]
    );
    let names: Vec<String> = node
        .local()
        .image()
        .snapshots()
        .unwrap()
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(names, ["kept"]);
}

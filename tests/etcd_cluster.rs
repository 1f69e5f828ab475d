//! The cluster control plane against a real etcd (Debian's etcd-server,
//! `/usr/bin/etcd`), started on loopback with free ports and a temporary
//! data dir for each test, and killed at the end (also on panic).

use dunnage::catalog::{new_volume_id, CatalogError, VolumeRecord};
use dunnage::cluster::{Cluster, ClusterConfig, ClusterError, ReplicaChange, SnapshotRecord};
use dunnage::replication::{ReplicaState, StateStoreError};
use dunnage::spec::VolumeSpec;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Generous: the machine is shared, and these only bound waits that end
/// much sooner when things work.
const EVENTUALLY: Duration = Duration::from_secs(60);
const TTL: Duration = Duration::from_secs(2);

/// A one-member etcd; killed on drop.
struct Etcd {
    child: Option<Child>,
    dir: tempfile::TempDir,
    client_addr: SocketAddr,
    peer: String,
}

impl Etcd {
    /// On free ports, picked again when another process took one between
    /// the pick and etcd's bind.
    fn start() -> Etcd {
        for attempt in 1.. {
            let dir = tempfile::tempdir().unwrap();
            // Both listeners at once, so that the two ports differ.
            let (l1, l2) = (
                TcpListener::bind("127.0.0.1:0").unwrap(),
                TcpListener::bind("127.0.0.1:0").unwrap(),
            );
            let client_addr = l1.local_addr().unwrap();
            let peer = format!("http://{}", l2.local_addr().unwrap());
            drop((l1, l2));
            let mut etcd = Etcd {
                child: None,
                dir,
                client_addr,
                peer,
            };
            match etcd.try_run() {
                Ok(()) => return etcd,
                Err(log) if attempt < 5 && log.contains("address already in use") => continue,
                Err(log) => panic!("{log}"),
            }
        }
        unreachable!()
    }

    /// Start (again, on the same ports and data) and wait until it serves.
    fn run(&mut self) {
        self.try_run().unwrap_or_else(|log| panic!("{log}"))
    }

    /// [`Etcd::run`]; its log if it exited instead.
    fn try_run(&mut self) -> Result<(), String> {
        let client = self.url();
        let peer = &self.peer;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("etcd.log"))
            .unwrap();
        let child = Command::new("/usr/bin/etcd")
            .arg("--name=test")
            .arg(format!(
                "--data-dir={}",
                self.dir.path().join("data").display()
            ))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=test={peer}"))
            .arg("--initial-cluster-state=new")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start /usr/bin/etcd (Debian package etcd-server)");
        self.child = Some(child);
        self.wait_healthy()
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.client_addr)
    }

    /// Until `/health` says true: etcd listens before it has elected itself.
    fn wait_healthy(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + EVENTUALLY;
        loop {
            let child = self.child.as_mut().expect("etcd started");
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return Err(format!("etcd exited ({status}):\n{}", self.log()));
            }
            if self.health() {
                return Ok(());
            }
            assert!(
                Instant::now() < deadline,
                "etcd not healthy:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn health(&self) -> bool {
        let Ok(mut s) = TcpStream::connect_timeout(&self.client_addr, Duration::from_secs(1))
        else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let req = format!("GET /health HTTP/1.0\r\nHost: {}\r\n\r\n", self.client_addr);
        if s.write_all(req.as_bytes()).is_err() {
            return false;
        }
        let mut resp = String::new();
        let _ = s.read_to_string(&mut resp);
        resp.contains(r#""health":"true""#)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            eprintln!("--- etcd log (last lines) ---");
            for l in tail.into_iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn config(etcd: &Etcd, name: &str, port: u16, ttl: Duration) -> ClusterConfig {
    ClusterConfig {
        node: name.into(),
        listen: addr(port),
        etcd: vec![etcd.url()],
        lease_ttl: ttl,
        security: Default::default(),
        zone: None,
    }
}

fn node(etcd: &Etcd, name: &str, port: u16) -> Arc<Cluster> {
    match Cluster::connect(config(etcd, name, port, TTL)) {
        Ok(c) => c,
        Err(e) => panic!("node {name} cannot join: {e}"),
    }
}

fn eventually(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + EVENTUALLY;
    while !ok() {
        assert!(
            Instant::now() < deadline,
            "not within {EVENTUALLY:?}: {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn record(name: &str) -> VolumeRecord {
    VolumeRecord {
        grow_fs: false,
        name: name.into(),
        id: new_volume_id(),
        created_at: chrono::Utc::now(),
        spec: VolumeSpec::default(),
        options: BTreeMap::new(),
        formatted: false,
        clone_of: None,
        replicas: vec!["a".into(), "b".into()],
        crypt: None,
        replacing: BTreeMap::new(),
    }
}

fn is_up(c: &Cluster, name: &str) -> Option<bool> {
    c.members()
        .unwrap()
        .into_iter()
        .find(|m| m.name == name)
        .map(|m| m.up)
}

#[test]
fn members_and_catalog_are_shared() {
    let etcd = Etcd::start();
    let a = node(&etcd, "a", 7001);
    let b = node(&etcd, "b", 7002);
    for c in [&a, &b] {
        let m = c.members().unwrap();
        let names: Vec<(&str, bool)> = m.iter().map(|m| (m.name.as_str(), m.up)).collect();
        assert_eq!(names, [("a", true), ("b", true)]);
        assert_eq!(m[0].addr, addr(7001));
        assert_eq!(m[1].addr, addr(7002));
    }
    assert_eq!(b.member_addr("a").unwrap(), Some(addr(7001)));
    assert_eq!(b.member_addr("zed").unwrap(), None);
    assert_eq!(a.node(), "a");

    // The name is taken by a live node at another address.
    match Cluster::connect(config(&etcd, "a", 7009, TTL)) {
        Err(ClusterError::NameTaken { node }) => assert_eq!(node, "a"),
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("a second node a was let in"),
    }
    assert_eq!(b.member_addr("a").unwrap(), Some(addr(7001)));

    let (ca, cb) = (a.catalog(), b.catalog());
    let r = record("vol1");
    ca.insert(r.clone()).unwrap();
    assert_eq!(cb.get("vol1"), Some(r.clone()));
    assert_eq!(cb.list(), vec![r.clone()]);
    assert!(matches!(
        cb.insert(record("vol1")),
        Err(CatalogError::Exists(n)) if n == "vol1"
    ));
    assert_eq!(ca.get("vol1").unwrap().id, r.id);

    assert!(matches!(
        cb.modify("vol1", "not-the-id", &mut |r| r.formatted = true),
        Err(CatalogError::NotFound(_))
    ));
    assert!(!ca.get("vol1").unwrap().formatted);
    let changed = cb
        .modify("vol1", &r.id, &mut |r| r.formatted = true)
        .unwrap();
    assert!(changed.formatted);
    assert_eq!(ca.get("vol1"), Some(changed));
    assert!(matches!(
        cb.modify("nope", &r.id, &mut |r| r.formatted = true),
        Err(CatalogError::NotFound(_))
    ));

    assert!(matches!(
        cb.remove("vol1", "not-the-id"),
        Err(CatalogError::NotFound(_))
    ));
    assert!(ca.get("vol1").is_some());
    ca.remove("vol1", &r.id).unwrap();
    assert_eq!(cb.get("vol1"), None);
    assert!(cb.list().is_empty());
    assert!(matches!(
        ca.remove("vol1", &r.id),
        Err(CatalogError::NotFound(_))
    ));

    // Usable from inside another tokio runtime (actix's), where a
    // `block_on` would panic, and dropped there too.
    actix_rt::System::new().block_on(async {
        let c = node(&etcd, "c", 7003);
        assert_eq!(is_up(&c, "a"), Some(true));
        c.shutdown();
        drop(c);
    });
    assert_eq!(is_up(&a, "c"), Some(false));

    // Leaving revokes the lease: b shows as down at once, and stays known.
    b.shutdown();
    assert!(!b.lease_alive());
    assert_eq!(is_up(&a, "b"), Some(false));
    assert_eq!(a.member_addr("b").unwrap(), None);
    assert!(a.lease_alive());
}

#[test]
fn attach_ownership_and_fencing() {
    let etcd = Etcd::start();
    let a = node(&etcd, "a", 7001);
    let b = node(&etcd, "b", 7002);
    let vid = new_volume_id();

    let g1 = a.acquire_attach(&vid, "v", Duration::ZERO).unwrap();
    assert_eq!(a.acquire_attach(&vid, "v", Duration::ZERO).unwrap(), g1);
    assert_eq!(b.attach_owner(&vid).unwrap(), Some(("a".into(), g1)));
    // A first attach, marked once or again: nothing ended unreleased.
    assert!(!a.mark_unreleased(&vid, g1).unwrap());
    assert!(!a.mark_unreleased(&vid, g1).unwrap());
    assert!(matches!(
        b.mark_unreleased(&vid, g1 + 1000),
        Err(ClusterError::Fenced { .. })
    ));
    match b.acquire_attach(&vid, "v", Duration::from_secs(1)) {
        Err(e @ ClusterError::HeldBy { .. }) => {
            assert!(e.to_string().contains("attached on node a"), "{e}");
            let ClusterError::HeldBy { volume, node } = e else {
                unreachable!()
            };
            assert_eq!((volume.as_str(), node.as_str()), ("v", "a"));
        }
        other => panic!("b took a held volume: {other:?}"),
    }

    let nodes = vec!["a".to_string(), "b".to_string()];
    a.init_replica_states(&vid, &nodes).unwrap();
    let all_in_sync: BTreeMap<String, ReplicaState> = nodes
        .iter()
        .map(|n| (n.clone(), ReplicaState::InSync))
        .collect();
    assert_eq!(b.replica_states(&vid).unwrap(), all_in_sync);
    a.set_replica_state(&vid, g1, "b", ReplicaState::Outdated)
        .unwrap();
    assert_eq!(b.replica_states(&vid).unwrap()["b"], ReplicaState::Outdated);
    let store = a.state_store(&vid, "v", g1);

    a.release_attach(&vid, g1).unwrap();
    assert_eq!(b.attach_owner(&vid).unwrap(), None);
    let g2 = b.acquire_attach(&vid, "v", Duration::ZERO).unwrap();
    assert!(g2 > g1, "{g2} after {g1}");
    assert!(!b.mark_unreleased(&vid, g2).unwrap(), "a released it");

    // The old generation is fenced, directly and through its StateStore.
    match a.set_replica_state(&vid, g1, "b", ReplicaState::InSync) {
        Err(ClusterError::Fenced { generation, .. }) => assert_eq!(generation, g1),
        other => panic!("stale generation wrote: {other:?}"),
    }
    match store.set_state("b", ReplicaState::InSync) {
        Err(StateStoreError::Fenced { volume, generation }) => {
            assert_eq!((volume.as_str(), generation), ("v", g1))
        }
        other => panic!("stale store wrote: {other:?}"),
    }
    assert_eq!(a.replica_states(&vid).unwrap()["b"], ReplicaState::Outdated);
    // Nor can it release the new holder's attach.
    assert!(matches!(
        a.release_attach(&vid, g1),
        Err(ClusterError::Fenced { .. })
    ));
    assert_eq!(a.attach_owner(&vid).unwrap(), Some(("b".into(), g2)));
    // Generation 0 (a missing key's revision) never passes the guard.
    assert!(matches!(
        b.set_replica_state(&vid, 0, "b", ReplicaState::InSync),
        Err(ClusterError::Fenced { .. })
    ));

    b.set_replica_state(&vid, g2, "b", ReplicaState::Resyncing)
        .unwrap();
    b.state_store(&vid, "v", g2)
        .set_state("a", ReplicaState::Outdated)
        .unwrap();
    let states = a.replica_states(&vid).unwrap();
    assert_eq!(states["a"], ReplicaState::Outdated);
    assert_eq!(states["b"], ReplicaState::Resyncing);

    // Snapshot records: written by the holder only, listed oldest first.
    let snap = |name: &str, secs: i64| SnapshotRecord {
        name: name.into(),
        created_at: chrono::DateTime::from_timestamp(1_800_000_000 + secs, 0).unwrap(),
        nodes: nodes.clone(),
    };
    b.record_snapshot(&vid, g2, &snap("later", 60), &[])
        .unwrap();
    // Held to the images it was taken on (the incarnations recorded then).
    b.set_replica_incarnation(&vid, g2, "a", 0xa1, false)
        .unwrap();
    let taken_from = [("a".to_string(), Some(0xa1)), ("b".to_string(), None)];
    b.record_snapshot(&vid, g2, &snap("first", 0), &taken_from)
        .unwrap();
    assert!(matches!(
        a.record_snapshot(&vid, g1, &snap("stale", 1), &[]),
        Err(ClusterError::Fenced { .. })
    ));
    assert!(matches!(
        a.record_snapshot(&vid, 0, &snap("zero", 1), &[]),
        Err(ClusterError::Fenced { .. })
    ));
    // A replica met as another image since the take (the replaced-replica
    // transaction ran first) fails the record, naming it; so does one
    // recorded since where none was.
    b.set_replica_incarnation(&vid, g2, "a", 0xa2, false)
        .unwrap();
    match b.record_snapshot(&vid, g2, &snap("racing", 2), &taken_from[..1]) {
        Err(ClusterError::ReplicaChanged { node, snapshot, .. }) => {
            assert_eq!((node.as_str(), snapshot.as_str()), ("a", "racing"))
        }
        other => panic!("a snapshot of a replaced image was recorded: {other:?}"),
    }
    b.set_replica_incarnation(&vid, g2, "b", 0xb1, false)
        .unwrap();
    assert!(matches!(
        b.record_snapshot(&vid, g2, &snap("racing", 2), &taken_from[1..]),
        Err(ClusterError::ReplicaChanged { node, .. }) if node == "b"
    ));
    assert_eq!(
        a.snapshots(&vid).unwrap(),
        vec![snap("first", 0), snap("later", 60)]
    );
    b.forget_snapshot(&vid, g2, "first").unwrap();
    assert_eq!(a.snapshots(&vid).unwrap(), vec![snap("later", 60)]);

    // Another volume's states are its own, even with an id that extends this one.
    let other = format!("{vid}0");
    a.init_replica_states(&other, &nodes).unwrap();
    b.set_replica_incarnation(&vid, g2, "a", 1, false).unwrap();
    b.forget_volume(&vid).unwrap();
    assert!(a.replica_states(&vid).unwrap().is_empty());
    assert!(a.replica_incarnations(&vid).unwrap().is_empty());
    assert!(a.snapshots(&vid).unwrap().is_empty());
    assert_eq!(a.replica_states(&other).unwrap(), all_in_sync);

    b.release_attach(&vid, g2).unwrap();
    b.release_attach(&vid, g2).unwrap();
    assert_eq!(a.attach_owner(&vid).unwrap(), None);
}

#[test]
fn a_node_cut_off_loses_its_attach_and_registers_again() {
    let etcd = Etcd::start();
    let a = node(&etcd, "a", 7001);
    let b = node(&etcd, "b", 7002);
    let lost = Arc::new(AtomicUsize::new(0));
    let l = lost.clone();
    a.on_lease_lost(Box::new(move || {
        l.fetch_add(1, Ordering::SeqCst);
    }));
    let vid = new_volume_id();
    let g1 = a.acquire_attach(&vid, "v", Duration::ZERO).unwrap();
    assert!(!a.mark_unreleased(&vid, g1).unwrap());
    assert!(a.lease_alive());

    a.stop_keepalive();
    eventually("a counts its lease as lost", || !a.lease_alive());
    eventually("a's lease-lost callback runs", || {
        lost.load(Ordering::SeqCst) == 1
    });
    assert!(matches!(
        a.acquire_attach(&new_volume_id(), "w", Duration::ZERO),
        Err(ClusterError::LeaseLost { .. })
    ));
    eventually("b sees a down", || is_up(&b, "a") == Some(false));

    let g2 = b.acquire_attach(&vid, "v", EVENTUALLY).unwrap();
    assert!(g2 > g1, "{g2} after {g1}");
    assert!(
        b.mark_unreleased(&vid, g2).unwrap(),
        "a lost its lease holding the attach: unreleased"
    );
    // Released before the replicas were compared: the mark stays.
    b.release_attach_unverified(&vid, g2).unwrap();
    assert_eq!(b.attach_owner(&vid).unwrap(), None);
    let g2 = b.acquire_attach(&vid, "v", Duration::ZERO).unwrap();
    assert!(
        b.mark_unreleased(&vid, g2).unwrap(),
        "never compared: still unreleased"
    );
    b.release_attach(&vid, g2).unwrap();
    let g2 = b.acquire_attach(&vid, "v", Duration::ZERO).unwrap();
    assert!(!b.mark_unreleased(&vid, g2).unwrap(), "released since");
    assert!(matches!(
        a.set_replica_state(&vid, g1, "a", ReplicaState::InSync),
        Err(ClusterError::Fenced { .. })
    ));

    // Back in touch: a registers again with a new lease, by itself.
    a.resume_keepalive();
    eventually("a registers again", || {
        a.lease_alive() && is_up(&b, "a") == Some(true)
    });
    assert_eq!(lost.load(Ordering::SeqCst), 1);
    assert_eq!(b.member_addr("a").unwrap(), Some(addr(7001)));
    match a.acquire_attach(&vid, "v", Duration::ZERO) {
        Err(ClusterError::HeldBy { node, .. }) => assert_eq!(node, "b"),
        other => panic!("a took b's volume: {other:?}"),
    }
    let w = new_volume_id();
    let g3 = a.acquire_attach(&w, "w", Duration::ZERO).unwrap();
    assert!(g3 > g2);
}

#[test]
fn a_restarted_node_takes_its_attach_back_and_a_dead_lease_is_waited_for() {
    let etcd = Etcd::start();
    let b = node(&etcd, "b", 7002);
    let a1 = node(&etcd, "a", 7001);
    let (v1, v2) = (new_volume_id(), new_volume_id());
    let g1 = a1.acquire_attach(&v1, "v1", Duration::ZERO).unwrap();
    let h1 = a1.acquire_attach(&v2, "v2", Duration::ZERO).unwrap();

    // As if it crashed: dropped without revoking its lease.
    drop(a1);
    let a2 = node(&etcd, "a", 7001);
    assert_eq!(is_up(&b, "a"), Some(true));

    // The new run of a takes v1 back under its own lease, as a new generation.
    let g2 = a2.acquire_attach(&v1, "v1", Duration::ZERO).unwrap();
    assert!(g2 > g1, "{g2} after {g1}");
    assert_eq!(b.attach_owner(&v1).unwrap(), Some(("a".into(), g2)));
    assert_eq!(a2.acquire_attach(&v1, "v1", Duration::ZERO).unwrap(), g2);
    match b.acquire_attach(&v1, "v1", Duration::from_secs(1)) {
        Err(ClusterError::HeldBy { node, .. }) => assert_eq!(node, "a"),
        other => panic!("b took a live attach: {other:?}"),
    }

    // v2 is still held under the dead run's lease: b waits for it to expire.
    let h2 = b.acquire_attach(&v2, "v2", EVENTUALLY).unwrap();
    assert!(h2 > h1, "{h2} after {h1}");
    assert_eq!(a2.attach_owner(&v2).unwrap(), Some(("b".into(), h2)));
    // v1 outlived the dead lease: the takeover moved it to a2's lease.
    assert_eq!(b.attach_owner(&v1).unwrap(), Some(("a".into(), g2)));

    // A clean leave frees v1 at once.
    a2.shutdown();
    let g3 = b.acquire_attach(&v1, "v1", Duration::ZERO).unwrap();
    assert!(g3 > g2);
}

#[test]
fn an_etcd_outage_loses_the_lease_and_the_node_registers_again() {
    let mut etcd = Etcd::start();
    let a = node(&etcd, "a", 7001);
    let lost = Arc::new(AtomicUsize::new(0));
    let l = lost.clone();
    a.on_lease_lost(Box::new(move || {
        l.fetch_add(1, Ordering::SeqCst);
    }));
    let catalog = a.catalog();
    let r = record("vol1");
    catalog.insert(r.clone()).unwrap();
    let vid = new_volume_id();
    let g1 = a.acquire_attach(&vid, "v", Duration::ZERO).unwrap();

    etcd.stop();
    eventually("a counts its lease as lost", || {
        !a.lease_alive() && lost.load(Ordering::SeqCst) == 1
    });
    match a.members() {
        Err(e @ ClusterError::Unreachable { .. }) => {
            assert!(e.to_string().contains(&etcd.url()), "{e}")
        }
        other => panic!("members without etcd: {other:?}"),
    }
    match Cluster::connect(config(&etcd, "b", 7002, TTL)) {
        Err(ClusterError::Unreachable { .. }) => {}
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("joined without etcd"),
    }
    // Reads answer as last read (Docker must not lose the volume); writes
    // fail and say why.
    assert_eq!(catalog.get("vol1"), Some(r.clone()));
    assert_eq!(catalog.list(), vec![r.clone()]);
    match catalog.insert(record("vol2")) {
        Err(e @ CatalogError::Unavailable { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("cannot reach etcd"), "{msg}");
            assert!(msg.contains("vol2"), "names the volume's key: {msg}");
        }
        other => panic!("insert without etcd: {other:?}"),
    }

    etcd.run();
    eventually("a registers again", || {
        a.lease_alive() && is_up(&a, "a") == Some(true)
    });
    assert_eq!(lost.load(Ordering::SeqCst), 1);
    // The old lease, and the attach under it, end with the new registration.
    eventually("a's old attach is gone", || {
        a.attach_owner(&vid).unwrap().is_none()
    });
    assert!(matches!(
        a.set_replica_state(&vid, g1, "a", ReplicaState::InSync),
        Err(ClusterError::Fenced { .. })
    ));
    let g2 = a.acquire_attach(&vid, "v", Duration::ZERO).unwrap();
    assert!(g2 > g1, "{g2} after {g1}");
    assert_eq!(catalog.get("vol2"), None);
    assert_eq!(catalog.get("vol1"), Some(r));
}

#[test]
fn replica_changes_write_the_record_and_the_state_together_under_the_attach() {
    let etcd = Etcd::start();
    let a = node(&etcd, "a", 7011);
    let b = node(&etcd, "b", 7012);
    let mut rec = record("moving");
    rec.spec.repl = 2;
    rec.spec.nodes = vec!["a".into(), "b".into()];
    let vid = rec.id.clone();
    a.catalog().insert(rec).unwrap();
    a.init_replica_states(&vid, &["a".into(), "b".into()])
        .unwrap();
    let g1 = a.acquire_attach(&vid, "moving", Duration::ZERO).unwrap();
    let snap = SnapshotRecord {
        name: "s".into(),
        created_at: chrono::Utc::now(),
        nodes: vec!["a".into(), "b".into()],
    };
    a.record_snapshot(&vid, g1, &snap, &[]).unwrap();
    // The images the mirror met, recorded under the attach, read by all.
    for (n, inc) in [("a", 0xa1), ("b", 0xb1), ("c", 0xc0ffee)] {
        a.set_replica_incarnation(&vid, g1, n, inc, false).unwrap();
    }
    assert_eq!(b.replica_incarnations(&vid).unwrap()["b"], 0xb1);

    let added = a
        .change_replicas("moving", &vid, g1, ReplicaChange::Add("c"))
        .unwrap();
    assert_eq!(added.replicas, ["a", "b", "c"]);
    assert_eq!(added.spec.repl, 3);
    let seen = b.catalog().get("moving").unwrap();
    assert_eq!(seen.replicas, ["a", "b", "c"], "etcd's record");
    assert_eq!(
        b.replica_states(&vid).unwrap()["c"],
        ReplicaState::Outdated,
        "an added replica holds nothing yet"
    );
    assert_eq!(b.snapshots(&vid).unwrap()[0].nodes, ["a", "b"]);
    // An added replica is met anew: no old image of that node is trusted.
    let incs = b.replica_incarnations(&vid).unwrap();
    assert!(!incs.contains_key("c") && incs["a"] == 0xa1, "{incs:?}");

    let removed = a
        .change_replicas("moving", &vid, g1, ReplicaChange::Remove("b"))
        .unwrap();
    assert_eq!(removed.replicas, ["a", "c"]);
    assert_eq!(removed.spec.repl, 2);
    assert_eq!(removed.spec.nodes, ["a"]);
    let states = b.replica_states(&vid).unwrap();
    assert!(!states.contains_key("b"), "{states:?}");
    let incs = b.replica_incarnations(&vid).unwrap();
    assert_eq!(incs.keys().collect::<Vec<_>>(), ["a"]);
    assert_eq!(b.snapshots(&vid).unwrap()[0].nodes, ["a"]);
    assert_eq!(b.volume_replicas().unwrap()[&vid], ["a", "c"]);

    // Once the attach moved, the old generation changes nothing.
    a.release_attach(&vid, g1).unwrap();
    let g2 = b.acquire_attach(&vid, "moving", Duration::ZERO).unwrap();
    assert!(matches!(
        a.change_replicas("moving", &vid, g1, ReplicaChange::Add("b")),
        Err(ClusterError::Fenced { .. })
    ));
    assert_eq!(b.catalog().get("moving").unwrap().replicas, ["a", "c"]);
    assert!(!b.replica_states(&vid).unwrap().contains_key("b"));
    assert!(matches!(
        a.set_replica_incarnation(&vid, g1, "a", 0xbad, false),
        Err(ClusterError::Fenced { .. })
    ));
    assert_eq!(b.replica_incarnations(&vid).unwrap()["a"], 0xa1);
    // A replaced image (its files lost) holds none of the snapshots.
    b.set_replica_incarnation(&vid, g2, "a", 0xa2, true)
        .unwrap();
    assert_eq!(a.replica_incarnations(&vid).unwrap()["a"], 0xa2);
    assert!(a.snapshots(&vid).unwrap()[0].nodes.is_empty());
    // Nor does a record of another volume under the same name.
    assert!(b
        .change_replicas("moving", "0000", g2, ReplicaChange::Add("b"))
        .is_err());
    b.release_attach(&vid, g2).unwrap();
}

#[test]
fn a_resync_holds_the_attach_until_anything_else_wants_it() {
    let etcd = Etcd::start();
    let a = node(&etcd, "a", 7021);
    let b = node(&etcd, "b", 7022);
    let vid = new_volume_id();

    let g1 = a.acquire_attach_for_resync(&vid, "v").unwrap();
    let held = b.attach_holder(&vid).unwrap().unwrap();
    assert_eq!(
        (held.node.as_str(), held.generation, held.resync),
        ("a", g1, true)
    );
    assert_eq!(b.attach_owner(&vid).unwrap(), None, "attached nowhere");
    // Anyone who wants it, a itself included, is told to stop the resync.
    for (who, n) in [(&a, "a"), (&b, "b")] {
        match who.acquire_attach(&vid, "v", Duration::from_secs(1)) {
            Err(e @ ClusterError::HeldForResync { .. }) => {
                assert!(
                    e.to_string().contains("background resync on node a"),
                    "{n}: {e}"
                )
            }
            other => panic!("{n} took a volume a resyncs: {other:?}"),
        }
    }
    // A second resync elsewhere is refused as an attach would be.
    assert!(matches!(
        b.acquire_attach_for_resync(&vid, "v"),
        Err(ClusterError::HeldForResync { .. })
    ));
    assert_eq!(a.acquire_attach_for_resync(&vid, "v").unwrap(), g1);
    // One left behind (its release failed) is dropped by its node only.
    assert!(!b.drop_stale_resync_attach(&vid).unwrap());
    assert!(a.drop_stale_resync_attach(&vid).unwrap());
    assert_eq!(b.attach_holder(&vid).unwrap(), None);
    let g1 = a.acquire_attach_for_resync(&vid, "v").unwrap();
    a.release_attach(&vid, g1).unwrap();

    // An attach is never taken over by a resync.
    let g2 = b.acquire_attach(&vid, "v", Duration::ZERO).unwrap();
    assert!(g2 > g1);
    assert!(matches!(
        b.acquire_attach_for_resync(&vid, "v"),
        Err(ClusterError::HeldBy { .. })
    ));
    assert!(matches!(
        a.acquire_attach_for_resync(&vid, "v"),
        Err(ClusterError::HeldBy { .. })
    ));
    assert_eq!(a.attach_owner(&vid).unwrap(), Some(("b".into(), g2)));
    // Never an attach.
    assert!(!b.drop_stale_resync_attach(&vid).unwrap());
    assert_eq!(a.attach_owner(&vid).unwrap(), Some(("b".into(), g2)));
    b.release_attach(&vid, g2).unwrap();
}

#[test]
fn detached_volumes_with_a_replica_behind_are_listed_with_the_live_members() {
    let etcd = Etcd::start();
    let a = node(&etcd, "a", 7031);
    let b = node(&etcd, "b", 7032);
    let (fine, behind) = (record("fine"), record("behind"));
    for r in [&fine, &behind] {
        a.catalog().insert(r.clone()).unwrap();
        a.init_replica_states(&r.id, &r.replicas).unwrap();
    }
    let listed = |c: &Cluster| {
        let (list, up) = c.detached_behind().unwrap();
        let names: Vec<String> = list.into_iter().map(|b| b.name).collect();
        (names, up.into_iter().collect::<Vec<_>>())
    };
    assert_eq!(listed(&b), (vec![], vec!["a".into(), "b".into()]));

    let g = a
        .acquire_attach(&behind.id, "behind", Duration::ZERO)
        .unwrap();
    a.set_replica_state(&behind.id, g, "b", ReplicaState::Outdated)
        .unwrap();
    assert_eq!(
        listed(&b).0,
        Vec::<String>::new(),
        "attached: its mirror resyncs"
    );
    a.release_attach(&behind.id, g).unwrap();
    let (list, up) = b.detached_behind().unwrap();
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(
        (list[0].name.as_str(), list[0].id.as_str()),
        ("behind", behind.id.as_str())
    );
    assert_eq!(list[0].states["b"], ReplicaState::Outdated);
    assert_eq!(list[0].runner(&up), Some("a"));

    // Held by a resync: not listed (one runs).
    let g = a.acquire_attach_for_resync(&behind.id, "behind").unwrap();
    assert_eq!(listed(&b).0, Vec::<String>::new());
    a.release_attach(&behind.id, g).unwrap();
    // With b gone, nobody should start one.
    b.shutdown();
    eventually("b's lease gone", || is_up(&a, "b") == Some(false));
    let (list, up) = a.detached_behind().unwrap();
    assert_eq!(up.iter().collect::<Vec<_>>(), ["a"]);
    assert_eq!(list[0].runner(&up), None);
}

/// Runs `program` with `args` in `dir`, panicking with its output if it fails.
fn run_in(dir: &std::path::Path, program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, etcd's server certificate (for 127.0.0.1) and a client
/// certificate signed by it, and another CA that signed nothing; in `dir`.
fn make_certificates(dir: &std::path::Path) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    for ca in ["ca", "other-ca"] {
        let (key, pem, subj) = (
            format!("{ca}.key"),
            format!("{ca}.pem"),
            format!("/CN={ca}"),
        );
        let mut args = vec!["req", "-x509", "-days", "2", "-subj", &subj];
        args.extend(ec);
        args.extend(["-keyout", &key, "-out", &pem]);
        run_in(dir, "openssl", &args);
    }
    std::fs::write(dir.join("server.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    for who in ["server", "client"] {
        let (key, csr, pem, ext) = (
            format!("{who}.key"),
            format!("{who}.csr"),
            format!("{who}.pem"),
            format!("{who}.ext"),
        );
        let subj = format!("/CN=dunnage-{who}");
        let mut args = vec!["req", "-subj", &subj];
        args.extend(ec);
        args.extend(["-keyout", &key, "-out", &csr]);
        run_in(dir, "openssl", &args);
        run_in(
            dir,
            "openssl",
            &[
                "x509",
                "-req",
                "-days",
                "2",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-extfile",
                &ext,
                "-out",
                &pem,
            ],
        );
    }
}

/// A production-like etcd: TLS with client certificates, and
/// authentication on. dunnage signs in as a user allowed only the keys
/// under /dunnage/, over TLS; without the user, with a wrong password, or
/// without trusting etcd's CA it is refused, saying what to give.
#[test]
fn a_node_joins_an_etcd_with_tls_and_authentication() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_certificates(d);
    let (l1, l2) = (
        TcpListener::bind("127.0.0.1:0").unwrap(),
        TcpListener::bind("127.0.0.1:0").unwrap(),
    );
    let url = format!("https://{}", l1.local_addr().unwrap());
    let peer = format!("http://{}", l2.local_addr().unwrap());
    drop((l1, l2));
    let log = std::fs::File::create(d.join("etcd.log")).unwrap();
    let mut child = Command::new("/usr/bin/etcd")
        .current_dir(d)
        .args([
            "--name=secure",
            "--data-dir=data",
            &format!("--listen-client-urls={url}"),
            &format!("--advertise-client-urls={url}"),
            &format!("--listen-peer-urls={peer}"),
            &format!("--initial-advertise-peer-urls={peer}"),
            &format!("--initial-cluster=secure={peer}"),
            "--cert-file=server.pem",
            "--key-file=server.key",
            "--trusted-ca-file=ca.pem",
            "--client-cert-auth",
        ])
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start /usr/bin/etcd");
    struct Kill<'a>(&'a mut Child);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _kill = Kill(&mut child);
    let ctl = |args: &[&str]| {
        let mut all = vec![
            "--endpoints",
            url.as_str(),
            "--cacert=ca.pem",
            "--cert=client.pem",
            "--key=client.key",
        ];
        all.extend(args);
        Command::new("etcdctl")
            .args(&all)
            .current_dir(d)
            .env("ETCDCTL_API", "3")
            .output()
            .expect("run etcdctl")
    };
    eventually("the TLS etcd to be healthy", || {
        ctl(&["endpoint", "health"]).status.success()
    });
    for args in [
        &["user", "add", "root:rootpw"][..],
        &["user", "add", "dunnage:s3cret"],
        &["role", "add", "dunnage"],
        &[
            "role",
            "grant-permission",
            "dunnage",
            "--prefix=true",
            "readwrite",
            "/dunnage/",
        ],
        &["user", "grant-role", "dunnage", "dunnage"],
        &["auth", "enable"],
    ] {
        let out = ctl(args);
        assert!(out.status.success(), "etcdctl {args:?}: {out:?}");
    }

    let read = |f: &str| std::fs::read(d.join(f)).unwrap();
    let secure = |user: Option<(&str, &str)>, ca: &str| dunnage::cluster::EtcdSecurity {
        user: user.map(|(u, p)| (u.to_string(), zeroize::Zeroizing::new(p.to_string()))),
        ca: Some(read(ca)),
        identity: Some((
            read("client.pem"),
            zeroize::Zeroizing::new(read("client.key")),
        )),
    };
    let config = |name: &str, security| ClusterConfig {
        node: name.into(),
        listen: addr(7901),
        etcd: vec![url.clone()],
        lease_ttl: TTL,
        security,
        zone: None,
    };
    let a = Cluster::connect(config("a", secure(Some(("dunnage", "s3cret")), "ca.pem")))
        .unwrap_or_else(|e| panic!("join over TLS as user dunnage: {e}"));
    a.catalog().insert(record("guarded")).unwrap();
    assert!(a.catalog().get("guarded").is_some());
    assert!(a.members().unwrap().iter().any(|m| m.name == "a" && m.up));

    for (security, want) in [
        (secure(None, "ca.pem"), "--etcd-user"),
        (secure(Some(("dunnage", "wrong")), "ca.pem"), "--etcd-user"),
        (
            secure(Some(("dunnage", "s3cret")), "other-ca.pem"),
            "cannot reach etcd",
        ),
    ] {
        match Cluster::connect(config("b", security)) {
            Ok(_) => panic!("joined without the right credentials ({want})"),
            Err(e) => assert!(e.to_string().contains(want), "{e}"),
        }
    }
    a.shutdown();

    // The daemon's flags: what is missing is named before anything runs.
    let dirs: Vec<String> = ["plugins", "data", "run"]
        .iter()
        .map(|sub| d.join(sub).display().to_string())
        .collect();
    let serve = |more: &[&str]| {
        let mut args = vec!["serve", "--listen", "127.0.0.1:0", "--etcd", url.as_str()];
        for (flag, dir) in ["--plugin-dir", "--data-dir", "--run-dir"]
            .iter()
            .zip(&dirs)
        {
            args.extend([*flag, dir.as_str()]);
        }
        args.extend(more);
        let out = Command::new(env!("CARGO_BIN_EXE_dunnage"))
            .args(&args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "serve {args:?} started");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = serve(&[]);
    assert!(err.contains("needs --etcd-cacert"), "{err}");
    let err = serve(&["--etcd-user", "dunnage"]);
    assert!(err.contains("--etcd-password-file"), "{err}");
}

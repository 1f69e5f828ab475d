//! A volume in a cluster: its actor takes the attach lease (whose revision
//! is the generation every replica checks), opens a mirror over the nodes
//! holding its replicas, and gives the lease back at detach. The mirror's
//! IO runs on the export's threads and the mirror's own; never through here.

use super::forward::HolderOp;
use super::{VolumeActor, VolumeError, VolumeErrorKind};
use crate::catalog::VolumeRecord;
use crate::cluster::ClusterError;
use crate::config::ClusterNode;
use crate::engine::ThinParams;
use crate::replication::wire::{ErrorCode, Hello};
use crate::replication::{
    restore_replica, Generation, Mirror, MirrorConfig, PeerSpec, ReplicaBase, ReplicaState,
    ReplicaStatus, ReplicationError,
};
use actix::prelude::*;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;

pub fn params(record: &VolumeRecord) -> ThinParams {
    ThinParams {
        size: record.spec.size,
        block_size: record.spec.block_size_bytes(),
    }
}

/// A clone's base, for making its replicas.
fn replica_base(record: &VolumeRecord) -> Option<ReplicaBase> {
    record.clone_of.as_ref().map(|c| ReplicaBase {
        volume_id: c.volume_id.clone(),
        snapshot: c.snapshot.clone(),
    })
}

/// This node's replica of the volume, opened (made if absent: empty, or a
/// clone of its base's replica here; a plain image where that is absent
/// only if `copied_whole`: see [`crate::replication::LocalReplicas::open_as`]).
pub fn open_local(
    c: &ClusterNode,
    record: &VolumeRecord,
    copied_whole: bool,
) -> Result<Arc<crate::replication::LocalReplica>, ReplicationError> {
    c.replicas.open_as(
        &record.id,
        params(record),
        replica_base(record).as_ref(),
        copied_whole,
    )
}

/// Take the volume's attach (waiting up to `wait` for a holder whose lease
/// is expiring). A background resync holding it is asked to stop first,
/// here or on its node: it gives way to anything that needs the attach.
pub(super) fn take_attach(
    c: &ClusterNode,
    record: &VolumeRecord,
    wait: Duration,
) -> Result<Generation, VolumeErrorKind> {
    // A resync whose node cannot be asked (cut off) goes with its lease.
    let deadline = std::time::Instant::now() + wait.max(c.lease_ttl + Duration::from_secs(2));
    loop {
        let node = match c.cluster.acquire_attach(&record.id, &record.name, wait) {
            Err(ClusterError::HeldForResync { node, .. })
                if std::time::Instant::now() < deadline =>
            {
                node
            }
            other => return Ok(other?),
        };
        tracing::info!(volume = %record.name, node, "stopping the background resync that holds the volume");
        let asked = if node == c.cluster.node() {
            c.stop_resync(&record.id);
            Ok(())
        } else {
            super::forward::forward_to(c, record, &node, HolderOp::StopResync).map(drop)
        };
        match asked {
            Err(e) if std::time::Instant::now() >= deadline => return Err(e),
            Err(e) => {
                tracing::warn!(volume = %record.name, node, error = %e, "cannot ask the resync to stop; retrying until its lease expires");
                std::thread::sleep(Duration::from_secs(1));
            }
            // Stopped: its release reaches etcd before the retry.
            Ok(()) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// Take the attach lease and open the mirror. A node whose lease expired
/// (killed or cut off) is waited for, up to one lease TTL.
pub(super) fn open_mirror(
    c: &ClusterNode,
    record: &VolumeRecord,
    catalog: &dyn crate::catalog::Catalog,
) -> Result<(Arc<Mirror>, Generation), VolumeErrorKind> {
    let cl = &c.cluster;
    let wait = c.lease_ttl + Duration::from_secs(2);
    let generation = take_attach(c, record, wait)?;
    // A resize changes the size under an attach of its own: read the
    // record again now that this one holds it.
    let fresh = catalog.get(&record.name).filter(|r| r.id == record.id);
    let record = fresh.as_ref().unwrap_or(record);
    // A comparison owed by an unreleased attach stays owed if this fails.
    let mut owed = true;
    let opened = cl
        .mark_unreleased(&record.id, generation)
        .map_err(VolumeErrorKind::from)
        .and_then(|verify| {
            owed = verify;
            mirror_for(c, record, generation, verify)
        });
    match opened {
        Ok(m) => {
            c.track(&record.id, &m);
            tracing::info!(volume = %record.name, generation, replicas = ?record.replicas, "attach lease taken; mirror open");
            Ok((m, generation))
        }
        Err(e) => {
            give_back(c, &record.id, &record.name, generation, !owed);
            Err(e)
        }
    }
}

fn mirror_for(
    c: &ClusterNode,
    record: &VolumeRecord,
    generation: Generation,
    verify: bool,
) -> Result<Arc<Mirror>, VolumeErrorKind> {
    let cl = &c.cluster;
    let states = cl.replica_states(&record.id)?;
    let incarnations = cl.replica_incarnations(&record.id)?;
    let reached = cl.reached(&record.id)?;
    let members = cl.members()?;
    let me = cl.node().to_string();
    let params = params(record);
    let mut local = None;
    let mut local_state = ReplicaState::Outdated;
    let mut local_incarnation = None;
    let mut peers = Vec::new();
    for n in &record.replicas {
        // No recorded state: nothing says it holds the data.
        let state = states.get(n).copied().unwrap_or(ReplicaState::Outdated);
        if *n == me {
            local_state = state;
            local_incarnation = incarnations.get(n).copied();
            // Copied whole: not in sync (Track::new), or met before and a
            // new image made now (Mirror::open finds it Replaced).
            let whole = state != ReplicaState::InSync || local_incarnation.is_some();
            local = Some(open_local(c, record, whole)?);
            continue;
        }
        let addr = members
            .iter()
            .find(|m| &m.name == n)
            .map(|m| m.addr)
            .ok_or_else(|| {
                crate::cluster::ClusterError::Placement(format!(
                    "replica node {n} of volume {} is not a known member of the cluster",
                    record.name
                ))
            })?;
        peers.push(PeerSpec {
            node: n.clone(),
            addr,
            state,
            incarnation: incarnations.get(n).copied(),
        });
    }
    let mirror = Mirror::open(MirrorConfig {
        volume_id: record.id.clone(),
        volume: record.name.clone(),
        node: me,
        generation,
        params,
        local,
        local_state,
        local_incarnation,
        peers,
        base: replica_base(record),
        states: cl.state_store(&record.id, &record.name, generation),
        verify,
        resync: c.resync,
        io_timeout: c.replica_timeout,
        hot_extents: crate::replication::activity::HOT_MAX,
        reached,
    });
    if mirror.is_err() {
        c.replicas.close(&record.id);
    }
    Ok(mirror?)
}

/// How long a background resync waits for a replica that does not answer
/// once every other one is in sync (the sweep starts another job when its
/// node is back).
const RESYNC_UNREACHABLE: Duration = Duration::from_secs(60);
/// How often a background resync looks at its mirror.
const RESYNC_POLL: Duration = Duration::from_millis(200);

/// Resync the replicas of a volume attached nowhere that are not in sync,
/// in the background on this node, so that its redundancy comes back
/// without waiting for an attach (DRBD resyncs secondaries too). The job
/// holds the attach as a resync, which any attach, snapshot, restore or
/// replica change stops first (`take_attach`); it ends when every
/// replica is in sync, or when one stays unreachable. Ok(false): nothing
/// to do, or one runs here already.
pub fn start_resync(
    c: &Arc<ClusterNode>,
    record: VolumeRecord,
    lost_here: bool,
) -> Result<bool, VolumeErrorKind> {
    start_background(c, record, lost_here, false)
}

/// [`start_resync`], or with `verify` a comparison of every replica over
/// the whole device (`dunnage volume verify` of a volume attached
/// nowhere), which starts even with every replica in sync and ends the
/// job once done.
pub fn start_background(
    c: &Arc<ClusterNode>,
    record: VolumeRecord,
    lost_here: bool,
    verify: bool,
) -> Result<bool, VolumeErrorKind> {
    let _one = c.resync_start.lock();
    if c.resyncing(&record.id) {
        if verify {
            // The resync's mirror compares too, once asked.
            if let Some(m) = c.mirror(&record.id) {
                m.start_verify()?;
                return Ok(true);
            }
        }
        return Ok(false);
    }
    let states = c.cluster.replica_states(&record.id)?;
    let behind = record
        .replicas
        .iter()
        .any(|n| states.get(n) != Some(&ReplicaState::InSync));
    // This node's replica lost its files: etcd does not know it yet, the
    // mirror finds it (Mirror::open meets it replaced).
    if !behind && !lost_here && !verify {
        return Ok(false);
    }
    let cl = &c.cluster;
    let generation = cl.acquire_attach_for_resync(&record.id, &record.name)?;
    let mut owed = true;
    let opened = cl
        .mark_unreleased(&record.id, generation)
        .map_err(VolumeErrorKind::from)
        .and_then(|verify| {
            owed = verify;
            mirror_for(c, &record, generation, verify)
        });
    let mirror = match opened {
        Ok(m) => m,
        Err(e) => {
            give_back(c, &record.id, &record.name, generation, !owed);
            return Err(e);
        }
    };
    if verify {
        if let Err(e) = mirror.start_verify() {
            close_mirror(c, &record.id, &record.name, &mirror, generation);
            return Err(e.into());
        }
    }
    c.track(&record.id, &mirror);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let job = {
        let (c, stop, mirror) = (c.clone(), stop.clone(), mirror.clone());
        let record = record.clone();
        std::thread::Builder::new()
            .name(format!("resync-{}", record.name))
            .spawn(move || run_resync(&c, &record, &mirror, generation, &stop))
    };
    let thread = match job {
        Ok(t) => t,
        Err(e) => {
            close_mirror(c, &record.id, &record.name, &mirror, generation);
            return Err(ReplicationError::Io {
                op: "spawn the background resync of",
                path: record.name.clone().into(),
                source: e,
            }
            .into());
        }
    };
    c.add_resync(&record.id, crate::config::ResyncJob { stop, thread });
    tracing::info!(volume = %record.name, generation, "background resync started (the volume is attached nowhere)");
    Ok(true)
}

fn run_resync(
    c: &ClusterNode,
    record: &VolumeRecord,
    mirror: &Mirror,
    generation: Generation,
    stop: &std::sync::atomic::AtomicBool,
) {
    let mut unreachable_since: Option<std::time::Instant> = None;
    loop {
        if stop.load(std::sync::atomic::Ordering::SeqCst) {
            tracing::info!(volume = %record.name, "background resync stopped: the volume is wanted");
            break;
        }
        if mirror.is_fenced() {
            break;
        }
        let status = mirror.status();
        let verified = mirror.verification().map_or(true, |v| v.finished);
        let reachable_in_sync = status
            .iter()
            .filter(|s| s.connected)
            .all(|s| s.state == ReplicaState::InSync);
        if verified && reachable_in_sync && status.iter().all(|s| s.connected) {
            tracing::info!(volume = %record.name, "background resync done: every replica in sync");
            break;
        }
        // Give up on a replica that does not answer only once nothing else
        // is left to do: a new replica still copying goes on meanwhile.
        match status.iter().find(|s| !s.connected) {
            Some(away) if verified && reachable_in_sync => {
                let since = *unreachable_since.get_or_insert_with(std::time::Instant::now);
                if since.elapsed() > RESYNC_UNREACHABLE {
                    // Its node's return starts the next job; a node up but
                    // not answering must not have one started every sweep.
                    let node_up = c
                        .cluster
                        .members()
                        .map_or(true, |ms| ms.iter().any(|m| m.name == away.node && m.up));
                    if node_up {
                        c.hold_off_resync(&record.id);
                    }
                    tracing::warn!(volume = %record.name, node = %away.node, "background resync done but for a replica that does not answer: it is resynced once its node is back");
                    break;
                }
            }
            _ => unreachable_since = None,
        }
        std::thread::sleep(RESYNC_POLL);
    }
    close_mirror(c, &record.id, &record.name, mirror, generation);
}

/// Give the attach at `generation` back; `verified`: with the mark that
/// it was unreleased (else the next attach compares the replicas). A
/// failure is only logged: the attach expires with this node's lease.
pub(super) fn give_back(
    c: &ClusterNode,
    volume_id: &str,
    volume: &str,
    generation: Generation,
    verified: bool,
) {
    let released = if verified {
        c.cluster.release_attach(volume_id, generation)
    } else {
        c.cluster.release_attach_unverified(volume_id, generation)
    };
    if let Err(e) = released {
        tracing::warn!(volume, error = %e, "could not give the attach lease back; it expires with this node's lease");
    }
}

/// Open the volume's mirror again at the size `record` now says, under
/// the attach this node holds (`generation`), for a volume grown while
/// attached. `old` is flushed and has no IO in flight: it is closed and
/// lets go of the replicas, so that each grows as the new mirror opens
/// it (a peer's once its link from `old` has ended). A comparison under
/// way starts over on the new mirror. If the new mirror cannot open, the
/// volume's IO fails until it is detached; the next attach opens it at
/// the new size.
pub(super) fn reopen_mirror(
    c: &ClusterNode,
    record: &VolumeRecord,
    old: &Mirror,
    generation: Generation,
) -> Result<Arc<Mirror>, VolumeErrorKind> {
    // A comparison cut short starts over: one owed after a crash as such,
    // one asked for (`volume verify`) over the whole device again.
    let pending = old.verification().filter(|v| !v.finished);
    old.settle();
    old.release();
    c.untrack(&record.id);
    c.replicas.close(&record.id);
    let owed = pending.is_some_and(|v| !v.requested);
    let mirror = mirror_for(c, record, generation, owed)?;
    if pending.is_some_and(|v| v.requested) {
        if let Err(e) = mirror.start_verify() {
            tracing::warn!(volume = %record.name, error = %e, "the comparison asked for did not start again after the grow; run `dunnage volume verify` again");
        }
    }
    c.track(&record.id, &mirror);
    tracing::info!(volume = %record.name, generation, size = record.spec.size, "mirror open again at the grown size");
    Ok(mirror)
}

/// The export has stopped and the mirror is flushed (or failed): close it
/// and give the attach lease back.
pub(super) fn close_mirror(
    c: &ClusterNode,
    volume_id: &str,
    volume: &str,
    mirror: &Mirror,
    generation: Generation,
) {
    mirror.settle();
    mirror.close();
    if let Some(v) = mirror.verification().filter(|v| v.requested && v.finished) {
        c.keep_verification(volume_id, v);
    }
    c.untrack(volume_id);
    c.replicas.close(volume_id);
    // A comparison cut short is the next attach's to do again; so is one
    // after a fence (a write may have reached some replicas only).
    let fenced = mirror.is_fenced();
    let verified = !fenced && !mirror.verification().is_some_and(|v| !v.finished);
    if fenced {
        tracing::warn!(
            volume,
            "detached fenced; the next attach compares the replicas"
        );
    } else if !verified {
        tracing::warn!(
            volume,
            "detached before the replicas were compared; the next attach compares them"
        );
    }
    give_back(c, volume_id, volume, generation, verified);
}

/// Refuse a snapshot operation (`op`: take, delete, restore) up front,
/// before anything is opened or recorded, when a replica's node is down;
/// for a take or restore also when a replica is not in sync, and for a
/// restore when no replica holds the snapshot (`snap`). The cluster's
/// members.
pub(super) fn check_replicas(
    c: &ClusterNode,
    record: &VolumeRecord,
    op: &'static str,
    snapshot: &str,
    snap: Option<&crate::cluster::SnapshotRecord>,
) -> Result<Vec<crate::cluster::Member>, VolumeErrorKind> {
    let members = c.cluster.members()?;
    let states = c.cluster.replica_states(&record.id)?;
    for node in &record.replicas {
        let up = members.iter().any(|m| &m.name == node && m.up);
        let state = states.get(node).copied().unwrap_or(ReplicaState::Outdated);
        let why = if !up {
            "unreachable (its node is down)".to_string()
        } else if op != "delete" && state != ReplicaState::InSync {
            state.to_string()
        } else {
            continue;
        };
        return Err(ReplicationError::SnapshotNeedsAll {
            op,
            volume: record.name.clone(),
            snapshot: snapshot.to_string(),
            node: node.clone(),
            why,
        }
        .into());
    }
    // Replicas placed (or whose files were replaced) since the snapshot
    // lack it: restored from one that holds it, as a resync.
    if let Some(snap) = snap {
        if !record.replicas.iter().any(|n| snap.nodes.contains(n)) {
            return Err(ReplicationError::SnapshotHeldNowhere {
                volume: record.name.clone(),
                snapshot: snapshot.to_string(),
            }
            .into());
        }
    }
    Ok(members)
}

/// How long a restore waits for a replica still open after a detach.
const RESTORE_BUSY_WAIT: Duration = Duration::from_secs(10);

/// Put every replica back to snapshot `name`; the volume must be attached
/// nowhere, and every replica in sync, reachable and holding the snapshot.
/// Done under an attach generation of its own, which fences older ones on
/// each replica.
pub(super) fn restore(
    c: &ClusterNode,
    record: &VolumeRecord,
    name: &str,
) -> Result<(), VolumeErrorKind> {
    let cl = &c.cluster;
    if let Some((holder, _)) = cl.attach_owner(&record.id)? {
        return Err(crate::cluster::ClusterError::HeldBy {
            volume: record.name.clone(),
            node: holder,
        }
        .into());
    }
    let snaps = cl.snapshots(&record.id)?;
    let Some(snap) = snaps.iter().find(|s| s.name == name) else {
        return Err(crate::engine::EngineError::NoSuchSnapshot {
            dir: c.replicas.volumes_dir().join(&record.id),
            name: name.to_string(),
        }
        .into());
    };
    let members = check_replicas(c, record, "restore", name, Some(snap))?;
    let generation = take_attach(c, record, Duration::ZERO)?;
    let res = restore_replicas(c, record, snap, generation, &members);
    // Every in-sync replica now holds the snapshot's contents: nothing
    // an earlier unreleased attach left is left to compare. Unless it
    // failed: then what was owed still is.
    give_back(c, &record.id, &record.name, generation, res.is_ok());
    res
}

fn restore_replicas(
    c: &ClusterNode,
    record: &VolumeRecord,
    snap: &crate::cluster::SnapshotRecord,
    generation: Generation,
    members: &[crate::cluster::Member],
) -> Result<(), VolumeErrorKind> {
    let name = snap.name.as_str();
    let me = c.cluster.node();
    let states = c.cluster.state_store(&record.id, &record.name, generation);
    let hello = Hello::new(&record.id, generation, me, params(record));
    let restore_once = |node: &str| -> Result<(), ReplicationError> {
        if node == me {
            return c.replicas.restore(&record.id, generation, name);
        }
        let addr = members
            .iter()
            .find(|m| m.name == node)
            .map(|m| m.addr)
            .ok_or_else(|| ReplicationError::Config(format!("node {node} is not a member")))?;
        restore_replica(node, addr, hello.clone(), name, c.replica_timeout)
    };
    // A replica stays open a moment after the last detach (its links
    // close in the background).
    let restore_one = |node: &str| {
        let deadline = std::time::Instant::now() + RESTORE_BUSY_WAIT;
        loop {
            match restore_once(node) {
                Err(ReplicationError::Busy(_))
                | Err(ReplicationError::Refused {
                    code: ErrorCode::Busy,
                    ..
                }) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100))
                }
                other => return other,
            }
        }
    };
    // The reference first (this node's replica if it holds the
    // snapshot); the others are outdated until restored, so a failure or
    // a crash from here leaves them to be resynced from it. Those without
    // the snapshot stay so: the reference's activity log, forgotten by
    // its restore, makes that resync whole.
    let holds = |n: &String| snap.nodes.contains(n);
    let mut order = record.replicas.clone();
    order.sort_by_key(|n| (!holds(n), n != me));
    let (reference, others) = order.split_first().expect("a volume has replicas");
    debug_assert!(holds(reference), "check_replicas found one that holds it");
    for n in others {
        states
            .set_state(n, ReplicaState::Outdated)
            .map_err(ReplicationError::from)?;
    }
    if let Err(e) = restore_one(reference) {
        for n in others {
            if let Err(r) = states.set_state(n, ReplicaState::InSync) {
                tracing::warn!(volume = %record.name, node = %n, error = %r, "could not record the replica in sync again; it is resynced at the next attach");
            }
        }
        return Err(e.into());
    }
    for n in others {
        if !holds(n) {
            tracing::warn!(volume = %record.name, node = %n, snapshot = name, "replica without the snapshot: it stays outdated and is resynced whole from {reference} at the next attach");
            continue;
        }
        match restore_one(n) {
            Ok(()) => states
                .set_state(n, ReplicaState::InSync)
                .map_err(ReplicationError::from)?,
            Err(e) => {
                tracing::warn!(volume = %record.name, node = %n, error = %e, "replica not restored: it stays outdated and is resynced from {reference} at the next attach")
            }
        }
    }
    Ok(())
}

/// Remove a cluster volume: refused while attached anywhere. Replicas on
/// other nodes are deleted by those nodes (they drop replicas of volumes
/// the catalog no longer has).
pub(super) fn remove(c: &ClusterNode, record: &VolumeRecord) -> Result<(), VolumeErrorKind> {
    // An attach (this node's too: taking it again would hand it over).
    if let Some((node, _)) = c.cluster.attach_owner(&record.id)? {
        return Err(ClusterError::HeldBy {
            volume: record.name.clone(),
            node,
        }
        .into());
    }
    // Held until the volume is out of etcd, so that no attach or resync
    // (a sweep's) starts on it meanwhile; a background resync gives way.
    let generation = take_attach(c, record, Duration::ZERO)?;
    let removed = remove_held(c, record);
    // Refused (clones): an unreleased mark of an earlier attach stays.
    give_back(c, &record.id, &record.name, generation, removed.is_ok());
    removed?;
    if let Err(e) = c.replicas.remove(&record.id) {
        tracing::warn!(volume = %record.name, error = %e, "could not delete the local replica; it is dropped at the next sweep");
    }
    Ok(())
}

/// [`remove`]'s part under the attach: the catalog's record, the states.
fn remove_held(c: &ClusterNode, record: &VolumeRecord) -> Result<(), VolumeErrorKind> {
    // Clones read the blocks they share from this volume's replicas.
    let clones = super::clones_of(&*c.cluster.catalog(), &record.id, |_| true);
    if !clones.is_empty() {
        return Err(VolumeErrorKind::HasClones(clones.join(", ")));
    }
    c.cluster
        .catalog()
        .remove(&record.name, &record.id)
        .map_err(VolumeErrorKind::Catalog)?;
    if let Err(e) = c.cluster.forget_volume(&record.id) {
        tracing::warn!(volume = %record.name, error = %e, "could not delete the replica states; they are harmless");
    }
    Ok(())
}

/// A volume's place in the cluster, for `volume inspect`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ClusterView {
    pub attached_on: Option<String>,
    pub generation: Option<Generation>,
    /// The node resyncing the volume in the background while it is
    /// attached nowhere.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resync_on: Option<String>,
    pub replicas: Vec<ReplicaView>,
    /// The comparison of the replicas after an attach that ended
    /// unreleased (on the attached node, while this attach runs one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verification: Option<crate::replication::Verification>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ReplicaView {
    pub node: String,
    pub state: ReplicaState,
    /// The following are known on the attached node only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connected: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resync: Option<crate::replication::ResyncProgress>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resync_sent_bytes: Option<u64>,
    /// The replica of a node that stayed down which this one replaces
    /// (removed once this one is in sync).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaces: Option<String>,
}

impl From<ReplicaStatus> for ReplicaView {
    fn from(s: ReplicaStatus) -> Self {
        ReplicaView {
            node: s.node,
            state: s.state,
            local: Some(s.local),
            connected: Some(s.connected),
            resync: s.resync,
            resync_sent_bytes: Some(s.resync_sent_bytes),
            replaces: None,
        }
    }
}

impl ReplicaView {
    /// A replica as etcd records it (nothing of its link or resync).
    pub fn recorded(node: &str, state: ReplicaState) -> ReplicaView {
        ReplicaView {
            node: node.to_string(),
            state,
            local: None,
            connected: None,
            resync: None,
            resync_sent_bytes: None,
            replaces: None,
        }
    }
}

impl ClusterView {
    /// Name, on each replica replacing another, the one it replaces.
    fn with_replacements(mut self, record: &VolumeRecord) -> ClusterView {
        for r in &mut self.replicas {
            r.replaces = record
                .replacing
                .iter()
                .find(|(_, new)| **new == r.node)
                .map(|(old, _)| old.clone());
        }
        self
    }
}

/// `None` on a single node.
#[derive(Message)]
#[rtype(result = "Result<Option<ClusterView>, VolumeError>")]
pub struct QueryCluster;

impl Handler<QueryCluster> for VolumeActor {
    type Result = Result<Option<ClusterView>, VolumeError>;
    fn handle(&mut self, _: QueryCluster, _: &mut SyncContext<Self>) -> Self::Result {
        let Some(c) = self.node.cluster.clone() else {
            return Ok(None);
        };
        let record = self.record()?;
        if let Some(super::Backing::Mirror { mirror, generation }) =
            self.attached.as_ref().map(|a| &a.engine)
        {
            return Ok(Some(
                ClusterView {
                    attached_on: Some(c.cluster.node().to_string()),
                    generation: Some(*generation),
                    resync_on: None,
                    replicas: mirror.status().into_iter().map(Into::into).collect(),
                    verification: mirror.verification(),
                }
                .with_replacements(&record),
            ));
        }
        // A background resync here: its mirror knows the progress.
        if let Some(mirror) = c.mirror(&self.id).filter(|_| c.resyncing(&self.id)) {
            let resync_on = Some(c.cluster.node().to_string());
            return Ok(Some(
                ClusterView {
                    attached_on: None,
                    generation: None,
                    resync_on,
                    replicas: mirror.status().into_iter().map(Into::into).collect(),
                    verification: mirror.verification(),
                }
                .with_replacements(&record),
            ));
        }
        let mut view = etcd_view(&c, &record).map_err(|e| self.err(e))?;
        view.verification = c.last_verification(&self.id);
        Ok(Some(view))
    }
}

/// What etcd says of the volume's attach and replicas (`volume ls`, and
/// `volume inspect` where no mirror of it runs).
pub fn etcd_view(c: &ClusterNode, record: &VolumeRecord) -> Result<ClusterView, ClusterError> {
    let (owner, resync_on) = match c.cluster.attach_holder(&record.id)? {
        Some(h) if h.resync => (None, Some(h.node)),
        Some(h) => (Some((h.node, h.generation)), None),
        None => (None, None),
    };
    let states = c.cluster.replica_states(&record.id)?;
    Ok(ClusterView {
        attached_on: owner.as_ref().map(|(n, _)| n.clone()),
        generation: owner.map(|(_, g)| g),
        resync_on,
        replicas: record
            .replicas
            .iter()
            .map(|n| {
                let state = states.get(n).copied().unwrap_or(ReplicaState::Outdated);
                ReplicaView::recorded(n, state)
            })
            .collect(),
        verification: None,
    }
    .with_replacements(record))
}

/// Start a background resync if the volume is attached nowhere and a
/// replica is behind; false if none started.
#[derive(Message)]
#[rtype(result = "Result<bool, VolumeError>")]
pub struct StartResync {
    /// Asked by the sweep, not by `dunnage volume resync`: only with this
    /// node's replica on disk and every replica's node answering (opening
    /// the mirror records an unreachable replica outdated), and not again
    /// soon after a failure.
    pub auto: bool,
    /// The sweep found this node's replica lost (its image is not the one
    /// etcd records), though every replica is recorded in sync.
    pub lost_here: bool,
}

/// How long the sweep's check waits for a replica's node to accept a connection.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

impl VolumeActor {
    /// Why the sweep should not start this volume's resync here now.
    fn auto_resync_unwise(
        &self,
        c: &ClusterNode,
        record: &VolumeRecord,
        lost_here: bool,
    ) -> Option<String> {
        if c.resync_held_off(&self.id) {
            return Some("its last resync failed a moment ago".into());
        }
        // An empty replica here (its data dir wiped) would be copied over
        // the others as the current data, unless the mirror knows it for
        // another image than recorded (`lost_here`: an incarnation is).
        let made = c
            .replicas
            .dir(&self.id)
            .is_ok_and(|d| d.join("header").exists());
        if !made && !lost_here {
            return Some(format!(
                "node {} has no replica of it on disk",
                c.cluster.node()
            ));
        }
        for n in record.replicas.iter().filter(|n| *n != c.cluster.node()) {
            let reachable =
                c.cluster.member_addr(n).ok().flatten().is_some_and(|a| {
                    std::net::TcpStream::connect_timeout(&a, PROBE_TIMEOUT).is_ok()
                });
            if !reachable {
                return Some(format!("node {n} does not answer on its replica port"));
            }
        }
        None
    }
}

impl Handler<StartResync> for VolumeActor {
    type Result = Result<bool, VolumeError>;
    fn handle(&mut self, m: StartResync, _: &mut SyncContext<Self>) -> Self::Result {
        let Some(c) = self.node.cluster.clone() else {
            return Err(self.err(VolumeErrorKind::NotClustered("a resync")));
        };
        let record = self.record()?;
        // Attached: its mirror resyncs already.
        if self.attached.is_some()
            || c.cluster
                .attach_owner(&self.id)
                .map_err(|e| self.err(e))?
                .is_some()
        {
            return Ok(false);
        }
        if m.auto {
            // Checked again at the next sweep (a probe costs little).
            if let Some(why) = self.auto_resync_unwise(&c, &record, m.lost_here) {
                tracing::debug!(volume = %self.name, why, "a replica is behind, but no background resync starts now");
                return Ok(false);
            }
        }
        match start_resync(&c, record, m.lost_here) {
            // Someone else holds it now (a resync or an attach raced us).
            Err(VolumeErrorKind::Cluster(e))
                if matches!(
                    *e,
                    ClusterError::HeldForResync { .. } | ClusterError::HeldBy { .. }
                ) =>
            {
                Ok(false)
            }
            Err(e) => {
                if m.auto {
                    c.hold_off_resync(&self.id);
                }
                Err(self.err(e))
            }
            ok => ok.map_err(|e| self.err(e)),
        }
    }
}

/// sha256 of this node's replica of the volume (`dunnage replica checksum`).
#[derive(Message)]
#[rtype(result = "Result<String, VolumeError>")]
pub struct Checksum;

impl Handler<Checksum> for VolumeActor {
    type Result = Result<String, VolumeError>;
    fn handle(&mut self, _: Checksum, _: &mut SyncContext<Self>) -> Self::Result {
        let Some(c) = self.node.cluster.clone() else {
            return Err(self.err(VolumeErrorKind::NotClustered("a replica checksum")));
        };
        let record = self.record()?;
        if !record.replicas.iter().any(|n| n == c.cluster.node()) {
            return Err(self.err(VolumeErrorKind::NoLocalReplica(record.replicas.join(", "))));
        }
        // A replica never attached yet is made here (empty, as it reads).
        let sum = open_local(&c, &record, false).and_then(|r| r.checksum());
        if self.attached.is_none() {
            c.replicas.close(&self.id);
        }
        sum.map_err(|e| self.err(e))
    }
}

/// `dunnage volume verify`: compare the replicas over the whole device,
/// repairing those that differ from the one reads come from. Runs on the
/// attached node's mirror (asked there if it is another node), or,
/// attached nowhere, in a background job here. Answers the node it runs on.
#[derive(Message)]
#[rtype(result = "Result<String, VolumeError>")]
pub struct StartVerify;

impl Handler<StartVerify> for VolumeActor {
    type Result = Result<String, VolumeError>;
    fn handle(&mut self, _: StartVerify, _: &mut SyncContext<Self>) -> Self::Result {
        self.start_verify()
    }
}

impl VolumeActor {
    pub(super) fn start_verify(&mut self) -> Result<String, VolumeError> {
        let Some(c) = self.node.cluster.clone() else {
            return Err(self.err(VolumeErrorKind::NotClustered("a comparison of replicas")));
        };
        let record = self.record()?;
        if record.replicas.len() < 2 {
            return Err(self.err(VolumeErrorKind::Transfer(format!(
                "it has one replica ({}): there is nothing to compare it with",
                record.replicas.join("")
            ))));
        }
        if let Some(holder) = self.holder_elsewhere(&c)? {
            let reply = self.forward(&c, &record, &holder, super::forward::HolderOp::Verify)?;
            return self.forwarded_reply(&holder, &reply);
        }
        let me = c.cluster.node().to_string();
        c.forget_verification(&self.id);
        if let Some(super::Backing::Mirror { mirror, .. }) =
            self.attached.as_ref().map(|a| &a.engine)
        {
            mirror.start_verify().map_err(|e| self.err(e))?;
        } else {
            start_background(&c, record, false, true).map_err(|e| self.err(e))?;
        }
        tracing::info!(volume = %self.name, "comparing the replicas, as asked");
        Ok(me)
    }
}

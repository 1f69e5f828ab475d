//! A volume in a cluster: its actor takes the attach lease (whose revision
//! is the generation every replica checks), opens a mirror over the nodes
//! holding its replicas, and gives the lease back at detach. The mirror's
//! IO runs on the export's threads and the mirror's own; never through here.

use super::{VolumeActor, VolumeError, VolumeErrorKind};
use crate::catalog::VolumeRecord;
use crate::config::ClusterNode;
use crate::engine::ThinParams;
use crate::replication::{Generation, Mirror, MirrorConfig, PeerSpec, ReplicaState, ReplicaStatus};
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

/// Take the attach lease and open the mirror. A node whose lease expired
/// (killed or cut off) is waited for, up to one lease TTL.
pub(super) fn open_mirror(
    c: &ClusterNode,
    record: &VolumeRecord,
) -> Result<(Arc<Mirror>, Generation), VolumeErrorKind> {
    let cl = &c.cluster;
    let wait = c.lease_ttl + Duration::from_secs(2);
    let generation = cl.acquire_attach(&record.id, &record.name, wait)?;
    let opened = cl
        .mark_unreleased(&record.id, generation)
        .map_err(VolumeErrorKind::from)
        .and_then(|verify| mirror_for(c, record, generation, verify));
    match opened {
        Ok(m) => {
            c.track(&record.id, &m);
            tracing::info!(volume = %record.name, generation, replicas = ?record.replicas, "attach lease taken; mirror open");
            Ok((m, generation))
        }
        Err(e) => {
            if let Err(r) = cl.release_attach(&record.id, generation) {
                tracing::warn!(volume = %record.name, error = %r, "could not give the attach lease back; it expires with this node's lease");
            }
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
    let members = cl.members()?;
    let me = cl.node().to_string();
    let params = params(record);
    let mut local = None;
    let mut local_state = ReplicaState::Outdated;
    let mut peers = Vec::new();
    for n in &record.replicas {
        // No recorded state: nothing says it holds the data.
        let state = states.get(n).copied().unwrap_or(ReplicaState::Outdated);
        if *n == me {
            local = Some(c.replicas.open(&record.id, params)?);
            local_state = state;
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
        peers,
        states: cl.state_store(&record.id, &record.name, generation),
        verify,
        resync_rate: c.resync_rate,
        io_timeout: c.replica_timeout,
    });
    if mirror.is_err() {
        c.replicas.close(&record.id);
    }
    Ok(mirror?)
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
    mirror.close();
    c.untrack(volume_id);
    c.replicas.close(volume_id);
    // A comparison cut short is the next attach's to do again.
    let released = if mirror.verification().is_some_and(|v| !v.finished) {
        tracing::warn!(
            volume,
            "detached before the replicas were compared; the next attach compares them"
        );
        c.cluster.release_attach_unverified(volume_id, generation)
    } else {
        c.cluster.release_attach(volume_id, generation)
    };
    if let Err(e) = released {
        tracing::warn!(volume, error = %e, "could not give the attach lease back; it expires with this node's lease");
    }
}

/// Remove a cluster volume: refused while attached anywhere. Replicas on
/// other nodes are deleted by those nodes (they drop replicas of volumes
/// the catalog no longer has).
pub(super) fn remove(c: &ClusterNode, record: &VolumeRecord) -> Result<(), VolumeErrorKind> {
    if let Some((holder, _)) = c.cluster.attach_holder(&record.id)? {
        return Err(crate::cluster::ClusterError::HeldBy {
            volume: record.name.clone(),
            node: holder,
        }
        .into());
    }
    c.cluster
        .catalog()
        .remove(&record.name, &record.id)
        .map_err(VolumeErrorKind::Catalog)?;
    if let Err(e) = c.cluster.forget_volume(&record.id) {
        tracing::warn!(volume = %record.name, error = %e, "could not delete the replica states; they are harmless");
    }
    if let Err(e) = c.replicas.remove(&record.id) {
        tracing::warn!(volume = %record.name, error = %e, "could not delete the local replica; it is dropped at the next sweep");
    }
    Ok(())
}

/// A volume's place in the cluster, for `volume inspect`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ClusterView {
    pub attached_on: Option<String>,
    pub generation: Option<Generation>,
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
        }
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
            return Ok(Some(ClusterView {
                attached_on: Some(c.cluster.node().to_string()),
                generation: Some(*generation),
                replicas: mirror.status().into_iter().map(Into::into).collect(),
                verification: mirror.verification(),
            }));
        }
        let holder = c.cluster.attach_holder(&self.id).map_err(|e| self.err(e))?;
        let states = c
            .cluster
            .replica_states(&self.id)
            .map_err(|e| self.err(e))?;
        Ok(Some(ClusterView {
            attached_on: holder.as_ref().map(|(n, _)| n.clone()),
            generation: holder.map(|(_, g)| g),
            replicas: record
                .replicas
                .iter()
                .map(|n| ReplicaView {
                    node: n.clone(),
                    state: states.get(n).copied().unwrap_or(ReplicaState::Outdated),
                    local: None,
                    connected: None,
                    resync: None,
                    resync_sent_bytes: None,
                })
                .collect(),
            verification: None,
        }))
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
        let sum = c
            .replicas
            .open(&self.id, params(&record))
            .and_then(|r| r.checksum());
        if self.attached.is_none() {
            c.replicas.close(&self.id);
        }
        sum.map_err(|e| self.err(e))
    }
}

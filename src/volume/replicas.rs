//! `dunnage replica add` and `rm`: a replicated volume's replicas change,
//! in use or not. Attached here, the mirror takes the change live
//! (attached on another node: forwarded there, see `forward`) (an
//! added replica is resynced in the background while the volume is
//! used); attached nowhere, etcd's record changes under an attach
//! generation of its own, and the next attach resyncs. etcd holds the
//! record and the replica's state in one transaction.
//!
//! What can never happen: a replica that misses writes stays listed in
//! sync. A removed one is recorded Outdated before its writes stop, and an
//! added one is Outdated until its resync ends.

use super::forward::HolderOp;
use super::{replicated, Backing, VolumeActor, VolumeError, VolumeErrorKind};
use crate::catalog::VolumeRecord;
use crate::cluster::placement::{place, PlacementRequest};
use crate::cluster::{ClusterError, Member, ReplicaChange};
use crate::config::ClusterNode;
use crate::replication::{NewReplica, ReplicaState, ReplicationError};
use actix::prelude::*;
use std::time::Duration;

/// Most replicas a volume may have (as `repl` at create).
const MAX_REPLICAS: usize = 3;

/// Add a replica (on `node`, or where placement puts it), or remove
/// `node`'s. Answers the node changed.
#[derive(Message)]
#[rtype(result = "Result<String, VolumeError>")]
pub struct ChangeReplica {
    pub add: bool,
    pub node: Option<String>,
}

fn refused(why: String) -> VolumeErrorKind {
    VolumeErrorKind::ReplicaChange(why)
}

/// The node a new replica goes to: `asked`, or the one placement ranks
/// first among the live members without one, honouring `group`/`fg`.
fn new_replica_node(
    c: &ClusterNode,
    record: &VolumeRecord,
    members: &[Member],
    asked: Option<String>,
) -> Result<String, VolumeErrorKind> {
    if record.replicas.len() >= MAX_REPLICAS {
        return Err(refused(format!(
            "it has {} replicas ({}), the most a volume may have; remove one first",
            record.replicas.len(),
            record.replicas.join(", ")
        )));
    }
    if let Some(n) = asked {
        if record.replicas.contains(&n) {
            return Err(refused(format!(
                "node {n} holds a replica of it already (its replicas: {})",
                record.replicas.join(", ")
            )));
        }
        if !members.iter().any(|m| m.name == n && m.up) {
            return Err(refused(format!(
                "node {n} is not a live member of the cluster (`dunnage node ls` lists them)"
            )));
        }
        return Ok(n);
    }
    let up: Vec<String> = members
        .iter()
        .filter(|m| m.up && !record.replicas.contains(&m.name))
        .map(|m| m.name.clone())
        .collect();
    let others: Vec<(Option<String>, Vec<String>)> = c
        .cluster
        .catalog()
        .list()
        .into_iter()
        .filter(|r| r.id != record.id)
        .map(|r| (r.spec.group, r.replicas))
        .collect();
    let req = PlacementRequest {
        repl: 1,
        nodes: &[],
        group: record.spec.group.as_deref(),
        fg: record.spec.fg,
    };
    let mut chosen = place(&req, &up, &others).map_err(|e| {
        refused(format!(
            "no node can take another replica ({e}); its replicas are on {}",
            record.replicas.join(", ")
        ))
    })?;
    Ok(chosen.remove(0))
}

/// Why `node`'s replica may not go, looking at etcd (the volume is
/// attached nowhere): it is the last one, or no other is in sync on a
/// live node.
fn check_remove(
    c: &ClusterNode,
    record: &VolumeRecord,
    members: &[Member],
    node: &str,
) -> Result<(), VolumeErrorKind> {
    let states = c.cluster.replica_states(&record.id)?;
    let current_elsewhere = record.replicas.iter().any(|n| {
        n != node
            && states.get(n) == Some(&ReplicaState::InSync)
            && members.iter().any(|m| &m.name == n && m.up)
    });
    if current_elsewhere {
        return Ok(());
    }
    Err(refused(format!(
        "no other replica is in sync on a live node, so node {node}'s may hold the only current copy of the data; add a replica first and let it resync (attach the volume, `dunnage volume resync {}`)",
        record.name
    )))
}

impl VolumeActor {
    pub(super) fn change_replica(
        &mut self,
        add: bool,
        asked: Option<String>,
    ) -> Result<String, VolumeError> {
        let what = if add { "replica add" } else { "replica rm" };
        let Some(c) = self.node.cluster.clone() else {
            return Err(self.err(VolumeErrorKind::NotClustered(what)));
        };
        let record = self.record()?;
        if let Some(holder) = self.holder_elsewhere(&c)? {
            let op = match (add, asked) {
                (true, node) => HolderOp::AddReplica { node },
                (false, Some(node)) => HolderOp::RemoveReplica { node },
                (false, None) => unreachable!("the CLI requires the node to remove"),
            };
            let reply = self.forward(&c, &record, &holder, op)?;
            return self.forwarded_reply(&holder, &reply);
        }
        let members = c.cluster.members().map_err(|e| self.err(e))?;
        let running = match self.attached.as_ref().map(|a| &a.engine) {
            Some(Backing::Mirror { mirror, .. }) => Some(mirror.clone()),
            _ => None,
        };
        // Listed in etcd but not in the running mirror: an add that stopped
        // after its record. Asked again, it is finished.
        let unfinished = asked.clone().filter(|n| {
            add && record.replicas.contains(n)
                && running
                    .as_ref()
                    .is_some_and(|m| m.status().iter().all(|s| &s.node != n))
        });
        let node = if let Some(n) = unfinished.clone() {
            n
        } else if add {
            // A clone's replica on a node without its parent's is a plain
            // copy (`LocalReplicas::open_as`).
            new_replica_node(&c, &record, &members, asked).map_err(|e| self.err(e))?
        } else {
            let n = asked.expect("the CLI requires the node to remove");
            if !record.replicas.contains(&n) {
                return Err(self.err(refused(format!(
                    "node {n} holds no replica of it (its replicas: {})",
                    record.replicas.join(", ")
                ))));
            }
            if record.replicas.len() == 1 {
                return Err(self.err(refused(format!(
                    "node {n} holds its only replica; remove the volume instead"
                ))));
            }
            let clones =
                super::clones_of(&*self.node.catalog, &record.id, |r| r.replicas.contains(&n));
            if !clones.is_empty() {
                return Err(self.err(refused(format!(
                    "the replica of clone {} on node {n} shares its blocks; remove that first (`dunnage replica rm {} {n}`, or remove the clone)",
                    clones.join(", "),
                    clones[0]
                ))));
            }
            n
        };
        let change = if add {
            ReplicaChange::Add(&node)
        } else {
            ReplicaChange::Remove(&node)
        };
        let me = c.cluster.node().to_string();

        if let Some(Backing::Mirror { mirror, generation }) =
            self.attached.as_ref().map(|a| &a.engine)
        {
            let (mirror, generation) = (mirror.clone(), *generation);
            if add {
                let at = if node == me {
                    // Added Outdated: copied whole.
                    let local = replicated::open_local(&c, &record, true);
                    NewReplica::Local(local.map_err(|e| self.err(e))?)
                } else {
                    let m = members
                        .iter()
                        .find(|m| m.name == node)
                        .expect("checked live");
                    NewReplica::Remote(m.addr)
                };
                // Listed (Outdated) before any write reaches it.
                if unfinished.is_none() {
                    c.cluster
                        .change_replicas(&record.name, &record.id, generation, change)
                        .map_err(|e| self.err(e))?;
                }
                mirror.add_replica(&node, at).map_err(|e| {
                    tracing::warn!(volume = %record.name, node, error = %e, "replica recorded but not added to the running mirror: run the same replica add again, or the next attach resyncs it");
                    self.err(e)
                })?;
            } else {
                match mirror.remove_replica(&node) {
                    // An earlier rm stopped at etcd: finish it.
                    Ok(()) | Err(ReplicationError::NotFound(_)) => {}
                    Err(e) => return Err(self.err(e)),
                }
                c.cluster
                    .change_replicas(&record.name, &record.id, generation, change)
                    .map_err(|e| self.err(e))?;
            }
        } else {
            if let Some((holder, _)) = c.cluster.attach_owner(&self.id).map_err(|e| self.err(e))? {
                return Err(self.err(VolumeErrorKind::ReplicasOnHolder(holder)));
            }
            let generation =
                replicated::take_attach(&c, &record, Duration::ZERO).map_err(|e| self.err(e))?;
            // States change only under an attach: checked once this one holds it.
            let checked = if add {
                Ok(())
            } else {
                check_remove(&c, &record, &members, &node)
            };
            let changed = checked.and_then(|()| {
                c.cluster
                    .change_replicas(&record.name, &record.id, generation, change)
                    .map_err(VolumeErrorKind::from)
            });
            // No IO ran: an unreleased mark of an earlier attach stays.
            replicated::give_back(&c, &record.id, &record.name, generation, false);
            let changed = changed.map_err(|e| self.err(e))?;
            // Redundancy comes back now, not at the next attach.
            match replicated::start_resync(&c, changed, false) {
                Ok(_) => {}
                // Another node's sweep (or an attach) was quicker: it resyncs.
                Err(VolumeErrorKind::Cluster(e))
                    if matches!(
                        *e,
                        ClusterError::HeldForResync { .. } | ClusterError::HeldBy { .. }
                    ) => {}
                Err(e) => {
                    tracing::warn!(volume = %record.name, error = %e, "no background resync now: the next attach or sweep resyncs");
                }
            }
        }
        if !add && node == me {
            // Else its node drops it at its next sweep.
            if let Err(e) = c.replicas.remove(&record.id) {
                tracing::info!(volume = %record.name, error = %e, "the removed replica is dropped at the next sweep");
            }
        }
        tracing::info!(volume = %record.name, node, add, "replicas changed");
        Ok(node)
    }
}

impl Handler<ChangeReplica> for VolumeActor {
    type Result = Result<String, VolumeError>;
    fn handle(&mut self, m: ChangeReplica, _: &mut SyncContext<Self>) -> Self::Result {
        self.change_replica(m.add, m.node)
    }
}

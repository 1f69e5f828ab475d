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

use super::forward::{forward_to, parse_reply, HolderOp};
use super::{replicated, Backing, VolumeActor, VolumeError, VolumeErrorKind};
use crate::catalog::VolumeRecord;
use crate::cluster::placement::{place, PlacementRequest};
use crate::cluster::{ClusterError, Member, ReplicaChange};
use crate::config::ClusterNode;
use crate::replication::{NewReplica, ReplicaContents, ReplicaState, ReplicationError};
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
    /// An add that replaces this node's replica (its node stayed down: the
    /// sweep's `cluster::replace`); run only where the volume is attached,
    /// or attached nowhere.
    pub replaces: Option<String>,
}

fn refused(why: String) -> VolumeErrorKind {
    VolumeErrorKind::ReplicaChange(why)
}

/// What `node`'s replica of `record` holds: read here, or asked of it.
fn contents_on(
    c: &ClusterNode,
    record: &VolumeRecord,
    node: &str,
) -> Result<ReplicaContents, VolumeErrorKind> {
    if node == c.cluster.node() {
        return Ok(c.replicas.contents(&record.id)?);
    }
    let reply = forward_to(c, record, node, HolderOp::ReplicaContents)?;
    parse_reply(node, &reply)
}

/// The node a new replica goes to: `asked`, or the one placement ranks
/// first among the live members without one, honouring `group`/`fg` and
/// away from the zones of the other replicas (but `replacing`'s, whose
/// zone it may take).
fn new_replica_node(
    c: &ClusterNode,
    record: &VolumeRecord,
    members: &[Member],
    asked: Option<String>,
    replacing: Option<&str>,
) -> Result<String, VolumeErrorKind> {
    // A replacement has one more for the time its replica resyncs.
    if record.replicas.len() >= MAX_REPLICAS + usize::from(replacing.is_some()) {
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
        if members.iter().any(|m| m.name == n && m.cordoned) {
            return Err(refused(format!(
                "node {n} is cordoned (it takes no new replicas): name another node, or `dunnage node uncordon {n}`"
            )));
        }
        return Ok(n);
    }
    let beside: Vec<String> = record
        .replicas
        .iter()
        .filter(|n| Some(n.as_str()) != replacing)
        .cloned()
        .collect();
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
        cordoned: &crate::cluster::placement::cordoned(members),
        short_of_space: &crate::cluster::placement::short_of_space(members, record.spec.size),
        zones: &crate::cluster::placement::zones(members),
        beside: &beside,
    };
    let mut chosen = place(&req, &up, &others).map_err(|e| {
        refused(format!(
            "no node can take another replica ({e}); its replicas are on {}",
            record.replicas.join(", ")
        ))
    })?;
    Ok(chosen.remove(0))
}

/// Whether `node` is a live member (its etcd lease is alive).
fn is_up(members: &[Member], node: &str) -> bool {
    members.iter().any(|m| m.name == node && m.up)
}

/// Start the background resync of a volume attached nowhere whose
/// replicas just changed: redundancy comes back now, not at the next
/// attach.
fn resync_now(c: &std::sync::Arc<ClusterNode>, record: VolumeRecord) {
    let name = record.name.clone();
    match replicated::start_resync(c, record, false) {
        Ok(_) => {}
        // Another node's sweep (or an attach) was quicker: it resyncs.
        Err(VolumeErrorKind::Cluster(e))
            if matches!(
                *e,
                ClusterError::HeldForResync { .. } | ClusterError::HeldBy { .. }
            ) => {}
        Err(e) => {
            tracing::warn!(volume = %name, error = %e, "no background resync now: the next attach or sweep resyncs");
        }
    }
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
    let current_elsewhere = record
        .replicas
        .iter()
        .any(|n| n != node && states.get(n) == Some(&ReplicaState::InSync) && is_up(members, n));
    if current_elsewhere {
        return Ok(());
    }
    Err(refused(format!(
        "no other replica is in sync on a live node, so node {node}'s may hold the only current copy of the data; add a replica first and let it resync (attach the volume, `dunnage volume resync {}`)",
        record.name
    )))
}

/// After `node`'s replica was accepted as the data, while `generation`
/// holds the attach: the snapshot records stop listing it on snapshots it
/// lacks (its files may have been put back from a backup older than them),
/// so that a restore or a clone does not count on it for those. Best
/// effort: the accept stands either way.
fn unlist_snapshots_lacking(
    c: &ClusterNode,
    record: &VolumeRecord,
    generation: crate::replication::Generation,
    node: &str,
) {
    let held = match contents_on(c, record, node) {
        Ok(held) => held.snapshots,
        Err(e) => {
            tracing::warn!(volume = %record.name, node, error = %e,
                "cannot read which snapshots the accepted replica holds: the snapshot records may list it on some it lacks");
            return;
        }
    };
    match c
        .cluster
        .unlist_snapshots_lacking(&record.id, generation, node, &held)
    {
        Ok(gone) if !gone.is_empty() => {
            tracing::warn!(volume = %record.name, node, snapshots = ?gone,
                "the accepted replica lacks these snapshots: no longer listed on its node")
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(volume = %record.name, node, error = %e,
            "cannot update the snapshot records after the accept: they may list the accepted replica on snapshots it lacks"),
    }
}

impl VolumeActor {
    /// Refuse to remove `node`'s replica of `record` while a clone's
    /// replica there shares its blocks. The catalog says which clones have
    /// a replica on the node, not whether it was made sharing or as a
    /// plain copy (`LocalReplicas::open_as`): the node itself is asked.
    fn check_no_clone_shares(
        &self,
        c: &ClusterNode,
        record: &VolumeRecord,
        node: &str,
    ) -> Result<(), VolumeError> {
        let catalog = &*self.node.catalog;
        let there = super::clones_of(catalog, &record.id, |r| {
            r.replicas.iter().any(|n| n == node)
        });
        if there.is_empty() {
            return Ok(());
        }
        let sharing: Vec<String> = match contents_on(c, record, node) {
            Ok(held) => catalog
                .list()
                .into_iter()
                .filter(|r| held.clones.contains(&r.id))
                .map(|r| r.name)
                .collect(),
            Err(e) => {
                return Err(self.err(refused(format!(
                    "clone {} has a replica on node {node}, and node {node} could not say whether it shares this replica's blocks ({e}); start its daemon and retry, or remove that replica first (`dunnage replica rm {} {node}`)",
                    there.join(", "),
                    there[0]
                ))))
            }
        };
        if sharing.is_empty() {
            return Ok(());
        }
        Err(self.err(refused(format!(
            "the replica of clone {} on node {node} shares its blocks; remove that first (`dunnage replica rm {} {node}`, or remove the clone)",
            sharing.join(", "),
            sharing[0]
        ))))
    }

    pub(super) fn change_replica(
        &mut self,
        add: bool,
        asked: Option<String>,
        replaces: Option<String>,
    ) -> Result<String, VolumeError> {
        let what = if add { "replica add" } else { "replica rm" };
        let Some(c) = self.node.cluster.clone() else {
            return Err(self.err(VolumeErrorKind::NotClustered(what)));
        };
        let record = self.record()?;
        if let Some(old) = &replaces {
            if !record.replicas.contains(old) {
                return Err(self.err(refused(format!("node {old} holds no replica of it"))));
            }
            // Decided already (a sweep read etcd before the record changed).
            if let Some(new) = record.replacing.get(old) {
                if record.replicas.contains(new) {
                    return Ok(new.clone());
                }
            }
        }
        if let Some(holder) = self.holder_elsewhere(&c)? {
            if replaces.is_some() {
                // Its attached node's sweep replaces it.
                return Err(self.err(VolumeErrorKind::ReplicasOnHolder(holder)));
            }
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
            new_replica_node(&c, &record, &members, asked, replaces.as_deref())
                .map_err(|e| self.err(e))?
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
            self.check_no_clone_shares(&c, &record, &n)?;
            n
        };
        let change = if let (true, Some(old)) = (add, replaces.as_deref()) {
            ReplicaChange::Replace {
                node: &node,
                replaces: old,
            }
        } else if add {
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
            resync_now(&c, changed);
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

/// `dunnage replica accept VOL NODE`: take `node`'s replica as the
/// volume's data when no replica in sync is left on a live node (DRBD's
/// forced primary, LINSTOR's `--discard-my-data` on the others). Answers
/// the replicas recorded outdated by it.
#[derive(Message)]
#[rtype(result = "Result<Vec<String>, VolumeError>")]
pub struct AcceptReplica {
    pub node: String,
}

/// Why `node`'s replica may not be accepted, from etcd's states under an
/// attach this node holds; else the replicas that were in sync on a node
/// now down (their writes since the others fell behind are given up).
fn check_accept(
    replicas: &[String],
    states: &std::collections::BTreeMap<String, ReplicaState>,
    members: &[Member],
    node: &str,
) -> Result<Vec<String>, String> {
    let up = |n: &str| is_up(members, n);
    if !up(node) {
        return Err(format!(
            "node {node} is not up (`dunnage node ls`): start its daemon first, so that the attach after the accept can read its replica"
        ));
    }
    if states.get(node) == Some(&ReplicaState::InSync) {
        return Err(format!(
            "node {node}'s replica is recorded in sync already: attach the volume (an attach that finds it rolled back or its files replaced records it outdated, and says so)"
        ));
    }
    let in_sync: Vec<&String> = replicas
        .iter()
        .filter(|n| *n != node && states.get(*n) == Some(&ReplicaState::InSync))
        .collect();
    if let Some(live) = in_sync.iter().find(|n| up(n)) {
        return Err(format!(
            "node {live}'s replica is in sync and its node is up: attach the volume, and it resyncs node {node}'s from it; accepting {node}'s would throw away writes that only {live}'s holds"
        ));
    }
    Ok(in_sync.into_iter().cloned().collect())
}

impl VolumeActor {
    fn accept_replica(&mut self, node: String) -> Result<Vec<String>, VolumeError> {
        let Some(c) = self.node.cluster.clone() else {
            return Err(self.err(VolumeErrorKind::NotClustered("replica accept")));
        };
        let record = self.record()?;
        if !record.replicas.contains(&node) {
            return Err(self.err(refused(format!(
                "node {node} holds no replica of it (its replicas: {})",
                record.replicas.join(", ")
            ))));
        }
        // Attached: it has an in-sync replica, else the attach had failed.
        let holder = match &self.attached {
            Some(_) => Some(c.cluster.node().to_string()),
            None => c
                .cluster
                .attach_owner(&self.id)
                .map_err(|e| self.err(e))?
                .map(|(n, _)| n),
        };
        if let Some(holder) = holder {
            return Err(self.err(refused(format!(
                "it is attached on node {holder}, so a replica in sync serves it: there is nothing to accept"
            ))));
        }
        let members = c.cluster.members().map_err(|e| self.err(e))?;
        let generation =
            replicated::take_attach(&c, &record, Duration::ZERO).map_err(|e| self.err(e))?;
        // States change only under an attach: checked once this one holds it.
        let accepted = c
            .cluster
            .replica_states(&record.id)
            .map_err(VolumeErrorKind::from)
            .and_then(|states| {
                check_accept(&record.replicas, &states, &members, &node).map_err(refused)
            })
            .and_then(|lost| {
                let others: Vec<String> = record
                    .replicas
                    .iter()
                    .filter(|n| **n != node)
                    .cloned()
                    .collect();
                c.cluster
                    .accept_replica(&record.id, generation, &node, &others)
                    .map_err(VolumeErrorKind::from)?;
                unlist_snapshots_lacking(&c, &record, generation, &node);
                Ok((others, lost))
            });
        // No IO ran: an unreleased mark of an earlier attach stays.
        replicated::give_back(&c, &record.id, &record.name, generation, false);
        let (others, lost) = accepted.map_err(|e| self.err(e))?;
        for n in &lost {
            tracing::warn!(volume = %record.name, node = %n, accepted = %node,
                "replica was in sync on a node that is down: recorded outdated, its writes since the accepted replica fell behind are given up");
        }
        tracing::warn!(volume = %record.name, node = %node, outdated = ?others,
            "replica accepted as the volume's data: the others are resynced whole from it");
        resync_now(&c, record);
        Ok(others)
    }
}

impl Handler<AcceptReplica> for VolumeActor {
    type Result = Result<Vec<String>, VolumeError>;
    fn handle(&mut self, m: AcceptReplica, _: &mut SyncContext<Self>) -> Self::Result {
        self.accept_replica(m.node)
    }
}

impl Handler<ChangeReplica> for VolumeActor {
    type Result = Result<String, VolumeError>;
    fn handle(&mut self, m: ChangeReplica, _: &mut SyncContext<Self>) -> Self::Result {
        self.change_replica(m.add, m.node, m.replaces)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn members(up: &[(&str, bool)]) -> Vec<Member> {
        up.iter()
            .map(|(n, up)| Member {
                name: n.to_string(),
                addr: "127.0.0.1:1".parse().unwrap(),
                up: *up,
                started_at: chrono::Utc::now(),
                cordoned: false,
                capacity: None,
                zone: None,
            })
            .collect()
    }

    fn states(s: &[(&str, ReplicaState)]) -> BTreeMap<String, ReplicaState> {
        s.iter().map(|(n, s)| (n.to_string(), *s)).collect()
    }

    const ABC: [&str; 3] = ["a", "b", "c"];

    fn replicas() -> Vec<String> {
        ABC.iter().map(|n| n.to_string()).collect()
    }

    use ReplicaState::{InSync, Outdated};

    #[test]
    fn a_replica_is_accepted_only_when_no_in_sync_one_is_on_a_live_node() {
        let all_up = members(&[("a", true), ("b", true), ("c", true)]);
        let none = states(&[("a", Outdated), ("b", Outdated), ("c", Outdated)]);
        assert_eq!(check_accept(&replicas(), &none, &all_up, "b"), Ok(vec![]));

        // An in-sync one on a live node serves the volume: refused.
        let c_in_sync = states(&[("a", Outdated), ("b", Outdated), ("c", InSync)]);
        let err = check_accept(&replicas(), &c_in_sync, &all_up, "b").unwrap_err();
        assert!(err.contains("node c's replica is in sync"), "{err}");

        // Its node gone: accepted, and c is named as given up.
        let c_down = members(&[("a", true), ("b", true), ("c", false)]);
        assert_eq!(
            check_accept(&replicas(), &c_in_sync, &c_down, "b"),
            Ok(vec!["c".to_string()])
        );
    }

    #[test]
    fn accepting_a_down_or_in_sync_replica_is_refused() {
        let b_down = members(&[("a", true), ("b", false), ("c", true)]);
        let none = states(&[("a", Outdated), ("b", Outdated), ("c", Outdated)]);
        let err = check_accept(&replicas(), &none, &b_down, "b").unwrap_err();
        assert!(err.contains("node b is not up"), "{err}");
        // No record at all for a node that never joined.
        let err = check_accept(&replicas(), &none, &b_down[..1], "b").unwrap_err();
        assert!(err.contains("node b is not up"), "{err}");

        let all_up = members(&[("a", true), ("b", true), ("c", true)]);
        let b_in_sync = states(&[("a", Outdated), ("b", InSync), ("c", Outdated)]);
        let err = check_accept(&replicas(), &b_in_sync, &all_up, "b").unwrap_err();
        assert!(err.contains("recorded in sync already"), "{err}");
    }
}

//! The registry's side of a cluster: placing a new volume's replicas,
//! inspect's cluster view, node listing, and dropping replicas of volumes
//! the catalog no longer has.

use super::{clone::Created, forward, Registry, RegistryError, Reply};
use crate::catalog::{new_volume_id, VolumeRecord};
use crate::cluster::placement::{cordoned, place, PlacementRequest};
use crate::cluster::{ClusterError, DownClock, Member, Step};
use crate::config::ClusterNode;
use crate::engine::CryptEngine;
use crate::replication::wire::ErrorCode;
use crate::replication::Answer;
use crate::spec::{SpecError, VolumeSpec};
use crate::volume::forward::{HolderOp, HolderRequest, RunForwarded};
use crate::volume::replicas::ChangeReplica as ChangeReplicaMsg;
use crate::volume::replicated::{self as vr, ClusterView};
use crate::volume::sharing::OpenShare;
use actix::prelude::*;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

impl Registry {
    fn cluster_err(&self, volume: &str, e: ClusterError) -> RegistryError {
        RegistryError::Cluster {
            volume: volume.to_string(),
            node: self.node.name.clone(),
            source: e,
        }
    }

    /// A new volume in the cluster: replicas placed on live members, all
    /// in sync (an empty volume reads zeros everywhere), record in etcd.
    /// Images are made by the replica nodes when the volume is first attached.
    pub(super) fn create_in_cluster(
        &mut self,
        c: &Arc<ClusterNode>,
        name: &str,
        spec: VolumeSpec,
        opts: BTreeMap<String, String>,
    ) -> Reply<Created> {
        if let Some(existing) = self.node.catalog.get(name) {
            return Ok(Created::Done(self.info(existing)));
        }
        // Encrypted with the cluster's key: every node that may attach the
        // volume needs it, and it is stored nowhere.
        let crypt = if spec.secure {
            let Some(key) = self.node.keys.node_key() else {
                return Err(SpecError::Value {
                    option: "secure".into(),
                    value: "true".into(),
                    reason: format!(
                        "a cluster encrypts with the key of every node's --secret-file, and node {} was started without one; start every node's dunnage serve with the same --secret-file",
                        c.cluster.node()
                    ),
                }
                .into());
            };
            Some(Box::new(CryptEngine::new_params(&key).map_err(
                |source| RegistryError::Create {
                    volume: name.to_string(),
                    node: self.node.name.clone(),
                    source,
                },
            )?))
        } else {
            None
        };
        let members = c.cluster.members().map_err(|e| self.cluster_err(name, e))?;
        let up: Vec<String> = members
            .iter()
            .filter(|m| m.up)
            .map(|m| m.name.clone())
            .collect();
        let cordoned = cordoned(&members);
        let existing: Vec<(Option<String>, Vec<String>)> = self
            .node
            .catalog
            .list()
            .into_iter()
            .map(|r| (r.spec.group, r.replicas))
            .collect();
        let req = PlacementRequest {
            repl: spec.repl as usize,
            nodes: &spec.nodes,
            group: spec.group.as_deref(),
            fg: spec.fg,
            cordoned: &cordoned,
            short_of_space: &crate::cluster::placement::short_of_space(&members, spec.size),
            zones: &crate::cluster::placement::zones(&members),
            beside: &[],
        };
        let replicas = place(&req, &up, &existing)
            .map_err(|e| self.cluster_err(name, ClusterError::Placement(e)))?;
        let record = VolumeRecord {
            name: name.to_string(),
            id: new_volume_id(),
            created_at: chrono::Utc::now(),
            spec,
            options: opts,
            formatted: false,
            clone_of: None,
            replicas,
            crypt,
            grow_fs: false,
            replacing: Default::default(),
        };
        c.cluster
            .init_replica_states(&record.id, &record.replicas)
            .map_err(|e| self.cluster_err(name, e))?;
        if let Err(source) = self.node.catalog.insert(record.clone()) {
            let _ = c.cluster.forget_volume(&record.id);
            if let Some(existing) = self.node.catalog.get(name) {
                // Created meanwhile on another node: Create is idempotent.
                return Ok(Created::Done(self.info(existing)));
            }
            return Err(RegistryError::Catalog {
                volume: name.to_string(),
                node: self.node.name.clone(),
                source,
            });
        }
        tracing::info!(volume = %record.name, id = %record.id, size = record.spec.size, replicas = ?record.replicas, "created in the cluster");
        Ok(Created::Done(self.info(record)))
    }
}

/// Delete local replicas the cluster's catalog no longer places here: of
/// volumes removed on another node, or replicas removed (`replica rm`).
/// Only when the catalog answered: an unreachable etcd must never look
/// like an empty catalog.
pub fn sweep_replicas(c: &ClusterNode) -> Vec<String> {
    let me = c.cluster.node();
    let placed_here = || -> Option<std::collections::HashSet<String>> {
        match c.cluster.volume_replicas() {
            Ok(all) => Some(
                all.into_iter()
                    .filter(|(_, nodes)| nodes.iter().any(|n| n == me))
                    .map(|(id, _)| id)
                    .collect(),
            ),
            Err(e) => {
                tracing::debug!(error = %e, "replica sweep skipped: the catalog did not answer");
                None
            }
        }
    };
    let Some(ids) = placed_here() else {
        return Vec::new();
    };
    for id in &ids {
        drop_orphan_snapshots(c, id);
    }
    let Ok(dirs) = std::fs::read_dir(c.replicas.volumes_dir()) else {
        return Vec::new();
    };
    let stale: Vec<String> = dirs
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|id| crate::replication::check_volume_id(id).is_ok() && !ids.contains(id))
        .collect();
    if stale.is_empty() {
        return Vec::new();
    }
    // Read again right before deleting: a replica added here meanwhile
    // (`replica add`) must stay.
    let Some(ids) = placed_here() else {
        return Vec::new();
    };
    let mut dropped = Vec::new();
    for id in stale.into_iter().filter(|id| !ids.contains(id)) {
        match c.replicas.remove(&id) {
            Ok(()) => dropped.push(id),
            Err(e) => {
                tracing::warn!(volume_id = %id, error = %e, "cannot drop a replica the catalog no longer places here")
            }
        }
    }
    if !dropped.is_empty() {
        tracing::info!(
            ?dropped,
            "dropped replicas the catalog no longer places here"
        );
    }
    dropped
}

/// Ask for the background resync of each volume attached nowhere whose
/// replicas fell behind, where this node is the one to run it
/// ([`crate::cluster::Behind::runner`]), as DRBD resyncs a peer that
/// reconnects whatever the roles. The volume's actor checks again and
/// starts it ([`vr::StartResync`]). Answers the volumes asked.
pub(super) fn resync_behind(reg: &mut Registry, c: &ClusterNode) -> Vec<String> {
    let (behind, up) = match c.cluster.detached_behind() {
        Ok(b) => b,
        Err(e) => {
            tracing::debug!(error = %e, "resync check skipped: the catalog did not answer");
            return Vec::new();
        }
    };
    let me = c.cluster.node();
    let mut asked = Vec::new();
    for b in behind {
        if b.runner(&up) != Some(me) || c.resyncing(&b.id) || c.resync_held_off(&b.id) {
            continue;
        }
        let addr = match reg.lookup(&b.name) {
            Ok(r) if r.id == b.id => reg.actor(&r),
            _ => continue,
        };
        let Ok(addr) = addr else { continue };
        ask_resync(addr, b.name.clone(), me.to_string(), false);
        asked.push(b.name);
    }
    asked
}

/// Ask volume `name`'s actor for a background resync (the sweep's), and
/// log how it went.
fn ask_resync(
    addr: actix::Addr<crate::volume::VolumeActor>,
    name: String,
    node: String,
    lost_here: bool,
) {
    actix::spawn(async move {
        let ask = vr::StartResync {
            auto: true,
            lost_here,
        };
        let what = if lost_here {
            "this node's replica is not the image recorded in sync (its files were lost or replaced)"
        } else {
            "a replica of this volume attached nowhere is behind"
        };
        match addr.send(ask).await {
            Ok(Ok(true)) if lost_here => {
                tracing::warn!(volume = %name, node, "{what}: resyncing it from the others")
            }
            Ok(Ok(true)) => tracing::info!(volume = %name, node, "{what}: resyncing it here"),
            Ok(Ok(false)) | Err(_) => {}
            Ok(Err(e)) => {
                tracing::warn!(volume = %name, node, error = %e, "{what}, but its resync could not start; the sweep tries again in a few minutes")
            }
        }
    });
}

/// Resync the volumes attached nowhere whose replica here lost its files
/// (a wiped data dir, a new disk) while every replica is recorded in sync:
/// only this node can see it, by the image's incarnation on disk against
/// the one etcd records. The mirror opened here finds it replaced,
/// records it outdated and copies it whole from the others. Returns the
/// volumes it asked.
pub(super) fn resync_lost_here(reg: &mut Registry, c: &ClusterNode) -> Vec<String> {
    let me = c.cluster.node().to_string();
    let here = match c.cluster.detached_met_on(&me) {
        Ok(h) => h,
        Err(e) => {
            tracing::debug!(error = %e, "lost replica check skipped: the catalog did not answer");
            return Vec::new();
        }
    };
    let mut asked = Vec::new();
    for (name, id, recorded) in here {
        if c.replicas.incarnation_on_disk(&id) == Some(recorded)
            || c.resyncing(&id)
            || c.resync_held_off(&id)
        {
            continue;
        }
        let addr = match reg.lookup(&name) {
            Ok(r) if r.id == id => reg.actor(&r),
            _ => continue,
        };
        let Ok(addr) = addr else { continue };
        ask_resync(addr, name.clone(), me.clone(), true);
        asked.push(name);
    }
    asked
}

/// The sweep's memory for replacing dead nodes' replicas: when it saw
/// each node go down, the volumes with a step under way, and each
/// volume's last failure (logged once, not every sweep).
#[derive(Default)]
pub struct Replacements {
    clock: DownClock,
    busy: HashSet<String>,
    failed: HashMap<String, String>,
}

/// Replace the replicas held by nodes down for longer than `serve
/// --replace-after` ([`crate::cluster::VolumeReplicas::next_step`]): one
/// step per volume and sweep, for the volumes this node runs it for (their
/// attached node, or attached nowhere the first live in-sync replica's),
/// through the volume's actor as `replica add`/`rm` would. Answers the
/// volumes asked.
pub(super) fn replace_gone(reg: &mut Registry, c: &ClusterNode) -> Vec<(String, Step)> {
    let Some(after) = c.sweep.replace_after else {
        return Vec::new();
    };
    let crate::cluster::ReplicaMap {
        volumes,
        known,
        up,
        cordoned,
    } = match c.cluster.replicas_everywhere() {
        Ok(v) => v,
        Err(e) => {
            tracing::debug!(error = %e, "replacement check skipped: the catalog did not answer");
            return Vec::new();
        }
    };
    let now = std::time::Instant::now();
    let gone = {
        let mut r = reg.replacements.lock();
        r.clock.observe(known.iter().map(String::as_str), &up, now);
        // A cordoned node's replicas are the operator's (maintenance,
        // `node evacuate`): not replaced behind their back.
        let mut gone = r.clock.down_for(after, now);
        gone.retain(|n| !cordoned.contains(n));
        gone
    };
    let me = c.cluster.node().to_string();
    let mut asked = Vec::new();
    for v in volumes {
        if !v.runs_here(&me, &up) {
            continue;
        }
        let Some(step) = v.next_step(&up, &gone) else {
            continue;
        };
        let addr = match reg.lookup(&v.name) {
            Ok(r) if r.id == v.id => reg.actor(&r).ok(),
            _ => None,
        };
        let Some(addr) = addr else { continue };
        let retrying = {
            let mut r = reg.replacements.lock();
            if !r.busy.insert(v.id.clone()) {
                continue;
            }
            r.failed.contains_key(&v.id)
        };
        let msg = match &step {
            Step::Add { replaces } => {
                if !retrying {
                    tracing::warn!(volume = %v.name, node = %me, down = %replaces, after_secs = after.as_secs(), "a replica's node stayed down: adding a replica elsewhere to replace it");
                }
                ChangeReplicaMsg {
                    add: true,
                    node: None,
                    replaces: Some(replaces.clone()),
                }
            }
            Step::Drop { node } => ChangeReplicaMsg {
                add: false,
                node: Some(node.clone()),
                replaces: None,
            },
        };
        let (name, id, memory) = (v.name.clone(), v.id.clone(), reg.replacements.clone());
        let what = step.clone();
        actix::spawn(async move {
            let res = addr.send(msg).await;
            let mut r = memory.lock();
            r.busy.remove(&id);
            match (res, &what) {
                (Ok(Ok(added)), Step::Add { replaces }) => {
                    r.failed.remove(&id);
                    tracing::info!(volume = %name, added = %added, replaces = %replaces, "replacement replica added; the replaced one is removed once it is in sync");
                }
                (Ok(Ok(_)), Step::Drop { node }) => {
                    r.failed.remove(&id);
                    tracing::info!(volume = %name, removed = %node, "replica of a node that stayed down removed: its replacement is in sync");
                }
                (Ok(Err(e)), _) => {
                    let e = e.to_string();
                    if r.failed.get(&id) != Some(&e) {
                        tracing::warn!(volume = %name, step = ?what, error = %e, "cannot replace the replica of a node that stayed down; the sweep tries again");
                        r.failed.insert(id, e);
                    }
                }
                (Err(_), _) => {}
            }
        });
        asked.push((v.name, step));
    }
    asked
}

/// Delete the snapshots of this node's replica of `id` that etcd does not
/// list (a crash between the replicas' take and etcd's record), while the
/// volume is attached nowhere. A take under a name listed later deletes
/// such an orphan too; this frees the space of names nobody takes again.
fn drop_orphan_snapshots(c: &ClusterNode, id: &str) {
    if c.replicas.dir(id).is_ok_and(|d| !d.exists()) {
        return;
    }
    let listed = || -> Result<Option<std::collections::HashSet<String>>, ClusterError> {
        if c.cluster.attach_holder(id)?.is_some() {
            return Ok(None);
        }
        Ok(Some(
            c.cluster
                .snapshots(id)?
                .into_iter()
                .map(|s| s.name)
                .collect(),
        ))
    };
    match c.replicas.drop_orphan_snapshots(id, listed) {
        Ok(dropped) if !dropped.is_empty() => {
            tracing::info!(volume_id = %id, ?dropped, "deleted snapshots etcd does not list (left by a crash mid-snapshot)")
        }
        Ok(_) | Err(crate::replication::ReplicationError::Busy(_)) => {}
        Err(e) => tracing::debug!(volume_id = %id, error = %e, "orphan snapshot check skipped"),
    }
}

/// `volume inspect`'s cluster part (answered by the volume's actor).
#[derive(Message)]
#[rtype(result = "Reply<Option<ClusterView>>")]
pub struct QueryCluster {
    pub volume: String,
}

impl Handler<QueryCluster> for Registry {
    type Result = ResponseFuture<Reply<Option<ClusterView>>>;
    fn handle(&mut self, m: QueryCluster, _: &mut Context<Self>) -> Self::Result {
        match self.lookup(&m.volume).and_then(|r| self.actor(&r)) {
            Ok(addr) => forward(addr, vr::QueryCluster),
            Err(e) => Box::pin(async move { Err(e) }),
        }
    }
}

/// `volume ls`'s cluster part: each volume's attach and replica states, by
/// name, read from etcd (not through the volume actors, one of which may be
/// busy with a long attach); empty on a single node. Once etcd fails to
/// answer, the volumes left are left out (not waited for one by one).
#[derive(Message)]
#[rtype(result = "Reply<std::collections::BTreeMap<String, ClusterView>>")]
pub struct ListCluster;

impl Handler<ListCluster> for Registry {
    type Result = ResponseFuture<Reply<std::collections::BTreeMap<String, ClusterView>>>;
    fn handle(&mut self, _: ListCluster, _: &mut Context<Self>) -> Self::Result {
        let Some(c) = self.node.cluster.clone() else {
            return Box::pin(async { Ok(Default::default()) });
        };
        let records = self.node.catalog.list();
        Box::pin(async move {
            let views = tokio::task::spawn_blocking(move || {
                let mut views = std::collections::BTreeMap::new();
                for r in records {
                    match crate::volume::replicated::etcd_view(&c, &r) {
                        Ok(view) => views.insert(r.name, view),
                        Err(e) => {
                            tracing::warn!(volume = %r.name, error = %e, "volume ls: etcd did not answer; listing without the cluster columns from here");
                            break;
                        }
                    };
                }
                views
            })
            .await;
            Ok(views.unwrap_or_default())
        })
    }
}

/// `dunnage replica checksum VOL`.
#[derive(Message)]
#[rtype(result = "Reply<String>")]
pub struct ReplicaChecksum {
    pub volume: String,
}

impl Handler<ReplicaChecksum> for Registry {
    type Result = ResponseFuture<Reply<String>>;
    fn handle(&mut self, m: ReplicaChecksum, _: &mut Context<Self>) -> Self::Result {
        match self.lookup(&m.volume).and_then(|r| self.actor(&r)) {
            Ok(addr) => forward(addr, vr::Checksum),
            Err(e) => Box::pin(async move { Err(e) }),
        }
    }
}

/// `dunnage replica add` / `rm`: answers the node whose replica was added
/// or removed.
#[derive(Message)]
#[rtype(result = "Reply<String>")]
pub struct ChangeReplica {
    pub volume: String,
    pub add: bool,
    pub node: Option<String>,
}

impl Handler<ChangeReplica> for Registry {
    type Result = ResponseFuture<Reply<String>>;
    fn handle(&mut self, m: ChangeReplica, _: &mut Context<Self>) -> Self::Result {
        let msg = crate::volume::replicas::ChangeReplica {
            add: m.add,
            node: m.node,
            replaces: None,
        };
        match self.lookup(&m.volume).and_then(|r| self.actor(&r)) {
            Ok(addr) => forward(addr, msg),
            Err(e) => Box::pin(async move { Err(e) }),
        }
    }
}

/// `dunnage replica accept VOL NODE`: answers the replicas now outdated.
#[derive(Message)]
#[rtype(result = "Reply<Vec<String>>")]
pub struct AcceptReplica {
    pub volume: String,
    pub node: String,
}

impl Handler<AcceptReplica> for Registry {
    type Result = ResponseFuture<Reply<Vec<String>>>;
    fn handle(&mut self, m: AcceptReplica, _: &mut Context<Self>) -> Self::Result {
        let msg = crate::volume::replicas::AcceptReplica { node: m.node };
        match self.lookup(&m.volume).and_then(|r| self.actor(&r)) {
            Ok(addr) => forward(addr, msg),
            Err(e) => Box::pin(async move { Err(e) }),
        }
    }
}

/// A request another node forwarded (a `volume::forward::HolderRequest`
/// in JSON), for the volume's actor here. Errors carry the wire's code
/// and the message without this node's prefix (the asking node adds its own).
#[derive(Message)]
#[rtype(result = "Result<Answer, (ErrorCode, String)>")]
pub struct Forwarded(pub String);

/// A refusal as it travels back to the node that forwarded the request.
fn wire_refusal(e: RegistryError) -> (ErrorCode, String) {
    let code = match e.status() {
        400 => ErrorCode::Invalid,
        404 => ErrorCode::NotFound,
        409 | 503 => ErrorCode::Busy,
        _ => ErrorCode::Io,
    };
    let message = match e {
        RegistryError::Volume(v) => v.kind.to_string(),
        e => e.to_string(),
    };
    (code, message)
}

impl Handler<Forwarded> for Registry {
    type Result = ResponseFuture<Result<Answer, (ErrorCode, String)>>;
    fn handle(&mut self, m: Forwarded, _: &mut Context<Self>) -> Self::Result {
        let req: HolderRequest = match serde_json::from_str(&m.0) {
            Ok(r) => r,
            Err(e) => {
                let refused = (
                    ErrorCode::Invalid,
                    format!("a malformed forwarded request: {e}"),
                );
                return Box::pin(async move { Err(refused) });
            }
        };
        if req.op == HolderOp::ReplicaContents {
            // Not through the volume's actor: the asking node's actor may
            // be waiting for a reply from this node's (a request forwarded
            // to the holder, which asks this node).
            let answer = match &self.node.cluster {
                Some(c) => c
                    .replicas
                    .contents(&req.volume_id)
                    .map(|held| {
                        Answer::Reply(serde_json::to_string(&held).expect("a reply serializes"))
                    })
                    .map_err(|e| (ErrorCode::Io, e.to_string())),
                None => Err((ErrorCode::Invalid, "this node is not in a cluster".into())),
            };
            return Box::pin(async move { answer });
        }
        let addr = match self.lookup(&req.volume).and_then(|r| self.actor(&r)) {
            Ok(a) => a,
            Err(e) => {
                let refused = wire_refusal(e);
                return Box::pin(async move { Err(refused) });
            }
        };
        if req.op == HolderOp::Share {
            let open = OpenShare {
                volume_id: req.volume_id,
                from: req.from.clone(),
            };
            let what = format!("volume {} for node {}", req.volume, req.from);
            return Box::pin(async move {
                let grant = match addr.send(open).await {
                    Ok(r) => r.map_err(|e| wire_refusal(e.into()))?,
                    Err(_) => return Err(wire_refusal(RegistryError::ShuttingDown)),
                };
                Ok(Answer::Session(grant.into_session(what)))
            });
        }
        let run = RunForwarded {
            volume_id: req.volume_id,
            from: req.from,
            op: req.op,
        };
        Box::pin(async move {
            match addr.send(run).await {
                Ok(r) => r.map(Answer::Reply).map_err(|e| wire_refusal(e.into())),
                Err(_) => Err(wire_refusal(RegistryError::ShuttingDown)),
            }
        })
    }
}

/// `dunnage volume verify`: answers the node the comparison runs on.
#[derive(Message)]
#[rtype(result = "Reply<String>")]
pub struct StartVerify {
    pub volume: String,
}

impl Handler<StartVerify> for Registry {
    type Result = ResponseFuture<Reply<String>>;
    fn handle(&mut self, m: StartVerify, _: &mut Context<Self>) -> Self::Result {
        match self.lookup(&m.volume).and_then(|r| self.actor(&r)) {
            Ok(addr) => forward(addr, vr::StartVerify),
            Err(e) => Box::pin(async move { Err(e) }),
        }
    }
}

/// `dunnage volume resync` on a volume attached nowhere: resync it in the
/// background here. Answers whether one started.
#[derive(Message)]
#[rtype(result = "Reply<bool>")]
pub struct StartResync {
    pub volume: String,
}

impl Handler<StartResync> for Registry {
    type Result = ResponseFuture<Reply<bool>>;
    fn handle(&mut self, m: StartResync, _: &mut Context<Self>) -> Self::Result {
        match self.lookup(&m.volume).and_then(|r| self.actor(&r)) {
            Ok(addr) => forward(
                addr,
                vr::StartResync {
                    auto: false,
                    lost_here: false,
                },
            ),
            Err(e) => Box::pin(async move { Err(e) }),
        }
    }
}

/// `dunnage node ls`: the cluster's members, or this node alone.
#[derive(Message)]
#[rtype(result = "Reply<Vec<Member>>")]
pub struct ListNodes;

impl Handler<ListNodes> for Registry {
    type Result = Reply<Vec<Member>>;
    fn handle(&mut self, _: ListNodes, _: &mut Context<Self>) -> Self::Result {
        match &self.node.cluster {
            Some(c) => c.cluster.members().map_err(|e| self.cluster_err("-", e)),
            None => Err(RegistryError::NotClustered("node ls")),
        }
    }
}

/// `dunnage node cordon` / `uncordon`.
#[derive(Message)]
#[rtype(result = "Reply<()>")]
pub struct CordonNode {
    pub node: String,
    pub cordoned: bool,
}

impl Handler<CordonNode> for Registry {
    type Result = Reply<()>;
    fn handle(&mut self, m: CordonNode, _: &mut Context<Self>) -> Self::Result {
        let c = self
            .node
            .cluster
            .as_ref()
            .ok_or(RegistryError::NotClustered("node cordon"))?;
        c.cluster
            .set_cordoned(&m.node, m.cordoned)
            .map_err(|source| self.node_err(source))?;
        tracing::info!(node = %m.node, cordoned = m.cordoned, "node cordon changed");
        Ok(())
    }
}

/// `dunnage node rm`: forget a node gone for good.
#[derive(Message)]
#[rtype(result = "Reply<()>")]
pub struct ForgetNode {
    pub node: String,
}

impl Handler<ForgetNode> for Registry {
    type Result = Reply<()>;
    fn handle(&mut self, m: ForgetNode, _: &mut Context<Self>) -> Self::Result {
        let c = self
            .node
            .cluster
            .as_ref()
            .ok_or(RegistryError::NotClustered("node rm"))?;
        let held: Vec<(String, Vec<String>)> = self
            .node
            .catalog
            .list()
            .into_iter()
            .map(|r| (r.name, r.replicas))
            .collect();
        c.cluster
            .forget_node(&m.node, &held)
            .map_err(|source| self.node_err(source))?;
        tracing::info!(node = %m.node, "node forgotten");
        Ok(())
    }
}

impl Registry {
    fn node_err(&self, source: ClusterError) -> RegistryError {
        RegistryError::NodeOp {
            node: self.node.name.clone(),
            source,
        }
    }
}

/// Caps changed by `volume update` on another node reach the engines
/// served here.
pub(super) fn refresh_limits(node: &crate::config::Node) {
    let limiters: Vec<(String, Arc<crate::engine::limit::Limiter>)> = node
        .limiters
        .lock()
        .iter()
        .map(|(id, l)| (id.clone(), l.clone()))
        .collect();
    if limiters.is_empty() {
        return;
    }
    let records = node.catalog.list();
    for (id, l) in limiters {
        if let Some(r) = records.iter().find(|r| r.id == id) {
            l.set(r.spec.limits);
        }
    }
}

/// This node's data directory's size and free space, for `node ls`.
pub(super) fn report_capacity(node: &crate::config::Node, c: &ClusterNode) {
    let Some(capacity) = crate::config::capacity(&node.data_dir) else {
        return;
    };
    if let Err(e) = c.cluster.report_capacity(capacity) {
        tracing::debug!(error = %e, "could not report this node's capacity; the next sweep tries again");
    }
}

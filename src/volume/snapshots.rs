//! Snapshots of one volume, through its actor: taken on the live engine
//! when the volume is attached (the engine excludes IO for the instant, so
//! a snapshot holds every write acknowledged before it and none after), or
//! on the image opened for the moment when it is not.
//!
//! In a cluster a snapshot is taken on every replica at one point of the
//! write stream, by the mirror of the node holding the attach (this one's;
//! another node's, which the request is forwarded to; or one opened for
//! the moment when the volume is attached nowhere), and etcd records it
//! once every replica has it.

use super::forward::HolderOp;
use super::{replicated, Backing, VolumeActor, VolumeError, VolumeErrorKind};
use crate::catalog::VolumeRecord;
use crate::cluster::SnapshotRecord;
use crate::config::ClusterNode;
use crate::engine::{EngineError, SnapshotInfo, ThinImage};
use crate::replication::{Generation, Mirror};
use actix::prelude::*;
use chrono::{DateTime, Utc};
use serde::Serialize;

/// A snapshot as the CLI shows it.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct SnapshotEntry {
    pub volume: String,
    pub name: String,
    pub created_at: DateTime<Utc>,
    /// Bytes only this snapshot holds: what deleting it frees.
    pub exclusive_bytes: u64,
    /// Bytes of the volume it references.
    pub referenced_bytes: u64,
    /// Clones (their data directories) made from it.
    pub clones: Vec<String>,
    /// In a cluster: the nodes whose replicas hold it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<String>,
}

impl SnapshotEntry {
    fn new(volume: &str, info: SnapshotInfo, block_size: u32) -> Self {
        SnapshotEntry {
            volume: volume.to_string(),
            name: info.name,
            created_at: info.created.into(),
            exclusive_bytes: info.exclusive_blocks * u64::from(block_size),
            referenced_bytes: info.blocks * u64::from(block_size),
            clones: info
                .clones
                .iter()
                .map(|p| p.display().to_string())
                .collect(),
            nodes: Vec::new(),
        }
    }

    /// A cluster snapshot as etcd records it, with the space figures of
    /// this node's replica when it holds one (`info`).
    fn of_cluster(volume: &str, r: SnapshotRecord, info: Option<(&SnapshotInfo, u32)>) -> Self {
        let (exclusive, referenced) = info.map_or((0, 0), |(i, bs)| {
            (i.exclusive_blocks * u64::from(bs), i.blocks * u64::from(bs))
        });
        SnapshotEntry {
            volume: volume.to_string(),
            name: r.name,
            created_at: r.created_at,
            exclusive_bytes: exclusive,
            referenced_bytes: referenced,
            clones: Vec::new(),
            nodes: r.nodes,
        }
    }
}

/// Space of a volume and its snapshots, for `volume inspect`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Space {
    /// Bytes of the volume that have space.
    pub used_bytes: u64,
    /// Of those, bytes a snapshot shares.
    pub shared_bytes: u64,
    /// Bytes held by snapshots only.
    pub snapshot_bytes: u64,
    pub snapshots: u64,
}

impl VolumeActor {
    /// In a cluster: run `f` on the mirror of this node's attach, or, when
    /// the volume is attached nowhere, on one opened for the moment.
    /// Refused while another node holds the attach (callers forward there
    /// first; this is the race where the attach moved meanwhile): its
    /// mirror is the one writing, and only it can hold writes for the
    /// instant of a snapshot.
    pub(super) fn with_mirror<T>(
        &self,
        c: &ClusterNode,
        record: &VolumeRecord,
        (op, snapshot): (&'static str, &str),
        f: impl FnOnce(&Mirror, Generation) -> Result<T, VolumeErrorKind>,
    ) -> Result<T, VolumeError> {
        if let Some(Backing::Mirror { mirror, generation }) =
            self.attached.as_ref().map(|a| &a.engine)
        {
            return f(mirror, *generation).map_err(|e| self.err(e));
        }
        if let Some((node, _)) = c.cluster.attach_owner(&self.id).map_err(|e| self.err(e))? {
            return Err(self.err(VolumeErrorKind::SnapshotsOnHolder(node)));
        }
        // What the mirror would refuse, refused before opening one (which
        // records an unreachable replica outdated).
        replicated::check_replicas(c, record, op, snapshot, None).map_err(|e| self.err(e))?;
        let (mirror, generation) = replicated::open_mirror(c, record, self.node.catalog.as_ref())
            .map_err(|e| self.err(e))?;
        let res = f(&mirror, generation);
        replicated::close_mirror(c, &self.id, &self.name, &mirror, generation);
        res.map_err(|e| self.err(e))
    }

    /// On a node without a replica: the listing of the first live node
    /// with one, whose space figures are its replica's (a forwarded
    /// request). None when this node holds one, or no such node answers
    /// (the listing is then etcd's, with no space figures).
    fn snapshots_from_a_replica(
        &self,
        c: &ClusterNode,
        record: &VolumeRecord,
    ) -> Option<Vec<SnapshotEntry>> {
        // Never while this node holds the attach (or resyncs): it may be
        // the node that one with a replica is forwarding to right now.
        if self.forwarded
            || self.attached.is_some()
            || c.resyncing(&self.id)
            || record.replicas.iter().any(|n| n == c.cluster.node())
        {
            return None;
        }
        let up: Vec<String> = match c.cluster.members() {
            Ok(m) => m.into_iter().filter(|m| m.up).map(|m| m.name).collect(),
            Err(_) => return None,
        };
        // In-sync replicas first: they hold every snapshot.
        let states = c.cluster.replica_states(&self.id).unwrap_or_default();
        let mut ask: Vec<&String> = record.replicas.iter().filter(|n| up.contains(n)).collect();
        ask.sort_by_key(|n| states.get(*n) != Some(&crate::replication::ReplicaState::InSync));
        for node in ask {
            match self
                .forward(c, record, node, HolderOp::ListSnapshots)
                .and_then(|reply| self.forwarded_reply(node, &reply))
            {
                Ok(listed) => return Some(listed),
                Err(e) => {
                    tracing::info!(volume = %self.name, node = %node, error = %e, "a replica's node did not list the snapshots")
                }
            }
        }
        tracing::warn!(volume = %self.name, "no node with a replica listed the snapshots; their sizes show as 0");
        None
    }

    /// The snapshots of this node's replica, if it holds one (for their
    /// space figures).
    fn local_snapshot_infos(&self, c: &ClusterNode, record: &VolumeRecord) -> Vec<SnapshotInfo> {
        // Not created here for a listing: a replica never attached has none.
        let made = c
            .replicas
            .dir(&self.id)
            .is_ok_and(|d| d.join("header").exists());
        if !made || !record.replicas.iter().any(|n| n == c.cluster.node()) {
            return Vec::new();
        }
        let infos = c
            .replicas
            .open(&self.id, replicated::params(record))
            .and_then(|r| Ok(r.image().snapshots()?));
        if self.attached.is_none() {
            c.replicas.close(&self.id);
        }
        infos.unwrap_or_else(|e| {
            tracing::warn!(volume = %self.name, error = %e, "cannot read the local replica's snapshots; their sizes show as 0");
            Vec::new()
        })
    }

    pub(super) fn cluster_snapshots(
        &self,
        c: &ClusterNode,
        record: &VolumeRecord,
    ) -> Result<Vec<SnapshotEntry>, VolumeError> {
        if let Some(listed) = self.snapshots_from_a_replica(c, record) {
            return Ok(listed);
        }
        let records = c.cluster.snapshots(&self.id).map_err(|e| self.err(e))?;
        let infos = self.local_snapshot_infos(c, record);
        let bs = record.spec.block_size_bytes();
        Ok(records
            .into_iter()
            .map(|r| {
                let info = infos.iter().find(|i| i.name == r.name).map(|i| (i, bs));
                SnapshotEntry::of_cluster(&self.name, r, info)
            })
            .collect())
    }

    /// Run `f` on the image: the attached engine, or the image opened now.
    pub(super) fn with_image<T>(
        &self,
        f: impl FnOnce(&ThinImage) -> Result<T, EngineError>,
    ) -> Result<T, VolumeError> {
        self.record()?;
        if self.node.cluster.is_some() {
            return Err(self.err(VolumeErrorKind::NotInCluster("snapshots")));
        }
        let res = match self.attached.as_ref().map(|a| &a.engine) {
            Some(super::Backing::Image(image)) => f(image),
            Some(super::Backing::Mirror { .. }) => {
                return Err(self.err(VolumeErrorKind::NotInCluster("snapshots")))
            }
            // An export's open image, shared.
            None => match self.exporting.upgrade() {
                Some(img) => f(&img),
                None => ThinImage::open(&self.node.volume_dir(&self.id)).and_then(|img| f(&img)),
            },
        };
        res.map_err(|e| self.err(snapshot_error(e, &self.name)))
    }
}

/// The engine refuses a snapshot while the kernel writes the data file
/// itself; say what the user can do about it.
fn snapshot_error(e: EngineError, volume: &str) -> VolumeErrorKind {
    match e {
        EngineError::InPassthrough { .. } => VolumeErrorKind::Passthrough(volume.to_string()),
        e => e.into(),
    }
}

/// This volume's part in a group snapshot (`dunnage snapshot group`): its
/// IO paused (the FUSE export's engine slot, held exclusively: no request
/// in flight, none starting), it says so on `frozen` and waits on `go`;
/// once every volume of the group is paused, `go` says true and it takes
/// the snapshot, then lets IO go on. So no write acknowledged after any
/// volume's pause is in any of the snapshots, and every write
/// acknowledged before all were paused is: the group is crash-consistent
/// as one disk. `go` false or silent: called off, nothing taken.
#[derive(Message)]
#[rtype(result = "Result<SnapshotEntry, VolumeError>")]
pub struct GroupPart {
    pub name: String,
    pub frozen: crossbeam_channel::Sender<Result<(), String>>,
    pub go: crossbeam_channel::Receiver<bool>,
}

/// The longest a paused volume waits for the others of its group.
pub const GROUP_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

impl Handler<GroupPart> for VolumeActor {
    type Result = Result<SnapshotEntry, VolumeError>;
    fn handle(&mut self, m: GroupPart, _: &mut SyncContext<Self>) -> Self::Result {
        let refuse = |this: &Self, why: String| {
            let _ = m.frozen.send(Err(format!("volume {}: {why}", this.name)));
            Err(this.err(VolumeErrorKind::Group(why)))
        };
        if let Some(c) = self.node.cluster.clone() {
            match self.holder_elsewhere(&c) {
                Ok(Some(node)) => {
                    return refuse(
                        self,
                        format!("it is attached on node {node}: a group is taken on the node where its attached volumes are"),
                    )
                }
                Ok(None) => {}
                Err(e) => return refuse(self, e.to_string()),
            }
        }
        let slot = match self.attached.as_ref() {
            Some(a) if a.export.io_path() == "passthrough" => {
                return refuse(
                    self,
                    VolumeErrorKind::Passthrough(self.name.clone()).to_string(),
                )
            }
            Some(a) => match a.export.engine_slot() {
                Some(slot) => Some(slot.clone()),
                None => return refuse(
                    self,
                    "it is served by ublk, which cannot be paused: snapshot it alone, or detach it"
                        .into(),
                ),
            },
            None => None,
        };
        let paused = slot.as_ref().map(|s| s.exclusive());
        let _ = m.frozen.send(Ok(()));
        let go =
            m.go.recv_timeout(GROUP_WAIT + std::time::Duration::from_secs(5));
        let taken = match go {
            Ok(true) => self.take_snapshot(Some(m.name)),
            _ => Err(self.err(VolumeErrorKind::Group(
                "called off: another volume of the group could not be paused".into(),
            ))),
        };
        drop(paused);
        taken
    }
}

/// Take a snapshot named `name` (default `snap-<UTC time>`).
#[derive(Message)]
#[rtype(result = "Result<SnapshotEntry, VolumeError>")]
pub struct TakeSnapshot {
    pub name: Option<String>,
}

impl Handler<TakeSnapshot> for VolumeActor {
    type Result = Result<SnapshotEntry, VolumeError>;
    fn handle(&mut self, msg: TakeSnapshot, _: &mut SyncContext<Self>) -> Self::Result {
        self.take_snapshot(msg.name)
    }
}

impl VolumeActor {
    pub(super) fn take_snapshot(
        &mut self,
        name: Option<String>,
    ) -> Result<SnapshotEntry, VolumeError> {
        let name = name.unwrap_or_else(|| Utc::now().format("snap-%Y%m%dT%H%M%S%.3fZ").to_string());
        let volume = self.name.clone();
        if let Some(c) = self.node.cluster.clone() {
            let record = self.record()?;
            if let Some(holder) = self.holder_elsewhere(&c)? {
                let op = HolderOp::TakeSnapshot { name };
                let reply = self.forward(&c, &record, &holder, op)?;
                return self.forwarded_reply(&holder, &reply);
            }
            let entry = self.with_mirror(&c, &record, ("take", &name), |mirror, generation| {
                if c.cluster.snapshots(&record.id)?.iter().any(|s| s.name == name) {
                    return Err(EngineError::SnapshotExists {
                        dir: c.replicas.volumes_dir().join(&record.id),
                        name: name.clone(),
                    }
                    .into());
                }
                // etcd does not list it, so one of this name on a replica is
                // an orphan (a crash between the take and the record): gone.
                mirror.delete_snapshot(&name)?;
                let taken_from = mirror.snapshot(&name)?;
                let snap = SnapshotRecord {
                    name: name.clone(),
                    created_at: Utc::now(),
                    nodes: record.replicas.clone(),
                };
                if let Err(e) = c.cluster.record_snapshot(&record.id, generation, &snap, &taken_from) {
                    // Not recorded: not kept either.
                    if let Err(d) = mirror.delete_snapshot(&name) {
                        tracing::warn!(volume = %record.name, snapshot = %name, error = %d, "could not delete a snapshot etcd did not record");
                    }
                    return Err(e.into());
                }
                Ok(SnapshotEntry::of_cluster(&record.name, snap, None))
            })?;
            tracing::info!(volume = %self.name, snapshot = %entry.name, replicas = ?entry.nodes, "snapshot taken on every replica");
            return Ok(entry);
        }
        let entry = self.with_image(|img| {
            img.snapshot(&name)?;
            let bs = img.block_size();
            img.snapshots()?
                .into_iter()
                .find(|s| s.name == name)
                .map(|s| SnapshotEntry::new(&volume, s, bs))
                .ok_or(EngineError::NoSuchSnapshot {
                    dir: self.node.volume_dir(&self.id),
                    name: name.clone(),
                })
        })?;
        tracing::info!(volume = %self.name, snapshot = %entry.name, "snapshot taken");
        Ok(entry)
    }
}

#[derive(Message)]
#[rtype(result = "Result<Vec<SnapshotEntry>, VolumeError>")]
pub struct ListSnapshots;

impl Handler<ListSnapshots> for VolumeActor {
    type Result = Result<Vec<SnapshotEntry>, VolumeError>;
    fn handle(&mut self, _: ListSnapshots, _: &mut SyncContext<Self>) -> Self::Result {
        if let Some(c) = self.node.cluster.clone() {
            let record = self.record()?;
            return self.cluster_snapshots(&c, &record);
        }
        let volume = self.name.clone();
        self.with_image(|img| {
            let bs = img.block_size();
            Ok(img
                .snapshots()?
                .into_iter()
                .map(|s| SnapshotEntry::new(&volume, s, bs))
                .collect())
        })
    }
}

#[derive(Message)]
#[rtype(result = "Result<(), VolumeError>")]
pub struct DeleteSnapshot {
    pub name: String,
}

impl Handler<DeleteSnapshot> for VolumeActor {
    type Result = Result<(), VolumeError>;
    fn handle(&mut self, msg: DeleteSnapshot, _: &mut SyncContext<Self>) -> Self::Result {
        self.delete_snapshot(msg.name)
    }
}

impl VolumeActor {
    pub(super) fn delete_snapshot(&mut self, name: String) -> Result<(), VolumeError> {
        // Clones are made from it (in a cluster, some replicas maybe not
        // yet); the engine refuses too, naming a directory, not a volume.
        let clones = super::clones_of(&*self.node.catalog, &self.id, |r| {
            r.clone_of.as_ref().is_some_and(|o| o.snapshot == name)
        });
        if !clones.is_empty() {
            return Err(self.err(VolumeErrorKind::HasClones(clones.join(", "))));
        }
        if let Some(c) = self.node.cluster.clone() {
            let record = self.record()?;
            if let Some(holder) = self.holder_elsewhere(&c)? {
                let reply =
                    self.forward(&c, &record, &holder, HolderOp::DeleteSnapshot { name })?;
                return self.forwarded_reply(&holder, &reply);
            }
            self.with_mirror(&c, &record, ("delete", &name), |mirror, generation| {
                if !c
                    .cluster
                    .snapshots(&record.id)?
                    .iter()
                    .any(|s| s.name == name)
                {
                    return Err(EngineError::NoSuchSnapshot {
                        dir: c.replicas.volumes_dir().join(&record.id),
                        name: name.clone(),
                    }
                    .into());
                }
                // Replicas first: a record left by a failure is retried.
                mirror.delete_snapshot(&name)?;
                Ok(c.cluster.forget_snapshot(&record.id, generation, &name)?)
            })?;
            tracing::info!(volume = %self.name, snapshot = %name, "snapshot deleted on every replica");
            return Ok(());
        }
        self.with_image(|img| img.delete_snapshot(&name))?;
        tracing::info!(volume = %self.name, snapshot = %name, "snapshot deleted");
        Ok(())
    }
}

/// Put the volume back as it was at a snapshot (not while in use).
#[derive(Message)]
#[rtype(result = "Result<(), VolumeError>")]
pub struct Restore {
    pub snapshot: String,
}

impl Handler<Restore> for VolumeActor {
    type Result = Result<(), VolumeError>;
    fn handle(&mut self, msg: Restore, _: &mut SyncContext<Self>) -> Self::Result {
        let record = self.record()?;
        if self.attached.is_some() {
            return Err(self.err(VolumeErrorKind::RestoreInUse(self.name.clone())));
        }
        if let Some(c) = self.node.cluster.clone() {
            replicated::restore(&c, &record, &msg.snapshot).map_err(|e| self.err(e))?;
            self.filesystem_may_be_short(&record);
            tracing::info!(volume = %self.name, snapshot = %msg.snapshot, "restored on every replica");
            return Ok(());
        }
        self.check_not_exporting().map_err(|e| self.err(e))?;
        ThinImage::restore(&self.node.volume_dir(&self.id), &msg.snapshot)
            .map_err(|e| self.err(e))?;
        self.filesystem_may_be_short(&record);
        tracing::info!(volume = %self.name, snapshot = %msg.snapshot, "restored");
        Ok(())
    }
}

/// Space used and shared, for `volume inspect`.
#[derive(Message)]
#[rtype(result = "Result<Option<Space>, VolumeError>")]
pub struct QuerySpace;

impl Handler<QuerySpace> for VolumeActor {
    type Result = Result<Option<Space>, VolumeError>;
    fn handle(&mut self, _: QuerySpace, _: &mut SyncContext<Self>) -> Self::Result {
        // A cluster volume's space is on its replicas' nodes.
        if self.node.cluster.is_some() {
            return Ok(None);
        }
        self.with_image(|img| {
            let u = img.usage();
            let bs = u64::from(u.block_size);
            Ok(Space {
                used_bytes: u.allocated_bytes,
                shared_bytes: u.shared_blocks * bs,
                snapshot_bytes: u.snapshot_blocks * bs,
                snapshots: u.snapshots,
            })
        })
        .map(Some)
    }
}

//! Snapshots of one volume, through its actor: taken on the live engine
//! when the volume is attached (the engine excludes IO for the instant, so
//! a snapshot holds every write acknowledged before it and none after), or
//! on the image opened for the moment when it is not.

use super::{VolumeActor, VolumeError, VolumeErrorKind};
use crate::engine::{EngineError, SnapshotInfo, ThinImage};
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
    /// Run `f` on the image: the attached engine, or the image opened now.
    fn with_image<T>(
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
            None => ThinImage::open(&self.node.volume_dir(&self.id)).and_then(|img| f(&img)),
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

/// Take a snapshot named `name` (default `snap-<UTC time>`).
#[derive(Message)]
#[rtype(result = "Result<SnapshotEntry, VolumeError>")]
pub struct TakeSnapshot {
    pub name: Option<String>,
}

impl Handler<TakeSnapshot> for VolumeActor {
    type Result = Result<SnapshotEntry, VolumeError>;
    fn handle(&mut self, msg: TakeSnapshot, _: &mut SyncContext<Self>) -> Self::Result {
        let name = msg
            .name
            .unwrap_or_else(|| Utc::now().format("snap-%Y%m%dT%H%M%S%.3fZ").to_string());
        let volume = self.name.clone();
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
        self.with_image(|img| img.delete_snapshot(&msg.name))?;
        tracing::info!(volume = %self.name, snapshot = %msg.name, "snapshot deleted");
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
        self.record()?;
        if self.attached.is_some() {
            return Err(self.err(VolumeErrorKind::RestoreInUse(self.name.clone())));
        }
        ThinImage::restore(&self.node.volume_dir(&self.id), &msg.snapshot)
            .map_err(|e| self.err(e))?;
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

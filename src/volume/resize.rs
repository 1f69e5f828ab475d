//! Growing a volume: while it is detached, the catalog's size changes and
//! the images follow (this node's at once on a single node; in a cluster
//! each replica when an attach next opens it at the new size); the
//! filesystem grows at the next mount, online.

use super::{mounting, replicated, Backing, VolumeActor, VolumeError, VolumeErrorKind};
use crate::catalog::VolumeRecord;
use crate::engine::{BlockEngine, ThinImage};
use crate::spec::{human_bytes, FsType};
use actix::prelude::*;
use std::path::Path;
use std::time::Duration;

/// Grow the volume to `size` bytes (`given` as the user wrote it, kept for
/// `inspect`). Answers the updated record.
#[derive(Message)]
#[rtype(result = "Result<VolumeRecord, VolumeError>")]
pub struct Resize {
    pub size: u64,
    pub given: String,
}

impl Handler<Resize> for VolumeActor {
    type Result = Result<VolumeRecord, VolumeError>;
    fn handle(&mut self, msg: Resize, _: &mut SyncContext<Self>) -> Self::Result {
        let record = self.record()?;
        let have = record.spec.size;
        if msg.size < have {
            return Err(self.err(VolumeErrorKind::Shrink {
                have: human_bytes(have),
                want: human_bytes(msg.size),
            }));
        }
        if msg.size == have {
            return Ok(record);
        }
        if self.attached.is_some() {
            return Err(self.err(VolumeErrorKind::ResizeInUse(self.name.clone())));
        }
        // The catalog first: it is the truth the images follow (each grows
        // when next opened, if this stops before it does).
        let modify = || {
            self.node.catalog.modify(&self.name, &self.id, &mut |r| {
                r.spec.size = msg.size;
                r.options.insert("size".into(), msg.given.clone());
                r.grow_fs = r.formatted && r.spec.fs != FsType::None;
            })
        };
        // In a cluster, under an attach of its own (refused if attached
        // elsewhere; a background resync is asked to stop), so that no
        // attach opens the volume meanwhile: one that read the record
        // before reads it again once it holds the attach.
        let updated = match &self.node.cluster {
            Some(c) => {
                let generation =
                    replicated::take_attach(c, &record, Duration::ZERO).map_err(|e| self.err(e))?;
                let res = modify();
                // Nothing of the replicas was compared or changed.
                replicated::give_back(c, &record.id, &record.name, generation, false);
                res
            }
            None => modify(),
        }
        .map_err(|e| self.err(e))?;
        if self.node.cluster.is_none() {
            ThinImage::grow(&self.node.volume_dir(&self.id), msg.size).map_err(|e| self.err(e))?;
        }
        tracing::info!(volume = %self.name, from = have, to = msg.size, "grew");
        Ok(updated)
    }
}

impl VolumeActor {
    /// A single node's image grows to the catalog's size before it is
    /// opened (a grow that stopped after the catalog changed).
    pub(super) fn grow_image(&self, dir: &Path) -> Result<(), VolumeErrorKind> {
        if let Ok(record) = self.record() {
            ThinImage::grow(dir, record.spec.size)?;
        }
        Ok(())
    }

    /// The volume's contents were replaced by a snapshot's, which may
    /// predate a grow: its next mount grows the filesystem (a no-op if it
    /// fills the device).
    pub(super) fn filesystem_may_be_short(&self, record: &VolumeRecord) {
        if !record.formatted || record.spec.fs == FsType::None {
            return;
        }
        if let Err(e) = self
            .node
            .catalog
            .modify(&self.name, &self.id, &mut |r| r.grow_fs = true)
        {
            tracing::warn!(volume = %self.name, error = %e, "could not record that the filesystem may need to grow; it keeps its size until grown by hand (resize2fs, xfs_growfs)");
        }
    }

    /// The volume grew since its filesystem was last grown: grow it to the
    /// device (before or after it is mounted, as its type needs: see
    /// [`mounting::grow_fs`]). A failure is logged and tried again at the
    /// next mount; the filesystem works at its old size.
    pub(super) fn grow_filesystem(&self, record: &VolumeRecord, device: &Path, target: &Path) {
        let Some(a) = &self.attached else { return };
        let size = match &a.engine {
            Backing::Image(i) => i.size(),
            Backing::Mirror { mirror, .. } => mirror.size(),
        };
        let started = std::time::Instant::now();
        if let Err(e) = mounting::grow_fs(device, target, record.spec.fs) {
            tracing::warn!(volume = %self.name, node = %self.node.name, error = %e, "growing the filesystem failed; it keeps its size until the next mount tries again");
            return;
        }
        tracing::info!(volume = %self.name, to = size, took = ?started.elapsed(), "grew the filesystem");
        // An attach that raced the resize opened the old size: leave the
        // flag for the next mount.
        if size >= record.spec.size {
            if let Err(e) = self
                .node
                .catalog
                .modify(&self.name, &self.id, &mut |r| r.grow_fs = false)
            {
                tracing::warn!(volume = %self.name, error = %e, "could not record the filesystem grown; the next mount grows it again (a no-op)");
            }
        }
    }
}

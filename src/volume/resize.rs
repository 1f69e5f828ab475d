//! Growing a volume: the catalog's size changes and the images follow
//! (this node's at once on a single node, reopened under paused IO if in
//! use; in a cluster each replica when an attach next opens it at the new
//! size); the filesystem grows now if mounted and it can, else at the
//! next mount.

use super::{mounting, replicated, Backing, VolumeActor, VolumeError, VolumeErrorKind};
use crate::catalog::VolumeRecord;
use crate::engine::{BlockEngine, ThinImage};
use crate::spec::{human_bytes, FsType};
use actix::prelude::*;
use std::path::Path;
use std::sync::Arc;
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
        // In use: only a single node's volume served through FUSE (the
        // engine is reopened under its paused IO); a replicated volume's
        // replicas, and a ublk device, change size only while detached.
        if let Some(a) = &self.attached {
            if self.node.cluster.is_some() || a.export.engine_slot().is_none() {
                return Err(self.err(VolumeErrorKind::ResizeInUse(self.name.clone())));
            }
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
        if self.attached.is_some() {
            self.grow_attached(msg.size, &updated)
                .map_err(|e| self.err(e))?;
        } else if self.node.cluster.is_none() {
            ThinImage::grow(&self.node.volume_dir(&self.id), msg.size).map_err(|e| self.err(e))?;
        }
        tracing::info!(volume = %self.name, from = have, to = msg.size, "grew");
        Ok(updated)
    }
}

impl VolumeActor {
    /// Grow a volume in use: with its IO paused, the image is flushed, its
    /// files grown and opened again, and the new engine put in the old
    /// one's place; then the device takes the new size, and a mounted
    /// filesystem grows online (else at the next mount). If the image
    /// cannot be opened again, the old engine goes on at the old size.
    fn grow_attached(&mut self, size: u64, record: &VolumeRecord) -> Result<(), VolumeErrorKind> {
        let dir = self.node.volume_dir(&self.id);
        let a = self.attached.as_ref().expect("attached");
        let (Backing::Image(old), Some(slot)) = (&a.engine, a.export.engine_slot()) else {
            return Err(VolumeErrorKind::ResizeInUse(self.name.clone()));
        };
        let new = {
            let mut held = slot.exclusive();
            old.flush()?;
            old.grow_open(size)?;
            let new = Backing::Image(Arc::new(ThinImage::open_resuming(&dir)?));
            *held = self.served(&new, &record.spec)?;
            // No IO reaches the old image any more.
            old.retire();
            new
        };
        let a = self.attached.as_mut().expect("attached");
        a.engine = new;
        a.export.refresh_size()?;
        tracing::info!(volume = %self.name, device = %a.export.device().display(), to = size, "grew the device in use");
        if let Some(target) = a.fs_mount.clone() {
            let device = a.export.device().to_path_buf();
            self.grow_filesystem(record, &device, &target, true);
        }
        Ok(())
    }

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
    /// device, `mounted` at `target` or not yet (see [`mounting::grow_fs`]).
    /// A failure is logged and tried again at the next mount; the
    /// filesystem works at its old size.
    pub(super) fn grow_filesystem(
        &self,
        record: &VolumeRecord,
        device: &Path,
        target: &Path,
        mounted: bool,
    ) {
        let Some(a) = &self.attached else { return };
        let size = match &a.engine {
            Backing::Image(i) => i.size(),
            Backing::Mirror { mirror, .. } => mirror.size(),
        };
        let started = std::time::Instant::now();
        if let Err(e) = mounting::grow_fs(device, target, record.spec.fs, mounted) {
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

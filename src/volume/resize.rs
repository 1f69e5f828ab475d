//! Growing a volume: the catalog's size changes and the images follow
//! (this node's at once on a single node, reopened under paused IO if in
//! use; in a cluster each replica when a mirror next opens it at the new
//! size: at once if attached, the mirror reopened under paused IO, else at
//! the next attach or resync); the filesystem grows now if mounted and it
//! can, else at the next mount. From any node: the attached one does it.

use super::forward::HolderOp;
use super::{mounting, replicated, Backing, VolumeActor, VolumeError, VolumeErrorKind};
use crate::catalog::VolumeRecord;
use crate::engine::{BlockEngine, ThinImage};
use crate::replication::{Mirror, ReplicaState};
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
        self.resize(msg.size, msg.given)
    }
}

impl VolumeActor {
    pub(super) fn resize(&mut self, size: u64, given: String) -> Result<VolumeRecord, VolumeError> {
        let record = self.record()?;
        let have = record.spec.size;
        if size < have {
            return Err(self.err(VolumeErrorKind::Shrink {
                have: human_bytes(have),
                want: human_bytes(size),
            }));
        }
        if size == have {
            return Ok(record);
        }
        // Attached on another node: that node's mirror must grow.
        if let Some(c) = self.node.cluster.clone() {
            if let Some(holder) = self.holder_elsewhere(&c)? {
                let reply = self.forward(&c, &record, &holder, HolderOp::Resize { size, given })?;
                return self.forwarded_reply(&holder, &reply);
            }
        }
        // In use: through FUSE only (its engine is reopened under paused
        // IO); a ublk device keeps its size until detached.
        if let Some(a) = &self.attached {
            if a.export.engine_slot().is_none() {
                return Err(self.err(VolumeErrorKind::ResizeInUse(self.name.clone())));
            }
            if let Backing::Mirror { mirror, .. } = &a.engine {
                self.check_growable(mirror).map_err(|e| self.err(e))?;
            }
        }
        // The catalog first: it is the truth the images follow (each grows
        // when next opened, if this stops before it does).
        let modify = || {
            self.node.catalog.modify(&self.name, &self.id, &mut |r| {
                r.spec.size = size;
                r.options.insert("size".into(), given.clone());
                r.grow_fs = r.formatted && r.spec.fs != FsType::None;
            })
        };
        // In a cluster, under an attach: this node's if attached here, else
        // one of its own (refused if attached elsewhere meanwhile; a
        // background resync is asked to stop), so that no attach opens the
        // volume meanwhile: one that read the record before reads it again
        // once it holds the attach.
        let updated = match (&self.node.cluster, &self.attached) {
            (Some(c), None) => {
                let generation =
                    replicated::take_attach(c, &record, Duration::ZERO).map_err(|e| self.err(e))?;
                let res = modify();
                // Nothing of the replicas was compared or changed.
                replicated::give_back(c, &record.id, &record.name, generation, false);
                res
            }
            _ => modify(),
        }
        .map_err(|e| self.err(e))?;
        if self.attached.is_some() {
            self.grow_attached(size, &updated)
                .map_err(|e| self.err(e))?;
        } else if self.node.cluster.is_none() && self.check_not_exporting().is_ok() {
            ThinImage::grow(&self.node.volume_dir(&self.id), size).map_err(|e| self.err(e))?;
        }
        tracing::info!(volume = %self.name, from = have, to = size, "grew");
        Ok(updated)
    }

    /// A replicated volume grows in use only with every replica in sync
    /// and linked: the mirror is opened again, and a replica not in sync
    /// would then be copied whole, not just its dirty extents.
    fn check_growable(&self, mirror: &Mirror) -> Result<(), VolumeErrorKind> {
        for r in mirror.status() {
            let why = if r.state != ReplicaState::InSync {
                match r.resync {
                    Some(p) if p.total_bytes > 0 => format!(
                        "{} (resyncing, {}%)",
                        r.state,
                        p.done_bytes * 100 / p.total_bytes
                    ),
                    _ => r.state.to_string(),
                }
            } else if !r.connected {
                "not reachable".to_string()
            } else {
                continue;
            };
            return Err(VolumeErrorKind::GrowNeedsReplicas { node: r.node, why });
        }
        Ok(())
    }

    /// Grow a volume in use: with its IO paused, its engine is flushed
    /// and opened again at the new size (a single node's image: files
    /// grown, then opened; a replicated volume's mirror: closed, then
    /// opened under the same attach, each replica growing as it opens),
    /// and the new engine is put in the old one's place; then the device
    /// takes the new size, and a mounted filesystem grows online (else at
    /// the next mount). If an image cannot be opened again, the old engine
    /// goes on at the old size; if a mirror cannot, IO fails until the
    /// volume is detached.
    fn grow_attached(&mut self, size: u64, record: &VolumeRecord) -> Result<(), VolumeErrorKind> {
        let dir = self.node.volume_dir(&self.id);
        let a = self.attached.as_ref().expect("attached");
        let Some(slot) = a.export.engine_slot() else {
            return Err(VolumeErrorKind::ResizeInUse(self.name.clone()));
        };
        let new = {
            let mut held = slot.exclusive();
            match &a.engine {
                Backing::Image(old) => {
                    old.flush()?;
                    old.grow_open(size)?;
                    let new = Backing::Image(Arc::new(ThinImage::open_resuming(&dir)?));
                    *held = self.served(&new, &record.spec)?;
                    // No IO reaches the old image any more.
                    old.retire();
                    new
                }
                Backing::Mirror { mirror, generation } => {
                    let c = self.node.cluster.as_ref().expect("a mirror is a cluster's");
                    mirror.flush()?;
                    // A replica may have dropped out since the check.
                    self.check_growable(mirror)?;
                    let reopened = replicated::reopen_mirror(c, record, mirror, *generation)
                        .inspect_err(|e| {
                            tracing::error!(volume = %self.name, node = %self.node.name, error = %e, "the mirror could not open again at the grown size; the volume's IO fails until it is detached and attached again");
                        })?;
                    let new = Backing::Mirror {
                        mirror: reopened.clone(),
                        generation: *generation,
                    };
                    match self.served(&new, &record.spec) {
                        Ok(served) => *held = served,
                        Err(e) => {
                            reopened.release();
                            c.untrack(&self.id);
                            c.replicas.close(&self.id);
                            tracing::error!(volume = %self.name, node = %self.node.name, error = %e, "the mirror opened again cannot be served; the volume's IO fails until it is detached and attached again");
                            return Err(e);
                        }
                    }
                    new
                }
            }
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

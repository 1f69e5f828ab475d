//! Writable clones (`parent=SRC`): a snapshot of SRC taken through SRC's
//! actor (crash-consistent even while SRC is mounted and written), then a
//! new image whose base is that snapshot. The clone shares every block it
//! has not written with SRC; SRC cannot be removed while clones use it.

use super::{Registry, RegistryError, Reply, VolumeInfo};
use crate::catalog::{new_volume_id, CloneOf, VolumeRecord};
use crate::engine::{CryptParams, EngineError, ThinImage};
use crate::spec::{SpecError, VolumeSpec};
use crate::volume::snapshots::TakeSnapshot;
use actix::prelude::*;
use std::collections::BTreeMap;

/// What a Create leads to. One per Create, moved once: its size is no cost.
#[allow(clippy::large_enum_variant)]
pub enum Created {
    Done(VolumeInfo),
    /// A clone to make: its record (id chosen) and its parent's.
    Clone {
        record: VolumeRecord,
        source: VolumeRecord,
    },
}

/// The snapshot of the parent that a clone is based on, taken for it.
pub fn base_snapshot(clone_id: &str) -> String {
    format!("clone-{clone_id}")
}

/// Whether the clone's base snapshot was taken for it (deleted with it),
/// not one of the parent's own (`parent=SRC@SNAP`), which stays.
pub fn owns_base(record: &VolumeRecord) -> bool {
    record
        .clone_of
        .as_ref()
        .is_some_and(|c| c.snapshot == base_snapshot(&record.id))
}

impl Registry {
    /// Check a clone request: the parent exists, and nothing asked of the
    /// clone contradicts it (same size, block size, fs and encryption).
    pub(super) fn clone_spec(
        &self,
        name: &str,
        asked: VolumeSpec,
        opts: BTreeMap<String, String>,
        own_key: bool,
        parent: &str,
    ) -> Reply<Created> {
        let source = self
            .node
            .catalog
            .get(parent)
            .ok_or_else(|| SpecError::Value {
                option: "parent".into(),
                value: parent.into(),
                reason: "no such volume to clone".into(),
            })?;
        let conflict = |option: &str, reason: String| -> Reply<Created> {
            Err(SpecError::Value {
                option: option.into(),
                value: opts.get(option).cloned().unwrap_or_default(),
                reason,
            }
            .into())
        };
        let has = |k: &str| opts.keys().any(|o| o.eq_ignore_ascii_case(k));
        if has("size") && asked.size != source.spec.size {
            return conflict(
                "size",
                format!("a clone has its parent's size ({} bytes)", source.spec.size),
            );
        }
        for k in ["fs", "fsopts", "block_size", "secure"] {
            if has(k) {
                return conflict(k, format!("a clone takes {k} from its parent {parent}"));
            }
        }
        // In a cluster a clone's replicas are made from its parent's, on
        // the same nodes: it shares their blocks.
        let cluster = self.node.cluster.is_some();
        for k in ["repl", "nodes", "group", "fg"] {
            if cluster && has(k) {
                return conflict(
                    k,
                    format!(
                        "a clone's replicas are on its parent's nodes ({})",
                        source.replicas.join(",")
                    ),
                );
            }
        }
        if own_key {
            return conflict(
                crate::spec::SECRET_OPTION,
                format!("a clone of an encrypted volume uses its parent's key ({parent})"),
            );
        }
        let from_snapshot = asked.parent_snapshot.clone();
        if let Some(snap) = &from_snapshot {
            self.check_parent_snapshot(&source, snap)?;
        }
        let mut spec = VolumeSpec {
            size: source.spec.size,
            fs: source.spec.fs,
            fsopts: source.spec.fsopts.clone(),
            block_size_kib: source.spec.block_size_kib,
            secure: source.spec.secure,
            ..asked
        };
        if cluster {
            spec.repl = source.spec.repl;
            spec.nodes = source.spec.nodes.clone();
            spec.group = source.spec.group.clone();
        }
        let id = new_volume_id();
        let record = VolumeRecord {
            name: name.to_string(),
            clone_of: Some(CloneOf {
                volume_id: source.id.clone(),
                snapshot: from_snapshot.unwrap_or_else(|| base_snapshot(&id)),
            }),
            id,
            created_at: chrono::Utc::now(),
            spec,
            options: opts,
            formatted: source.formatted,
            // The same cluster key, the same parameters: the shared
            // blocks are ciphertext.
            replicas: source.replicas.clone(),
            crypt: source.crypt.clone(),
            // Its snapshot may predate a grow of the source: the clone's
            // first mount grows the filesystem (a no-op if it is whole).
            grow_fs: source.formatted,
            replacing: Default::default(),
        };
        Ok(Created::Clone { record, source })
    }

    /// `parent=SRC@SNAP`: SNAP must be a snapshot of SRC (in a cluster,
    /// on every replica of SRC, since each makes its replica of the clone
    /// from its own).
    fn check_parent_snapshot(&self, source: &VolumeRecord, snap: &str) -> Reply<()> {
        let refuse = |reason: String| -> Reply<()> {
            Err(SpecError::Value {
                option: "parent".into(),
                value: format!("{}@{snap}", source.name),
                reason,
            }
            .into())
        };
        let listing = |names: Vec<String>| {
            if names.is_empty() {
                "it has none".to_string()
            } else {
                format!("it has {}", names.join(", "))
            }
        };
        if let Some(c) = &self.node.cluster {
            let snaps = c
                .cluster
                .snapshots(&source.id)
                .map_err(|e| RegistryError::Cluster {
                    volume: source.name.clone(),
                    node: self.node.name.clone(),
                    source: e,
                })?;
            let Some(found) = snaps.iter().find(|s| s.name == snap) else {
                let names = snaps.into_iter().map(|s| s.name).collect();
                return refuse(format!(
                    "{} has no snapshot {snap} ({})",
                    source.name,
                    listing(names)
                ));
            };
            let lacking: Vec<&str> = source
                .replicas
                .iter()
                .filter(|n| !found.nodes.contains(n))
                .map(String::as_str)
                .collect();
            if !lacking.is_empty() {
                return refuse(format!(
                    "the replicas of {} on {} lack snapshot {snap} (placed after it was taken), and a clone's replicas are made from its parent's; clone from a snapshot taken since",
                    source.name,
                    lacking.join(", ")
                ));
            }
            return Ok(());
        }
        let names =
            ThinImage::snapshot_names(&self.node.volume_dir(&source.id)).map_err(|source_err| {
                RegistryError::Create {
                    volume: source.name.clone(),
                    node: self.node.name.clone(),
                    source: source_err,
                }
            })?;
        if names.iter().any(|n| n == snap) {
            return Ok(());
        }
        let names = names
            .into_iter()
            .filter(|n| !n.starts_with("clone-"))
            .collect();
        refuse(format!(
            "{} has no snapshot {snap} ({})",
            source.name,
            listing(names)
        ))
    }

    /// Snapshot the parent through its actor (unless the clone is of one
    /// of its snapshots), then make the clone.
    pub(super) fn make_clone(
        &mut self,
        record: VolumeRecord,
        source: VolumeRecord,
    ) -> ResponseActFuture<Self, Reply<VolumeInfo>> {
        let snap = record.clone_of.as_ref().expect("a clone").snapshot.clone();
        if let Err(why) = self.inflight.start_clone(&source.id) {
            let e = self.busy(&source.name, format!("cannot clone it now: {why}"));
            return Box::pin(fut::ready(Err(e)));
        }
        if !owns_base(&record) {
            let done = self.finish_clone(&record, &source, &snap);
            self.inflight.end_clone(&source.id);
            return Box::pin(fut::ready(done));
        }
        let addr = match self.actor(&source) {
            Ok(a) => a,
            Err(e) => {
                self.inflight.end_clone(&source.id);
                return Box::pin(fut::ready(Err(e)));
            }
        };
        let taking = addr.send(TakeSnapshot {
            name: Some(snap.clone()),
        });
        Box::pin(taking.into_actor(self).map(move |res, act, _| {
            act.inflight.end_clone(&source.id);
            match res {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(RegistryError::Volume(e)),
                Err(_) => return Err(RegistryError::ShuttingDown),
            }
            match act.finish_clone(&record, &source, &snap) {
                Ok(info) => Ok(info),
                Err(e) => {
                    // Nothing else uses that snapshot yet: give its space back.
                    addr.do_send(crate::volume::snapshots::DeleteSnapshot { name: snap });
                    Err(e)
                }
            }
        }))
    }

    fn finish_clone(
        &mut self,
        record: &VolumeRecord,
        source: &VolumeRecord,
        snap: &str,
    ) -> Reply<VolumeInfo> {
        if let Some(c) = self.node.cluster.clone() {
            return self.finish_cluster_clone(&c, record, source, snap);
        }
        let dir = self.node.volume_dir(&record.id);
        let base = self.node.volume_dir(&source.id);
        let made = std::fs::create_dir_all(&dir)
            .map_err(|e| EngineError::Io {
                op: "create directory",
                path: dir.clone(),
                source: e,
            })
            .and_then(|_| ThinImage::create_clone(&dir, &base, snap).map(drop))
            .and_then(|_| match record.spec.secure {
                // Same key, same parameters: the shared blocks are ciphertext.
                true => CryptParams::load(&base)?.store(&dir),
                false => Ok(()),
            });
        let fail = |source: EngineError| RegistryError::Create {
            volume: record.name.clone(),
            node: self.node.name.clone(),
            source,
        };
        if let Err(e) = made {
            let _ = ThinImage::destroy_clone(&dir);
            let _ = std::fs::remove_dir_all(&dir);
            return Err(fail(e));
        }
        if let Err(source_err) = self.node.catalog.insert(record.clone()) {
            let _ = ThinImage::destroy_clone(&dir);
            let _ = std::fs::remove_dir_all(&dir);
            return Err(RegistryError::Catalog {
                volume: record.name.clone(),
                node: self.node.name.clone(),
                source: source_err,
            });
        }
        if record.spec.secure {
            if let Some(k) = self.node.keys.get(&source.id) {
                self.node.keys.insert(&record.id, k);
            }
        }
        self.announce_policy(record);
        tracing::info!(volume = %record.name, id = %record.id, parent = %source.name, snapshot = snap, "cloned");
        Ok(self.info(record.clone()))
    }

    /// In a cluster: the record only. Each replica node makes its replica
    /// of the clone from its replica of the parent when the clone is first
    /// attached; all are in sync (clones of the same snapshot).
    fn finish_cluster_clone(
        &mut self,
        c: &crate::config::ClusterNode,
        record: &VolumeRecord,
        source: &VolumeRecord,
        snap: &str,
    ) -> Reply<VolumeInfo> {
        let cluster_err = |e| RegistryError::Cluster {
            volume: record.name.clone(),
            node: self.node.name.clone(),
            source: e,
        };
        c.cluster
            .init_replica_states(&record.id, &record.replicas)
            .map_err(cluster_err)?;
        if let Err(e) = self.node.catalog.insert(record.clone()) {
            let _ = c.cluster.forget_volume(&record.id);
            return Err(RegistryError::Catalog {
                volume: record.name.clone(),
                node: self.node.name.clone(),
                source: e,
            });
        }
        self.announce_policy(record);
        tracing::info!(volume = %record.name, id = %record.id, parent = %source.name, snapshot = snap, replicas = ?record.replicas, "cloned in the cluster");
        Ok(self.info(record.clone()))
    }
}

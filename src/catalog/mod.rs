//! The catalog: which volumes exist and what they were asked to be.
//!
//! Get and List are answered from here at once after a start (dockerd deletes
//! its record of a volume whose Get fails), so the catalog is persisted before
//! a create or remove is acknowledged. One node keeps it in a file under the
//! data dir ([`EmbeddedCatalog`]); a cluster will keep it in etcd behind the
//! same trait.

mod embedded;

pub use embedded::EmbeddedCatalog;

use crate::spec::VolumeSpec;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// One volume as persisted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub name: String,
    /// Unique per creation: a volume removed and created again under the same
    /// name gets a new id, so its data directory and actor never mix with the old.
    pub id: String,
    pub created_at: DateTime<Utc>,
    pub spec: VolumeSpec,
    /// The options as the user gave them, for `inspect`.
    pub options: BTreeMap<String, String>,
    /// mkfs has completed on this volume.
    pub formatted: bool,
    /// A clone: the volume (by id) and its snapshot it was made from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clone_of: Option<CloneOf>,
    /// Nodes holding a replica (cluster mode; empty on a single node, where
    /// the only copy is local).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replicas: Vec<String>,
    /// An encrypted cluster volume's parameters (salt, key check value:
    /// nothing secret), kept with the volume so that any node can attach
    /// it. A single node's volumes keep theirs in the image's `crypt` file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crypt: Option<Box<crate::engine::CryptParams>>,
    /// The device grew (or may be larger than its filesystem: a clone, a
    /// restore) since the filesystem was last grown: the next mount grows
    /// it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub grow_fs: bool,
    /// Replicas being replaced because their node stayed down (cluster
    /// mode): the replaced node → the node of the replica replacing it,
    /// removed once that one is in sync (`cluster::replace`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub replacing: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloneOf {
    pub volume_id: String,
    pub snapshot: String,
}

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("volume {0} already exists")]
    Exists(String),
    #[error("no such volume: {0}")]
    NotFound(String),
    #[error("catalog {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("catalog {path} is damaged: {reason}; restore it from a backup or move it away to start empty")]
    Corrupt { path: PathBuf, reason: String },
    /// The cluster's catalog (etcd) could not be read or written.
    #[error("the cluster's catalog (etcd key {key}) is unavailable: {reason}")]
    Unavailable { key: String, reason: String },
}

/// The catalog's operations. Every mutation is durable when it returns.
pub trait Catalog: Send + Sync {
    fn list(&self) -> Vec<VolumeRecord>;
    fn get(&self, name: &str) -> Option<VolumeRecord>;
    /// Add a new volume; fails with [`CatalogError::Exists`] if the name is taken.
    fn insert(&self, record: VolumeRecord) -> Result<(), CatalogError>;
    /// Change the record of volume `name` if its id is still `id`; returns the new record.
    fn modify(
        &self,
        name: &str,
        id: &str,
        change: &mut dyn FnMut(&mut VolumeRecord),
    ) -> Result<VolumeRecord, CatalogError>;
    /// Remove the volume `name` if its id is still `id`.
    fn remove(&self, name: &str, id: &str) -> Result<(), CatalogError>;
}

/// A fresh random volume id (128 bits, hex).
pub fn new_volume_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

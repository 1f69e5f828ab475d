//! A volume as the outside sees it: the CLI's JSON, and Docker's Status.

use crate::catalog::VolumeRecord;
use crate::spec::human_bytes;
use crate::volume::{Runtime, State};
use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VolumeInfo {
    pub name: String,
    pub id: String,
    pub node: String,
    pub created_at: DateTime<Utc>,
    pub size_bytes: u64,
    pub fs: String,
    pub fsopts: String,
    pub block_size_kib: u32,
    pub sticky: bool,
    /// Encrypted at rest (AES-256-XTS); the key is never shown.
    pub encrypted: bool,
    /// `high`, `medium` or `low`: share of the node's engine IO.
    pub io_priority: String,
    /// Placement group (recorded; enforced by replication).
    pub group: Option<String>,
    pub fg: bool,
    pub labels: BTreeMap<String, String>,
    pub options: BTreeMap<String, String>,
    pub formatted: bool,
    /// The device grew past the filesystem, which grows at the next mount.
    #[serde(default)]
    pub fs_grows_at_next_mount: bool,
    pub state: String,
    pub device: Option<PathBuf>,
    pub mountpoint: Option<PathBuf>,
    /// Docker mounts outstanding (sum over mount IDs).
    pub mounts: u32,
    /// While attached: `passthrough` (the kernel does IO on the data file)
    /// or `engine` (every IO through dunnage's engine).
    pub io_path: Option<String>,
    /// Several nodes may mount it at once (`shared=true`).
    #[serde(default)]
    pub shared: bool,
    /// Mounted here as a client of this node, which holds it (shared).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub served_by: Option<String>,
    /// Other nodes mounting this shared volume through this node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shared_with: Vec<String>,
    /// Bytes the volume's files take on the backing filesystem.
    pub allocated_bytes: u64,
    /// Used and shared space with snapshots (`volume inspect` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub space: Option<crate::volume::snapshots::Space>,
    /// Replica placement and states, attach holder (cluster mode, `volume
    /// inspect` and `volume ls`; resync progress in inspect only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<crate::volume::replicated::ClusterView>,
}

impl VolumeInfo {
    pub fn new(record: VolumeRecord, rt: Runtime, allocated_bytes: u64, node: &str) -> Self {
        let state = match rt.state {
            State::Detached => "detached",
            State::Mounted => "mounted",
            State::Attached => "attached",
        };
        VolumeInfo {
            name: record.name,
            id: record.id,
            node: node.to_string(),
            created_at: record.created_at,
            size_bytes: record.spec.size,
            fs: record.spec.fs.to_string(),
            fsopts: record.spec.fsopts.join(" "),
            block_size_kib: record.spec.block_size_kib,
            sticky: record.spec.sticky,
            encrypted: record.spec.secure,
            io_priority: record.spec.io_priority.to_string(),
            group: record.spec.group.clone(),
            fg: record.spec.fg,
            labels: record.spec.labels,
            options: record.options,
            formatted: record.formatted,
            fs_grows_at_next_mount: record.grow_fs,
            state: state.to_string(),
            device: rt.device,
            mountpoint: rt.mountpoint,
            mounts: rt.mounts,
            io_path: rt.io_path.map(str::to_string),
            shared: record.spec.shared,
            served_by: rt.joined,
            shared_with: rt.sharers,
            allocated_bytes,
            space: None,
            cluster: None,
        }
    }

    pub fn created_rfc3339(&self) -> String {
        self.created_at.to_rfc3339_opts(SecondsFormat::Secs, true)
    }

    /// Docker's `Status` map, shown by `docker volume inspect`.
    pub fn docker_status(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut m = serde_json::Map::new();
        let mut put = |k: &str, v: serde_json::Value| {
            m.insert(k.to_string(), v);
        };
        put("size", human_bytes(self.size_bytes).into());
        put("allocated", human_bytes(self.allocated_bytes).into());
        put("fs", self.fs.clone().into());
        put("block_size", format!("{} KiB", self.block_size_kib).into());
        put("state", self.state.clone().into());
        put("node", self.node.clone().into());
        put("sticky", self.sticky.into());
        if let Some(d) = &self.device {
            put("device", d.display().to_string().into());
        }
        if let Some(p) = &self.io_path {
            put("io_path", p.clone().into());
        }
        if self.shared {
            put("shared", true.into());
        }
        if let Some(n) = &self.served_by {
            put("served_by", n.clone().into());
        }
        if !self.shared_with.is_empty() {
            put("shared_with", self.shared_with.join(",").into());
        }
        if !self.labels.is_empty() {
            put(
                "labels",
                serde_json::to_value(&self.labels).unwrap_or_default(),
            );
        }
        m
    }

    pub fn has_label(&self, key: &str, value: Option<&str>) -> bool {
        match (self.labels.get(key), value) {
            (Some(v), Some(want)) => v == want,
            (Some(_), None) => true,
            _ => false,
        }
    }
}

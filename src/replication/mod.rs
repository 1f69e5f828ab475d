//! Stage 4b: synchronous replication. The attached node's volume mirrors
//! every write to the nodes holding the volume's other replicas and
//! acknowledges it only when every in-sync replica holds it (DRBD's
//! protocol C). Replica links are plain threads and sockets: IO never waits
//! on an actor mailbox.
//!
//! Types shared with [`crate::cluster`], which keeps replica states in etcd.

use serde::{Deserialize, Serialize};

/// The attach generation of a volume: the etcd revision of its attach key.
/// Every replica refuses IO from a generation older than the newest it has
/// seen, so a node that lost its attach can never write again.
pub type Generation = u64;

/// A replica's state as the cluster records it. Only `InSync` replicas may
/// serve a new attach; the others need a resync first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReplicaState {
    /// Holds every acknowledged write.
    InSync,
    /// Missed writes (it stopped answering); needs a resync.
    Outdated,
    /// Being brought up to date; receives new writes meanwhile.
    Resyncing,
}

impl std::fmt::Display for ReplicaState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ReplicaState::InSync => "in-sync",
            ReplicaState::Outdated => "outdated",
            ReplicaState::Resyncing => "resyncing",
        })
    }
}

/// Where the attached node records replica state changes. The cluster's
/// implementation writes to etcd guarded by the attach generation: once
/// another node has attached the volume, every call fails, and the caller
/// must stop writing (it is fenced).
pub trait StateStore: Send + Sync {
    fn set_state(&self, node: &str, state: ReplicaState) -> Result<(), StateStoreError>;
}

#[derive(Debug, thiserror::Error)]
pub enum StateStoreError {
    /// The attach generation is no longer current: another node attached.
    #[error("fenced: volume {volume} is now attached with a newer generation than {generation}")]
    Fenced {
        volume: String,
        generation: Generation,
    },
    /// The store cannot be reached; the state change did not happen.
    #[error("cannot record replica state: {0}")]
    Unavailable(String),
}

//! Stage 4b: synchronous replication. The attached node's volume mirrors
//! every write to the nodes holding the volume's other replicas and
//! acknowledges it only when every in-sync replica holds it (DRBD's
//! protocol C). Replica links are plain threads and sockets: IO never waits
//! on an actor mailbox.
//!
//! Types shared with [`crate::cluster`], which keeps replica states in etcd.
//!
//! - [`wire`]: the link protocol (length-prefixed frames over TCP).
//! - [`LocalReplicas`] / [`LocalReplica`]: the images this node holds, each
//!   with the highest attach generation it has seen (fencing).
//! - [`ReplicaServer`]: serves this node's replicas to the attached node.
//! - [`Mirror`]: the attached node's [`crate::engine::BlockEngine`] that
//!   fans every write out to the replicas, tracks what an unreachable
//!   replica misses and resyncs it when it is back.

pub mod activity;
pub mod auth;
mod link;
mod local;
mod mirror;
mod ranges;
mod server;
pub mod state;
pub mod wire;

pub use link::{forward_request, open_session, restore_replica};
pub use local::{check_volume_id, LocalReplica, LocalReplicas, ReplicaBase, ReplicaContents};
pub use mirror::{Mirror, MirrorConfig, NewReplica, PeerSpec, Verification};
pub use server::{Answer, Forwarder, ReplicaServer};
pub use state::{ReplicaStatus, ResyncPace, ResyncProgress};

use crate::engine::EngineError;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// The attach generation of a volume: the etcd revision of its attach key.
/// Every replica refuses IO from a generation older than the newest it has
/// seen, so a node that lost its attach can never write again.
pub type Generation = u64;

/// Which image a replica is: random, made with the image and kept beside
/// it. The cluster records the one each replica had when last seen; a
/// replica that answers with another one lost its files (a wiped data dir,
/// a new disk) and holds none of what it was recorded to hold.
pub type Incarnation = u64;

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
    /// Record the incarnation `node`'s replica answered with. `replaced`:
    /// it is another image than the one recorded, which holds none of the
    /// snapshots recorded on that node either.
    fn set_incarnation(
        &self,
        node: &str,
        incarnation: Incarnation,
        replaced: bool,
    ) -> Result<(), StateStoreError>;
    /// Record that this attach reached every replica still recorded in
    /// sync (each has seen its generation): a later attach that meets an
    /// in-sync replica with an older generation knows it was rolled back,
    /// even when no other in-sync replica is there to compare it with
    /// ([`mirror::MirrorConfig::reached`]).
    fn reached(&self) -> Result<(), StateStoreError>;
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

/// Errors of replication.
#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    /// A newer attach generation has been seen: this session may not do IO.
    #[error(
        "fenced: the replica of volume {volume} has seen generation {current}, \
         this session has {generation} (another node attached the volume)"
    )]
    Fenced {
        volume: String,
        generation: Generation,
        current: Generation,
    },
    /// A newer link from the attached node replaced the one a request came
    /// on (see [`LocalReplica::advance`]).
    #[error(
        "replica of volume {volume}: the request came on a link that the attached node has \
         since replaced; it was not run"
    )]
    Superseded { volume: String },
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is damaged: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("replica link to {node} ({addr}): {source}")]
    Link {
        node: String,
        addr: std::net::SocketAddr,
        #[source]
        source: wire::WireError,
    },
    /// The peer answered with an error frame.
    #[error("replica {node} refused ({code}): {message}")]
    Refused {
        node: String,
        code: wire::ErrorCode,
        message: String,
    },
    #[error(
        "volume id {0:?} is invalid: use 1 to 128 characters from A-Z a-z 0-9 _ . - \
         starting with a letter or a digit"
    )]
    InvalidVolumeId(String),
    #[error(
        "replica of volume {volume_id} has size {have_size} and block size \
         {have_block_size}, but {want_size} and {want_block_size} were asked for \
         (a replica smaller than its grown volume grows when the volume is next attached)"
    )]
    ParamsMismatch {
        volume_id: String,
        have_size: u64,
        have_block_size: u32,
        want_size: u64,
        want_block_size: u32,
    },
    #[error("replica of volume {0} is in use (attached, or linked from the attached node)")]
    Busy(String),
    #[error("this node holds no replica of volume {0}")]
    NotFound(String),
    /// Clones' replicas here read blocks through this replica.
    #[error("the replica of volume {volume} here is the base of clone replicas ({clones}); it stays until those are removed")]
    HasClones { volume: String, clones: String },
    #[error(
        "volume {volume} has no in-sync replica that can be reached ({detail}): \
         bring a node holding an in-sync replica back; if none will come back, or \
         every replica is outdated, accept the best one left as the volume's data \
         with `dunnage replica accept {volume} NODE` (the writes only the others \
         held are lost)"
    )]
    NoInSyncReplica { volume: String, detail: String },
    #[error(transparent)]
    State(#[from] StateStoreError),
    #[error("invalid replication config: {0}")]
    Config(String),
    /// A snapshot is taken on every replica at once: one that cannot take
    /// it now refuses the snapshot.
    #[error(
        "cannot {op} snapshot {snapshot} of volume {volume}: the replica on node {node} is {why}; \
         snapshots are taken, deleted and restored on every replica at once. A node that is down must \
         be back; an outdated replica is resynced while the volume is attached (`dunnage \
         volume resync {volume}` on the attached node waits for it); then retry"
    )]
    SnapshotNeedsAll {
        op: &'static str,
        volume: String,
        snapshot: String,
        node: String,
        why: String,
    },
    /// No replica of the volume holds the snapshot any more.
    #[error(
        "cannot restore snapshot {snapshot} of volume {volume}: none of its replicas holds it \
         (each was placed, or its files replaced, after the snapshot was taken); it can only \
         be deleted (`dunnage snapshot rm {volume} {snapshot}`)"
    )]
    SnapshotHeldNowhere { volume: String, snapshot: String },
    #[error("volume {0}: a comparison of its replicas is running already; `dunnage volume inspect` shows its progress")]
    VerifyRunning(String),
    /// A replica cannot be added to or removed from the volume now.
    #[error("cannot {op} the replica of volume {volume} on node {node}: {why}")]
    Membership {
        op: &'static str,
        volume: String,
        node: String,
        why: String,
    },
}

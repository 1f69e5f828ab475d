//! Requests about a volume attached on another node go to that node: its
//! mirror is the one that must hold writes for a snapshot, and the one
//! that changes replicas live. The request travels as a Hello with
//! `forward` on the holder's replica port (no other port to open), its
//! daemon runs it on the volume's actor, and the reply comes back. So
//! `dunnage snapshot create`, `snapshot rm`, `replica add/rm`, `volume
//! resize` and clones work from any node, as in Portworx. A node without a replica also asks
//! one with a replica for `snapshot ls` (the space figures are a replica's),
//! and `replica rm` and `replica accept` ask a replica's node what it holds
//! (`ReplicaContents`: its snapshots, and the clones sharing its blocks).

use super::{VolumeActor, VolumeError, VolumeErrorKind};
use crate::catalog::VolumeRecord;
use crate::config::ClusterNode;
use crate::replication::ReplicationError;
use actix::prelude::*;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// How long the holder may take (a snapshot of a big replica copies its map).
const FORWARD_WAIT: Duration = Duration::from_secs(120);
/// How long a listing may take: it only improves `snapshot ls`'s figures.
const LIST_WAIT: Duration = Duration::from_secs(10);

/// What a node asks the holder of a volume's attach to do.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum HolderOp {
    TakeSnapshot {
        name: String,
    },
    DeleteSnapshot {
        name: String,
    },
    AddReplica {
        node: Option<String>,
    },
    RemoveReplica {
        node: String,
    },
    /// Grow the volume to `size` bytes (`given` as the user wrote it).
    Resize {
        size: u64,
        given: String,
    },
    /// Compare the replicas (`dunnage volume verify`).
    Verify,
    /// Stop this node's background resync of the volume (an attach wants it).
    StopResync,
    /// `snapshot ls`, asked of a node with a replica (not necessarily the
    /// holder) by one without: the space figures are its replica's.
    ListSnapshots,
    /// Open a session on a shared volume mounted there (`volume::sharing`):
    /// the connection then carries its file operations.
    Share,
    /// What this node's replica of the volume holds
    /// ([`crate::replication::ReplicaContents`]),
    /// read from its directory. Answered by the registry, not the volume's
    /// actor: the asking node's actor may be the one waiting for it.
    ReplicaContents,
}

/// A forwarded request, as it travels.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct HolderRequest {
    pub volume: String,
    /// Guards against a volume removed and created again meanwhile.
    pub volume_id: String,
    /// The node that forwarded it.
    pub from: String,
    pub op: HolderOp,
}

/// Ask `node` to run `op` on volume `record`; its reply's JSON.
pub(super) fn forward_to(
    c: &ClusterNode,
    record: &VolumeRecord,
    node: &str,
    op: HolderOp,
) -> Result<String, VolumeErrorKind> {
    let wait = match op {
        HolderOp::ListSnapshots | HolderOp::ReplicaContents => LIST_WAIT,
        _ => FORWARD_WAIT,
    };
    tracing::info!(volume = %record.name, node, ?op, "forwarding a request to another node");
    let (addr, json) = holder_request(c, record, node, op)?;
    crate::replication::forward_request(
        node,
        addr,
        c.cluster.node(),
        &json,
        c.replica_timeout,
        wait,
    )
    .map_err(|e| on_holder(node, e))
}

/// Where `node` serves, and `op` about `record` as it travels there.
pub(super) fn holder_request(
    c: &ClusterNode,
    record: &VolumeRecord,
    node: &str,
    op: HolderOp,
) -> Result<(std::net::SocketAddr, String), VolumeErrorKind> {
    let addr = c.cluster.member_addr(node)?.ok_or_else(|| {
        crate::cluster::ClusterError::Placement(format!(
            "node {node}, which holds volume {}, is not a known member",
            record.name
        ))
    })?;
    let request = HolderRequest {
        volume: record.name.clone(),
        volume_id: record.id.clone(),
        from: c.cluster.node().to_string(),
        op,
    };
    let json = serde_json::to_string(&request).expect("a request serializes");
    Ok((addr, json))
}

/// A forwarded request's failure: the holder's refusal, said as its own.
pub(super) fn on_holder(node: &str, e: ReplicationError) -> VolumeErrorKind {
    match e {
        ReplicationError::Refused { code, message, .. } => VolumeErrorKind::OnHolder {
            node: node.to_string(),
            code,
            message,
        },
        e => e.into(),
    }
}

/// Run a forwarded op on this node's actor of the volume. The reply's JSON.
#[derive(Message)]
#[rtype(result = "Result<String, VolumeError>")]
pub struct RunForwarded {
    pub volume_id: String,
    pub from: String,
    pub op: HolderOp,
}

impl VolumeActor {
    /// The other node holding this volume's attach, if one does and this
    /// request may go there (a forwarded request is never forwarded again).
    pub(super) fn holder_elsewhere(&self, c: &ClusterNode) -> Result<Option<String>, VolumeError> {
        if self.forwarded || self.attached.is_some() {
            return Ok(None);
        }
        // A background resync gives way instead (see `replicated::take_attach`).
        let owner = c.cluster.attach_owner(&self.id).map_err(|e| self.err(e))?;
        Ok(owner.map(|(n, _)| n).filter(|n| n != c.cluster.node()))
    }

    /// Ask `node`, which holds the attach, to run `op`; its reply's JSON.
    pub(super) fn forward(
        &self,
        c: &ClusterNode,
        record: &VolumeRecord,
        node: &str,
        op: HolderOp,
    ) -> Result<String, VolumeError> {
        forward_to(c, record, node, op).map_err(|e| self.err(e))
    }

    fn run_forwarded(&mut self, op: HolderOp) -> Result<String, VolumeError> {
        Ok(match op {
            HolderOp::TakeSnapshot { name } => to_json(&self.take_snapshot(Some(name))?),
            HolderOp::DeleteSnapshot { name } => to_json(&self.delete_snapshot(name)?),
            HolderOp::AddReplica { node } => to_json(&self.change_replica(true, node, None)?),
            HolderOp::RemoveReplica { node } => {
                to_json(&self.change_replica(false, Some(node), None)?)
            }
            HolderOp::Resize { size, given } => to_json(&self.resize(size, given)?),
            HolderOp::Verify => to_json(&self.start_verify()?),
            HolderOp::StopResync => {
                if let Some(c) = &self.node.cluster {
                    c.stop_resync(&self.id);
                }
                to_json(&())
            }
            HolderOp::ListSnapshots => {
                let Some(c) = self.node.cluster.clone() else {
                    return Err(self.err(VolumeErrorKind::NotClustered("a snapshot listing")));
                };
                let record = self.record()?;
                to_json(&self.cluster_snapshots(&c, &record)?)
            }
            HolderOp::Share => {
                return Err(self.err(VolumeErrorKind::Mount(
                    "a shared volume's session is opened by the registry, not forwarded".into(),
                )))
            }
            HolderOp::ReplicaContents => {
                let Some(c) = self.node.cluster.clone() else {
                    return Err(self.err(VolumeErrorKind::NotClustered("a replica's contents")));
                };
                to_json(&c.replicas.contents(&self.id).map_err(|e| self.err(e))?)
            }
        })
    }

    /// The holder's reply to a forwarded op, as `T`.
    pub(super) fn forwarded_reply<T: for<'de> Deserialize<'de>>(
        &self,
        node: &str,
        reply: &str,
    ) -> Result<T, VolumeError> {
        parse_reply(node, reply).map_err(|e| self.err(e))
    }
}

/// `node`'s reply to a forwarded op, as `T`.
pub(super) fn parse_reply<T: for<'de> Deserialize<'de>>(
    node: &str,
    reply: &str,
) -> Result<T, VolumeErrorKind> {
    serde_json::from_str(reply).map_err(|e| VolumeErrorKind::OnHolder {
        node: node.to_string(),
        code: crate::replication::wire::ErrorCode::Protocol,
        message: format!("an unreadable reply ({e}): {reply}"),
    })
}

fn to_json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("a reply serializes")
}

impl Handler<RunForwarded> for VolumeActor {
    type Result = Result<String, VolumeError>;
    fn handle(&mut self, m: RunForwarded, _: &mut SyncContext<Self>) -> Self::Result {
        if m.volume_id != self.id {
            return Err(self.err(VolumeErrorKind::Removed));
        }
        tracing::info!(volume = %self.name, from = %m.from, op = ?m.op, "running a request forwarded by another node");
        self.forwarded = true;
        let res = self.run_forwarded(m.op);
        self.forwarded = false;
        res
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_roundtrip_and_unknown_ones_are_refused() {
        for op in [
            HolderOp::TakeSnapshot { name: "a".into() },
            HolderOp::DeleteSnapshot { name: "a".into() },
            HolderOp::AddReplica { node: None },
            HolderOp::AddReplica {
                node: Some("n3".into()),
            },
            HolderOp::RemoveReplica { node: "n2".into() },
            HolderOp::Resize {
                size: 1 << 30,
                given: "1G".into(),
            },
            HolderOp::StopResync,
            HolderOp::Verify,
            HolderOp::ListSnapshots,
            HolderOp::ReplicaContents,
        ] {
            let req = HolderRequest {
                volume: "pg".into(),
                volume_id: "0123".into(),
                from: "n2".into(),
                op,
            };
            let json = serde_json::to_string(&req).unwrap();
            assert_eq!(serde_json::from_str::<HolderRequest>(&json).unwrap(), req);
        }
        let json =
            r#"{"volume":"pg","volume_id":"1","from":"n2","op":{"take_snapshot":{"name":"a"}}}"#;
        assert!(serde_json::from_str::<HolderRequest>(json).is_ok());
        for bad in [
            r#"{"volume":"pg","volume_id":"1","from":"n2","op":{"format":{}}}"#,
            r#"{"volume":"pg","volume_id":"1","from":"n2","op":{"take_snapshot":{"name":"a","x":1}}}"#,
            r#"{"volume":"pg","volume_id":"1","op":{"take_snapshot":{"name":"a"}}}"#,
            r#"{"volume":"pg","volume_id":"1","from":"n2","op":"take_snapshot","extra":true}"#,
        ] {
            assert!(serde_json::from_str::<HolderRequest>(bad).is_err(), "{bad}");
        }
    }
}

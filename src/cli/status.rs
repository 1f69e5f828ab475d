//! `dunnage status`: this node and, in a cluster, the cluster at a glance,
//! with what needs attention (Portworx's `pxctl status`, Ceph's `ceph
//! health detail`). Composed from the daemon's answers to `GET /v1/node`,
//! the volume list and the node list; the verdict is [`assess`], a plain
//! function.

use crate::cluster::{Capacity, Member};
use crate::control::client::Client;
use crate::control::NodeInfo;
use crate::registry::VolumeInfo;
use crate::replication::ReplicaState;
use crate::spec::human_bytes;
use anyhow::Result;
use serde::Serialize;
use std::collections::BTreeSet;
use std::path::Path;

/// How much attention something needs; the status is the worst finding's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    Warn,
    Error,
}

impl Level {
    fn label(self) -> &'static str {
        match self {
            Level::Ok => "OK",
            Level::Warn => "WARN",
            Level::Error => "ERROR",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub level: Level,
    pub what: String,
}

/// Data directories with less free space than this are worth a warning,
/// and with less than `FREE_ERROR` an error: thin volumes fail writes
/// once it is gone.
const FREE_WARN_PERCENT: u64 = 15;
const FREE_ERROR_PERCENT: u64 = 5;

#[derive(Debug, Default, PartialEq, Eq, Serialize)]
pub struct VolumeCounts {
    pub total: usize,
    /// Attached on this node (mounted for Docker, or `dunnage attach`).
    pub attached_here: usize,
    /// With a replica not in sync, or on a node that is down.
    pub degraded: usize,
    /// No replica in sync on a live node: it cannot be attached.
    pub unavailable: usize,
}

#[derive(Debug, Default, PartialEq, Eq, Serialize)]
pub struct NodeCounts {
    pub total: usize,
    pub up: usize,
    pub down: usize,
    pub cordoned: usize,
}

#[derive(Debug, Serialize)]
pub struct Status {
    pub health: Level,
    pub node: NodeInfo,
    pub capacity: Option<Capacity>,
    pub volumes: VolumeCounts,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nodes: Option<NodeCounts>,
    pub findings: Vec<Finding>,
}

/// What needs attention, worst first, and the counts.
pub fn assess(
    volumes: &[VolumeInfo],
    members: Option<&[Member]>,
    capacity: Option<Capacity>,
    data_dir: &str,
) -> (Vec<Finding>, VolumeCounts, Option<NodeCounts>) {
    let mut findings = Vec::new();
    let mut say = |level, what: String| findings.push(Finding { level, what });
    if let Some(c) = capacity.filter(|c| c.total_bytes > 0) {
        let percent = c.free_bytes * 100 / c.total_bytes;
        let level = if percent < FREE_ERROR_PERCENT {
            Level::Error
        } else if percent < FREE_WARN_PERCENT {
            Level::Warn
        } else {
            Level::Ok
        };
        if level != Level::Ok {
            say(
                level,
                format!(
                    "data directory {data_dir}: {} free of {} ({percent}%): thin volumes fail writes once it is full; free space or move volumes",
                    human_bytes(c.free_bytes),
                    human_bytes(c.total_bytes)
                ),
            );
        }
    }
    let down: BTreeSet<&str> = members
        .unwrap_or_default()
        .iter()
        .filter(|m| !m.up)
        .map(|m| m.name.as_str())
        .collect();
    let nodes = members.map(|ms| {
        for m in ms.iter().filter(|m| !m.up) {
            say(Level::Warn, format!("node {} is down", m.name));
        }
        NodeCounts {
            total: ms.len(),
            up: ms.iter().filter(|m| m.up).count(),
            down: down.len(),
            cordoned: ms.iter().filter(|m| m.cordoned).count(),
        }
    });
    let mut counts = VolumeCounts {
        total: volumes.len(),
        ..VolumeCounts::default()
    };
    for v in volumes {
        if v.state != "detached" {
            counts.attached_here += 1;
        }
        let Some(view) = &v.cluster else { continue };
        if view.replicas.is_empty() {
            continue;
        }
        let live_in_sync = view
            .replicas
            .iter()
            .filter(|r| r.state == ReplicaState::InSync && !down.contains(r.node.as_str()))
            .count();
        let states: Vec<String> = view
            .replicas
            .iter()
            .filter(|r| r.state != ReplicaState::InSync || down.contains(r.node.as_str()))
            .map(|r| {
                let mut s = format!("{} {}", r.node, r.state);
                if down.contains(r.node.as_str()) {
                    s.push_str(", node down");
                }
                if let Some(p) = r.resync.as_ref().filter(|p| p.total_bytes > 0) {
                    let pct = p.done_bytes.min(p.total_bytes) * 100 / p.total_bytes;
                    s.push_str(&format!(", {pct}% resynced"));
                }
                if let Some(old) = &r.replaces {
                    s.push_str(&format!(", replacing {old}"));
                }
                s
            })
            .collect();
        if live_in_sync == 0 {
            counts.unavailable += 1;
            say(
                Level::Error,
                format!(
                    "volume {}: no replica in sync on a live node ({}): it cannot be attached until such a node is back; if none will be, `dunnage replica accept {} NODE`",
                    v.name,
                    states.join("; "),
                    v.name
                ),
            );
        } else if !states.is_empty() {
            counts.degraded += 1;
            say(
                Level::Warn,
                format!("volume {}: {}", v.name, states.join("; ")),
            );
        }
    }
    findings.sort_by_key(|f| std::cmp::Reverse(f.level));
    (findings, counts, nodes)
}

/// Print the status; with `check`, exit 1 when something needs a look
/// and 2 on an error (Nagios' convention) once printed.
pub fn status(run_dir: &Path, json: bool, check: bool) -> Result<()> {
    let client = Client::new(run_dir);
    let node: NodeInfo = client.get("/v1/node")?;
    let volumes: Vec<VolumeInfo> = client.post("/v1/volume/list", &())?;
    let members: Option<Vec<Member>> = if node.etcd.is_empty() {
        None
    } else {
        Some(client.post("/v1/node/list", &())?)
    };
    let capacity = crate::config::capacity(Path::new(&node.data_dir));
    let (findings, counts, nodes) = assess(&volumes, members.as_deref(), capacity, &node.data_dir);
    let health = findings.first().map_or(Level::Ok, |f| f.level);
    let status = Status {
        health,
        node,
        capacity,
        volumes: counts,
        nodes,
        findings,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{}", render(&status));
    }
    if check && health != Level::Ok {
        std::process::exit(if health == Level::Error { 2 } else { 1 });
    }
    Ok(())
}

fn render(s: &Status) -> String {
    let mut out = format!("status    {}\n", s.health.label());
    out += &format!(
        "node      {} (dunnage {}, {} export)\n",
        s.node.node, s.node.version, s.node.export
    );
    if let Some(c) = s.capacity {
        out += &format!(
            "data      {}: {} free of {} ({}%)\n",
            s.node.data_dir,
            human_bytes(c.free_bytes),
            human_bytes(c.total_bytes),
            c.free_bytes * 100 / c.total_bytes.max(1)
        );
    }
    let v = &s.volumes;
    out += &format!("volumes   {}, {} attached here", v.total, v.attached_here);
    if let Some(n) = &s.nodes {
        out += &format!("; {} degraded, {} unavailable", v.degraded, v.unavailable);
        out += &format!(
            "\ncluster   {} nodes: {} up, {} down, {} cordoned (etcd {})",
            n.total,
            n.up,
            n.down,
            n.cordoned,
            s.node.etcd.join(",")
        );
    }
    out.push('\n');
    for f in &s.findings {
        out += &format!("  {:<5}  {}\n", f.level.label(), f.what);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::replicated::{ClusterView, ReplicaView};

    fn member(name: &str, up: bool) -> Member {
        serde_json::from_value(serde_json::json!({
            "name": name, "addr": "127.0.0.1:7800", "up": up,
            "started_at": "2026-12-07T00:00:00Z",
        }))
        .unwrap()
    }

    fn volume(name: &str, state: &str, replicas: &[(&str, ReplicaState)]) -> VolumeInfo {
        let mut v: VolumeInfo = serde_json::from_value(serde_json::json!({
            "name": name, "id": "id", "node": "n1", "created_at": "2026-12-07T00:00:00Z",
            "size_bytes": 1, "fs": "ext4", "fsopts": "", "block_size_kib": 32, "sticky": false,
            "encrypted": false, "io_priority": "medium", "group": null, "fg": false,
            "labels": {}, "options": {}, "formatted": true, "state": state,
            "device": null, "mountpoint": null, "mounts": 0, "allocated_bytes": 0,
        }))
        .unwrap();
        v.cluster = (!replicas.is_empty()).then(|| ClusterView {
            attached_on: None,
            generation: None,
            resync_on: None,
            replicas: replicas
                .iter()
                .map(|(n, s)| ReplicaView::recorded(n, *s))
                .collect(),
            verification: None,
        });
        v
    }

    #[test]
    fn a_healthy_node_says_nothing() {
        let vols = [volume("a", "mounted", &[]), volume("b", "detached", &[])];
        let cap = Capacity {
            total_bytes: 100,
            free_bytes: 50,
        };
        let (findings, counts, nodes) = assess(&vols, None, Some(cap), "/d");
        assert!(findings.is_empty(), "{findings:?}");
        assert_eq!((counts.total, counts.attached_here), (2, 1));
        assert_eq!(nodes, None);
    }

    #[test]
    fn down_nodes_degraded_and_unavailable_volumes_are_named_worst_first() {
        use ReplicaState::{InSync, Outdated};
        let members = [member("n1", true), member("n2", false), member("n3", true)];
        let vols = [
            volume("fine", "detached", &[("n1", InSync), ("n3", InSync)]),
            volume("degraded", "mounted", &[("n1", InSync), ("n2", InSync)]),
            volume("stuck", "detached", &[("n2", InSync), ("n3", Outdated)]),
        ];
        let (findings, counts, nodes) = assess(&vols, Some(&members), None, "/d");
        let nodes = nodes.unwrap();
        assert_eq!((nodes.total, nodes.up, nodes.down), (3, 2, 1));
        assert_eq!((counts.degraded, counts.unavailable), (1, 1));
        let levels: Vec<Level> = findings.iter().map(|f| f.level).collect();
        assert_eq!(levels, [Level::Error, Level::Warn, Level::Warn]);
        assert!(
            findings[0].what.contains("volume stuck")
                && findings[0].what.contains("n2 in-sync, node down")
                && findings[0].what.contains("n3 outdated")
                && findings[0].what.contains("replica accept stuck"),
            "{findings:?}"
        );
        assert!(findings.iter().any(|f| f.what == "node n2 is down"));
        assert!(findings
            .iter()
            .any(|f| f.what == "volume degraded: n2 in-sync, node down"));
    }

    #[test]
    fn a_filling_data_directory_warns_then_errs() {
        let cap = |free: u64| {
            Some(Capacity {
                total_bytes: 100 << 30,
                free_bytes: free << 30,
            })
        };
        assert!(assess(&[], None, cap(20), "/d").0.is_empty());
        assert_eq!(assess(&[], None, cap(10), "/d").0[0].level, Level::Warn);
        let (f, ..) = assess(&[], None, cap(2), "/d");
        assert_eq!(f[0].level, Level::Error);
        assert!(
            f[0].what.contains("/d: 2.0 GiB free of 100.0 GiB (2%)"),
            "{f:?}"
        );
    }
}

//! The cluster side of the CLI: `node ls`, `volume resync` (a progress bar
//! until every replica is in sync) and `replica add/rm/accept/checksum`.

use crate::cluster::Member;
use crate::control::client::Client;
use crate::control::{AcceptArgs, NameArgs, ReplicaArgs};
use crate::registry::VolumeInfo;
use crate::replication::ReplicaState;
use anyhow::{bail, Result};
use clap::Subcommand;
use comfy_table::{presets::NOTHING, Table};
use std::path::Path;
use std::time::{Duration, Instant};

#[derive(Debug, Subcommand)]
pub enum NodeCmd {
    /// List the cluster's nodes and whether they are up (their etcd lease
    /// is alive).
    Ls {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum ReplicaCmd {
    /// Add a replica of a volume on another node (LINSTOR's `resource
    /// create`, Portworx's `ha-update`), from any node. It is resynced in
    /// the background: by the attached node's mirror while the volume stays
    /// in use, or, if it is attached nowhere, by this node until an attach
    /// takes over.
    Add {
        /// The volume (a replicated one, in a cluster).
        volume: String,
        /// The node to hold it; by default placement picks a live node
        /// without one, honouring the volume's group and fg.
        node: Option<String>,
        /// Wait until every replica is in sync, with a progress bar (bytes
        /// on the node doing the resync, replica states elsewhere).
        #[arg(long)]
        wait: bool,
        /// Give up waiting after this many seconds.
        #[arg(long, default_value_t = 3600)]
        timeout: u64,
    },
    /// Remove a node's replica of a volume: to move a replica (add the new
    /// one, let it resync, remove the old), or to drop one whose node is
    /// gone for good. Refused while no other replica is in sync on a live
    /// node. The node deletes its replica's files at its next sweep.
    Rm {
        /// The volume.
        volume: String,
        /// The node whose replica goes (it may be down).
        node: String,
    },
    /// Take a node's replica as the volume's data when no replica in sync
    /// is left on a live node: every replica was found outdated, rolled
    /// back (its files restored from a backup) or replaced, or the nodes
    /// of the in-sync ones are gone for good (DRBD's forced primary,
    /// LINSTOR's `--discard-my-data` on the others). Writes that only the
    /// other replicas hold are lost: they are recorded outdated and
    /// resynced whole from it. Refused while the volume is attached, or
    /// while an in-sync replica's node is up. Run from any node.
    Accept {
        /// The volume.
        volume: String,
        /// The node whose replica becomes the volume's data (it must be up).
        node: String,
    },
    /// Print the sha256 of this node's replica of a volume (compare nodes
    /// after a resync; run while the volume is detached or idle).
    Checksum {
        /// The volume.
        volume: String,
    },
}

pub fn node(run_dir: &Path, cmd: NodeCmd) -> Result<()> {
    let NodeCmd::Ls { json } = cmd;
    let members: Vec<Member> = Client::new(run_dir).post("/v1/node/list", &())?;
    if json {
        println!("{}", serde_json::to_string_pretty(&members)?);
        return Ok(());
    }
    let mut t = Table::new();
    t.load_preset(NOTHING);
    t.set_header(["NODE", "ADDRESS", "STATE", "SINCE"]);
    for m in &members {
        t.add_row([
            m.name.clone(),
            m.addr.to_string(),
            if m.up { "up" } else { "down" }.to_string(),
            m.started_at.format("%Y-%m-%d %H:%M:%S UTC").to_string(),
        ]);
    }
    println!("{t}");
    Ok(())
}

pub fn replica(run_dir: &Path, cmd: ReplicaCmd) -> Result<()> {
    let client = Client::new(run_dir);
    match cmd {
        ReplicaCmd::Checksum { volume } => {
            let sum: String = client.post("/v1/replica/checksum", &NameArgs { name: volume })?;
            println!("{sum}");
        }
        ReplicaCmd::Add {
            volume,
            node,
            wait,
            timeout,
        } => {
            let args = ReplicaArgs {
                name: volume.clone(),
                add: true,
                node,
            };
            let node: String = client.post("/v1/replica/change", &args)?;
            println!("{volume}: replica added on {node}; it is outdated until resynced");
            if wait {
                resync(run_dir, volume, timeout)?;
            }
        }
        ReplicaCmd::Accept { volume, node } => {
            let args = AcceptArgs {
                name: volume.clone(),
                node: node.clone(),
            };
            let outdated: Vec<String> = client.post("/v1/replica/accept", &args)?;
            if outdated.is_empty() {
                println!("{volume}: the replica on {node} is its data now");
            } else {
                println!(
                    "{volume}: the replica on {node} is its data now; {} resynced whole from it",
                    outdated.join(", ")
                );
            }
        }
        ReplicaCmd::Rm { volume, node } => {
            let args = ReplicaArgs {
                name: volume.clone(),
                add: false,
                node: Some(node),
            };
            let node: String = client.post("/v1/replica/change", &args)?;
            println!("{volume}: replica on {node} removed");
        }
    }
    Ok(())
}

/// Bytes resynced and to resync over all replicas, the replicas behind,
/// and whether a resync yields to the volume's IO, from inspect.
fn resync_left(v: &VolumeInfo) -> Result<(u64, u64, usize, bool)> {
    let Some(c) = &v.cluster else {
        bail!(
            "volume {} is not in a cluster: it has no replicas to resync",
            v.name
        );
    };
    let mut done = 0;
    let mut total = 0;
    let mut behind = 0;
    let mut yielding = false;
    for r in &c.replicas {
        if r.state != ReplicaState::InSync {
            behind += 1;
        }
        if let Some(p) = &r.resync {
            done += p.done_bytes;
            total += p.total_bytes;
            yielding |= p.yielding;
        }
    }
    Ok((done, total, behind, yielding))
}

/// `n1=in-sync, n2=outdated`, for errors.
fn replica_states(v: &VolumeInfo) -> String {
    let states: Vec<String> = v
        .cluster
        .iter()
        .flat_map(|c| c.replicas.iter())
        .map(|r| format!("{}={}", r.node, r.state))
        .collect();
    states.join(", ")
}

/// Wait until every replica of `name` is in sync, with a progress bar.
pub fn resync(run_dir: &Path, name: String, timeout: u64) -> Result<()> {
    let client = Client::new(run_dir);
    let deadline = Instant::now() + Duration::from_secs(timeout);
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:40}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_message(format!("resync {name}"));
    let mut started = false;
    loop {
        let v: VolumeInfo = client.post("/v1/volume/inspect", &NameArgs { name: name.clone() })?;
        let (done, total, behind, yielding) = resync_left(&v)?;
        if behind == 0 {
            bar.finish_with_message(format!("{name}: every replica in sync"));
            return Ok(());
        }
        let c = v.cluster.as_ref();
        let on = c.and_then(|c| c.attached_on.clone().or_else(|| c.resync_on.clone()));
        match on {
            // Attached nowhere: resync it in the background here.
            None if !started => {
                started = true;
                let _: bool = client.post("/v1/volume/resync", &NameArgs { name: name.clone() })?;
                continue;
            }
            None => {
                bar.abandon();
                bail!(
                    "volume {name}: the background resync on node {} ended with replicas behind ({}); a replica whose node is down is resynced when it is back and the volume is attached or resynced again",
                    v.node,
                    replica_states(&v)
                );
            }
            // Its mirror knows the bytes; here only the states are known.
            Some(on) if on != v.node => {
                bar.set_message(format!(
                    "resync {name}: {behind} replica(s) behind (bytes show on {on})"
                ));
            }
            Some(_) if yielding => bar.set_message(format!(
                "resync {name} (slowed for the volume's IO, --resync-busy-rate)"
            )),
            Some(_) => bar.set_message(format!("resync {name}")),
        }
        bar.set_length(total);
        bar.set_position(done);
        if Instant::now() >= deadline {
            bar.abandon();
            bail!(
                "volume {name} on node {}: replicas not in sync after {timeout} s ({}); a replica that is down resyncs when its node is back",
                v.node,
                replica_states(&v)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

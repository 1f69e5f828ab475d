//! The cluster side of the CLI: `node ls/cordon/uncordon/evacuate/rm`,
//! `volume resync` (a progress bar until every replica is in sync) and
//! `replica add/rm/accept/checksum`.

use crate::cluster::Member;
use crate::control::client::Client;
use crate::control::{AcceptArgs, NameArgs, NodeArgs, ReplicaArgs};
use crate::registry::VolumeInfo;
use crate::replication::ReplicaState;
use crate::spec::human_bytes;
use anyhow::{bail, Result};
use clap::Subcommand;
use comfy_table::{presets::NOTHING, Table};
use std::path::Path;
use std::time::{Duration, Instant};

#[derive(Debug, Subcommand)]
pub enum NodeCmd {
    /// List the cluster's nodes, whether they are up (their etcd lease is
    /// alive) and whether they are cordoned.
    Ls {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Stop placing new replicas on a node (new volumes, `replica add`);
    /// the replicas it holds stay and keep serving. LINSTOR's
    /// AutoplaceTarget=false, Kubernetes' cordon.
    Cordon {
        /// The node.
        node: String,
    },
    /// Let a cordoned node take new replicas again.
    Uncordon {
        /// The node.
        node: String,
    },
    /// Move every replica off a node, e.g. before taking it out of
    /// service (LINSTOR's `node evacuate`, Portworx's decommission): the
    /// node is cordoned, then for each volume with a replica there a new
    /// replica is added where placement puts it, resynced (with a progress
    /// bar; the volume stays in use), and the node's replica removed. The
    /// node may be down if each volume has an in-sync replica elsewhere.
    /// After a failure, run it again: it goes on where it stopped.
    Evacuate {
        /// The node to empty.
        node: String,
        /// Give up waiting for one volume's resync after this many seconds.
        #[arg(long, default_value_t = 3600)]
        timeout: u64,
    },
    /// Forget a node gone for good: it leaves `node ls`. Refused while it
    /// is up or holds replicas (`node evacuate` moves them). A node
    /// forgotten that starts again joins again.
    Rm {
        /// The node.
        node: String,
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
    let client = Client::new(run_dir);
    let json = match cmd {
        NodeCmd::Ls { json } => json,
        NodeCmd::Cordon { node } => {
            cordon(&client, &node, true)?;
            println!("node {node} cordoned: no new replica goes there; the ones it holds stay");
            return Ok(());
        }
        NodeCmd::Uncordon { node } => {
            cordon(&client, &node, false)?;
            println!("node {node} takes new replicas again");
            return Ok(());
        }
        NodeCmd::Evacuate { node, timeout } => return evacuate(run_dir, &node, timeout),
        NodeCmd::Rm { node } => {
            let args = NodeArgs {
                node: node.clone(),
                cordoned: false,
            };
            let () = client.post("/v1/node/rm", &args)?;
            println!("node {node} forgotten");
            return Ok(());
        }
    };
    let members: Vec<Member> = client.post("/v1/node/list", &())?;
    if json {
        println!("{}", serde_json::to_string_pretty(&members)?);
        return Ok(());
    }
    let mut t = Table::new();
    t.load_preset(NOTHING);
    t.set_header(["NODE", "ZONE", "ADDRESS", "STATE", "SIZE", "FREE", "SINCE"]);
    for m in &members {
        t.add_row([
            m.name.clone(),
            m.zone.clone().unwrap_or_else(|| "-".into()),
            m.addr.to_string(),
            match (m.up, m.cordoned) {
                (true, false) => "up",
                (true, true) => "up, cordoned",
                (false, false) => "down",
                (false, true) => "down, cordoned",
            }
            .to_string(),
            m.capacity
                .map_or("-".to_string(), |c| human_bytes(c.total_bytes)),
            m.capacity.map_or("-".to_string(), |c| {
                format!(
                    "{} ({}%)",
                    human_bytes(c.free_bytes),
                    c.free_bytes * 100 / c.total_bytes.max(1)
                )
            }),
            m.started_at.format("%Y-%m-%d %H:%M:%S UTC").to_string(),
        ]);
    }
    println!("{t}");
    Ok(())
}

fn cordon(client: &Client, node: &str, cordoned: bool) -> Result<()> {
    let args = NodeArgs {
        node: node.to_string(),
        cordoned,
    };
    let () = client.post("/v1/node/cordon", &args)?;
    Ok(())
}

/// See [`NodeCmd::Evacuate`].
fn evacuate(run_dir: &Path, node: &str, timeout: u64) -> Result<()> {
    let client = Client::new(run_dir);
    cordon(&client, node, true)?;
    println!("node {node} cordoned: no new replica goes there");
    let vols: Vec<VolumeInfo> = client.post("/v1/volume/list", &())?;
    let holding: Vec<&VolumeInfo> = vols
        .iter()
        .filter(|v| {
            v.cluster
                .as_ref()
                .is_some_and(|c| c.replicas.iter().any(|r| r.node == node))
        })
        .collect();
    let mut moved: Vec<&str> = Vec::new();
    for v in holding {
        let name = &v.name;
        if let Err(e) = move_replica(run_dir, &client, v, node, timeout) {
            bail!(
                "evacuating node {node}: volume {name}: {e:#}; moved so far: {}; once that is fixed, run `dunnage node evacuate {node}` again: it goes on from there",
                if moved.is_empty() { "none".to_string() } else { moved.join(", ") }
            );
        }
        moved.push(name);
    }
    println!(
        "node {node} holds no replicas ({} moved); it stays cordoned (`dunnage node uncordon {node}` lifts it); once it is shut down for good, `dunnage node rm {node}` forgets it",
        moved.len()
    );
    Ok(())
}

/// Move `v`'s replica off `node`: add one where placement puts it (unless
/// an earlier run's is still resyncing), wait for it, remove `node`'s.
fn move_replica(
    run_dir: &Path,
    client: &Client,
    v: &VolumeInfo,
    node: &str,
    timeout: u64,
) -> Result<()> {
    let name = &v.name;
    let resyncing = v.cluster.as_ref().is_some_and(|c| {
        c.replicas
            .iter()
            .any(|r| r.node != node && r.state != ReplicaState::InSync)
    });
    if !resyncing {
        let args = ReplicaArgs {
            name: name.clone(),
            add: true,
            node: None,
        };
        let added: String = client.post("/v1/replica/change", &args)?;
        println!("{name}: replica added on {added}");
    }
    wait_in_sync(run_dir, name.clone(), timeout, Some(node))?;
    let args = ReplicaArgs {
        name: name.clone(),
        add: false,
        node: Some(node.to_string()),
    };
    let _: String = client.post("/v1/replica/change", &args)?;
    println!("{name}: replica on {node} removed");
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

/// Bytes resynced and to resync over all replicas, the replicas behind
/// (but the one on `except`), and whether a resync yields to the volume's
/// IO, from inspect.
fn resync_left(v: &VolumeInfo, except: Option<&str>) -> Result<(u64, u64, usize, bool)> {
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
        if r.state != ReplicaState::InSync && except != Some(r.node.as_str()) {
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
    wait_in_sync(run_dir, name, timeout, None)
}

/// [`resync`], not waiting for the replica on `except` (one that is being
/// moved off its node, which may be down).
fn wait_in_sync(run_dir: &Path, name: String, timeout: u64, except: Option<&str>) -> Result<()> {
    let client = Client::new(run_dir);
    let deadline = Instant::now() + Duration::from_secs(timeout);
    let bar = super::bytes_bar(format!("resync {name}"), Some(0));
    let mut started = false;
    loop {
        let v: VolumeInfo = client.post("/v1/volume/inspect", &NameArgs { name: name.clone() })?;
        let (done, total, behind, yielding) = resync_left(&v, except)?;
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

/// `dunnage volume verify`: start the comparison, and with `wait` follow
/// it (where it runs here) to its end.
pub fn verify(run_dir: &Path, name: String, wait: bool, timeout: u64) -> Result<()> {
    let client = Client::new(run_dir);
    let on: String = client.post("/v1/volume/verify", &NameArgs { name: name.clone() })?;
    let v: VolumeInfo = client.post("/v1/volume/inspect", &NameArgs { name: name.clone() })?;
    if !wait {
        println!("{name}: comparing its replicas on node {on}; `dunnage volume inspect {name}` there shows the progress");
        return Ok(());
    }
    if on != v.node {
        println!("{name}: comparing its replicas on node {on}; run `dunnage volume verify {name} --wait` or `volume inspect` there to follow it");
        return Ok(());
    }
    let deadline = Instant::now() + Duration::from_secs(timeout);
    let bar = super::bytes_bar(format!("verify {name}"), Some(0));
    loop {
        let v: VolumeInfo = client.post("/v1/volume/inspect", &NameArgs { name: name.clone() })?;
        let Some(p) = v.cluster.as_ref().and_then(|c| c.verification) else {
            bar.abandon();
            bail!("volume {name} on node {}: the comparison stopped before it finished (the volume was detached, or attached elsewhere); run it again", v.node);
        };
        bar.set_length(p.total_bytes);
        bar.set_position(p.done_bytes);
        if p.finished {
            bar.finish_and_clear();
            println!(
                "{name}: compared {} on node {on}; {}",
                indicatif::HumanBytes(p.done_bytes),
                match p.repaired_bytes {
                    0 => "every replica held the same data".to_string(),
                    n => format!("{} differed and were repaired from the replica reads come from (the log names the replicas)", indicatif::HumanBytes(n)),
                }
            );
            return Ok(());
        }
        if Instant::now() >= deadline {
            bar.abandon();
            bail!("volume {name} on node {}: the comparison is not done after {timeout} s; it goes on in the background", v.node);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

//! The operator's CLI: `dunnage volume ...`, `attach`, `detach`. Tables for
//! people, `--json` for scripts; errors go to stderr with a non-zero exit.

pub mod cluster;
pub mod debug;
pub mod status;
mod transfer;

use crate::control::client::Client;
use crate::control::{CreateArgs, NameArgs, SnapshotArgs};
use crate::registry::VolumeInfo;
use crate::spec::human_bytes;
use crate::volume::snapshots::SnapshotEntry;
use anyhow::{bail, Result};
use clap::Subcommand;
use comfy_table::{presets::NOTHING, Table};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Subcommand)]
pub enum VolumeCmd {
    /// Create a volume (a no-op if it exists).
    Create {
        /// Volume name: letters, digits, '_', '.', '-'; `name@size` sets the size.
        name: String,
        /// Option as key=value, repeatable: size, fs, fsopts, block_size,
        /// sticky, label, repl, nodes, ... (README: volume options).
        #[arg(short = 'o', long = "opt", value_name = "KEY=VALUE")]
        opts: Vec<String>,
        /// Print the new volume as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List volumes as a table.
    Ls {
        /// Print JSON (an array of the objects `inspect` prints).
        #[arg(long)]
        json: bool,
        /// Only volumes with this label: `key=value`, or `key` for any value. Repeatable.
        #[arg(long, value_name = "KEY[=VALUE]")]
        label: Vec<String>,
    },
    /// Show one volume as JSON.
    Inspect {
        /// The volume's name.
        name: String,
    },
    /// Delete a volume and its data (refused while in use or sticky).
    Rm {
        /// The volume's name.
        name: String,
    },
    /// Give the key of an encrypted volume created with its own
    /// `secret_key`: after a daemon restart such a volume is locked until
    /// then. The key is read from standard input (or --key-file), never
    /// from the command line, where `ps` would show it.
    Unlock {
        /// The volume's name.
        name: String,
        /// Read the key from this file instead of standard input.
        #[arg(long)]
        key_file: Option<PathBuf>,
    },
    /// Put a volume back as it was at one of its snapshots (not while it is
    /// mounted or attached). Its later writes are lost; the snapshot stays.
    Restore {
        /// The volume's name.
        name: String,
        /// The snapshot to go back to (`dunnage snapshot ls NAME`).
        snapshot: String,
    },
    /// Wait until every replica of a volume is in sync, showing the
    /// resync's progress (cluster mode; bytes on the node doing the resync,
    /// replica states elsewhere). A volume attached nowhere is resynced in
    /// the background on this node, until an attach needs it.
    Resync {
        /// The volume's name.
        name: String,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 3600)]
        timeout: u64,
    },
    /// Grow a volume to SIZE (`20G`, `512M`, `1T`; never shrinks), also
    /// while mounted or attached (its filesystem online where it can, else
    /// at the next mount), from any node of a cluster. Every replica
    /// follows; one that is away grows when it comes back. In use, a
    /// replicated volume needs every replica in sync; a ublk device grows
    /// only while detached. The same as `volume update NAME -o size=SIZE`.
    Resize {
        /// The volume's name.
        name: String,
        /// The new size: `20G`, `512M`, `1T` (binary units; a bare number is GiB).
        size: String,
        /// Print the volume as JSON (as `volume inspect`) instead.
        #[arg(long)]
        json: bool,
    },
    /// Change a volume's size (grow only), sticky flag, labels,
    /// passthrough or IO caps.
    Update {
        /// The volume's name.
        name: String,
        /// `size=20G`, `sticky=true|false`, `label=k=v,k2=v2`,
        /// `passthrough=true|false`, `max_iops=N` or `max_bandwidth=100M`
        /// (`0` or `none` lifts a cap).
        #[arg(short = 'o', long = "opt", value_name = "KEY=VALUE", required = true)]
        opts: Vec<String>,
    },
    /// Compare a replicated volume's replicas over the whole device, by
    /// digest, and copy each chunk that differs from the replica reads
    /// come from (DRBD's online verify). It runs in the background on the
    /// attached node (asked from any node), or here if the volume is
    /// attached nowhere, while the volume stays usable; `volume inspect`
    /// shows its progress (`cluster.verification`).
    Verify {
        /// The volume's name.
        name: String,
        /// Wait until it is done, with a progress bar (on the node where
        /// it runs).
        #[arg(long)]
        wait: bool,
        /// Give up waiting after this many seconds.
        #[arg(long, default_value_t = 3600)]
        timeout: u64,
    },
    /// Read a stream from `dunnage snapshot export` (RBD's import and
    /// import-diff). A whole snapshot's stream makes volume NAME (it must
    /// not exist; its size and filesystem come from the stream, other
    /// options from -o). A stream of changes since snapshot S goes into
    /// NAME, which must be detached and hold its own snapshot S (the one a
    /// previous import took). Either way the import ends by taking the
    /// stream's snapshot on NAME, so that the next changes apply.
    Import {
        /// The volume to make, or to bring forward by a stream of changes.
        name: String,
        /// Read the stream from this file [default: stdin].
        #[arg(short, long, value_name = "FILE")]
        input: Option<PathBuf>,
        /// Option of a new volume as key=value, repeatable (repl, secure,
        /// label, ...; not size, fs or parent).
        #[arg(short = 'o', long = "opt", value_name = "KEY=VALUE")]
        opts: Vec<String>,
    },
}

/// A progress display in bytes on stderr: a bar towards `total`, or a
/// spinner where the total is not known.
fn bytes_bar(msg: String, total: Option<u64>) -> indicatif::ProgressBar {
    use indicatif::{ProgressBar, ProgressStyle};
    let bar = match total {
        Some(t) => ProgressBar::new(t).with_style(
            ProgressStyle::with_template(
                "{msg} [{bar:40}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta})",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        ),
        None => ProgressBar::new_spinner().with_style(
            ProgressStyle::with_template("{spinner} {msg} {bytes} ({bytes_per_sec})")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        ),
    };
    bar.set_message(msg);
    bar
}

fn parse_opts(opts: &[String]) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for o in opts {
        let Some((k, v)) = o.split_once('=') else {
            bail!("option {o:?} is not KEY=VALUE (for example -o size=10G)");
        };
        if let Some(first) = out.insert(k.to_string(), v.to_string()) {
            bail!("option {k} is given twice ({k}={first}, {o}): give it once (labels: -o label=a=1,b=2)");
        }
    }
    Ok(out)
}

#[derive(Debug, Subcommand)]
pub enum SnapshotCmd {
    /// Take a snapshot (metadata only, no data copied). It holds every write
    /// completed before it and none after, also while the volume is in use.
    Create {
        /// The volume to snapshot.
        volume: String,
        /// Snapshot name [default: snap-<UTC time>].
        name: Option<String>,
        /// Print the snapshot as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Take one snapshot named NAME of each volume at one instant, as if of
    /// one disk (a database's data and log volumes): every write completed
    /// before it is in the snapshots, none started after. The volumes' IO
    /// pauses for that instant. All or nothing.
    Group {
        /// The snapshot's name, the same on every volume.
        name: String,
        /// The volumes; with --label, those too.
        volumes: Vec<String>,
        /// Also every volume with this label: `key=value`, or `key` for any
        /// value. Repeatable.
        #[arg(long)]
        label: Vec<String>,
        /// Print the snapshots as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List a volume's snapshots as a table.
    Ls {
        /// The volume whose snapshots to list.
        volume: String,
        /// Print JSON instead.
        #[arg(long)]
        json: bool,
    },
    /// Delete a snapshot, freeing the space only it holds.
    Rm {
        /// The volume the snapshot belongs to.
        volume: String,
        /// The snapshot's name.
        name: String,
    },
    /// Write a snapshot's contents as a stream (RBD's export and
    /// export-diff): every block it holds, or with --since only those that
    /// changed after an older snapshot (and those discarded). Import it with
    /// `dunnage volume import`, here or on another machine:
    /// `dunnage snapshot export pg s2 --since s1 | ssh b dunnage volume import pg`.
    /// The volume may be in use. An encrypted volume's stream is its
    /// plaintext. In a cluster, run it on a node holding a replica.
    Export {
        /// The volume.
        volume: String,
        /// The snapshot of it to write.
        snapshot: String,
        /// Only the changes since this older snapshot of the volume.
        #[arg(long, value_name = "SNAPSHOT")]
        since: Option<String>,
        /// Write the stream to this file [default: stdout, which must not
        /// be a terminal].
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
    },
}

pub fn snapshot(run_dir: &Path, cmd: SnapshotCmd) -> Result<()> {
    let client = Client::new(run_dir);
    match cmd {
        SnapshotCmd::Export {
            volume,
            snapshot,
            since,
            output,
        } => transfer::export(run_dir, volume, snapshot, since, output)?,
        SnapshotCmd::Create { volume, name, json } => {
            let s: SnapshotEntry =
                client.post("/v1/snapshot/create", &SnapshotArgs { volume, name })?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                println!("{}", s.name);
            }
        }
        SnapshotCmd::Group {
            name,
            mut volumes,
            label,
            json,
        } => {
            if !label.is_empty() {
                let vols: Vec<VolumeInfo> = client.post("/v1/volume/list", &())?;
                volumes.extend(
                    vols.into_iter()
                        .filter(|v| {
                            label.iter().all(|l| match l.split_once('=') {
                                Some((k, val)) => v.has_label(k, Some(val)),
                                None => v.has_label(l, None),
                            })
                        })
                        .map(|v| v.name),
                );
            }
            if volumes.is_empty() {
                anyhow::bail!(
                    "no volume to snapshot: name them, or give a --label that some volume has"
                );
            }
            let args = crate::control::GroupArgs { volumes, name };
            let taken: Vec<SnapshotEntry> = client.post("/v1/snapshot/group", &args)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&taken)?);
            } else {
                for s in &taken {
                    println!("{} {}", s.volume, s.name);
                }
            }
        }
        SnapshotCmd::Ls { volume, json } => {
            let list: Vec<SnapshotEntry> =
                client.post("/v1/snapshot/list", &SnapshotArgs { volume, name: None })?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                let mut t = Table::new();
                t.load_preset(NOTHING);
                // Snapshots of a cluster volume say which replicas hold them.
                let cluster = list.iter().any(|s| !s.nodes.is_empty());
                let mut header = vec!["NAME", "CREATED", "EXCLUSIVE", "REFERENCED", "CLONES"];
                if cluster {
                    header.push("NODES");
                }
                t.set_header(header);
                for s in &list {
                    let mut row = vec![
                        s.name.clone(),
                        s.created_at.format("%Y-%m-%d %H:%M:%S UTC").to_string(),
                        human_bytes(s.exclusive_bytes),
                        human_bytes(s.referenced_bytes),
                        s.clones.len().to_string(),
                    ];
                    if cluster {
                        row.push(s.nodes.join(","));
                    }
                    t.add_row(row);
                }
                println!("{t}");
            }
        }
        SnapshotCmd::Rm { volume, name } => {
            let () = client.post(
                "/v1/snapshot/remove",
                &SnapshotArgs {
                    volume,
                    name: Some(name.clone()),
                },
            )?;
            println!("{name}");
        }
    }
    Ok(())
}

fn table(vols: &[VolumeInfo]) -> String {
    let mut t = Table::new();
    t.load_preset(NOTHING);
    let clustered = vols.iter().any(|v| v.cluster.is_some());
    let mut header = vec![
        "NAME",
        "SIZE",
        "FS",
        "STATE",
        "DEVICE",
        "ALLOCATED",
        "MOUNTS",
        "LABELS",
    ];
    if clustered {
        header.extend(["ATTACHED", "REPLICAS"]);
    }
    t.set_header(header);
    for v in vols {
        let labels: Vec<String> = v.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let mut row = vec![
            v.name.clone(),
            human_bytes(v.size_bytes),
            v.fs.clone(),
            v.state.clone(),
            match (&v.device, &v.served_by) {
                (Some(d), _) => d.display().to_string(),
                // A shared volume's client: its files come from the holder.
                (None, Some(holder)) => format!("via {holder}"),
                (None, None) => "-".into(),
            },
            human_bytes(v.allocated_bytes),
            v.mounts.to_string(),
            if labels.is_empty() {
                "-".into()
            } else {
                labels.join(",")
            },
        ];
        if clustered {
            let (attached, replicas) = cluster_columns(v.cluster.as_ref());
            row.extend([attached, replicas]);
        }
        t.add_row(row);
    }
    t.to_string()
}

/// `volume ls`'s ATTACHED and REPLICAS: the node holding the attach (or
/// resyncing the volume), and each replica's node, with its state unless
/// it is in sync (`n1 n2(outdated)`), and how far its resync is where the
/// node answering knows (`n2(resyncing 42%, yielding)`: slowed for the
/// volume's IO).
fn cluster_columns(view: Option<&crate::volume::replicated::ClusterView>) -> (String, String) {
    let Some(view) = view else {
        return ("?".into(), "?".into());
    };
    let attached = match (&view.attached_on, &view.resync_on) {
        (Some(n), _) => n.clone(),
        (None, Some(n)) => format!("- (resync on {n})"),
        (None, None) => "-".into(),
    };
    let replicas: Vec<String> = view
        .replicas
        .iter()
        .map(|r| {
            let replaces = r
                .replaces
                .as_ref()
                .map(|old| format!(", replaces {old}"))
                .unwrap_or_default();
            match r.state {
                crate::replication::ReplicaState::InSync => r.node.clone(),
                state => match &r.resync {
                    Some(p) if p.total_bytes > 0 => format!(
                        "{}({state} {}%{}{replaces})",
                        r.node,
                        p.done_bytes.min(p.total_bytes) * 100 / p.total_bytes,
                        if p.yielding { ", yielding" } else { "" }
                    ),
                    _ => format!("{}({state}{replaces})", r.node),
                },
            }
        })
        .collect();
    (attached, replicas.join(" "))
}

pub fn volume(run_dir: &Path, cmd: VolumeCmd) -> Result<()> {
    let client = Client::new(run_dir);
    match cmd {
        VolumeCmd::Create { name, opts, json } => {
            let args = CreateArgs {
                name,
                opts: parse_opts(&opts)?,
            };
            let v: VolumeInfo = client.post("/v1/volume/create", &args)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("{}", v.name);
            }
        }
        VolumeCmd::Ls { json, label } => {
            let mut vols: Vec<VolumeInfo> = client.post("/v1/volume/list", &())?;
            for l in &label {
                let (k, v) = match l.split_once('=') {
                    Some((k, v)) => (k, Some(v)),
                    None => (l.as_str(), None),
                };
                vols.retain(|vol| vol.has_label(k, v));
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&vols)?);
            } else {
                println!("{}", table(&vols));
            }
        }
        VolumeCmd::Inspect { name } => {
            let v: VolumeInfo = client.post("/v1/volume/inspect", &NameArgs { name })?;
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        VolumeCmd::Rm { name } => {
            let () = client.post("/v1/volume/remove", &NameArgs { name: name.clone() })?;
            println!("{name}");
        }
        VolumeCmd::Unlock { name, key_file } => {
            let mut key = match key_file {
                Some(f) => std::fs::read_to_string(&f)
                    .map_err(|e| anyhow::anyhow!("read {}: {e}", f.display()))?,
                None => std::io::read_to_string(std::io::stdin())?,
            };
            while key.ends_with('\n') || key.ends_with('\r') {
                key.pop();
            }
            if key.is_empty() {
                bail!("no key given: pipe it to standard input or use --key-file");
            }
            let args = crate::control::UnlockArgs {
                name: name.clone(),
                secret: key,
            };
            let () = client.post("/v1/volume/unlock", &args)?;
            println!("{name}");
        }
        VolumeCmd::Restore { name, snapshot } => {
            let args = SnapshotArgs {
                volume: name.clone(),
                name: Some(snapshot),
            };
            let () = client.post("/v1/volume/restore", &args)?;
            println!("{name}");
        }
        VolumeCmd::Resync { name, timeout } => cluster::resync(run_dir, name, timeout)?,
        VolumeCmd::Verify {
            name,
            wait,
            timeout,
        } => cluster::verify(run_dir, name, wait, timeout)?,
        VolumeCmd::Import { name, input, opts } => {
            transfer::import(run_dir, name, input, parse_opts(&opts)?)?
        }
        VolumeCmd::Resize { name, size, json } => {
            let args = CreateArgs {
                name,
                opts: [("size".to_string(), size)].into(),
            };
            let v: VolumeInfo = client.post("/v1/volume/update", &args)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else if v.fs_grows_at_next_mount {
                println!(
                    "{}: {}; its {} filesystem grows at its next mount",
                    v.name,
                    human_bytes(v.size_bytes),
                    v.fs
                );
            } else if v.state == "mounted" {
                println!(
                    "{}: {}; its {} filesystem grew",
                    v.name,
                    human_bytes(v.size_bytes),
                    v.fs
                );
            } else {
                println!("{}: {}", v.name, human_bytes(v.size_bytes));
            }
        }
        VolumeCmd::Update { name, opts } => {
            let args = CreateArgs {
                name,
                opts: parse_opts(&opts)?,
            };
            let v: VolumeInfo = client.post("/v1/volume/update", &args)?;
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
    }
    Ok(())
}

#[derive(serde::Deserialize)]
struct Device {
    device: PathBuf,
}

/// Attach for direct block use; prints the device path and nothing else.
pub fn attach(run_dir: &Path, name: String) -> Result<()> {
    let d: Device = Client::new(run_dir).post("/v1/volume/attach", &NameArgs { name })?;
    println!("{}", d.device.display());
    Ok(())
}

pub fn detach(run_dir: &Path, name: String) -> Result<()> {
    let () = Client::new(run_dir).post("/v1/volume/detach", &NameArgs { name })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::ReplicaState;
    use crate::volume::replicated::{ClusterView, ReplicaView};

    fn replica(node: &str, state: ReplicaState) -> ReplicaView {
        ReplicaView::recorded(node, state)
    }

    #[test]
    fn cluster_columns_name_the_holder_and_the_replicas_not_in_sync() {
        let mut view = ClusterView {
            attached_on: Some("n1".into()),
            generation: Some(7),
            resync_on: None,
            replicas: vec![
                replica("n1", ReplicaState::InSync),
                replica("n2", ReplicaState::Resyncing),
                replica("n3", ReplicaState::Outdated),
            ],
            verification: None,
        };
        assert_eq!(
            cluster_columns(Some(&view)),
            ("n1".into(), "n1 n2(resyncing) n3(outdated)".into())
        );
        // The attached node knows how far a resync is.
        view.replicas[1].resync = Some(crate::replication::ResyncProgress {
            done_bytes: 42 << 20,
            total_bytes: 100 << 20,
            yielding: true,
        });
        assert_eq!(
            cluster_columns(Some(&view)).1,
            "n1 n2(resyncing 42%, yielding) n3(outdated)"
        );
        view.replicas[1].resync = Some(crate::replication::ResyncProgress {
            done_bytes: 0,
            total_bytes: 0,
            yielding: false,
        });
        assert_eq!(
            cluster_columns(Some(&view)).1,
            "n1 n2(resyncing) n3(outdated)",
            "nothing to say of an empty resync"
        );
        view.replicas[2].replaces = Some("n4".into());
        assert_eq!(
            cluster_columns(Some(&view)).1,
            "n1 n2(resyncing) n3(outdated, replaces n4)"
        );
        view.attached_on = None;
        view.resync_on = Some("n2".into());
        assert_eq!(cluster_columns(Some(&view)).0, "- (resync on n2)");
        view.resync_on = None;
        assert_eq!(cluster_columns(Some(&view)).0, "-");
        // etcd did not answer for it.
        assert_eq!(cluster_columns(None), ("?".into(), "?".into()));
    }
}

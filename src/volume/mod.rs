//! Stage 3: one actor per volume. It owns that volume's engine and export and
//! serialises everything that changes them (mount, unmount, attach, detach,
//! remove), so two Docker requests for one volume can never interleave.
//!
//! It runs on its own thread (a `SyncArbiter` of one) because its work blocks:
//! mkfs, mount(2), loop ioctls, FUSE session setup. IO never passes through
//! it: the export's threads call the engine directly.

pub mod backup;
pub mod forward;
pub mod handover;
pub mod mounting;
pub mod replicas;
pub mod replicated;
pub mod resize;
pub mod sharing;
pub mod snapshots;
pub mod usage;

use crate::catalog::{CatalogError, VolumeRecord};
use crate::config::Node;
use crate::engine::priority::PriorityEngine;
use crate::engine::{BlockEngine, CryptEngine, EngineError, ThinImage};
use crate::export::{Export, ExportError};
use crate::spec::{FsType, VolumeSpec};
use actix::prelude::*;
use parking_lot::RwLock;
use serde::Serialize;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use usage::{MountStep, UnmountStep, Usage, UsageError};

/// The names of volume `id`'s clones in `catalog` that `also` accepts.
pub(crate) fn clones_of(
    catalog: &dyn crate::catalog::Catalog,
    id: &str,
    also: impl Fn(&VolumeRecord) -> bool,
) -> Vec<String> {
    catalog
        .list()
        .into_iter()
        .filter(|r| r.clone_of.as_ref().is_some_and(|o| o.volume_id == id) && also(r))
        .map(|r| r.name)
        .collect()
}

/// What a volume is doing on this node, as Get, List and inspect report it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    #[default]
    Detached,
    /// Mounted for Docker containers.
    Mounted,
    /// A raw block device on the host (`dunnage attach`).
    Attached,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Runtime {
    pub state: State,
    pub device: Option<PathBuf>,
    pub mountpoint: Option<PathBuf>,
    pub mounts: u32,
    /// `passthrough` or `engine` while attached.
    pub io_path: Option<&'static str>,
    /// Mounted here as a client of this node, which holds the (shared) volume.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub joined: Option<String>,
    /// Other nodes with a session on this shared volume, held here.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub sharers: Vec<String>,
    /// The device's counters when this attach began: a loop device's
    /// outlive their attach, so metrics report the difference.
    #[serde(skip)]
    pub device_base: Option<crate::control::metrics::DeviceStats>,
}

/// Runtime state of every volume by id, written by volume actors and read by
/// the registry, so that Get never waits behind a slow mkfs.
pub type RuntimeTable = Arc<RwLock<HashMap<String, Runtime>>>;

#[derive(Debug, thiserror::Error)]
#[error("volume {volume} on node {node}: {kind}")]
pub struct VolumeError {
    pub volume: String,
    pub node: String,
    pub kind: VolumeErrorKind,
}

#[derive(Debug, thiserror::Error)]
pub enum VolumeErrorKind {
    #[error(transparent)]
    InUse(#[from] UsageError),
    #[error("it is sticky and cannot be removed; clear the flag first: dunnage volume update {0} -o sticky=false")]
    Sticky(String),
    #[error("it was removed")]
    Removed,
    #[error("it has no filesystem (fs=none): use it as a raw device with `dunnage attach {0}`")]
    NoFilesystem(String),
    #[error("{device} is still in use on the host (mounted or open); unmount or close it, then detach again")]
    DeviceBusy { device: String },
    #[error("it already holds a {found} filesystem, not {want}; it was formatted outside dunnage")]
    ForeignFilesystem { found: String, want: String },
    #[error("formatting failed: {0}")]
    Mkfs(String),
    #[error("{0}")]
    Mount(String),
    #[error("it is encrypted with its own key, which this daemon does not hold (it was restarted): run `dunnage volume unlock {0}` and give the key")]
    Locked(String),
    #[error("it is encrypted with the cluster's key, and this node was started without --secret-file: start it with the same --secret-file as the other nodes")]
    NoClusterKey,
    #[error("it is encrypted with the cluster's key (every node's --secret-file): it has no key of its own to unlock")]
    ClusterKeyed,
    #[error("it is encrypted with the cluster's key, and this node's --secret-file holds another key: every node needs the same --secret-file")]
    WrongClusterKey,
    #[error("it is not encrypted: there is nothing to unlock")]
    NotEncrypted,
    #[error("it was created with passthrough=true and is attached, so the kernel writes its data file directly and a snapshot could not be consistent; detach it (stop its containers or `dunnage detach {0}`) and try again, or turn passthrough off for its next attach: dunnage volume update {0} -o passthrough=false")]
    Passthrough(String),
    #[error("it has clones ({0}) that share its data: remove them first")]
    HasClones(String),
    #[error("it is in use; a restore replaces its contents: stop its containers or `dunnage detach {0}` first")]
    RestoreInUse(String),
    #[error("it has {have} and cannot shrink to {want}: a filesystem cut short loses data; create a smaller volume and copy the data over")]
    Shrink { have: String, want: String },
    #[error("it is attached through ublk, and a ublk device grows only while detached: stop its containers or `dunnage detach {0}`, resize, then use it again (its filesystem grows at its next mount)")]
    ResizeInUse(String),
    #[error("it is attached, and a replicated volume grows in use only with every replica in sync and reachable; the replica on node {node} is {why}: wait until `dunnage volume inspect` shows it in sync, or detach the volume and resize it then (a replica away grows when it comes back)")]
    GrowNeedsReplicas { node: String, why: String },
    #[error("engine: {0}")]
    Engine(#[from] EngineError),
    #[error("export stream: {0}")]
    Stream(#[from] crate::engine::stream::StreamError),
    /// An export or import refused or cut short; says what to do.
    #[error("{0}")]
    Transfer(String),
    #[error("export: {0}")]
    Export(#[from] ExportError),
    #[error("catalog: {0}")]
    Catalog(#[from] CatalogError),
    // Boxed: they are large, and every reply carries this type.
    #[error("cluster: {0}")]
    Cluster(Box<crate::cluster::ClusterError>),
    #[error("replication: {0}")]
    Replication(Box<crate::replication::ReplicationError>),
    #[error("{0} is not available for volumes in a cluster yet")]
    NotInCluster(&'static str),
    #[error("it is attached on node {0}, whose daemon takes and deletes its snapshots: run this command on {0}, or detach the volume first")]
    SnapshotsOnHolder(String),
    #[error("it is attached on node {0}, whose daemon changes its replicas while it is in use: run this command on {0}, or detach the volume first")]
    ReplicasOnHolder(String),
    #[error("{0}")]
    ReplicaChange(String),
    /// A group snapshot could not pause this volume, or was called off.
    #[error("group snapshot: {0}")]
    Group(String),
    /// Forwarded to the node holding the attach, which refused.
    #[error("asked node {node}, where it is attached: {message}")]
    OnHolder {
        node: String,
        code: crate::replication::wire::ErrorCode,
        message: String,
    },
    #[error("another node attached it while this node's daemon was down, so the filesystem this node still had mounted on it is stale")]
    AttachedSince,
    #[error("it is not shared: only a volume created with shared=true is mounted on several nodes at once")]
    NotShared(String),
    #[error(
        "it is not mounted on this node (it may have just been unmounted here): mount it again"
    )]
    NotMountedHere,
    #[error("{0} needs a cluster: start dunnage serve with --node, --listen and --etcd")]
    NotClustered(&'static str),
    #[error("this node holds no replica of it (its replicas are on {0})")]
    NoLocalReplica(String),
}

/// What an attached volume's IO lands on.
enum Backing {
    /// A single node's image.
    Image(Arc<ThinImage>),
    /// Replicas on this and other nodes (cluster mode), under an attach
    /// generation this node holds.
    Mirror {
        mirror: Arc<crate::replication::Mirror>,
        generation: crate::replication::Generation,
    },
}

impl Backing {
    fn flush(&self) -> Result<(), EngineError> {
        match self {
            Backing::Image(i) => i.flush(),
            Backing::Mirror { mirror, .. } => mirror.flush(),
        }
    }
}

impl From<crate::cluster::ClusterError> for VolumeErrorKind {
    fn from(e: crate::cluster::ClusterError) -> Self {
        VolumeErrorKind::Cluster(Box::new(e))
    }
}

impl From<crate::replication::ReplicationError> for VolumeErrorKind {
    fn from(e: crate::replication::ReplicationError) -> Self {
        VolumeErrorKind::Replication(Box::new(e))
    }
}

struct Attached {
    engine: Backing,
    export: Export,
    /// Where the filesystem is mounted, when mounted for Docker.
    fs_mount: Option<PathBuf>,
    data_path: Option<PathBuf>,
}

pub struct VolumeActor {
    node: Arc<Node>,
    name: String,
    id: String,
    usage: Usage,
    attached: Option<Attached>,
    runtime: RuntimeTable,
    removed: bool,
    /// Attached as last told to the snapshot scheduler.
    told_attached: bool,
    /// Running a request another node forwarded: never forward it again.
    forwarded: bool,
    /// The image an export thread holds open (a single node's): whatever
    /// opens the image meanwhile shares it (see `backup`).
    exporting: std::sync::Weak<ThinImage>,
    /// Mounted as a client of the node holding this shared volume.
    joined: Option<sharing::Joined>,
    /// Other nodes' sessions on this shared volume, held here.
    sessions: HashMap<u64, sharing::Session>,
}

impl VolumeActor {
    pub fn new(node: Arc<Node>, record: &VolumeRecord, runtime: RuntimeTable) -> Self {
        VolumeActor {
            node,
            name: record.name.clone(),
            id: record.id.clone(),
            usage: Usage::default(),
            attached: None,
            runtime,
            removed: false,
            told_attached: false,
            forwarded: false,
            exporting: std::sync::Weak::new(),
            joined: None,
            sessions: HashMap::new(),
        }
    }

    fn err(&self, kind: impl Into<VolumeErrorKind>) -> VolumeError {
        VolumeError {
            volume: self.name.clone(),
            node: self.node.name.clone(),
            kind: kind.into(),
        }
    }

    fn record(&self) -> Result<VolumeRecord, VolumeError> {
        match self.node.catalog.get(&self.name) {
            Some(r) if r.id == self.id && !self.removed => Ok(r),
            _ => Err(self.err(VolumeErrorKind::Removed)),
        }
    }

    fn publish(&mut self) {
        let attached = self.attached.is_some();
        if attached != self.told_attached {
            self.told_attached = attached;
            // In a cluster the volume may have been created on another
            // node: its schedule comes from the catalog, here at attach.
            if let (true, Some(_), Ok(r)) = (attached, &self.node.cluster, self.record()) {
                if r.spec.snap.is_some() {
                    self.node
                        .schedule(crate::schedule::actor::ScheduleEvent::Policy {
                            volume: self.name.clone(),
                            policy: r.spec.snap,
                        });
                }
            }
            self.node
                .schedule(crate::schedule::actor::ScheduleEvent::Attached {
                    volume: self.name.clone(),
                    attached,
                });
        }
        match &self.attached {
            Some(a) => {
                let rec = handover::AttachRecord {
                    volume: self.name.clone(),
                    id: self.id.clone(),
                    export: a.export.handover(),
                    fs_mount: a.fs_mount.clone(),
                    data_path: a.data_path.clone(),
                    usage: self.usage.clone(),
                    generation: match &a.engine {
                        Backing::Mirror { generation, .. } => Some(*generation),
                        Backing::Image(_) => None,
                    },
                };
                if let Err(e) = handover::save(&self.node, &rec) {
                    tracing::warn!(volume = %self.name, error = %e, "cannot write the attach record: a daemon crash now would disturb this volume's users");
                }
            }
            None => handover::remove(&self.node, &self.id),
        }
        let mut table = self.runtime.write();
        let rt = match &self.attached {
            None => match &self.joined {
                None => Runtime::default(),
                Some(j) => Runtime {
                    state: State::Mounted,
                    mountpoint: Some(j.mount.mount_point().to_path_buf()),
                    mounts: self.usage.total_mounts(),
                    io_path: Some("shared"),
                    joined: Some(j.holder.clone()),
                    ..Runtime::default()
                },
            },
            Some(a) => {
                let device = a.export.device().to_path_buf();
                let device_base = match table.get(&self.id) {
                    Some(old) if old.device.as_ref() == Some(&device) => old.device_base,
                    _ => crate::control::metrics::DeviceStats::of(&device),
                };
                Runtime {
                    state: if self.usage.host_attached() {
                        State::Attached
                    } else {
                        State::Mounted
                    },
                    device: Some(device),
                    mountpoint: a.data_path.clone(),
                    mounts: self.usage.total_mounts(),
                    io_path: Some(a.export.io_path()),
                    joined: None,
                    sharers: self.usage.sharers(),
                    device_base,
                }
            }
        };
        table.insert(self.id.clone(), rt);
    }

    /// What exports serve: the image (or the replicas' mirror), or the
    /// encryption layer over it (which checks the key before any IO).
    fn served(
        &self,
        backing: &Backing,
        spec: &VolumeSpec,
    ) -> Result<Arc<dyn BlockEngine>, VolumeErrorKind> {
        let base = match backing {
            Backing::Image(image) => self.decrypted(image, spec.secure)?,
            Backing::Mirror { mirror, .. } => self.decrypted_mirror(mirror.clone(), spec.secure)?,
        };
        Ok(Arc::new(PriorityEngine::new(
            base,
            self.node.arbiter.clone(),
            spec.io_priority,
            // Only on request: a volume in passthrough can't be snapshotted
            // or cloned while attached (the kernel writes its data file).
            // Scheduled snapshots are taken while the volume is in use.
            spec.passthrough && spec.snap.is_none(),
            self.node.limiter(&self.id, spec.limits),
        )))
    }

    fn decrypted(
        &self,
        image: &Arc<ThinImage>,
        secure: bool,
    ) -> Result<Arc<dyn BlockEngine>, VolumeErrorKind> {
        if !secure {
            return Ok(image.clone());
        }
        let key = self
            .node
            .keys
            .get(&self.id)
            .ok_or_else(|| VolumeErrorKind::Locked(self.name.clone()))?;
        let dir = self.node.volume_dir(&self.id);
        match CryptEngine::open(image.clone(), &dir, &key) {
            Ok(c) => Ok(Arc::new(c)),
            // The node key is tried when the volume's own is unknown.
            Err(EngineError::WrongKey { .. }) => Err(VolumeErrorKind::Locked(self.name.clone())),
            Err(e) => Err(e.into()),
        }
    }

    /// A cluster volume's mirror, or the encryption layer over it with the
    /// node's key (`--secret-file`) and the parameters in the catalog: the
    /// replicas hold only ciphertext, and only the attached node the key.
    fn decrypted_mirror(
        &self,
        mirror: Arc<crate::replication::Mirror>,
        secure: bool,
    ) -> Result<Arc<dyn BlockEngine>, VolumeErrorKind> {
        if !secure {
            return Ok(mirror);
        }
        let key = self
            .node
            .keys
            .node_key()
            .ok_or(VolumeErrorKind::NoClusterKey)?;
        let record = self.record().map_err(|e| e.kind)?;
        let from = PathBuf::from(format!("the catalog record of volume {}", self.name));
        let Some(params) = record.crypt else {
            return Err(EngineError::BadCryptParams {
                path: from,
                reason: "missing: the volume is marked secure but has no encryption parameters"
                    .into(),
            }
            .into());
        };
        match CryptEngine::over(mirror, *params, &key, &from) {
            Ok(c) => Ok(Arc::new(c)),
            Err(EngineError::WrongKey { .. }) => Err(VolumeErrorKind::WrongClusterKey),
            Err(e) => Err(e.into()),
        }
    }

    /// The image here, or (cluster mode) the attach lease and a mirror
    /// over the volume's replicas.
    fn open_backing(&self, resuming: bool) -> Result<Backing, VolumeErrorKind> {
        match &self.node.cluster {
            Some(c) => {
                let (mirror, generation) = replicated::open_mirror(
                    c,
                    &self.record().map_err(|e| e.kind)?,
                    self.node.catalog.as_ref(),
                )?;
                Ok(Backing::Mirror { mirror, generation })
            }
            None if resuming => Ok(Backing::Image(Arc::new(ThinImage::open_resuming(
                &self.node.volume_dir(&self.id),
            )?))),
            None => {
                if let Some(image) = self.exporting.upgrade() {
                    let record = self.record().map_err(|e| e.kind)?;
                    if image.size() < record.spec.size {
                        return Err(VolumeErrorKind::Transfer(
                            "it grew, and an export of one of its snapshots holds it open at its old size; attach it once the export has ended".into(),
                        ));
                    }
                    return Ok(Backing::Image(image));
                }
                let dir = self.node.volume_dir(&self.id);
                self.grow_image(&dir)?;
                Ok(Backing::Image(Arc::new(ThinImage::open(&dir)?)))
            }
        }
    }

    /// Close the mirror and give the attach lease back.
    fn close_backing(&self, backing: Backing) {
        if let (Backing::Mirror { mirror, generation }, Some(c)) = (backing, &self.node.cluster) {
            replicated::close_mirror(c, &self.id, &self.name, &mirror, generation);
        }
    }

    fn bring_up(&mut self, spec: &VolumeSpec) -> Result<(), VolumeErrorKind> {
        if self.attached.is_some() {
            return Ok(());
        }
        let engine = self.open_backing(false)?;
        let started = self.served(&engine, spec).and_then(|served| {
            Ok(self.node.exporter.start(
                &self.id,
                &self.name,
                served,
                &self.node.fuse_dir(&self.name),
            )?)
        });
        let export = match started {
            Ok(e) => e,
            Err(e) => {
                self.close_backing(engine);
                return Err(e);
            }
        };
        tracing::info!(volume = %self.name, device = %export.device().display(), "attached");
        self.attached = Some(Attached {
            engine,
            export,
            fs_mount: None,
            data_path: None,
        });
        Ok(())
    }

    /// Take back what a crashed daemon left attached, as it was: the
    /// export goes on serving the same device, the filesystem stays
    /// mounted, Docker's mount IDs are remembered.
    fn resume(&mut self, rec: handover::AttachRecord) -> Result<(), VolumeErrorKind> {
        if let (Some(c), Some(held)) = (&self.node.cluster, rec.generation) {
            // Another node attached it meanwhile (and changed it, if only
            // by replaying the journal): a filesystem the kernel here still
            // has mounted is stale, and writing it back would corrupt it.
            // A device nobody holds has no cache left (the kernel drops it
            // at the last close), so it may be taken back.
            let held_here =
                rec.fs_mount.is_some() || crate::sys::loopdev::is_in_use(rec.export.device());
            if held_here && c.cluster.unreleased(&self.id)? != Some(held) {
                return Err(VolumeErrorKind::AttachedSince);
            }
        }
        // The engine stays in passthrough if it was: the kernel kept writing
        // the data file directly while no daemon ran.
        let engine = self.open_backing(true)?;
        let inherited = matches!(&engine, Backing::Image(i) if i.is_passthrough());
        let spec = self.record().map(|r| r.spec).unwrap_or_default();
        let resumed = self.served(&engine, &spec).and_then(|served| {
            Ok(self
                .node
                .exporter
                .resume(&self.id, &self.name, served, &rec.export, inherited)?)
        });
        let export = match resumed {
            Ok(e) => e,
            Err(e) => {
                self.close_backing(engine);
                return Err(e);
            }
        };
        tracing::info!(volume = %self.name, device = %export.device().display(), mounts = rec.usage.total_mounts(), "taken back after a daemon restart");
        self.attached = Some(Attached {
            engine,
            export,
            fs_mount: rec.fs_mount,
            data_path: rec.data_path,
        });
        self.usage = rec.usage;
        Ok(())
    }

    /// Unmount (if mounted), stop the export, flush the engine. On failure the
    /// volume stays attached so the caller can retry.
    fn tear_down(&mut self, force: bool) -> Result<(), VolumeErrorKind> {
        let Some(mut a) = self.attached.take() else {
            return Ok(());
        };
        if let Some(target) = &a.fs_mount {
            if let Err(e) = mounting::unmount(target, force) {
                self.attached = Some(a);
                return Err(VolumeErrorKind::Mount(e));
            }
            a.fs_mount = None;
            a.data_path = None;
        }
        let device = a.export.device().display().to_string();
        let engine = a.engine;
        let stopped = a.export.stop();
        let flushed = engine.flush();
        self.close_backing(engine);
        stopped?;
        flushed?;
        tracing::info!(volume = %self.name, device, "detached");
        Ok(())
    }

    /// Format on first use, then mount for Docker. The device is up.
    fn format_and_mount(&mut self, record: &VolumeRecord) -> Result<PathBuf, VolumeErrorKind> {
        let device = self
            .attached
            .as_ref()
            .expect("brought up")
            .export
            .device()
            .to_path_buf();
        let want = record.spec.fs.to_string();
        match probe_fs(&device) {
            Some(found) if found == want => {
                if !record.formatted {
                    self.mark_formatted()?;
                }
            }
            Some(found) => return Err(VolumeErrorKind::ForeignFilesystem { found, want }),
            None => {
                let started = std::time::Instant::now();
                mounting::mkfs(&device, &record.spec).map_err(VolumeErrorKind::Mkfs)?;
                tracing::info!(volume = %self.name, fs = %want, took = ?started.elapsed(), "formatted");
                self.mark_formatted()?;
            }
        }
        let target = self.node.mount_point(&self.name);
        let grow = record.grow_fs && record.spec.fs != FsType::None;
        let mounted = mounting::grows_mounted(record.spec.fs);
        if grow && !mounted {
            self.grow_filesystem(record, &device, &target, mounted);
        }
        let data = mounting::mount_for_docker(&device, &target, record.spec.fs)
            .map_err(VolumeErrorKind::Mount)?;
        if grow && mounted {
            self.grow_filesystem(record, &device, &target, mounted);
        }
        let a = self.attached.as_mut().expect("brought up");
        a.fs_mount = Some(target);
        a.data_path = Some(data.clone());
        Ok(data)
    }

    fn mark_formatted(&self) -> Result<(), CatalogError> {
        self.node
            .catalog
            .modify(&self.name, &self.id, &mut |r| r.formatted = true)
            .map(|_| ())
    }
}

/// The filesystem type on a device, if any (`blkid -p`, which reads the
/// device itself rather than a cache).
fn probe_fs(device: &std::path::Path) -> Option<String> {
    let out = std::process::Command::new("blkid")
        .args(["-p", "-o", "value", "-s", "TYPE"])
        .arg(device)
        .output()
        .ok()?;
    let t = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && !t.is_empty()).then_some(t)
}

impl Actor for VolumeActor {
    type Context = SyncContext<Self>;
}

/// Docker mounts the volume for mount ID `id`; answers the path for Docker.
#[derive(Message)]
#[rtype(result = "Result<PathBuf, VolumeError>")]
pub struct Mount {
    pub id: String,
}

#[derive(Message)]
#[rtype(result = "Result<(), VolumeError>")]
pub struct Unmount {
    pub id: String,
}

/// Attach as a raw block device on the host; answers the device path.
#[derive(Message)]
#[rtype(result = "Result<PathBuf, VolumeError>")]
pub struct HostAttach;

#[derive(Message)]
#[rtype(result = "Result<(), VolumeError>")]
pub struct HostDetach;

/// Delete the volume: catalog entry and data.
#[derive(Message)]
#[rtype(result = "Result<(), VolumeError>")]
pub struct Remove;

/// Take back the volume a crashed daemon left attached (sent once, first).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Resume(pub handover::AttachRecord);

/// The daemon is stopping: take everything down, even if busy.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Shutdown;

impl Handler<Mount> for VolumeActor {
    type Result = Result<PathBuf, VolumeError>;

    fn handle(&mut self, msg: Mount, _: &mut SyncContext<Self>) -> Self::Result {
        let record = self.record()?;
        if record.spec.fs == FsType::None {
            return Err(self.err(VolumeErrorKind::NoFilesystem(self.name.clone())));
        }
        let step = self
            .usage
            .check_mount(&self.name)
            .map_err(|e| self.err(e))?;
        if step == MountStep::Attach {
            self.attach_or_join(&record)?;
        }
        if let Some(j) = self.joined.as_ref().filter(|j| !j.mount.is_alive()) {
            return Err(self.err(VolumeErrorKind::Mount(format!(
                "the session to node {}, which served this shared volume, is gone: stop the containers using it on this node, then start them again",
                j.holder
            ))));
        }
        self.usage.mounted(&msg.id);
        self.publish();
        let path = match &self.joined {
            Some(j) => j.mount.mount_point().to_path_buf(),
            None => self
                .attached
                .as_ref()
                .and_then(|a| a.data_path.clone())
                .expect("mounted"),
        };
        tracing::info!(volume = %self.name, id = %msg.id, mounts = self.usage.total_mounts(), "mount");
        Ok(path)
    }
}

impl Handler<Unmount> for VolumeActor {
    type Result = Result<(), VolumeError>;

    fn handle(&mut self, msg: Unmount, _: &mut SyncContext<Self>) -> Self::Result {
        let step = self.usage.unmount(&msg.id);
        tracing::info!(volume = %self.name, id = %msg.id, ?step, "unmount");
        if step == UnmountStep::Detach {
            let left = match self.joined.is_some() {
                true => self.leave(),
                false => self.tear_down(false),
            };
            if let Err(e) = left {
                self.usage.restore(&msg.id);
                self.publish();
                return Err(self.err(e));
            }
        }
        self.publish();
        Ok(())
    }
}

impl Handler<HostAttach> for VolumeActor {
    type Result = Result<PathBuf, VolumeError>;

    fn handle(&mut self, _: HostAttach, _: &mut SyncContext<Self>) -> Self::Result {
        let record = self.record()?;
        // A filesystem nobody uses but still mounted (a failed detach) is
        // never handed out as a raw device.
        self.detach_if_unused();
        if self.attached.as_ref().is_some_and(|a| a.fs_mount.is_some()) && self.usage.is_idle() {
            return Err(self.err(VolumeErrorKind::Mount(
                "its filesystem is still mounted here, unused, and could not be unmounted: see the daemon's log, then retry".into(),
            )));
        }
        if self.usage.host_attached() {
            if let Some(a) = &self.attached {
                return Ok(a.export.device().to_path_buf());
            }
        }
        self.usage.check_host_attach().map_err(|e| self.err(e))?;
        self.bring_up(&record.spec).map_err(|e| self.err(e))?;
        self.usage.set_host(true);
        self.publish();
        Ok(self
            .attached
            .as_ref()
            .expect("up")
            .export
            .device()
            .to_path_buf())
    }
}

impl Handler<HostDetach> for VolumeActor {
    type Result = Result<(), VolumeError>;

    fn handle(&mut self, _: HostDetach, _: &mut SyncContext<Self>) -> Self::Result {
        if !self.usage.host_attached() {
            return Ok(());
        }
        if let Some(a) = &self.attached {
            let device = a.export.device();
            if crate::sys::loopdev::is_in_use(device) {
                return Err(self.err(VolumeErrorKind::DeviceBusy {
                    device: device.display().to_string(),
                }));
            }
        }
        self.tear_down(false).map_err(|e| self.err(e))?;
        self.usage.set_host(false);
        self.publish();
        Ok(())
    }
}

impl Handler<Remove> for VolumeActor {
    type Result = Result<(), VolumeError>;

    fn handle(&mut self, _: Remove, ctx: &mut SyncContext<Self>) -> Self::Result {
        let record = self.record()?;
        self.usage
            .check_remove(&self.name)
            .map_err(|e| self.err(e))?;
        if record.spec.sticky {
            return Err(self.err(VolumeErrorKind::Sticky(self.name.clone())));
        }
        if let Some(c) = self.node.cluster.clone() {
            replicated::remove(&c, &record).map_err(|e| self.err(e))?;
            self.node.limiters.lock().remove(&self.id);
            self.removed = true;
            self.runtime.write().remove(&self.id);
            tracing::info!(volume = %self.name, "removed");
            ctx.stop();
            return Ok(());
        }
        let dir = self.node.volume_dir(&self.id);
        let clones = ThinImage::clones_of(&dir).map_err(|e| self.err(e))?;
        if !clones.is_empty() {
            // Clones read the blocks they share from this volume's data.
            let ids: Vec<String> = clones
                .iter()
                .filter_map(|(_, d)| d.file_name().map(|n| n.to_string_lossy().into_owned()))
                .collect();
            let names: Vec<String> = self
                .node
                .catalog
                .list()
                .into_iter()
                .filter(|r| ids.contains(&r.id))
                .map(|r| r.name)
                .collect();
            return Err(self.err(VolumeErrorKind::HasClones(names.join(", "))));
        }
        self.check_not_exporting().map_err(|e| self.err(e))?;
        // Catalog first: once it is gone the volume is gone, and a crash
        // before the data is deleted leaves an orphan that the next start removes.
        self.node
            .catalog
            .remove(&self.name, &self.id)
            .map_err(|e| self.err(e))?;
        self.removed = true;
        self.node.keys.forget(&self.id);
        self.node.limiters.lock().remove(&self.id);
        self.runtime.write().remove(&self.id);
        if record.clone_of.is_some() {
            // Unpin the parent's snapshot (the registry then deletes it).
            if let Err(e) = ThinImage::destroy_clone(&dir) {
                tracing::warn!(volume = %self.name, error = %e, "could not unpin the parent's snapshot");
            }
        }
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            tracing::warn!(volume = %self.name, dir = %dir.display(), error = %e, "could not delete the data; it will be removed at the next start");
        }
        tracing::info!(volume = %self.name, "removed");
        ctx.stop();
        Ok(())
    }
}

impl Handler<Resume> for VolumeActor {
    type Result = ();

    fn handle(&mut self, msg: Resume, _: &mut SyncContext<Self>) {
        let rec = msg.0;
        let export = rec.export.clone();
        let fs_mount = rec.fs_mount.clone();
        if let Err(e) = self.resume(rec) {
            tracing::error!(volume = %self.name, node = %self.node.name, error = %e, "cannot take the volume back after a restart: its users lose it (containers using it must be restarted)");
            self.node
                .exporter
                .abandon(&self.id, &export, fs_mount.as_deref());
            self.usage = Usage::default();
        }
        // Only other nodes used it (a shared volume's sessions die with
        // the daemon): nobody is left to unmount it.
        self.detach_if_unused();
        self.publish();
    }
}

impl Handler<Shutdown> for VolumeActor {
    type Result = ();

    fn handle(&mut self, _: Shutdown, ctx: &mut SyncContext<Self>) {
        // A client's mount goes (lazily if busy) with its session; other
        // nodes' sessions end before the filesystem is unmounted, so that
        // none writes into it once it is gone.
        self.joined = None;
        self.cut_sessions();
        match self.tear_down(true) {
            // Down: the attach record goes too (a next start has nothing to take back).
            Ok(()) => handover::remove(&self.node, &self.id),
            Err(e) => {
                tracing::error!(volume = %self.name, error = %e, "could not take the volume down cleanly")
            }
        }
        self.runtime.write().remove(&self.id);
        ctx.stop();
    }
}

//! Stage 2: the registry, this node's supervisor actor. It owns the catalog's
//! create path and one volume actor per volume in use, and answers Get/List
//! straight from the persisted catalog plus the runtime table.
//!
//! Handlers here never block on volume work: per-volume requests are
//! forwarded to the volume's actor and awaited there, so a slow mkfs on one
//! volume never holds up Get or another volume's Mount.

mod clone;
pub mod cluster;
mod inflight;
pub mod snapshots;
mod view;

use clone::Created;

pub use view::VolumeInfo;

use crate::catalog::{new_volume_id, CatalogError, CloneOf, VolumeRecord};
use crate::config::Node;
use crate::engine::{CryptEngine, EngineError, Secret, ThinImage, ThinParams};
use crate::spec::{self, SpecError};
use crate::volume::handover::AttachRecord;
use crate::volume::{self, RuntimeTable, VolumeActor, VolumeError};
use actix::prelude::*;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("no such volume: {0}")]
    NotFound(String),
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(transparent)]
    Volume(#[from] VolumeError),
    #[error("volume {volume} on node {node}: {source}")]
    Catalog {
        volume: String,
        node: String,
        #[source]
        source: CatalogError,
    },
    #[error("volume {volume} on node {node}: cannot create its image: {source}")]
    Create {
        volume: String,
        node: String,
        #[source]
        source: EngineError,
    },
    #[error("the daemon is shutting down")]
    ShuttingDown,
    /// Another request on the volume is under way (`inflight.rs`).
    #[error("volume {volume} on node {node}: {reason}; try again when that is done")]
    Busy {
        volume: String,
        node: String,
        reason: String,
    },
    /// The request makes no sense as asked.
    #[error("{0}")]
    BadRequest(String),
    #[error("volume {volume} on node {node}: {source}")]
    Cluster {
        volume: String,
        node: String,
        #[source]
        source: crate::cluster::ClusterError,
    },
    #[error("{0}: this daemon runs alone (no --etcd); start it with --node, --listen and --etcd to form a cluster")]
    NotClustered(&'static str),
    /// A node command (`node cordon`, `node rm`), asked of node `node`.
    #[error("asked node {node}: {source}")]
    NodeOp {
        node: String,
        #[source]
        source: crate::cluster::ClusterError,
    },
}

impl RegistryError {
    /// Whether the request itself was at fault (HTTP 4xx on the control socket).
    pub fn status(&self) -> u16 {
        match self {
            RegistryError::NotFound(_) => 404,
            RegistryError::Spec(_) | RegistryError::BadRequest(_) => 400,
            RegistryError::Volume(v) => match v.kind {
                volume::VolumeErrorKind::InUse(_)
                | volume::VolumeErrorKind::Sticky(_)
                | volume::VolumeErrorKind::DeviceBusy { .. }
                | volume::VolumeErrorKind::NoFilesystem(_)
                | volume::VolumeErrorKind::HasClones(_)
                | volume::VolumeErrorKind::RestoreInUse(_)
                | volume::VolumeErrorKind::Passthrough(_)
                | volume::VolumeErrorKind::Locked(_)
                | volume::VolumeErrorKind::NoClusterKey
                | volume::VolumeErrorKind::ClusterKeyed
                | volume::VolumeErrorKind::WrongClusterKey
                | volume::VolumeErrorKind::SnapshotsOnHolder(_)
                | volume::VolumeErrorKind::ReplicasOnHolder(_)
                | volume::VolumeErrorKind::ReplicaChange(_)
                | volume::VolumeErrorKind::NotMountedHere => 409,
                volume::VolumeErrorKind::Replication(ref r)
                    if matches!(
                        **r,
                        crate::replication::ReplicationError::Membership { .. }
                            | crate::replication::ReplicationError::SnapshotNeedsAll { .. }
                            | crate::replication::ReplicationError::SnapshotHeldNowhere { .. }
                    ) =>
                {
                    409
                }
                volume::VolumeErrorKind::Cluster(ref c)
                    if matches!(
                        **c,
                        crate::cluster::ClusterError::HeldBy { .. }
                            | crate::cluster::ClusterError::HeldForResync { .. }
                    ) =>
                {
                    409
                }
                volume::VolumeErrorKind::OnHolder { code, .. } => match code {
                    crate::replication::wire::ErrorCode::NotFound => 404,
                    crate::replication::wire::ErrorCode::Invalid => 400,
                    crate::replication::wire::ErrorCode::Busy
                    | crate::replication::wire::ErrorCode::Fenced => 409,
                    _ => 500,
                },
                volume::VolumeErrorKind::NotInCluster(_)
                | volume::VolumeErrorKind::NotClustered(_)
                | volume::VolumeErrorKind::NoLocalReplica(_)
                | volume::VolumeErrorKind::NotShared(_) => 400,
                volume::VolumeErrorKind::Removed => 404,
                _ => 500,
            },
            RegistryError::Cluster { source, .. } => match source {
                crate::cluster::ClusterError::HeldBy { .. } => 409,
                crate::cluster::ClusterError::Placement(_) => 409,
                _ => 503,
            },
            RegistryError::NotClustered(_) => 400,
            RegistryError::NodeOp { source, .. } => match source {
                crate::cluster::ClusterError::Node(_) => 409,
                _ => 503,
            },
            RegistryError::ShuttingDown => 503,
            _ => 500,
        }
    }
}

pub type Reply<T> = Result<T, RegistryError>;

pub struct Registry {
    node: Arc<Node>,
    runtime: RuntimeTable,
    /// Volume actors by volume id.
    actors: HashMap<String, Addr<VolumeActor>>,
    stopping: bool,
    /// Attach records of the last run to take back at start.
    resume: Vec<AttachRecord>,
    /// The sweep's replacement of dead nodes' replicas (cluster mode).
    replacements: Arc<parking_lot::Mutex<cluster::Replacements>>,
    /// Clones, removes and resizes under way (they exclude each other).
    inflight: inflight::InFlight,
}

impl Registry {
    pub fn new(node: Arc<Node>, resume: Vec<AttachRecord>) -> Self {
        Registry {
            node,
            runtime: RuntimeTable::default(),
            actors: HashMap::new(),
            stopping: false,
            resume,
            replacements: Default::default(),
            inflight: Default::default(),
        }
    }

    fn busy(&self, volume: &str, reason: String) -> RegistryError {
        RegistryError::Busy {
            volume: volume.to_string(),
            node: self.node.name.clone(),
            reason,
        }
    }

    /// Resolve Docker's `name@size` shorthand to the volume's name (the
    /// size must be one: `data@junk` is no name for `data`).
    fn lookup(&self, name: &str) -> Reply<VolumeRecord> {
        let (base, size) = spec::split_shorthand(name);
        if let Some(size) = size {
            spec::parse_size(size)?;
        }
        self.node
            .catalog
            .get(base)
            .ok_or_else(|| RegistryError::NotFound(base.to_string()))
    }

    fn actor(&mut self, record: &VolumeRecord) -> Reply<Addr<VolumeActor>> {
        if self.stopping {
            return Err(RegistryError::ShuttingDown);
        }
        if let Some(addr) = self.actors.get(&record.id).filter(|a| a.connected()) {
            return Ok(addr.clone());
        }
        let node = self.node.clone();
        let runtime = self.runtime.clone();
        let rec = record.clone();
        let addr = SyncArbiter::start(1, move || {
            VolumeActor::new(node.clone(), &rec, runtime.clone())
        });
        self.actors.insert(record.id.clone(), addr.clone());
        Ok(addr)
    }

    fn info(&self, record: VolumeRecord) -> VolumeInfo {
        info_of(&self.node, &self.runtime, record)
    }

    /// A new volume's record, or the existing volume (Create is idempotent),
    /// or the clone to make.
    fn create(&mut self, name: &str, opts: &BTreeMap<String, String>) -> Reply<Created> {
        if self.stopping {
            return Err(RegistryError::ShuttingDown);
        }
        let (base, shorthand) = spec::split_shorthand(name);
        spec::validate_name(base)?;
        // The passphrase leaves the options here: they are stored and shown.
        let mut opts = opts.clone();
        let own_key = spec::take_secret(&mut opts)?;
        // Validate even when the volume exists, so a typo is not silently accepted.
        let spec = spec::parse_options(&opts, shorthand)?;
        if let Some(c) = self.node.cluster.clone() {
            if own_key.is_some() {
                return Err(SpecError::Value {
                    option: spec::SECRET_OPTION.into(),
                    value: "(hidden)".into(),
                    reason: "a volume's own key is not kept in a cluster (every node that attaches the volume would need it, and it may be stored nowhere): start every node's dunnage serve with the same --secret-file and create the volume with secure=true alone".into(),
                }
                .into());
            }
            if let Some(parent) = spec.parent.clone() {
                if let Some(existing) = self.node.catalog.get(base) {
                    return Ok(Created::Done(self.info(existing)));
                }
                return self.clone_spec(base, spec, opts, false, &parent);
            }
            return self.create_in_cluster(&c, base, spec, opts);
        }
        if spec.repl > 1 || !spec.nodes.is_empty() {
            let (option, value) = if spec.repl > 1 {
                ("repl", spec.repl.to_string())
            } else {
                ("nodes", spec.nodes.join(","))
            };
            return Err(SpecError::Value {
                option: option.into(),
                value,
                reason: "copies on other nodes need a cluster: start dunnage serve with --node, --listen and --etcd (README: \"A three-node cluster\")".into(),
            }
            .into());
        }
        if let Some(parent) = spec.parent.clone() {
            if let Some(existing) = self.node.catalog.get(base) {
                return Ok(Created::Done(self.info(existing)));
            }
            return self.clone_spec(base, spec, opts, own_key.is_some(), &parent);
        }
        let key = match (spec.secure, own_key) {
            (false, Some(_)) => {
                return Err(SpecError::Value {
                    option: spec::SECRET_OPTION.into(),
                    value: "(hidden)".into(),
                    reason: "a key is only used by encrypted volumes: add -o secure=true".into(),
                }
                .into())
            }
            (false, None) => None,
            (true, Some(k)) => Some((Arc::new(k), true)),
            (true, None) => match self.node.keys.node_key() {
                Some(k) => Some((k, false)),
                None => {
                    return Err(SpecError::Value {
                        option: "secure".into(),
                        value: "true".into(),
                        reason: format!(
                            "an encrypted volume needs a key: add -o {}=PASSPHRASE, or start dunnage serve with --secret-file FILE for a node-wide key",
                            spec::SECRET_OPTION
                        ),
                    }
                    .into())
                }
            },
        };
        if let Some(existing) = self.node.catalog.get(base) {
            return Ok(Created::Done(self.info(existing)));
        }
        let record = VolumeRecord {
            name: base.to_string(),
            id: new_volume_id(),
            created_at: chrono::Utc::now(),
            spec,
            options: opts,
            formatted: false,
            clone_of: None,
            replicas: Vec::new(),
            crypt: None,
            grow_fs: false,
            replacing: Default::default(),
        };
        let dir = self.node.volume_dir(&record.id);
        let made = std::fs::create_dir_all(&dir)
            .map_err(|e| EngineError::Io {
                op: "create directory",
                path: dir.clone(),
                source: e,
            })
            .and_then(|_| {
                ThinImage::create(
                    &dir,
                    ThinParams {
                        size: record.spec.size,
                        block_size: record.spec.block_size_bytes(),
                    },
                )
            })
            .and_then(|image| match &key {
                // Encrypted before the catalog knows the volume: a crash
                // in between leaves an orphan directory, removed at start.
                Some((k, _)) => CryptEngine::create(Arc::new(image), &dir, k).map(|_| ()),
                None => Ok(()),
            });
        if let Err(source) = made {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(RegistryError::Create {
                volume: base.to_string(),
                node: self.node.name.clone(),
                source,
            });
        }
        if let Err(source) = self.node.catalog.insert(record.clone()) {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(RegistryError::Catalog {
                volume: base.to_string(),
                node: self.node.name.clone(),
                source,
            });
        }
        if let Some((k, true)) = key {
            self.node.keys.insert(&record.id, k);
        }
        self.announce_policy(&record);
        tracing::info!(volume = %record.name, id = %record.id, size = record.spec.size, fs = %record.spec.fs, encrypted = record.spec.secure, "created");
        Ok(Created::Done(self.info(record)))
    }

    /// A new volume's snapshot schedule goes to the scheduler.
    pub(crate) fn announce_policy(&self, record: &VolumeRecord) {
        if record.spec.snap.is_some() {
            self.node
                .schedule(crate::schedule::actor::ScheduleEvent::Policy {
                    volume: record.name.clone(),
                    policy: record.spec.snap.clone(),
                });
        }
    }

    /// Check an update's options against the volume's record, changing
    /// nothing: every option is refused before any takes effect.
    fn parse_update(
        &self,
        name: &str,
        opts: &BTreeMap<String, String>,
    ) -> Reply<(VolumeRecord, Changes)> {
        let record = self.lookup(name)?;
        let mut changes = Changes::default();
        for (k, v) in opts {
            match k.as_str() {
                // Takes effect at the next attach.
                "passthrough" => {
                    let one: BTreeMap<String, String> = [(k.clone(), v.clone())].into();
                    let on = spec::parse_options(&one, None)?.passthrough;
                    if on {
                        spec::check_passthrough(&spec::VolumeSpec {
                            passthrough: true,
                            ..record.spec.clone()
                        })?;
                    }
                    changes.passthrough = Some(on);
                }
                "sticky" | "label" | "labels" => {
                    let one: BTreeMap<String, String> = [(k.clone(), v.clone())].into();
                    let parsed = spec::parse_options(&one, None)?;
                    if k == "sticky" {
                        changes.sticky = Some(parsed.sticky);
                    } else {
                        changes.labels = Some(parsed.labels);
                    }
                }
                // At once where the volume is attached here; on another
                // node at its next sweep.
                "max_iops" | "max_bandwidth" => {
                    let mut limits = changes.limits.unwrap_or(record.spec.limits);
                    if k == "max_iops" {
                        limits.iops = spec::parse_max_iops(v)?;
                    } else {
                        limits.bandwidth = spec::parse_max_bandwidth(v)?;
                    }
                    if !limits.is_none() && record.spec.passthrough {
                        spec::check_passthrough(&spec::VolumeSpec {
                            limits,
                            ..record.spec.clone()
                        })?;
                    }
                    changes.limits = Some(limits);
                }
                // Shrinking is the volume's actor's to refuse, before any
                // other change is applied.
                "size" => {
                    let size = spec::parse_size(v)?;
                    changes.size = Some((size, v.clone()));
                }
                _ => return Err(SpecError::Value {
                    option: k.clone(),
                    value: v.clone(),
                    reason:
                        "only size (to grow), sticky, label, passthrough, max_iops and max_bandwidth can change after create"
                            .into(),
                }
                .into()),
            }
        }
        Ok((record, changes))
    }
}

/// What an update changes, checked.
#[derive(Debug, Default)]
struct Changes {
    sticky: Option<bool>,
    labels: Option<BTreeMap<String, String>>,
    passthrough: Option<bool>,
    /// Bytes, and as given.
    size: Option<(u64, String)>,
    limits: Option<crate::engine::limit::IoLimits>,
}

impl Changes {
    /// Apply the changes other than size to the catalog.
    fn apply(&self, node: &Node, record: &VolumeRecord) -> Reply<VolumeRecord> {
        if self.sticky.is_none()
            && self.labels.is_none()
            && self.passthrough.is_none()
            && self.limits.is_none()
        {
            return node
                .catalog
                .get(&record.name)
                .filter(|r| r.id == record.id)
                .ok_or_else(|| RegistryError::NotFound(record.name.clone()));
        }
        node.catalog
            .modify(&record.name, &record.id, &mut |r| {
                // What inspect shows as options: the values as they are now.
                let mut shown = |names: &[&str], value: String| {
                    r.options
                        .retain(|k, _| !names.iter().any(|n| k.trim().eq_ignore_ascii_case(n)));
                    r.options.insert(names[0].to_string(), value);
                };
                if let Some(s) = self.sticky {
                    shown(&["sticky"], s.to_string());
                    r.spec.sticky = s;
                }
                if let Some(l) = &self.labels {
                    let joined: Vec<String> = l.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    shown(&["label", "labels"], joined.join(","));
                    r.spec.labels = l.clone();
                }
                if let Some(p) = self.passthrough {
                    shown(&["passthrough"], p.to_string());
                    r.spec.passthrough = p;
                }
                if let Some(l) = self.limits {
                    r.spec.limits = l;
                    // What inspect shows: the caps as they are now.
                    match l.iops {
                        Some(n) => r.options.insert("max_iops".into(), n.to_string()),
                        None => r.options.remove("max_iops"),
                    };
                    match l.bandwidth {
                        Some(b) => r
                            .options
                            .insert("max_bandwidth".into(), format!("{}K", b >> 10)),
                        None => r.options.remove("max_bandwidth"),
                    };
                }
            })
            .inspect(|updated| {
                // A served engine holds the limiter: the new caps apply now.
                if let Some(l) = node.limiters.lock().get(&updated.id) {
                    l.set(updated.spec.limits);
                }
            })
            .map_err(|source| RegistryError::Catalog {
                volume: record.name.clone(),
                node: node.name.clone(),
                source,
            })
    }
}

impl Actor for Registry {
    type Context = Context<Self>;

    /// Volumes the last run left attached are taken back first: each
    /// actor's mailbox starts with its Resume, before any Docker request.
    fn started(&mut self, ctx: &mut Context<Self>) {
        if let Some(c) = self.node.cluster.clone() {
            cluster::report_capacity(&self.node, &c);
            ctx.run_interval(c.sweep.every, move |reg, _| {
                cluster::report_capacity(&reg.node, &c);
                cluster::refresh_limits(&reg.node);
                cluster::sweep_replicas(&c);
                cluster::resync_behind(reg, &c);
                cluster::resync_lost_here(reg, &c);
                cluster::replace_gone(reg, &c);
            });
        }
        for rec in std::mem::take(&mut self.resume) {
            let Some(record) = self.node.catalog.get(&rec.volume) else {
                continue;
            };
            if let Ok(addr) = self.actor(&record) {
                addr.do_send(volume::Resume(rec));
            }
        }
    }
}

fn info_of(node: &Node, runtime: &RuntimeTable, record: VolumeRecord) -> VolumeInfo {
    let rt = runtime.read().get(&record.id).cloned().unwrap_or_default();
    let allocated = crate::config::disk_usage(&node.volume_dir(&record.id));
    VolumeInfo::new(record, rt, allocated, &node.name)
}

/// Orphaned data (a crash between writing an image and the catalog, or
/// between the catalog and deleting data) is removed at start.
pub fn remove_orphans(node: &Node) -> Vec<PathBuf> {
    let known: std::collections::HashSet<String> =
        node.catalog.list().into_iter().map(|r| r.id).collect();
    let mut removed = Vec::new();
    if let Ok(entries) = std::fs::read_dir(node.data_dir.join("volumes")) {
        for e in entries.flatten() {
            let id = e.file_name().to_string_lossy().into_owned();
            if !known.contains(&id) && std::fs::remove_dir_all(e.path()).is_ok() {
                removed.push(e.path());
            }
        }
    }
    removed
}

/// Not `Debug`: the options may still carry the passphrase.
#[derive(Message)]
#[rtype(result = "Reply<VolumeInfo>")]
pub struct Create {
    pub name: String,
    pub opts: BTreeMap<String, String>,
}

#[derive(Message, Debug)]
#[rtype(result = "Reply<VolumeInfo>")]
pub struct Update {
    pub name: String,
    pub opts: BTreeMap<String, String>,
}

#[derive(Message, Debug)]
#[rtype(result = "Reply<()>")]
pub struct Remove {
    pub name: String,
}

#[derive(Message, Debug)]
#[rtype(result = "Reply<VolumeInfo>")]
pub struct Get {
    pub name: String,
}

#[derive(Message, Debug)]
#[rtype(result = "Reply<Vec<VolumeInfo>>")]
pub struct List;

#[derive(Message, Debug)]
#[rtype(result = "Reply<PathBuf>")]
pub struct Mount {
    pub name: String,
    pub id: String,
}

#[derive(Message, Debug)]
#[rtype(result = "Reply<()>")]
pub struct Unmount {
    pub name: String,
    pub id: String,
}

#[derive(Message, Debug)]
#[rtype(result = "Reply<PathBuf>")]
pub struct Attach {
    pub name: String,
}

#[derive(Message, Debug)]
#[rtype(result = "Reply<()>")]
pub struct Detach {
    pub name: String,
}

/// Give the key of an encrypted volume created with its own `secret_key`
/// (a restarted daemon does not have it): checked against the volume, then
/// held in memory.
#[derive(Message)]
#[rtype(result = "Reply<()>")]
pub struct Unlock {
    pub name: String,
    pub secret: Secret,
}

impl Handler<Unlock> for Registry {
    type Result = Reply<()>;
    fn handle(&mut self, msg: Unlock, _: &mut Context<Self>) -> Self::Result {
        let record = self.lookup(&msg.name)?;
        let node = self.node.name.clone();
        let fail = |kind: volume::VolumeErrorKind| {
            RegistryError::Volume(VolumeError {
                volume: record.name.clone(),
                node: node.clone(),
                kind,
            })
        };
        if !record.spec.secure {
            return Err(fail(volume::VolumeErrorKind::NotEncrypted));
        }
        if record.crypt.is_some() {
            return Err(fail(volume::VolumeErrorKind::ClusterKeyed));
        }
        CryptEngine::check_key(&self.node.volume_dir(&record.id), &msg.secret)
            .map_err(|e| fail(e.into()))?;
        self.node.keys.insert(&record.id, Arc::new(msg.secret));
        tracing::info!(volume = %record.name, "unlocked");
        Ok(())
    }
}

/// Take every volume down; answered when all are down.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct Shutdown;

impl Handler<Create> for Registry {
    type Result = ResponseActFuture<Self, Reply<VolumeInfo>>;
    fn handle(&mut self, msg: Create, _: &mut Context<Self>) -> Self::Result {
        match self.create(&msg.name, &msg.opts) {
            Err(e) => Box::pin(fut::ready(Err(e))),
            Ok(Created::Done(info)) => Box::pin(fut::ready(Ok(info))),
            Ok(Created::Clone { record, source }) => self.make_clone(record, source),
        }
    }
}

impl Handler<Update> for Registry {
    type Result = ResponseActFuture<Self, Reply<VolumeInfo>>;
    /// A grow goes to the volume's actor (it owns the image and knows
    /// whether it is attached); the other changes are the catalog's.
    fn handle(&mut self, msg: Update, _: &mut Context<Self>) -> Self::Result {
        let checked = self
            .parse_update(&msg.name, &msg.opts)
            .and_then(|(record, changes)| {
                let actor = match &changes.size {
                    Some(_) => Some(self.actor(&record)?),
                    None => None,
                };
                Ok((record, changes, actor))
            });
        let (record, changes, actor) = match checked {
            Ok(c) => c,
            Err(e) => return Box::pin(fut::ready(Err(e))),
        };
        let resizing = changes.size.is_some().then(|| record.id.clone());
        if let Some(id) = &resizing {
            if let Err(why) = self.inflight.start_resize(id) {
                let e = self.busy(&record.name, format!("cannot resize it now: {why}"));
                return Box::pin(fut::ready(Err(e)));
            }
        }
        let (node, runtime) = (self.node.clone(), self.runtime.clone());
        let work = async move {
            if let (Some((size, given)), Some(actor)) = (changes.size.clone(), actor) {
                forward(actor, volume::resize::Resize { size, given }).await?;
            }
            let updated = changes.apply(&node, &record)?;
            Ok(info_of(&node, &runtime, updated))
        };
        Box::pin(work.into_actor(self).map(move |res, act, _| {
            if let Some(id) = resizing {
                act.inflight.end_resize(&id);
            }
            res
        }))
    }
}

impl Handler<Get> for Registry {
    type Result = Reply<VolumeInfo>;
    fn handle(&mut self, msg: Get, _: &mut Context<Self>) -> Self::Result {
        self.lookup(&msg.name).map(|r| self.info(r))
    }
}

impl Handler<List> for Registry {
    type Result = Reply<Vec<VolumeInfo>>;
    fn handle(&mut self, _: List, _: &mut Context<Self>) -> Self::Result {
        Ok(self
            .node
            .catalog
            .list()
            .into_iter()
            .map(|r| self.info(r))
            .collect())
    }
}

/// What a metrics scrape reads: every volume with its runtime state, and
/// the cluster (whose members the caller reads off this actor).
#[derive(Message)]
#[rtype(
    result = "(Vec<crate::control::metrics::VolumeSample>, Option<Arc<crate::cluster::Cluster>>)"
)]
pub struct Scrape;

impl Handler<Scrape> for Registry {
    type Result = MessageResult<Scrape>;
    fn handle(&mut self, _: Scrape, _: &mut Context<Self>) -> Self::Result {
        let runtime = self.runtime.read();
        let samples = self
            .node
            .catalog
            .list()
            .into_iter()
            .map(|record| crate::control::metrics::VolumeSample {
                runtime: runtime.get(&record.id).cloned().unwrap_or_default(),
                allocated: crate::config::disk_usage(&self.node.volume_dir(&record.id)),
                replicas: self
                    .node
                    .cluster
                    .as_ref()
                    .and_then(|c| c.mirror(&record.id))
                    .map(|m| m.status()),
                throttled: self
                    .node
                    .limiters
                    .lock()
                    .get(&record.id)
                    .map(|l| l.throttled()),
                record,
            })
            .collect();
        let cluster = self.node.cluster.as_ref().map(|c| c.cluster.clone());
        MessageResult((samples, cluster))
    }
}

/// Forward a message to a volume's actor and map its answer.
fn forward<M, T>(addr: Addr<VolumeActor>, msg: M) -> ResponseFuture<Reply<T>>
where
    M: Message<Result = Result<T, VolumeError>> + Send + 'static,
    VolumeActor: Handler<M>,
    T: Send + 'static,
{
    Box::pin(async move {
        match addr.send(msg).await {
            Ok(r) => r.map_err(RegistryError::from),
            // The actor stopped (removed or shutting down) before it answered.
            Err(_) => Err(RegistryError::ShuttingDown),
        }
    })
}

/// How often the base snapshot of a removed clone is tried to be deleted.
/// In a cluster the other replica nodes drop their replicas of the clone
/// (which pin it) at their next sweep, up to 30 s later.
const CLONE_BASE_TRIES: u32 = 8;
const CLONE_BASE_RETRY: std::time::Duration = std::time::Duration::from_secs(10);

impl Registry {
    /// Delete the snapshot a removed clone was based on, through its
    /// parent's actor; in a cluster, again later while replicas of the
    /// clone elsewhere still pin it.
    fn drop_clone_base(&mut self, ctx: &mut Context<Self>, base: CloneOf, tries: u32) {
        let parent = self
            .node
            .catalog
            .list()
            .into_iter()
            .find(|r| r.id == base.volume_id);
        let Some(Ok(addr)) = parent.map(|p| self.actor(&p)) else {
            return;
        };
        let delete = addr.send(volume::snapshots::DeleteSnapshot {
            name: base.snapshot.clone(),
        });
        let cluster = self.node.cluster.is_some();
        ctx.spawn(delete.into_actor(self).map(move |res, _, ctx| {
            let Ok(Err(e)) = res else { return };
            if let volume::VolumeErrorKind::Engine(EngineError::NoSuchSnapshot { .. }) = e.kind {
                return;
            }
            if !cluster || tries <= 1 {
                tracing::warn!(error = %e, snapshot = %base.snapshot, "could not delete the snapshot a removed clone was based on; delete it with `dunnage snapshot rm`");
                return;
            }
            tracing::debug!(error = %e, snapshot = %base.snapshot, "a removed clone's base snapshot is still pinned; trying again");
            ctx.run_later(CLONE_BASE_RETRY, move |act, ctx| {
                act.drop_clone_base(ctx, base, tries - 1)
            });
        }));
    }
}

impl Handler<Remove> for Registry {
    type Result = ResponseActFuture<Self, Reply<()>>;
    fn handle(&mut self, msg: Remove, _: &mut Context<Self>) -> Self::Result {
        let res = self
            .lookup(&msg.name)
            .and_then(|r| Ok((self.actor(&r)?, r.id)));
        match res {
            Err(e) => Box::pin(fut::ready(Err(e))),
            Ok((addr, id)) => {
                if let Err(why) = self.inflight.start_remove(&id) {
                    let e = self.busy(&msg.name, format!("cannot remove it now: {why}"));
                    return Box::pin(fut::ready(Err(e)));
                }
                let name = msg.name.clone();
                // A base snapshot taken for the clone goes with it; one of
                // the parent's own (`parent=SRC@SNAP`) stays.
                let clone_of = self
                    .lookup(&msg.name)
                    .ok()
                    .filter(clone::owns_base)
                    .and_then(|r| r.clone_of);
                Box::pin(forward(addr, volume::Remove).into_actor(self).map(
                    move |res, act, ctx| {
                        act.inflight.end_remove(&id);
                        if res.is_ok() {
                            act.actors.remove(&id);
                            act.node
                                .schedule(crate::schedule::actor::ScheduleEvent::Policy {
                                    volume: name.clone(),
                                    policy: None,
                                });
                            // The clone's base snapshot is nobody's now.
                            if let Some(c) = clone_of {
                                act.drop_clone_base(ctx, c, CLONE_BASE_TRIES);
                            }
                        }
                        res
                    },
                ))
            }
        }
    }
}

impl Handler<Mount> for Registry {
    type Result = ResponseFuture<Reply<PathBuf>>;
    fn handle(&mut self, msg: Mount, _: &mut Context<Self>) -> Self::Result {
        match self.lookup(&msg.name).and_then(|r| self.actor(&r)) {
            Ok(addr) => forward(addr, volume::Mount { id: msg.id }),
            Err(e) => Box::pin(async move { Err(e) }),
        }
    }
}

impl Handler<Unmount> for Registry {
    type Result = ResponseFuture<Reply<()>>;
    fn handle(&mut self, msg: Unmount, _: &mut Context<Self>) -> Self::Result {
        // Unmount of a volume or ID we don't know succeeds: dockerd may replay
        // Unmounts after our restart, and must not be stuck on them.
        let addr = self
            .lookup(&msg.name)
            .ok()
            .and_then(|r| self.actors.get(&r.id).filter(|a| a.connected()).cloned());
        match addr {
            Some(addr) => forward(addr, volume::Unmount { id: msg.id }),
            None => Box::pin(async { Ok(()) }),
        }
    }
}

impl Handler<Attach> for Registry {
    type Result = ResponseFuture<Reply<PathBuf>>;
    fn handle(&mut self, msg: Attach, _: &mut Context<Self>) -> Self::Result {
        match self.lookup(&msg.name).and_then(|r| self.actor(&r)) {
            Ok(addr) => forward(addr, volume::HostAttach),
            Err(e) => Box::pin(async move { Err(e) }),
        }
    }
}

impl Handler<Detach> for Registry {
    type Result = ResponseFuture<Reply<()>>;
    fn handle(&mut self, msg: Detach, _: &mut Context<Self>) -> Self::Result {
        let record = match self.lookup(&msg.name) {
            Ok(r) => r,
            Err(e) => return Box::pin(async move { Err(e) }),
        };
        match self
            .actors
            .get(&record.id)
            .filter(|a| a.connected())
            .cloned()
        {
            Some(addr) => forward(addr, volume::HostDetach),
            None => Box::pin(async { Ok(()) }),
        }
    }
}

impl Handler<Shutdown> for Registry {
    type Result = ResponseFuture<()>;
    fn handle(&mut self, _: Shutdown, _: &mut Context<Self>) -> Self::Result {
        self.stopping = true;
        let actors: Vec<_> = self.actors.drain().map(|(_, a)| a).collect();
        Box::pin(async move {
            for a in actors {
                let _ = a.send(volume::Shutdown).await;
            }
        })
    }
}

//! Where things live on this node, and the handles every layer shares.

use crate::catalog::Catalog;
use crate::export::Exporter;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The node as the registry and volume actors see it.
pub struct Node {
    /// This node's name (the host name on a single node); errors carry it.
    pub name: String,
    pub data_dir: PathBuf,
    pub run_dir: PathBuf,
    pub mount_dir: PathBuf,
    /// How volumes reach the kernel here (`auto` resolved), and the FUSE
    /// keeper.
    pub exporter: Exporter,
    /// Encryption keys (memory only).
    pub keys: crate::keys::KeyRing,
    /// The snapshot scheduler, once started (see `schedule::actor`).
    pub scheduler: std::sync::OnceLock<actix::Recipient<crate::schedule::actor::ScheduleEvent>>,
    /// Shares engine IO between `io_priority` classes.
    pub arbiter: std::sync::Arc<crate::engine::priority::IoArbiter>,
    /// Each volume's caps (`max_iops`, `max_bandwidth`) by id, shared by
    /// its served engine and `volume update`.
    pub limiters:
        parking_lot::Mutex<std::collections::HashMap<String, Arc<crate::engine::limit::Limiter>>>,
    pub catalog: Arc<dyn Catalog>,
    /// Cluster mode (`serve --etcd`): membership, attach leases, replicas.
    pub cluster: Option<Arc<ClusterNode>>,
}

/// What a node in a cluster holds beyond a single node's state.
pub struct ClusterNode {
    pub cluster: Arc<crate::cluster::Cluster>,
    /// This node's replicas: every image open in cluster mode goes through here.
    pub replicas: Arc<crate::replication::LocalReplicas>,
    pub lease_ttl: std::time::Duration,
    /// How long a replica may stay silent before it leaves the in-sync set.
    pub replica_timeout: std::time::Duration,
    /// How fast a resync or verification may move data, per replica.
    pub resync: crate::replication::ResyncPace,
    /// How often the sweep runs, and when it replaces replicas.
    pub sweep: Sweep,
    /// Mirrors of the volumes attached here, fenced at once if the lease is lost.
    mirrors: parking_lot::Mutex<
        std::collections::HashMap<String, std::sync::Weak<crate::replication::Mirror>>,
    >,
    server: parking_lot::Mutex<Option<crate::replication::ReplicaServer>>,
    /// Background resyncs of volumes attached nowhere, run here.
    resyncs: parking_lot::Mutex<std::collections::HashMap<String, ResyncJob>>,
    /// Held while one starts: two starts on one node would share a generation.
    pub resync_start: parking_lot::Mutex<()>,
    /// Volumes whose resync the sweep does not start again before then
    /// (the last one failed or gave up on an unreachable replica).
    resync_backoff: parking_lot::Mutex<std::collections::HashMap<String, std::time::Instant>>,
    /// The last comparison asked for (`volume verify`) of each volume
    /// whose mirror here has closed since: `volume inspect` still shows it.
    verified:
        parking_lot::Mutex<std::collections::HashMap<String, crate::replication::Verification>>,
}

/// The cluster sweep's timing (`registry::cluster`).
#[derive(Debug, Clone, Copy)]
pub struct Sweep {
    /// How often it runs.
    pub every: std::time::Duration,
    /// How long a node stays down before the replicas it holds are
    /// replaced on other nodes (`cluster::replace`); None: never.
    pub replace_after: Option<std::time::Duration>,
}

/// How long the sweep leaves a volume whose background resync failed.
const RESYNC_BACKOFF: std::time::Duration = std::time::Duration::from_secs(300);

/// A background resync's handle: ask it to stop, wait for it.
pub struct ResyncJob {
    pub stop: Arc<std::sync::atomic::AtomicBool>,
    pub thread: std::thread::JoinHandle<()>,
}

impl ClusterNode {
    pub fn new(
        cluster: Arc<crate::cluster::Cluster>,
        replicas: Arc<crate::replication::LocalReplicas>,
        server: crate::replication::ReplicaServer,
        lease_ttl: std::time::Duration,
        replica_timeout: std::time::Duration,
        resync: crate::replication::ResyncPace,
        sweep: Sweep,
    ) -> Arc<Self> {
        let node = Arc::new(ClusterNode {
            cluster,
            replicas,
            lease_ttl,
            replica_timeout,
            resync,
            sweep,
            mirrors: Default::default(),
            server: parking_lot::Mutex::new(Some(server)),
            resyncs: Default::default(),
            resync_start: Default::default(),
            resync_backoff: Default::default(),
            verified: Default::default(),
        });
        // A node whose lease is gone may have been replaced by another
        // attach already: it must not write again.
        let weak = Arc::downgrade(&node);
        node.cluster.on_lease_lost(Box::new(move || {
            if let Some(n) = weak.upgrade() {
                n.fence_all();
            }
        }));
        node
    }

    pub fn track(&self, volume_id: &str, mirror: &Arc<crate::replication::Mirror>) {
        self.mirrors
            .lock()
            .insert(volume_id.to_string(), Arc::downgrade(mirror));
    }

    pub fn untrack(&self, volume_id: &str) {
        self.mirrors.lock().remove(volume_id);
    }

    /// Keep a finished comparison's result past its mirror.
    pub fn keep_verification(&self, volume_id: &str, v: crate::replication::Verification) {
        self.verified.lock().insert(volume_id.to_string(), v);
    }

    /// A new comparison starts: the last one's result goes.
    pub fn forget_verification(&self, volume_id: &str) {
        self.verified.lock().remove(volume_id);
    }

    /// The last comparison asked for here whose mirror has closed.
    pub fn last_verification(&self, volume_id: &str) -> Option<crate::replication::Verification> {
        self.verified.lock().get(volume_id).copied()
    }

    /// The mirror of a volume attached here.
    pub fn mirror(&self, volume_id: &str) -> Option<Arc<crate::replication::Mirror>> {
        self.mirrors.lock().get(volume_id).and_then(|w| w.upgrade())
    }

    pub fn fence_all(&self) {
        let mirrors: Vec<_> = self
            .mirrors
            .lock()
            .values()
            .filter_map(|w| w.upgrade())
            .collect();
        for m in mirrors {
            m.fence();
        }
        tracing::error!(
            node = %self.cluster.node(),
            "this node lost its cluster lease: every volume attached here is fenced (IO fails) until it is detached and attached again"
        );
    }

    /// Record a background resync of `volume_id` (see
    /// `volume::replicated::start_resync`); false if one runs already.
    pub fn add_resync(&self, volume_id: &str, job: ResyncJob) -> bool {
        let mut jobs = self.resyncs.lock();
        jobs.retain(|_, j| !j.thread.is_finished());
        if jobs.contains_key(volume_id) {
            return false;
        }
        jobs.insert(volume_id.to_string(), job);
        true
    }

    /// Whether a background resync of `volume_id` runs here.
    pub fn resyncing(&self, volume_id: &str) -> bool {
        self.resyncs
            .lock()
            .get(volume_id)
            .is_some_and(|j| !j.thread.is_finished())
    }

    /// The sweep leaves `volume_id` alone for a while: its resync failed.
    pub fn hold_off_resync(&self, volume_id: &str) {
        let mut held = self.resync_backoff.lock();
        let now = std::time::Instant::now();
        held.retain(|_, until| *until > now);
        held.insert(volume_id.to_string(), now + RESYNC_BACKOFF);
    }

    /// Whether the sweep should leave `volume_id` alone now.
    pub fn resync_held_off(&self, volume_id: &str) -> bool {
        self.resync_backoff
            .lock()
            .get(volume_id)
            .is_some_and(|until| *until > std::time::Instant::now())
    }

    /// Stop this node's background resync of `volume_id`, if any, and wait
    /// until it has closed its mirror and given the attach back.
    pub fn stop_resync(&self, volume_id: &str) {
        let job = self.resyncs.lock().remove(volume_id);
        if let Some(job) = job {
            job.stop.store(true, std::sync::atomic::Ordering::SeqCst);
            let _ = job.thread.join();
        }
        // A job whose release failed left its record: no lease expiry
        // takes it while this node lives.
        match self.cluster.drop_stale_resync_attach(volume_id) {
            Ok(true) => tracing::info!(
                volume_id,
                "dropped a background resync's attach left behind"
            ),
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(volume_id, error = %e, "cannot drop a background resync's attach left behind")
            }
        }
    }

    /// Who runs requests other nodes forward here (see `volume::forward`).
    pub fn set_forwarder(&self, f: crate::replication::Forwarder) {
        if let Some(s) = self.server.lock().as_ref() {
            s.set_forwarder(f);
        }
    }

    /// Stop serving replica traffic and leave the cluster.
    pub fn shutdown(&self) {
        let jobs: Vec<String> = self.resyncs.lock().keys().cloned().collect();
        for id in jobs {
            self.stop_resync(&id);
        }
        if let Some(s) = self.server.lock().take() {
            s.shutdown();
        }
        self.cluster.shutdown();
    }
}

impl Node {
    /// Volume `id`'s limiter, with `limits` set.
    pub fn limiter(
        &self,
        id: &str,
        limits: crate::engine::limit::IoLimits,
    ) -> Arc<crate::engine::limit::Limiter> {
        let l = self
            .limiters
            .lock()
            .entry(id.to_string())
            .or_default()
            .clone();
        l.set(limits);
        l
    }

    /// Tell the snapshot scheduler (if it runs yet).
    pub fn schedule(&self, ev: crate::schedule::actor::ScheduleEvent) {
        if let Some(s) = self.scheduler.get() {
            s.do_send(ev);
        }
    }

    /// Volume data lives under its id, so a volume re-created under the same
    /// name never meets the old one's files.
    pub fn volume_dir(&self, id: &str) -> PathBuf {
        self.data_dir.join("volumes").join(id)
    }

    /// Where a volume's filesystem is mounted for Docker.
    pub fn mount_point(&self, name: &str) -> PathBuf {
        self.mount_dir.join(name)
    }

    /// Attach records of the volumes attached here (see `volume::handover`).
    pub fn attached_dir(&self) -> PathBuf {
        self.run_dir.join("attached")
    }

    pub fn fuse_root(&self) -> PathBuf {
        self.run_dir.join("fuse")
    }

    pub fn fuse_dir(&self, name: &str) -> PathBuf {
        self.fuse_root().join(name)
    }
}

/// This machine's host name, for errors that name the node.
pub fn host_name() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into())
}

/// The size and free space (for unprivileged users, as `df` shows it) of
/// the filesystem holding the volumes' data under `data_dir`.
pub fn capacity(data_dir: &Path) -> Option<crate::cluster::Capacity> {
    // Where the volumes' data is (an operator may mount a disk there).
    let volumes = data_dir.join("volumes");
    let dir = if volumes.is_dir() { &volumes } else { data_dir };
    let s = nix::sys::statvfs::statvfs(dir).ok()?;
    let unit = s.fragment_size();
    Some(crate::cluster::Capacity {
        total_bytes: s.blocks().saturating_mul(unit),
        free_bytes: s.blocks_available().saturating_mul(unit),
    })
}

/// Bytes the files of a directory take on disk (st_blocks), not their length.
pub fn disk_usage(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.blocks() * 512)
        .sum()
}

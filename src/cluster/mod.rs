//! The cluster's control plane, kept in etcd: the catalog, node membership
//! (lease-backed keys) and attach ownership (a lease-backed key whose
//! revision is the volume's generation). A single node needs none of it.
//!
//! Keys, all under `/dunnage/`:
//! - `volumes/<name>`: the [`VolumeRecord`](crate::catalog::VolumeRecord), JSON;
//! - `nodes/<name>`: a live member (under its lease), `known/<name>`: every
//!   node that ever joined (no lease), so a down node still shows as down;
//! - `attach/<volume id>`: `{node, volume}` under the holder's lease; its
//!   mod revision is the attach generation;
//! - `replicas/<volume id>/<node>`: that replica's state;
//! - `incarnations/<volume id>/<node>`: the incarnation (hex) the attached
//!   node last met that replica with (see `replication::Incarnation`);
//! - `snapshots/<volume id>/<name>`: a snapshot taken on every replica
//!   (its time and the nodes holding it).
//!
//! The rest of the daemon is synchronous, so is this API. etcd-client is
//! async: every call runs as a task on a runtime owned by the [`Cluster`]
//! and the caller waits on a plain channel, which works from any thread,
//! including one inside another tokio runtime (actix), where `block_on`
//! would panic.
//!
//! This file holds the keys, the records and [`Cluster`]'s setup; its
//! methods are split by concern: `membership.rs`, `attach.rs`,
//! `replicas.rs` (states, placement, replica moves), `snapshots.rs`;
//! `catalog.rs` is the etcd [`Catalog`](crate::catalog::Catalog).

mod attach;
mod behind;
mod catalog;
mod membership;
pub mod placement;
mod replace;
mod replicas;
mod snapshots;

pub use behind::Behind;
pub use catalog::EtcdCatalog;
pub use placement::{place, PlacementRequest};
pub use replace::{DownClock, ReplicaMap, Step, VolumeReplicas};

use membership::keepalive;

use crate::replication::{Generation, Incarnation, ReplicaState, StateStore, StateStoreError};
use chrono::{DateTime, Utc};
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, GetOptions, KeyValue,
    LeaseKeepAliveStream, LeaseKeeper, PutOptions, Txn, TxnOp, TxnOpResponse, TxnResponse,
};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};

const PREFIX: &str = "/dunnage/";
/// Longest wait for one etcd request.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a waiting `acquire_attach` looks again.
const ATTACH_POLL: Duration = Duration::from_millis(250);

fn volume_key(name: &str) -> String {
    format!("{PREFIX}volumes/{name}")
}
fn volumes_prefix() -> String {
    format!("{PREFIX}volumes/")
}
fn node_key(node: &str) -> String {
    format!("{PREFIX}nodes/{node}")
}
fn known_key(node: &str) -> String {
    format!("{PREFIX}known/{node}")
}
/// Present while the node is cordoned: placement puts no new replica there.
fn cordon_key(node: &str) -> String {
    format!("{PREFIX}cordoned/{node}")
}
fn attach_key(volume_id: &str) -> String {
    format!("{PREFIX}attach/{volume_id}")
}
/// A transaction whose operations run only while `generation` holds the
/// attach of `volume_id` (else its `or_else` ones).
fn while_holding(volume_id: &str, generation: Generation) -> Txn {
    Txn::new().when([Compare::mod_revision(
        attach_key(volume_id),
        CompareOp::Equal,
        generation as i64,
    )])
}

/// Set while an attach holds the volume (to its generation), deleted by the
/// release: found set by the next attach, the last one ended unreleased.
fn unreleased_key(volume_id: &str) -> String {
    format!("{PREFIX}unreleased/{volume_id}")
}
/// The generation of the last attach that reached every replica then in
/// sync (`StateStore::reached`): each has seen it, so one found older was
/// rolled back.
fn reached_key(volume_id: &str) -> String {
    format!("{PREFIX}reached/{volume_id}")
}
/// With the trailing slash, so that one id is never a prefix of another's keys.
fn replicas_prefix(volume_id: &str) -> String {
    format!("{PREFIX}replicas/{volume_id}/")
}
fn snapshots_prefix(volume_id: &str) -> String {
    format!("{PREFIX}snapshots/{volume_id}/")
}
/// Beside the replica states, not in their records: the states have many
/// writers (attach, restore, replica changes), the incarnation only the
/// mirror that met the replica.
fn incarnations_prefix(volume_id: &str) -> String {
    format!("{PREFIX}incarnations/{volume_id}/")
}

#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// This node's name, unique in the cluster.
    pub node: String,
    /// Where this node's peers reach it (replication).
    pub listen: SocketAddr,
    /// etcd client URLs (`http://host:2379`).
    pub etcd: Vec<String>,
    /// Lease time to live, in whole seconds (rounded up): a node cut off
    /// from etcd for this long loses its membership and attaches.
    pub lease_ttl: Duration,
    /// How to prove who this node is to etcd, and to check etcd's
    /// certificate: nothing for a plain etcd.
    pub security: EtcdSecurity,
    /// The failure domain (rack, room, zone) this node is in: placement
    /// puts a volume's replicas in distinct ones where it can.
    pub zone: Option<String>,
}

/// etcd's own authentication (a user and password) and TLS (`https://`
/// endpoints: the CA that etcd's certificate chains to, and this node's
/// client certificate where etcd checks them).
#[derive(Clone, Default)]
pub struct EtcdSecurity {
    pub user: Option<(String, zeroize::Zeroizing<String>)>,
    /// PEM.
    pub ca: Option<Vec<u8>>,
    /// PEM certificate and key.
    pub identity: Option<(Vec<u8>, zeroize::Zeroizing<Vec<u8>>)>,
}

impl std::fmt::Debug for EtcdSecurity {
    /// Never the password or the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdSecurity")
            .field("user", &self.user.as_ref().map(|(u, _)| u))
            .field("ca", &self.ca.is_some())
            .field("identity", &self.identity.is_some())
            .finish()
    }
}

impl EtcdSecurity {
    fn apply(&self, mut opts: ConnectOptions) -> ConnectOptions {
        if let Some((user, password)) = &self.user {
            opts = opts
                .with_user(user.clone(), password.as_str())
                .with_auto_token_refresh(true);
        }
        if self.ca.is_some() || self.identity.is_some() {
            let mut tls = etcd_client::TlsOptions::new();
            if let Some(ca) = &self.ca {
                tls = tls.ca_certificate(etcd_client::Certificate::from_pem(ca));
            }
            if let Some((cert, key)) = &self.identity {
                tls = tls.identity(etcd_client::Identity::from_pem(cert, key.as_slice()));
            }
            opts = opts.with_tls(tls);
        }
        opts
    }
}

/// etcd's answers that mean it wants (other) credentials from this node.
fn is_refused_credentials(reason: &str) -> bool {
    [
        "user name is empty",
        "authentication failed",
        "invalid auth token",
        "permission denied",
        "invalid user ID",
    ]
    .iter()
    .any(|m| reason.contains(m))
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Member {
    pub name: String,
    pub addr: SocketAddr,
    /// Its lease-backed key is present: the node is alive.
    pub up: bool,
    pub started_at: DateTime<Utc>,
    /// Placement puts no new replica on it (`dunnage node cordon`).
    #[serde(default)]
    pub cordoned: bool,
    /// Its data directory's filesystem, as it last reported it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<Capacity>,
    /// Its failure domain (`serve --zone`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cannot reach etcd at {endpoints}: {reason}; check that etcd is running and that the cluster's etcd URLs point at it")]
    Unreachable { endpoints: String, reason: String },
    #[error("etcd at {endpoints} refused this node's credentials ({reason}): start dunnage serve with --etcd-user and --etcd-password-file naming an etcd user that may read and write the keys under /dunnage/")]
    Credentials { endpoints: String, reason: String },
    #[error("volume {volume} is attached on node {node}; detach it there first (stop the containers using it), or, if {node} is down, retry once its etcd lease has expired")]
    HeldBy { volume: String, node: String },
    /// Held by a background resync, which stops when asked.
    #[error("volume {volume} is held by a background resync on node {node} (it is attached nowhere), which did not give way when asked; retry, and if it persists, restart dunnage serve on {node}")]
    HeldForResync { volume: String, node: String },
    #[error("fenced: volume {volume} is no longer attached with generation {generation} (another node has taken it over); this node must stop writing to it")]
    Fenced {
        volume: String,
        generation: Generation,
    },
    #[error("another live node is registered in etcd as {node} with a different address; give each node its own name, or stop the other daemon first")]
    NameTaken { node: String },
    #[error("cannot place the replicas: {0}")]
    Placement(String),
    /// A node command (`cordon`, `rm`) that cannot be done as asked.
    #[error("{0}")]
    Node(String),
    #[error("node {node} has lost its etcd lease (cut off from etcd for longer than the lease TTL); it registers again as soon as etcd answers; retry then")]
    LeaseLost { node: String },
    #[error("etcd key {key} holds damaged data ({reason}); fix or delete it with etcdctl")]
    Corrupt { key: String, reason: String },
    #[error("invalid cluster setting: {0}")]
    Config(String),
    #[error("etcd refused the request: {0}")]
    Etcd(String),
    #[error("snapshot {snapshot} of volume {volume} is not kept: node {node}'s replica was replaced while it was taken (its files were lost, and the new image does not hold it); take it again")]
    ReplicaChanged {
        volume: String,
        snapshot: String,
        node: String,
    },
}

/// A member key's value (both `nodes/` and `known/`).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct MemberRecord {
    name: String,
    addr: SocketAddr,
    started_at: DateTime<Utc>,
    /// Its data directory's filesystem, as last reported (each sweep).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    capacity: Option<Capacity>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    zone: Option<String>,
}

/// A node's data directory's filesystem: size and free bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capacity {
    pub total_bytes: u64,
    pub free_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct AttachRecord {
    node: String,
    volume: String,
    /// Held by a background resync of a volume attached nowhere, which
    /// gives way to any attach (see [`ClusterError::HeldForResync`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    resync: bool,
}

/// Who holds a volume's attach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub node: String,
    pub generation: Generation,
    /// A background resync of a volume attached nowhere (it gives way).
    pub resync: bool,
}

/// What [`Cluster::change_replicas`] does to a volume's replicas.
#[derive(Debug, Clone, Copy)]
pub enum ReplicaChange<'a> {
    Add(&'a str),
    /// Add `node`'s, recorded as replacing `replaces`'s (its node stayed
    /// down): that one is removed once `node`'s is in sync.
    Replace {
        node: &'a str,
        replaces: &'a str,
    },
    Remove(&'a str),
}

/// A snapshot of a replicated volume, as etcd records it once every
/// replica took it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    /// From the key, not stored in the value.
    #[serde(skip)]
    pub name: String,
    pub created_at: DateTime<Utc>,
    /// The nodes whose replicas hold it.
    pub nodes: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ReplicaRecord {
    state: ReplicaState,
    /// The attach generation that recorded it (0: set at create time).
    #[serde(default)]
    generation: Generation,
}

/// This node's lease as the keepalive task sees it.
struct Lease {
    id: i64,
    /// When the newest acknowledged keepalive was *sent*: the server renewed
    /// the lease after that, so `last_ok + ttl` never overestimates its life.
    last_ok: Instant,
    lost: bool,
}

type Callback = Arc<dyn Fn() + Send + Sync>;

/// What the runtime's tasks share with the synchronous side.
struct Shared {
    node: String,
    addr: SocketAddr,
    zone: Option<String>,
    endpoints: String,
    ttl: Duration,
    started_at: DateTime<Utc>,
    client: Client,
    lease: Mutex<Lease>,
    callbacks: Mutex<Vec<Callback>>,
    /// Test hook: keepalives (and re-registration) stop, as if cut off.
    paused: AtomicBool,
    stopped: AtomicBool,
    wake: tokio::sync::Notify,
}

/// Shuts the runtime down without waiting: dropping a runtime blocks, which
/// panics inside another runtime's thread (an actix thread).
struct RuntimeGuard(Option<tokio::runtime::Runtime>);

impl Drop for RuntimeGuard {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// This node's handle on the cluster. Every method blocks for at most a few
/// seconds (one etcd request, or `wait` in [`Cluster::acquire_attach`]).
pub struct Cluster {
    shared: Arc<Shared>,
    handle: tokio::runtime::Handle,
    _runtime: RuntimeGuard,
}

/// Run `fut` on the cluster runtime and wait for it on this thread.
fn block_on<T, Fut>(
    handle: &tokio::runtime::Handle,
    endpoints: &str,
    fut: Fut,
) -> Result<T, ClusterError>
where
    T: Send + 'static,
    Fut: Future<Output = Result<T, ClusterError>> + Send + 'static,
{
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let endpoints = endpoints.to_string();
    handle.spawn(async move {
        let r = match tokio::time::timeout(CALL_TIMEOUT, fut).await {
            Ok(r) => r,
            Err(_) => Err(ClusterError::Unreachable {
                endpoints,
                reason: format!("no answer within {} s", CALL_TIMEOUT.as_secs()),
            }),
        };
        let _ = tx.send(r);
    });
    rx.recv()
        .unwrap_or_else(|_| Err(ClusterError::Etcd("the cluster runtime has stopped".into())))
}

fn is_unreachable(e: &etcd_client::Error) -> bool {
    use etcd_client::Error as E;
    match e {
        E::TransportError(_) | E::IoError(_) => true,
        // Unknown (2) is what a broken connection often surfaces as;
        // Cancelled (1), DeadlineExceeded (4), Unavailable (14).
        E::GRpcStatus(s) => matches!(i32::from(s.code()), 1 | 2 | 4 | 14),
        _ => false,
    }
}

fn parse<T: for<'de> Deserialize<'de>>(kv: &KeyValue) -> Result<T, ClusterError> {
    serde_json::from_slice(kv.value()).map_err(|e| ClusterError::Corrupt {
        key: String::from_utf8_lossy(kv.key()).into_owned(),
        reason: e.to_string(),
    })
}

fn to_json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("plain records serialise")
}

/// The revision a successful txn's writes got.
fn txn_revision(resp: &TxnResponse) -> Generation {
    resp.header().map_or(0, |h| h.revision()) as Generation
}

/// The key-values of the txn's `index`-th operation, a get.
/// A record that does not parse, logged and left out.
fn skip_bad<T>(parsed: Result<T, ClusterError>) -> Option<T> {
    parsed
        .map_err(|e| warn!(error = %e, "skipping a record"))
        .ok()
}

fn txn_kvs(resp: &TxnResponse, index: usize) -> Vec<KeyValue> {
    match resp.op_responses().into_iter().nth(index) {
        Some(TxnOpResponse::Get(mut g)) => g.take_kvs(),
        _ => Vec::new(),
    }
}

fn key_tail<'a>(kv: &'a KeyValue, prefix: &str) -> Option<&'a str> {
    kv.key_str().ok()?.strip_prefix(prefix)
}

impl Shared {
    fn error(&self, e: etcd_client::Error) -> ClusterError {
        let reason = e.to_string();
        if is_refused_credentials(&reason) {
            return ClusterError::Credentials {
                endpoints: self.endpoints.clone(),
                reason,
            };
        }
        if is_unreachable(&e) {
            ClusterError::Unreachable {
                endpoints: self.endpoints.clone(),
                reason: e.to_string(),
            }
        } else {
            ClusterError::Etcd(e.to_string())
        }
    }

    async fn get(&self, key: &str) -> Result<Option<KeyValue>, ClusterError> {
        let mut kv = self.client.kv_client();
        let mut resp = kv.get(key, None).await.map_err(|e| self.error(e))?;
        Ok(resp.take_kvs().into_iter().next())
    }

    async fn get_prefix(&self, prefix: &str) -> Result<Vec<KeyValue>, ClusterError> {
        let mut kv = self.client.kv_client();
        let mut resp = kv
            .get(prefix, Some(GetOptions::new().with_prefix()))
            .await
            .map_err(|e| self.error(e))?;
        Ok(resp.take_kvs())
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResponse, ClusterError> {
        let mut kv = self.client.kv_client();
        kv.txn(txn).await.map_err(|e| self.error(e))
    }
}

impl Cluster {
    /// Connect to etcd, grant this node's lease, register the member key,
    /// start keepalive. Fails (NameTaken) if a live member with this name
    /// but a different addr exists.
    pub fn connect(cfg: ClusterConfig) -> Result<Arc<Cluster>, ClusterError> {
        crate::spec::validate_name(&cfg.node)
            .map_err(|e| ClusterError::Config(format!("node name: {e}")))?;
        if cfg.etcd.is_empty() {
            return Err(ClusterError::Config(
                "no etcd endpoints given; name at least one etcd client URL".into(),
            ));
        }
        let ttl = Duration::from_secs(cfg.lease_ttl.as_secs_f64().ceil().max(1.0) as u64);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("dunnage-etcd")
            .enable_all()
            .build()
            .map_err(|e| {
                ClusterError::Etcd(format!("cannot start the etcd client runtime: {e}"))
            })?;
        let runtime = RuntimeGuard(Some(runtime));
        let handle = runtime.0.as_ref().expect("just built").handle().clone();
        let endpoints = cfg.etcd.join(",");

        let urls = cfg.etcd.clone();
        let eps = endpoints.clone();
        let security = cfg.security.clone();
        let client = block_on(&handle, &endpoints, async move {
            let opts = security
                .apply(ConnectOptions::new())
                .with_connect_timeout(CALL_TIMEOUT)
                // HTTP/2 pings find a dead connection so that it is made
                // again; etcd refuses pings more often than every 5 s, and
                // any without an open stream (the lease's is always open).
                .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
                .with_require_leader(true);
            Client::connect(urls, Some(opts)).await.map_err(|e| {
                let reason = e.to_string();
                if is_refused_credentials(&reason) {
                    ClusterError::Credentials {
                        endpoints: eps,
                        reason,
                    }
                } else {
                    ClusterError::Unreachable {
                        endpoints: eps,
                        reason,
                    }
                }
            })
        })?;

        let shared = Arc::new(Shared {
            node: cfg.node,
            addr: cfg.listen,
            zone: cfg.zone,
            endpoints,
            ttl,
            started_at: Utc::now(),
            client,
            lease: Mutex::new(Lease {
                id: 0,
                last_ok: Instant::now(),
                lost: true,
            }),
            callbacks: Mutex::new(Vec::new()),
            paused: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
            wake: tokio::sync::Notify::new(),
        });
        let cluster = Cluster {
            shared,
            handle,
            _runtime: runtime,
        };
        let sent = Instant::now();
        let id = cluster.run(|s| async move { s.register().await })?;
        *cluster.shared.lease.lock() = Lease {
            id,
            last_ok: sent,
            lost: false,
        };
        cluster.handle.spawn(keepalive(cluster.shared.clone()));
        info!(
            node = %cluster.shared.node,
            etcd = %cluster.shared.endpoints,
            lease_ttl_s = ttl.as_secs(),
            "joined the cluster"
        );
        Ok(Arc::new(cluster))
    }

    fn run<T, F, Fut>(&self, f: F) -> Result<T, ClusterError>
    where
        T: Send + 'static,
        F: FnOnce(Arc<Shared>) -> Fut,
        Fut: Future<Output = Result<T, ClusterError>> + Send + 'static,
    {
        block_on(&self.handle, &self.shared.endpoints, f(self.shared.clone()))
    }

    pub fn node(&self) -> &str {
        &self.shared.node
    }

    /// The catalog in etcd.
    pub fn catalog(self: &Arc<Self>) -> Arc<dyn crate::catalog::Catalog> {
        Arc::new(EtcdCatalog::new(self.clone()))
    }

    /// Leave the cluster: revoke the lease, so the member and attach keys go
    /// at once. Calls after this fail or read only.
    pub fn shutdown(&self) {
        if self.shared.stopped.swap(true, Ordering::SeqCst) {
            return;
        }
        self.shared.wake.notify_one();
        let id = self.shared.lease.lock().id;
        let revoked = self.run(move |s| async move {
            let mut leases = s.client.lease_client();
            leases.revoke(id).await.map_err(|e| s.error(e))
        });
        match revoked {
            Ok(_) => info!(node = %self.shared.node, "left the cluster"),
            Err(e) => {
                warn!(node = %self.shared.node, "cannot revoke the lease ({e}); the member and attach keys expire with its TTL")
            }
        }
    }
}

impl Drop for Cluster {
    /// Without [`Cluster::shutdown`] the lease is left to expire, as after a crash.
    fn drop(&mut self) {
        self.shared.stopped.store(true, Ordering::SeqCst);
        self.shared.wake.notify_one();
    }
}

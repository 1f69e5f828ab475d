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

mod behind;
mod catalog;
pub mod placement;

pub use behind::Behind;
pub use catalog::EtcdCatalog;
pub use placement::{place, PlacementRequest};

use crate::replication::{Generation, Incarnation, ReplicaState, StateStore, StateStoreError};
use chrono::{DateTime, Utc};
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, GetOptions, KeyValue,
    LeaseKeepAliveStream, LeaseKeeper, PutOptions, Txn, TxnOp, TxnOpResponse, TxnResponse,
};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
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
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Member {
    pub name: String,
    pub addr: SocketAddr,
    /// Its lease-backed key is present: the node is alive.
    pub up: bool,
    pub started_at: DateTime<Utc>,
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cannot reach etcd at {endpoints}: {reason}; check that etcd is running and that the cluster's etcd URLs point at it")]
    Unreachable { endpoints: String, reason: String },
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

enum AttachTry {
    Got(Generation),
    /// Held by `node`; `up` when that holder's lease is the one alive now.
    Busy {
        node: String,
        up: bool,
        resync: bool,
    },
    /// Changed under us; look again.
    Again,
}

impl Shared {
    fn error(&self, e: etcd_client::Error) -> ClusterError {
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

    fn member_record(&self) -> MemberRecord {
        MemberRecord {
            name: self.node.clone(),
            addr: self.addr,
            started_at: self.started_at,
        }
    }

    /// Grant a fresh lease and put this node's member keys under it.
    async fn register(&self) -> Result<i64, ClusterError> {
        let mut leases = self.client.lease_client();
        let ttl = self.ttl.as_secs() as i64;
        let id = leases
            .grant(ttl, None)
            .await
            .map_err(|e| self.error(e))?
            .id();
        let claimed = self.claim_name(id).await;
        if claimed.is_err() {
            let _ = leases.revoke(id).await;
        }
        claimed.map(|()| id)
    }

    async fn claim_name(&self, lease: i64) -> Result<(), ClusterError> {
        let key = node_key(&self.node);
        let value = to_json(&self.member_record());
        for _ in 0..10 {
            // A live key with another address is another daemon; with this
            // address it is an earlier run of this node (whose lease has
            // not expired yet), which this one replaces.
            let guard = match self.get(&key).await? {
                Some(kv) => {
                    let other: MemberRecord = parse(&kv)?;
                    if other.addr != self.addr {
                        return Err(ClusterError::NameTaken {
                            node: self.node.clone(),
                        });
                    }
                    Compare::mod_revision(key.as_str(), CompareOp::Equal, kv.mod_revision())
                }
                None => Compare::create_revision(key.as_str(), CompareOp::Equal, 0),
            };
            let txn = Txn::new().when([guard]).and_then([
                TxnOp::put(
                    key.as_str(),
                    value.clone(),
                    Some(PutOptions::new().with_lease(lease)),
                ),
                TxnOp::put(known_key(&self.node), value.clone(), None),
            ]);
            if self.txn(txn).await?.succeeded() {
                return Ok(());
            }
        }
        Err(ClusterError::Etcd(format!(
            "the member key of node {} kept changing while this node registered; is another daemon starting with the same name?",
            self.node
        )))
    }

    /// One keepalive round trip. `Ok(false)`: etcd says the lease is gone.
    async fn keep_once(
        &self,
        id: i64,
        slot: &mut Option<(i64, LeaseKeeper, LeaseKeepAliveStream)>,
    ) -> Result<bool, etcd_client::Error> {
        if let Some((sid, keeper, stream)) = slot.as_mut() {
            if *sid == id {
                keeper.keep_alive().await?;
                return match stream.message().await? {
                    Some(resp) => Ok(resp.ttl() > 0),
                    None => Err(etcd_client::Error::LeaseKeepAliveError(
                        "the keepalive stream closed".into(),
                    )),
                };
            }
        }
        // Opening the stream sends the first keepalive and waits for its answer.
        match self.client.lease_client().keep_alive(id).await {
            Ok((keeper, stream)) => {
                *slot = Some((id, keeper, stream));
                Ok(true)
            }
            Err(etcd_client::Error::LeaseKeepAliveError(m)) if m.contains("not found") => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Mark the lease lost (once) and tell the callbacks, off the runtime's
    /// workers: a callback may block, or call back into the cluster.
    fn lose(&self, why: &str) {
        {
            let mut lease = self.lease.lock();
            if lease.lost || self.stopped.load(Ordering::SeqCst) {
                return;
            }
            lease.lost = true;
        }
        warn!(node = %self.node, "etcd lease lost: {why}; this node must stop writing to its attached volumes");
        let callbacks = self.callbacks.lock().clone();
        tokio::task::spawn_blocking(move || {
            for cb in callbacks {
                cb();
            }
        });
    }

    fn check_expiry(&self) {
        let expired = self.lease.lock().last_ok.elapsed() >= self.ttl;
        if expired {
            self.lose("no keepalive acknowledged within the lease TTL");
        }
    }

    async fn try_attach(
        &self,
        volume_id: &str,
        volume: &str,
        lease: i64,
        resync: bool,
    ) -> Result<AttachTry, ClusterError> {
        let key = attach_key(volume_id);
        let value = to_json(&AttachRecord {
            node: self.node.clone(),
            volume: volume.to_string(),
            resync,
        });
        let put = || {
            TxnOp::put(
                key.as_str(),
                value.clone(),
                Some(PutOptions::new().with_lease(lease)),
            )
        };
        // Take it if free, else read the holder: one round trip.
        let resp = self
            .txn(
                Txn::new()
                    .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
                    .and_then([put()])
                    .or_else([TxnOp::get(key.as_str(), None)]),
            )
            .await?;
        if resp.succeeded() {
            return Ok(AttachTry::Got(txn_revision(&resp)));
        }
        let Some(kv) = txn_kvs(&resp, 0).into_iter().next() else {
            return Ok(AttachTry::Again);
        };
        let holder: AttachRecord = parse(&kv)?;
        if holder.node == self.node {
            if kv.lease() == lease {
                // This node's resync and an attach never share a generation.
                if holder.resync != resync {
                    return Ok(AttachTry::Busy {
                        node: holder.node,
                        up: true,
                        resync: holder.resync,
                    });
                }
                return Ok(AttachTry::Got(kv.mod_revision() as Generation));
            }
            // An earlier run of this node attached it: take it over under
            // the current lease, as a new generation that fences the old.
            let resp = self
                .txn(
                    Txn::new()
                        .when([Compare::mod_revision(
                            key.as_str(),
                            CompareOp::Equal,
                            kv.mod_revision(),
                        )])
                        .and_then([put()]),
                )
                .await?;
            return Ok(if resp.succeeded() {
                AttachTry::Got(txn_revision(&resp))
            } else {
                AttachTry::Again
            });
        }
        // The holder is alive if its member key is under the very lease that
        // holds the attach key; if it restarted, its old lease is dying.
        let member = self.get(&node_key(&holder.node)).await?;
        let up = member.is_some_and(|m| m.lease() == kv.lease());
        Ok(AttachTry::Busy {
            node: holder.node,
            up,
            resync: holder.resync,
        })
    }
}

/// Keep the lease alive; when it is lost, tell the callbacks and register
/// again with a fresh lease until etcd answers.
async fn keepalive(shared: Arc<Shared>) {
    let period = (shared.ttl / 3).max(Duration::from_millis(200));
    let mut stream = None;
    let mut failures = 0u32;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = shared.wake.notified() => {}
        }
        if shared.stopped.load(Ordering::SeqCst) {
            return;
        }
        if shared.paused.load(Ordering::SeqCst) {
            stream = None;
            shared.check_expiry();
            continue;
        }
        let (id, lost) = {
            let lease = shared.lease.lock();
            (lease.id, lease.lost)
        };
        if lost {
            stream = None;
            let sent = Instant::now();
            match tokio::time::timeout(CALL_TIMEOUT, shared.register()).await {
                Ok(Ok(new)) => {
                    *shared.lease.lock() = Lease {
                        id: new,
                        last_ok: sent,
                        lost: false,
                    };
                    info!(node = %shared.node, "registered again in etcd with a new lease");
                    failures = 0;
                    // The old lease may outlive our count of it: end it now.
                    let mut leases = shared.client.lease_client();
                    let _ = tokio::time::timeout(CALL_TIMEOUT, leases.revoke(id)).await;
                }
                Ok(Err(e)) => {
                    failures += 1;
                    if failures == 1 || failures % 20 == 0 {
                        warn!(node = %shared.node, "cannot register in etcd again (attempt {failures}): {e}");
                    }
                }
                Err(_) => failures += 1,
            }
            continue;
        }
        let sent = Instant::now();
        match tokio::time::timeout(period, shared.keep_once(id, &mut stream)).await {
            Ok(Ok(true)) => {
                let mut lease = shared.lease.lock();
                if lease.id == id && !lease.lost {
                    lease.last_ok = sent;
                }
            }
            Ok(Ok(false)) => shared.lose("etcd reports the lease expired"),
            Ok(Err(e)) => {
                debug!(node = %shared.node, "lease keepalive failed: {e}");
                stream = None;
            }
            Err(_) => stream = None,
        }
        shared.check_expiry();
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
        let client = block_on(&handle, &endpoints, async move {
            let opts = ConnectOptions::new()
                .with_connect_timeout(CALL_TIMEOUT)
                // HTTP/2 pings find a dead connection so that it is made
                // again; etcd refuses pings more often than every 5 s, and
                // any without an open stream (the lease's is always open).
                .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
                .with_require_leader(true);
            Client::connect(urls, Some(opts))
                .await
                .map_err(|e| ClusterError::Unreachable {
                    endpoints: eps,
                    reason: e.to_string(),
                })
        })?;

        let shared = Arc::new(Shared {
            node: cfg.node,
            addr: cfg.listen,
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

    /// Every volume in the catalog: its id and its replicas' nodes. Unlike
    /// the catalog's `list`, an error when etcd does not answer (a replica sweep must never take
    /// an unreachable etcd for an empty catalog).
    pub fn volume_replicas(
        &self,
    ) -> Result<std::collections::HashMap<String, Vec<String>>, ClusterError> {
        let prefix = volumes_prefix();
        let kvs = self.run(|s| async move { s.get_prefix(&prefix).await })?;
        let mut out = std::collections::HashMap::new();
        for kv in kvs {
            let r = parse::<crate::catalog::VolumeRecord>(&kv)?;
            out.insert(r.id, r.replicas);
        }
        Ok(out)
    }

    /// Volumes attached nowhere (no attach, no resync) with a replica not
    /// in sync, and the live members' names: one txn, one revision.
    pub fn detached_behind(
        &self,
    ) -> Result<(Vec<Behind>, std::collections::BTreeSet<String>), ClusterError> {
        let (resp, held) = self.read_detached(vec![
            format!("{PREFIX}replicas/"),
            format!("{PREFIX}nodes/"),
        ])?;
        let mut states: std::collections::HashMap<String, BTreeMap<String, ReplicaState>> =
            Default::default();
        let replicas = format!("{PREFIX}replicas/");
        for kv in txn_kvs(&resp, 2) {
            let Some((id, node)) = key_tail(&kv, &replicas).and_then(|t| t.split_once('/')) else {
                continue;
            };
            // One unreadable record must not stop the others' resyncs.
            let Some(r) = skip_bad(parse::<ReplicaRecord>(&kv)) else {
                continue;
            };
            states
                .entry(id.to_string())
                .or_default()
                .insert(node.to_string(), r.state);
        }
        let mut behind = Vec::new();
        for kv in txn_kvs(&resp, 0) {
            let Some(r) = skip_bad(parse::<crate::catalog::VolumeRecord>(&kv)) else {
                continue;
            };
            if held.contains(&r.id) {
                continue;
            }
            let b = Behind {
                states: states.remove(&r.id).unwrap_or_default(),
                name: r.name,
                id: r.id,
                replicas: r.replicas,
            };
            if b.is_behind() {
                behind.push(b);
            }
        }
        let mut up = std::collections::BTreeSet::new();
        for kv in txn_kvs(&resp, 3) {
            if let Some(m) = skip_bad(parse::<MemberRecord>(&kv)) {
                up.insert(m.name);
            }
        }
        Ok((behind, up))
    }

    /// One txn (one revision): the volume records (range 0), the attach keys
    /// (1), then everything under each of `more` (2, 3, …); and the ids
    /// attached or resyncing somewhere.
    fn read_detached(
        &self,
        more: Vec<String>,
    ) -> Result<(TxnResponse, std::collections::HashSet<String>), ClusterError> {
        let resp = self.run(|s| async move {
            let all = |p: String| TxnOp::get(p, Some(GetOptions::new().with_prefix()));
            let mut ops = vec![all(volumes_prefix()), all(format!("{PREFIX}attach/"))];
            ops.extend(more.into_iter().map(all));
            s.txn(Txn::new().and_then(ops)).await
        })?;
        let held = txn_kvs(&resp, 1)
            .iter()
            .filter_map(|kv| key_tail(kv, &format!("{PREFIX}attach/")).map(str::to_string))
            .collect();
        Ok((resp, held))
    }

    /// The volumes attached nowhere (no attach, no resync) with a replica on
    /// `node` whose incarnation is recorded, as (name, id, incarnation):
    /// what `node` compares with its replicas' files.
    pub fn detached_met_on(
        &self,
        node: &str,
    ) -> Result<Vec<(String, String, Incarnation)>, ClusterError> {
        let (resp, held) = self.read_detached(vec![format!("{PREFIX}incarnations/")])?;
        let incarnations = format!("{PREFIX}incarnations/");
        let mut met = std::collections::HashMap::new();
        for kv in txn_kvs(&resp, 2) {
            let Some((id, n)) = key_tail(&kv, &incarnations).and_then(|t| t.split_once('/')) else {
                continue;
            };
            let value = kv.value_str().unwrap_or_default().trim();
            if let (true, Ok(inc)) = (n == node, Incarnation::from_str_radix(value, 16)) {
                met.insert(id.to_string(), inc);
            }
        }
        let mut out = Vec::new();
        for kv in txn_kvs(&resp, 0) {
            let Some(r) = skip_bad(parse::<crate::catalog::VolumeRecord>(&kv)) else {
                continue;
            };
            if held.contains(&r.id) || !r.replicas.iter().any(|n| n == node) {
                continue;
            }
            if let Some(&inc) = met.get(&r.id) {
                out.push((r.name, r.id, inc));
            }
        }
        Ok(out)
    }

    /// Every node that ever joined; `up` when its lease-backed key is present.
    pub fn members(&self) -> Result<Vec<Member>, ClusterError> {
        let (known, live) = self.run(|s| async move {
            // One txn: both ranges from the same revision.
            let resp = s
                .txn(Txn::new().and_then([
                    TxnOp::get(
                        format!("{PREFIX}known/"),
                        Some(GetOptions::new().with_prefix()),
                    ),
                    TxnOp::get(
                        format!("{PREFIX}nodes/"),
                        Some(GetOptions::new().with_prefix()),
                    ),
                ]))
                .await?;
            Ok((txn_kvs(&resp, 0), txn_kvs(&resp, 1)))
        })?;
        let mut members: BTreeMap<String, Member> = BTreeMap::new();
        for (kvs, up) in [(known, false), (live, true)] {
            for kv in kvs {
                let r: MemberRecord = parse(&kv)?;
                members.insert(
                    r.name.clone(),
                    Member {
                        name: r.name,
                        addr: r.addr,
                        up,
                        started_at: r.started_at,
                    },
                );
            }
        }
        Ok(members.into_values().collect())
    }

    /// The address of `node` if it is up.
    pub fn member_addr(&self, node: &str) -> Result<Option<SocketAddr>, ClusterError> {
        let key = node_key(node);
        let kv = self.run(|s| async move { s.get(&key).await })?;
        kv.map(|kv| parse::<MemberRecord>(&kv).map(|r| r.addr))
            .transpose()
    }

    /// False once keepalives have failed for longer than the TTL: this
    /// node's attach keys are then gone (or about to be).
    pub fn lease_alive(&self) -> bool {
        if self.shared.stopped.load(Ordering::SeqCst) {
            return false;
        }
        let lease = self.shared.lease.lock();
        !lease.lost && lease.last_ok.elapsed() < self.shared.ttl
    }

    /// `f` is called, on a cluster thread, each time the lease is lost; the
    /// node must then stop writing. It registers again by itself.
    pub fn on_lease_lost(&self, f: Box<dyn Fn() + Send + Sync>) {
        self.shared.callbacks.lock().push(Arc::from(f));
    }

    fn live_lease(&self) -> Result<i64, ClusterError> {
        if !self.lease_alive() {
            return Err(ClusterError::LeaseLost {
                node: self.shared.node.clone(),
            });
        }
        Ok(self.shared.lease.lock().id)
    }

    /// Take attach ownership of a volume. If another node holds it and that
    /// node's member key is gone, wait up to `wait` for its (lease-backed)
    /// attach key to expire, then take it. Err(HeldBy) naming the holder
    /// otherwise. Re-acquire by the same node returns the current generation
    /// (a new one if an earlier run of this node held it).
    pub fn acquire_attach(
        &self,
        volume_id: &str,
        volume: &str,
        wait: Duration,
    ) -> Result<Generation, ClusterError> {
        self.acquire(volume_id, volume, wait, false)
    }

    /// The attach for a background resync of a volume attached nowhere:
    /// like an attach (its generation fences older ones), but any attach
    /// may ask it to give way ([`ClusterError::HeldForResync`]).
    pub fn acquire_attach_for_resync(
        &self,
        volume_id: &str,
        volume: &str,
    ) -> Result<Generation, ClusterError> {
        self.acquire(volume_id, volume, Duration::ZERO, true)
    }

    fn acquire(
        &self,
        volume_id: &str,
        volume: &str,
        wait: Duration,
        resync: bool,
    ) -> Result<Generation, ClusterError> {
        let deadline = Instant::now() + wait;
        let mut races = 0;
        loop {
            let lease = self.live_lease()?;
            let (vid, vol) = (volume_id.to_string(), volume.to_string());
            let got =
                self.run(move |s| async move { s.try_attach(&vid, &vol, lease, resync).await })?;
            match got {
                AttachTry::Got(generation) => {
                    debug!(volume, generation, "attach acquired");
                    return Ok(generation);
                }
                AttachTry::Again => {
                    races += 1;
                    if races == 20 {
                        return Err(ClusterError::Etcd(format!(
                            "the attach key of volume {volume} kept changing while this node took it; retry"
                        )));
                    }
                }
                AttachTry::Busy { node, up, resync } => {
                    let now = Instant::now();
                    if up && resync {
                        return Err(ClusterError::HeldForResync {
                            volume: volume.to_string(),
                            node,
                        });
                    }
                    if up || now >= deadline {
                        return Err(ClusterError::HeldBy {
                            volume: volume.to_string(),
                            node,
                        });
                    }
                    std::thread::sleep(ATTACH_POLL.min(deadline - now));
                }
            }
        }
    }

    /// Record that the attach at `generation` (which this node holds) is
    /// not released yet, and say whether an earlier one never was: its
    /// node was killed or cut off, so writes it had in flight may have
    /// reached some replicas only. Fenced if `generation` lost the attach.
    pub fn mark_unreleased(
        &self,
        volume_id: &str,
        generation: Generation,
    ) -> Result<bool, ClusterError> {
        let mark = unreleased_key(volume_id);
        let txn = while_holding(volume_id, generation).and_then([
            TxnOp::get(mark.as_str(), None),
            TxnOp::put(mark.as_str(), generation.to_string(), None),
        ]);
        let resp = self.run(move |s| async move { s.txn(txn).await })?;
        if !resp.succeeded() {
            return Err(ClusterError::Fenced {
                volume: volume_id.to_string(),
                generation,
            });
        }
        // Set by this very attach (taken again by the same daemon): released since.
        let earlier = txn_kvs(&resp, 0)
            .first()
            .map(|kv| kv.value_str().ok() != Some(generation.to_string().as_str()));
        Ok(earlier.unwrap_or(false))
    }

    /// Give up attach ownership, if `generation` still holds it. Releasing a
    /// volume nobody holds is fine; one held at another generation is Fenced.
    pub fn release_attach(
        &self,
        volume_id: &str,
        generation: Generation,
    ) -> Result<(), ClusterError> {
        self.release(volume_id, generation, true)
    }

    /// [`Self::release_attach`], but the unreleased mark an earlier attach
    /// left stays: this attach did not finish comparing the replicas, so
    /// the next one must.
    pub fn release_attach_unverified(
        &self,
        volume_id: &str,
        generation: Generation,
    ) -> Result<(), ClusterError> {
        self.release(volume_id, generation, false)
    }

    fn release(
        &self,
        volume_id: &str,
        generation: Generation,
        clear_mark: bool,
    ) -> Result<(), ClusterError> {
        let (key, mark) = (attach_key(volume_id), unreleased_key(volume_id));
        let mut ops = vec![TxnOp::delete(key.as_str(), None)];
        if clear_mark {
            ops.push(TxnOp::delete(mark.as_str(), None));
        }
        let txn = while_holding(volume_id, generation)
            .and_then(ops)
            .or_else([TxnOp::get(key.as_str(), None)]);
        let resp = self.run(move |s| async move { s.txn(txn).await })?;
        if resp.succeeded() || txn_kvs(&resp, 0).is_empty() {
            return Ok(());
        }
        Err(ClusterError::Fenced {
            volume: volume_id.to_string(),
            generation,
        })
    }

    /// Who holds the volume, at which generation (a background resync
    /// included: see [`Cluster::attach_owner`]).
    pub fn attach_holder(&self, volume_id: &str) -> Result<Option<Holder>, ClusterError> {
        let key = attach_key(volume_id);
        let kv = self.run(|s| async move { s.get(&key).await })?;
        kv.map(|kv| {
            parse::<AttachRecord>(&kv).map(|r| Holder {
                node: r.node,
                generation: kv.mod_revision() as Generation,
                resync: r.resync,
            })
        })
        .transpose()
    }

    /// Delete a resync attach of this node that no resync job holds any
    /// more (its release failed, and this node's lease lives on). Only that
    /// record, at that revision: never an attach. Whether one was deleted.
    pub fn drop_stale_resync_attach(&self, volume_id: &str) -> Result<bool, ClusterError> {
        let key = attach_key(volume_id);
        let k = key.clone();
        let Some(kv) = self.run(|s| async move { s.get(&k).await })? else {
            return Ok(false);
        };
        let r: AttachRecord = parse(&kv)?;
        if r.node != self.shared.node || !r.resync {
            return Ok(false);
        }
        let txn = Txn::new()
            .when([Compare::mod_revision(
                key.as_str(),
                CompareOp::Equal,
                kv.mod_revision(),
            )])
            .and_then([TxnOp::delete(key.as_str(), None)]);
        self.run(move |s| async move { Ok(s.txn(txn).await?.succeeded()) })
    }

    /// The node the volume is attached on, and its generation: `None`
    /// when nothing holds it or a background resync does.
    pub fn attach_owner(
        &self,
        volume_id: &str,
    ) -> Result<Option<(String, Generation)>, ClusterError> {
        Ok(self
            .attach_holder(volume_id)?
            .filter(|h| !h.resync)
            .map(|h| (h.node, h.generation)))
    }

    /// The values under `prefix` by the key's last part (a node name),
    /// each read by `value`.
    fn per_node<T>(
        &self,
        prefix: String,
        value: impl Fn(&KeyValue, &str) -> Result<T, ClusterError>,
    ) -> Result<BTreeMap<String, T>, ClusterError> {
        let p = prefix.clone();
        let kvs = self.run(|s| async move { s.get_prefix(&p).await })?;
        let mut out = BTreeMap::new();
        for kv in kvs {
            if let Some(node) = key_tail(&kv, &prefix) {
                out.insert(node.to_string(), value(&kv, node)?);
            }
        }
        Ok(out)
    }

    /// The stored replica states, by node. A node without a stored state is
    /// absent (nothing is assumed about it).
    pub fn replica_states(
        &self,
        volume_id: &str,
    ) -> Result<BTreeMap<String, ReplicaState>, ClusterError> {
        self.per_node(replicas_prefix(volume_id), |kv, _| {
            Ok(parse::<ReplicaRecord>(kv)?.state)
        })
    }

    /// The incarnation recorded for each replica of the volume (hex values).
    pub fn replica_incarnations(
        &self,
        volume_id: &str,
    ) -> Result<BTreeMap<String, Incarnation>, ClusterError> {
        self.per_node(incarnations_prefix(volume_id), |kv, node| {
            let text = kv.value_str().unwrap_or_default().trim();
            // Unreadable: recorded, but no image's (0), so the replica is
            // resynced whole rather than every attach refused.
            Ok(Incarnation::from_str_radix(text, 16).unwrap_or_else(|_| {
                warn!(
                    volume_id,
                    node,
                    value = text,
                    "unreadable replica incarnation in etcd: taking the replica for another image"
                );
                0
            }))
        })
    }

    /// Record the incarnation of `node`'s replica, only while the volume's
    /// attach key is still at `generation` (Err(Fenced) otherwise). A
    /// `replaced` one (another image than recorded) holds no snapshot: in
    /// the same transaction, `node` leaves the snapshot records.
    pub fn set_replica_incarnation(
        &self,
        volume_id: &str,
        generation: Generation,
        node: &str,
        incarnation: Incarnation,
        replaced: bool,
    ) -> Result<(), ClusterError> {
        const TRIES: usize = 20;
        let fenced = || ClusterError::Fenced {
            volume: volume_id.to_string(),
            generation,
        };
        // A missing key compares as revision 0: never a valid guard.
        if generation == 0 {
            return Err(fenced());
        }
        let key = format!("{}{node}", incarnations_prefix(volume_id));
        for _ in 0..TRIES {
            let (mut ops, mut when) = if replaced {
                self.snapshots_without(volume_id, node)?
            } else {
                (Vec::new(), Vec::new())
            };
            ops.push(TxnOp::put(
                key.as_str(),
                format!("{incarnation:016x}"),
                None,
            ));
            when.push(Compare::mod_revision(
                attach_key(volume_id),
                CompareOp::Equal,
                generation as i64,
            ));
            let txn = Txn::new().when(when).and_then(ops);
            if self.run(move |s| async move { Ok(s.txn(txn).await?.succeeded()) })? {
                return Ok(());
            }
            if self.attach_holder(volume_id)?.map(|h| h.generation) != Some(generation) {
                return Err(fenced());
            }
        }
        Err(ClusterError::Etcd(format!(
            "the snapshot records of volume {volume_id} kept changing under {TRIES} attempts to record node {node}'s replica replaced; retry"
        )))
    }

    /// The volume's snapshot records that list `node`, rewritten without
    /// it, and the compares that hold the transaction to the records read:
    /// one changed or deleted meanwhile fails it, to be read again.
    fn snapshots_without(
        &self,
        volume_id: &str,
        node: &str,
    ) -> Result<(Vec<TxnOp>, Vec<Compare>), ClusterError> {
        let prefix = snapshots_prefix(volume_id);
        let p = prefix.clone();
        let kvs = self.run(|s| async move { s.get_prefix(&p).await })?;
        let (mut ops, mut when) = (Vec::new(), Vec::new());
        for kv in kvs {
            let Some(name) = key_tail(&kv, &prefix) else {
                continue;
            };
            let mut snap: SnapshotRecord = parse(&kv)?;
            if snap.nodes.iter().any(|r| r == node) {
                snap.nodes.retain(|r| r != node);
                let key = format!("{prefix}{name}");
                when.push(Compare::mod_revision(
                    key.as_str(),
                    CompareOp::Equal,
                    kv.mod_revision(),
                ));
                ops.push(TxnOp::put(key, to_json(&snap), None));
            }
        }
        Ok((ops, when))
    }

    /// Record `node`'s replica state, only while the volume's attach key is
    /// still at `generation` (Err(Fenced) otherwise), in one etcd txn.
    pub fn set_replica_state(
        &self,
        volume_id: &str,
        generation: Generation,
        node: &str,
        state: ReplicaState,
    ) -> Result<(), ClusterError> {
        let key = format!("{}{node}", replicas_prefix(volume_id));
        let value = to_json(&ReplicaRecord { state, generation });
        self.put_holding(volume_id, generation, TxnOp::put(key, value, None))
    }

    /// Record that the attach at `generation` reached every replica then
    /// in sync (see [`reached_key`]).
    pub fn set_reached(&self, volume_id: &str, generation: Generation) -> Result<(), ClusterError> {
        let op = TxnOp::put(reached_key(volume_id), generation.to_string(), None);
        self.put_holding(volume_id, generation, op)
    }

    /// The generation [`Self::set_reached`] recorded last; 0 if none (or
    /// unreadable: then no replica is taken for rolled back).
    pub fn reached(&self, volume_id: &str) -> Result<Generation, ClusterError> {
        let key = reached_key(volume_id);
        let Some(kv) = self.run(|s| async move { s.get(&key).await })? else {
            return Ok(0);
        };
        let text = kv.value_str().unwrap_or_default().trim();
        Ok(text.parse().unwrap_or_else(|_| {
            warn!(
                volume_id,
                value = text,
                "unreadable reached generation in etcd: ignored"
            );
            0
        }))
    }

    /// `dunnage replica accept`: while `generation` holds the attach,
    /// record `node`'s replica in sync and every other one outdated, in one
    /// transaction. The others' incarnations are forgotten, so that the
    /// next attach copies them whole: their activity logs may have been
    /// cleared of writes the accepted replica lacks. So is the reached
    /// generation: the accepted replica may have seen an older one.
    pub fn accept_replica(
        &self,
        volume_id: &str,
        generation: Generation,
        node: &str,
        others: &[String],
    ) -> Result<(), ClusterError> {
        if generation == 0 {
            return Err(ClusterError::Fenced {
                volume: volume_id.to_string(),
                generation,
            });
        }
        let record = |state| to_json(&ReplicaRecord { state, generation });
        let mut ops = vec![
            TxnOp::put(
                format!("{}{node}", replicas_prefix(volume_id)),
                record(ReplicaState::InSync),
                None,
            ),
            TxnOp::delete(reached_key(volume_id), None),
        ];
        for n in others {
            ops.push(TxnOp::put(
                format!("{}{n}", replicas_prefix(volume_id)),
                record(ReplicaState::Outdated),
                None,
            ));
            ops.push(TxnOp::delete(
                format!("{}{n}", incarnations_prefix(volume_id)),
                None,
            ));
        }
        let txn = while_holding(volume_id, generation).and_then(ops);
        if self.run(move |s| async move { Ok(s.txn(txn).await?.succeeded()) })? {
            Ok(())
        } else {
            Err(ClusterError::Fenced {
                volume: volume_id.to_string(),
                generation,
            })
        }
    }

    /// Unguarded initial states at create time (all InSync for a new, empty volume).
    pub fn init_replica_states(
        &self,
        volume_id: &str,
        nodes: &[String],
    ) -> Result<(), ClusterError> {
        let ops: Vec<TxnOp> = nodes
            .iter()
            .map(|n| {
                TxnOp::put(
                    format!("{}{n}", replicas_prefix(volume_id)),
                    to_json(&ReplicaRecord {
                        state: ReplicaState::InSync,
                        generation: 0,
                    }),
                    None,
                )
            })
            .collect();
        self.run(|s| async move { s.txn(Txn::new().and_then(ops)).await })?;
        Ok(())
    }

    /// Delete the volume's replica states and snapshot records (at volume
    /// remove).
    pub fn forget_volume(&self, volume_id: &str) -> Result<(), ClusterError> {
        let prefixes = [
            replicas_prefix(volume_id),
            snapshots_prefix(volume_id),
            incarnations_prefix(volume_id),
        ];
        let keys = [unreleased_key(volume_id), reached_key(volume_id)];
        self.run(|s| async move {
            let mut kv = s.client.kv_client();
            for prefix in prefixes {
                kv.delete(prefix, Some(DeleteOptions::new().with_prefix()))
                    .await
                    .map_err(|e| s.error(e))?;
            }
            for key in keys {
                kv.delete(key, None).await.map_err(|e| s.error(e))?;
            }
            Ok(())
        })?;
        Ok(())
    }

    /// The volume's snapshots, oldest first.
    pub fn snapshots(&self, volume_id: &str) -> Result<Vec<SnapshotRecord>, ClusterError> {
        let prefix = snapshots_prefix(volume_id);
        let p = prefix.clone();
        let kvs = self.run(|s| async move { s.get_prefix(&p).await })?;
        let mut out = Vec::with_capacity(kvs.len());
        for kv in kvs {
            if let Some(name) = key_tail(&kv, &prefix) {
                let mut r: SnapshotRecord = parse(&kv)?;
                r.name = name.to_string();
                out.push(r);
            }
        }
        out.sort_by(|a, b| (a.created_at, &a.name).cmp(&(b.created_at, &b.name)));
        Ok(out)
    }

    /// Forget a snapshot every replica deleted, while `generation` holds
    /// the attach.
    pub fn forget_snapshot(
        &self,
        volume_id: &str,
        generation: Generation,
        name: &str,
    ) -> Result<(), ClusterError> {
        let key = format!("{}{name}", snapshots_prefix(volume_id));
        self.put_holding(volume_id, generation, TxnOp::delete(key, None))
    }

    /// Record a snapshot every replica took, while `generation` holds the
    /// attach and each replica in `taken_from` (node, the incarnation
    /// recorded when it was taken; `None`: none was) is still that image.
    /// A replica met replaced meanwhile was dropped from the snapshot
    /// records by that transaction, which ran before this one: this one
    /// fails then (`ReplicaChanged`), rather than list it again.
    pub fn record_snapshot(
        &self,
        volume_id: &str,
        generation: Generation,
        record: &SnapshotRecord,
        taken_from: &[(String, Option<Incarnation>)],
    ) -> Result<(), ClusterError> {
        if generation == 0 {
            return Err(ClusterError::Fenced {
                volume: volume_id.to_string(),
                generation,
            });
        }
        let key = format!("{}{}", snapshots_prefix(volume_id), record.name);
        let mut when = vec![Compare::mod_revision(
            attach_key(volume_id),
            CompareOp::Equal,
            generation as i64,
        )];
        for (node, incarnation) in taken_from {
            let k = format!("{}{node}", incarnations_prefix(volume_id));
            when.push(match incarnation {
                Some(i) => Compare::value(k, CompareOp::Equal, format!("{i:016x}")),
                None => Compare::create_revision(k, CompareOp::Equal, 0),
            });
        }
        let txn = Txn::new()
            .when(when)
            .and_then([TxnOp::put(key, to_json(record), None)]);
        if self.run(move |s| async move { Ok(s.txn(txn).await?.succeeded()) })? {
            return Ok(());
        }
        if self.attach_holder(volume_id)?.map(|h| h.generation) != Some(generation) {
            return Err(ClusterError::Fenced {
                volume: volume_id.to_string(),
                generation,
            });
        }
        let now = self.replica_incarnations(volume_id)?;
        let changed = taken_from
            .iter()
            .find(|(node, i)| now.get(node) != i.as_ref())
            .map_or_else(|| "?".to_string(), |(node, _)| node.clone());
        Err(ClusterError::ReplicaChanged {
            volume: volume_id.to_string(),
            snapshot: record.name.clone(),
            node: changed,
        })
    }

    /// Run `op` only while `generation` holds the volume's attach
    /// (Err(Fenced) otherwise).
    fn put_holding(
        &self,
        volume_id: &str,
        generation: Generation,
        op: TxnOp,
    ) -> Result<(), ClusterError> {
        let fenced = || ClusterError::Fenced {
            volume: volume_id.to_string(),
            generation,
        };
        // A missing key compares as revision 0: never a valid guard.
        if generation == 0 {
            return Err(fenced());
        }
        let txn = while_holding(volume_id, generation).and_then([op]);
        let ok = self.run(move |s| async move { Ok(s.txn(txn).await?.succeeded()) })?;
        if ok {
            Ok(())
        } else {
            Err(fenced())
        }
    }

    /// Add `change`'s node to volume `name`'s replicas, or remove it, while
    /// `generation` holds the attach: the catalog record (`repl` follows)
    /// and the replica's state in one transaction. An added replica is
    /// Outdated (a full resync brings it in); a removed one loses its
    /// state and its place in the snapshot records. Err(Fenced) if the
    /// attach moved; retried while only the record (or a snapshot record
    /// it rewrites) changed meanwhile.
    pub fn change_replicas(
        &self,
        name: &str,
        volume_id: &str,
        generation: Generation,
        change: ReplicaChange<'_>,
    ) -> Result<crate::catalog::VolumeRecord, ClusterError> {
        const TRIES: usize = 20;
        let key = volume_key(name);
        for _ in 0..TRIES {
            let k = key.clone();
            let Some(kv) = self.run(|s| async move { s.get(&k).await })? else {
                return Err(ClusterError::Etcd(format!(
                    "volume {name} is no longer in the catalog"
                )));
            };
            let mut record: crate::catalog::VolumeRecord = parse(&kv)?;
            if record.id != volume_id {
                return Err(ClusterError::Etcd(format!(
                    "volume {name} was removed and created again meanwhile; retry"
                )));
            }
            let state_key = |n: &str| format!("{}{n}", replicas_prefix(volume_id));
            // An added replica is met anew; a removed one's image is deleted.
            let incarnation_key = |n: &str| format!("{}{n}", incarnations_prefix(volume_id));
            let mut ops = Vec::new();
            let mut snapshots_read = Vec::new();
            match change {
                ReplicaChange::Add(n) => {
                    if !record.replicas.iter().any(|r| r == n) {
                        record.replicas.push(n.to_string());
                    }
                    let state = ReplicaRecord {
                        state: ReplicaState::Outdated,
                        generation,
                    };
                    ops.push(TxnOp::put(state_key(n), to_json(&state), None));
                    ops.push(TxnOp::delete(incarnation_key(n), None));
                }
                ReplicaChange::Remove(n) => {
                    record.replicas.retain(|r| r != n);
                    record.spec.nodes.retain(|r| r != n);
                    ops.push(TxnOp::delete(state_key(n), None));
                    ops.push(TxnOp::delete(incarnation_key(n), None));
                    let (snaps, held) = self.snapshots_without(volume_id, n)?;
                    ops.extend(snaps);
                    snapshots_read.extend(held);
                }
            }
            record.spec.repl = u8::try_from(record.replicas.len()).unwrap_or(u8::MAX);
            ops.push(TxnOp::put(key.as_str(), to_json(&record), None));
            let mut when = vec![
                Compare::mod_revision(attach_key(volume_id), CompareOp::Equal, generation as i64),
                Compare::mod_revision(key.as_str(), CompareOp::Equal, kv.mod_revision()),
            ];
            when.extend(snapshots_read);
            let txn = Txn::new().when(when).and_then(ops);
            if self.run(move |s| async move { Ok(s.txn(txn).await?.succeeded()) })? {
                return Ok(record);
            }
            if self.attach_holder(volume_id)?.map(|h| h.generation) != Some(generation) {
                return Err(ClusterError::Fenced {
                    volume: volume_id.to_string(),
                    generation,
                });
            }
        }
        Err(ClusterError::Etcd(format!(
            "volume {name} kept changing under {TRIES} attempts to change its replicas; retry"
        )))
    }

    /// A [`StateStore`] bound to one volume and generation, for the data path.
    pub fn state_store(
        self: &Arc<Self>,
        volume_id: &str,
        volume: &str,
        generation: Generation,
    ) -> Arc<dyn StateStore> {
        Arc::new(EtcdStateStore {
            cluster: self.clone(),
            volume_id: volume_id.to_string(),
            volume: volume.to_string(),
            generation,
        })
    }

    /// Place a new volume's replicas on the live members, away from the
    /// replicas of the catalog's volumes as [`place`] ranks them.
    pub fn place_replicas(&self, req: &PlacementRequest) -> Result<Vec<String>, ClusterError> {
        let up: Vec<String> = self
            .members()?
            .into_iter()
            .filter(|m| m.up)
            .map(|m| m.name)
            .collect();
        let vols = self.run(|s| async move { s.get_prefix(&volumes_prefix()).await })?;
        let mut existing = Vec::with_capacity(vols.len());
        for kv in vols {
            let r: crate::catalog::VolumeRecord = parse(&kv)?;
            existing.push((r.spec.group, r.replicas));
        }
        place(req, &up, &existing).map_err(ClusterError::Placement)
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

    /// Test hook: stop sending keepalives (and registering again), as a node
    /// cut off from etcd would. Loss is still detected and reported.
    #[doc(hidden)]
    pub fn stop_keepalive(&self) {
        self.shared.paused.store(true, Ordering::SeqCst);
    }

    /// Test hook: undo [`Cluster::stop_keepalive`].
    #[doc(hidden)]
    pub fn resume_keepalive(&self) {
        self.shared.paused.store(false, Ordering::SeqCst);
        self.shared.wake.notify_one();
    }
}

impl Drop for Cluster {
    /// Without [`Cluster::shutdown`] the lease is left to expire, as after a crash.
    fn drop(&mut self) {
        self.shared.stopped.store(true, Ordering::SeqCst);
        self.shared.wake.notify_one();
    }
}

/// Replica state changes of one attach generation.
struct EtcdStateStore {
    cluster: Arc<Cluster>,
    volume_id: String,
    volume: String,
    generation: Generation,
}

impl EtcdStateStore {
    fn answer(&self, result: Result<(), ClusterError>) -> Result<(), StateStoreError> {
        match result {
            Ok(()) => Ok(()),
            Err(ClusterError::Fenced { generation, .. }) => Err(StateStoreError::Fenced {
                volume: self.volume.clone(),
                generation,
            }),
            Err(e) => Err(StateStoreError::Unavailable(e.to_string())),
        }
    }
}

impl StateStore for EtcdStateStore {
    fn set_state(&self, node: &str, state: ReplicaState) -> Result<(), StateStoreError> {
        self.answer(
            self.cluster
                .set_replica_state(&self.volume_id, self.generation, node, state),
        )
    }

    fn set_incarnation(
        &self,
        node: &str,
        incarnation: Incarnation,
        replaced: bool,
    ) -> Result<(), StateStoreError> {
        self.answer(self.cluster.set_replica_incarnation(
            &self.volume_id,
            self.generation,
            node,
            incarnation,
            replaced,
        ))
    }

    fn reached(&self) -> Result<(), StateStoreError> {
        self.answer(self.cluster.set_reached(&self.volume_id, self.generation))
    }
}

//! The operator's control socket (`<run-dir>/control.sock`), spoken by the
//! CLI: small JSON RPCs over HTTP on a unix socket, so it can also be driven
//! with `curl --unix-socket`.

pub mod client;
pub mod metrics;

use crate::registry::{self, snapshots as snap, Registry, RegistryError};
use actix::Addr;
use actix_web::{web, HttpResponse};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::BTreeMap;

#[derive(Debug, Serialize, Deserialize)]
pub struct NameArgs {
    pub name: String,
}

/// `replica add` (node optional: placement picks) and `replica rm`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicaArgs {
    pub name: String,
    pub add: bool,
    #[serde(default)]
    pub node: Option<String>,
}

/// `node cordon`, `node uncordon`, `node rm`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeArgs {
    pub node: String,
    /// Cordon (true) or lift it (false); ignored by `node rm`.
    #[serde(default)]
    pub cordoned: bool,
}

/// `snapshot export`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportArgs {
    pub volume: String,
    pub snapshot: String,
    #[serde(default)]
    pub since: Option<String>,
    /// Where the daemon writes the stream (a FIFO the CLI reads).
    pub path: std::path::PathBuf,
}

/// `volume import`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportArgs {
    pub name: String,
    /// Where the daemon reads the stream (a FIFO the CLI writes).
    pub path: std::path::PathBuf,
    /// Options of a volume made from a whole stream (`size` and `fs` come
    /// from the stream).
    #[serde(default)]
    pub opts: BTreeMap<String, String>,
}

/// `replica accept`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcceptArgs {
    pub name: String,
    pub node: String,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct CreateArgs {
    pub name: String,
    #[serde(default)]
    pub opts: BTreeMap<String, String>,
}

/// `POST /v1/volume/unlock`. Not `Debug`: it carries the key.
#[derive(Serialize, Deserialize)]
pub struct UnlockArgs {
    pub name: String,
    pub secret: String,
}

/// What `GET /v1/node` answers.
#[derive(Debug, Serialize, Deserialize)]
pub struct NodeInfo {
    pub node: String,
    pub version: String,
    pub export: String,
    pub data_dir: String,
    pub run_dir: String,
    pub mount_dir: String,
    pub plugin_socket: String,
    /// Cluster mode: its etcd endpoints (empty on a single node).
    #[serde(default)]
    pub etcd: Vec<String>,
}

fn fail(status: u16, msg: impl std::fmt::Display) -> HttpResponse {
    HttpResponse::build(
        actix_web::http::StatusCode::from_u16(status)
            .unwrap_or(actix_web::http::StatusCode::INTERNAL_SERVER_ERROR),
    )
    .json(json!({ "error": msg.to_string() }))
}

fn reply<T: Serialize>(res: Result<Result<T, RegistryError>, actix::MailboxError>) -> HttpResponse {
    match res {
        Ok(Ok(v)) => HttpResponse::Ok().json(v),
        Ok(Err(e)) => fail(e.status(), e),
        Err(e) => fail(503, format!("dunnage registry unavailable: {e}")),
    }
}

fn args<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, String> {
    serde_json::from_slice(body).map_err(|e| format!("malformed request: {e}"))
}

type Reg = web::Data<Addr<Registry>>;

async fn list(reg: Reg) -> HttpResponse {
    let mut vols = match reg.send(registry::List).await {
        Ok(Ok(v)) => v,
        other => return reply(other),
    };
    // In a cluster, each volume's attach and replicas (best effort: the
    // list stands without them).
    if let Ok(Ok(mut views)) = reg.send(registry::cluster::ListCluster).await {
        for v in &mut vols {
            v.cluster = views.remove(&v.name);
        }
    }
    HttpResponse::Ok().json(vols)
}

async fn create(reg: Reg, body: web::Bytes) -> HttpResponse {
    match args::<CreateArgs>(&body) {
        Ok(a) => reply(
            reg.send(registry::Create {
                name: a.name,
                opts: a.opts,
            })
            .await,
        ),
        Err(e) => fail(400, e),
    }
}

async fn update(reg: Reg, body: web::Bytes) -> HttpResponse {
    match args::<CreateArgs>(&body) {
        Ok(a) => reply(
            reg.send(registry::Update {
                name: a.name,
                opts: a.opts,
            })
            .await,
        ),
        Err(e) => fail(400, e),
    }
}

async fn inspect(reg: Reg, body: web::Bytes) -> HttpResponse {
    let a = match args::<NameArgs>(&body) {
        Ok(a) => a,
        Err(e) => return fail(400, e),
    };
    let mut info = match reg
        .send(registry::Get {
            name: a.name.clone(),
        })
        .await
    {
        Ok(Ok(v)) => v,
        other => return reply(other),
    };
    // Space comes from the volume's image, through its actor.
    match reg
        .send(snap::QuerySpace {
            volume: a.name.clone(),
        })
        .await
    {
        Ok(Ok(space)) => info.space = space,
        other => return reply(other.map(|r| r.map(|_| ()))),
    }
    match reg
        .send(registry::cluster::QueryCluster { volume: a.name })
        .await
    {
        Ok(Ok(c)) => info.cluster = c,
        other => return reply(other.map(|r| r.map(|_| ()))),
    }
    HttpResponse::Ok().json(info)
}

/// `{"volumes": [...], "name": ...}`: a group snapshot.
#[derive(Debug, Serialize, Deserialize)]
pub struct GroupArgs {
    pub volumes: Vec<String>,
    pub name: String,
}

/// `{"volume": ..., "name": ...}` of the snapshot endpoints.
#[derive(Debug, Serialize, Deserialize)]
pub struct SnapshotArgs {
    pub volume: String,
    #[serde(default)]
    pub name: Option<String>,
}

fn snapshot_name(a: &SnapshotArgs) -> Result<String, Box<HttpResponse>> {
    a.name.clone().ok_or_else(|| {
        Box::new(fail(
            400,
            "malformed request: \"name\" (the snapshot) is missing",
        ))
    })
}

async fn snapshot_create(reg: Reg, body: web::Bytes) -> HttpResponse {
    match args::<SnapshotArgs>(&body) {
        Ok(a) => reply(
            reg.send(snap::TakeSnapshot {
                volume: a.volume,
                name: a.name,
            })
            .await,
        ),
        Err(e) => fail(400, e),
    }
}

async fn snapshot_group(reg: Reg, body: web::Bytes) -> HttpResponse {
    match args::<GroupArgs>(&body) {
        Ok(a) => reply(
            reg.send(snap::GroupSnapshot {
                volumes: a.volumes,
                name: a.name,
            })
            .await,
        ),
        Err(e) => fail(400, e),
    }
}

async fn snapshot_list(reg: Reg, body: web::Bytes) -> HttpResponse {
    match args::<SnapshotArgs>(&body) {
        Ok(a) => reply(reg.send(snap::ListSnapshots { volume: a.volume }).await),
        Err(e) => fail(400, e),
    }
}

async fn snapshot_remove(reg: Reg, body: web::Bytes) -> HttpResponse {
    let a = match args::<SnapshotArgs>(&body) {
        Ok(a) => a,
        Err(e) => return fail(400, e),
    };
    match snapshot_name(&a) {
        Ok(name) => reply(
            reg.send(snap::DeleteSnapshot {
                volume: a.volume,
                name,
            })
            .await,
        ),
        Err(r) => *r,
    }
}

async fn restore(reg: Reg, body: web::Bytes) -> HttpResponse {
    let a = match args::<SnapshotArgs>(&body) {
        Ok(a) => a,
        Err(e) => return fail(400, e),
    };
    match snapshot_name(&a) {
        Ok(snapshot) => reply(
            reg.send(snap::Restore {
                volume: a.volume,
                snapshot,
            })
            .await,
        ),
        Err(r) => *r,
    }
}

async fn snapshot_export(reg: Reg, body: web::Bytes) -> HttpResponse {
    match args::<ExportArgs>(&body) {
        Ok(a) => reply(
            reg.send(snap::Export {
                volume: a.volume,
                snapshot: a.snapshot,
                since: a.since,
                path: a.path,
            })
            .await,
        ),
        Err(e) => fail(400, e),
    }
}

/// A whole stream makes the volume (its size and filesystem from the
/// stream), which is removed again if the import fails; a stream of
/// changes goes into the existing volume.
async fn volume_import(reg: Reg, body: web::Bytes) -> HttpResponse {
    let a = match args::<ImportArgs>(&body) {
        Ok(a) => a,
        Err(e) => return fail(400, e),
    };
    let name = a.name.clone();
    let path = a.path.clone();
    let opened = web::block(move || crate::volume::backup::open_stream(&path)).await;
    let stream = match opened {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return fail(400, format!("volume {name}: {e}")),
        Err(e) => return fail(500, e.to_string()),
    };
    let h = stream.header().clone();
    let fresh = h.since.is_none();
    if fresh {
        let mut opts = a.opts;
        if opts.contains_key("parent") {
            return fail(
                400,
                format!("volume {name}: an imported volume holds the stream's data, not a clone's: drop -o parent"),
            );
        }
        let size = match h.size {
            s if s % (1 << 20) == 0 => format!("{}M", s >> 20),
            s => format!("{s}B"),
        };
        for (k, v) in [("size", size), ("fs", h.fs.clone())] {
            match opts.get(k) {
                Some(given) if k == "fs" && *given != v => {
                    return fail(
                        400,
                        format!("volume {name}: the stream holds a {v} filesystem; drop -o fs={given}"),
                    )
                }
                Some(_) if k == "size" => {
                    return fail(
                        400,
                        format!("volume {name}: its size is the stream's ({} bytes); grow it after the import", h.size),
                    )
                }
                _ => {
                    opts.insert(k.to_string(), v);
                }
            }
        }
        if matches!(
            reg.send(registry::Get { name: name.clone() }).await,
            Ok(Ok(_))
        ) {
            return fail(
                409,
                format!("volume {name} exists; a whole stream makes a new volume: import it under another name, or remove {name} first"),
            );
        }
        match reg
            .send(registry::Create {
                name: name.clone(),
                opts,
            })
            .await
        {
            Ok(Ok(_)) => {}
            other => return reply(other.map(|r| r.map(|_| ()))),
        }
    } else if !matches!(
        reg.send(registry::Get { name: name.clone() }).await,
        Ok(Ok(_))
    ) {
        return fail(
            404,
            format!("no such volume: {name}; a stream of changes since {} goes into a volume that holds that snapshot: import the whole snapshot first", h.since.as_deref().unwrap_or_default()),
        );
    } else if !a.opts.is_empty() {
        return fail(
            400,
            format!("volume {name}: a stream of changes goes into an existing volume; options are for a whole stream's new volume"),
        );
    }
    let done = reg
        .send(snap::Import {
            volume: name.clone(),
            stream,
            fresh,
        })
        .await;
    if fresh && !matches!(done, Ok(Ok(_))) {
        if let Ok(Err(e)) = reg.send(registry::Remove { name: name.clone() }).await {
            tracing::warn!(volume = %name, error = %e, "could not remove the volume a failed import made");
        }
    }
    reply(done)
}

async fn remove(reg: Reg, body: web::Bytes) -> HttpResponse {
    match args::<NameArgs>(&body) {
        Ok(a) => reply(reg.send(registry::Remove { name: a.name }).await),
        Err(e) => fail(400, e),
    }
}

async fn attach(reg: Reg, body: web::Bytes) -> HttpResponse {
    match args::<NameArgs>(&body) {
        Ok(a) => reply(
            reg.send(registry::Attach { name: a.name })
                .await
                .map(|r| r.map(|p| json!({ "device": p }))),
        ),
        Err(e) => fail(400, e),
    }
}

async fn detach(reg: Reg, body: web::Bytes) -> HttpResponse {
    match args::<NameArgs>(&body) {
        Ok(a) => reply(reg.send(registry::Detach { name: a.name }).await),
        Err(e) => fail(400, e),
    }
}

async fn unlock(reg: Reg, body: web::Bytes) -> HttpResponse {
    match args::<UnlockArgs>(&body) {
        Ok(a) if a.secret.is_empty() => fail(400, "the key is empty"),
        Ok(a) => reply(
            reg.send(registry::Unlock {
                name: a.name,
                secret: crate::engine::Secret::new(a.secret),
            })
            .await,
        ),
        // Never echo the body: it holds the key.
        Err(_) => fail(
            400,
            "malformed request: expected {\"name\": ..., \"secret\": ...}",
        ),
    }
}

async fn node(info: web::Data<NodeInfo>) -> HttpResponse {
    HttpResponse::Ok().json(info.get_ref())
}

async fn node_list(reg: Reg) -> HttpResponse {
    reply(reg.send(registry::cluster::ListNodes).await)
}

async fn node_cordon(reg: Reg, body: web::Bytes) -> HttpResponse {
    match args::<NodeArgs>(&body) {
        Ok(a) => reply(
            reg.send(registry::cluster::CordonNode {
                node: a.node,
                cordoned: a.cordoned,
            })
            .await,
        ),
        Err(e) => fail(400, e),
    }
}

async fn node_rm(reg: Reg, body: web::Bytes) -> HttpResponse {
    match args::<NodeArgs>(&body) {
        Ok(a) => reply(
            reg.send(registry::cluster::ForgetNode { node: a.node })
                .await,
        ),
        Err(e) => fail(400, e),
    }
}

async fn replica_checksum(reg: Reg, body: web::Bytes) -> HttpResponse {
    match args::<NameArgs>(&body) {
        Ok(a) => reply(
            reg.send(registry::cluster::ReplicaChecksum { volume: a.name })
                .await,
        ),
        Err(e) => fail(400, e),
    }
}

async fn verify_start(reg: Reg, body: web::Bytes) -> HttpResponse {
    match args::<NameArgs>(&body) {
        Ok(a) => reply(
            reg.send(registry::cluster::StartVerify { volume: a.name })
                .await,
        ),
        Err(e) => fail(400, e),
    }
}

async fn resync_start(reg: Reg, body: web::Bytes) -> HttpResponse {
    match args::<NameArgs>(&body) {
        Ok(a) => reply(
            reg.send(registry::cluster::StartResync { volume: a.name })
                .await,
        ),
        Err(e) => fail(400, e),
    }
}

async fn replica_change(reg: Reg, body: web::Bytes) -> HttpResponse {
    match args::<ReplicaArgs>(&body) {
        Ok(ReplicaArgs {
            add: false,
            node: None,
            ..
        }) => fail(400, "replica rm needs the node whose replica goes"),
        Ok(a) => reply(
            reg.send(registry::cluster::ChangeReplica {
                volume: a.name,
                add: a.add,
                node: a.node,
            })
            .await,
        ),
        Err(e) => fail(400, e),
    }
}

async fn replica_accept(reg: Reg, body: web::Bytes) -> HttpResponse {
    match args::<AcceptArgs>(&body) {
        Ok(a) => reply(
            reg.send(registry::cluster::AcceptReplica {
                volume: a.name,
                node: a.node,
            })
            .await,
        ),
        Err(e) => fail(400, e),
    }
}

async fn metrics(reg: Reg, info: web::Data<NodeInfo>) -> HttpResponse {
    let (volumes, cluster) = match reg.send(registry::Scrape).await {
        Ok(s) => s,
        Err(_) => return fail(503, "the daemon is shutting down"),
    };
    // Off the actor: etcd may be slow to answer, or not at all.
    let members = match cluster {
        Some(c) => web::block(move || c.members()).await.ok().and_then(|m| {
            m.inspect_err(|e| tracing::warn!(error = %e, "metrics: the cluster's members are left out: etcd did not answer"))
                .ok()
        }),
        None => None,
    };
    let data = crate::config::capacity(std::path::Path::new(&info.data_dir));
    let body = metrics::render(&info.node, &info.export, &volumes, members.as_deref(), data);
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(body)
}

/// Only `GET /metrics`: what `serve --metrics-listen` serves.
pub fn configure_metrics(cfg: &mut web::ServiceConfig) {
    cfg.route("/metrics", web::get().to(metrics))
        .default_service(web::to(|| async {
            fail(404, "only GET /metrics is served here")
        }));
}

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/v1/node", web::get().to(node))
        .route("/metrics", web::get().to(metrics))
        .route("/v1/volume/list", web::post().to(list))
        .route("/v1/volume/create", web::post().to(create))
        .route("/v1/volume/update", web::post().to(update))
        .route("/v1/volume/inspect", web::post().to(inspect))
        .route("/v1/volume/remove", web::post().to(remove))
        .route("/v1/volume/attach", web::post().to(attach))
        .route("/v1/volume/detach", web::post().to(detach))
        .route("/v1/volume/unlock", web::post().to(unlock))
        .route("/v1/volume/restore", web::post().to(restore))
        .route("/v1/snapshot/create", web::post().to(snapshot_create))
        .route("/v1/snapshot/group", web::post().to(snapshot_group))
        .route("/v1/snapshot/list", web::post().to(snapshot_list))
        .route("/v1/snapshot/remove", web::post().to(snapshot_remove))
        .route("/v1/snapshot/export", web::post().to(snapshot_export))
        .route("/v1/volume/import", web::post().to(volume_import))
        .route("/v1/node/list", web::post().to(node_list))
        .route("/v1/node/cordon", web::post().to(node_cordon))
        .route("/v1/node/rm", web::post().to(node_rm))
        .route("/v1/replica/checksum", web::post().to(replica_checksum))
        .route("/v1/replica/change", web::post().to(replica_change))
        .route("/v1/replica/accept", web::post().to(replica_accept))
        .route("/v1/volume/resync", web::post().to(resync_start))
        .route("/v1/volume/verify", web::post().to(verify_start))
        .default_service(web::to(|| async { fail(404, "no such control endpoint") }));
}

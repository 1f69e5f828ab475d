//! Stage 1: the Docker volume plugin socket. Handlers only decode, send one
//! message to the registry, and encode; they hold no state and no policy.

pub mod wire;

use crate::registry::{self, Registry, RegistryError};
use actix::Addr;
use actix_web::{web, HttpResponse};
use serde_json::json;
use wire::{decode, CreateRequest, MountRequest, NameRequest};

/// Docker shows `Err` to the user as `VolumeDriver.X: <Err>`.
fn err(msg: impl std::fmt::Display) -> HttpResponse {
    HttpResponse::InternalServerError()
        .content_type("application/vnd.docker.plugins.v1.1+json")
        .json(json!({ "Err": msg.to_string() }))
}

fn ok(body: serde_json::Value) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/vnd.docker.plugins.v1.1+json")
        .json(body)
}

fn answer<T>(
    res: Result<Result<T, RegistryError>, actix::MailboxError>,
    f: impl FnOnce(T) -> serde_json::Value,
) -> HttpResponse {
    match res {
        Ok(Ok(v)) => ok(f(v)),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "request refused");
            err(e)
        }
        Err(e) => err(format!("dunnage registry unavailable: {e}")),
    }
}

type Reg = web::Data<Addr<Registry>>;

async fn activate() -> HttpResponse {
    ok(json!({ "Implements": ["VolumeDriver"] }))
}

async fn capabilities(scope: web::Data<Scope>) -> HttpResponse {
    ok(json!({ "Capabilities": { "Scope": scope.0 } }))
}

async fn create(reg: Reg, body: web::Bytes) -> HttpResponse {
    let req: CreateRequest = match decode("VolumeDriver.Create", &body, wire::CREATE_SHAPE) {
        Ok(r) => r,
        Err(e) => return err(e),
    };
    let msg = registry::Create {
        name: req.name,
        opts: req.opts.unwrap_or_default(),
    };
    answer(reg.send(msg).await, |_| json!({ "Err": "" }))
}

async fn remove(reg: Reg, body: web::Bytes) -> HttpResponse {
    let req: NameRequest = match decode("VolumeDriver.Remove", &body, wire::NAME_SHAPE) {
        Ok(r) => r,
        Err(e) => return err(e),
    };
    answer(
        reg.send(registry::Remove { name: req.name }).await,
        |_| json!({ "Err": "" }),
    )
}

async fn mount(reg: Reg, body: web::Bytes) -> HttpResponse {
    let req: MountRequest = match decode("VolumeDriver.Mount", &body, wire::MOUNT_SHAPE) {
        Ok(r) => r,
        Err(e) => return err(e),
    };
    let msg = registry::Mount {
        name: req.name,
        id: req.id,
    };
    answer(
        reg.send(msg).await,
        |p| json!({ "Mountpoint": p.display().to_string(), "Err": "" }),
    )
}

async fn unmount(reg: Reg, body: web::Bytes) -> HttpResponse {
    let req: MountRequest = match decode("VolumeDriver.Unmount", &body, wire::MOUNT_SHAPE) {
        Ok(r) => r,
        Err(e) => return err(e),
    };
    let msg = registry::Unmount {
        name: req.name,
        id: req.id,
    };
    answer(reg.send(msg).await, |_| json!({ "Err": "" }))
}

async fn path(reg: Reg, body: web::Bytes) -> HttpResponse {
    let req: NameRequest = match decode("VolumeDriver.Path", &body, wire::NAME_SHAPE) {
        Ok(r) => r,
        Err(e) => return err(e),
    };
    answer(reg.send(registry::Get { name: req.name }).await, |v| {
        let mp = v
            .mountpoint
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        json!({ "Mountpoint": mp, "Err": "" })
    })
}

fn docker_volume(name: &str, v: &registry::VolumeInfo) -> serde_json::Value {
    let mp = v
        .mountpoint
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    json!({
        "Name": name,
        "Mountpoint": mp,
        "CreatedAt": v.created_rfc3339(),
        "Status": v.docker_status(),
    })
}

async fn get(reg: Reg, body: web::Bytes) -> HttpResponse {
    let req: NameRequest = match decode("VolumeDriver.Get", &body, wire::NAME_SHAPE) {
        Ok(r) => r,
        Err(e) => return err(e),
    };
    // Answer under the name Docker asked for: with the `name@size` shorthand
    // Docker keeps that as the volume's name.
    let asked = req.name.clone();
    answer(
        reg.send(registry::Get { name: req.name }).await,
        |v| json!({ "Volume": docker_volume(&asked, &v), "Err": "" }),
    )
}

async fn list(reg: Reg) -> HttpResponse {
    answer(reg.send(registry::List).await, |vs| {
        let vols: Vec<_> = vs.iter().map(|v| docker_volume(&v.name, v)).collect();
        json!({ "Volumes": vols, "Err": "" })
    })
}

async fn unknown(req: actix_web::HttpRequest) -> HttpResponse {
    HttpResponse::NotFound().json(json!({
        "Err": format!("{} is not an endpoint of the dunnage volume plugin", req.path())
    }))
}

/// `local` on a single node, `global` in a cluster.
#[derive(Clone, Copy)]
pub struct Scope(pub &'static str);

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/Plugin.Activate", web::post().to(activate))
        .route("/VolumeDriver.Create", web::post().to(create))
        .route("/VolumeDriver.Remove", web::post().to(remove))
        .route("/VolumeDriver.Mount", web::post().to(mount))
        .route("/VolumeDriver.Unmount", web::post().to(unmount))
        .route("/VolumeDriver.Path", web::post().to(path))
        .route("/VolumeDriver.Get", web::post().to(get))
        .route("/VolumeDriver.List", web::post().to(list))
        .route("/VolumeDriver.Capabilities", web::post().to(capabilities))
        .default_service(web::to(unknown));
}

//! `dunnage serve`: start-up (locking, crash cleanup, sockets), the two HTTP
//! servers, and an orderly shutdown on SIGTERM/SIGINT.

use crate::catalog::{Catalog, EmbeddedCatalog};
use crate::config::{host_name, Node};
use crate::control::{self, NodeInfo};
use crate::export::{self, ExportKind, Exporter, Handover};
use crate::plugin::{self, Scope};
use crate::registry::{self, Registry};
use crate::sys::mount;
use crate::volume::handover::{self, AttachRecord};
use actix::Actor;
use actix_web::{web, App, HttpServer};
use anyhow::{bail, Context, Result};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Driver name: Docker finds the plugin as `<plugin-dir>/<name>.sock` and
    /// users pass it to `docker volume create -d`.
    #[arg(long, default_value = "dunnage")]
    pub name: String,
    /// Directory where Docker looks for plugin sockets.
    #[arg(long, default_value = "/run/docker/plugins")]
    pub plugin_dir: PathBuf,
    /// Where volume images and the catalog are kept (must survive reboots).
    #[arg(long, default_value = "/var/lib/dunnage")]
    pub data_dir: PathBuf,
    /// Where filesystems are mounted for Docker [default: <run-dir>/mounts].
    #[arg(long)]
    pub mount_dir: Option<PathBuf>,
    /// How volumes reach the kernel: ublk where the kernel has ublk_drv,
    /// else a FUSE-served image on a loop device.
    #[arg(long, value_enum, default_value = "auto")]
    pub export: ExportKind,
    /// FUSE export: `auto` lets the kernel read and write the data file of
    /// volumes created with `passthrough=true` directly (FUSE passthrough)
    /// while their layout allows it; `off` serves every IO of every volume
    /// through dunnage's own engine path.
    #[arg(long, value_enum, default_value = "auto")]
    pub fuse_passthrough: Passthrough,
    /// On SIGTERM, leave every attached volume (mounted for containers or
    /// attached on the host) to the next `dunnage serve`, as a crash would:
    /// no unmount, no detach; IO waits until the next daemon takes them
    /// back. For `systemctl restart` under running containers (with
    /// `KillMode=process`, so that the FUSE keeper stays). With nothing
    /// attached, and on SIGINT, the stop is the usual orderly one.
    #[arg(long)]
    pub handover_on_stop: bool,
    /// File holding the node-wide encryption key: `secure=true` volumes
    /// created without their own `secret_key` use it, and open by
    /// themselves after a restart. Read once at start; keep it mode 600.
    #[arg(long)]
    pub secret_file: Option<PathBuf>,
    /// IP:PORT where Prometheus scrapes `GET /metrics` (volumes' IO, size,
    /// replica states and resync, cluster nodes); off by default. The
    /// control socket answers `GET /metrics` too.
    #[arg(long, value_name = "IP:PORT")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Cluster mode: this node's name among the cluster's members
    /// [default: the host name]. Errors name it.
    #[arg(long)]
    pub node: Option<String>,
    /// Cluster mode: IP:PORT where this node serves replica traffic to the
    /// other nodes (they find it in etcd).
    #[arg(long, requires = "etcd")]
    pub listen: Option<std::net::SocketAddr>,
    /// Cluster mode: etcd endpoints, comma separated
    /// (`http://10.0.0.1:2379,http://10.0.0.2:2379`). The catalog, node
    /// membership and attach ownership then live in etcd.
    #[arg(long, value_delimiter = ',', requires = "listen")]
    pub etcd: Vec<String>,
    /// Cluster mode: seconds this node's lease outlives its last keepalive.
    /// A node cut off for longer loses its attaches (and is fenced); a
    /// killed node's volumes can be attached elsewhere after this long.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(2..=300))]
    pub lease_ttl: u64,
    /// Cluster mode: seconds a replica may leave a write unanswered before
    /// it leaves the in-sync set (writes then go on without it; it is
    /// resynced when it returns).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=120))]
    pub replica_timeout: u64,
    /// Cluster mode: MiB per second a resync (or the comparison of the
    /// replicas after an unclean failover) may read and send, per replica,
    /// at most, even while the volume is idle (see --resync-busy-rate for
    /// while it is not); 0: no limit.
    #[arg(long, default_value_t = 0, value_name = "MIB_PER_S")]
    pub resync_rate: u64,
    /// Cluster mode: MiB per second a resync (or comparison) keeps, per
    /// replica, while the volume serves its own IO: it backs off to this
    /// and speeds up to --resync-rate again once the volume has been idle
    /// for a tenth of a second (DRBD's c-min-rate); 0: no back-off.
    #[arg(long, default_value_t = 64, value_name = "MIB_PER_S")]
    pub resync_busy_rate: u64,
    /// Cluster mode: seconds between this node's sweeps, which delete the
    /// replicas etcd no longer places here (and snapshots it does not
    /// list), and start the background resync of volumes attached nowhere
    /// whose replicas fell behind (on the first node with an in-sync one).
    #[arg(long, default_value_t = 30, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub sweep_interval: u64,
    /// Cluster mode: seconds a node may stay down before the replicas it
    /// holds are replaced on other nodes (as Longhorn's replica
    /// replenishment or LINSTOR's auto-evict do): each volume with a replica
    /// there gets one where placement puts it, resynced in the background,
    /// and the dead node's is removed once that one is in sync. Counted by
    /// each node from when it saw the node go down; 0: never (replace by
    /// hand with `replica add`/`rm` or `node evacuate`).
    #[arg(long, default_value_t = 600, value_name = "SECS")]
    pub replace_after: u64,
    /// Cluster mode: file holding the cluster's shared secret (the same on
    /// every node; 32 random bytes or a long passphrase). With it, every
    /// connection to the replica port proves both ways that its peer holds
    /// the secret before any replica opens or forwarded request runs
    /// (HMAC challenge-response; the secret never crosses the network).
    /// Without it the replica port trusts whoever reaches it. Mode 600.
    #[arg(long, value_name = "FILE", requires = "etcd")]
    pub cluster_secret_file: Option<PathBuf>,
    /// Cluster mode: this node's failure domain (a rack, room or zone:
    /// letters, digits, '_', '.', '-'). Placement puts a volume's replicas
    /// in distinct zones where there are enough, before anything else but
    /// `group`; nodes without one count as a zone each.
    #[arg(long, value_name = "NAME", requires = "etcd", value_parser = parse_zone)]
    pub zone: Option<String>,
    /// Cluster mode: the etcd user this node signs in as, where etcd has
    /// authentication on (`etcdctl auth enable`); it must be able to read
    /// and write the keys under /dunnage/. With --etcd-password-file.
    #[arg(long, value_name = "NAME", requires = "etcd_password_file")]
    pub etcd_user: Option<String>,
    /// Cluster mode: file holding --etcd-user's password. Mode 600.
    #[arg(long, value_name = "FILE", requires = "etcd_user")]
    pub etcd_password_file: Option<PathBuf>,
    /// Cluster mode: CA certificate (PEM) that etcd's server certificate
    /// must chain to, for `https://` endpoints.
    #[arg(long, value_name = "FILE", requires = "etcd")]
    pub etcd_cacert: Option<PathBuf>,
    /// Cluster mode: this node's client certificate (PEM), for an etcd
    /// that checks them (`--client-cert-auth`). With --etcd-key.
    #[arg(long, value_name = "FILE", requires = "etcd_key")]
    pub etcd_cert: Option<PathBuf>,
    /// Cluster mode: the private key (PEM) of --etcd-cert. Mode 600.
    #[arg(long, value_name = "FILE", requires = "etcd_cert")]
    pub etcd_key: Option<PathBuf>,
}

fn parse_zone(s: &str) -> Result<String, String> {
    crate::spec::validate_name(s)
        .map(|()| s.to_string())
        .map_err(|e| format!("a zone is named like a volume: {e}"))
}

/// What etcd's flags ask for: credentials and TLS material, read now.
fn etcd_security(args: &ServeArgs) -> Result<crate::cluster::EtcdSecurity> {
    let read = |path: &std::path::Path, flag: &str| {
        std::fs::read(path).with_context(|| format!("read {flag} {}", path.display()))
    };
    let user = match (&args.etcd_user, &args.etcd_password_file) {
        (Some(user), Some(file)) => {
            let password = crate::keys::read_secret_file(file, "--etcd-password-file")?;
            let password = String::from_utf8(password)
                .context("--etcd-password-file: the password is not UTF-8")?;
            Some((user.clone(), zeroize::Zeroizing::new(password)))
        }
        _ => None,
    };
    let ca = args
        .etcd_cacert
        .as_deref()
        .map(|p| read(p, "--etcd-cacert"))
        .transpose()?;
    let identity = match (&args.etcd_cert, &args.etcd_key) {
        (Some(cert), Some(key)) => Some((
            read(cert, "--etcd-cert")?,
            zeroize::Zeroizing::new(crate::keys::read_secret_file(key, "--etcd-key")?),
        )),
        _ => None,
    };
    let tls = ca.is_some() || identity.is_some();
    if let Some(plain) = args.etcd.iter().find(|u| tls != u.starts_with("https://")) {
        anyhow::bail!(
            "--etcd {plain}: {}",
            if tls {
                "--etcd-cacert/--etcd-cert need https:// endpoints"
            } else {
                "an https:// endpoint needs --etcd-cacert (the CA that etcd's certificate chains to)"
            }
        );
    }
    if user.is_some() && !tls {
        tracing::warn!("--etcd-user over http://: the password crosses the network in the clear; give etcd https:// endpoints and --etcd-cacert");
    }
    Ok(crate::cluster::EtcdSecurity { user, ca, identity })
}

/// Join the cluster: serve replica traffic, then register in etcd.
fn join_cluster(args: &ServeArgs, node: &str) -> Result<Arc<crate::config::ClusterNode>> {
    use crate::cluster::{Cluster, ClusterConfig};
    use crate::replication::{LocalReplicas, ReplicaServer};
    let listen = args.listen.context("--listen is required with --etcd")?;
    let security = etcd_security(args)?;
    match &args.cluster_secret_file {
        Some(path) => {
            let secret = crate::keys::read_secret_file(path, "--cluster-secret-file")?;
            crate::replication::auth::install(&secret).map_err(anyhow::Error::msg)?;
        }
        None => tracing::warn!(
            listen = %listen,
            "no --cluster-secret-file: the replica port serves any peer that reaches it; keep it on a private network, or give every node the same secret"
        ),
    }
    let replicas = LocalReplicas::new(args.data_dir.join("volumes"));
    let server = ReplicaServer::start(listen, node.to_string(), replicas.clone())
        .with_context(|| format!("serve replica traffic on {listen}"))?;
    let lease_ttl = std::time::Duration::from_secs(args.lease_ttl);
    let cluster = match Cluster::connect(ClusterConfig {
        node: node.to_string(),
        listen: server.local_addr(),
        etcd: args.etcd.clone(),
        lease_ttl,
        security,
        zone: args.zone.clone(),
    }) {
        Ok(c) => c,
        Err(e) => {
            server.shutdown();
            return Err(e).context("join the cluster");
        }
    };
    Ok(crate::config::ClusterNode::new(
        cluster,
        replicas,
        server,
        lease_ttl,
        std::time::Duration::from_secs(args.replica_timeout),
        crate::replication::ResyncPace {
            max: (args.resync_rate > 0).then(|| args.resync_rate.saturating_mul(1 << 20)),
            busy: (args.resync_busy_rate > 0)
                .then(|| args.resync_busy_rate.saturating_mul(1 << 20)),
        },
        crate::config::Sweep {
            every: std::time::Duration::from_secs(args.sweep_interval),
            replace_after: (args.replace_after > 0)
                .then(|| std::time::Duration::from_secs(args.replace_after)),
        },
    ))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Passthrough {
    Auto,
    Off,
}

/// Runs requests other nodes forward here (on the replica server's
/// threads): each goes to the registry on this actix system, and the
/// thread waits for the reply.
fn forwarder(registry: actix::Addr<Registry>) -> crate::replication::Forwarder {
    use crate::replication::wire::ErrorCode;
    let arbiter = actix::Arbiter::current();
    let gone = || (ErrorCode::Busy, "the daemon is shutting down".to_string());
    std::sync::Arc::new(move |request: &str| {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let reg = registry.clone();
        let msg = registry::cluster::Forwarded(request.to_string());
        let spawned = arbiter.spawn(async move {
            let _ = tx.send(reg.send(msg).await.unwrap_or_else(|_| Err(gone())));
        });
        if !spawned {
            return Err(gone());
        }
        rx.recv().unwrap_or_else(|_| Err(gone()))
    })
}

/// Lift the soft limit on open files to the hard one: a shared volume's
/// holder keeps a descriptor for every file its clients hold (as
/// virtiofsd does), beside each volume's own.
fn raise_open_files() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!(soft, hard, error = %e, "cannot raise the open-file limit");
            }
        }
    }
}

/// Start the snapshot scheduler and tell it every policy and attach.
async fn start_scheduler(node: &Arc<Node>, registry: &actix::Addr<Registry>) {
    use crate::schedule::actor::{ScheduleEvent, SnapScheduler, SnapshotOps};
    let ops = SnapshotOps {
        take: registry.clone().recipient(),
        delete: registry.clone().recipient(),
        list: registry.clone().recipient(),
    };
    let clock = Arc::new(crate::schedule::SystemClock);
    let sched = SnapScheduler::new(chrono::Local, clock, ops).start();
    let _ = node.scheduler.set(sched.recipient());
    for r in node.catalog.list() {
        if r.spec.snap.is_some() {
            node.schedule(ScheduleEvent::Policy {
                volume: r.name.clone(),
                policy: r.spec.snap.clone(),
            });
        }
    }
    // Volumes taken back after a restart are attached already.
    if let Ok(Ok(list)) = registry.send(registry::List).await {
        for v in list.into_iter().filter(|v| v.state != "detached") {
            node.schedule(ScheduleEvent::Attached {
                volume: v.name,
                attached: true,
            });
        }
    }
}

/// Refuse to replace a socket another live daemon answers on; remove a stale one.
fn claim_socket(path: &Path) -> Result<()> {
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            bail!(
                "another daemon is serving {}; stop it first, or give this one a different --name / --run-dir",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("remove stale socket {}", path.display()))?;
        tracing::info!(socket = %path.display(), "replaced a stale socket from an earlier run");
    }
    Ok(())
}

/// Paths a crashed run left that the new daemon takes back (never cleaned).
#[derive(Default)]
struct Protected {
    paths: std::collections::BTreeSet<PathBuf>,
}

impl Protected {
    fn of(records: &[AttachRecord]) -> Self {
        let mut paths = std::collections::BTreeSet::new();
        for r in records {
            paths.extend(r.fs_mount.iter().cloned());
            paths.insert(r.export.device().to_path_buf());
            if let Handover::Fuse(h) = &r.export {
                paths.insert(h.mount_dir.clone());
            }
        }
        Protected { paths }
    }

    fn has(&self, p: &Path) -> bool {
        self.paths.contains(p)
    }
}

/// Split the attach records of the last run into those this daemon can take
/// back (the volume still exists, under the same export kind) and the rest,
/// which are abandoned.
fn triage(node: &Node) -> Vec<AttachRecord> {
    let keys: Option<std::collections::BTreeSet<String>> = node
        .exporter
        .keeper()
        .and_then(|k| k.keys().ok())
        .map(|k| k.into_iter().collect());
    let mut keep = Vec::new();
    for rec in handover::load_all(node) {
        let exists = node
            .catalog
            .get(&rec.volume)
            .is_some_and(|r| r.id == rec.id);
        let why_not = match &rec.export {
            _ if !exists => Some("the volume is gone from the catalog"),
            Handover::Fuse(_) if node.exporter.kind != ExportKind::Fuse => {
                Some("this daemon does not use the FUSE export")
            }
            Handover::Ublk(_) if node.exporter.kind != ExportKind::Ublk => {
                Some("this daemon does not use the ublk export")
            }
            Handover::Fuse(h) if !mount::is_mount_point(&h.mount_dir) => {
                Some("its FUSE mount is gone")
            }
            Handover::Fuse(_) if !keys.as_ref().is_some_and(|k| k.contains(&rec.id)) => {
                Some("the FUSE keeper does not hold its connection")
            }
            Handover::Ublk(h) if !h.device.exists() => Some("its ublk device is gone"),
            _ => None,
        };
        match why_not {
            None => keep.push(rec),
            Some(reason) => {
                tracing::warn!(volume = %rec.volume, node = %node.name, device = %rec.export.device().display(), reason, "cannot take back a volume the last run had attached; cleaning it up");
                node.exporter
                    .abandon(&rec.id, &rec.export, rec.fs_mount.as_deref());
                handover::remove(node, &rec.id);
            }
        }
    }
    keep
}

/// Undo what a crashed run left and this daemon does not take back: cut
/// dead FUSE connections and remove quiesced ublk devices first (so no
/// unmount below waits on a server that is gone), then filesystem mounts,
/// devices, FUSE mounts, and empty mount points.
fn cleanup(node: &Node, keep: &[AttachRecord]) {
    let protected = Protected::of(keep);
    for m in mount::mounts_under(&node.fuse_root()) {
        if !protected.has(&m.mount_point) {
            let _ = crate::sys::fuse::abort_connection(&m.mount_point);
        }
    }
    let ublk_kept: std::collections::BTreeSet<u32> = keep
        .iter()
        .filter_map(|r| match &r.export {
            Handover::Ublk(h) => Some(h.dev_id),
            Handover::Fuse(_) => None,
        })
        .collect();
    for line in
        export::ublk::cleanup_orphans(node.exporter.run_dir(), &|id| ublk_kept.contains(&id))
    {
        tracing::warn!("{line}");
    }
    for m in mount::mounts_under(&node.mount_dir) {
        if protected.has(&m.mount_point) {
            continue;
        }
        match mount::unmount(&m.mount_point, true) {
            Ok(()) => {
                tracing::warn!(mount = %m.mount_point.display(), "unmounted a leftover of a crashed run")
            }
            Err(e) => {
                tracing::error!(mount = %m.mount_point.display(), error = %e, "cannot unmount a leftover")
            }
        }
    }
    for line in export::cleanup_leftovers(&node.fuse_root(), &|p| protected.has(p)) {
        tracing::warn!("{line}");
    }
    if let Some(k) = node.exporter.keeper() {
        let kept: std::collections::BTreeSet<&str> = keep.iter().map(|r| r.id.as_str()).collect();
        for key in k.keys().unwrap_or_default() {
            // Volume keys are the KeyRing's (restored before this).
            if !kept.contains(key.as_str()) && !crate::keys::is_key_name(&key) {
                let _ = k.release(&key);
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir(&node.mount_dir) {
        for e in entries.flatten() {
            if protected.has(&e.path()) {
                continue;
            }
            let _ = std::fs::remove_dir(e.path().join(crate::volume::mounting::DATA_SUBDIR));
            let _ = std::fs::remove_dir(e.path());
        }
    }
    match &node.cluster {
        // Replicas of removed volumes go only when etcd says so.
        Some(c) => {
            registry::cluster::sweep_replicas(c);
        }
        None => {
            for dir in registry::remove_orphans(node) {
                tracing::warn!(dir = %dir.display(), "removed data of a volume that is not in the catalog");
            }
        }
    }
}

pub fn run(args: ServeArgs, run_dir: PathBuf) -> Result<()> {
    crate::sys::malloc::pin_mmap_threshold();
    raise_open_files();
    crate::spec::validate_name(&args.name).context("--name")?;
    let mount_dir = args
        .mount_dir
        .clone()
        .unwrap_or_else(|| run_dir.join("mounts"));
    for dir in [&args.data_dir, &run_dir, &mount_dir, &args.plugin_dir] {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    std::fs::create_dir_all(args.data_dir.join("volumes"))?;
    let lock_path = args.data_dir.join("lock");
    let lock_file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("open {}", lock_path.display()))?;
    let _lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|(_, e)| {
            anyhow::anyhow!(
                "data dir {} is in use by another dunnage serve ({e}); one daemon per data dir",
                args.data_dir.display()
            )
        })?;

    let plugin_sock = args.plugin_dir.join(format!("{}.sock", args.name));
    let control_sock = run_dir.join("control.sock");
    claim_socket(&plugin_sock)?;
    claim_socket(&control_sock)?;
    let export = export::resolve(args.export)?;
    let node_name = match &args.node {
        Some(n) => {
            crate::spec::validate_name(n).context("--node")?;
            n.clone()
        }
        None => host_name(),
    };
    let cluster = if args.etcd.is_empty() {
        None
    } else {
        Some(join_cluster(&args, &node_name)?)
    };
    let catalog: Arc<dyn Catalog> = match &cluster {
        Some(c) => c.cluster.catalog(),
        None => Arc::new(EmbeddedCatalog::open(&args.data_dir)?),
    };
    let keys = crate::keys::KeyRing::new(args.secret_file.as_deref())?;
    // Last before serving: nothing below fails before the keeper is told bye.
    let exporter = Exporter::new(export, args.fuse_passthrough == Passthrough::Auto, &run_dir)?;
    // FUSE: the keeper holds own keys across a kill -9 (none with ublk).
    let keys = keys.kept_by(exporter.keeper().cloned());
    let scope = if cluster.is_some() { "global" } else { "local" };
    let node = Arc::new(Node {
        name: node_name,
        data_dir: args.data_dir.clone(),
        run_dir: run_dir.clone(),
        mount_dir: mount_dir.clone(),
        exporter,
        keys,
        arbiter: crate::engine::priority::IoArbiter::new(),
        limiters: Default::default(),
        scheduler: std::sync::OnceLock::new(),
        catalog,
        cluster,
    });
    // Own keys a killed daemon left with the keeper, before anything
    // encrypted is taken back.
    let restored = node.keys.restore(
        node.catalog
            .list()
            .iter()
            .filter(|r| r.spec.secure)
            .map(|r| r.id.as_str()),
    );
    if restored > 0 {
        tracing::info!(
            keys = restored,
            "took back volume keys the FUSE keeper held for the last run"
        );
    }
    let resumable = triage(&node);
    cleanup(&node, &resumable);

    let info = NodeInfo {
        node: node.name.clone(),
        version: env!("CARGO_PKG_VERSION").into(),
        export: format!("{export:?}").to_lowercase(),
        data_dir: args.data_dir.display().to_string(),
        run_dir: run_dir.display().to_string(),
        mount_dir: mount_dir.display().to_string(),
        plugin_socket: plugin_sock.display().to_string(),
        etcd: args.etcd.clone(),
    };

    let exporter_node = node.clone();
    let handover_on_stop = args.handover_on_stop;
    let system = actix::System::new();
    let result = system.block_on(async move {
        let registry = Registry::new(node.clone(), resumable).start();
        if let Some(c) = &node.cluster {
            c.set_forwarder(forwarder(registry.clone()));
        }
        start_scheduler(&node, &registry).await;
        let reg = registry.clone();
        let plugin_srv = HttpServer::new(move || {
            App::new()
                .app_data(web::Data::new(reg.clone()))
                .app_data(web::Data::new(Scope(scope)))
                .configure(plugin::configure)
        })
        .workers(1)
        .disable_signals()
        .bind_uds(&plugin_sock)
        .with_context(|| format!("listen on {}", plugin_sock.display()))?
        .run();
        let reg = registry.clone();
        let info = web::Data::new(info);
        let metrics_info = info.clone();
        let control_srv = HttpServer::new(move || {
            App::new()
                .app_data(web::Data::new(reg.clone()))
                .app_data(info.clone())
                .configure(control::configure)
        })
        .workers(1)
        .disable_signals()
        .bind_uds(&control_sock)
        .with_context(|| format!("listen on {}", control_sock.display()))?
        .run();
        let metrics_srv = match args.metrics_listen {
            Some(addr) => {
                let reg = registry.clone();
                let info = metrics_info;
                let srv = HttpServer::new(move || {
                    App::new()
                        .app_data(web::Data::new(reg.clone()))
                        .app_data(info.clone())
                        .configure(control::configure_metrics)
                })
                .workers(1)
                .disable_signals()
                .bind(addr)
                .with_context(|| format!("serve metrics on {addr}"))?
                .run();
                tracing::info!(%addr, "serving Prometheus metrics at /metrics");
                Some(srv)
            }
            None => None,
        };
        let (ph, ch) = (plugin_srv.handle(), control_srv.handle());
        let mh = metrics_srv.as_ref().map(|m| m.handle());
        actix_rt::spawn(plugin_srv);
        actix_rt::spawn(control_srv);
        if let Some(m) = metrics_srv {
            actix_rt::spawn(m);
        }
        tracing::info!(
            node = %node.name,
            socket = %plugin_sock.display(),
            control = %control_sock.display(),
            data_dir = %node.data_dir.display(),
            export = ?node.exporter.kind,
            volumes = node.catalog.list().len(),
            "dunnage is serving"
        );

        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let sigterm = tokio::select! {
            _ = term.recv() => true,
            _ = tokio::signal::ctrl_c() => false,
        };
        // Stop taking requests, then take every volume down (or hand over).
        ph.stop(true).await;
        ch.stop(true).await;
        if let Some(m) = mh {
            m.stop(true).await;
        }
        let attached = crate::volume::handover::count(&node);
        if sigterm && handover_on_stop && attached > 0 {
            // Exactly what a killed daemon leaves, which the next one takes
            // back (attach records, the keeper's descriptors and keys, the
            // cluster lease until its TTL): nothing here may run a teardown.
            tracing::info!(
                volumes = attached,
                "SIGTERM with --handover-on-stop: leaving the attached volumes to the next dunnage serve; exiting without detaching"
            );
            std::process::exit(0);
        }
        tracing::info!(
            "{}: shutting down",
            if sigterm { "SIGTERM" } else { "SIGINT" }
        );
        registry.send(registry::Shutdown).await.ok();
        // Orderly: the keeper lets go of the keys too, so that it can exit
        // and a volume with its own key is locked after this restart until
        // `dunnage volume unlock`. (A start that failed keeps them: the
        // volumes a killed daemon left are still to be taken back.)
        let released = node.keys.release_all();
        if released > 0 {
            tracing::info!(
                keys = released,
                "released volume keys: volumes with their own key stay locked until unlocked again"
            );
        }
        let _ = std::fs::remove_file(&plugin_sock);
        let _ = std::fs::remove_file(&control_sock);
        anyhow::Ok(())
    });
    // Also when serving failed to start: the keeper may go if it holds nothing.
    exporter_node.exporter.shutdown();
    if let Some(c) = &exporter_node.cluster {
        c.shutdown();
    }
    result?;
    tracing::info!("stopped; nothing left mounted or attached");
    Ok(())
}

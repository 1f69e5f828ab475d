//! Shared volumes (`shared=true`) in a cluster: the node holding the
//! attach mounts the filesystem and serves it to other nodes' sessions;
//! a node that mounts the volume while another holds it mounts a client
//! of the holder's (see `export::share`).

use super::forward::HolderOp;
use super::{VolumeActor, VolumeError, VolumeErrorKind};
use crate::catalog::VolumeRecord;
use crate::cluster::ClusterError;
use crate::export::share::client::ShareMount;
use crate::export::share::session::TcpTransport;
use actix::prelude::*;
use parking_lot::Mutex;
use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// How many times a Mount tries to attach or join: the holder may let go
/// between our attach try and our session (its last user left).
const JOIN_TRIES: usize = 3;
/// How long the holder may take to open a session: its actor may be busy
/// (a first mount's mkfs, an unmount's retries, a snapshot).
const JOIN_WAIT: Duration = Duration::from_secs(60);

/// This node's client of a volume another node holds.
pub(super) struct Joined {
    pub mount: ShareMount,
    pub holder: String,
}

/// Another node asks to open a session on the volume, which must be
/// shared and mounted here. Answers where its files are and a guard
/// that ends the session's count when dropped.
#[derive(Message)]
#[rtype(result = "Result<ShareGrant, VolumeError>")]
pub struct OpenShare {
    pub volume_id: String,
    pub from: String,
}

pub struct ShareGrant {
    /// The directory Docker gets on this node: the session's root.
    root: PathBuf,
    guard: ShareGuard,
    cut: Arc<Mutex<Cut>>,
    /// Dropped once the session has let go of the filesystem.
    done: crossbeam_channel::Sender<()>,
}

/// How the holder's actor ends a session it must not wait for (shutdown).
#[derive(Default)]
struct Cut {
    /// The session's connection, once it runs.
    stream: Option<TcpStream>,
    /// Cut before it ran: it ends at once.
    cut: bool,
}

/// The holder's handle on one session.
pub(super) struct Session {
    cut: Arc<Mutex<Cut>>,
    done: crossbeam_channel::Receiver<()>,
}

impl ShareGrant {
    /// The session, to run on its connection's thread: serves the files
    /// until the client goes or the holder cuts it.
    pub fn into_session(self, what: String) -> Box<dyn FnOnce(TcpStream) + Send> {
        Box::new(move |stream| {
            {
                let mut cut = self.cut.lock();
                if cut.cut {
                    return;
                }
                cut.stream = stream.try_clone().ok();
            }
            crate::export::share::session::serve(&self.root, stream, &what);
            drop(self.done);
            drop(self.guard);
        })
    }
}

impl Session {
    /// Cut the session and wait (a while) until it let go of the files.
    fn cut(&self) {
        {
            let mut cut = self.cut.lock();
            cut.cut = true;
            if let Some(s) = &cut.stream {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        }
        let _ = self.done.recv_timeout(Duration::from_secs(5));
    }
}

/// Ends a session's count on its volume's actor when dropped.
pub struct ShareGuard {
    actor: Addr<VolumeActor>,
    session: u64,
}

impl Drop for ShareGuard {
    fn drop(&mut self) {
        self.actor.do_send(ShareClosed {
            session: self.session,
        });
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct ShareClosed {
    session: u64,
}

impl Handler<OpenShare> for VolumeActor {
    type Result = Result<ShareGrant, VolumeError>;

    fn handle(&mut self, m: OpenShare, ctx: &mut SyncContext<Self>) -> Self::Result {
        let record = self.record()?;
        if record.id != m.volume_id {
            return Err(self.err(VolumeErrorKind::Removed));
        }
        if !record.spec.shared {
            return Err(self.err(VolumeErrorKind::NotShared(self.name.clone())));
        }
        let Some(root) = self.attached.as_ref().and_then(|a| a.data_path.clone()) else {
            return Err(self.err(VolumeErrorKind::NotMountedHere));
        };
        let session = self.usage.share_opened(&m.from);
        tracing::info!(volume = %self.name, from = %m.from, session, "another node joined the shared volume");
        self.publish();
        let cut = Arc::new(Mutex::new(Cut::default()));
        let (done, finished) = crossbeam_channel::bounded(0);
        self.sessions.insert(
            session,
            Session {
                cut: cut.clone(),
                done: finished,
            },
        );
        Ok(ShareGrant {
            root,
            guard: ShareGuard {
                actor: ctx.address(),
                session,
            },
            cut,
            done,
        })
    }
}

impl Handler<ShareClosed> for VolumeActor {
    type Result = ();

    fn handle(&mut self, m: ShareClosed, _: &mut SyncContext<Self>) {
        self.usage.share_closed(m.session);
        self.sessions.remove(&m.session);
        tracing::info!(volume = %self.name, session = m.session, "a node left the shared volume");
        self.detach_if_unused();
        self.publish();
    }
}

impl VolumeActor {
    /// Detach a volume attached here that nobody uses any more, as the
    /// last Unmount would (after the last session of a shared volume, or
    /// a restart that found only other nodes using it). On failure it stays
    /// attached; the next session end, Mount or host attach tries again.
    pub(super) fn detach_if_unused(&mut self) {
        if self.attached.is_none() || !self.usage.is_idle() {
            return;
        }
        if let Err(e) = self.tear_down(false) {
            tracing::warn!(volume = %self.name, error = %e, "cannot detach a volume nobody uses");
        }
    }

    /// End every other node's session (the daemon stops): their clients
    /// see errors from now on, and the filesystem is free to unmount.
    pub(super) fn cut_sessions(&mut self) {
        for (_, s) in self.sessions.drain() {
            s.cut();
        }
    }

    /// A Mount's first step on this node: attach here, or, for a shared
    /// volume another node holds, join it there.
    pub(super) fn attach_or_join(&mut self, record: &VolumeRecord) -> Result<(), VolumeError> {
        let mut tries = 0;
        loop {
            tries += 1;
            let holder = match self.bring_up(&record.spec) {
                Ok(()) => {
                    if let Err(e) = self.format_and_mount(record) {
                        let _ = self.tear_down(true);
                        self.publish();
                        return Err(self.err(e));
                    }
                    return Ok(());
                }
                Err(VolumeErrorKind::Cluster(c)) if record.spec.shared => match *c {
                    ClusterError::HeldBy { node, .. } => node,
                    other => return Err(self.err(other)),
                },
                Err(e) => return Err(self.err(e)),
            };
            match self.join(record, &holder) {
                Ok(joined) => {
                    self.joined = Some(joined);
                    return Ok(());
                }
                // It let go meanwhile: attach here after all.
                Err(VolumeErrorKind::OnHolder { code, .. })
                    if tries < JOIN_TRIES
                        && matches!(
                            code,
                            crate::replication::wire::ErrorCode::NotFound
                                | crate::replication::wire::ErrorCode::Busy
                        ) =>
                {
                    std::thread::sleep(Duration::from_millis(300));
                }
                Err(e) => return Err(self.err(e)),
            }
        }
    }

    /// Open a session on `holder` and mount its client where this node
    /// mounts the volume.
    fn join(&self, record: &VolumeRecord, holder: &str) -> Result<Joined, VolumeErrorKind> {
        let Some(c) = &self.node.cluster else {
            return Err(VolumeErrorKind::NotClustered("a shared volume's session"));
        };
        let (addr, json) = super::forward::holder_request(c, record, holder, HolderOp::Share)?;
        let stream = crate::replication::open_session(
            holder,
            addr,
            c.cluster.node(),
            &json,
            c.replica_timeout,
            JOIN_WAIT,
        )
        .map_err(|e| super::forward::on_holder(holder, e))?;
        let what = format!("volume {} on node {holder}", record.name);
        let transport = TcpTransport::new(stream, what)
            .map_err(|e| VolumeErrorKind::Mount(format!("a session to node {holder}: {e}")))?;
        let target = self.node.mount_point(&self.name);
        std::fs::create_dir_all(&target)
            .map_err(|e| VolumeErrorKind::Mount(format!("create {}: {e}", target.display())))?;
        let fsname = format!("dunnage:{}@{holder}", record.name);
        let mount = ShareMount::mount(Box::new(transport), &target, &fsname).map_err(|e| {
            VolumeErrorKind::Mount(format!(
                "mount the shared volume served by node {holder} at {}: {e}",
                target.display()
            ))
        })?;
        tracing::info!(volume = %self.name, holder, mountpoint = %target.display(), "joined a shared volume held by another node");
        Ok(Joined {
            mount,
            holder: holder.to_string(),
        })
    }

    /// The last Unmount of a joined volume: unmount the client. On failure
    /// (busy) it stays mounted and the caller may retry.
    pub(super) fn leave(&mut self) -> Result<(), VolumeErrorKind> {
        let Some(joined) = self.joined.as_mut() else {
            return Ok(());
        };
        let target = joined.mount.mount_point().to_path_buf();
        let mut last = None;
        // As for a filesystem (`mounting::unmount`): busy for a moment
        // after a container stops.
        for _ in 0..25 {
            match joined.mount.unmount() {
                Ok(()) => {
                    last = None;
                    break;
                }
                Err(e) => {
                    last = Some(e);
                    std::thread::sleep(Duration::from_millis(40));
                }
            }
        }
        if let Some(e) = last {
            return Err(VolumeErrorKind::Mount(format!(
                "unmount {}: {e}; something on this host still uses the volume's files",
                target.display()
            )));
        }
        let holder = self.joined.take().map(|j| j.holder).unwrap_or_default();
        let _ = std::fs::remove_dir(&target);
        tracing::info!(volume = %self.name, holder, "left the shared volume");
        Ok(())
    }
}

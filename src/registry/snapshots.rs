//! Snapshot requests: forwarded to the volume's actor, which owns its
//! image. Clones (`parent=`) are in `clone.rs`.

use super::{forward, Registry, RegistryError, Reply};
use crate::volume::backup::{self as vb, Incoming, TransferSummary};
use crate::volume::snapshots::{self as vs, SnapshotEntry, Space};
use actix::prelude::*;

/// `dunnage snapshot create VOL [NAME]`.
#[derive(Message)]
#[rtype(result = "Reply<SnapshotEntry>")]
pub struct TakeSnapshot {
    pub volume: String,
    pub name: Option<String>,
}

#[derive(Message)]
#[rtype(result = "Reply<Vec<SnapshotEntry>>")]
pub struct ListSnapshots {
    pub volume: String,
}

#[derive(Message)]
#[rtype(result = "Reply<()>")]
pub struct DeleteSnapshot {
    pub volume: String,
    pub name: String,
}

#[derive(Message)]
#[rtype(result = "Reply<()>")]
pub struct Restore {
    pub volume: String,
    pub snapshot: String,
}

/// `dunnage snapshot export`: the stream goes to `path` (the CLI's FIFO).
#[derive(Message)]
#[rtype(result = "Reply<TransferSummary>")]
pub struct Export {
    pub volume: String,
    pub snapshot: String,
    pub since: Option<String>,
    pub path: std::path::PathBuf,
}

/// `dunnage volume import`: `stream` (its header read) into `volume`.
#[derive(Message)]
#[rtype(result = "Reply<TransferSummary>")]
pub struct Import {
    pub volume: String,
    pub stream: Incoming,
    /// The volume was made for this import.
    pub fresh: bool,
}

/// `dunnage snapshot group SNAP VOL...`: one crash-consistent cut of
/// several volumes (a database's data and log volumes), each snapshot
/// named `name` ([`vs::GroupPart`]). All or nothing: if one cannot be
/// taken, those taken are deleted.
#[derive(Message)]
#[rtype(result = "Reply<Vec<SnapshotEntry>>")]
pub struct GroupSnapshot {
    pub volumes: Vec<String>,
    pub name: String,
}

impl Handler<GroupSnapshot> for Registry {
    type Result = ResponseFuture<Reply<Vec<SnapshotEntry>>>;
    fn handle(&mut self, m: GroupSnapshot, _: &mut Context<Self>) -> Self::Result {
        let mut names = m.volumes;
        names.sort();
        names.dedup();
        if names.is_empty() {
            return Box::pin(async {
                Err(RegistryError::BadRequest("name at least one volume".into()))
            });
        }
        let actors: Result<Vec<_>, _> = names
            .iter()
            .map(|n| self.lookup(n).and_then(|r| self.actor(&r)))
            .collect();
        let actors = match actors {
            Ok(a) => a,
            Err(e) => return Box::pin(async move { Err(e) }),
        };
        let (frozen_tx, frozen_rx) = crossbeam_channel::unbounded();
        let mut go = Vec::new();
        let mut parts = Vec::new();
        for addr in &actors {
            let (tx, rx) = crossbeam_channel::bounded(1);
            go.push(tx);
            parts.push(addr.send(vs::GroupPart {
                name: m.name.clone(),
                frozen: frozen_tx.clone(),
                go: rx,
            }));
        }
        drop(frozen_tx);
        let count = actors.len();
        // Blocks on channels, so not on the registry's thread: once every
        // volume is paused (or one cannot be, or time is up), says go or not.
        std::thread::spawn(move || {
            let deadline = std::time::Instant::now() + vs::GROUP_WAIT;
            let mut paused = 0;
            while paused < count {
                match frozen_rx.recv_deadline(deadline) {
                    Ok(Ok(())) => paused += 1,
                    Ok(Err(_)) | Err(_) => break,
                }
            }
            for tx in go {
                let _ = tx.send(paused == count);
            }
        });
        let name = m.name;
        Box::pin(async move {
            let mut taken = Vec::new();
            let mut first_err = None;
            for (part, addr) in parts.into_iter().zip(&actors) {
                match part.await {
                    Ok(Ok(entry)) => taken.push((entry, addr.clone())),
                    Ok(Err(e)) => {
                        // The volume that refused says why; the others
                        // only that they were called off.
                        let called_off = matches!(&e.kind, crate::volume::VolumeErrorKind::Group(w) if w.starts_with("called off"));
                        if first_err.is_none()
                            || (!called_off && first_err.as_ref().is_some_and(|(off, _)| *off))
                        {
                            first_err = Some((called_off, RegistryError::Volume(e)));
                        }
                    }
                    Err(_) => first_err = Some((false, RegistryError::ShuttingDown)),
                }
            }
            let Some((_, err)) = first_err else {
                return Ok(taken.into_iter().map(|(e, _)| e).collect());
            };
            for (entry, addr) in taken {
                let undo =
                    addr.send(crate::volume::snapshots::DeleteSnapshot { name: name.clone() });
                if let Ok(Err(e)) = undo.await {
                    tracing::warn!(volume = %entry.volume, snapshot = %name, error = %e, "could not delete the snapshot of a group that failed; delete it with `dunnage snapshot rm`");
                }
            }
            Err(err)
        })
    }
}

/// Space used and shared (answered by the volume's actor).
#[derive(Message)]
#[rtype(result = "Reply<Option<Space>>")]
pub struct QuerySpace {
    pub volume: String,
}

macro_rules! to_actor {
    ($msg:ty, $reply:ty, |$m:ident| $volume:expr, $inner:expr) => {
        impl Handler<$msg> for Registry {
            type Result = ResponseFuture<Reply<$reply>>;
            fn handle(&mut self, $m: $msg, _: &mut Context<Self>) -> Self::Result {
                match self.lookup($volume).and_then(|r| self.actor(&r)) {
                    Ok(addr) => forward(addr, $inner),
                    Err(e) => Box::pin(async move { Err(e) }),
                }
            }
        }
    };
}

to_actor!(
    TakeSnapshot,
    SnapshotEntry,
    |m| &m.volume,
    vs::TakeSnapshot { name: m.name }
);
to_actor!(
    ListSnapshots,
    Vec<SnapshotEntry>,
    |m| &m.volume,
    vs::ListSnapshots
);
to_actor!(
    DeleteSnapshot,
    (),
    |m| &m.volume,
    vs::DeleteSnapshot { name: m.name }
);
to_actor!(
    Restore,
    (),
    |m| &m.volume,
    vs::Restore {
        snapshot: m.snapshot
    }
);
to_actor!(QuerySpace, Option<Space>, |m| &m.volume, vs::QuerySpace);
impl Handler<Export> for Registry {
    type Result = ResponseFuture<Reply<TransferSummary>>;
    /// The actor starts the export; its thread's result is awaited here.
    fn handle(&mut self, m: Export, _: &mut Context<Self>) -> Self::Result {
        let addr = match self.lookup(&m.volume).and_then(|r| self.actor(&r)) {
            Ok(addr) => addr,
            Err(e) => return Box::pin(async move { Err(e) }),
        };
        let msg = vb::Export {
            snapshot: m.snapshot,
            since: m.since,
            path: m.path,
        };
        Box::pin(async move {
            let running = addr
                .send(msg)
                .await
                .map_err(|_| RegistryError::ShuttingDown)??;
            Ok(running.0.await.map_err(|_| RegistryError::ShuttingDown)??)
        })
    }
}
to_actor!(
    Import,
    TransferSummary,
    |m| &m.volume,
    vb::Import {
        stream: m.stream,
        fresh: m.fresh
    }
);

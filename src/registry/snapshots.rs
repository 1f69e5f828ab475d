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

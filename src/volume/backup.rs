//! Export and import (RBD's `export`, `export-diff`, `import`,
//! `import-diff`): a snapshot's contents as a stream ([`crate::engine::stream`]),
//! whole or as its changes since an older snapshot; and a volume made
//! from a whole stream, or brought forward by a stream of changes. Backups
//! and copies to another machine: `dunnage snapshot export pg s2 --since s1
//! | ssh b dunnage volume import pg`.
//!
//! An export reads the snapshot (immutable) while the volume stays in use.
//! An encrypted volume's stream carries its plaintext (its key decrypts
//! here), so that it can be imported under another key. An import writes
//! through the volume's engine (encrypting, and in a cluster through a
//! mirror to every replica), then takes the stream's snapshot, so that the
//! next stream of changes since it applies.

use super::{Backing, VolumeActor, VolumeError, VolumeErrorKind};
use crate::catalog::VolumeRecord;
use crate::config::ClusterNode;
use crate::engine::stream::{Piece, StreamHeader, StreamReader, StreamWriter, MAX_RECORD};
use crate::engine::{BlockEngine, SnapshotView, ThinImage, UnitCipher};
use crate::replication::LocalReplica;
use actix::prelude::*;
use serde::{Deserialize, Serialize};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// What an export or import moved.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TransferSummary {
    pub volume: String,
    pub snapshot: String,
    pub since: Option<String>,
    /// Bytes of data in the stream, and bytes it zeroed (discarded).
    pub data_bytes: u64,
    pub zero_bytes: u64,
}

/// Write snapshot `snapshot` (or its changes since `since`) as a stream
/// to `path` (the CLI's FIFO). The actor only prepares it: a thread of its
/// own streams, so that the volume's other requests (a Docker unmount)
/// never wait for an export; its result comes on the receiver.
#[derive(Message)]
#[rtype(result = "Result<ExportRunning, VolumeError>")]
pub struct Export {
    pub snapshot: String,
    pub since: Option<String>,
    pub path: PathBuf,
}

/// A stream being read (its header checked).
pub type Incoming = StreamReader<Box<dyn Read + Send>>;

/// Apply `stream` to this volume, which must be detached: a whole stream
/// into the volume just made for it (`fresh`), a stream of changes into
/// one holding its base snapshot.
#[derive(Message)]
#[rtype(result = "Result<TransferSummary, VolumeError>")]
pub struct Import {
    pub stream: Incoming,
    pub fresh: bool,
}

/// An export under way; its result when it ends.
pub struct ExportRunning(pub tokio::sync::oneshot::Receiver<Result<TransferSummary, VolumeError>>);

/// What an export thread reads: this node's image, or its replica.
enum Source {
    Image(Arc<ThinImage>),
    Replica(Arc<ClusterNode>, Arc<LocalReplica>),
}

impl Handler<Export> for VolumeActor {
    type Result = Result<ExportRunning, VolumeError>;
    fn handle(&mut self, m: Export, _: &mut SyncContext<Self>) -> Self::Result {
        let record = self.record()?;
        let cipher = self.cipher(&record).map_err(|e| self.err(e))?;
        let source = self
            .export_source(&record, &m.snapshot)
            .map_err(|e| self.err(e))?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (volume, node) = (self.name.clone(), self.node.name.clone());
        tracing::info!(volume, snapshot = %m.snapshot, since = ?m.since, "exporting");
        std::thread::Builder::new()
            .name(format!("export-{volume}"))
            .spawn(move || {
                let res = source.export(&record, &m, cipher.as_ref());
                match &res {
                    Ok(s) => tracing::info!(volume, snapshot = %m.snapshot, since = ?m.since, data_bytes = s.data_bytes, "exported"),
                    Err(e) => tracing::warn!(volume, snapshot = %m.snapshot, error = %e, "export failed"),
                }
                let _ = tx.send(res.map_err(|kind| VolumeError { volume, node, kind }));
            })
            .map_err(|e| self.err(VolumeErrorKind::Transfer(format!("start the export: {e}"))))?;
        Ok(ExportRunning(rx))
    }
}

impl VolumeActor {
    /// The image (or replica) an export of `snapshot` reads, held open for
    /// it: the attached one, or one opened now that the actor shares with
    /// what else opens the image meanwhile (an attach, a snapshot).
    fn export_source(
        &mut self,
        record: &VolumeRecord,
        snapshot: &str,
    ) -> Result<Source, VolumeErrorKind> {
        let Some(c) = self.node.cluster.clone() else {
            let image = match self.attached.as_ref().map(|a| &a.engine) {
                Some(Backing::Image(i)) => i.clone(),
                _ => match self.exporting.upgrade() {
                    Some(i) => i,
                    None => Arc::new(ThinImage::open(&self.node.volume_dir(&self.id))?),
                },
            };
            self.exporting = Arc::downgrade(&image);
            return Ok(Source::Image(image));
        };
        // A node with a replica holding the snapshot reads its own.
        let me = c.cluster.node().to_string();
        let holders = c
            .cluster
            .snapshots(&record.id)?
            .into_iter()
            .find(|s| s.name == snapshot)
            .map(|s| s.nodes)
            .ok_or_else(|| VolumeErrorKind::Transfer(format!("it has no snapshot {snapshot}")))?;
        if !holders.contains(&me) || !record.replicas.contains(&me) {
            return Err(VolumeErrorKind::Transfer(format!(
                "node {me} holds no replica of it with snapshot {snapshot}: run the export on a node that does ({})",
                holders.join(", ")
            )));
        }
        let replica = super::replicated::open_local(&c, record, false)?;
        Ok(Source::Replica(c, replica))
    }

    /// Refuse what would change the image's files under an export.
    pub(super) fn check_not_exporting(&self) -> Result<(), VolumeErrorKind> {
        match self.exporting.upgrade() {
            Some(_) => Err(VolumeErrorKind::Transfer(
                "an export of one of its snapshots is running; retry once it has ended".into(),
            )),
            None => Ok(()),
        }
    }

    /// The volume's cipher if it is encrypted (its own key, or the node's).
    fn cipher(&self, record: &VolumeRecord) -> Result<Option<UnitCipher>, VolumeErrorKind> {
        if !record.spec.secure {
            return Ok(None);
        }
        if self.node.cluster.is_some() {
            let key = self
                .node
                .keys
                .node_key()
                .ok_or(VolumeErrorKind::NoClusterKey)?;
            let from = PathBuf::from(format!("the catalog record of volume {}", self.name));
            let params = record.crypt.as_deref().ok_or_else(|| {
                VolumeErrorKind::Transfer(
                    "it is marked secure but has no encryption parameters".into(),
                )
            })?;
            return Ok(Some(UnitCipher::over(params, &key, &from)?));
        }
        let key = self
            .node
            .keys
            .get(&self.id)
            .ok_or_else(|| VolumeErrorKind::Locked(self.name.clone()))?;
        Ok(Some(UnitCipher::open(
            &self.node.volume_dir(&self.id),
            &key,
        )?))
    }
}

impl Source {
    fn export(
        self,
        record: &VolumeRecord,
        m: &Export,
        cipher: Option<&UnitCipher>,
    ) -> Result<TransferSummary, VolumeErrorKind> {
        let out = std::fs::OpenOptions::new()
            .write(true)
            .open(&m.path)
            .map_err(|e| VolumeErrorKind::Transfer(format!("open {}: {e}", m.path.display())))?;
        match self {
            Source::Image(img) => {
                let view = img.snapshot_view(&m.snapshot)?;
                let since = m
                    .since
                    .as_deref()
                    .map(|s| img.snapshot_view(s))
                    .transpose()?;
                write_stream(record, view, since, cipher, out)
            }
            Source::Replica(c, replica) => {
                let res = (|| {
                    let view = replica.snapshot_view(&m.snapshot)?;
                    let since = m
                        .since
                        .as_deref()
                        .map(|s| replica.snapshot_view(s))
                        .transpose()?;
                    write_stream(record, view, since, cipher, out)
                })();
                drop(replica);
                c.replicas.close(&record.id);
                res
            }
        }
    }
}

/// Stream `view` (or its changes since `since`) to `out`.
fn write_stream(
    record: &VolumeRecord,
    view: SnapshotView<'_>,
    since: Option<SnapshotView<'_>>,
    cipher: Option<&UnitCipher>,
    out: std::fs::File,
) -> Result<TransferSummary, VolumeErrorKind> {
    let bs = view.block_size();
    let size = view.size();
    let header = StreamHeader {
        volume: record.name.clone(),
        snapshot: view.name().to_string(),
        since: since.as_ref().map(|s| s.name().to_string()),
        size,
        block_size: bs as u32,
        fs: record.spec.fs.to_string(),
        formatted: record.formatted,
    };
    let mut w = StreamWriter::new(std::io::BufWriter::with_capacity(1 << 20, out), &header)?;
    let mut buf = Vec::new();
    let mut zero_bytes = 0;
    for (first, count, mapped) in view.changes(since.as_ref(), (MAX_RECORD / bs).max(1)) {
        let offset = first * bs;
        let len = (count * bs).min(size - offset);
        if !mapped {
            w.zero(offset, len)?;
            zero_bytes += len;
            continue;
        }
        buf.resize(len as usize, 0);
        view.read_at(&mut buf, offset)?;
        if let Some(c) = cipher {
            c.decrypt(&mut buf, offset)?;
        }
        w.data(offset, &buf)?;
    }
    let data_bytes = w.data_bytes();
    w.finish()?
        .into_inner()
        .map_err(|e| VolumeErrorKind::Transfer(format!("write the stream: {}", e.error())))?;
    Ok(TransferSummary {
        volume: record.name.clone(),
        snapshot: header.snapshot,
        since: header.since,
        data_bytes,
        zero_bytes,
    })
}

impl Handler<Import> for VolumeActor {
    type Result = Result<TransferSummary, VolumeError>;
    fn handle(&mut self, m: Import, _: &mut SyncContext<Self>) -> Self::Result {
        let record = self.record()?;
        let mut stream = m.stream;
        let h = stream.header().clone();
        self.check_import(&record, &h, m.fresh)
            .map_err(|e| self.err(e))?;
        self.check_not_exporting().map_err(|e| self.err(e))?;
        let cipher = self.cipher(&record).map_err(|e| self.err(e))?;
        let moved = match self.node.cluster.clone() {
            None => {
                let img =
                    ThinImage::open(&self.node.volume_dir(&self.id)).map_err(|e| self.err(e))?;
                let moved = apply(&mut stream, &img, cipher.as_ref())
                    .and_then(|moved| Ok(img.flush().map(|()| moved)?))
                    .map_err(|e| self.err(self.import_failed(&h, e)))?;
                img.snapshot(&h.snapshot).map_err(|e| self.err(e))?;
                moved
            }
            Some(c) => {
                let moved = self.with_mirror(&c, &record, ("take", &h.snapshot), |mirror, _| {
                    let moved = apply(&mut stream, mirror, cipher.as_ref())
                        .and_then(|moved| Ok(mirror.flush().map(|()| moved)?))
                        .map_err(|e| self.import_failed(&h, e))?;
                    Ok(moved)
                })?;
                self.take_snapshot(Some(h.snapshot.clone()))?;
                moved
            }
        };
        if m.fresh {
            // Its filesystem came with the data: never formatted again.
            self.node
                .catalog
                .modify(&self.name, &self.id, &mut |r| r.formatted = h.formatted)
                .map_err(|e| self.err(e))?;
        }
        tracing::info!(volume = %self.name, snapshot = %h.snapshot, since = ?h.since, data_bytes = moved.0, "imported");
        Ok(TransferSummary {
            volume: self.name.clone(),
            snapshot: h.snapshot,
            since: h.since,
            data_bytes: moved.0,
            zero_bytes: moved.1,
        })
    }
}

impl VolumeActor {
    /// What a stream needs of the volume it goes into.
    fn check_import(
        &self,
        record: &VolumeRecord,
        h: &StreamHeader,
        fresh: bool,
    ) -> Result<(), VolumeErrorKind> {
        let refuse = |why: String| Err(VolumeErrorKind::Transfer(why));
        if self.attached.is_some() {
            return refuse(format!(
                "it is in use; a stream is imported only into a detached volume: stop its containers or `dunnage detach {}` first",
                self.name
            ));
        }
        let snapshots: Vec<String> = match &self.node.cluster {
            Some(c) => c
                .cluster
                .snapshots(&record.id)?
                .into_iter()
                .map(|s| s.name)
                .collect(),
            None => ThinImage::snapshot_names(&self.node.volume_dir(&self.id))?,
        };
        if snapshots.contains(&h.snapshot) {
            return refuse(format!(
                "it has a snapshot {} already, which the import would take: the stream was imported before, or remove that snapshot first",
                h.snapshot
            ));
        }
        match &h.since {
            None if !fresh => refuse(format!(
                "the stream holds all of {}'s snapshot {} and makes a new volume; import it under a name no volume has",
                h.volume, h.snapshot
            )),
            None => Ok(()),
            Some(base) if !snapshots.contains(base) => refuse(format!(
                "the stream holds the changes of {}'s snapshot {} since {base}, and this volume has no snapshot {base} to apply them to (its snapshots: {}); import the stream since an older snapshot it has, or a whole one",
                h.volume,
                h.snapshot,
                if snapshots.is_empty() { "none".to_string() } else { snapshots.join(", ") }
            )),
            Some(_) if record.spec.size < h.size => refuse(format!(
                "the stream's volume has {} bytes and this one {}: grow it first (`dunnage volume resize {} ...`)",
                h.size, record.spec.size, self.name
            )),
            Some(_) if h.fs != record.spec.fs.to_string() => refuse(format!(
                "the stream's volume has fs={} and this one fs={}: it is not a copy of it",
                h.fs, record.spec.fs
            )),
            Some(_) => Ok(()),
        }
    }

    /// An import that stopped part way: say what state the volume is in.
    fn import_failed(&self, h: &StreamHeader, e: VolumeErrorKind) -> VolumeErrorKind {
        VolumeErrorKind::Transfer(match &h.since {
            None => format!("the import stopped: {e}; the volume made for it is removed"),
            Some(base) => format!(
                "the import stopped: {e}; the volume holds part of the stream's changes now: `dunnage volume restore {} {base}` puts it back as at {base}",
                self.name
            ),
        })
    }
}

/// Write every piece of `stream` to `engine` (encrypting with `cipher`):
/// data bytes and zeroed bytes.
fn apply(
    stream: &mut Incoming,
    engine: &dyn BlockEngine,
    cipher: Option<&UnitCipher>,
) -> Result<(u64, u64), VolumeErrorKind> {
    let (mut data, mut zeros) = (0, 0);
    let mut buf = Vec::new();
    while let Some(piece) = stream.next_piece()? {
        match piece {
            Piece::Data { offset, len } => {
                match cipher {
                    Some(c) => {
                        buf.clear();
                        buf.extend_from_slice(stream.data());
                        c.encrypt(&mut buf, offset)?;
                        engine.write_at(&buf, offset)?;
                    }
                    None => engine.write_at(stream.data(), offset)?,
                }
                data += len as u64;
            }
            Piece::Zero { offset, len } => {
                engine.discard(offset, len)?;
                zeros += len;
            }
        }
    }
    Ok((data, zeros))
}

/// Open a stream at `path` (the CLI's FIFO) and read its header.
pub fn open_stream(path: &Path) -> Result<Incoming, VolumeErrorKind> {
    let f = std::fs::File::open(path)
        .map_err(|e| VolumeErrorKind::Transfer(format!("open {}: {e}", path.display())))?;
    let r: Box<dyn Read + Send> = Box::new(std::io::BufReader::with_capacity(1 << 20, f));
    Ok(StreamReader::open(r)?)
}

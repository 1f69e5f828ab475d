//! Attach records: while a volume is attached, its actor keeps in the run
//! dir what a restarted daemon needs to take it back without disturbing its
//! users (the export's handover, the filesystem mount, Docker's mount IDs).
//! The run dir is on tmpfs: after a reboot nothing is attached, and no
//! record survives either.

use super::usage::Usage;
use crate::config::Node;
use crate::export::Handover;
use serde::{Deserialize, Serialize};
use std::io;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachRecord {
    pub volume: String,
    pub id: String,
    pub export: Handover,
    /// Where the filesystem is mounted, and the directory Docker was given.
    pub fs_mount: Option<PathBuf>,
    pub data_path: Option<PathBuf>,
    pub usage: Usage,
    /// The attach generation held (cluster mode): a restarted daemon takes
    /// the volume back only if no other node attached it meanwhile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<crate::replication::Generation>,
}

fn path(node: &Node, id: &str) -> PathBuf {
    node.attached_dir().join(format!("{id}.json"))
}

/// Write atomically (temp file + rename): a crash leaves the old or the new.
pub fn save(node: &Node, rec: &AttachRecord) -> io::Result<()> {
    let dir = node.attached_dir();
    std::fs::create_dir_all(&dir)?;
    let tmp = dir.join(format!(".{}.tmp", rec.id));
    std::fs::write(&tmp, serde_json::to_vec_pretty(rec)?)?;
    std::fs::rename(&tmp, path(node, &rec.id))
}

pub fn remove(node: &Node, id: &str) {
    match std::fs::remove_file(path(node, id)) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(id, error = %e, "cannot remove the attach record"),
    }
}

/// How many volumes have a record (attached here), touching nothing.
pub fn count(node: &Node) -> usize {
    std::fs::read_dir(node.attached_dir()).map_or(0, |entries| {
        entries
            .flatten()
            .filter(|e| e.path().extension().and_then(|x| x.to_str()) == Some("json"))
            .count()
    })
}

/// Every readable record; unreadable ones are reported and removed (their
/// leftovers are then cleaned up like any crash's).
pub fn load_all(node: &Node) -> Vec<AttachRecord> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(node.attached_dir()) else {
        return out;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.extension().and_then(|x| x.to_str()) != Some("json") {
            let _ = std::fs::remove_file(&p);
            continue;
        }
        match read(&p) {
            Ok(r) => out.push(r),
            Err(err) => {
                tracing::warn!(record = %p.display(), error = %err, "unreadable attach record dropped");
                let _ = std::fs::remove_file(&p);
            }
        }
    }
    out
}

fn read(p: &Path) -> io::Result<AttachRecord> {
    Ok(serde_json::from_slice(&std::fs::read(p)?)?)
}

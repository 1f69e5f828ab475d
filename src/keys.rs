//! Encryption keys, held in memory only: never written to disk, never
//! logged (`Secret`'s Debug is redacted). A volume created with its own
//! `secret_key` is locked after a daemon restart until `dunnage volume
//! unlock` gives the key again; volumes on the node key (`serve
//! --secret-file`) open by themselves.

use crate::engine::Secret;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::io;
use std::path::Path;
use std::sync::Arc;

#[derive(Default)]
pub struct KeyRing {
    node: Option<Arc<Secret>>,
    volumes: Mutex<HashMap<String, Arc<Secret>>>,
}

impl KeyRing {
    /// With the node-wide key read from `path` (the whole file, without a
    /// trailing newline), if given.
    pub fn new(path: Option<&Path>) -> io::Result<KeyRing> {
        let Some(path) = path else {
            return Ok(KeyRing::default());
        };
        let mut bytes = std::fs::read(path).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("read --secret-file {}: {e}", path.display()),
            )
        })?;
        while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
            bytes.pop();
        }
        if bytes.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("--secret-file {} is empty", path.display()),
            ));
        }
        use std::os::unix::fs::PermissionsExt;
        if let Ok(m) = std::fs::metadata(path) {
            if m.permissions().mode() & 0o077 != 0 {
                tracing::warn!(file = %path.display(), "the secret file is readable by others than its owner: chmod 600 it");
            }
        }
        Ok(KeyRing {
            node: Some(Arc::new(Secret::new(bytes))),
            volumes: Mutex::default(),
        })
    }

    pub fn has_node_key(&self) -> bool {
        self.node.is_some()
    }

    pub fn node_key(&self) -> Option<Arc<Secret>> {
        self.node.clone()
    }

    /// Remember the key of volume `id` (by its id: a re-created name never
    /// meets an old key).
    pub fn insert(&self, id: &str, key: Arc<Secret>) {
        self.volumes.lock().insert(id.to_string(), key);
    }

    pub fn forget(&self, id: &str) {
        self.volumes.lock().remove(id);
    }

    /// The key to try for volume `id`: its own if known, else the node's.
    pub fn get(&self, id: &str) -> Option<Arc<Secret>> {
        self.volumes
            .lock()
            .get(id)
            .cloned()
            .or_else(|| self.node.clone())
    }
}

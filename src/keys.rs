//! Encryption keys: never written to disk, never logged (`Secret`'s Debug
//! is redacted). Volumes on the node key (`serve --secret-file`) open by
//! themselves after any restart.
//!
//! A volume's own key (`secret_key` at create, `dunnage volume unlock`)
//! lives in the daemon's memory and, with the FUSE export, also in a sealed
//! memfd that the FUSE keeper holds as `key:<volume id>` (RAM only, like
//! the daemon's memory). The keeper outlives a daemon killed with -9, so
//! the next daemon takes the key back ([`KeyRing::restore`]) before it
//! resumes the attached volumes, and an encrypted volume stays in use
//! across the crash. An orderly shutdown (SIGTERM/SIGINT) releases those
//! memfds ([`KeyRing::release_all`]): after a clean restart a volume with
//! its own key is locked until `dunnage volume unlock` gives it again, and
//! no key keeps the keeper alive. With ublk there is no keeper: own keys
//! are in the daemon's memory only and locked after any restart.

use crate::engine::Secret;
use crate::export::fuse::keeper::Keeper;
use parking_lot::Mutex;
use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use zeroize::Zeroizing;

/// What the keeper's names for volume keys start with (volume ids never
/// contain a colon, so they never collide with a volume's descriptors).
const KEEPER_PREFIX: &str = "key:";
/// A held memfd larger than this is not one of ours.
const MAX_KEY_LEN: u64 = 1 << 20;

/// Is `name` (one of the keeper's keys) a volume key rather than a volume's
/// descriptors?
pub fn is_key_name(name: &str) -> bool {
    name.starts_with(KEEPER_PREFIX)
}

fn keeper_name(id: &str) -> String {
    format!("{KEEPER_PREFIX}{id}")
}

/// A memfd holding `secret`, sealed against any change (best effort: a
/// kernel without sealing still gets a private, close-on-exec memfd).
fn to_memfd(secret: &Secret) -> io::Result<OwnedFd> {
    use nix::sys::memfd::{memfd_create, MFdFlags};
    let fd = memfd_create(
        c"dunnage-key",
        MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
    )?;
    let mut file = File::from(fd);
    file.write_all(secret.bytes())?;
    use nix::fcntl::{fcntl, FcntlArg, SealFlag};
    let seals = SealFlag::F_SEAL_SHRINK
        | SealFlag::F_SEAL_GROW
        | SealFlag::F_SEAL_WRITE
        | SealFlag::F_SEAL_SEAL;
    if let Err(e) = fcntl(&file, FcntlArg::F_ADD_SEALS(seals)) {
        tracing::debug!(error = %e, "cannot seal a key memfd");
    }
    Ok(OwnedFd::from(file))
}

/// The secret in a memfd made by [`to_memfd`]. Read at offset 0: the
/// keeper's copy shares the file offset, which the write left at the end.
fn from_memfd(fd: OwnedFd) -> io::Result<Secret> {
    let file = File::from(fd);
    let len = file.metadata()?.len();
    if len == 0 || len > MAX_KEY_LEN {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a held key of {len} bytes is not one of ours"),
        ));
    }
    let mut buf = Zeroizing::new(vec![0u8; len as usize]);
    file.read_exact_at(&mut buf, 0)?;
    // Moves the allocation into the Secret: no copy is left behind.
    Ok(Secret::new(std::mem::take(&mut *buf)))
}

/// A secret given as a file (`flag` names it in errors): the whole file
/// without a trailing newline, not empty; a warning if others may read it.
pub fn read_secret_file(path: &Path, flag: &str) -> io::Result<Vec<u8>> {
    let mut bytes = std::fs::read(path)
        .map_err(|e| io::Error::new(e.kind(), format!("read {flag} {}: {e}", path.display())))?;
    while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        bytes.pop();
    }
    if bytes.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{flag} {} is empty", path.display()),
        ));
    }
    use std::os::unix::fs::PermissionsExt;
    if let Ok(m) = std::fs::metadata(path) {
        if m.permissions().mode() & 0o077 != 0 {
            tracing::warn!(file = %path.display(), "{flag}: the file is readable by others than its owner: chmod 600 it");
        }
    }
    Ok(bytes)
}

#[derive(Default)]
pub struct KeyRing {
    node: Option<Arc<Secret>>,
    volumes: Mutex<HashMap<String, Arc<Secret>>>,
    /// FUSE export only: holds each own key across a daemon crash.
    keeper: Option<Arc<Keeper>>,
    /// Keeps a volume's hold and release in the order of insert and forget.
    keeper_order: Mutex<()>,
}

impl KeyRing {
    /// With the node-wide key read from `path` (the whole file, without a
    /// trailing newline), if given.
    pub fn new(path: Option<&Path>) -> io::Result<KeyRing> {
        let Some(path) = path else {
            return Ok(KeyRing::default());
        };
        let bytes = read_secret_file(path, "--secret-file")?;
        Ok(KeyRing {
            node: Some(Arc::new(Secret::new(bytes))),
            ..KeyRing::default()
        })
    }

    /// Hand own keys to `keeper` too (the FUSE export's; `None` with ublk,
    /// where own keys stay in this process only).
    pub fn kept_by(mut self, keeper: Option<Arc<Keeper>>) -> KeyRing {
        self.keeper = keeper;
        self
    }

    pub fn has_node_key(&self) -> bool {
        self.node.is_some()
    }

    pub fn node_key(&self) -> Option<Arc<Secret>> {
        self.node.clone()
    }

    /// Remember the key of volume `id` (by its id: a re-created name never
    /// meets an old key), and have the keeper hold it.
    pub fn insert(&self, id: &str, key: Arc<Secret>) {
        let _order = self.keeper_order.lock();
        // The node key (a clone of a volume on it) comes back from
        // --secret-file: the keeper need not hold it.
        let is_node_key = self.node.as_ref().is_some_and(|n| Arc::ptr_eq(n, &key));
        if let (Some(k), false) = (&self.keeper, is_node_key) {
            let held = to_memfd(&key).and_then(|fd| {
                use std::os::fd::AsFd;
                k.hold(&keeper_name(id), &[fd.as_fd()])
            });
            if let Err(e) = held {
                tracing::warn!(volume_id = id, error = %e, "cannot give the volume's key to the FUSE keeper: if this daemon is killed, the volume is locked until `dunnage volume unlock`");
            }
        }
        self.volumes.lock().insert(id.to_string(), key);
    }

    /// Forget the key of volume `id` (removed), here and in the keeper.
    pub fn forget(&self, id: &str) {
        let _order = self.keeper_order.lock();
        self.volumes.lock().remove(id);
        if let Some(k) = &self.keeper {
            if let Err(e) = k.release(&keeper_name(id)) {
                tracing::warn!(volume_id = id, error = %e, "cannot release the volume's key in the FUSE keeper");
            }
        }
    }

    /// The key to try for volume `id`: its own if known, else the node's.
    pub fn get(&self, id: &str) -> Option<Arc<Secret>> {
        self.volumes
            .lock()
            .get(id)
            .cloned()
            .or_else(|| self.node.clone())
    }

    /// At start, before attached volumes are resumed: take back the own
    /// keys the keeper held for a daemon that was killed. `secure_ids`: the
    /// encrypted volumes of the catalog; keys of any other volume (removed
    /// meanwhile) are released. Returns how many keys came back.
    pub fn restore<'a>(&self, secure_ids: impl IntoIterator<Item = &'a str>) -> usize {
        let Some(k) = &self.keeper else {
            return 0;
        };
        let wanted: BTreeSet<&str> = secure_ids.into_iter().collect();
        let held = match k.keys() {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(error = %e, "cannot ask the FUSE keeper for held keys");
                return 0;
            }
        };
        let _order = self.keeper_order.lock();
        let mut restored = 0;
        for name in held {
            let Some(id) = name.strip_prefix(KEEPER_PREFIX) else {
                continue;
            };
            if !wanted.contains(id) {
                tracing::info!(
                    volume_id = id,
                    "releasing the held key of a volume that is gone"
                );
                let _ = k.release(&name);
                continue;
            }
            let secret = k.fetch(&name).and_then(|fds| {
                let fd = fds.and_then(|f| f.into_iter().next()).ok_or_else(|| {
                    io::Error::new(io::ErrorKind::NotFound, "the keeper holds no descriptor")
                })?;
                from_memfd(fd)
            });
            match secret {
                Ok(s) => {
                    self.volumes.lock().insert(id.to_string(), Arc::new(s));
                    restored += 1;
                }
                Err(e) => {
                    tracing::warn!(volume_id = id, error = %e, "cannot take back the volume's key from the FUSE keeper: it stays locked until `dunnage volume unlock`")
                }
            }
        }
        restored
    }

    /// Orderly shutdown: the keeper lets go of every key (a clean restart
    /// locks volumes with their own key; held keys must not keep the
    /// keeper alive). Returns how many were released.
    pub fn release_all(&self) -> usize {
        let Some(k) = &self.keeper else {
            return 0;
        };
        let _order = self.keeper_order.lock();
        let held = match k.keys() {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(error = %e, "cannot ask the FUSE keeper for held keys");
                return 0;
            }
        };
        let mut released = 0;
        for name in held.iter().filter(|n| is_key_name(n)) {
            match k.release(name) {
                Ok(()) => released += 1,
                Err(e) => tracing::warn!(key = %name, error = %e, "cannot release a key"),
            }
        }
        released
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::fuse::keeper;

    #[test]
    fn memfd_holds_the_key_sealed_and_reads_back_from_offset_zero() {
        let fd = to_memfd(&Secret::new(b"pass phrase\n".to_vec())).unwrap();
        let copy = fd.try_clone().unwrap();
        let mut f = File::from(copy);
        // Sealed: no writing, no growing, no shrinking.
        assert!(f.write_all(b"x").is_err());
        assert!(f.set_len(100).is_err());
        assert!(f.set_len(1).is_err());
        // The shared offset is at the end: a plain read would see nothing.
        let mut rest = Vec::new();
        std::io::Read::read_to_end(&mut f, &mut rest).unwrap();
        assert!(rest.is_empty());
        let s = from_memfd(fd).unwrap();
        assert_eq!(s.bytes(), b"pass phrase\n");
    }

    #[test]
    fn an_empty_memfd_is_refused() {
        use nix::sys::memfd::{memfd_create, MFdFlags};
        let fd = memfd_create(c"empty", MFdFlags::MFD_CLOEXEC).unwrap();
        assert!(from_memfd(fd).is_err());
    }

    #[test]
    fn names_of_keys_are_not_volume_ids() {
        assert!(is_key_name(&keeper_name("0123abcd")));
        assert!(!is_key_name("0123abcd"));
    }

    /// A real keeper (its serving loop, in a thread) across two "daemons".
    #[test]
    fn keys_survive_a_lost_daemon_in_the_keeper_and_go_on_release() {
        let tmp = tempfile::tempdir().unwrap();
        let run_dir = tmp.path().to_path_buf();
        let serving = {
            let run_dir = run_dir.clone();
            std::thread::spawn(move || keeper::serve(&run_dir))
        };
        let sock = run_dir.join(keeper::SOCKET);
        while !sock.exists() {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let node = Arc::new(Secret::new(b"node".to_vec()));
        let connect = || Some(Arc::new(Keeper::connect(&run_dir).unwrap()));

        // First daemon: two own keys, a clone on the node key, one removed.
        let first = KeyRing {
            node: Some(node.clone()),
            ..KeyRing::default()
        }
        .kept_by(connect());
        first.insert("v1", Arc::new(Secret::new(b"one".to_vec())));
        first.insert("v2", Arc::new(Secret::new(b"two".to_vec())));
        first.insert("v3", node.clone());
        first.insert("gone", Arc::new(Secret::new(b"x".to_vec())));
        first.forget("gone");
        // Killed: it never says bye.
        drop(first);

        let second = KeyRing::default().kept_by(connect());
        assert!(second.get("v1").is_none());
        // v2 was removed from the catalog meanwhile.
        assert_eq!(second.restore(["v1", "v3", "other"]), 1);
        assert_eq!(second.get("v1").unwrap().bytes(), b"one");
        assert!(second.get("v2").is_none() && second.get("v3").is_none());
        let k = second.keeper.clone().unwrap();
        assert_eq!(k.keys().unwrap(), vec![keeper_name("v1")]);

        // Orderly shutdown: nothing held, so the keeper exits on bye.
        assert_eq!(second.release_all(), 1);
        assert!(k.keys().unwrap().is_empty());
        k.bye().unwrap();
        drop(second);
        drop(k);
        serving.join().unwrap().unwrap();
    }
}

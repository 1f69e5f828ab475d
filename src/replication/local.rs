//! The replicas this node holds: one open [`ThinImage`] per volume id,
//! shared by the replica server (links from the attached node) and by a
//! mirror attached here. Every open in cluster mode goes through
//! [`LocalReplicas`], so one image is never opened twice (its `flock`
//! would refuse the second open anyway).
//!
//! Each replica keeps the highest attach generation it has seen in
//! `<dir>/generation`, synced before the new generation takes effect: IO
//! of an older generation is refused from then on (fencing).

use super::activity::{self, ActivityLog, Made, Stamp};
use super::{Generation, Incarnation, ReplicationError};
use crate::engine::{BlockEngine, ThinImage, ThinParams};
use parking_lot::{Condvar, Mutex, RwLock, RwLockReadGuard};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

const GENERATION_FILE: &str = "generation";
const INCARNATION_FILE: &str = "incarnation";
const HEADER_FILE: &str = "header";

/// What a node's replica of a volume holds, as its directory says.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ReplicaContents {
    /// The node has an image of the volume.
    pub present: bool,
    /// Its snapshots, sorted.
    pub snapshots: Vec<String>,
    /// The volume ids of the live clones whose images on this node share
    /// its blocks (a clone's replica made as a plain copy is not one).
    pub clones: Vec<String>,
}

/// Check a volume id that names a directory: `[A-Za-z0-9][A-Za-z0-9_.-]*`,
/// at most 128 bytes (ids come over the network).
pub fn check_volume_id(id: &str) -> Result<(), ReplicationError> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id.as_bytes()[0].is_ascii_alphanumeric()
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(ReplicationError::InvalidVolumeId(id.to_string()))
    }
}

fn io_err<'a>(
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> ReplicationError + 'a {
    move |source| ReplicationError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// What a clone's replica is made from: the base volume's replica on the
/// same node, and the snapshot of it the clone is based on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaBase {
    pub volume_id: String,
    pub snapshot: String,
}

/// Set when the replica (and so its image) has been dropped.
#[derive(Default)]
struct Closed {
    done: Mutex<bool>,
    cv: Condvar,
}

impl Closed {
    /// Wait up to `d` for the replica to close; whether it did.
    fn wait_for(&self, d: Duration) -> bool {
        let deadline = Instant::now() + d;
        let mut done = self.done.lock();
        while !*done {
            if self.cv.wait_until(&mut done, deadline).timed_out() {
                return *done;
            }
        }
        true
    }
}

/// How long an open at a grown size waits for the replica's holders (the
/// link of a mirror reopening at the new size) to let go.
const GROW_WAIT: Duration = Duration::from_secs(15);

/// Declared after the image in [`LocalReplica`]: fields drop in order, so
/// when this signals, the image is closed and its lock released.
struct CloseSignal(Arc<Closed>);

impl Drop for CloseSignal {
    fn drop(&mut self) {
        *self.0.done.lock() = true;
        self.0.cv.notify_all();
    }
}

/// One replica held by this node: its image and its generation.
pub struct LocalReplica {
    volume_id: String,
    dir: PathBuf,
    /// The highest generation seen. IO holds the read side while it runs,
    /// so once a newer generation is stored no older IO is in flight.
    generation: RwLock<Generation>,
    /// The newest link's number (see [`LocalReplica::advance`]); changed
    /// only under `generation`'s write lock.
    link: AtomicU64,
    incarnation: Incarnation,
    /// Extents written since the replicas were last known equal.
    activity: ActivityLog,
    image: ThinImage,
    _closed: CloseSignal,
}

impl std::fmt::Debug for LocalReplica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalReplica")
            .field("volume_id", &self.volume_id)
            .field("dir", &self.dir)
            .field("generation", &*self.generation.read())
            .field("incarnation", &format_args!("{:016x}", self.incarnation))
            .finish()
    }
}

/// Who does an IO on a replica: the session of an attach generation and,
/// for a request that came over the network, the link it came on (see
/// [`LocalReplica::advance`]). The attached node's own replica is used
/// in-process, as the bare generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Session {
    pub generation: Generation,
    link: Option<u64>,
}

impl From<Generation> for Session {
    fn from(generation: Generation) -> Session {
        Session {
            generation,
            link: None,
        }
    }
}

impl LocalReplica {
    pub fn volume_id(&self) -> &str {
        &self.volume_id
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn size(&self) -> u64 {
        self.image.size()
    }

    pub fn params(&self) -> ThinParams {
        ThinParams {
            size: self.image.size(),
            block_size: self.image.block_size(),
        }
    }

    /// The image itself, for what is not IO (usage, snapshots). IO through
    /// it bypasses the generation check: use the methods of this type.
    pub fn image(&self) -> &ThinImage {
        &self.image
    }

    /// Which image this is (see the module doc).
    pub fn incarnation(&self) -> Incarnation {
        self.incarnation
    }

    /// The highest generation this replica has seen.
    pub fn generation(&self) -> Generation {
        *self.generation.read()
    }

    /// Take the replica for `generation` on a new link: refused if a newer
    /// generation was seen; a newer one is stored (synced) and fences every
    /// older session. Requests of an earlier link (of any generation) that
    /// are running are waited for, and those not yet run are refused: a
    /// request of a link the attached node gave up on (a clear of the
    /// activity log, a write) never runs after the link that replaced it
    /// came up.
    pub fn advance(&self, generation: Generation) -> Result<Session, ReplicationError> {
        drop(self.admit(generation.into())?);
        let current = self.generation.write();
        if *current != generation {
            return Err(self.fenced(generation, *current));
        }
        let link = self.link.load(Ordering::Relaxed) + 1;
        self.link.store(link, Ordering::Release);
        Ok(Session {
            generation,
            link: Some(link),
        })
    }

    fn fenced(&self, generation: Generation, current: Generation) -> ReplicationError {
        ReplicationError::Fenced {
            volume: self.volume_id.clone(),
            generation,
            current,
        }
    }

    /// Check `by` for one IO; the guard keeps it current until the IO is
    /// done.
    fn admit(&self, by: Session) -> Result<RwLockReadGuard<'_, Generation>, ReplicationError> {
        let generation = by.generation;
        loop {
            let current = self.generation.read();
            if generation == *current {
                if by
                    .link
                    .is_some_and(|l| l != self.link.load(Ordering::Acquire))
                {
                    return Err(ReplicationError::Superseded {
                        volume: self.volume_id.clone(),
                    });
                }
                return Ok(current);
            }
            if generation < *current {
                return Err(self.fenced(generation, *current));
            }
            drop(current);
            let mut current = self.generation.write();
            if generation > *current {
                write_generation(&self.dir, generation)?;
                tracing::info!(
                    volume_id = %self.volume_id,
                    from = *current,
                    to = generation,
                    "replica generation advanced: older sessions are fenced"
                );
                *current = generation;
            }
        }
    }

    pub fn read_at(
        &self,
        by: impl Into<Session>,
        buf: &mut [u8],
        offset: u64,
    ) -> Result<(), ReplicationError> {
        let _g = self.admit(by.into())?;
        Ok(self.image.read_at(buf, offset)?)
    }

    pub fn write_at(
        &self,
        by: impl Into<Session>,
        buf: &[u8],
        offset: u64,
    ) -> Result<(), ReplicationError> {
        let _g = self.admit(by.into())?;
        self.activate(offset, buf.len() as u64)?;
        Ok(self.image.write_at(buf, offset)?)
    }

    /// A read-only view of snapshot `name` of this replica (an export).
    pub fn snapshot_view(
        &self,
        name: &str,
    ) -> Result<crate::engine::SnapshotView<'_>, ReplicationError> {
        Ok(self.image.snapshot_view(name)?)
    }

    /// Whether a write of `offset..offset+len` would only copy into the
    /// page cache: its extents are active and no block of it must be
    /// copied first (a copy reads and writes whole blocks). Advisory: a
    /// snapshot taken meanwhile can make it wrong, which costs a wait.
    pub fn write_is_quick(&self, offset: u64, len: u64) -> bool {
        self.activity.covers(offset, len) && !self.image.write_may_wait(offset, len)
    }

    pub fn discard(
        &self,
        by: impl Into<Session>,
        offset: u64,
        len: u64,
    ) -> Result<(), ReplicationError> {
        let _g = self.admit(by.into())?;
        self.activate(offset, len)?;
        Ok(self.image.discard(offset, len)?)
    }

    fn activate(&self, offset: u64, len: u64) -> Result<(), ReplicationError> {
        self.activity
            .activate(offset, len)
            .map_err(io_err("write", self.activity.path()))
    }

    /// The extents active in the activity log (see [`super::activity`]).
    pub fn activity(&self, by: impl Into<Session>) -> Result<Vec<u64>, ReplicationError> {
        Ok(self.activity_stamped(by)?.1)
    }

    /// The activity log's last clear and its active extents.
    pub fn activity_stamped(
        &self,
        by: impl Into<Session>,
    ) -> Result<(Stamp, Vec<u64>), ReplicationError> {
        let _g = self.admit(by.into())?;
        // The stamp first: a clear between the two reads shows as bits
        // cleared under an older stamp (safe), never the other way.
        let stamp = self.activity.stamp();
        Ok((stamp, self.activity.bitmap()))
    }

    /// Clear `count` extents of the activity log from `first`, as clear
    /// `seq` of `generation`: the attached node knows them equal on every
    /// replica. A fenced session must not.
    pub fn deactivate(
        &self,
        by: impl Into<Session>,
        first: u64,
        count: u64,
        seq: u64,
    ) -> Result<(), ReplicationError> {
        let by = by.into();
        let _g = self.admit(by)?;
        self.activity
            .deactivate(
                first,
                count,
                Stamp {
                    generation: by.generation,
                    seq,
                },
            )
            .map_err(io_err("write", self.activity.path()))
    }

    /// Mark every extent of the activity log active, durably: the image
    /// is about to be copied whole into (see [`super::wire::Request::ActivateAll`]).
    pub fn activate_all(&self, by: impl Into<Session>) -> Result<(), ReplicationError> {
        let _g = self.admit(by.into())?;
        self.activity
            .activate_all()
            .map_err(io_err("write", self.activity.path()))
    }

    pub fn flush(&self, by: impl Into<Session>) -> Result<(), ReplicationError> {
        let _g = self.admit(by.into())?;
        Ok(self.image.flush()?)
    }

    /// Snapshot the image (it flushes first) for `generation`: a fenced
    /// session must not add snapshots either.
    pub fn snapshot(&self, by: impl Into<Session>, name: &str) -> Result<(), ReplicationError> {
        let _g = self.admit(by.into())?;
        Ok(self.image.snapshot(name)?)
    }

    pub fn delete_snapshot(
        &self,
        by: impl Into<Session>,
        name: &str,
    ) -> Result<(), ReplicationError> {
        let _g = self.admit(by.into())?;
        Ok(self.image.delete_snapshot(name)?)
    }

    /// sha256 of the whole device, hex.
    pub fn checksum(&self) -> Result<String, ReplicationError> {
        const CHUNK: u64 = 1 << 20;
        let mut hash = Sha256::new();
        let mut buf = vec![0u8; CHUNK as usize];
        let size = self.image.size();
        let mut off = 0;
        while off < size {
            let n = CHUNK.min(size - off) as usize;
            self.image.read_at(&mut buf[..n], off)?;
            hash.update(&buf[..n]);
            off += n as u64;
        }
        Ok(hash.finalize().iter().map(|b| format!("{b:02x}")).collect())
    }
}

fn read_generation(dir: &Path) -> Result<Generation, ReplicationError> {
    let path = dir.join(GENERATION_FILE);
    match std::fs::read_to_string(&path) {
        Ok(s) => s.trim().parse().map_err(|_| ReplicationError::Corrupt {
            path,
            reason: format!("not a generation number: {:?}", s.trim()),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(io_err("read", &path)(e)),
    }
}

/// Replace `<dir>/generation` atomically and durably.
fn write_generation(dir: &Path, generation: Generation) -> Result<(), ReplicationError> {
    write_small(dir, GENERATION_FILE, &generation.to_string())
}

/// Replace `<dir>/<name>` with one line, atomically and durably.
fn write_small(dir: &Path, name: &str, line: &str) -> Result<(), ReplicationError> {
    let tmp = dir.join(format!(".{name}.tmp"));
    let path = dir.join(name);
    let mut f = std::fs::File::create(&tmp).map_err(io_err("create", &tmp))?;
    writeln!(f, "{line}").map_err(io_err("write", &tmp))?;
    f.sync_all().map_err(io_err("fsync", &tmp))?;
    std::fs::rename(&tmp, &path).map_err(io_err("rename", &path))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync", dir))
}

/// The image's incarnation; a new one when `made` (the image was just
/// created) or when none is stored (an image of an earlier build, or a
/// crash between the image's create and this).
fn incarnation(dir: &Path, made: bool) -> Result<Incarnation, ReplicationError> {
    if !made {
        if let Some(stored) = read_incarnation(dir)? {
            return Ok(stored);
        }
    }
    // 0 is no image's: the cluster reads an unreadable record as 0.
    let new: Incarnation = rand::random::<Incarnation>().max(1);
    write_small(dir, INCARNATION_FILE, &format!("{new:016x}"))?;
    Ok(new)
}

/// `<dir>/incarnation`, `None` if absent.
fn read_incarnation(dir: &Path) -> Result<Option<Incarnation>, ReplicationError> {
    let path = dir.join(INCARNATION_FILE);
    match std::fs::read_to_string(&path) {
        Ok(s) => Incarnation::from_str_radix(s.trim(), 16)
            .map(Some)
            .map_err(|_| ReplicationError::Corrupt {
                reason: format!("not an incarnation: {:?}", s.trim()),
                path,
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err("read", &path)(e)),
    }
}

struct Slot {
    replica: Weak<LocalReplica>,
    closed: Arc<Closed>,
}

impl Slot {
    /// Wait until a replica no one holds any more has closed its image.
    fn wait_closed(&self) {
        let mut done = self.closed.done.lock();
        while !*done {
            self.closed.cv.wait(&mut done);
        }
    }
}

/// The replicas of this node, by volume id. A replica stays open while
/// anyone holds it (a mirror, a link from the attached node) and closes
/// (flushing) when the last holder lets go.
pub struct LocalReplicas {
    volumes_dir: PathBuf,
    open: Mutex<HashMap<String, Slot>>,
}

impl LocalReplicas {
    /// Images live in `<volumes_dir>/<volume_id>/`.
    pub fn new(volumes_dir: PathBuf) -> Arc<LocalReplicas> {
        Arc::new(LocalReplicas {
            volumes_dir,
            open: Mutex::new(HashMap::new()),
        })
    }

    pub fn volumes_dir(&self) -> &Path {
        &self.volumes_dir
    }

    /// The directory of a volume's replica.
    pub fn dir(&self, volume_id: &str) -> Result<PathBuf, ReplicationError> {
        check_volume_id(volume_id)?;
        Ok(self.volumes_dir.join(volume_id))
    }

    /// The replica of `volume_id`, opened if needed; created (empty, with
    /// `params`) if absent. An existing replica must have `params`.
    pub fn open(
        &self,
        volume_id: &str,
        params: ThinParams,
    ) -> Result<Arc<LocalReplica>, ReplicationError> {
        self.open_inner(volume_id, Some(params), None, false)
    }

    /// [`LocalReplicas::open`] for a clone's replica: one that is absent is
    /// made a clone of this node's replica of `base` (which holds the
    /// base snapshot), sharing its blocks; or, if `copied_whole` (the
    /// mirror copies everything to it), an empty plain image, which
    /// depends on no base directory the catalog may have dropped here.
    /// Never an empty image otherwise: it would pass for the clone's data.
    pub fn open_as(
        &self,
        volume_id: &str,
        params: ThinParams,
        base: Option<&ReplicaBase>,
        copied_whole: bool,
    ) -> Result<Arc<LocalReplica>, ReplicationError> {
        let base = base.filter(|_| !copied_whole);
        self.open_inner(volume_id, Some(params), base, copied_whole)
    }

    /// Like [`LocalReplicas::open`], but never creates without `params`;
    /// an image made for `copied_whole` has an all-active log.
    fn open_inner(
        &self,
        volume_id: &str,
        params: Option<ThinParams>,
        base: Option<&ReplicaBase>,
        copied_whole: bool,
    ) -> Result<Arc<LocalReplica>, ReplicationError> {
        let dir = self.dir(volume_id)?;
        let mut open = self.open.lock();
        while let Some(slot) = open.get(volume_id) {
            if let Some(r) = slot.replica.upgrade() {
                let grown = params
                    .filter(|p| p.block_size == r.image.block_size() && p.size > r.image.size());
                let Some(p) = grown else {
                    drop(open);
                    if let Some(p) = params {
                        check_params(&r, p)?;
                    }
                    return Ok(r);
                };
                // The volume grew while attached: its mirror reopens at the
                // new size, and the old one's link lets go of this replica
                // in a moment. Its image grows once closed.
                let closed = slot.closed.clone();
                let refused = check_params(&r, p);
                drop((open, r));
                if !closed.wait_for(GROW_WAIT) {
                    return Err(refused.expect_err("the sizes differ"));
                }
                open = self.open.lock();
                continue;
            }
            // The last holder is dropping it: let its image close first.
            slot.wait_closed();
            open.remove(volume_id);
        }
        let made = !dir.join(HEADER_FILE).exists();
        let image = if !made {
            if let Some(p) = params {
                grow(&dir, volume_id, p)?;
            }
            ThinImage::open(&dir)?
        } else if let (Some(p), Some(b)) = (params, base) {
            let base_dir = self.dir(&b.volume_id)?;
            std::fs::create_dir_all(&dir).map_err(io_err("create", &dir))?;
            let clone =
                ThinImage::create_clone(&dir, &base_dir, &b.snapshot).inspect_err(|_| {
                    let _ = std::fs::remove_dir_all(&dir);
                })?;
            // The clone has its base's size, which may not have grown yet
            // to the volume's (its replica grows when next attached).
            if clone.size() < p.size {
                drop(clone);
                grow(&dir, volume_id, p)?;
                ThinImage::open(&dir)?
            } else {
                clone
            }
        } else if let Some(p) = params {
            std::fs::create_dir_all(&dir).map_err(io_err("create", &dir))?;
            ThinImage::create(&dir, p)?
        } else {
            return Err(ReplicationError::NotFound(volume_id.to_string()));
        };
        let log_made = match (made, copied_whole) {
            (false, _) => Made::Before,
            (true, false) => Made::Equal,
            (true, true) => Made::ToCopy,
        };
        let activity = ActivityLog::open(&dir, image.size(), log_made)
            .map_err(io_err("open the activity log in", &dir))?;
        let closed = Arc::new(Closed::default());
        let replica = Arc::new(LocalReplica {
            activity,
            volume_id: volume_id.to_string(),
            generation: RwLock::new(read_generation(&dir)?),
            link: AtomicU64::new(0),
            incarnation: incarnation(&dir, made)?,
            dir,
            image,
            _closed: CloseSignal(closed.clone()),
        });
        if let Some(p) = params {
            check_params(&replica, p)?;
        }
        open.insert(
            volume_id.to_string(),
            Slot {
                replica: Arc::downgrade(&replica),
                closed,
            },
        );
        Ok(replica)
    }

    /// The incarnation of `volume_id`'s replica here as its files say,
    /// without opening it; `None` if it has no image (or no readable
    /// incarnation).
    pub fn incarnation_on_disk(&self, volume_id: &str) -> Option<Incarnation> {
        let dir = self.dir(volume_id).ok()?;
        if !dir.join(HEADER_FILE).exists() {
            return None;
        }
        read_incarnation(&dir).ok().flatten()
    }

    /// The replica of `volume_id` if it is open.
    pub fn get(&self, volume_id: &str) -> Option<Arc<LocalReplica>> {
        self.open.lock().get(volume_id)?.replica.upgrade()
    }

    /// Flush the replica if it is open. It closes when its last holder
    /// lets go (immediately if no one else holds it).
    pub fn close(&self, volume_id: &str) {
        let replica = {
            let mut open = self.open.lock();
            let Some(slot) = open.get(volume_id) else {
                return;
            };
            match slot.replica.upgrade() {
                Some(r) => r,
                None => {
                    slot.wait_closed();
                    open.remove(volume_id);
                    return;
                }
            }
        };
        if let Err(e) = replica.image.flush() {
            tracing::warn!(volume_id, error = %e, "flush on close failed");
        }
    }

    /// The open-replicas map, locked (no one opens a replica while it is
    /// held), with `volume_id` in it closed: Busy while anyone holds it.
    fn closed_slot(
        &self,
        volume_id: &str,
    ) -> Result<parking_lot::MutexGuard<'_, HashMap<String, Slot>>, ReplicationError> {
        let mut open = self.open.lock();
        if let Some(slot) = open.get(volume_id) {
            if slot.replica.strong_count() > 0 {
                return Err(ReplicationError::Busy(volume_id.to_string()));
            }
            slot.wait_closed();
            open.remove(volume_id);
        }
        Ok(open)
    }

    /// What the replica of `volume_id` here holds, read from its
    /// directory without opening it.
    pub fn contents(&self, volume_id: &str) -> Result<ReplicaContents, ReplicationError> {
        let dir = self.dir(volume_id)?;
        if !dir.join(HEADER_FILE).exists() {
            return Ok(ReplicaContents::default());
        }
        let mut clones: Vec<String> = ThinImage::clones_of(&dir)?
            .into_iter()
            .filter_map(|(_, d)| Some(d.file_name()?.to_string_lossy().into_owned()))
            .collect();
        clones.sort();
        clones.dedup();
        Ok(ReplicaContents {
            present: true,
            snapshots: ThinImage::snapshot_names(&dir)?,
            clones,
        })
    }

    /// Close the replica and delete its directory. Refused while anyone
    /// holds it.
    pub fn remove(&self, volume_id: &str) -> Result<(), ReplicationError> {
        let dir = self.dir(volume_id)?;
        let _open = self.closed_slot(volume_id)?;
        // A clone's replica here shares this one's blocks (the catalog's
        // checks should have kept it; the data must not depend on them).
        if dir.join(HEADER_FILE).exists() {
            let clones = ThinImage::clones_of(&dir)?;
            if !clones.is_empty() {
                return Err(ReplicationError::HasClones {
                    volume: volume_id.to_string(),
                    clones: clones
                        .iter()
                        .map(|(_, d)| d.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", "),
                });
            }
        }
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_err("remove", &dir)(e)),
        }
        std::fs::File::open(&self.volumes_dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err("fsync", &self.volumes_dir))
    }

    /// Restore the replica to its snapshot `name` for `generation`, which
    /// is stored first: it fences older sessions, as an IO session's
    /// would. Refused while anyone holds the replica; no one can open it
    /// meanwhile.
    pub fn restore(
        &self,
        volume_id: &str,
        generation: Generation,
        name: &str,
    ) -> Result<(), ReplicationError> {
        let dir = self.dir(volume_id)?;
        let _open = self.closed_slot(volume_id)?;
        if !dir.join(HEADER_FILE).exists() {
            return Err(ReplicationError::NotFound(volume_id.to_string()));
        }
        let current = read_generation(&dir)?;
        if generation < current {
            return Err(ReplicationError::Fenced {
                volume: volume_id.to_string(),
                generation,
                current,
            });
        }
        if generation > current {
            write_generation(&dir, generation)?;
        }
        // What the restore changes lies in no log: all active from now
        // (a replica restored later resyncs from this one whole).
        super::activity::forget(&dir).map_err(io_err("drop the activity log in", &dir))?;
        ThinImage::restore(&dir, name)?;
        tracing::info!(volume_id, snapshot = name, generation, "replica restored");
        Ok(())
    }

    /// Delete the replica's snapshots that `listed` does not name: those a
    /// crash left between the replicas' take and etcd's record. `listed`
    /// answers `None` to keep everything (the volume is attached somewhere:
    /// a take may be on its way to its record). It is asked once freely,
    /// and, if that finds orphans, again with the replica closed and no one
    /// able to open it (so no take runs here meanwhile); only then does
    /// anything go. Busy while the replica is open. Returns what went.
    pub fn drop_orphan_snapshots<E: std::fmt::Display>(
        &self,
        volume_id: &str,
        listed: impl Fn() -> Result<Option<std::collections::HashSet<String>>, E>,
    ) -> Result<Vec<String>, ReplicationError> {
        let dir = self.dir(volume_id)?;
        let orphans = || -> Result<Vec<String>, ReplicationError> {
            let names = ThinImage::snapshot_names(&dir)?;
            if names.is_empty() {
                return Ok(names);
            }
            let keep = match listed() {
                Ok(Some(keep)) => keep,
                Ok(None) => return Ok(Vec::new()),
                Err(e) => {
                    return Err(ReplicationError::Config(format!(
                        "cannot list the snapshots of volume {volume_id}: {e}"
                    )))
                }
            };
            Ok(names.into_iter().filter(|n| !keep.contains(n)).collect())
        };
        // The lock of every replica of this node: only held when needed.
        if orphans()?.is_empty() {
            return Ok(Vec::new());
        }
        let _open = self.closed_slot(volume_id)?;
        let orphans = orphans()?;
        if orphans.is_empty() || !dir.join(HEADER_FILE).exists() {
            return Ok(Vec::new());
        }
        let image = ThinImage::open(&dir)?;
        let mut dropped = Vec::new();
        for name in orphans {
            match image.delete_snapshot(&name) {
                Ok(()) => dropped.push(name),
                Err(e) => {
                    tracing::warn!(volume_id, snapshot = %name, error = %e, "cannot delete a snapshot etcd does not list")
                }
            }
        }
        image.flush()?;
        Ok(dropped)
    }

    /// sha256 (hex) of the whole device of an existing replica, read
    /// through its image.
    pub fn checksum(
        &self,
        volume_id: &str,
        params: ThinParams,
    ) -> Result<String, ReplicationError> {
        let replica = self.open_inner(volume_id, None, None, false)?;
        check_params(&replica, params)?;
        replica.checksum()
    }
}

/// A replica (closed) of a volume that grew while it was away grows to
/// the size the volume's attached node asks for. Never shrinks, and
/// leaves one of another block size for [`check_params`] to refuse.
fn grow(dir: &Path, volume_id: &str, want: ThinParams) -> Result<(), ReplicationError> {
    let have = ThinImage::params_of(dir)?;
    if have.block_size != want.block_size || want.size <= have.size {
        return Ok(());
    }
    if let Some(old) = ThinImage::grow(dir, want.size)? {
        activity::grow(dir, old, want.size).map_err(io_err("grow the activity log in", dir))?;
        tracing::info!(volume_id, from = old, to = want.size, "grew the replica");
    }
    Ok(())
}

fn check_params(r: &LocalReplica, want: ThinParams) -> Result<(), ReplicationError> {
    let have = r.params();
    if have.size != want.size || have.block_size != want.block_size {
        return Err(ReplicationError::ParamsMismatch {
            volume_id: r.volume_id.clone(),
            have_size: have.size,
            have_block_size: have.block_size,
            want_size: want.size,
            want_block_size: want.block_size,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: ThinParams = ThinParams {
        size: 1 << 20,
        block_size: 4096,
    };

    /// A mirror reopened at a grown size meets its replica still held by
    /// the old mirror's link: the open waits for it to close, then grows
    /// it, keeping the data.
    #[test]
    fn an_open_at_a_grown_size_waits_for_the_holder_then_grows() {
        let dir = tempfile::tempdir().unwrap();
        let reps = LocalReplicas::new(dir.path().to_path_buf());
        let held = reps.open("v1", P).unwrap();
        held.write_at(0, &[9; 4096], 4096).unwrap();
        let bigger = ThinParams { size: 4 << 20, ..P };
        // Lets go a moment after the open below has begun (without the
        // wait, that open is refused: the sizes differ).
        let holder = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            drop(held);
        });
        let grown = reps.open("v1", bigger).unwrap();
        holder.join().unwrap();
        assert_eq!(grown.params().size, bigger.size);
        let mut buf = [0u8; 4096];
        grown.read_at(0, &mut buf, 4096).unwrap();
        assert_eq!(buf, [9; 4096]);
        grown.read_at(0, &mut buf, (4 << 20) - 4096).unwrap();
        assert_eq!(buf, [0; 4096]);
        // Its activity log covers the new end too.
        grown.write_at(0, &[3; 4096], (4 << 20) - 4096).unwrap();
    }

    #[test]
    fn volume_ids_are_checked() {
        for ok in ["abc", "0123456789abcdef", "a.b-c_d"] {
            check_volume_id(ok).unwrap();
        }
        let long = "a".repeat(129);
        for bad in ["", ".", "..", "../x", "a/b", "-a", "a\0b", long.as_str()] {
            assert!(check_volume_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn one_image_per_volume_and_reopen_after_close() {
        let dir = tempfile::tempdir().unwrap();
        let reps = LocalReplicas::new(dir.path().to_path_buf());
        let a = reps.open("v1", P).unwrap();
        let b = reps.open("v1", P).unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        assert!(Arc::ptr_eq(&reps.get("v1").unwrap(), &a));
        a.write_at(0, &[7; 4096], 0).unwrap();
        // A smaller size, or another block size, is refused for an
        // existing replica.
        let other = ThinParams { size: 1 << 19, ..P };
        assert!(matches!(
            reps.open("v1", other),
            Err(ReplicationError::ParamsMismatch { .. })
        ));
        let other = ThinParams {
            size: 2 << 20,
            block_size: 8192,
        };
        assert!(matches!(
            reps.open("v1", other),
            Err(ReplicationError::ParamsMismatch { .. })
        ));
        assert!(matches!(reps.remove("v1"), Err(ReplicationError::Busy(_))));
        drop((a, b));
        assert!(reps.get("v1").is_none());
        reps.close("v1");
        // Reopened from disk, with the data.
        let c = reps.open("v1", P).unwrap();
        let mut buf = [0u8; 4096];
        c.read_at(0, &mut buf, 0).unwrap();
        assert_eq!(buf, [7; 4096]);
        drop(c);
        reps.close("v1");
        // Closed, it grows to a larger size asked for (the volume grew
        // while it was away), never shrinks back.
        let bigger = ThinParams { size: 3 << 20, ..P };
        let c = reps.open("v1", bigger).unwrap();
        assert_eq!(c.params().size, bigger.size);
        c.read_at(0, &mut buf, 0).unwrap();
        assert_eq!(buf, [7; 4096]);
        c.read_at(0, &mut buf, (3 << 20) - 4096).unwrap();
        assert_eq!(buf, [0; 4096]);
        drop(c);
        reps.close("v1");
        assert!(matches!(
            reps.open("v1", P),
            Err(ReplicationError::ParamsMismatch { .. })
        ));
        reps.remove("v1").unwrap();
        assert!(!dir.path().join("v1").exists());
        assert!(matches!(
            reps.checksum("v1", P),
            Err(ReplicationError::NotFound(_))
        ));
        assert!(matches!(
            reps.open("../x", P),
            Err(ReplicationError::InvalidVolumeId(_))
        ));
    }

    #[test]
    fn a_clone_replica_needs_its_base_here_and_keeps_it() {
        let dir = tempfile::tempdir().unwrap();
        let reps = LocalReplicas::new(dir.path().to_path_buf());
        let parent = reps.open("parent", P).unwrap();
        parent.write_at(0, &[7; 4096], 0).unwrap();
        parent.image().snapshot("base").unwrap();
        drop(parent);
        reps.close("parent");
        let base = |snapshot: &str| ReplicaBase {
            volume_id: "parent".into(),
            snapshot: snapshot.into(),
        };
        // A CoW clone, reading the parent's block.
        let clone = reps
            .open_as("clone", P, Some(&base("base")), false)
            .unwrap();
        let mut buf = [0u8; 4096];
        clone.read_at(0, &mut buf, 0).unwrap();
        assert_eq!(buf, [7; 4096]);
        assert!(dir.path().join("clone").join("base").exists());
        drop(clone);
        reps.close("clone");
        // Its base stays while it lives.
        assert!(matches!(
            reps.remove("parent"),
            Err(ReplicationError::HasClones { .. })
        ));
        let held = |snapshots: &[&str], clones: &[&str]| ReplicaContents {
            present: true,
            snapshots: snapshots.iter().map(|s| s.to_string()).collect(),
            clones: clones.iter().map(|s| s.to_string()).collect(),
        };
        assert_eq!(
            reps.contents("parent").unwrap(),
            held(&["base"], &["clone"])
        );
        assert_eq!(reps.contents("clone").unwrap(), held(&[], &[]));
        assert_eq!(
            reps.contents("nowhere").unwrap(),
            ReplicaContents::default()
        );
        // Never an empty image in its place: it would pass for in sync.
        assert!(reps.open_as("copy", P, Some(&base("gone")), false).is_err());
        assert!(!dir.path().join("copy").exists());
        // Unless the mirror copies it whole: then a plain one, not a clone.
        let copy = reps.open_as("copy", P, Some(&base("gone")), true).unwrap();
        assert!(!copy.image().is_clone());
        copy.read_at(0, &mut buf, 0).unwrap();
        assert_eq!(buf, [0; 4096]);
        drop(copy);
        reps.remove("copy").unwrap();
        // Even where the base is here: nothing ties it to a base directory.
        let again = reps.open_as("again", P, Some(&base("base")), true).unwrap();
        assert!(!again.image().is_clone());
        assert_eq!(
            reps.contents("parent").unwrap(),
            held(&["base"], &["clone"])
        );
        drop(again);
        reps.remove("again").unwrap();
        reps.remove("clone").unwrap();
        reps.remove("parent").unwrap();
    }

    #[test]
    fn generation_fences_older_io_and_persists() {
        let dir = tempfile::tempdir().unwrap();
        let reps = LocalReplicas::new(dir.path().to_path_buf());
        let r = reps.open("v", P).unwrap();
        assert_eq!(r.generation(), 0);
        r.write_at(5, &[1; 4096], 0).unwrap();
        assert_eq!(r.generation(), 5);
        let err = r.write_at(4, &[2; 4096], 0).unwrap_err();
        assert!(matches!(
            err,
            ReplicationError::Fenced {
                generation: 4,
                current: 5,
                ..
            }
        ));
        assert!(r.flush(4).is_err());
        assert!(r.discard(4, 0, 4096).is_err());
        assert!(r.read_at(4, &mut [0; 512], 0).is_err());
        r.advance(9).unwrap();
        assert!(r.write_at(5, &[2; 4096], 0).is_err());
        assert!(r.advance(8).is_err());
        r.flush(9).unwrap();
        drop(r);
        assert_eq!(
            std::fs::read_to_string(dir.path().join("v/generation"))
                .unwrap()
                .trim(),
            "9"
        );
        let r = reps.open("v", P).unwrap();
        assert_eq!(r.generation(), 9);
        let mut buf = [0u8; 4096];
        r.read_at(9, &mut buf, 0).unwrap();
        assert_eq!(buf, [1; 4096], "the fenced write changed nothing");
    }

    #[test]
    fn a_newer_link_refuses_the_requests_of_the_one_it_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let r = LocalReplicas::new(dir.path().to_path_buf())
            .open("v", P)
            .unwrap();
        let first = r.advance(3).unwrap();
        r.write_at(first, &[1; 4096], 0).unwrap();
        let second = r.advance(3).unwrap();
        // A late request of the first link (a write, a clear of the log).
        let err = r.write_at(first, &[2; 4096], 0).unwrap_err();
        assert!(matches!(err, ReplicationError::Superseded { .. }), "{err}");
        assert!(err.to_string().contains("replaced"), "{err}");
        assert!(r.deactivate(first, 0, 1, 1).is_err());
        assert!(r.flush(first).is_err());
        assert_eq!(
            r.activity(second).unwrap(),
            [1],
            "extent 0 still active: the clear was not run"
        );
        let mut buf = [0u8; 4096];
        r.read_at(second, &mut buf, 0).unwrap();
        assert_eq!(buf, [1; 4096], "the late write changed nothing");
        // The in-process replica of the attached node has no link.
        r.write_at(3, &[4; 4096], 0).unwrap();
        // A newer generation fences both.
        let third = r.advance(4).unwrap();
        assert!(matches!(
            r.write_at(second, &[5; 4096], 0),
            Err(ReplicationError::Fenced { .. })
        ));
        r.write_at(third, &[6; 4096], 0).unwrap();
    }

    #[test]
    fn checksum_covers_the_whole_device() {
        let dir = tempfile::tempdir().unwrap();
        let reps = LocalReplicas::new(dir.path().to_path_buf());
        let r = reps.open("v", P).unwrap();
        let empty = reps.checksum("v", P).unwrap();
        assert_eq!(empty.len(), 64);
        // sha256 of 1 MiB of zeros.
        assert_eq!(
            empty,
            "30e14955ebf1352266dc2ff8067e68104607e750abb9d3b36582b8af909fcb58"
        );
        r.write_at(1, &[1], P.size - 1).unwrap();
        assert_ne!(reps.checksum("v", P).unwrap(), empty);
    }
}

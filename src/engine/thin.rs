//! `ThinImage`: a thin-provisioned block device image in a directory (engine v1).
//!
//! # On-disk layout
//!
//! An image is a directory with three files, and sometimes more:
//!
//! - `header`: the superblock (4 KiB: magic, format version, size, block size,
//!   incompatible feature bits, CRC-32C; see `header.rs`). Written once, last,
//!   at create; an image directory without a valid header is an unfinished
//!   create (or not an image) and [`ThinImage::open`] refuses it. The open
//!   image holds an exclusive `flock` on it, so two processes never serve
//!   the same image. A clone's header has the `FEATURE_CLONE` bit.
//! - `map`: one little-endian u64 per logical block, in 4 KiB pages (see
//!   `map.rs`): 0 = unmapped, else physical block index + 1 in bits 0..48;
//!   bits 48..64 are flags: only `ZERO` (bit 48, no physical block: reads
//!   zeros, no fall-through), in clones only. Fixed length, sparse.
//! - `data`: physical blocks of `block_size` bytes, back to back. It grows
//!   as blocks are first allocated; space of discarded blocks is returned
//!   with `fallocate(PUNCH_HOLE)`. Reads past its end read zeros.
//! - `passthrough` (a marker, usually absent): present while the data file
//!   is handed to the kernel (see *Passthrough*).
//! - `snaps/<name>.map` (see *Snapshots*): each a frozen copy of `map` at
//!   the instant the snapshot was taken, same format, written once; its
//!   modification time is when. The set of snapshots is this listing
//!   (names `[A-Za-z0-9][A-Za-z0-9_.-]*`, at most 128 bytes). Temp files
//!   `snaps/.<name>.map.tmp` are snapshots a crash interrupted: open
//!   removes them.
//! - `snaps/<name>.pins/<clone dir name>.pin`: the absolute path of a clone
//!   whose base is that snapshot (see *Clones*).
//! - `base` (clones only): small JSON naming the base image directory
//!   (canonical) and snapshot: `{"version":1,"dir":"…","snapshot":"…"}`.
//!
//! A logical block gets a physical block on its first write of non-zero
//! bytes (an all-zero write into an unmapped block is dropped: it already
//! reads as zeros). In memory, the map is an array of atomic entries (pages
//! allocated on first use); a map page is written back to the map file by
//! the flush after it changed. Free physical blocks are not stored: on open
//! they are rebuilt from the map (`alloc.rs`).
//!
//! # Identity placement
//!
//! Logical block `j` gets physical block `j` when that block is free (the
//! data file of a fresh image is then exactly a sparse raw image of the
//! device: byte `x` of the device is byte `x` of `data`), and otherwise a
//! block chosen by next fit at or above the device's block count, off the
//! homes of other logical blocks (physical `j` is held by a snapshot, or
//! by another logical block in an image of an earlier build, which placed
//! blocks densely). When physical `j` is deferred (invariant 2) because `j`
//! itself was discarded and the flush has not released it yet, a new write
//! of `j` *revives* it rather than break identity: see invariant 6. A count
//! of mapped blocks whose physical block differs from their own index makes
//! [`ThinImage::is_identity`] O(1). An image that is identity stays so
//! while it has no snapshot: the fallback needs physical `j` to be held by
//! another logical block.
//!
//! # Invariants and crash consistency
//!
//! 1. *A block that is free, or handed out but not yet written, reads zeros
//!    on disk*: blocks past every referenced block were never written since
//!    open (open truncates the data file there; identity placement may hand
//!    out any of them), freed blocks are hole-punched before they are
//!    queued for reuse, and open also punches any free block that holds
//!    data (writes to a block whose mapping was lost in a crash), then
//!    syncs. Passthrough keeps it: its writes are adopted (7.).
//! 2. *A block freed by discard is reused only after the flush that persists
//!    its unmapping* (deferred free, released at the end of that flush), and
//!    only after that flush synced the punch. So no on-disk map, whatever
//!    mix of old and new pages it holds, points at a block that belongs to
//!    another logical block; and no physical block is handed out twice
//!    (the allocator's bitmap marks referenced and deferred blocks).
//! 3. `flush` = take the deferred frees, then sync the data file (`fdatasync`,
//!    or `fsync` when holes were punched since the last flush), then write
//!    the changed map pages and `fdatasync` the map, then release the frees.
//!    A write that completed before `flush` was called has its data durable
//!    before its map entry is written. A map entry written by a flush whose
//!    data was not synced (the allocation raced with the flush) points at a
//!    zero block (1.), so it reads as the zeros the block held before.
//! 4. A map entry is 8 aligned bytes inside a 4 KiB page write, so a torn
//!    page write leaves each entry old or new, both safe by 2. and 3.
//! 5. On open the allocator marks every block the head map or a snapshot
//!    map references used (a block referenced twice within one map, or an
//!    entry with unknown flags, is corruption), so it never hands out a
//!    block any map references.
//! 6. *Revival*: a deferred block `j` freed from logical `j` (an identity
//!    mapping; the allocator records which deferred blocks were) may be
//!    mapped again by logical `j`, and by no other block, before the flush
//!    releases it; a flush that already took it skips it at release. This is
//!    safe because since `j` was handed to logical `j` no on-disk map can
//!    reference it from another logical block (2.), so every mix of map
//!    pages a crash can leave maps `j` from logical `j` or not at all; and
//!    the block was punched before it was deferred (1.), so what logical `j`
//!    can read after a crash is its own history: zeros, the new write, or
//!    (a discard undone) its old data under the new write. That exposes
//!    nothing of another block, and "later discards may be undone" already
//!    allows it. A deferred block freed from another logical block (a
//!    non-identity mapping) is never revived.
//! 7. *Passthrough* (below): while the marker exists, data extents of the
//!    data file are the truth, not the map. The marker is durable (file and
//!    directory fsynced) before the data file is handed out, and is removed
//!    only after every data extent is mapped identity and that map is
//!    durable; open finds a marker left by a crash and adopts the extents
//!    *before* it punches free blocks holding data (1.), which would
//!    otherwise destroy every write made through passthrough. Passthrough
//!    is entered only on an identity image, after a flush that released
//!    every deferred block, so the adopted extents can belong to no block
//!    but their own.
//!
//! 8. *Write-through*: every map change is also copied at once to the map
//!    file (its page cache, not synced; see `BlockMap::write_through`). So
//!    a killed process loses no mapping: a daemon restarted under a live
//!    device (the kernel was told those writes are done) finds them all.
//!    The kernel may write such a page back before the flush syncs the
//!    data: by 1. and 2. the entry then points at a block reading zeros,
//!    which is an absent write.
//!
//! 9. *One home per physical block*: every map that references physical
//!    block `p` (the head, any snapshot) references it from the same
//!    logical block, its home. Blocks enter a map only by allocation (a
//!    block no map references) or by copying a whole map (taking a
//!    snapshot, restoring one), which keeps indices. So "the head still
//!    holds `p`" is `head[home] == p`, and the `shared` bit of `p` (set
//!    when some snapshot references `p`) is read and cleared only under
//!    the stripe of its home, which every IO on the home holds. Open
//!    checks each snapshot entry whose block the head maps too.
//! 10. *Copy-on-write*: a block a snapshot references is never written,
//!     punched or freed while that snapshot exists. The first write to a
//!     logical block mapped to a shared block (or, in a clone, to a block
//!     still read from the base) takes the write side of the stripes of
//!     its IO, writes the *whole* block to a new one (the bytes outside
//!     the write copied from the old; new blocks are placed above the
//!     identity homes, at index ≥ the device's block count, unless the
//!     logical block's own index is free), syncs the data file, and only
//!     then maps it (write-through, 8.). So every map a crash can leave
//!     reads the old block or the complete new one: never zeros around a
//!     partial write, which 3. would allow for a fresh block but not here.
//!     The blocks one write copies are synced once, then mapped with one
//!     write-through; consecutive ones get consecutive new blocks when a
//!     run is free (one `pwritev` now, one `pwrite` for later IO).
//!     A discard of a shared block unmaps it and neither punches nor frees.
//! 11. *Snapshot lifetime*: taking one excludes all IO, flushes (the data
//!     of every block the copy references is durable before the copy is),
//!     writes the copy to a temp file, fsyncs, renames, sets the `shared`
//!     bits, fsyncs the directory, and lets IO go on. Deleting one locks
//!     its file (12.), checks pins and views, unlinks it and fsyncs the
//!     directory; then, under the stripes of their homes, clears the
//!     `shared` bit of every block no remaining snapshot references; of
//!     those, the blocks the head does not hold are punched and freed
//!     (deferred, 2.) only after a flush: the head may have remapped their
//!     home in memory only, and an older head map found after a crash must
//!     not point at a punched block. A crash after the unlink leaves
//!     blocks no map references, which open's scrub punches (1.).
//! 12. *A clone's base is frozen*: a clone reads its base's `data` and
//!     snapshot map without the base's lock. That is safe because nothing
//!     changes what it reads while the pin holds: the base never writes,
//!     punches or frees a block a snapshot references (10.), never rewrites
//!     a snapshot file, refuses passthrough while it has snapshots, cuts
//!     its data file only above every referenced block (1.), and never
//!     deletes a pinned snapshot. A pin is live while the clone's directory
//!     has a header and a `base` file naming that snapshot; pins of clones
//!     gone or destroyed are pruned by the delete. The race between pinning
//!     and deleting is closed by `flock` on the snapshot's map file: delete
//!     holds it exclusive from the pin check to the unlink, create_clone
//!     holds it shared from the pin to the clone's header (and checks the
//!     file is still linked). A clone whose pin is missing pins again when
//!     opened.
//!
//! After a machine crash an image holds every write completed before the last
//! successful `flush`; later writes are each present or absent (a write in
//! progress may be torn), later discards may be undone. A failed sync
//! poisons the image: every later `flush` fails, since the kernel may have
//! dropped the dirty pages that failed to write.
//!
//! # Passthrough
//!
//! [`ThinImage::begin_passthrough`] hands out the data file itself (for
//! FUSE passthrough: the kernel then reads and writes it directly, at the
//! device offsets, without the map). It refuses (`Ok(None)`) unless the
//! image is identity; otherwise it excludes all IO, flushes, extends the
//! data file to the device size (a raw image: reads past the end of a file
//! would be short), writes the marker durably, and switches the engine's
//! own IO to the same semantics: reads and writes go to the data file at
//! the same offset (a hole reads zeros; the filesystem's sparse file is the
//! allocation, so a write allocates nothing and maps nothing), a discard
//! punches its range (partial blocks too) and unmaps the whole blocks it
//! covers, a flush always syncs the data file (writes made by the kernel
//! are invisible to the engine) and then the map if it changed, and
//! [`ThinImage::usage`] counts the data file's allocated space.
//! [`ThinImage::end_passthrough`] excludes all IO, maps every block an
//! extent of the data file touches (`SEEK_DATA`/`SEEK_HOLE`, block
//! granularity) to itself, flushes, removes the marker and returns to
//! mapped IO. Dropping the image in passthrough flushes but keeps the
//! marker: the kernel may still write through its file, and the next open
//! adopts.
//!
//! # Snapshots
//!
//! [`ThinImage::snapshot`] costs metadata only, on any filesystem: no data
//! is copied, the map copy costs what the map holds (its written pages),
//! and IO waits only for the flush and that copy. Every write that
//! completed before the call is in the snapshot and none that started
//! after (a discard in flight may be partly in: it unmaps window by
//! window). The image and its snapshots share unchanged blocks, without
//! per-block reference counts: in memory a `shared` bitmap over physical
//! blocks (the union of the snapshot maps' references), rebuilt by open
//! with the allocator's bitmap (the union of all maps). Writes to shared
//! blocks copy them (10.); [`ThinImage::delete_snapshot`] frees the blocks
//! only it held (11.). [`ThinImage::usage`] reports the head's blocks
//! split into exclusive and shared, and the blocks only snapshots hold;
//! [`ThinImage::snapshots`] lists each snapshot with what deleting it
//! would free; [`ThinImage::snapshot_view`] reads one (a view pins it
//! against deletion while it lives).
//!
//! Snapshots and passthrough exclude each other: a snapshot is refused in
//! passthrough (the kernel writes the data file in place, which would
//! change it) and passthrough is refused while a snapshot exists. An image
//! whose blocks were copied stays non-identity after its snapshots are
//! gone (the copies sit above the identity homes) until those blocks are
//! discarded; passthrough then waits for that.
//!
//! [`ThinImage::restore`] makes a *closed* image's map a copy of a
//! snapshot's (temp file, fsync, rename over `map`, fsync of the
//! directory): a crash leaves the old map or the new one. It works on a
//! closed image because restoring an open one would mean resetting every
//! in-memory structure (map, allocator, sharing, counters) under an IO
//! exclusion, which is what open already does; the volume is not attached
//! while it is restored anyway. Blocks only the old map held are freed by
//! the next open (they are free blocks holding data: 1.).
//!
//! # Clones
//!
//! A clone ([`ThinImage::create_clone`]) is an image of its own (own
//! header with `FEATURE_CLONE`, map, data, snapshots) whose base is a
//! snapshot of another image, which it pins (12.). A block unmapped in the
//! clone reads through to the base's block; a write copies the base block
//! into the clone first (10.; as identity placement in the clone's own
//! data file when free); a discard of a block the base has data for maps
//! it to `ZERO`, which reads zeros without falling through. A base may be
//! a clone itself (a clone of a snapshot of a clone), up to 16 levels: a
//! lookup walks the levels, stopping at the first mapping or `ZERO`. A
//! clone is never identity, so never in passthrough.
//! [`ThinImage::destroy_clone`] detaches a closed clone (removes its `base`
//! file, then its pin) so its base snapshot can be deleted; the caller then
//! removes its directory. It is refused while a snapshot of the clone is
//! the base of another live clone; [`ThinImage::clones_of`] tells whether
//! an image's directory may be removed. An encrypted image's clone needs
//! the base's `crypt` file copied (same key, same ciphertext: XTS tweaks
//! are logical offsets, which a copy keeps).
//!
//! # Concurrency
//!
//! IO is positional (`pread`/`pwrite`) and takes no global lock. An IO
//! holds, for its duration, the read side of the striped `RwLock`s of the
//! logical blocks it spans (256 stripes, cache-line padded; stripe = block
//! mod 256), taken in ascending *stripe* order, each once (an IO of 256
//! blocks or more takes them all). Whoever takes several stripes takes them
//! in that order, so no two lockers wait on each other in a cycle. A
//! discard unmapping whole blocks takes the write side of the stripes of a
//! window of blocks (at most 16 MiB), unmaps, punches and defers them before
//! unlocking, so a block's physical space is never freed under an IO in
//! flight, and a write that follows finds the block deferred (revivable).
//! [`ThinImage::begin_passthrough`] and [`ThinImage::end_passthrough`] take
//! the write side of every stripe: an IO sees one mode from start to end.
//!
//! Under its locks an IO walks its blocks and coalesces: a run of blocks
//! whose physical blocks are contiguous is one `pread`/`pwrite` (with
//! identity placement a 1 MiB request is one system call), a run of
//! unmapped blocks read is one `memset`; nothing is allocated on the heap.
//! The first write to an unmapped block chooses a physical block and
//! publishes the mapping with a compare-and-swap on the map entry, all under
//! the allocator's mutex (held across the unmapped blocks of a run, dropped
//! before any system call), so racing first writers of a block agree on its
//! placement. A fresh block is never written with padding, so concurrent
//! partial writes to it both land. A write that must copy a block (10.)
//! finds so under the read side of its stripes, drops them and redoes the
//! write under the write side, so copies of one block never race. It reads
//! only the old bytes it does not overwrite (none for a block written
//! whole), into a per-thread buffer, and writes each run of new blocks
//! with one `pwritev` of old bytes and the caller's buffer.
//! [`ThinImage::snapshot`] takes the write side of every stripe; a
//! snapshot's delete, the write side of a window of stripes at a time.
//! Snapshot operations of one image are serialized by a mutex.

mod snap;

pub use snap::{SnapshotInfo, SnapshotView};

use super::alloc::{AllocGuard, PhysAlloc};
use super::extents::data_extents;
use super::header::{Header, FEATURE_CLONE, HEADER_BYTES};
use super::map::{BlockMap, Entry};
use super::{BlockEngine, EngineError};
use nix::errno::Errno;
use nix::fcntl::{fallocate, FallocateFlags, Flock, FlockArg};
use parking_lot::{Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use snap::{BaseChain, SharedBits};
use std::cell::RefCell;
use std::collections::HashMap;
use std::fs::File;
use std::io::{self, IoSlice};
use std::ops::Range;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

const HEADER_FILE: &str = "header";
const MAP_FILE: &str = "map";
const DATA_FILE: &str = "data";
/// Present while the data file is handed out (see the module doc).
const PASSTHROUGH_FILE: &str = "passthrough";

const MIN_BLOCK_SIZE: u32 = 4 << 10;
const MAX_BLOCK_SIZE: u32 = 1 << 20;
const SIZE_ALIGN: u64 = 4096;
/// Largest device size accepted by [`ThinImage::create`].
const MAX_SIZE: u64 = 64 << 40;
const STRIPES: usize = 256;
/// Largest run of blocks a discard unmaps under one set of stripe locks.
const UNMAP_WINDOW_BYTES: u64 = 16 << 20;
/// Physical blocks an image may address per logical block (see
/// [`ThinImage::phys_limit`]).
const PHYS_PER_LOGICAL: u64 = 64;

/// Parameters of a new image.
#[derive(Debug, Clone, Copy)]
pub struct ThinParams {
    /// Device size in bytes: a non-zero multiple of 4096, at most 64 TiB.
    pub size: u64,
    /// Allocation unit in bytes: a power of two from 4 KiB to 1 MiB.
    pub block_size: u32,
}

impl ThinParams {
    fn validate(&self) -> Result<(), String> {
        let bs = self.block_size;
        if !bs.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&bs) {
            return Err(format!(
                "block_size {bs} must be a power of two from {MIN_BLOCK_SIZE} (4 KiB) to {MAX_BLOCK_SIZE} (1 MiB)"
            ));
        }
        if self.size == 0 {
            return Err("size must not be 0".into());
        }
        if self.size % SIZE_ALIGN != 0 {
            return Err(format!(
                "size {} is not a multiple of {SIZE_ALIGN}",
                self.size
            ));
        }
        if self.size > MAX_SIZE {
            return Err(format!(
                "size {} exceeds the maximum of {MAX_SIZE} (64 TiB)",
                self.size
            ));
        }
        Ok(())
    }
}

/// Space accounting of an image.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct ThinUsage {
    /// Device size in bytes.
    pub size: u64,
    pub block_size: u32,
    /// Logical blocks that have physical space.
    pub allocated_blocks: u64,
    /// `allocated_blocks * block_size`.
    pub allocated_bytes: u64,
    /// Of `allocated_blocks`, those whose physical block no snapshot
    /// holds: what overwriting or discarding the whole device would free.
    pub exclusive_blocks: u64,
    /// Of `allocated_blocks`, those whose physical block a snapshot holds
    /// too (the first write to one copies it).
    pub shared_blocks: u64,
    /// Physical blocks held by snapshots only (overwritten or discarded in
    /// the volume since): the space the snapshots cost.
    pub snapshot_blocks: u64,
    /// Snapshots of the image.
    pub snapshots: u64,
}

/// One stripe of the block locks, alone on its cache line.
#[repr(align(64))]
#[derive(Default)]
struct Stripe(RwLock<()>);

/// System calls and fills of the IO paths, to check coalescing.
#[cfg(test)]
#[derive(Default)]
struct IoCounters {
    preads: AtomicU64,
    pwrites: AtomicU64,
    zero_fills: AtomicU64,
}

/// A thin image open for IO. See the module doc.
pub struct ThinImage {
    size: u64,
    block_size: u32,
    shift: u32,
    nblocks: u64,
    dir: PathBuf,
    data: File,
    data_path: PathBuf,
    map_file: File,
    map_path: PathBuf,
    map: BlockMap,
    alloc: PhysAlloc,
    stripes: Box<[Stripe]>,
    allocated: AtomicU64,
    /// Mapped blocks whose physical block is not their own index.
    non_identity: AtomicU64,
    /// The data file is handed out: IO goes to it at the device offsets.
    /// Changed only under the write side of every stripe.
    passthrough: AtomicBool,
    /// Place logical block j at physical j when free (off only in tests of
    /// the fallback policy, which images of earlier builds exercise).
    identity_placement: bool,
    /// Data was written since the flush that last synced the data file.
    data_dirty: AtomicBool,
    /// Holes were punched since the data file was last fsynced.
    punched: AtomicBool,
    /// Whether the data file's filesystem supports `PUNCH_HOLE`.
    can_punch: AtomicBool,
    /// A sync failed: nothing can be promised durable any more.
    poisoned: AtomicBool,
    flush_lock: Mutex<()>,
    flush_on_drop: bool,
    /// Physical blocks some snapshot references (see *Snapshots*).
    shared: SharedBits,
    /// Set bits of `shared`.
    shared_count: AtomicU64,
    /// Head-mapped blocks whose physical block is shared.
    head_shared: AtomicU64,
    /// Snapshot files of the image.
    snapshot_count: AtomicU64,
    /// The base a clone reads through to, nearest first (see *Clones*).
    base: Option<BaseChain>,
    /// Serializes taking, deleting and listing snapshots.
    snap_lock: Mutex<()>,
    /// Open [`SnapshotView`]s, by snapshot name.
    views: Mutex<HashMap<String, usize>>,
    #[cfg(test)]
    counters: IoCounters,
    /// Held for the image's lifetime; dropping it unlocks.
    _lock: Flock<File>,
}

impl std::fmt::Debug for ThinImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThinImage")
            .field("data", &self.data_path)
            .field("size", &self.size)
            .field("block_size", &self.block_size)
            .field("allocated_blocks", &self.allocated.load(Ordering::Relaxed))
            .field("passthrough", &self.passthrough.load(Ordering::Relaxed))
            .finish()
    }
}

fn io_error<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> EngineError + 'a {
    move |source| EngineError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// fsync a directory (after creating or removing an entry in it).
fn sync_dir(dir: &Path) -> Result<(), EngineError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error("fsync", dir))
}

/// The stripes of logical blocks `first..=last`, in ascending stripe order,
/// each once.
fn stripe_order(first: u64, last: u64) -> std::iter::Chain<Range<usize>, Range<usize>> {
    if last - first + 1 >= STRIPES as u64 {
        return (0..STRIPES).chain(0..0);
    }
    let (s, e) = (
        (first % STRIPES as u64) as usize,
        (last % STRIPES as u64) as usize,
    );
    if s <= e {
        (s..e + 1).chain(0..0)
    } else {
        (0..e + 1).chain(s..STRIPES)
    }
}

/// A pending run of a read: `buf` from `file` in the data file, or zeros.
struct ReadRun {
    /// (source, offset): source 0 is the image's data file, `k` the
    /// data file of base level `k - 1` (clones).
    file: Option<(usize, u64)>,
    buf: Range<usize>,
}

/// A block copied by a write (copy-on-write or a clone's copy-up): written
/// to `new`, not yet mapped.
struct Copied {
    block: u64,
    old: Entry,
    new: u64,
    revived: bool,
}

/// Per-thread buffers of [`ThinImage::write_copying`]: once a thread made
/// a copying write, the next ones allocate nothing on the heap.
#[derive(Default)]
struct CopyScratch {
    /// The old bytes of partly written blocks: the first block's in
    /// `[0, block_size)`, the last block's in `[block_size, 2 * block_size)`.
    old: Vec<u8>,
    copied: Vec<Copied>,
}

thread_local! {
    static COPY_SCRATCH: RefCell<CopyScratch> = RefCell::default();
}

/// A pending write of [`ThinImage::write_copying`] to the data file at
/// `at`: `old[head]`, `buf[body]`, `old[tail]`, back to back (one `pwritev`).
struct CopyRun {
    at: u64,
    head: Range<usize>,
    body: Range<usize>,
    tail: Range<usize>,
}

impl CopyRun {
    fn end(&self) -> u64 {
        self.at + (self.head.len() + self.body.len() + self.tail.len()) as u64
    }
}
impl ThinImage {
    /// Create a new, empty image in the existing directory `dir` and open it.
    /// The files are synced, and the directory, before this returns.
    pub fn create(dir: &Path, params: ThinParams) -> Result<ThinImage, EngineError> {
        params.validate().map_err(EngineError::InvalidParams)?;
        let header = Header {
            size: params.size,
            block_size: params.block_size,
            features: 0,
        };
        Self::write_new_image(dir, &header, || Ok(()))?;
        Self::open(dir)
    }

    /// Write the files of a new, empty image in `dir`, synced, the header
    /// last; `before_header` runs just before it (a clone's `base` file).
    fn write_new_image(
        dir: &Path,
        header: &Header,
        before_header: impl FnOnce() -> Result<(), EngineError>,
    ) -> Result<(), EngineError> {
        let new_file = |name: &str| {
            let path = dir.join(name);
            File::options()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)
                .map_err(io_error("create", &path))
                .map(|f| (f, path))
        };
        let (data, data_path) = new_file(DATA_FILE)?;
        let (map, map_path) = new_file(MAP_FILE)?;
        map.set_len(BlockMap::file_len(header.nblocks()))
            .map_err(io_error("truncate", &map_path))?;
        data.sync_all().map_err(io_error("fsync", &data_path))?;
        map.sync_all().map_err(io_error("fsync", &map_path))?;
        before_header()?;
        // The header goes last: its presence means the image is complete.
        let (hdr, hdr_path) = new_file(HEADER_FILE)?;
        hdr.write_all_at(&header.encode(), 0)
            .map_err(io_error("write", &hdr_path))?;
        hdr.sync_all().map_err(io_error("fsync", &hdr_path))?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_error("fsync", dir))?;
        drop((data, map, hdr));
        Ok(())
    }

    /// Open the image in `dir`, after a clean stop or a crash. Rebuilds the
    /// free-block set from the map, adopts the writes made through
    /// passthrough if a crash interrupted it, and returns to the filesystem
    /// the space of blocks written but never durably mapped.
    pub fn open(dir: &Path) -> Result<ThinImage, EngineError> {
        Self::open_inner(dir, false)
    }

    /// Open the image of a volume whose export outlived the process that
    /// served it (a daemon killed with the device still live). If it was in
    /// passthrough, it stays so: the kernel has gone on writing the data
    /// file directly, and still does, so the data file must be neither cut
    /// nor scrubbed; the writes are adopted when passthrough ends.
    pub fn open_resuming(dir: &Path) -> Result<ThinImage, EngineError> {
        Self::open_inner(dir, true)
    }

    fn open_inner(dir: &Path, resuming: bool) -> Result<ThinImage, EngineError> {
        let hdr_path = dir.join(HEADER_FILE);
        let hdr = File::open(&hdr_path).map_err(io_error("open", &hdr_path))?;
        let lock = match Flock::lock(hdr, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => lock,
            Err((_, errno)) => {
                return Err(EngineError::Io {
                    op: "lock (is the image open elsewhere?)",
                    path: hdr_path,
                    source: errno.into(),
                })
            }
        };
        let corrupt = |path: &Path, reason: String| EngineError::Corrupt {
            path: path.to_path_buf(),
            reason,
        };
        let mut buf = vec![0u8; HEADER_BYTES];
        let n = read_full(&lock, &mut buf, 0).map_err(io_error("read", &hdr_path))?;
        let header = Header::decode(&buf[..n]).map_err(|r| corrupt(&hdr_path, r))?;
        ThinParams {
            size: header.size,
            block_size: header.block_size,
        }
        .validate()
        .map_err(|r| corrupt(&hdr_path, r))?;

        let open_rw = |name: &str| {
            let path = dir.join(name);
            File::options()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(io_error("open", &path))
                .map(|f| (f, path))
        };
        let (data, data_path) = open_rw(DATA_FILE)?;
        let (map_file, map_path) = open_rw(MAP_FILE)?;
        let nblocks = header.nblocks();
        let limit = Self::phys_limit(nblocks);
        let map = BlockMap::load(&map_file, &map_path, nblocks)?;
        let clone = header.features & FEATURE_CLONE != 0;
        let base = if clone {
            Some(BaseChain::open(dir, &header)?)
        } else {
            None
        };
        // Invariant 5 and 9: every block the head or a snapshot references
        // is used; blocks some snapshot references are shared.
        let refs = snap::Refs::build(dir, &map, &map_path, nblocks, limit, clone)?;

        let image = ThinImage {
            size: header.size,
            block_size: header.block_size,
            shift: header.block_size.trailing_zeros(),
            nblocks,
            dir: dir.to_path_buf(),
            data,
            data_path,
            map_file,
            map_path,
            map,
            alloc: PhysAlloc::new(refs.used, refs.next, limit),
            stripes: (0..STRIPES).map(|_| Stripe::default()).collect(),
            allocated: AtomicU64::new(refs.allocated),
            non_identity: AtomicU64::new(refs.non_identity),
            passthrough: AtomicBool::new(false),
            identity_placement: true,
            data_dirty: AtomicBool::new(false),
            punched: AtomicBool::new(false),
            can_punch: AtomicBool::new(true),
            poisoned: AtomicBool::new(false),
            flush_lock: Mutex::new(()),
            flush_on_drop: true,
            shared: SharedBits::from_words(limit, &refs.shared),
            shared_count: AtomicU64::new(refs.shared_count),
            head_shared: AtomicU64::new(refs.head_shared),
            snapshot_count: AtomicU64::new(refs.snapshots),
            base,
            snap_lock: Mutex::new(()),
            views: Mutex::new(HashMap::new()),
            #[cfg(test)]
            counters: IoCounters::default(),
            _lock: lock,
        };
        // Invariant 7: adopt before the scrub, which would punch every
        // write made through passthrough (free blocks holding data).
        let marker = dir.join(PASSTHROUGH_FILE);
        let in_passthrough = marker.try_exists().map_err(io_error("stat", &marker))?;
        if in_passthrough && resuming {
            image.passthrough.store(true, Ordering::Release);
            tracing::info!(data = %image.data_path.display(), "resuming in passthrough");
            return Ok(image);
        }
        if in_passthrough {
            let adopted = image.adopt_extents()?;
            image.data_dirty.store(true, Ordering::Release);
            image.flush_inner()?;
            image.remove_marker()?;
            tracing::info!(
                data = %image.data_path.display(),
                blocks = adopted,
                "adopted the writes made through passthrough before a crash"
            );
        }
        image.scrub_free_blocks(image.alloc.high_water())?;
        Ok(image)
    }

    /// Physical blocks an image may use: every logical block, as many
    /// again for blocks freed but not yet reusable (deferred frees), and
    /// room for what snapshots hold (each at most one device's worth). A
    /// fixed bound, so that no entry valid once turns invalid when
    /// snapshots go; it caps what a damaged entry can make open allocate
    /// (bitmaps of one bit per block: 8 bytes per logical block).
    fn phys_limit(nblocks: u64) -> u64 {
        (nblocks * PHYS_PER_LOGICAL).min(Entry::MAX_PHYS + 1)
    }

    /// Invariant 1 after a crash: cut the data file at the high-water mark
    /// and punch the free blocks below it that hold data, then fsync.
    fn scrub_free_blocks(&self, next: u64) -> Result<(), EngineError> {
        let bs = u64::from(self.block_size);
        let hwm = next * bs;
        let len = self
            .data
            .metadata()
            .map_err(io_error("stat", &self.data_path))?
            .len();
        let mut changed = false;
        if len > hwm {
            self.data
                .set_len(hwm)
                .map_err(io_error("truncate", &self.data_path))?;
            changed = true;
        }
        let limit = len.min(hwm);
        let mut punched_blocks = 0u64;
        let extents = data_extents(&self.data, limit).map_err(io_error("seek", &self.data_path))?;
        for (start, end) in extents {
            // Free blocks overlapping [start, end) hold data: punch them.
            for (first, count) in self.alloc.free_runs(start / bs, end.div_ceil(bs)) {
                self.zero_phys(first * bs, count * bs)?;
                punched_blocks += count;
            }
        }
        if punched_blocks > 0 {
            tracing::info!(
                data = %self.data_path.display(),
                blocks = punched_blocks,
                "returned the space of blocks written but not mapped before a crash"
            );
            changed = true;
        }
        if changed {
            self.data
                .sync_all()
                .map_err(io_error("fsync", &self.data_path))?;
            self.punched.store(false, Ordering::Release);
        }
        Ok(())
    }

    /// Space accounting. In passthrough, from the data file's allocated
    /// space (the kernel's writes allocate without the map).
    pub fn usage(&self) -> ThinUsage {
        let mut allocated_blocks = self.allocated.load(Ordering::Relaxed);
        if self.passthrough.load(Ordering::Acquire) {
            // Mapped blocks are allocated; so is what the kernel wrote.
            match self.data.metadata() {
                Ok(meta) => {
                    let written = (meta.blocks() * 512).div_ceil(u64::from(self.block_size));
                    allocated_blocks = allocated_blocks.max(written).min(self.nblocks)
                }
                Err(e) => tracing::warn!(
                    data = %self.data_path.display(),
                    error = %e,
                    "stat of the data file failed: usage counts mapped blocks"
                ),
            }
        }
        // Racing IO may move a block between the counters: clamp.
        let shared_blocks = self
            .head_shared
            .load(Ordering::Relaxed)
            .min(allocated_blocks);
        let snapshot_blocks = self
            .shared_count
            .load(Ordering::Relaxed)
            .saturating_sub(self.head_shared.load(Ordering::Relaxed));
        ThinUsage {
            size: self.size,
            block_size: self.block_size,
            allocated_blocks,
            allocated_bytes: allocated_blocks * u64::from(self.block_size),
            exclusive_blocks: allocated_blocks - shared_blocks,
            shared_blocks,
            snapshot_blocks,
            snapshots: self.snapshot_count.load(Ordering::Relaxed),
        }
    }

    /// The allocation unit in bytes.
    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// Whether every mapped block is at its own index in the data file
    /// (the data file is then a sparse raw image of the device). Never
    /// for a clone: its unwritten blocks read through to its base.
    pub fn is_identity(&self) -> bool {
        self.non_identity.load(Ordering::Acquire) == 0 && self.base.is_none()
    }

    /// Whether this image is a clone (see *Clones*).
    pub fn is_clone(&self) -> bool {
        self.base.is_some()
    }

    /// Whether the data file is handed out (see the module doc).
    pub fn is_passthrough(&self) -> bool {
        self.passthrough.load(Ordering::Acquire)
    }

    /// Hand out the data file for passthrough IO, if the image is identity
    /// (else `Ok(None)`): durably mark the image as in passthrough and
    /// switch the engine's own IO to the data file at device offsets. The
    /// returned file is a duplicate of the engine's, open read-write. Call
    /// again while in passthrough: another duplicate. Refused
    /// ([`EngineError::Shared`]) while the image has snapshots: the kernel
    /// would overwrite the blocks they share in place.
    pub fn begin_passthrough(&self) -> Result<Option<File>, EngineError> {
        self.with_all_write_locks(|| {
            let dup = || {
                self.data
                    .try_clone()
                    .map_err(io_error("dup", &self.data_path))
            };
            if self.passthrough.load(Ordering::Acquire) {
                return dup().map(Some);
            }
            if self.snapshot_count.load(Ordering::Acquire) > 0
                || self.shared_count.load(Ordering::Acquire) > 0
            {
                return Err(EngineError::Shared {
                    dir: self.dir.clone(),
                });
            }
            if !self.is_identity() {
                return Ok(None);
            }
            // The on-disk map becomes the in-memory one, and every deferred
            // block is released: no map, on disk or not, then references a
            // block from another logical block (invariant 7).
            self.flush_inner()?;
            // A raw image of the device's size: the kernel would read short
            // past the end of the file.
            let len = self
                .data
                .metadata()
                .map_err(io_error("stat", &self.data_path))?
                .len();
            if len < self.size {
                self.data
                    .set_len(self.size)
                    .map_err(io_error("truncate", &self.data_path))?;
                self.data
                    .sync_all()
                    .map_err(io_error("fsync", &self.data_path))?;
            }
            let file = dup()?;
            if let Err(e) = self.write_marker() {
                // Best effort: a stray marker only makes the next open adopt
                // extents of an identity image, which are its own blocks.
                let _ = std::fs::remove_file(self.dir.join(PASSTHROUGH_FILE));
                return Err(e);
            }
            self.passthrough.store(true, Ordering::Release);
            tracing::info!(data = %self.data_path.display(), "passthrough begins");
            Ok(Some(file))
        })
    }

    /// Leave passthrough (nothing to do if not in it): map every block the
    /// data file holds data in to itself, flush, remove the marker. On
    /// error the image stays in passthrough, marker included.
    pub fn end_passthrough(&self) -> Result<(), EngineError> {
        self.with_all_write_locks(|| {
            if !self.passthrough.load(Ordering::Acquire) {
                return Ok(());
            }
            let adopted = self.adopt_extents()?;
            // In passthrough a flush always syncs the data file first.
            self.flush_inner()?;
            self.remove_marker()?;
            self.passthrough.store(false, Ordering::Release);
            tracing::info!(
                data = %self.data_path.display(),
                adopted,
                "passthrough ends"
            );
            Ok(())
        })
    }

    fn write_marker(&self) -> Result<(), EngineError> {
        let path = self.dir.join(PASSTHROUGH_FILE);
        let file = File::create(&path).map_err(io_error("create", &path))?;
        file.write_all_at(b"the data file is written through passthrough\n", 0)
            .map_err(io_error("write", &path))?;
        file.sync_all().map_err(io_error("fsync", &path))?;
        sync_dir(&self.dir)
    }

    fn remove_marker(&self) -> Result<(), EngineError> {
        let path = self.dir.join(PASSTHROUGH_FILE);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error("remove", &path)(e)),
        }
        sync_dir(&self.dir)
    }

    /// Map every unmapped block that an extent of the data file touches to
    /// itself (block granularity). The caller excludes IO, or runs before
    /// any. Returns how many blocks were mapped.
    fn adopt_extents(&self) -> Result<u64, EngineError> {
        let bs = u64::from(self.block_size);
        let limit = self.nblocks * bs;
        let corrupt = |reason: String| EngineError::Corrupt {
            path: self.data_path.clone(),
            reason,
        };
        let mut adopted = 0u64;
        let mut alloc = self.alloc.lock();
        let extents = data_extents(&self.data, limit).map_err(io_error("seek", &self.data_path))?;
        for (start, end) in extents {
            for block in start / bs..end.div_ceil(bs) {
                match self.map.get(block).phys() {
                    Some(phys) if phys == block => continue,
                    Some(phys) => {
                        return Err(corrupt(format!(
                            "passthrough image maps block {block} to physical block {phys}"
                        )))
                    }
                    None => {}
                }
                if !(alloc.claim(block) || alloc.revive(block)) {
                    return Err(corrupt(format!(
                        "passthrough image: physical block {block} holds data but is in use"
                    )));
                }
                if self.map.try_map(block, Entry::mapped(block)).is_err() {
                    return Err(corrupt(format!("block {block} mapped while adopting")));
                }
                self.allocated.fetch_add(1, Ordering::Relaxed);
                adopted += 1;
            }
        }
        Ok(adopted)
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), EngineError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(EngineError::OutOfRange {
                offset,
                len,
                size: self.size,
            }),
        }
    }

    /// First and last logical block of a non-empty range.
    #[inline]
    fn span(&self, offset: u64, len: u64) -> (u64, u64) {
        (offset >> self.shift, (offset + len - 1) >> self.shift)
    }

    #[inline]
    fn stripe(&self, block: u64) -> &RwLock<()> {
        &self.stripes[block as usize % STRIPES].0
    }

    /// Run `f` holding the read side of the stripes of blocks `first..=last`.
    #[inline]
    fn with_read_locks<R>(&self, first: u64, last: u64, f: impl FnOnce() -> R) -> R {
        if first == last {
            let _io = self.stripe(first).read();
            return f();
        }
        let mut held: [Option<RwLockReadGuard<'_, ()>>; STRIPES] = [const { None }; STRIPES];
        for s in stripe_order(first, last) {
            held[s] = Some(self.stripes[s].0.read());
        }
        let result = f();
        drop(held);
        result
    }

    /// Run `f` holding the write side of the stripes of blocks `first..=last`.
    fn with_write_locks<R>(&self, first: u64, last: u64, f: impl FnOnce() -> R) -> R {
        let mut held: [Option<RwLockWriteGuard<'_, ()>>; STRIPES] = [const { None }; STRIPES];
        for s in stripe_order(first, last) {
            held[s] = Some(self.stripes[s].0.write());
        }
        let result = f();
        drop(held);
        result
    }

    /// Run `f` with every IO excluded.
    fn with_all_write_locks<R>(&self, f: impl FnOnce() -> R) -> R {
        self.with_write_locks(0, STRIPES as u64 - 1, f)
    }

    #[inline]
    fn phys_offset(&self, phys: u64, in_block: usize) -> u64 {
        (phys << self.shift) + in_block as u64
    }

    /// Call `f(block, offset in block, range of buf)` for each block piece
    /// of `[offset, offset + len)`.
    #[inline]
    fn split(
        &self,
        offset: u64,
        len: usize,
        mut f: impl FnMut(u64, usize, Range<usize>) -> Result<(), EngineError>,
    ) -> Result<(), EngineError> {
        let bs = self.block_size as usize;
        let mut done = 0usize;
        while done < len {
            let pos = offset + done as u64;
            let block = pos >> self.shift;
            let in_block = (pos & (bs as u64 - 1)) as usize;
            let n = (bs - in_block).min(len - done);
            f(block, in_block, done..done + n)?;
            done += n;
        }
        Ok(())
    }

    /// Fill `buf` from the data file at `offset` (one positional read; past
    /// the end of the file reads zeros).
    fn read_data(&self, buf: &mut [u8], offset: u64) -> Result<(), EngineError> {
        #[cfg(test)]
        self.counters.preads.fetch_add(1, Ordering::Relaxed);
        let n = read_full(&self.data, buf, offset).map_err(io_error("read", &self.data_path))?;
        // Past the end of the data file: a block allocated but not yet
        // written to there.
        buf[n..].fill(0);
        Ok(())
    }

    /// Fill `buf` from source `src` (see [`ReadRun`]) at `offset`.
    fn read_source(&self, src: usize, buf: &mut [u8], offset: u64) -> Result<(), EngineError> {
        match (src, &self.base) {
            (0, _) => self.read_data(buf, offset),
            (k, Some(base)) => {
                #[cfg(test)]
                self.counters.preads.fetch_add(1, Ordering::Relaxed);
                base.read(k - 1, buf, offset)
            }
            (_, None) => unreachable!("a base source in an image without a base"),
        }
    }

    /// Where logical `block` reads from: (source, physical block), or
    /// `None` for zeros. A clone's unmapped block reads through to its base.
    #[inline]
    fn locate(&self, block: u64) -> Option<(usize, u64)> {
        let entry = self.map.get(block);
        match entry.phys() {
            Some(phys) => Some((0, phys)),
            None if entry == Entry::UNMAPPED => self
                .base
                .as_ref()?
                .lookup(block)
                .map(|(level, phys)| (level + 1, phys)),
            None => None, // Entry::ZERO
        }
    }

    fn finish_read(&self, buf: &mut [u8], run: ReadRun) -> Result<(), EngineError> {
        match run.file {
            Some((src, at)) => self.read_source(src, &mut buf[run.buf], at),
            None => {
                #[cfg(test)]
                self.counters.zero_fills.fetch_add(1, Ordering::Relaxed);
                buf[run.buf].fill(0);
                Ok(())
            }
        }
    }

    /// Read through the map, one system call per physically contiguous run
    /// and one fill per unmapped run. The caller holds the stripes.
    fn read_mapped(&self, buf: &mut [u8], offset: u64) -> Result<(), EngineError> {
        let mut run: Option<ReadRun> = None;
        self.split(offset, buf.len(), |block, in_block, range| {
            let file = self
                .locate(block)
                .map(|(src, phys)| (src, self.phys_offset(phys, in_block)));
            if let Some(run) = &mut run {
                let joins = match (run.file, file) {
                    (None, None) => true,
                    (Some((src, at)), Some((to, file))) => {
                        src == to && at + run.buf.len() as u64 == file
                    }
                    _ => false,
                };
                if joins {
                    run.buf.end = range.end;
                    return Ok(());
                }
            }
            match run.replace(ReadRun { file, buf: range }) {
                Some(done) => self.finish_read(buf, done),
                None => Ok(()),
            }
        })?;
        match run {
            Some(done) => self.finish_read(buf, done),
            None => Ok(()),
        }
    }

    /// Write `buf` to the data file at `offset` (one positional write).
    fn write_data(&self, buf: &[u8], offset: u64) -> Result<(), EngineError> {
        #[cfg(test)]
        self.counters.pwrites.fetch_add(1, Ordering::Relaxed);
        self.data
            .write_all_at(buf, offset)
            .map_err(io_error("write", &self.data_path))
    }

    /// Write through the map, allocating on first write, one system call
    /// per physically contiguous run. The caller holds the stripes. Sets
    /// `wrote` once any data was written.
    fn write_mapped(&self, buf: &[u8], offset: u64, wrote: &mut bool) -> Result<(), EngineError> {
        // Held across the first writes of a run, dropped before a syscall.
        let mut alloc: Option<AllocGuard<'_>> = None;
        let mut run: Option<(u64, Range<usize>)> = None;
        let mut finish = |run: Option<(u64, Range<usize>)>| -> Result<(), EngineError> {
            if let Some((at, range)) = run {
                self.write_data(&buf[range], at)?;
                *wrote = true;
            }
            Ok(())
        };
        self.split(offset, buf.len(), |block, in_block, range| {
            let phys = match self.map.get(block).phys() {
                Some(phys) => phys,
                // An all-zero piece of an unmapped block: it already reads
                // as zeros, nothing to write.
                None if is_zero(&buf[range.clone()]) => {
                    alloc = None;
                    return finish(run.take());
                }
                None => {
                    let guard = alloc.get_or_insert_with(|| self.alloc.lock());
                    self.map_block(guard, block)?
                }
            };
            let file = self.phys_offset(phys, in_block);
            if let Some((at, r)) = &mut run {
                if *at + r.len() as u64 == file && r.end == range.start {
                    r.end = range.end;
                    return Ok(());
                }
            }
            alloc = None;
            finish(run.replace((file, range)))
        })?;
        drop(alloc);
        finish(run)
    }

    /// Give unmapped `block` a physical block and publish the mapping,
    /// under the allocator's lock (so no other first write interleaves).
    fn map_block(&self, alloc: &mut AllocGuard<'_>, block: u64) -> Result<u64, EngineError> {
        // Unmapped, or Entry::ZERO (a clone's discarded block).
        let current = self.map.get(block);
        if let Some(phys) = current.phys() {
            return Ok(phys); // another writer mapped it meanwhile
        }
        let (phys, revived) = if !self.identity_placement {
            (alloc.alloc().ok_or(EngineError::NoSpace)?, false)
        } else if alloc.claim(block) {
            (block, false)
        } else if alloc.revive(block) {
            (block, true) // invariant 6
        } else {
            // Its home is held (by a snapshot, or by another logical block
            // in an image of an earlier build): stay off the other homes.
            let phys = alloc.alloc_above(self.nblocks);
            (phys.ok_or(EngineError::NoSpace)?, false)
        };
        if let Err(won) = self.map.try_replace(block, current, Entry::mapped(phys)) {
            // Unreachable: first mappings are made under the allocator lock.
            if revived {
                alloc.defer_own(phys);
            } else {
                alloc.give_back(phys);
            }
            return won.phys().ok_or(EngineError::Corrupt {
                path: self.map_path.clone(),
                reason: format!("block {block} raced to an invalid entry"),
            });
        }
        self.allocated.fetch_add(1, Ordering::Relaxed);
        if phys != block {
            self.non_identity.fetch_add(1, Ordering::Relaxed);
        }
        self.map
            .write_through(&self.map_file, block, block + 1)
            .map_err(io_error("write", &self.map_path))?;
        Ok(phys)
    }

    /// Whether any block may need copying before a write: the image has
    /// shared blocks or is a clone. Cheap; under the read side of a stripe
    /// it cannot turn true (taking a snapshot excludes all IO).
    #[inline]
    fn may_copy(&self) -> bool {
        self.base.is_some() || self.shared_count.load(Ordering::Acquire) > 0
    }

    /// What a write to logical `block` must copy first, if anything: its
    /// own physical block when a snapshot shares it (copy-on-write), or
    /// its base's block when it is a clone's block not written yet
    /// (copy-up). As (source, physical block, current entry).
    fn copy_source(&self, block: u64) -> Option<(usize, u64, Entry)> {
        let entry = self.map.get(block);
        match entry.phys() {
            Some(phys) => self.shared.get(phys).then_some((0, phys, entry)),
            None if entry == Entry::UNMAPPED => {
                let (level, phys) = self.base.as_ref()?.lookup(block)?;
                Some((level + 1, phys, entry))
            }
            None => None,
        }
    }

    /// Whether a write of `offset..offset+len` would copy a block first,
    /// and so wait on a sync of the data file (advisory: unlocked).
    pub fn write_may_wait(&self, offset: u64, len: u64) -> bool {
        if len == 0 || offset.saturating_add(len) > self.size() || !self.may_copy() {
            return false;
        }
        let (first, last) = self.span(offset, len);
        self.needs_copy(first, last)
    }

    fn needs_copy(&self, first: u64, last: u64) -> bool {
        (first..=last).any(|block| self.copy_source(block).is_some())
    }

    /// The number of blocks from `block` to `last` in a row that a write
    /// must copy.
    fn copies_from(&self, block: u64, last: u64) -> u64 {
        (block..=last)
            .take_while(|&b| self.copy_source(b).is_some())
            .count() as u64
    }

    /// A block for the copy of logical `block`: its own index when free
    /// (a clone's copy-up, mostly), else one above the identity homes.
    /// The copies of the next blocks of the same write (up to `last`) are
    /// reserved with it in `reserved` (next block, count left) when a run
    /// of free blocks is found, so that one `pwritev` writes them all now
    /// and one `pwrite` again once they are mapped. Returns (block, revived).
    fn copy_alloc(
        &self,
        block: u64,
        last: u64,
        reserved: &mut (u64, u64),
    ) -> Result<(u64, bool), EngineError> {
        if self.identity_placement {
            let mut alloc = self.alloc.lock();
            if alloc.claim(block) {
                return Ok((block, false));
            }
            if alloc.revive(block) {
                return Ok((block, true)); // invariant 6
            }
        }
        let (next, left) = reserved;
        if *left > 0 {
            *left -= 1;
            *next += 1;
            return Ok((*next - 1, false));
        }
        let want = self.copies_from(block, last).max(1);
        let (first, count) = self
            .alloc
            .lock()
            .alloc_run_above(self.nblocks, want)
            .ok_or(EngineError::NoSpace)?;
        *reserved = (first + 1, count - 1);
        Ok((first, false))
    }

    /// [`BlockEngine::write_at`] when some block must be copied first,
    /// under the write side of the stripes (invariant 10): each such block
    /// is written whole to a new block (the bytes outside the write read
    /// from its source; a block written whole is not read), the data file
    /// is synced, and only then are the new blocks mapped (one
    /// write-through for them all). Other blocks are written as usual.
    /// The copies of consecutive blocks go to consecutive new blocks when
    /// a run is free: one `pwritev` for them, with the old bytes around.
    fn write_copying(&self, buf: &[u8], offset: u64, wrote: &mut bool) -> Result<(), EngineError> {
        if self.passthrough.load(Ordering::Acquire) {
            *wrote = true;
            return self.write_data(buf, offset);
        }
        // Taken out for the call, so that a nested use (none today) would
        // find an empty one rather than a borrowed one.
        let mut scratch = COPY_SCRATCH.with(|s| std::mem::take(&mut *s.borrow_mut()));
        let result = self.copy_and_write(buf, offset, wrote, &mut scratch);
        scratch.copied.clear();
        COPY_SCRATCH.with(|s| *s.borrow_mut() = scratch);
        result
    }

    fn copy_and_write(
        &self,
        buf: &[u8],
        offset: u64,
        wrote: &mut bool,
        s: &mut CopyScratch,
    ) -> Result<(), EngineError> {
        let bs = self.block_size as usize;
        if s.old.len() < 2 * bs {
            s.old.resize(2 * bs, 0);
        }
        let (_, last) = self.span(offset, buf.len() as u64);
        let mut run: Option<CopyRun> = None;
        let mut reserved = (0u64, 0u64);
        let result = self.split(offset, buf.len(), |block, in_block, range| {
            let Some((src, from, old)) = self.copy_source(block) else {
                if let Some(done) = run.take() {
                    self.write_run(buf, &s.old, &done)?;
                }
                let at = (block << self.shift) + in_block as u64;
                return self.write_mapped(&buf[range], at, wrote);
            };
            let (new, revived) = self.copy_alloc(block, last, &mut reserved)?;
            s.copied.push(Copied {
                block,
                old,
                new,
                revived,
            });
            *wrote = true;
            // The old bytes around the write: only the first and the last
            // block of a write can be partly written.
            let (end, from) = (in_block + range.len(), from << self.shift);
            let (head, tail) = match (in_block > 0, end < bs) {
                (false, false) => (0..0, 0..0),
                (true, false) => {
                    self.read_source(src, &mut s.old[..in_block], from)?;
                    (0..in_block, 0..0)
                }
                (false, true) => {
                    self.read_source(src, &mut s.old[bs + end..2 * bs], from + end as u64)?;
                    (0..0, bs + end..2 * bs)
                }
                // Inside one block: one read of it all.
                (true, true) => {
                    self.read_source(src, &mut s.old[..bs], from)?;
                    (0..in_block, end..bs)
                }
            };
            let at = new << self.shift;
            if let Some(r) = &mut run {
                if head.is_empty() && r.tail.is_empty() && r.end() == at {
                    r.body.end = range.end;
                    r.tail = tail;
                    return Ok(());
                }
            }
            let body = range;
            match run.replace(CopyRun {
                at,
                head,
                body,
                tail,
            }) {
                Some(done) => self.write_run(buf, &s.old, &done),
                None => Ok(()),
            }
        });
        let result = result.and_then(|()| match run.take() {
            Some(done) => self.write_run(buf, &s.old, &done),
            None => Ok(()),
        });
        let (next, left) = reserved;
        if left > 0 {
            // Reserved for copies not made (their blocks were claimed).
            let mut alloc = self.alloc.lock();
            for block in next..next + left {
                alloc.give_back(block);
            }
        }
        let result = result.and_then(|()| {
            if s.copied.is_empty() {
                return Ok(());
            }
            self.data.sync_data().map_err(|e| {
                self.poisoned.store(true, Ordering::Release);
                io_error("fdatasync", &self.data_path)(e)
            })
        });
        if let Err(e) = result {
            self.abandon_copies(&s.copied);
            return Err(e);
        }
        let (Some(first), Some(last)) = (s.copied.first(), s.copied.last()) else {
            return Ok(());
        };
        for c in &s.copied {
            self.publish_copy(c);
        }
        // One write-through for them all: the entries of the blocks in
        // between are current too (this write holds their stripes).
        self.map
            .write_through(&self.map_file, first.block, last.block + 1)
            .map_err(io_error("write", &self.map_path))
    }

    /// Write a [`CopyRun`] (one `pwritev`, more only after a short write).
    fn write_run(&self, buf: &[u8], old: &[u8], run: &CopyRun) -> Result<(), EngineError> {
        let mut parts = [
            &old[run.head.clone()],
            &buf[run.body.clone()],
            &old[run.tail.clone()],
        ];
        let mut at = run.at;
        loop {
            let mut iov = [IoSlice::new(&[]); 3];
            let mut n = 0;
            for part in parts.iter().filter(|p| !p.is_empty()) {
                iov[n] = IoSlice::new(part);
                n += 1;
            }
            if n == 0 {
                return Ok(());
            }
            #[cfg(test)]
            self.counters.pwrites.fetch_add(1, Ordering::Relaxed);
            let mut done = match nix::sys::uio::pwritev(&self.data, &iov[..n], at as i64) {
                Ok(0) => {
                    let zero = io::Error::from(io::ErrorKind::WriteZero);
                    return Err(io_error("write", &self.data_path)(zero));
                }
                Ok(done) => done,
                Err(Errno::EINTR) => continue,
                Err(errno) => return Err(io_error("write", &self.data_path)(errno.into())),
            };
            at += done as u64;
            for part in &mut parts {
                let skip = done.min(part.len());
                *part = &part[skip..];
                done -= skip;
            }
        }
    }

    /// Map a copied block in place of what its logical block had (in
    /// memory; the caller writes the entry through).
    fn publish_copy(&self, c: &Copied) {
        let old = self.map.swap(c.block, Entry::mapped(c.new));
        debug_assert_eq!(old, c.old, "block {} changed under its write lock", c.block);
        match old.phys() {
            Some(phys) => {
                // Stays used: a snapshot holds it.
                self.head_shared.fetch_sub(1, Ordering::Relaxed);
                if phys != c.block {
                    self.non_identity.fetch_sub(1, Ordering::Relaxed);
                }
            }
            None => {
                self.allocated.fetch_add(1, Ordering::Relaxed);
            }
        }
        if c.new != c.block {
            self.non_identity.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Undo the allocations of copies that will not be mapped: punch what
    /// they may hold (invariant 1), then free them. A block that cannot be
    /// punched stays used (the next open frees it).
    fn abandon_copies(&self, copied: &[Copied]) {
        for c in copied {
            if let Err(e) = self.zero_phys(c.new << self.shift, u64::from(self.block_size)) {
                tracing::warn!(data = %self.data_path.display(), error = %e,
                    block = c.new, "could not punch an abandoned copy; it stays used");
                continue;
            }
            let mut alloc = self.alloc.lock();
            if c.revived {
                alloc.defer_own(c.new);
            } else {
                alloc.give_back(c.new);
            }
        }
    }

    /// Zero a range of the data file: punch a hole, or write zeros where
    /// the filesystem cannot punch.
    fn zero_phys(&self, offset: u64, len: u64) -> Result<(), EngineError> {
        if self.can_punch.load(Ordering::Relaxed) {
            let mode = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
            match fallocate(&self.data, mode, offset as i64, len as i64) {
                Ok(()) => {
                    self.punched.fetch_or(true, Ordering::AcqRel);
                    return Ok(());
                }
                Err(Errno::EOPNOTSUPP) => {
                    tracing::warn!(
                        data = %self.data_path.display(),
                        "filesystem cannot punch holes: discarded space is zeroed, not returned"
                    );
                    self.can_punch.store(false, Ordering::Relaxed);
                }
                Err(errno) => return Err(io_error("punch hole", &self.data_path)(errno.into())),
            }
        }
        static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(ZEROS.len() as u64) as usize;
            self.data
                .write_all_at(&ZEROS[..n], offset + done)
                .map_err(io_error("write", &self.data_path))?;
            done += n as u64;
        }
        self.data_dirty.fetch_or(true, Ordering::AcqRel);
        Ok(())
    }

    /// Zero part of a block in place (a discard that does not cover it).
    /// A block shared with a snapshot, or a clone's block still in its
    /// base, is not changed in place: zeros are written (and copied).
    fn zero_in_block(&self, block: u64, in_block: usize, len: usize) -> Result<(), EngineError> {
        {
            let _io = self.stripe(block).read();
            if self.passthrough.load(Ordering::Acquire) {
                // The data file may hold data the map does not know of.
                return self.zero_phys(self.phys_offset(block, in_block), len as u64);
            }
            if self.copy_source(block).is_none() {
                if let Some(phys) = self.map.get(block).phys() {
                    self.zero_phys(self.phys_offset(phys, in_block), len as u64)?;
                }
                return Ok(());
            }
        }
        let zeros = vec![0u8; len];
        self.write_at(&zeros, (block << self.shift) + in_block as u64)
    }

    /// What a discarded logical block becomes: unmapped, or in a clone
    /// whose base has data there, [`Entry::ZERO`] (so it reads zeros, not
    /// the base).
    fn discarded_entry(&self, block: u64) -> Entry {
        match &self.base {
            Some(base) if base.lookup(block).is_some() => Entry::ZERO,
            _ => Entry::UNMAPPED,
        }
    }

    /// The first block in `[block, end)` with an entry, in the head or (a
    /// clone) in its base, skipping map pages never mapped into.
    fn next_mapped(&self, block: u64, end: u64) -> Option<u64> {
        let head = self.map.next_entry(block, end);
        match &self.base {
            Some(base) => {
                let end = head.map_or(end, |h| h + 1);
                match base.next_entry(block, end) {
                    Some(b) => Some(head.map_or(b, |h| h.min(b))),
                    None => head,
                }
            }
            None => head,
        }
    }

    /// Unmap the whole blocks `[first, end)`, punch their space (unless
    /// `punch` is false: the caller punched it) and defer their reuse to
    /// the next flush. Each window of blocks is unmapped, punched and
    /// deferred under the write side of its stripes.
    fn unmap_blocks(&self, first: u64, end: u64, punch: bool) -> Result<(), EngineError> {
        let window = (UNMAP_WINDOW_BYTES >> self.shift).max(1);
        let mut block = first;
        while let Some(start) = self.next_mapped(block, end) {
            let stop = (start + window).min(end);
            self.with_write_locks(start, stop - 1, || self.unmap_window(start, stop, punch))?;
            block = stop;
        }
        Ok(())
    }

    fn unmap_window(&self, first: u64, end: u64, punch: bool) -> Result<(), EngineError> {
        // A run of physically contiguous freed blocks: (first, count, own).
        let mut run: Option<(u64, u64, bool)> = None;
        let finish = |(phys, count, own): (u64, u64, bool)| -> Result<(), EngineError> {
            if punch {
                self.zero_phys(phys << self.shift, count << self.shift)?;
            }
            if own {
                self.alloc.defer_free_own(phys..phys + count);
            } else {
                self.alloc.defer_free(phys..phys + count);
            }
            Ok(())
        };
        for block in first..end {
            let entry = self.discarded_entry(block);
            let Some(phys) = self.map.swap(block, entry).phys() else {
                continue;
            };
            self.allocated.fetch_sub(1, Ordering::Relaxed);
            let own = phys == block;
            if !own {
                self.non_identity.fetch_sub(1, Ordering::Relaxed);
            }
            if self.shared.get(phys) {
                // A snapshot holds it: neither punched nor freed (invariant 10).
                self.head_shared.fetch_sub(1, Ordering::Relaxed);
                if let Some(done) = run.take() {
                    finish(done)?;
                }
                continue;
            }
            run = match run {
                Some((s, n, o)) if s + n == phys && o == own => Some((s, n + 1, o)),
                Some(done) => {
                    finish(done)?;
                    Some((phys, 1, own))
                }
                None => Some((phys, 1, own)),
            };
        }
        if let Some(done) = run {
            finish(done)?;
        }
        self.map
            .write_through(&self.map_file, first, end)
            .map_err(io_error("write", &self.map_path))
    }

    fn poisoned_error(&self) -> EngineError {
        EngineError::Io {
            op: "flush (an earlier sync failed; writes may be lost)",
            path: self.data_path.clone(),
            source: io::Error::from_raw_os_error(libc::EIO),
        }
    }

    fn flush_inner(&self) -> Result<(), EngineError> {
        let _one = self.flush_lock.lock();
        if self.poisoned.load(Ordering::Acquire) {
            return Err(self.poisoned_error());
        }
        // Blocks freed before this point are unmapped in memory and punched.
        let freed = self.alloc.take_pending();
        let punched = self.punched.swap(false, Ordering::AcqRel);
        let dirty = self.data_dirty.swap(false, Ordering::AcqRel);
        // In passthrough the kernel writes the data file behind our back.
        let dirty = dirty || self.passthrough.load(Ordering::Acquire);
        let synced = if punched {
            self.data.sync_all()
        } else if dirty {
            self.data.sync_data()
        } else {
            Ok(())
        };
        if let Err(e) = synced {
            self.poisoned.store(true, Ordering::Release);
            self.alloc.restore_pending(freed);
            return Err(io_error("fsync", &self.data_path)(e));
        }
        let pages = match self.map.write_dirty(&self.map_file) {
            Ok(pages) => pages,
            Err(e) => {
                // Unwritten pages stay dirty; a retry may succeed.
                self.alloc.restore_pending(freed);
                return Err(io_error("write", &self.map_path)(e));
            }
        };
        if pages > 0 {
            if let Err(e) = self.map_file.sync_data() {
                self.poisoned.store(true, Ordering::Release);
                self.alloc.restore_pending(freed);
                return Err(io_error("fdatasync", &self.map_path)(e));
            }
        }
        self.alloc.release(freed);
        Ok(())
    }

    /// Drop the image without flushing, as a kill -9 would (the page cache
    /// keeps every write and, by write-through, every map change).
    #[cfg(test)]
    fn crash(mut self) {
        self.flush_on_drop = false;
    }

    /// Place blocks by the fallback policy only, as earlier builds did.
    #[cfg(test)]
    fn set_identity_placement(&mut self, on: bool) {
        self.identity_placement = on;
    }
}

impl Drop for ThinImage {
    fn drop(&mut self) {
        if self.flush_on_drop {
            if let Err(e) = self.flush_inner() {
                tracing::warn!(data = %self.data_path.display(), error = %e, "flush on close failed");
            }
        }
        if self.passthrough.load(Ordering::Acquire) {
            tracing::info!(
                data = %self.data_path.display(),
                "closed in passthrough: the next open adopts the data file's extents"
            );
        }
    }
}

impl BlockEngine for ThinImage {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), EngineError> {
        self.check_range(offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        let (first, last) = self.span(offset, buf.len() as u64);
        self.with_read_locks(first, last, || {
            if self.passthrough.load(Ordering::Acquire) {
                self.read_data(buf, offset)
            } else {
                self.read_mapped(buf, offset)
            }
        })
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), EngineError> {
        self.check_range(offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        let (first, last) = self.span(offset, buf.len() as u64);
        let mut wrote = false;
        // Ok(true): a block must be copied first (invariant 10), which
        // takes the write side of the stripes; nothing was written.
        let copy = self.with_read_locks(first, last, || {
            if self.passthrough.load(Ordering::Acquire) {
                wrote = true;
                self.write_data(buf, offset).map(|()| false)
            } else if self.may_copy() && self.needs_copy(first, last) {
                Ok(true)
            } else {
                self.write_mapped(buf, offset, &mut wrote).map(|()| false)
            }
        });
        let result = match copy {
            Ok(true) => {
                self.with_write_locks(first, last, || self.write_copying(buf, offset, &mut wrote))
            }
            Ok(false) => Ok(()),
            Err(e) => Err(e),
        };
        if wrote {
            // After the pwrites: a flush that sees this covers them.
            self.data_dirty.fetch_or(true, Ordering::AcqRel);
        }
        result
    }

    fn flush(&self) -> Result<(), EngineError> {
        self.flush_inner()
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), EngineError> {
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let bs = u64::from(self.block_size);
        let end = offset + len;
        // Whole blocks; a range reaching the end of the device covers the
        // (possibly partial) last block.
        let full_end = if end == self.size {
            self.nblocks
        } else {
            end / bs
        };
        let (first, last) = self.span(offset, len);
        let punched = self.with_read_locks(first, last, || {
            if !self.passthrough.load(Ordering::Acquire) {
                return Ok(false);
            }
            // The whole range, partial blocks included: punching zeroes.
            self.zero_phys(offset, len).map(|()| true)
        })?;
        if punched {
            let first_full = offset.div_ceil(bs);
            if first_full < full_end {
                self.unmap_blocks(first_full, full_end, false)?;
            }
            return Ok(());
        }
        let mut start = offset;
        if offset % bs != 0 {
            let block = offset / bs;
            let head_end = end.min((block + 1) * bs);
            self.zero_in_block(block, (offset % bs) as usize, (head_end - offset) as usize)?;
            start = head_end;
        }
        if start >= end {
            return Ok(());
        }
        self.unmap_blocks(start / bs, full_end, true)?;
        if end != self.size && end % bs != 0 {
            self.zero_in_block(end / bs, 0, (end % bs) as usize)?;
        }
        Ok(())
    }

    fn begin_passthrough(&self) -> Option<File> {
        match ThinImage::begin_passthrough(self) {
            Ok(Some(file)) => Some(file),
            Ok(None) => {
                tracing::info!(
                    data = %self.data_path.display(),
                    "image is not identity-mapped: no passthrough"
                );
                None
            }
            Err(EngineError::Shared { .. }) => {
                // Expected with snapshots or for a clone, not a fault.
                tracing::info!(
                    data = %self.data_path.display(),
                    "image shares blocks with snapshots: no passthrough"
                );
                None
            }
            Err(e) => {
                tracing::error!(data = %self.data_path.display(), error = %e, "passthrough refused");
                None
            }
        }
    }

    fn end_passthrough(&self) {
        if let Err(e) = ThinImage::end_passthrough(self) {
            tracing::error!(
                data = %self.data_path.display(),
                error = %e,
                "leaving passthrough failed: the image stays marked, the next open adopts"
            );
        }
    }
}

/// `pread` until `buf` is full or end of file; returns the bytes read.
fn read_full(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Whether `buf` is all zeros (vectorizable; stops at the first non-zero chunk).
fn is_zero(buf: &[u8]) -> bool {
    let mut chunks = buf.chunks_exact(128);
    for chunk in &mut chunks {
        if chunk.iter().fold(0u8, |acc, &b| acc | b) != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::pattern::{pattern, Rng};
    use std::os::unix::fs::MetadataExt;
    use std::sync::{Arc, Barrier};

    pub(super) const KIB: u64 = 1 << 10;
    pub(super) const MIB: u64 = 1 << 20;
    pub(super) const GIB: u64 = 1 << 30;

    pub(super) fn new_image(size: u64, block_size: u32) -> (tempfile::TempDir, ThinImage) {
        let dir = tempfile::tempdir().unwrap();
        let img = ThinImage::create(dir.path(), ThinParams { size, block_size }).unwrap();
        (dir, img)
    }

    pub(super) fn read_vec(img: &ThinImage, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0xAA; len];
        img.read_at(&mut buf, offset).unwrap();
        buf
    }

    pub(super) fn map_bytes(dir: &Path) -> Vec<u8> {
        std::fs::read(dir.join(MAP_FILE)).unwrap()
    }

    impl ThinImage {
        /// A machine crash after the data reached the disk but the map
        /// pages written through since the last flush did not: kill -9,
        /// then the map file as that flush left it (`flushed`).
        pub(super) fn power_cut(self, dir: &Path, flushed: &[u8]) {
            self.crash();
            std::fs::write(dir.join(MAP_FILE), flushed).unwrap();
        }
    }

    pub(super) fn data_len(dir: &Path) -> u64 {
        std::fs::metadata(dir.join(DATA_FILE)).unwrap().len()
    }

    pub(super) fn data_disk_bytes(dir: &Path) -> u64 {
        std::fs::metadata(dir.join(DATA_FILE)).unwrap().blocks() * 512
    }

    fn dir_disk_bytes(dir: &Path) -> u64 {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().blocks() * 512)
            .sum()
    }

    /// Random unaligned writes, reads and discards against an in-memory model.
    fn model_check(size: u64, block_size: u32, seed: u64) {
        let (dir, img) = new_image(size, block_size);
        let mut model = vec![0u8; size as usize];
        let mut rng = Rng(seed);
        let max_len = (3 * block_size as u64 + 1000).min(160 * KIB);
        for op in 0..600u64 {
            let offset = rng.below(size);
            let len = rng.below(max_len.min(size - offset) + 1) as usize;
            let o = offset as usize;
            match rng.below(10) {
                0..=4 => {
                    let data = if rng.below(8) == 0 {
                        vec![0u8; len]
                    } else {
                        pattern(op, len)
                    };
                    img.write_at(&data, offset).unwrap();
                    model[o..o + len].copy_from_slice(&data);
                }
                5..=7 => {
                    assert_eq!(read_vec(&img, offset, len), &model[o..o + len], "op {op}");
                }
                8 => {
                    img.discard(offset, len as u64).unwrap();
                    model[o..o + len].fill(0);
                }
                _ => img.flush().unwrap(),
            }
        }
        assert_eq!(read_vec(&img, 0, size as usize), model);
        drop(img);
        let img = ThinImage::open(dir.path()).unwrap();
        assert_eq!(read_vec(&img, 0, size as usize), model);
    }

    #[test]
    fn round_trip_aligned() {
        let (_dir, img) = new_image(4 * MIB, 8 << 10);
        for block in [0u64, 1, 7, 511] {
            let data = pattern(block, 8 << 10);
            img.write_at(&data, block * (8 << 10)).unwrap();
            assert_eq!(read_vec(&img, block * (8 << 10), 8 << 10), data);
        }
        let big = pattern(99, 64 << 10);
        img.write_at(&big, MIB).unwrap();
        assert_eq!(read_vec(&img, MIB, 64 << 10), big);
        assert_eq!(img.usage().allocated_blocks, 4 + 8);
    }

    #[test]
    fn round_trip_unaligned_random() {
        model_check(MIB, 4096, 1);
        // Partial last block: 1 MiB + 12 KiB with 16 KiB blocks.
        model_check(MIB + 12 * KIB, 16 << 10, 2);
        model_check(3 * MIB, 1 << 20, 3);
    }

    #[test]
    fn holes_read_zero() {
        let (_dir, img) = new_image(8 * MIB, 32 << 10);
        assert!(read_vec(&img, 0, 8 * MIB as usize).iter().all(|&b| b == 0));
        // A partial write into a fresh block: the rest of it reads zeros.
        let data = pattern(5, 1000);
        img.write_at(&data, 3 * MIB + 5000).unwrap();
        let block = read_vec(&img, 3 * MIB, 32 << 10);
        assert_eq!(&block[5000..6000], &data[..]);
        assert!(block[..5000].iter().all(|&b| b == 0));
        assert!(block[6000..].iter().all(|&b| b == 0));
        // Neighbouring blocks stay holes.
        assert!(read_vec(&img, 3 * MIB - 100, 100).iter().all(|&b| b == 0));
        assert!(read_vec(&img, 3 * MIB + (32 << 10), 100)
            .iter()
            .all(|&b| b == 0));
        assert_eq!(img.usage().allocated_blocks, 1);
    }

    #[test]
    fn zero_writes_do_not_allocate() {
        let (dir, img) = new_image(16 * MIB, 4096);
        img.write_at(&vec![0u8; 4 * MIB as usize], 1000).unwrap();
        img.flush().unwrap();
        assert_eq!(img.usage().allocated_blocks, 0);
        assert_eq!(data_len(dir.path()), 0);
        // Zeros over an allocated block do overwrite it (and it stays allocated).
        img.write_at(&pattern(1, 8192), 0).unwrap();
        img.write_at(&[0u8; 100], 4000).unwrap();
        let back = read_vec(&img, 0, 8192);
        assert!(back[4000..4100].iter().all(|&b| b == 0));
        assert_eq!(back[..4000], pattern(1, 8192)[..4000]);
        assert_eq!(img.usage().allocated_blocks, 2);
        // A write mixing zero and non-zero blocks allocates only the latter.
        let mut mixed = vec![0u8; 3 * 4096];
        mixed[4096..8192].copy_from_slice(&pattern(2, 4096));
        img.write_at(&mixed, 64 * 4096).unwrap();
        assert_eq!(img.usage().allocated_blocks, 3);
        assert_eq!(read_vec(&img, 64 * 4096, 3 * 4096), mixed);
    }

    #[test]
    fn discard_unmaps_punches_and_space_is_reused() {
        let bs = 64 * KIB;
        let (dir, mut img) = new_image(4 * MIB, bs as u32);
        // The fallback placement (images of earlier builds): identity
        // placement never reuses a block for another logical block; see
        // `identity_discard_punches_and_revives` for it.
        img.set_identity_placement(false);
        let data = pattern(7, 8 * bs as usize);
        img.write_at(&data, 0).unwrap();
        img.flush().unwrap();
        assert_eq!(img.usage().allocated_blocks, 8);
        let disk_before = data_disk_bytes(dir.path());
        assert!(disk_before >= 8 * bs, "{disk_before}");

        // Half of block 0, blocks 1..=4 whole, 100 bytes of block 5.
        let (start, end) = (bs / 2, 5 * bs + 100);
        img.discard(start, end - start).unwrap();
        assert_eq!(img.usage().allocated_blocks, 4);
        let mut expect = data.clone();
        expect[start as usize..end as usize].fill(0);
        assert_eq!(read_vec(&img, 0, 8 * bs as usize), expect);
        let disk_after = data_disk_bytes(dir.path());
        assert!(
            disk_before - disk_after >= 4 * bs,
            "{disk_before} -> {disk_after}"
        );

        // Freed blocks are not reused before the flush that unmaps them...
        img.write_at(&pattern(8, bs as usize), 20 * bs).unwrap();
        assert_eq!(data_len(dir.path()), 9 * bs);
        img.flush().unwrap();
        // ...and are reused after it: the data file does not grow.
        for (i, block) in (30..34u64).enumerate() {
            img.write_at(&pattern(100 + i as u64, 1000), block * bs + 10)
                .unwrap();
        }
        assert_eq!(data_len(dir.path()), 9 * bs);
        assert_eq!(img.usage().allocated_blocks, 9);
        for (i, block) in (30..34u64).enumerate() {
            let got = read_vec(&img, block * bs, bs as usize);
            assert!(got[..10].iter().all(|&b| b == 0));
            assert_eq!(got[10..1010], pattern(100 + i as u64, 1000)[..]);
            assert!(
                got[1010..].iter().all(|&b| b == 0),
                "reused block {block} not zero"
            );
        }
    }

    #[test]
    fn discard_to_end_frees_partial_last_block() {
        // 3 blocks of 8 KiB, the last one 4 KiB long.
        let (_dir, img) = new_image(20 * KIB, 8 << 10);
        img.write_at(&pattern(1, 20 * KIB as usize), 0).unwrap();
        assert_eq!(img.usage().allocated_blocks, 3);
        img.discard(16 * KIB, 4 * KIB).unwrap();
        assert_eq!(img.usage().allocated_blocks, 2);
        assert!(read_vec(&img, 16 * KIB, 4096).iter().all(|&b| b == 0));
        // A discard inside one block only zeroes.
        img.discard(100, 200).unwrap();
        assert_eq!(img.usage().allocated_blocks, 2);
        let back = read_vec(&img, 0, 8192);
        assert!(back[100..300].iter().all(|&b| b == 0));
        assert_eq!(back[300..], pattern(1, 8192)[300..]);
        // Discarding everything frees everything.
        img.discard(0, 20 * KIB).unwrap();
        assert_eq!(img.usage().allocated_blocks, 0);
    }

    #[test]
    fn concurrent_first_writes_allocate_once() {
        const THREADS: usize = 4;
        const BLOCKS: u64 = 64;
        let (_dir, img) = new_image(BLOCKS * 4096, 4096);
        let img = Arc::new(img);
        let barrier = Arc::new(Barrier::new(THREADS));
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let (img, barrier) = (img.clone(), barrier.clone());
                std::thread::spawn(move || {
                    let data = pattern(t as u64 + 1, 4096);
                    for block in 0..BLOCKS {
                        barrier.wait();
                        img.write_at(&data, block * 4096).unwrap();
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(img.usage().allocated_blocks, BLOCKS);
        let candidates: Vec<Vec<u8>> = (0..THREADS).map(|t| pattern(t as u64 + 1, 4096)).collect();
        for block in 0..BLOCKS {
            let got = read_vec(&img, block * 4096, 4096);
            assert!(
                candidates.contains(&got),
                "block {block} is not one writer's data"
            );
        }
        drop(img);
    }

    #[test]
    fn concurrent_partial_first_writes_all_land() {
        const THREADS: usize = 4;
        const BLOCKS: u64 = 32;
        let bs = 16 * KIB;
        let (_dir, img) = new_image(BLOCKS * bs, bs as u32);
        let img = Arc::new(img);
        let barrier = Arc::new(Barrier::new(THREADS));
        let quarter = (bs / 4) as usize;
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let (img, barrier) = (img.clone(), barrier.clone());
                std::thread::spawn(move || {
                    for block in 0..BLOCKS {
                        barrier.wait();
                        let data = pattern(block * 10 + t as u64, quarter);
                        img.write_at(&data, block * bs + (t * quarter) as u64)
                            .unwrap();
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(img.usage().allocated_blocks, BLOCKS);
        for block in 0..BLOCKS {
            let got = read_vec(&img, block * bs, bs as usize);
            for t in 0..THREADS {
                let part = &got[t * quarter..(t + 1) * quarter];
                assert_eq!(
                    part,
                    pattern(block * 10 + t as u64, quarter),
                    "block {block} part {t}"
                );
            }
        }
    }

    /// One thread's random mix of writes, reads (checked against a model),
    /// discards and flushes on its own region `t`; returns what the region
    /// must hold.
    fn model_thread(
        img: &ThinImage,
        t: u64,
        region: u64,
        seed: u64,
        ops: u64,
        max_len: u64,
    ) -> Vec<u8> {
        let base = t * region;
        let mut model = vec![0u8; region as usize];
        let mut rng = Rng(seed);
        for op in 0..ops {
            let off = rng.below(region);
            let len = rng.below(max_len.min(region - off) + 1) as usize;
            let o = off as usize;
            match rng.below(12) {
                0..=5 => {
                    let data = pattern(t << 32 | op, len);
                    img.write_at(&data, base + off).unwrap();
                    model[o..o + len].copy_from_slice(&data);
                }
                6..=8 => {
                    let mut buf = vec![0u8; len];
                    img.read_at(&mut buf, base + off).unwrap();
                    assert_eq!(buf, &model[o..o + len], "thread {t} op {op}");
                }
                9 | 10 => {
                    img.discard(base + off, len as u64).unwrap();
                    model[o..o + len].fill(0);
                }
                _ => img.flush().unwrap(),
            }
        }
        model
    }

    #[test]
    fn concurrent_mixed_io_matches_model() {
        const THREADS: u64 = 4;
        let bs = 4096u64;
        let region = 96 * bs + 1234; // regions straddle blocks
        let size = (THREADS * region).div_ceil(4096) * 4096;
        let (dir, img) = new_image(size, bs as u32);
        let img = Arc::new(img);
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let img = img.clone();
                std::thread::spawn(move || model_thread(&img, t, region, t + 11, 1500, 3 * bs))
            })
            .collect();
        let models: Vec<Vec<u8>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let img = Arc::into_inner(img).unwrap();
        drop(img);
        let img = ThinImage::open(dir.path()).unwrap();
        for (t, model) in models.iter().enumerate() {
            assert_eq!(
                &read_vec(&img, t as u64 * region, region as usize),
                model,
                "thread {t}"
            );
        }
    }

    #[test]
    fn reopen_after_drop_keeps_data() {
        let (dir, img) = new_image(64 * MIB, 32 << 10);
        let a = pattern(1, 100_000);
        img.write_at(&a, 12_345).unwrap();
        img.write_at(&pattern(2, 4096), 40 * MIB).unwrap();
        img.discard(40 * MIB, 32 << 10).unwrap();
        let usage = img.usage();
        drop(img);
        let img = ThinImage::open(dir.path()).unwrap();
        assert_eq!(read_vec(&img, 12_345, a.len()), a);
        assert!(read_vec(&img, 40 * MIB, 4096).iter().all(|&b| b == 0));
        assert_eq!(img.usage().allocated_blocks, usage.allocated_blocks);
        assert_eq!(img.size(), 64 * MIB);
        assert_eq!(img.block_size(), 32 << 10);
    }

    #[test]
    fn crash_keeps_flushed_writes() {
        let bs = 4096u64;
        let (dir, img) = new_image(MIB, bs as u32);
        for block in 0..10 {
            img.write_at(&pattern(block, 4096), block * bs).unwrap();
        }
        img.flush().unwrap();
        let flushed = map_bytes(dir.path());
        // Not flushed: a discard, an overwrite, new allocations.
        img.discard(3 * bs, bs).unwrap();
        img.write_at(&pattern(1000, 4096), 4 * bs).unwrap();
        for block in 10..20 {
            img.write_at(&pattern(block, 4096), block * bs).unwrap();
        }
        img.power_cut(dir.path(), &flushed);

        let img = ThinImage::open(dir.path()).unwrap();
        for block in 0..10 {
            let got = read_vec(&img, block * bs, 4096);
            match block {
                3 => assert!(got == pattern(3, 4096) || got.iter().all(|&b| b == 0)),
                4 => assert!(got == pattern(4, 4096) || got == pattern(1000, 4096)),
                _ => assert_eq!(got, pattern(block, 4096), "flushed block {block} lost"),
            }
        }
        for block in 10..20 {
            let got = read_vec(&img, block * bs, 4096);
            assert!(got == pattern(block, 4096) || got.iter().all(|&b| b == 0));
        }
        // Blocks written but never durably mapped were cut off...
        assert!(data_len(dir.path()) <= 10 * bs);
        // ...so fresh allocations read zeros around what is written.
        for block in 40..60u64 {
            img.write_at(&[0xEE; 10], block * bs + 2000).unwrap();
            let got = read_vec(&img, block * bs, 4096);
            assert!(got[..2000].iter().all(|&b| b == 0), "block {block}");
            assert!(got[2010..].iter().all(|&b| b == 0), "block {block}");
        }
    }

    #[test]
    fn kill9_keeps_every_completed_write_and_discard() {
        // A killed process under a live device: the kernel was told these
        // are done, and the next daemon serves the same device.
        let bs = 4096u64;
        let (dir, img) = new_image(MIB, bs as u32);
        for block in 0..10 {
            img.write_at(&pattern(block, 4096), block * bs).unwrap();
        }
        img.flush().unwrap();
        img.discard(3 * bs, bs).unwrap();
        for block in 10..20 {
            img.write_at(&pattern(block, 4096), block * bs).unwrap();
        }
        img.crash();
        let img = ThinImage::open(dir.path()).unwrap();
        for block in (0..20).filter(|&b| b != 3) {
            assert_eq!(
                read_vec(&img, block * bs, 4096),
                pattern(block, 4096),
                "block {block}"
            );
        }
        assert!(read_vec(&img, 3 * bs, 4096).iter().all(|&b| b == 0));
        assert_eq!(img.usage().allocated_blocks, 19);
    }

    #[test]
    fn crash_then_reuse_reads_zeros() {
        let bs = 4096u64;
        let (dir, mut img) = new_image(MIB, bs as u32);
        // The fallback placement (images of earlier builds), which reuses a
        // block for another logical block; `identity_crash_then_rewrite_reads_zeros`
        // is the identity placement's case.
        img.set_identity_placement(false);
        for block in 0..10 {
            img.write_at(&pattern(block, 4096), block * bs).unwrap();
        }
        img.discard(3 * bs, bs).unwrap();
        img.flush().unwrap();
        let flushed = map_bytes(dir.path());
        // Reuses physical block 3; the mapping is lost in the crash but the
        // data reaches the disk.
        img.write_at(&pattern(77, 4096), 50 * bs).unwrap();
        img.power_cut(dir.path(), &flushed);

        let mut img = ThinImage::open(dir.path()).unwrap();
        img.set_identity_placement(false);
        assert!(read_vec(&img, 50 * bs, 4096).iter().all(|&b| b == 0));
        assert_eq!(img.usage().allocated_blocks, 9);
        // The next allocation reuses that physical block: it must read zeros.
        img.write_at(&[0x55; 16], 60 * bs).unwrap();
        let got = read_vec(&img, 60 * bs, 4096);
        assert_eq!(got[..16], [0x55; 16]);
        assert!(
            got[16..].iter().all(|&b| b == 0),
            "stale data exposed after crash"
        );
        assert_eq!(
            data_len(dir.path()),
            10 * bs,
            "physical block was not reused"
        );
    }

    #[test]
    fn thin_10g_image_with_5m_written_is_small() {
        let size = 10 * GIB;
        let (dir, img) = new_image(size, 32 << 10);
        let chunk = pattern(3, MIB as usize);
        for offset in [0, 3 * GIB, 5 * GIB + 12_345, 9 * GIB, size - MIB] {
            img.write_at(&chunk, offset).unwrap();
        }
        img.flush().unwrap();
        let usage = img.usage();
        assert!(usage.allocated_bytes >= 5 * MIB && usage.allocated_bytes <= 5 * MIB + (64 << 10));
        let on_disk = dir_disk_bytes(dir.path());
        assert!(on_disk >= 5 * MIB, "data not on disk? {on_disk}");
        assert!(on_disk < 16 * MIB, "image takes {on_disk} bytes on disk");
        assert_eq!(read_vec(&img, 5 * GIB + 12_345, MIB as usize), chunk);
    }

    #[test]
    fn create_rejects_invalid_params() {
        let dir = tempfile::tempdir().unwrap();
        let bad = [
            (GIB, 3000, "block_size"),
            (GIB, 2048, "block_size"),
            (GIB, 2 << 20, "block_size"),
            (GIB, 0, "block_size"),
            (0, 4096, "size must not be 0"),
            (GIB + 512, 4096, "multiple of 4096"),
            (MAX_SIZE + 4096, 4096, "maximum"),
        ];
        for (size, block_size, needle) in bad {
            match ThinImage::create(dir.path(), ThinParams { size, block_size }) {
                Err(EngineError::InvalidParams(msg)) => {
                    assert!(msg.contains(needle), "{size}/{block_size}: {msg}")
                }
                other => panic!("{size}/{block_size} accepted: {other:?}"),
            }
        }
        // Nothing was written for the refused images.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        // Limits themselves are fine, and size need not be a block multiple.
        let img = ThinImage::create(
            dir.path(),
            ThinParams {
                size: MAX_SIZE,
                block_size: 1 << 20,
            },
        )
        .unwrap();
        assert_eq!(img.size(), MAX_SIZE);
        // Creating over an existing image is refused.
        drop(img);
        assert!(ThinImage::create(
            dir.path(),
            ThinParams {
                size: GIB,
                block_size: 4096
            }
        )
        .is_err());
    }

    #[test]
    fn open_rejects_damaged_or_foreign_images() {
        let (dir, img) = new_image(MIB, 4096);
        img.write_at(&pattern(1, 8192), 0).unwrap();
        drop(img);
        let hdr = dir.path().join(HEADER_FILE);
        let good = std::fs::read(&hdr).unwrap();
        let expect_corrupt = |what: &str, want_path: &Path| match ThinImage::open(dir.path()) {
            Err(EngineError::Corrupt { path, reason }) => {
                assert_eq!(path, want_path, "{what}: {reason}")
            }
            other => panic!("{what}: opened: {other:?}"),
        };

        let mut flipped = good.clone();
        flipped[17] ^= 1; // size
        std::fs::write(&hdr, &flipped).unwrap();
        expect_corrupt("flipped size bit", &hdr);
        std::fs::write(&hdr, b"#!/bin/sh\necho not an image\n").unwrap();
        expect_corrupt("foreign header", &hdr);
        std::fs::write(&hdr, &good).unwrap();

        // A map entry with unknown flags, and a physical block mapped twice.
        let map_path = dir.path().join(MAP_FILE);
        let map = File::options().write(true).open(&map_path).unwrap();
        map.write_all_at(&(1u64 | 1 << 60).to_le_bytes(), 0)
            .unwrap();
        expect_corrupt("flagged entry", &map_path);
        map.write_all_at(&2u64.to_le_bytes(), 0).unwrap(); // block 0 → phys 1, like block 1
        expect_corrupt("doubly mapped", &map_path);
        map.set_len(100).unwrap();
        expect_corrupt("short map", &map_path);

        std::fs::remove_file(&hdr).unwrap();
        match ThinImage::open(dir.path()) {
            Err(EngineError::Io { source, .. }) => {
                assert_eq!(source.kind(), io::ErrorKind::NotFound)
            }
            other => panic!("missing header: {other:?}"),
        }
    }

    #[test]
    fn second_open_is_refused_while_open() {
        let (dir, img) = new_image(MIB, 4096);
        match ThinImage::open(dir.path()) {
            Err(EngineError::Io { op, .. }) => assert!(op.starts_with("lock"), "{op}"),
            other => panic!("opened twice: {other:?}"),
        }
        drop(img);
        ThinImage::open(dir.path()).unwrap();
    }

    #[test]
    fn out_of_range_io_is_refused() {
        let (_dir, img) = new_image(MIB, 4096);
        let mut buf = [0u8; 20];
        let oor = |r: Result<(), EngineError>| matches!(r, Err(EngineError::OutOfRange { .. }));
        assert!(oor(img.read_at(&mut buf, MIB - 10)));
        assert!(oor(img.write_at(&buf, MIB - 10)));
        assert!(oor(img.discard(MIB - 10, 20)));
        assert!(oor(img.read_at(&mut buf, u64::MAX - 5)));
        assert!(oor(img.discard(u64::MAX, 2)));
        assert!(img.read_at(&mut buf, MIB - 20).is_ok());
        assert!(img.read_at(&mut [], MIB).is_ok());
        assert_eq!(img.usage().allocated_blocks, 0);
        assert_eq!(
            EngineError::OutOfRange {
                offset: 0,
                len: 0,
                size: 0
            }
            .errno(),
            libc::EINVAL
        );
    }

    #[test]
    fn is_zero_finds_a_single_set_byte() {
        for len in [0usize, 1, 127, 128, 129, 4096, 5000] {
            let mut v = vec![0u8; len];
            assert!(is_zero(&v));
            for at in [0, len / 2, len.saturating_sub(1)] {
                if len > 0 {
                    v[at] = 1;
                    assert!(!is_zero(&v), "len {len} at {at}");
                    v[at] = 0;
                }
            }
        }
    }

    pub(super) fn data_file_bytes(dir: &Path, offset: u64, len: usize) -> Vec<u8> {
        let file = File::open(dir.join(DATA_FILE)).unwrap();
        let mut buf = vec![0xAA; len];
        let n = read_full(&file, &mut buf, offset).unwrap();
        buf[n..].fill(0);
        buf
    }

    pub(super) fn marker_exists(dir: &Path) -> bool {
        dir.join(PASSTHROUGH_FILE).exists()
    }

    /// (preads, pwrites, zero fills) so far.
    pub(super) fn io_counts(img: &ThinImage) -> (u64, u64, u64) {
        let c = &img.counters;
        (
            c.preads.load(Ordering::Relaxed),
            c.pwrites.load(Ordering::Relaxed),
            c.zero_fills.load(Ordering::Relaxed),
        )
    }

    #[test]
    fn identity_placement_makes_the_data_file_a_raw_image() {
        let size = 8 * MIB;
        let (dir, img) = new_image(size, 32 << 10);
        let writes = [
            (3 * MIB + 5000, pattern(1, 1000)),
            (0, pattern(2, 70_000)),
            (size - 4096, pattern(3, 4096)),
            (5 * MIB - 100, pattern(4, 200_000)),
        ];
        for (offset, data) in &writes {
            img.write_at(data, *offset).unwrap();
        }
        img.flush().unwrap();
        assert!(img.is_identity());
        for (offset, data) in &writes {
            assert_eq!(
                &data_file_bytes(dir.path(), *offset, data.len()),
                data,
                "data file at {offset}"
            );
        }
        // Byte for byte, the whole device.
        assert_eq!(
            data_file_bytes(dir.path(), 0, size as usize),
            read_vec(&img, 0, size as usize)
        );
        assert!(data_len(dir.path()) <= size);
        drop(img);
        let img = ThinImage::open(dir.path()).unwrap();
        assert!(img.is_identity());
        for (offset, data) in &writes {
            assert_eq!(&read_vec(&img, *offset, data.len()), data);
        }
    }

    #[test]
    fn identity_discard_punches_and_revives() {
        let bs = 64 * KIB;
        let (dir, img) = new_image(4 * MIB, bs as u32);
        let data = pattern(7, 8 * bs as usize);
        img.write_at(&data, 0).unwrap();
        img.flush().unwrap();
        let disk_before = data_disk_bytes(dir.path());
        // Blocks 1..=4 whole, parts of 0 and 5.
        let (start, end) = (bs / 2, 5 * bs + 100);
        img.discard(start, end - start).unwrap();
        assert_eq!(img.usage().allocated_blocks, 4);
        let disk_after = data_disk_bytes(dir.path());
        assert!(
            disk_before - disk_after >= 4 * bs,
            "{disk_before} -> {disk_after}"
        );
        for phys in 1..=4 {
            assert!(
                img.alloc.is_used(phys),
                "deferred block {phys} free before the flush"
            );
        }
        // Block 2 written again before the flush: it gets its own block back.
        let again = pattern(8, 1000);
        img.write_at(&again, 2 * bs + 300).unwrap();
        assert_eq!(img.map.get(2).phys(), Some(2));
        assert!(img.is_identity());
        img.flush().unwrap();
        // The flush released 1, 3, 4, not the revived 2.
        assert!(img.alloc.is_used(2));
        assert!(!img.alloc.is_used(1) && !img.alloc.is_used(3) && !img.alloc.is_used(4));
        let mut expect = data.clone();
        expect[start as usize..end as usize].fill(0);
        expect[2 * bs as usize + 300..][..1000].copy_from_slice(&again);
        assert_eq!(read_vec(&img, 0, 8 * bs as usize), expect);
        // The revived block was punched: only the new write is in it.
        assert_eq!(
            data_file_bytes(dir.path(), 2 * bs, bs as usize),
            expect[2 * bs as usize..3 * bs as usize]
        );
        // Released blocks go back to their own logical blocks.
        img.write_at(&pattern(9, 10), 3 * bs + 5).unwrap();
        assert_eq!(img.map.get(3).phys(), Some(3));
        img.discard(0, 4 * MIB).unwrap();
        img.flush().unwrap();
        assert_eq!(img.usage().allocated_blocks, 0);
        assert!(img.is_identity());
        img.crash();
        let img = ThinImage::open(dir.path()).unwrap();
        assert!(read_vec(&img, 0, 4 * MIB as usize).iter().all(|&b| b == 0));
    }

    #[test]
    fn revived_block_survives_a_crash_either_way() {
        let bs = 4096u64;
        let (dir, img) = new_image(MIB, bs as u32);
        img.write_at(&pattern(1, 4096), 5 * bs).unwrap();
        img.flush().unwrap();
        img.discard(5 * bs, bs).unwrap();
        img.write_at(&[0x77; 100], 5 * bs + 1000).unwrap();
        assert_eq!(img.map.get(5).phys(), Some(5));
        img.crash();
        // The on-disk map still maps 5 to 5 (the discard was not flushed):
        // it reads the punch and the new write, nothing of another block.
        let img = ThinImage::open(dir.path()).unwrap();
        let got = read_vec(&img, 5 * bs, 4096);
        let mut want = vec![0u8; 4096];
        want[1000..1100].fill(0x77);
        assert_eq!(got, want);
        assert!(img.is_identity());
    }

    #[test]
    fn identity_crash_then_rewrite_reads_zeros() {
        let bs = 4096u64;
        let (dir, img) = new_image(MIB, bs as u32);
        for block in (0..10).chain([20]) {
            img.write_at(&pattern(block, 4096), block * bs).unwrap();
        }
        img.flush().unwrap();
        let flushed = map_bytes(dir.path());
        // Below the high-water mark, written, never durably mapped.
        img.write_at(&pattern(77, 4096), 15 * bs).unwrap();
        img.power_cut(dir.path(), &flushed);

        let img = ThinImage::open(dir.path()).unwrap();
        assert!(read_vec(&img, 15 * bs, 4096).iter().all(|&b| b == 0));
        assert_eq!(img.usage().allocated_blocks, 11);
        assert_eq!(data_len(dir.path()), 21 * bs);
        // Open punched it: a partial write reads zeros around it.
        img.write_at(&[0x55; 16], 15 * bs + 100).unwrap();
        let got = read_vec(&img, 15 * bs, 4096);
        assert_eq!(got[100..116], [0x55; 16]);
        assert!(got[..100].iter().all(|&b| b == 0));
        assert!(
            got[116..].iter().all(|&b| b == 0),
            "stale data exposed after crash"
        );
        assert_eq!(img.map.get(15).phys(), Some(15));
    }

    #[test]
    fn a_block_freed_by_another_logical_block_is_not_revived() {
        let bs = 4096u64;
        let (dir, mut img) = new_image(MIB, bs as u32);
        // An image of an earlier build: logical 7 on physical 0.
        img.set_identity_placement(false);
        img.write_at(&pattern(7, 4096), 7 * bs).unwrap();
        img.flush().unwrap();
        assert_eq!(img.map.get(7).phys(), Some(0));
        assert!(!img.is_identity());
        img.set_identity_placement(true);
        img.discard(7 * bs, bs).unwrap();
        assert!(img.is_identity());
        // Physical 0 is deferred, freed by logical 7: logical 0 must not
        // take it before the flush (the on-disk map still maps 7 to it).
        img.write_at(&pattern(0, 4096), 0).unwrap();
        assert_ne!(img.map.get(0).phys(), Some(0));
        assert!(!img.is_identity());
        assert_eq!(img.begin_passthrough().unwrap().map(|_| ()), None);
        img.crash();
        let img = ThinImage::open(dir.path()).unwrap();
        // Logical 7 (its discard undone) reads its punched block or its
        // own data, never logical 0's.
        let got = read_vec(&img, 7 * bs, 4096);
        assert!(got != pattern(0, 4096), "logical 7 reads logical 0's data");
        assert!(got == pattern(7, 4096) || got.iter().all(|&b| b == 0));
        assert_eq!(read_vec(&img, 0, 4096).len(), 4096);
    }

    #[test]
    fn contiguous_runs_are_one_syscall() {
        for bs in [4096u32, 32 << 10] {
            let (_dir, img) = new_image(8 * MIB, bs);
            let one_mib = pattern(u64::from(bs), MIB as usize);
            // A 1 MiB aligned first write on an identity volume: one pwrite.
            let before = io_counts(&img);
            img.write_at(&one_mib, MIB).unwrap();
            let after = io_counts(&img);
            assert_eq!(after.1 - before.1, 1, "bs {bs}: first write");
            // An overwrite, a read of it: one each.
            img.write_at(&one_mib, MIB).unwrap();
            let mut buf = vec![0u8; MIB as usize];
            img.read_at(&mut buf, MIB).unwrap();
            assert_eq!(buf, one_mib);
            let now = io_counts(&img);
            assert_eq!((now.0 - after.0, now.1 - after.1), (1, 1), "bs {bs}");
            // Unaligned, straddling mapped and fresh blocks: still one.
            img.write_at(&one_mib, 2 * MIB - 12_345).unwrap();
            assert_eq!(io_counts(&img).1 - now.1, 1, "bs {bs}: unaligned");
            // Hole, data, hole: one fill, one pread, one fill.
            let before = io_counts(&img);
            let got = read_vec(&img, 0, 4 * MIB as usize);
            let after = io_counts(&img);
            assert_eq!(
                (after.0 - before.0, after.2 - before.2),
                (1, 2),
                "bs {bs}: mixed read"
            );
            let (m, tail) = (MIB as usize, 3 * MIB as usize - 12_345);
            assert!(got[..m].iter().all(|&b| b == 0));
            assert!(got[m..2 * m - 12_345] == one_mib[..m - 12_345]);
            assert!(got[2 * m - 12_345..tail] == one_mib[..]);
            assert!(got[tail..].iter().all(|&b| b == 0));
            // A zero block in the middle of a fresh write is skipped: two runs.
            let mut holed = pattern(5, 4 * bs as usize);
            holed[bs as usize..2 * bs as usize].fill(0);
            let before = io_counts(&img);
            img.write_at(&holed, 6 * MIB).unwrap();
            assert_eq!(io_counts(&img).1 - before.1, 2, "bs {bs}: zero block");
            assert_eq!(
                img.usage().allocated_blocks,
                (3 * MIB - 12_345).div_ceil(u64::from(bs)) - MIB / u64::from(bs) + 3
            );
            assert_eq!(read_vec(&img, 6 * MIB, holed.len()), holed);
        }
    }

    #[test]
    fn passthrough_writes_through_the_file_are_kept() {
        let bs = 32u64 << 10;
        let size = 16 * MIB;
        let (dir, img) = new_image(size, bs as u32);
        img.write_at(&pattern(1, 100_000), 10_000).unwrap();
        let file = img.begin_passthrough().unwrap().expect("identity image");
        assert!(img.is_passthrough() && marker_exists(dir.path()));
        // A raw image of the device.
        assert_eq!(file.metadata().unwrap().len(), size);
        let writes = [
            (5 * MIB + 123, pattern(2, 3000)),
            (50_000, pattern(3, 10_000)), // over the engine's write
            (size - 5000, pattern(4, 5000)),
        ];
        for (offset, data) in &writes {
            file.write_all_at(data, *offset).unwrap();
        }
        let mut model = vec![0u8; size as usize];
        model[10_000..110_000].copy_from_slice(&pattern(1, 100_000));
        for (offset, data) in &writes {
            model[*offset as usize..][..data.len()].copy_from_slice(data);
        }
        // The engine's own IO goes to the same bytes.
        assert!(read_vec(&img, 0, size as usize) == model);
        img.write_at(&pattern(5, 7000), 9 * MIB).unwrap();
        model[9 * MIB as usize..][..7000].copy_from_slice(&pattern(5, 7000));
        let mut back = vec![0u8; 7000];
        file.read_exact_at(&mut back, 9 * MIB).unwrap();
        assert_eq!(back, pattern(5, 7000));
        // Usage follows the data file's allocation.
        let before = img.usage().allocated_blocks;
        assert!(before >= 4, "{before}");
        file.write_all_at(&pattern(6, 2 * MIB as usize), 12 * MIB)
            .unwrap();
        model[12 * MIB as usize..][..2 * MIB as usize]
            .copy_from_slice(&pattern(6, 2 * MIB as usize));
        let after = img.usage().allocated_blocks;
        assert!(after >= before + 64, "{before} -> {after}");
        img.flush().unwrap();
        // Again: another handle on the same file.
        assert!(img.begin_passthrough().unwrap().is_some());
        drop(file);
        img.end_passthrough().unwrap();
        assert!(!img.is_passthrough() && !marker_exists(dir.path()));
        assert!(img.is_identity());
        assert!(read_vec(&img, 0, size as usize) == model);
        let allocated = img.usage().allocated_blocks;
        // 10_000..110_000 (4 blocks), 5 MiB+123 (1), end (1), 9 MiB (1),
        // 12 MiB (64).
        assert_eq!(allocated, 71);
        img.end_passthrough().unwrap(); // not in passthrough: nothing
        drop(img);
        let img = ThinImage::open(dir.path()).unwrap();
        assert!(read_vec(&img, 0, size as usize) == model);
        assert_eq!(img.usage().allocated_blocks, allocated);
        assert!(img.is_identity());
    }

    #[test]
    fn crash_in_passthrough_adopts_the_writes() {
        let bs = 4096u64;
        let size = 4 * MIB;
        let (dir, img) = new_image(size, bs as u32);
        img.write_at(&pattern(1, 3 * bs as usize), 0).unwrap();
        img.flush().unwrap();
        let file = img.begin_passthrough().unwrap().unwrap();
        // Never-mapped blocks, an overwrite, and a write straddling blocks.
        file.write_all_at(&pattern(2, 4096), 100 * bs).unwrap();
        file.write_all_at(&pattern(3, 10), bs + 7).unwrap();
        file.write_all_at(&pattern(4, 9000), 200 * bs - 20).unwrap();
        file.sync_all().unwrap();
        drop(file);
        img.crash();
        assert!(marker_exists(dir.path()));

        let img = ThinImage::open(dir.path()).unwrap();
        assert!(!marker_exists(dir.path()));
        assert!(!img.is_passthrough() && img.is_identity());
        assert_eq!(read_vec(&img, 100 * bs, 4096), pattern(2, 4096));
        assert_eq!(read_vec(&img, bs + 7, 10), pattern(3, 10));
        assert_eq!(read_vec(&img, 200 * bs - 20, 9000), pattern(4, 9000));
        assert_eq!(read_vec(&img, 0, 7), pattern(1, 7));
        // 0..3, 100, 199..=202.
        assert_eq!(img.usage().allocated_blocks, 3 + 1 + 4);
        // The adoption is durable: another crash keeps it.
        img.crash();
        let img = ThinImage::open(dir.path()).unwrap();
        assert_eq!(read_vec(&img, 200 * bs - 20, 9000), pattern(4, 9000));
        assert_eq!(img.usage().allocated_blocks, 8);
    }

    #[test]
    fn resuming_in_passthrough_keeps_the_kernels_writes_and_its_file() {
        let bs = 4096u64;
        let (dir, img) = new_image(4 * MIB, bs as u32);
        let file = img.begin_passthrough().unwrap().unwrap();
        file.write_all_at(&pattern(5, 4096), 10 * bs).unwrap();
        img.crash();
        // The kernel still holds the file and writes on while no daemon runs.
        file.write_all_at(&pattern(6, 4096), 20 * bs).unwrap();

        let img = ThinImage::open_resuming(dir.path()).unwrap();
        assert!(img.is_passthrough() && marker_exists(dir.path()));
        // Not cut, not scrubbed: a write made after the resume survives too.
        file.write_all_at(&pattern(7, 4096), 30 * bs).unwrap();
        for (block, seed) in [(10, 5), (20, 6), (30, 7)] {
            assert_eq!(read_vec(&img, block * bs, 4096), pattern(seed, 4096));
        }
        drop(file);
        ThinImage::end_passthrough(&img).unwrap();
        assert!(!marker_exists(dir.path()) && !img.is_passthrough());
        assert_eq!(img.usage().allocated_blocks, 3);
        img.crash();
        let img = ThinImage::open(dir.path()).unwrap();
        assert_eq!(read_vec(&img, 30 * bs, 4096), pattern(7, 4096));
    }

    #[test]
    fn discard_in_passthrough_punches_and_unmaps() {
        let bs = 16u64 << 10;
        let size = 2 * MIB;
        let (dir, img) = new_image(size, bs as u32);
        img.write_at(&pattern(1, 4 * bs as usize), 0).unwrap(); // mapped 0..4
        let file = img.begin_passthrough().unwrap().unwrap();
        file.write_all_at(&pattern(2, 4 * bs as usize), 4 * bs)
            .unwrap(); // 4..8, unknown to the map
        let mut model = pattern(1, 4 * bs as usize);
        model.extend(pattern(2, 4 * bs as usize));
        model.resize(size as usize, 0);
        let disk_before = data_disk_bytes(dir.path());
        // Part of 1, all of 2..=5, part of 6; and a piece inside block 7.
        let (start, end) = (bs + 100, 6 * bs + 300);
        img.discard(start, end - start).unwrap();
        img.discard(7 * bs + 10, 20).unwrap();
        model[start as usize..end as usize].fill(0);
        model[7 * bs as usize + 10..][..20].fill(0);
        assert!(read_vec(&img, 0, size as usize) == model);
        let mut through = vec![0u8; size as usize];
        read_full(&file, &mut through, 0).unwrap();
        assert!(through == model);
        assert!(disk_before - data_disk_bytes(dir.path()) >= 4 * bs);
        // Whole blocks 2 and 3, once mapped, are unmapped.
        assert_eq!(img.map.get(2), Entry::UNMAPPED);
        assert_eq!(img.map.get(3), Entry::UNMAPPED);
        assert_eq!(img.map.get(1).phys(), Some(1));
        let usage = img.usage().allocated_blocks;
        assert!((4..=5).contains(&usage), "{usage}");
        img.flush().unwrap();
        // A discarded block written again through the file is adopted.
        file.write_all_at(&[9; 10], 3 * bs).unwrap();
        model[3 * bs as usize..][..10].fill(9);
        drop(file);
        img.end_passthrough().unwrap();
        assert!(read_vec(&img, 0, size as usize) == model);
        let mut mapped: Vec<u64> = Vec::new();
        img.map.for_each_mapped(|b, e| {
            assert_eq!(e.phys(), Some(b));
            mapped.push(b)
        });
        assert_eq!(mapped, vec![0, 1, 3, 6, 7]);
        drop(img);
        let img = ThinImage::open(dir.path()).unwrap();
        assert!(read_vec(&img, 0, size as usize) == model);
    }

    #[test]
    fn non_identity_image_refuses_passthrough() {
        let (dir, mut img) = new_image(MIB, 4096);
        img.set_identity_placement(false);
        img.write_at(&pattern(1, 100), 5 * 4096).unwrap(); // logical 5 on physical 0
        assert!(!img.is_identity());
        assert!(img.begin_passthrough().unwrap().is_none());
        assert!(BlockEngine::begin_passthrough(&img).is_none());
        assert!(!img.is_passthrough() && !marker_exists(dir.path()));
        BlockEngine::end_passthrough(&img);
        assert_eq!(read_vec(&img, 5 * 4096, 100), pattern(1, 100));
        // Once the odd block is gone (and flushed), it is identity again.
        img.discard(5 * 4096, 4096).unwrap();
        assert!(img.is_identity());
        let engine: &dyn BlockEngine = &img;
        let file = engine
            .begin_passthrough()
            .expect("identity after the discard");
        file.write_all_at(&[3; 10], 0).unwrap();
        engine.end_passthrough();
        assert!(!img.is_passthrough() && !marker_exists(dir.path()));
        assert_eq!(read_vec(&img, 0, 10), [3; 10]);
    }

    /// Multi-block IO (stripes wrap, up to all of them), discards, flushes
    /// and passthrough switching, concurrently, against per-thread models.
    #[test]
    fn concurrent_big_io_and_passthrough_switching_match_model() {
        const THREADS: u64 = 3;
        let bs = 4096u64;
        let region = 400 * bs + 777;
        let size = (THREADS * region).div_ceil(4096) * 4096;
        let (dir, img) = new_image(size, bs as u32);
        let img = Arc::new(img);
        let stop = Arc::new(AtomicBool::new(false));
        let switcher = {
            let (img, stop) = (img.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut files = 0;
                while !stop.load(Ordering::Relaxed) {
                    if img.begin_passthrough().unwrap().is_some() {
                        files += 1;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(2));
                    img.end_passthrough().unwrap();
                    std::thread::sleep(std::time::Duration::from_millis(2));
                }
                files
            })
        };
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let img = img.clone();
                std::thread::spawn(move || model_thread(&img, t, region, t + 101, 400, 300 * bs))
            })
            .collect();
        let models: Vec<Vec<u8>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        stop.store(true, Ordering::Relaxed);
        assert!(switcher.join().unwrap() > 0);
        let img = Arc::into_inner(img).unwrap();
        assert!(img.is_identity());
        drop(img);
        let img = ThinImage::open(dir.path()).unwrap();
        for (t, model) in models.iter().enumerate() {
            assert_eq!(
                &read_vec(&img, t as u64 * region, region as usize),
                model,
                "thread {t}"
            );
        }
    }
}

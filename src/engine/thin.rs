//! `ThinImage`: a thin-provisioned block device image in a directory (engine v1).
//!
//! This file creates and opens images, flushes them and states the
//! invariants below; the IO paths are beside it in `thin/`: `read.rs`,
//! `write.rs` (in place or copy-on-write, and allocation), `discard.rs`,
//! `passthrough.rs`, and `snap.rs` (snapshots, restore, clones).
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
//! - `copies`: the copy journal, copy-on-write mappings not yet in `map`
//!   (see `copies.rs` and invariant 10); empty after every flush.
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
//! 8. *Write-through*: every map change but a copy's (10.) is also copied
//!    at once to the map file (its page cache, not synced; see
//!    `BlockMap::write_through`); a copy's goes to the copy journal. So
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
//!     logical block's own index is free), then maps it in memory and
//!     appends it to the copy journal (page cache only), under the
//!     journal's lock. The map file gets the entry from the next flush,
//!     which holds that lock from before its data sync to the end: so no
//!     on-disk map points at a copy whose data is not durable, and every
//!     map a crash can leave reads the old block or the complete new one,
//!     never zeros around a partial write (which 3. would allow for a
//!     fresh block but not here). A process killed before the flush
//!     leaves the journal in the page cache: open maps its copies again
//!     when it was written in this boot, and drops them after a machine
//!     restart (the blocks then read as at the last flush). No copy costs
//!     a sync of its own.
//!     The blocks one write copies are journaled with one write;
//!     consecutive ones get consecutive new blocks when a run is free (one
//!     `pwritev` now, one `pwrite` for later IO).
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
//! # Growing
//!
//! [`ThinImage::grow`] enlarges a closed image: the map file is extended
//! (sparse, synced), then the header is replaced by rename. A crash between
//! leaves the old header and a longer map whose tail is empty, which open
//! accepts. The new logical blocks are unmapped, so they read zeros;
//! identity placement gives them their own physical index when free (a
//! copy-on-write copy placed at or above the old block count may hold it:
//! then the fallback, at or above the new count). Snapshot maps are not
//! touched: one taken before the grow is shorter than the head's, and its
//! missing entries read as unmapped; so is a clone's base snapshot past
//! its end. Nothing shrinks.
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

mod copies;
mod discard;
mod grow;
mod passthrough;
mod read;
mod snap;
mod write;

pub use snap::{SnapshotInfo, SnapshotView};

use super::alloc::{AllocGuard, PhysAlloc};
use super::extents::data_extents;
use super::header::{Header, FEATURE_CLONE, HEADER_BYTES};
use super::map::{BlockMap, Entry};
use super::{is_zero, BlockEngine, EngineError};
use copies::CopyJournal;
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
    data_syncs: AtomicU64,
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
    /// Copies mapped since the last flush (see `copies.rs`); also the lock
    /// that orders their mapping against a flush.
    copies: CopyJournal,
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
    /// Replaced by a newer open of the same image (an online grow): it
    /// writes nothing more, not even at drop.
    retired: AtomicBool,
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

/// Lock the header of the image in `dir` exclusively, without waiting
/// (`op` names the failure). The lock is on the file the path names when
/// it is taken: growing replaces the header by a rename, so a lock won on
/// the file it replaced is dropped and taken again.
fn lock_header(dir: &Path, op: &'static str) -> Result<Flock<File>, EngineError> {
    let path = dir.join(HEADER_FILE);
    loop {
        let hdr = File::open(&path).map_err(io_error("open", &path))?;
        let lock = Flock::lock(hdr, FlockArg::LockExclusiveNonblock)
            .map_err(|(_, errno)| io_error(op, &path)(errno.into()))?;
        let held = lock.metadata().map_err(io_error("stat", &path))?;
        let named = std::fs::metadata(&path).map_err(io_error("stat", &path))?;
        if (held.dev(), held.ino()) == (named.dev(), named.ino()) {
            return Ok(lock);
        }
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
        let lock = lock_header(dir, "lock (is the image open elsewhere?)")?;
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
        // Invariant 10: copies a killed process mapped but never flushed.
        let copies = CopyJournal::open(dir)?;
        let recovered = copies.recover(&map, nblocks, limit)?;
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
            copies,
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
            retired: AtomicBool::new(false),
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
        image.persist_recovered(&recovered)?;
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

    /// Make the copies [`CopyJournal::recover`] mapped again durable, as a
    /// flush would (data, then their entries), then empty the journal.
    fn persist_recovered(&self, r: &copies::Recovered) -> Result<(), EngineError> {
        if !r.nonempty {
            return Ok(());
        }
        if !r.adopted.is_empty() {
            self.data
                .sync_data()
                .map_err(io_error("fdatasync", &self.data_path))?;
            for &block in &r.adopted {
                self.map
                    .write_through(&self.map_file, block, block + 1)
                    .map_err(io_error("write", &self.map_path))?;
            }
            self.map_file
                .sync_data()
                .map_err(io_error("fdatasync", &self.map_path))?;
            tracing::info!(data = %self.data_path.display(), blocks = r.adopted.len(),
                "mapped again the copies of writes a stopped process had not flushed");
        }
        if r.dropped > 0 {
            tracing::info!(data = %self.data_path.display(), records = r.dropped,
                "dropped journaled copies of writes never flushed (made before a machine restart, or no longer matching the map): those blocks read as at the last flush");
        }
        let mut journal = self.copies.lock();
        journal
            .reset()
            .map_err(io_error("truncate", journal.path()))
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

    fn check_range(&self, offset: u64, len: u64) -> Result<(), EngineError> {
        super::check_range(offset, len, self.size)
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
        // Held to the end: no copy is mapped between the data sync and the
        // map write (invariant 10), and each one mapped before is synced.
        let mut journal = self.copies.lock();
        let punched = self.punched.swap(false, Ordering::AcqRel);
        let dirty = self.data_dirty.swap(false, Ordering::AcqRel);
        // In passthrough the kernel writes the data file behind our back.
        let dirty = dirty || self.passthrough.load(Ordering::Acquire);
        #[cfg(test)]
        if punched || dirty {
            self.counters.data_syncs.fetch_add(1, Ordering::Relaxed);
        }
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
        if let Err(e) = journal.reset() {
            // Its records stay, and the next flush empties it.
            self.alloc.restore_pending(freed);
            return Err(io_error("truncate", journal.path())(e));
        }
        drop(journal);
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
        if self.flush_on_drop && !self.retired.load(Ordering::Acquire) {
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

#[cfg(test)]
mod tests;

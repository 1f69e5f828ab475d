//! `ThinImage`: a thin-provisioned block device image in a directory (engine v1).
//!
//! # On-disk layout
//!
//! An image is a directory with three files:
//!
//! - `header`: the superblock (4 KiB: magic, format version, size, block size,
//!   incompatible feature bits, CRC-32C; see `header.rs`). Written once, last,
//!   at create; an image directory without a valid header is an unfinished
//!   create (or not an image) and [`ThinImage::open`] refuses it. The open
//!   image holds an exclusive `flock` on it, so two processes never serve
//!   the same image.
//! - `map`: one little-endian u64 per logical block, in 4 KiB pages (see
//!   `map.rs`): 0 = unmapped, else physical block index + 1 in bits 0..48;
//!   bits 48..64 are flags, zero in version 1. Fixed length, sparse.
//! - `data`: physical blocks of `block_size` bytes, back to back. It grows
//!   as blocks are first allocated; space of discarded blocks is returned
//!   with `fallocate(PUNCH_HOLE)`. Reads past its end read zeros.
//!
//! A logical block gets a physical block on its first write of non-zero
//! bytes (an all-zero write into an unmapped block is dropped: it already
//! reads as zeros). In memory, the map is an array of atomic entries (pages
//! allocated on first use); a map page is written back to the map file by
//! the flush after it changed. Free physical blocks are not stored: on open
//! they are rebuilt from the map (`alloc.rs`).
//!
//! # Invariants and crash consistency
//!
//! 1. *A block that is free, or handed out but not yet written, reads zeros
//!    on disk*: fresh blocks lie past every referenced block (open truncates
//!    the data file there) and freed blocks are hole-punched before they are
//!    queued for reuse; open also punches any free block that holds data
//!    (writes to a block whose mapping was lost in a crash), then syncs.
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
//! 5. On open the allocator marks every referenced block used (a block
//!    referenced twice, or an entry with unknown flags, is corruption), so it
//!    never hands out a block the map references.
//!
//! After a crash an image holds every write completed before the last
//! successful `flush`; later writes are each present or absent (a write in
//! progress may be torn), later discards may be undone. A failed sync
//! poisons the image: every later `flush` fails, since the kernel may have
//! dropped the dirty pages that failed to write.
//!
//! # Concurrency
//!
//! IO is positional (`pread`/`pwrite`) and takes no global lock. Each IO
//! on a logical block holds, for its duration, the read side of one of 256
//! striped `RwLock`s (cache-line padded; stripe = block mod 256); only a
//! discard unmapping a whole block takes the write side, so a block's
//! physical space is never freed under an IO in flight. The first write to
//! an unmapped block allocates a physical block and publishes it with a
//! compare-and-swap on the map entry; a loser of the race gives its block
//! back unwritten and writes into the winner's. A fresh block is never
//! written with padding, so concurrent partial writes to it both land.

use super::alloc::PhysAlloc;
use super::header::{Header, HEADER_BYTES};
use super::map::{BlockMap, Entry};
use super::{BlockEngine, EngineError};
use nix::errno::Errno;
use nix::fcntl::{fallocate, FallocateFlags, Flock, FlockArg};
use nix::unistd::{lseek, Whence};
use parking_lot::{Mutex, RwLock};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

const HEADER_FILE: &str = "header";
const MAP_FILE: &str = "map";
const DATA_FILE: &str = "data";

const MIN_BLOCK_SIZE: u32 = 4 << 10;
const MAX_BLOCK_SIZE: u32 = 1 << 20;
const SIZE_ALIGN: u64 = 4096;
/// Largest device size accepted by [`ThinImage::create`].
const MAX_SIZE: u64 = 64 << 40;
const STRIPES: usize = 256;

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
}

/// One stripe of the block locks, alone on its cache line.
#[repr(align(64))]
#[derive(Default)]
struct Stripe(RwLock<()>);

/// A thin image open for IO. See the module doc.
pub struct ThinImage {
    size: u64,
    block_size: u32,
    shift: u32,
    nblocks: u64,
    data: File,
    data_path: PathBuf,
    map_file: File,
    map_path: PathBuf,
    map: BlockMap,
    alloc: PhysAlloc,
    stripes: Box<[Stripe]>,
    allocated: AtomicU64,
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
        // The header goes last: its presence means the image is complete.
        let (hdr, hdr_path) = new_file(HEADER_FILE)?;
        hdr.write_all_at(&header.encode(), 0)
            .map_err(io_error("write", &hdr_path))?;
        hdr.sync_all().map_err(io_error("fsync", &hdr_path))?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_error("fsync", dir))?;
        drop((data, map, hdr));
        Self::open(dir)
    }

    /// Open the image in `dir`, after a clean stop or a crash. Rebuilds the
    /// free-block set from the map and returns to the filesystem the space
    /// of blocks written but never durably mapped.
    pub fn open(dir: &Path) -> Result<ThinImage, EngineError> {
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
        let map = BlockMap::load(&map_file, &map_path, nblocks)?;

        // Rebuild the used-block bitmap; check every entry.
        let mut used: Vec<u64> = Vec::new();
        let mut next = 0u64;
        let mut allocated = 0u64;
        let mut bad: Option<String> = None;
        map.for_each_mapped(|block, entry| {
            if bad.is_some() {
                return;
            }
            let phys = match entry.phys() {
                Some(p) if entry.flags() == 0 && p < Self::phys_limit(nblocks) => p,
                _ => {
                    bad = Some(format!(
                        "map entry {:#x} of block {block} is invalid",
                        entry.raw()
                    ));
                    return;
                }
            };
            let w = (phys / 64) as usize;
            if w >= used.len() {
                used.resize(w + 1, 0);
            }
            if used[w] & (1 << (phys % 64)) != 0 {
                bad = Some(format!(
                    "physical block {phys} is mapped twice (again by block {block})"
                ));
                return;
            }
            used[w] |= 1 << (phys % 64);
            next = next.max(phys + 1);
            allocated += 1;
        });
        if let Some(reason) = bad {
            return Err(corrupt(&map_path, reason));
        }

        let image = ThinImage {
            size: header.size,
            block_size: header.block_size,
            shift: header.block_size.trailing_zeros(),
            nblocks,
            data,
            data_path,
            map_file,
            map_path,
            map,
            alloc: PhysAlloc::new(used, next, Self::phys_limit(nblocks)),
            stripes: (0..STRIPES).map(|_| Stripe::default()).collect(),
            allocated: AtomicU64::new(allocated),
            data_dirty: AtomicBool::new(false),
            punched: AtomicBool::new(false),
            can_punch: AtomicBool::new(true),
            poisoned: AtomicBool::new(false),
            flush_lock: Mutex::new(()),
            flush_on_drop: true,
            _lock: lock,
        };
        image.scrub_free_blocks(next)?;
        Ok(image)
    }

    /// Physical blocks an image may use: every logical block, plus as many
    /// again for blocks freed but not yet reusable (deferred frees).
    fn phys_limit(nblocks: u64) -> u64 {
        (nblocks * 2).min(Entry::MAX_PHYS + 1)
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
        let mut pos = 0u64;
        while pos < limit {
            let start = match lseek(&self.data, pos as i64, Whence::SeekData) {
                Ok(off) => off as u64,
                Err(Errno::ENXIO) => break,
                Err(errno) => return Err(io_error("seek", &self.data_path)(errno.into())),
            };
            if start >= limit {
                break;
            }
            let end = match lseek(&self.data, start as i64, Whence::SeekHole) {
                Ok(off) => (off as u64).min(limit),
                Err(errno) => return Err(io_error("seek", &self.data_path)(errno.into())),
            };
            // Free blocks overlapping [start, end) hold data: punch them.
            for (first, count) in self.alloc.free_runs(start / bs, end.div_ceil(bs)) {
                self.zero_phys(first * bs, count * bs)?;
                punched_blocks += count;
            }
            pos = end;
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

    /// Space accounting.
    pub fn usage(&self) -> ThinUsage {
        let allocated_blocks = self.allocated.load(Ordering::Relaxed);
        ThinUsage {
            size: self.size,
            block_size: self.block_size,
            allocated_blocks,
            allocated_bytes: allocated_blocks * u64::from(self.block_size),
        }
    }

    /// The allocation unit in bytes.
    pub fn block_size(&self) -> u32 {
        self.block_size
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

    #[inline]
    fn stripe(&self, block: u64) -> &RwLock<()> {
        &self.stripes[block as usize % STRIPES].0
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
        mut f: impl FnMut(u64, usize, std::ops::Range<usize>) -> Result<(), EngineError>,
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

    fn read_block(&self, block: u64, in_block: usize, buf: &mut [u8]) -> Result<(), EngineError> {
        let _io = self.stripe(block).read();
        match self.map.get(block).phys() {
            None => buf.fill(0),
            Some(phys) => {
                let off = self.phys_offset(phys, in_block);
                let n =
                    read_full(&self.data, buf, off).map_err(io_error("read", &self.data_path))?;
                // Past the end of the data file: a block allocated but not yet
                // written to there.
                buf[n..].fill(0);
            }
        }
        Ok(())
    }

    /// Write one block piece; returns whether any data was written.
    fn write_block(&self, block: u64, in_block: usize, buf: &[u8]) -> Result<bool, EngineError> {
        let _io = self.stripe(block).read();
        let phys = loop {
            if let Some(phys) = self.map.get(block).phys() {
                break phys;
            }
            if is_zero(buf) {
                return Ok(false);
            }
            let phys = self.alloc.alloc().ok_or(EngineError::NoSpace)?;
            match self.map.try_map(block, Entry::mapped(phys)) {
                Ok(()) => {
                    self.allocated.fetch_add(1, Ordering::Relaxed);
                    break phys;
                }
                // Another writer mapped it first: use its block.
                Err(_) => self.alloc.give_back(phys),
            }
        };
        let off = self.phys_offset(phys, in_block);
        self.data
            .write_all_at(buf, off)
            .map_err(io_error("write", &self.data_path))?;
        Ok(true)
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
    fn zero_in_block(&self, block: u64, in_block: usize, len: usize) -> Result<(), EngineError> {
        let _io = self.stripe(block).read();
        if let Some(phys) = self.map.get(block).phys() {
            self.zero_phys(self.phys_offset(phys, in_block), len as u64)?;
        }
        Ok(())
    }

    /// Unmap the whole blocks `[first, end)`, punch their space and defer
    /// their reuse to the next flush.
    fn unmap_blocks(&self, first: u64, end: u64) -> Result<(), EngineError> {
        let bs = u64::from(self.block_size);
        // A run of physically contiguous freed blocks: (first, count).
        let mut run: Option<(u64, u64)> = None;
        let finish = |run: (u64, u64)| -> Result<(), EngineError> {
            self.zero_phys(run.0 * bs, run.1 * bs)?;
            self.alloc.defer_free(run.0..run.0 + run.1);
            Ok(())
        };
        let page = super::map::ENTRIES_PER_PAGE as u64;
        let mut block = first;
        while block < end {
            let page_end = ((block / page + 1) * page).min(end);
            if !self.map.page_present(block) {
                block = page_end;
                continue;
            }
            for b in block..page_end {
                if self.map.get(b) == Entry::UNMAPPED {
                    continue;
                }
                let old = {
                    let _excl = self.stripe(b).write();
                    self.map.unmap(b)
                };
                let Some(phys) = old.phys() else { continue };
                self.allocated.fetch_sub(1, Ordering::Relaxed);
                run = match run {
                    Some((s, n)) if s + n == phys => Some((s, n + 1)),
                    Some(done) => {
                        finish(done)?;
                        Some((phys, 1))
                    }
                    None => Some((phys, 1)),
                };
            }
            block = page_end;
        }
        if let Some(done) = run {
            finish(done)?;
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
        let punched = self.punched.swap(false, Ordering::AcqRel);
        let dirty = self.data_dirty.swap(false, Ordering::AcqRel);
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
    /// keeps every write; map changes not yet flushed are lost).
    #[cfg(test)]
    fn crash(mut self) {
        self.flush_on_drop = false;
    }
}

impl Drop for ThinImage {
    fn drop(&mut self) {
        if self.flush_on_drop {
            if let Err(e) = self.flush_inner() {
                tracing::warn!(data = %self.data_path.display(), error = %e, "flush on close failed");
            }
        }
    }
}

impl BlockEngine for ThinImage {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), EngineError> {
        self.check_range(offset, buf.len() as u64)?;
        self.split(offset, buf.len(), |block, in_block, range| {
            self.read_block(block, in_block, &mut buf[range])
        })
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), EngineError> {
        self.check_range(offset, buf.len() as u64)?;
        let mut wrote = false;
        let result = self.split(offset, buf.len(), |block, in_block, range| {
            wrote |= self.write_block(block, in_block, &buf[range])?;
            Ok(())
        });
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
        // Whole blocks; a range reaching the end of the device covers the
        // (possibly partial) last block.
        let full_end = if end == self.size {
            self.nblocks
        } else {
            end / bs
        };
        self.unmap_blocks(start / bs, full_end)?;
        if end != self.size && end % bs != 0 {
            self.zero_in_block(end / bs, 0, (end % bs) as usize)?;
        }
        Ok(())
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

    const KIB: u64 = 1 << 10;
    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    fn new_image(size: u64, block_size: u32) -> (tempfile::TempDir, ThinImage) {
        let dir = tempfile::tempdir().unwrap();
        let img = ThinImage::create(dir.path(), ThinParams { size, block_size }).unwrap();
        (dir, img)
    }

    fn read_vec(img: &ThinImage, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0xAA; len];
        img.read_at(&mut buf, offset).unwrap();
        buf
    }

    fn data_len(dir: &Path) -> u64 {
        std::fs::metadata(dir.join(DATA_FILE)).unwrap().len()
    }

    fn data_disk_bytes(dir: &Path) -> u64 {
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
        let (dir, img) = new_image(4 * MIB, bs as u32);
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
                std::thread::spawn(move || {
                    let base = t * region;
                    let mut model = vec![0u8; region as usize];
                    let mut rng = Rng(t + 11);
                    for op in 0..1500u64 {
                        let off = rng.below(region);
                        let len = rng.below((3 * bs).min(region - off) + 1) as usize;
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
                })
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
        // Not flushed: a discard, an overwrite, new allocations.
        img.discard(3 * bs, bs).unwrap();
        img.write_at(&pattern(1000, 4096), 4 * bs).unwrap();
        for block in 10..20 {
            img.write_at(&pattern(block, 4096), block * bs).unwrap();
        }
        img.crash();

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
    fn crash_then_reuse_reads_zeros() {
        let bs = 4096u64;
        let (dir, img) = new_image(MIB, bs as u32);
        for block in 0..10 {
            img.write_at(&pattern(block, 4096), block * bs).unwrap();
        }
        img.discard(3 * bs, bs).unwrap();
        img.flush().unwrap();
        // Reuses physical block 3; the mapping is lost in the crash but the
        // data reaches the file (kill -9 keeps the page cache).
        img.write_at(&pattern(77, 4096), 50 * bs).unwrap();
        img.crash();

        let img = ThinImage::open(dir.path()).unwrap();
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
}

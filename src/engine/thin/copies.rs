//! The copy journal (`copies`): copy-on-write mappings made since the last
//! flush, which the map file does not hold yet (invariant 10).
//!
//! A copy's new block must be durable before any on-disk map points at it,
//! or a machine crash could leave the map pointing at a block that lost
//! the old bytes around the write. Rather than sync the data file on every
//! copy, the map file gets the new entry only from the next flush, after
//! its data sync. Until then the entry lives in memory and here, written to
//! the page cache only: a daemon killed before its flush (the kernel still
//! holding the device, told those writes were done) finds the copies here
//! at the next open. The journal's header names the boot it was written
//! in. After a restart of the machine the page cache is gone, the copies'
//! data may be too, and the records are dropped: each such block reads
//! what it held at the last flush, as an unflushed write may.
//!
//! Layout: a 64-byte header (magic, the boot id, CRC-32C) then 32-byte
//! records (logical block, the entry replaced, the new entry, CRC-32C). A
//! flush truncates the file and syncs that (a stale record must never meet
//! a map that holds its old entry again, say after a restore); a restore
//! of the closed image empties it first.

use super::super::header::crc32c;
use super::super::map::{BlockMap, Entry};
use super::{io_error, EngineError};
use parking_lot::{Mutex, MutexGuard};
use std::collections::HashSet;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

pub(super) const COPIES_FILE: &str = "copies";
const MAGIC: &[u8; 8] = b"DNCOPY01";
const HEADER: usize = 64;
const BOOT_ID: usize = 36;
const RECORD: usize = 32;
/// A journal this long is flushed by the copy that made it so: it bounds
/// what an open reads back (half a million copies, 16 GiB of 32 KiB blocks).
#[cfg(not(test))]
const FLUSH_AT: u64 = 16 << 20;
#[cfg(test)]
const FLUSH_AT: u64 = (HEADER + 64 * RECORD) as u64;

/// This boot's id (`/proc/sys/kernel/random/boot_id`), the same for every
/// process until the machine restarts.
fn boot_id() -> io::Result<[u8; BOOT_ID]> {
    static ID: OnceLock<[u8; BOOT_ID]> = OnceLock::new();
    if let Some(id) = ID.get() {
        return Ok(*id);
    }
    let text = std::fs::read("/proc/sys/kernel/random/boot_id")?;
    let id: [u8; BOOT_ID] = text
        .get(..BOOT_ID)
        .and_then(|s| s.try_into().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "boot_id is too short"))?;
    Ok(*ID.get_or_init(|| id))
}

fn header(boot: &[u8; BOOT_ID]) -> [u8; HEADER] {
    let mut h = [0u8; HEADER];
    h[..8].copy_from_slice(MAGIC);
    h[8..8 + BOOT_ID].copy_from_slice(boot);
    let crc = crc32c(&h[..HEADER - 4]);
    h[HEADER - 4..].copy_from_slice(&crc.to_le_bytes());
    h
}

fn record(block: u64, old: Entry, new: Entry) -> [u8; RECORD] {
    let mut r = [0u8; RECORD];
    r[..8].copy_from_slice(&block.to_le_bytes());
    r[8..16].copy_from_slice(&old.raw().to_le_bytes());
    r[16..24].copy_from_slice(&new.raw().to_le_bytes());
    let crc = crc32c(&r[..24]);
    r[24..28].copy_from_slice(&crc.to_le_bytes());
    r
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// A record as read back: (logical block, old entry, new entry).
fn parse(r: &[u8]) -> Option<(u64, Entry, Entry)> {
    let crc = u32::from_le_bytes(r[24..28].try_into().expect("4 bytes"));
    (crc == crc32c(&r[..24])).then(|| {
        (
            u64_at(r, 0),
            Entry::from_raw(u64_at(r, 8)),
            Entry::from_raw(u64_at(r, 16)),
        )
    })
}

/// What [`CopyJournal::recover`] did.
#[derive(Debug, Default)]
pub(super) struct Recovered {
    /// Logical blocks whose copy was mapped again (in memory only).
    pub adopted: Vec<u64>,
    /// Records dropped: from an earlier boot, or not matching the map.
    pub dropped: usize,
    /// The file held anything (it must be emptied, durably).
    pub nonempty: bool,
}

pub(super) struct CopyJournal {
    file: File,
    path: PathBuf,
    state: Mutex<State>,
}

struct State {
    /// Bytes in the file (0: empty, the next append writes the header).
    len: u64,
    /// Reused for each append.
    buf: Vec<u8>,
}

/// The journal, locked: copies are published and flushes persist them
/// under it, so that no copy is mapped between a flush's data sync and
/// its map write.
pub(super) struct Locked<'a> {
    journal: &'a CopyJournal,
    state: MutexGuard<'a, State>,
}

impl CopyJournal {
    /// Open (or create) the journal of the image in `dir`.
    pub fn open(dir: &Path) -> Result<CopyJournal, EngineError> {
        let path = dir.join(COPIES_FILE);
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io_error("open", &path))?;
        let len = file.metadata().map_err(io_error("stat", &path))?.len();
        Ok(CopyJournal {
            file,
            path,
            state: Mutex::new(State {
                len,
                buf: Vec::new(),
            }),
        })
    }

    pub fn lock(&self) -> Locked<'_> {
        Locked {
            journal: self,
            state: self.state.lock(),
        }
    }

    /// Map again, in `map` (the head as loaded from disk), the copies this
    /// boot made that no flush persisted: those whose block the map still
    /// gives its old entry and whose new block no other entry holds. The
    /// caller syncs the data, writes the adopted entries and then empties
    /// the journal ([`Locked::reset`]).
    pub fn recover(
        &self,
        map: &BlockMap,
        nblocks: u64,
        limit: u64,
    ) -> Result<Recovered, EngineError> {
        let len = self.state.lock().len;
        let mut out = Recovered {
            nonempty: len > 0,
            ..Recovered::default()
        };
        if len == 0 {
            return Ok(out);
        }
        // A journal never grows much past FLUSH_AT (one write's records):
        // a longer file is damaged, and its tail is not read.
        let mut bytes = vec![0u8; len.min(2 * FLUSH_AT) as usize];
        self.file
            .read_exact_at(&mut bytes, 0)
            .map_err(io_error("read", &self.path))?;
        let boot = boot_id().map_err(io_error("read the boot id for", &self.path))?;
        let valid_header = bytes.len() >= HEADER && bytes[..HEADER] == header(&boot);
        // Records up to the first torn one (a crash mid-append).
        let records: Vec<(u64, Entry, Entry)> = if valid_header {
            bytes[HEADER..]
                .chunks_exact(RECORD)
                .map_while(parse)
                .collect()
        } else {
            Vec::new()
        };
        if !valid_header {
            tracing::info!(journal = %self.path.display(),
                "copy journal of an earlier boot (or unreadable): its copies were never flushed and are dropped; those blocks read as at the last flush");
            out.dropped = (bytes.len().saturating_sub(HEADER)) / RECORD;
            return Ok(out);
        }
        let well_formed = |block: u64, old: Entry, new: Entry| {
            block < nblocks
                && old.is_valid(true)
                && new.flags() == 0
                && new.phys().is_some_and(|p| p < limit)
        };
        // New blocks the loaded head maps already cannot be adopted (a
        // flushed map never references an unflushed copy: belt and braces).
        let wanted: HashSet<u64> = records
            .iter()
            .filter_map(|&(_, _, new)| new.phys())
            .collect();
        let mut held: HashSet<u64> = HashSet::new();
        map.for_each_mapped(|_, e| {
            if let Some(p) = e.phys().filter(|p| wanted.contains(p)) {
                held.insert(p);
            }
        });
        for (block, old, new) in records {
            let phys = new.phys();
            if !well_formed(block, old, new)
                || map.get(block) != old
                || phys.is_some_and(|p| !held.insert(p))
            {
                out.dropped += 1;
                continue;
            }
            map.swap(block, new);
            out.adopted.push(block);
        }
        Ok(out)
    }

    /// Empty the journal of the closed image in `dir` durably, dropping its
    /// copies (a restore replaces the map they were made on).
    pub fn discard(dir: &Path) -> Result<(), EngineError> {
        let path = dir.join(COPIES_FILE);
        match File::options().write(true).open(&path) {
            Ok(file) => {
                file.set_len(0).map_err(io_error("truncate", &path))?;
                file.sync_all().map_err(io_error("fsync", &path))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_error("open", &path)(e)),
        }
    }

    #[cfg(test)]
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Locked<'_> {
    /// Append records of copies (logical block, entry replaced, new
    /// entry), to the page cache (one write).
    pub fn append(&mut self, copies: impl Iterator<Item = (u64, Entry, Entry)>) -> io::Result<()> {
        let State { len, buf } = &mut *self.state;
        buf.clear();
        if *len == 0 {
            buf.extend_from_slice(&header(&boot_id()?));
        }
        for (block, old, new) in copies {
            buf.extend_from_slice(&record(block, old, new));
        }
        self.journal.file.write_all_at(buf, *len)?;
        *len += buf.len() as u64;
        Ok(())
    }

    /// Whether the journal is long enough that a flush should empty it.
    pub fn wants_flush(&self) -> bool {
        self.state.len >= FLUSH_AT
    }

    /// The map file holds every journaled copy, durably: empty the journal,
    /// durably too.
    pub fn reset(&mut self) -> io::Result<()> {
        if self.state.len == 0 {
            return Ok(());
        }
        self.journal.file.set_len(0)?;
        self.journal.file.sync_data()?;
        self.state.len = 0;
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.journal.path
    }
}

#[cfg(test)]
pub(super) mod testing {
    use super::*;

    /// Make the journal in `dir` look written in another boot, as after a
    /// machine crash.
    pub fn from_another_boot(dir: &Path) {
        let path = dir.join(COPIES_FILE);
        let file = File::options().write(true).open(path).unwrap();
        file.write_all_at(&header(&[b'x'; BOOT_ID]), 0).unwrap();
    }

    /// The number of records in the journal in `dir`.
    pub fn records(dir: &Path) -> usize {
        let len = std::fs::metadata(dir.join(COPIES_FILE)).unwrap().len() as usize;
        len.saturating_sub(HEADER) / RECORD
    }
}

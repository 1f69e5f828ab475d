//! Stage 4: the block engine. Bytes in, bytes out, ordering and flush.
//!
//! The engine knows nothing of Docker, FUSE or ublk: exports call it directly
//! from their IO threads (no actor hop per IO). Later layers (snapshots,
//! encryption, replication) wrap or extend an engine through [`BlockEngine`].
//!
//! Encryption ([`CryptEngine`]) sits below the exports and above the thin
//! image, so the image (and every snapshot or clone sharing its blocks) holds
//! only ciphertext, and passthrough is off for encrypted volumes: the kernel
//! would bypass the cipher.

mod alloc;
pub mod crypt;
mod error;
mod extents;
mod header;
pub mod limit;
mod map;
pub mod pattern;
pub mod priority;
pub mod stream;
mod thin;

pub use crypt::{CryptEngine, CryptParams, Secret, UnitCipher};
pub use error::EngineError;
pub use thin::{SnapshotInfo, SnapshotView, ThinImage, ThinParams, ThinUsage};

/// The interface every export uses. All methods take `&self`: an engine is
/// shared by many IO threads and does its own fine-grained locking.
///
/// Offsets and lengths are in bytes and need not be aligned; IO past the end
/// of the device is an error ([`EngineError::OutOfRange`]).
pub trait BlockEngine: Send + Sync {
    /// Size of the device in bytes.
    fn size(&self) -> u64;
    /// Fill `buf` from `offset`. Never-written ranges read as zeros.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), EngineError>;
    /// Write `buf` at `offset`. Not durable until [`BlockEngine::flush`] returns.
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), EngineError>;
    /// [`BlockEngine::write_at`], with the outcome given to `done` rather
    /// than returned: maybe later and on another thread, so that the
    /// caller need not wait (a replicated write waits for the network).
    /// `buf` is not used once this returns. By default, synchronous.
    fn write_then(&self, buf: &[u8], offset: u64, done: WriteDone) {
        done(self.write_at(buf, offset))
    }
    /// Make every write that completed before this call durable: after it
    /// returns, the data survives kill -9 of the process and a power cut.
    fn flush(&self) -> Result<(), EngineError>;
    /// Forget `len` bytes at `offset` (TRIM / punch hole): they read as zeros
    /// afterwards, and whole blocks return their space.
    fn discard(&self, offset: u64, len: u64) -> Result<(), EngineError>;
    /// Let the kernel do reads and writes on a file directly (FUSE
    /// passthrough): returns that file when the engine's layout allows it
    /// (identity-mapped, local, unshared), `None` otherwise.
    fn begin_passthrough(&self) -> Option<std::fs::File> {
        None
    }
    /// Passthrough is over: take back what the kernel wrote. Idempotent.
    fn end_passthrough(&self) {}
    /// How many requests the export should have in flight at once: an
    /// engine whose IO waits on the network (a round trip to a replica)
    /// needs more than one that waits on local memory and disks.
    fn io_parallelism(&self) -> usize {
        DEFAULT_IO_PARALLELISM
    }
}

/// Where [`BlockEngine::write_then`] sends a write's outcome. It must not
/// block: it may run on a replica link's reader.
pub type WriteDone = Box<dyn FnOnce(Result<(), EngineError>) + Send>;

/// [`BlockEngine::io_parallelism`] of an engine on local files.
pub const DEFAULT_IO_PARALLELISM: usize = 4;

/// `Ok` when `offset..offset + len` lies inside a device of `size` bytes.
pub(crate) fn check_range(offset: u64, len: u64, size: u64) -> Result<(), EngineError> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(EngineError::OutOfRange { offset, len, size }),
    }
}

/// Whether `buf` is all zeros (vectorizable; stops at the first non-zero chunk).
pub(crate) fn is_zero(buf: &[u8]) -> bool {
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

    #[test]
    fn check_range_refuses_what_ends_past_the_device_or_overflows() {
        assert!(check_range(0, 4096, 4096).is_ok());
        assert!(check_range(4096, 0, 4096).is_ok());
        assert!(matches!(
            check_range(1, 4096, 4096),
            Err(EngineError::OutOfRange {
                offset: 1,
                len: 4096,
                size: 4096
            })
        ));
        assert!(check_range(u64::MAX, 2, u64::MAX).is_err());
    }
}

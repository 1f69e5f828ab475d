//! glibc allocator settings of the daemon.
//!
//! glibc raises its mmap threshold (from 128 KiB up to 32 MiB) each time a
//! block it had mmap'ed is freed. fuser gives every FUSE session thread a
//! 16 MiB + 4 KiB request buffer (`vec![0; …]`): the first export's buffers
//! are mmap'ed, and freeing them at its detach raises the threshold above
//! their size, so every later export's buffers come from the threads' malloc
//! arenas, where calloc zeroes them: 16 MiB resident per FUSE thread, about
//! 64 MiB per attach from the second one on (measured with `dunnage attach`,
//! `detach`, `attach` of one volume: 8.7 → 74 MiB RSS). An mmap'ed buffer
//! costs only the pages the kernel writes requests into.

/// The mmap threshold the daemon keeps (glibc's default).
const MMAP_THRESHOLD: libc::c_int = 128 << 10;

/// Pin glibc's mmap threshold at its default, which turns its raising off.
/// Call before the daemon starts threads. A no-op on other C libraries.
pub fn pin_mmap_threshold() {
    #[cfg(target_env = "gnu")]
    {
        // SAFETY: mallopt only changes a parameter of the allocator, takes
        // no pointers, and is called before the daemon starts its threads.
        if unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) } != 1 {
            tracing::warn!("mallopt(M_MMAP_THRESHOLD) failed: memory may grow per attach");
        }
    }
}

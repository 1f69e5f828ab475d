//! Taking ownership of descriptors the kernel hands us as bare numbers.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// Own a descriptor the kernel has just installed for this process (from
/// `accept(2)` or an `SCM_RIGHTS` message) and that nothing else owns.
pub fn adopt(raw: RawFd) -> OwnedFd {
    // SAFETY: the caller passes a descriptor freshly created for us by the
    // kernel (accept, recvmsg SCM_RIGHTS); no other owner exists, so the
    // OwnedFd is its only owner and closes it exactly once.
    unsafe { OwnedFd::from_raw_fd(raw) }
}

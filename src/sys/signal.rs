//! Signal dispositions of the CLI.

/// Let SIGPIPE end the process, as it does any Unix filter: `dunnage volume
/// ls | head` then stops quietly when `head` exits, instead of panicking on
/// a failed `println!` (Rust starts programs with SIGPIPE ignored). Only for
/// the CLI: the daemon keeps it ignored and sees EPIPE as an error.
pub fn default_sigpipe() {
    // SAFETY: SIG_DFL is a valid disposition and no handler code runs; it
    // is set at start, before the CLI writes anything.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

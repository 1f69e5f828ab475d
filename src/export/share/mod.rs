//! Shared volumes (`shared=true`, Portworx's sharedv4): several nodes mount
//! one volume at once. The node holding the attach mounts the filesystem as
//! for any volume; every other node that mounts it gets a FUSE filesystem
//! whose operations travel to the holder over the replica port (an
//! authenticated session) and run there on the mounted filesystem. The
//! holder keeps the volume attached while any node's session is open.
//!
//! Consistency is NFS's close-to-open: a client re-reads a file's data
//! when it opens it, and attributes older than a second. Locks
//! (`flock`, `fcntl`) hold on one node only.

pub mod client;
pub mod proto;
pub mod server;
pub mod session;

use std::path::PathBuf;

/// Errors of the block engine. Exports map them to an errno with [`EngineError::errno`].
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("IO beyond the end of the device: offset {offset} + length {len} > size {size}")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("image {path} is damaged or not a dunnage image: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("invalid image parameters: {0}")]
    InvalidParams(String),
    #[error("no space left in the image's address space")]
    NoSpace,
    #[error(
        "IO at offset {offset}, length {len} is not aligned to {align} bytes: \
         an encrypted volume is read and written in whole {align}-byte units"
    )]
    Misaligned { offset: u64, len: u64, align: u64 },
    #[error(
        "the key does not match this encrypted volume ({path}): give the secret \
         it was created with; nothing was read or written"
    )]
    WrongKey { path: PathBuf },
    #[error("encryption parameters {path}: {reason}")]
    BadCryptParams { path: PathBuf, reason: String },
    #[error(
        "snapshot name {name:?} is invalid: use 1 to 128 characters from \
         A-Z a-z 0-9 _ . - starting with a letter or a digit"
    )]
    BadSnapshotName { name: String },
    #[error("snapshot {name:?} of {dir} already exists: choose another name, or delete it first")]
    SnapshotExists { dir: PathBuf, name: String },
    #[error("image {dir} has no snapshot {name:?}: list its snapshots for the names it has")]
    NoSuchSnapshot { dir: PathBuf, name: String },
    #[error(
        "snapshot {name:?} of {dir} is the base of the clone {clone}, which \
         shares its blocks: remove that clone first (in a cluster, each node \
         deletes a removed clone's replica at its next sweep)"
    )]
    SnapshotPinned {
        dir: PathBuf,
        name: String,
        clone: PathBuf,
    },
    #[error("snapshot {name:?} of {dir} is being read: drop its view first")]
    SnapshotBusy { dir: PathBuf, name: String },
    #[error(
        "image {dir} is in passthrough: the kernel writes its data file in \
         place, which would change a snapshot; end passthrough first"
    )]
    InPassthrough { dir: PathBuf },
    #[error(
        "image {dir} has snapshots (or is a clone): passthrough would let the \
         kernel overwrite blocks they share; delete its snapshots first"
    )]
    Shared { dir: PathBuf },
    #[error("clone {dir}: {reason}")]
    BadClone { dir: PathBuf, reason: String },
}

impl EngineError {
    /// The errno an export reports to the kernel for this error.
    pub fn errno(&self) -> i32 {
        match self {
            EngineError::OutOfRange { .. }
            | EngineError::InvalidParams(_)
            | EngineError::Misaligned { .. } => libc::EINVAL,
            EngineError::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            EngineError::Corrupt { .. } | EngineError::BadCryptParams { .. } => libc::EIO,
            EngineError::WrongKey { .. } => libc::EKEYREJECTED,
            EngineError::NoSpace => libc::ENOSPC,
            EngineError::BadSnapshotName { .. } => libc::EINVAL,
            EngineError::SnapshotExists { .. } => libc::EEXIST,
            EngineError::NoSuchSnapshot { .. } => libc::ENOENT,
            EngineError::SnapshotPinned { .. }
            | EngineError::SnapshotBusy { .. }
            | EngineError::InPassthrough { .. }
            | EngineError::Shared { .. } => libc::EBUSY,
            EngineError::BadClone { .. } => libc::EIO,
        }
    }
}

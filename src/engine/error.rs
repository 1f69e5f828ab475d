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
        }
    }
}

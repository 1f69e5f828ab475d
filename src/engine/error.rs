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
}

impl EngineError {
    /// The errno an export reports to the kernel for this error.
    pub fn errno(&self) -> i32 {
        match self {
            EngineError::OutOfRange { .. } | EngineError::InvalidParams(_) => libc::EINVAL,
            EngineError::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            EngineError::Corrupt { .. } => libc::EIO,
            EngineError::NoSpace => libc::ENOSPC,
        }
    }
}

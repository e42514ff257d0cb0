//! Engine errors to NBD error values, in one place.

use blockmirror_engine::{EngineError, ErrorKind};
use blockmirror_nbd::consts::{EINVAL, EIO, ENOSPC, EPERM, ESHUTDOWN};

/// The NBD error for an engine error on a request that `writes`.
pub fn errno(e: &EngineError, writes: bool) -> u32 {
    match e.kind() {
        ErrorKind::InvalidArgument | ErrorKind::NotFound | ErrorKind::AlreadyExists => EINVAL,
        // The NBD document asks for ENOSPC when a write runs past the end.
        ErrorKind::OutOfRange if writes => ENOSPC,
        ErrorKind::OutOfRange => EINVAL,
        ErrorKind::FailedPrecondition => EPERM,
        ErrorKind::ResourceExhausted => ENOSPC,
        ErrorKind::Unavailable => ESHUTDOWN,
        ErrorKind::Io => match e.raw_os_error() {
            Some(28) => ENOSPC,
            _ => EIO,
        },
    }
}

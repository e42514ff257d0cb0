//! The engine's one public error type.
//!
//! Callers match on [`ErrorKind`]; each transport maps kinds to its own codes
//! in exactly one place (gRPC status, NBD errno). Messages describe this layer
//! only; the underlying cause travels as `source`.

use std::fmt;

/// What went wrong, in terms a caller can act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// A field or argument is malformed or out of its allowed set.
    InvalidArgument,
    /// The named volume, job or file does not exist.
    NotFound,
    /// A volume or job with that name exists already (with another spec).
    AlreadyExists,
    /// The verb is not allowed in the object's current state.
    FailedPrecondition,
    /// An offset or length lies past the end of the device.
    OutOfRange,
    /// A bound was reached (event history trimmed, too many jobs).
    ResourceExhausted,
    /// The engine is shutting down or not ready yet.
    Unavailable,
    /// The backing storage failed.
    Io,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::InvalidArgument => "invalid argument",
            Self::NotFound => "not found",
            Self::AlreadyExists => "already exists",
            Self::FailedPrecondition => "failed precondition",
            Self::OutOfRange => "out of range",
            Self::ResourceExhausted => "resource exhausted",
            Self::Unavailable => "unavailable",
            Self::Io => "I/O error",
        })
    }
}

/// An engine error: a kind, a message about this layer, and an optional cause.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct EngineError {
    kind: ErrorKind,
    message: String,
    #[source]
    source: Option<std::io::Error>,
}

/// Result alias used across the engine.
pub type Result<T, E = EngineError> = std::result::Result<T, E>;

impl EngineError {
    /// A new error of `kind` with a message describing this layer.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// An I/O failure while doing `what`.
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        let kind = match source.kind() {
            std::io::ErrorKind::NotFound => ErrorKind::NotFound,
            // The caller named something unusable (a directory, a
            // character device): the request was wrong, not the disk.
            std::io::ErrorKind::IsADirectory | std::io::ErrorKind::InvalidInput => {
                ErrorKind::InvalidArgument
            }
            _ => ErrorKind::Io,
        };
        Self {
            kind,
            message: what.into(),
            source: Some(source),
        }
    }

    /// Shorthand for [`ErrorKind::InvalidArgument`].
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidArgument, message)
    }

    /// Shorthand for [`ErrorKind::NotFound`].
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, message)
    }

    /// Shorthand for [`ErrorKind::FailedPrecondition`].
    pub fn precondition(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::FailedPrecondition, message)
    }

    /// The kind, for mapping to a transport's codes.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The OS error number of the cause, if it was an OS error.
    pub fn raw_os_error(&self) -> Option<i32> {
        self.source.as_ref().and_then(std::io::Error::raw_os_error)
    }

    /// The message followed by every cause in the chain, `: `-separated.
    /// Print this once, where the error leaves the process.
    pub fn chain(&self) -> String {
        let mut out = self.message.clone();
        let mut cause: Option<&(dyn std::error::Error + 'static)> =
            self.source.as_ref().map(|e| e as _);
        while let Some(e) = cause {
            out.push_str(": ");
            out.push_str(&e.to_string());
            cause = e.source();
        }
        out
    }
}

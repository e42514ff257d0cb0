//! Engine errors to gRPC status codes, in one place.

use blockmirror_engine::{EngineError, ErrorKind};
use tonic::{Code, Status};

/// The status for an engine error; the message carries the whole chain.
pub fn to_status(e: &EngineError) -> Status {
    let code = match e.kind() {
        ErrorKind::InvalidArgument => Code::InvalidArgument,
        ErrorKind::NotFound => Code::NotFound,
        ErrorKind::AlreadyExists => Code::AlreadyExists,
        ErrorKind::FailedPrecondition => Code::FailedPrecondition,
        ErrorKind::OutOfRange => Code::OutOfRange,
        ErrorKind::ResourceExhausted => Code::ResourceExhausted,
        ErrorKind::Unavailable => Code::Unavailable,
        ErrorKind::Io => Code::Internal,
    };
    Status::new(code, e.chain())
}

/// `Result` with the error already a [`Status`].
pub trait IntoStatus<T> {
    /// Maps the engine error.
    fn status(self) -> Result<T, Status>;
}

impl<T> IntoStatus<T> for Result<T, EngineError> {
    fn status(self) -> Result<T, Status> {
        self.map_err(|e| to_status(&e))
    }
}

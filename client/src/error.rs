//! [`ClientError`]: what can go wrong talking to blockmirrord.
//!
//! A gRPC status keeps its code and message and prints as
//! `not found: volume "x" does not exist`, so callers can both match on the
//! code and show the server's words unchanged. Messages describe this layer
//! only; the `source()` chain carries the cause, to be printed once by the
//! caller (STYLE.md §3).

use crate::endpoint::Endpoint;

/// An error from the blockmirror client library.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The endpoint string is neither a socket path nor an `http://` URL.
    #[error("invalid endpoint {input:?}: {reason}")]
    InvalidEndpoint {
        /// The string as given.
        input: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The connection to blockmirrord could not be made.
    #[error("cannot connect to blockmirrord at {endpoint}")]
    Connect {
        /// Where we tried to connect.
        endpoint: Endpoint,
        /// The transport's reason.
        #[source]
        source: tonic::transport::Error,
    },
    /// The server answered with a non-OK gRPC status.
    #[error("{}: {message}", code_name(*code))]
    Status {
        /// The gRPC status code.
        code: tonic::Code,
        /// The server's message, unchanged.
        message: String,
    },
    /// A W3C trace context value is malformed.
    #[error("invalid trace context: {what} is not valid")]
    InvalidTraceContext {
        /// `traceparent` or `tracestate`.
        what: &'static str,
    },
    /// A reply lacked a field the API promises (a server bug).
    #[error("malformed reply from blockmirrord: {what}")]
    MalformedReply {
        /// What was missing or wrong.
        what: &'static str,
    },
}

impl ClientError {
    /// The gRPC status code, if the server answered with one.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            Self::Status { code, .. } => Some(*code),
            Self::InvalidEndpoint { .. }
            | Self::Connect { .. }
            | Self::InvalidTraceContext { .. }
            | Self::MalformedReply { .. } => None,
        }
    }

    /// Whether this is a `NOT_FOUND` status.
    pub fn is_not_found(&self) -> bool {
        self.code() == Some(tonic::Code::NotFound)
    }
}

impl From<tonic::Status> for ClientError {
    fn from(status: tonic::Status) -> Self {
        Self::Status {
            code: status.code(),
            message: status.message().to_owned(),
        }
    }
}

/// The lowercase, human name of a gRPC status code (`not found`).
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "ok",
        Code::Cancelled => "cancelled",
        Code::Unknown => "unknown error",
        Code::InvalidArgument => "invalid argument",
        Code::DeadlineExceeded => "deadline exceeded",
        Code::NotFound => "not found",
        Code::AlreadyExists => "already exists",
        Code::PermissionDenied => "permission denied",
        Code::ResourceExhausted => "resource exhausted",
        Code::FailedPrecondition => "failed precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out of range",
        Code::Unimplemented => "unimplemented",
        Code::Internal => "internal error",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data loss",
        Code::Unauthenticated => "unauthenticated",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_prints_code_and_message() {
        let err = ClientError::from(tonic::Status::not_found(r#"volume "x" does not exist"#));
        assert_eq!(err.to_string(), r#"not found: volume "x" does not exist"#);
        assert_eq!(err.code(), Some(tonic::Code::NotFound));
        assert!(err.is_not_found());

        let err = ClientError::from(tonic::Status::failed_precondition(
            "job j1 is running; complete needs ready",
        ));
        assert_eq!(
            err.to_string(),
            "failed precondition: job j1 is running; complete needs ready"
        );
        assert!(!err.is_not_found());
    }

    #[test]
    fn status_has_no_source_to_print_twice() {
        let err = ClientError::from(tonic::Status::internal("boom"));
        assert!(std::error::Error::source(&err).is_none());
    }
}

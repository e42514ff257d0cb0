//! [`Endpoint`]: where blockmirrord listens, and how to open a channel to it.
//!
//! blockmirrord serves gRPC on a unix socket by default (the CSI convention:
//! access is controlled by the socket's file mode) and optionally on TCP.
//! Over a unix socket tonic still speaks HTTP/2; the URI given to tonic is a
//! placeholder that only fills the `:authority` header.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint as TonicEndpoint};

use crate::error::ClientError;

/// How long to wait for a TCP connection before giving up. A unix socket
/// connect fails or succeeds at once.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Placeholder URI for connections over a unix socket: tonic needs one, the
/// server ignores it.
const UNIX_PLACEHOLDER_URI: &str = "http://[::]:50051";

/// Where blockmirrord's gRPC API is served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A unix socket path.
    Unix(PathBuf),
    /// An `http://host:port` URL.
    Http(String),
}

impl Endpoint {
    /// Parses an endpoint: `http://HOST:PORT`, `unix:PATH`, `unix://PATH`,
    /// or a bare socket path.
    ///
    /// # Errors
    ///
    /// [`ClientError::InvalidEndpoint`] for an empty string, a malformed
    /// URL, `https://` (this client has no TLS yet) or another scheme.
    pub fn parse(input: &str) -> Result<Self, ClientError> {
        let invalid = |reason| ClientError::InvalidEndpoint {
            input: input.to_owned(),
            reason,
        };
        let s = input.trim();
        if s.is_empty() {
            return Err(invalid("empty"));
        }
        if let Some(path) = s
            .strip_prefix("unix://")
            .or_else(|| s.strip_prefix("unix:"))
        {
            if path.is_empty() {
                return Err(invalid("no socket path after unix:"));
            }
            return Ok(Self::Unix(PathBuf::from(path)));
        }
        let lower = s.to_ascii_lowercase();
        if lower.starts_with("https://") {
            return Err(invalid(
                "https is not supported yet (this client has no TLS)",
            ));
        }
        if lower.starts_with("http://") {
            TonicEndpoint::from_shared(s.to_owned())
                .map_err(|_| invalid("not a valid http://HOST:PORT URL"))?;
            return Ok(Self::Http(s.to_owned()));
        }
        if let Some((scheme, _)) = s.split_once("://")
            && !scheme.contains('/')
        {
            return Err(invalid(
                "unknown scheme (use http://HOST:PORT or a socket path)",
            ));
        }
        Ok(Self::Unix(PathBuf::from(s)))
    }

    /// A unix socket endpoint.
    pub fn unix(path: impl AsRef<Path>) -> Self {
        Self::Unix(path.as_ref().to_path_buf())
    }

    /// Opens an HTTP/2 channel to the endpoint.
    ///
    /// # Errors
    ///
    /// [`ClientError::Connect`] when nothing listens there (or the socket
    /// file is missing or not accessible), [`ClientError::InvalidEndpoint`]
    /// for a malformed URL.
    pub async fn connect(&self) -> Result<Channel, ClientError> {
        let connect_err = |source| ClientError::Connect {
            endpoint: self.clone(),
            source,
        };
        match self {
            Self::Unix(path) => {
                let path = path.clone();
                // The placeholder is a valid URI, so this cannot fail.
                let endpoint = TonicEndpoint::from_static(UNIX_PLACEHOLDER_URI);
                endpoint
                    .connect_with_connector(tower::service_fn(move |_| {
                        let path = path.clone();
                        async move {
                            let stream = tokio::net::UnixStream::connect(path).await?;
                            Ok::<_, std::io::Error>(TokioIo::new(stream))
                        }
                    }))
                    .await
                    .map_err(connect_err)
            }
            Self::Http(url) => {
                let endpoint = TonicEndpoint::from_shared(url.clone()).map_err(|_| {
                    ClientError::InvalidEndpoint {
                        input: url.clone(),
                        reason: "not a valid http://HOST:PORT URL",
                    }
                })?;
                endpoint
                    .connect_timeout(CONNECT_TIMEOUT)
                    .connect()
                    .await
                    .map_err(connect_err)
            }
        }
    }
}

impl FromStr for Endpoint {
    type Err = ClientError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unix(path) => write!(f, "unix socket {}", path.display()),
            Self::Http(url) => f.write_str(url),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_paths_and_urls() {
        assert_eq!(
            Endpoint::parse("blockmirror-state/blockmirror.sock").unwrap(),
            Endpoint::unix("blockmirror-state/blockmirror.sock")
        );
        assert_eq!(
            Endpoint::parse("/run/bm.sock").unwrap(),
            Endpoint::unix("/run/bm.sock")
        );
        assert_eq!(
            Endpoint::parse("unix:/run/bm.sock").unwrap(),
            Endpoint::unix("/run/bm.sock")
        );
        assert_eq!(
            Endpoint::parse("unix:///run/bm.sock").unwrap(),
            Endpoint::unix("/run/bm.sock")
        );
        assert_eq!(
            Endpoint::parse("http://127.0.0.1:50051").unwrap(),
            Endpoint::Http("http://127.0.0.1:50051".into())
        );
    }

    #[test]
    fn rejects_bad_endpoints() {
        for s in ["", "  ", "unix:", "https://h:1", "ftp://h/x", "http://"] {
            assert!(
                matches!(Endpoint::parse(s), Err(ClientError::InvalidEndpoint { .. })),
                "{s:?}"
            );
        }
    }

    #[test]
    fn display_names_the_socket() {
        assert_eq!(
            Endpoint::unix("s/bm.sock").to_string(),
            "unix socket s/bm.sock"
        );
    }

    #[tokio::test]
    async fn connect_failure_names_the_socket() {
        let err = Endpoint::unix("/nonexistent/dir/bm.sock")
            .connect()
            .await
            .unwrap_err();
        assert!(matches!(err, ClientError::Connect { .. }));
        assert_eq!(
            err.to_string(),
            "cannot connect to blockmirrord at unix socket /nonexistent/dir/bm.sock"
        );
        // The cause is in the chain, not in the message.
        let mut chain = Vec::new();
        let mut cur: Option<&dyn std::error::Error> = std::error::Error::source(&err);
        while let Some(e) = cur {
            chain.push(e.to_string());
            cur = e.source();
        }
        assert!(
            chain.iter().any(|m| m.contains("No such file")),
            "{chain:?}"
        );
    }
}

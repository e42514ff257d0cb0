//! [`Client`]: one connection to blockmirrord, and the typed wrappers for
//! its services.
//!
//! The channel is cheap to clone (tonic multiplexes calls over one HTTP/2
//! connection), so each wrapper holds its own clone and every method takes
//! `&self`.

use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::data::DataClient;
use crate::endpoint::Endpoint;
use crate::error::ClientError;
use crate::job::JobClient;
use crate::trace::{TraceContext, TracedChannel};
use crate::volume::VolumeClient;
use crate::watch::WatchClient;

/// A connection to blockmirrord.
#[derive(Debug, Clone)]
pub struct Client {
    /// The HTTP/2 channel every service call goes over.
    channel: Channel,
    /// Trace context sent on every call (none by default).
    trace: TraceContext,
}

impl Client {
    /// Connects to `target`: a unix socket path (`STATE/blockmirror.sock`,
    /// `unix:PATH`) or an `http://HOST:PORT` URL.
    ///
    /// # Errors
    ///
    /// [`ClientError::InvalidEndpoint`] if `target` cannot be parsed,
    /// [`ClientError::Connect`] if nothing answers there.
    pub async fn connect(target: &str) -> Result<Self, ClientError> {
        Self::connect_endpoint(&Endpoint::parse(target)?).await
    }

    /// Connects to a parsed [`Endpoint`].
    ///
    /// # Errors
    ///
    /// [`ClientError::Connect`] if nothing answers there.
    pub async fn connect_endpoint(endpoint: &Endpoint) -> Result<Self, ClientError> {
        Ok(Self::from_channel(endpoint.connect().await?))
    }

    /// Wraps an existing channel (for example one over an in-memory duplex
    /// stream in tests).
    pub fn from_channel(channel: Channel) -> Self {
        Self {
            channel,
            trace: TraceContext::default(),
        }
    }

    /// Sends `trace` (W3C `traceparent`/`tracestate`) on every call, so
    /// blockmirrord's spans continue the caller's trace.
    #[must_use]
    pub fn with_trace_context(mut self, trace: TraceContext) -> Self {
        self.trace = trace;
        self
    }

    fn traced(&self) -> TracedChannel {
        InterceptedService::new(self.channel.clone(), self.trace.clone())
    }

    /// The volume service: create, attach, list, delete, limits.
    pub fn volumes(&self) -> VolumeClient {
        VolumeClient::new(self.traced())
    }

    /// The data service: read, write, flush, discard, write-zeroes.
    pub fn data(&self) -> DataClient {
        DataClient::new(self.traced())
    }

    /// The job service: start, inspect and steer mirror jobs.
    pub fn jobs(&self) -> JobClient {
        JobClient::new(self.traced())
    }

    /// The event stream of the job service.
    pub fn watch(&self) -> WatchClient {
        WatchClient::new(self.traced())
    }
}

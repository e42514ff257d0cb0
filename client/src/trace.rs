//! The caller's W3C trace context, sent on every call.
//!
//! blockmirrord makes a call's `traceparent` (and `tracestate`) the parent
//! of its span for the RPC, so a caller's trace — a CSI sidecar's, or
//! mirrorctl's own — continues into the server. The library only carries
//! the header values; making spans is the caller's business (mirrorctl
//! does it when the OpenTelemetry variables are set), so the library needs
//! no OpenTelemetry dependency.

use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::error::ClientError;

/// The channel every service wrapper calls through.
pub type TracedChannel = InterceptedService<Channel, TraceContext>;

/// `traceparent` / `tracestate` to send, if any.
#[derive(Debug, Clone, Default)]
pub struct TraceContext {
    traceparent: Option<AsciiMetadataValue>,
    tracestate: Option<AsciiMetadataValue>,
}

impl TraceContext {
    /// A context from a `traceparent` header value
    /// (`00-<trace id>-<span id>-<flags>`) and an optional `tracestate`.
    ///
    /// # Errors
    ///
    /// [`ClientError::InvalidTraceContext`] if a value is not a valid header
    /// value or `traceparent` is not in the W3C form.
    pub fn new(traceparent: &str, tracestate: Option<&str>) -> Result<Self, ClientError> {
        let well_formed = {
            let parts: Vec<&str> = traceparent.split('-').collect();
            parts.len() == 4
                && [2, 32, 16, 2]
                    .iter()
                    .zip(&parts)
                    .all(|(n, p)| p.len() == *n && p.bytes().all(|b| b.is_ascii_hexdigit()))
        };
        let bad = |what: &'static str| ClientError::InvalidTraceContext { what };
        if !well_formed {
            return Err(bad("traceparent"));
        }
        Ok(Self {
            traceparent: Some(
                MetadataValue::try_from(traceparent).map_err(|_| bad("traceparent"))?,
            ),
            tracestate: tracestate
                .map(MetadataValue::try_from)
                .transpose()
                .map_err(|_| bad("tracestate"))?,
        })
    }
}

impl Interceptor for TraceContext {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.traceparent {
            req.metadata_mut().insert("traceparent", v.clone());
        }
        if let Some(v) = &self.tracestate {
            req.metadata_mut().insert("tracestate", v.clone());
        }
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_are_added_when_set() {
        let mut none = TraceContext::default();
        let req = none.call(tonic::Request::new(())).unwrap();
        assert!(req.metadata().get("traceparent").is_none());
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let mut some = TraceContext::new(tp, Some("k=v")).unwrap();
        let req = some.call(tonic::Request::new(())).unwrap();
        assert_eq!(req.metadata().get("traceparent").unwrap(), tp);
        assert_eq!(req.metadata().get("tracestate").unwrap(), "k=v");
    }

    #[test]
    fn malformed_traceparent_is_refused() {
        for bad in [
            "",
            "00-xyz-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
        ] {
            assert!(TraceContext::new(bad, None).is_err(), "{bad:?}");
        }
    }
}

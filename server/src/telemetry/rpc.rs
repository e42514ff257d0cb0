//! gRPC server spans, with the caller's W3C trace context as parent.
//!
//! A tower layer around the tonic router: it reads `traceparent` (and
//! `tracestate`) from the request's metadata with OpenTelemetry's
//! `TraceContextPropagator`, opens a SERVER span named after the method
//! (`blockmirror.v1.JobService/StartMirror`, the RPC convention) under that
//! parent, and runs the handler inside its context, so what the handler
//! causes — a job's `mirror {volume}` span, a gRPC write's `write {volume}`
//! span — continues the caller's trace (a CSI sidecar's, mirrorctl's).
//!
//! Attributes: `rpc.system` = `grpc`, `rpc.service`, `rpc.method`,
//! `rpc.grpc.status_code`, `server.address` (and `server.port` on TCP). The
//! span ends when the response head is sent: for a streaming RPC
//! (WatchEvents) that is when the stream opens. The status code is read
//! from the response headers, where tonic puts it for errors
//! ("trailers-only" responses); a response without it counts as OK.
//! Health checks (`grpc.health.v1`) get no span: probes would drown the rest.

use opentelemetry::context::FutureExt as _;
use opentelemetry::propagation::{Extractor, TextMapPropagator as _};
use opentelemetry::trace::{SpanKind, Status, TraceContextExt as _, Tracer as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracer;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};
use tonic::codegen::http;

/// Where the server listens, for `server.address` / `server.port`.
#[derive(Debug, Clone)]
pub struct ServerAddress {
    /// IP or unix socket path.
    pub address: String,
    /// TCP port; `None` for a unix socket.
    pub port: Option<u16>,
}

/// Adds [`RpcTrace`] around a service.
#[derive(Debug, Clone)]
pub struct RpcTraceLayer {
    tracer: SdkTracer,
    server: ServerAddress,
}

impl RpcTraceLayer {
    /// Spans made with `tracer`, naming `server` as the server.
    pub fn new(tracer: SdkTracer, server: ServerAddress) -> Self {
        Self { tracer, server }
    }
}

impl<S> tower::Layer<S> for RpcTraceLayer {
    type Service = RpcTrace<S>;
    fn layer(&self, inner: S) -> RpcTrace<S> {
        RpcTrace {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service: one span per RPC (see the module doc).
#[derive(Debug, Clone)]
pub struct RpcTrace<S> {
    inner: S,
    layer: RpcTraceLayer,
}

/// Reads W3C trace context from HTTP/2 headers (gRPC metadata).
struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// The caller's trace context from request headers (empty if none).
pub fn parent_context(headers: &http::HeaderMap) -> Context {
    TraceContextPropagator::new().extract(&HeaderExtractor(headers))
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B, R> tower::Service<http::Request<B>> for RpcTrace<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: 'static,
    R: 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let path = req.uri().path().trim_start_matches('/').to_owned();
        if path.starts_with("grpc.health.") {
            return Box::pin(self.inner.call(req));
        }
        let parent = parent_context(req.headers());
        let (service, method) = path.split_once('/').unwrap_or((path.as_str(), ""));
        let server = &self.layer.server;
        let mut attrs = vec![
            KeyValue::new("rpc.system", "grpc"),
            KeyValue::new("rpc.service", service.to_owned()),
            KeyValue::new("rpc.method", method.to_owned()),
            KeyValue::new("server.address", server.address.clone()),
        ];
        if let Some(port) = server.port {
            attrs.push(KeyValue::new("server.port", i64::from(port)));
        }
        let tracer = &self.layer.tracer;
        let span = tracer
            .span_builder(path)
            .with_kind(SpanKind::Server)
            .with_attributes(attrs)
            .start_with_context(tracer, &parent);
        let cx = parent.with_span(span);
        let fut = self.inner.call(req).with_context(cx.clone());
        Box::pin(async move {
            let result = fut.await;
            let span = cx.span();
            match &result {
                Ok(resp) => {
                    let code = resp
                        .headers()
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<i64>().ok())
                        .unwrap_or(0);
                    span.set_attribute(KeyValue::new("rpc.grpc.status_code", code));
                    if code != 0 {
                        let message = resp
                            .headers()
                            .get("grpc-message")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_owned();
                        span.set_status(Status::error(message));
                    }
                }
                Err(_) => span.set_status(Status::error("transport error")),
            }
            span.end();
            result
        })
    }
}

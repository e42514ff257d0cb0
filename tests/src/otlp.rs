//! An OTLP/gRPC receiver in the test process: opentelemetry-proto's
//! collector services (traces, metrics) served by tonic on a loopback
//! port, keeping what arrives so a test can assert on it.

use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio_stream::wrappers::TcpListenerStream;

/// A span as received, with what tests look at.
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    /// `service.name` of the resource that sent it.
    pub service: String,
    /// Span name.
    pub name: String,
    /// Trace id, lowercase hex.
    pub trace_id: String,
    /// Span id, lowercase hex.
    pub span_id: String,
    /// Parent span id, lowercase hex (empty for a root span).
    pub parent_span_id: String,
    /// OTLP span kind (1 internal, 2 server, 3 client).
    pub kind: i32,
    /// Attributes, values as strings (`true`, `42`, `0.25`, `text`).
    pub attributes: HashMap<String, String>,
    /// Start and end, nanoseconds since the epoch.
    pub start_ns: u64,
    /// End.
    pub end_ns: u64,
}

impl ReceivedSpan {
    /// An attribute's value as a string.
    pub fn attr(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }
}

/// Everything received so far.
#[derive(Debug, Default)]
pub struct Received {
    /// Spans in arrival order.
    pub spans: Vec<ReceivedSpan>,
    /// Names of the metrics seen in metric exports.
    pub metric_names: BTreeSet<String>,
    /// Span export requests.
    pub span_requests: u64,
    /// Spans received, kept or not.
    pub span_total: u64,
    /// Keep spans (tests) or only count them (the benchmark's sink).
    keep: bool,
}

/// A running receiver; serves until dropped with the runtime.
#[derive(Debug, Clone)]
pub struct Receiver {
    /// Where it listens (`http://` + this is the OTLP endpoint).
    pub addr: SocketAddr,
    received: Arc<Mutex<Received>>,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn value_text(v: Option<&Value>) -> String {
    match v {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn attributes(kvs: &[KeyValue]) -> HashMap<String, String> {
    kvs.iter()
        .map(|kv| {
            (
                kv.key.clone(),
                value_text(kv.value.as_ref().and_then(|v| v.value.as_ref())),
            )
        })
        .collect()
}

#[derive(Debug, Clone)]
struct Traces(Arc<Mutex<Received>>);

#[tonic::async_trait]
impl TraceService for Traces {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut got = self.0.lock().expect("receiver lock");
        got.span_requests += 1;
        let keep = got.keep;
        for rs in request.into_inner().resource_spans {
            let resource = rs
                .resource
                .as_ref()
                .map(|r| attributes(&r.attributes))
                .unwrap_or_default();
            let service = resource.get("service.name").cloned().unwrap_or_default();
            for ss in rs.scope_spans {
                got.span_total += ss.spans.len() as u64;
                if !keep {
                    continue;
                }
                for s in ss.spans {
                    got.spans.push(ReceivedSpan {
                        service: service.clone(),
                        name: s.name,
                        trace_id: hex(&s.trace_id),
                        span_id: hex(&s.span_id),
                        parent_span_id: hex(&s.parent_span_id),
                        kind: s.kind,
                        attributes: attributes(&s.attributes),
                        start_ns: s.start_time_unix_nano,
                        end_ns: s.end_time_unix_nano,
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

#[derive(Debug, Clone)]
struct Metrics(Arc<Mutex<Received>>);

#[tonic::async_trait]
impl MetricsService for Metrics {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        let mut got = self.0.lock().expect("receiver lock");
        for rm in request.into_inner().resource_metrics {
            for sm in rm.scope_metrics {
                for m in sm.metrics {
                    got.metric_names.insert(m.name);
                }
            }
        }
        Ok(tonic::Response::new(ExportMetricsServiceResponse {
            partial_success: None,
        }))
    }
}

impl Receiver {
    /// Binds `addr` (e.g. `127.0.0.1:0`) and serves on the current runtime,
    /// keeping every span.
    pub async fn start(addr: &str) -> std::io::Result<Self> {
        Self::start_with(addr, true).await
    }

    /// As [`Self::start`]; `keep` = false only counts spans (a sink for
    /// long benchmark runs).
    pub async fn start_with(addr: &str, keep: bool) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let received = Arc::new(Mutex::new(Received {
            keep,
            ..Received::default()
        }));
        let router = tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(Traces(Arc::clone(&received))))
            .add_service(MetricsServiceServer::new(Metrics(Arc::clone(&received))));
        tokio::spawn(router.serve_with_incoming(TcpListenerStream::new(listener)));
        Ok(Self { addr, received })
    }

    /// The OTLP endpoint URL.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Spans received so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.received.lock().expect("receiver lock").spans.clone()
    }

    /// Metric names received so far.
    pub fn metric_names(&self) -> BTreeSet<String> {
        self.received
            .lock()
            .expect("receiver lock")
            .metric_names
            .clone()
    }

    /// (spans, span export requests) received so far.
    pub fn counts(&self) -> (u64, u64) {
        let got = self.received.lock().expect("receiver lock");
        (got.span_total, got.span_requests)
    }
}

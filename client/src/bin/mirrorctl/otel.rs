//! mirrorctl's own span, so a command's calls show up in the same trace as
//! what blockmirrord does for them.
//!
//! On only when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set and `OTEL_SDK_DISABLED` is
//! not `true`: then the command runs in a CLIENT span `mirrorctl {command}`
//! (exported over OTLP/gRPC when the command ends; service name
//! `mirrorctl` unless `OTEL_SERVICE_NAME` says otherwise), and every call
//! carries that span's `traceparent`. A `TRACEPARENT` environment variable
//! (the convention for passing context to a command) becomes its parent.

use std::collections::HashMap;
use std::time::Duration;

use blockmirror_client::TraceContext;
use opentelemetry::propagation::TextMapPropagator as _;
use opentelemetry::trace::{
    SpanKind, Status, TraceContextExt as _, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;

/// The most mirrorctl waits at exit for its span to be exported.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(3);

fn env_set(name: &str) -> bool {
    std::env::var_os(name).is_some_and(|v| !v.is_empty())
}

/// The command's span and the provider that exports it.
#[derive(Debug)]
pub(crate) struct CliTrace {
    provider: SdkTracerProvider,
    cx: Context,
}

impl CliTrace {
    /// Starts `mirrorctl {command}` if the variables ask for it (see the
    /// module doc). Call inside the runtime. A broken exporter set-up is
    /// reported on stderr and the command runs untraced.
    pub(crate) fn start(command: &str) -> Option<Self> {
        let wanted = (env_set("OTEL_EXPORTER_OTLP_ENDPOINT")
            || env_set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
            && !std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true"));
        if !wanted {
            return None;
        }
        let exporter = match opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build()
        {
            Ok(e) => e,
            Err(e) => {
                eprintln!("warning: not tracing: building the OTLP exporter: {e}");
                return None;
            }
        };
        let resource = if env_set("OTEL_SERVICE_NAME") {
            Resource::builder().build()
        } else {
            Resource::builder().with_service_name("mirrorctl").build()
        };
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource)
            .build();
        let parent = match std::env::var("TRACEPARENT") {
            Ok(tp) => {
                let carrier = HashMap::from([("traceparent".to_owned(), tp)]);
                TraceContextPropagator::new().extract(&carrier)
            }
            Err(_) => Context::new(),
        };
        let tracer = provider.tracer("mirrorctl");
        let span = tracer
            .span_builder(format!("mirrorctl {command}"))
            .with_kind(SpanKind::Client)
            .with_attributes([KeyValue::new("rpc.system", "grpc")])
            .start_with_context(&tracer, &parent);
        Some(Self {
            provider,
            cx: parent.with_span(span),
        })
    }

    /// The span's context as the headers to send.
    pub(crate) fn headers(&self) -> Option<TraceContext> {
        let mut carrier: HashMap<String, String> = HashMap::new();
        TraceContextPropagator::new().inject_context(&self.cx, &mut carrier);
        let tp = carrier.get("traceparent")?;
        TraceContext::new(tp, carrier.get("tracestate").map(String::as_str)).ok()
    }

    /// Ends the span (ERROR with `error` if the command failed) and
    /// exports it, waiting at most [`FLUSH_TIMEOUT`]. The flush runs on its
    /// own thread while this runtime keeps driving the exporter's I/O.
    pub(crate) async fn end(self, error: Option<String>) {
        let span = self.cx.span();
        if let Some(e) = error {
            span.set_status(Status::error(e));
        }
        span.end();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let provider = self.provider;
        let spawned = std::thread::Builder::new()
            .name("otel-flush".into())
            .spawn(move || {
                let _ = provider.shutdown_with_timeout(FLUSH_TIMEOUT);
                let _ = tx.send(());
            });
        if spawned.is_ok() {
            let _ = tokio::time::timeout(FLUSH_TIMEOUT, rx).await;
        }
    }
}

//! Telemetry: logs to stderr, and — only when asked for — OpenTelemetry
//! traces and metrics over OTLP/gRPC and a Prometheus endpoint.
//!
//! Nothing is exported, and no observer is installed on the engine (so the
//! write path does no telemetry work), unless `OTEL_EXPORTER_OTLP_ENDPOINT`
//! (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` / `_METRICS_ENDPOINT`) is set or
//! `--metrics-listen` is given. `OTEL_SDK_DISABLED=true` and
//! `OTEL_TRACES_EXPORTER=none` / `OTEL_METRICS_EXPORTER=none` turn the
//! exporters off. The SDK reads the other standard variables itself
//! (`OTEL_SERVICE_NAME`, default `blockmirrord`; `OTEL_RESOURCE_ATTRIBUTES`;
//! `OTEL_TRACES_SAMPLER(_ARG)` for RPC and job spans;
//! `OTEL_EXPORTER_OTLP_TIMEOUT`, `OTEL_BSP_*`, `OTEL_METRIC_EXPORT_INTERVAL`).
//! Only the gRPC protocol is built in.
//!
//! # Layout
//!
//! - [`logs`]: the `tracing` subscriber (one line per lifecycle event).
//! - [`sampler`]: which writes become spans (ratio, slow writes, parent).
//! - [`spans`]: span names and attributes, built from engine records.
//! - [`metrics`]: instrument names and units.
//! - [`prometheus`]: the `--metrics-listen` endpoint.
//! - [`rpc`]: gRPC server spans parented on the caller's `traceparent`.
//! - [`observer`]: the engine observer that feeds spans and metrics.

pub mod logs;
pub mod metrics;
pub mod observer;
pub mod prometheus;
pub mod rpc;
pub mod sampler;
pub mod spans;

pub use logs::init;

use crate::config::Config;
use blockmirror_engine::Engine;
use opentelemetry::KeyValue;
use opentelemetry::metrics::MeterProvider as _;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The most shutdown waits for the exporters' last flush, so an
/// unreachable collector cannot hold the process.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(3);

/// Why telemetry could not start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The OTLP exporter could not be built (bad endpoint, headers...).
    #[error("building the OTLP exporter")]
    Exporter(#[source] opentelemetry_otlp::ExporterBuildError),
    /// The metrics listener could not be bound.
    #[error("binding the metrics listener {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// Which signals go where, from the environment and the flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Wanted {
    traces: bool,
    otlp_metrics: bool,
}

fn env_set(name: &str) -> bool {
    std::env::var_os(name).is_some_and(|v| !v.is_empty())
}

fn env_is(name: &str, value: &str) -> bool {
    std::env::var(name).is_ok_and(|v| v.trim().eq_ignore_ascii_case(value))
}

impl Wanted {
    fn from_env() -> Self {
        if env_is("OTEL_SDK_DISABLED", "true") {
            return Self {
                traces: false,
                otlp_metrics: false,
            };
        }
        let base = env_set("OTEL_EXPORTER_OTLP_ENDPOINT");
        Self {
            traces: (base || env_set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
                && !env_is("OTEL_TRACES_EXPORTER", "none"),
            otlp_metrics: (base || env_set("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"))
                && !env_is("OTEL_METRICS_EXPORTER", "none"),
        }
    }
}

/// `service.name` (default `blockmirrord`, overridden by the standard
/// variables), `service.version`, and `OTEL_RESOURCE_ATTRIBUTES`.
fn resource() -> Resource {
    let named = env_set("OTEL_SERVICE_NAME")
        || std::env::var("OTEL_RESOURCE_ATTRIBUTES").is_ok_and(|v| v.contains("service.name="));
    let builder = Resource::builder();
    let builder = if named {
        builder
    } else {
        builder.with_service_name("blockmirrord")
    };
    builder
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .build()
}

/// Running telemetry: providers to flush at shutdown, the metrics endpoint.
#[derive(Debug)]
pub struct Telemetry {
    traces: Option<SdkTracerProvider>,
    tracer: Option<SdkTracer>,
    meters: Option<SdkMeterProvider>,
    /// The observer installed on the engine, if any.
    observer: Option<Arc<observer::TelemetryObserver>>,
    /// Stops the metrics endpoint.
    stop: CancellationToken,
}

impl Telemetry {
    /// Starts what the environment and `config` ask for and installs the
    /// engine observer if anything is on. Call inside the runtime.
    ///
    /// # Errors
    /// See [`TelemetryError`].
    pub async fn start(config: &Config, engine: &Arc<Engine>) -> Result<Self, TelemetryError> {
        let wanted = Wanted::from_env();
        let stop = CancellationToken::new();
        let resource = resource();
        if let Ok(p) = std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL")
            && p != "grpc"
            && (wanted.traces || wanted.otlp_metrics)
        {
            tracing::warn!(protocol = %p, "OTEL_EXPORTER_OTLP_PROTOCOL: only grpc is built in; using grpc");
        }
        let traces = if wanted.traces {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .build()
                .map_err(TelemetryError::Exporter)?;
            let env_sampler = opentelemetry_sdk::trace::Config::default().sampler;
            Some(
                SdkTracerProvider::builder()
                    .with_batch_exporter(exporter)
                    .with_sampler(sampler::HonourWriteDecision { env: env_sampler })
                    .with_resource(resource.clone())
                    .build(),
            )
        } else {
            None
        };
        let pull = config.metrics_listen.map(|_| prometheus::PullReader::new());
        let meters = if wanted.otlp_metrics || pull.is_some() {
            let mut builder = SdkMeterProvider::builder().with_resource(resource);
            if wanted.otlp_metrics {
                let exporter = opentelemetry_otlp::MetricExporter::builder()
                    .with_tonic()
                    .build()
                    .map_err(TelemetryError::Exporter)?;
                builder = builder.with_periodic_exporter(exporter);
            }
            if let Some(reader) = &pull {
                builder = builder.with_reader(reader.clone());
            }
            Some(builder.build())
        } else {
            None
        };
        if let (Some(addr), Some(reader)) = (config.metrics_listen, pull) {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| TelemetryError::Bind { addr, source })?;
            tracing::info!(addr = ?listener.local_addr().ok(), "metrics listening (Prometheus, GET /metrics)");
            tokio::spawn(prometheus::serve(listener, reader, stop.clone()));
        }
        let tracer = traces.as_ref().map(|p| p.tracer("blockmirrord"));
        let observer = observer::TelemetryObserver {
            spans: tracer.clone().map(|t| {
                spans::SpanRecorder::new(
                    t,
                    sampler::WriteSampler::new(
                        config.trace_write_sample_ratio,
                        config.trace_slow_write(),
                    ),
                )
            }),
            metrics: meters
                .as_ref()
                .map(|p| metrics::WriteMetrics::new(&p.meter("blockmirrord"), engine)),
        };
        let observer =
            (observer.spans.is_some() || observer.metrics.is_some()).then(|| Arc::new(observer));
        if let Some(observer) = &observer {
            engine.set_observer(Arc::clone(observer) as _);
            tracing::info!(
                traces = wanted.traces,
                otlp_metrics = wanted.otlp_metrics,
                prometheus = config.metrics_listen.is_some(),
                write_sample_ratio = config.trace_write_sample_ratio,
                slow_write_ms = config.trace_slow_write_ms,
                "telemetry on"
            );
        }
        Ok(Self {
            traces,
            tracer,
            meters,
            observer,
            stop,
        })
    }

    /// The RPC span layer for a listener at `server`, if traces are on.
    pub fn rpc_layer(&self, server: rpc::ServerAddress) -> Option<rpc::RpcTraceLayer> {
        self.tracer
            .clone()
            .map(|t| rpc::RpcTraceLayer::new(t, server))
    }

    /// Stops the endpoint and flushes the exporters, waiting at most
    /// [`SHUTDOWN_TIMEOUT`]. The flush runs on its own thread: the SDK's
    /// shutdown blocks, and a runtime blocking task would hold the
    /// runtime's own shutdown if the collector never answers.
    pub async fn shutdown(self) {
        self.stop.cancel();
        if let Some(spans) = self.observer.as_ref().and_then(|o| o.spans.as_ref()) {
            spans.end_open_jobs();
        }
        if self.traces.is_none() && self.meters.is_none() {
            return;
        }
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let (traces, meters) = (self.traces, self.meters);
        let spawned = std::thread::Builder::new()
            .name("otel-shutdown".into())
            .spawn(move || {
                if let Some(p) = traces
                    && let Err(e) = p.shutdown_with_timeout(SHUTDOWN_TIMEOUT)
                {
                    tracing::warn!(error = %e, "flushing spans at shutdown");
                }
                if let Some(p) = meters
                    && let Err(e) = p.shutdown_with_timeout(SHUTDOWN_TIMEOUT)
                {
                    tracing::warn!(error = %e, "flushing metrics at shutdown");
                }
                let _ = done_tx.send(());
            });
        if spawned.is_ok()
            && tokio::time::timeout(SHUTDOWN_TIMEOUT, done_rx)
                .await
                .is_err()
        {
            tracing::warn!(timeout = ?SHUTDOWN_TIMEOUT, "telemetry not flushed: collector unreachable?");
        }
    }
}

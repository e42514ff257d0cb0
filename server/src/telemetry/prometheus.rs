//! The Prometheus endpoint (`--metrics-listen`): a pull reader on the
//! meter provider, rendered as Prometheus text format 0.0.4 on
//! `GET /metrics` (any path answers the same).
//!
//! Names follow Prometheus' conventions for OTLP metrics: dots become
//! underscores, the unit is a suffix (`s` → `_seconds`, `By` → `_bytes`),
//! counters end in `_total`, attribute keys become labels with
//! underscores (`blockmirror.copy_mode` → `blockmirror_copy_mode`).
//!
//! The HTTP side is a few lines over a TCP socket, not a web framework:
//! one request per connection, answered and closed, with a read timeout so
//! an idle client cannot hold a task.

use opentelemetry::{KeyValue, Value};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::metrics::data::{AggregatedMetrics, Metric, MetricData, ResourceMetrics};
use opentelemetry_sdk::metrics::reader::MetricReader;
use opentelemetry_sdk::metrics::{InstrumentKind, ManualReader, Pipeline, Temporality};
use std::fmt::Write as _;
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// A pull reader the meter provider and the endpoint share.
#[derive(Debug, Clone)]
pub struct PullReader(Arc<ManualReader>);

impl PullReader {
    /// A cumulative reader (Prometheus counters and histograms are cumulative).
    pub fn new() -> Self {
        Self(Arc::new(
            ManualReader::builder()
                .with_temporality(Temporality::Cumulative)
                .build(),
        ))
    }

    /// Collects now and renders Prometheus text.
    pub fn render(&self) -> String {
        let mut rm = ResourceMetrics::default();
        if let Err(e) = self.0.collect(&mut rm) {
            tracing::warn!(error = %e, "collecting metrics for Prometheus");
        }
        render(&rm)
    }
}

impl Default for PullReader {
    fn default() -> Self {
        Self::new()
    }
}

impl MetricReader for PullReader {
    fn register_pipeline(&self, pipeline: Weak<Pipeline>) {
        self.0.register_pipeline(pipeline);
    }
    fn collect(&self, rm: &mut ResourceMetrics) -> OTelSdkResult {
        self.0.collect(rm)
    }
    fn force_flush(&self) -> OTelSdkResult {
        self.0.force_flush()
    }
    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.0.shutdown_with_timeout(timeout)
    }
    fn temporality(&self, kind: InstrumentKind) -> Temporality {
        self.0.temporality(kind)
    }
}

/// The Prometheus name of an OTel metric.
fn prom_name(m: &Metric, counter: bool) -> String {
    let mut name: String = m
        .name()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    match m.unit() {
        "s" => name.push_str("_seconds"),
        "By" => name.push_str("_bytes"),
        _ => {}
    }
    if counter {
        name.push_str("_total");
    }
    name
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// `{k="v",...}` from attributes plus `extra` (e.g. `le`); empty if none.
fn labels<'a>(attrs: impl Iterator<Item = &'a KeyValue>, extra: Option<(&str, &str)>) -> String {
    let mut parts: Vec<String> = attrs
        .map(|kv| {
            let key: String = kv
                .key
                .as_str()
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                .collect();
            let value = match &kv.value {
                Value::String(s) => s.as_str().to_owned(),
                other => other.to_string(),
            };
            format!("{key}=\"{}\"", escape(&value))
        })
        .collect();
    parts.sort();
    if let Some((k, v)) = extra {
        parts.push(format!("{k}=\"{v}\""));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!("{{{}}}", parts.join(","))
    }
}

fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {}", help.replace('\n', " "));
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn render_sum<T: Copy + std::fmt::Display>(out: &mut String, m: &Metric, d: &MetricData<T>) {
    match d {
        MetricData::Sum(sum) => {
            let name = prom_name(m, sum.is_monotonic());
            let kind = if sum.is_monotonic() {
                "counter"
            } else {
                "gauge"
            };
            header(out, &name, m.description(), kind);
            for p in sum.data_points() {
                let _ = writeln!(out, "{name}{} {}", labels(p.attributes(), None), p.value());
            }
        }
        MetricData::Gauge(g) => {
            let name = prom_name(m, false);
            header(out, &name, m.description(), "gauge");
            for p in g.data_points() {
                let _ = writeln!(out, "{name}{} {}", labels(p.attributes(), None), p.value());
            }
        }
        MetricData::Histogram(h) => {
            let name = prom_name(m, false);
            header(out, &name, m.description(), "histogram");
            for p in h.data_points() {
                let mut cumulative = 0u64;
                let bounds: Vec<f64> = p.bounds().collect();
                for (i, c) in p.bucket_counts().enumerate() {
                    cumulative += c;
                    let le = bounds
                        .get(i)
                        .map_or_else(|| "+Inf".to_owned(), ToString::to_string);
                    let l = labels(p.attributes(), Some(("le", &le)));
                    let _ = writeln!(out, "{name}_bucket{l} {cumulative}");
                }
                let l = labels(p.attributes(), None);
                let _ = writeln!(out, "{name}_sum{l} {}", p.sum());
                let _ = writeln!(out, "{name}_count{l} {}", p.count());
            }
        }
        // Not used by blockmirrord's instruments.
        MetricData::ExponentialHistogram(_) => {}
    }
}

/// Prometheus text of everything collected.
pub fn render(rm: &ResourceMetrics) -> String {
    let mut out = String::new();
    for scope in rm.scope_metrics() {
        for m in scope.metrics() {
            match m.data() {
                AggregatedMetrics::F64(d) => render_sum(&mut out, m, d),
                AggregatedMetrics::U64(d) => render_sum(&mut out, m, d),
                AggregatedMetrics::I64(d) => render_sum(&mut out, m, d),
            }
        }
    }
    out
}

/// Longest request head read; Prometheus sends a few hundred bytes.
const MAX_REQUEST_HEAD: usize = 8 << 10;
/// A client that sends no complete request head in this time is dropped.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `reader` on `listener` until `stop` is cancelled.
pub async fn serve(listener: TcpListener, reader: PullReader, stop: CancellationToken) {
    loop {
        let conn = tokio::select! {
            () = stop.cancelled() => return,
            c = listener.accept() => c,
        };
        match conn {
            Ok((stream, _)) => {
                let reader = reader.clone();
                tokio::spawn(async move {
                    if let Err(e) = answer(stream, &reader).await {
                        tracing::debug!(error = %e, "metrics request");
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "accepting a metrics connection");
                // EMFILE and the like: back off instead of spinning.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn answer(mut stream: TcpStream, reader: &PullReader) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let read_head = async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_REQUEST_HEAD {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(buf.get(..n).unwrap_or_default());
        }
        Ok::<_, std::io::Error>(())
    };
    tokio::time::timeout(REQUEST_TIMEOUT, read_head)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "request head"))??;
    let response = if head.starts_with(b"GET ") {
        let body = reader.render();
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    } else {
        "HTTP/1.1 405 Method Not Allowed\r\nAllow: GET\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            .to_owned()
    };
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::metrics::MeterProvider as _;
    use opentelemetry_sdk::metrics::SdkMeterProvider;

    #[test]
    fn renders_histograms_counters_and_gauges() {
        let reader = PullReader::new();
        let provider = SdkMeterProvider::builder()
            .with_reader(reader.clone())
            .build();
        let meter = provider.meter("test");
        let h = meter
            .f64_histogram("blockmirror.guest_write.duration")
            .with_unit("s")
            .with_boundaries(vec![0.001, 0.01])
            .build();
        let mode = [KeyValue::new("blockmirror.copy_mode", "none")];
        h.record(0.0005, &mode);
        h.record(0.005, &mode);
        h.record(0.5, &mode);
        let c = meter
            .u64_counter("blockmirror.copied")
            .with_unit("By")
            .build();
        c.add(4096, &[]);
        let text = reader.render();
        for line in [
            "# TYPE blockmirror_guest_write_duration_seconds histogram",
            "blockmirror_guest_write_duration_seconds_bucket{blockmirror_copy_mode=\"none\",le=\"0.001\"} 1",
            "blockmirror_guest_write_duration_seconds_bucket{blockmirror_copy_mode=\"none\",le=\"0.01\"} 2",
            "blockmirror_guest_write_duration_seconds_bucket{blockmirror_copy_mode=\"none\",le=\"+Inf\"} 3",
            "blockmirror_guest_write_duration_seconds_count{blockmirror_copy_mode=\"none\"} 3",
            "# TYPE blockmirror_copied_bytes_total counter",
            "blockmirror_copied_bytes_total 4096",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }
}

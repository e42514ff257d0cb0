//! What telemetry adds to one guest write, measured in process: the time
//! blockmirrord's engine observer takes per write record (metrics, the
//! sampling decision, and the span when one is built), without the I/O.
//! A machine too busy for fio to resolve a few percent (bench/telemetry.py)
//! can still resolve this.
//!
//! Spans go to a batch processor whose exporter drops them, so the figure
//! covers building and queueing a span, not the network. Single-threaded
//! loop of `--writes` records (default 2,000,000).
//!
//! ```sh
//! cargo run --release -p blockmirror-server --example observer_cost
//! ```

use blockmirror_engine::job::spec::CopyMode;
use blockmirror_engine::observe::{GuestWrite, IoObserver, WriteKind, WriteTiming};
use blockmirror_engine::{DEFAULT_VOLUME_INFLIGHT_BYTES, Engine, EngineConfig};
use blockmirror_server::telemetry::metrics::WriteMetrics;
use blockmirror_server::telemetry::observer::TelemetryObserver;
use blockmirror_server::telemetry::prometheus::PullReader;
use blockmirror_server::telemetry::sampler::{HonourWriteDecision, WriteSampler};
use blockmirror_server::telemetry::spans::SpanRecorder;
use opentelemetry::metrics::MeterProvider as _;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider, SpanData, SpanExporter};
use std::hint::black_box;
use std::time::{Duration, Instant};

/// Drops every batch: the cost measured is ours and the SDK's, not a
/// collector's.
#[derive(Debug)]
struct Discard;

impl SpanExporter for Discard {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        black_box(batch);
        Ok(())
    }
}

fn observer(engine: &std::sync::Arc<Engine>, ratio: Option<f64>) -> TelemetryObserver {
    let meters = SdkMeterProvider::builder()
        .with_reader(PullReader::new())
        .build();
    let spans = ratio.map(|r| {
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(Discard)
            .with_sampler(HonourWriteDecision {
                env: Box::new(Sampler::ParentBased(Box::new(Sampler::AlwaysOn))),
            })
            .build();
        let tracer = provider.tracer("bench");
        // Kept alive for the process (the batch thread exports on it).
        std::mem::forget(provider);
        SpanRecorder::new(
            tracer,
            WriteSampler::new(r, Some(Duration::from_millis(50))),
        )
    });
    let metrics = Some(WriteMetrics::new(&meters.meter("bench"), engine));
    std::mem::forget(meters);
    TelemetryObserver { spans, metrics }
}

fn main() {
    let writes: u32 = std::env::args()
        .skip_while(|a| a != "--writes")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(2_000_000);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let engine = Engine::open(EngineConfig {
            state_dir: dir.path().to_owned(),
            event_history: 16,
            volume_inflight_bytes: DEFAULT_VOLUME_INFLIGHT_BYTES,
        })
        .expect("engine");
        let mut timing = WriteTiming::start();
        timing.mode = Some(CopyMode::WriteBlocking);
        timing.source = Some(Duration::from_micros(40));
        timing.target = Some(Duration::from_micros(60));
        println!("| observer | ns per guest write |");
        println!("|---|---|");
        for (name, ratio) in [
            ("metrics only (--metrics-listen)", None),
            ("metrics + traces, ratio 0.01 (default)", Some(0.01)),
            ("metrics + traces, ratio 1.0", Some(1.0)),
        ] {
            let o = observer(&engine, ratio);
            let record = |i: u32| GuestWrite {
                volume: "disk",
                job_id: Some("job"),
                offset: u64::from(i) * 4096,
                kind: WriteKind::Data {
                    len: 4096,
                    fua: false,
                },
                timing: &timing,
                total: Duration::from_micros(70),
                error: None,
            };
            for i in 0..writes / 10 {
                o.guest_write(&record(i));
            }
            let t = Instant::now();
            for i in 0..writes {
                o.guest_write(black_box(&record(i)));
            }
            let ns = t.elapsed().as_nanos() as f64 / f64::from(writes);
            println!("| {name} | {ns:.0} |");
        }
        let t = Instant::now();
        for _ in 0..writes {
            black_box(WriteTiming::start().elapsed());
        }
        let ns = t.elapsed().as_nanos() as f64 / f64::from(writes);
        println!(
            "| (always, even with telemetry off) two clock reads of the write's timing | {ns:.0} |"
        );
    });
}

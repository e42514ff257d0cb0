//! Metrics of the write path and of jobs.
//!
//! One recording point: the OpenTelemetry metrics SDK. Its meter provider
//! has up to two readers: a periodic OTLP exporter (when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set) and a pull reader behind
//! `--metrics-listen` (`prometheus.rs` renders it as Prometheus text). So
//! both see the same aggregates, and the write path records once.
//!
//! Why the OTel SDK rather than the `metrics` crate or our own registry:
//! it is the only one of those that exports OTLP (the collector and
//! Prometheus' OTLP ingestion read it natively), and a pull reader gives
//! Prometheus text from the same aggregates with a short renderer. Its
//! histogram record is a bucket search and a short mutex hold per reader;
//! the write path passes pre-built attribute slices so nothing allocates.
//!
//! | OpenTelemetry name | unit | Prometheus name | attributes |
//! |---|---|---|---|
//! | `blockmirror.guest_write.duration` | s | `blockmirror_guest_write_duration_seconds` (histogram) | `blockmirror.copy_mode`, `error.type` on failure |
//! | `blockmirror.source_write.duration` | s | `blockmirror_source_write_duration_seconds` | `blockmirror.copy_mode` |
//! | `blockmirror.target_write.duration` | s | `blockmirror_target_write_duration_seconds` | (write-blocking only) |
//! | `blockmirror.range_lock_wait.duration` | s | `blockmirror_range_lock_wait_duration_seconds` | (writes under a job) |
//! | `blockmirror.copy.duration` | s | `blockmirror_copy_duration_seconds` | `blockmirror.copy.result` |
//! | `blockmirror.guest_written` | By | `blockmirror_guest_written_bytes_total` (counter) | |
//! | `blockmirror.copied` | By | `blockmirror_copied_bytes_total` (counter) | |
//! | `blockmirror.job.dirty` | By | `blockmirror_job_dirty_bytes` (gauge) | `blockmirror.job.id` |
//! | `blockmirror.job.in_flight` | By | `blockmirror_job_in_flight_bytes` (gauge) | `blockmirror.job.id` |
//! | `blockmirror.jobs` | {job} | `blockmirror_jobs` (gauge) | `blockmirror.job.state` (every state, 0 included) |
//!
//! Histogram buckets resolve 10 µs to 5 s ([`DURATION_BUCKETS`]). The
//! gauges are read from the engine when a reader collects, not on the write
//! path.

use super::spans::{copy_mode_name, error_type};
use blockmirror_engine::Engine;
use blockmirror_engine::job::spec::CopyMode;
use blockmirror_engine::job::state::JobStatus;
use blockmirror_engine::observe::{CopyOp, CopyOutcome, GuestWrite};
use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram, Meter};
use std::sync::{Arc, Weak};

/// Upper bounds of the duration histograms' buckets, in seconds: block I/O
/// runs from tens of microseconds (a local file) to seconds (a stalled
/// remote target).
pub const DURATION_BUCKETS: [f64; 18] = [
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// Attribute sets built once, so recording never allocates.
#[derive(Debug)]
struct ModeAttrs {
    none: [KeyValue; 1],
    background: [KeyValue; 1],
    write_blocking: [KeyValue; 1],
}

impl ModeAttrs {
    fn new() -> Self {
        let kv = |m| KeyValue::new("blockmirror.copy_mode", copy_mode_name(m));
        Self {
            none: [kv(None)],
            background: [kv(Some(CopyMode::Background))],
            write_blocking: [kv(Some(CopyMode::WriteBlocking))],
        }
    }

    fn of(&self, mode: Option<CopyMode>) -> &[KeyValue] {
        match mode {
            None => &self.none,
            Some(CopyMode::WriteBlocking) => &self.write_blocking,
            Some(CopyMode::Background | CopyMode::Auto) => &self.background,
        }
    }
}

/// The instruments of the table above.
#[derive(Debug)]
pub struct WriteMetrics {
    guest: Histogram<f64>,
    source: Histogram<f64>,
    target: Histogram<f64>,
    lock_wait: Histogram<f64>,
    copy: Histogram<f64>,
    guest_written: Counter<u64>,
    copied: Counter<u64>,
    modes: ModeAttrs,
    copy_results: [[KeyValue; 1]; 3],
}

fn duration(meter: &Meter, name: &'static str, description: &'static str) -> Histogram<f64> {
    meter
        .f64_histogram(name)
        .with_unit("s")
        .with_description(description)
        .with_boundaries(DURATION_BUCKETS.to_vec())
        .build()
}

impl WriteMetrics {
    /// Creates the instruments on `meter`; the gauges read `engine`.
    pub fn new(meter: &Meter, engine: &Arc<Engine>) -> Self {
        register_job_gauges(meter, Arc::downgrade(engine));
        let result = |r| [KeyValue::new("blockmirror.copy.result", r)];
        Self {
            guest: duration(
                meter,
                "blockmirror.guest_write.duration",
                "Guest write latency as the guest sees it (limits, range lock, source, target)",
            ),
            source: duration(
                meter,
                "blockmirror.source_write.duration",
                "Source write latency of guest writes",
            ),
            target: duration(
                meter,
                "blockmirror.target_write.duration",
                "Synchronous target write latency of guest writes (write-blocking mode)",
            ),
            lock_wait: duration(
                meter,
                "blockmirror.range_lock_wait.duration",
                "Time guest writes under a job waited for a range lock",
            ),
            copy: duration(
                meter,
                "blockmirror.copy.duration",
                "Copy operation latency (range lock, source read, target write)",
            ),
            guest_written: meter
                .u64_counter("blockmirror.guest_written")
                .with_unit("By")
                .with_description("Bytes written (or zeroed) by guests")
                .build(),
            copied: meter
                .u64_counter("blockmirror.copied")
                .with_unit("By")
                .with_description("Bytes copied to mirror targets by jobs")
                .build(),
            modes: ModeAttrs::new(),
            copy_results: [result("data"), result("zeroes"), result("error")],
        }
    }

    /// Records a guest write.
    pub fn guest_write(&self, w: &GuestWrite<'_>) {
        let modes = self.modes.of(w.timing.mode);
        match w.error {
            None => self.guest.record(w.total.as_secs_f64(), modes),
            Some(kind) => {
                let mut attrs = modes.to_vec();
                attrs.push(KeyValue::new("error.type", error_type(kind)));
                self.guest.record(w.total.as_secs_f64(), &attrs);
            }
        }
        if let Some(d) = w.timing.source {
            self.source.record(d.as_secs_f64(), modes);
        }
        if let Some(d) = w.timing.target {
            self.target.record(d.as_secs_f64(), &[]);
        }
        if w.timing.mode.is_some() {
            self.lock_wait.record(w.timing.lock_wait.as_secs_f64(), &[]);
        }
        if w.error.is_none() {
            self.guest_written.add(w.kind.len(), &[]);
        }
    }

    /// Records a copy operation.
    pub fn copy(&self, c: &CopyOp<'_>) {
        let [data, zeroes, error] = &self.copy_results;
        let attrs = match c.outcome {
            CopyOutcome::Data => data,
            CopyOutcome::Zeroes => zeroes,
            CopyOutcome::Failed { .. } => error,
        };
        self.copy.record(c.total.as_secs_f64(), attrs);
        if !matches!(c.outcome, CopyOutcome::Failed { .. }) {
            self.copied.add(c.len, &[]);
        }
    }
}

/// Dirty bytes and bytes in flight per job, and jobs per state: read from
/// the engine when a reader collects. Weak, so the engine (which holds the
/// observer, which holds the meter provider) is not kept alive by them.
fn register_job_gauges(meter: &Meter, engine: Weak<Engine>) {
    let job_attr = |id: &str| [KeyValue::new("blockmirror.job.id", id.to_owned())];
    let e = engine.clone();
    let _dirty = meter
        .u64_observable_gauge("blockmirror.job.dirty")
        .with_unit("By")
        .with_description("Bytes the job still has to copy")
        .with_callback(move |o| {
            for j in e.upgrade().map(|e| e.list_jobs()).unwrap_or_default() {
                if !j.status.is_terminal() {
                    o.observe(j.progress.dirty_bytes, &job_attr(&j.id));
                }
            }
        })
        .build();
    let e = engine.clone();
    let _in_flight = meter
        .u64_observable_gauge("blockmirror.job.in_flight")
        .with_unit("By")
        .with_description("Bytes the job holds in flight (copy buffers, synchronous writes)")
        .with_callback(move |o| {
            for j in e.upgrade().map(|e| e.list_jobs()).unwrap_or_default() {
                if !j.status.is_terminal() {
                    o.observe(j.in_flight_bytes, &job_attr(&j.id));
                }
            }
        })
        .build();
    let _jobs = meter
        .u64_observable_gauge("blockmirror.jobs")
        .with_unit("{job}")
        .with_description("Jobs per state")
        .with_callback(move |o| {
            let jobs = engine.upgrade().map(|e| e.list_jobs()).unwrap_or_default();
            for state in JobStatus::ALL {
                let n = jobs.iter().filter(|j| j.status == state).count() as u64;
                o.observe(n, &[KeyValue::new("blockmirror.job.state", state.as_str())]);
            }
        })
        .build();
}

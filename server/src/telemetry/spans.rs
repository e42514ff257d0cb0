//! Spans built from the engine's records.
//!
//! There is no block-storage semantic convention, so names follow the
//! database pattern `{operation} {target}` and attributes reuse
//! OpenTelemetry's where they exist (`disk.io.direction`, `error.type`,
//! `server.address`, `server.port`); everything else is under
//! `blockmirror.`.
//!
//! | span | kind | when |
//! |---|---|---|
//! | `write {volume}` | SERVER (NBD, no parent) / INTERNAL (under an RPC) | a guest write (data, zeroes, discard), if sampled (see `sampler`) |
//! | `copy {volume}` | INTERNAL, child of the job's span | a copy operation of a job, if sampled |
//! | `mirror {volume}` | INTERNAL, child of the StartMirror RPC's span | a job, from start to `concluded` (or shutdown) |
//! | `job {state}` | INTERNAL, child of `mirror {volume}` | the time a job spent in one state, ended when it leaves it |
//!
//! Write and copy spans are built after the fact, with the start and end
//! times the engine measured, so a write that is not traced never touches
//! the SDK.
//!
//! Attributes of `write {volume}`:
//! `disk.io.direction` = `write`; `blockmirror.volume`; `blockmirror.job.id`
//! (while a job mirrors the volume); `blockmirror.write.offset`,
//! `blockmirror.write.bytes`; `blockmirror.write.op` = `data` | `zeroes`;
//! `blockmirror.write.fua`; `blockmirror.copy_mode` = `none` | `background`
//! | `write_blocking` (the path the write took); `blockmirror.write.source_latency_s`,
//! `blockmirror.write.target_latency_s` (write-blocking only),
//! `blockmirror.write.range_lock_wait_s`; `blockmirror.write.result` =
//! `ok` | `error`, and `error.type` (the engine's error kind, e.g.
//! `io`) on failure; `blockmirror.write.slow` (over the threshold);
//! `blockmirror.sample.reason` = `slow` | `parent` | `ratio`.
//!
//! Attributes of `copy {volume}`: `blockmirror.job.id`, `blockmirror.volume`,
//! `blockmirror.copy.offset`, `blockmirror.copy.bytes`,
//! `blockmirror.copy.result` = `data` | `zeroes` | `error`,
//! `blockmirror.copy.range_lock_wait_s`, `error.type` and
//! `blockmirror.copy.failed_side` on failure, `blockmirror.sample.reason`.
//!
//! Attributes of `mirror {volume}`: `blockmirror.job.id`,
//! `blockmirror.volume`, `blockmirror.target`, `blockmirror.copy_mode` (as
//! requested), `server.address` / `server.port` for an NBD target, and
//! `blockmirror.job.final_state` plus `error.type` = `job_failed` (status
//! ERROR) when it ends with an error. `job {state}`: `blockmirror.job.id`,
//! `blockmirror.job.state`, `blockmirror.job.next_state`.

use super::sampler::{SAMPLE_REASON, SampleReason, WriteSampler};
use blockmirror_engine::ErrorKind;
use blockmirror_engine::job::active::Side;
use blockmirror_engine::job::spec::CopyMode;
use blockmirror_engine::job::state::JobStatus;
use blockmirror_engine::observe::{
    CopyOp, CopyOutcome, GuestWrite, JobStarted, JobStatusChange, WriteKind,
};
use opentelemetry::trace::{Span as _, SpanKind, Status, TraceContextExt as _, Tracer as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::trace::SdkTracer;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

/// A job's open span and the state it is in.
#[derive(Debug)]
struct JobTrace {
    /// Context holding the open `mirror {volume}` span.
    cx: Context,
    /// The state it is in.
    state: JobStatus,
    /// When it entered `state`.
    since: SystemTime,
}

/// Builds the spans of the table above.
#[derive(Debug)]
pub struct SpanRecorder {
    tracer: SdkTracer,
    sampler: WriteSampler,
    /// Open job spans by job id; entries leave at `concluded`.
    jobs: Mutex<HashMap<String, JobTrace>>,
}

/// Snake-case name of an engine error kind, for `error.type`.
pub fn error_type(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::InvalidArgument => "invalid_argument",
        ErrorKind::NotFound => "not_found",
        ErrorKind::AlreadyExists => "already_exists",
        ErrorKind::FailedPrecondition => "failed_precondition",
        ErrorKind::OutOfRange => "out_of_range",
        ErrorKind::ResourceExhausted => "resource_exhausted",
        ErrorKind::Unavailable => "unavailable",
        ErrorKind::Io => "io",
    }
}

/// `none`, `background` or `write_blocking`.
pub fn copy_mode_name(mode: Option<CopyMode>) -> &'static str {
    match mode {
        None => "none",
        Some(CopyMode::Background) => "background",
        Some(CopyMode::WriteBlocking) => "write_blocking",
        Some(CopyMode::Auto) => "auto",
    }
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn i64_of(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// `(host, port)` of a TCP NBD URI (`nbd://HOST[:PORT]/...`), or the socket
/// path of a unix one, for `server.address` / `server.port`.
fn nbd_server(target: &str) -> Option<(String, Option<i64>)> {
    if let Some(rest) = target.strip_prefix("nbd://") {
        let authority = rest.split('/').next().unwrap_or_default();
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => {
                (h.to_owned(), p.parse().ok())
            }
            _ => (authority.to_owned(), None),
        };
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        return Some((host, Some(port.unwrap_or(10809))));
    }
    if target.starts_with("nbd+unix://") {
        let socket = target.split("socket=").nth(1)?.split('&').next()?;
        return Some((socket.to_owned(), None));
    }
    None
}

impl SpanRecorder {
    /// A recorder that builds spans with `tracer` for writes `sampler` picks.
    pub fn new(tracer: SdkTracer, sampler: WriteSampler) -> Self {
        Self {
            tracer,
            sampler,
            jobs: Mutex::new(HashMap::new()),
        }
    }

    fn jobs(&self) -> std::sync::MutexGuard<'_, HashMap<String, JobTrace>> {
        // Entries are inserted and removed whole.
        self.jobs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A guest write: a span if the sampler picks it.
    pub fn guest_write(&self, w: &GuestWrite<'_>) {
        let parent = Context::current();
        let parent_sampled = parent.span().span_context().is_sampled();
        let Some(reason) = self.sampler.decide(w.total, parent_sampled) else {
            return;
        };
        let end = SystemTime::now();
        let start = end.checked_sub(w.total).unwrap_or(end);
        let (op, fua) = match w.kind {
            WriteKind::Data { fua, .. } => ("data", fua),
            WriteKind::Zeroes { .. } => ("zeroes", false),
        };
        let mut attrs = vec![
            KeyValue::new(SAMPLE_REASON, reason.as_str()),
            KeyValue::new("disk.io.direction", "write"),
            KeyValue::new("blockmirror.volume", w.volume.to_owned()),
            KeyValue::new("blockmirror.write.offset", i64_of(w.offset)),
            KeyValue::new("blockmirror.write.bytes", i64_of(w.kind.len())),
            KeyValue::new("blockmirror.write.op", op),
            KeyValue::new("blockmirror.write.fua", fua),
            KeyValue::new("blockmirror.copy_mode", copy_mode_name(w.timing.mode)),
            KeyValue::new(
                "blockmirror.write.range_lock_wait_s",
                secs(w.timing.lock_wait),
            ),
            KeyValue::new("blockmirror.write.slow", reason == SampleReason::Slow),
            KeyValue::new(
                "blockmirror.write.result",
                if w.error.is_some() { "error" } else { "ok" },
            ),
        ];
        if let Some(job) = w.job_id {
            attrs.push(KeyValue::new("blockmirror.job.id", job.to_owned()));
        }
        if let Some(d) = w.timing.source {
            attrs.push(KeyValue::new("blockmirror.write.source_latency_s", secs(d)));
        }
        if let Some(d) = w.timing.target {
            attrs.push(KeyValue::new("blockmirror.write.target_latency_s", secs(d)));
        }
        if let Some(kind) = w.error {
            attrs.push(KeyValue::new("error.type", error_type(kind)));
        }
        let kind = if parent.has_active_span() {
            SpanKind::Internal
        } else {
            SpanKind::Server
        };
        let mut span = self
            .tracer
            .span_builder(format!("write {}", w.volume))
            .with_kind(kind)
            .with_start_time(start)
            .with_attributes(attrs)
            .start_with_context(&self.tracer, &parent);
        if let Some(kind) = w.error {
            span.set_status(Status::error(error_type(kind)));
        }
        span.end_with_timestamp(end);
    }

    /// A copy operation: a span under its job's if the sampler picks it.
    pub fn copy(&self, c: &CopyOp<'_>) {
        let Some(reason) = self.sampler.decide(c.total, false) else {
            return;
        };
        let parent = self
            .jobs()
            .get(c.job_id)
            .map_or_else(Context::new, |j| j.cx.clone());
        let end = SystemTime::now();
        let start = end.checked_sub(c.total).unwrap_or(end);
        let mut attrs = vec![
            KeyValue::new(SAMPLE_REASON, reason.as_str()),
            KeyValue::new("blockmirror.job.id", c.job_id.to_owned()),
            KeyValue::new("blockmirror.volume", c.volume.to_owned()),
            KeyValue::new("blockmirror.copy.offset", i64_of(c.offset)),
            KeyValue::new("blockmirror.copy.bytes", i64_of(c.len)),
            KeyValue::new("blockmirror.copy.range_lock_wait_s", secs(c.lock_wait)),
        ];
        let failed = match c.outcome {
            CopyOutcome::Data => {
                attrs.push(KeyValue::new("blockmirror.copy.result", "data"));
                None
            }
            CopyOutcome::Zeroes => {
                attrs.push(KeyValue::new("blockmirror.copy.result", "zeroes"));
                None
            }
            CopyOutcome::Failed { side, kind } => {
                let side = match side {
                    Side::Source => "source",
                    Side::Target => "target",
                };
                attrs.extend([
                    KeyValue::new("blockmirror.copy.result", "error"),
                    KeyValue::new("blockmirror.copy.failed_side", side),
                    KeyValue::new("error.type", error_type(kind)),
                ]);
                Some(kind)
            }
        };
        let mut span = self
            .tracer
            .span_builder(format!("copy {}", c.volume))
            .with_kind(SpanKind::Internal)
            .with_start_time(start)
            .with_attributes(attrs)
            .start_with_context(&self.tracer, &parent);
        if let Some(kind) = failed {
            span.set_status(Status::error(error_type(kind)));
        }
        span.end_with_timestamp(end);
    }

    /// A new job: opens `mirror {volume}` under the caller's context.
    pub fn job_started(&self, j: &JobStarted<'_>) {
        let mut attrs = vec![
            KeyValue::new("blockmirror.job.id", j.job_id.to_owned()),
            KeyValue::new("blockmirror.volume", j.volume.to_owned()),
            KeyValue::new("blockmirror.target", j.target.to_owned()),
            KeyValue::new("blockmirror.copy_mode", copy_mode_name(Some(j.mode))),
        ];
        if let Some((host, port)) = nbd_server(j.target) {
            attrs.push(KeyValue::new("server.address", host));
            if let Some(port) = port {
                attrs.push(KeyValue::new("server.port", port));
            }
        }
        let parent = Context::current();
        let span = self
            .tracer
            .span_builder(format!("mirror {}", j.volume))
            .with_kind(SpanKind::Internal)
            .with_attributes(attrs)
            .start_with_context(&self.tracer, &parent);
        self.jobs().insert(
            j.job_id.to_owned(),
            JobTrace {
                cx: parent.with_span(span),
                state: JobStatus::Created,
                since: SystemTime::now(),
            },
        );
    }

    /// Ends the spans of jobs still open (at shutdown: a job stopped for
    /// shutdown has not concluded), so they are exported.
    pub fn end_open_jobs(&self) {
        let now = SystemTime::now();
        for (_, job) in self.jobs().drain() {
            let span = job.cx.span();
            span.set_attribute(KeyValue::new(
                "blockmirror.job.final_state",
                "stopped_for_shutdown",
            ));
            span.end_with_timestamp(now);
        }
    }

    /// A state change: a `job {state}` span for the state left; at
    /// `concluded`, the job's span ends.
    pub fn job_status(&self, c: &JobStatusChange<'_>) {
        let now = SystemTime::now();
        let mut jobs = self.jobs();
        let Some(job) = jobs.get_mut(c.job_id) else {
            return;
        };
        let left = std::mem::replace(&mut job.state, c.to);
        let since = std::mem::replace(&mut job.since, now);
        self.tracer
            .span_builder(format!("job {left}"))
            .with_kind(SpanKind::Internal)
            .with_start_time(since)
            .with_attributes([
                KeyValue::new("blockmirror.job.id", c.job_id.to_owned()),
                KeyValue::new("blockmirror.job.state", left.as_str()),
                KeyValue::new("blockmirror.job.next_state", c.to.as_str()),
            ])
            .start_with_context(&self.tracer, &job.cx)
            .end_with_timestamp(now);
        if c.to.is_terminal()
            && let Some(job) = jobs.remove(c.job_id)
        {
            let span = job.cx.span();
            span.set_attribute(KeyValue::new("blockmirror.job.final_state", c.to.as_str()));
            if let Some(error) = c.error {
                span.set_attribute(KeyValue::new("error.type", "job_failed"));
                span.set_status(Status::error(error.to_owned()));
            }
            span.end_with_timestamp(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::sampler::HonourWriteDecision;
    use blockmirror_engine::observe::WriteTiming;
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_sdk::error::OTelSdkResult;
    use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider, SpanData, SpanExporter};
    use std::sync::Arc;

    /// Keeps exported spans. (The SDK's own in-memory exporter sits behind
    /// its `testing` feature; as a dev-dependency feature it would make
    /// `cargo test` and `cargo build` compile the SDK twice.)
    #[derive(Debug, Clone, Default)]
    struct Kept(Arc<Mutex<Vec<SpanData>>>);

    impl SpanExporter for Kept {
        async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
            self.0.lock().unwrap().extend(batch);
            Ok(())
        }
    }

    impl Kept {
        fn get_finished_spans(&self) -> Result<Vec<SpanData>, ()> {
            Ok(self.0.lock().unwrap().clone())
        }
    }

    fn recorder(ratio: f64) -> (SpanRecorder, SdkTracerProvider, Kept) {
        let exporter = Kept::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            // The environment's sampler drops everything; write and copy
            // spans are recorded anyway (the recorder decided), job spans not.
            .with_sampler(HonourWriteDecision {
                env: Box::new(Sampler::AlwaysOff),
            })
            .build();
        let r = SpanRecorder::new(
            provider.tracer("test"),
            WriteSampler::new(ratio, Some(Duration::from_millis(50))),
        );
        (r, provider, exporter)
    }

    fn attr(s: &SpanData, key: &str) -> Option<String> {
        s.attributes
            .iter()
            .find(|kv| kv.key.as_str() == key)
            .map(|kv| kv.value.to_string())
    }

    #[test]
    fn write_and_copy_spans_carry_the_documented_attributes() {
        let (r, provider, exporter) = recorder(1.0);
        let mut timing = WriteTiming::start();
        timing.mode = Some(CopyMode::WriteBlocking);
        timing.source = Some(Duration::from_micros(30));
        timing.target = Some(Duration::from_micros(70));
        r.guest_write(&GuestWrite {
            volume: "v",
            job_id: Some("j"),
            offset: 8192,
            kind: WriteKind::Data {
                len: 4096,
                fua: true,
            },
            timing: &timing,
            total: Duration::from_micros(90),
            error: None,
        });
        r.copy(&CopyOp {
            job_id: "j",
            volume: "v",
            offset: 0,
            len: 1 << 20,
            lock_wait: Duration::ZERO,
            total: Duration::from_millis(2),
            outcome: CopyOutcome::Failed {
                side: Side::Target,
                kind: ErrorKind::Io,
            },
        });
        provider.force_flush().unwrap();
        let spans = exporter.get_finished_spans().unwrap();
        let w = spans
            .iter()
            .find(|s| s.name == "write v")
            .expect("write span");
        for (k, v) in [
            ("disk.io.direction", "write"),
            ("blockmirror.job.id", "j"),
            ("blockmirror.write.offset", "8192"),
            ("blockmirror.write.bytes", "4096"),
            ("blockmirror.write.fua", "true"),
            ("blockmirror.copy_mode", "write_blocking"),
            ("blockmirror.write.target_latency_s", "0.00007"),
            ("blockmirror.sample.reason", "ratio"),
            ("blockmirror.write.result", "ok"),
        ] {
            assert_eq!(attr(w, k).as_deref(), Some(v), "{k}");
        }
        assert_eq!(w.span_kind, SpanKind::Server);
        let took = w.end_time.duration_since(w.start_time).unwrap();
        assert_eq!(
            took,
            Duration::from_micros(90),
            "built with the measured times"
        );
        let c = spans
            .iter()
            .find(|s| s.name == "copy v")
            .expect("copy span");
        for (k, v) in [
            ("blockmirror.copy.bytes", "1048576"),
            ("blockmirror.copy.result", "error"),
            ("blockmirror.copy.failed_side", "target"),
            ("error.type", "io"),
        ] {
            assert_eq!(attr(c, k).as_deref(), Some(v), "{k}");
        }
    }

    #[test]
    fn ratio_zero_builds_only_slow_writes() {
        let (r, provider, exporter) = recorder(0.0);
        let timing = WriteTiming::start();
        for total in [Duration::from_micros(50), Duration::from_millis(60)] {
            r.guest_write(&GuestWrite {
                volume: "v",
                job_id: None,
                offset: 0,
                kind: WriteKind::Zeroes {
                    len: 512,
                    punch: true,
                },
                timing: &timing,
                total,
                error: Some(ErrorKind::Io),
            });
        }
        provider.force_flush().unwrap();
        let spans = exporter.get_finished_spans().unwrap();
        assert_eq!(spans.len(), 1, "{spans:#?}");
        assert_eq!(
            attr(&spans[0], "blockmirror.write.slow").as_deref(),
            Some("true")
        );
        assert_eq!(attr(&spans[0], "error.type").as_deref(), Some("io"));
        assert_eq!(
            attr(&spans[0], "blockmirror.copy_mode").as_deref(),
            Some("none")
        );
    }

    #[test]
    fn nbd_targets_name_their_server() {
        assert_eq!(
            nbd_server("nbd://10.0.0.5:10810/exp"),
            Some(("10.0.0.5".into(), Some(10810)))
        );
        assert_eq!(
            nbd_server("nbd://host/exp"),
            Some(("host".into(), Some(10809)))
        );
        assert_eq!(
            nbd_server("nbd+unix:///exp?socket=/run/t.sock"),
            Some(("/run/t.sock".into(), None))
        );
        assert_eq!(nbd_server("volume:dst"), None);
    }
}

//! What the engine tells an observer about its I/O, and the per-job latency
//! histograms it keeps itself.
//!
//! The engine knows nothing of OpenTelemetry or Prometheus: it fills plain
//! records ([`GuestWrite`], [`CopyOp`], [`JobStarted`], [`JobStatusChange`])
//! and hands them to an [`IoObserver`] that the server installs with
//! [`crate::Engine::set_observer`]. With none installed, a guest write costs
//! a few `Instant::now()` calls, plus four histogram increments for its job
//! (GetJob's percentiles) while a job mirrors the volume; nothing else.
//!
//! Records are handed over *after* the fact, with durations, so an
//! observer decides what to build (a span, a histogram sample, nothing)
//! once it knows how the write went — which is what lets it record every
//! slow write while sampling the fast ones. Calls come from the write path
//! itself: an observer must return quickly and never block.

use crate::error::{ErrorKind, Result};
use crate::job::active::{MirrorIoError, Side, WriteOp};
use crate::job::spec::CopyMode;
use crate::job::state::JobStatus;
use crate::latency::{LatencyHistogram, LatencySummary};
use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::time::Instant;

/// Receives the engine's I/O and job records (see the module doc).
pub trait IoObserver: Send + Sync + std::fmt::Debug {
    /// A guest write (data, zeroes or discard) finished.
    fn guest_write(&self, write: &GuestWrite<'_>);
    /// A copy operation of a job finished.
    fn copy(&self, copy: &CopyOp<'_>);
    /// A job was created (called in the task that started it, so an
    /// observer may take the caller's trace context as the job's parent).
    fn job_started(&self, job: &JobStarted<'_>);
    /// A job changed state.
    fn job_status(&self, change: &JobStatusChange<'_>);
}

/// The engine's observer slot, shared with every volume and job; empty
/// until the server installs one.
#[derive(Debug, Clone, Default)]
pub struct Observer(Arc<OnceLock<Arc<dyn IoObserver>>>);

impl Observer {
    /// Installs `observer`; false if one was installed already.
    pub fn install(&self, observer: Arc<dyn IoObserver>) -> bool {
        self.0.set(observer).is_ok()
    }

    fn get(&self) -> Option<&Arc<dyn IoObserver>> {
        self.0.get()
    }

    /// Reports a finished guest write: into its job's histograms (if a job
    /// mirrors the volume) and to the installed observer.
    pub(crate) fn guest_write_done(
        &self,
        volume: &str,
        job: Option<&JobObserver>,
        offset: u64,
        kind: WriteKind,
        timing: &WriteTiming,
        result: &Result<()>,
    ) {
        let total = timing.started.elapsed();
        if let Some(job) = job {
            job.latencies.record_write(total, timing);
        }
        if let Some(o) = self.get() {
            o.guest_write(&GuestWrite {
                volume,
                job_id: job.map(|j| j.job_id.as_str()),
                offset,
                kind,
                timing,
                total,
                error: result.as_ref().err().map(crate::EngineError::kind),
            });
        }
    }
}

/// What kind of guest write it was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteKind {
    /// Bytes from the guest.
    Data {
        /// Length in bytes.
        len: u64,
        /// Durable on return.
        fua: bool,
    },
    /// Write-zeroes or discard.
    Zeroes {
        /// Length in bytes.
        len: u64,
        /// Deallocation allowed (discard, or write-zeroes without no-hole).
        punch: bool,
    },
}

impl WriteKind {
    /// The kind of `op`, which covers `len` bytes.
    pub(crate) fn of(op: &WriteOp, len: u64) -> Self {
        match op {
            WriteOp::Data { fua, .. } => Self::Data { len, fua: *fua },
            WriteOp::Zeroes { punch, .. } => Self::Zeroes { len, punch: *punch },
        }
    }

    /// Bytes the write covers.
    pub fn len(&self) -> u64 {
        match self {
            Self::Data { len, .. } | Self::Zeroes { len, .. } => *len,
        }
    }

    /// True for a zero-length write.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Times the write path takes as a guest write goes through it.
#[derive(Debug)]
pub struct WriteTiming {
    /// When the write entered the volume (before limits and the gate).
    started: Instant,
    /// Time spent waiting for range locks (all attempts).
    pub lock_wait: Duration,
    /// The source write, if it was made.
    pub source: Option<Duration>,
    /// The synchronous target write, if it was made.
    pub target: Option<Duration>,
    /// The path the write took while a job mirrored the volume:
    /// `WriteBlocking` = to both sides, `Background` = to the source, the
    /// chunks left for the copier. `None` without a job.
    pub mode: Option<CopyMode>,
}

impl WriteTiming {
    /// Starts the clock.
    pub fn start() -> Self {
        Self {
            started: Instant::now(),
            lock_wait: Duration::ZERO,
            source: None,
            target: None,
            mode: None,
        }
    }

    /// Time since [`Self::start`].
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Runs the source write `f`, timing it.
    pub(crate) async fn source_leg(&mut self, f: impl Future<Output = Result<()>>) -> Result<()> {
        let (r, took) = timed(f).await;
        self.source = Some(took);
        r
    }

    /// Adds the wait for a range lock asked for at `asked`.
    pub(crate) fn locked(&mut self, asked: Instant) {
        self.lock_wait += asked.elapsed();
    }

    /// Keeps the times of a write to both sides; returns their results.
    pub(crate) fn both_legs(
        &mut self,
        mode: CopyMode,
        source: (Result<()>, Duration),
        target: (Result<()>, Duration),
    ) -> (Result<()>, Result<()>) {
        self.mode = Some(mode);
        self.source = Some(source.1);
        self.target = Some(target.1);
        (source.0, target.0)
    }
}

/// Awaits `f` and measures how long it took.
pub(crate) async fn timed<T>(f: impl Future<Output = T>) -> (T, Duration) {
    let t = Instant::now();
    let r = f.await;
    (r, t.elapsed())
}

/// A finished guest write.
#[derive(Debug)]
pub struct GuestWrite<'a> {
    /// The volume written.
    pub volume: &'a str,
    /// The job mirroring it, if any.
    pub job_id: Option<&'a str>,
    /// Byte offset.
    pub offset: u64,
    /// What was written.
    pub kind: WriteKind,
    /// Where the time went.
    pub timing: &'a WriteTiming,
    /// Latency as the guest saw it (limits, gate, lock, I/O).
    pub total: Duration,
    /// The error the guest got, if any.
    pub error: Option<ErrorKind>,
}

/// What a copy operation did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyOutcome {
    /// Read the source, wrote the data to the target.
    Data,
    /// The range was a hole or all zeroes: zeroed on the target.
    Zeroes,
    /// A side failed; the chunks are dirty again.
    Failed {
        /// The failing side.
        side: Side,
        /// What kind of failure.
        kind: ErrorKind,
    },
}

/// A finished copy operation.
#[derive(Debug)]
pub struct CopyOp<'a> {
    /// The job.
    pub job_id: &'a str,
    /// The source volume.
    pub volume: &'a str,
    /// Byte offset and length.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// Wait for the range lock.
    pub lock_wait: Duration,
    /// Lock wait plus I/O.
    pub total: Duration,
    /// Result.
    pub outcome: CopyOutcome,
}

/// A new job.
#[derive(Debug)]
pub struct JobStarted<'a> {
    /// The job.
    pub job_id: &'a str,
    /// The source volume.
    pub volume: &'a str,
    /// The target as given (`volume:NAME`, a path or an NBD URI).
    pub target: &'a str,
    /// Requested copy mode.
    pub mode: CopyMode,
}

/// A job's state change.
#[derive(Debug)]
pub struct JobStatusChange<'a> {
    /// The job.
    pub job_id: &'a str,
    /// The state left.
    pub from: JobStatus,
    /// The state entered.
    pub to: JobStatus,
    /// The job's error, if it has one.
    pub error: Option<&'a str>,
}

/// Latency histograms of one job's guest writes, for GetJob.
#[derive(Debug, Default)]
pub struct JobLatencies {
    /// Guest-visible latency of every write while the job was attached.
    pub guest: LatencyHistogram,
    /// Source writes.
    pub source: LatencyHistogram,
    /// Synchronous target writes (write-blocking mode only).
    pub target: LatencyHistogram,
    /// Range-lock waits.
    pub lock_wait: LatencyHistogram,
}

impl JobLatencies {
    fn record_write(&self, total: Duration, t: &WriteTiming) {
        self.guest.record(total);
        self.lock_wait.record(t.lock_wait);
        if let Some(d) = t.source {
            self.source.record(d);
        }
        if let Some(d) = t.target {
            self.target.record(d);
        }
    }

    /// The four summaries.
    pub fn summary(&self) -> WriteLatencySummary {
        WriteLatencySummary {
            guest: self.guest.summary(),
            source: self.source.summary(),
            target: self.target.summary(),
            lock_wait: self.lock_wait.summary(),
        }
    }
}

/// Percentiles of a job's write latencies (GetJob).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteLatencySummary {
    /// As the guest saw it.
    pub guest: LatencySummary,
    /// Source writes.
    pub source: LatencySummary,
    /// Synchronous target writes.
    pub target: LatencySummary,
    /// Range-lock waits.
    pub lock_wait: LatencySummary,
}

/// A job's identity and histograms, shared by its [`crate::job::active::ActiveMirror`]
/// (write and copy paths) and the job (life cycle, GetJob).
#[derive(Debug, Default)]
pub struct JobObserver {
    /// The job id.
    pub job_id: String,
    /// The source volume.
    pub volume: String,
    /// Per-job write latencies.
    pub latencies: JobLatencies,
    /// The engine's observer slot.
    observer: Observer,
}

impl JobObserver {
    /// The observer of job `job_id` on `volume`.
    pub fn new(job_id: &str, volume: &str, observer: Observer) -> Self {
        Self {
            job_id: job_id.to_owned(),
            volume: volume.to_owned(),
            latencies: JobLatencies::default(),
            observer,
        }
    }

    /// Reports a copy of `[offset, offset+len)` that asked for its range
    /// lock at `asked`, got it at `locked`, and ended now. `result` is
    /// `Ok(true)` when it wrote zeroes.
    pub(crate) fn copy_done(
        &self,
        offset: u64,
        len: u64,
        asked: Instant,
        locked: Instant,
        result: std::result::Result<bool, &MirrorIoError>,
    ) {
        let Some(o) = self.observer.get() else {
            return;
        };
        o.copy(&CopyOp {
            job_id: &self.job_id,
            volume: &self.volume,
            offset,
            len,
            lock_wait: locked.duration_since(asked),
            total: asked.elapsed(),
            outcome: match result {
                Ok(false) => CopyOutcome::Data,
                Ok(true) => CopyOutcome::Zeroes,
                Err(e) => CopyOutcome::Failed {
                    side: e.side,
                    kind: e.error.kind(),
                },
            },
        });
    }

    /// Reports the job's creation.
    pub(crate) fn started(&self, target: &str, mode: CopyMode) {
        if let Some(o) = self.observer.get() {
            o.job_started(&JobStarted {
                job_id: &self.job_id,
                volume: &self.volume,
                target,
                mode,
            });
        }
    }

    /// Reports a state change.
    pub(crate) fn status(&self, from: JobStatus, to: JobStatus, error: Option<&str>) {
        if let Some(o) = self.observer.get() {
            o.job_status(&JobStatusChange {
                job_id: &self.job_id,
                from,
                to,
                error,
            });
        }
    }
}

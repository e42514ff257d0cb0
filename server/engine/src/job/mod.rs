//! Mirror jobs.
//!
//! A [`Job`] is shared between the API (verbs that validate against the
//! state table and record a request) and one runner task (`runner.rs`) that
//! owns the copy cursor, issues copy operations, and carries the job through
//! its life cycle. The state a job shares with guest writes lives in
//! [`active::ActiveMirror`]; its module doc explains why the target ends up
//! equal to the source.
//!
//! # The copy cursor and guest writes
//!
//! The runner walks the bitmap from a cursor, wrapping to the start, and
//! *claims* each run of dirty chunks it hands to a copy task, so it never
//! issues two copies of one chunk. The task clears the bits only once it
//! holds the range lock; until then a guest write may still land there and
//! the bits stay set. A write-blocking guest write may clean chunks ahead of
//! (or behind) the cursor; a copy that then finds no bit set does nothing.
//! READY means: no chunk dirty and no copy in flight, observed by the runner
//! between events.
//!
//! # Finishing
//!
//! `complete` (and `cancel` in READY) switch the job to write-blocking, so
//! the dirty set can only shrink, and wait for it to empty (state
//! `waiting`, then `pending`). Finalizing drains guest I/O on the source
//! volume (its I/O gate), checks once more that nothing is dirty, switches
//! the volume to the target (complete only), and lets guest I/O go on — the
//! guest-visible pause is the time the gate was held. Before the drain, the
//! target is flushed if the copier wrote to it since its last flush (see
//! `durability`: guest writes since READY carry the guest's own
//! durability and are left to the kernel's writeback).

pub mod active;
pub mod durability;
pub mod hot;
pub mod policy;
mod runner;
pub mod spec;
pub mod state;

use crate::backend::BlockBackend;
use crate::bitmap::DirtyBitmap;
use crate::definitions::VolumeDefinitions;
use crate::device::off_runtime;
use crate::error::Result;
use crate::events::{EventKind, EventLog, Progress};
use crate::store::{JobRecord, Store};
use crate::throttle::Throttle;
use crate::volume::Volume;
use active::ActiveMirror;
use spec::{CopyMode, MirrorSpec};
use state::{JobStatus, Verb};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

/// A read-only picture of a job.
#[derive(Debug, Clone)]
pub struct JobInfo {
    /// Job id.
    pub id: String,
    /// The spec.
    pub spec: MirrorSpec,
    /// State.
    pub status: JobStatus,
    /// Effective copy mode (never `Auto`).
    pub copy_mode: CopyMode,
    /// Every guest write now reaches the target before it is acknowledged.
    pub actively_synced: bool,
    /// Progress figures.
    pub progress: Progress,
    /// Copy rate limit.
    pub speed_bytes_per_sec: u64,
    /// Last error.
    pub error: Option<String>,
    /// Creation time.
    pub created_at: SystemTime,
    /// Last state change.
    pub updated_at: SystemTime,
    /// Sequence of the job's last numbered event.
    pub last_event_sequence: u64,
    /// Bytes held in flight now.
    pub in_flight_bytes: u64,
    /// Most bytes ever held in flight.
    pub peak_in_flight_bytes: u64,
    /// Bytes the copier wrote to the target.
    pub copied_bytes: u64,
    /// Bytes of guest writes written to the target synchronously
    /// (write-blocking); with `copied_bytes`, all the target was sent.
    pub synced_guest_bytes: u64,
    /// The source volume was switched to the target.
    pub pivoted: bool,
    /// Percentiles of guest write latency while the job ran.
    pub write_latency: crate::observe::WriteLatencySummary,
}

/// Requests and figures guarded by the job's mutex.
#[derive(Debug)]
struct Shared {
    status: JobStatus,
    error: Option<String>,
    pivoted: bool,
    updated_at: SystemTime,
    last_event_sequence: u64,
    /// Requested mode; `Auto` lets the runner choose.
    requested_mode: CopyMode,
    complete_requested: bool,
    /// `Some(force)` once cancel was asked for.
    cancel_requested: Option<bool>,
    finalize_requested: bool,
    /// Paused before the runner started: it goes running → paused at once
    /// (created → paused is not a transition of the state machine).
    pause_at_start: bool,
    copy_rate: u64,
    dirty_rate: u64,
    /// Bytes/s by which the dirty set shrank over the trend window (the
    /// runner's sampler); `None` until the window has filled.
    net_rate: Option<i64>,
    /// The shutdown saved the dirty bitmap for a resume (see
    /// `JobRecord::dirty_bitmap_saved`).
    bitmap_saved: bool,
    /// Records taken so far: each is numbered (see `Job::record_saved`).
    records_taken: u64,
}

/// One mirror job.
pub struct Job {
    id: String,
    spec: MirrorSpec,
    created_at: SystemTime,
    shared: Mutex<Shared>,
    /// Wakes the runner after a verb recorded a request.
    changed: Notify,
    /// Current state, for long polls.
    status_tx: watch::Sender<JobStatus>,
    mirror: Arc<ActiveMirror>,
    source: Arc<Volume>,
    target_volume: Option<Arc<Volume>>,
    target_backend: Arc<dyn BlockBackend>,
    events: Arc<EventLog>,
    store: Arc<Store>,
    /// The copy rate limit (`speed`).
    speed: Throttle,
    /// Cancelled at shutdown: the runner stops and saves the record.
    shutdown: CancellationToken,
    /// The volume definitions on disk, which a pivot rewrites.
    definitions: Arc<VolumeDefinitions>,
    /// Restarted from its record after blockmirrord restarted.
    resumed: bool,
    /// The dirty bitmap a clean shutdown saved, for a resumed job to start
    /// from; a resumed job without one copies the whole source again (the
    /// writes tracked before a crash died with the process). Taken at start.
    resume_bitmap: Mutex<Option<DirtyBitmap>>,
    /// The source volume's file at the start (see `JobRecord::source_path`).
    source_path: String,
    /// The number of the newest record on disk: saves from several threads
    /// write one at a time, and never an older record over a newer one.
    record_saved: Arc<Mutex<u64>>,
}

/// Writes record number `number` unless a newer one is on disk already.
fn save_record(store: &Store, saved: &Mutex<u64>, number: u64, record: &JobRecord) -> Result<()> {
    let mut newest = saved
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if number < *newest {
        return Ok(());
    }
    store.save_job(record)?;
    *newest = number;
    Ok(())
}

fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Everything a new job is made of (built by the engine).
#[allow(missing_debug_implementations)]
pub(crate) struct JobParts {
    pub id: String,
    pub spec: MirrorSpec,
    pub source: Arc<Volume>,
    pub target_volume: Option<Arc<Volume>>,
    pub target_backend: Arc<dyn BlockBackend>,
    pub mirror: Arc<ActiveMirror>,
    pub events: Arc<EventLog>,
    pub store: Arc<Store>,
    pub shutdown: CancellationToken,
    pub definitions: Arc<VolumeDefinitions>,
    /// `Some(created_at)` for a job resumed from its record.
    pub resumed_from: Option<SystemTime>,
    /// The saved dirty bitmap of a job resumed after a clean shutdown.
    pub resume_bitmap: Option<DirtyBitmap>,
}

impl Job {
    pub(crate) fn new(p: JobParts) -> Arc<Self> {
        let now = SystemTime::now();
        let speed = Throttle::new(p.spec.speed_limits());
        Arc::new(Self {
            shared: Mutex::new(Shared {
                status: JobStatus::Created,
                error: None,
                pivoted: false,
                updated_at: now,
                last_event_sequence: 0,
                requested_mode: p.spec.copy_mode,
                complete_requested: false,
                cancel_requested: None,
                finalize_requested: false,
                pause_at_start: false,
                copy_rate: 0,
                dirty_rate: 0,
                net_rate: None,
                bitmap_saved: false,
                records_taken: 0,
            }),
            id: p.id,
            spec: p.spec,
            created_at: p.resumed_from.unwrap_or(now),
            resumed: p.resumed_from.is_some(),
            resume_bitmap: Mutex::new(p.resume_bitmap),
            source_path: p.source.path(),
            record_saved: Arc::new(Mutex::new(0)),
            changed: Notify::new(),
            status_tx: watch::channel(JobStatus::Created).0,
            mirror: p.mirror,
            source: p.source,
            target_volume: p.target_volume,
            target_backend: p.target_backend,
            events: p.events,
            store: p.store,
            speed,
            shutdown: p.shutdown,
            definitions: p.definitions,
        })
    }

    /// Starts the runner; `on_exit` runs after it concluded (or stopped at shutdown).
    pub(crate) fn spawn(
        self: &Arc<Self>,
        tracker: &tokio_util::task::TaskTracker,
        on_exit: impl FnOnce(Arc<Job>) + Send + 'static,
    ) {
        let job = Arc::clone(self);
        tracker.spawn(async move {
            Arc::clone(&job).run().await;
            on_exit(job);
        });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        // Every update below assigns plain fields; none can be left half done.
        self.shared
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The job id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The spec it was started with.
    pub fn spec(&self) -> &MirrorSpec {
        &self.spec
    }

    /// Current state.
    pub fn status(&self) -> JobStatus {
        self.lock().status
    }

    /// The engine's view of progress; total grows as guests dirty chunks.
    fn progress(&self, s: &Shared) -> Progress {
        let current = self.mirror.counters.progress_bytes.load(Ordering::Relaxed);
        let dirty = self.mirror.dirty_bytes();
        let (convergence, eta_to_ready_ms) = match s.status {
            JobStatus::Paused | JobStatus::Standby if dirty > 0 => {
                (crate::events::Convergence::Stalled, None)
            }
            // The initial dirty set is not in the bitmap yet.
            JobStatus::Created => (crate::events::Convergence::Converging, None),
            _ => crate::events::Convergence::forecast(dirty, s.copy_rate, s.net_rate),
        };
        Progress {
            current_bytes: current,
            total_bytes: current + dirty,
            dirty_bytes: dirty,
            copy_rate: s.copy_rate,
            dirty_rate: s.dirty_rate,
            convergence,
            eta_to_ready_ms,
        }
    }

    /// A snapshot for the API.
    pub fn info(&self) -> JobInfo {
        let s = self.lock();
        let write_blocking = self.mirror.is_write_blocking();
        JobInfo {
            id: self.id.clone(),
            spec: self.spec.clone(),
            status: s.status,
            copy_mode: if write_blocking {
                CopyMode::WriteBlocking
            } else {
                CopyMode::Background
            },
            actively_synced: write_blocking
                && !self.mirror.is_target_failing()
                && !s.status.is_terminal()
                && s.status != JobStatus::Aborting
                && self.mirror.dirty_chunks() == 0,
            progress: self.progress(&s),
            speed_bytes_per_sec: self.speed.limits().bytes_per_sec,
            error: s.error.clone(),
            created_at: self.created_at,
            updated_at: s.updated_at,
            last_event_sequence: s.last_event_sequence,
            in_flight_bytes: self.mirror.budget.current(),
            peak_in_flight_bytes: self.mirror.budget.peak(),
            copied_bytes: self.mirror.counters.copied_bytes.load(Ordering::Relaxed),
            synced_guest_bytes: self
                .mirror
                .counters
                .synced_guest_bytes
                .load(Ordering::Relaxed),
            pivoted: s.pivoted,
            write_latency: self.mirror.observed.latencies.summary(),
        }
    }

    /// The durable record.
    pub(crate) fn record(&self) -> JobRecord {
        self.numbered_record().1
    }

    /// The record and its number (see `Shared::records_taken`).
    fn numbered_record(&self) -> (u64, JobRecord) {
        let mut s = self.lock();
        s.records_taken += 1;
        let number = s.records_taken;
        let record = JobRecord {
            id: self.id.clone(),
            spec: self.spec.clone(),
            status: s.status,
            error: s.error.clone(),
            pivoted: s.pivoted,
            created_at_ms: millis(self.created_at),
            source_path: Some(self.source_path.clone()),
            cancel_requested: s.cancel_requested.is_some(),
            dirty_bitmap_saved: s.bitmap_saved,
        };
        (number, record)
    }

    /// Saves the record; blocks on a file sync (see [`Self::save_async`]).
    fn save(&self) {
        let (number, record) = self.numbered_record();
        if let Err(e) = save_record(&self.store, &self.record_saved, number, &record) {
            tracing::error!(job_id = %self.id, error = %e.chain(), "saving job record");
        }
    }

    /// Saves the record on the blocking pool (the runner, StartMirror): a sync
    /// on an async thread holds up every task queued behind it there —
    /// at the pivot, the guest writes the pause has just released.
    pub(crate) async fn save_async(&self) {
        let (number, record) = self.numbered_record();
        let (store, saved) = (Arc::clone(&self.store), Arc::clone(&self.record_saved));
        let saving = move || save_record(&store, &saved, number, &record);
        if let Err(e) = off_runtime("saving the job record", saving).await {
            tracing::error!(job_id = %self.id, error = %e.chain(), "saving job record");
        }
    }

    fn emit(&self, s: &mut Shared, kind: EventKind) {
        s.last_event_sequence = self.events.emit(&self.id, kind);
    }

    /// Moves to `to` (checked against the transition table), emits
    /// JOB_STATUS_CHANGE and saves the record.
    fn transition(&self, s: &mut Shared, to: JobStatus) {
        if s.status == to {
            return;
        }
        debug_assert!(s.status.can_become(to), "{} -> {to}", s.status);
        if !s.status.can_become(to) {
            tracing::error!(job_id = %self.id, from = %s.status, %to, "illegal job transition refused");
            return;
        }
        tracing::info!(job_id = %self.id, from = %s.status, %to, "job state");
        (self.mirror.observed).status(s.status, to, s.error.as_deref());
        s.status = to;
        s.updated_at = SystemTime::now();
        self.emit(s, EventKind::StatusChange(to));
        self.status_tx.send_replace(to);
    }

    fn check_verb(&self, s: &Shared, verb: Verb) -> Result<()> {
        s.status.check(&self.id, verb)
    }

    fn after_verb(&self, s: std::sync::MutexGuard<'_, Shared>) -> JobInfo {
        drop(s);
        self.save();
        self.changed.notify_one();
        self.info()
    }

    /// running → paused, ready → standby. Already paused: no change.
    ///
    /// # Errors
    /// `FailedPrecondition` in states that do not allow it.
    pub fn pause(&self) -> Result<JobInfo> {
        let mut s = self.lock();
        self.check_verb(&s, Verb::Pause)?;
        match s.status {
            JobStatus::Running => self.transition(&mut s, JobStatus::Paused),
            JobStatus::Created => s.pause_at_start = true,
            JobStatus::Ready => self.transition(&mut s, JobStatus::Standby),
            _ => {}
        }
        Ok(self.after_verb(s))
    }

    /// paused → running, standby → ready. Not paused: no change.
    ///
    /// # Errors
    /// `FailedPrecondition` in states that do not allow it.
    pub fn resume(&self) -> Result<JobInfo> {
        let mut s = self.lock();
        self.check_verb(&s, Verb::Resume)?;
        match s.status {
            JobStatus::Paused => self.transition(&mut s, JobStatus::Running),
            JobStatus::Standby => self.transition(&mut s, JobStatus::Ready),
            JobStatus::Created => s.pause_at_start = false,
            _ => {}
        }
        s.error = None;
        Ok(self.after_verb(s))
    }

    /// Changes the copy rate limit (0 = unlimited).
    ///
    /// # Errors
    /// `FailedPrecondition` in states that do not allow it.
    pub fn set_speed(&self, bytes_per_sec: u64) -> Result<JobInfo> {
        let s = self.lock();
        self.check_verb(&s, Verb::SetSpeed)?;
        self.speed.set_limits(crate::throttle::RateLimits {
            bytes_per_sec,
            ops_per_sec: 0,
        });
        Ok(self.after_verb(s))
    }

    /// Changes the copy mode, in both directions.
    ///
    /// # Errors
    /// `FailedPrecondition` in states that do not allow it, or while the
    /// job is finishing (it must stay write-blocking to converge).
    pub fn change_mode(&self, mode: CopyMode) -> Result<JobInfo> {
        let mut s = self.lock();
        self.check_verb(&s, Verb::Change)?;
        s.requested_mode = mode;
        let wb = self.mirror.is_write_blocking();
        let want = match mode {
            CopyMode::WriteBlocking => Some(true),
            CopyMode::Background => Some(false),
            CopyMode::Auto => None,
        };
        if let Some(want) = want
            && want != wb
        {
            self.set_mode(&mut s, want, "requested");
        }
        Ok(self.after_verb(s))
    }

    /// Switches the effective mode and emits COPY_MODE_CHANGED.
    fn set_mode(&self, s: &mut Shared, write_blocking: bool, reason: &str) {
        let from = self.mirror.is_write_blocking();
        if from == write_blocking {
            return;
        }
        self.mirror.set_write_blocking(write_blocking);
        let m = |wb| {
            if wb {
                CopyMode::WriteBlocking
            } else {
                CopyMode::Background
            }
        };
        tracing::info!(job_id = %self.id, to = %m(write_blocking), reason, "copy mode changed");
        self.emit(
            s,
            EventKind::CopyModeChanged {
                from: m(from),
                to: m(write_blocking),
                reason: reason.to_owned(),
            },
        );
    }

    /// Only from ready: converge in write-blocking mode, then pivot.
    ///
    /// # Errors
    /// `FailedPrecondition` unless ready.
    pub fn complete(&self) -> Result<JobInfo> {
        let mut s = self.lock();
        self.check_verb(&s, Verb::Complete)?;
        s.complete_requested = true;
        self.set_mode(&mut s, true, "complete");
        self.transition(&mut s, JobStatus::Waiting);
        Ok(self.after_verb(s))
    }

    /// Cancels. In ready (or standby) without `force`: converge and keep
    /// the target as a consistent copy, no pivot. Otherwise: stop at once.
    ///
    /// # Errors
    /// `FailedPrecondition` in states that do not allow it.
    pub fn cancel(&self, force: bool) -> Result<JobInfo> {
        let mut s = self.lock();
        self.check_verb(&s, Verb::Cancel)?;
        let graceful = !force && matches!(s.status, JobStatus::Ready | JobStatus::Standby);
        if graceful {
            if s.status == JobStatus::Standby {
                self.transition(&mut s, JobStatus::Ready);
            }
            s.cancel_requested = Some(false);
            self.set_mode(&mut s, true, "cancel");
            self.transition(&mut s, JobStatus::Waiting);
        } else if s.cancel_requested != Some(false) || force {
            // A graceful cancel (or complete) already under way is only
            // overridden by force.
            s.cancel_requested = Some(true);
            self.transition(&mut s, JobStatus::Aborting);
        }
        Ok(self.after_verb(s))
    }

    /// pending → concluded (pivot).
    ///
    /// # Errors
    /// `FailedPrecondition` unless pending.
    pub fn finalize(&self) -> Result<JobInfo> {
        let mut s = self.lock();
        self.check_verb(&s, Verb::Finalize)?;
        s.finalize_requested = true;
        Ok(self.after_verb(s))
    }

    /// concluded → null. The engine forgets the job afterwards.
    ///
    /// # Errors
    /// `FailedPrecondition` unless concluded.
    pub(crate) fn dismiss(&self) -> Result<JobInfo> {
        let mut s = self.lock();
        self.check_verb(&s, Verb::Dismiss)?;
        self.transition(&mut s, JobStatus::Null);
        self.emit(&mut s, EventKind::Dismissed);
        drop(s);
        if let Err(e) = self.store.remove_job(&self.id) {
            tracing::error!(job_id = %self.id, error = %e.chain(), "removing job record");
        }
        Ok(self.info())
    }

    /// Waits until the state is one of `until`, or `timeout` passes;
    /// returns the job either way.
    pub async fn wait(&self, until: &[JobStatus], timeout: Duration) -> JobInfo {
        let mut rx = self.status_tx.subscribe();
        let _ = tokio::time::timeout(timeout, rx.wait_for(|s| until.contains(s))).await;
        self.info()
    }
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("id", &self.id)
            .field("status", &self.status())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(status: JobStatus) -> JobRecord {
        JobRecord {
            id: "j".into(),
            spec: MirrorSpec::for_tests(),
            status,
            error: None,
            pivoted: false,
            created_at_ms: 0,
            source_path: None,
            cancel_requested: false,
            dirty_bitmap_saved: false,
        }
    }

    #[test]
    fn an_older_record_saved_late_does_not_replace_a_newer_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let saved = Mutex::new(0);
        save_record(&store, &saved, 2, &record(JobStatus::Ready)).unwrap();
        // Taken before number 2, written after it (another thread).
        save_record(&store, &saved, 1, &record(JobStatus::Running)).unwrap();
        assert_eq!(store.load_jobs().unwrap()[0].status, JobStatus::Ready);
        save_record(&store, &saved, 3, &record(JobStatus::Concluded)).unwrap();
        assert_eq!(store.load_jobs().unwrap()[0].status, JobStatus::Concluded);
    }
}

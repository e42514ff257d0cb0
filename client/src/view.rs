//! [`JobView`]: one job's live state, folded from a job record and the
//! events that follow it; [`JobEnd`]: how a job finished.
//!
//! A watcher opens the event stream with `after_sequence` set to the
//! `last_event_sequence` of a record it already has, so it sees every event
//! since then. The server sends a fresh snapshot first and replays the
//! older events after it, so an event can be older than the snapshot. The
//! view therefore keeps two kinds of facts apart:
//!
//! - the *current* state and progress, taken only from what is newer than
//!   everything applied so far (by sequence number), so a replayed event
//!   never rolls the view back;
//! - the *history* since the first record: every state the job was seen
//!   in, whether it became ready, and how it ended. Replayed events add to
//!   the history whatever their order.
//!
//! Folding is synchronous and needs no runtime, so it is unit-tested with
//! scripted sequences.

use std::fmt;
use std::time::Duration;

use blockmirror_proto::v1::{Convergence, CopyMode, Event, EventType, Job, JobState};

use crate::names::{is_final_state, job_state_name};

/// How a job finished.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobEnd {
    /// It finished without error; `pivoted` says whether the source volume
    /// was switched to the target (false: cancelled in ready state, which
    /// QEMU also reports as completed).
    Completed {
        /// The source volume now uses the target.
        pivoted: bool,
    },
    /// It was cancelled before it became ready.
    Cancelled,
    /// It ended with an error.
    Failed {
        /// The job's error message.
        error: String,
    },
    /// It was dismissed before its outcome could be seen.
    Gone,
}

impl JobEnd {
    /// The outcome a finished job record shows. Records do not tell a
    /// cancel from a completion without pivot; events do.
    pub fn from_job(job: &Job) -> Self {
        if job.error.is_empty() {
            Self::Completed {
                pivoted: job.pivoted,
            }
        } else {
            Self::Failed {
                error: job.error.clone(),
            }
        }
    }

    /// Whether the job finished without error (pivoted or not, or gone
    /// with no error seen).
    pub fn is_success(&self) -> bool {
        matches!(self, Self::Completed { .. } | Self::Gone)
    }
}

impl fmt::Display for JobEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Completed { pivoted: true } => f.write_str("completed and pivoted to the target"),
            Self::Completed { pivoted: false } => f.write_str("completed without pivot"),
            Self::Cancelled => f.write_str("cancelled"),
            Self::Failed { error } => write!(f, "failed: {error}"),
            Self::Gone => f.write_str("dismissed before its outcome was seen"),
        }
    }
}

/// The live view of one job.
#[derive(Debug, Clone, PartialEq)]
pub struct JobView {
    /// Job id.
    pub id: String,
    /// Current state (newest by sequence).
    pub state: JobState,
    /// Copy mode in effect.
    pub copy_mode: CopyMode,
    /// Bytes copied so far.
    pub current_progress: u64,
    /// Bytes to copy in all (grows as guests dirty chunks).
    pub total_progress: u64,
    /// Bytes dirty now.
    pub dirty_bytes: u64,
    /// Copy rate, bytes per second.
    pub copy_rate: u64,
    /// Rate at which guests dirty chunks, bytes per second.
    pub dirty_rate: u64,
    /// The server's forecast; `Unspecified` when it sent none (an older
    /// server).
    pub convergence: Convergence,
    /// The server's estimate of the time to READY, in milliseconds; `None`
    /// when it cannot estimate one (stalled, diverging) or sent none.
    pub eta_to_ready_ms: Option<u64>,
    /// Last error, if any.
    pub error: Option<String>,
    /// Sequence of the newest record or event applied.
    pub last_sequence: u64,
    /// How the job ended, once known.
    pub end: Option<JobEnd>,
    /// The job is gone: dismissed, or `NOT_FOUND` after it was seen.
    pub gone: bool,
    /// Every state seen since the first record, in the order seen.
    seen: Vec<JobState>,
}

impl JobView {
    /// A view from a job record.
    pub fn from_job(job: &Job) -> Self {
        let mut view = Self {
            id: job.id.clone(),
            state: JobState::Unspecified,
            copy_mode: CopyMode::Unspecified,
            current_progress: 0,
            total_progress: 0,
            dirty_bytes: 0,
            copy_rate: 0,
            dirty_rate: 0,
            convergence: Convergence::Unspecified,
            eta_to_ready_ms: None,
            error: None,
            last_sequence: 0,
            end: None,
            gone: false,
            seen: Vec::new(),
        };
        view.apply_job(job);
        view
    }

    /// Applies a job record (a snapshot, or a `GetJob`/`WaitJob` reply).
    /// Ignored for the current fields if an event newer than the record has
    /// already been applied; its state still counts as seen.
    pub fn apply_job(&mut self, job: &Job) {
        let state = job.state();
        self.see(state);
        if job.last_event_sequence >= self.last_sequence {
            self.last_sequence = job.last_event_sequence;
            self.state = state;
            self.copy_mode = job.copy_mode();
            self.current_progress = job.current_progress_bytes;
            self.total_progress = job.total_progress_bytes;
            self.dirty_bytes = job.dirty_bytes;
            self.copy_rate = job.copy_rate_bytes_per_sec;
            self.dirty_rate = job.dirty_rate_bytes_per_sec;
            self.convergence = job.convergence();
            self.eta_to_ready_ms = job.eta_to_ready_ms;
            self.error = (!job.error.is_empty()).then(|| job.error.clone());
        }
        if is_final_state(state) && self.end.is_none() {
            self.end = Some(JobEnd::from_job(job));
        }
    }

    /// Applies one event of this job.
    pub fn apply_event(&mut self, ev: &Event) {
        let kind = ev.r#type();
        // PROGRESS samples are not numbered: they carry the latest numbered
        // sequence and are never replayed, so one at the current sequence
        // was taken after everything applied so far.
        let fresh = ev.sequence > self.last_sequence
            || (kind == EventType::Progress && ev.sequence == self.last_sequence);
        if fresh {
            self.last_sequence = ev.sequence;
        }
        match kind {
            EventType::JobStatusChange => {
                let state = ev.state();
                self.see(state);
                if fresh {
                    self.state = state;
                }
            }
            EventType::BlockJobReady => {
                // The server may send READY before or after the status
                // change; either way the job is ready now.
                self.see(JobState::Ready);
                if fresh {
                    self.state = JobState::Ready;
                }
            }
            EventType::BlockJobCompleted => {
                self.end = Some(if ev.error.is_empty() {
                    JobEnd::Completed {
                        pivoted: ev.pivoted,
                    }
                } else {
                    JobEnd::Failed {
                        error: ev.error.clone(),
                    }
                });
            }
            EventType::BlockJobCancelled => self.end = Some(JobEnd::Cancelled),
            EventType::BlockJobError => {
                if fresh && !ev.error.is_empty() {
                    self.error = Some(ev.error.clone());
                }
            }
            EventType::CopyModeChanged => {
                if fresh {
                    self.copy_mode = ev.to_mode();
                }
            }
            EventType::JobDismissed => {
                self.see(JobState::Null);
                self.gone = true;
                self.state = JobState::Null;
            }
            EventType::Progress | EventType::BlockJobPending | EventType::Unspecified => {}
        }
        let carries_progress = matches!(
            kind,
            EventType::Progress
                | EventType::BlockJobReady
                | EventType::BlockJobCompleted
                | EventType::BlockJobCancelled
        );
        if fresh && carries_progress {
            self.current_progress = ev.current_progress_bytes;
            self.total_progress = ev.total_progress_bytes;
            self.dirty_bytes = ev.dirty_bytes;
            self.copy_rate = ev.copy_rate_bytes_per_sec;
            self.dirty_rate = ev.dirty_rate_bytes_per_sec;
            self.convergence = ev.convergence();
            self.eta_to_ready_ms = ev.eta_to_ready_ms;
        }
    }

    /// Records that the job no longer exists (`NOT_FOUND` after it was
    /// seen): it was dismissed, so it is in state null.
    pub fn mark_gone(&mut self) {
        self.gone = true;
        self.see(JobState::Null);
        self.state = JobState::Null;
        if self.end.is_none() {
            self.end = Some(match &self.error {
                Some(error) => JobEnd::Failed {
                    error: error.clone(),
                },
                None => JobEnd::Gone,
            });
        }
    }

    /// Whether the job was seen in `state` since the first record.
    pub fn has_seen(&self, state: JobState) -> bool {
        self.seen.contains(&state)
    }

    /// Whether the job has finished for good (concluded, null or gone).
    pub fn is_finished(&self) -> bool {
        self.gone || self.seen.iter().any(|s| is_final_state(*s))
    }

    /// Estimated time to copy what is left at the current copy rate, in
    /// whole seconds; `None` when nothing is being copied. Ignores the
    /// guests' dirty rate; see [`JobView::eta_to_ready`].
    pub fn eta_secs(&self) -> Option<u64> {
        let left = self.total_progress.saturating_sub(self.current_progress);
        (self.copy_rate > 0 && left > 0).then(|| left.div_ceil(self.copy_rate))
    }

    /// Estimated time until the job is ready: the server's forecast when it
    /// sends one (`None` while it cannot estimate, e.g. diverging), else
    /// (an older server) the time to copy what is left at the copy rate.
    pub fn eta_to_ready(&self) -> Option<Duration> {
        if self.convergence == Convergence::Unspecified && self.eta_to_ready_ms.is_none() {
            self.eta_secs().map(Duration::from_secs)
        } else {
            self.eta_to_ready_ms.map(Duration::from_millis)
        }
    }

    /// The lowercase name of the current state.
    pub fn state_name(&self) -> &'static str {
        job_state_name(self.state)
    }

    /// Writes the view's current fields into a job record, so a final
    /// record printed after a wait shows the last state seen.
    pub fn merge_into(&self, job: &mut Job) {
        if self.last_sequence >= job.last_event_sequence {
            job.last_event_sequence = self.last_sequence;
            job.set_state(self.state);
            job.set_copy_mode(self.copy_mode);
            job.current_progress_bytes = self.current_progress;
            job.total_progress_bytes = self.total_progress;
            job.dirty_bytes = self.dirty_bytes;
            job.copy_rate_bytes_per_sec = self.copy_rate;
            job.dirty_rate_bytes_per_sec = self.dirty_rate;
            job.set_convergence(self.convergence);
            job.eta_to_ready_ms = self.eta_to_ready_ms;
            if let Some(error) = &self.error {
                job.error.clone_from(error);
            }
        }
        if let Some(JobEnd::Completed { pivoted: true }) = self.end {
            job.pivoted = true;
        }
    }

    fn see(&mut self, state: JobState) {
        if state != JobState::Unspecified && !self.seen.contains(&state) {
            self.seen.push(state);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn job(id: &str, state: JobState, seq: u64) -> Job {
        let mut job = Job {
            id: id.into(),
            last_event_sequence: seq,
            ..Job::default()
        };
        job.set_state(state);
        job
    }

    pub(crate) fn status(id: &str, seq: u64, state: JobState) -> Event {
        let mut ev = Event {
            sequence: seq,
            job_id: id.into(),
            ..Event::default()
        };
        ev.set_type(EventType::JobStatusChange);
        ev.set_state(state);
        ev
    }

    pub(crate) fn event(id: &str, seq: u64, kind: EventType) -> Event {
        let mut ev = Event {
            sequence: seq,
            job_id: id.into(),
            ..Event::default()
        };
        ev.set_type(kind);
        ev
    }

    #[test]
    fn follows_status_changes_and_progress() {
        let mut v = JobView::from_job(&job("j", JobState::Created, 1));
        v.apply_event(&status("j", 2, JobState::Running));
        let mut p = event("j", 3, EventType::Progress);
        p.current_progress_bytes = 10;
        p.total_progress_bytes = 100;
        p.dirty_bytes = 90;
        p.copy_rate_bytes_per_sec = 9;
        v.apply_event(&p);
        assert_eq!(v.state, JobState::Running);
        assert_eq!(
            (v.current_progress, v.total_progress, v.dirty_bytes),
            (10, 100, 90)
        );
        assert_eq!(v.eta_secs(), Some(10));
        assert!(v.has_seen(JobState::Created) && v.has_seen(JobState::Running));
        assert!(!v.is_finished());
    }

    #[test]
    fn progress_samples_at_the_current_sequence_count() {
        // The server numbers only history events; PROGRESS carries the
        // latest number, so several samples share it.
        let mut v = JobView::from_job(&job("j", JobState::Running, 2));
        for (copied, eta) in [(10, 9_000), (20, 8_000)] {
            let mut p = event("j", 2, EventType::Progress);
            p.current_progress_bytes = copied;
            p.total_progress_bytes = 100;
            p.set_convergence(Convergence::Converging);
            p.eta_to_ready_ms = Some(eta);
            v.apply_event(&p);
            assert_eq!(v.current_progress, copied);
            assert_eq!(v.eta_to_ready_ms, Some(eta));
        }
        assert_eq!(v.last_sequence, 2);
        // Any other event at an old sequence is a replay and changes nothing.
        let mut ready = event("j", 2, EventType::BlockJobReady);
        ready.current_progress_bytes = 1;
        v.apply_event(&ready);
        assert_eq!(v.current_progress, 20);
        assert_eq!(v.state, JobState::Running);
    }

    #[test]
    fn follows_the_forecast() {
        let mut j = job("j", JobState::Running, 1);
        j.total_progress_bytes = 100;
        j.copy_rate_bytes_per_sec = 10;
        // An older server: no forecast, so the copy-rate estimate.
        let mut v = JobView::from_job(&j);
        assert_eq!(v.convergence, Convergence::Unspecified);
        assert_eq!(v.eta_to_ready(), Some(Duration::from_secs(10)));

        let mut p = event("j", 2, EventType::Progress);
        p.total_progress_bytes = 100;
        p.copy_rate_bytes_per_sec = 10;
        p.set_convergence(Convergence::Converging);
        p.eta_to_ready_ms = Some(12_500);
        v.apply_event(&p);
        assert_eq!(v.convergence, Convergence::Converging);
        assert_eq!(v.eta_to_ready(), Some(Duration::from_millis(12_500)));

        // Diverging: the server has no estimate, and neither do we.
        p.sequence = 3;
        p.set_convergence(Convergence::Diverging);
        p.eta_to_ready_ms = None;
        v.apply_event(&p);
        assert_eq!(v.convergence, Convergence::Diverging);
        assert_eq!(v.eta_to_ready(), None);

        // A replayed older event does not bring the old forecast back.
        let mut old = p.clone();
        old.sequence = 2;
        old.set_convergence(Convergence::Converging);
        old.eta_to_ready_ms = Some(1);
        v.apply_event(&old);
        assert_eq!(v.convergence, Convergence::Diverging);

        // Status changes carry no forecast and keep it.
        v.apply_event(&status("j", 4, JobState::Paused));
        assert_eq!(v.convergence, Convergence::Diverging);

        let mut rec = job("j", JobState::Running, 1);
        v.merge_into(&mut rec);
        assert_eq!(rec.convergence(), Convergence::Diverging);
        assert_eq!(rec.eta_to_ready_ms, None);
    }

    #[test]
    fn replayed_events_do_not_roll_back_a_newer_snapshot() {
        // Record at seq 1, then the stream: snapshot at seq 5 (ready), then
        // the replay of seq 2..=5.
        let mut v = JobView::from_job(&job("j", JobState::Created, 1));
        v.apply_job(&job("j", JobState::Ready, 5));
        v.apply_event(&status("j", 2, JobState::Running));
        v.apply_event(&event("j", 3, EventType::BlockJobReady));
        v.apply_event(&status("j", 4, JobState::Ready));
        assert_eq!(v.state, JobState::Ready);
        assert!(v.has_seen(JobState::Running));
        v.apply_event(&status("j", 6, JobState::Waiting));
        assert_eq!(v.state, JobState::Waiting);
    }

    #[test]
    fn ready_event_counts_as_seen_ready() {
        let mut v = JobView::from_job(&job("j", JobState::Running, 1));
        v.apply_event(&event("j", 2, EventType::BlockJobReady));
        assert!(v.has_seen(JobState::Ready));
        assert_eq!(v.state, JobState::Ready);
    }

    #[test]
    fn completion_and_cancel_are_recorded() {
        let mut v = JobView::from_job(&job("j", JobState::Ready, 1));
        let mut done = event("j", 2, EventType::BlockJobCompleted);
        done.pivoted = true;
        v.apply_event(&done);
        v.apply_event(&status("j", 3, JobState::Concluded));
        assert!(v.is_finished());
        assert_eq!(v.end, Some(JobEnd::Completed { pivoted: true }));

        let mut v = JobView::from_job(&job("j", JobState::Running, 1));
        v.apply_event(&event("j", 2, EventType::BlockJobCancelled));
        v.apply_event(&status("j", 3, JobState::Concluded));
        assert_eq!(v.end, Some(JobEnd::Cancelled));
        assert!(!v.end.as_ref().unwrap().is_success());

        let mut v = JobView::from_job(&job("j", JobState::Running, 1));
        let mut failed = event("j", 2, EventType::BlockJobCompleted);
        failed.error = "writing chunk to mirror target".into();
        v.apply_event(&failed);
        assert_eq!(
            v.end,
            Some(JobEnd::Failed {
                error: "writing chunk to mirror target".into()
            })
        );
    }

    #[test]
    fn final_record_gives_an_end_and_dismissal_marks_gone() {
        let mut j = job("j", JobState::Concluded, 4);
        j.error = "boom".into();
        let v = JobView::from_job(&j);
        assert_eq!(
            v.end,
            Some(JobEnd::Failed {
                error: "boom".into()
            })
        );

        let mut v = JobView::from_job(&job("j", JobState::Running, 1));
        v.mark_gone();
        assert!(v.is_finished() && v.has_seen(JobState::Null));
        assert_eq!(v.end, Some(JobEnd::Gone));

        let mut v = JobView::from_job(&job("j", JobState::Concluded, 1));
        v.apply_event(&event("j", 2, EventType::JobDismissed));
        assert!(v.gone);
        assert_eq!(v.state, JobState::Null);
    }

    #[test]
    fn merge_into_updates_the_record() {
        let mut j = job("j", JobState::Running, 1);
        let mut v = JobView::from_job(&j);
        v.apply_event(&status("j", 2, JobState::Ready));
        v.merge_into(&mut j);
        assert_eq!(j.state(), JobState::Ready);
        assert_eq!(j.last_event_sequence, 2);
    }
}

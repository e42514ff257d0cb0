//! Waiting for a job to reach a state: [`Client::wait_for_job`].
//!
//! The wait follows the event stream (`WatchEvents` for the job, replayed
//! from the `last_event_sequence` of the record it starts from), so it sees
//! every state the job passes through, however briefly, and learns how the
//! job ended from `BLOCK_JOB_COMPLETED` / `BLOCK_JOB_CANCELLED`. If the
//! stream cannot be opened or breaks off, it falls back to `WaitJob` long
//! polls, which only see the state at each return.
//!
//! A job that is auto-dismissed disappears: `NOT_FOUND` after the job was
//! seen means it finished and reached state null.
//!
//! [`decide`] is the pure rule that turns a [`JobView`] into an outcome.

use std::time::Duration;

use blockmirror_proto::v1::{Job, JobState};
use futures::StreamExt;
use tokio::time::Instant;

use crate::client::Client;
use crate::error::ClientError;
use crate::view::{JobEnd, JobView};
use crate::watch::{EventStream, WatchItem};

/// Longest single `WaitJob` long poll in the fallback: short enough to keep
/// a progress display moving.
const POLL_SLICE: Duration = Duration::from_secs(2);

/// What to wait for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaitOptions {
    /// Stop when the job is, or has been since the wait began, in one of
    /// these states.
    pub until: Vec<JobState>,
    /// Give up after this long; `None` waits for ever.
    pub timeout: Option<Duration>,
}

impl WaitOptions {
    /// Wait until the job is ready (has converged).
    pub fn ready() -> Self {
        Self {
            until: vec![JobState::Ready],
            timeout: None,
        }
    }

    /// Wait until the job has finished (concluded, or dismissed: null).
    pub fn done() -> Self {
        Self {
            until: vec![JobState::Concluded, JobState::Null],
            timeout: None,
        }
    }

    /// The same wait, giving up after `timeout`.
    #[must_use]
    pub fn with_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.timeout = timeout;
        self
    }
}

/// How a wait ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WaitOutcome {
    /// The job reached (or passed through) this state of `until`. For a
    /// final state, [`JobView::end`] of the report says how it ended.
    Reached(JobState),
    /// The job finished without reaching any state of `until`.
    Ended(JobEnd),
    /// The timeout passed first.
    TimedOut,
}

/// The result of a wait.
#[derive(Debug, Clone, PartialEq)]
pub struct WaitReport {
    /// Why the wait stopped.
    pub outcome: WaitOutcome,
    /// The job as last seen.
    pub view: JobView,
    /// The job for printing: fetched once more after the wait, or, if it
    /// is gone, the newest record seen with the view's newer fields merged
    /// in.
    pub job: Job,
}

/// Decides whether a wait for `until` is over, given what is known of the
/// job: `Reached` if the job is or was in one of the states (the current
/// state preferred), `Ended` if it finished without, `None` to keep
/// waiting.
pub fn decide(view: &JobView, until: &[JobState]) -> Option<WaitOutcome> {
    if until.contains(&view.state) {
        return Some(WaitOutcome::Reached(view.state));
    }
    if let Some(state) = until.iter().find(|s| view.has_seen(**s)) {
        return Some(WaitOutcome::Reached(*state));
    }
    if view.is_finished() {
        return Some(WaitOutcome::Ended(view.end.clone().unwrap_or(JobEnd::Gone)));
    }
    None
}

impl Client {
    /// Waits until job `job_id` reaches one of `opts.until`, calling
    /// `on_update` with the job's view whenever something about it changes
    /// (state, progress).
    ///
    /// # Errors
    ///
    /// `NOT_FOUND` if the job does not exist when the wait starts; any
    /// other status from the server. A job that finishes without reaching
    /// the states is not an error: see [`WaitOutcome::Ended`].
    pub async fn wait_for_job(
        &self,
        job_id: &str,
        opts: &WaitOptions,
        on_update: impl FnMut(&JobView),
    ) -> Result<WaitReport, ClientError> {
        let first = self.jobs().get(job_id).await?;
        self.wait_from(first, opts, on_update).await
    }

    /// Like [`Client::wait_for_job`], starting from a record already in
    /// hand (e.g. the reply of `StartMirror`): every event after it counts.
    ///
    /// # Errors
    ///
    /// As [`Client::wait_for_job`].
    pub async fn wait_from(
        &self,
        first: Job,
        opts: &WaitOptions,
        mut on_update: impl FnMut(&JobView),
    ) -> Result<WaitReport, ClientError> {
        let mut waiter = Waiter {
            client: self,
            until: &opts.until,
            deadline: opts.timeout.map(|t| Instant::now() + t),
            view: JobView::from_job(&first),
            record: first,
            on_update: &mut on_update,
        };
        waiter.run().await
    }
}

/// The state of one wait.
struct Waiter<'a> {
    client: &'a Client,
    until: &'a [JobState],
    deadline: Option<Instant>,
    view: JobView,
    /// The newest full record seen.
    record: Job,
    on_update: &'a mut dyn FnMut(&JobView),
}

impl Waiter<'_> {
    async fn run(&mut self) -> Result<WaitReport, ClientError> {
        (self.on_update)(&self.view);
        let mut outcome = decide(&self.view, self.until);
        if outcome.is_none() {
            outcome = self.follow_stream().await?;
        }
        let mut outcome = match outcome {
            Some(outcome) => outcome,
            None => self.poll().await?,
        };
        if self.view.is_finished() && self.view.end.is_none() {
            // Finished, but neither a completion event nor a final record
            // said how: ask once more.
            self.refresh().await?;
            if let WaitOutcome::Ended(end) = &mut outcome {
                *end = self.view.end.clone().unwrap_or(JobEnd::Gone);
            }
        }
        // The record to show: a fresh one if the job still exists, else the
        // last one with what the events said since.
        let job = match self.client.jobs().get(&self.view.id).await {
            Ok(job) => job,
            Err(_) => {
                let mut job = self.record.clone();
                self.view.merge_into(&mut job);
                job
            }
        };
        Ok(WaitReport {
            outcome,
            view: self.view.clone(),
            job,
        })
    }

    /// Follows the event stream. `Ok(None)` means the stream is not usable
    /// (not served, broken off, closed) and the caller should poll.
    async fn follow_stream(&mut self) -> Result<Option<WaitOutcome>, ClientError> {
        let id = self.view.id.clone();
        let Some(mut stream) = self.open_stream(self.view.last_sequence).await? else {
            return Ok(decide(&self.view, self.until));
        };
        let mut heard_of_job = false;
        let mut reopened = false;
        loop {
            let next = match self.deadline {
                Some(deadline) => match tokio::time::timeout_at(deadline, stream.next()).await {
                    Ok(next) => next,
                    Err(_elapsed) => return Ok(Some(WaitOutcome::TimedOut)),
                },
                None => stream.next().await,
            };
            match next {
                None => {
                    tracing::debug!(job_id = %id, "event stream closed, falling back to WaitJob");
                    return Ok(None);
                }
                Some(Err(e)) if e.code() == Some(tonic::Code::OutOfRange) && !reopened => {
                    // Our start point is older than what the server keeps:
                    // take a fresh snapshot and new events instead.
                    reopened = true;
                    match self.open_stream(0).await? {
                        Some(s) => stream = s,
                        None => return Ok(decide(&self.view, self.until)),
                    }
                    continue;
                }
                Some(Err(e)) => {
                    tracing::debug!(job_id = %id, error = %e, "event stream failed, falling back to WaitJob");
                    return Ok(None);
                }
                Some(Ok(WatchItem::Snapshot(job))) if job.id == id => {
                    heard_of_job = true;
                    self.view.apply_job(&job);
                    self.record = job;
                }
                Some(Ok(WatchItem::Event(ev))) if ev.job_id == id => {
                    heard_of_job = true;
                    self.view.apply_event(&ev);
                }
                Some(Ok(WatchItem::Heartbeat { .. })) if !heard_of_job => {
                    // No snapshot and no event of our job before the first
                    // heartbeat: it may have vanished before the stream
                    // opened. Look it up once.
                    heard_of_job = true;
                    self.refresh().await?;
                }
                Some(Ok(_)) => continue,
            }
            (self.on_update)(&self.view);
            if let Some(outcome) = decide(&self.view, self.until) {
                return Ok(Some(outcome));
            }
        }
    }

    /// Opens the job's event stream after `after`. `Ok(None)` if the
    /// stream is not usable, after recording a vanished job in the view.
    async fn open_stream(&mut self, after: u64) -> Result<Option<EventStream>, ClientError> {
        let id = self.view.id.clone();
        let watch = self.client.watch();
        let first_try = watch.events(Some(&id), after).await;
        let result = match first_try {
            Err(e) if e.code() == Some(tonic::Code::OutOfRange) && after != 0 => {
                watch.events(Some(&id), 0).await
            }
            other => other,
        };
        match result {
            Ok(stream) => Ok(Some(stream)),
            Err(e) if e.is_not_found() => {
                self.view.mark_gone();
                (self.on_update)(&self.view);
                Ok(None)
            }
            Err(e) => {
                tracing::debug!(job_id = %id, error = %e, "cannot open event stream, falling back to WaitJob");
                Ok(None)
            }
        }
    }

    /// Long-polls `WaitJob` until the wait is decided.
    async fn poll(&mut self) -> Result<WaitOutcome, ClientError> {
        let id = self.view.id.clone();
        let mut states = self.until.to_vec();
        for s in [JobState::Concluded, JobState::Null] {
            if !states.contains(&s) {
                states.push(s);
            }
        }
        loop {
            let slice = match self.deadline {
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Ok(WaitOutcome::TimedOut);
                    }
                    left.min(POLL_SLICE)
                }
                None => POLL_SLICE,
            };
            match self.client.jobs().wait_job(&id, &states, slice).await {
                Ok(job) => {
                    self.view.apply_job(&job);
                    self.record = job;
                }
                Err(e) if e.is_not_found() => self.view.mark_gone(),
                Err(e) => return Err(e),
            }
            (self.on_update)(&self.view);
            if let Some(outcome) = decide(&self.view, self.until) {
                return Ok(outcome);
            }
        }
    }

    /// Fetches the job record; `NOT_FOUND` marks the job gone.
    async fn refresh(&mut self) -> Result<(), ClientError> {
        match self.client.jobs().get(&self.view.id).await {
            Ok(job) => {
                self.view.apply_job(&job);
                self.record = job;
                Ok(())
            }
            Err(e) if e.is_not_found() => {
                self.view.mark_gone();
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::tests::{event, job, status};
    use blockmirror_proto::v1::EventType;

    #[test]
    fn keeps_waiting_while_nothing_matches() {
        let view = JobView::from_job(&job("j", JobState::Running, 1));
        assert_eq!(decide(&view, &[JobState::Ready]), None);
    }

    #[test]
    fn reached_now_or_passed_through() {
        let mut view = JobView::from_job(&job("j", JobState::Running, 1));
        assert_eq!(
            decide(&view, &[JobState::Running]),
            Some(WaitOutcome::Reached(JobState::Running))
        );
        // Ready came and went (someone completed the job) before we looked.
        view.apply_event(&status("j", 2, JobState::Ready));
        view.apply_event(&status("j", 3, JobState::Waiting));
        assert_eq!(
            decide(&view, &[JobState::Ready]),
            Some(WaitOutcome::Reached(JobState::Ready))
        );
    }

    #[test]
    fn ended_before_ready() {
        let mut view = JobView::from_job(&job("j", JobState::Running, 1));
        view.apply_event(&event("j", 2, EventType::BlockJobCancelled));
        view.apply_event(&status("j", 3, JobState::Aborting));
        assert_eq!(decide(&view, &[JobState::Ready]), None);
        view.apply_event(&status("j", 4, JobState::Concluded));
        assert_eq!(
            decide(&view, &[JobState::Ready]),
            Some(WaitOutcome::Ended(JobEnd::Cancelled))
        );
    }

    #[test]
    fn done_is_concluded_or_gone() {
        let done = WaitOptions::done().until;
        let mut view = JobView::from_job(&job("j", JobState::Ready, 1));
        let mut completed = event("j", 2, EventType::BlockJobCompleted);
        completed.pivoted = true;
        view.apply_event(&completed);
        assert_eq!(decide(&view, &done), None);
        view.apply_event(&status("j", 3, JobState::Concluded));
        assert_eq!(
            decide(&view, &done),
            Some(WaitOutcome::Reached(JobState::Concluded))
        );
        assert_eq!(view.end, Some(JobEnd::Completed { pivoted: true }));

        // Auto-dismissed before we saw anything: NOT_FOUND.
        let mut view = JobView::from_job(&job("j", JobState::Ready, 1));
        view.mark_gone();
        assert_eq!(
            decide(&view, &done),
            Some(WaitOutcome::Reached(JobState::Null))
        );
        assert_eq!(
            decide(&view, &[JobState::Paused]),
            Some(WaitOutcome::Ended(JobEnd::Gone))
        );
    }

    #[test]
    fn options() {
        assert_eq!(WaitOptions::ready().until, vec![JobState::Ready]);
        let o = WaitOptions::done().with_timeout(Some(Duration::from_secs(3)));
        assert_eq!(o.timeout, Some(Duration::from_secs(3)));
    }
}

#[cfg(test)]
mod component_tests {
    //! The wait against a scripted server: stream path, fallback, vanishing
    //! jobs, timeout.

    use std::collections::VecDeque;

    use super::*;
    use crate::mock::{Mock, Script};
    use crate::view::tests::{event, job, status};
    use blockmirror_proto::v1::EventType;

    #[tokio::test]
    async fn follows_the_stream_until_ready() {
        let mock = Mock::start(Script {
            job: Some(job("j", JobState::Running, 4)),
            stream: Some(vec![
                WatchItem::Snapshot(job("j", JobState::Running, 4)),
                WatchItem::Event(event("other", 5, EventType::BlockJobReady)),
                WatchItem::Event(status("j", 6, JobState::Ready)),
            ]),
            ..Script::default()
        })
        .await;
        let mut updates = 0;
        let report = mock
            .client
            .wait_for_job("j", &WaitOptions::ready(), |_| updates += 1)
            .await
            .unwrap();
        assert_eq!(report.outcome, WaitOutcome::Reached(JobState::Ready));
        assert_eq!(report.view.state, JobState::Ready);
        // The printed record is fetched again after the wait.
        assert_eq!(report.job.state(), JobState::Running);
        assert!(updates >= 2);
        // Replayed from the record the wait started from.
        assert_eq!(mock.script.lock().unwrap().watch_calls, vec![4]);
    }

    #[tokio::test]
    async fn cancel_before_ready_ends_the_wait() {
        let mock = Mock::start(Script {
            job: Some(job("j", JobState::Running, 1)),
            stream: Some(vec![
                WatchItem::Snapshot(job("j", JobState::Running, 1)),
                WatchItem::Event(event("j", 2, EventType::BlockJobCancelled)),
                WatchItem::Event(status("j", 3, JobState::Concluded)),
            ]),
            ..Script::default()
        })
        .await;
        let report = mock
            .client
            .wait_for_job("j", &WaitOptions::ready(), |_| {})
            .await
            .unwrap();
        assert_eq!(report.outcome, WaitOutcome::Ended(JobEnd::Cancelled));
    }

    #[tokio::test]
    async fn falls_back_to_wait_job_without_a_stream() {
        let mock = Mock::start(Script {
            job: Some(job("j", JobState::Running, 1)),
            stream: None,
            wait_replies: VecDeque::from([
                Some(job("j", JobState::Running, 2)),
                Some(job("j", JobState::Ready, 3)),
            ]),
            ..Script::default()
        })
        .await;
        let report = mock
            .client
            .wait_for_job("j", &WaitOptions::ready(), |_| {})
            .await
            .unwrap();
        assert_eq!(report.outcome, WaitOutcome::Reached(JobState::Ready));
    }

    #[tokio::test]
    async fn a_closed_stream_also_falls_back() {
        let mock = Mock::start(Script {
            job: Some(job("j", JobState::Running, 1)),
            stream: Some(vec![WatchItem::Snapshot(job("j", JobState::Running, 1))]),
            close_stream: true,
            wait_replies: VecDeque::from([Some(job("j", JobState::Ready, 3))]),
            ..Script::default()
        })
        .await;
        let report = mock
            .client
            .wait_for_job("j", &WaitOptions::ready(), |_| {})
            .await
            .unwrap();
        assert_eq!(report.outcome, WaitOutcome::Reached(JobState::Ready));
    }

    #[tokio::test]
    async fn auto_dismissed_job_counts_as_done() {
        // The job vanished after we read it: no stream, WaitJob NOT_FOUND.
        let mock = Mock::start(Script {
            job: Some(job("j", JobState::Ready, 1)),
            stream: None,
            ..Script::default()
        })
        .await;
        let first = mock.client.jobs().get("j").await.unwrap();
        mock.script.lock().unwrap().job = None;
        let report = mock
            .client
            .wait_from(first, &WaitOptions::done(), |_| {})
            .await
            .unwrap();
        assert_eq!(report.outcome, WaitOutcome::Reached(JobState::Null));
        assert_eq!(report.view.end, Some(JobEnd::Gone));
    }

    #[tokio::test]
    async fn heartbeat_without_snapshot_checks_the_job() {
        let mock = Mock::start(Script {
            job: None,
            stream: Some(vec![WatchItem::Heartbeat { latest_sequence: 9 }]),
            ..Script::default()
        })
        .await;
        let report = mock
            .client
            .wait_from(
                job("j", JobState::Running, 1),
                &WaitOptions::ready(),
                |_| {},
            )
            .await
            .unwrap();
        assert_eq!(report.outcome, WaitOutcome::Ended(JobEnd::Gone));
    }

    #[tokio::test]
    async fn completion_with_pivot_is_reported() {
        let mut completed = event("j", 3, EventType::BlockJobCompleted);
        completed.pivoted = true;
        // Auto-dismissed at the end: the final GetJob finds nothing, so the
        // report merges what the events said into the last record.
        let mock = Mock::start(Script {
            job: None,
            stream: Some(vec![
                WatchItem::Snapshot(job("j", JobState::Waiting, 2)),
                WatchItem::Event(status("j", 3, JobState::Pending)),
                WatchItem::Event(completed),
                WatchItem::Event(status("j", 4, JobState::Concluded)),
            ]),
            ..Script::default()
        })
        .await;
        let report = mock
            .client
            .wait_from(job("j", JobState::Waiting, 2), &WaitOptions::done(), |_| {})
            .await
            .unwrap();
        assert_eq!(report.outcome, WaitOutcome::Reached(JobState::Concluded));
        assert_eq!(report.view.end, Some(JobEnd::Completed { pivoted: true }));
        assert!(report.job.pivoted);
        assert_eq!(report.job.state(), JobState::Concluded);
        assert_eq!(report.job.last_event_sequence, 4);
    }

    #[tokio::test]
    async fn times_out() {
        let mock = Mock::start(Script {
            job: Some(job("j", JobState::Running, 1)),
            stream: Some(vec![WatchItem::Snapshot(job("j", JobState::Running, 1))]),
            ..Script::default()
        })
        .await;
        let opts = WaitOptions::ready().with_timeout(Some(Duration::from_millis(100)));
        let report = mock.client.wait_for_job("j", &opts, |_| {}).await.unwrap();
        assert_eq!(report.outcome, WaitOutcome::TimedOut);
    }

    #[tokio::test]
    async fn unknown_job_is_not_found() {
        let mock = Mock::start(Script::default()).await;
        let err = mock
            .client
            .wait_for_job("nope", &WaitOptions::ready(), |_| {})
            .await
            .unwrap_err();
        assert!(err.is_not_found(), "{err}");
        assert_eq!(err.to_string(), "not found: no such job");
    }
}

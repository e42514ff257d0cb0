//! The runner task of a job: walks the bitmap, issues bounded copy
//! operations, samples rates, applies error policies, and carries the job
//! from running to concluded. See the parent module for the design.

use super::active::MirrorIoError;
use super::spec::{ErrorPolicy, SyncMode};
use super::{Job, JobStatus};
use crate::backend::Allocation;
use crate::definitions::{Pivot, PreparedPivot};
use crate::device::{Device, off_runtime};
use crate::events::EventKind;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Copy operations in flight per job at most (besides the byte budget).
const MAX_COPY_OPS: usize = 16;
/// Largest copy operation. Small enough that a guest write waiting on a
/// chunk under copy waits for at most 1 MiB of target I/O.
const MAX_COPY_OP_BYTES: u64 = 1 << 20;
/// Policy tick: rates are sampled and the convergence policy runs this
/// often. Short, because every tick auto mode spends in background under a
/// load it cannot win against is copying redone later (on a fast target,
/// hundreds of MB a second).
const TICK: Duration = Duration::from_millis(100);
/// Ticks per PROGRESS event (about one a second) and per rate window.
const TICKS_PER_SECOND: usize = 10;
/// Ticks over which the trend of dirty bytes is judged (3 s): long enough
/// that a copier running in place against a random writer reads as such.
const TREND_TICKS: usize = 30;
/// While guests write to the target: copy operations at most this big...
const ACTIVE_COPY_OP_BYTES: u64 = 256 << 10;
/// ... and at most this many in flight (one doing I/O, one waiting its turn).
const ACTIVE_COPY_OPS: usize = 2;
/// A region guests wrote counts as hot for one to two of these (`hot.rs`).
const HOT_WINDOW: Duration = Duration::from_secs(1);
/// Pause before retrying after a copy error the policy let pass.
const ERROR_RETRY_DELAY: Duration = Duration::from_millis(200);

type CopyResult = (u64, u64, Result<u64, MirrorIoError>);

/// How much of the target a job's flush must make durable.
#[derive(Debug, Clone, Copy)]
enum TargetFlush {
    /// Everything written to it (READY, and a target the job lets go).
    Whole,
    /// Only what it owes (see `durability`): nothing, if all writes since
    /// its last flush came from guests that did not ask for durability.
    Owed,
}

/// Keeps the copier to its share of the time while guests are active: for
/// every microsecond copies spent on I/O, it rests `(100 - share) / share`
/// microseconds before the next operation starts. On a fast target this is
/// what leaves guests CPU and disk; on a slow, rate-limited one the I/O
/// after paying the limit is short and the pauses cost next to nothing.
#[derive(Debug, Default)]
struct Pacer {
    /// `copy_busy_us` already accounted for.
    seen_us: u64,
    /// No new copy before this.
    rest_until: Option<Instant>,
}

impl Pacer {
    /// Accounts for copy I/O done since the last call; returns when the
    /// copier may start its next operation, if that is still ahead.
    fn update(
        &mut self,
        mirror: &super::active::ActiveMirror,
        guests_active: bool,
    ) -> Option<Instant> {
        let busy = mirror.copy_busy_us.load(Ordering::Relaxed);
        let new_us = busy.saturating_sub(self.seen_us);
        self.seen_us = busy;
        let share = u64::from(mirror.copier_time_share_percent.clamp(1, 100));
        if !guests_active || share == 100 {
            self.rest_until = None;
            return None;
        }
        let now = Instant::now();
        if new_us > 0 {
            let rest = Duration::from_micros(new_us.saturating_mul(100 - share) / share);
            self.rest_until = Some(self.rest_until.map_or(now, |t| t.max(now)) + rest);
        }
        self.rest_until.filter(|&t| t > now)
    }
}

/// Runner-local state: owned by the runner task alone.
#[derive(Debug)]
struct Cursor {
    /// Next chunk to look at.
    next: u64,
    /// Chunk runs handed to copy tasks still in flight.
    claimed: Vec<(u64, u64)>,
    /// Set when a look for cold runs found none: the hot set is all that
    /// is left, so the next looks (each walks all of it) wait until then.
    cold_exhausted_until: Option<Instant>,
}

impl Cursor {
    /// The next dirty run not already claimed, wrapping once to the start.
    /// With `defer_hot`, runs in regions guests wrote recently are passed
    /// over while any other is dirty (see `hot.rs`).
    fn pick(&mut self, job: &Job, max_chunks: u64, defer_hot: bool) -> Option<(u64, u64)> {
        if defer_hot
            && self
                .cold_exhausted_until
                .is_none_or(|t| Instant::now() >= t)
        {
            if let Some(run) = self.scan(job, max_chunks, true) {
                return Some(run);
            }
            self.cold_exhausted_until = Some(Instant::now() + HOT_WINDOW);
        }
        self.scan(job, max_chunks, false)
    }

    fn scan(&mut self, job: &Job, max_chunks: u64, skip_hot: bool) -> Option<(u64, u64)> {
        let mirror = &job.mirror;
        for wrapped in [false, true] {
            if wrapped {
                if self.next == 0 {
                    break;
                }
                self.next = 0;
            }
            let mut from = self.next;
            while let Some((start, end)) = mirror.next_dirty_run(from, max_chunks) {
                if let Some(&(_, c_end)) = self
                    .claimed
                    .iter()
                    .find(|(cs, ce)| *cs <= start && start < *ce)
                {
                    from = c_end;
                    continue;
                }
                let (offset, _) = mirror.byte_span(start, start + 1);
                if skip_hot && mirror.hot.is_hot(offset) {
                    from = mirror.hot.region_end(offset) / mirror.granularity();
                    continue;
                }
                let end = self
                    .claimed
                    .iter()
                    .filter(|(cs, _)| *cs > start)
                    .map(|(cs, _)| *cs)
                    .fold(end, u64::min);
                self.next = end;
                self.claimed.push((start, end));
                return Some((start, end));
            }
        }
        None
    }

    fn release(&mut self, start: u64) {
        self.claimed.retain(|(s, _)| *s != start);
    }
}

/// Counter readings of the last second, one per tick, for rates.
#[derive(Debug)]
struct Sampler {
    /// (when, progress, dirtied, would-dirty, copied data byte counters,
    /// microseconds guest writes spent at the target).
    window: std::collections::VecDeque<(Instant, u64, u64, u64, u64, u64)>,
    /// (when, dirty bytes) over the trend window.
    trend: std::collections::VecDeque<(Instant, u64)>,
    /// When the previous tick ran (for the footprint rate).
    last_tick: Instant,
    ticks: usize,
    policy: super::policy::PolicyState,
}

impl Job {
    pub(super) async fn run(self: Arc<Self>) {
        self.start().await;
        let chunks_of = |bytes: u64| {
            (bytes.min(self.mirror.budget.capacity()) / self.mirror.granularity()).max(1)
        };
        let (op_chunks, active_op_chunks) = (
            chunks_of(MAX_COPY_OP_BYTES),
            chunks_of(ACTIVE_COPY_OP_BYTES),
        );
        let started = Instant::now();
        let mut cursor = Cursor {
            next: 0,
            claimed: Vec::new(),
            cold_exhausted_until: None,
        };
        let mut hot_rotated = Instant::now();
        let mut ops: JoinSet<CopyResult> = JoinSet::new();
        let mut retry_at: Option<Instant> = None;
        let mut pacer = Pacer::default();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut sampler = Sampler {
            window: std::collections::VecDeque::with_capacity(TICKS_PER_SECOND + 1),
            trend: std::collections::VecDeque::with_capacity(TREND_TICKS + 1),
            last_tick: Instant::now(),
            ticks: 0,
            policy: super::policy::PolicyState::new(self.spec.policy),
        };
        loop {
            for err in self.mirror.take_errors() {
                self.on_io_error(err);
            }
            if self.shutdown.is_cancelled() {
                break;
            }
            let status = self.lock().status;
            let copying = matches!(
                status,
                JobStatus::Running | JobStatus::Ready | JobStatus::Waiting | JobStatus::Pending
            ) && retry_at.is_none();
            let mut want_budget = None;
            let guests_active = self.mirror.guests_active();
            let paced_until = pacer.update(&self.mirror, guests_active);
            if copying && paced_until.is_none() {
                // Guest-first: while guests write, the copier uses small
                // operations, few at a time (see active.rs), and keeps to
                // its share of the time.
                let (max_ops, max_chunks) = if guests_active {
                    (ACTIVE_COPY_OPS, active_op_chunks)
                } else {
                    (MAX_COPY_OPS, op_chunks)
                };
                // The first pass leaves the guests' working set for last.
                let defer_hot = guests_active && status == JobStatus::Running;
                while ops.len() < max_ops {
                    let Some((start, end)) = cursor.pick(&self, max_chunks, defer_hot) else {
                        break;
                    };
                    let (off, stop) = self.mirror.byte_span(start, end);
                    // The runner never waits for budget inline: it selects
                    // on it below, with everything else.
                    let Some(share) = self.mirror.copy_share.try_acquire(stop - off) else {
                        cursor.release(start);
                        cursor.next = start;
                        want_budget = Some((true, stop - off));
                        break;
                    };
                    let Some(permit) = self.mirror.budget.try_acquire(stop - off) else {
                        cursor.release(start);
                        cursor.next = start;
                        want_budget = Some((false, stop - off));
                        break;
                    };
                    let job = Arc::clone(&self);
                    let source = Device::unthrottled(self.source.backend());
                    ops.spawn(async move {
                        let r = job
                            .mirror
                            .copy_range(&source, start, end, &job.speed, permit)
                            .await;
                        drop(share);
                        (start, end, r)
                    });
                }
            }
            if status == JobStatus::Aborting && !ops.is_empty() {
                // Abandoned copies need not finish (a copy may be waiting
                // on a slow target's limit): the target is given up anyway.
                ops.abort_all();
                while ops.join_next().await.is_some() {}
                cursor.claimed.clear();
            }
            if self.advance(ops.is_empty()).await {
                return;
            }
            tokio::select! {
                biased;
                () = self.shutdown.cancelled() => {}
                Some(joined) = ops.join_next(), if !ops.is_empty() => {
                    match joined {
                        Ok((start, _, Ok(_))) => cursor.release(start),
                        Ok((start, _, Err(e))) => {
                            cursor.release(start);
                            self.on_io_error(e);
                            retry_at = Some(Instant::now() + ERROR_RETRY_DELAY);
                        }
                        Err(e) => {
                            // A copy task panicked: its chunks may be clear
                            // without a copy. Fail the job rather than lie.
                            let mut s = self.lock();
                            s.error = Some(format!("copy task failed: {e}"));
                            if s.status.can_become(JobStatus::Aborting) {
                                self.transition(&mut s, JobStatus::Aborting);
                            }
                        }
                    }
                }
                () = self.changed.notified() => {}
                () = self.mirror.wake.notified() => {}
                _ = tick.tick() => {
                    self.sample(&mut sampler, started);
                    if hot_rotated.elapsed() >= HOT_WINDOW {
                        self.mirror.hot.rotate();
                        hot_rotated = Instant::now();
                    }
                }
                p = async {
                    match want_budget {
                        Some((true, n)) => self.mirror.copy_share.acquire(n).await,
                        _ => self.mirror.budget.acquire(want_budget.map_or(0, |(_, n)| n)).await,
                    }
                }, if want_budget.is_some() => drop(p),
                () = tokio::time::sleep_until(retry_at.unwrap_or_else(Instant::now)), if retry_at.is_some() => retry_at = None,
                () = tokio::time::sleep_until(paced_until.unwrap_or_else(Instant::now)), if paced_until.is_some() && copying => {}
            }
        }
        // Shutdown: let copies finish, detach from the volume, keep the
        // record (and the bitmap, for a job that will resume).
        while ops.join_next().await.is_some() {}
        let gate = self.source.drain().await;
        self.source.set_mirror(None);
        let kept = self.record().is_resumable() && self.keep_bitmap().await;
        drop(gate);
        self.lock().bitmap_saved = kept;
        self.save_async().await;
        tracing::info!(job_id = %self.id, status = %self.status(), bitmap_saved = kept, "job stopped for shutdown");
    }

    /// Saves the dirty bitmap for the resume, with copies finished and guest
    /// I/O drained (the caller holds the gate), so it is exact: both sides
    /// are flushed first (a clean chunk is then equal *on disk*), and the
    /// source refuses writes afterwards (they would be tracked nowhere).
    /// False if any step failed: the resumed job then copies everything.
    async fn keep_bitmap(&self) -> bool {
        let source = Device::unthrottled(self.source.backend());
        let target = Device::unthrottled(Arc::clone(&self.target_backend));
        if let Err(e) = tokio::try_join!(source.flush(), target.flush()) {
            tracing::warn!(job_id = %self.id, error = %e.chain(), "dirty bitmap not saved: flush failed; the job will copy everything when it resumes");
            return false;
        }
        let bytes = self.mirror.bitmap_bytes();
        let (store, id) = (Arc::clone(&self.store), self.id.clone());
        match off_runtime("saving the dirty bitmap", move || {
            store.save_bitmap(&id, &bytes)
        })
        .await
        {
            Ok(()) => {
                self.source.close_writes();
                true
            }
            Err(e) => {
                tracing::warn!(job_id = %self.id, error = %e.chain(), "dirty bitmap not saved; the job will copy everything when it resumes");
                false
            }
        }
    }

    /// Sets up the bitmap and installs the write hook with guest I/O drained,
    /// so no guest write falls between the initial dirty set and the hook.
    async fn start(&self) {
        let gate = self.source.drain().await;
        let saved = self
            .resume_bitmap
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(bitmap) = saved {
            // A clean shutdown saved exactly what was left to copy.
            self.mirror.mark_from(&bitmap);
        } else if self.resumed {
            // Resumed after a crash: the writes tracked before it are gone,
            // so every chunk may differ (whatever the sync mode).
            self.mirror.mark_all_dirty();
        } else if self.spec.sync == SyncMode::Full {
            if self.target_backend.is_known_zero() {
                self.mark_source_data().await;
            } else {
                self.mirror.mark_all_dirty();
            }
        }
        self.source.set_mirror(Some(Arc::clone(&self.mirror)));
        drop(gate);
        {
            let mut s = self.lock();
            if s.status == JobStatus::Created {
                self.transition(&mut s, JobStatus::Running);
                if s.pause_at_start {
                    self.transition(&mut s, JobStatus::Paused);
                }
            }
        }
        self.save_async().await;
    }

    /// Marks only the source's data extents (the target reads as zeroes).
    async fn mark_source_data(&self) {
        let src = Device::unthrottled(self.source.backend());
        let size = src.size();
        let g = self.mirror.granularity();
        let mut off = 0;
        while off < size {
            match src.allocation(off, size - off).await {
                Ok(Allocation::Hole { end }) if end > off => off = end,
                Ok(Allocation::Data { end }) if end > off => {
                    self.mirror.mark_initial(off / g, end.div_ceil(g));
                    off = end;
                }
                _ => {
                    // Cannot tell: copy the rest.
                    self.mirror.mark_initial(off / g, size.div_ceil(g));
                    break;
                }
            }
        }
    }

    /// Moves the life cycle on when its condition holds. Returns true once
    /// the job has concluded.
    async fn advance(&self, no_ops: bool) -> bool {
        enum Next {
            Stay,
            Ready,
            Finalize { pivot: bool },
            Abort,
        }
        let idle = no_ops && self.mirror.dirty_chunks() == 0;
        let next = {
            let mut s = self.lock();
            match s.status {
                JobStatus::Running if idle => Next::Ready,
                JobStatus::Waiting if idle => {
                    self.transition(&mut s, JobStatus::Pending);
                    self.emit(&mut s, EventKind::Pending);
                    if self.spec.auto_finalize {
                        s.finalize_requested = true;
                        self.changed.notify_one();
                    }
                    Next::Stay
                }
                JobStatus::Pending if idle && s.finalize_requested => Next::Finalize {
                    pivot: s.complete_requested && s.cancel_requested.is_none(),
                },
                JobStatus::Aborting if no_ops => Next::Abort,
                _ => Next::Stay,
            }
        };
        match next {
            Next::Stay => false,
            Next::Ready => {
                // READY promises a usable copy: make it durable first (QEMU
                // flushes the target before READY too). Guest writes go on
                // meanwhile; if they dirtied chunks, READY waits.
                if !self.flush_target(TargetFlush::Whole).await {
                    return false;
                }
                let mut s = self.lock();
                if s.status == JobStatus::Running && self.mirror.dirty_chunks() == 0 {
                    self.transition(&mut s, JobStatus::Ready);
                    let p = self.progress(&s);
                    self.emit(&mut s, EventKind::Ready(p));
                }
                false
            }
            Next::Finalize { pivot } => self.finalize_now(pivot).await,
            Next::Abort => {
                self.abort_now().await;
                true
            }
        }
    }

    /// Flushes the target (for a pivot, only what it owes), drains guest
    /// I/O, and if still in sync, switches the volume to the target (for
    /// complete). False: not in sync after all (or the flush failed); the
    /// runner keeps going.
    async fn finalize_now(&self, pivot: bool) -> bool {
        // Make the target durable before holding guest I/O. A pivot needs
        // only the copier's writes flushed: guest writes since READY reached
        // the target with the guest's own durability (see `durability`),
        // and the target is the guest's disk from now on. Flushing them too
        // would write back seconds of page cache on a busy volume, taking
        // CPU and disk from the guests right at the pivot. A cancel in READY
        // lets the target go as a copy nobody else will flush: all of it
        // (up to here; guest writes after this carry their own durability,
        // as at the pivot).
        let flush = if pivot {
            TargetFlush::Owed
        } else {
            TargetFlush::Whole
        };
        if !self.flush_target(flush).await {
            return false;
        }
        // The target volume's file is to back the source volume: the
        // target's own definition goes, so no second volume (and no second
        // writer) points at the same file.
        let absorbed = self.target_volume.as_ref().map(|t| t.name().to_owned());
        // The definitions naming the target are written before the pause,
        // which then only installs them (see `definitions`).
        let prepared = if pivot {
            self.prepare_pivot(absorbed.clone()).await
        } else {
            None
        };
        let held_at = Instant::now();
        let gate = self.source.drain().await;
        // The pause's parts, for the log: waiting for guest I/O in flight,
        // then installing the volume definitions.
        let drained = held_at.elapsed();
        // Nothing was copied since the flush above (the runner is here, not
        // copying), so the target owes a flush now only if a guest flush
        // skipped it meanwhile (after a mode change by hand): rare, and then
        // paid under the pause.
        if self.mirror.dirty_chunks() > 0 || !self.flush_target(TargetFlush::Owed).await {
            drop(gate);
            if let Some(p) = prepared {
                self.definitions.discard(p);
            }
            return false;
        }
        if pivot {
            self.source.set_backend(Arc::clone(&self.target_backend));
            if let Err(e) = self.definitions.commit_pivot(prepared, absorbed.as_deref()) {
                // The volume file on disk still names the old source; the
                // switch stays in memory and is retried at the next save.
                tracing::error!(job_id = %self.id, error = %e.chain(), "saving volume definitions after pivot");
            }
        }
        self.source.set_mirror(None);
        let pause = held_at.elapsed();
        drop(gate);
        self.release_volumes();
        {
            let mut s = self.lock();
            s.pivoted = pivot;
            let progress = self.progress(&s);
            // QEMU's order: the completion event, then the state change.
            self.emit(
                &mut s,
                EventKind::Completed {
                    pivoted: pivot,
                    pause_us: u64::try_from(pause.as_micros()).unwrap_or(u64::MAX),
                    error: None,
                    progress,
                },
            );
            self.transition(&mut s, JobStatus::Concluded);
        }
        self.save_async().await;
        tracing::info!(
            job_id = %self.id,
            pivot,
            pause_us = pause.as_micros(),
            drain_us = drained.as_micros(),
            "job completed"
        );
        true
    }

    /// Flushes the target, all of it or only if it owes a flush. False if
    /// the flush failed (reported to the job's error policy).
    async fn flush_target(&self, what: TargetFlush) -> bool {
        let flushed = match what {
            TargetFlush::Whole => self.mirror.flush_target().await,
            TargetFlush::Owed => self.mirror.flush_target_if_owed().await.map(drop),
        };
        match flushed {
            Ok(()) => true,
            Err(error) => {
                self.on_io_error(MirrorIoError {
                    side: super::active::Side::Target,
                    operation: "flush",
                    error,
                });
                false
            }
        }
    }

    /// Writes the definitions as they will be after the pivot, off the
    /// async threads (it syncs a file). None if that failed: the pivot then
    /// saves them whole under the pause.
    async fn prepare_pivot(&self, absorbed: Option<String>) -> Option<PreparedPivot> {
        let (definitions, id) = (Arc::clone(&self.definitions), self.id.clone());
        let (source, target) = (
            self.source.name().to_owned(),
            Arc::clone(&self.target_backend),
        );
        let prepared = off_runtime("writing the volume definitions", move || {
            definitions.prepare_pivot(
                &id,
                Pivot {
                    source: &source,
                    target: target.as_ref(),
                    absorbed: absorbed.as_deref(),
                },
            )
        })
        .await;
        prepared
            .inspect_err(|e| {
                tracing::warn!(job_id = %self.id, error = %e.chain(), "writing the volume definitions ahead of the pivot");
            })
            .ok()
    }

    /// Detaches after cancel or failure.
    async fn abort_now(&self) {
        let gate = self.source.drain().await;
        self.source.set_mirror(None);
        drop(gate);
        self.release_volumes();
        {
            let mut s = self.lock();
            let progress = self.progress(&s);
            let kind = match s.error.clone() {
                Some(error) => EventKind::Completed {
                    pivoted: false,
                    pause_us: 0,
                    error: Some(error),
                    progress,
                },
                None => EventKind::Cancelled(progress),
            };
            self.emit(&mut s, kind);
            self.transition(&mut s, JobStatus::Concluded);
        }
        self.save_async().await;
    }

    fn release_volumes(&self) {
        self.source.release(&self.id);
        if let Some(t) = &self.target_volume {
            t.release(&self.id);
        }
    }

    /// Applies the side's error policy and reports the error.
    fn on_io_error(&self, err: MirrorIoError) {
        use super::active::Side;
        let policy = match err.side {
            Side::Source => self.spec.on_source_error,
            Side::Target => self.spec.on_target_error,
        };
        let enospc = err.error.raw_os_error() == Some(libc::ENOSPC);
        let action = match policy {
            ErrorPolicy::Report => "report",
            ErrorPolicy::Ignore => "ignore",
            ErrorPolicy::Stop => "stop",
            ErrorPolicy::Enospc if enospc => "stop",
            ErrorPolicy::Enospc => "report",
        };
        let message = format!(
            "{} {} failed: {}",
            err.side.as_str(),
            err.operation,
            err.error.chain()
        );
        tracing::warn!(job_id = %self.id, action, error = %message, "mirror I/O error");
        let mut s = self.lock();
        self.emit(
            &mut s,
            EventKind::Error {
                operation: err.operation.to_owned(),
                side: err.side.as_str().to_owned(),
                action: action.to_owned(),
                message: message.clone(),
            },
        );
        match action {
            "report" if s.status.can_become(JobStatus::Aborting) => {
                s.error = Some(message);
                self.transition(&mut s, JobStatus::Aborting);
            }
            "stop" => {
                s.error = Some(message);
                match s.status {
                    JobStatus::Running => self.transition(&mut s, JobStatus::Paused),
                    JobStatus::Ready => self.transition(&mut s, JobStatus::Standby),
                    _ => {}
                }
            }
            _ => {}
        }
        drop(s);
        self.save();
    }

    /// Samples rates, runs the convergence policy, emits PROGRESS about
    /// once a second.
    fn sample(&self, sm: &mut Sampler, started: Instant) {
        let now = Instant::now();
        let c = &self.mirror.counters;
        let reading = (
            now,
            c.progress_bytes.load(Ordering::Relaxed),
            c.dirtied_bytes.load(Ordering::Relaxed),
            c.would_dirty_bytes.load(Ordering::Relaxed),
            c.copied_data_bytes.load(Ordering::Relaxed),
            self.mirror.latency.sum_us.load(Ordering::Relaxed),
        );
        let oldest = *sm.window.front().unwrap_or(&reading);
        sm.window.push_back(reading);
        if sm.window.len() > TICKS_PER_SECOND {
            sm.window.pop_front();
        }
        let secs = now.duration_since(oldest.0).as_secs_f64().max(1e-3);
        let rate = |d: u64| {
            // Rates are non-negative and far below u64::MAX.
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let r = (d as f64 / secs) as u64;
            r
        };
        let copy_rate = rate(reading.1.saturating_sub(oldest.1));
        let dirty_rate = rate(reading.2.saturating_sub(oldest.2));
        let would_dirty_rate = rate(reading.3.saturating_sub(oldest.3));
        let copy_data_rate = rate(reading.4.saturating_sub(oldest.4));
        // Over the whole rate window, not one tick: a write that waited
        // 400 ms counts when it completes, so per tick this is spiky.
        let target_busy_permille = rate(reading.5.saturating_sub(oldest.5)) / 1000;
        let dirty_now = self.mirror.dirty_bytes();
        sm.trend.push_back((now, dirty_now));
        if sm.trend.len() > TREND_TICKS {
            sm.trend.pop_front();
        }
        let net_rate = match sm.trend.front() {
            Some(&(then, dirty_then)) if sm.trend.len() > TREND_TICKS / 2 => {
                let secs = now.duration_since(then).as_secs_f64().max(1e-3);
                // Dirty bytes per second shrunk (negative: grew).
                #[allow(clippy::cast_possible_truncation)]
                let r = ((dirty_then as f64 - dirty_now as f64) / secs) as i64;
                Some(r)
            }
            _ => None,
        };
        let lat = &self.mirror.latency;
        let (slow, total) = (
            lat.slow.swap(0, Ordering::Relaxed),
            lat.total.swap(0, Ordering::Relaxed),
        );
        let tick_us = u64::try_from(now.duration_since(sm.last_tick).as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        sm.last_tick = now;
        // tick_us is at least 1; footprints are far below u64::MAX / 10^6.
        let footprint_rate = self.mirror.take_footprint().saturating_mul(1_000_000) / tick_us;
        let mut s = self.lock();
        s.copy_rate = copy_rate;
        s.dirty_rate = dirty_rate;
        s.net_rate = net_rate;
        if s.status.is_terminal() {
            return;
        }
        let actions = sm.policy.tick(super::policy::Sample {
            now_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            status: s.status,
            requested: s.requested_mode,
            write_blocking: self.mirror.is_write_blocking(),
            dirty_bytes: dirty_now,
            copy_rate,
            dirty_rate,
            net_rate,
            would_dirty_rate,
            copy_data_rate,
            footprint_rate,
            target_busy_permille,
            slow_target_writes: slow,
            target_writes: total,
        });
        for action in actions {
            match action {
                super::policy::Action::SwitchMode {
                    write_blocking,
                    reason,
                } => {
                    self.set_mode(&mut s, write_blocking, &reason);
                }
                super::policy::Action::GuestThrottle(cap) => {
                    tracing::info!(job_id = %self.id, ?cap, "guest write throttling");
                    self.mirror.set_guest_throttle(cap);
                }
            }
        }
        // The guests' footprint only informs auto mode's way into
        // write-blocking; elsewhere it would cost the write path for nothing.
        self.mirror.track_footprint(
            s.requested_mode == super::spec::CopyMode::Auto
                && !self.mirror.is_write_blocking()
                && matches!(s.status, JobStatus::Running | JobStatus::Ready),
        );
        sm.ticks += 1;
        if sm.ticks.is_multiple_of(TICKS_PER_SECOND) {
            let p = self.progress(&s);
            self.events.emit(&self.id, EventKind::Progress(p));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::MemBackend;
    use crate::job::active::ActiveMirror;

    fn mirror(share: u32) -> ActiveMirror {
        let target = Device::unthrottled(Arc::new(MemBackend::new(1 << 20)));
        ActiveMirror::new(1 << 20, 64 << 10, target, 1 << 20, false).with_copier_share(80, share)
    }

    #[tokio::test(start_paused = true)]
    async fn the_pacer_rests_in_proportion_to_copy_io_only_while_guests_write() {
        let m = mirror(80);
        let mut p = Pacer::default();
        assert_eq!(p.update(&m, true), None, "no copy I/O yet: no rest");
        // 4 ms of copy I/O at an 80 % share: 1 ms of rest.
        m.copy_busy_us.fetch_add(4_000, Ordering::Relaxed);
        let until = p.update(&m, true).expect("a rest");
        assert_eq!(until - Instant::now(), Duration::from_millis(1));
        // Counted once: asking again does not extend it.
        assert_eq!(p.update(&m, true), Some(until));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(p.update(&m, true), None);
        // Guests idle: the copier takes everything, and I/O done meanwhile
        // is not charged later.
        m.copy_busy_us.fetch_add(40_000, Ordering::Relaxed);
        assert_eq!(p.update(&m, false), None);
        assert_eq!(p.update(&m, true), None);
        // A 50 % share rests as long as it worked; 100 % never rests.
        let half = mirror(50);
        let mut p = Pacer::default();
        half.copy_busy_us.fetch_add(3_000, Ordering::Relaxed);
        let until = p.update(&half, true).expect("a rest");
        assert_eq!(until - Instant::now(), Duration::from_millis(3));
        let all = mirror(100);
        let mut p = Pacer::default();
        all.copy_busy_us.fetch_add(3_000, Ordering::Relaxed);
        assert_eq!(p.update(&all, true), None);
    }
}

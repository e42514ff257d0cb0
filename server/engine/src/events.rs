//! The event log: every job event gets the next sequence number, is kept in
//! a bounded ring for replay, and is broadcast to live watchers.
//!
//! A watcher subscribes and reads the replay under the same lock that
//! appends, so it sees every event exactly once, in order: the replay holds
//! sequences up to N, the live channel everything after N. PROGRESS events
//! are broadcast but neither numbered nor kept: they are samples, not history.

use crate::error::{EngineError, ErrorKind, Result};
use crate::job::spec::CopyMode;
use crate::job::state::JobStatus;
use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::SystemTime;
use tokio::sync::broadcast;

/// Default number of events kept for replay.
pub const DEFAULT_HISTORY: usize = 4096;
/// Live-channel depth per watcher; a watcher that falls this far behind is
/// told it lagged (its stream ends) rather than holding memory without bound.
const LIVE_CHANNEL_DEPTH: usize = 1024;

/// Where the dirty set is heading.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Convergence {
    /// Shrinking.
    #[default]
    Converging,
    /// Not moving.
    Stalled,
    /// Growing: guests dirty faster than the copier copies.
    Diverging,
    /// Nothing dirty.
    Synced,
}

impl Convergence {
    /// Lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Converging => "converging",
            Self::Stalled => "stalled",
            Self::Diverging => "diverging",
            Self::Synced => "synced",
        }
    }

    /// The forecast from dirty bytes, the copy rate and the net rate at
    /// which dirty bytes shrank over the last few seconds (bytes/s; `None`
    /// before there is a trend), with the estimated milliseconds to READY
    /// when converging. Shrinking by less than a twentieth of the copy rate
    /// counts as diverging: the copier is running in place.
    pub fn forecast(dirty: u64, copy_rate: u64, net_rate: Option<i64>) -> (Self, Option<u64>) {
        if dirty == 0 {
            return (Self::Synced, Some(0));
        }
        let Some(net) = net_rate else {
            return (Self::Converging, None);
        };
        let floor = i64::try_from(copy_rate / 20).unwrap_or(i64::MAX).max(1);
        if copy_rate == 0 && net <= 0 {
            (Self::Stalled, None)
        } else if net < floor {
            (Self::Diverging, None)
        } else {
            // net >= 1 here.
            let ms = u128::from(dirty) * 1000 / u128::from(net.unsigned_abs());
            (
                Self::Converging,
                Some(u64::try_from(ms).unwrap_or(u64::MAX)),
            )
        }
    }
}

/// Progress figures carried by PROGRESS and terminal events.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    /// Bytes made equal so far.
    pub current_bytes: u64,
    /// current + what remains (grows as guests dirty chunks).
    pub total_bytes: u64,
    /// Dirty bytes now.
    pub dirty_bytes: u64,
    /// Bytes copied per second, last interval.
    pub copy_rate: u64,
    /// Bytes dirtied per second, last interval.
    pub dirty_rate: u64,
    /// Where the dirty set is heading.
    pub convergence: Convergence,
    /// Estimated milliseconds to READY, when converging.
    pub eta_to_ready_ms: Option<u64>,
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventKind {
    /// The job changed state.
    StatusChange(JobStatus),
    /// The job is in sync.
    Ready(Progress),
    /// The job finished its work (pivoted or, after cancel in READY, not).
    Completed {
        /// The source volume now uses the target.
        pivoted: bool,
        /// How long guest I/O was held for the switch, in microseconds.
        pause_us: u64,
        /// Set if the job failed.
        error: Option<String>,
        /// Final figures.
        progress: Progress,
    },
    /// Cancelled before READY, or force-cancelled.
    Cancelled(Progress),
    /// An I/O error and what the policy did about it.
    Error {
        /// "read", "write" or "flush".
        operation: String,
        /// "source" or "target".
        side: String,
        /// "report", "ignore" or "stop".
        action: String,
        /// The error chain.
        message: String,
    },
    /// Waiting for finalize.
    Pending,
    /// The effective copy mode changed.
    CopyModeChanged {
        /// Previous effective mode.
        from: CopyMode,
        /// New effective mode.
        to: CopyMode,
        /// Why.
        reason: String,
    },
    /// A progress sample (not numbered, not replayed).
    Progress(Progress),
    /// The job was dismissed and forgotten.
    Dismissed,
}

impl EventKind {
    /// The QEMU-style event name.
    pub fn name(&self) -> &'static str {
        match self {
            Self::StatusChange(_) => "JOB_STATUS_CHANGE",
            Self::Ready(_) => "BLOCK_JOB_READY",
            Self::Completed { .. } => "BLOCK_JOB_COMPLETED",
            Self::Cancelled(_) => "BLOCK_JOB_CANCELLED",
            Self::Error { .. } => "BLOCK_JOB_ERROR",
            Self::Pending => "BLOCK_JOB_PENDING",
            Self::CopyModeChanged { .. } => "COPY_MODE_CHANGED",
            Self::Progress(_) => "PROGRESS",
            Self::Dismissed => "JOB_DISMISSED",
        }
    }
}

/// One event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Position in the log; PROGRESS carries the latest numbered sequence.
    pub sequence: u64,
    /// Wall-clock time.
    pub time: SystemTime,
    /// The job it is about.
    pub job_id: String,
    /// What happened.
    pub kind: EventKind,
}

#[derive(Debug)]
struct Ring {
    events: VecDeque<Event>,
    capacity: usize,
    last_sequence: u64,
}

/// The engine-wide event log.
#[derive(Debug)]
pub struct EventLog {
    ring: Mutex<Ring>,
    live: broadcast::Sender<Event>,
}

/// A replay plus the live channel after it.
#[derive(Debug)]
pub struct Subscription {
    /// Kept events after the requested sequence.
    pub replay: Vec<Event>,
    /// Everything appended after the replay.
    pub live: broadcast::Receiver<Event>,
}

impl EventLog {
    /// A log keeping `capacity` events for replay.
    pub fn new(capacity: usize) -> Self {
        Self {
            ring: Mutex::new(Ring {
                events: VecDeque::with_capacity(capacity.min(DEFAULT_HISTORY)),
                capacity: capacity.max(1),
                last_sequence: 0,
            }),
            live: broadcast::channel(LIVE_CHANNEL_DEPTH).0,
        }
    }

    fn ring(&self) -> std::sync::MutexGuard<'_, Ring> {
        // Appends complete before any panic point; the ring is never torn.
        self.ring
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The latest numbered sequence.
    pub fn last_sequence(&self) -> u64 {
        self.ring().last_sequence
    }

    /// Appends an event and returns its sequence.
    pub fn emit(&self, job_id: &str, kind: EventKind) -> u64 {
        let mut ring = self.ring();
        let numbered = !matches!(kind, EventKind::Progress(_));
        if numbered {
            ring.last_sequence += 1;
        }
        let event = Event {
            sequence: ring.last_sequence,
            time: SystemTime::now(),
            job_id: job_id.to_owned(),
            kind,
        };
        if numbered {
            if ring.events.len() == ring.capacity {
                ring.events.pop_front();
            }
            ring.events.push_back(event.clone());
        }
        // No watchers is fine.
        let _ = self.live.send(event);
        ring.last_sequence
    }

    /// Subscribes, replaying kept events with a sequence above `after`.
    ///
    /// # Errors
    /// `OutOfRange` if events after `after` were already dropped from the ring.
    pub fn subscribe(&self, after: u64) -> Result<Subscription> {
        let ring = self.ring();
        let oldest = ring
            .events
            .front()
            .map_or(ring.last_sequence + 1, |e| e.sequence);
        if after > 0 && after + 1 < oldest {
            return Err(EngineError::new(
                ErrorKind::OutOfRange,
                format!(
                    "events after sequence {after} are no longer kept; the oldest kept is {oldest} (latest {})",
                    ring.last_sequence
                ),
            ));
        }
        if after > ring.last_sequence {
            return Err(EngineError::new(
                ErrorKind::OutOfRange,
                format!(
                    "sequence {after} is in the future; the latest is {}",
                    ring.last_sequence
                ),
            ));
        }
        let replay = if after == 0 {
            Vec::new()
        } else {
            ring.events
                .iter()
                .filter(|e| e.sequence > after)
                .cloned()
                .collect()
        };
        Ok(Subscription {
            replay,
            live: self.live.subscribe(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_and_out_of_range() {
        let log = EventLog::new(3);
        for _ in 0..5 {
            log.emit("j", EventKind::Pending);
        }
        log.emit("j", EventKind::Progress(Progress::default()));
        assert_eq!(log.last_sequence(), 5);
        let s = log.subscribe(2).unwrap();
        assert_eq!(
            s.replay.iter().map(|e| e.sequence).collect::<Vec<_>>(),
            vec![3, 4, 5]
        );
        assert_eq!(log.subscribe(1).unwrap_err().kind(), ErrorKind::OutOfRange);
        assert_eq!(log.subscribe(9).unwrap_err().kind(), ErrorKind::OutOfRange);
        assert!(log.subscribe(5).unwrap().replay.is_empty());
    }

    #[tokio::test]
    async fn live_follows_replay_without_gap() {
        let log = EventLog::new(10);
        log.emit("j", EventKind::Pending);
        let mut s = log.subscribe(0).unwrap();
        log.emit("j", EventKind::Dismissed);
        let e = s.live.recv().await.unwrap();
        assert_eq!(e.sequence, 2);
    }
}

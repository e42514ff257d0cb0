//! Which writes to the target a flush has made durable.
//!
//! A mirror's target holds two kinds of data. Guest writes that reached it
//! in write-blocking mode carry the guest's own durability: a guest flush
//! in write-blocking mode flushes the target too, and a FUA write is FUA on
//! both sides. The copier's writes carry none: the source may have had
//! them on disk for a long time, so the job itself must flush them before
//! it calls the target a copy (READY) or moves guests onto it (the pivot).
//!
//! Tracking the two apart lets the pivot skip a flush that would only write
//! back what guests wrote since READY — data they never asked to be
//! durable, and seconds of page cache on a busy volume, whose writeback
//! takes CPU and disk from the guests right at the pivot. The flush is
//! owed only for copies made since the last target flush, and for guest
//! flushes that were acknowledged without the target (in background mode,
//! or while the target was failing) after guest writes had reached it.
//!
//! Counters only grow. A flush samples them *before* it starts, so a write
//! that completes during the flush is not taken as covered. Only a flush
//! that succeeded counts; one that failed makes every chunk dirty instead
//! (`ActiveMirror::target_flush_failed`), since a later flush cannot tell
//! what the failed one lost.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters of target writes and of the flushes that covered them.
#[derive(Debug, Default)]
pub struct TargetDurability {
    /// Guest writes (and zeroes) that reached the target, counted when
    /// their target leg completes, before the guest's acknowledgement.
    guest_writes: AtomicU64,
    /// `guest_writes` as sampled by the last successful target flush.
    guest_flushed_through: AtomicU64,
    /// The highest `guest_writes` a guest flush acknowledged without
    /// flushing the target: those writes are owed a flush.
    guest_owed_through: AtomicU64,
    /// Copy operations that wrote (or may have written) to the target.
    copies: AtomicU64,
    /// `copies` as sampled by the last successful target flush.
    copies_flushed_through: AtomicU64,
}

/// What a target flush will cover: the counters just before it started.
#[derive(Debug, Clone, Copy)]
#[must_use = "pass it to `flushed` once the flush succeeded"]
pub struct FlushMark {
    guest_writes: u64,
    copies: u64,
}

impl TargetDurability {
    /// A guest write reached the target.
    pub fn guest_wrote(&self) {
        self.guest_writes.fetch_add(1, Ordering::AcqRel);
    }

    /// A copy operation ran against the target (whatever its outcome: a
    /// failed one may have written part of its range).
    pub fn copier_wrote(&self) {
        self.copies.fetch_add(1, Ordering::AcqRel);
    }

    /// For a guest flush: whether guest writes reached the target since
    /// its last flush, i.e. whether the target needs flushing for this one.
    pub fn guest_writes_unflushed(&self) -> bool {
        self.guest_writes.load(Ordering::Acquire)
            > self.guest_flushed_through.load(Ordering::Acquire)
    }

    /// A guest flush was acknowledged without flushing the target: the
    /// guest writes on the target now owe the job a flush.
    pub fn guest_flush_skipped_target(&self) {
        let written = self.guest_writes.load(Ordering::Acquire);
        self.guest_owed_through.fetch_max(written, Ordering::AcqRel);
    }

    /// Sample the counters before a target flush starts.
    pub fn mark(&self) -> FlushMark {
        FlushMark {
            guest_writes: self.guest_writes.load(Ordering::Acquire),
            copies: self.copies.load(Ordering::Acquire),
        }
    }

    /// The flush that began at `mark` succeeded.
    pub fn flushed(&self, mark: FlushMark) {
        self.guest_flushed_through
            .fetch_max(mark.guest_writes, Ordering::AcqRel);
        self.copies_flushed_through
            .fetch_max(mark.copies, Ordering::AcqRel);
    }

    /// Whether the job must flush the target before it is a durable copy:
    /// copies since the last flush, or guest flushes that skipped it.
    pub fn job_flush_owed(&self) -> bool {
        self.copies.load(Ordering::Acquire) > self.copies_flushed_through.load(Ordering::Acquire)
            || self.guest_owed_through.load(Ordering::Acquire)
                > self.guest_flushed_through.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_owe_a_flush_until_one_that_started_after_them_succeeds() {
        let d = TargetDurability::default();
        assert!(!d.job_flush_owed(), "nothing written");
        d.copier_wrote();
        assert!(d.job_flush_owed());
        let mark = d.mark();
        // A copy that lands while the flush runs is not covered by it.
        d.copier_wrote();
        d.flushed(mark);
        assert!(d.job_flush_owed());
        let mark = d.mark();
        d.flushed(mark);
        assert!(!d.job_flush_owed());
    }

    #[test]
    fn guest_writes_owe_the_job_nothing_unless_a_guest_flush_skipped_the_target() {
        let d = TargetDurability::default();
        d.guest_wrote();
        d.guest_wrote();
        assert!(d.guest_writes_unflushed());
        assert!(!d.job_flush_owed(), "the guest never asked for durability");
        // A guest flush that covered the target.
        let mark = d.mark();
        d.flushed(mark);
        assert!(!d.guest_writes_unflushed());
        d.guest_wrote();
        assert!(d.guest_writes_unflushed());
        // A guest flush acknowledged with the source alone (background
        // mode): the write before it is owed.
        d.guest_flush_skipped_target();
        assert!(d.job_flush_owed());
        // Later guest writes do not change what is owed; a flush that
        // started after the skipped one settles it.
        let mark = d.mark();
        d.guest_wrote();
        d.flushed(mark);
        assert!(!d.job_flush_owed());
        assert!(d.guest_writes_unflushed());
    }

    #[test]
    fn a_flush_older_than_the_owed_guest_flush_does_not_settle_it() {
        let d = TargetDurability::default();
        d.guest_wrote();
        let early = d.mark();
        d.guest_wrote();
        d.guest_flush_skipped_target();
        d.flushed(early);
        assert!(d.job_flush_owed());
    }
}

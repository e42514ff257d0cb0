//! The state a running mirror shares between guest writes and the copier:
//! dirty bitmap, range locks, effective copy mode, the target, and the byte
//! budget. The volume's write path calls [`ActiveMirror::guest_write`]; the
//! job's copier calls [`ActiveMirror::copy_range`].
//!
//! # Why the target ends up equal to the source
//!
//! Invariant: a chunk's bit is clear only when target and source hold the
//! same bytes for it, except while an operation holding a range lock over
//! that chunk is in flight. Every path keeps it:
//!
//! - *Background guest write*: under its range lock it writes the source,
//!   then sets the bits of every chunk it touched. Setting is always safe.
//! - *Write-blocking guest write*: under its range lock it writes the same
//!   immutable buffer to source and target (one after the other in one
//!   I/O-pool job for two local files, concurrently otherwise), then clears only
//!   the chunks it covers completely: both sides now hold exactly these
//!   bytes there. A partly covered chunk keeps its bit — if it was clean,
//!   both sides received the same bytes and it stays equal; if dirty, the
//!   copier will carry it. If either side fails, the touched chunks are set.
//!   A write that touches only dirty chunks goes to the source alone: the
//!   copier will carry those chunks anyway, and the set cannot grow.
//! - *Copy*: under the range lock of its chunks it clears their bits, then
//!   reads the source and writes the target. No guest write can land in the
//!   range meanwhile (the lock), so what it writes is what the source holds
//!   when it releases. A failure sets the bits again.
//!
//! Overlapping guest writes serialize on the range lock, so they reach the
//! two sides in the same order. Range locks are taken *after* a budget
//! permit, never before (see `limits.rs`), so permits and locks cannot wait
//! on each other in a cycle.
//!
//! # Guests first
//!
//! Sharing the target (DESIGN.md) is decided in three places:
//!
//! - the target's write limit: a copy pays it (one copy at a time, before
//!   its range lock) in the ordinary lane; a synchronous guest write pays in
//!   the priority lane, ahead of every copy, held to `100 − copier_share`
//!   percent of the limit while anything is dirty and to all of it once
//!   nothing is (`throttle.rs`);
//! - the size and number of copies: small and few while guests write
//!   (`runner.rs`);
//! - the copier's time: while guests write it rests between operations so
//!   that copy I/O takes at most `copier_time_share` of the time
//!   (`copy_busy_us`, read by the runner's pacer);
//! - the copier's order: the first pass copies the regions guests wrote
//!   recently last (`hot.rs`), so their writes stay source-only for as
//!   long as possible.

use crate::aligned::{self, AlignedBuf};
use crate::backend::{Allocation, BlockBackend};
use crate::bitmap::DirtyBitmap;
use crate::device::Device;
use crate::error::{EngineError, Result};
use crate::job::durability::TargetDurability;
use crate::job::hot::HotRegions;
use crate::job::spec::CopyMode;
use crate::limits::{InflightBudget, InflightPermit};
use crate::observe::{JobObserver, WriteTiming, timed};
use crate::rangelock::RangeLocks;
use crate::throttle::Throttle;
use bytes::Bytes;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

/// A guest write, as the write path carries it.
#[derive(Debug, Clone)]
pub enum WriteOp {
    /// Bytes to write; the buffer is shared, never copied, between sides.
    Data {
        /// The guest's bytes.
        data: Bytes,
        /// Durable on return.
        fua: bool,
    },
    /// Zeroes (write-zeroes or discard).
    Zeroes {
        /// Deallocation allowed.
        punch: bool,
        /// Durable on return.
        fua: bool,
    },
}

impl WriteOp {
    /// Performs the write on one device.
    pub(crate) async fn apply(&self, dev: &Device, offset: u64, len: u64) -> Result<()> {
        match self {
            Self::Data { data, fua } => dev.write(offset, data.clone(), *fua).await,
            Self::Zeroes { punch, fua } => dev.write_zeroes(offset, len, *punch, *fua).await,
        }
    }

    /// Bytes of buffer this write holds in flight.
    fn buffer_bytes(&self) -> u64 {
        match self {
            Self::Data { data, .. } => data.len() as u64,
            Self::Zeroes { .. } => 0,
        }
    }
}

/// Which side of the mirror an error came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The volume being copied.
    Source,
    /// The copy.
    Target,
}

impl Side {
    /// "source" or "target".
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Source => "source",
            Self::Target => "target",
        }
    }
}

/// An I/O failure the job's error policy must decide on.
#[derive(Debug)]
pub struct MirrorIoError {
    /// Where it failed.
    pub side: Side,
    /// "read" or "write".
    pub operation: &'static str,
    /// What failed.
    pub error: EngineError,
}

/// Counters the job samples for progress and rates.
#[derive(Debug, Default)]
pub struct MirrorCounters {
    /// Bytes made equal on the target (copies and synchronous writes that
    /// cleaned dirty chunks).
    pub progress_bytes: AtomicU64,
    /// Bytes written to the target by the copier.
    pub copied_bytes: AtomicU64,
    /// Bytes of guest writes the write-blocking path wrote to the target.
    pub synced_guest_bytes: AtomicU64,
    /// Bytes newly marked dirty (for the dirty rate).
    pub dirtied_bytes: AtomicU64,
    /// Bytes that synchronous guest writes would have dirtied in
    /// background mode (whole chunks touched): what auto mode weighs
    /// against the copy rate before it returns to background.
    pub would_dirty_bytes: AtomicU64,
    /// Bytes of non-zero data the copier wrote (zeroes cost the target
    /// next to nothing, so they would overstate its bandwidth).
    pub copied_data_bytes: AtomicU64,
}

/// Shared state of one active mirror.
#[derive(Debug)]
pub struct ActiveMirror {
    /// log2 of the granularity.
    chunk_shift: u32,
    /// Source size in bytes (the bitmap covers it).
    size: u64,
    /// One bit per chunk: set = target may differ from source.
    bitmap: Mutex<DirtyBitmap>,
    /// Range locks between guest writes and copies.
    locks: Arc<RangeLocks>,
    /// True = write-blocking, false = background. Changed by the job.
    write_blocking: AtomicBool,
    /// Set when a target write failed, cleared when a copy succeeds again:
    /// while set, write-blocking guest writes go to the source only and
    /// leave their chunks dirty, so a dead target costs the guest one
    /// timeout, not one per write.
    target_failing: AtomicBool,
    /// Which target writes (guests' and the copier's) a flush has made
    /// durable: guest flushes skip a target with nothing new on it (each
    /// `fdatasync` costs a device cache flush, which a guest that flushes
    /// every few writes feels), and the pivot skips a flush owed nothing.
    durability: TargetDurability,
    /// The copy's device (with the target volume's limits, if any).
    target: Device,
    /// The same target for synchronous guest writes while there is copying
    /// to do: the priority lane of its limits, ahead of bulk copy, with the
    /// share the copier leaves.
    guest_target: Device,
    /// ... and once nothing is dirty: the whole limit, the copier being idle.
    guest_target_alone: Device,
    /// While guests are active, the share (percent) of the time the copier
    /// may spend on copy I/O (the runner's pacer).
    pub(crate) copier_time_share_percent: u32,
    /// Microseconds copies spent on I/O (after paying the target's limit):
    /// the runner paces the copier by it while guests are active.
    pub(crate) copy_busy_us: AtomicU64,
    /// Bound on bytes in flight (copies, synchronous guest writes, and
    /// front-end request buffers).
    pub(crate) budget: InflightBudget,
    /// The copier's share of `budget` (half of it): copies take from both,
    /// so guest request buffers always find the other half free instead of
    /// queuing behind copies waiting on a slow target.
    pub(crate) copy_share: InflightBudget,
    /// Wakes the copier: bits were set or an error was queued.
    pub(crate) wake: Notify,
    /// Progress and rate counters.
    pub(crate) counters: MirrorCounters,
    /// Errors from guest writes for the job's policy; bounded by the number
    /// of guest writes in flight, drained by the job at every wake.
    errors: Mutex<VecDeque<MirrorIoError>>,
    /// Reused copy buffers, so the copier does not allocate (and zero) a
    /// fresh buffer per operation.
    buffers: Mutex<Vec<AlignedBuf>>,
    /// Held by a copy while it waits for its turn at the target (the
    /// target's write limit): at most one copy is queued there at a time,
    /// so a guest write never queues behind more than one copy operation.
    copy_turn: tokio::sync::Mutex<()>,
    /// When the mirror started; the clock for `last_guest_write_ms`.
    epoch: tokio::time::Instant,
    /// Milliseconds after `epoch` of the last guest write (guest-first
    /// scheduling: the copier shrinks and paces itself while guests are
    /// active). Every write counts, in either mode: in write-blocking mode
    /// a write to a dirty chunk goes to the target as soon as the copier
    /// cleans it, and in any mode guests and copier share CPU and disks.
    last_guest_write_ms: AtomicU64,
    /// Distinct chunks guests touched since the runner last took them, kept
    /// only while the runner asks (auto mode in background: the early
    /// signal that background cannot converge, see policy.rs).
    footprint: Mutex<Option<DirtyBitmap>>,
    /// Whether `footprint` is kept (a flag, so the write path pays one
    /// relaxed load when it is not).
    footprint_on: AtomicBool,
    /// Bytes of chunks newly touched since the runner last took them.
    footprint_bytes: AtomicU64,
    /// Regions guests wrote recently: the first pass copies them last.
    pub(crate) hot: HotRegions,
    /// Guest write cap during convergence, when the runner turns it on.
    guest_throttle: Throttle,
    /// Whether `guest_throttle` applies now (set by the runner).
    guest_throttle_on: AtomicBool,
    /// Target-latency guard: writes over the limit and all synchronous
    /// target writes since the runner last sampled.
    pub(crate) latency: LatencyCounters,
    /// The job's identity, write latency histograms and observer.
    pub(crate) observed: Arc<JobObserver>,
}

/// Counts for the target-latency guard.
#[derive(Debug, Default)]
pub struct LatencyCounters {
    /// The limit in microseconds (0 = off).
    pub limit_us: u64,
    /// Synchronous target writes that took longer than the limit.
    pub slow: AtomicU64,
    /// All synchronous target writes.
    pub total: AtomicU64,
    /// Sum of their latencies since the mirror started, in microseconds
    /// (never reset: the runner takes differences over its rate window).
    pub sum_us: AtomicU64,
}

/// Writes to the target by guests count as "recent" for this long.
const GUEST_ACTIVE_WINDOW_MS: u64 = 250;

impl ActiveMirror {
    /// A mirror of a `size`-byte source at `granularity` (a power of two).
    pub fn new(
        size: u64,
        granularity: u64,
        target: Device,
        buf_size: u32,
        write_blocking: bool,
    ) -> Self {
        let chunk_shift = granularity.trailing_zeros();
        let chunks = size.div_ceil(granularity);
        Self {
            chunk_shift,
            size,
            bitmap: Mutex::new(DirtyBitmap::new(chunks)),
            locks: RangeLocks::new(),
            write_blocking: AtomicBool::new(write_blocking),
            target_failing: AtomicBool::new(false),
            guest_target: target.with_priority(20),
            guest_target_alone: target.with_priority(100),
            copier_time_share_percent: 50,
            copy_busy_us: AtomicU64::new(0),
            durability: TargetDurability::default(),
            target,
            budget: InflightBudget::new(buf_size),
            copy_share: InflightBudget::new(
                (buf_size / 2)
                    .max(u32::try_from(granularity).unwrap_or(u32::MAX))
                    .min(buf_size),
            ),
            wake: Notify::new(),
            counters: MirrorCounters::default(),
            errors: Mutex::new(VecDeque::new()),
            buffers: Mutex::new(Vec::new()),
            copy_turn: tokio::sync::Mutex::new(()),
            epoch: tokio::time::Instant::now(),
            last_guest_write_ms: AtomicU64::new(0),
            footprint: Mutex::new(None),
            footprint_on: AtomicBool::new(false),
            footprint_bytes: AtomicU64::new(0),
            hot: HotRegions::new(size, granularity),
            guest_throttle: Throttle::default(),
            guest_throttle_on: AtomicBool::new(false),
            latency: LatencyCounters::default(),
            observed: Arc::default(),
        }
    }

    /// Reports to `observed` (the job's observer). Call before use.
    pub fn with_observer(mut self, observed: Arc<JobObserver>) -> Self {
        self.observed = observed;
        self
    }

    fn bitmap(&self) -> std::sync::MutexGuard<'_, DirtyBitmap> {
        // Bitmap operations do not panic (range errors are values), so a
        // poisoned lock cannot hide a half-done update.
        self.bitmap
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Sets the copier's shares (1–100 %) while guests are active: of the
    /// target's write limit (guests get the rest ahead of bulk copy) and of
    /// the time (it rests the remainder). Call before use.
    pub fn with_copier_share(mut self, limit_percent: u32, time_percent: u32) -> Self {
        let limit_percent = limit_percent.clamp(1, 100);
        self.guest_target = self.target.with_priority(100 - limit_percent);
        self.copier_time_share_percent = time_percent.clamp(1, 100);
        self
    }

    /// Starts or stops keeping the guests' footprint.
    pub(crate) fn track_footprint(&self, on: bool) {
        if self.footprint_on.swap(on, Ordering::AcqRel) == on {
            return;
        }
        let mut f = self
            .footprint
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *f = on.then(|| DirtyBitmap::new(self.size.div_ceil(self.granularity())));
        self.footprint_bytes.store(0, Ordering::Release);
    }

    /// Bytes of distinct chunks guests touched since the last call, and a
    /// fresh start for the next.
    pub(crate) fn take_footprint(&self) -> u64 {
        let mut f = self
            .footprint
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(bm) = f.as_mut() {
            bm.clear_all();
        }
        self.footprint_bytes.swap(0, Ordering::AcqRel)
    }

    fn note_footprint(&self, first: u64, end: u64) {
        let mut f = self
            .footprint
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(bm) = f.as_mut() {
            let new = bm.set_range(first, end).unwrap_or(0);
            self.footprint_bytes
                .fetch_add(new << self.chunk_shift, Ordering::Relaxed);
        }
    }

    /// Sets the target-latency guard's limit (0 = off). Call before use.
    pub fn with_latency_limit(mut self, limit_ms: u64) -> Self {
        self.latency.limit_us = limit_ms.saturating_mul(1000);
        self
    }

    /// Turns guest write throttling on (at `bytes_per_sec`) or off.
    pub fn set_guest_throttle(&self, bytes_per_sec: Option<u64>) {
        match bytes_per_sec {
            Some(bps) => {
                if !self.guest_throttle_on.swap(true, Ordering::AcqRel) {
                    self.guest_throttle.set_limits(crate::throttle::RateLimits {
                        bytes_per_sec: bps,
                        ops_per_sec: 0,
                    });
                }
            }
            None => self.guest_throttle_on.store(false, Ordering::Release),
        }
    }

    /// True while guest writes are capped.
    pub fn is_guest_throttled(&self) -> bool {
        self.guest_throttle_on.load(Ordering::Acquire)
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// True when guests wrote in the last moments: the copier then uses
    /// small operations, few of them, and paces itself.
    pub fn guests_active(&self) -> bool {
        let last = self.last_guest_write_ms.load(Ordering::Acquire);
        last > 0 && self.now_ms().saturating_sub(last) < GUEST_ACTIVE_WINDOW_MS
    }

    /// Bytes per chunk.
    pub fn granularity(&self) -> u64 {
        1 << self.chunk_shift
    }

    /// Number of chunks.
    pub fn chunk_count(&self) -> u64 {
        self.bitmap().len()
    }

    /// True when guest writes go to the target before they are acknowledged.
    pub fn is_write_blocking(&self) -> bool {
        self.write_blocking.load(Ordering::Acquire)
    }

    /// Switches the effective mode.
    pub fn set_write_blocking(&self, on: bool) {
        self.write_blocking.store(on, Ordering::Release);
    }

    /// True if `chunk` is dirty now.
    pub fn is_dirty(&self, chunk: u64) -> bool {
        self.bitmap().is_dirty(chunk)
    }

    /// Dirty chunks now.
    pub fn dirty_chunks(&self) -> u64 {
        self.bitmap().count()
    }

    /// Dirty bytes now (the last chunk counted whole).
    pub fn dirty_bytes(&self) -> u64 {
        self.dirty_chunks() << self.chunk_shift
    }

    /// Byte span of chunks `[start, end)`, clamped to the device.
    pub fn byte_span(&self, start: u64, end: u64) -> (u64, u64) {
        (
            (start << self.chunk_shift).min(self.size),
            (end << self.chunk_shift).min(self.size),
        )
    }

    /// Chunks touched by `[offset, offset+len)`.
    fn touched(&self, offset: u64, len: u64) -> (u64, u64) {
        (
            offset >> self.chunk_shift,
            (offset + len).div_ceil(self.granularity()),
        )
    }

    /// Chunks covered completely (the last chunk counts as covered when the
    /// write reaches the end of the device).
    fn covered(&self, offset: u64, len: u64) -> (u64, u64) {
        let end = offset + len;
        let first = offset.div_ceil(self.granularity());
        let last = if end == self.size {
            end.div_ceil(self.granularity())
        } else {
            end >> self.chunk_shift
        };
        (first, last.max(first))
    }

    /// Marks chunks `[start, end)` dirty and wakes the copier if any bit changed.
    pub fn mark_dirty(&self, start: u64, end: u64) {
        let set = self.bitmap().set_range(start, end).unwrap_or(0);
        if set > 0 {
            self.counters
                .dirtied_bytes
                .fetch_add(set << self.chunk_shift, Ordering::Relaxed);
            self.wake.notify_one();
        }
    }

    /// Marks chunks dirty as part of the initial dirty set (not counted in
    /// the dirty rate).
    pub fn mark_initial(&self, start: u64, end: u64) {
        let len = self.bitmap().len();
        let _ = self.bitmap().set_range(start.min(len), end.min(len));
    }

    /// Marks every chunk dirty (sync = full).
    pub fn mark_all_dirty(&self) {
        self.bitmap().set_all();
    }

    /// Marks dirty the chunks `saved` marks (a bitmap saved at shutdown);
    /// one of another length (never written by this job) marks everything.
    pub fn mark_from(&self, saved: &DirtyBitmap) {
        let mut bm = self.bitmap();
        if bm.merge(saved).is_err() {
            bm.set_all();
        }
    }

    /// The dirty bitmap, serialised (for a resume after a clean shutdown).
    pub fn bitmap_bytes(&self) -> Vec<u8> {
        self.bitmap().to_bytes()
    }

    /// The first dirty chunk at or after `from`, and the end of its run
    /// (capped at `max_chunks`).
    pub fn next_dirty_run(&self, from: u64, max_chunks: u64) -> Option<(u64, u64)> {
        let bm = self.bitmap();
        let start = bm.next_dirty(from)?;
        let limit = start.saturating_add(max_chunks).min(bm.len());
        let end = bm.next_clean(start).map_or(limit, |c| c.min(limit));
        Some((start, end))
    }

    /// Under one bitmap lock: whether every chunk of `[start, end)` is
    /// dirty, and whether any chunk of the device is.
    fn dirty_state(&self, start: u64, end: u64) -> (bool, bool) {
        let bm = self.bitmap();
        (
            bm.next_clean(start).is_none_or(|c| c >= end),
            bm.count() > 0,
        )
    }

    /// True while the target is failing (see the field).
    pub fn is_target_failing(&self) -> bool {
        self.target_failing.load(Ordering::Acquire)
    }

    fn record_error(&self, side: Side, operation: &'static str, error: EngineError) {
        if side == Side::Target {
            self.target_failing.store(true, Ordering::Release);
        }
        self.errors
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push_back(MirrorIoError {
                side,
                operation,
                error,
            });
        self.wake.notify_one();
    }

    /// Takes the errors queued since the last call.
    pub fn take_errors(&self) -> Vec<MirrorIoError> {
        self.errors
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .drain(..)
            .collect()
    }

    /// The guest write path while the job is active (see the module doc).
    ///
    /// # Errors
    /// The source's error; target errors go to the job's policy instead.
    pub async fn guest_write(
        &self,
        source: &Device,
        offset: u64,
        len: u64,
        op: WriteOp,
        reserved: Option<InflightPermit>,
        timing: &mut WriteTiming,
    ) -> Result<()> {
        let (first, end) = self.touched(offset, len);
        // A front end that read the payload under this job's budget hands
        // its permit over, so the buffer is counted once. One read under
        // another budget (the volume's, before this job started) keeps that
        // one too until the write is done, and takes this job's as well.
        let (mut permit, _other_budget): (Option<InflightPermit>, _) = match reserved {
            Some(p) if self.budget.issued(&p) => (Some(p), None),
            other => (None, other),
        };
        if self.is_guest_throttled() {
            self.guest_throttle.acquire(op.buffer_bytes()).await;
        }
        self.last_guest_write_ms
            .store(self.now_ms().max(1), Ordering::Release);
        self.hot.touch(offset, len);
        if self.footprint_on.load(Ordering::Relaxed) {
            self.note_footprint(first, end);
        }
        loop {
            let asked = tokio::time::Instant::now();
            let lock = self.locks.lock(offset, offset + len).await;
            timing.locked(asked);
            timing.mode = Some(CopyMode::Background);
            if !self.is_write_blocking() || self.is_target_failing() {
                let result = timing.source_leg(op.apply(source, offset, len)).await;
                // Set even on failure: the source may hold part of the write.
                self.mark_dirty(first, end);
                drop(lock);
                return result;
            }
            let (all_dirty, copying) = self.dirty_state(first, end);
            if all_dirty {
                return timing.source_leg(op.apply(source, offset, len)).await;
            }
            let bytes = op.buffer_bytes();
            if permit.is_none() && bytes > 0 {
                match self.budget.try_acquire(bytes) {
                    Some(p) => {
                        permit.replace(p);
                    }
                    None => {
                        // Never wait for budget while holding a range lock.
                        drop(lock);
                        permit.replace(self.budget.acquire(bytes).await);
                        continue;
                    }
                }
            }
            let target = if copying {
                &self.guest_target
            } else {
                &self.guest_target_alone
            };
            let (src, tgt) = match &op {
                WriteOp::Data { data, fua } => {
                    Device::write_both(source, target, offset, data.clone(), *fua).await
                }
                WriteOp::Zeroes { .. } => {
                    let started = tokio::time::Instant::now();
                    tokio::join!(timed(op.apply(source, offset, len)), async {
                        (op.apply(target, offset, len).await, started.elapsed())
                    })
                }
            };
            // Counted before the acknowledgement, so a flush the guest
            // issues after it sees this write.
            self.durability.guest_wrote();
            self.note_target_latency(tgt.1);
            let (src, tgt) = timing.both_legs(CopyMode::WriteBlocking, src, tgt);
            self.counters
                .would_dirty_bytes
                .fetch_add((end - first) << self.chunk_shift, Ordering::Relaxed);
            match (src, tgt) {
                (Ok(()), Ok(())) => {
                    self.counters
                        .synced_guest_bytes
                        .fetch_add(len, Ordering::Relaxed);
                    let (c0, c1) = self.covered(offset, len);
                    if c1 > c0 {
                        let cleared = self.bitmap().clear_range(c0, c1).unwrap_or(0);
                        self.counters
                            .progress_bytes
                            .fetch_add(cleared << self.chunk_shift, Ordering::Relaxed);
                    }
                    return Ok(());
                }
                (Err(e), _) => {
                    self.mark_dirty(first, end);
                    return Err(e);
                }
                (Ok(()), Err(e)) => {
                    self.mark_dirty(first, end);
                    self.record_error(Side::Target, "write", e);
                    return Ok(());
                }
            }
        }
    }

    fn note_target_latency(&self, took: std::time::Duration) {
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.latency.total.fetch_add(1, Ordering::Relaxed);
        self.latency.sum_us.fetch_add(us, Ordering::Relaxed);
        if self.latency.limit_us > 0 && us > self.latency.limit_us {
            self.latency.slow.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A guest flush: the source always; the target too in write-blocking
    /// mode, so an acknowledged flush is durable on both sides — unless no
    /// guest write has reached the target since its last flush (writes to
    /// dirty chunks go to the source alone; the copier's data is the job's
    /// business, see [`Self::flush_target_if_owed`]). A flush that leaves
    /// guest writes on the target unflushed (background mode, a failing
    /// target) is owed by the job before the pivot. If the target's flush
    /// fails, the guest's still succeeds (the source has its data, as for a
    /// failed target write), every chunk is dirty again (see
    /// `target_flush_failed`) and the error goes to the job's policy.
    ///
    /// # Errors
    /// The source's flush error.
    pub async fn guest_flush(&self, source: &Device) -> Result<()> {
        if !self.durability.guest_writes_unflushed() {
            return source.flush().await;
        }
        if !self.is_write_blocking() || self.is_target_failing() {
            self.durability.guest_flush_skipped_target();
            return source.flush().await;
        }
        let mark = self.durability.mark();
        let (src, tgt) = tokio::join!(source.flush(), self.target.flush());
        match tgt {
            Ok(()) => self.durability.flushed(mark),
            Err(e) => {
                self.target_flush_failed();
                self.record_error(Side::Target, "flush", e);
            }
        }
        src
    }

    /// Flushes the target and records what the flush covered.
    ///
    /// # Errors
    /// The target's flush error (everything is dirty again then).
    pub async fn flush_target(&self) -> Result<()> {
        let mark = self.durability.mark();
        match self.target.flush().await {
            Ok(()) => {
                self.durability.flushed(mark);
                Ok(())
            }
            Err(e) => {
                self.target_flush_failed();
                Err(e)
            }
        }
    }

    /// A failed flush may have lost any write since the last good one, and
    /// a later flush cannot tell: Linux marks the pages it failed to write
    /// clean and reports the error once. So no clean chunk is known to be
    /// on the target's disk any more: all are dirty again, and the copier
    /// writes them anew before the target can be READY or pivoted to.
    fn target_flush_failed(&self) {
        self.mark_all_dirty();
        self.wake.notify_one();
    }

    /// Whether the target owes a flush before it is a durable copy of the
    /// source: copies since its last flush, or guest flushes that skipped it
    /// (see `durability`). Guest writes alone owe none.
    pub fn target_flush_owed(&self) -> bool {
        self.durability.job_flush_owed()
    }

    /// Flushes the target if it owes a flush; true if it did.
    ///
    /// # Errors
    /// The target's flush error.
    pub async fn flush_target_if_owed(&self) -> Result<bool> {
        if !self.target_flush_owed() {
            return Ok(false);
        }
        self.flush_target().await.map(|()| true)
    }

    /// Copies chunks `[start, end)` from `source` to the target under their
    /// range lock. `permit` is the budget for the buffer; `speed` the job's
    /// copy rate limit.
    ///
    /// # Errors
    /// The failing side's error; the chunks are dirty again.
    pub async fn copy_range(
        &self,
        source: &Device,
        start: u64,
        end: u64,
        speed: &Throttle,
        permit: InflightPermit,
    ) -> Result<u64, MirrorIoError> {
        let (off, stop) = self.byte_span(start, end);
        let len = stop - off;
        speed.acquire(len).await;
        {
            // Guest-first: one copy at a time waits for the target, so a
            // guest write queues behind at most one (small) copy there.
            let _turn = self.copy_turn.lock().await;
            // Pay the target's write limit before taking the range lock, so
            // a guest write to these chunks waits for the copy's I/O only,
            // not for its turn at a slow target's token bucket.
            self.target.pay(len).await;
        }
        let asked = tokio::time::Instant::now();
        let _lock = self.locks.lock(off, stop).await;
        let locked = tokio::time::Instant::now();
        let cleared = self.bitmap().clear_range(start, end).unwrap_or(0);
        if cleared == 0 {
            // Synchronous guest writes made these chunks equal meanwhile.
            return Ok(0);
        }
        let io_started = tokio::time::Instant::now();
        let result = self.copy_locked(source, off, len).await;
        self.durability.copier_wrote();
        self.copy_busy_us.fetch_add(
            u64::try_from(io_started.elapsed().as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        let zeroes = result.as_ref().map(|c| *c == Copied::Zeroes);
        self.observed.copy_done(off, len, asked, locked, zeroes);
        drop(permit);
        match result {
            Ok(copied) => {
                if copied == Copied::Data {
                    self.counters
                        .copied_data_bytes
                        .fetch_add(len, Ordering::Relaxed);
                }
                self.target_failing.store(false, Ordering::Release);
                self.counters.copied_bytes.fetch_add(len, Ordering::Relaxed);
                self.counters
                    .progress_bytes
                    .fetch_add(cleared << self.chunk_shift, Ordering::Relaxed);
                Ok(len)
            }
            Err(e) => {
                if e.side == Side::Target {
                    self.target_failing.store(true, Ordering::Release);
                }
                self.mark_dirty(start, end);
                Err(e)
            }
        }
    }

    /// One copy, in one trip to the blocking pool: classify, read into a
    /// reused buffer, write (or zero) the target. The target's limit was
    /// paid before the range lock was taken.
    async fn copy_locked(
        &self,
        source: &Device,
        off: u64,
        len: u64,
    ) -> Result<Copied, MirrorIoError> {
        let src = Arc::clone(&source.backend);
        let dst = Arc::clone(&self.target.backend);
        let mut buf = self
            .buffers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pop()
            .unwrap_or_default();
        let joined = tokio::task::spawn_blocking(move || {
            let r = copy_blocking(&*src, &*dst, off, len, &mut buf);
            (r, buf)
        })
        .await;
        match joined {
            Ok((r, buf)) => {
                let mut pool = self
                    .buffers
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if pool.len() < COPY_BUFFERS_KEPT {
                    pool.push(buf);
                }
                r
            }
            Err(e) => Err(MirrorIoError {
                side: Side::Source,
                operation: "read",
                error: EngineError::io("copying", std::io::Error::other(e.to_string())),
            }),
        }
    }
}

/// Copy buffers kept for reuse (one per concurrent copy operation).
const COPY_BUFFERS_KEPT: usize = 16;

/// The blocking body of a copy: holes and all-zero data become
/// write-zeroes on the target, everything else a plain write.
/// What a copy wrote to the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Copied {
    Data,
    Zeroes,
}

fn copy_blocking(
    src: &dyn BlockBackend,
    dst: &dyn BlockBackend,
    off: u64,
    len: u64,
    buf: &mut AlignedBuf,
) -> Result<Copied, MirrorIoError> {
    let src_err = |error| MirrorIoError {
        side: Side::Source,
        operation: "read",
        error: EngineError::io("reading the source", error),
    };
    let tgt_err = |error| MirrorIoError {
        side: Side::Target,
        operation: "write",
        error: EngineError::io("writing the target", error),
    };
    if matches!(src.allocation(off, len), Ok(Allocation::Hole { end }) if end >= off + len) {
        return dst
            .write_zeroes(off, len, true)
            .map(|()| Copied::Zeroes)
            .map_err(tgt_err);
    }
    // A copy operation is at most 1 MiB (MAX_COPY_OP_BYTES), so it fits usize.
    let n = usize::try_from(len).map_err(|_| src_err(std::io::Error::other("copy too large")))?;
    if buf.capacity() < n {
        // Aligned, so a direct-I/O source and target take it as it is.
        *buf = AlignedBuf::new(n, aligned::ALIGN);
    }
    let buf = buf.window(n);
    // Leaves the source's page cache as it found it (see `read_uncached`).
    src.read_uncached(buf, off).map_err(src_err)?;
    if buf.iter().all(|&b| b == 0) {
        dst.write_zeroes(off, len, true)
            .map(|()| Copied::Zeroes)
            .map_err(tgt_err)
    } else {
        // Not kept in the target's page cache (see `write_uncached`).
        dst.write_uncached(buf, off)
            .map(|()| Copied::Data)
            .map_err(tgt_err)
    }
}

#[cfg(test)]
mod tests {
    //! Invariant 1 under random interleavings of guest writes (both modes,
    //! switched at random), zeroes, and copies: whenever nothing is in
    //! flight, every clean chunk is equal on both sides.

    use super::*;
    use crate::backend::MemBackend;
    use rand::{Rng, SeedableRng};
    use std::sync::atomic::AtomicUsize;

    const SIZE: usize = 1 << 20;
    const GRAN: u64 = 4096;

    fn check_clean_chunks(m: &ActiveMirror, src: &MemBackend, tgt: &MemBackend) -> usize {
        let (a, b) = (src.contents(), tgt.contents());
        let mut clean = 0;
        for c in 0..m.chunk_count() {
            if !m.is_dirty(c) {
                let r =
                    usize::try_from(c * GRAN).unwrap()..usize::try_from((c + 1) * GRAN).unwrap();
                let diff = a[r.clone()].iter().zip(&b[r]).position(|(x, y)| x != y);
                assert!(diff.is_none(), "clean chunk {c} differs at byte {diff:?}");
                clean += 1;
            }
        }
        clean
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn clean_chunks_are_equal_after_random_interleavings() {
        for seed in 0..4u64 {
            let src = Arc::new(MemBackend::new(SIZE));
            let tgt = Arc::new(MemBackend::new(SIZE));
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut init = vec![0u8; SIZE];
            rng.fill(&mut init[..]);
            src.write_at(&init, 0).unwrap();
            let m = Arc::new(ActiveMirror::new(
                SIZE as u64,
                GRAN,
                Device::unthrottled(tgt.clone()),
                64 << 10,
                seed % 2 == 0,
            ));
            m.mark_all_dirty();
            let source = Device::unthrottled(src.clone());
            let speed = Arc::new(Throttle::default());
            for round in 0..6 {
                let done = Arc::new(AtomicUsize::new(0));
                let mut tasks = Vec::new();
                for g in 0..4u64 {
                    let (m, source, done) = (Arc::clone(&m), source.clone(), Arc::clone(&done));
                    tasks.push(tokio::spawn(async move {
                        let mut rng =
                            rand::rngs::StdRng::seed_from_u64(seed * 100 + round * 10 + g);
                        for _ in 0..150 {
                            if rng.random_range(0..20) == 0 {
                                m.set_write_blocking(rng.random());
                            }
                            let len = rng.random_range(1..=3 * GRAN);
                            let off = rng.random_range(0..SIZE as u64 - len);
                            let op = if rng.random_range(0..8) == 0 {
                                WriteOp::Zeroes {
                                    punch: true,
                                    fua: false,
                                }
                            } else {
                                let mut d = vec![0u8; usize::try_from(len).unwrap()];
                                rng.fill(&mut d[..]);
                                WriteOp::Data {
                                    data: Bytes::from(d),
                                    fua: false,
                                }
                            };
                            m.guest_write(&source, off, len, op, None, &mut WriteTiming::start())
                                .await
                                .unwrap();
                        }
                        done.fetch_add(1, Ordering::Relaxed);
                    }));
                }
                for _ in 0..2 {
                    let (m, source, speed, done) = (
                        Arc::clone(&m),
                        source.clone(),
                        Arc::clone(&speed),
                        Arc::clone(&done),
                    );
                    tasks.push(tokio::spawn(async move {
                        let mut cursor = 0;
                        while done.load(Ordering::Relaxed) < 4 {
                            let Some((s, e)) = m
                                .next_dirty_run(cursor, 4)
                                .or_else(|| m.next_dirty_run(0, 4))
                            else {
                                tokio::task::yield_now().await;
                                continue;
                            };
                            cursor = e;
                            let permit = m.budget.acquire((e - s) * GRAN).await;
                            m.copy_range(&source, s, e, &speed, permit).await.unwrap();
                        }
                    }));
                }
                for t in tasks {
                    t.await.unwrap();
                }
                // Quiescent: nothing in flight.
                check_clean_chunks(&m, &src, &tgt);
            }
            // Copy what is left: then the sides are equal everywhere.
            while let Some((s, e)) = m.next_dirty_run(0, 64) {
                let permit = m.budget.acquire((e - s) * GRAN).await;
                m.copy_range(&source, s, e, &speed, permit).await.unwrap();
            }
            assert_eq!(check_clean_chunks(&m, &src, &tgt) as u64, m.chunk_count());
            assert!(
                src.contents() == tgt.contents(),
                "sides differ after the final copy"
            );
        }
    }
}

#[cfg(test)]
mod footprint_tests {
    use super::*;
    use crate::backend::MemBackend;

    #[tokio::test]
    async fn the_footprint_counts_distinct_chunks_only_while_tracked() {
        const GRAN: u64 = 64 << 10;
        let src = Device::unthrottled(Arc::new(MemBackend::new(1 << 20)));
        let tgt = Device::unthrottled(Arc::new(MemBackend::new(1 << 20)));
        let m = ActiveMirror::new(1 << 20, GRAN, tgt, 1 << 20, false);
        let (m, src) = (&m, &src);
        let write = |off: u64, len: u64| {
            let op = WriteOp::Data {
                data: Bytes::from(vec![7u8; usize::try_from(len).unwrap()]),
                fua: false,
            };
            async move {
                m.guest_write(src, off, len, op, None, &mut WriteTiming::start())
                    .await
            }
        };
        // Not tracked: nothing counted.
        write(0, 4096).await.unwrap();
        assert_eq!(m.take_footprint(), 0);
        m.track_footprint(true);
        // Three writes in chunk 0, one across chunks 2 and 3: three chunks.
        write(0, 1024).await.unwrap();
        write(4096, 1024).await.unwrap();
        write(GRAN - 512, 512).await.unwrap();
        write(3 * GRAN - 1, 2).await.unwrap();
        assert_eq!(m.take_footprint(), 3 * GRAN);
        // Taken: the next window starts empty, and chunk 0 counts again.
        assert_eq!(m.take_footprint(), 0);
        write(100, 1).await.unwrap();
        assert_eq!(m.take_footprint(), GRAN);
        m.track_footprint(false);
        write(5 * GRAN, 4096).await.unwrap();
        assert_eq!(m.take_footprint(), 0);
    }
}

#[cfg(test)]
mod flush_tests {
    use super::*;
    use crate::backend::MemBackend;
    use std::sync::atomic::AtomicUsize;

    /// Memory that counts its flushes (and fails them when told).
    #[derive(Debug)]
    struct Counting {
        mem: MemBackend,
        flushes: AtomicUsize,
        fail_flushes: AtomicBool,
    }

    impl BlockBackend for Counting {
        fn size(&self) -> u64 {
            self.mem.size()
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
            self.mem.read_at(buf, offset)
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
            self.mem.write_at(buf, offset)
        }
        fn write_zeroes(&self, offset: u64, len: u64, punch: bool) -> std::io::Result<()> {
            self.mem.write_zeroes(offset, len, punch)
        }
        fn flush(&self) -> std::io::Result<()> {
            self.flushes.fetch_add(1, Ordering::Relaxed);
            if self.fail_flushes.load(Ordering::Relaxed) {
                return Err(std::io::Error::from_raw_os_error(libc::EIO));
            }
            Ok(())
        }
        fn path(&self) -> &str {
            "counting"
        }
    }

    /// A 4 KiB guest write at `off`.
    async fn write_4k(m: &ActiveMirror, src: &Device, off: u64) {
        let op = WriteOp::Data {
            data: Bytes::from(vec![7u8; 4096]),
            fua: false,
        };
        m.guest_write(src, off, 4096, op, None, &mut WriteTiming::start())
            .await
            .unwrap();
    }

    /// A 1 MiB write-blocking mirror at 64 KiB granularity between two
    /// counting backends: (source, target, source device, mirror).
    fn write_blocking_mirror() -> (Arc<Counting>, Arc<Counting>, Device, ActiveMirror) {
        let (s, t) = (counting(), counting());
        let src = Device::unthrottled(s.clone());
        let m = ActiveMirror::new(
            1 << 20,
            64 << 10,
            Device::unthrottled(t.clone()),
            1 << 20,
            true,
        );
        (s, t, src, m)
    }

    fn counting() -> Arc<Counting> {
        Arc::new(Counting {
            mem: MemBackend::new(1 << 20),
            flushes: AtomicUsize::new(0),
            fail_flushes: AtomicBool::new(false),
        })
    }

    #[tokio::test]
    async fn a_guest_flush_flushes_the_target_only_when_guest_writes_reached_it() {
        const GRAN: u64 = 64 << 10;
        let (s, t, src, m) = write_blocking_mirror();
        let write = |off: u64| write_4k(&m, &src, off);
        let flushes = |b: &Counting| b.flushes.load(Ordering::Relaxed);

        // Nothing written yet: the source alone.
        m.guest_flush(&src).await.unwrap();
        assert_eq!((flushes(&s), flushes(&t)), (1, 0));
        // A write to a clean chunk reaches the target: both, once.
        write(0).await;
        assert!(
            !m.target_flush_owed(),
            "a guest write alone owes the job no flush"
        );
        m.guest_flush(&src).await.unwrap();
        assert_eq!((flushes(&s), flushes(&t)), (2, 1));
        m.guest_flush(&src).await.unwrap();
        assert_eq!((flushes(&s), flushes(&t)), (3, 1));
        // Writes to dirty chunks go to the source alone: so does the flush.
        m.mark_dirty(4, 8);
        write(5 * GRAN).await;
        m.guest_flush(&src).await.unwrap();
        assert_eq!((flushes(&s), flushes(&t)), (4, 1));
        // Background mode never flushes the target for a guest: the write
        // that reached it before is then owed a flush by the job.
        write(GRAN).await;
        m.set_write_blocking(false);
        assert!(!m.target_flush_owed());
        m.guest_flush(&src).await.unwrap();
        assert_eq!((flushes(&s), flushes(&t)), (5, 1));
        assert!(m.target_flush_owed());
        // Back in write-blocking mode, the write made before still counts.
        m.set_write_blocking(true);
        m.guest_flush(&src).await.unwrap();
        assert_eq!((flushes(&s), flushes(&t)), (6, 2));
        assert!(!m.target_flush_owed(), "the guest's own flush settled it");
    }

    #[tokio::test]
    async fn the_job_flushes_the_target_only_for_copies_since_its_last_flush() {
        const GRAN: u64 = 64 << 10;
        let (s, t, src, m) = write_blocking_mirror();
        s.mem.write_at(&[9u8; 4096], 0).unwrap();
        let flushes = |b: &Counting| b.flushes.load(Ordering::Relaxed);
        let speed = Throttle::default();

        assert!(!m.flush_target_if_owed().await.unwrap(), "nothing copied");
        m.mark_dirty(0, 2);
        let permit = m.budget.acquire(2 * GRAN).await;
        m.copy_range(&src, 0, 2, &speed, permit).await.unwrap();
        assert!(m.flush_target_if_owed().await.unwrap());
        assert_eq!(flushes(&t), 1);
        assert!(!m.flush_target_if_owed().await.unwrap(), "already flushed");
        assert_eq!(flushes(&t), 1);
        // A copy that finds its chunks already clean writes nothing.
        let permit = m.budget.acquire(GRAN).await;
        m.copy_range(&src, 3, 4, &speed, permit).await.unwrap();
        assert!(!m.target_flush_owed());
        // A guest flush that covers the target covers the copies before it.
        m.mark_dirty(4, 5);
        let permit = m.budget.acquire(GRAN).await;
        m.copy_range(&src, 4, 5, &speed, permit).await.unwrap();
        assert!(m.target_flush_owed());
        write_4k(&m, &src, 8 * GRAN).await;
        m.guest_flush(&src).await.unwrap();
        assert_eq!(flushes(&t), 2);
        assert!(!m.target_flush_owed());
    }

    /// A failed target flush may have lost writes a later flush cannot
    /// see (Linux reports a writeback error once): the guest's flush still
    /// succeeds on the source, but nothing on the target counts as copied.
    #[tokio::test]
    async fn a_failed_target_flush_makes_every_chunk_dirty() {
        let (_, t, src, m) = write_blocking_mirror();
        write_4k(&m, &src, 0).await;
        assert_eq!(m.dirty_chunks(), 0);
        t.fail_flushes.store(true, Ordering::Relaxed);
        m.guest_flush(&src).await.unwrap();
        assert_eq!(m.dirty_chunks(), m.chunk_count());
        assert_eq!(m.take_errors().len(), 1, "the policy hears of it");
        // The job's own flush, likewise.
        m.bitmap().clear_all();
        assert!(m.flush_target().await.is_err());
        assert_eq!(m.dirty_chunks(), m.chunk_count());
    }
}

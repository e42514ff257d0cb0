//! A volume: a named block device owned by the service, and the guest I/O
//! path into it.
//!
//! Every guest request, whichever front end it came in on, goes through
//! [`Volume::write`] / [`Volume::read`] / ...:
//!
//! 1. validate the range (bad input is an error, never a panic);
//! 2. pass the volume's write limits;
//! 3. enter the *I/O gate* (shared): a pivot takes the gate exclusively to
//!    drain in-flight guest I/O and hold new I/O for the moment it switches
//!    the backend, so no request ever sees half of a pivot;
//! 4. if a mirror job is active on the volume, hand the request to its
//!    [`ActiveMirror`] (range lock, source, target, bitmap — see
//!    `job/active.rs`); otherwise go straight to the backend.
//!
//! Writes, discards and flushes are not cancel-safe: a future dropped
//! halfway releases its range lock and the gate while its I/O still runs,
//! so a later overlapping write could reach the two sides in another order.
//! Front ends run each one on its own task to the end (NBD requests are
//! spawned; the gRPC data service spawns them too).

use crate::backend::BlockBackend;
use crate::bufpool::{self, PayloadBuf, PayloadPool};
use crate::device::Device;
use crate::error::{EngineError, ErrorKind, Result};
use crate::job::active::{ActiveMirror, WriteOp};
use crate::limits::{InflightBudget, InflightPermit};
use crate::observe::{Observer, WriteKind, WriteTiming};
use crate::throttle::{RateLimits, Throttle};
use bytes::Bytes;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use tokio::sync::OwnedRwLockWriteGuard;

/// Largest single guest request; bigger ones are refused (as in NBD).
pub const MAX_REQUEST_BYTES: u64 = 32 << 20;

/// How a job uses a volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VolumeRole {
    /// Guests keep using it while it is copied.
    Source,
    /// The copy is written to it; guest writes would be overwritten, so they are refused.
    Target,
}

/// Bytes of guest write payloads under a volume's own bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestInflight {
    /// Held now.
    pub current: u64,
    /// The most held at once so far.
    pub peak: u64,
    /// The bound.
    pub capacity: u64,
}

/// A named block device.
#[derive(Debug)]
pub struct Volume {
    name: String,
    /// The current backend; replaced at pivot (under the exclusive gate).
    backend: RwLock<Arc<dyn BlockBackend>>,
    /// Write limits, shared with every [`Device`] handed out for this volume.
    throttle: Arc<Throttle>,
    /// Shared by every guest request in flight; exclusive during a pivot.
    gate: Arc<tokio::sync::RwLock<()>>,
    /// The write hook of the mirror job copying this volume, if any. Set and
    /// cleared by the job under the exclusive gate.
    mirror: RwLock<Option<Arc<ActiveMirror>>>,
    /// The job that uses this volume, and how.
    user: Mutex<Option<(String, VolumeRole)>>,
    /// Bounds the write payloads front ends hold for this volume while no
    /// job copies it; a job's own budget takes over while one does.
    guest_budget: InflightBudget,
    /// Where front ends get the buffers they read write payloads into.
    payloads: Arc<PayloadPool>,
    /// The engine's observer, told about every guest write.
    observer: Observer,
    /// Set at shutdown once a job saved this volume's dirty bitmap for its
    /// resume: a write after that would be tracked nowhere, so guest
    /// writes are refused (`Unavailable`) from then until the process exits.
    writes_closed: AtomicBool,
}

fn read_lock<T: ?Sized>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    // Guarded values are swapped whole (an Arc or an Option); never torn.
    l.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn write_lock<T: ?Sized>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Volume {
    /// A volume over `backend`.
    pub fn new(
        name: String,
        backend: Arc<dyn BlockBackend>,
        limits: RateLimits,
        inflight_bytes: u32,
        payloads: Arc<PayloadPool>,
        observer: Observer,
    ) -> Arc<Self> {
        Arc::new(Self {
            name,
            backend: RwLock::new(backend),
            throttle: Arc::new(Throttle::new(limits)),
            gate: Arc::new(tokio::sync::RwLock::new(())),
            mirror: RwLock::new(None),
            user: Mutex::new(None),
            guest_budget: InflightBudget::new(inflight_bytes.max(1)),
            payloads,
            observer,
            writes_closed: AtomicBool::new(false),
        })
    }

    /// The volume's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The current backend.
    pub fn backend(&self) -> Arc<dyn BlockBackend> {
        Arc::clone(&read_lock(&self.backend))
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.backend().size()
    }

    /// Path of the current backend.
    pub fn path(&self) -> String {
        self.backend().path().to_owned()
    }

    /// Logical block size guests should use.
    pub fn block_size(&self) -> u32 {
        self.backend().block_size()
    }

    /// True when the backend bypasses the page cache (`O_DIRECT`).
    pub fn is_direct(&self) -> bool {
        self.backend().is_direct()
    }

    /// Write limits now in force.
    pub fn limits(&self) -> RateLimits {
        self.throttle.limits()
    }

    /// Changes the write limits; applies to requests from now on.
    pub fn set_limits(&self, limits: RateLimits) {
        self.throttle.set_limits(limits);
    }

    /// The current backend with this volume's limits.
    pub fn device(&self) -> Device {
        Device {
            backend: self.backend(),
            throttle: Some(Arc::clone(&self.throttle)),
            priority_share: None,
        }
    }

    /// The job using this volume, if any.
    pub fn user(&self) -> Option<(String, VolumeRole)> {
        self.user
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Claims the volume for a job.
    ///
    /// # Errors
    /// `FailedPrecondition` if another job uses it.
    pub(crate) fn claim(&self, job_id: &str, role: VolumeRole) -> Result<()> {
        let mut user = self
            .user
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match &*user {
            Some((other, _)) if other != job_id => Err(EngineError::precondition(format!(
                "volume {:?} is in use by job {other:?}",
                self.name
            ))),
            _ => {
                *user = Some((job_id.to_owned(), role));
                Ok(())
            }
        }
    }

    /// Gives the volume back if `job_id` holds it.
    pub(crate) fn release(&self, job_id: &str) {
        let mut user = self
            .user
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if user.as_ref().is_some_and(|(j, _)| j == job_id) {
            *user = None;
        }
    }

    /// Waits for in-flight guest I/O to finish and holds new I/O until the
    /// guard is dropped.
    pub(crate) async fn drain(&self) -> OwnedRwLockWriteGuard<()> {
        Arc::clone(&self.gate).write_owned().await
    }

    /// Refuses guest writes from now on (see `writes_closed`). Call with
    /// the gate drained, so no write is in flight.
    pub(crate) fn close_writes(&self) {
        self.writes_closed.store(true, Ordering::Release);
    }

    /// Installs or removes the mirror write hook. Call with the gate drained.
    pub(crate) fn set_mirror(&self, mirror: Option<Arc<ActiveMirror>>) {
        *write_lock(&self.mirror) = mirror;
    }

    /// Switches to a new backend. Call with the gate drained.
    pub(crate) fn set_backend(&self, backend: Arc<dyn BlockBackend>) {
        *write_lock(&self.backend) = backend;
    }

    /// Checks that `[offset, offset+len)` is a request this volume accepts:
    /// inside the device and at most [`MAX_REQUEST_BYTES`].
    ///
    /// # Errors
    /// `InvalidArgument` for an oversized request, `OutOfRange` past the end.
    pub fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        if len > MAX_REQUEST_BYTES {
            return Err(EngineError::invalid(format!(
                "request of {len} bytes is larger than the maximum of {MAX_REQUEST_BYTES}"
            )));
        }
        let size = self.size();
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(EngineError::new(
                ErrorKind::OutOfRange,
                format!(
                    "range {offset}+{len} is past the end of volume {:?} ({size} bytes)",
                    self.name
                ),
            )),
        }
    }

    fn check_writable(&self) -> Result<()> {
        match self.user() {
            Some((job, VolumeRole::Target)) => Err(EngineError::precondition(format!(
                "volume {:?} is the target of job {job:?}; guest writes are refused until the job ends",
                self.name
            ))),
            _ => Ok(()),
        }
    }

    fn mirror(&self) -> Option<Arc<ActiveMirror>> {
        read_lock(&self.mirror).clone()
    }

    /// Reads `len` bytes at `offset`.
    ///
    /// # Errors
    /// `OutOfRange`/`InvalidArgument` for a bad range; `Io` from the backend.
    pub async fn read(&self, offset: u64, len: u64) -> Result<Bytes> {
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(Bytes::new());
        }
        let _io = self.gate.read().await;
        // check_range capped len at MAX_REQUEST_BYTES, which fits usize.
        let len = usize::try_from(len).map_err(|_| EngineError::invalid("length too large"))?;
        self.device().read(offset, len).await
    }

    async fn submit(
        &self,
        offset: u64,
        len: u64,
        op: WriteOp,
        reserved: Option<InflightPermit>,
    ) -> Result<()> {
        let mut timing = WriteTiming::start();
        self.check_range(offset, len)?;
        self.check_writable()?;
        if len == 0 {
            return Ok(());
        }
        if let WriteOp::Data { .. } = op {
            self.throttle.acquire(len).await;
        } else {
            self.throttle.acquire(0).await;
        }
        let _io = self.gate.read().await;
        if self.writes_closed.load(Ordering::Acquire) {
            return Err(EngineError::new(
                ErrorKind::Unavailable,
                format!(
                    "volume {:?} takes no more writes: blockmirrord is shutting down",
                    self.name
                ),
            ));
        }
        let source = Device::unthrottled(self.backend());
        let (kind, mirror) = (WriteKind::of(&op, len), self.mirror());
        let result = match &mirror {
            Some(m) => {
                m.guest_write(&source, offset, len, op, reserved, &mut timing)
                    .await
            }
            None => timing.source_leg(op.apply(&source, offset, len)).await,
        };
        let job = mirror.as_ref().map(|m| &*m.observed);
        (self.observer).guest_write_done(&self.name, job, offset, kind, &timing, &result);
        result
    }

    /// Reserves `len` bytes for a write payload a front end is about to
    /// read: of the active mirror job's budget, so request buffers count
    /// toward the job's bound, or of the volume's own when no job copies
    /// it. Either way the front end stops reading when the bound is
    /// reached, and the client feels it.
    ///
    /// # Cancel safety
    /// Cancel-safe.
    pub async fn reserve_write(&self, len: u64) -> InflightPermit {
        // What the payload's buffer occupies (see bufpool).
        let bytes = bufpool::footprint(len);
        match self.mirror() {
            Some(m) => m.budget.acquire(bytes).await,
            None => self.guest_budget.acquire(bytes).await,
        }
    }

    /// A buffer for a front end to read a write payload of `len` bytes
    /// into, under a reservation from [`Self::reserve_write`]: reused when
    /// large, page-aligned when the volume does direct I/O (so the write
    /// needs no bounce copy).
    pub fn payload_buffer(&self, len: usize) -> PayloadBuf {
        self.payloads.take(len, self.is_direct())
    }

    /// Write payloads held under the volume's own bound (not those a job's
    /// budget covers).
    pub fn guest_inflight(&self) -> GuestInflight {
        GuestInflight {
            current: self.guest_budget.current(),
            peak: self.guest_budget.peak(),
            capacity: self.guest_budget.capacity(),
        }
    }

    /// [`Self::write`] with a reservation from [`Self::reserve_write`].
    ///
    /// # Errors
    /// As [`Self::write`].
    pub async fn write_reserved(
        &self,
        offset: u64,
        data: Bytes,
        fua: bool,
        reserved: InflightPermit,
    ) -> Result<()> {
        let len = data.len() as u64;
        self.submit(offset, len, WriteOp::Data { data, fua }, Some(reserved))
            .await
    }

    /// Writes `data` at `offset`; with `fua`, durable on return. The
    /// buffer counts toward the job's or the volume's bound like a front
    /// end's reserved payload, so no caller writes around it.
    ///
    /// # Errors
    /// A bad range, a volume that is a mirror target, or the source's I/O error.
    pub async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<()> {
        let reserved = self.reserve_write(data.len() as u64).await;
        self.write_reserved(offset, data, fua, reserved).await
    }

    /// Makes a range read as zeroes; unless `no_hole`, it may be deallocated.
    ///
    /// # Errors
    /// As [`Self::write`].
    pub async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        no_hole: bool,
        fua: bool,
    ) -> Result<()> {
        self.submit(
            offset,
            len,
            WriteOp::Zeroes {
                punch: !no_hole,
                fua,
            },
            None,
        )
        .await
    }

    /// Discards a range. blockmirror deallocates it, so it reads as zeroes
    /// afterwards on both sides of a mirror. With `fua`, the discard is
    /// durable when this returns (NBD's TRIM with FUA).
    ///
    /// # Errors
    /// As [`Self::write`].
    pub async fn discard(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        self.submit(offset, len, WriteOp::Zeroes { punch: true, fua }, None)
            .await
    }

    /// Allocation of `[offset, offset+len)` as (length, reads-as-zero)
    /// extents in order, at most `max_extents` of them (the last one may
    /// end before `offset + len`).
    ///
    /// # Errors
    /// A bad range; the backend's I/O error.
    pub async fn block_status(
        &self,
        offset: u64,
        len: u64,
        max_extents: usize,
    ) -> Result<Vec<(u64, bool)>> {
        self.check_range(offset, len.min(MAX_REQUEST_BYTES))?;
        let end = offset.saturating_add(len).min(self.size());
        let _io = self.gate.read().await;
        let backend = self.backend();
        let run = move || -> std::io::Result<Vec<(u64, bool)>> {
            let mut out = Vec::new();
            let mut off = offset;
            while off < end && out.len() < max_extents {
                let (stop, hole) = match backend.allocation(off, end - off)? {
                    crate::backend::Allocation::Data { end } => (end, false),
                    crate::backend::Allocation::Hole { end } => (end, true),
                };
                let stop = stop.clamp(off + 1, end);
                match out.last_mut() {
                    Some((l, h)) if *h == hole => *l += stop - off,
                    _ => out.push((stop - off, hole)),
                }
                off = stop;
            }
            Ok(out)
        };
        crate::device::blocking("querying allocation", run).await
    }

    /// Makes completed writes durable — on the target too while a job
    /// mirrors synchronously.
    ///
    /// # Errors
    /// The source's (or synchronous target's) I/O error.
    pub async fn flush(&self) -> Result<()> {
        let _io = self.gate.read().await;
        let source = Device::unthrottled(self.backend());
        match self.mirror() {
            Some(m) => m.guest_flush(&source).await,
            None => source.flush().await,
        }
    }
}

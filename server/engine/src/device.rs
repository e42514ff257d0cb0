//! Async access to a backend, with the write limits of the volume it
//! belongs to. Where the I/O runs:
//!
//! - reads the page cache holds: inline on the runtime worker
//!   ([`BlockBackend::read_cached`], `preadv2(RWF_NOWAIT)`): no hand-off;
//! - writes to local files (no FUA): the engine's short-I/O pool
//!   (`iopool.rs`), which wakes threads only for a backlog; a guest write
//!   mirrored between two local files runs both in one pool job
//!   ([`Device::write_both`]);
//! - everything else (flushes, FUA, remote targets, cache misses): tokio's
//!   blocking pool, where no job ever waits for another.

use crate::backend::{Allocation, BlockBackend};
use crate::error::{EngineError, Result};
use crate::iopool::IoPool;
use crate::throttle::Throttle;
use bytes::Bytes;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A side's result and how long it took.
pub type TimedResult = (Result<()>, Duration);

/// A backend plus the throttle its writes pass through.
#[derive(Debug, Clone)]
pub struct Device {
    /// The storage.
    pub backend: Arc<dyn BlockBackend>,
    /// Write limits (shared with the owning volume), if any.
    pub throttle: Option<Arc<Throttle>>,
    /// Writes take the throttle's priority lane with this share (percent)
    /// of its limit (guest writes on a mirror target go ahead of bulk copy).
    pub priority_share: Option<u32>,
}

/// Largest read tried inline on a runtime worker: copying this much from
/// the page cache takes some tens of microseconds, so a worker is never
/// held long; bigger reads amortise the hand-off to the blocking pool.
const INLINE_READ_MAX_BYTES: usize = 256 << 10;

/// Runs `f` on tokio's blocking pool; its error (or a panic) becomes an
/// I/O error about `what`.
pub(crate) async fn blocking<T: Send + 'static>(
    what: &'static str,
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> Result<T> {
    off_runtime(what, move || f().map_err(|e| EngineError::io(what, e))).await
}

/// Runs engine work that blocks (file syncs) on tokio's blocking pool, off
/// the threads guest I/O runs on; a panic becomes an I/O error about
/// `what`.
pub(crate) async fn off_runtime<T: Send + 'static>(
    what: &'static str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) => Err(EngineError::io(what, io::Error::other(e.to_string()))),
    }
}

impl Device {
    /// A device without limits.
    pub fn unthrottled(backend: Arc<dyn BlockBackend>) -> Self {
        Self {
            backend,
            throttle: None,
            priority_share: None,
        }
    }

    /// The same device, with writes in the throttle's priority lane, held
    /// to `share_percent` of its limit among themselves.
    pub fn with_priority(&self, share_percent: u32) -> Self {
        Self {
            priority_share: Some(share_percent),
            ..self.clone()
        }
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.backend.size()
    }

    /// Waits until the write limits let `bytes` pass, for a write that
    /// will then go through [`Self::prepaid`].
    pub async fn pay(&self, bytes: u64) {
        self.throttle(bytes).await;
    }

    /// The same backend without limits, for I/O already paid for.
    pub fn prepaid(&self) -> Self {
        Self::unthrottled(Arc::clone(&self.backend))
    }

    async fn throttle(&self, bytes: u64) {
        if let Some(t) = &self.throttle {
            match self.priority_share {
                Some(share) => t.acquire_priority(bytes, share).await,
                None => t.acquire(bytes).await,
            }
        }
    }

    /// Reads `len` bytes at `offset`: what the page cache holds right here
    /// on the calling worker (no thread hand-off, which is most of a 4 KiB
    /// read's cost), the rest on the blocking pool.
    ///
    /// # Errors
    /// The backend's I/O error.
    pub async fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        let mut buf = vec![0u8; len];
        let cached = if len <= INLINE_READ_MAX_BYTES {
            self.backend.read_cached(&mut buf, offset)
        } else {
            0
        };
        if cached == len {
            return Ok(Bytes::from(buf));
        }
        let b = Arc::clone(&self.backend);
        blocking("reading", move || {
            b.read_at(&mut buf[cached..], offset + cached as u64)?;
            Ok(buf)
        })
        .await
        .map(Bytes::from)
    }

    /// Writes `data` at `offset`; with `fua`, durable on return.
    ///
    /// # Errors
    /// The backend's I/O error.
    pub async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<()> {
        self.throttle(data.len() as u64).await;
        let b = Arc::clone(&self.backend);
        let write = move || {
            b.write_at(&data, offset)?;
            if fua { b.flush() } else { Ok(()) }
        };
        if !fua && self.backend.is_local() {
            IoPool::global()
                .run(write)
                .await
                .map_err(|e| EngineError::io("writing", e))
        } else {
            blocking("writing", write).await
        }
    }

    /// Writes the same bytes to `source` and `target` (a write-blocking
    /// guest write) and returns each side's result and time; the target's
    /// time includes its write limit.
    ///
    /// When both are local files and the write is not FUA, both `pwrite`s
    /// run in one I/O-pool job, one after the other: each takes
    /// microseconds in the page cache, while a second hand-off would cost a
    /// thread wake-up and a completion — most of what mirroring added to a
    /// 4 KiB write. Otherwise the two sides are written concurrently.
    pub async fn write_both(
        source: &Device,
        target: &Device,
        offset: u64,
        data: Bytes,
        fua: bool,
    ) -> (TimedResult, TimedResult) {
        if fua || !source.backend.is_local() || !target.backend.is_local() {
            let started = Instant::now();
            return tokio::join!(
                async {
                    (
                        source.write(offset, data.clone(), fua).await,
                        started.elapsed(),
                    )
                },
                async {
                    (
                        target.write(offset, data.clone(), fua).await,
                        started.elapsed(),
                    )
                },
            );
        }
        let started = Instant::now();
        // Both limits, as the concurrent path pays them (a source volume's
        // own limits are normally paid by its write path already).
        source.throttle(data.len() as u64).await;
        target.throttle(data.len() as u64).await;
        let limited = started.elapsed();
        let (src, tgt) = (Arc::clone(&source.backend), Arc::clone(&target.backend));
        let queued = Instant::now();
        let both = IoPool::global()
            .run(move || {
                let waited = queued.elapsed();
                let t = Instant::now();
                let s = src.write_at(&data, offset);
                let source_took = waited + t.elapsed();
                let t = Instant::now();
                let r = tgt.write_at(&data, offset);
                Ok(((s, source_took), (r, waited + t.elapsed())))
            })
            .await;
        let io = |e| EngineError::io("writing", e);
        match both {
            Ok(((s, s_took), (t, t_took))) => {
                ((s.map_err(io), s_took), (t.map_err(io), limited + t_took))
            }
            // Only a panic of the pool's job lands here; neither side is
            // known to be written.
            Err(e) => {
                let took = started.elapsed();
                let again = io::Error::new(e.kind(), e.to_string());
                ((Err(io(e)), took), (Err(io(again)), took))
            }
        }
    }

    /// Makes a range read as zeroes (`punch`: may deallocate).
    ///
    /// # Errors
    /// The backend's I/O error.
    pub async fn write_zeroes(&self, offset: u64, len: u64, punch: bool, fua: bool) -> Result<()> {
        // Zeroing costs one operation, not `len` bytes of bandwidth.
        self.throttle(0).await;
        let b = Arc::clone(&self.backend);
        blocking("writing zeroes", move || {
            b.write_zeroes(offset, len, punch)?;
            if fua { b.flush() } else { Ok(()) }
        })
        .await
    }

    /// Flushes completed writes to stable storage.
    ///
    /// # Errors
    /// The backend's I/O error.
    pub async fn flush(&self) -> Result<()> {
        let b = Arc::clone(&self.backend);
        blocking("flushing", move || b.flush()).await
    }

    /// Data or hole at the start of a range.
    ///
    /// # Errors
    /// The backend's I/O error.
    pub async fn allocation(&self, offset: u64, len: u64) -> Result<Allocation> {
        let b = Arc::clone(&self.backend);
        blocking("querying allocation", move || b.allocation(offset, len)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::MemBackend;

    /// A memory device whose writes fail, and which may claim to be remote
    /// (so `write_both` takes its concurrent path).
    #[derive(Debug)]
    struct Faulty {
        mem: MemBackend,
        fail_writes: bool,
        local: bool,
    }

    impl BlockBackend for Faulty {
        fn size(&self) -> u64 {
            self.mem.size()
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            self.mem.read_at(buf, offset)
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
            if self.fail_writes {
                return Err(io::Error::other("injected"));
            }
            self.mem.write_at(buf, offset)
        }
        fn write_zeroes(&self, offset: u64, len: u64, punch: bool) -> io::Result<()> {
            self.mem.write_zeroes(offset, len, punch)
        }
        fn flush(&self) -> io::Result<()> {
            Ok(())
        }
        fn is_local(&self) -> bool {
            self.local
        }
        fn path(&self) -> &str {
            "faulty"
        }
    }

    fn device(fail_writes: bool, local: bool) -> (Device, Arc<Faulty>) {
        let b = Arc::new(Faulty {
            mem: MemBackend::new(64 << 10),
            fail_writes,
            local,
        });
        (Device::unthrottled(b.clone()), b)
    }

    fn read(b: &Faulty, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        b.read_at(&mut buf, offset).unwrap();
        buf
    }

    #[tokio::test]
    async fn write_both_writes_both_sides_whichever_path_it_takes() {
        for (source_local, target_local, fua) in [
            (true, true, false),
            (true, false, false),
            (true, true, true),
        ] {
            let (src, s) = device(false, source_local);
            let (tgt, t) = device(false, target_local);
            let data = Bytes::from(vec![0xa5; 1024]);
            let (a, b) = Device::write_both(&src, &tgt, 3072, data.clone(), fua).await;
            a.0.unwrap();
            b.0.unwrap();
            assert_eq!(
                read(&s, 3072, 1024),
                data,
                "source {source_local} {target_local}"
            );
            assert_eq!(
                read(&t, 3072, 1024),
                data,
                "target {source_local} {target_local}"
            );
            assert_eq!(read(&t, 2048, 1024), vec![0; 1024]);
        }
    }

    #[tokio::test]
    async fn write_both_reports_each_sides_error_on_its_own_side() {
        for local in [true, false] {
            let (src, s) = device(false, true);
            let (tgt, _) = device(true, local);
            let data = Bytes::from(vec![7; 4096]);
            let (a, b) = Device::write_both(&src, &tgt, 0, data.clone(), false).await;
            a.0.unwrap();
            assert!(b.0.is_err(), "the target failed");
            assert_eq!(read(&s, 0, 4096), data);

            let (src, _) = device(true, true);
            let (tgt, t) = device(false, local);
            let (a, b) = Device::write_both(&src, &tgt, 0, data.clone(), false).await;
            assert!(a.0.is_err());
            b.0.unwrap();
            assert_eq!(read(&t, 0, 4096), data);
        }
    }
}

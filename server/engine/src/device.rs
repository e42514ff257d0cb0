//! Async access to a backend, with the write limits of the volume it
//! belongs to. Where the I/O runs:
//!
//! - reads the page cache holds: inline on the runtime worker
//!   ([`BlockBackend::read_cached`], `preadv2(RWF_NOWAIT)`): no hand-off;
//! - writes to local files (no FUA): the engine's short-I/O pool
//!   (`iopool.rs`), which wakes threads only for a backlog;
//! - everything else (flushes, FUA, remote targets, cache misses): tokio's
//!   blocking pool, where no job ever waits for another.

use crate::backend::{Allocation, BlockBackend};
use crate::error::{EngineError, Result};
use crate::iopool::IoPool;
use crate::throttle::Throttle;
use bytes::Bytes;
use std::io;
use std::sync::Arc;

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
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(|e| EngineError::io(what, e)),
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

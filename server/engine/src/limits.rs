//! The byte budget that bounds a job's memory (DESIGN.md invariant 3).
//!
//! Every buffer a job holds on its way to the target — a background copy
//! chunk, a synchronous guest write — carries an [`InflightPermit`] for its
//! size. Permits come from one semaphore sized `buf_size`; past the bound,
//! new work waits (backpressure). The permit travels with the I/O and gives
//! its bytes back when dropped.
//!
//! Who may wait: guest writes and copy tasks. A caller must never wait for a
//! permit while holding a range lock (a copy holding permits may be waiting
//! for that range: a cycle); the write path therefore takes its permit
//! first, or drops its lock before waiting.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The bound on one job's bytes in flight, with exact accounting.
#[derive(Debug)]
pub struct InflightBudget {
    semaphore: Arc<Semaphore>,
    capacity: u32,
    counters: Arc<Counters>,
}

#[derive(Debug, Default)]
struct Counters {
    current: AtomicU64,
    peak: AtomicU64,
}

/// Bytes held in flight; returned to the budget on drop.
#[must_use = "the bytes are returned to the budget when the permit is dropped"]
#[derive(Debug)]
pub struct InflightPermit {
    _permit: OwnedSemaphorePermit,
    bytes: u64,
    counters: Arc<Counters>,
}

impl InflightBudget {
    /// A budget of `capacity` bytes.
    pub fn new(capacity: u32) -> Self {
        Self {
            semaphore: Arc::new(Semaphore::new(capacity as usize)),
            capacity,
            counters: Arc::default(),
        }
    }

    /// The bound in bytes.
    pub fn capacity(&self) -> u64 {
        u64::from(self.capacity)
    }

    /// Bytes held now.
    pub fn current(&self) -> u64 {
        self.counters.current.load(Ordering::Acquire)
    }

    /// The most bytes ever held at once.
    pub fn peak(&self) -> u64 {
        self.counters.peak.load(Ordering::Acquire)
    }

    /// A request larger than the whole budget takes all of it, so it can
    /// still run (alone).
    fn units(&self, bytes: u64) -> u32 {
        u32::try_from(bytes)
            .unwrap_or(u32::MAX)
            .clamp(1, self.capacity)
    }

    fn wrap(&self, permit: OwnedSemaphorePermit, units: u32) -> InflightPermit {
        let bytes = u64::from(units);
        let now = self.counters.current.fetch_add(bytes, Ordering::AcqRel) + bytes;
        self.counters.peak.fetch_max(now, Ordering::AcqRel);
        InflightPermit {
            _permit: permit,
            bytes,
            counters: Arc::clone(&self.counters),
        }
    }

    /// Waits for `bytes` of budget.
    ///
    /// # Cancel safety
    /// Cancel-safe (the request loses its place in the queue).
    pub async fn acquire(&self, bytes: u64) -> InflightPermit {
        let units = self.units(bytes);
        // The semaphore is never closed, so acquiring cannot fail.
        let permit = Arc::clone(&self.semaphore)
            .acquire_many_owned(units)
            .await
            .expect("budget semaphore is never closed");
        self.wrap(permit, units)
    }

    /// True when `permit` came from this budget (a front end may have read
    /// a payload under another one, e.g. before a job started).
    pub fn issued(&self, permit: &InflightPermit) -> bool {
        Arc::ptr_eq(&self.counters, &permit.counters)
    }

    /// Takes `bytes` of budget if available now.
    pub fn try_acquire(&self, bytes: u64) -> Option<InflightPermit> {
        let units = self.units(bytes);
        let permit = Arc::clone(&self.semaphore)
            .try_acquire_many_owned(units)
            .ok()?;
        Some(self.wrap(permit, units))
    }
}

impl Drop for InflightPermit {
    fn drop(&mut self) {
        self.counters
            .current
            .fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accounting_tracks_current_and_peak() {
        let b = InflightBudget::new(100);
        let p1 = b.acquire(60).await;
        assert!(b.try_acquire(50).is_none());
        let p2 = b.try_acquire(40).unwrap();
        assert_eq!(b.current(), 100);
        drop(p1);
        drop(p2);
        assert_eq!(b.current(), 0);
        assert_eq!(b.peak(), 100);
        // Oversized requests take the whole budget instead of hanging.
        let big = b.acquire(1000).await;
        assert_eq!(b.current(), 100);
        assert!(b.issued(&big));
        assert!(!InflightBudget::new(100).issued(&big));
        drop(big);
    }
}

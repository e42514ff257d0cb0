//! Byte-range locks between guest writes and the background copier.
//!
//! A copy operation holds its chunk-aligned range while it reads the source
//! and writes the target; a guest write holds exactly the bytes it writes.
//! Overlapping holders exclude each other, so a chunk is never copied while a
//! guest write to it is half done, and two overlapping guest writes reach
//! source and target in the same order.
//!
//! Requests are granted in arrival order among those that overlap: a request
//! waits for every *earlier* overlapping request (held or waiting), so a
//! stream of guest writes cannot starve a copy and vice versa. A waiter
//! sleeps on its own oneshot channel and is woken by the release that makes
//! it grantable — no polling. Dropping a [`RangeGuard`], whether granted or
//! still waiting (a cancelled future), releases or withdraws the request.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use tokio::sync::oneshot;

/// The lock table of one mirror job.
#[derive(Debug, Default)]
pub struct RangeLocks {
    inner: Mutex<Table>,
}

#[derive(Debug, Default)]
struct Table {
    next_id: u64,
    /// Granted ranges.
    held: Vec<Entry>,
    /// Requests in arrival order, each with the channel that wakes it.
    waiting: VecDeque<(Entry, oneshot::Sender<()>)>,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    id: u64,
    start: u64,
    end: u64,
}

impl Entry {
    fn overlaps(&self, start: u64, end: u64) -> bool {
        self.start < end && start < self.end
    }
}

/// A held (or, inside [`RangeLocks::lock`], requested) range; released on drop.
#[must_use = "the range is unlocked when the guard is dropped"]
#[derive(Debug)]
pub struct RangeGuard {
    locks: Arc<RangeLocks>,
    id: u64,
}

impl RangeLocks {
    /// A new, empty table.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        // Every critical section leaves the table consistent before any
        // operation that could panic, so a poisoned lock is still usable.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Locks `[start, end)`, waiting for every earlier overlapping request.
    ///
    /// # Cancel safety
    /// Cancel-safe: dropping the future withdraws the request.
    pub async fn lock(self: &Arc<Self>, start: u64, end: u64) -> RangeGuard {
        let rx = {
            let mut t = self.table();
            let id = t.next_id;
            t.next_id += 1;
            let entry = Entry { id, start, end };
            let blocked = t.held.iter().any(|e| e.overlaps(start, end))
                || t.waiting.iter().any(|(e, _)| e.overlaps(start, end));
            let guard = RangeGuard {
                locks: Arc::clone(self),
                id,
            };
            if !blocked {
                t.held.push(entry);
                return guard;
            }
            let (tx, rx) = oneshot::channel();
            t.waiting.push_back((entry, tx));
            (guard, rx)
        };
        let (guard, rx) = rx;
        // The sender lives in the table until the grant; it is only dropped
        // unsent when this very request is withdrawn, which needs `guard`.
        let _ = rx.await;
        guard
    }

    /// Locks `[start, end)` if that needs no waiting.
    pub fn try_lock(self: &Arc<Self>, start: u64, end: u64) -> Option<RangeGuard> {
        let mut t = self.table();
        let blocked = t.held.iter().any(|e| e.overlaps(start, end))
            || t.waiting.iter().any(|(e, _)| e.overlaps(start, end));
        if blocked {
            return None;
        }
        let id = t.next_id;
        t.next_id += 1;
        t.held.push(Entry { id, start, end });
        Some(RangeGuard {
            locks: Arc::clone(self),
            id,
        })
    }

    /// Number of granted ranges (for tests and statistics).
    pub fn held_count(&self) -> usize {
        self.table().held.len()
    }

    fn release(&self, id: u64) {
        let mut t = self.table();
        if let Some(i) = t.held.iter().position(|e| e.id == id) {
            t.held.swap_remove(i);
        } else if let Some(i) = t.waiting.iter().position(|(e, _)| e.id == id) {
            t.waiting.remove(i);
        } else {
            return;
        }
        // Grant, in order, every waiter that overlaps no held range and no
        // earlier waiter.
        let mut i = 0;
        while i < t.waiting.len() {
            let (e, _) = t.waiting[i];
            let blocked = t.held.iter().any(|h| h.overlaps(e.start, e.end))
                || t.waiting
                    .iter()
                    .take(i)
                    .any(|(w, _)| w.overlaps(e.start, e.end));
            if blocked {
                i += 1;
                continue;
            }
            if let Some((entry, tx)) = t.waiting.remove(i) {
                t.held.push(entry);
                // The receiver may be gone if its future was dropped just now;
                // its guard's drop will then release the range.
                let _ = tx.send(());
            }
        }
    }
}

impl Drop for RangeGuard {
    fn drop(&mut self) {
        self.locks.release(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn disjoint_ranges_do_not_wait() {
        let l = RangeLocks::new();
        let _a = l.lock(0, 10).await;
        let _b = l.lock(10, 20).await;
        assert_eq!(l.held_count(), 2);
    }

    #[tokio::test]
    async fn overlapping_waits_until_release() {
        let l = RangeLocks::new();
        let a = l.lock(0, 10).await;
        let l2 = Arc::clone(&l);
        let waiter = tokio::spawn(async move {
            let _g = l2.lock(5, 15).await;
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        assert!(l.try_lock(9, 12).is_none());
        drop(a);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("waiter woken")
            .unwrap();
        assert_eq!(l.held_count(), 0);
    }

    #[tokio::test]
    async fn later_request_does_not_overtake_earlier_waiter() {
        let l = RangeLocks::new();
        let a = l.lock(0, 10).await;
        let l2 = Arc::clone(&l);
        let first = tokio::spawn(async move { l2.lock(0, 20).await });
        tokio::time::sleep(Duration::from_millis(10)).await;
        // Overlaps only the waiter, not the holder: still must queue.
        assert!(l.try_lock(15, 20).is_none());
        drop(a);
        let g = first.await.unwrap();
        assert!(l.try_lock(15, 20).is_none());
        drop(g);
        assert!(l.try_lock(15, 20).is_some());
    }

    #[tokio::test]
    async fn cancelled_waiter_is_withdrawn() {
        let l = RangeLocks::new();
        let a = l.lock(0, 10).await;
        let fut = l.lock(0, 10);
        assert!(
            tokio::time::timeout(Duration::from_millis(10), fut)
                .await
                .is_err()
        );
        drop(a);
        assert!(l.try_lock(0, 10).is_some());
    }
}

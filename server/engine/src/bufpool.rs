//! Reused buffers for guest write payloads.
//!
//! Front ends read every write's payload into a buffer of its own, which
//! lives until the write is done. With glibc's per-thread arenas, buffers
//! of 64 KiB to 1 MiB freed by one runtime thread stay with that thread's
//! arena for its later allocations, so the daemon's resident memory grew to
//! about twice the bytes the budgets let be in flight (measured: 21 MiB
//! over idle for a 16 MiB bound, 1 MiB writes at queue depth 64). Taking
//! large buffers from this pool instead, whichever thread frees them, keeps
//! resident memory at what the budgets allow.
//!
//! Sizes from [`MIN_POOLED`] to [`MAX_POOLED`] are rounded up to a power
//! of two, and budgets charge the rounded size ([`footprint`]); smaller
//! payloads come from the allocator, as before, and so do larger ones
//! (front ends read those in 1 MiB slices). The pool keeps at most its
//! capacity in free buffers; beyond it, freed buffers go back to the
//! allocator.

use crate::aligned::{self, AlignedBuf};
use bytes::{Bytes, BytesMut};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Smallest pooled size: below it, per-thread caching costs little.
pub const MIN_POOLED: usize = 64 << 10;
/// Largest pooled size: the slice front ends read big writes in.
pub const MAX_POOLED: usize = 1 << 20;
const CLASSES: usize = (MAX_POOLED / MIN_POOLED).trailing_zeros() as usize + 1;

/// Free payload buffers by size class, shared by every volume.
#[derive(Debug)]
pub struct PayloadPool {
    free: [Mutex<Vec<AlignedBuf>>; CLASSES],
    /// Bytes in free buffers.
    pooled: AtomicUsize,
    capacity: usize,
}

/// A buffer to read one payload into; [`Self::freeze`] makes it the
/// write's data. A pooled one returns to its pool when the last reference
/// to that data is dropped.
#[derive(Debug)]
pub struct PayloadBuf(Inner);

#[derive(Debug)]
enum Inner {
    Heap(BytesMut),
    Pooled(Pooled),
}

#[derive(Debug)]
struct Pooled {
    buf: AlignedBuf,
    len: usize,
    class: usize,
    pool: Arc<PayloadPool>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Free lists are pushed and popped whole; never torn.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The size class of `len`, if pooled.
fn class_of(len: usize) -> Option<usize> {
    (MIN_POOLED..=MAX_POOLED)
        .contains(&len)
        .then(|| (len.next_power_of_two() / MIN_POOLED).trailing_zeros() as usize)
}

/// The memory a payload of `len` bytes occupies: its pooled size, rounded
/// up. Budgets charge this, so they bound memory, not payload bytes.
pub fn footprint(len: u64) -> u64 {
    usize::try_from(len)
        .ok()
        .and_then(class_of)
        .map_or(len, |c| class_size(c) as u64)
}

fn class_size(class: usize) -> usize {
    MIN_POOLED << class
}

impl PayloadPool {
    /// A pool keeping at most `capacity` bytes of free buffers.
    pub fn new(capacity: usize) -> Arc<Self> {
        Arc::new(Self {
            free: std::array::from_fn(|_| Mutex::default()),
            pooled: AtomicUsize::new(0),
            capacity,
        })
    }

    /// Bytes held in free buffers now.
    pub fn pooled_bytes(&self) -> usize {
        self.pooled.load(Ordering::Acquire)
    }

    /// A buffer of `len` bytes. Its contents are unspecified (a reused
    /// buffer holds an earlier payload): the caller fills all of it.
    /// Pooled buffers start on a page; a smaller one only if `aligned`
    /// (for direct I/O).
    pub fn take(self: &Arc<Self>, len: usize, aligned: bool) -> PayloadBuf {
        let Some(class) = class_of(len) else {
            return PayloadBuf(Inner::Heap(if aligned {
                aligned::zeroed_bytes(len)
            } else {
                BytesMut::zeroed(len)
            }));
        };
        let reused = lock(&self.free[class]).pop();
        let buf = match reused {
            Some(b) => {
                self.pooled.fetch_sub(class_size(class), Ordering::AcqRel);
                b
            }
            None => AlignedBuf::new(class_size(class), aligned::ALIGN),
        };
        PayloadBuf(Inner::Pooled(Pooled {
            buf,
            len,
            class,
            pool: Arc::clone(self),
        }))
    }

    fn give_back(&self, class: usize, buf: AlignedBuf) {
        let size = class_size(class);
        let kept = self
            .pooled
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |p| {
                (p + size <= self.capacity).then_some(p + size)
            })
            .is_ok();
        if kept {
            lock(&self.free[class]).push(buf);
        }
    }
}

impl PayloadBuf {
    /// The bytes to fill.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        match &mut self.0 {
            Inner::Heap(b) => b,
            Inner::Pooled(p) => p.buf.window(p.len),
        }
    }

    /// The filled buffer as the write's data.
    pub fn freeze(self) -> Bytes {
        match self.0 {
            Inner::Heap(b) => b.freeze(),
            Inner::Pooled(p) => Bytes::from_owner(p),
        }
    }
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        self.buf.window_ref(self.len)
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        self.pool.give_back(self.class, buf);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_round_up_to_a_power_of_two_within_the_pooled_range() {
        assert_eq!(class_of(4096), None);
        assert_eq!(class_of(MIN_POOLED - 1), None);
        assert_eq!(class_of(MIN_POOLED), Some(0));
        assert_eq!(class_of(MIN_POOLED + 1), Some(1));
        assert_eq!(class_of(MAX_POOLED), Some(CLASSES - 1));
        assert_eq!(class_of(MAX_POOLED + 1), None);
        assert_eq!(class_size(CLASSES - 1), MAX_POOLED);
        assert_eq!(footprint(4096), 4096);
        assert_eq!(footprint(513 << 10), 1 << 20);
        assert_eq!(footprint(32 << 20), 32 << 20);
    }

    #[test]
    fn buffers_come_back_when_their_data_is_dropped_and_are_reused() {
        let pool = PayloadPool::new(2 << 20);
        let mut a = pool.take(1 << 20, false);
        a.as_mut_slice().fill(1);
        let first = a.as_mut_slice().as_ptr();
        let data = a.freeze();
        assert_eq!(data.len(), 1 << 20);
        assert_eq!(data.as_ptr().addr() % aligned::ALIGN, 0);
        let part = data.slice(10..20);
        drop(data);
        // A slice of the data still holds the buffer.
        assert_eq!(pool.pooled_bytes(), 0);
        assert_eq!(&part[..], &[1u8; 10]);
        drop(part);
        assert_eq!(pool.pooled_bytes(), 1 << 20);
        // The same memory serves the next payload of that class, even one
        // a little smaller (rounded up), with exactly the length asked.
        let mut b = pool.take(700 << 10, false);
        assert_eq!(b.as_mut_slice().len(), 700 << 10);
        assert_eq!(b.as_mut_slice().as_ptr(), first);
        assert_eq!(pool.pooled_bytes(), 0);
        drop(b);
        assert_eq!(pool.pooled_bytes(), 1 << 20);
    }

    #[test]
    fn the_pool_keeps_no_more_than_its_capacity() {
        let pool = PayloadPool::new(1 << 20);
        let bufs: Vec<_> = (0..3).map(|_| pool.take(1 << 20, false)).collect();
        drop(bufs);
        assert_eq!(pool.pooled_bytes(), 1 << 20);
        // Small payloads are not pooled; aligned ones start on a page.
        let mut small = pool.take(4096, true);
        assert_eq!(small.as_mut_slice().as_ptr().addr() % aligned::ALIGN, 0);
        drop(small);
        assert_eq!(pool.pooled_bytes(), 1 << 20);
    }
}

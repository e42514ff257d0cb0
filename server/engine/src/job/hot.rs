//! Regions guests wrote in the last moments, which the first pass copies
//! last.
//!
//! Copying a chunk that guests are about to write again is wasted work. In
//! background mode their next write dirties it again and the copy is done
//! twice. In write-blocking mode the chunk, once clean, makes every later
//! guest write to it synchronous on the target, while a write to a chunk
//! that is still dirty goes to the source alone. So while guests write, the
//! first pass copies the cold part of the disk first and leaves the guests'
//! working set for last: it then crosses the target once, and guests pay
//! the synchronous path only for that final stretch. (Under the seed
//! workload, 1 KiB writes in a 16 MiB hot region of a 256 MiB disk, that is
//! the last 6 % of the copy instead of all of it after the copier first
//! passes the region.)
//!
//! "Recently" is one or two windows: writes set bits in the current
//! generation, the runner rotates generations every window, and a region is
//! hot while either generation has its bit. Bits are atomic, so the write
//! path pays one `fetch_or` per region it touches and takes no lock; a bit
//! lost to a concurrent rotation only makes a region look cold early.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Smallest region tracked: coarse enough that skipping the hot set costs
/// the copier one step per MiB of it, and the bits stay small (256 KiB for
/// 1 TiB, per generation).
pub const MIN_REGION_BYTES: u64 = 1 << 20;

/// Regions of a device written recently.
#[derive(Debug)]
pub struct HotRegions {
    /// log2 of the region size.
    shift: u32,
    generations: [Vec<AtomicU64>; 2],
    /// Index of the generation writes set now.
    current: AtomicUsize,
}

impl HotRegions {
    /// Tracking for a `size`-byte device in regions of `region_bytes` (a
    /// power of two) or [`MIN_REGION_BYTES`], whichever is larger.
    pub fn new(size: u64, region_bytes: u64) -> Self {
        let shift = region_bytes.max(MIN_REGION_BYTES).trailing_zeros();
        let words = usize::try_from((size >> shift).div_ceil(64) + 1).unwrap_or(usize::MAX);
        let generation = || (0..words).map(|_| AtomicU64::new(0)).collect();
        Self {
            shift,
            generations: [generation(), generation()],
            current: AtomicUsize::new(0),
        }
    }

    /// Notes a guest write of `[offset, offset + len)`.
    pub fn touch(&self, offset: u64, len: u64) {
        let generation = &self.generations[self.current.load(Ordering::Relaxed) & 1];
        let first = offset >> self.shift;
        let last = (offset + len.max(1) - 1) >> self.shift;
        for region in first..=last {
            if let Some(word) = usize::try_from(region / 64)
                .ok()
                .and_then(|w| generation.get(w))
            {
                word.fetch_or(1 << (region % 64), Ordering::Relaxed);
            }
        }
    }

    /// True when guests wrote the region holding byte `offset` in the last
    /// one or two windows.
    pub fn is_hot(&self, offset: u64) -> bool {
        let region = offset >> self.shift;
        let Ok(word) = usize::try_from(region / 64) else {
            return false;
        };
        let bit = 1 << (region % 64);
        self.generations.iter().any(|g| {
            g.get(word)
                .is_some_and(|w| w.load(Ordering::Relaxed) & bit != 0)
        })
    }

    /// The first byte after the region holding byte `offset`.
    pub fn region_end(&self, offset: u64) -> u64 {
        ((offset >> self.shift) + 1) << self.shift
    }

    /// Ends a window: the older generation is forgotten and takes the
    /// writes from now on.
    pub fn rotate(&self) {
        let older = (self.current.load(Ordering::Relaxed) + 1) & 1;
        for word in &self.generations[older] {
            word.store(0, Ordering::Relaxed);
        }
        self.current.store(older, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_region_stays_hot_for_one_to_two_windows() {
        let hot = HotRegions::new(64 << 20, 64 << 10);
        assert!(!hot.is_hot(0));
        // A write across a region boundary heats both regions.
        hot.touch((3 << 20) - 10, 20);
        assert!(hot.is_hot(2 << 20) && hot.is_hot(3 << 20));
        assert!(!hot.is_hot(1 << 20) && !hot.is_hot(4 << 20));
        assert_eq!(hot.region_end((3 << 20) + 5), 4 << 20);
        hot.rotate();
        assert!(hot.is_hot(3 << 20), "still hot in the next window");
        hot.touch(10 << 20, 1);
        hot.rotate();
        assert!(
            !hot.is_hot(3 << 20),
            "cold after two windows without a write"
        );
        assert!(hot.is_hot(10 << 20));
        hot.rotate();
        assert!(!hot.is_hot(10 << 20));
    }

    #[test]
    fn the_last_region_of_an_odd_size_is_tracked() {
        let size = (5 << 20) + 4096;
        let hot = HotRegions::new(size, 4096);
        hot.touch(size - 1, 1);
        assert!(hot.is_hot(size - 1));
        assert!(!hot.is_hot(0));
        // Out of range is never hot and never panics.
        hot.touch(u64::MAX / 2, 10);
        assert!(!hot.is_hot(u64::MAX / 2));
    }
}

//! A lock-free latency histogram with log-spaced buckets, small enough to
//! keep one per job and per write leg, cheap enough to record every write.
//!
//! Buckets: values below 8 ns each get their own bucket; above that, every
//! power of two is split into 8 equal sub-buckets. So a bucket is at most
//! 1/8 of its lower bound wide, and a quantile read from the histogram is
//! within 12.5 % of the exact one (it is reported as the bucket midpoint,
//! within about 6 %). Every `u64` nanosecond value has a bucket, so nothing
//! is ever clamped.
//!
//! Recording is two relaxed atomic increments; reading walks the 496
//! counters. Reads taken while writes land are not a consistent snapshot,
//! which is fine for percentiles shown to an operator.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Sub-buckets per power of two, as a power of two (8).
const SUB_BITS: u32 = 3;
const SUB: u64 = 1 << SUB_BITS;
/// Buckets needed to cover every `u64`: 8 exact ones, then 8 per octave
/// for octaves 3..=63.
const BUCKETS: usize = (64 - SUB_BITS as usize + 1) << SUB_BITS;

/// The bucket a value (in nanoseconds) falls in.
fn bucket_of(v: u64) -> usize {
    if v < SUB {
        // v < 8 fits any usize.
        return usize::try_from(v).unwrap_or(0);
    }
    let msb = 63 - v.leading_zeros();
    let sub = (v >> (msb - SUB_BITS)) & (SUB - 1);
    // msb <= 63, so the index is below BUCKETS (496).
    usize::try_from(u64::from(msb - SUB_BITS + 1) * SUB + sub).unwrap_or(BUCKETS - 1)
}

/// The smallest and largest value of bucket `i`.
fn bucket_bounds(i: usize) -> (u64, u64) {
    let i = i as u64;
    if i < SUB {
        return (i, i);
    }
    let shift = i / SUB - 1;
    let lower = (SUB + i % SUB) << shift;
    (lower, lower + ((1u64 << shift) - 1))
}

/// A latency histogram (see the module doc).
#[derive(Debug)]
pub struct LatencyHistogram {
    counts: Box<[AtomicU64]>,
    total: AtomicU64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self {
            counts: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            total: AtomicU64::new(0),
        }
    }
}

impl LatencyHistogram {
    /// Records one latency.
    pub fn record(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.record_nanos(ns);
    }

    fn record_nanos(&self, ns: u64) {
        if let Some(c) = self.counts.get(bucket_of(ns)) {
            c.fetch_add(1, Ordering::Relaxed);
            self.total.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Latencies recorded.
    pub fn count(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    /// The latency at quantile `q` (0..=1): the midpoint of the bucket
    /// that holds the `ceil(q * count)`-th smallest value. `None` if empty.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        self.quantile_nanos(q).map(Duration::from_nanos)
    }

    fn quantile_nanos(&self, q: f64) -> Option<u64> {
        let counts: Vec<u64> = self
            .counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
        let n: u64 = counts.iter().sum();
        if n == 0 {
            return None;
        }
        // The rank is between 1 and n, which is far below 2^53.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let rank = ((q.clamp(0.0, 1.0) * n as f64).ceil() as u64).clamp(1, n);
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                let (lo, hi) = bucket_bounds(i);
                return Some(lo + (hi - lo) / 2);
            }
        }
        None
    }

    /// Count, p50 and p99 in one read.
    pub fn summary(&self) -> LatencySummary {
        LatencySummary {
            count: self.count(),
            p50: self.quantile(0.5),
            p99: self.quantile(0.99),
        }
    }
}

/// What GetJob reports of one histogram.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LatencySummary {
    /// Latencies recorded.
    pub count: u64,
    /// Median; `None` before the first record.
    pub p50: Option<Duration>,
    /// 99th percentile; `None` before the first record.
    pub p99: Option<Duration>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn buckets_tile_the_u64_range() {
        assert_eq!(BUCKETS, 496);
        let mut next = 0u64;
        for i in 0..BUCKETS {
            let (lo, hi) = bucket_bounds(i);
            assert_eq!(lo, next, "bucket {i} starts where {} ended", i.max(1) - 1);
            assert!(hi >= lo);
            assert_eq!(bucket_of(lo), i);
            assert_eq!(bucket_of(hi), i);
            next = hi.wrapping_add(1);
        }
        assert_eq!(next, 0, "the last bucket ends at u64::MAX");
    }

    #[test]
    fn empty_and_single() {
        let h = LatencyHistogram::default();
        assert_eq!(h.quantile(0.5), None);
        h.record(Duration::from_micros(100));
        let p = h.quantile(0.99).unwrap().as_nanos() as f64;
        assert!((p - 100_000.0).abs() / 100_000.0 < 0.07, "{p}");
        assert_eq!(h.summary().count, 1);
    }

    // Test arithmetic on small, non-negative values.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    mod model {
        use super::*;
        proptest! {
            /// The estimate falls in the same bucket as the exact quantile of
            /// a sorted-vector model, so it is within one bucket's width.
            #[test]
            fn quantiles_match_a_sorted_model(
                values in prop::collection::vec(
                    prop_oneof![0u64..64, 1_000u64..10_000_000, any::<u64>()], 1..400),
                q in 0.0f64..=1.0,
            ) {
                let h = LatencyHistogram::default();
                for &v in &values {
                    h.record_nanos(v);
                }
                let mut sorted = values.clone();
                sorted.sort_unstable();
                let n = sorted.len();
                let rank = ((q * n as f64).ceil() as usize).clamp(1, n);
                let exact = sorted[rank - 1];
                let estimate = h.quantile_nanos(q).unwrap();
                prop_assert_eq!(bucket_of(estimate), bucket_of(exact));
                if exact >= SUB {
                    let err = estimate.abs_diff(exact) as f64 / exact as f64;
                    prop_assert!(err <= 0.125, "exact {} estimate {}", exact, estimate);
                }
                prop_assert_eq!(h.count(), n as u64);
            }
        }
    }
}

//! Which guest writes and copy operations become spans.
//!
//! A span per write would cost more than the write (DESIGN.md, Telemetry).
//! So the decision is made from the finished write's record, before
//! anything is built:
//!
//! 1. a write slower than `--trace-slow-write-ms` is always traced (the
//!    span is built after the fact from its recorded times), up to
//!    [`MAX_SLOW_SPANS_PER_SEC`] a second so a dying target cannot turn
//!    every write into a span;
//! 2. a write inside a sampled trace (a gRPC write whose caller sent a
//!    sampled `traceparent`) is traced, like OpenTelemetry's ParentBased;
//! 3. otherwise a thread-local random draw against
//!    `--trace-write-sample-ratio` decides.
//!
//! An unsampled write costs the draw: a few nanoseconds, no allocation.
//!
//! Spans built on those decisions carry [`SAMPLE_REASON`]; the SDK sampler
//! ([`HonourWriteDecision`]) records them whatever `OTEL_TRACES_SAMPLER`
//! says, and leaves every other span (RPCs, jobs) to that sampler.

use opentelemetry::trace::{Link, SpanKind, TraceId};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::trace::ShouldSample;
use opentelemetry_sdk::trace::{SamplingDecision, SamplingResult};
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Attribute naming why a write or copy span exists: `slow`, `parent` or
/// `ratio`.
pub const SAMPLE_REASON: &str = "blockmirror.sample.reason";

/// Slow spans built per second at most; past that, slow writes still
/// count in the histograms but get no span until the next second.
pub const MAX_SLOW_SPANS_PER_SEC: u64 = 200;

/// Why a write is traced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SampleReason {
    /// Slower than the threshold.
    Slow,
    /// Part of a sampled trace.
    Parent,
    /// Drawn at the sample ratio.
    Ratio,
}

impl SampleReason {
    /// The attribute value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Slow => "slow",
            Self::Parent => "parent",
            Self::Ratio => "ratio",
        }
    }
}

/// The per-write decision (see the module doc).
#[derive(Debug)]
pub struct WriteSampler {
    /// A draw below this is sampled; `u64::MAX` with `always` = every write.
    threshold: u64,
    /// Ratio 1: sample without drawing.
    always: bool,
    /// Slow-write threshold; `None` = off.
    slow: Option<Duration>,
    /// (second, spans built in it) packed as `second << 16 | count`.
    slow_window: AtomicU64,
}

impl WriteSampler {
    /// A sampler at `ratio` (0..=1) with the slow-write threshold `slow`.
    pub fn new(ratio: f64, slow: Option<Duration>) -> Self {
        let ratio = ratio.clamp(0.0, 1.0);
        // ratio * 2^64 fits u64 for ratio < 1 (1 is handled by `always`).
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let threshold = (ratio * 18_446_744_073_709_551_616.0) as u64;
        Self {
            threshold,
            always: ratio >= 1.0,
            slow,
            slow_window: AtomicU64::new(0),
        }
    }

    /// Decides for a write that took `took`; `parent_sampled` when the
    /// caller's context is a sampled trace.
    pub fn decide(&self, took: Duration, parent_sampled: bool) -> Option<SampleReason> {
        if self.slow.is_some_and(|s| took >= s) && self.take_slow_slot() {
            return Some(SampleReason::Slow);
        }
        if parent_sampled {
            return Some(SampleReason::Parent);
        }
        if self.always || (self.threshold > 0 && next_random() < self.threshold) {
            return Some(SampleReason::Ratio);
        }
        None
    }

    /// True if this second still has room for a slow span.
    fn take_slow_slot(&self) -> bool {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut cur = self.slow_window.load(Ordering::Relaxed);
        loop {
            let (sec, count) = (cur >> 16, cur & 0xffff);
            let next = if sec == now & (u64::MAX >> 16) {
                if count >= MAX_SLOW_SPANS_PER_SEC {
                    return false;
                }
                cur + 1
            } else {
                (now << 16) | 1
            };
            match self.slow_window.compare_exchange_weak(
                cur,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(seen) => cur = seen,
            }
        }
    }
}

thread_local! {
    /// xorshift64* state, seeded per thread from the std hasher's random keys.
    static RNG: Cell<u64> = Cell::new(seed());
}

fn seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0x9e37_79b9_7f4a_7c15);
    h.finish() | 1
}

/// A uniformly distributed `u64` (xorshift64*: fast, not cryptographic —
/// which a sampling draw does not need).
fn next_random() -> u64 {
    RNG.with(|s| {
        let mut x = s.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        s.set(x);
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    })
}

/// The SDK sampler: spans that carry [`SAMPLE_REASON`] were decided by
/// [`WriteSampler`] and are recorded; every other span goes to the sampler
/// from `OTEL_TRACES_SAMPLER` (default: parent-based, always on).
#[derive(Debug, Clone)]
pub struct HonourWriteDecision {
    /// The sampler the SDK read from the environment.
    pub env: Box<dyn ShouldSample>,
}

impl ShouldSample for HonourWriteDecision {
    fn should_sample(
        &self,
        parent_context: Option<&Context>,
        trace_id: TraceId,
        name: &str,
        span_kind: &SpanKind,
        attributes: &[KeyValue],
        links: &[Link],
    ) -> SamplingResult {
        if attributes.iter().any(|kv| kv.key.as_str() == SAMPLE_REASON) {
            use opentelemetry::trace::TraceContextExt as _;
            return SamplingResult {
                decision: SamplingDecision::RecordAndSample,
                attributes: Vec::new(),
                trace_state: parent_context
                    .map(|c| c.span().span_context().trace_state().clone())
                    .unwrap_or_default(),
            };
        }
        self.env
            .should_sample(parent_context, trace_id, name, span_kind, attributes, links)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FAST: Duration = Duration::from_micros(20);

    #[test]
    fn ratio_zero_samples_nothing_but_slow_writes() {
        let s = WriteSampler::new(0.0, Some(Duration::from_millis(50)));
        assert!((0..100_000).all(|_| s.decide(FAST, false).is_none()));
        assert_eq!(
            s.decide(Duration::from_millis(50), false),
            Some(SampleReason::Slow)
        );
        assert_eq!(s.decide(FAST, true), Some(SampleReason::Parent));
    }

    #[test]
    fn ratio_one_samples_everything() {
        let s = WriteSampler::new(1.0, None);
        assert!((0..10_000).all(|_| s.decide(FAST, false) == Some(SampleReason::Ratio)));
        assert_eq!(
            s.decide(Duration::from_secs(9), false),
            Some(SampleReason::Ratio)
        );
    }

    #[test]
    fn ratio_is_respected_within_statistical_bounds() {
        let s = WriteSampler::new(0.01, None);
        let n = 400_000;
        let hits = (0..n).filter(|_| s.decide(FAST, false).is_some()).count();
        // Expected 4000, sd ~63: 6 sd either side.
        assert!((3_620..=4_380).contains(&hits), "{hits} of {n}");
    }

    #[test]
    fn slow_spans_are_capped_per_second() {
        let s = WriteSampler::new(0.0, Some(Duration::from_millis(1)));
        let slow = Duration::from_millis(5);
        let taken = (0..1_000)
            .filter(|_| s.decide(slow, false) == Some(SampleReason::Slow))
            .count() as u64;
        // The count may straddle a second boundary: at most two windows.
        assert!(
            (MAX_SLOW_SPANS_PER_SEC..=2 * MAX_SLOW_SPANS_PER_SEC).contains(&taken),
            "{taken}"
        );
    }
}

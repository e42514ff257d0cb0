//! Token-bucket rate limits (bytes/s and operations/s), like QEMU's
//! throttle groups. Used for a volume's write limits — also how tests make a
//! slow target — and for a job's copy `speed`.
//!
//! The bucket is kept as a *theoretical arrival time* (GCRA): each request
//! pushes it forward by its cost and sleeps until it lies within the burst
//! allowance of now. Requests are served in the order they reserve, so a big
//! request cannot be starved by small ones, and no task polls.
//!
//! A second clock gives *priority* traffic (guest writes on a mirror
//! target, see DESIGN.md "Sharing the target") a lane ahead of the rest:
//! it waits only behind other priority traffic, while its cost still
//! pushes the shared clock forward, so bulk copy makes room afterwards and
//! the long-run rate stays the limit.

use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

/// How far ahead of the steady rate a burst may run; small so that a limit
/// shows up at once in tests and benchmarks.
const BURST_ALLOWANCE: Duration = Duration::from_millis(20);

/// Limits; 0 means unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RateLimits {
    /// Bytes per second.
    pub bytes_per_sec: u64,
    /// Operations per second.
    pub ops_per_sec: u64,
}

impl RateLimits {
    /// True when neither limit is set.
    pub fn is_unlimited(&self) -> bool {
        self.bytes_per_sec == 0 && self.ops_per_sec == 0
    }

    fn cost(&self, bytes: u64) -> Duration {
        let by_bytes = if self.bytes_per_sec == 0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(bytes as f64 / self.bytes_per_sec as f64)
        };
        let by_ops = if self.ops_per_sec == 0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(1.0 / self.ops_per_sec as f64)
        };
        by_bytes.max(by_ops)
    }
}

/// A shared limiter.
#[derive(Debug, Default)]
pub struct Throttle {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    limits: RateLimits,
    /// Theoretical arrival time of the next request; `None` when idle.
    tat: Option<Instant>,
    /// The same, counting priority requests only.
    priority_tat: Option<Instant>,
}

impl Throttle {
    /// A limiter with `limits`.
    pub fn new(limits: RateLimits) -> Self {
        Self {
            state: Mutex::new(State {
                limits,
                tat: None,
                priority_tat: None,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is two plain values; a panic elsewhere cannot leave it torn.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The limits now in force.
    pub fn limits(&self) -> RateLimits {
        self.lock().limits
    }

    /// Changes the limits; requests already sleeping keep their slot.
    pub fn set_limits(&self, limits: RateLimits) {
        let mut s = self.lock();
        s.limits = limits;
        s.tat = None;
        s.priority_tat = None;
    }

    /// Waits until `bytes` may pass.
    ///
    /// # Cancel safety
    /// Cancel-safe; a cancelled request still used up its slot.
    pub async fn acquire(&self, bytes: u64) {
        self.admit(bytes, None).await;
    }

    /// Waits until `bytes` of priority traffic may pass: only behind other
    /// priority requests, never behind what ordinary requests reserved, and
    /// held to `share_percent` of the limit among themselves, so ordinary
    /// traffic keeps the rest. The cost is charged to the shared clock too,
    /// so ordinary requests wait for it. A share of 0 is ordinary traffic.
    ///
    /// # Cancel safety
    /// Cancel-safe; a cancelled request still used up its slot.
    pub async fn acquire_priority(&self, bytes: u64, share_percent: u32) {
        self.admit(bytes, (share_percent > 0).then_some(share_percent.min(100)))
            .await;
    }

    /// Reserves `bytes` on the shared clock (and, for priority traffic
    /// with its share, on the priority clock), then sleeps until the clock
    /// the request answers to lies within the burst allowance of now.
    async fn admit(&self, bytes: u64, priority_share: Option<u32>) {
        let wake_at = {
            let mut s = self.lock();
            if s.limits.is_unlimited() {
                return;
            }
            let now = Instant::now();
            let cost = s.limits.cost(bytes);
            let tat = s.tat.map_or(now, |t| t.max(now)) + cost;
            s.tat = Some(tat);
            let due = match priority_share {
                None => tat,
                Some(share) => {
                    let own = s.priority_tat.map_or(now, |t| t.max(now)) + cost * 100 / share;
                    s.priority_tat = Some(own);
                    own
                }
            };
            due.checked_sub(BURST_ALLOWANCE).unwrap_or(now)
        };
        if wake_at > Instant::now() {
            tokio::time::sleep_until(wake_at).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn byte_rate_is_enforced() {
        let t = Throttle::new(RateLimits {
            bytes_per_sec: 1 << 20,
            ops_per_sec: 0,
        });
        let start = Instant::now();
        for _ in 0..10 {
            t.acquire(256 << 10).await;
        }
        // 2.5 MiB at 1 MiB/s: the last request may start 2.5 s - one burst in.
        let elapsed = start.elapsed();
        assert!(elapsed >= Duration::from_millis(2400), "{elapsed:?}");
        assert!(elapsed <= Duration::from_millis(2600), "{elapsed:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn priority_goes_ahead_and_the_rest_pays_for_it() {
        let t = Throttle::new(RateLimits {
            bytes_per_sec: 1 << 20,
            ops_per_sec: 0,
        });
        let start = Instant::now();
        // A bulk request reserves a second of the limit...
        t.acquire(1 << 20).await;
        assert!(start.elapsed() >= Duration::from_millis(980));
        let start = Instant::now();
        t.acquire(1 << 20).await;
        let bulk_done = start.elapsed();
        // ... a priority request right after does not wait for it...
        let start = Instant::now();
        t.acquire_priority(4 << 10, 100).await;
        assert_eq!(start.elapsed(), Duration::ZERO);
        // ... but its cost pushes the next bulk request back.
        let start = Instant::now();
        t.acquire(512 << 10).await;
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_millis(500 + 4 - 20),
            "{bulk_done:?} {waited:?}"
        );
        // Priority traffic alone is held to its share of the rate.
        let start = Instant::now();
        for _ in 0..8 {
            t.acquire_priority(256 << 10, 100).await;
        }
        assert!(start.elapsed() >= Duration::from_millis(1980 - 20));
        let start = Instant::now();
        for _ in 0..4 {
            t.acquire_priority(64 << 10, 25).await;
        }
        // 256 KiB at a quarter of 1 MiB/s: a second, less one burst.
        let quarter = start.elapsed();
        assert!(
            quarter >= Duration::from_millis(1000 - 2 * 20),
            "{quarter:?}"
        );
        assert!(quarter <= Duration::from_millis(1000 + 20), "{quarter:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn unlimited_never_waits() {
        let t = Throttle::default();
        let start = Instant::now();
        t.acquire(u64::MAX).await;
        assert_eq!(start.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn iops_limit_is_enforced() {
        let t = Throttle::new(RateLimits {
            bytes_per_sec: 0,
            ops_per_sec: 100,
        });
        let start = Instant::now();
        for _ in 0..101 {
            t.acquire(512).await;
        }
        let elapsed = start.elapsed();
        assert!(elapsed >= Duration::from_millis(980), "{elapsed:?}");
    }
}

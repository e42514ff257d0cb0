//! The convergence policy: when `auto` switches copy modes, the
//! target-latency guard, and guest write throttling.
//!
//! A pure state machine: the runner feeds it one [`Sample`] per tick and
//! applies the [`Action`]s it returns, so every rule is unit-tested here
//! without a runtime or a clock.
//!
//! # Auto mode and hysteresis
//!
//! `auto` starts in background mode (the guest pays nothing for the copy)
//! and switches to write-blocking when the job would not converge: READY has
//! not come within `auto_ready_timeout_ms`, or for `auto_diverging_window_ms`
//! one of these held, each measured against the copier's capacity (the
//! faster of its current rate and the best data rate it has shown):
//!
//! - guests re-dirtied at least three quarters of what the copier can clean
//!   (its net progress under a quarter of its speed: background would take
//!   four times as long as write-blocking, or never finish);
//! - guests *touched* distinct chunks at three quarters of that rate or more
//!   (their footprint). This is the early signal: at the start nearly
//!   everything is dirty, so guests cannot re-dirty much yet, but a working
//!   set rewritten faster than the copier can clean it will never be clean
//!   all at once;
//! - the dirty set did not shrink over the trend window.
//!
//! Capacity, not the current rate, is the yardstick so that a copier that
//! keeps up with a light load (and so copies exactly what guests dirty) does
//! not read as losing. (A complete request switches too; the
//! job does that itself.) The window is short (100 ms by default: two ticks in a row) because
//! every second spent in background under such a load is a second of copying
//! redone later; hysteresis guards the way back, not the way in. After READY, write-blocking
//! costs the guest target latency on every write, so `auto` returns to
//! background once the chunks guests write would dirty, in background mode,
//! less than half the data rate the copier achieved, and guests spend less
//! than half their time waiting on the target (a guest that waits on the
//! target all the time is slowed by write-blocking itself, so its rate
//! there understates what it would write in background mode), and both have
//! held for [`RETURN_CALM_MS`] (a guest that pauses for a second, or a
//! machine too busy to run it, is not a light load). Two more rules keep this
//! from flapping: no automatic switch comes sooner than the dwell time after
//! the previous one, and every return to background that diverges again
//! doubles the dwell (up to ten minutes). A steady heavy load therefore stays
//! write-blocking; a steady light load goes back to background once.
//!
//! # Target-latency guard
//!
//! In write-blocking mode a guest write waits for the target. When most
//! synchronous target writes in a window take longer than
//! `target_latency_limit_ms`, the guard falls back to background (the
//! chunks stay dirty, the copier carries them) and retries write-blocking
//! after the dwell time.
//!
//! # Guest throttling
//!
//! Off by default. When `guest_throttle_bytes_per_sec` is set, a background
//! job whose dirty bytes fell below `guest_throttle_below_bytes` caps guest
//! writes at that rate until READY: the guest slows down only for the last
//! stretch, and the copier catches up. The trade-off: guest bandwidth
//! during convergence, for a job that finishes instead of chasing a guest
//! that writes as fast as the copier copies.

use super::spec::{ConvergencePolicy, CopyMode};
use super::state::JobStatus;

/// Longest dwell between automatic switches.
const MAX_DWELL_MS: u64 = 600_000;
/// How long a light load must last after READY before `auto` returns to
/// background: three of the runner's one-second rate windows, so one
/// quiet second (a guest pausing, or starved of CPU) is not enough.
pub const RETURN_CALM_MS: u64 = 3_000;
/// Synchronous target writes a latency window needs before it can judge.
const MIN_LATENCY_SAMPLES: u64 = 3;

/// What the runner observed since the previous tick.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// Milliseconds since the job started.
    pub now_ms: u64,
    /// Job state.
    pub status: JobStatus,
    /// The mode the user asked for.
    pub requested: CopyMode,
    /// Effective mode now.
    pub write_blocking: bool,
    /// Dirty bytes now.
    pub dirty_bytes: u64,
    /// Copy rate, bytes/s.
    pub copy_rate: u64,
    /// Dirty rate, bytes/s.
    pub dirty_rate: u64,
    /// Bytes/s by which dirty bytes shrank over the trend window (negative:
    /// grew); `None` before there is a trend.
    pub net_rate: Option<i64>,
    /// Bytes/s that synchronous guest writes would have dirtied in
    /// background mode (whole chunks).
    pub would_dirty_rate: u64,
    /// Bytes/s of non-zero data the copier wrote (the target's proven
    /// bandwidth for copies).
    pub copy_data_rate: u64,
    /// Bytes/s of distinct chunks guests touched (auto mode in background
    /// only; 0 otherwise).
    pub footprint_rate: u64,
    /// Time guest writes spent waiting on the target per unit of time, in
    /// thousandths (1000 = a guest write was always at the target).
    pub target_busy_permille: u64,
    /// Synchronous target writes over the latency limit, since the last tick.
    pub slow_target_writes: u64,
    /// All synchronous target writes since the last tick.
    pub target_writes: u64,
}

/// What the runner should do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Switch the effective mode, with the reason for COPY_MODE_CHANGED.
    SwitchMode {
        /// Target mode.
        write_blocking: bool,
        /// Why.
        reason: String,
    },
    /// Cap guest writes (bytes/s), or stop capping.
    GuestThrottle(Option<u64>),
}

/// Policy state of one job.
#[derive(Debug)]
pub struct PolicyState {
    policy: ConvergencePolicy,
    diverging_since: Option<u64>,
    /// Since when the load after READY has been light enough to return to
    /// background.
    light_since: Option<u64>,
    last_switch_ms: Option<u64>,
    dwell_ms: u64,
    returned_to_background: bool,
    peak_copy_rate: u64,
    latency_window_start: u64,
    latency_slow: u64,
    latency_total: u64,
    guard_until: Option<u64>,
    guard_trips: u32,
    throttling: bool,
}

impl PolicyState {
    /// A fresh state for `policy`.
    pub fn new(policy: ConvergencePolicy) -> Self {
        Self {
            dwell_ms: policy.auto_min_dwell_ms,
            policy,
            diverging_since: None,
            light_since: None,
            last_switch_ms: None,
            returned_to_background: false,
            peak_copy_rate: 0,
            latency_window_start: 0,
            latency_slow: 0,
            latency_total: 0,
            guard_until: None,
            guard_trips: 0,
            throttling: false,
        }
    }

    /// True while the target-latency guard holds the job in background mode.
    pub fn guard_active(&self) -> bool {
        self.guard_until.is_some()
    }

    fn dwell_passed(&self, now: u64) -> bool {
        self.last_switch_ms
            .is_none_or(|t| now.saturating_sub(t) >= self.dwell_ms)
    }

    /// How long the load has been light enough to leave write-blocking
    /// after READY (`None` while it is not); updates the tracker.
    fn light_for(&mut self, s: &Sample) -> Option<u64> {
        let light = s.write_blocking
            && s.status == JobStatus::Ready
            && s.would_dirty_rate.saturating_mul(2) < self.peak_copy_rate
            // Guests that spend most of their time waiting on the target
            // are held back by write-blocking itself: their rate there says
            // nothing about what they would write in background.
            && s.target_busy_permille < 500;
        if !light {
            self.light_since = None;
            return None;
        }
        Some(
            s.now_ms
                .saturating_sub(*self.light_since.get_or_insert(s.now_ms)),
        )
    }

    fn switch(&mut self, now: u64, write_blocking: bool, reason: String) -> Action {
        self.last_switch_ms = Some(now);
        self.diverging_since = None;
        self.light_since = None;
        Action::SwitchMode {
            write_blocking,
            reason,
        }
    }

    /// One tick: the actions to apply, in order.
    pub fn tick(&mut self, s: Sample) -> Vec<Action> {
        let mut out = Vec::new();
        if s.status.is_terminal() || s.status == JobStatus::Aborting {
            return out;
        }
        let finishing = matches!(s.status, JobStatus::Waiting | JobStatus::Pending);
        if s.copy_data_rate > self.peak_copy_rate {
            self.peak_copy_rate = s.copy_data_rate;
        }
        // Not converging (see the module doc): measured against what the
        // copier can do, not what it happens to be doing.
        let capacity = s.copy_rate.max(self.peak_copy_rate);
        let heavy = |rate: u64| rate > 0 && rate.saturating_mul(4) >= capacity.saturating_mul(3);
        let redirty_heavy = heavy(s.dirty_rate);
        let footprint_heavy = heavy(s.footprint_rate);
        let stalled_trend = s
            .net_rate
            .is_some_and(|net| net < i64::try_from(s.copy_rate / 20).unwrap_or(i64::MAX).max(1));
        let diverging = s.dirty_bytes > 0 && (redirty_heavy || footprint_heavy || stalled_trend);
        if !s.write_blocking && diverging {
            self.diverging_since.get_or_insert(s.now_ms);
        } else {
            self.diverging_since = None;
        }
        let diverged_long = self
            .diverging_since
            .is_some_and(|t| s.now_ms.saturating_sub(t) >= self.policy.auto_diverging_window_ms);
        let light_for = self.light_for(&s);

        // Target-latency guard.
        if let Some(until) = self.guard_until {
            let want_wb = s.requested != CopyMode::Background || finishing;
            if s.now_ms >= until && want_wb && !s.write_blocking {
                self.guard_until = None;
                self.latency_window_start = s.now_ms;
                self.latency_slow = 0;
                self.latency_total = 0;
                out.push(self.switch(
                    s.now_ms,
                    true,
                    "retrying write-blocking after the target-latency guard".into(),
                ));
                return out;
            }
        } else if self.policy.target_latency_limit_ms > 0 && s.write_blocking && !finishing {
            self.latency_slow += s.slow_target_writes;
            self.latency_total += s.target_writes;
            if s.now_ms.saturating_sub(self.latency_window_start)
                >= self.policy.target_latency_window_ms
            {
                let tripped = self.latency_total >= MIN_LATENCY_SAMPLES
                    && self.latency_slow * 2 > self.latency_total;
                let (slow, total) = (self.latency_slow, self.latency_total);
                self.latency_window_start = s.now_ms;
                self.latency_slow = 0;
                self.latency_total = 0;
                if tripped {
                    if self.guard_trips > 0 {
                        // Tripped again right after a retry: wait longer.
                        self.dwell_ms = (self.dwell_ms * 2).min(MAX_DWELL_MS);
                    }
                    self.guard_trips += 1;
                    self.guard_until = Some(s.now_ms + self.dwell_ms);
                    out.push(self.switch(
                        s.now_ms,
                        false,
                        format!(
                            "target latency above {} ms for {slow} of {total} writes",
                            self.policy.target_latency_limit_ms
                        ),
                    ));
                    return out;
                }
            }
        } else {
            self.latency_window_start = s.now_ms;
            self.latency_slow = 0;
            self.latency_total = 0;
        }

        // Auto mode.
        if s.requested == CopyMode::Auto && !finishing && self.guard_until.is_none() {
            if !s.write_blocking
                && matches!(s.status, JobStatus::Running | JobStatus::Ready)
                && self.dwell_passed(s.now_ms)
            {
                let timed_out =
                    s.status == JobStatus::Running && s.now_ms >= self.policy.auto_ready_timeout_ms;
                if timed_out || diverged_long {
                    if self.returned_to_background {
                        self.dwell_ms = (self.dwell_ms * 2).min(MAX_DWELL_MS);
                        self.returned_to_background = false;
                    }
                    let reason = if diverged_long {
                        format!(
                            "not converging for {} ms: guests dirty {} KiB/s and touch {} KiB/s of chunks, the copier copies {} KiB/s",
                            self.policy.auto_diverging_window_ms,
                            s.dirty_rate >> 10,
                            s.footprint_rate >> 10,
                            s.copy_rate >> 10
                        )
                    } else {
                        format!("not ready after {} ms", self.policy.auto_ready_timeout_ms)
                    };
                    out.push(self.switch(s.now_ms, true, reason));
                }
            } else if s.write_blocking
                && light_for.is_some_and(|t| t >= RETURN_CALM_MS)
                && self.dwell_passed(s.now_ms)
            {
                self.returned_to_background = true;
                out.push(self.switch(
                    s.now_ms,
                    false,
                    format!(
                        "ready, and guests would dirty {} KiB/s, under half the copy rate of {} KiB/s",
                        s.would_dirty_rate >> 10,
                        self.peak_copy_rate >> 10
                    ),
                ));
            }
        }

        // Guest throttling.
        let throttle = self.policy.guest_throttle_bytes_per_sec > 0
            && s.status == JobStatus::Running
            && !s.write_blocking
            && s.dirty_bytes > 0
            && s.dirty_bytes < self.policy.guest_throttle_below_bytes;
        if throttle != self.throttling {
            self.throttling = throttle;
            out.push(Action::GuestThrottle(
                throttle.then_some(self.policy.guest_throttle_bytes_per_sec),
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> ConvergencePolicy {
        ConvergencePolicy {
            auto_ready_timeout_ms: 60_000,
            auto_diverging_window_ms: 1_000,
            auto_min_dwell_ms: 2_000,
            target_latency_limit_ms: 0,
            target_latency_window_ms: 1_000,
            guest_throttle_bytes_per_sec: 0,
            guest_throttle_below_bytes: 64 << 20,
            copier_share_percent: 80,
            copier_time_share_percent: 50,
        }
    }

    fn sample(now_ms: u64, status: JobStatus, wb: bool) -> Sample {
        Sample {
            now_ms,
            status,
            requested: CopyMode::Auto,
            write_blocking: wb,
            dirty_bytes: 1 << 30,
            copy_rate: 20 << 20,
            dirty_rate: 40 << 20,
            net_rate: None,
            would_dirty_rate: 0,
            copy_data_rate: 20 << 20,
            footprint_rate: 0,
            target_busy_permille: 0,
            slow_target_writes: 0,
            target_writes: 0,
        }
    }

    /// Runs `ticks` ticks of 250 ms, applying mode switches; returns them.
    fn run(
        p: &mut PolicyState,
        start: Sample,
        ticks: u64,
        mut wb: bool,
        f: impl Fn(&Sample) -> Sample,
    ) -> Vec<(u64, bool)> {
        let mut switches = Vec::new();
        for i in 0..ticks {
            let mut s = f(&Sample {
                now_ms: start.now_ms + i * 250,
                write_blocking: wb,
                ..start
            });
            s.write_blocking = wb;
            for a in p.tick(s) {
                if let Action::SwitchMode { write_blocking, .. } = a {
                    wb = write_blocking;
                    switches.push((s.now_ms, wb));
                }
            }
        }
        switches
    }

    /// A policy that has switched to write-blocking in the first pass (a
    /// diverging copy for 1 s).
    fn write_blocking_after_the_first_pass() -> PolicyState {
        let mut p = PolicyState::new(policy());
        run(
            &mut p,
            sample(0, JobStatus::Running, false),
            8,
            false,
            |s| *s,
        );
        p
    }

    /// READY in write-blocking, nothing dirty, no copying: only what guests
    /// would dirty in background and how long they wait on the target vary.
    fn synced(s: &Sample, would_dirty_rate: u64, target_busy_permille: u64) -> Sample {
        Sample {
            status: JobStatus::Ready,
            dirty_bytes: 0,
            would_dirty_rate,
            target_busy_permille,
            copy_data_rate: 0,
            copy_rate: 0,
            dirty_rate: 0,
            ..*s
        }
    }

    #[test]
    fn diverging_background_switches_after_the_window() {
        let mut p = PolicyState::new(policy());
        assert!(p.tick(sample(0, JobStatus::Running, false)).is_empty());
        assert!(p.tick(sample(500, JobStatus::Running, false)).is_empty());
        let a = p.tick(sample(1000, JobStatus::Running, false));
        assert!(
            matches!(&a[..], [Action::SwitchMode { write_blocking: true, reason }] if reason.contains("not converging"))
        );
    }

    #[test]
    fn heavy_redirtying_switches_and_moderate_does_not() {
        // Guests re-dirty 80 % of what the copier cleans: write-blocking.
        let mut p = PolicyState::new(policy());
        let heavy = |s: &Sample| Sample {
            dirty_rate: 16 << 20,
            ..*s
        };
        let switches = run(
            &mut p,
            sample(0, JobStatus::Running, false),
            8,
            false,
            heavy,
        );
        assert_eq!(switches, vec![(1000, true)]);
        // Half: background still converges at half speed; it stays.
        let mut p = PolicyState::new(policy());
        let moderate = |s: &Sample| Sample {
            dirty_rate: 10 << 20,
            ..*s
        };
        let switches = run(
            &mut p,
            sample(0, JobStatus::Running, false),
            40,
            false,
            moderate,
        );
        assert!(switches.is_empty(), "{switches:?}");
        // No rates yet (the first tick): no judgement either way.
        let mut p = PolicyState::new(policy());
        let none = |s: &Sample| Sample {
            dirty_rate: 0,
            copy_rate: 0,
            ..*s
        };
        let switches = run(
            &mut p,
            sample(0, JobStatus::Running, false),
            40,
            false,
            none,
        );
        assert!(switches.is_empty(), "{switches:?}");
    }

    #[test]
    fn a_wide_footprint_switches_before_anything_is_redirtied() {
        // At the start everything is dirty: guests re-dirty nothing yet,
        // but they touch 64 MiB/s of distinct chunks against a 20 MiB/s
        // copier — a working set background can never clean.
        let mut p = PolicyState::new(policy());
        let early = |s: &Sample| Sample {
            dirty_rate: 0,
            footprint_rate: 64 << 20,
            ..*s
        };
        let switches = run(
            &mut p,
            sample(0, JobStatus::Running, false),
            8,
            false,
            early,
        );
        assert_eq!(switches, vec![(1000, true)]);
        // A small footprint (a light writer) keeps background.
        let mut p = PolicyState::new(policy());
        let light = |s: &Sample| Sample {
            dirty_rate: 0,
            footprint_rate: 4 << 20,
            ..*s
        };
        assert!(
            run(
                &mut p,
                sample(0, JobStatus::Running, false),
                40,
                false,
                light
            )
            .is_empty()
        );
    }

    #[test]
    fn a_copier_keeping_up_with_a_light_load_is_not_losing() {
        // After READY in background, the copier copies exactly what guests
        // dirty (1 MiB/s each way) — far below the 20 MiB/s it has shown.
        let mut p = PolicyState::new(policy());
        let light = |s: &Sample| Sample {
            dirty_rate: 1 << 20,
            ..*s
        };
        assert!(
            p.tick(light(&sample(0, JobStatus::Running, false)))
                .is_empty()
        );
        let keeping_up = |s: &Sample| Sample {
            status: JobStatus::Ready,
            dirty_bytes: 64 << 10,
            dirty_rate: 1 << 20,
            copy_rate: 1 << 20,
            copy_data_rate: 1 << 20,
            footprint_rate: 1 << 20,
            ..*s
        };
        let switches = run(
            &mut p,
            sample(250, JobStatus::Ready, false),
            80,
            false,
            keeping_up,
        );
        assert!(switches.is_empty(), "{switches:?}");
    }

    #[test]
    fn converging_background_stays_until_the_ready_timeout() {
        let mut p = PolicyState::new(policy());
        let conv = |s: &Sample| Sample {
            dirty_rate: 1 << 20,
            ..*s
        };
        assert!(
            run(
                &mut p,
                sample(0, JobStatus::Running, false),
                200,
                false,
                conv
            )
            .is_empty()
        );
        let a = p.tick(conv(&sample(60_000, JobStatus::Running, false)));
        assert!(
            matches!(&a[..], [Action::SwitchMode { write_blocking: true, reason }] if reason.contains("not ready"))
        );
    }

    #[test]
    fn steady_heavy_load_does_not_flap() {
        let mut p = PolicyState::new(policy());
        // Guests write 40 MiB/s; the copier managed 20 MiB/s.
        let switches = run(
            &mut p,
            sample(0, JobStatus::Running, false),
            8,
            false,
            |s| *s,
        );
        assert_eq!(switches, vec![(1000, true)]);
        // Ready, write-blocking, guests still writing hard: stays.
        let heavy = |s: &Sample| synced(s, 40 << 20, 0);
        let later = run(
            &mut p,
            sample(2000, JobStatus::Ready, true),
            4 * 120,
            true,
            heavy,
        );
        assert!(later.is_empty(), "{later:?}");
    }

    #[test]
    fn light_load_returns_to_background_and_backs_off_if_it_diverges() {
        let mut p = write_blocking_after_the_first_pass();
        let light = |s: &Sample| synced(s, 1 << 20, 0);
        let back = run(
            &mut p,
            sample(2000, JobStatus::Ready, true),
            16,
            true,
            light,
        );
        assert_eq!(
            back,
            vec![(2000 + RETURN_CALM_MS, false)],
            "returns once the light load has lasted RETURN_CALM_MS (the dwell passed at 3000)"
        );
        // In background it diverges again: back to write-blocking, and the
        // dwell doubles before the next return.
        let diverge = |s: &Sample| Sample {
            status: JobStatus::Ready,
            ..*s
        };
        let again = run(
            &mut p,
            sample(5250, JobStatus::Ready, false),
            8,
            false,
            diverge,
        );
        assert_eq!(again.first(), Some(&(7000, true)));
        let next = run(
            &mut p,
            sample(7250, JobStatus::Ready, true),
            40,
            true,
            light,
        );
        assert_eq!(
            next.first(),
            Some(&(11_000, false)),
            "dwell doubled to 4 s (light since 7250, calm by 10250)"
        );
    }

    #[test]
    fn a_pause_under_a_heavy_load_is_not_a_light_load() {
        let mut p = write_blocking_after_the_first_pass();
        // Ready and write-blocking under a heavy load, except that every
        // fourth second the guests stall (a busy machine): rates over the
        // one-second window drop to nothing.
        let stuttering = |s: &Sample| {
            if (s.now_ms / 1000) % 4 == 3 {
                synced(s, 0, 0)
            } else {
                synced(s, 40 << 20, 950)
            }
        };
        let switches = run(
            &mut p,
            sample(2000, JobStatus::Ready, true),
            4 * 60,
            true,
            stuttering,
        );
        assert!(switches.is_empty(), "{switches:?}");
    }

    #[test]
    fn guests_bound_by_the_target_keep_write_blocking() {
        let mut p = write_blocking_after_the_first_pass();
        // A slow guest rate, but only because every write waits on the target.
        let bound = |s: &Sample| synced(s, 1 << 20, 950);
        assert!(
            run(
                &mut p,
                sample(2000, JobStatus::Ready, true),
                200,
                true,
                bound
            )
            .is_empty()
        );
    }

    #[test]
    fn latency_guard_falls_back_and_retries() {
        let mut pol = policy();
        pol.target_latency_limit_ms = 50;
        let mut p = PolicyState::new(pol);
        let slow = |s: &Sample| Sample {
            requested: CopyMode::WriteBlocking,
            slow_target_writes: 8,
            target_writes: 10,
            ..*s
        };
        let switches = run(&mut p, sample(0, JobStatus::Running, true), 30, true, slow);
        // Trips at 1 s, retries after the 2 s dwell, trips again a window
        // later, and then waits twice as long.
        assert_eq!(switches, vec![(1000, false), (3000, true), (4000, false)]);
        let fast = |s: &Sample| Sample {
            requested: CopyMode::WriteBlocking,
            slow_target_writes: 0,
            target_writes: 10,
            ..*s
        };
        let back = run(
            &mut p,
            sample(7250, JobStatus::Running, false),
            30,
            false,
            fast,
        );
        assert_eq!(
            back,
            vec![(8000, true)],
            "retries once the doubled dwell passed, then stays"
        );
    }

    #[test]
    fn guest_throttle_only_near_the_end_of_a_background_copy() {
        let mut pol = policy();
        pol.guest_throttle_bytes_per_sec = 1 << 20;
        pol.guest_throttle_below_bytes = 8 << 20;
        let mut p = PolicyState::new(pol);
        let bg = |dirty| Sample {
            requested: CopyMode::Background,
            dirty_bytes: dirty,
            dirty_rate: 0,
            ..sample(0, JobStatus::Running, false)
        };
        assert!(p.tick(bg(100 << 20)).is_empty());
        assert_eq!(
            p.tick(bg(4 << 20)),
            vec![Action::GuestThrottle(Some(1 << 20))]
        );
        assert!(p.tick(bg(2 << 20)).is_empty());
        let ready = Sample {
            status: JobStatus::Ready,
            ..bg(0)
        };
        assert_eq!(p.tick(ready), vec![Action::GuestThrottle(None)]);
    }
}

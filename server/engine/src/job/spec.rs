//! What a mirror job is asked to do, validated once at the edge.

use crate::error::{EngineError, Result};
use crate::throttle::RateLimits;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::PathBuf;

/// Default dirty-bitmap granularity.
pub const DEFAULT_GRANULARITY_BYTES: u64 = 64 << 10;
/// Smallest and largest granularity accepted.
pub const GRANULARITY_RANGE_BYTES: (u64, u64) = (4 << 10, 64 << 20);
/// Default bound on a job's bytes in flight (QEMU's default too).
pub const DEFAULT_BUF_SIZE_BYTES: u64 = 16 << 20;
/// Smallest and largest `buf_size`: at least one maximal guest request
/// must not be needed to fit, but a copy chunk must; at most 1 GiB so the
/// budget fits a semaphore of u32 permits.
pub const BUF_SIZE_RANGE_BYTES: (u64, u64) = (64 << 10, 1 << 30);

/// Which chunks the job starts with as dirty.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncMode {
    /// The whole device.
    Full,
    /// Nothing: only what guests write from now on.
    None,
    /// What a named bitmap marks.
    Bitmap,
}

/// How guest writes reach the target while the job runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CopyMode {
    /// Guest writes mark chunks dirty; the copier carries them later.
    Background,
    /// Guest writes go to source and target before they are acknowledged.
    WriteBlocking,
    /// Background, switching to write-blocking when the job would not converge.
    Auto,
}

impl fmt::Display for CopyMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Background => "background",
            Self::WriteBlocking => "write-blocking",
            Self::Auto => "auto",
        })
    }
}

/// What to do when I/O on one side fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorPolicy {
    /// Fail the job.
    Report,
    /// Keep going; the chunk stays dirty and is retried.
    Ignore,
    /// Pause the job until resumed.
    Stop,
    /// Stop on ENOSPC, report anything else.
    Enospc,
}

/// Where the copy goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TargetSpec {
    /// A volume of this service.
    Volume(String),
    /// A raw file, created (sparse, source-sized) if missing.
    File(PathBuf),
    /// A remote NBD export (`nbd://HOST[:PORT]/EXPORT` or
    /// `nbd+unix:///EXPORT?socket=PATH`), as given.
    Nbd(String),
}

impl TargetSpec {
    /// Parses `volume:NAME`, `file:PATH` or an NBD URI.
    ///
    /// # Errors
    /// `InvalidArgument` naming the accepted forms.
    pub fn parse(s: &str) -> Result<Self> {
        if let Some(name) = s.strip_prefix("volume:") {
            crate::names::validate_name("target volume name", name)?;
            Ok(Self::Volume(name.to_owned()))
        } else if let Some(path) = s.strip_prefix("file:") {
            if path.is_empty() {
                return Err(EngineError::invalid("target file path is empty"));
            }
            Ok(Self::File(PathBuf::from(path)))
        } else if s.starts_with("nbd") {
            crate::backend::NbdUri::parse(s)?;
            Ok(Self::Nbd(s.to_owned()))
        } else {
            Err(EngineError::invalid(format!(
                "target {s:?} must be volume:NAME, file:PATH, nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH"
            )))
        }
    }
}

impl fmt::Display for TargetSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Volume(n) => write!(f, "volume:{n}"),
            Self::File(p) => write!(f, "file:{}", p.display()),
            Self::Nbd(uri) => f.write_str(uri),
        }
    }
}

/// A validated mirror job specification.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MirrorSpec {
    /// Volume being copied.
    pub source_volume: String,
    /// Where it is copied to.
    pub target: TargetSpec,
    /// Initial dirty set.
    pub sync: SyncMode,
    /// Requested copy mode.
    pub copy_mode: CopyMode,
    /// Bytes per dirty bit.
    pub granularity_bytes: u64,
    /// Bound on bytes in flight.
    pub buf_size_bytes: u64,
    /// Copy rate limit, 0 = unlimited.
    pub speed_bytes_per_sec: u64,
    /// Policy for source I/O errors.
    pub on_source_error: ErrorPolicy,
    /// Policy for target I/O errors.
    pub on_target_error: ErrorPolicy,
    /// Finalize on its own once pending.
    pub auto_finalize: bool,
    /// Dismiss on its own once concluded.
    pub auto_dismiss: bool,
    /// Named bitmap, for `SyncMode::Bitmap`.
    pub bitmap: Option<String>,
    /// Convergence policy and guards.
    #[serde(default)]
    pub policy: ConvergencePolicy,
}

/// When `auto` switches modes, the target-latency guard, guest
/// throttling, and how guests and the copier share the target. Durations in
/// milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ConvergencePolicy {
    /// Auto: go write-blocking when not ready after this long.
    pub auto_ready_timeout_ms: u64,
    /// Auto: go write-blocking when the copy has not been converging
    /// (guests re-dirty or touch chunks at ≥ 3/4 of what it can clean) this
    /// long.
    pub auto_diverging_window_ms: u64,
    /// Auto: least time between automatic switches (doubles after a
    /// return to background that diverged again).
    pub auto_min_dwell_ms: u64,
    /// Guard: synchronous target writes slower than this (0 = off)...
    pub target_latency_limit_ms: u64,
    /// ... for most of this window fall back to background.
    pub target_latency_window_ms: u64,
    /// Guest write cap once dirty bytes fall below the threshold (0 = off).
    pub guest_throttle_bytes_per_sec: u64,
    /// The dirty-bytes threshold for the guest cap.
    pub guest_throttle_below_bytes: u64,
    /// While guests write, the copier's share (percent) of the target's
    /// write limit; guests go first on the rest.
    pub copier_share_percent: u32,
    /// While guests write, the share (percent) of the time the copier may
    /// spend doing copy I/O; it rests the remainder.
    pub copier_time_share_percent: u32,
}

impl Default for ConvergencePolicy {
    fn default() -> Self {
        Self {
            auto_ready_timeout_ms: 60_000,
            auto_diverging_window_ms: 100,
            auto_min_dwell_ms: 10_000,
            target_latency_limit_ms: 0,
            target_latency_window_ms: 2_000,
            guest_throttle_bytes_per_sec: 0,
            guest_throttle_below_bytes: 64 << 20,
            copier_share_percent: 80,
            copier_time_share_percent: 50,
        }
    }
}

impl MirrorSpec {
    /// `src` to volume `dst`: full sync, background, 64 KiB granularity,
    /// 1 MiB buffers, errors reported, finalized but not dismissed.
    #[cfg(test)]
    pub(crate) fn for_tests() -> Self {
        Self {
            source_volume: "src".into(),
            target: TargetSpec::Volume("dst".into()),
            sync: SyncMode::Full,
            copy_mode: CopyMode::Background,
            granularity_bytes: 64 << 10,
            buf_size_bytes: 1 << 20,
            speed_bytes_per_sec: 0,
            on_source_error: ErrorPolicy::Report,
            on_target_error: ErrorPolicy::Report,
            auto_finalize: true,
            auto_dismiss: false,
            bitmap: None,
            policy: ConvergencePolicy::default(),
        }
    }

    /// Checks every field.
    ///
    /// # Errors
    /// `InvalidArgument` naming the field and what it accepts.
    pub fn validate(&self) -> Result<()> {
        crate::names::validate_name("source volume name", &self.source_volume)?;
        let (lo, hi) = GRANULARITY_RANGE_BYTES;
        let g = self.granularity_bytes;
        if !g.is_power_of_two() || g < lo || g > hi {
            return Err(EngineError::invalid(format!(
                "granularity {g} must be a power of two between {lo} (4 KiB) and {hi} (64 MiB)"
            )));
        }
        let (lo, hi) = BUF_SIZE_RANGE_BYTES;
        let b = self.buf_size_bytes;
        if b < lo || b > hi {
            return Err(EngineError::invalid(format!(
                "buf_size {b} must be between {lo} (64 KiB) and {hi} (1 GiB)"
            )));
        }
        if b < g {
            return Err(EngineError::invalid(format!(
                "buf_size {b} must be at least the granularity {g}"
            )));
        }
        match (self.sync, &self.bitmap) {
            (SyncMode::Bitmap, _) => Err(EngineError::invalid(
                "sync mode bitmap is not supported yet; use full or none",
            )),
            (_, Some(_)) => Err(EngineError::invalid(
                "a bitmap name is only valid with sync mode bitmap",
            )),
            _ => Ok(()),
        }?;
        let p = &self.policy;
        for (name, v) in [
            ("auto_ready_timeout_ms", p.auto_ready_timeout_ms),
            ("auto_diverging_window_ms", p.auto_diverging_window_ms),
            ("auto_min_dwell_ms", p.auto_min_dwell_ms),
            ("target_latency_window_ms", p.target_latency_window_ms),
        ] {
            if v == 0 || v > 86_400_000 {
                return Err(EngineError::invalid(format!(
                    "{name} {v} must be between 1 ms and one day"
                )));
            }
        }
        for (name, v) in [
            ("copier_share_percent", p.copier_share_percent),
            ("copier_time_share_percent", p.copier_time_share_percent),
        ] {
            if !(1..=100).contains(&v) {
                return Err(EngineError::invalid(format!(
                    "{name} {v} must be between 1 and 100"
                )));
            }
        }
        if let TargetSpec::Volume(t) = &self.target
            && t == &self.source_volume
        {
            return Err(EngineError::invalid("target volume is the source volume"));
        }
        Ok(())
    }

    /// The copy rate limit as throttle limits.
    pub fn speed_limits(&self) -> RateLimits {
        RateLimits {
            bytes_per_sec: self.speed_bytes_per_sec,
            ops_per_sec: 0,
        }
    }
}

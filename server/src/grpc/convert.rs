//! Conversions between proto messages and engine types.

use blockmirror_engine::JobInfo;
use blockmirror_engine::VolumeInfo;
use blockmirror_engine::engine::Engine;
use blockmirror_engine::events::{Convergence, Event, EventKind, Progress};
use blockmirror_engine::job::spec::{
    ConvergencePolicy, CopyMode, DEFAULT_BUF_SIZE_BYTES, DEFAULT_GRANULARITY_BYTES, ErrorPolicy,
    MirrorSpec, SyncMode, TargetSpec,
};
use blockmirror_engine::job::state::JobStatus;
use blockmirror_engine::latency::LatencySummary;
use blockmirror_engine::observe::WriteLatencySummary;
use blockmirror_proto::v1;
use std::time::SystemTime;
use tonic::Status;

fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    let (seconds, nanos) = Engine::unix_time(t);
    prost_types::Timestamp {
        seconds,
        nanos: i32::try_from(nanos).unwrap_or(0),
    }
}

/// An engine volume as a proto message.
pub fn volume(v: VolumeInfo) -> v1::Volume {
    v1::Volume {
        name: v.name,
        size_bytes: v.size_bytes,
        path: v.path,
        block_size_bytes: v.block_size_bytes,
        limits: Some(v1::IoLimits {
            write_bytes_per_sec: v.limits.bytes_per_sec,
            write_iops: v.limits.ops_per_sec,
        }),
        job_id: v.job_id.unwrap_or_default(),
        direct_io: v.direct_io,
        in_flight_bytes: v.in_flight_bytes,
        peak_in_flight_bytes: v.peak_in_flight_bytes,
        max_in_flight_bytes: v.max_in_flight_bytes,
    }
}

/// An export as a proto message.
pub fn export(e: blockmirror_engine::store::ExportRecord) -> v1::Export {
    v1::Export {
        name: e.name,
        volume: e.volume,
        read_only: e.read_only,
    }
}

/// A job state as the proto enum.
pub fn job_state(s: JobStatus) -> v1::JobState {
    match s {
        JobStatus::Created => v1::JobState::Created,
        JobStatus::Running => v1::JobState::Running,
        JobStatus::Paused => v1::JobState::Paused,
        JobStatus::Ready => v1::JobState::Ready,
        JobStatus::Standby => v1::JobState::Standby,
        JobStatus::Waiting => v1::JobState::Waiting,
        JobStatus::Pending => v1::JobState::Pending,
        JobStatus::Aborting => v1::JobState::Aborting,
        JobStatus::Concluded => v1::JobState::Concluded,
        JobStatus::Null => v1::JobState::Null,
    }
}

/// A proto job state as the engine's; unspecified is an error.
pub fn job_status(raw: i32, field: &str) -> Result<JobStatus, Status> {
    Ok(match v1::JobState::try_from(raw) {
        Ok(v1::JobState::Created) => JobStatus::Created,
        Ok(v1::JobState::Running) => JobStatus::Running,
        Ok(v1::JobState::Paused) => JobStatus::Paused,
        Ok(v1::JobState::Ready) => JobStatus::Ready,
        Ok(v1::JobState::Standby) => JobStatus::Standby,
        Ok(v1::JobState::Waiting) => JobStatus::Waiting,
        Ok(v1::JobState::Pending) => JobStatus::Pending,
        Ok(v1::JobState::Aborting) => JobStatus::Aborting,
        Ok(v1::JobState::Concluded) => JobStatus::Concluded,
        Ok(v1::JobState::Null) => JobStatus::Null,
        Ok(v1::JobState::Unspecified) | Err(_) => {
            return Err(Status::invalid_argument(format!(
                "{field}: {raw} is not a job state"
            )));
        }
    })
}

/// A copy mode as the proto enum.
pub fn copy_mode(m: CopyMode) -> v1::CopyMode {
    match m {
        CopyMode::Background => v1::CopyMode::Background,
        CopyMode::WriteBlocking => v1::CopyMode::WriteBlocking,
        CopyMode::Auto => v1::CopyMode::Auto,
    }
}

/// A proto copy mode; unspecified means background.
pub fn copy_mode_in(raw: i32, field: &str) -> Result<CopyMode, Status> {
    match v1::CopyMode::try_from(raw) {
        Ok(v1::CopyMode::Unspecified | v1::CopyMode::Background) => Ok(CopyMode::Background),
        Ok(v1::CopyMode::WriteBlocking) => Ok(CopyMode::WriteBlocking),
        Ok(v1::CopyMode::Auto) => Ok(CopyMode::Auto),
        Err(_) => Err(Status::invalid_argument(format!(
            "{field}: {raw} is not a copy mode"
        ))),
    }
}

fn sync_mode(s: SyncMode) -> v1::SyncMode {
    match s {
        SyncMode::Full => v1::SyncMode::Full,
        SyncMode::None => v1::SyncMode::None,
        SyncMode::Bitmap => v1::SyncMode::Bitmap,
    }
}

fn policy(p: ErrorPolicy) -> v1::ErrorPolicy {
    match p {
        ErrorPolicy::Report => v1::ErrorPolicy::Report,
        ErrorPolicy::Ignore => v1::ErrorPolicy::Ignore,
        ErrorPolicy::Stop => v1::ErrorPolicy::Stop,
        ErrorPolicy::Enospc => v1::ErrorPolicy::Enospc,
    }
}

fn policy_in(raw: i32, field: &str) -> Result<ErrorPolicy, Status> {
    match v1::ErrorPolicy::try_from(raw) {
        Ok(v1::ErrorPolicy::Unspecified | v1::ErrorPolicy::Report) => Ok(ErrorPolicy::Report),
        Ok(v1::ErrorPolicy::Ignore) => Ok(ErrorPolicy::Ignore),
        Ok(v1::ErrorPolicy::Stop) => Ok(ErrorPolicy::Stop),
        Ok(v1::ErrorPolicy::Enospc) => Ok(ErrorPolicy::Enospc),
        Err(_) => Err(Status::invalid_argument(format!(
            "{field}: {raw} is not an error policy"
        ))),
    }
}

/// A proto spec as the engine's, with defaults filled in. Field-level
/// checks (ranges, names) are the engine's, so they hold for every front end.
pub fn spec_in(s: v1::MirrorSpec) -> Result<MirrorSpec, Status> {
    let policy = convergence_policy_in(&s);
    let sync = match v1::SyncMode::try_from(s.sync) {
        Ok(v1::SyncMode::Unspecified | v1::SyncMode::Full) => SyncMode::Full,
        Ok(v1::SyncMode::None) => SyncMode::None,
        Ok(v1::SyncMode::Bitmap) => SyncMode::Bitmap,
        Err(_) => {
            return Err(Status::invalid_argument(format!(
                "spec.sync: {} is not a sync mode",
                s.sync
            )));
        }
    };
    let target = TargetSpec::parse(&s.target)
        .map_err(|e| Status::invalid_argument(format!("spec.target: {}", e.chain())))?;
    Ok(MirrorSpec {
        source_volume: s.source_volume,
        target,
        sync,
        copy_mode: copy_mode_in(s.copy_mode, "spec.copy_mode")?,
        granularity_bytes: if s.granularity_bytes == 0 {
            DEFAULT_GRANULARITY_BYTES
        } else {
            s.granularity_bytes
        },
        buf_size_bytes: if s.buf_size_bytes == 0 {
            DEFAULT_BUF_SIZE_BYTES
        } else {
            s.buf_size_bytes
        },
        speed_bytes_per_sec: s.speed_bytes_per_sec,
        on_source_error: policy_in(s.on_source_error, "spec.on_source_error")?,
        on_target_error: policy_in(s.on_target_error, "spec.on_target_error")?,
        auto_finalize: s.auto_finalize.unwrap_or(true),
        auto_dismiss: s.auto_dismiss.unwrap_or(true),
        bitmap: if s.bitmap.is_empty() {
            None
        } else {
            Some(s.bitmap)
        },
        policy,
    })
}

fn convergence_policy_in(s: &v1::MirrorSpec) -> ConvergencePolicy {
    let d = ConvergencePolicy::default();
    let or = |v: u64, default: u64| if v == 0 { default } else { v };
    ConvergencePolicy {
        auto_ready_timeout_ms: or(s.auto_ready_timeout_ms, d.auto_ready_timeout_ms),
        auto_diverging_window_ms: or(s.auto_diverging_window_ms, d.auto_diverging_window_ms),
        auto_min_dwell_ms: or(s.auto_min_dwell_ms, d.auto_min_dwell_ms),
        target_latency_limit_ms: s.target_latency_limit_ms,
        target_latency_window_ms: or(s.target_latency_window_ms, d.target_latency_window_ms),
        guest_throttle_bytes_per_sec: s.guest_throttle_bytes_per_sec,
        guest_throttle_below_bytes: or(s.guest_throttle_below_bytes, d.guest_throttle_below_bytes),
        copier_share_percent: if s.copier_share_percent == 0 {
            d.copier_share_percent
        } else {
            s.copier_share_percent
        },
        copier_time_share_percent: if s.copier_time_share_percent == 0 {
            d.copier_time_share_percent
        } else {
            s.copier_time_share_percent
        },
    }
}

fn convergence(c: Convergence) -> v1::Convergence {
    match c {
        Convergence::Converging => v1::Convergence::Converging,
        Convergence::Stalled => v1::Convergence::Stalled,
        Convergence::Diverging => v1::Convergence::Diverging,
        Convergence::Synced => v1::Convergence::Synced,
    }
}

/// An engine spec as a proto message.
pub fn spec(s: &MirrorSpec) -> v1::MirrorSpec {
    v1::MirrorSpec {
        source_volume: s.source_volume.clone(),
        target: s.target.to_string(),
        sync: sync_mode(s.sync) as i32,
        copy_mode: copy_mode(s.copy_mode) as i32,
        granularity_bytes: s.granularity_bytes,
        buf_size_bytes: s.buf_size_bytes,
        speed_bytes_per_sec: s.speed_bytes_per_sec,
        on_source_error: policy(s.on_source_error) as i32,
        on_target_error: policy(s.on_target_error) as i32,
        auto_finalize: Some(s.auto_finalize),
        auto_dismiss: Some(s.auto_dismiss),
        bitmap: s.bitmap.clone().unwrap_or_default(),
        auto_ready_timeout_ms: s.policy.auto_ready_timeout_ms,
        auto_diverging_window_ms: s.policy.auto_diverging_window_ms,
        auto_min_dwell_ms: s.policy.auto_min_dwell_ms,
        target_latency_limit_ms: s.policy.target_latency_limit_ms,
        target_latency_window_ms: s.policy.target_latency_window_ms,
        guest_throttle_bytes_per_sec: s.policy.guest_throttle_bytes_per_sec,
        guest_throttle_below_bytes: s.policy.guest_throttle_below_bytes,
        copier_share_percent: s.policy.copier_share_percent,
        copier_time_share_percent: s.policy.copier_time_share_percent,
    }
}

/// An engine job as a proto message.
pub fn job(j: JobInfo) -> v1::Job {
    v1::Job {
        id: j.id,
        spec: Some(spec(&j.spec)),
        state: job_state(j.status) as i32,
        copy_mode: copy_mode(j.copy_mode) as i32,
        actively_synced: j.actively_synced,
        current_progress_bytes: j.progress.current_bytes,
        total_progress_bytes: j.progress.total_bytes,
        dirty_bytes: j.progress.dirty_bytes,
        copy_rate_bytes_per_sec: j.progress.copy_rate,
        dirty_rate_bytes_per_sec: j.progress.dirty_rate,
        speed_bytes_per_sec: j.speed_bytes_per_sec,
        error: j.error.unwrap_or_default(),
        created_at: Some(timestamp(j.created_at)),
        updated_at: Some(timestamp(j.updated_at)),
        last_event_sequence: j.last_event_sequence,
        in_flight_bytes: j.in_flight_bytes,
        peak_in_flight_bytes: j.peak_in_flight_bytes,
        copied_bytes: j.copied_bytes,
        synced_guest_bytes: j.synced_guest_bytes,
        pivoted: j.pivoted,
        convergence: convergence(j.progress.convergence) as i32,
        eta_to_ready_ms: j.progress.eta_to_ready_ms,
        write_latency: Some(Box::new(write_latency(&j.write_latency))),
    }
}

fn write_latency(w: &WriteLatencySummary) -> v1::WriteLatency {
    let percentiles = |s: &LatencySummary| {
        let us = |d: Option<std::time::Duration>| {
            d.map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        };
        v1::LatencyPercentiles {
            count: s.count,
            p50_us: us(s.p50),
            p99_us: us(s.p99),
        }
    };
    v1::WriteLatency {
        guest: Some(percentiles(&w.guest)),
        source: Some(percentiles(&w.source)),
        target: Some(percentiles(&w.target)),
        range_lock_wait: Some(percentiles(&w.lock_wait)),
    }
}

fn with_progress(e: &mut v1::Event, p: &Progress) {
    e.current_progress_bytes = p.current_bytes;
    e.total_progress_bytes = p.total_bytes;
    e.dirty_bytes = p.dirty_bytes;
    e.copy_rate_bytes_per_sec = p.copy_rate;
    e.dirty_rate_bytes_per_sec = p.dirty_rate;
    e.convergence = convergence(p.convergence) as i32;
    e.eta_to_ready_ms = p.eta_to_ready_ms;
}

/// An engine event as a proto message.
pub fn event(ev: &Event) -> v1::Event {
    let mut e = v1::Event {
        sequence: ev.sequence,
        time: Some(timestamp(ev.time)),
        job_id: ev.job_id.clone(),
        ..Default::default()
    };
    let ty = match &ev.kind {
        EventKind::StatusChange(s) => {
            e.state = job_state(*s) as i32;
            v1::EventType::JobStatusChange
        }
        EventKind::Ready(p) => {
            with_progress(&mut e, p);
            v1::EventType::BlockJobReady
        }
        EventKind::Completed {
            pivoted,
            pause_us,
            error,
            progress,
        } => {
            e.pivoted = *pivoted;
            e.pause_us = *pause_us;
            e.error = error.clone().unwrap_or_default();
            with_progress(&mut e, progress);
            v1::EventType::BlockJobCompleted
        }
        EventKind::Cancelled(p) => {
            with_progress(&mut e, p);
            v1::EventType::BlockJobCancelled
        }
        EventKind::Error {
            operation,
            side,
            action,
            message,
        } => {
            e.operation = operation.clone();
            e.side = side.clone();
            e.action = action.clone();
            e.error = message.clone();
            v1::EventType::BlockJobError
        }
        EventKind::Pending => v1::EventType::BlockJobPending,
        EventKind::CopyModeChanged { from, to, reason } => {
            e.from_mode = copy_mode(*from) as i32;
            e.to_mode = copy_mode(*to) as i32;
            e.reason = reason.clone();
            v1::EventType::CopyModeChanged
        }
        EventKind::Progress(p) => {
            with_progress(&mut e, p);
            v1::EventType::Progress
        }
        EventKind::Dismissed => v1::EventType::JobDismissed,
    };
    e.r#type = ty as i32;
    e
}

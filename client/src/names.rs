//! The names people and scripts use for the proto enums: lowercase QEMU job
//! states (`running`, `ready`, `concluded`), lowercase copy modes
//! (`write-blocking`), QEMU event names (`BLOCK_JOB_READY`), convergence
//! forecasts (`converging`).
//!
//! The proto's `*_UNSPECIFIED` values of the spec enums stand for a
//! documented default (background, full, report); they print as that
//! default. A job state of `UNSPECIFIED` prints as `unspecified`: it is not
//! a state a job can be in, so no parser accepts it.

use std::time::{SystemTime, UNIX_EPOCH};

use blockmirror_proto::v1::{Convergence, CopyMode, ErrorPolicy, EventType, JobState, SyncMode};

/// Every job state a job can be in, in life-cycle order.
pub const JOB_STATES: [JobState; 10] = [
    JobState::Created,
    JobState::Running,
    JobState::Paused,
    JobState::Ready,
    JobState::Standby,
    JobState::Waiting,
    JobState::Pending,
    JobState::Aborting,
    JobState::Concluded,
    JobState::Null,
];

/// The lowercase QEMU name of a job state (`running`, `null`).
pub fn job_state_name(state: JobState) -> &'static str {
    match state {
        JobState::Unspecified => "unspecified",
        JobState::Created => "created",
        JobState::Running => "running",
        JobState::Paused => "paused",
        JobState::Ready => "ready",
        JobState::Standby => "standby",
        JobState::Waiting => "waiting",
        JobState::Pending => "pending",
        JobState::Aborting => "aborting",
        JobState::Concluded => "concluded",
        JobState::Null => "null",
    }
}

/// Parses a lowercase QEMU state name (case-insensitive). `None` for
/// anything else, including `unspecified`.
pub fn parse_job_state(name: &str) -> Option<JobState> {
    JOB_STATES
        .into_iter()
        .find(|s| job_state_name(*s).eq_ignore_ascii_case(name.trim()))
}

/// The name of a copy mode: `background`, `write-blocking`, `auto`.
pub fn copy_mode_name(mode: CopyMode) -> &'static str {
    match mode {
        // The proto documents UNSPECIFIED as background.
        CopyMode::Unspecified | CopyMode::Background => "background",
        CopyMode::WriteBlocking => "write-blocking",
        CopyMode::Auto => "auto",
    }
}

/// Parses a copy mode name; `write_blocking` is accepted too.
pub fn parse_copy_mode(name: &str) -> Option<CopyMode> {
    match name.trim().to_ascii_lowercase().as_str() {
        "background" => Some(CopyMode::Background),
        "write-blocking" | "write_blocking" => Some(CopyMode::WriteBlocking),
        "auto" => Some(CopyMode::Auto),
        _ => None,
    }
}

/// The name of a sync mode: `full`, `none`, `bitmap`.
pub fn sync_mode_name(mode: SyncMode) -> &'static str {
    match mode {
        // The proto documents UNSPECIFIED as full.
        SyncMode::Unspecified | SyncMode::Full => "full",
        SyncMode::None => "none",
        SyncMode::Bitmap => "bitmap",
    }
}

/// Parses a sync mode name.
pub fn parse_sync_mode(name: &str) -> Option<SyncMode> {
    match name.trim().to_ascii_lowercase().as_str() {
        "full" => Some(SyncMode::Full),
        "none" => Some(SyncMode::None),
        "bitmap" => Some(SyncMode::Bitmap),
        _ => None,
    }
}

/// The name of an error policy: `report`, `ignore`, `stop`, `enospc`.
pub fn error_policy_name(policy: ErrorPolicy) -> &'static str {
    match policy {
        // The proto documents UNSPECIFIED as report.
        ErrorPolicy::Unspecified | ErrorPolicy::Report => "report",
        ErrorPolicy::Ignore => "ignore",
        ErrorPolicy::Stop => "stop",
        ErrorPolicy::Enospc => "enospc",
    }
}

/// Parses an error policy name.
pub fn parse_error_policy(name: &str) -> Option<ErrorPolicy> {
    match name.trim().to_ascii_lowercase().as_str() {
        "report" => Some(ErrorPolicy::Report),
        "ignore" => Some(ErrorPolicy::Ignore),
        "stop" => Some(ErrorPolicy::Stop),
        "enospc" => Some(ErrorPolicy::Enospc),
        _ => None,
    }
}

/// The QEMU name of an event type: `JOB_STATUS_CHANGE`, `BLOCK_JOB_READY`.
pub fn event_type_name(kind: EventType) -> &'static str {
    match kind {
        EventType::Unspecified => "UNSPECIFIED",
        EventType::JobStatusChange => "JOB_STATUS_CHANGE",
        EventType::BlockJobReady => "BLOCK_JOB_READY",
        EventType::BlockJobCompleted => "BLOCK_JOB_COMPLETED",
        EventType::BlockJobCancelled => "BLOCK_JOB_CANCELLED",
        EventType::BlockJobError => "BLOCK_JOB_ERROR",
        EventType::BlockJobPending => "BLOCK_JOB_PENDING",
        EventType::CopyModeChanged => "COPY_MODE_CHANGED",
        EventType::Progress => "PROGRESS",
        EventType::JobDismissed => "JOB_DISMISSED",
    }
}

/// The lowercase name of a convergence forecast: `converging`, `stalled`,
/// `diverging`, `synced`. `None` for unspecified (no forecast: an older
/// server, or a record that carries none).
pub fn convergence_name(convergence: Convergence) -> Option<&'static str> {
    match convergence {
        Convergence::Unspecified => None,
        Convergence::Converging => Some("converging"),
        Convergence::Stalled => Some("stalled"),
        Convergence::Diverging => Some("diverging"),
        Convergence::Synced => Some("synced"),
    }
}

/// Whether a job in this state has finished for good (`concluded` or
/// `null`): it will not copy, pivot or change state again except to be
/// dismissed.
pub fn is_final_state(state: JobState) -> bool {
    matches!(state, JobState::Concluded | JobState::Null)
}

/// A fresh job id for a mirror of `source`: `mirror-<source>-<unix-millis>`.
pub fn generate_job_id(source: &str) -> String {
    // A clock before 1970 is a broken clock; 0 still gives a usable id.
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    format!("mirror-{source}-{millis}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_names_round_trip() {
        for s in JOB_STATES {
            let name = job_state_name(s);
            assert_eq!(name, name.to_lowercase());
            assert_eq!(parse_job_state(name), Some(s));
            assert_eq!(parse_job_state(&name.to_uppercase()), Some(s));
        }
        assert_eq!(parse_job_state("unspecified"), None);
        assert_eq!(parse_job_state("bogus"), None);
    }

    #[test]
    fn copy_mode_names() {
        assert_eq!(copy_mode_name(CopyMode::WriteBlocking), "write-blocking");
        assert_eq!(copy_mode_name(CopyMode::Unspecified), "background");
        assert_eq!(
            parse_copy_mode("write_blocking"),
            Some(CopyMode::WriteBlocking)
        );
        assert_eq!(
            parse_copy_mode("Write-Blocking"),
            Some(CopyMode::WriteBlocking)
        );
        assert_eq!(parse_copy_mode("auto"), Some(CopyMode::Auto));
        assert_eq!(parse_copy_mode("sync"), None);
    }

    #[test]
    fn spec_enum_names_round_trip() {
        for m in [SyncMode::Full, SyncMode::None, SyncMode::Bitmap] {
            assert_eq!(parse_sync_mode(sync_mode_name(m)), Some(m));
        }
        for p in [
            ErrorPolicy::Report,
            ErrorPolicy::Ignore,
            ErrorPolicy::Stop,
            ErrorPolicy::Enospc,
        ] {
            assert_eq!(parse_error_policy(error_policy_name(p)), Some(p));
        }
    }

    #[test]
    fn event_names_match_the_proto_without_prefix() {
        for i in 0..=9 {
            let kind = EventType::try_from(i).expect("0..=9 are all defined");
            let proto = kind.as_str_name();
            assert_eq!(
                proto.strip_prefix("EVENT_TYPE_"),
                Some(event_type_name(kind))
            );
        }
    }

    #[test]
    fn convergence_names_match_the_proto_in_lowercase() {
        assert_eq!(convergence_name(Convergence::Unspecified), None);
        for i in 1..=4 {
            let c = Convergence::try_from(i).expect("1..=4 are all defined");
            let proto = c.as_str_name().to_ascii_lowercase();
            assert_eq!(proto.strip_prefix("convergence_"), convergence_name(c));
        }
    }

    #[test]
    fn generated_ids_name_the_source() {
        let id = generate_job_id("vol0");
        let millis = id.strip_prefix("mirror-vol0-").expect("prefix");
        assert!(millis.parse::<u128>().is_ok(), "{id}");
    }
}

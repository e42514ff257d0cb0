//! JSON forms of jobs, volumes, exports and events, as `mirrorctl -o json` prints
//! them and scripts read them.
//!
//! Built field by field rather than derived, so the names are stable and
//! readable: enums as lowercase names (`"state": "ready"`,
//! `"copy_mode": "write-blocking"`), event types as QEMU names
//! (`"type": "BLOCK_JOB_READY"`), times as RFC 3339 strings, empty strings
//! that mean "none" as `null`. Byte counts and rates drop the proto's
//! `_bytes` / `_bytes_per_sec` suffixes (`current_progress`, `copy_rate`,
//! `guest_throttle`); durations keep `_ms` (`eta_to_ready_ms`). A
//! convergence forecast is a lowercase name (`"convergence": "converging"`),
//! `null` when the server sent none.

use blockmirror_proto::v1::{
    Event, EventType, Export, Job, LatencyPercentiles, MirrorSpec, Volume, WriteLatency,
};
use serde_json::{Map, Value, json};

use crate::names::{
    convergence_name, copy_mode_name, error_policy_name, event_type_name, job_state_name,
    sync_mode_name,
};
use crate::watch::WatchItem;

/// A job as a JSON object.
pub fn job_json(job: &Job) -> Value {
    json!({
        "id": job.id,
        "state": job_state_name(job.state()),
        "copy_mode": copy_mode_name(job.copy_mode()),
        "actively_synced": job.actively_synced,
        "current_progress": job.current_progress_bytes,
        "total_progress": job.total_progress_bytes,
        "dirty_bytes": job.dirty_bytes,
        "copy_rate": job.copy_rate_bytes_per_sec,
        "dirty_rate": job.dirty_rate_bytes_per_sec,
        "convergence": convergence_name(job.convergence()),
        "eta_to_ready_ms": job.eta_to_ready_ms,
        "speed": job.speed_bytes_per_sec,
        "error": non_empty(&job.error),
        "in_flight_bytes": job.in_flight_bytes,
        "peak_in_flight_bytes": job.peak_in_flight_bytes,
        "copied_bytes": job.copied_bytes,
        "synced_guest_bytes": job.synced_guest_bytes,
        "pivoted": job.pivoted,
        "created_at": timestamp(job.created_at.as_ref()),
        "updated_at": timestamp(job.updated_at.as_ref()),
        "last_event_sequence": job.last_event_sequence,
        "write_latency": write_latency_json(job.write_latency.as_deref()),
        "spec": job.spec.as_ref().map(spec_json),
    })
}

/// A job's write latency percentiles: `{"guest": {"count", "p50_us",
/// "p99_us"}, "source": .., "target": .., "range_lock_wait": ..}`; a
/// percentile is `null` while its count is 0.
pub fn write_latency_json(w: Option<&WriteLatency>) -> Value {
    let one = |p: Option<&LatencyPercentiles>| {
        let p = p.copied().unwrap_or_default();
        let us = |v: u64| if p.count == 0 { Value::Null } else { v.into() };
        json!({"count": p.count, "p50_us": us(p.p50_us), "p99_us": us(p.p99_us)})
    };
    let w = w.cloned().unwrap_or_default();
    json!({
        "guest": one(w.guest.as_ref()),
        "source": one(w.source.as_ref()),
        "target": one(w.target.as_ref()),
        "range_lock_wait": one(w.range_lock_wait.as_ref()),
    })
}

/// A mirror spec as a JSON object. Unspecified enums print as the default
/// they stand for; unset `auto_finalize` / `auto_dismiss` as `true`. The
/// convergence policy prints as sent: 0 stands for the server's default
/// (off for `target_latency_limit_ms` and `guest_throttle`); specs in job
/// records carry the values in effect.
pub fn spec_json(spec: &MirrorSpec) -> Value {
    json!({
        "source_volume": spec.source_volume,
        "target": spec.target,
        "sync": sync_mode_name(spec.sync()),
        "copy_mode": copy_mode_name(spec.copy_mode()),
        "granularity": spec.granularity_bytes,
        "buf_size": spec.buf_size_bytes,
        "speed": spec.speed_bytes_per_sec,
        "on_source_error": error_policy_name(spec.on_source_error()),
        "on_target_error": error_policy_name(spec.on_target_error()),
        "auto_finalize": spec.auto_finalize.unwrap_or(true),
        "auto_dismiss": spec.auto_dismiss.unwrap_or(true),
        "bitmap": non_empty(&spec.bitmap),
        "auto_ready_timeout_ms": spec.auto_ready_timeout_ms,
        "auto_diverging_window_ms": spec.auto_diverging_window_ms,
        "auto_min_dwell_ms": spec.auto_min_dwell_ms,
        "target_latency_limit_ms": spec.target_latency_limit_ms,
        "target_latency_window_ms": spec.target_latency_window_ms,
        "guest_throttle": spec.guest_throttle_bytes_per_sec,
        "guest_throttle_below": spec.guest_throttle_below_bytes,
        "copier_share_percent": spec.copier_share_percent,
        "copier_time_share_percent": spec.copier_time_share_percent,
    })
}

/// A volume as a JSON object.
pub fn volume_json(volume: &Volume) -> Value {
    let limits = volume.limits.unwrap_or_default();
    json!({
        "name": volume.name,
        "size_bytes": volume.size_bytes,
        "path": volume.path,
        "block_size_bytes": volume.block_size_bytes,
        "limits": {
            "write_bps": limits.write_bytes_per_sec,
            "write_iops": limits.write_iops,
        },
        "job_id": non_empty(&volume.job_id),
        "direct_io": volume.direct_io,
        "in_flight_bytes": volume.in_flight_bytes,
        "peak_in_flight_bytes": volume.peak_in_flight_bytes,
        "max_in_flight_bytes": volume.max_in_flight_bytes,
    })
}

/// An NBD export as a JSON object: `name`, `volume`, `read_only`. No URI:
/// the client cannot know where the server's NBD listener is.
pub fn export_json(export: &Export) -> Value {
    json!({
        "name": export.name,
        "volume": export.volume,
        "read_only": export.read_only,
    })
}

/// An event as a JSON object: `sequence`, `time`, `job_id`, `type`, and the
/// fields that event type carries. Those with progress figures (PROGRESS,
/// READY, COMPLETED, CANCELLED) carry the forecast too: `convergence` and
/// `eta_to_ready_ms`.
pub fn event_json(ev: &Event) -> Value {
    let kind = ev.r#type();
    let mut obj = Map::new();
    obj.insert("sequence".into(), ev.sequence.into());
    obj.insert("time".into(), timestamp(ev.time.as_ref()));
    obj.insert("job_id".into(), ev.job_id.clone().into());
    obj.insert("type".into(), event_type_name(kind).into());
    let progress = |obj: &mut Map<String, Value>| {
        obj.insert("current_progress".into(), ev.current_progress_bytes.into());
        obj.insert("total_progress".into(), ev.total_progress_bytes.into());
        obj.insert("dirty_bytes".into(), ev.dirty_bytes.into());
        obj.insert("copy_rate".into(), ev.copy_rate_bytes_per_sec.into());
        obj.insert("dirty_rate".into(), ev.dirty_rate_bytes_per_sec.into());
        obj.insert(
            "convergence".into(),
            convergence_name(ev.convergence()).into(),
        );
        obj.insert("eta_to_ready_ms".into(), ev.eta_to_ready_ms.into());
    };
    match kind {
        EventType::JobStatusChange => {
            obj.insert("state".into(), job_state_name(ev.state()).into());
        }
        EventType::BlockJobReady | EventType::BlockJobCancelled | EventType::Progress => {
            progress(&mut obj);
        }
        EventType::BlockJobCompleted => {
            obj.insert("pivoted".into(), ev.pivoted.into());
            obj.insert("pause_us".into(), ev.pause_us.into());
            obj.insert("error".into(), non_empty(&ev.error));
            progress(&mut obj);
        }
        EventType::BlockJobError => {
            obj.insert("error".into(), non_empty(&ev.error));
            obj.insert("operation".into(), ev.operation.clone().into());
            obj.insert("side".into(), ev.side.clone().into());
            obj.insert("action".into(), ev.action.clone().into());
        }
        EventType::CopyModeChanged => {
            obj.insert("from_mode".into(), copy_mode_name(ev.from_mode()).into());
            obj.insert("to_mode".into(), copy_mode_name(ev.to_mode()).into());
            obj.insert("reason".into(), ev.reason.clone().into());
        }
        EventType::BlockJobPending | EventType::JobDismissed => {}
        EventType::Unspecified => {
            // An event type this client does not know: show everything.
            obj.insert("state".into(), job_state_name(ev.state()).into());
            obj.insert("pivoted".into(), ev.pivoted.into());
            obj.insert("pause_us".into(), ev.pause_us.into());
            obj.insert("error".into(), non_empty(&ev.error));
            obj.insert("operation".into(), ev.operation.clone().into());
            obj.insert("side".into(), ev.side.clone().into());
            obj.insert("action".into(), ev.action.clone().into());
            obj.insert("from_mode".into(), copy_mode_name(ev.from_mode()).into());
            obj.insert("to_mode".into(), copy_mode_name(ev.to_mode()).into());
            obj.insert("reason".into(), ev.reason.clone().into());
            progress(&mut obj);
        }
    }
    Value::Object(obj)
}

/// One line of `mirrorctl watch -o json`: an event object,
/// `{"type":"SNAPSHOT","job":{...}}` or
/// `{"type":"HEARTBEAT","latest_sequence":N}`.
pub fn watch_item_json(item: &WatchItem) -> Value {
    match item {
        WatchItem::Snapshot(job) => json!({ "type": "SNAPSHOT", "job": job_json(job) }),
        WatchItem::Event(ev) => event_json(ev),
        WatchItem::Heartbeat { latest_sequence } => {
            json!({ "type": "HEARTBEAT", "latest_sequence": latest_sequence })
        }
    }
}

/// An RFC 3339 time, or `null` if unset.
fn timestamp(ts: Option<&prost_types::Timestamp>) -> Value {
    ts.map_or(Value::Null, |t| Value::String(t.to_string()))
}

/// `null` for an empty string (the proto's "none").
fn non_empty(s: &str) -> Value {
    if s.is_empty() {
        Value::Null
    } else {
        Value::String(s.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use blockmirror_proto::v1::{Convergence, CopyMode, ErrorPolicy, IoLimits, JobState, SyncMode};

    fn sample_job() -> Job {
        let mut spec = MirrorSpec {
            source_volume: "src".into(),
            target: "volume:dst".into(),
            granularity_bytes: 65536,
            auto_dismiss: Some(false),
            ..MirrorSpec::default()
        };
        spec.set_sync(SyncMode::Full);
        spec.set_copy_mode(CopyMode::Auto);
        spec.set_on_target_error(ErrorPolicy::Stop);
        let mut job = Job {
            id: "j1".into(),
            spec: Some(spec),
            actively_synced: true,
            current_progress_bytes: 10,
            total_progress_bytes: 20,
            dirty_bytes: 5,
            copy_rate_bytes_per_sec: 7,
            created_at: Some(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 0,
            }),
            last_event_sequence: 42,
            ..Job::default()
        };
        job.set_state(JobState::Ready);
        job.set_copy_mode(CopyMode::WriteBlocking);
        job
    }

    #[test]
    fn job_fields_and_lowercase_names() {
        let v = job_json(&sample_job());
        assert_eq!(v["id"], "j1");
        assert_eq!(v["state"], "ready");
        assert_eq!(v["copy_mode"], "write-blocking");
        assert_eq!(v["actively_synced"], true);
        assert_eq!(v["current_progress"], 10);
        assert_eq!(v["total_progress"], 20);
        assert_eq!(v["dirty_bytes"], 5);
        assert_eq!(v["copy_rate"], 7);
        assert_eq!(v["error"], Value::Null);
        assert_eq!(v["created_at"], "2023-11-14T22:13:20Z");
        assert_eq!(v["updated_at"], Value::Null);
        assert_eq!(v["last_event_sequence"], 42);
        for key in [
            "dirty_rate",
            "speed",
            "in_flight_bytes",
            "peak_in_flight_bytes",
            "copied_bytes",
            "synced_guest_bytes",
            "pivoted",
        ] {
            assert!(v.get(key).is_some(), "{key}");
        }
        // No latency yet: counts 0, percentiles null.
        assert_eq!(v["write_latency"]["guest"]["count"], 0);
        assert_eq!(v["write_latency"]["target"]["p99_us"], Value::Null);
        let spec = &v["spec"];
        assert_eq!(spec["source_volume"], "src");
        assert_eq!(spec["target"], "volume:dst");
        assert_eq!(spec["sync"], "full");
        assert_eq!(spec["copy_mode"], "auto");
        assert_eq!(spec["on_source_error"], "report");
        assert_eq!(spec["on_target_error"], "stop");
        assert_eq!(spec["granularity"], 65536);
        assert_eq!(spec["auto_finalize"], true);
        assert_eq!(spec["auto_dismiss"], false);
        assert_eq!(spec["bitmap"], Value::Null);
        // No forecast in the sample: both null, but present.
        assert_eq!(v["convergence"], Value::Null);
        assert_eq!(v["eta_to_ready_ms"], Value::Null);
        // The policy as sent: 0 = the server's default.
        for key in [
            "auto_ready_timeout_ms",
            "auto_diverging_window_ms",
            "auto_min_dwell_ms",
            "target_latency_limit_ms",
            "target_latency_window_ms",
            "guest_throttle",
            "guest_throttle_below",
        ] {
            assert_eq!(spec[key], 0, "{key}");
        }
    }

    #[test]
    fn job_convergence_and_eta() {
        let mut job = sample_job();
        for (c, name) in [
            (Convergence::Converging, "converging"),
            (Convergence::Stalled, "stalled"),
            (Convergence::Diverging, "diverging"),
            (Convergence::Synced, "synced"),
        ] {
            job.set_convergence(c);
            assert_eq!(job_json(&job)["convergence"], name);
        }
        job.set_convergence(Convergence::Converging);
        job.eta_to_ready_ms = Some(12_345);
        let v = job_json(&job);
        assert_eq!(v["convergence"], "converging");
        assert_eq!(v["eta_to_ready_ms"], 12_345);
        job.set_convergence(Convergence::Synced);
        job.eta_to_ready_ms = Some(0);
        assert_eq!(job_json(&job)["eta_to_ready_ms"], 0);
        // An unknown enum value from a newer server: no forecast.
        job.convergence = 99;
        assert_eq!(job_json(&job)["convergence"], Value::Null);
    }

    #[test]
    fn spec_convergence_policy() {
        let spec = MirrorSpec {
            auto_ready_timeout_ms: 30_000,
            auto_diverging_window_ms: 2_500,
            auto_min_dwell_ms: 500,
            target_latency_limit_ms: 50,
            target_latency_window_ms: 4_000,
            guest_throttle_bytes_per_sec: 10 << 20,
            guest_throttle_below_bytes: 256 << 20,
            ..MirrorSpec::default()
        };
        let v = spec_json(&spec);
        assert_eq!(v["auto_ready_timeout_ms"], 30_000);
        assert_eq!(v["auto_diverging_window_ms"], 2_500);
        assert_eq!(v["auto_min_dwell_ms"], 500);
        assert_eq!(v["target_latency_limit_ms"], 50);
        assert_eq!(v["target_latency_window_ms"], 4_000);
        assert_eq!(v["guest_throttle"], 10 << 20);
        assert_eq!(v["guest_throttle_below"], 256 << 20);
        assert!(v.get("guest_throttle_bytes_per_sec").is_none());
    }

    #[test]
    fn job_error_is_a_string_when_set() {
        let mut job = sample_job();
        job.error = "target write failed".into();
        assert_eq!(job_json(&job)["error"], "target write failed");
    }

    #[test]
    fn volume_fields() {
        let vol = Volume {
            name: "v".into(),
            size_bytes: 1 << 30,
            path: "/tmp/v.raw".into(),
            block_size_bytes: 512,
            limits: Some(IoLimits {
                write_bytes_per_sec: 1 << 20,
                write_iops: 100,
            }),
            job_id: String::new(),
            direct_io: false,
            in_flight_bytes: 0,
            peak_in_flight_bytes: 3 << 20,
            max_in_flight_bytes: 16 << 20,
        };
        let v = volume_json(&vol);
        assert_eq!(v["name"], "v");
        assert_eq!(v["size_bytes"], 1u64 << 30);
        assert_eq!(v["path"], "/tmp/v.raw");
        assert_eq!(v["block_size_bytes"], 512);
        assert_eq!(v["limits"]["write_bps"], 1 << 20);
        assert_eq!(v["limits"]["write_iops"], 100);
        assert_eq!(v["job_id"], Value::Null);
        assert_eq!(v["direct_io"], false);
        assert_eq!(v["peak_in_flight_bytes"], 3u64 << 20);
        assert_eq!(v["max_in_flight_bytes"], 16u64 << 20);
    }

    #[test]
    fn export_fields() {
        let export = Export {
            name: "disk0".into(),
            volume: "v".into(),
            read_only: true,
        };
        assert_eq!(
            export_json(&export),
            json!({"name": "disk0", "volume": "v", "read_only": true})
        );
        let v = export_json(&Export::default());
        assert_eq!(v["read_only"], false);
        assert!(v.get("uri").is_none());
    }

    #[test]
    fn events_carry_their_fields() {
        let mut ev = Event {
            sequence: 7,
            job_id: "j1".into(),
            time: Some(prost_types::Timestamp {
                seconds: 0,
                nanos: 500_000_000,
            }),
            ..Event::default()
        };
        ev.set_type(EventType::JobStatusChange);
        ev.set_state(JobState::Concluded);
        let v = event_json(&ev);
        assert_eq!(v["sequence"], 7);
        assert_eq!(v["job_id"], "j1");
        assert_eq!(v["type"], "JOB_STATUS_CHANGE");
        assert_eq!(v["state"], "concluded");
        assert_eq!(v["time"], "1970-01-01T00:00:00.500Z");
        assert!(v.get("pivoted").is_none());

        ev.set_type(EventType::BlockJobCompleted);
        ev.pivoted = true;
        ev.pause_us = 1500;
        let v = event_json(&ev);
        assert_eq!(v["type"], "BLOCK_JOB_COMPLETED");
        assert_eq!(v["pivoted"], true);
        assert_eq!(v["pause_us"], 1500);
        assert_eq!(v["error"], Value::Null);
        assert!(v.get("current_progress").is_some());

        ev.set_type(EventType::CopyModeChanged);
        ev.set_from_mode(CopyMode::Background);
        ev.set_to_mode(CopyMode::WriteBlocking);
        ev.reason = "complete requested".into();
        let v = event_json(&ev);
        assert!(v.get("convergence").is_none());
        assert_eq!(v["from_mode"], "background");
        assert_eq!(v["to_mode"], "write-blocking");
        assert_eq!(v["reason"], "complete requested");

        ev.set_type(EventType::BlockJobError);
        ev.error = "EIO".into();
        ev.operation = "write".into();
        ev.side = "target".into();
        ev.action = "report".into();
        let v = event_json(&ev);
        assert_eq!(v["type"], "BLOCK_JOB_ERROR");
        assert_eq!(
            (&v["operation"], &v["side"], &v["action"], &v["error"]),
            (
                &json!("write"),
                &json!("target"),
                &json!("report"),
                &json!("EIO")
            )
        );
    }

    #[test]
    fn progress_events_carry_the_forecast() {
        let mut ev = Event {
            sequence: 8,
            job_id: "j1".into(),
            current_progress_bytes: 100,
            total_progress_bytes: 400,
            dirty_bytes: 300,
            copy_rate_bytes_per_sec: 50,
            dirty_rate_bytes_per_sec: 25,
            eta_to_ready_ms: Some(12_000),
            ..Event::default()
        };
        ev.set_type(EventType::Progress);
        ev.set_convergence(Convergence::Converging);
        let v = event_json(&ev);
        assert_eq!(v["type"], "PROGRESS");
        assert_eq!(v["dirty_bytes"], 300);
        assert_eq!(v["convergence"], "converging");
        assert_eq!(v["eta_to_ready_ms"], 12_000);

        ev.set_convergence(Convergence::Diverging);
        ev.eta_to_ready_ms = None;
        let v = event_json(&ev);
        assert_eq!(v["convergence"], "diverging");
        assert_eq!(v["eta_to_ready_ms"], Value::Null);
        assert!(v.as_object().unwrap().contains_key("eta_to_ready_ms"));

        // Older servers send no forecast: null, not a made-up name.
        ev.set_convergence(Convergence::Unspecified);
        assert_eq!(event_json(&ev)["convergence"], Value::Null);

        ev.set_type(EventType::BlockJobReady);
        ev.set_convergence(Convergence::Synced);
        ev.eta_to_ready_ms = Some(0);
        let v = event_json(&ev);
        assert_eq!(
            (&v["convergence"], &v["eta_to_ready_ms"]),
            (&json!("synced"), &json!(0))
        );

        ev.set_type(EventType::JobStatusChange);
        assert!(event_json(&ev).get("convergence").is_none());
    }

    #[test]
    fn watch_items() {
        let v = watch_item_json(&WatchItem::Snapshot(sample_job()));
        assert_eq!(v["type"], "SNAPSHOT");
        assert_eq!(v["job"]["state"], "ready");
        let v = watch_item_json(&WatchItem::Heartbeat { latest_sequence: 9 });
        assert_eq!(v, json!({"type": "HEARTBEAT", "latest_sequence": 9}));
    }
}

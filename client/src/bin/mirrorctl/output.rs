//! Rendering results for stdout: aligned tables and `key: value` lines for
//! people, JSON (from [`blockmirror_client::json`]) for scripts.
//!
//! Renderers return strings so they can be tested; [`Printer`] writes them.

use std::io::{self, Write};

use blockmirror_client::json::{export_json, job_json, volume_json, watch_item_json};
use blockmirror_client::names::{
    convergence_name, copy_mode_name, error_policy_name, event_type_name, job_state_name,
    sync_mode_name,
};
use blockmirror_client::proto::{
    Convergence, Event, EventType, Export, Job, LatencyPercentiles, Volume,
};
use blockmirror_client::{WatchItem, format_rate, format_size};
use serde_json::Value;

use crate::cli::OutputFormat;

/// Writes results to stdout in the chosen format.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Printer {
    pub(crate) format: OutputFormat,
}

impl Printer {
    pub(crate) fn job(self, job: &Job) -> io::Result<()> {
        match self.format {
            OutputFormat::Table => out(&job_details(job)),
            OutputFormat::Json => json_line(&job_json(job)),
        }
    }

    pub(crate) fn jobs(self, jobs: &[Job]) -> io::Result<()> {
        match self.format {
            OutputFormat::Table => out(&jobs_table(jobs)),
            OutputFormat::Json => json_line(&Value::Array(jobs.iter().map(job_json).collect())),
        }
    }

    pub(crate) fn volume(self, volume: &Volume) -> io::Result<()> {
        match self.format {
            OutputFormat::Table => out(&volume_details(volume)),
            OutputFormat::Json => json_line(&volume_json(volume)),
        }
    }

    pub(crate) fn volumes(self, volumes: &[Volume]) -> io::Result<()> {
        match self.format {
            OutputFormat::Table => out(&volumes_table(volumes)),
            OutputFormat::Json => {
                json_line(&Value::Array(volumes.iter().map(volume_json).collect()))
            }
        }
    }

    pub(crate) fn export(self, export: &Export) -> io::Result<()> {
        match self.format {
            OutputFormat::Table => out(&export_details(export)),
            OutputFormat::Json => json_line(&export_json(export)),
        }
    }

    pub(crate) fn exports(self, exports: &[Export]) -> io::Result<()> {
        match self.format {
            OutputFormat::Table => out(&exports_table(exports)),
            OutputFormat::Json => {
                json_line(&Value::Array(exports.iter().map(export_json).collect()))
            }
        }
    }

    /// A confirmation: `text` for people, `json` for scripts.
    pub(crate) fn done(self, text: &str, json: &Value) -> io::Result<()> {
        match self.format {
            OutputFormat::Table => out(&format!("{text}\n")),
            OutputFormat::Json => json_line(json),
        }
    }

    /// The line `watch` prints for an item, if any (heartbeats only in
    /// JSON). Includes the newline.
    pub(crate) fn watch_line(self, item: &WatchItem) -> Option<String> {
        match self.format {
            OutputFormat::Table => watch_item_line(item).map(|l| format!("{l}\n")),
            OutputFormat::Json => Some(format!("{}\n", watch_item_json(item))),
        }
    }
}

/// Writes `s` to stdout and flushes (so `watch` lines appear at once).
pub(crate) fn out(s: &str) -> io::Result<()> {
    let mut stdout = io::stdout().lock();
    stdout.write_all(s.as_bytes())?;
    stdout.flush()
}

fn json_line(v: &Value) -> io::Result<()> {
    out(&format!("{v}\n"))
}

/// Columns aligned with two spaces; the last column is not padded.
pub(crate) fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut s = String::new();
    let header_row: Vec<String> = headers.iter().map(|h| (*h).to_owned()).collect();
    for row in std::iter::once(&header_row).chain(rows) {
        let last = row.len().saturating_sub(1);
        for (i, (cell, w)) in row.iter().zip(&widths).enumerate() {
            if i == last {
                s.push_str(cell);
            } else {
                s.push_str(&format!("{cell:<w$}  "));
            }
        }
        s.push('\n');
    }
    s
}

/// `key: value` lines with the values aligned.
fn details(pairs: &[(&str, String)]) -> String {
    let width = pairs.iter().map(|(k, _)| k.len() + 1).max().unwrap_or(0);
    pairs
        .iter()
        .map(|(k, v)| format!("{:<width$} {v}\n", format!("{k}:")))
        .collect()
}

/// `64 MiB (67108864)`.
fn bytes(n: u64) -> String {
    if n < 1024 {
        format!("{n} B")
    } else {
        format!("{} ({n})", format_size(n))
    }
}

fn or_dash(s: &str) -> String {
    if s.is_empty() {
        "-".to_owned()
    } else {
        s.to_owned()
    }
}

fn percent(done: u64, total: u64) -> String {
    if total == 0 {
        "-".to_owned()
    } else {
        // Display only: f64 rounding is fine.
        #[allow(clippy::cast_precision_loss)]
        let pct = done as f64 * 100.0 / total as f64;
        format!("{pct:.1}%")
    }
}

fn progress_cell(job: &Job) -> String {
    format!(
        "{}/{} ({})",
        format_size(job.current_progress_bytes),
        format_size(job.total_progress_bytes),
        percent(job.current_progress_bytes, job.total_progress_bytes)
    )
}

/// `45s`, `3m05s`, `2h07m`.
pub(crate) fn format_eta(secs: u64) -> String {
    if secs < 60 {
        format!("{secs}s")
    } else if secs < 3600 {
        format!("{}m{:02}s", secs / 60, secs % 60)
    } else {
        format!("{}h{:02}m", secs / 3600, (secs % 3600) / 60)
    }
}

/// Whole seconds, rounded up, so a forecast under a second reads `~1s`.
fn eta_secs(ms: u64) -> u64 {
    ms.div_ceil(1000)
}

/// A forecast for people: `converging, ready in ~12s`, `converging`,
/// `stalled`, `diverging`, `synced`; `-` when the server sent none.
pub(crate) fn convergence_text(convergence: Convergence, eta_ms: Option<u64>) -> String {
    let eta = eta_ms
        .filter(|ms| *ms > 0)
        .map(|ms| format!("ready in ~{}", format_eta(eta_secs(ms))));
    match (convergence_name(convergence), eta) {
        (Some(name), Some(eta)) if convergence == Convergence::Converging => {
            format!("{name}, {eta}")
        }
        (Some(name), _) => name.to_owned(),
        (None, Some(eta)) => eta,
        (None, None) => "-".to_owned(),
    }
}

/// The forecast as a table cell: `converging ~12s`, `diverging`, `-`.
fn convergence_cell(convergence: Convergence, eta_ms: Option<u64>) -> String {
    let name = convergence_name(convergence).unwrap_or("-");
    match eta_ms.filter(|ms| *ms > 0) {
        Some(ms) if convergence == Convergence::Converging => {
            format!("{name} ~{}", format_eta(eta_secs(ms)))
        }
        _ => name.to_owned(),
    }
}

/// `500 ms`, `2.5 s`, `60 s`.
fn format_millis(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms} ms")
    } else {
        let frac = format!("{:03}", ms % 1000);
        let frac = frac.trim_end_matches('0');
        if frac.is_empty() {
            format!("{} s", ms / 1000)
        } else {
            format!("{}.{frac} s", ms / 1000)
        }
    }
}

/// `p50 120 us, p99 2.1 ms (1234 writes)`, or `-` before the first write.
fn latency_text(p: Option<&LatencyPercentiles>) -> String {
    match p {
        Some(p) if p.count > 0 => format!(
            "p50 {}, p99 {} ({} writes)",
            format_micros(p.p50_us),
            format_micros(p.p99_us),
            p.count
        ),
        _ => "-".to_owned(),
    }
}

/// RFC 3339, or `-` if unset.
fn timestamp(ts: Option<&prost_types::Timestamp>) -> String {
    ts.map_or_else(|| "-".to_owned(), ToString::to_string)
}

pub(crate) fn job_details(job: &Job) -> String {
    let mut pairs = vec![
        ("id", job.id.clone()),
        ("state", job_state_name(job.state()).to_owned()),
        ("copy_mode", copy_mode_name(job.copy_mode()).to_owned()),
        ("actively_synced", job.actively_synced.to_string()),
        (
            "progress",
            percent(job.current_progress_bytes, job.total_progress_bytes),
        ),
        ("current_progress", bytes(job.current_progress_bytes)),
        ("total_progress", bytes(job.total_progress_bytes)),
        ("dirty_bytes", bytes(job.dirty_bytes)),
        ("copy_rate", format_rate(job.copy_rate_bytes_per_sec)),
        ("dirty_rate", format_rate(job.dirty_rate_bytes_per_sec)),
        (
            "convergence",
            convergence_text(job.convergence(), job.eta_to_ready_ms),
        ),
        (
            "speed",
            if job.speed_bytes_per_sec == 0 {
                "unlimited".to_owned()
            } else {
                format_rate(job.speed_bytes_per_sec)
            },
        ),
        ("in_flight_bytes", bytes(job.in_flight_bytes)),
        ("peak_in_flight_bytes", bytes(job.peak_in_flight_bytes)),
        ("copied_bytes", bytes(job.copied_bytes)),
        ("synced_guest_bytes", bytes(job.synced_guest_bytes)),
        ("pivoted", job.pivoted.to_string()),
        ("error", or_dash(&job.error)),
        ("created_at", timestamp(job.created_at.as_ref())),
        ("updated_at", timestamp(job.updated_at.as_ref())),
        ("last_event_sequence", job.last_event_sequence.to_string()),
    ];
    let w = job.write_latency.as_deref().cloned().unwrap_or_default();
    pairs.extend([
        ("write_latency_guest", latency_text(w.guest.as_ref())),
        ("write_latency_source", latency_text(w.source.as_ref())),
        ("write_latency_target", latency_text(w.target.as_ref())),
    ]);
    if let Some(spec) = &job.spec {
        let default_or = |n: u64, default: &str| {
            if n == 0 {
                default.to_owned()
            } else {
                format_size(n)
            }
        };
        pairs.extend([
            ("source_volume", spec.source_volume.clone()),
            ("target", spec.target.clone()),
            ("sync", sync_mode_name(spec.sync()).to_owned()),
            (
                "requested_mode",
                copy_mode_name(spec.copy_mode()).to_owned(),
            ),
            ("granularity", default_or(spec.granularity_bytes, "default")),
            ("buf_size", default_or(spec.buf_size_bytes, "default")),
            (
                "on_source_error",
                error_policy_name(spec.on_source_error()).to_owned(),
            ),
            (
                "on_target_error",
                error_policy_name(spec.on_target_error()).to_owned(),
            ),
            (
                "auto_finalize",
                spec.auto_finalize.unwrap_or(true).to_string(),
            ),
            (
                "auto_dismiss",
                spec.auto_dismiss.unwrap_or(true).to_string(),
            ),
        ]);
        if !spec.bitmap.is_empty() {
            pairs.push(("bitmap", spec.bitmap.clone()));
        }
        let millis_or_default = |ms: u64| {
            if ms == 0 {
                "default".to_owned()
            } else {
                format_millis(ms)
            }
        };
        pairs.extend([
            (
                "auto_ready_timeout",
                millis_or_default(spec.auto_ready_timeout_ms),
            ),
            (
                "auto_diverging_window",
                millis_or_default(spec.auto_diverging_window_ms),
            ),
            ("auto_min_dwell", millis_or_default(spec.auto_min_dwell_ms)),
        ]);
        if spec.target_latency_limit_ms == 0 {
            pairs.push(("target_latency_limit", "off".to_owned()));
        } else {
            pairs.extend([
                (
                    "target_latency_limit",
                    format_millis(spec.target_latency_limit_ms),
                ),
                (
                    "target_latency_window",
                    millis_or_default(spec.target_latency_window_ms),
                ),
            ]);
        }
        let percent_or_default = |p: u32| {
            if p == 0 {
                "default".to_owned()
            } else {
                format!("{p} %")
            }
        };
        pairs.extend([
            (
                "copier_share",
                percent_or_default(spec.copier_share_percent),
            ),
            (
                "copier_time_share",
                percent_or_default(spec.copier_time_share_percent),
            ),
        ]);
        if spec.guest_throttle_bytes_per_sec == 0 {
            pairs.push(("guest_throttle", "off".to_owned()));
        } else {
            pairs.extend([
                (
                    "guest_throttle",
                    format_rate(spec.guest_throttle_bytes_per_sec),
                ),
                (
                    "guest_throttle_below",
                    default_or(spec.guest_throttle_below_bytes, "default"),
                ),
            ]);
        }
    }
    details(&pairs)
}

pub(crate) fn jobs_table(jobs: &[Job]) -> String {
    let rows: Vec<Vec<String>> = jobs
        .iter()
        .map(|j| {
            let spec = j.spec.clone().unwrap_or_default();
            vec![
                j.id.clone(),
                or_dash(&spec.source_volume),
                or_dash(&spec.target),
                job_state_name(j.state()).to_owned(),
                copy_mode_name(j.copy_mode()).to_owned(),
                if j.actively_synced { "yes" } else { "no" }.to_owned(),
                progress_cell(j),
                format_size(j.dirty_bytes),
                format_rate(j.copy_rate_bytes_per_sec),
                convergence_cell(j.convergence(), j.eta_to_ready_ms),
                or_dash(&j.error),
            ]
        })
        .collect();
    table(
        &[
            "ID",
            "SOURCE",
            "TARGET",
            "STATE",
            "MODE",
            "SYNCED",
            "PROGRESS",
            "DIRTY",
            "RATE",
            "CONVERGENCE",
            "ERROR",
        ],
        &rows,
    )
}

fn limits_cell(v: &Volume) -> String {
    let l = v.limits.unwrap_or_default();
    match (l.write_bytes_per_sec, l.write_iops) {
        (0, 0) => "-".to_owned(),
        (bps, 0) => format_rate(bps),
        (0, iops) => format!("{iops} iops"),
        (bps, iops) => format!("{}, {iops} iops", format_rate(bps)),
    }
}

pub(crate) fn volume_details(v: &Volume) -> String {
    let l = v.limits.unwrap_or_default();
    details(&[
        ("name", v.name.clone()),
        ("size", bytes(v.size_bytes)),
        ("path", v.path.clone()),
        ("block_size", format!("{} B", v.block_size_bytes)),
        (
            "write_bps",
            if l.write_bytes_per_sec == 0 {
                "unlimited".to_owned()
            } else {
                format_rate(l.write_bytes_per_sec)
            },
        ),
        (
            "write_iops",
            if l.write_iops == 0 {
                "unlimited".to_owned()
            } else {
                l.write_iops.to_string()
            },
        ),
        ("job_id", or_dash(&v.job_id)),
        ("direct_io", v.direct_io.to_string()),
        (
            "in_flight",
            format!(
                "{} (peak {}, bound {} while no job runs)",
                format_size(v.in_flight_bytes),
                format_size(v.peak_in_flight_bytes),
                format_size(v.max_in_flight_bytes)
            ),
        ),
    ])
}

pub(crate) fn volumes_table(volumes: &[Volume]) -> String {
    let rows: Vec<Vec<String>> = volumes
        .iter()
        .map(|v| {
            vec![
                v.name.clone(),
                format_size(v.size_bytes),
                v.block_size_bytes.to_string(),
                or_dash(&v.job_id),
                if v.direct_io { "yes" } else { "no" }.to_owned(),
                limits_cell(v),
                v.path.clone(),
            ]
        })
        .collect();
    table(
        &["NAME", "SIZE", "BLOCK", "JOB", "DIRECT", "LIMITS", "PATH"],
        &rows,
    )
}

pub(crate) fn export_details(e: &Export) -> String {
    details(&[
        ("name", e.name.clone()),
        ("volume", e.volume.clone()),
        ("read_only", e.read_only.to_string()),
    ])
}

pub(crate) fn exports_table(exports: &[Export]) -> String {
    let rows: Vec<Vec<String>> = exports
        .iter()
        .map(|e| {
            vec![
                e.name.clone(),
                e.volume.clone(),
                if e.read_only { "yes" } else { "no" }.to_owned(),
            ]
        })
        .collect();
    table(&["NAME", "VOLUME", "READ-ONLY"], &rows)
}

/// One human line for a watch item; `None` for heartbeats.
pub(crate) fn watch_item_line(item: &WatchItem) -> Option<String> {
    match item {
        WatchItem::Heartbeat { .. } => None,
        WatchItem::Event(ev) => Some(event_line(ev)),
        WatchItem::Snapshot(job) => Some(format!(
            "{}  #{}  {}  SNAPSHOT  state {}, mode {}, copied {}, dirty {}{}{}",
            timestamp(job.updated_at.as_ref()),
            job.last_event_sequence,
            job.id,
            job_state_name(job.state()),
            copy_mode_name(job.copy_mode()),
            progress_cell(job),
            format_size(job.dirty_bytes),
            forecast_suffix(job.convergence(), job.eta_to_ready_ms),
            if job.error.is_empty() {
                String::new()
            } else {
                format!(", error: {}", job.error)
            }
        )),
    }
}

/// `TIME  #SEQ  JOB  TYPE  details`.
pub(crate) fn event_line(ev: &Event) -> String {
    let kind = ev.r#type();
    let progress = || {
        format!(
            "copied {}/{} ({}), dirty {}, copy {}, dirtying {}{}",
            format_size(ev.current_progress_bytes),
            format_size(ev.total_progress_bytes),
            percent(ev.current_progress_bytes, ev.total_progress_bytes),
            format_size(ev.dirty_bytes),
            format_rate(ev.copy_rate_bytes_per_sec),
            format_rate(ev.dirty_rate_bytes_per_sec),
            forecast_suffix(ev.convergence(), ev.eta_to_ready_ms),
        )
    };
    let detail = match kind {
        EventType::JobStatusChange => format!("state {}", job_state_name(ev.state())),
        EventType::BlockJobReady | EventType::BlockJobCancelled | EventType::Progress => progress(),
        EventType::BlockJobCompleted => {
            let mut d = format!(
                "pivoted {}, guest pause {}",
                ev.pivoted,
                format_micros(ev.pause_us)
            );
            if !ev.error.is_empty() {
                d.push_str(&format!(", error: {}", ev.error));
            }
            d
        }
        EventType::BlockJobError => format!(
            "{} {} failed, action {}: {}",
            or_dash(&ev.side),
            or_dash(&ev.operation),
            or_dash(&ev.action),
            ev.error
        ),
        EventType::CopyModeChanged => format!(
            "{} -> {}{}",
            copy_mode_name(ev.from_mode()),
            copy_mode_name(ev.to_mode()),
            if ev.reason.is_empty() {
                String::new()
            } else {
                format!(" ({})", ev.reason)
            }
        ),
        EventType::BlockJobPending | EventType::JobDismissed | EventType::Unspecified => {
            String::new()
        }
    };
    let head = format!(
        "{}  #{}  {}  {}",
        timestamp(ev.time.as_ref()),
        ev.sequence,
        ev.job_id,
        event_type_name(kind)
    );
    if detail.is_empty() {
        head
    } else {
        format!("{head}  {detail}")
    }
}

/// `, converging, ready in ~12s` for a watch line; empty when the server
/// sent no forecast.
fn forecast_suffix(convergence: Convergence, eta_ms: Option<u64>) -> String {
    if convergence == Convergence::Unspecified {
        String::new()
    } else {
        format!(", {}", convergence_text(convergence, eta_ms))
    }
}

/// `850 us`, `12.3 ms`, `1.20 s`.
fn format_micros(us: u64) -> String {
    // Display only: f64 rounding is fine.
    #[allow(clippy::cast_precision_loss)]
    let f = us as f64;
    if us < 1000 {
        format!("{us} us")
    } else if us < 1_000_000 {
        format!("{:.1} ms", f / 1e3)
    } else {
        format!("{:.2} s", f / 1e6)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use blockmirror_client::proto::{CopyMode, IoLimits, JobState, MirrorSpec};

    fn job() -> Job {
        let mut j = Job {
            id: "j1".into(),
            spec: Some(MirrorSpec {
                source_volume: "src".into(),
                target: "volume:dst".into(),
                ..MirrorSpec::default()
            }),
            current_progress_bytes: 512 << 20,
            total_progress_bytes: 1 << 30,
            dirty_bytes: 4 << 20,
            ..Job::default()
        };
        j.set_state(JobState::Running);
        j.set_copy_mode(CopyMode::WriteBlocking);
        j
    }

    #[test]
    fn table_aligns_columns() {
        let t = table(
            &["A", "BB"],
            &[
                vec!["xxx".into(), "1".into()],
                vec!["y".into(), "22".into()],
            ],
        );
        assert_eq!(t, "A    BB\nxxx  1\ny    22\n");
    }

    #[test]
    fn job_list_and_details() {
        let t = jobs_table(&[job()]);
        let mut lines = t.lines();
        assert!(lines.next().unwrap().starts_with("ID  SOURCE  TARGET"));
        let row = lines.next().unwrap();
        assert!(
            row.contains("running") && row.contains("write-blocking"),
            "{row}"
        );
        assert!(row.contains("512 MiB/1 GiB (50.0%)"), "{row}");

        let d = job_details(&job());
        assert!(d.contains("\nstate: "), "{d}");
        assert!(
            d.lines()
                .any(|l| l.starts_with("state:") && l.ends_with(" running"))
        );
        assert!(
            d.lines()
                .any(|l| l.starts_with("copy_mode:") && l.ends_with(" write-blocking"))
        );
        assert!(
            d.lines()
                .any(|l| l.starts_with("dirty_bytes:") && l.ends_with("4 MiB (4194304)"))
        );
        assert!(
            d.lines()
                .any(|l| l.starts_with("target:") && l.ends_with("volume:dst"))
        );
        // Values start in one column.
        let starts: Vec<usize> = d
            .lines()
            .map(|l| {
                let colon = l.find(':').unwrap();
                colon + 1 + l[colon + 1..].len() - l[colon + 1..].trim_start().len()
            })
            .collect();
        assert!(starts.windows(2).all(|w| w[0] == w[1]), "{d}");
    }

    #[test]
    fn volume_list_and_details() {
        let v = Volume {
            name: "v1".into(),
            size_bytes: 1 << 30,
            path: "/tmp/v1.raw".into(),
            block_size_bytes: 512,
            limits: Some(IoLimits {
                write_bytes_per_sec: 20 << 20,
                write_iops: 0,
            }),
            job_id: String::new(),
            direct_io: false,
            in_flight_bytes: 0,
            peak_in_flight_bytes: 1 << 20,
            max_in_flight_bytes: 16 << 20,
        };
        let t = volumes_table(std::slice::from_ref(&v));
        assert_eq!(
            t,
            "NAME  SIZE   BLOCK  JOB  DIRECT  LIMITS    PATH\n\
             v1    1 GiB  512    -    no      20 MiB/s  /tmp/v1.raw\n"
        );
        let d = volume_details(&v);
        assert!(
            d.lines().any(|l| l == "size:       1 GiB (1073741824)"),
            "{d}"
        );
        assert!(d.lines().any(|l| l == "write_iops: unlimited"), "{d}");
        assert!(
            d.lines()
                .any(|l| l.starts_with("in_flight:") && l.contains("peak 1 MiB")),
            "{d}"
        );
    }

    #[test]
    fn export_list_and_details() {
        let exports = [
            Export {
                name: "disk0".into(),
                volume: "v1".into(),
                read_only: true,
            },
            Export {
                name: "v2".into(),
                volume: "v2".into(),
                read_only: false,
            },
        ];
        assert_eq!(
            exports_table(&exports),
            "NAME   VOLUME  READ-ONLY\n\
             disk0  v1      yes\n\
             v2     v2      no\n"
        );
        assert_eq!(exports_table(&[]), "NAME  VOLUME  READ-ONLY\n");
        assert_eq!(
            export_details(&exports[0]),
            "name:      disk0\nvolume:    v1\nread_only: true\n"
        );
    }

    #[test]
    fn event_lines() {
        let mut ev = Event {
            sequence: 3,
            job_id: "j1".into(),
            ..Event::default()
        };
        ev.set_type(EventType::JobStatusChange);
        ev.set_state(JobState::Ready);
        assert_eq!(event_line(&ev), "-  #3  j1  JOB_STATUS_CHANGE  state ready");
        ev.set_type(EventType::BlockJobCompleted);
        ev.pivoted = true;
        ev.pause_us = 12_345;
        assert_eq!(
            event_line(&ev),
            "-  #3  j1  BLOCK_JOB_COMPLETED  pivoted true, guest pause 12.3 ms"
        );
        ev.set_type(EventType::JobDismissed);
        assert_eq!(event_line(&ev), "-  #3  j1  JOB_DISMISSED");
        assert_eq!(
            watch_item_line(&WatchItem::Heartbeat { latest_sequence: 1 }),
            None
        );
    }

    #[test]
    fn printer_skips_heartbeats_only_in_tables() {
        let hb = WatchItem::Heartbeat { latest_sequence: 5 };
        let table = Printer {
            format: OutputFormat::Table,
        };
        let json = Printer {
            format: OutputFormat::Json,
        };
        assert_eq!(table.watch_line(&hb), None);
        assert_eq!(
            json.watch_line(&hb).as_deref(),
            Some("{\"latest_sequence\":5,\"type\":\"HEARTBEAT\"}\n")
        );
        let line = json.watch_line(&WatchItem::Snapshot(job())).unwrap();
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["type"], "SNAPSHOT");
        assert_eq!(v["job"]["state"], "running");
    }

    #[test]
    fn forecasts_for_people() {
        use Convergence::{Converging, Diverging, Stalled, Synced, Unspecified};
        assert_eq!(
            convergence_text(Converging, Some(12_000)),
            "converging, ready in ~12s"
        );
        assert_eq!(
            convergence_text(Converging, Some(185_000)),
            "converging, ready in ~3m05s"
        );
        // Under a second rounds up, not down to "0s".
        assert_eq!(
            convergence_text(Converging, Some(300)),
            "converging, ready in ~1s"
        );
        assert_eq!(convergence_text(Converging, None), "converging");
        assert_eq!(convergence_text(Stalled, None), "stalled");
        assert_eq!(convergence_text(Diverging, None), "diverging");
        assert_eq!(convergence_text(Synced, Some(0)), "synced");
        assert_eq!(convergence_text(Unspecified, None), "-");

        assert_eq!(
            convergence_cell(Converging, Some(12_000)),
            "converging ~12s"
        );
        assert_eq!(convergence_cell(Diverging, None), "diverging");
        assert_eq!(convergence_cell(Synced, Some(0)), "synced");
        assert_eq!(convergence_cell(Unspecified, None), "-");
    }

    #[test]
    fn job_show_and_list_show_the_forecast() {
        let mut j = job();
        let d = job_details(&j);
        assert!(d.lines().any(|l| l == "convergence:           -"), "{d}");
        assert!(jobs_table(&[j.clone()]).starts_with(
            "ID  SOURCE  TARGET      STATE    MODE            SYNCED  PROGRESS               \
             DIRTY  RATE   CONVERGENCE  ERROR\n"
        ));

        j.set_convergence(Convergence::Converging);
        j.eta_to_ready_ms = Some(12_000);
        let d = job_details(&j);
        assert!(
            d.lines()
                .any(|l| l.starts_with("convergence:") && l.ends_with(" converging, ready in ~12s")),
            "{d}"
        );
        let t = jobs_table(&[j]);
        let row = t.lines().nth(1).unwrap();
        assert!(row.ends_with("  converging ~12s  -"), "{row}");
    }

    #[test]
    fn job_show_prints_the_policy() {
        let mut j = job();
        let line = |d: &str, key: &str| {
            d.lines()
                .find(|l| l.starts_with(&format!("{key}:")))
                .map(|l| l[key.len() + 1..].trim().to_owned())
        };
        // Defaults, and the guards off: their details are left out.
        let d = job_details(&j);
        assert_eq!(line(&d, "auto_ready_timeout").as_deref(), Some("default"));
        assert_eq!(line(&d, "target_latency_limit").as_deref(), Some("off"));
        assert_eq!(line(&d, "target_latency_window"), None);
        assert_eq!(line(&d, "guest_throttle").as_deref(), Some("off"));
        assert_eq!(line(&d, "guest_throttle_below"), None);

        let spec = j.spec.as_mut().unwrap();
        spec.auto_ready_timeout_ms = 60_000;
        spec.auto_diverging_window_ms = 2_500;
        spec.auto_min_dwell_ms = 500;
        spec.target_latency_limit_ms = 40;
        spec.target_latency_window_ms = 2_000;
        spec.guest_throttle_bytes_per_sec = 20 << 20;
        spec.guest_throttle_below_bytes = 64 << 20;
        let d = job_details(&j);
        assert_eq!(line(&d, "auto_ready_timeout").as_deref(), Some("60 s"));
        assert_eq!(line(&d, "auto_diverging_window").as_deref(), Some("2.5 s"));
        assert_eq!(line(&d, "auto_min_dwell").as_deref(), Some("500 ms"));
        assert_eq!(line(&d, "target_latency_limit").as_deref(), Some("40 ms"));
        assert_eq!(line(&d, "target_latency_window").as_deref(), Some("2 s"));
        assert_eq!(line(&d, "guest_throttle").as_deref(), Some("20 MiB/s"));
        assert_eq!(line(&d, "guest_throttle_below").as_deref(), Some("64 MiB"));
    }

    #[test]
    fn progress_lines_show_the_forecast() {
        let mut ev = Event {
            sequence: 9,
            job_id: "j1".into(),
            current_progress_bytes: 1 << 20,
            total_progress_bytes: 4 << 20,
            dirty_bytes: 3 << 20,
            copy_rate_bytes_per_sec: 1 << 20,
            ..Event::default()
        };
        ev.set_type(EventType::Progress);
        let plain = "-  #9  j1  PROGRESS  copied 1 MiB/4 MiB (25.0%), dirty 3 MiB, \
                     copy 1 MiB/s, dirtying 0 B/s";
        // No forecast (an older server): the line as before.
        assert_eq!(event_line(&ev), plain);
        ev.set_convergence(Convergence::Converging);
        ev.eta_to_ready_ms = Some(3_000);
        assert_eq!(
            event_line(&ev),
            format!("{plain}, converging, ready in ~3s")
        );
        let snap = watch_item_line(&WatchItem::Snapshot(job())).unwrap();
        assert!(snap.ends_with("dirty 4 MiB"), "{snap}");
    }

    #[test]
    fn durations_and_etas() {
        assert_eq!(format_millis(0), "0 ms");
        assert_eq!(format_millis(999), "999 ms");
        assert_eq!(format_millis(1_000), "1 s");
        assert_eq!(format_millis(1_250), "1.25 s");
        assert_eq!(format_millis(90_001), "90.001 s");
        assert_eq!(format_eta(5), "5s");
        assert_eq!(format_eta(185), "3m05s");
        assert_eq!(format_eta(7620), "2h07m");
    }

    #[test]
    fn micros() {
        assert_eq!(format_micros(850), "850 us");
        assert_eq!(format_micros(1_200_000), "1.20 s");
    }

    #[test]
    fn write_latency_lines() {
        assert_eq!(latency_text(None), "-");
        let p = LatencyPercentiles {
            count: 3,
            p50_us: 120,
            p99_us: 2_100,
        };
        assert_eq!(latency_text(Some(&p)), "p50 120 us, p99 2.1 ms (3 writes)");
        let mut job = job();
        job.write_latency = Some(Box::new(blockmirror_client::proto::WriteLatency {
            guest: Some(p),
            ..Default::default()
        }));
        let text = job_details(&job);
        assert!(text.contains("write_latency_guest"), "{text}");
        assert!(text.contains("p99 2.1 ms"), "{text}");
    }
}

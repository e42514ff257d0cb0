//! The engine's observer: every record feeds the metrics (when a reader
//! exists) and, for the writes the sampler picks, a span (when traces are
//! exported).

use super::metrics::WriteMetrics;
use super::spans::SpanRecorder;
use blockmirror_engine::observe::{CopyOp, GuestWrite, IoObserver, JobStarted, JobStatusChange};

/// Spans and metrics from engine records; either part may be off.
#[derive(Debug)]
pub struct TelemetryObserver {
    /// Set while traces are exported.
    pub spans: Option<SpanRecorder>,
    /// Set while metrics are exported or served.
    pub metrics: Option<WriteMetrics>,
}

impl IoObserver for TelemetryObserver {
    fn guest_write(&self, write: &GuestWrite<'_>) {
        if let Some(m) = &self.metrics {
            m.guest_write(write);
        }
        if let Some(s) = &self.spans {
            s.guest_write(write);
        }
    }

    fn copy(&self, copy: &CopyOp<'_>) {
        if let Some(m) = &self.metrics {
            m.copy(copy);
        }
        if let Some(s) = &self.spans {
            s.copy(copy);
        }
    }

    fn job_started(&self, job: &JobStarted<'_>) {
        tracing::debug!(job_id = job.job_id, volume = job.volume, "job observed");
        if let Some(s) = &self.spans {
            s.job_started(job);
        }
    }

    fn job_status(&self, change: &JobStatusChange<'_>) {
        if let Some(s) = &self.spans {
            s.job_status(change);
        }
    }
}

//! [`JobClient`]: typed calls of `blockmirror.v1.JobService` (all but the
//! event stream, which is [`crate::watch`]).
//!
//! Mutating calls return as soon as the engine has recorded the request;
//! to wait for an outcome use [`crate::Client::wait_for_job`].

use std::time::Duration;

use crate::trace::TracedChannel;
use blockmirror_proto::v1::{
    CancelJobRequest, ChangeJobRequest, CopyMode, GetJobRequest, Job, JobRequest, JobState,
    ListJobsRequest, MirrorSpec, SetJobSpeedRequest, StartMirrorRequest, WaitJobRequest,
    job_service_client::JobServiceClient,
};

use crate::error::ClientError;

/// Calls of the job service.
#[derive(Debug, Clone)]
pub struct JobClient {
    /// The generated stub; cloned per call because its methods take `&mut`.
    inner: JobServiceClient<TracedChannel>,
}

impl JobClient {
    pub(crate) fn new(channel: TracedChannel) -> Self {
        Self {
            inner: JobServiceClient::new(channel),
        }
    }

    /// Starts a mirror job. Idempotent: the same `job_id` with the same
    /// spec returns the existing job.
    ///
    /// # Errors
    ///
    /// `ALREADY_EXISTS` for the same id with another spec,
    /// `INVALID_ARGUMENT`, `NOT_FOUND` for a missing source volume.
    pub async fn start_mirror(&self, job_id: &str, spec: MirrorSpec) -> Result<Job, ClientError> {
        let req = StartMirrorRequest {
            job_id: job_id.to_owned(),
            spec: Some(spec),
        };
        Ok(self.inner.clone().start_mirror(req).await?.into_inner())
    }

    /// One job by id.
    ///
    /// # Errors
    ///
    /// `NOT_FOUND` if there is no such job (or it was dismissed).
    pub async fn get(&self, job_id: &str) -> Result<Job, ClientError> {
        let req = GetJobRequest {
            job_id: job_id.to_owned(),
        };
        Ok(self.inner.clone().get_job(req).await?.into_inner())
    }

    /// All jobs.
    ///
    /// # Errors
    ///
    /// The server's status.
    pub async fn list(&self) -> Result<Vec<Job>, ClientError> {
        let resp = self.inner.clone().list_jobs(ListJobsRequest {}).await?;
        Ok(resp.into_inner().jobs)
    }

    /// running → paused, ready → standby.
    ///
    /// # Errors
    ///
    /// `FAILED_PRECONDITION` in another state.
    pub async fn pause(&self, job_id: &str) -> Result<Job, ClientError> {
        Ok(self
            .inner
            .clone()
            .pause_job(job_req(job_id))
            .await?
            .into_inner())
    }

    /// paused → running, standby → ready.
    ///
    /// # Errors
    ///
    /// `FAILED_PRECONDITION` in another state.
    pub async fn resume(&self, job_id: &str) -> Result<Job, ClientError> {
        Ok(self
            .inner
            .clone()
            .resume_job(job_req(job_id))
            .await?
            .into_inner())
    }

    /// Sets the copy rate limit in bytes per second (0 = unlimited).
    ///
    /// # Errors
    ///
    /// The server's status.
    pub async fn set_speed(&self, job_id: &str, bytes_per_sec: u64) -> Result<Job, ClientError> {
        let req = SetJobSpeedRequest {
            job_id: job_id.to_owned(),
            speed_bytes_per_sec: bytes_per_sec,
        };
        Ok(self.inner.clone().set_job_speed(req).await?.into_inner())
    }

    /// Switches the copy mode of a live job, in either direction.
    ///
    /// # Errors
    ///
    /// The server's status.
    pub async fn change_mode(&self, job_id: &str, mode: CopyMode) -> Result<Job, ClientError> {
        let req = ChangeJobRequest {
            job_id: job_id.to_owned(),
            copy_mode: mode.into(),
        };
        Ok(self.inner.clone().change_job(req).await?.into_inner())
    }

    /// Asks a ready job to converge and pivot the source volume to the
    /// target. Returns at once; the job moves through waiting and pending
    /// to concluded.
    ///
    /// # Errors
    ///
    /// `FAILED_PRECONDITION` unless the job is ready.
    pub async fn complete(&self, job_id: &str) -> Result<Job, ClientError> {
        Ok(self
            .inner
            .clone()
            .complete_job(job_req(job_id))
            .await?
            .into_inner())
    }

    /// Cancels a job; in ready state this keeps the target as a consistent
    /// copy without pivoting.
    ///
    /// # Errors
    ///
    /// The server's status.
    pub async fn cancel(&self, job_id: &str, force: bool) -> Result<Job, ClientError> {
        let req = CancelJobRequest {
            job_id: job_id.to_owned(),
            force,
        };
        Ok(self.inner.clone().cancel_job(req).await?.into_inner())
    }

    /// pending → concluded, for jobs started without auto-finalize.
    ///
    /// # Errors
    ///
    /// `FAILED_PRECONDITION` in another state.
    pub async fn finalize(&self, job_id: &str) -> Result<Job, ClientError> {
        Ok(self
            .inner
            .clone()
            .finalize_job(job_req(job_id))
            .await?
            .into_inner())
    }

    /// concluded → null, for jobs started without auto-dismiss.
    ///
    /// # Errors
    ///
    /// `FAILED_PRECONDITION` in another state.
    pub async fn dismiss(&self, job_id: &str) -> Result<Job, ClientError> {
        Ok(self
            .inner
            .clone()
            .dismiss_job(job_req(job_id))
            .await?
            .into_inner())
    }

    /// One long poll: returns when the job is in one of `until`, or after
    /// `timeout` (the server caps it at 300 s; zero means its default of
    /// 30 s) with the job as it is then. Check the returned state.
    ///
    /// # Errors
    ///
    /// `NOT_FOUND` if the job does not exist (any more).
    pub async fn wait_job(
        &self,
        job_id: &str,
        until: &[JobState],
        timeout: Duration,
    ) -> Result<Job, ClientError> {
        let req = WaitJobRequest {
            job_id: job_id.to_owned(),
            until: until.iter().map(|s| i32::from(*s)).collect(),
            timeout_ms: timeout_ms(timeout),
        };
        Ok(self.inner.clone().wait_job(req).await?.into_inner())
    }
}

/// `timeout` in the proto's milliseconds: zero stays zero (the server's
/// default), anything else is at least 1 ms, and anything past `u64`
/// milliseconds saturates (the server caps it anyway).
fn timeout_ms(timeout: Duration) -> u64 {
    if timeout.is_zero() {
        0
    } else {
        u64::try_from(timeout.as_millis())
            .unwrap_or(u64::MAX)
            .max(1)
    }
}

fn job_req(job_id: &str) -> JobRequest {
    JobRequest {
        job_id: job_id.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_in_milliseconds() {
        assert_eq!(timeout_ms(Duration::ZERO), 0);
        assert_eq!(timeout_ms(Duration::from_micros(10)), 1);
        assert_eq!(timeout_ms(Duration::from_secs(2)), 2000);
        assert_eq!(timeout_ms(Duration::MAX), u64::MAX);
    }
}

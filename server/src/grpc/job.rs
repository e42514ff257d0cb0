//! JobService, including the WatchEvents stream.

use super::convert;
use super::status::{IntoStatus, to_status};
use blockmirror_engine::Engine;
use blockmirror_engine::events::Event;
use blockmirror_proto::v1::{self, job_service_server::JobService, watch_events_response::Kind};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

/// WaitJob's timeout when none is given, and its cap.
const WAIT_DEFAULT: Duration = Duration::from_secs(30);
const WAIT_MAX: Duration = Duration::from_secs(300);
/// Messages buffered per watcher before the stream applies backpressure.
const WATCH_BUFFER: usize = 64;

/// JobService over the engine.
#[derive(Debug)]
pub struct JobApi {
    /// The engine.
    pub engine: Arc<Engine>,
    /// Heartbeat period of WatchEvents.
    pub heartbeat: Duration,
}

type Reply = Result<Response<v1::Job>, Status>;

fn reply(r: blockmirror_engine::Result<blockmirror_engine::JobInfo>) -> Reply {
    r.status().map(|j| Response::new(convert::job(j)))
}

fn required<'a>(field: &str, value: &'a str) -> Result<&'a str, Status> {
    if value.is_empty() {
        Err(Status::invalid_argument(format!("{field} is required")))
    } else {
        Ok(value)
    }
}

impl JobApi {
    /// Runs a job verb (it saves the job's record) off the runtime threads.
    async fn verb(
        &self,
        f: impl FnOnce(&Engine) -> blockmirror_engine::Result<blockmirror_engine::JobInfo>
        + Send
        + 'static,
    ) -> Reply {
        super::off_runtime(&self.engine, f)
            .await
            .map(|j| Response::new(convert::job(j)))
    }
}

#[tonic::async_trait]
impl JobService for JobApi {
    async fn start_mirror(&self, req: Request<v1::StartMirrorRequest>) -> Reply {
        let r = req.into_inner();
        let id = required("job_id", &r.job_id)?;
        let spec = r
            .spec
            .ok_or_else(|| Status::invalid_argument("spec is required"))?;
        let spec = convert::spec_in(spec)?;
        reply(self.engine.start_mirror(id, spec).await)
    }

    async fn get_job(&self, req: Request<v1::GetJobRequest>) -> Reply {
        reply(
            self.engine
                .get_job(required("job_id", &req.into_inner().job_id)?),
        )
    }

    async fn list_jobs(
        &self,
        _req: Request<v1::ListJobsRequest>,
    ) -> Result<Response<v1::ListJobsResponse>, Status> {
        let jobs = self
            .engine
            .list_jobs()
            .into_iter()
            .map(convert::job)
            .collect();
        Ok(Response::new(v1::ListJobsResponse { jobs }))
    }

    async fn pause_job(&self, req: Request<v1::JobRequest>) -> Reply {
        let id = required("job_id", &req.into_inner().job_id)?.to_owned();
        self.verb(move |e| e.pause_job(&id)).await
    }

    async fn resume_job(&self, req: Request<v1::JobRequest>) -> Reply {
        let id = required("job_id", &req.into_inner().job_id)?.to_owned();
        self.verb(move |e| e.resume_job(&id)).await
    }

    async fn set_job_speed(&self, req: Request<v1::SetJobSpeedRequest>) -> Reply {
        let r = req.into_inner();
        let id = required("job_id", &r.job_id)?.to_owned();
        self.verb(move |e| e.set_job_speed(&id, r.speed_bytes_per_sec))
            .await
    }

    async fn change_job(&self, req: Request<v1::ChangeJobRequest>) -> Reply {
        let r = req.into_inner();
        if r.copy_mode == v1::CopyMode::Unspecified as i32 {
            return Err(Status::invalid_argument("copy_mode is required"));
        }
        let mode = convert::copy_mode_in(r.copy_mode, "copy_mode")?;
        let id = required("job_id", &r.job_id)?.to_owned();
        self.verb(move |e| e.change_job(&id, mode)).await
    }

    async fn complete_job(&self, req: Request<v1::JobRequest>) -> Reply {
        let id = required("job_id", &req.into_inner().job_id)?.to_owned();
        self.verb(move |e| e.complete_job(&id)).await
    }

    async fn cancel_job(&self, req: Request<v1::CancelJobRequest>) -> Reply {
        let r = req.into_inner();
        let id = required("job_id", &r.job_id)?.to_owned();
        self.verb(move |e| e.cancel_job(&id, r.force)).await
    }

    async fn finalize_job(&self, req: Request<v1::JobRequest>) -> Reply {
        let id = required("job_id", &req.into_inner().job_id)?.to_owned();
        self.verb(move |e| e.finalize_job(&id)).await
    }

    async fn dismiss_job(&self, req: Request<v1::JobRequest>) -> Reply {
        let id = required("job_id", &req.into_inner().job_id)?.to_owned();
        self.verb(move |e| e.dismiss_job(&id)).await
    }

    async fn wait_job(&self, req: Request<v1::WaitJobRequest>) -> Reply {
        let r = req.into_inner();
        let id = required("job_id", &r.job_id)?;
        let until = r
            .until
            .iter()
            .map(|&s| convert::job_status(s, "until"))
            .collect::<Result<Vec<_>, _>>()?;
        let timeout = match r.timeout_ms {
            0 => WAIT_DEFAULT,
            ms => Duration::from_millis(ms).min(WAIT_MAX),
        };
        reply(self.engine.wait_job(id, &until, timeout).await)
    }

    type WatchEventsStream =
        Pin<Box<dyn Stream<Item = Result<v1::WatchEventsResponse, Status>> + Send>>;

    async fn watch_events(
        &self,
        req: Request<v1::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        let r = req.into_inner();
        let sub = self
            .engine
            .events()
            .subscribe(r.after_sequence)
            .map_err(|e| to_status(&e))?;
        let filter = (!r.job_id.is_empty()).then_some(r.job_id);
        let snapshot: Vec<v1::Job> = self
            .engine
            .list_jobs()
            .into_iter()
            .filter(|j| filter.as_ref().is_none_or(|f| *f == j.id))
            .map(convert::job)
            .collect();
        let (tx, rx) = mpsc::channel(WATCH_BUFFER);
        let engine = Arc::clone(&self.engine);
        let heartbeat = self.heartbeat;
        tokio::spawn(async move {
            let matches = |e: &Event| filter.as_ref().is_none_or(|f| *f == e.job_id);
            let mut last = r.after_sequence;
            for job in snapshot {
                if tx
                    .send(Ok(v1::WatchEventsResponse {
                        kind: Some(Kind::Snapshot(job)),
                    }))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            for e in sub.replay.iter().filter(|e| matches(e)) {
                last = last.max(e.sequence);
                if tx
                    .send(Ok(v1::WatchEventsResponse {
                        kind: Some(Kind::Event(convert::event(e))),
                    }))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            let mut live = sub.live;
            let mut beat = tokio::time::interval(heartbeat);
            beat.tick().await;
            loop {
                let msg = tokio::select! {
                    () = tx.closed() => return,
                    _ = beat.tick() => v1::WatchEventsResponse {
                        kind: Some(Kind::Heartbeat(v1::Heartbeat { latest_sequence: engine.events().last_sequence() })),
                    },
                    got = live.recv() => match got {
                        Ok(e) if matches(&e) => {
                            last = last.max(e.sequence);
                            v1::WatchEventsResponse { kind: Some(Kind::Event(convert::event(&e))) }
                        }
                        Ok(_) => continue,
                        Err(broadcast::error::RecvError::Lagged(n)) => {
                            let _ = tx.send(Err(Status::data_loss(format!(
                                "watcher fell {n} events behind; watch again with after_sequence = {last}"
                            )))).await;
                            return;
                        }
                        Err(broadcast::error::RecvError::Closed) => return,
                    },
                };
                if tx.send(Ok(msg)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

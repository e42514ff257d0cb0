//! A scripted `JobService` on a real unix socket, for component tests of
//! the client without an engine (STYLE.md §5.4). Only `GetJob`, `WaitJob`
//! and `WatchEvents` do anything; the rest answer `UNIMPLEMENTED`.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use blockmirror_proto::v1::{
    CancelJobRequest, ChangeJobRequest, GetJobRequest, Heartbeat, Job, JobRequest, ListJobsRequest,
    ListJobsResponse, SetJobSpeedRequest, StartMirrorRequest, WaitJobRequest, WatchEventsRequest,
    WatchEventsResponse,
    job_service_server::{JobService, JobServiceServer},
    watch_events_response::Kind,
};
use futures::stream::{self, BoxStream, StreamExt};
use tonic::{Request, Response, Status};

use crate::client::Client;
use crate::watch::WatchItem;

/// What the mock answers.
#[derive(Debug, Default)]
pub(crate) struct Script {
    /// `GetJob` returns this; `None` is `NOT_FOUND`.
    pub(crate) job: Option<Job>,
    /// `WatchEvents` sends these, then stays open (or closes if
    /// `close_stream`); `None` answers `UNIMPLEMENTED`.
    pub(crate) stream: Option<Vec<WatchItem>>,
    /// End the stream after the scripted items.
    pub(crate) close_stream: bool,
    /// `WaitJob` replies in order; `None` or running out is `NOT_FOUND`.
    pub(crate) wait_replies: VecDeque<Option<Job>>,
    /// `after_sequence` of each `WatchEvents` call, for assertions.
    pub(crate) watch_calls: Vec<u64>,
}

#[derive(Debug, Clone)]
struct MockJobs(Arc<Mutex<Script>>);

fn unimplemented<T>() -> Result<Response<T>, Status> {
    Err(Status::unimplemented("not scripted"))
}

#[tonic::async_trait]
impl JobService for MockJobs {
    async fn start_mirror(&self, _: Request<StartMirrorRequest>) -> Result<Response<Job>, Status> {
        unimplemented()
    }

    async fn get_job(&self, _: Request<GetJobRequest>) -> Result<Response<Job>, Status> {
        let script = self.0.lock().expect("mock lock");
        script
            .job
            .clone()
            .map(Response::new)
            .ok_or_else(|| Status::not_found("no such job"))
    }

    async fn list_jobs(
        &self,
        _: Request<ListJobsRequest>,
    ) -> Result<Response<ListJobsResponse>, Status> {
        unimplemented()
    }

    async fn pause_job(&self, _: Request<JobRequest>) -> Result<Response<Job>, Status> {
        unimplemented()
    }

    async fn resume_job(&self, _: Request<JobRequest>) -> Result<Response<Job>, Status> {
        unimplemented()
    }

    async fn set_job_speed(&self, _: Request<SetJobSpeedRequest>) -> Result<Response<Job>, Status> {
        unimplemented()
    }

    async fn change_job(&self, _: Request<ChangeJobRequest>) -> Result<Response<Job>, Status> {
        unimplemented()
    }

    async fn complete_job(&self, _: Request<JobRequest>) -> Result<Response<Job>, Status> {
        unimplemented()
    }

    async fn cancel_job(&self, _: Request<CancelJobRequest>) -> Result<Response<Job>, Status> {
        unimplemented()
    }

    async fn finalize_job(&self, _: Request<JobRequest>) -> Result<Response<Job>, Status> {
        unimplemented()
    }

    async fn dismiss_job(&self, _: Request<JobRequest>) -> Result<Response<Job>, Status> {
        unimplemented()
    }

    async fn wait_job(&self, _: Request<WaitJobRequest>) -> Result<Response<Job>, Status> {
        let mut script = self.0.lock().expect("mock lock");
        script
            .wait_replies
            .pop_front()
            .flatten()
            .map(Response::new)
            .ok_or_else(|| Status::not_found("no such job"))
    }

    type WatchEventsStream = BoxStream<'static, Result<WatchEventsResponse, Status>>;

    async fn watch_events(
        &self,
        req: Request<WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        let mut script = self.0.lock().expect("mock lock");
        script.watch_calls.push(req.get_ref().after_sequence);
        let Some(items) = script.stream.clone() else {
            return unimplemented();
        };
        let items = stream::iter(items.into_iter().map(|item| {
            let kind = match item {
                WatchItem::Snapshot(job) => Kind::Snapshot(job),
                WatchItem::Event(ev) => Kind::Event(ev),
                WatchItem::Heartbeat { latest_sequence } => {
                    Kind::Heartbeat(Heartbeat { latest_sequence })
                }
            };
            Ok(WatchEventsResponse { kind: Some(kind) })
        }));
        let stream = if script.close_stream {
            items.boxed()
        } else {
            items.chain(stream::pending()).boxed()
        };
        Ok(Response::new(stream))
    }
}

/// A running mock server and a client connected to it over a unix socket.
pub(crate) struct Mock {
    pub(crate) client: Client,
    pub(crate) script: Arc<Mutex<Script>>,
    /// Holds the socket's directory until the test ends.
    _dir: tempfile::TempDir,
}

impl Mock {
    pub(crate) async fn start(script: Script) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("bm.sock");
        let listener = tokio::net::UnixListener::bind(&path).expect("bind mock socket");
        let script = Arc::new(Mutex::new(script));
        let service = JobServiceServer::new(MockJobs(Arc::clone(&script)));
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener)),
        );
        let client = Client::connect(path.to_str().expect("utf-8 temp path"))
            .await
            .expect("connect to mock");
        Self {
            client,
            script,
            _dir: dir,
        }
    }
}

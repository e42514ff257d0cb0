//! DataService: guest I/O over gRPC, through the same write path as NBD.

use super::admission::AdmittedPayload;
use super::status::IntoStatus;
use blockmirror_engine::Engine;
use blockmirror_proto::v1::{self, data_service_server::DataService};
use opentelemetry::context::FutureExt as _;
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// Runs a guest write, flush or discard on its own task and waits for it.
///
/// tonic drops a handler's future when the client goes away (a deadline,
/// a cancel). A write dropped halfway would release its range lock and the
/// pivot gate while its I/O still runs, so a later overlapping write could
/// reach source and target in another order and leave a clean chunk that
/// differs. A spawned task is not cancelled with its handle: the operation
/// always runs to the end, as NBD requests (spawned too) do.
async fn to_completion<T: Send + 'static>(
    op: impl std::future::Future<Output = blockmirror_engine::Result<T>> + Send + 'static,
) -> Result<T, Status> {
    // The task carries the RPC's trace context, so the write's span stays
    // the child of the call's span.
    let cx = opentelemetry::Context::current();
    match tokio::spawn(op.with_context(cx)).await {
        Ok(r) => r.status(),
        Err(e) => Err(Status::internal(format!("guest I/O task failed: {e}"))),
    }
}

/// DataService over the engine.
#[derive(Debug)]
pub struct DataApi {
    /// The engine.
    pub engine: Arc<Engine>,
}

#[tonic::async_trait]
impl DataService for DataApi {
    async fn read(
        &self,
        req: Request<v1::ReadRequest>,
    ) -> Result<Response<v1::ReadResponse>, Status> {
        let r = req.into_inner();
        let v = self.engine.volume(&r.volume).status()?;
        let data = v.read(r.offset_bytes, r.length_bytes).await.status()?;
        Ok(Response::new(v1::ReadResponse { data }))
    }

    async fn write(
        &self,
        req: Request<v1::WriteRequest>,
    ) -> Result<Response<v1::WriteResponse>, Status> {
        // The payload's share of the admission budget stays taken while
        // the write runs, even if the client gives up first.
        let admitted = req.extensions().get::<AdmittedPayload>().cloned();
        let r = req.into_inner();
        let v = self.engine.volume(&r.volume).status()?;
        to_completion(async move {
            let _admitted = admitted;
            v.write(r.offset_bytes, r.data, r.fua).await
        })
        .await?;
        Ok(Response::new(v1::WriteResponse {}))
    }

    async fn flush(
        &self,
        req: Request<v1::FlushRequest>,
    ) -> Result<Response<v1::FlushResponse>, Status> {
        let v = self.engine.volume(&req.into_inner().volume).status()?;
        to_completion(async move { v.flush().await }).await?;
        Ok(Response::new(v1::FlushResponse {}))
    }

    async fn discard(
        &self,
        req: Request<v1::DiscardRequest>,
    ) -> Result<Response<v1::DiscardResponse>, Status> {
        let r = req.into_inner();
        let v = self.engine.volume(&r.volume).status()?;
        to_completion(async move { v.discard(r.offset_bytes, r.length_bytes, false).await })
            .await?;
        Ok(Response::new(v1::DiscardResponse {}))
    }

    async fn write_zeroes(
        &self,
        req: Request<v1::WriteZeroesRequest>,
    ) -> Result<Response<v1::WriteZeroesResponse>, Status> {
        let r = req.into_inner();
        let v = self.engine.volume(&r.volume).status()?;
        to_completion(async move {
            v.write_zeroes(r.offset_bytes, r.length_bytes, r.no_hole, false)
                .await
        })
        .await?;
        Ok(Response::new(v1::WriteZeroesResponse {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    #[tokio::test]
    async fn an_operation_outlives_a_caller_that_gives_up() {
        let done = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&done);
        let op = async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            flag.store(true, Ordering::SeqCst);
            Ok(())
        };
        // The caller's future is dropped (as tonic drops a handler's future
        // when the client's deadline passes) long before the operation ends.
        let gave_up = tokio::time::timeout(Duration::from_millis(10), to_completion(op)).await;
        assert!(gave_up.is_err());
        assert!(!done.load(Ordering::SeqCst));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            done.load(Ordering::SeqCst),
            "the operation was cancelled with its caller"
        );
    }

    #[tokio::test]
    async fn errors_come_back_as_statuses() {
        let r: Result<(), Status> = to_completion(async {
            Err(blockmirror_engine::EngineError::invalid(
                "offset past the end",
            ))
        })
        .await;
        let s = r.unwrap_err();
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
        assert!(s.message().contains("offset past the end"), "{s:?}");
    }
}

//! DataService: guest I/O over gRPC, through the same write path as NBD.

use super::status::IntoStatus;
use blockmirror_engine::Engine;
use blockmirror_proto::v1::{self, data_service_server::DataService};
use std::sync::Arc;
use tonic::{Request, Response, Status};

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
        let r = req.into_inner();
        let v = self.engine.volume(&r.volume).status()?;
        v.write(r.offset_bytes, r.data, r.fua).await.status()?;
        Ok(Response::new(v1::WriteResponse {}))
    }

    async fn flush(
        &self,
        req: Request<v1::FlushRequest>,
    ) -> Result<Response<v1::FlushResponse>, Status> {
        let v = self.engine.volume(&req.into_inner().volume).status()?;
        v.flush().await.status()?;
        Ok(Response::new(v1::FlushResponse {}))
    }

    async fn discard(
        &self,
        req: Request<v1::DiscardRequest>,
    ) -> Result<Response<v1::DiscardResponse>, Status> {
        let r = req.into_inner();
        let v = self.engine.volume(&r.volume).status()?;
        v.discard(r.offset_bytes, r.length_bytes).await.status()?;
        Ok(Response::new(v1::DiscardResponse {}))
    }

    async fn write_zeroes(
        &self,
        req: Request<v1::WriteZeroesRequest>,
    ) -> Result<Response<v1::WriteZeroesResponse>, Status> {
        let r = req.into_inner();
        let v = self.engine.volume(&r.volume).status()?;
        v.write_zeroes(r.offset_bytes, r.length_bytes, r.no_hole, false)
            .await
            .status()?;
        Ok(Response::new(v1::WriteZeroesResponse {}))
    }
}

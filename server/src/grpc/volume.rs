//! VolumeService.

use super::status::IntoStatus;
use super::{convert, off_runtime};
use blockmirror_engine::Engine;
use blockmirror_engine::throttle::RateLimits;
use blockmirror_proto::v1::{self, volume_service_server::VolumeService};
use std::path::Path;
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// VolumeService over the engine.
#[derive(Debug)]
pub struct VolumeApi {
    /// The engine.
    pub engine: Arc<Engine>,
}

#[tonic::async_trait]
impl VolumeService for VolumeApi {
    async fn create_volume(
        &self,
        req: Request<v1::CreateVolumeRequest>,
    ) -> Result<Response<v1::Volume>, Status> {
        let r = req.into_inner();
        let v = off_runtime(&self.engine, move |e| {
            let path = (!r.path.is_empty()).then(|| Path::new(&r.path));
            e.create_volume(&r.name, r.size_bytes, path)
        })
        .await?;
        Ok(Response::new(convert::volume(v)))
    }

    async fn attach_volume(
        &self,
        req: Request<v1::AttachVolumeRequest>,
    ) -> Result<Response<v1::Volume>, Status> {
        let r = req.into_inner();
        let v = match (r.path.is_empty(), r.uri.is_empty()) {
            (_, true) => {
                off_runtime(&self.engine, move |e| {
                    e.attach_volume(&r.name, Path::new(&r.path), r.direct_io)
                })
                .await?
            }
            (true, false) if r.direct_io => {
                return Err(Status::invalid_argument(
                    "direct_io applies to files, not NBD URIs",
                ));
            }
            (true, false) => self
                .engine
                .attach_nbd_volume(&r.name, &r.uri)
                .await
                .status()?,
            (false, false) => {
                return Err(Status::invalid_argument(
                    "give either path or uri, not both",
                ));
            }
        };
        Ok(Response::new(convert::volume(v)))
    }

    async fn get_volume(
        &self,
        req: Request<v1::GetVolumeRequest>,
    ) -> Result<Response<v1::Volume>, Status> {
        let v = self.engine.get_volume(&req.into_inner().name).status()?;
        Ok(Response::new(convert::volume(v)))
    }

    async fn list_volumes(
        &self,
        _req: Request<v1::ListVolumesRequest>,
    ) -> Result<Response<v1::ListVolumesResponse>, Status> {
        let volumes = self
            .engine
            .list_volumes()
            .into_iter()
            .map(convert::volume)
            .collect();
        Ok(Response::new(v1::ListVolumesResponse { volumes }))
    }

    async fn delete_volume(
        &self,
        req: Request<v1::DeleteVolumeRequest>,
    ) -> Result<Response<v1::DeleteVolumeResponse>, Status> {
        let name = req.into_inner().name;
        off_runtime(&self.engine, move |e| e.delete_volume(&name)).await?;
        Ok(Response::new(v1::DeleteVolumeResponse {}))
    }

    async fn set_volume_limits(
        &self,
        req: Request<v1::SetVolumeLimitsRequest>,
    ) -> Result<Response<v1::Volume>, Status> {
        let r = req.into_inner();
        let l = r.limits.unwrap_or_default();
        let limits = RateLimits {
            bytes_per_sec: l.write_bytes_per_sec,
            ops_per_sec: l.write_iops,
        };
        let v = off_runtime(&self.engine, move |e| e.set_volume_limits(&r.name, limits)).await?;
        Ok(Response::new(convert::volume(v)))
    }

    async fn add_export(
        &self,
        req: Request<v1::AddExportRequest>,
    ) -> Result<Response<v1::Export>, Status> {
        let r = req.into_inner();
        let e = off_runtime(&self.engine, move |e| {
            let name = (!r.name.is_empty()).then_some(r.name.as_str());
            e.add_export(&r.volume, name, r.read_only)
        })
        .await?;
        Ok(Response::new(convert::export(e)))
    }

    async fn list_exports(
        &self,
        _req: Request<v1::ListExportsRequest>,
    ) -> Result<Response<v1::ListExportsResponse>, Status> {
        let exports = self
            .engine
            .list_exports()
            .into_iter()
            .map(convert::export)
            .collect();
        Ok(Response::new(v1::ListExportsResponse { exports }))
    }

    async fn remove_export(
        &self,
        req: Request<v1::RemoveExportRequest>,
    ) -> Result<Response<v1::RemoveExportResponse>, Status> {
        let name = req.into_inner().name;
        off_runtime(&self.engine, move |e| e.remove_export(&name)).await?;
        Ok(Response::new(v1::RemoveExportResponse {}))
    }
}

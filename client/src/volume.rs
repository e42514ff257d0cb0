//! [`VolumeClient`]: typed calls of `blockmirror.v1.VolumeService`:
//! volumes, their write limits, and their NBD exports.

use crate::trace::TracedChannel;
use blockmirror_proto::v1::{
    AddExportRequest, AttachVolumeRequest, CreateVolumeRequest, DeleteVolumeRequest, Export,
    GetVolumeRequest, IoLimits, ListExportsRequest, ListVolumesRequest, RemoveExportRequest,
    SetVolumeLimitsRequest, Volume, volume_service_client::VolumeServiceClient,
};

use crate::error::ClientError;

/// Calls of the volume service.
#[derive(Debug, Clone)]
pub struct VolumeClient {
    /// The generated stub; cloned per call because its methods take `&mut`.
    inner: VolumeServiceClient<TracedChannel>,
}

/// New write limits for a volume; a `None` field keeps the current value.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LimitsUpdate {
    /// Write bytes per second, 0 = unlimited.
    pub write_bytes_per_sec: Option<u64>,
    /// Write operations per second, 0 = unlimited.
    pub write_iops: Option<u64>,
}

impl VolumeClient {
    pub(crate) fn new(channel: TracedChannel) -> Self {
        Self {
            inner: VolumeServiceClient::new(channel),
        }
    }

    /// Creates a new sparse raw file of `size_bytes` and registers it as
    /// volume `name`. `path = None` lets the server choose
    /// (`STATE_DIR/volumes/NAME.raw`).
    ///
    /// # Errors
    ///
    /// The server's status, e.g. `ALREADY_EXISTS` or `INVALID_ARGUMENT`.
    pub async fn create(
        &self,
        name: &str,
        size_bytes: u64,
        path: Option<&str>,
    ) -> Result<Volume, ClientError> {
        let req = CreateVolumeRequest {
            name: name.to_owned(),
            size_bytes,
            path: path.unwrap_or_default().to_owned(),
        };
        Ok(self.inner.clone().create_volume(req).await?.into_inner())
    }

    /// Registers an existing file or block device at `path` as volume
    /// `name`, opened with `O_DIRECT` if `direct_io`.
    ///
    /// # Errors
    ///
    /// The server's status.
    pub async fn attach(
        &self,
        name: &str,
        path: &str,
        direct_io: bool,
    ) -> Result<Volume, ClientError> {
        let req = AttachVolumeRequest {
            name: name.to_owned(),
            path: path.to_owned(),
            direct_io,
            uri: String::new(),
        };
        Ok(self.inner.clone().attach_volume(req).await?.into_inner())
    }

    /// Registers a remote NBD export as volume `name`: `uri` is
    /// `nbd://HOST[:PORT]/EXPORT` or `nbd+unix:///EXPORT?socket=PATH` (the
    /// socket path as the server sees it). The server checks the URI and
    /// connects to it.
    ///
    /// # Errors
    ///
    /// The server's status, e.g. `INVALID_ARGUMENT` for a malformed or
    /// unsupported URI.
    pub async fn attach_uri(&self, name: &str, uri: &str) -> Result<Volume, ClientError> {
        let req = AttachVolumeRequest {
            name: name.to_owned(),
            path: String::new(),
            direct_io: false,
            uri: uri.to_owned(),
        };
        Ok(self.inner.clone().attach_volume(req).await?.into_inner())
    }

    /// One volume by name.
    ///
    /// # Errors
    ///
    /// `NOT_FOUND` if there is no such volume.
    pub async fn get(&self, name: &str) -> Result<Volume, ClientError> {
        let req = GetVolumeRequest {
            name: name.to_owned(),
        };
        Ok(self.inner.clone().get_volume(req).await?.into_inner())
    }

    /// All volumes.
    ///
    /// # Errors
    ///
    /// The server's status.
    pub async fn list(&self) -> Result<Vec<Volume>, ClientError> {
        let resp = self
            .inner
            .clone()
            .list_volumes(ListVolumesRequest {})
            .await?;
        Ok(resp.into_inner().volumes)
    }

    /// Forgets a volume; its file stays.
    ///
    /// # Errors
    ///
    /// `NOT_FOUND`, or `FAILED_PRECONDITION` while a job uses the volume.
    pub async fn delete(&self, name: &str) -> Result<(), ClientError> {
        let req = DeleteVolumeRequest {
            name: name.to_owned(),
        };
        self.inner.clone().delete_volume(req).await?;
        Ok(())
    }

    /// Replaces the volume's write limits (0 = unlimited).
    ///
    /// # Errors
    ///
    /// The server's status.
    pub async fn set_limits(&self, name: &str, limits: IoLimits) -> Result<Volume, ClientError> {
        let req = SetVolumeLimitsRequest {
            name: name.to_owned(),
            limits: Some(limits),
        };
        Ok(self
            .inner
            .clone()
            .set_volume_limits(req)
            .await?
            .into_inner())
    }

    /// Changes only the limits given in `update`, keeping the others. The
    /// proto replaces both limits at once, so this reads the volume first;
    /// two concurrent updates of different limits can race.
    ///
    /// # Errors
    ///
    /// The server's status from the read or the update.
    pub async fn update_limits(
        &self,
        name: &str,
        update: LimitsUpdate,
    ) -> Result<Volume, ClientError> {
        let current = if update.write_bytes_per_sec.is_some() && update.write_iops.is_some() {
            IoLimits::default()
        } else {
            self.get(name).await?.limits.unwrap_or_default()
        };
        let limits = IoLimits {
            write_bytes_per_sec: update
                .write_bytes_per_sec
                .unwrap_or(current.write_bytes_per_sec),
            write_iops: update.write_iops.unwrap_or(current.write_iops),
        };
        self.set_limits(name, limits).await
    }

    /// Exports `volume` over NBD as `name` (`None`: the volume's name),
    /// read-only if `read_only`. Idempotent: the same volume, name and
    /// `read_only` again return the existing export.
    ///
    /// Clients reach it through the server's NBD listener:
    /// `nbd+unix:///NAME?socket=STATE_DIR/nbd.sock` by default.
    ///
    /// # Errors
    ///
    /// The server's status, e.g. `NOT_FOUND` for an unknown volume or
    /// `ALREADY_EXISTS` if the name is taken by a different export (another
    /// volume, or the other `read_only`).
    pub async fn add_export(
        &self,
        volume: &str,
        name: Option<&str>,
        read_only: bool,
    ) -> Result<Export, ClientError> {
        let req = AddExportRequest {
            volume: volume.to_owned(),
            name: name.unwrap_or_default().to_owned(),
            read_only,
        };
        Ok(self.inner.clone().add_export(req).await?.into_inner())
    }

    /// All NBD exports.
    ///
    /// # Errors
    ///
    /// The server's status.
    pub async fn list_exports(&self) -> Result<Vec<Export>, ClientError> {
        let resp = self
            .inner
            .clone()
            .list_exports(ListExportsRequest {})
            .await?;
        Ok(resp.into_inner().exports)
    }

    /// Removes an NBD export: new connections are refused, open ones finish
    /// the requests they have in flight.
    ///
    /// # Errors
    ///
    /// The server's status, e.g. `NOT_FOUND`.
    pub async fn remove_export(&self, name: &str) -> Result<(), ClientError> {
        let req = RemoveExportRequest {
            name: name.to_owned(),
        };
        self.inner.clone().remove_export(req).await?;
        Ok(())
    }
}

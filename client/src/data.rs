//! [`DataClient`]: typed calls of `blockmirror.v1.DataService`, guest I/O
//! through the engine's write path.
//!
//! gRPC messages are limited in size (tonic's default is 4 MiB), so
//! [`DataClient::read`] and [`DataClient::write`] split large ranges into
//! requests of at most [`MAX_REQUEST_BYTES`]. Each request is atomic on its
//! own; a split read or write as a whole is not.

use crate::trace::TracedChannel;
use blockmirror_proto::v1::{
    DiscardRequest, FlushRequest, ReadRequest, WriteRequest, WriteZeroesRequest,
    data_service_client::DataServiceClient,
};
use bytes::Bytes;

use crate::error::ClientError;

/// The largest read or write sent in one request: well under tonic's
/// default 4 MiB message limit on both sides.
pub const MAX_REQUEST_BYTES: u64 = 1 << 20;

/// Calls of the data service.
#[derive(Debug, Clone)]
pub struct DataClient {
    /// The generated stub; cloned per call because its methods take `&mut`.
    inner: DataServiceClient<TracedChannel>,
}

impl DataClient {
    pub(crate) fn new(channel: TracedChannel) -> Self {
        Self {
            inner: DataServiceClient::new(channel),
        }
    }

    /// Reads `length` bytes at `offset`, in requests of at most
    /// [`MAX_REQUEST_BYTES`].
    ///
    /// # Errors
    ///
    /// The server's status (e.g. `OUT_OF_RANGE` past the end), or
    /// [`ClientError::MalformedReply`] if the server returns fewer or more
    /// bytes than asked for.
    pub async fn read(
        &self,
        volume: &str,
        offset: u64,
        length: u64,
    ) -> Result<Vec<u8>, ClientError> {
        let capacity = usize::try_from(length.min(MAX_REQUEST_BYTES * 16)).unwrap_or(0);
        let mut out = Vec::with_capacity(capacity);
        let mut done = 0u64;
        while done < length {
            let n = (length - done).min(MAX_REQUEST_BYTES);
            let chunk = self
                .read_once(volume, offset.saturating_add(done), n)
                .await?;
            out.extend_from_slice(&chunk);
            done += n;
        }
        Ok(out)
    }

    /// One read request of `length` bytes (no splitting).
    ///
    /// # Errors
    ///
    /// As [`DataClient::read`].
    pub async fn read_once(
        &self,
        volume: &str,
        offset: u64,
        length: u64,
    ) -> Result<Bytes, ClientError> {
        let req = ReadRequest {
            volume: volume.to_owned(),
            offset_bytes: offset,
            length_bytes: length,
        };
        let data = self.inner.clone().read(req).await?.into_inner().data;
        if u64::try_from(data.len()).ok() != Some(length) {
            return Err(ClientError::MalformedReply {
                what: "read returned a different number of bytes than requested",
            });
        }
        Ok(data)
    }

    /// Writes `data` at `offset`, in requests of at most
    /// [`MAX_REQUEST_BYTES`] (slices of one buffer, no copies). With
    /// `fua`, each request is durable when it returns.
    ///
    /// # Errors
    ///
    /// The server's status; the bytes before the failing request were
    /// written.
    pub async fn write(
        &self,
        volume: &str,
        offset: u64,
        data: impl Into<Bytes>,
        fua: bool,
    ) -> Result<(), ClientError> {
        let data: Bytes = data.into();
        // MAX_REQUEST_BYTES is 1 MiB, which fits any usize we run on.
        let step = usize::try_from(MAX_REQUEST_BYTES).unwrap_or(usize::MAX);
        let mut start = 0usize;
        while start < data.len() {
            let end = data.len().min(start.saturating_add(step));
            let req = WriteRequest {
                volume: volume.to_owned(),
                // usize always fits u64 on the targets we support.
                offset_bytes: offset.saturating_add(u64::try_from(start).unwrap_or(u64::MAX)),
                data: data.slice(start..end),
                fua,
            };
            self.inner.clone().write(req).await?;
            start = end;
        }
        Ok(())
    }

    /// Makes everything written so far durable (on the target too, for a
    /// write-blocking job).
    ///
    /// # Errors
    ///
    /// The server's status.
    pub async fn flush(&self, volume: &str) -> Result<(), ClientError> {
        let req = FlushRequest {
            volume: volume.to_owned(),
        };
        self.inner.clone().flush(req).await?;
        Ok(())
    }

    /// Discards (trims) a range.
    ///
    /// # Errors
    ///
    /// The server's status.
    pub async fn discard(&self, volume: &str, offset: u64, length: u64) -> Result<(), ClientError> {
        let req = DiscardRequest {
            volume: volume.to_owned(),
            offset_bytes: offset,
            length_bytes: length,
        };
        self.inner.clone().discard(req).await?;
        Ok(())
    }

    /// Writes zeroes over a range; with `no_hole` the range stays
    /// allocated on the backend.
    ///
    /// # Errors
    ///
    /// The server's status.
    pub async fn write_zeroes(
        &self,
        volume: &str,
        offset: u64,
        length: u64,
        no_hole: bool,
    ) -> Result<(), ClientError> {
        let req = WriteZeroesRequest {
            volume: volume.to_owned(),
            offset_bytes: offset,
            length_bytes: length,
            no_hole,
        };
        self.inner.clone().write_zeroes(req).await?;
        Ok(())
    }
}

//! [`WatchClient`]: the job event stream (`JobService.WatchEvents`).
//!
//! The server first sends a snapshot of every matching job, then events in
//! sequence order, replayed from `after_sequence` (0 = only new events), with
//! heartbeats carrying the latest sequence in between. [`EventStream`] hands
//! these out as [`WatchItem`]s.

use std::pin::Pin;
use std::task::{Context, Poll};

use crate::trace::TracedChannel;
use blockmirror_proto::v1::{
    Event, Job, WatchEventsRequest, WatchEventsResponse, job_service_client::JobServiceClient,
    watch_events_response::Kind,
};
use futures::Stream;
use tonic::Streaming;

use crate::error::ClientError;

/// Opens event streams.
#[derive(Debug, Clone)]
pub struct WatchClient {
    /// The generated stub; cloned per call because its methods take `&mut`.
    inner: JobServiceClient<TracedChannel>,
}

/// One message of the event stream.
#[derive(Debug, Clone, PartialEq)]
pub enum WatchItem {
    /// The state of a matching job when the stream opened.
    Snapshot(Job),
    /// An event, in sequence order.
    Event(Event),
    /// Nothing happened; the latest sequence the server has issued.
    Heartbeat {
        /// The latest event sequence number.
        latest_sequence: u64,
    },
}

impl WatchClient {
    pub(crate) fn new(channel: TracedChannel) -> Self {
        Self {
            inner: JobServiceClient::new(channel),
        }
    }

    /// Opens the stream for one job (`Some(id)`) or all jobs (`None`),
    /// replaying the events after `after_sequence` (0 = only new events).
    ///
    /// # Errors
    ///
    /// `OUT_OF_RANGE` when `after_sequence` is older than the events the
    /// server keeps; `NOT_FOUND` for an unknown job (server's choice).
    pub async fn events(
        &self,
        job_id: Option<&str>,
        after_sequence: u64,
    ) -> Result<EventStream, ClientError> {
        let req = WatchEventsRequest {
            job_id: job_id.unwrap_or_default().to_owned(),
            after_sequence,
        };
        let inner = self.inner.clone().watch_events(req).await?.into_inner();
        Ok(EventStream { inner })
    }
}

/// The stream of [`WatchItem`]s; ends when the server closes it.
///
/// # Cancel safety
///
/// Polling is cancel-safe: `StreamExt::next` on it may be used in
/// `select!`; an item is only taken out when it is returned.
#[derive(Debug)]
pub struct EventStream {
    /// The decoded gRPC response stream.
    inner: Streaming<WatchEventsResponse>,
}

impl Stream for EventStream {
    type Item = Result<WatchItem, ClientError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            let resp = match Pin::new(&mut self.inner).poll_next(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Ready(Some(Err(status))) => return Poll::Ready(Some(Err(status.into()))),
                Poll::Ready(Some(Ok(resp))) => resp,
            };
            // A message without a kind (from a newer server with a kind we
            // do not know) carries nothing for us: skip it.
            if let Some(item) = WatchItem::from_response(resp) {
                return Poll::Ready(Some(Ok(item)));
            }
        }
    }
}

impl WatchItem {
    /// Converts a proto response; `None` if it has no kind we know.
    pub fn from_response(resp: WatchEventsResponse) -> Option<Self> {
        Some(match resp.kind? {
            Kind::Snapshot(job) => Self::Snapshot(job),
            Kind::Event(event) => Self::Event(event),
            Kind::Heartbeat(hb) => Self::Heartbeat {
                latest_sequence: hb.latest_sequence,
            },
        })
    }
}

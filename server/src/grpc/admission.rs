//! Backpressure for gRPC data payloads, taken before tonic decodes them.
//!
//! tonic reads a unary request's whole message into memory before the
//! handler runs, so the engine's in-flight budgets would see a gRPC write
//! only once its bytes were held — as many of them as clients send at once.
//! [`Admission`] wraps the DataService: it reads each request's gRPC length
//! prefix as the body arrives and takes that many bytes (at most the whole
//! budget) from a server-wide budget before it lets the rest of the body
//! through. While the budget is spent, the body is not read, and HTTP/2
//! flow control stops the client. The bytes go back when the call's
//! response is ready; the handler has dropped its request by then.
//!
//! HTTP/2 flow control works per connection as well as per stream. The
//! data of a request that waits for budget holds connection window, and a
//! request that holds budget on the same connection may need that window
//! to finish. So the server's connection window covers every stream's
//! window ([`HTTP2_CONNECTION_WINDOW`]): the waiting streams can never take
//! all of it.

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use tokio::sync::{AcquireError, OwnedSemaphorePermit, Semaphore};
use tonic::server::NamedService;
use tower::Service;

/// Bytes of gRPC data payloads the server admits at once. A larger message
/// takes the whole budget and is admitted alone.
pub const DATA_PAYLOAD_BUDGET: u32 = 16 << 20;

/// Concurrent streams per gRPC connection (event watches count).
pub const HTTP2_MAX_STREAMS: u32 = 256;
/// Each stream's receive window: what a client may send ahead of the
/// server reading it.
pub const HTTP2_STREAM_WINDOW: u32 = 64 << 10;
/// The connection's receive window: every stream's, so streams waiting for
/// budget (at most all but one) always leave room for the one holding it.
pub const HTTP2_CONNECTION_WINDOW: u32 = HTTP2_MAX_STREAMS * HTTP2_STREAM_WINDOW;

/// A gRPC message's prefix: a compression flag and a big-endian length.
const PREFIX_BYTES: usize = 5;

/// A service whose requests take their payload's size from a shared budget
/// before their body is read past the gRPC length prefix.
#[derive(Debug, Clone)]
pub struct Admission<S> {
    inner: S,
    budget: Arc<Semaphore>,
    budget_bytes: u32,
}

impl<S> Admission<S> {
    /// `inner` behind a budget of `budget_bytes`.
    pub fn new(inner: S, budget_bytes: u32) -> Self {
        Self {
            inner,
            budget: Arc::new(Semaphore::new(budget_bytes as usize)),
            budget_bytes,
        }
    }
}

impl<S: NamedService> NamedService for Admission<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> Service<http::Request<tonic::body::Body>> for Admission<S>
where
    S: Service<http::Request<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let held = Held::default();
        let (budget, budget_bytes, body_held) =
            (Arc::clone(&self.budget), self.budget_bytes, held.clone());
        let req = req.map(move |body| {
            tonic::body::Body::new(AdmittedBody::new(body, budget, budget_bytes, body_held))
        });
        let response = self.inner.call(req);
        Box::pin(async move {
            let response = response.await;
            // The handler has returned, and with it the decoded request.
            drop(held);
            response
        })
    }
}

/// The budget a request holds, shared by its body (which takes it) and its
/// response future (which outlives the body: tonic drops the body once the
/// message is decoded, before the handler runs).
#[derive(Debug, Clone, Default)]
struct Held(Arc<Mutex<Option<OwnedSemaphorePermit>>>);

impl Held {
    fn keep(&self, permit: OwnedSemaphorePermit) {
        *self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(permit);
    }
}

type Acquire = Pin<Box<dyn Future<Output = Result<OwnedSemaphorePermit, AcquireError>> + Send>>;

/// A request body that waits for budget once it has seen the message's
/// length, before it passes on the frame that completed the prefix.
struct AdmittedBody<B> {
    inner: B,
    budget: Arc<Semaphore>,
    budget_bytes: u32,
    prefix: [u8; PREFIX_BYTES],
    prefix_seen: usize,
    /// The frame that completed the prefix, while its budget is acquired.
    stashed: Option<Frame<Bytes>>,
    acquiring: Option<Acquire>,
    held: Held,
}

impl<B> std::fmt::Debug for AdmittedBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdmittedBody")
            .field("prefix_seen", &self.prefix_seen)
            .field("waiting", &self.acquiring.is_some())
            .finish_non_exhaustive()
    }
}

impl<B> AdmittedBody<B> {
    fn new(inner: B, budget: Arc<Semaphore>, budget_bytes: u32, held: Held) -> Self {
        Self {
            inner,
            budget,
            budget_bytes,
            prefix: [0; PREFIX_BYTES],
            prefix_seen: 0,
            stashed: None,
            acquiring: None,
            held,
        }
    }

    /// Takes the prefix bytes `frame` holds; the message's length once the
    /// prefix is complete (only for the first message: DataService calls
    /// are unary).
    fn read_prefix(&mut self, frame: &Frame<Bytes>) -> Option<u32> {
        let data = frame.data_ref()?;
        if self.prefix_seen == PREFIX_BYTES {
            return None;
        }
        let take = (PREFIX_BYTES - self.prefix_seen).min(data.len());
        self.prefix[self.prefix_seen..self.prefix_seen + take].copy_from_slice(&data[..take]);
        self.prefix_seen += take;
        (self.prefix_seen == PREFIX_BYTES).then(|| {
            u32::from_be_bytes([
                self.prefix[1],
                self.prefix[2],
                self.prefix[3],
                self.prefix[4],
            ])
        })
    }
}

impl<B> Body for AdmittedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        if let Some(acquire) = this.acquiring.as_mut() {
            let permit = ready!(acquire.as_mut().poll(cx));
            this.acquiring = None;
            // The semaphore is never closed, so this always holds a permit.
            if let Ok(permit) = permit {
                this.held.keep(permit);
            }
            return Poll::Ready(this.stashed.take().map(Ok));
        }
        let frame = match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
            Some(Ok(frame)) => frame,
            other => return Poll::Ready(other),
        };
        match this.read_prefix(&frame) {
            Some(len) if len > 0 => {
                let bytes = len.min(this.budget_bytes);
                this.acquiring = Some(Box::pin(Arc::clone(&this.budget).acquire_many_owned(bytes)));
                this.stashed = Some(frame);
                Pin::new(this).poll_frame(cx)
            }
            _ => Poll::Ready(Some(Ok(frame))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.stashed.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        match &self.stashed {
            None => self.inner.size_hint(),
            Some(_) => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};
    use std::convert::Infallible;
    use std::time::Duration;

    type TestBody =
        StreamBody<futures::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>>;

    /// A gRPC message of `len` payload bytes, cut into frames of `frame`.
    fn message(len: u32, frame: usize) -> TestBody {
        let mut bytes = vec![0u8];
        bytes.extend_from_slice(&len.to_be_bytes());
        bytes.resize(PREFIX_BYTES + len as usize, 7);
        let frames: Vec<_> = bytes
            .chunks(frame)
            .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
            .collect();
        StreamBody::new(futures::stream::iter(frames))
    }

    fn admitted(body: TestBody, budget: &Arc<Semaphore>, held: &Held) -> AdmittedBody<TestBody> {
        AdmittedBody::new(body, Arc::clone(budget), 1000, held.clone())
    }

    #[tokio::test]
    async fn a_body_waits_for_budget_and_holds_it_until_released() {
        let budget = Arc::new(Semaphore::new(1000));
        let (first_held, second_held) = (Held::default(), Held::default());
        // The prefix arrives split over two frames.
        let first = admitted(message(600, 3), &budget, &first_held);
        let bytes = first.collect().await.unwrap().to_bytes();
        assert_eq!(bytes.len(), PREFIX_BYTES + 600, "every byte passed through");
        assert_eq!(
            budget.available_permits(),
            400,
            "the body is gone, the call holds its budget"
        );

        let second = admitted(message(600, 64), &budget, &second_held);
        let collecting = tokio::spawn(async move { second.collect().await.unwrap().to_bytes() });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !collecting.is_finished(),
            "600 bytes do not fit in the 400 left"
        );

        drop(first_held);
        let bytes = tokio::time::timeout(Duration::from_secs(5), collecting)
            .await
            .expect("admitted once the first call released its budget")
            .unwrap();
        assert_eq!(bytes.len(), PREFIX_BYTES + 600);
        assert_eq!(budget.available_permits(), 400);
        drop(second_held);
        assert_eq!(budget.available_permits(), 1000);
    }

    #[tokio::test]
    async fn a_message_larger_than_the_budget_is_admitted_alone() {
        let budget = Arc::new(Semaphore::new(1000));
        let held = Held::default();
        let big = admitted(message(5000, 1024), &budget, &held);
        let bytes = tokio::time::timeout(Duration::from_secs(5), big.collect())
            .await
            .expect("not stuck waiting for more than the budget")
            .unwrap()
            .to_bytes();
        assert_eq!(bytes.len(), PREFIX_BYTES + 5000);
        assert_eq!(budget.available_permits(), 0, "it took the whole budget");
        drop(held);
        assert_eq!(budget.available_permits(), 1000);
    }

    #[tokio::test]
    async fn an_empty_message_takes_no_budget() {
        let budget = Arc::new(Semaphore::new(0));
        let held = Held::default();
        let empty = admitted(message(0, 16), &budget, &held);
        let bytes = tokio::time::timeout(Duration::from_secs(5), empty.collect())
            .await
            .expect("an empty message never waits")
            .unwrap()
            .to_bytes();
        assert_eq!(bytes.len(), PREFIX_BYTES);
    }
}

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
use std::time::Duration;
use tokio::sync::{AcquireError, OwnedSemaphorePermit, Semaphore};
use tonic::server::NamedService;
use tower::Service;

/// Bytes of gRPC data payloads the server admits at once, across all
/// volumes. A larger message takes the whole budget and is admitted alone.
pub const DATA_PAYLOAD_BUDGET: u32 = 16 << 20;
/// The largest DataService message the server decodes; tonic refuses a
/// larger one, so its bytes are never held and it takes no budget.
pub const MAX_MESSAGE_BYTES: u32 = 64 << 20;
/// How long an admitted request's body may go without a frame before the
/// request fails: a client that stalls halfway through a message must not
/// keep the server's budget.
pub const BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Concurrent streams per gRPC connection (event watches count).
pub const HTTP2_MAX_STREAMS: u32 = 256;
/// Each stream's receive window: what a client may send ahead of the
/// server reading it. Messages up to this size take no budget: flow
/// control bounds them already.
pub const HTTP2_STREAM_WINDOW: u32 = 64 << 10;
/// The connection's receive window: every stream's, so streams waiting for
/// budget (at most all but one) always leave room for the one holding it.
/// It is also what one connection can make the server buffer outside the
/// budget (16 MiB).
pub const HTTP2_CONNECTION_WINDOW: u32 = HTTP2_MAX_STREAMS * HTTP2_STREAM_WINDOW;

/// A gRPC message's prefix: a compression flag and a big-endian length.
/// (The DataService accepts no compression, so the length is the size the
/// decoded message takes.)
const PREFIX_BYTES: usize = 5;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A service whose requests take their payload's size from a shared budget
/// before their body is read past the gRPC length prefix.
#[derive(Debug, Clone)]
pub struct Admission<S> {
    inner: S,
    /// What each request's body is handed (shares one semaphore).
    budget: Budget,
}

impl<S> Admission<S> {
    /// `inner` behind a budget of `budget_bytes`.
    pub fn new(inner: S, budget_bytes: u32) -> Self {
        Self {
            inner,
            budget: Budget {
                semaphore: Arc::new(Semaphore::new(budget_bytes as usize)),
                bytes: budget_bytes,
                free_up_to: HTTP2_STREAM_WINDOW,
                max_message: MAX_MESSAGE_BYTES,
                idle_timeout: BODY_IDLE_TIMEOUT,
            },
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

    fn call(&mut self, mut req: http::Request<tonic::body::Body>) -> Self::Future {
        let admitted = AdmittedPayload::default();
        // For handlers whose work outlives the call (see `AdmittedPayload`).
        req.extensions_mut().insert(admitted.clone());
        let budget = self.budget.clone();
        let body_admitted = admitted.clone();
        let req = req.map(move |body| {
            tonic::body::Body::new(AdmittedBody::new(body, budget, body_admitted))
        });
        let response = self.inner.call(req);
        Box::pin(async move {
            let response = response.await;
            // The handler has returned; a task it left running holds its
            // own clone.
            drop(admitted);
            response
        })
    }
}

/// The budget a request's payload holds. Its body takes the budget, and the
/// call's response future holds it until the handler returns: tonic drops
/// the body once the message is decoded, before the handler runs. The
/// request's extensions carry a clone, for a handler that hands the decoded
/// message to a task that outlives the call (a write runs to completion
/// even if the client gives up): that task keeps the clone until it ends.
#[derive(Debug, Clone, Default)]
pub struct AdmittedPayload(Arc<Mutex<Option<OwnedSemaphorePermit>>>);

impl AdmittedPayload {
    fn keep(&self, permit: OwnedSemaphorePermit) {
        *self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(permit);
    }
}

/// The shared budget as one body sees it.
#[derive(Debug, Clone)]
struct Budget {
    semaphore: Arc<Semaphore>,
    /// Its size.
    bytes: u32,
    /// Messages up to this size take none (flow control bounds them).
    free_up_to: u32,
    /// Messages over this size take none (tonic refuses them).
    max_message: u32,
    idle_timeout: Duration,
}

impl Budget {
    /// What a message of `len` bytes takes: none if flow control bounds
    /// it already or tonic will refuse it; never more than the whole budget.
    fn for_message(&self, len: u32) -> u32 {
        if len <= self.free_up_to || len > self.max_message {
            0
        } else {
            len.min(self.bytes)
        }
    }
}

type Acquire = Pin<Box<dyn Future<Output = Result<OwnedSemaphorePermit, AcquireError>> + Send>>;

/// A request body that waits for budget once it has seen the message's
/// length, before it passes on the frame that completed the prefix; once
/// admitted, it fails if the client stops sending for `idle_timeout`.
struct AdmittedBody<B> {
    inner: B,
    budget: Budget,
    prefix: [u8; PREFIX_BYTES],
    prefix_seen: usize,
    /// The frame that completed the prefix, while its budget is acquired.
    waiting: Option<(Frame<Bytes>, Acquire)>,
    /// Set once admitted: when the body fails if no frame comes first.
    idle: Option<Pin<Box<tokio::time::Sleep>>>,
    admitted: AdmittedPayload,
}

impl<B> std::fmt::Debug for AdmittedBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdmittedBody")
            .field("prefix_seen", &self.prefix_seen)
            .field("waiting", &self.waiting.is_some())
            .finish_non_exhaustive()
    }
}

impl<B> AdmittedBody<B> {
    fn new(inner: B, budget: Budget, admitted: AdmittedPayload) -> Self {
        Self {
            inner,
            budget,
            prefix: [0; PREFIX_BYTES],
            prefix_seen: 0,
            waiting: None,
            idle: None,
            admitted,
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

    /// Starts (or restarts) the idle deadline of an admitted body.
    fn arm_idle(&mut self) {
        let deadline = tokio::time::Instant::now() + self.budget.idle_timeout;
        match self.idle.as_mut() {
            Some(sleep) => sleep.as_mut().reset(deadline),
            None => self.idle = Some(Box::pin(tokio::time::sleep_until(deadline))),
        }
    }
}

impl<B> Body for AdmittedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Some((_, acquire)) = this.waiting.as_mut() {
            let permit = ready!(acquire.as_mut().poll(cx));
            // The semaphore is never closed, so this always holds a permit.
            if let Ok(permit) = permit {
                this.admitted.keep(permit);
            }
            this.arm_idle();
            return Poll::Ready(this.waiting.take().map(|(frame, _)| Ok(frame)));
        }
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        let frame = match polled {
            Poll::Ready(Some(Ok(frame))) => frame,
            Poll::Ready(other) => {
                this.idle = None;
                return Poll::Ready(other.map(|r| r.map_err(Into::into)));
            }
            Poll::Pending => {
                if let Some(idle) = this.idle.as_mut() {
                    ready!(idle.as_mut().poll(cx));
                    this.idle = None;
                    return Poll::Ready(Some(Err(format!(
                        "the request body stalled for {:?} after its payload was admitted",
                        this.budget.idle_timeout
                    )
                    .into())));
                }
                return Poll::Pending;
            }
        };
        if this.idle.is_some() {
            this.arm_idle();
        }
        match this.read_prefix(&frame) {
            Some(len) => match this.budget.for_message(len) {
                0 => Poll::Ready(Some(Ok(frame))),
                bytes => {
                    let acquire = Arc::clone(&this.budget.semaphore).acquire_many_owned(bytes);
                    this.waiting = Some((frame, Box::pin(acquire)));
                    Pin::new(this).poll_frame(cx)
                }
            },
            None => Poll::Ready(Some(Ok(frame))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.waiting.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        match &self.waiting {
            None => self.inner.size_hint(),
            Some(_) => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::{Stream, StreamExt};
    use http_body_util::{BodyExt, StreamBody};
    use std::convert::Infallible;

    type Frames = Pin<Box<dyn Stream<Item = Result<Frame<Bytes>, Infallible>> + Send>>;
    type TestBody = StreamBody<Frames>;

    /// A gRPC message of `len` payload bytes, cut into frames of `frame`;
    /// with `stall`, the client stops after the first frame.
    fn message(len: u32, frame: usize, stall: bool) -> TestBody {
        let mut bytes = vec![0u8];
        bytes.extend_from_slice(&len.to_be_bytes());
        bytes.resize(PREFIX_BYTES + len as usize, 7);
        let mut frames: Vec<_> = bytes
            .chunks(frame)
            .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
            .collect();
        if stall {
            frames.truncate(1);
            return StreamBody::new(Box::pin(
                futures::stream::iter(frames).chain(futures::stream::pending()),
            ));
        }
        StreamBody::new(Box::pin(futures::stream::iter(frames)))
    }

    /// A body behind a budget of 1000 bytes (`semaphore`'s permits), free
    /// up to 16 bytes, refusing over 10 000, with a 100 ms idle timeout.
    fn admitted(
        body: TestBody,
        semaphore: &Arc<Semaphore>,
        held: &AdmittedPayload,
    ) -> AdmittedBody<TestBody> {
        let budget = Budget {
            semaphore: Arc::clone(semaphore),
            bytes: 1000,
            free_up_to: 16,
            max_message: 10_000,
            idle_timeout: Duration::from_millis(100),
        };
        AdmittedBody::new(body, budget, held.clone())
    }

    async fn collect(body: AdmittedBody<TestBody>) -> Result<Bytes, BoxError> {
        tokio::time::timeout(Duration::from_secs(5), body.collect())
            .await
            .expect("the body never ended")
            .map(http_body_util::Collected::to_bytes)
    }

    #[tokio::test]
    async fn a_body_waits_for_budget_and_holds_it_until_released() {
        let budget = Arc::new(Semaphore::new(1000));
        let (first_held, second_held) = (AdmittedPayload::default(), AdmittedPayload::default());
        // The prefix arrives split over two frames.
        let first = admitted(message(600, 3, false), &budget, &first_held);
        let bytes = collect(first).await.unwrap();
        assert_eq!(bytes.len(), PREFIX_BYTES + 600, "every byte passed through");
        assert_eq!(
            budget.available_permits(),
            400,
            "the body is gone, the call holds its budget"
        );

        let second = admitted(message(600, 64, false), &budget, &second_held);
        let collecting = tokio::spawn(collect(second));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !collecting.is_finished(),
            "600 bytes do not fit in the 400 left"
        );

        drop(first_held);
        let bytes = collecting.await.unwrap().unwrap();
        assert_eq!(bytes.len(), PREFIX_BYTES + 600);
        assert_eq!(budget.available_permits(), 400);
        drop(second_held);
        assert_eq!(budget.available_permits(), 1000);
    }

    #[tokio::test]
    async fn a_message_larger_than_the_budget_is_admitted_alone() {
        let budget = Arc::new(Semaphore::new(1000));
        let held = AdmittedPayload::default();
        let big = admitted(message(5000, 1024, false), &budget, &held);
        let bytes = collect(big).await.unwrap();
        assert_eq!(bytes.len(), PREFIX_BYTES + 5000);
        assert_eq!(budget.available_permits(), 0, "it took the whole budget");
        drop(held);
        assert_eq!(budget.available_permits(), 1000);
    }

    #[tokio::test]
    async fn small_and_refused_messages_take_no_budget() {
        // No permits at all: these must not wait for any.
        let budget = Arc::new(Semaphore::new(0));
        let held = AdmittedPayload::default();
        for len in [0, 16, 20_000] {
            let body = admitted(message(len, 512, false), &budget, &held);
            let bytes = collect(body).await.unwrap();
            assert_eq!(bytes.len(), PREFIX_BYTES + len as usize);
        }
    }

    #[tokio::test]
    async fn a_client_that_stalls_after_admission_loses_its_request() {
        let budget = Arc::new(Semaphore::new(1000));
        let held = AdmittedPayload::default();
        let stalled = admitted(message(600, 64, true), &budget, &held);
        let err = collect(stalled).await.unwrap_err();
        assert!(err.to_string().contains("stalled"), "{err}");
        // The failed call ends, and its budget goes back.
        drop(held);
        assert_eq!(budget.available_permits(), 1000);
        // Waiting for budget is not stalling: that is the server's doing.
        let taken = Arc::clone(&budget).acquire_many_owned(1000).await.unwrap();
        let waiting_held = AdmittedPayload::default();
        let waiting = tokio::spawn(collect(admitted(
            message(600, 64, false),
            &budget,
            &waiting_held,
        )));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!waiting.is_finished());
        drop(taken);
        assert_eq!(waiting.await.unwrap().unwrap().len(), PREFIX_BYTES + 600);
    }
}

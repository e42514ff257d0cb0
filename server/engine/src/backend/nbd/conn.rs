//! One connection: the send side (the writer mutex), the pending table of
//! requests awaiting their replies, and the rendezvous with the reader
//! thread that completes them (`nbd` module doc: Threading, Timeouts).

use super::handshake::{ExportInfo, HandshakeError, handshake, send_option};
use super::lock;
use super::reader::reader_main;
use super::stream::Stream;
use super::uri::NbdUri;
use crate::error::EngineError;
use blockmirror_nbd::consts as c;
use blockmirror_nbd::request::Request;
use std::collections::HashMap;
use std::io::{self, Write};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

/// Bound on each read or write of the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on each socket write of a request; a server that stops reading for
/// this long is treated as gone.
const SEND_TIMEOUT: Duration = Duration::from_secs(60);
/// Payloads up to this size are copied behind their header and sent with
/// one system call.
const COALESCE_BYTES: usize = 64 << 10;

/// The connection was lost (or could not carry a request).
#[derive(Debug, thiserror::Error)]
#[error("NBD connection lost")]
struct ConnectionLost(#[source] Arc<io::Error>);

/// What a completed request yields.
#[derive(Debug)]
pub(super) enum Reply {
    /// Success without data.
    Done,
    /// A read's bytes.
    Data(Vec<u8>),
    /// The first `base:allocation` extent (length, flags), if one came.
    Extent(Option<(u32, u32)>),
}

/// What a request expects back; decides how its reply chunks are handled.
#[derive(Debug)]
pub(super) enum SlotKind {
    Plain,
    /// A read of `data.len()` bytes at `offset`: data chunks are placed by
    /// offset, holes stay zero.
    Read {
        offset: u64,
        data: Vec<u8>,
    },
    /// Block status for the metadata context `context`.
    Status {
        context: u32,
        extent: Option<(u32, u32)>,
    },
}

/// A request waiting for its reply.
#[derive(Debug)]
pub(super) struct Slot {
    /// The waiting caller's end. Bounded to 1: exactly one result is ever
    /// sent, so the reader thread never blocks on it.
    tx: SyncSender<io::Result<Reply>>,
    pub(super) kind: SlotKind,
    /// The first error chunk of a structured reply; the reply still runs
    /// to its final chunk.
    pub(super) error: Option<io::Error>,
}

impl Slot {
    /// Delivers the result. The caller may have given up (timed out) and
    /// dropped its receiver; the result is then discarded.
    pub(super) fn finish(self) {
        let result = match self.error {
            Some(e) => Err(e),
            None => Ok(match self.kind {
                SlotKind::Plain => Reply::Done,
                SlotKind::Read { data, .. } => Reply::Data(data),
                SlotKind::Status { extent, .. } => Reply::Extent(extent),
            }),
        };
        let _ = self.tx.send(result);
    }

    fn abort(self, cause: &Arc<io::Error>) {
        let _ = self.tx.send(Err(io::Error::new(
            io::ErrorKind::ConnectionAborted,
            ConnectionLost(Arc::clone(cause)),
        )));
    }
}

/// State shared by the senders and the reader thread of one connection.
#[derive(Debug, Default)]
struct Pending {
    /// Requests sent (or being sent) and not yet answered, by handle. The
    /// reader takes a slot out while it reads that slot's chunk.
    slots: HashMap<u64, Slot>,
    /// Set once, by whoever first sees the connection fail; from then on no
    /// slot is added and every slot is failed with this cause.
    lost: Option<Arc<io::Error>>,
}

/// The pending table of one connection.
#[derive(Debug, Default)]
pub(super) struct Shared {
    pending: Mutex<Pending>,
}

impl Shared {
    pub(super) fn is_lost(&self) -> bool {
        lock(&self.pending).lost.is_some()
    }

    /// Adds a slot, unless the connection is lost.
    fn register(&self, handle: u64, slot: Slot) -> io::Result<()> {
        let mut p = lock(&self.pending);
        if let Some(cause) = &p.lost {
            return Err(io::Error::new(
                io::ErrorKind::NotConnected,
                ConnectionLost(Arc::clone(cause)),
            ));
        }
        p.slots.insert(handle, slot);
        Ok(())
    }

    pub(super) fn take(&self, handle: u64) -> Option<Slot> {
        lock(&self.pending).slots.remove(&handle)
    }

    /// Returns a slot the reader took out, or fails it if the connection
    /// was lost meanwhile (its failure drained the table without it).
    pub(super) fn put_back(&self, handle: u64, slot: Slot) {
        let mut p = lock(&self.pending);
        match &p.lost {
            Some(cause) => {
                let cause = Arc::clone(cause);
                drop(p);
                slot.abort(&cause);
            }
            None => {
                p.slots.insert(handle, slot);
            }
        }
    }

    /// Marks the connection lost and fails every pending request. Returns
    /// true if this call recorded the cause (the first to notice).
    pub(super) fn fail_all(&self, cause: io::Error) -> bool {
        let mut p = lock(&self.pending);
        if p.lost.is_some() {
            return false;
        }
        let cause = Arc::new(cause);
        p.lost = Some(Arc::clone(&cause));
        let slots: Vec<Slot> = p.slots.drain().map(|(_, s)| s).collect();
        drop(p);
        for slot in slots {
            slot.abort(&cause);
        }
        true
    }
}

/// One live (or dying) connection.
#[derive(Debug)]
pub(super) struct Conn {
    /// What the handshake of this connection negotiated.
    pub(super) info: ExportInfo,
    /// The send side. Held for the duration of one request's write so that
    /// requests from different callers never interleave on the wire.
    pub(super) writer: Mutex<Stream>,
    /// A clone of the socket kept to shut it down without the writer lock
    /// (a sender may be blocked in a write while holding it).
    control: Stream,
    /// The pending table, shared with the reader thread.
    pub(super) shared: Arc<Shared>,
    /// The reader thread, joined on drop.
    reader: Option<JoinHandle<()>>,
}

/// A request not completely sent: it cannot have been executed and may be
/// sent again on another connection.
pub(super) struct NotSent(pub(super) io::Error);

impl Conn {
    pub(super) fn open(uri: &NbdUri) -> Result<Self, EngineError> {
        let connecting = |e| EngineError::io(format!("connecting to NBD server {uri}"), e);
        let mut stream = Stream::connect(&uri.endpoint).map_err(connecting)?;
        stream
            .set_timeouts(Some(HANDSHAKE_TIMEOUT), Some(HANDSHAKE_TIMEOUT))
            .map_err(connecting)?;
        let info = match handshake(&mut stream, uri.export()) {
            Ok(info) => info,
            Err(e) => {
                if matches!(e, HandshakeError::Refused { .. }) {
                    // Still in the option phase: end it politely (best effort).
                    let _ = send_option(&mut stream, c::OPT_ABORT, &[]);
                }
                return Err(e.into_engine(uri));
            }
        };
        // The reader waits without a socket timeout (`nbd` module doc: Timeouts).
        stream
            .set_timeouts(None, Some(SEND_TIMEOUT))
            .map_err(connecting)?;
        let reader_stream = stream.try_clone().map_err(connecting)?;
        let control = stream.try_clone().map_err(connecting)?;
        let shared = Arc::new(Shared::default());
        let reader = thread::Builder::new()
            .name("nbd-reader".into())
            .spawn({
                let shared = Arc::clone(&shared);
                let uri = uri.to_string();
                move || reader_main(reader_stream, shared, info.structured, uri)
            })
            .map_err(|e| EngineError::io("starting the NBD reader thread", e))?;
        tracing::debug!(
            uri = %uri,
            size = info.size,
            flags = info.flags,
            structured = info.structured,
            block_status = info.allocation_context.is_some(),
            min_block = info.min_block,
            max_piece = info.max_piece,
            "NBD connection established"
        );
        Ok(Self {
            info,
            writer: Mutex::new(stream),
            control,
            shared,
            reader: Some(reader),
        })
    }

    /// Registers a slot and sends the request.
    pub(super) fn send(
        &self,
        req: &Request,
        payload: &[u8],
        kind: SlotKind,
    ) -> Result<Receiver<io::Result<Reply>>, NotSent> {
        // Bound 1: exactly one result per request (see `Slot::tx`).
        let (tx, rx) = mpsc::sync_channel(1);
        self.shared
            .register(
                req.handle,
                Slot {
                    tx,
                    kind,
                    error: None,
                },
            )
            .map_err(NotSent)?;
        let sent = write_request(&mut lock(&self.writer), req, payload);
        if let Err(e) = sent {
            self.shared.take(req.handle);
            let cause = Arc::new(e);
            self.kill(io::Error::new(
                cause.kind(),
                ConnectionLost(Arc::clone(&cause)),
            ));
            return Err(NotSent(io::Error::new(cause.kind(), ConnectionLost(cause))));
        }
        Ok(rx)
    }

    /// Fails every request in flight and shuts the socket down, which ends
    /// the reader thread.
    pub(super) fn kill(&self, cause: io::Error) {
        self.shared.fail_all(cause);
        self.control.shutdown();
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.control.shutdown();
        if let Some(reader) = self.reader.take() {
            // The shutdown wakes the reader at once; it holds no lock of
            // ours while blocked, so the join cannot deadlock.
            if reader.join().is_err() {
                tracing::error!("NBD reader thread panicked");
            }
        }
    }
}

/// Writes one request: its header and payload, together when small.
pub(super) fn write_request(w: &mut Stream, req: &Request, payload: &[u8]) -> io::Result<()> {
    let head = req.encode();
    if payload.len() <= COALESCE_BYTES {
        let mut buf = Vec::with_capacity(head.len() + payload.len());
        buf.extend_from_slice(&head);
        buf.extend_from_slice(payload);
        w.write_all(&buf)?;
    } else {
        w.write_all(&head)?;
        w.write_all(payload)?;
    }
    w.flush()
}

/// A request in flight: wait on it for the reply.
pub(super) struct Ticket {
    pub(super) conn: Arc<Conn>,
    pub(super) handle: u64,
    pub(super) rx: Receiver<io::Result<Reply>>,
}

impl Ticket {
    pub(super) fn wait(self, timeout: Duration) -> io::Result<Reply> {
        match self.rx.recv_timeout(timeout) {
            Ok(result) => result,
            Err(RecvTimeoutError::Timeout) => {
                // A server silent this long is hung or gone: replace the
                // connection (`nbd` module doc: Timeouts).
                self.conn.shared.take(self.handle);
                self.conn.kill(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "an NBD request timed out",
                ));
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no NBD reply within {} s", timeout.as_secs()),
                ))
            }
            // Every slot is finished or aborted before it is dropped, so
            // this does not happen; report it as a lost connection anyway.
            Err(RecvTimeoutError::Disconnected) => Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "NBD reply dropped",
            )),
        }
    }
}

//! Lazy reconnection: the current connection ([`Link`]), its replacement
//! on a backoff schedule shared by all callers, and resending a request
//! that could not be sent (`nbd` module doc: Failure and reconnection).

use super::conn::{Conn, NotSent, SlotKind, Ticket};
use super::handshake::ExportInfo;
use super::{NbdBackend, lock};
use crate::error::{EngineError, ErrorKind};
use blockmirror_nbd::request::{Command, Request};
use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread;
use std::time::{Duration, Instant};

/// No connection could be made within a request's reconnection budget.
#[derive(Debug, thiserror::Error)]
#[error("cannot reconnect to NBD server {uri}")]
struct ReconnectFailed {
    uri: String,
    #[source]
    cause: Option<Arc<EngineError>>,
}

/// The current connection and the reconnection schedule.
#[derive(Debug)]
pub(super) struct Link {
    /// The connection requests go to; `None` only after a failed attempt
    /// to replace a dead one.
    pub(super) conn: Option<Arc<Conn>>,
    /// What the latest handshake negotiated (kept while disconnected).
    pub(super) info: ExportInfo,
    /// When the current connection was made.
    pub(super) connected_at: Instant,
    /// No connection attempt starts before this.
    pub(super) next_attempt: Instant,
    /// Delay added after the next attempt.
    pub(super) backoff: Duration,
    /// Why the latest attempt failed, for callers that give up.
    pub(super) last_error: Option<Arc<EngineError>>,
}

/// What a request expects, before it is bound to a connection.
#[derive(Debug, Clone, Copy)]
pub(super) enum Expect {
    Plain,
    Read,
    Status,
}

impl NbdBackend {
    /// The live connection, reconnecting (with backoff) if it was lost.
    fn connection(&self, deadline: Instant) -> io::Result<Arc<Conn>> {
        loop {
            // Declared before the guard so that a retired connection (whose
            // drop joins its reader thread) is dropped after the unlock.
            let mut retired = None;
            let mut link = lock(&self.link);
            let now = Instant::now();
            if let Some(conn) = &link.conn {
                if !conn.shared.is_lost() {
                    return Ok(Arc::clone(conn));
                }
                retired = link.conn.take();
                if now.duration_since(link.connected_at) >= self.timeouts.backoff_max {
                    // It was a healthy connection: try again at once.
                    link.backoff = self.timeouts.backoff_initial;
                    link.next_attempt = now;
                }
            }
            if now >= link.next_attempt {
                link.next_attempt = now + link.backoff;
                link.backoff = (link.backoff * 2).min(self.timeouts.backoff_max);
                match Conn::open(&self.uri).and_then(|conn| self.check_same_export(conn)) {
                    Ok(conn) => {
                        let conn = Arc::new(conn);
                        link.info = conn.info;
                        link.conn = Some(Arc::clone(&conn));
                        link.connected_at = Instant::now();
                        link.last_error = None;
                        let n = self.reconnects.fetch_add(1, Ordering::Relaxed) + 1;
                        tracing::info!(
                            uri = %self.uri_text,
                            reconnects = n,
                            "reconnected to NBD export"
                        );
                        return Ok(conn);
                    }
                    Err(e) => {
                        tracing::debug!(
                            uri = %self.uri_text,
                            error = %e.chain(),
                            "NBD reconnection attempt failed"
                        );
                        link.last_error = Some(Arc::new(e));
                    }
                }
            }
            let next = link.next_attempt;
            let last_error = link.last_error.clone();
            drop(link);
            drop(retired);
            if next >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::NotConnected,
                    ReconnectFailed {
                        uri: self.uri_text.clone(),
                        cause: last_error,
                    },
                ));
            }
            thread::sleep(next.saturating_duration_since(Instant::now()));
        }
    }

    fn check_same_export(&self, conn: Conn) -> Result<Conn, EngineError> {
        if conn.info.size == self.size {
            Ok(conn)
        } else {
            Err(EngineError::new(
                ErrorKind::FailedPrecondition,
                format!(
                    "NBD export {} changed size from {} to {} bytes",
                    self.uri_text, self.size, conn.info.size
                ),
            ))
        }
    }

    /// Sends one request, reconnecting and resending while it could not be
    /// sent (`nbd` module doc: Failure and reconnection).
    pub(super) fn submit(
        &self,
        command: Command,
        flags: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
        expect: Expect,
    ) -> io::Result<Ticket> {
        let deadline = Instant::now() + self.timeouts.reconnect_budget;
        loop {
            let conn = self.connection(deadline)?;
            let kind = match expect {
                Expect::Plain => SlotKind::Plain,
                Expect::Read => SlotKind::Read {
                    offset,
                    data: vec![
                        0u8;
                        usize::try_from(length)
                            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?
                    ],
                },
                Expect::Status => match conn.info.allocation_context {
                    Some(context) => SlotKind::Status {
                        context,
                        extent: None,
                    },
                    None => return Err(io::Error::from(io::ErrorKind::Unsupported)),
                },
            };
            let req = Request {
                flags,
                command,
                handle: self.next_handle.fetch_add(1, Ordering::Relaxed),
                offset,
                length,
            };
            match conn.send(&req, payload, kind) {
                Ok(rx) => {
                    return Ok(Ticket {
                        conn,
                        handle: req.handle,
                        rx,
                    });
                }
                Err(NotSent(e)) => {
                    tracing::debug!(
                        uri = %self.uri_text,
                        error = %e,
                        "NBD request not sent; reconnecting"
                    );
                    if Instant::now() >= deadline {
                        return Err(e);
                    }
                }
            }
        }
    }
}

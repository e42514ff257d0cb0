//! A remote NBD export (qemu-nbd, nbdkit, another blockmirrord) as a
//! backend: a blocking NBD *client* built on the `blockmirror-nbd` codec.
//!
//! # Threading
//!
//! The engine calls a backend from many blocking-pool threads at once, and
//! NBD lets a client keep many requests in flight on one connection: each
//! request carries a handle, and replies come back in any order, matched by
//! that handle. One connection is therefore shared by all callers:
//!
//! - **Senders** are the calling threads. A caller first registers a *slot*
//!   for its handle in the pending table (so a fast reply can never arrive
//!   before its slot exists), then writes the request header and payload
//!   under the writer mutex, so that requests from different threads never
//!   interleave on the wire. The mutex covers the write only, never the wait
//!   for the reply.
//! - **One reader thread** per connection owns the receive side. It reads
//!   reply headers and structured chunks, takes the slot for the handle out
//!   of the table, reads any payload straight into the slot's buffer (data
//!   chunks land at their offset, holes are zero-filled) and, on the final
//!   chunk, hands the result to the waiting caller over the slot's one-shot
//!   channel. Whoever reads the socket must be able to deliver any reply to
//!   any caller, so that job belongs to one thread rather than to whichever
//!   caller happens to be waiting. Read data is copied once more, from the
//!   slot's buffer into the caller's: the reader thread cannot borrow the
//!   caller's `&mut [u8]` without unsafe code, and a memory copy is cheap
//!   next to a network round trip.
//!
//! # Timeouts
//!
//! Nothing waits forever. Connecting and the handshake have their own
//! timeouts; sends have a socket write timeout; each caller waits for its
//! reply with a timeout. The reader has *no* socket read timeout: an idle
//! connection is normal, and a timeout in the middle of a frame would lose
//! bytes and desynchronise the stream. Instead a caller whose wait times out
//! kills the connection (shuts the socket down), which wakes the reader with
//! an error; dropping the backend does the same, so the reader thread always
//! exits and is joined.
//!
//! # Failure and reconnection
//!
//! When the connection fails (end of file, an I/O error, a protocol
//! violation, a timeout), the first party to notice records the cause,
//! fails every request in flight with [`io::ErrorKind::ConnectionAborted`]
//! and shuts the socket down. Requests in flight are *not* resent: the
//! server may or may not have applied such a write, and resending it behind
//! the engine's back could land it after a newer write to the same range;
//! the engine's error policy (re-dirtying the chunks) handles the failure
//! instead. For the same reason a request split into several pieces waits
//! for every piece it sent before returning, even after an error. A request
//! that was *not* completely sent (its connection was already dead, or the
//! write failed part way) cannot have been executed, so it is sent again on
//! a new connection.
//!
//! Reconnection is lazy: the next request opens a new connection. Attempts
//! back off exponentially (50 ms doubling to 2 s) on a schedule shared by
//! all callers, so that they do not stampede the server, and a request
//! gives up after about 10 s without a connection. [`NbdBackend::reconnects`]
//! counts the successful reconnections.
//!
//! # Block sizes
//!
//! The client asks for `NBD_INFO_BLOCK_SIZE`, which promises the server that
//! requests honour its minimum and maximum block sizes. Requests larger than
//! the maximum (at most 32 MiB) are split and pipelined. Requests not
//! aligned to a minimum block size above one byte are widened: reads read the
//! covering blocks, and writes read-modify-write the partial edge blocks
//! under a mutex that serialises such writes against each other. Two writes
//! that share a block overlap in bytes anyway, so an aligned write racing a
//! read-modify-write was unordered already.
//!
//! # Clock
//!
//! This module uses [`std::time::Instant`], not tokio's: it runs on blocking
//! threads, and its deadlines measure a remote server in real time, which
//! must not stop or jump when a test pauses tokio's clock.
//!
//! # Layout
//!
//! - `uri`: [`NbdUri`], parsed from and printed to the URI forms.
//! - `stream`: the socket, TCP or unix.
//! - `handshake`: option negotiation, and what it learns about the export.
//! - `conn`: one connection: the writer mutex, the pending table of
//!   requests awaiting replies, and the tickets callers wait on.
//! - `reader`: the reader thread, which parses replies and completes them.
//! - `reconnect`: the current connection, its replacement with backoff,
//!   and resending requests that were not sent.
//! - this file: [`NbdBackend`] itself: splitting, pipelining and aligning
//!   requests (Block sizes), and its [`BlockBackend`] implementation.

mod conn;
mod handshake;
mod reader;
mod reconnect;
mod stream;
mod uri;

#[cfg(test)]
mod tests;

pub use uri::NbdUri;

use self::conn::{Conn, Reply, Ticket, write_request};
use self::handshake::ExportInfo;
use self::reader::chunk_range;
use self::reconnect::{Expect, Link};
use super::{Allocation, BlockBackend};
use crate::error::EngineError;
use blockmirror_nbd::WireError;
use blockmirror_nbd::consts as c;
use blockmirror_nbd::request::{Command, Request};
use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// Bound on waiting for a reply: generous for a 32 MiB piece on a slow
/// link, short enough that a hung server is noticed and replaced.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// How long one request may spend getting a connection before it fails.
const RECONNECT_BUDGET: Duration = Duration::from_secs(10);
/// First delay between reconnection attempts.
const BACKOFF_INITIAL: Duration = Duration::from_millis(50);
/// Longest delay between reconnection attempts; a connection that lived at
/// least this long resets the backoff when it dies.
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Pieces of one split request in flight at once: enough to keep the link
/// busy, while bounding the extra read buffers to 4 × 32 MiB.
const PIPELINE_DEPTH: usize = 4;
/// Length of one `NBD_CMD_WRITE_ZEROES` piece: such requests carry no
/// payload, but servers are not obliged to take 4 GiB at once.
const ZERO_PIECE_BYTES: u32 = 1 << 30;
/// Zero buffer for servers without `WRITE_ZEROES` (a multiple of every
/// minimum block size the protocol allows).
const ZERO_FILL_BYTES: u32 = 1 << 20;

/// Locks `m`, ignoring poisoning: every critical section in this module
/// leaves its data consistent at each step (a table insert or remove, a
/// whole request written or the connection killed), so a panic elsewhere
/// does not make it unusable.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn protocol_error(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

fn wire_error(e: WireError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// Waits and budgets; constants in production, shortened by tests.
#[derive(Debug, Clone, Copy)]
struct Timeouts {
    request: Duration,
    reconnect_budget: Duration,
    backoff_initial: Duration,
    backoff_max: Duration,
}

const TIMEOUTS: Timeouts = Timeouts {
    request: REQUEST_TIMEOUT,
    reconnect_budget: RECONNECT_BUDGET,
    backoff_initial: BACKOFF_INITIAL,
    backoff_max: BACKOFF_MAX,
};

/// A remote NBD export as a [`BlockBackend`]: a blocking NBD client with
/// many requests in flight, split and pipelined to the server's block
/// sizes, and lazy reconnection after a lost connection (see the module
/// documentation).
pub struct NbdBackend {
    uri: NbdUri,
    /// `uri` as text, for [`BlockBackend::path`].
    uri_text: String,
    /// Export size from the first handshake; a reconnection to an export
    /// of another size is refused.
    size: u64,
    /// The connection; its lock is held while a connection is made (so
    /// callers share one attempt and one backoff schedule), never while
    /// waiting for a reply.
    link: Mutex<Link>,
    /// Source of request handles, unique across connections.
    next_handle: AtomicU64,
    /// Successful reconnections.
    reconnects: AtomicU64,
    /// Serialises read-modify-write of partial blocks (module doc: Block sizes).
    rmw: Mutex<()>,
    timeouts: Timeouts,
}

impl fmt::Debug for NbdBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NbdBackend")
            .field("uri", &self.uri_text)
            .field("size", &self.size)
            .field("reconnects", &self.reconnects())
            .finish_non_exhaustive()
    }
}

impl NbdBackend {
    /// Connects to the export `uri` names: fixed newstyle handshake,
    /// structured replies and `base:allocation` when offered, then
    /// `NBD_OPT_GO`. Blocks for at most a few seconds per step.
    ///
    /// # Errors
    /// [`ErrorKind::NotFound`] if the server has no such export (or the
    /// socket does not exist), [`ErrorKind::InvalidArgument`] if the server
    /// refuses it by policy or for TLS, [`ErrorKind::Unavailable`] if it is
    /// shutting down, [`ErrorKind::Io`] for transport and protocol failures.
    ///
    /// [`ErrorKind::NotFound`]: crate::error::ErrorKind::NotFound
    /// [`ErrorKind::InvalidArgument`]: crate::error::ErrorKind::InvalidArgument
    /// [`ErrorKind::Unavailable`]: crate::error::ErrorKind::Unavailable
    /// [`ErrorKind::Io`]: crate::error::ErrorKind::Io
    pub fn connect(uri: &NbdUri) -> Result<Self, EngineError> {
        let conn = Conn::open(uri)?;
        let info = conn.info;
        tracing::info!(
            uri = %uri,
            size = info.size,
            read_only = info.has(c::FLAG_READ_ONLY),
            "connected to NBD export"
        );
        let now = Instant::now();
        Ok(Self {
            uri: uri.clone(),
            uri_text: uri.to_string(),
            size: info.size,
            link: Mutex::new(Link {
                conn: Some(Arc::new(conn)),
                info,
                connected_at: now,
                next_attempt: now,
                backoff: TIMEOUTS.backoff_initial,
                last_error: None,
            }),
            next_handle: AtomicU64::new(1),
            reconnects: AtomicU64::new(0),
            rmw: Mutex::new(()),
            timeouts: TIMEOUTS,
        })
    }

    /// The export's URI.
    pub fn uri(&self) -> &NbdUri {
        &self.uri
    }

    /// How many times a lost connection was replaced by a new one.
    pub fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }

    /// True if the server exports the device read-only (writes fail with
    /// `EPERM`).
    pub fn is_read_only(&self) -> bool {
        self.info().has(c::FLAG_READ_ONLY)
    }

    fn info(&self) -> ExportInfo {
        lock(&self.link).info
    }

    /// Runs `[offset, offset + len)` as pieces of at most `max` bytes,
    /// up to [`PIPELINE_DEPTH`] in flight. Waits for every piece it sent,
    /// even after an error, and returns the first error.
    fn pipelined(
        &self,
        offset: u64,
        len: u64,
        max: u32,
        mut submit: impl FnMut(u64, u32) -> io::Result<Ticket>,
        mut complete: impl FnMut(u64, Reply) -> io::Result<()>,
    ) -> io::Result<()> {
        let max = max.max(1);
        let mut window: VecDeque<(u64, Ticket)> = VecDeque::with_capacity(PIPELINE_DEPTH);
        let mut first_error: Option<io::Error> = None;
        let end = offset + len;
        let mut off = offset;
        // Stop sending after the first error; the pieces in flight still
        // drain below.
        while off < end && first_error.is_none() {
            if window.len() >= PIPELINE_DEPTH
                && let Some((o, t)) = window.pop_front()
                && let Err(e) = t.wait(self.timeouts.request).and_then(|r| complete(o, r))
            {
                first_error = Some(e);
                continue;
            }
            let piece = u32::try_from(end - off).unwrap_or(u32::MAX).min(max);
            match submit(off, piece) {
                Ok(t) => window.push_back((off, t)),
                Err(e) => first_error = Some(e),
            }
            off += u64::from(piece);
        }
        while let Some((o, t)) = window.pop_front() {
            if let Err(e) = t.wait(self.timeouts.request).and_then(|r| complete(o, r)) {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    fn check_range(&self, offset: u64, len: u64) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "range {offset}+{len} is past the end of the {}-byte NBD export",
                    self.size
                ),
            )),
        }
    }

    fn read_aligned(&self, buf: &mut [u8], offset: u64, info: &ExportInfo) -> io::Result<()> {
        self.pipelined(
            offset,
            buf.len() as u64,
            info.max_piece,
            |off, len| self.submit(Command::Read, 0, off, len, &[], Expect::Read),
            |off, reply| {
                let Reply::Data(data) = reply else {
                    return Err(protocol_error("a read completed without data"));
                };
                let range = chunk_range(offset, buf.len(), off, data.len() as u64)
                    .ok_or_else(|| protocol_error("read reply outside the request"))?;
                buf.get_mut(range)
                    .ok_or_else(|| protocol_error("read reply outside the request"))?
                    .copy_from_slice(&data);
                Ok(())
            },
        )
    }

    fn write_aligned(&self, buf: &[u8], offset: u64, info: &ExportInfo) -> io::Result<()> {
        self.pipelined(
            offset,
            buf.len() as u64,
            info.max_piece,
            |off, len| {
                let range = chunk_range(offset, buf.len(), off, u64::from(len))
                    .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
                let payload = buf
                    .get(range)
                    .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
                self.submit(Command::Write, 0, off, len, payload, Expect::Plain)
            },
            |_, _| Ok(()),
        )
    }

    /// Read-modify-write of the blocks `[offset, offset + buf.len())` touches.
    fn write_unaligned(&self, buf: &[u8], offset: u64, info: &ExportInfo) -> io::Result<()> {
        let _serial = lock(&self.rmw);
        let bs = u64::from(info.min_block);
        let end = offset + buf.len() as u64;
        let start = offset / bs * bs;
        let stop = end.div_ceil(bs).saturating_mul(bs).min(self.size);
        let mut tmp = vec![
            0u8;
            usize::try_from(stop - start)
                .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?
        ];
        let block =
            usize::try_from(bs).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let head_read = offset != start;
        if head_read {
            let n = block.min(tmp.len());
            self.read_aligned(&mut tmp[..n], start, info)?;
        }
        let tail = (end - 1) / bs * bs;
        if end != stop && (tail != start || !head_read) {
            let at = usize::try_from(tail - start)
                .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
            self.read_aligned(&mut tmp[at..], tail, info)?;
        }
        let at = usize::try_from(offset - start)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        tmp[at..at + buf.len()].copy_from_slice(buf);
        self.write_aligned(&tmp, start, info)
    }

    fn write_zeroes_aligned(
        &self,
        offset: u64,
        len: u64,
        punch: bool,
        info: &ExportInfo,
    ) -> io::Result<()> {
        if info.has(c::FLAG_SEND_WRITE_ZEROES) {
            let flags = if punch { 0 } else { c::CMD_FLAG_NO_HOLE };
            let max = (ZERO_PIECE_BYTES / info.min_block * info.min_block).max(info.min_block);
            self.pipelined(
                offset,
                len,
                max,
                |off, n| self.submit(Command::WriteZeroes, flags, off, n, &[], Expect::Plain),
                |_, _| Ok(()),
            )
        } else {
            let piece = ZERO_FILL_BYTES.min(info.max_piece);
            let zeroes = vec![0u8; usize::try_from(u64::from(piece).min(len)).unwrap_or(0)];
            let max = u32::try_from(zeroes.len()).unwrap_or(piece).max(1);
            self.pipelined(
                offset,
                len,
                max,
                |off, n| {
                    let payload = zeroes
                        .get(..usize::try_from(n).unwrap_or(usize::MAX))
                        .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
                    self.submit(Command::Write, 0, off, n, payload, Expect::Plain)
                },
                |_, _| Ok(()),
            )
        }
    }

    fn unaligned(offset: u64, len: u64, info: &ExportInfo) -> bool {
        let bs = u64::from(info.min_block);
        bs > 1 && (!offset.is_multiple_of(bs) || !len.is_multiple_of(bs))
    }

    fn refuse_if_read_only(info: &ExportInfo) -> io::Result<()> {
        if info.has(c::FLAG_READ_ONLY) {
            Err(io::Error::from_raw_os_error(libc::EPERM))
        } else {
            Ok(())
        }
    }
}

impl BlockBackend for NbdBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let len = buf.len() as u64;
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let info = self.info();
        if !Self::unaligned(offset, len, &info) {
            return self.read_aligned(buf, offset, &info);
        }
        let bs = u64::from(info.min_block);
        let start = offset / bs * bs;
        let stop = (offset + len)
            .div_ceil(bs)
            .saturating_mul(bs)
            .min(self.size);
        let mut tmp = vec![
            0u8;
            usize::try_from(stop - start)
                .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?
        ];
        self.read_aligned(&mut tmp, start, &info)?;
        let at = usize::try_from(offset - start)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        buf.copy_from_slice(&tmp[at..at + buf.len()]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let len = buf.len() as u64;
        self.check_range(offset, len)?;
        let info = self.info();
        Self::refuse_if_read_only(&info)?;
        if len == 0 {
            return Ok(());
        }
        if Self::unaligned(offset, len, &info) {
            self.write_unaligned(buf, offset, &info)
        } else {
            self.write_aligned(buf, offset, &info)
        }
    }

    fn write_zeroes(&self, offset: u64, len: u64, punch: bool) -> io::Result<()> {
        self.check_range(offset, len)?;
        let info = self.info();
        Self::refuse_if_read_only(&info)?;
        if len == 0 {
            return Ok(());
        }
        if !Self::unaligned(offset, len, &info) {
            return self.write_zeroes_aligned(offset, len, punch, &info);
        }
        let bs = u64::from(info.min_block);
        let end = offset + len;
        let first_full = offset.div_ceil(bs) * bs;
        let last_full = end / bs * bs;
        let zeroes = |from: u64, to: u64| -> io::Result<()> {
            let n = usize::try_from(to - from)
                .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
            self.write_unaligned(&vec![0u8; n], from, &info)
        };
        if first_full >= last_full {
            // No whole block inside: at most two partial blocks.
            return zeroes(offset, end);
        }
        if offset < first_full {
            zeroes(offset, first_full)?;
        }
        self.write_zeroes_aligned(first_full, last_full - first_full, punch, &info)?;
        if last_full < end {
            zeroes(last_full, end)?;
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        if !self.info().has(c::FLAG_SEND_FLUSH) {
            // The server has no volatile cache to flush.
            return Ok(());
        }
        self.submit(Command::Flush, 0, 0, 0, &[], Expect::Plain)?
            .wait(self.timeouts.request)
            .map(|_| ())
    }

    fn allocation(&self, offset: u64, len: u64) -> io::Result<Allocation> {
        let end = offset.saturating_add(len).min(self.size);
        if offset >= end || self.info().allocation_context.is_none() {
            return Ok(Allocation::Data { end });
        }
        let want = u32::try_from(end - offset).unwrap_or(u32::MAX);
        let ticket = match self.submit(
            Command::BlockStatus,
            c::CMD_FLAG_REQ_ONE,
            offset,
            want,
            &[],
            Expect::Status,
        ) {
            Ok(t) => t,
            // The new connection has no base:allocation.
            Err(e) if e.kind() == io::ErrorKind::Unsupported => {
                return Ok(Allocation::Data { end });
            }
            Err(e) => return Err(e),
        };
        match ticket.wait(self.timeouts.request)? {
            Reply::Extent(Some((ext_len, flags))) if ext_len > 0 => {
                let stop = offset + u64::from(ext_len.min(want));
                Ok(if flags & c::STATE_ZERO != 0 {
                    Allocation::Hole { end: stop }
                } else {
                    Allocation::Data { end: stop }
                })
            }
            // No usable extent: the server cannot tell.
            _ => Ok(Allocation::Data { end }),
        }
    }

    fn path(&self) -> &str {
        &self.uri_text
    }
}

impl Drop for NbdBackend {
    fn drop(&mut self) {
        let link = self.link.get_mut().unwrap_or_else(PoisonError::into_inner);
        let Some(conn) = link.conn.take() else {
            return;
        };
        if !conn.shared.is_lost() {
            let req = Request {
                flags: 0,
                command: Command::Disconnect,
                handle: self.next_handle.fetch_add(1, Ordering::Relaxed),
                offset: 0,
                length: 0,
            };
            // Best effort: the server may be gone already.
            let _ = write_request(&mut lock(&conn.writer), &req, &[]);
        }
        conn.kill(io::Error::new(
            io::ErrorKind::ConnectionAborted,
            "NBD backend closed",
        ));
        // Dropping the last reference joins the reader thread.
        drop(conn);
    }
}

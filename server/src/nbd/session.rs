//! One NBD connection: the fixed-newstyle handshake, then the transmission
//! phase.
//!
//! # Concurrency and backpressure
//!
//! The connection's reader task parses one request header at a time. Before
//! it reads a request it takes one of [`MAX_INFLIGHT_REQUESTS`] permits, and
//! before it reads (or allocates for) a payload it takes that many bytes of
//! [`MAX_INFLIGHT_BYTES`]; both travel with the request and are released when
//! its reply has been queued. A client that pipelines faster than the
//! volume absorbs therefore finds the server no longer reading its socket —
//! TCP (or the unix socket buffer) pushes back — instead of the server
//! buffering without limit.
//!
//! Each request runs as its own task on the engine's write path, so replies
//! go out in completion order, which the protocol allows. Replies are queued
//! to a single writer task, which owns the write half and flushes whenever
//! the queue runs dry, so small replies share system calls under load.
//!
//! A protocol violation the connection cannot recover from (bad magic, a
//! payload over 32 MiB whose bytes we would have to swallow, a truncated
//! header) closes this connection only; requests already running finish
//! first. Everything else gets an error reply and the connection goes on.

use super::errno::errno;
use blockmirror_engine::Engine;
use blockmirror_engine::error::{EngineError, Result as EngineResult};
use blockmirror_engine::limits::InflightPermit;
use blockmirror_engine::store::ExportRecord;
use blockmirror_engine::volume::Volume;
use blockmirror_nbd::consts::*;
use blockmirror_nbd::option::{self, ClientOption};
use blockmirror_nbd::reply;
use blockmirror_nbd::request::{Command, REQUEST_LEN, Request};
use blockmirror_nbd::{MAX_PAYLOAD_BYTES, WireError};
use bytes::Bytes;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Requests in flight per connection (QEMU's client uses up to 16; fio and
/// nbdcopy may use more). Past this, the server stops reading the socket.
pub const MAX_INFLIGHT_REQUESTS: usize = 128;
/// Payload bytes in flight per connection (writes being applied and reads
/// being sent). Two maximal requests fit.
pub const MAX_INFLIGHT_BYTES: u32 = 2 * MAX_PAYLOAD_BYTES;
/// Extents per BLOCK_STATUS reply.
const MAX_EXTENTS: usize = 1024;
/// Block sizes advertised: any 1-byte alignment works (the engine handles
/// unaligned writes), 4 KiB is preferred, 32 MiB the maximum payload.
const BLOCK_SIZE: (u32, u32, u32) = (1, 4096, MAX_PAYLOAD_BYTES);
/// Metadata context id of `base:allocation` on this connection.
const BASE_ALLOCATION_ID: u32 = 1;

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("socket")]
    Io(#[from] std::io::Error),
    #[error("protocol")]
    Wire(#[from] WireError),
}

/// What the handshake agreed on.
#[derive(Debug)]
struct Selected {
    export: ExportRecord,
    volume: Arc<Volume>,
    structured: bool,
    base_allocation: bool,
}

fn transmission_flags(read_only: bool, structured: bool) -> u16 {
    let mut f = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_SEND_CACHE;
    // A flush makes every completed write of every connection durable (it
    // syncs the backing file), which is what CAN_MULTI_CONN promises.
    f |= FLAG_CAN_MULTI_CONN;
    if read_only {
        f |= FLAG_READ_ONLY;
    } else {
        f |= FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES | FLAG_SEND_FAST_ZERO;
    }
    if structured {
        f |= FLAG_SEND_DF;
    }
    f
}

/// Serves one connection until the client leaves, breaks the protocol, or
/// the server shuts down.
pub async fn serve<S>(stream: S, engine: Arc<Engine>, peer: String, shutdown: CancellationToken)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut rd, mut wr) = tokio::io::split(stream);
    let selected = tokio::select! {
        r = handshake(&mut rd, &mut wr, &engine) => r,
        () = shutdown.cancelled() => return,
    };
    match selected {
        Ok(Some(sel)) => {
            tracing::debug!(%peer, export = %sel.export.name, structured = sel.structured, "NBD transmission");
            if let Err(e) = transmission(rd, wr, sel, shutdown).await {
                tracing::debug!(%peer, error = %error_chain(&e), "NBD connection closed");
            }
        }
        Ok(None) => tracing::debug!(%peer, "NBD handshake ended without an export"),
        Err(e) => tracing::debug!(%peer, error = %error_chain(&e), "NBD handshake failed"),
    }
}

fn error_chain(e: &SessionError) -> String {
    match e {
        SessionError::Io(e) => format!("socket: {e}"),
        SessionError::Wire(e) => format!("protocol: {e}"),
    }
}

async fn send<W: AsyncWrite + Unpin>(wr: &mut W, bytes: &[u8]) -> Result<(), SessionError> {
    wr.write_all(bytes).await?;
    wr.flush().await?;
    Ok(())
}

async fn handshake<R, W>(
    rd: &mut R,
    wr: &mut W,
    engine: &Engine,
) -> Result<Option<Selected>, SessionError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    send(wr, &option::greeting()).await?;
    let client_flags = rd.read_u32().await?;
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(WireError::Invalid("client flags").into());
    }
    let no_zeroes = client_flags & FLAG_C_NO_ZEROES != 0;
    let mut structured = false;
    let mut base_allocation = false;
    loop {
        let mut hdr = [0u8; option::OPTION_HEADER_LEN];
        rd.read_exact(&mut hdr).await?;
        let (opt, len) = option::parse_option_header(&hdr)?;
        let mut data = vec![0u8; len as usize];
        rd.read_exact(&mut data).await?;
        let parsed = match option::parse_option(opt, &data) {
            Ok(o) => o,
            Err(e) => {
                send(wr, &option_error(opt, REP_ERR_INVALID, &e.to_string())).await?;
                continue;
            }
        };
        match parsed {
            ClientOption::ExportName(name) => {
                // No way to report an error here: close on an unknown export.
                let Ok((export, volume)) = engine.export(&name) else {
                    return Ok(None);
                };
                let flags = transmission_flags(export.read_only, structured);
                send(
                    wr,
                    &option::export_name_reply(volume.size(), flags, no_zeroes),
                )
                .await?;
                return Ok(Some(Selected {
                    export,
                    volume,
                    structured,
                    base_allocation,
                }));
            }
            ClientOption::Abort => {
                // The client may already be gone; the ack is a courtesy.
                let _ = send(wr, &option::option_reply(opt, REP_ACK, &[])).await;
                return Ok(None);
            }
            ClientOption::List => {
                let mut out = Vec::new();
                for e in engine.list_exports() {
                    out.extend(option::server_entry(opt, &e.name));
                }
                out.extend(option::option_reply(opt, REP_ACK, &[]));
                send(wr, &out).await?;
            }
            ClientOption::StartTls => {
                send(
                    wr,
                    &option_error(opt, REP_ERR_POLICY, "TLS is not offered on this listener"),
                )
                .await?;
            }
            ClientOption::StructuredReply => {
                structured = true;
                send(wr, &option::option_reply(opt, REP_ACK, &[])).await?;
            }
            ClientOption::Info { name, requests } | ClientOption::Go { name, requests } => {
                let go = opt == OPT_GO;
                let Ok((export, volume)) = engine.export(&name) else {
                    send(
                        wr,
                        &option_error(
                            opt,
                            REP_ERR_UNKNOWN,
                            &format!("export {name:?} does not exist"),
                        ),
                    )
                    .await?;
                    continue;
                };
                let flags = transmission_flags(export.read_only, structured);
                let mut out = option::info_export(opt, volume.size(), flags);
                if requests.contains(&INFO_NAME) {
                    out.extend(option::info_name(opt, &export.name));
                }
                out.extend(option::info_block_size(
                    opt,
                    BLOCK_SIZE.0,
                    BLOCK_SIZE.1,
                    BLOCK_SIZE.2,
                ));
                out.extend(option::option_reply(opt, REP_ACK, &[]));
                send(wr, &out).await?;
                if go {
                    return Ok(Some(Selected {
                        export,
                        volume,
                        structured,
                        base_allocation,
                    }));
                }
            }
            ClientOption::ListMetaContext { name, queries }
            | ClientOption::SetMetaContext { name, queries } => {
                let set = opt == OPT_SET_META_CONTEXT;
                if set && !structured {
                    send(
                        wr,
                        &option_error(
                            opt,
                            REP_ERR_INVALID,
                            "meta contexts need structured replies first",
                        ),
                    )
                    .await?;
                    continue;
                }
                if engine.export(&name).is_err() {
                    send(
                        wr,
                        &option_error(
                            opt,
                            REP_ERR_UNKNOWN,
                            &format!("export {name:?} does not exist"),
                        ),
                    )
                    .await?;
                    continue;
                }
                let wanted = if set {
                    queries.iter().any(|q| q == BASE_ALLOCATION)
                } else {
                    queries.is_empty()
                        || queries.iter().any(|q| q == BASE_ALLOCATION || q == "base:")
                };
                let mut out = Vec::new();
                if wanted {
                    out.extend(option::meta_context(
                        opt,
                        if set { BASE_ALLOCATION_ID } else { 0 },
                        BASE_ALLOCATION,
                    ));
                }
                if set {
                    base_allocation = wanted;
                }
                out.extend(option::option_reply(opt, REP_ACK, &[]));
                send(wr, &out).await?;
            }
            ClientOption::Unknown(o) => {
                send(
                    wr,
                    &option_error(o, REP_ERR_UNSUP, &format!("option {o} is not supported")),
                )
                .await?;
            }
        }
    }
}

fn option_error(opt: u32, code: u32, msg: &str) -> Vec<u8> {
    option::option_reply(opt, code, msg.as_bytes())
}

/// A reply ready to write: header and payload parts, plus the permits it
/// releases once queued.
type ReplyParts = Vec<Bytes>;

/// Socket read buffer: a pipelining client's headers and small payloads
/// arrive many per system call instead of two calls per request. Bigger
/// payloads bypass it.
const READ_BUFFER_BYTES: usize = 64 << 10;

async fn transmission<R, W>(
    rd: R,
    wr: W,
    sel: Selected,
    shutdown: CancellationToken,
) -> Result<(), SessionError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    // Bounded by MAX_INFLIGHT_REQUESTS: each request queues one reply.
    let (tx, rx) = mpsc::channel::<ReplyParts>(MAX_INFLIGHT_REQUESTS);
    let writer = tokio::spawn(write_replies(wr, rx));
    let requests = Arc::new(Semaphore::new(MAX_INFLIGHT_REQUESTS));
    let bytes = Arc::new(Semaphore::new(MAX_INFLIGHT_BYTES as usize));
    let sel = Arc::new(sel);
    let mut rd = BufReader::with_capacity(READ_BUFFER_BYTES, rd);
    let result = loop {
        let request_permit = tokio::select! {
            p = Arc::clone(&requests).acquire_owned() => p.expect("semaphore never closed"),
            () = shutdown.cancelled() => break Ok(()),
        };
        let mut hdr = [0u8; REQUEST_LEN];
        tokio::select! {
            r = rd.read_exact(&mut hdr) => {
                if let Err(e) = r {
                    // A client that hangs up between requests is a normal end.
                    break if e.kind() == std::io::ErrorKind::UnexpectedEof { Ok(()) } else { Err(e.into()) };
                }
            }
            () = shutdown.cancelled() => break Ok(()),
        }
        let req = match Request::parse(&hdr) {
            Ok(r) => r,
            Err(e) => break Err(e.into()),
        };
        let payload_bytes = match req.command {
            Command::Write | Command::Read => req.length.min(MAX_PAYLOAD_BYTES),
            _ => 0,
        };
        let bytes_permit = Arc::clone(&bytes)
            .acquire_many_owned(payload_bytes)
            .await
            .expect("semaphore never closed");
        let data = match req.command {
            Command::Disconnect => break Ok(()),
            Command::Write if req.length > MAX_PAYLOAD_BYTES => {
                // We would have to swallow up to 4 GiB to stay in step.
                break Err(WireError::TooLong {
                    what: "write payload",
                    len: u64::from(req.length),
                    max: u64::from(MAX_PAYLOAD_BYTES),
                }
                .into());
            }
            Command::Write if req.length > WRITE_SLICE_BYTES => {
                match read_sliced_write(&mut rd, &sel, &req).await {
                    Ok(payload) => Some(payload),
                    Err(e) => break Err(e.into()),
                }
            }
            Command::Write => {
                // A mirror job on the volume bounds all the bytes it holds,
                // request buffers included, and the volume bounds them when
                // no job runs: wait for that budget before reading the
                // payload, so the client feels the bound.
                let reserved = sel.volume.reserve_write(u64::from(req.length)).await;
                let mut buf = sel.volume.payload_buffer(req.length as usize);
                if let Err(e) = rd.read_exact(buf.as_mut_slice()).await {
                    break Err(e.into());
                }
                Some(Payload::Whole(buf.freeze(), reserved))
            }
            _ => None,
        };
        let tx = tx.clone();
        let sel = Arc::clone(&sel);
        tokio::spawn(async move {
            let parts = handle(&sel, req, data).await;
            // The writer is gone only if the connection broke; nothing to tell.
            let _ = tx.send(parts).await;
            drop((request_permit, bytes_permit));
        });
    };
    // Let running requests finish and their replies go out.
    drop(tx);
    match writer.await {
        Ok(Ok(())) | Err(_) => {}
        Ok(Err(e)) => tracing::debug!(error = %e, "NBD reply writer"),
    }
    result
}

async fn write_replies<W: AsyncWrite + Unpin>(
    wr: W,
    mut rx: mpsc::Receiver<ReplyParts>,
) -> std::io::Result<()> {
    let mut wr = BufWriter::with_capacity(256 << 10, wr);
    while let Some(parts) = rx.recv().await {
        for p in &parts {
            wr.write_all(p).await?;
        }
        // Coalesce: flush only when no further reply is ready.
        while let Ok(parts) = rx.try_recv() {
            for p in &parts {
                wr.write_all(p).await?;
            }
        }
        wr.flush().await?;
    }
    wr.shutdown().await
}

enum Outcome {
    Done,
    Data(Bytes),
    Extents(Vec<(u64, bool)>),
    Error(u32, String),
}

/// A write request's payload, as the reader hands it to the request task.
enum Payload {
    /// The whole payload, and the budget it was read under.
    Whole(Bytes, InflightPermit),
    /// A write over [`WRITE_SLICE_BYTES`], already being applied slice by
    /// slice as it was read.
    Sliced(Vec<JoinHandle<EngineResult<()>>>),
    /// Read and dropped: the write is refused (read-only export, bad range).
    Discarded,
}

/// Big writes are read and applied in slices of this size, each under the
/// mirror job's (or the volume's) budget, so a 32 MiB request holds 1 MiB
/// at a time instead of 32 (the memory bound holds whatever the request
/// size).
const WRITE_SLICE_BYTES: u32 = 1 << 20;

/// Reads a big write's payload slice by slice; each slice waits for the
/// budget before it is read and is written while the next one is
/// read. A write the request task will refuse is read and dropped.
async fn read_sliced_write<R: AsyncRead + Unpin>(
    rd: &mut R,
    sel: &Selected,
    req: &Request,
) -> std::io::Result<Payload> {
    let len = u64::from(req.length);
    let refused = sel.export.read_only || sel.volume.check_range(req.offset, len).is_err();
    let mut slices = Vec::new();
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(u64::from(WRITE_SLICE_BYTES));
        let reserved = if refused {
            None
        } else {
            Some(sel.volume.reserve_write(n).await)
        };
        // n <= WRITE_SLICE_BYTES, which fits usize.
        let mut buf = sel
            .volume
            .payload_buffer(usize::try_from(n).unwrap_or(usize::MAX));
        rd.read_exact(buf.as_mut_slice()).await?;
        if let Some(reserved) = reserved {
            let volume = Arc::clone(&sel.volume);
            let offset = req.offset + done;
            slices.push(tokio::spawn(async move {
                volume
                    .write_reserved(offset, buf.freeze(), false, reserved)
                    .await
            }));
        }
        done += n;
    }
    Ok(if refused {
        Payload::Discarded
    } else {
        Payload::Sliced(slices)
    })
}

/// Waits for every slice of a sliced write; the first error wins. With
/// FUA, one flush afterwards makes all of them durable.
async fn finish_sliced_write(
    v: &Volume,
    slices: Vec<JoinHandle<EngineResult<()>>>,
    fua: bool,
) -> EngineResult<()> {
    let mut result = Ok(());
    for slice in slices {
        let r = slice.await.unwrap_or_else(|e| {
            Err(EngineError::io(
                "writing",
                std::io::Error::other(e.to_string()),
            ))
        });
        if result.is_ok() {
            result = r;
        }
    }
    result?;
    if fua { v.flush().await } else { Ok(()) }
}

async fn run(sel: &Selected, req: &Request, data: Option<Payload>) -> Outcome {
    let v = &sel.volume;
    let writes = matches!(
        req.command,
        Command::Write | Command::Trim | Command::WriteZeroes
    );
    if writes && sel.export.read_only {
        return Outcome::Error(EPERM, format!("export {:?} is read-only", sel.export.name));
    }
    let fua = req.has(CMD_FLAG_FUA);
    let len = u64::from(req.length);
    let result = match req.command {
        Command::Read if req.length > MAX_PAYLOAD_BYTES => {
            return Outcome::Error(
                EINVAL,
                format!("read of {} bytes exceeds {MAX_PAYLOAD_BYTES}", req.length),
            );
        }
        Command::Read => v.read(req.offset, len).await.map(Outcome::Data),
        Command::Write => match data {
            Some(Payload::Whole(bytes, reserved)) => v
                .write_reserved(req.offset, bytes, fua, reserved)
                .await
                .map(|()| Outcome::Done),
            Some(Payload::Sliced(slices)) => finish_sliced_write(v, slices, fua)
                .await
                .map(|()| Outcome::Done),
            // Only a bad range gets here (read-only was refused above).
            Some(Payload::Discarded) | None => v
                .check_range(req.offset, len)
                .map(|()| Outcome::Error(EINVAL, "write payload missing".into())),
        },
        Command::Flush => v.flush().await.map(|()| Outcome::Done),
        Command::Trim => v
            .discard(req.offset, len, fua)
            .await
            .map(|()| Outcome::Done),
        Command::WriteZeroes => v
            .write_zeroes(req.offset, len, req.has(CMD_FLAG_NO_HOLE), fua)
            .await
            .map(|()| Outcome::Done),
        Command::Cache => match req.end() {
            Some(end) if end <= v.size() => Ok(Outcome::Done),
            _ => return Outcome::Error(EINVAL, "cache range is past the end".into()),
        },
        Command::BlockStatus if !sel.base_allocation => {
            return Outcome::Error(EINVAL, "no metadata context was negotiated".into());
        }
        Command::BlockStatus => {
            let max = if req.has(CMD_FLAG_REQ_ONE) {
                1
            } else {
                MAX_EXTENTS
            };
            v.block_status(req.offset, len, max)
                .await
                .map(Outcome::Extents)
        }
        Command::Disconnect | Command::Unknown(_) => {
            return Outcome::Error(
                EINVAL,
                format!("command {} is not supported", req.command.to_wire()),
            );
        }
    };
    result.unwrap_or_else(|e| Outcome::Error(errno(&e, writes), e.chain()))
}

/// Runs a request and encodes its reply.
async fn handle(sel: &Selected, req: Request, data: Option<Payload>) -> ReplyParts {
    let h = req.handle;
    match (run(sel, &req, data).await, sel.structured) {
        (Outcome::Data(d), true) => {
            // Reads are at most 32 MiB, so the length fits u32.
            let n = u32::try_from(d.len()).unwrap_or(u32::MAX);
            vec![
                Bytes::from(reply::offset_data_header(h, req.offset, n, true)),
                d,
            ]
        }
        (Outcome::Data(d), false) => vec![Bytes::copy_from_slice(&reply::simple(h, 0)), d],
        (Outcome::Extents(ext), true) => {
            let desc: Vec<(u32, u32)> = ext
                .into_iter()
                .map(|(l, hole)| {
                    let flags = if hole { STATE_HOLE | STATE_ZERO } else { 0 };
                    // Extents lie inside the request, whose length is a u32.
                    (u32::try_from(l).unwrap_or(u32::MAX), flags)
                })
                .collect();
            vec![Bytes::from(reply::block_status(
                h,
                BASE_ALLOCATION_ID,
                &desc,
            ))]
        }
        (Outcome::Error(code, msg), true)
            if matches!(req.command, Command::Read | Command::BlockStatus) =>
        {
            vec![Bytes::from(reply::error(h, code, &msg))]
        }
        (Outcome::Error(code, msg), _) => {
            tracing::debug!(handle = h, code, error = %msg, "NBD request failed");
            vec![Bytes::copy_from_slice(&reply::simple(h, code))]
        }
        (Outcome::Done | Outcome::Extents(_), _) => {
            vec![Bytes::copy_from_slice(&reply::simple(h, 0))]
        }
    }
}

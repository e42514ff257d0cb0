//! The reader thread of a connection: reads simple replies and structured
//! reply chunks, fills the pending requests they answer and completes them.

use super::conn::{Shared, Slot, SlotKind};
use super::stream::Stream;
use super::{protocol_error, wire_error};
use blockmirror_nbd::Reader;
use blockmirror_nbd::consts as c;
use blockmirror_nbd::reply::{self, ReplyHeader};
use std::io::{self, BufReader, Read};
use std::ops::Range;
use std::sync::Arc;

/// Receive buffer of the reader thread (reply headers are 16–20 bytes;
/// large data reads bypass the buffer).
const READER_BUF_BYTES: usize = 256 << 10;
/// Largest payload of a structured chunk that is not read data (error
/// messages, block status); anything longer is a protocol violation.
const MAX_CHUNK_META_BYTES: u32 = 1 << 20;

/// The local error for an NBD error value (Linux numbering on the wire).
fn errno_error(value: u32) -> io::Error {
    let errno = match value {
        c::EPERM => libc::EPERM,
        c::EIO => libc::EIO,
        c::ENOMEM => libc::ENOMEM,
        c::EINVAL => libc::EINVAL,
        c::ENOSPC => libc::ENOSPC,
        c::EOVERFLOW => libc::EOVERFLOW,
        c::ENOTSUP => libc::ENOTSUP,
        c::ESHUTDOWN => libc::ESHUTDOWN,
        // Values outside the protocol's list: report a generic I/O error.
        _ => libc::EIO,
    };
    io::Error::from_raw_os_error(errno)
}

/// The reader thread: completes requests until the connection fails.
pub(super) fn reader_main(stream: Stream, shared: Arc<Shared>, structured: bool, uri: String) {
    let mut r = BufReader::with_capacity(READER_BUF_BYTES, stream);
    let cause = loop {
        if let Err(e) = read_reply(&mut r, &shared, structured) {
            break e;
        }
    };
    let message = cause.to_string();
    if shared.fail_all(cause) {
        tracing::warn!(uri = %uri, error = %message, "NBD connection lost");
    } else {
        tracing::debug!(uri = %uri, "NBD reader thread exiting");
    }
}

/// Reads one simple reply or one structured chunk.
fn read_reply(r: &mut impl Read, shared: &Shared, structured: bool) -> io::Result<()> {
    let mut head = [0u8; reply::STRUCTURED_HEADER_LEN];
    let (magic_bytes, rest) = head.split_at_mut(4);
    r.read_exact(magic_bytes)?;
    let magic = u32::from_be_bytes([
        magic_bytes[0],
        magic_bytes[1],
        magic_bytes[2],
        magic_bytes[3],
    ]);
    let rest = rest
        .get_mut(..reply::header_rest_len(magic).map_err(wire_error)?)
        .ok_or_else(|| protocol_error("reply header length"))?;
    r.read_exact(rest)?;
    match reply::parse_header(magic, rest).map_err(wire_error)? {
        ReplyHeader::Simple { error, handle } => {
            let mut slot = shared.take(handle).ok_or_else(|| {
                protocol_error(format!("simple reply for unknown handle {handle}"))
            })?;
            if error != 0 {
                slot.error = Some(errno_error(error));
            } else if let SlotKind::Read { data, .. } = &mut slot.kind {
                // With structured replies a simple reply to a read may only
                // carry an error: whether data follows is unknowable.
                let read = if structured {
                    Err(protocol_error(
                        "simple reply with data after structured replies were negotiated",
                    ))
                } else {
                    r.read_exact(data)
                };
                if let Err(e) = read {
                    shared.put_back(handle, slot);
                    return Err(e);
                }
            }
            slot.finish();
            Ok(())
        }
        ReplyHeader::Structured {
            flags,
            ty,
            handle,
            length,
        } => {
            if !structured {
                return Err(protocol_error("structured reply chunk without negotiation"));
            }
            let mut slot = shared.take(handle).ok_or_else(|| {
                protocol_error(format!("reply chunk for unknown handle {handle}"))
            })?;
            if let Err(e) = read_chunk(r, &mut slot, ty, length) {
                shared.put_back(handle, slot);
                return Err(e);
            }
            if flags & c::REPLY_FLAG_DONE != 0 {
                slot.finish();
            } else {
                shared.put_back(handle, slot);
            }
            Ok(())
        }
    }
}

/// The part of a read buffer that `[offset, offset + len)` covers, for a
/// read of `buf_len` bytes at `base`; `None` if it lies outside.
pub(super) fn chunk_range(
    base: u64,
    buf_len: usize,
    offset: u64,
    len: u64,
) -> Option<Range<usize>> {
    let start = offset.checked_sub(base)?;
    let end = start.checked_add(len)?;
    if end > buf_len as u64 {
        return None;
    }
    Some(usize::try_from(start).ok()?..usize::try_from(end).ok()?)
}

fn read_payload(r: &mut impl Read, length: u32) -> io::Result<Vec<u8>> {
    if length > MAX_CHUNK_META_BYTES {
        return Err(protocol_error(format!("reply chunk of {length} bytes")));
    }
    let mut data = vec![0u8; usize::try_from(length).map_err(|_| protocol_error("chunk length"))?];
    r.read_exact(&mut data)?;
    Ok(data)
}

/// Reads one structured chunk's payload into `slot`.
fn read_chunk(r: &mut impl Read, slot: &mut Slot, ty: u16, length: u32) -> io::Result<()> {
    match ty {
        c::REPLY_TYPE_OFFSET_DATA => {
            let SlotKind::Read { offset: base, data } = &mut slot.kind else {
                return Err(protocol_error(
                    "data chunk for a request that is not a read",
                ));
            };
            let data_len = length
                .checked_sub(8)
                .ok_or_else(|| protocol_error("data chunk shorter than its offset"))?;
            let mut off = [0u8; 8];
            r.read_exact(&mut off)?;
            let range = chunk_range(
                *base,
                data.len(),
                u64::from_be_bytes(off),
                u64::from(data_len),
            )
            .ok_or_else(|| protocol_error("data chunk outside the requested range"))?;
            let dst = data
                .get_mut(range)
                .ok_or_else(|| protocol_error("data chunk outside the requested range"))?;
            r.read_exact(dst)
        }
        c::REPLY_TYPE_OFFSET_HOLE => {
            let SlotKind::Read { offset: base, data } = &mut slot.kind else {
                return Err(protocol_error(
                    "hole chunk for a request that is not a read",
                ));
            };
            if length != 12 {
                return Err(protocol_error("hole chunk of the wrong length"));
            }
            let mut p = [0u8; 12];
            r.read_exact(&mut p)?;
            let mut rd = Reader::new(&p, "hole chunk");
            let off = rd.u64().map_err(wire_error)?;
            let len = rd.u32().map_err(wire_error)?;
            let range = chunk_range(*base, data.len(), off, u64::from(len))
                .ok_or_else(|| protocol_error("hole chunk outside the requested range"))?;
            if let Some(dst) = data.get_mut(range) {
                dst.fill(0);
            }
            Ok(())
        }
        c::REPLY_TYPE_NONE => {
            io::copy(&mut r.by_ref().take(u64::from(length)), &mut io::sink())?;
            Ok(())
        }
        c::REPLY_TYPE_BLOCK_STATUS => {
            let payload = read_payload(r, length)?;
            let mut rd = Reader::new(&payload, "block status chunk");
            let ctx = rd.u32().map_err(wire_error)?;
            if let SlotKind::Status { context, extent } = &mut slot.kind
                && ctx == *context
                && extent.is_none()
                && rd.remaining() >= 8
            {
                *extent = Some((rd.u32().map_err(wire_error)?, rd.u32().map_err(wire_error)?));
            }
            Ok(())
        }
        t if t & (1 << 15) != 0 => {
            // ERROR, ERROR_OFFSET, or an error type this client does not
            // know: all start with the error value and a message.
            let payload = read_payload(r, length)?;
            let mut rd = Reader::new(&payload, "error chunk");
            let errno = rd.u32().unwrap_or(c::EIO);
            let message = rd
                .u16()
                .and_then(|n| rd.take(usize::from(n)))
                .map(|m| String::from_utf8_lossy(m).into_owned())
                .unwrap_or_default();
            tracing::debug!(errno, message = %message, "NBD server reported an error");
            slot.error
                .get_or_insert_with(|| errno_error(if errno == 0 { c::EIO } else { errno }));
            Ok(())
        }
        other => {
            io::copy(&mut r.by_ref().take(u64::from(length)), &mut io::sink())?;
            slot.error
                .get_or_insert_with(|| protocol_error(format!("unknown reply chunk type {other}")));
            Ok(())
        }
    }
}

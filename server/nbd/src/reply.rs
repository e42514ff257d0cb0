//! Transmission-phase replies: simple, and structured chunks.

use crate::consts::*;
use crate::{Reader, WireError};

/// Bytes of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Bytes of a structured reply chunk header.
pub const STRUCTURED_HEADER_LEN: usize = 20;

/// A simple reply header (data follows for a successful read).
pub fn simple(handle: u64, error: u32) -> [u8; SIMPLE_REPLY_LEN] {
    let mut out = [0u8; SIMPLE_REPLY_LEN];
    out[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&error.to_be_bytes());
    out[8..].copy_from_slice(&handle.to_be_bytes());
    out
}

fn chunk_header(out: &mut Vec<u8>, flags: u16, ty: u16, handle: u64, len: u32) {
    out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&ty.to_be_bytes());
    out.extend_from_slice(&handle.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
}

fn done(last: bool) -> u16 {
    if last { REPLY_FLAG_DONE } else { 0 }
}

/// The header (and offset) of an `OFFSET_DATA` chunk; `data_len` bytes of
/// data follow it.
pub fn offset_data_header(handle: u64, offset: u64, data_len: u32, last: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(STRUCTURED_HEADER_LEN + 8);
    chunk_header(
        &mut out,
        done(last),
        REPLY_TYPE_OFFSET_DATA,
        handle,
        data_len.saturating_add(8),
    );
    out.extend_from_slice(&offset.to_be_bytes());
    out
}

/// A `NONE` chunk that ends a reply.
pub fn none(handle: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(STRUCTURED_HEADER_LEN);
    chunk_header(&mut out, REPLY_FLAG_DONE, REPLY_TYPE_NONE, handle, 0);
    out
}

/// An `ERROR` chunk ending a reply, with a human-readable message.
pub fn error(handle: u64, error: u32, message: &str) -> Vec<u8> {
    let msg = &message.as_bytes()[..message.len().min(4096)];
    // msg is at most 4096 bytes.
    let msg_len = u16::try_from(msg.len()).unwrap_or(u16::MAX);
    let mut out = Vec::with_capacity(STRUCTURED_HEADER_LEN + 6 + msg.len());
    chunk_header(
        &mut out,
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        handle,
        6 + u32::from(msg_len),
    );
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&msg_len.to_be_bytes());
    out.extend_from_slice(msg);
    out
}

/// A `BLOCK_STATUS` chunk ending a reply: (length, flags) descriptors.
pub fn block_status(handle: u64, context_id: u32, extents: &[(u32, u32)]) -> Vec<u8> {
    let len = 4 + 8 * extents.len();
    let mut out = Vec::with_capacity(STRUCTURED_HEADER_LEN + len);
    chunk_header(
        &mut out,
        REPLY_FLAG_DONE,
        REPLY_TYPE_BLOCK_STATUS,
        handle,
        u32::try_from(len).unwrap_or(u32::MAX),
    );
    out.extend_from_slice(&context_id.to_be_bytes());
    for (l, f) in extents {
        out.extend_from_slice(&l.to_be_bytes());
        out.extend_from_slice(&f.to_be_bytes());
    }
    out
}

/// A reply header as a client parses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    /// A simple reply.
    Simple {
        /// 0 or an error value.
        error: u32,
        /// The request's cookie.
        handle: u64,
    },
    /// One structured chunk; `length` payload bytes follow.
    Structured {
        /// Chunk flags.
        flags: u16,
        /// Chunk type.
        ty: u16,
        /// The request's cookie.
        handle: u64,
        /// Payload length.
        length: u32,
    },
}

/// Bytes a reply header needs after its 4-byte magic.
///
/// # Errors
/// An unknown magic.
pub fn header_rest_len(magic: u32) -> Result<usize, WireError> {
    match magic {
        SIMPLE_REPLY_MAGIC => Ok(SIMPLE_REPLY_LEN - 4),
        STRUCTURED_REPLY_MAGIC => Ok(STRUCTURED_HEADER_LEN - 4),
        other => Err(WireError::BadMagic {
            found: u64::from(other),
            expected: u64::from(SIMPLE_REPLY_MAGIC),
        }),
    }
}

/// Parses a reply header: the magic, then the rest.
///
/// # Errors
/// An unknown magic or a short buffer.
pub fn parse_header(magic: u32, rest: &[u8]) -> Result<ReplyHeader, WireError> {
    let mut r = Reader::new(rest, "reply header");
    match magic {
        SIMPLE_REPLY_MAGIC => Ok(ReplyHeader::Simple {
            error: r.u32()?,
            handle: r.u64()?,
        }),
        STRUCTURED_REPLY_MAGIC => Ok(ReplyHeader::Structured {
            flags: r.u16()?,
            ty: r.u16()?,
            handle: r.u64()?,
            length: r.u32()?,
        }),
        other => Err(WireError::BadMagic {
            found: u64::from(other),
            expected: u64::from(SIMPLE_REPLY_MAGIC),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_parse_back() {
        let s = simple(7, EIO);
        assert_eq!(
            parse_header(SIMPLE_REPLY_MAGIC, &s[4..]).unwrap(),
            ReplyHeader::Simple {
                error: EIO,
                handle: 7
            }
        );
        let c = offset_data_header(9, 4096, 512, true);
        assert_eq!(
            parse_header(STRUCTURED_REPLY_MAGIC, &c[4..20]).unwrap(),
            ReplyHeader::Structured {
                flags: REPLY_FLAG_DONE,
                ty: REPLY_TYPE_OFFSET_DATA,
                handle: 9,
                length: 520
            }
        );
        let e = error(3, EINVAL, "bad");
        assert_eq!(e.len(), 20 + 6 + 3);
        assert!(header_rest_len(1).is_err());
        let b = block_status(1, 1, &[(4096, STATE_HOLE | STATE_ZERO)]);
        assert_eq!(b.len(), 20 + 4 + 8);
    }
}

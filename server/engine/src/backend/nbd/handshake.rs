//! The handshake: fixed newstyle option negotiation up to the transmission
//! phase, and what it learns about the export ([`ExportInfo`]).

use super::stream::Stream;
use super::uri::NbdUri;
use super::{protocol_error, wire_error};
use crate::error::{EngineError, ErrorKind};
use blockmirror_nbd::consts as c;
use blockmirror_nbd::option as opt;
use blockmirror_nbd::{MAX_OPTION_BYTES, MAX_PAYLOAD_BYTES, Reader};
use std::io::{self, Read, Write};

/// Option replies accepted for one option before the server is deemed broken.
const MAX_OPTION_REPLIES: usize = 256;
/// Largest minimum block size the protocol allows.
const MAX_MIN_BLOCK: u32 = 64 << 10;

/// What the handshake learnt about the export and the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct ExportInfo {
    /// Export size in bytes.
    pub(super) size: u64,
    /// Transmission flags (`FLAG_*`); zero unless `HAS_FLAGS` was set.
    pub(super) flags: u16,
    /// Structured replies were negotiated.
    pub(super) structured: bool,
    /// Context id of `base:allocation`, if the server serves it.
    pub(super) allocation_context: Option<u32>,
    /// Requests must be aligned to this (a power of two, 1 when unconstrained).
    pub(super) min_block: u32,
    /// Largest read or write sent in one request: the server's maximum,
    /// capped at 32 MiB, a multiple of `min_block`.
    pub(super) max_piece: u32,
}

impl ExportInfo {
    pub(super) fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }
}

/// Why a handshake failed.
#[derive(Debug)]
pub(super) enum HandshakeError {
    /// Transport failure or protocol violation.
    Io(io::Error),
    /// The server refused the export with an `NBD_REP_ERR_*` reply.
    Refused { reply: u32, message: String },
}

impl From<io::Error> for HandshakeError {
    fn from(e: io::Error) -> Self {
        Self::Io(e)
    }
}

impl HandshakeError {
    pub(super) fn into_engine(self, uri: &NbdUri) -> EngineError {
        let export = uri.export();
        match self {
            Self::Io(e) => EngineError::io(format!("NBD handshake with {uri}"), e),
            Self::Refused { reply, message } => {
                let name = reply_name(reply);
                match reply {
                    c::REP_ERR_UNKNOWN => EngineError::io(
                        format!("NBD server at {uri} has no export {export:?}"),
                        io::Error::new(io::ErrorKind::NotFound, message),
                    ),
                    c::REP_ERR_SHUTDOWN => EngineError::new(
                        ErrorKind::Unavailable,
                        format!("NBD server at {uri} is shutting down ({name}): {message}"),
                    ),
                    c::REP_ERR_UNSUP
                    | c::REP_ERR_POLICY
                    | c::REP_ERR_INVALID
                    | c::REP_ERR_TLS_REQD
                    | c::REP_ERR_BLOCK_SIZE_REQD
                    | c::REP_ERR_TOO_BIG => EngineError::invalid(format!(
                        "NBD server at {uri} refused export {export:?} ({name}): {message}"
                    )),
                    _ => EngineError::io(
                        format!("NBD server at {uri} refused export {export:?} ({name})"),
                        io::Error::other(message),
                    ),
                }
            }
        }
    }
}

fn reply_name(reply: u32) -> &'static str {
    match reply {
        c::REP_ERR_UNSUP => "NBD_REP_ERR_UNSUP",
        c::REP_ERR_POLICY => "NBD_REP_ERR_POLICY",
        c::REP_ERR_INVALID => "NBD_REP_ERR_INVALID",
        c::REP_ERR_PLATFORM => "NBD_REP_ERR_PLATFORM",
        c::REP_ERR_TLS_REQD => "NBD_REP_ERR_TLS_REQD",
        c::REP_ERR_UNKNOWN => "NBD_REP_ERR_UNKNOWN",
        c::REP_ERR_SHUTDOWN => "NBD_REP_ERR_SHUTDOWN",
        c::REP_ERR_BLOCK_SIZE_REQD => "NBD_REP_ERR_BLOCK_SIZE_REQD",
        c::REP_ERR_TOO_BIG => "NBD_REP_ERR_TOO_BIG",
        _ => "an unknown error reply",
    }
}

/// One option reply: its type and payload.
struct OptionReply {
    reply: u32,
    data: Vec<u8>,
}

impl OptionReply {
    fn is_error(&self) -> bool {
        self.reply & c::REP_FLAG_ERROR != 0
    }

    fn refused(self) -> HandshakeError {
        HandshakeError::Refused {
            reply: self.reply,
            message: String::from_utf8_lossy(&self.data).into_owned(),
        }
    }
}

pub(super) fn send_option(s: &mut Stream, option: u32, data: &[u8]) -> io::Result<()> {
    s.write_all(&opt::encode_option(option, data))?;
    s.flush()
}

fn read_option_reply(s: &mut Stream, option: u32) -> io::Result<OptionReply> {
    let mut head = [0u8; opt::OPTION_REPLY_HEADER_LEN];
    s.read_exact(&mut head)?;
    let (answered, reply, len) = opt::parse_option_reply_header(&head).map_err(wire_error)?;
    if answered != option {
        return Err(protocol_error(format!(
            "option reply for option {answered} while waiting for option {option}"
        )));
    }
    if len > MAX_OPTION_BYTES {
        return Err(protocol_error(format!("option reply of {len} bytes")));
    }
    let mut data =
        vec![0u8; usize::try_from(len).map_err(|_| protocol_error("option reply length"))?];
    s.read_exact(&mut data)?;
    Ok(OptionReply { reply, data })
}

/// The payload of `NBD_OPT_SET_META_CONTEXT` for one query.
fn meta_context_query(export: &str, query: &str) -> Vec<u8> {
    let mut d = Vec::with_capacity(12 + export.len() + query.len());
    // Both are at most 4096 bytes (checked when the URI was parsed; the
    // query is a constant).
    d.extend_from_slice(
        &u32::try_from(export.len())
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    d.extend_from_slice(export.as_bytes());
    d.extend_from_slice(&1u32.to_be_bytes());
    d.extend_from_slice(&u32::try_from(query.len()).unwrap_or(u32::MAX).to_be_bytes());
    d.extend_from_slice(query.as_bytes());
    d
}

/// Fixed newstyle negotiation up to the transmission phase.
pub(super) fn handshake(s: &mut Stream, export: &str) -> Result<ExportInfo, HandshakeError> {
    let mut greeting = [0u8; opt::GREETING_LEN];
    s.read_exact(&mut greeting)?;
    let mut r = Reader::new(&greeting, "greeting");
    if r.u64().map_err(wire_error)? != c::NBDMAGIC {
        return Err(protocol_error("not an NBD server").into());
    }
    if r.u64().map_err(wire_error)? != c::IHAVEOPT {
        return Err(protocol_error(
            "the server speaks oldstyle negotiation, which is not supported",
        )
        .into());
    }
    let server_flags = r.u16().map_err(wire_error)?;
    if server_flags & c::FLAG_FIXED_NEWSTYLE == 0 {
        return Err(
            protocol_error("the server does not support fixed newstyle negotiation").into(),
        );
    }
    let no_zeroes = server_flags & c::FLAG_NO_ZEROES != 0;
    let client_flags = c::FLAG_C_FIXED_NEWSTYLE | if no_zeroes { c::FLAG_C_NO_ZEROES } else { 0 };
    s.write_all(&client_flags.to_be_bytes())?;

    send_option(s, c::OPT_STRUCTURED_REPLY, &[])?;
    let rep = read_option_reply(s, c::OPT_STRUCTURED_REPLY)?;
    let structured = match rep.reply {
        c::REP_ACK => true,
        _ if rep.is_error() => {
            tracing::debug!(
                reply = reply_name(rep.reply),
                "NBD server refused structured replies; using simple replies"
            );
            false
        }
        other => {
            return Err(
                protocol_error(format!("reply {other} to NBD_OPT_STRUCTURED_REPLY")).into(),
            );
        }
    };

    let mut allocation_context = None;
    if structured {
        send_option(
            s,
            c::OPT_SET_META_CONTEXT,
            &meta_context_query(export, c::BASE_ALLOCATION),
        )?;
        let mut done = false;
        for _ in 0..MAX_OPTION_REPLIES {
            let rep = read_option_reply(s, c::OPT_SET_META_CONTEXT)?;
            match rep.reply {
                c::REP_META_CONTEXT => {
                    let mut r = Reader::new(&rep.data, "NBD_REP_META_CONTEXT");
                    let id = r.u32().map_err(wire_error)?;
                    if r.take(r.remaining()).map_err(wire_error)? == c::BASE_ALLOCATION.as_bytes() {
                        allocation_context = Some(id);
                    }
                }
                c::REP_ACK => {
                    done = true;
                    break;
                }
                _ if rep.is_error() => {
                    tracing::debug!(
                        reply = reply_name(rep.reply),
                        "NBD server has no base:allocation"
                    );
                    allocation_context = None;
                    done = true;
                    break;
                }
                other => {
                    return Err(protocol_error(format!(
                        "reply {other} to NBD_OPT_SET_META_CONTEXT"
                    ))
                    .into());
                }
            }
        }
        if !done {
            return Err(protocol_error("too many replies to NBD_OPT_SET_META_CONTEXT").into());
        }
    }

    send_option(s, c::OPT_GO, &opt::encode_go(export, &[c::INFO_BLOCK_SIZE]))?;
    let mut export_info = None;
    let mut block_sizes = None;
    let mut acked = false;
    for _ in 0..MAX_OPTION_REPLIES {
        let rep = read_option_reply(s, c::OPT_GO)?;
        match rep.reply {
            c::REP_INFO => {
                let mut r = Reader::new(&rep.data, "NBD_REP_INFO");
                match r.u16().map_err(wire_error)? {
                    c::INFO_EXPORT => {
                        let size = r.u64().map_err(wire_error)?;
                        let flags = r.u16().map_err(wire_error)?;
                        export_info = Some((size, flags));
                    }
                    c::INFO_BLOCK_SIZE => {
                        let min = r.u32().map_err(wire_error)?;
                        let _preferred = r.u32().map_err(wire_error)?;
                        let max = r.u32().map_err(wire_error)?;
                        block_sizes = Some((min, max));
                    }
                    // Names and descriptions are of no use here.
                    _ => {}
                }
            }
            c::REP_ACK => {
                acked = true;
                break;
            }
            // A server too old for NBD_OPT_GO: select the export the old way.
            c::REP_ERR_UNSUP => {
                export_info = Some(export_name_fallback(s, export, no_zeroes)?);
                acked = true;
                break;
            }
            _ if rep.is_error() => return Err(rep.refused()),
            other => return Err(protocol_error(format!("reply {other} to NBD_OPT_GO")).into()),
        }
    }
    if !acked {
        return Err(protocol_error("too many replies to NBD_OPT_GO").into());
    }
    let (size, flags) = export_info
        .ok_or_else(|| protocol_error("NBD_OPT_GO acknowledged without NBD_INFO_EXPORT"))?;
    let flags = if flags & c::FLAG_HAS_FLAGS != 0 {
        flags
    } else {
        0
    };
    let (min_block, max_piece) = block_limits(block_sizes);
    Ok(ExportInfo {
        size,
        flags,
        structured,
        allocation_context: allocation_context.filter(|_| structured),
        min_block,
        max_piece,
    })
}

/// Minimum block and largest piece from `NBD_INFO_BLOCK_SIZE`, or the
/// protocol's defaults when absent or nonsensical.
fn block_limits(sizes: Option<(u32, u32)>) -> (u32, u32) {
    let (min, max) = match sizes {
        Some((min, max)) if min.is_power_of_two() && min <= MAX_MIN_BLOCK && max >= min => {
            (min, max)
        }
        _ => (1, MAX_PAYLOAD_BYTES),
    };
    let piece = max.min(MAX_PAYLOAD_BYTES) / min * min;
    (min, piece.max(min))
}

/// `NBD_OPT_EXPORT_NAME`: no error reply is possible; the server closes the
/// connection if the export does not exist.
fn export_name_fallback(
    s: &mut Stream,
    export: &str,
    no_zeroes: bool,
) -> Result<(u64, u16), HandshakeError> {
    send_option(s, c::OPT_EXPORT_NAME, export.as_bytes())?;
    let mut reply = [0u8; 10 + 124];
    let len = if no_zeroes { 10 } else { reply.len() };
    match s.read_exact(&mut reply[..len]) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            return Err(HandshakeError::Refused {
                reply: c::REP_ERR_UNKNOWN,
                message: "the server closed the connection after NBD_OPT_EXPORT_NAME".into(),
            });
        }
        Err(e) => return Err(e.into()),
    }
    let mut r = Reader::new(&reply[..10], "NBD_OPT_EXPORT_NAME reply");
    Ok((r.u64().map_err(wire_error)?, r.u16().map_err(wire_error)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_limits_are_sane() {
        assert_eq!(block_limits(None), (1, 32 << 20));
        assert_eq!(block_limits(Some((512, 1 << 20))), (512, 1 << 20));
        assert_eq!(block_limits(Some((4096, u32::MAX))), (4096, 32 << 20));
        assert_eq!(block_limits(Some((4096, 10_000))), (4096, 8192));
        assert_eq!(block_limits(Some((3, 4096))), (1, 32 << 20));
        assert_eq!(block_limits(Some((4096, 512))), (1, 32 << 20));
    }
}

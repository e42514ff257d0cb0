//! The handshake: the server's greeting, the client's options, the
//! server's option replies.

use crate::consts::*;
use crate::{MAX_OPTION_BYTES, Reader, WireError};

/// Bytes of the server's greeting.
pub const GREETING_LEN: usize = 18;
/// Bytes of an option header (IHAVEOPT, option, length).
pub const OPTION_HEADER_LEN: usize = 16;
/// Bytes of an option reply header.
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
/// Longest export name or query accepted (the document's limit is 4096).
pub const MAX_NAME_BYTES: usize = 4096;

/// The greeting of a fixed-newstyle server.
pub fn greeting() -> [u8; GREETING_LEN] {
    let mut out = [0u8; GREETING_LEN];
    out[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    out[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    out[16..].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    out
}

/// Parses an option header into (option, payload length).
///
/// # Errors
/// A wrong magic, or a payload longer than [`MAX_OPTION_BYTES`].
pub fn parse_option_header(buf: &[u8]) -> Result<(u32, u32), WireError> {
    let mut r = Reader::new(buf, "option header");
    let magic = r.u64()?;
    if magic != IHAVEOPT {
        return Err(WireError::BadMagic {
            found: magic,
            expected: IHAVEOPT,
        });
    }
    let opt = r.u32()?;
    let len = r.u32()?;
    if len > MAX_OPTION_BYTES {
        return Err(WireError::TooLong {
            what: "option payload",
            len: u64::from(len),
            max: u64::from(MAX_OPTION_BYTES),
        });
    }
    Ok((opt, len))
}

/// An option a client sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientOption {
    /// Old-style selection: no error reply possible.
    ExportName(String),
    /// End the handshake.
    Abort,
    /// List exports.
    List,
    /// TLS upgrade (not offered).
    StartTls,
    /// Describe an export.
    Info {
        /// Export name.
        name: String,
        /// Information types asked for.
        requests: Vec<u16>,
    },
    /// Describe and select an export.
    Go {
        /// Export name.
        name: String,
        /// Information types asked for.
        requests: Vec<u16>,
    },
    /// Use structured replies.
    StructuredReply,
    /// List matching metadata contexts.
    ListMetaContext {
        /// Export name.
        name: String,
        /// Queries (empty = all).
        queries: Vec<String>,
    },
    /// Select metadata contexts.
    SetMetaContext {
        /// Export name.
        name: String,
        /// Queries.
        queries: Vec<String>,
    },
    /// An option this codec does not know.
    Unknown(u32),
}

fn meta(r: &mut Reader<'_>) -> Result<(String, Vec<String>), WireError> {
    let name = r.string32(MAX_NAME_BYTES)?;
    let n = r.u32()?;
    // Each query needs at least its 4-byte length: bound n by what is left.
    if n as usize > r.remaining() / 4 {
        return Err(WireError::Invalid("meta context query count"));
    }
    let mut queries = Vec::with_capacity(n as usize);
    for _ in 0..n {
        queries.push(r.string32(MAX_NAME_BYTES)?);
    }
    r.finish()?;
    Ok((name, queries))
}

fn info(r: &mut Reader<'_>) -> Result<(String, Vec<u16>), WireError> {
    let name = r.string32(MAX_NAME_BYTES)?;
    let n = r.u16()?;
    let mut requests = Vec::with_capacity(usize::from(n).min(r.remaining() / 2));
    for _ in 0..n {
        requests.push(r.u16()?);
    }
    r.finish()?;
    Ok((name, requests))
}

/// Parses an option's payload.
///
/// # Errors
/// Malformed payloads (the server answers `NBD_REP_ERR_INVALID`).
pub fn parse_option(opt: u32, data: &[u8]) -> Result<ClientOption, WireError> {
    let mut r = Reader::new(data, "option payload");
    let empty = |r: &Reader<'_>, o| r.finish().map(|()| o);
    match opt {
        OPT_EXPORT_NAME => {
            if data.len() > MAX_NAME_BYTES {
                return Err(WireError::TooLong {
                    what: "export name",
                    len: data.len() as u64,
                    max: MAX_NAME_BYTES as u64,
                });
            }
            String::from_utf8(data.to_vec())
                .map(ClientOption::ExportName)
                .map_err(|_| WireError::Invalid("UTF-8 in export name"))
        }
        OPT_ABORT => empty(&r, ClientOption::Abort),
        OPT_LIST => empty(&r, ClientOption::List),
        OPT_STARTTLS => empty(&r, ClientOption::StartTls),
        OPT_STRUCTURED_REPLY => empty(&r, ClientOption::StructuredReply),
        OPT_INFO => info(&mut r).map(|(name, requests)| ClientOption::Info { name, requests }),
        OPT_GO => info(&mut r).map(|(name, requests)| ClientOption::Go { name, requests }),
        OPT_LIST_META_CONTEXT => {
            meta(&mut r).map(|(name, queries)| ClientOption::ListMetaContext { name, queries })
        }
        OPT_SET_META_CONTEXT => {
            meta(&mut r).map(|(name, queries)| ClientOption::SetMetaContext { name, queries })
        }
        other => Ok(ClientOption::Unknown(other)),
    }
}

/// An option reply with `data`.
pub fn option_reply(opt: u32, reply: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(OPTION_REPLY_HEADER_LEN + data.len());
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&opt.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    // Replies carry names and small records, far below 4 GiB.
    out.extend_from_slice(&u32::try_from(data.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// `NBD_REP_SERVER` for one export of a list.
pub fn server_entry(opt: u32, name: &str) -> Vec<u8> {
    let mut data = Vec::with_capacity(4 + name.len());
    data.extend_from_slice(&u32::try_from(name.len()).unwrap_or(u32::MAX).to_be_bytes());
    data.extend_from_slice(name.as_bytes());
    option_reply(opt, REP_SERVER, &data)
}

/// `NBD_INFO_EXPORT`: size and transmission flags.
pub fn info_export(opt: u32, size: u64, flags: u16) -> Vec<u8> {
    let mut data = Vec::with_capacity(12);
    data.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    data.extend_from_slice(&size.to_be_bytes());
    data.extend_from_slice(&flags.to_be_bytes());
    option_reply(opt, REP_INFO, &data)
}

/// `NBD_INFO_NAME`.
pub fn info_name(opt: u32, name: &str) -> Vec<u8> {
    let mut data = Vec::with_capacity(2 + name.len());
    data.extend_from_slice(&INFO_NAME.to_be_bytes());
    data.extend_from_slice(name.as_bytes());
    option_reply(opt, REP_INFO, &data)
}

/// `NBD_INFO_BLOCK_SIZE`: minimum, preferred and maximum block sizes.
pub fn info_block_size(opt: u32, min: u32, preferred: u32, max: u32) -> Vec<u8> {
    let mut data = Vec::with_capacity(14);
    data.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    data.extend_from_slice(&min.to_be_bytes());
    data.extend_from_slice(&preferred.to_be_bytes());
    data.extend_from_slice(&max.to_be_bytes());
    option_reply(opt, REP_INFO, &data)
}

/// `NBD_REP_META_CONTEXT`.
pub fn meta_context(opt: u32, id: u32, name: &str) -> Vec<u8> {
    let mut data = Vec::with_capacity(4 + name.len());
    data.extend_from_slice(&id.to_be_bytes());
    data.extend_from_slice(name.as_bytes());
    option_reply(opt, REP_META_CONTEXT, &data)
}

/// The reply to `NBD_OPT_EXPORT_NAME`: size, flags, and 124 zero bytes
/// unless the client agreed to `NO_ZEROES`.
pub fn export_name_reply(size: u64, flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(134);
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        out.extend_from_slice(&[0u8; 124]);
    }
    out
}

/// An option as a client sends it.
pub fn encode_option(opt: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(OPTION_HEADER_LEN + data.len());
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&opt.to_be_bytes());
    out.extend_from_slice(&u32::try_from(data.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// The payload of `NBD_OPT_GO` / `NBD_OPT_INFO` for `name` asking for `requests`.
pub fn encode_go(name: &str, requests: &[u16]) -> Vec<u8> {
    let mut data = Vec::new();
    data.extend_from_slice(&u32::try_from(name.len()).unwrap_or(u32::MAX).to_be_bytes());
    data.extend_from_slice(name.as_bytes());
    data.extend_from_slice(
        &u16::try_from(requests.len())
            .unwrap_or(u16::MAX)
            .to_be_bytes(),
    );
    for r in requests {
        data.extend_from_slice(&r.to_be_bytes());
    }
    data
}

/// An option reply header as a client parses it: (option, reply type, length).
///
/// # Errors
/// A wrong magic or a short buffer.
pub fn parse_option_reply_header(buf: &[u8]) -> Result<(u32, u32, u32), WireError> {
    let mut r = Reader::new(buf, "option reply header");
    let magic = r.u64()?;
    if magic != OPTION_REPLY_MAGIC {
        return Err(WireError::BadMagic {
            found: magic,
            expected: OPTION_REPLY_MAGIC,
        });
    }
    Ok((r.u32()?, r.u32()?, r.u32()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_round_trips() {
        let data = encode_go("disk", &[INFO_BLOCK_SIZE, INFO_NAME]);
        assert_eq!(
            parse_option(OPT_GO, &data).unwrap(),
            ClientOption::Go {
                name: "disk".into(),
                requests: vec![INFO_BLOCK_SIZE, INFO_NAME]
            }
        );
        let hdr = encode_option(OPT_GO, &data);
        assert_eq!(
            parse_option_header(&hdr[..16]).unwrap(),
            (OPT_GO, u32::try_from(data.len()).unwrap())
        );
    }

    #[test]
    fn malformed_options_are_errors() {
        assert!(parse_option(OPT_GO, &[0, 0, 0, 9, b'a']).is_err());
        assert!(parse_option(OPT_GO, &encode_go("x", &[])[..6]).is_err());
        assert!(parse_option(OPT_LIST, &[1]).is_err());
        assert!(parse_option(OPT_STRUCTURED_REPLY, &[0]).is_err());
        assert!(parse_option(OPT_SET_META_CONTEXT, &[0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]).is_err());
        assert!(parse_option(OPT_EXPORT_NAME, &[0xff, 0xfe]).is_err());
        assert!(parse_option_header(&[0; 16]).is_err());
        let mut big = encode_option(OPT_GO, &[]);
        big[12..16].copy_from_slice(&(MAX_OPTION_BYTES + 1).to_be_bytes());
        assert!(parse_option_header(&big).is_err());
        assert_eq!(
            parse_option(77, &[1, 2]).unwrap(),
            ClientOption::Unknown(77)
        );
    }

    #[test]
    fn meta_context_queries_parse() {
        let mut d = Vec::new();
        d.extend_from_slice(&4u32.to_be_bytes());
        d.extend_from_slice(b"disk");
        d.extend_from_slice(&1u32.to_be_bytes());
        d.extend_from_slice(&15u32.to_be_bytes());
        d.extend_from_slice(b"base:allocation");
        assert_eq!(
            parse_option(OPT_SET_META_CONTEXT, &d).unwrap(),
            ClientOption::SetMetaContext {
                name: "disk".into(),
                queries: vec!["base:allocation".into()]
            }
        );
    }
}

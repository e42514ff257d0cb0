//! The NBD wire protocol as a pure codec: no sockets, no runtime. The
//! server (`blockmirrord`'s NBD front end) and the NBD client backend of the
//! engine both build on it, and the fuzz target feeds it arbitrary bytes.
//!
//! Follows the protocol document of the NBD project (fixed newstyle
//! negotiation, structured replies, `base:allocation` block status).
//!
//! # Layout
//!
//! - [`consts`]: magic numbers, flags, option, command, reply and error codes.
//! - [`option`]: handshake options — parsing what a client sends, encoding
//!   what a server replies (and the reverse, for the client).
//! - [`request`]: transmission request headers.
//! - [`reply`]: simple and structured replies.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod consts;
pub mod option;
pub mod reply;
pub mod request;

/// Largest payload the server accepts or sends in one request (32 MiB,
/// the limit the NBD document recommends clients stay under).
pub const MAX_PAYLOAD_BYTES: u32 = 32 << 20;

/// Largest option payload accepted during the handshake: option data is
/// names and queries, never bulk data.
pub const MAX_OPTION_BYTES: u32 = 64 << 10;

/// Malformed input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// A magic number did not match.
    #[error("bad magic {found:#x} (expected {expected:#x})")]
    BadMagic {
        /// What arrived.
        found: u64,
        /// What the protocol requires here.
        expected: u64,
    },
    /// Fewer bytes than the structure needs.
    #[error("truncated {what}: need {need} bytes, have {have}")]
    Truncated {
        /// What was being parsed.
        what: &'static str,
        /// Bytes needed.
        need: usize,
        /// Bytes present.
        have: usize,
    },
    /// A length field exceeds what is allowed.
    #[error("{what} of {len} bytes exceeds the limit of {max}")]
    TooLong {
        /// Which length.
        what: &'static str,
        /// Its value.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// A field holds a value the protocol does not allow here.
    #[error("invalid {0}")]
    Invalid(&'static str),
}

/// A cursor over a byte slice with big-endian readers that fail instead of panicking.
#[derive(Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    /// Reads `buf`, naming `what` in errors.
    pub fn new(buf: &'a [u8], what: &'static str) -> Self {
        Self { buf, what }
    }

    /// Bytes left.
    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    /// Takes `n` bytes.
    ///
    /// # Errors
    /// [`WireError::Truncated`].
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.buf.len() < n {
            return Err(WireError::Truncated {
                what: self.what,
                need: n,
                have: self.buf.len(),
            });
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    /// A big-endian u16.
    ///
    /// # Errors
    /// [`WireError::Truncated`].
    pub fn u16(&mut self) -> Result<u16, WireError> {
        self.array().map(u16::from_be_bytes)
    }

    /// A big-endian u32.
    ///
    /// # Errors
    /// [`WireError::Truncated`].
    pub fn u32(&mut self) -> Result<u32, WireError> {
        self.array().map(u32::from_be_bytes)
    }

    /// A big-endian u64.
    ///
    /// # Errors
    /// [`WireError::Truncated`].
    pub fn u64(&mut self) -> Result<u64, WireError> {
        self.array().map(u64::from_be_bytes)
    }

    /// A u32-length-prefixed UTF-8 string of at most `max` bytes.
    ///
    /// # Errors
    /// Truncation, an over-long string, or invalid UTF-8.
    pub fn string32(&mut self, max: usize) -> Result<String, WireError> {
        let len = self.u32()? as usize;
        if len > max {
            return Err(WireError::TooLong {
                what: "string",
                len: len as u64,
                max: max as u64,
            });
        }
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| WireError::Invalid("UTF-8 in a name"))
    }

    /// Fails unless every byte was consumed.
    ///
    /// # Errors
    /// [`WireError::Invalid`] naming trailing bytes.
    pub fn finish(&self) -> Result<(), WireError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(WireError::Invalid("trailing bytes"))
        }
    }
}

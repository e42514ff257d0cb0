//! Transmission-phase requests.

use crate::consts::*;
use crate::{Reader, WireError};

/// Bytes of a request header.
pub const REQUEST_LEN: usize = 28;

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Read `length` bytes.
    Read,
    /// Write the `length` bytes that follow the header.
    Write,
    /// Disconnect.
    Disconnect,
    /// Make completed writes durable.
    Flush,
    /// Discard (trim).
    Trim,
    /// Prefetch (a hint).
    Cache,
    /// Write zeroes.
    WriteZeroes,
    /// Report allocation status.
    BlockStatus,
    /// Anything else.
    Unknown(u16),
}

impl Command {
    /// From the wire value.
    pub fn from_wire(v: u16) -> Self {
        match v {
            CMD_READ => Self::Read,
            CMD_WRITE => Self::Write,
            CMD_DISC => Self::Disconnect,
            CMD_FLUSH => Self::Flush,
            CMD_TRIM => Self::Trim,
            CMD_CACHE => Self::Cache,
            CMD_WRITE_ZEROES => Self::WriteZeroes,
            CMD_BLOCK_STATUS => Self::BlockStatus,
            other => Self::Unknown(other),
        }
    }

    /// To the wire value.
    pub fn to_wire(self) -> u16 {
        match self {
            Self::Read => CMD_READ,
            Self::Write => CMD_WRITE,
            Self::Disconnect => CMD_DISC,
            Self::Flush => CMD_FLUSH,
            Self::Trim => CMD_TRIM,
            Self::Cache => CMD_CACHE,
            Self::WriteZeroes => CMD_WRITE_ZEROES,
            Self::BlockStatus => CMD_BLOCK_STATUS,
            Self::Unknown(v) => v,
        }
    }
}

/// A request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags (`CMD_FLAG_*`).
    pub flags: u16,
    /// The command.
    pub command: Command,
    /// The client's cookie, echoed in the reply.
    pub handle: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte length (of data to read or write, or of the range).
    pub length: u32,
}

impl Request {
    /// Parses a header.
    ///
    /// # Errors
    /// A wrong magic or a short buffer (the connection cannot continue).
    pub fn parse(buf: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(buf, "request header");
        let magic = r.u32()?;
        if magic != REQUEST_MAGIC {
            return Err(WireError::BadMagic {
                found: u64::from(magic),
                expected: u64::from(REQUEST_MAGIC),
            });
        }
        Ok(Self {
            flags: r.u16()?,
            command: Command::from_wire(r.u16()?),
            handle: r.u64()?,
            offset: r.u64()?,
            length: r.u32()?,
        })
    }

    /// The header's bytes.
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut out = [0u8; REQUEST_LEN];
        out[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        out[4..6].copy_from_slice(&self.flags.to_be_bytes());
        out[6..8].copy_from_slice(&self.command.to_wire().to_be_bytes());
        out[8..16].copy_from_slice(&self.handle.to_be_bytes());
        out[16..24].copy_from_slice(&self.offset.to_be_bytes());
        out[24..].copy_from_slice(&self.length.to_be_bytes());
        out
    }

    /// True if `flag` is set.
    pub fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }

    /// Offset + length, if it does not overflow.
    pub fn end(&self) -> Option<u64> {
        self.offset.checked_add(u64::from(self.length))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_bad_magic() {
        let r = Request {
            flags: CMD_FLAG_FUA,
            command: Command::Write,
            handle: 0xdead_beef,
            offset: 4096,
            length: 512,
        };
        assert_eq!(Request::parse(&r.encode()).unwrap(), r);
        let mut bad = r.encode();
        bad[0] = 0;
        assert!(Request::parse(&bad).is_err());
        assert!(Request::parse(&r.encode()[..10]).is_err());
        assert_eq!(Command::from_wire(99), Command::Unknown(99));
    }
}

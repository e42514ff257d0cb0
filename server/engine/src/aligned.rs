//! Zeroed byte buffers whose start is aligned for direct I/O.
//!
//! `O_DIRECT` needs buffer addresses aligned (to 512 bytes or 4 KiB on
//! most devices). A request whose buffer is aligned goes to the device as
//! it is; any other is copied through a bounce buffer. So the buffers the
//! engine fills itself (copies) and the ones front ends read guest
//! payloads into start on a page boundary; that costs up to one page of
//! slack per buffer.

use bytes::{Buf, BytesMut};

/// Alignment of these buffers: a page, which satisfies every device's
/// direct-I/O memory alignment.
pub const ALIGN: usize = 4096;

/// A zeroed buffer of `len` bytes starting on an [`ALIGN`] boundary, for a
/// front end to read a guest's payload into.
pub fn zeroed_bytes(len: usize) -> BytesMut {
    let mut b = BytesMut::zeroed(len + ALIGN);
    b.advance(bytes_to_alignment(b.as_ptr(), ALIGN));
    b.truncate(len);
    b
}

/// How many bytes after `ptr` the next multiple of `align` starts.
fn bytes_to_alignment(ptr: *const u8, align: usize) -> usize {
    (align - ptr.addr() % align) % align
}

/// A reusable zeroed buffer with an aligned window.
#[derive(Debug, Default)]
pub(crate) struct AlignedBuf {
    raw: Vec<u8>,
    start: usize,
}

impl AlignedBuf {
    /// Room for `len` bytes starting at a multiple of `align`.
    pub(crate) fn new(len: usize, align: usize) -> Self {
        let raw = vec![0u8; len + align];
        let start = bytes_to_alignment(raw.as_ptr(), align);
        Self { raw, start }
    }

    /// Bytes available in the aligned window.
    pub(crate) fn capacity(&self) -> usize {
        self.raw.len() - self.start
    }

    /// The first `len` aligned bytes (`len` at most [`Self::capacity`]).
    pub(crate) fn window(&mut self, len: usize) -> &mut [u8] {
        &mut self.raw[self.start..self.start + len]
    }

    /// [`Self::window`], to read.
    pub(crate) fn window_ref(&self, len: usize) -> &[u8] {
        &self.raw[self.start..self.start + len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_start_aligned_and_have_the_length_asked() {
        for len in [0, 1, 512, 4096, 70_001, 1 << 20] {
            let b = zeroed_bytes(len);
            assert_eq!(b.len(), len);
            assert_eq!(b.as_ptr().addr() % ALIGN, 0);
            assert!(b.iter().all(|&x| x == 0));
            let frozen = b.freeze();
            assert_eq!(frozen.as_ptr().addr() % ALIGN, 0);
            let mut a = AlignedBuf::new(len, 512);
            assert!(a.capacity() >= len);
            assert_eq!(a.window(len).as_ptr().addr() % 512, 0);
        }
    }
}

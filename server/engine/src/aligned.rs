//! Heap buffers whose start is aligned for direct I/O (`O_DIRECT`).
//!
//! `O_DIRECT` needs the memory address, the file offset and the length
//! aligned to the device's block size. A plain `Vec<u8>` of a megabyte
//! starts 16 bytes past a page boundary (malloc's header), so the mirror's
//! copy buffers over-allocate by one alignment unit and start at the first
//! aligned byte — safe code, at the price of one page per buffer.

/// Alignment of offsets, lengths and addresses for direct I/O. 4 KiB
/// covers every device's logical block size in use (512 B or 4 KiB) and
/// the page size; a device that wants more makes the direct write fail
/// with `EINVAL`, and the file backend falls back to buffered writes.
pub const DIRECT_IO_ALIGN: usize = 4096;

/// True when `offset`, `buf`'s address and its length suit direct I/O.
pub fn is_direct_aligned(buf: &[u8], offset: u64) -> bool {
    let align = DIRECT_IO_ALIGN as u64;
    offset.is_multiple_of(align)
        && buf.len().is_multiple_of(DIRECT_IO_ALIGN)
        && buf.as_ptr().addr().is_multiple_of(DIRECT_IO_ALIGN)
}

/// A reusable buffer whose slice starts on a [`DIRECT_IO_ALIGN`] boundary.
#[derive(Debug, Default)]
pub struct AlignedBuf {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes.
    pub fn new(len: usize) -> Self {
        let mut b = Self::default();
        b.resize(len);
        b
    }

    /// Makes the buffer `len` bytes long, reallocating only when it has
    /// never been that large. Bytes kept from earlier use are not cleared.
    pub fn resize(&mut self, len: usize) {
        if self.raw.len() < self.start + len || self.raw.is_empty() {
            // The allocation never moves after this (the Vec is not grown
            // in place), so `start` stays aligned for the buffer's life.
            self.raw = vec![0; len + DIRECT_IO_ALIGN];
            self.start = self.raw.as_ptr().align_offset(DIRECT_IO_ALIGN);
        }
        self.len = len;
    }

    /// The buffer's bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.len]
    }

    /// The buffer's bytes, to fill.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_size_starts_aligned_and_has_its_length() {
        let mut b = AlignedBuf::default();
        for len in [4096, 1 << 20, 64 << 10, 1 << 20, 0, 12_288] {
            b.resize(len);
            assert_eq!(b.as_slice().len(), len);
            assert!(
                b.as_mut_slice()
                    .as_ptr()
                    .addr()
                    .is_multiple_of(DIRECT_IO_ALIGN)
            );
            assert!(is_direct_aligned(b.as_slice(), 8192));
        }
        let b = AlignedBuf::new(4096);
        assert!(!is_direct_aligned(b.as_slice(), 512), "offset");
        assert!(!is_direct_aligned(&b.as_slice()[..1024], 0), "length");
        assert!(!is_direct_aligned(&b.as_slice()[512..], 0), "address");
    }
}

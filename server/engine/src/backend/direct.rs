//! `O_DIRECT` access to a file or block device.
//!
//! Why a volume would want it: a guest's flush then waits only on the
//! device's own cache, never behind the kernel's writeback of data that a
//! copier or other guests left in the page cache, and the host does not
//! cache the guest's data a second time. It is what QEMU's
//! `cache.direct=on` gives.
//!
//! Direct I/O needs the file offset, the length and the memory address
//! aligned, to what `statx(STATX_DIOALIGN)` reports. Guests may read and
//! write any byte range, so unaligned requests go through an aligned
//! bounce buffer. A write that covers a block only partly reads the block
//! first and writes it back whole (read-modify-write). Two such writes to
//! one block must not interleave, or the second would write back the block
//! as it was before the first; so every write holds its block-aligned span
//! ([`SpanLocks`]) until it is done.

use crate::aligned::AlignedBuf;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::{Condvar, Mutex};

/// Most bytes one bounce buffer holds; longer unaligned requests go in
/// pieces of this size, so the extra memory per request stays small.
const BOUNCE_BYTES: u64 = 64 << 10;

/// Alignment assumed when the kernel cannot report it (before Linux 6.1):
/// a page, which every device that takes direct I/O accepts.
const FALLBACK_ALIGN: u32 = 4096;

/// The alignment rules of one open file, and the locks its writes take.
#[derive(Debug)]
pub(super) struct DirectIo {
    /// File offsets and lengths must be multiples of this.
    offset_align: u64,
    /// Buffer addresses must be multiples of this.
    mem_align: usize,
    /// Bounce-buffer piece: [`BOUNCE_BYTES`] rounded to whole blocks.
    piece_bytes: u64,
    spans: SpanLocks,
}

impl DirectIo {
    /// Reads `file`'s alignment rules. `size` must be a multiple of the
    /// offset alignment: a whole-block write at the end would grow a file
    /// that is not.
    ///
    /// # Errors
    /// `InvalidInput` when the file cannot do direct I/O or its size does
    /// not fit its alignment; the OS error of `statx`.
    pub(super) fn new(file: &File, size: u64) -> io::Result<Self> {
        let (mem_align, offset_align) = dio_alignment(file)?;
        if offset_align == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the filesystem does not support direct I/O (O_DIRECT) on this file",
            ));
        }
        let offset_align = u64::from(offset_align);
        if !size.is_multiple_of(offset_align) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "size {size} is not a multiple of the {offset_align}-byte block direct I/O needs here"
                ),
            ));
        }
        Ok(Self {
            offset_align,
            piece_bytes: (BOUNCE_BYTES / offset_align).max(1) * offset_align,
            mem_align: usize::try_from(mem_align.max(1)).unwrap_or(4096),
            spans: SpanLocks::default(),
        })
    }

    /// The block size direct I/O works in: guests that write whole,
    /// aligned blocks of it need no read-modify-write.
    pub(super) fn block_size(&self) -> u64 {
        self.offset_align
    }

    fn is_aligned(&self, buf: &[u8], offset: u64) -> bool {
        buf.as_ptr().addr().is_multiple_of(self.mem_align)
            && offset.is_multiple_of(self.offset_align)
            && (buf.len() as u64).is_multiple_of(self.offset_align)
    }

    /// `[floor(offset), ceil(offset + len))` in whole blocks.
    fn span(&self, offset: u64, len: u64) -> (u64, u64) {
        let a = self.offset_align;
        (offset / a * a, (offset + len).div_ceil(a) * a)
    }

    /// Fills `buf` from `offset` (any alignment).
    pub(super) fn read(&self, file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        if self.is_aligned(buf, offset) {
            return file.read_exact_at(buf, offset);
        }
        let len = buf.len() as u64;
        self.for_each_piece(offset, len, |piece, pos, (from, to)| {
            file.read_exact_at(piece, pos)?;
            buf[idx(from - offset)..idx(to - offset)]
                .copy_from_slice(&piece[idx(from - pos)..idx(to - pos)]);
            Ok(())
        })
    }

    /// Writes all of `buf` at `offset` (any alignment); partly covered
    /// blocks keep their other bytes.
    pub(super) fn write(&self, file: &File, buf: &[u8], offset: u64) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let (start, span_end) = self.span(offset, buf.len() as u64);
        let _span = self.spans.lock(start, span_end);
        if self.is_aligned(buf, offset) {
            return file.write_all_at(buf, offset);
        }
        let a = self.offset_align;
        self.for_each_piece(offset, buf.len() as u64, |piece, pos, (from, to)| {
            let piece_end = pos + piece.len() as u64;
            // Only the first piece can start, and only the last end, inside
            // a block; one block can be both.
            let head_partial = from > pos;
            if head_partial {
                file.read_exact_at(&mut piece[..idx(a)], pos)?;
            }
            if to < piece_end && !(head_partial && piece_end - pos == a) {
                let tail = idx(piece_end - pos - a);
                file.read_exact_at(&mut piece[tail..], piece_end - a)?;
            }
            piece[idx(from - pos)..idx(to - pos)]
                .copy_from_slice(&buf[idx(from - offset)..idx(to - offset)]);
            file.write_all_at(piece, pos)
        })
    }

    /// Walks the whole blocks under `[offset, offset + len)` in bounce
    /// pieces: `f(piece, piece_offset, (from, to))` gets an aligned buffer
    /// as long as the piece and the part `[from, to)` of the request in it.
    fn for_each_piece(
        &self,
        offset: u64,
        len: u64,
        mut f: impl FnMut(&mut [u8], u64, (u64, u64)) -> io::Result<()>,
    ) -> io::Result<()> {
        let end = offset + len;
        let (start, span_end) = self.span(offset, len);
        let mut bounce = AlignedBuf::new(
            idx((span_end - start).min(self.piece_bytes)),
            self.mem_align,
        );
        let mut pos = start;
        while pos < span_end {
            let piece_end = (pos + self.piece_bytes).min(span_end);
            let piece = bounce.window(idx(piece_end - pos));
            f(piece, pos, (offset.max(pos), end.min(piece_end)))?;
            pos = piece_end;
        }
        Ok(())
    }

    /// Holds the blocks of `[offset, offset + len)` against writes, for an
    /// operation that changes them by other means (zeroing a range).
    pub(super) fn hold(&self, offset: u64, len: u64) -> SpanGuard<'_> {
        let (start, end) = self.span(offset, len);
        self.spans.lock(start, end)
    }
}

/// A byte count known to fit in memory (at most a request's length).
fn idx(v: u64) -> usize {
    usize::try_from(v).expect("in-memory length fits usize")
}

/// `statx(STATX_DIOALIGN)` of an open file: (memory, offset) alignment;
/// offset alignment 0 means the file cannot do direct I/O. Kernels that
/// cannot tell get [`FALLBACK_ALIGN`]. (Neither std nor nix wraps statx.)
#[allow(unsafe_code)]
fn dio_alignment(file: &File) -> io::Result<(u32, u32)> {
    use std::os::fd::AsRawFd;
    let mut stx = std::mem::MaybeUninit::<libc::statx>::zeroed();
    // SAFETY: `stx` is a writable, properly sized and aligned statx buffer
    // that outlives the call; the empty path with AT_EMPTY_PATH names the
    // open descriptor owned by `file`.
    let rc = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            stx.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: statx succeeded; every field is plain data, and those it did
    // not fill are still the zeroes written above.
    let stx = unsafe { stx.assume_init() };
    if stx.stx_mask & libc::STATX_DIOALIGN == 0 {
        return Ok((FALLBACK_ALIGN, FALLBACK_ALIGN));
    }
    Ok((stx.stx_dio_mem_align, stx.stx_dio_offset_align))
}

/// Block spans held by writes in progress. A writer waits until no held
/// span overlaps its own. Not fair: overlapping concurrent writes to one
/// block are rare (their order is undefined anyway), and each holds its
/// span only for its own I/O.
#[derive(Debug, Default)]
struct SpanLocks {
    held: Mutex<Vec<(u64, u64)>>,
    released: Condvar,
}

impl SpanLocks {
    fn lock(&self, start: u64, end: u64) -> SpanGuard<'_> {
        let guard = self
            .held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut held = self
            .released
            .wait_while(guard, |held| {
                held.iter().any(|&(s, e)| s < end && start < e)
            })
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        held.push((start, end));
        SpanGuard {
            locks: self,
            span: (start, end),
        }
    }
}

/// A held span; dropping it lets overlapping writers go.
#[derive(Debug)]
pub(super) struct SpanGuard<'a> {
    locks: &'a SpanLocks,
    span: (u64, u64),
}

impl Drop for SpanGuard<'_> {
    fn drop(&mut self) {
        let mut held = self
            .locks
            .held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(i) = held.iter().position(|&s| s == self.span) {
            held.swap_remove(i);
        }
        drop(held);
        self.locks.released.notify_all();
    }
}

//! The dirty bitmap: one bit per chunk, with summary levels so that searches
//! skip clean (or fully dirty) regions a whole word of words at a time.
//!
//! # Why hierarchical
//!
//! A mirror job keeps one bit per chunk of the source (`granularity`, 64 KiB by
//! default), so a 4 TiB volume has 2^26 chunks: 2^20 words of 64 bits. The
//! background copier repeatedly asks "what is the next dirty chunk after the
//! cursor?". Near READY almost every chunk is clean, and a flat bitmap would
//! scan up to a million words to find the few dirty ones — once per copy
//! operation. Like QEMU's `hbitmap`, this bitmap keeps summaries: above the
//! bits sits a level with one bit per bit-word, set when that word is
//! non-zero; above that another level summarising the summary, and so on until
//! a level fits in a single word. A 2^26-chunk bitmap has five levels (2^20,
//! 2^14, 2^8, 4 and 1 words), so a search climbs at most five words and comes
//! back down five, whatever the distance it skips.
//!
//! The same trick answers "where does this dirty run end?" (`next_clean`),
//! which the copier needs to coalesce neighbouring chunks: a second set of
//! summaries keeps one bit per word that is *full* (every chunk in it dirty).
//! Without it, finding the end of a dirty run on a freshly `set_all` bitmap
//! would scan every word up to the end on each call.
//!
//! # Structure
//!
//! * `bits` (level 0): the chunk bits, chunk `c` at bit `c % 64` of word
//!   `c / 64`.
//! * `any[k]` (level `k + 1` of the "non-zero" hierarchy): bit `i` is set iff
//!   word `i` of the level below (`bits` for `k == 0`, else `any[k - 1]`) is
//!   non-zero.
//! * `full[k]` (level `k + 1` of the "full" hierarchy): bit `i` is set iff
//!   every meaningful bit of word `i` of the level below (`bits` or
//!   `full[k - 1]`) is set.
//! * `count`: the number of dirty chunks.
//!
//! Both hierarchies have the same shape: a summary level exists above a level
//! only while that level has more than one word, so the top level has at most
//! one word (zero words when the bitmap has no chunks).
//!
//! # Invariants
//!
//! 1. A summary bit is set iff its child word is non-zero (`any`) or full
//!    (`full`). A search may therefore skip everything under a clear `any` bit
//!    or a set `full` bit, and a descent from a set `any` bit (clear `full`
//!    bit) always finds a set (clear) bit in the child word.
//! 2. `count` equals the population count of `bits`, so [`DirtyBitmap::count`]
//!    is O(1).
//! 3. No bit past the end of a level is ever set: not past `len` in the last
//!    word of `bits` (`set_all` masks it), not past the number of child words
//!    in a summary level. Population counts, equality and serialisation rely
//!    on it, and [`DirtyBitmap::from_bytes`] rejects input that breaks it.
//!
//! Because the summaries are a function of `bits`, the derived `PartialEq`
//! compares bitmaps by content.
//!
//! # Keeping the summaries up to date
//!
//! Setting bits `[start, end)` of a level touches the words
//! `start / 64 ..= (end - 1) / 64`. Every touched word becomes non-zero, so in
//! the `any` hierarchy the parent bits of exactly that word range get set, and
//! the same rule repeats one level up. In the `full` hierarchy the words
//! strictly inside the range become full; the two edge words only maybe, so
//! they are checked. Clearing is the mirror image (every touched word stops
//! being full; the inner words become zero, the edges maybe). Each step works
//! on a range 64 times smaller than the one below, and stops as soon as a
//! level does not change, so a range operation costs O(words touched + levels).
//! `merge` and `from_bytes` rebuild the summaries from `bits` in O(words).
//!
//! # Cost
//!
//! | operation | time |
//! | --- | --- |
//! | `count`, `len`, `is_dirty` | O(1) |
//! | `next_dirty`, `next_clean` | O(levels), levels = ⌈log64(len)⌉ |
//! | `set_range`, `clear_range` | O(words in range + levels) |
//! | `set_all`, `clear_all`, `merge`, `to_bytes`, `from_bytes` | O(words) |
//! | `dirty_extents` | O(levels) per extent |
//!
//! Memory is `len / 8` bytes plus about 2/63 of that for the summaries.

use std::fmt;

/// Bits in one word of any level.
const WORD_BITS: u64 = 64;

/// Magic number opening the serialised form (`BlockMirror` Dirty Bitmap).
const MAGIC: [u8; 4] = *b"BMDB";

/// Version of the serialised form written by [`DirtyBitmap::to_bytes`].
const FORMAT_VERSION: u32 = 1;

/// Size of the serialised header: magic (4), version (4), length (8).
const HEADER_BYTES: usize = 16;

/// Error for a chunk range outside the bitmap.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("chunk range {start}..{end} is outside a bitmap of {len} chunks")]
pub struct OutOfRange {
    /// First chunk of the rejected range.
    pub start: u64,
    /// End (exclusive) of the rejected range.
    pub end: u64,
    /// Number of chunks in the bitmap.
    pub len: u64,
}

/// Error for merging two bitmaps of different lengths.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot merge a bitmap of {other} chunks into a bitmap of {len} chunks")]
pub struct LengthMismatch {
    /// Number of chunks of the bitmap merged into.
    pub len: u64,
    /// Number of chunks of the bitmap merged from.
    pub other: u64,
}

/// Error for bytes that are not a bitmap written by [`DirtyBitmap::to_bytes`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The input is shorter than the header.
    #[error("bitmap encoding is {len} bytes, shorter than its {HEADER_BYTES}-byte header")]
    Truncated {
        /// Length of the input in bytes.
        len: usize,
    },
    /// The input does not start with the bitmap magic number.
    #[error("bitmap encoding has magic {found:02x?}, expected {MAGIC:02x?}")]
    BadMagic {
        /// The first four bytes of the input.
        found: [u8; 4],
    },
    /// The input was written by an unknown format version.
    #[error("bitmap encoding has unsupported version {version}")]
    UnsupportedVersion {
        /// The version in the header.
        version: u32,
    },
    /// The body does not hold exactly the words that the header's length needs.
    #[error(
        "bitmap encoding of {len} chunks needs {expected_bytes} bytes of words, found {actual_bytes}"
    )]
    WrongSize {
        /// Number of chunks in the header.
        len: u64,
        /// Body size that `len` needs.
        expected_bytes: u64,
        /// Body size found.
        actual_bytes: u64,
    },
    /// The last word has bits set past the end of the bitmap.
    #[error("bitmap encoding has bits set past the end of its {len} chunks")]
    BitsPastEnd {
        /// Number of chunks in the header.
        len: u64,
    },
}

/// A set of dirty chunks: one bit per chunk, with summary levels that make
/// [`next_dirty`](Self::next_dirty) and [`next_clean`](Self::next_clean)
/// O(log64 len) and an exact [`count`](Self::count) kept incrementally.
///
/// See the [module documentation](self) for the structure and its invariants.
#[derive(Clone, PartialEq, Eq)]
pub struct DirtyBitmap {
    /// Number of chunks.
    len: u64,
    /// Number of set bits in `bits` (invariant 2).
    count: u64,
    /// Level 0: one bit per chunk.
    bits: Level,
    /// Levels 1.. of the "non-zero" hierarchy, lowest first.
    any: Vec<Level>,
    /// Levels 1.. of the "full" hierarchy, lowest first; same shape as `any`.
    full: Vec<Level>,
}

impl fmt::Debug for DirtyBitmap {
    /// Shows the length and the dirty count only: a bitmap can hold millions
    /// of words.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DirtyBitmap")
            .field("len", &self.len)
            .field("count", &self.count)
            .finish_non_exhaustive()
    }
}

impl DirtyBitmap {
    /// Creates a bitmap of `len_chunks` chunks, all clean.
    ///
    /// # Panics
    ///
    /// Only if the bitmap cannot be allocated: like any `Vec`, allocation
    /// failure aborts, and on a target whose `usize` is narrower than 64 bits
    /// a word count that does not fit in `usize` panics. On 64-bit targets
    /// every `len_chunks` has a representable word count.
    #[must_use]
    pub fn new(len_chunks: u64) -> Self {
        let bits = Level::zeroed(len_chunks);
        let mut any = Vec::new();
        let mut child_words = bits.word_count();
        while child_words > 1 {
            let level = Level::zeroed(child_words);
            child_words = level.word_count();
            any.push(level);
        }
        let full = any.clone();
        Self {
            len: len_chunks,
            count: 0,
            bits,
            any,
            full,
        }
    }

    /// Number of chunks the bitmap covers.
    #[must_use]
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the bitmap covers no chunks at all (not whether it is clean:
    /// see [`count`](Self::count)).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of dirty chunks, in O(1).
    #[must_use]
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Whether `chunk` is dirty; `false` for a chunk past the end.
    #[must_use]
    pub fn is_dirty(&self, chunk: u64) -> bool {
        if chunk >= self.len {
            return false;
        }
        usize::try_from(chunk / WORD_BITS)
            .ok()
            .and_then(|i| self.bits.words.get(i))
            .is_some_and(|&w| (w >> (chunk % WORD_BITS)) & 1 == 1)
    }

    /// Marks chunks `[start, end)` dirty and returns how many were clean
    /// before. An empty range (`start == end <= len`) is `Ok(0)`.
    ///
    /// # Errors
    ///
    /// [`OutOfRange`] if `start > end` or `end > len`; the bitmap is unchanged.
    pub fn set_range(&mut self, start: u64, end: u64) -> Result<u64, OutOfRange> {
        self.update(start, end, Op::Set)
    }

    /// Marks chunks `[start, end)` clean and returns how many were dirty
    /// before. An empty range (`start == end <= len`) is `Ok(0)`.
    ///
    /// # Errors
    ///
    /// [`OutOfRange`] if `start > end` or `end > len`; the bitmap is unchanged.
    pub fn clear_range(&mut self, start: u64, end: u64) -> Result<u64, OutOfRange> {
        self.update(start, end, Op::Clear)
    }

    /// Marks every chunk dirty (bits past the end stay clear).
    pub fn set_all(&mut self) {
        self.bits.fill_valid();
        for level in self.any.iter_mut().chain(self.full.iter_mut()) {
            // With every chunk dirty, every word of every level is both
            // non-zero and full (each word has at least one meaningful bit).
            level.fill_valid();
        }
        self.count = self.len;
    }

    /// Marks every chunk clean.
    pub fn clear_all(&mut self) {
        for level in std::iter::once(&mut self.bits)
            .chain(self.any.iter_mut())
            .chain(self.full.iter_mut())
        {
            level.words.fill(0);
        }
        self.count = 0;
    }

    /// The smallest dirty chunk `>= from`, or `None` if there is none.
    ///
    /// Climbs the "non-zero" summaries until a level has a set bit after the
    /// starting word, then descends along first set bits: O(levels) words,
    /// however long the clean gap.
    #[must_use]
    pub fn next_dirty(&self, from: u64) -> Option<u64> {
        search(&self.bits, &self.any, from, Want::Set)
    }

    /// The smallest clean chunk `>= from`, or `None` if every chunk of
    /// `from..len` is dirty (including when `from >= len`).
    ///
    /// Uses the "full" summaries the way [`next_dirty`](Self::next_dirty)
    /// uses the "non-zero" ones: O(levels) words, however long the dirty run.
    #[must_use]
    pub fn next_clean(&self, from: u64) -> Option<u64> {
        search(&self.bits, &self.full, from, Want::Clear)
    }

    /// Marks dirty every chunk that is dirty in `other` (bitwise OR).
    ///
    /// Runs in O(words): the summaries are rebuilt from the merged bits.
    ///
    /// # Errors
    ///
    /// [`LengthMismatch`] if the bitmaps differ in length; `self` is unchanged.
    pub fn merge(&mut self, other: &DirtyBitmap) -> Result<(), LengthMismatch> {
        if self.len != other.len {
            return Err(LengthMismatch {
                len: self.len,
                other: other.len,
            });
        }
        for (word, &theirs) in self.bits.words.iter_mut().zip(&other.bits.words) {
            *word |= theirs;
        }
        self.rebuild();
        Ok(())
    }

    /// The maximal runs of dirty chunks, as half-open `[start, end)` ranges in
    /// increasing order. Each run costs one [`next_dirty`](Self::next_dirty)
    /// and one [`next_clean`](Self::next_clean).
    pub fn dirty_extents(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        let mut cursor = 0;
        std::iter::from_fn(move || {
            let start = self.next_dirty(cursor)?;
            let end = self.next_clean(start).unwrap_or(self.len);
            cursor = end;
            Some((start, end))
        })
    }

    /// Serialises the bitmap for persistence.
    ///
    /// Layout, all little-endian: the magic `b"BMDB"`, a `u32` format version
    /// (1), the `u64` number of chunks, then the `⌈len / 64⌉` level-0 words as
    /// `u64`s, chunk `c` at bit `c % 64` of word `c / 64`. The summaries are
    /// not stored; [`from_bytes`](Self::from_bytes) rebuilds them.
    #[must_use]
    pub fn to_bytes(&self) -> Vec<u8> {
        let capacity = self
            .bits
            .words
            .len()
            .checked_mul(8)
            .and_then(|n| n.checked_add(HEADER_BYTES))
            .unwrap_or(0);
        let mut out = Vec::with_capacity(capacity);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&self.len.to_le_bytes());
        for word in &self.bits.words {
            out.extend_from_slice(&word.to_le_bytes());
        }
        out
    }

    /// Decodes a bitmap written by [`to_bytes`](Self::to_bytes).
    ///
    /// Never panics, and allocates only in proportion to the input: the body
    /// size is checked against the header's length before anything is built.
    ///
    /// # Errors
    ///
    /// [`DecodeError`] if the input is shorter than the header, has the wrong
    /// magic or version, has a body that is not exactly the words the length
    /// needs, or has bits set past the end.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, DecodeError> {
        let truncated = DecodeError::Truncated { len: bytes.len() };
        let (&magic, rest) = bytes.split_first_chunk::<4>().ok_or(truncated.clone())?;
        let (&version, rest) = rest.split_first_chunk::<4>().ok_or(truncated.clone())?;
        let (&len, body) = rest.split_first_chunk::<8>().ok_or(truncated)?;
        if magic != MAGIC {
            return Err(DecodeError::BadMagic { found: magic });
        }
        let version = u32::from_le_bytes(version);
        if version != FORMAT_VERSION {
            return Err(DecodeError::UnsupportedVersion { version });
        }
        let len = u64::from_le_bytes(len);
        // At most 2^58 words, so the byte count cannot overflow; checked anyway.
        let expected_bytes = len.div_ceil(WORD_BITS).checked_mul(8);
        let actual_bytes = to_u64(body.len());
        if expected_bytes != Some(actual_bytes) {
            return Err(DecodeError::WrongSize {
                len,
                expected_bytes: expected_bytes.unwrap_or(u64::MAX),
                actual_bytes,
            });
        }
        // The word count now equals body.len() / 8, which fits in usize, so
        // `new` neither panics nor allocates more than the input justifies.
        let mut bitmap = Self::new(len);
        let mut rest = body;
        for word in &mut bitmap.bits.words {
            let (&raw, tail) = rest
                .split_first_chunk::<8>()
                .ok_or(DecodeError::WrongSize {
                    len,
                    expected_bytes: expected_bytes.unwrap_or(u64::MAX),
                    actual_bytes,
                })?;
            *word = u64::from_le_bytes(raw);
            rest = tail;
        }
        if let Some(i) = bitmap.bits.words.len().checked_sub(1) {
            let valid = bitmap.bits.valid_mask(i);
            if bitmap.bits.words.get(i).is_some_and(|&w| w & !valid != 0) {
                return Err(DecodeError::BitsPastEnd { len });
            }
        }
        bitmap.rebuild();
        Ok(bitmap)
    }

    /// Validates `[start, end)` against the length.
    fn check_range(&self, start: u64, end: u64) -> Result<(), OutOfRange> {
        if start > end || end > self.len {
            return Err(OutOfRange {
                start,
                end,
                len: self.len,
            });
        }
        Ok(())
    }

    /// Shared body of `set_range` and `clear_range`.
    fn update(&mut self, start: u64, end: u64, op: Op) -> Result<u64, OutOfRange> {
        self.check_range(start, end)?;
        // `apply` is None only for an empty range, which changes nothing.
        let Some(touched) = self.bits.apply(start, end, op) else {
            return Ok(0);
        };
        if touched.changed == 0 {
            // No word changed, so every summary is still right (invariant 1).
            return Ok(0);
        }
        // Cannot overflow or underflow: 0 <= count <= len is maintained and
        // `changed` counts bits that actually flipped.
        match op {
            Op::Set => self.count += touched.changed,
            Op::Clear => self.count -= touched.changed,
        }
        propagate(&self.bits, &mut self.any, touched, Summary::Any, op);
        propagate(&self.bits, &mut self.full, touched, Summary::Full, op);
        Ok(touched.changed)
    }

    /// Recomputes `count` and both hierarchies from `bits`.
    fn rebuild(&mut self) {
        self.count = self
            .bits
            .words
            .iter()
            .map(|w| u64::from(w.count_ones()))
            .sum();
        rebuild_summaries(&self.bits, &mut self.any, Summary::Any);
        rebuild_summaries(&self.bits, &mut self.full, Summary::Full);
    }

    /// Panics unless every invariant of the module documentation holds.
    #[cfg(test)]
    #[allow(clippy::indexing_slicing)] // A test check: panicking is its job.
    fn check_invariants(&self) {
        assert_eq!(self.bits.bits, self.len, "level 0 has one bit per chunk");
        assert_eq!(
            self.bits.word_count(),
            self.len.div_ceil(WORD_BITS),
            "level 0 word count"
        );
        self.bits.check_padding();
        let popcount: u64 = self
            .bits
            .words
            .iter()
            .map(|w| u64::from(w.count_ones()))
            .sum();
        assert_eq!(self.count, popcount, "count == popcount of level 0");
        assert_eq!(
            self.any.len(),
            self.full.len(),
            "hierarchies have one shape"
        );
        for (kind, summaries) in [(Summary::Any, &self.any), (Summary::Full, &self.full)] {
            let mut child = &self.bits;
            for (k, level) in summaries.iter().enumerate() {
                assert!(
                    child.words.len() > 1,
                    "summary level {} above a single word",
                    k + 1
                );
                assert_eq!(level.bits, child.word_count(), "one bit per child word");
                assert_eq!(level.word_count(), level.bits.div_ceil(WORD_BITS));
                level.check_padding();
                for (i, &w) in child.words.iter().enumerate() {
                    let expected = match kind {
                        Summary::Any => w != 0,
                        Summary::Full => w == child.valid_mask(i),
                    };
                    let got = (level.words[i / 64] >> (i % 64)) & 1 == 1;
                    assert_eq!(
                        got,
                        expected,
                        "{kind:?} level {} bit {i} (child word {w:#x})",
                        k + 1
                    );
                }
                child = level;
            }
            assert!(child.words.len() <= 1, "top level has at most one word");
        }
    }
}

/// One level of either hierarchy.
#[derive(Clone, PartialEq, Eq)]
struct Level {
    /// Number of meaningful bits; bits at positions `>= bits` stay zero.
    bits: u64,
    /// `⌈bits / 64⌉` words.
    words: Vec<u64>,
}

/// A change to a range of bits.
#[derive(Clone, Copy, Debug)]
enum Op {
    /// Set the bits.
    Set,
    /// Clear the bits.
    Clear,
}

/// Which hierarchy a summary level belongs to.
#[derive(Clone, Copy, Debug)]
enum Summary {
    /// Bit set iff the child word is non-zero.
    Any,
    /// Bit set iff every meaningful bit of the child word is set.
    Full,
}

/// What a search looks for.
#[derive(Clone, Copy, Debug)]
enum Want {
    /// A set bit (`next_dirty`, climbing the `any` summaries).
    Set,
    /// A clear bit (`next_clean`, climbing the `full` summaries).
    Clear,
}

/// The words an [`Op`] touched on one level.
#[derive(Clone, Copy, Debug)]
struct Touched {
    /// Index of the first word touched.
    first: usize,
    /// Index of the last word touched (inclusive).
    last: usize,
    /// Number of bits that flipped.
    changed: u64,
}

impl Level {
    /// A level of `bits` clear bits.
    fn zeroed(bits: u64) -> Self {
        let Ok(words) = usize::try_from(bits.div_ceil(WORD_BITS)) else {
            // Unreachable on 64-bit targets (at most 2^58 words); documented
            // under `DirtyBitmap::new`'s `# Panics`.
            panic!("a bitmap of {bits} bits does not fit in this target's address space");
        };
        Self {
            bits,
            words: vec![0; words],
        }
    }

    /// Number of words, as a u64.
    fn word_count(&self) -> u64 {
        to_u64(self.words.len())
    }

    /// The meaningful bits of word `i`.
    fn valid_mask(&self, i: usize) -> u64 {
        valid_mask(self.bits, i)
    }

    /// Sets every meaningful bit.
    fn fill_valid(&mut self) {
        let bits = self.bits;
        for (i, word) in self.words.iter_mut().enumerate() {
            *word = valid_mask(bits, i);
        }
    }

    /// Applies `op` to bits `[start, end)`. Returns `None` (and changes
    /// nothing) if the range is empty or does not fit in the level, which
    /// callers rule out beforehand except for the empty range.
    fn apply(&mut self, start: u64, end: u64, op: Op) -> Option<Touched> {
        let last_bit = end.checked_sub(1)?;
        if start > last_bit || end > self.bits {
            return None;
        }
        let first = usize::try_from(start / WORD_BITS).ok()?;
        let last = usize::try_from(last_bit / WORD_BITS).ok()?;
        let first_mask = u64::MAX << (start % WORD_BITS);
        let last_mask = u64::MAX >> (WORD_BITS - 1 - last_bit % WORD_BITS);
        let span = self.words.get_mut(first..=last)?;
        let n = span.len();
        let mut changed = 0;
        for (i, word) in span.iter_mut().enumerate() {
            let mut mask = u64::MAX;
            if i == 0 {
                mask &= first_mask;
            }
            if i + 1 == n {
                mask &= last_mask;
            }
            let old = *word;
            *word = match op {
                Op::Set => old | mask,
                Op::Clear => old & !mask,
            };
            changed += u64::from((old ^ *word).count_ones());
        }
        Some(Touched {
            first,
            last,
            changed,
        })
    }

    /// Panics if a bit past the end is set.
    #[cfg(test)]
    #[allow(clippy::indexing_slicing)] // A test check: panicking is its job.
    fn check_padding(&self) {
        if let Some(i) = self.words.len().checked_sub(1) {
            assert_eq!(
                self.words[i] & !self.valid_mask(i),
                0,
                "bits past the end of a {}-bit level",
                self.bits
            );
        }
    }
}

/// The meaningful bits of word `i` of a level of `bits` bits.
fn valid_mask(bits: u64, i: usize) -> u64 {
    let remaining = bits.saturating_sub(to_u64(i).saturating_mul(WORD_BITS));
    if remaining >= WORD_BITS {
        u64::MAX
    } else {
        (1u64 << remaining) - 1
    }
}

/// Lossless: `usize` is at most 64 bits wide on every target Rust supports.
#[allow(clippy::cast_possible_truncation)]
fn to_u64(n: usize) -> u64 {
    n as u64
}

/// Position of the lowest set bit of `candidates`, a non-zero word at index
/// `word`. `None` only on overflow, which valid word indices cannot reach
/// (at most 2^58 words of 64 bits).
fn bit_position(word: usize, candidates: u64) -> Option<u64> {
    to_u64(word)
        .checked_mul(WORD_BITS)?
        .checked_add(u64::from(candidates.trailing_zeros()))
}

/// Finds the first bit `>= from` of `bits` that is set (`Want::Set`, with the
/// `any` summaries) or clear (`Want::Clear`, with the `full` summaries).
///
/// Climb: look at the rest of the current word; if nothing qualifies, move to
/// the parent level at the bit after this word's, and repeat. A clear `any`
/// bit (set `full` bit) means its whole child word can be skipped. Descend:
/// from the qualifying summary bit, take the first qualifying bit of each
/// child word; invariant 1 says there is one, and the whole child word lies
/// after the start because we climbed past the starting word.
fn search(bits: &Level, summaries: &[Level], from: u64, want: Want) -> Option<u64> {
    if from >= bits.bits {
        return None;
    }
    let level_at = |k: usize| match k.checked_sub(1) {
        None => Some(bits),
        Some(j) => summaries.get(j),
    };
    let candidates = |level: &Level, i: usize| {
        visit();
        let word = *level.words.get(i)?;
        Some(match want {
            Want::Set => word,
            Want::Clear => !word & level.valid_mask(i),
        })
    };

    let mut k = 0;
    let mut pos = from;
    let mut found = loop {
        // Past the top level (or past the end of a level): nothing qualifies.
        let level = level_at(k)?;
        let i = usize::try_from(pos / WORD_BITS).ok()?;
        let c = candidates(level, i)? & (u64::MAX << (pos % WORD_BITS));
        if c != 0 {
            break bit_position(i, c)?;
        }
        pos = pos / WORD_BITS + 1;
        k += 1;
    };
    while let Some(below) = k.checked_sub(1) {
        k = below;
        let i = usize::try_from(found).ok()?;
        let c = candidates(level_at(k)?, i)?;
        debug_assert_ne!(c, 0, "summary promised a qualifying bit in word {i}");
        found = bit_position(i, c)?;
    }
    Some(found)
}

/// The parent bits to apply `op` to after `op` touched `touched` on `child`.
///
/// Setting makes every touched word non-zero and clearing makes every touched
/// word non-full, so those parents cover the whole touched range. The other
/// two cases hold for the fully covered inner words, and are checked for the
/// two edge words.
fn parent_range(child: &Level, touched: Touched, kind: Summary, op: Op) -> Option<(u64, u64)> {
    let first = to_u64(touched.first);
    let last = to_u64(touched.last);
    let qualifies: fn(&Level, usize) -> bool = match (kind, op) {
        (Summary::Any, Op::Set) | (Summary::Full, Op::Clear) => return Some((first, last + 1)),
        (Summary::Any, Op::Clear) => |level, i| level.words.get(i) == Some(&0),
        (Summary::Full, Op::Set) => |level, i| level.words.get(i) == Some(&level.valid_mask(i)),
    };
    let lo = if qualifies(child, touched.first) {
        first
    } else {
        first + 1
    };
    let hi = if qualifies(child, touched.last) {
        last + 1
    } else {
        last
    };
    (lo < hi).then_some((lo, hi))
}

/// Carries a change of `bits` up one hierarchy, one level at a time, until a
/// level does not change.
fn propagate(bits: &Level, summaries: &mut [Level], touched: Touched, kind: Summary, op: Op) {
    let Some(mut range) = parent_range(bits, touched, kind, op) else {
        return;
    };
    for level in summaries {
        let applied = level.apply(range.0, range.1, op);
        debug_assert!(applied.is_some(), "summary range {range:?} fits its level");
        let Some(touched) = applied else { return };
        if touched.changed == 0 {
            return;
        }
        let Some(next) = parent_range(level, touched, kind, op) else {
            return;
        };
        range = next;
    }
}

/// Recomputes every level of one hierarchy from `bits`, bottom up.
fn rebuild_summaries(bits: &Level, summaries: &mut [Level], kind: Summary) {
    for j in 0..summaries.len() {
        let Some((lower, upper)) = summaries.split_at_mut_checked(j) else {
            return;
        };
        let child = lower.last().unwrap_or(bits);
        let Some(parent) = upper.first_mut() else {
            return;
        };
        for (chunk_index, (parent_word, chunk)) in parent
            .words
            .iter_mut()
            .zip(child.words.chunks(64))
            .enumerate()
        {
            let mut acc = 0u64;
            for (b, &word) in chunk.iter().enumerate() {
                // No overflow: this is an index into `child.words`.
                let i = chunk_index * 64 + b;
                let qualifies = match kind {
                    Summary::Any => word != 0,
                    Summary::Full => word == child.valid_mask(i),
                };
                acc |= u64::from(qualifies) << b;
            }
            *parent_word = acc;
        }
    }
}

/// Counts a word read by a search, so tests can check that searches visit
/// O(levels) words. Compiles to nothing outside tests.
#[inline]
fn visit() {
    #[cfg(test)]
    tests::note_visit();
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::cell::Cell;

    thread_local! {
        /// Words read by searches on this thread (each test has its own).
        static VISITS: Cell<u64> = const { Cell::new(0) };
    }

    pub(super) fn note_visit() {
        VISITS.with(|v| v.set(v.get() + 1));
    }

    fn take_visits() -> u64 {
        VISITS.with(|v| v.replace(0))
    }

    /// Number of levels (bits plus summaries).
    fn levels(bm: &DirtyBitmap) -> u64 {
        to_u64(bm.any.len()) + 1
    }

    /// The extents, bounded so that a search bug that stops the cursor from
    /// advancing fails the test instead of looping forever.
    fn extents(bm: &DirtyBitmap) -> Vec<(u64, u64)> {
        let most = usize::try_from(bm.len().div_ceil(2)).unwrap() + 1;
        bm.dirty_extents().take(most).collect()
    }

    #[test]
    fn len_zero() {
        let mut bm = DirtyBitmap::new(0);
        bm.check_invariants();
        assert!(bm.is_empty());
        assert_eq!(bm.len(), 0);
        assert_eq!(bm.count(), 0);
        assert!(!bm.is_dirty(0));
        assert_eq!(bm.next_dirty(0), None);
        assert_eq!(bm.next_clean(0), None);
        assert_eq!(bm.set_range(0, 0), Ok(0));
        assert_eq!(bm.clear_range(0, 0), Ok(0));
        assert_eq!(
            bm.set_range(0, 1),
            Err(OutOfRange {
                start: 0,
                end: 1,
                len: 0
            })
        );
        bm.set_all();
        bm.check_invariants();
        assert_eq!(bm.count(), 0);
        assert_eq!(extents(&bm), vec![]);
        bm.clear_all();
        assert_eq!(bm.to_bytes().len(), HEADER_BYTES);
        assert_eq!(DirtyBitmap::from_bytes(&bm.to_bytes()), Ok(bm.clone()));
        assert_eq!(bm.merge(&DirtyBitmap::new(0)), Ok(()));
    }

    #[test]
    fn len_one() {
        let mut bm = DirtyBitmap::new(1);
        assert!(!bm.is_empty());
        assert_eq!(bm.next_clean(0), Some(0));
        assert_eq!(bm.next_dirty(0), None);
        assert_eq!(bm.set_range(0, 1), Ok(1));
        assert_eq!(bm.set_range(0, 1), Ok(0));
        bm.check_invariants();
        assert!(bm.is_dirty(0));
        assert!(!bm.is_dirty(1));
        assert_eq!(bm.next_dirty(0), Some(0));
        assert_eq!(bm.next_dirty(1), None);
        assert_eq!(bm.next_clean(0), None);
        assert_eq!(extents(&bm), vec![(0, 1)]);
        assert_eq!(bm.clear_range(0, 1), Ok(1));
        assert_eq!(bm.count(), 0);
        bm.set_all();
        assert_eq!(bm.count(), 1);
        bm.check_invariants();
    }

    #[test]
    fn word_boundaries() {
        for len in [63, 64, 65, 127, 128, 129] {
            let mut bm = DirtyBitmap::new(len);
            bm.set_all();
            bm.check_invariants();
            assert_eq!(bm.count(), len);
            assert_eq!(bm.next_clean(0), None, "len {len}");
            assert_eq!(extents(&bm), vec![(0, len)]);
            assert_eq!(bm.clear_range(len - 1, len), Ok(1));
            bm.check_invariants();
            assert_eq!(bm.next_clean(0), Some(len - 1));
            assert_eq!(bm.next_dirty(len - 1), None);
            assert_eq!(extents(&bm), vec![(0, len - 1)]);
            assert_eq!(bm.clear_range(0, 1), Ok(1));
            assert_eq!(bm.next_dirty(0), Some(1));
            assert_eq!(bm.next_clean(0), Some(0));
            assert_eq!(bm.next_clean(1), Some(len - 1));
            assert_eq!(bm.count(), len - 2);
            bm.check_invariants();
        }
    }

    #[test]
    fn last_partial_word() {
        let len = 200; // 3 full words and 8 bits
        let mut bm = DirtyBitmap::new(len);
        assert_eq!(bm.set_range(190, 200), Ok(10));
        bm.check_invariants();
        assert_eq!(bm.next_dirty(0), Some(190));
        assert_eq!(bm.next_clean(190), None);
        assert_eq!(bm.next_clean(195), None);
        assert_eq!(bm.next_clean(189), Some(189));
        assert_eq!(extents(&bm), vec![(190, 200)]);
        // The last word holds exactly 8 meaningful bits: with them all set it
        // counts as full, and a 3-word level has a summary above it.
        assert_eq!(bm.set_range(192, 200), Ok(0));
        assert_eq!(bm.full[0].words[0] >> 3 & 1, 1);
        assert_eq!(bm.set_range(200, 201).unwrap_err().end, 201);
    }

    #[test]
    fn multi_level() {
        let len = 64 * 64 + 1;
        let mut bm = DirtyBitmap::new(len);
        assert_eq!(bm.any.len(), 2, "4097 bits: 65 words, 2 words, 1 word");
        assert_eq!(bm.set_range(len - 1, len), Ok(1));
        bm.check_invariants();
        assert_eq!(bm.next_dirty(0), Some(len - 1));
        assert_eq!(bm.next_dirty(len - 1), Some(len - 1));
        assert_eq!(bm.next_dirty(len), None);
        bm.set_all();
        bm.check_invariants();
        assert_eq!(bm.next_clean(0), None);
        assert_eq!(bm.clear_range(4095, 4096), Ok(1));
        bm.check_invariants();
        assert_eq!(bm.next_clean(0), Some(4095));
        assert_eq!(bm.next_clean(4096), None);
        assert_eq!(extents(&bm), vec![(0, 4095), (4096, len)]);
        // Clearing everything but one chunk across all words.
        assert_eq!(bm.clear_range(1, len), Ok(len - 2));
        bm.check_invariants();
        assert_eq!(extents(&bm), vec![(0, 1)]);
        assert_eq!(bm.next_dirty(1), None);
    }

    #[test]
    fn empty_ranges() {
        let mut bm = DirtyBitmap::new(100);
        bm.set_all();
        for at in [0, 1, 63, 64, 99, 100] {
            assert_eq!(bm.set_range(at, at), Ok(0));
            assert_eq!(bm.clear_range(at, at), Ok(0));
        }
        assert_eq!(bm.count(), 100);
        assert!(bm.set_range(101, 101).is_err());
        assert!(bm.clear_range(101, 101).is_err());
        bm.check_invariants();
    }

    #[test]
    fn out_of_range_is_an_error_and_changes_nothing() {
        let mut bm = DirtyBitmap::new(100);
        bm.set_range(10, 20).unwrap();
        let before = bm.clone();
        for (start, end) in [(0, 101), (20, 10), (101, 200), (0, u64::MAX), (u64::MAX, 0)] {
            assert_eq!(
                bm.set_range(start, end),
                Err(OutOfRange {
                    start,
                    end,
                    len: 100
                })
            );
            assert_eq!(
                bm.clear_range(start, end),
                Err(OutOfRange {
                    start,
                    end,
                    len: 100
                })
            );
        }
        assert_eq!(bm, before);
        assert_eq!(
            OutOfRange {
                start: 5,
                end: 3,
                len: 4
            }
            .to_string(),
            "chunk range 5..3 is outside a bitmap of 4 chunks"
        );
        assert!(!bm.is_dirty(u64::MAX));
        assert_eq!(bm.next_dirty(u64::MAX), None);
        assert_eq!(bm.next_clean(u64::MAX), None);
    }

    #[test]
    fn set_and_clear_return_flipped_counts() {
        let mut bm = DirtyBitmap::new(300);
        assert_eq!(bm.set_range(10, 100), Ok(90));
        assert_eq!(bm.set_range(50, 150), Ok(50));
        assert_eq!(bm.count(), 140);
        assert_eq!(bm.clear_range(0, 20), Ok(10));
        assert_eq!(bm.clear_range(0, 20), Ok(0));
        assert_eq!(bm.clear_range(140, 300), Ok(10));
        assert_eq!(bm.count(), 120);
        assert_eq!(extents(&bm), vec![(20, 140)]);
        bm.check_invariants();
    }

    #[test]
    fn next_dirty_skips_big_clean_gaps_in_few_words() {
        let len = 64 * 64 * 64 * 3 + 5;
        let mut bm = DirtyBitmap::new(len);
        bm.set_range(3, 4).unwrap();
        bm.set_range(len - 2, len).unwrap();
        bm.check_invariants();
        take_visits();
        assert_eq!(bm.next_dirty(4), Some(len - 2));
        let visits = take_visits();
        assert!(
            visits <= 2 * levels(&bm),
            "{visits} words visited, {} levels",
            levels(&bm)
        );
        assert_eq!(bm.next_dirty(0), Some(3));
        assert_eq!(extents(&bm), vec![(3, 4), (len - 2, len)]);
        // And the dual: a long dirty run ends in O(levels) too.
        bm.set_all();
        bm.clear_range(len - 3, len - 2).unwrap();
        take_visits();
        assert_eq!(bm.next_clean(1), Some(len - 3));
        assert!(take_visits() <= 2 * levels(&bm));
    }

    #[test]
    fn set_all_masks_the_last_word() {
        for len in [1, 5, 63, 65, 100, 4097] {
            let mut bm = DirtyBitmap::new(len);
            bm.set_all();
            bm.check_invariants();
            let bytes = bm.to_bytes();
            let last = u64::from_le_bytes(bytes[bytes.len() - 8..].try_into().unwrap());
            assert_eq!(
                last.count_ones(),
                u32::try_from((len - 1) % 64 + 1).unwrap()
            );
            let mut other = DirtyBitmap::new(len);
            other.set_range(0, len).unwrap();
            assert_eq!(bm, other, "set_all == set_range(0, len)");
        }
    }

    #[test]
    fn merge() {
        let mut a = DirtyBitmap::new(4200);
        let mut b = DirtyBitmap::new(4200);
        a.set_range(0, 64).unwrap();
        b.set_range(64, 128).unwrap();
        b.set_range(4000, 4100).unwrap();
        a.merge(&b).unwrap();
        a.check_invariants();
        assert_eq!(a.count(), 228);
        assert_eq!(extents(&a), vec![(0, 128), (4000, 4100)]);
        // Two words, neither full, that OR to a full one.
        let mut c = DirtyBitmap::new(4200);
        let mut d = DirtyBitmap::new(4200);
        c.set_range(128, 160).unwrap();
        d.set_range(160, 192).unwrap();
        c.merge(&d).unwrap();
        c.check_invariants();
        assert_eq!(c.next_clean(128), Some(192));

        let before = a.clone();
        assert_eq!(
            a.merge(&DirtyBitmap::new(4201)),
            Err(LengthMismatch {
                len: 4200,
                other: 4201
            })
        );
        assert_eq!(a, before);
    }

    #[test]
    fn bytes_round_trip() {
        for len in [0, 1, 63, 64, 65, 4097, 100_000] {
            let mut bm = DirtyBitmap::new(len);
            if len > 0 {
                bm.set_range(len / 3, len / 2).unwrap();
                bm.set_range(len - 1, len).unwrap();
            }
            let bytes = bm.to_bytes();
            assert_eq!(
                u64::try_from(bytes.len()).unwrap(),
                16 + 8 * len.div_ceil(64)
            );
            assert_eq!(&bytes[..4], b"BMDB");
            let back = DirtyBitmap::from_bytes(&bytes).unwrap();
            back.check_invariants();
            assert_eq!(back, bm);
            assert_eq!(back.count(), bm.count());
        }
    }

    #[test]
    fn bytes_layout_is_little_endian() {
        let mut bm = DirtyBitmap::new(70);
        bm.set_range(0, 1).unwrap();
        bm.set_range(65, 66).unwrap();
        let mut expected = b"BMDB".to_vec();
        expected.extend_from_slice(&1u32.to_le_bytes());
        expected.extend_from_slice(&70u64.to_le_bytes());
        expected.extend_from_slice(&1u64.to_le_bytes());
        expected.extend_from_slice(&2u64.to_le_bytes());
        assert_eq!(bm.to_bytes(), expected);
    }

    #[test]
    fn garbage_bytes_are_errors() {
        let mut bm = DirtyBitmap::new(130);
        bm.set_range(1, 129).unwrap();
        let good = bm.to_bytes();

        for n in 0..HEADER_BYTES {
            assert_eq!(
                DirtyBitmap::from_bytes(&good[..n]),
                Err(DecodeError::Truncated { len: n })
            );
        }
        for n in HEADER_BYTES..good.len() {
            assert!(matches!(
                DirtyBitmap::from_bytes(&good[..n]),
                Err(DecodeError::WrongSize { len: 130, .. })
            ));
        }
        let mut longer = good.clone();
        longer.push(0);
        assert!(matches!(
            DirtyBitmap::from_bytes(&longer),
            Err(DecodeError::WrongSize { .. })
        ));

        let mut bad_magic = good.clone();
        bad_magic[0] = b'X';
        assert!(matches!(
            DirtyBitmap::from_bytes(&bad_magic),
            Err(DecodeError::BadMagic { .. })
        ));
        let mut bad_version = good.clone();
        bad_version[4] = 9;
        assert_eq!(
            DirtyBitmap::from_bytes(&bad_version),
            Err(DecodeError::UnsupportedVersion { version: 9 })
        );

        // A huge length with a tiny body is rejected without allocating.
        let mut huge = good[..HEADER_BYTES].to_vec();
        huge[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(
            DirtyBitmap::from_bytes(&huge),
            Err(DecodeError::WrongSize {
                len: u64::MAX,
                expected_bytes: 1 << 61,
                actual_bytes: 0
            })
        );

        // Bit 130 (past the end) set in the last word.
        let mut stray = good.clone();
        let last = stray.len() - 8;
        stray[last] |= 0b100;
        assert_eq!(
            DirtyBitmap::from_bytes(&stray),
            Err(DecodeError::BitsPastEnd { len: 130 })
        );
    }

    #[test]
    fn debug_is_short() {
        let mut bm = DirtyBitmap::new(1 << 20);
        bm.set_range(5, 10).unwrap();
        assert_eq!(
            format!("{bm:?}"),
            "DirtyBitmap { len: 1048576, count: 5, .. }"
        );
    }

    /// Guards the hierarchy: on 2^26 chunks (2^20 words) a flat scan would
    /// read a million words per call.
    #[test]
    fn next_dirty_on_a_huge_bitmap_visits_o_levels_words() {
        let len = 1u64 << 26;
        let mut bm = DirtyBitmap::new(len);
        assert_eq!(levels(&bm), 5);
        bm.set_range(len - 1, len).unwrap();
        take_visits();
        for _ in 0..1000 {
            assert_eq!(bm.next_dirty(0), Some(len - 1));
        }
        let visits = take_visits();
        assert!(visits <= 1000 * 2 * 5, "{visits} words visited");

        bm.set_all();
        bm.clear_range(len - 1, len).unwrap();
        for _ in 0..1000 {
            assert_eq!(bm.next_clean(0), Some(len - 1));
        }
        assert!(take_visits() <= 1000 * 2 * 5);
        assert_eq!(extents(&bm), vec![(0, len - 1)]);
    }

    // ---- Property tests against a Vec<bool> model -------------------------

    #[derive(Debug, Clone)]
    enum Action {
        Set(u64, u64),
        Clear(u64, u64),
        SetAll,
        ClearAll,
        Merge {
            mismatched: bool,
            ranges: Vec<(u64, u64)>,
        },
        NextDirty(u64),
        NextClean(u64),
        IsDirty(u64),
        RoundTrip,
    }

    /// Chunk positions, biased to the edges: 0, the end, just past it, and
    /// word boundaries.
    fn position(len: u64) -> impl Strategy<Value = u64> {
        prop_oneof![
            3 => 0..=len + 1,
            1 => Just(0),
            1 => Just(len),
            2 => len.saturating_sub(2)..=len + 1,
            3 => (0..=len / 64).prop_flat_map(|w| (w * 64).saturating_sub(1)..=w * 64 + 1),
        ]
    }

    /// Ranges: mostly ordered, some short (sparse ops on big bitmaps), some
    /// possibly reversed or out of bounds.
    fn range(len: u64) -> impl Strategy<Value = (u64, u64)> {
        prop_oneof![
            4 => (position(len), position(len)).prop_map(|(a, b)| (a.min(b), a.max(b))),
            4 => (position(len), 0..200u64).prop_map(|(a, n)| (a, a + n)),
            1 => (position(len), position(len)),
        ]
    }

    fn action(len: u64) -> impl Strategy<Value = Action> {
        prop_oneof![
            5 => range(len).prop_map(|(a, b)| Action::Set(a, b)),
            5 => range(len).prop_map(|(a, b)| Action::Clear(a, b)),
            1 => Just(Action::SetAll),
            1 => Just(Action::ClearAll),
            1 => (prop::bool::weighted(0.1), prop::collection::vec(range(len), 0..4))
                .prop_map(|(mismatched, ranges)| Action::Merge { mismatched, ranges }),
            3 => position(len).prop_map(Action::NextDirty),
            3 => position(len).prop_map(Action::NextClean),
            2 => position(len).prop_map(Action::IsDirty),
            1 => Just(Action::RoundTrip),
        ]
    }

    fn model_extents(model: &[bool]) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut start = None;
        for (i, &d) in model.iter().enumerate() {
            match (d, start) {
                (true, None) => start = Some(to_u64(i)),
                (false, Some(s)) => {
                    out.push((s, to_u64(i)));
                    start = None;
                }
                _ => {}
            }
        }
        if let Some(s) = start {
            out.push((s, to_u64(model.len())));
        }
        out
    }

    fn model_next(model: &[bool], from: u64, dirty: bool) -> Option<u64> {
        let from = usize::try_from(from).unwrap().min(model.len());
        model[from..]
            .iter()
            .position(|&d| d == dirty)
            .map(|p| to_u64(from + p))
    }

    /// Applies a range op to the model, returning what the bitmap must return.
    fn model_range(
        model: &mut [bool],
        start: u64,
        end: u64,
        value: bool,
    ) -> Result<u64, OutOfRange> {
        let len = to_u64(model.len());
        if start > end || end > len {
            return Err(OutOfRange { start, end, len });
        }
        let span = &mut model[usize::try_from(start).unwrap()..usize::try_from(end).unwrap()];
        let flipped = span.iter().filter(|&&d| d != value).count();
        span.fill(value);
        Ok(to_u64(flipped))
    }

    fn run(len: u64, actions: Vec<Action>) -> Result<(), TestCaseError> {
        let mut bm = DirtyBitmap::new(len);
        let mut model = vec![false; usize::try_from(len).unwrap()];
        for action in actions {
            match action {
                Action::Set(a, b) => {
                    prop_assert_eq!(bm.set_range(a, b), model_range(&mut model, a, b, true));
                }
                Action::Clear(a, b) => {
                    prop_assert_eq!(bm.clear_range(a, b), model_range(&mut model, a, b, false));
                }
                Action::SetAll => {
                    bm.set_all();
                    model.fill(true);
                }
                Action::ClearAll => {
                    bm.clear_all();
                    model.fill(false);
                }
                Action::Merge { mismatched, ranges } => {
                    let other_len = if mismatched { len + 1 } else { len };
                    let mut other = DirtyBitmap::new(other_len);
                    let mut other_model = vec![false; usize::try_from(other_len).unwrap()];
                    for (a, b) in ranges {
                        prop_assert_eq!(
                            other.set_range(a, b),
                            model_range(&mut other_model, a, b, true)
                        );
                    }
                    other.check_invariants();
                    let result = bm.merge(&other);
                    if mismatched {
                        prop_assert_eq!(
                            result,
                            Err(LengthMismatch {
                                len,
                                other: other_len
                            })
                        );
                    } else {
                        prop_assert_eq!(result, Ok(()));
                        for (m, o) in model.iter_mut().zip(&other_model) {
                            *m |= *o;
                        }
                    }
                }
                Action::NextDirty(from) => {
                    prop_assert_eq!(bm.next_dirty(from), model_next(&model, from, true));
                }
                Action::NextClean(from) => {
                    prop_assert_eq!(bm.next_clean(from), model_next(&model, from, false));
                }
                Action::IsDirty(chunk) => {
                    let expected = usize::try_from(chunk)
                        .ok()
                        .and_then(|c| model.get(c))
                        .copied()
                        .unwrap_or(false);
                    prop_assert_eq!(bm.is_dirty(chunk), expected);
                }
                Action::RoundTrip => {
                    let back = DirtyBitmap::from_bytes(&bm.to_bytes());
                    prop_assert_eq!(back.as_ref(), Ok(&bm));
                    back.unwrap().check_invariants();
                }
            }
            bm.check_invariants();
            prop_assert_eq!(bm.len(), len);
            prop_assert_eq!(bm.count(), to_u64(model.iter().filter(|&&d| d).count()));
            prop_assert_eq!(extents(&bm), model_extents(&model));
        }
        Ok(())
    }

    /// After a run, every search position agrees with the model.
    fn check_all_positions(bm: &DirtyBitmap, model: &[bool]) -> Result<(), TestCaseError> {
        let len = to_u64(model.len());
        let (mut next_dirty, mut next_clean) = (None, None);
        for from in (0..len + 2).rev() {
            if let Some(&d) = usize::try_from(from).ok().and_then(|f| model.get(f)) {
                if d {
                    next_dirty = Some(from);
                } else {
                    next_clean = Some(from);
                }
            }
            prop_assert_eq!(bm.next_dirty(from), next_dirty, "next_dirty({})", from);
            prop_assert_eq!(bm.next_clean(from), next_clean, "next_clean({})", from);
            prop_assert_eq!(bm.is_dirty(from), next_dirty == Some(from));
        }
        Ok(())
    }

    fn small_len() -> impl Strategy<Value = u64> {
        prop_oneof![
            3 => 0..5000u64,
            1 => prop::sample::select(vec![0u64, 1, 2, 63, 64, 65, 127, 128, 129, 4095, 4096, 4097, 4160, 4161]),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn matches_model(
            (len, actions) in small_len()
                .prop_flat_map(|len| (Just(len), prop::collection::vec(action(len), 1..40)))
        ) {
            run(len, actions)?;
        }

        #[test]
        fn searches_match_model_everywhere(
            (len, ranges) in small_len()
                .prop_flat_map(|len| (Just(len), prop::collection::vec(range(len), 0..12)))
        ) {
            let mut bm = DirtyBitmap::new(len);
            let mut model = vec![false; usize::try_from(len).unwrap()];
            for (i, (a, b)) in ranges.into_iter().enumerate() {
                // Alternate marks and clears so both kinds of edges appear.
                let mark = i % 3 != 2;
                let expected = model_range(&mut model, a, b, mark);
                let got = if mark { bm.set_range(a, b) } else { bm.clear_range(a, b) };
                prop_assert_eq!(got, expected);
            }
            bm.check_invariants();
            check_all_positions(&bm, &model)?;
        }

        #[test]
        fn from_bytes_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..100)) {
            let _ = DirtyBitmap::from_bytes(&bytes);
        }

        #[test]
        fn from_bytes_with_valid_header_never_panics(
            len in 0..300u64,
            body in prop::collection::vec(any::<u8>(), 0..48),
        ) {
            let mut bytes = b"BMDB".to_vec();
            bytes.extend_from_slice(&1u32.to_le_bytes());
            bytes.extend_from_slice(&len.to_le_bytes());
            bytes.extend_from_slice(&body);
            if let Ok(bm) = DirtyBitmap::from_bytes(&bytes) {
                bm.check_invariants();
                prop_assert_eq!(bm.to_bytes(), bytes);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(12))]

        #[test]
        fn matches_model_large_sparse(
            (len, actions) in prop_oneof![Just(1u64 << 20), Just((1u64 << 20) + 37)]
                .prop_flat_map(|len| (Just(len), prop::collection::vec(action(len), 1..25)))
        ) {
            run(len, actions)?;
        }
    }
}

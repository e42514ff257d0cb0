//! A raw file or block device as a backend.

use super::direct::DirectIo;
use super::{Allocation, BlockBackend};
use nix::fcntl::{FallocateFlags, fallocate};
use nix::unistd::{Whence, lseek};
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

/// Zero buffer size used when the filesystem cannot zero a range itself.
const ZERO_FILL_CHUNK_BYTES: usize = 1 << 20;

/// How a file backend uses the kernel's page cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CacheMode {
    /// Buffered I/O: writes land in the page cache and a flush writes them
    /// back. Fast for small writes; any alignment.
    #[default]
    Buffered,
    /// `O_DIRECT`: every read and write goes to the device; a flush only
    /// empties the device's cache. Unaligned requests cost a bounce copy
    /// (and a read-modify-write of partly written blocks).
    Direct,
}

impl CacheMode {
    /// `Direct` when `direct_io` is set (the API's and the records' flag).
    pub fn from_direct_io(direct_io: bool) -> Self {
        if direct_io {
            Self::Direct
        } else {
            Self::Buffered
        }
    }
}

/// A raw image file or a block device.
#[derive(Debug)]
pub struct FileBackend {
    file: File,
    /// Set when the file is open with `O_DIRECT`.
    direct: Option<DirectIo>,
    /// Cleared when the kernel refuses `RWF_DONTCACHE` (before Linux
    /// 6.14, or a filesystem without it): bulk reads and writes are plain
    /// from then.
    dontcache_works: AtomicBool,
    path: String,
    size: u64,
    is_block_device: bool,
}

impl FileBackend {
    /// Opens an existing file or block device for reading and writing.
    ///
    /// # Errors
    /// The OS error of `open`, or of finding the size; `InvalidInput` for
    /// a path that is neither a file nor a block device, or (direct) one
    /// that cannot do direct I/O.
    pub fn open(path: &Path, mode: CacheMode) -> io::Result<Self> {
        let mut file = open_options(mode)
            .open(path)
            .map_err(|e| direct_unsupported(e, mode))?;
        let meta = file.metadata()?;
        let is_block_device = meta.file_type().is_block_device();
        if !is_block_device && !meta.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file or block device",
            ));
        }
        let size = file.seek(SeekFrom::End(0))?;
        let direct = direct_io(&file, size, mode)?;
        Ok(Self {
            dontcache_works: AtomicBool::new(true),
            file,
            direct,
            path: path.display().to_string(),
            size,
            is_block_device,
        })
    }

    /// Creates a new sparse file of `size` bytes; fails if it exists. With
    /// [`CacheMode::Direct`], a file the filesystem cannot do direct I/O
    /// on is removed again.
    ///
    /// # Errors
    /// The OS error of creating or sizing the file; `InvalidInput` as for
    /// [`Self::open`].
    pub fn create(path: &Path, size: u64, mode: CacheMode) -> io::Result<Self> {
        let file = open_options(mode)
            .create_new(true)
            .open(path)
            .map_err(|e| direct_unsupported(e, mode))?;
        let direct = file
            .set_len(size)
            .and_then(|()| direct_io(&file, size, mode))
            .inspect_err(|_| {
                let _ = std::fs::remove_file(path);
            })?;
        Ok(Self {
            dontcache_works: AtomicBool::new(true),
            file,
            direct,
            path: path.display().to_string(),
            size,
            is_block_device: false,
        })
    }

    /// Moves `len` bytes with `step` (one `RWF_DONTCACHE` call from the
    /// given progress, returning bytes moved) while the kernel takes the
    /// flag, and returns how far it got; the caller moves the rest plainly.
    /// A refusal (before Linux 6.14, or a file system without it) turns the
    /// flag off for this file from then on; `stuck` is the error for a call
    /// that moves nothing.
    fn dontcache_prefix(
        &self,
        len: usize,
        stuck: io::ErrorKind,
        mut step: impl FnMut(usize) -> io::Result<usize>,
    ) -> io::Result<usize> {
        let mut done = 0;
        while done < len && self.dontcache_works.load(Ordering::Relaxed) {
            match step(done) {
                Ok(0) => return Err(io::Error::from(stuck)),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EINVAL)) => {
                    if self.dontcache_works.swap(false, Ordering::Relaxed) {
                        tracing::info!(
                            path = %self.path,
                            error = %e,
                            "RWF_DONTCACHE not supported; bulk reads and writes of this file stay in the page cache"
                        );
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }

    fn zero_fill(&self, mut offset: u64, len: u64) -> io::Result<()> {
        let end = offset + len;
        // Aligned, so a direct-I/O file takes it without a bounce copy.
        let zeroes = crate::aligned::zeroed_bytes(ZERO_FILL_CHUNK_BYTES);
        while offset < end {
            let n = usize::try_from(end - offset)
                .unwrap_or(usize::MAX)
                .min(zeroes.len());
            self.write_at(&zeroes[..n], offset)?;
            offset += n as u64;
        }
        Ok(())
    }
}

fn open_options(mode: CacheMode) -> OpenOptions {
    let mut options = OpenOptions::new();
    options.read(true).write(true);
    if mode == CacheMode::Direct {
        options.custom_flags(libc::O_DIRECT);
    }
    options
}

/// `open` fails with `EINVAL` where the filesystem refuses `O_DIRECT`.
fn direct_unsupported(e: io::Error, mode: CacheMode) -> io::Error {
    if mode == CacheMode::Direct && e.raw_os_error() == Some(libc::EINVAL) {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "the filesystem does not support direct I/O (O_DIRECT)",
        )
    } else {
        e
    }
}

fn direct_io(file: &File, size: u64, mode: CacheMode) -> io::Result<Option<DirectIo>> {
    match mode {
        CacheMode::Buffered => Ok(None),
        CacheMode::Direct => DirectIo::new(file, size).map(Some),
    }
}

/// One `preadv2` with `flags` (`RWF_NOWAIT`, `RWF_DONTCACHE`): bytes read.
/// (No safe wrapper in nix or std takes these flags.)
#[allow(unsafe_code)]
fn preadv2(file: &File, buf: &mut [u8], offset: u64, flags: libc::c_int) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    let offset = off_t(offset)?;
    let iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: `iov` describes `buf`, a live, exclusively borrowed slice of
    // `iov_len` bytes that outlives the call; the kernel writes at most that
    // many bytes into it. The descriptor is owned by `file` and open.
    let n = unsafe { libc::preadv2(file.as_raw_fd(), &raw const iov, 1, offset, flags) };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// One `pwritev2(RWF_DONTCACHE)`: a buffered write whose pages the kernel
/// writes back at once and then drops (Linux 6.14+). Unlike `O_DIRECT` it
/// stays coherent with the plain buffered writes guests make to the same
/// file, and needs no alignment. (No safe wrapper takes the flag.)
#[allow(unsafe_code)]
fn write_dontcache(file: &File, buf: &[u8], offset: u64) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    let offset = off_t(offset)?;
    let iov = libc::iovec {
        iov_base: buf.as_ptr().cast_mut().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: `iov` describes `buf`, a live slice of `iov_len` bytes that
    // outlives the call; for a write the kernel only reads from it. The
    // descriptor is owned by `file` and open.
    let n = unsafe {
        libc::pwritev2(
            file.as_raw_fd(),
            &raw const iov,
            1,
            offset,
            libc::RWF_DONTCACHE,
        )
    };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

fn off_t(v: u64) -> io::Result<i64> {
    i64::try_from(v).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))
}

impl BlockBackend for FileBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        match &self.direct {
            Some(d) => d.read(&self.file, buf, offset),
            None => self.file.read_exact_at(buf, offset),
        }
    }

    fn read_cached(&self, buf: &mut [u8], offset: u64) -> usize {
        if self.direct.is_some() {
            return 0;
        }
        let mut done = 0;
        while done < buf.len() {
            match preadv2(
                &self.file,
                &mut buf[done..],
                offset + done as u64,
                libc::RWF_NOWAIT,
            ) {
                Ok(n) if n > 0 => done += n,
                // Not cached (EAGAIN), not supported, end of file, or an
                // error the blocking read will report properly.
                _ => break,
            }
        }
        done
    }

    fn read_uncached(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if self.direct.is_some() {
            return self.read_at(buf, offset);
        }
        let done = self.dontcache_prefix(buf.len(), io::ErrorKind::UnexpectedEof, |done| {
            let at = offset + done as u64;
            preadv2(&self.file, &mut buf[done..], at, libc::RWF_DONTCACHE)
        })?;
        self.file
            .read_exact_at(&mut buf[done..], offset + done as u64)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        match &self.direct {
            Some(d) => d.write(&self.file, buf, offset),
            None => self.file.write_all_at(buf, offset),
        }
    }

    fn write_uncached(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.direct.is_some() {
            return self.write_at(buf, offset);
        }
        let done = self.dontcache_prefix(buf.len(), io::ErrorKind::WriteZero, |done| {
            write_dontcache(&self.file, &buf[done..], offset + done as u64)
        })?;
        self.file.write_all_at(&buf[done..], offset + done as u64)
    }

    fn write_zeroes(&self, offset: u64, len: u64, punch: bool) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        if !self.is_block_device {
            // Direct writes rewrite whole blocks; none may do so across
            // the zeroing.
            let _held = self.direct.as_ref().map(|d| d.hold(offset, len));
            let flags = if punch {
                FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE
            } else {
                FallocateFlags::FALLOC_FL_ZERO_RANGE | FallocateFlags::FALLOC_FL_KEEP_SIZE
            };
            if fallocate(&self.file, flags, off_t(offset)?, off_t(len)?).is_ok() {
                return Ok(());
            }
        }
        self.zero_fill(offset, len)
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn allocation(&self, offset: u64, len: u64) -> io::Result<Allocation> {
        let end = offset.saturating_add(len).min(self.size);
        if self.is_block_device || offset >= end {
            return Ok(Allocation::Data { end });
        }
        match lseek(&self.file, off_t(offset)?, Whence::SeekData) {
            Err(nix::errno::Errno::ENXIO) => Ok(Allocation::Hole { end }),
            Err(_) => Ok(Allocation::Data { end }),
            Ok(data) => {
                let data = u64::try_from(data).unwrap_or(offset);
                if data > offset {
                    return Ok(Allocation::Hole { end: data.min(end) });
                }
                let hole = lseek(&self.file, off_t(offset)?, Whence::SeekHole)
                    .ok()
                    .and_then(|h| u64::try_from(h).ok())
                    .unwrap_or(end);
                Ok(Allocation::Data {
                    end: hole.clamp(offset + 1, end),
                })
            }
        }
    }

    fn is_known_zero(&self) -> bool {
        !self.is_block_device
            && matches!(
                lseek(&self.file, 0, Whence::SeekData),
                Err(nix::errno::Errno::ENXIO)
            )
    }

    fn is_local(&self) -> bool {
        // Direct I/O waits on the device queue, not microseconds.
        self.direct.is_none()
    }

    fn is_direct(&self) -> bool {
        self.direct.is_some()
    }

    fn block_size(&self) -> u32 {
        self.direct.as_ref().map_or(512, |d| {
            u32::try_from(d.block_size()).unwrap_or(u32::MAX).max(512)
        })
    }

    fn path(&self) -> &str {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holes_and_data_are_classified() {
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let path = dir.path().join("img");
        let b = FileBackend::create(&path, 8 << 20, CacheMode::Buffered).unwrap();
        assert!(b.is_known_zero());
        b.write_at(&[1u8; 4096], 4 << 20).unwrap();
        assert!(!b.is_known_zero());
        assert_eq!(
            b.allocation(0, 8 << 20).unwrap(),
            Allocation::Hole { end: 4 << 20 }
        );
        assert!(matches!(
            b.allocation(4 << 20, 1 << 20).unwrap(),
            Allocation::Data { .. }
        ));
        let mut cached = [9u8; 8192];
        assert_eq!(b.read_cached(&mut cached, (4 << 20) - 4096), 8192);
        assert_eq!(&cached[..4096], &[0u8; 4096][..]);
        assert_eq!(&cached[4096..], &[1u8; 4096][..]);
        b.write_zeroes(4 << 20, 4096, true).unwrap();
        let mut buf = [9u8; 4096];
        b.read_at(&mut buf, 4 << 20).unwrap();
        assert!(buf.iter().all(|&x| x == 0));
    }

    /// Bytes of `path` in the page cache, by util-linux's `fincore`
    /// (`preadv2(RWF_NOWAIT)` cannot tell: it starts readahead, which a
    /// fast device may finish before the read looks again).
    fn resident_bytes(path: &Path) -> u64 {
        let out = std::process::Command::new("fincore")
            .args(["--raw", "--noheadings", "--bytes", "--output", "RES"])
            .arg(path)
            .output()
            .expect("fincore (util-linux) runs");
        assert!(out.status.success(), "fincore: {out:?}");
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    }

    /// Waits up to 5 s for the kernel to drop what `what` brought into the
    /// cache (written-back pages leave when their writeback ends).
    fn wait_until_cached_at_most(path: &Path, bytes: u64, what: &str) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while resident_bytes(path) > bytes {
            assert!(
                std::time::Instant::now() < deadline,
                "{what} stay in the page cache: {} bytes",
                resident_bytes(path)
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    #[test]
    fn bulk_writes_leave_the_page_cache_and_stay_coherent_with_buffered_ones() {
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let path = dir.path().join("img");
        let b = FileBackend::create(&path, 4 << 20, CacheMode::Buffered).unwrap();
        // A buffered guest write leaves cached (dirty) pages in the range.
        b.write_at(&[1u8; 8192], 1 << 20).unwrap();
        assert_eq!(resident_bytes(&path), 8192);
        // A bulk write over it (and one elsewhere, from an unaligned
        // buffer at an odd offset) is written back, and the pages it
        // brought in are dropped; pages that were cached before stay (with
        // the new bytes).
        b.write_uncached(&[2u8; 64 << 10], 1 << 20).unwrap();
        b.write_uncached(&vec![5u8; 70_001][1..], (3 << 20) + 100)
            .unwrap();
        assert!(
            b.dontcache_works.load(Ordering::Relaxed),
            "this kernel and filesystem take RWF_DONTCACHE"
        );
        wait_until_cached_at_most(&path, 8192, "bulk writes");
        let mut back = vec![0u8; 64 << 10];
        b.read_at(&mut back, 1 << 20).unwrap();
        assert!(back.iter().all(|&x| x == 2), "the bulk write won");
        // A later buffered write over part of it reads back as written.
        b.write_at(&[3u8; 1024], (1 << 20) + 1024).unwrap();
        b.read_at(&mut back, 1 << 20).unwrap();
        assert!(back[..1024].iter().all(|&x| x == 2));
        assert!(back[1024..2048].iter().all(|&x| x == 3));
        assert!(back[2048..].iter().all(|&x| x == 2));
        // On storage, not only in the cache: drop the cache and read again.
        b.flush().unwrap();
        nix::fcntl::posix_fadvise(
            &b.file,
            0,
            0,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        )
        .unwrap();
        b.read_at(&mut back, 1 << 20).unwrap();
        assert!(back[1024..2048].iter().all(|&x| x == 3));
        assert!(back[2048..].iter().all(|&x| x == 2));
        let mut odd = vec![0u8; 70_000];
        b.read_at(&mut odd, (3 << 20) + 100).unwrap();
        assert!(odd.iter().all(|&x| x == 5));
    }

    #[test]
    fn bulk_reads_leave_the_page_cache_as_they_found_it() {
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let path = dir.path().join("img");
        let b = FileBackend::create(&path, 4 << 20, CacheMode::Buffered).unwrap();
        let pattern: Vec<u8> = (0..4 << 20).map(|i: u32| (i % 251) as u8).collect();
        b.write_at(&pattern, 0).unwrap();
        b.flush().unwrap();
        nix::fcntl::posix_fadvise(
            &b.file,
            0,
            0,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        )
        .unwrap();
        assert_eq!(resident_bytes(&path), 0);
        // A guest's write leaves its pages cached (dirty, with new bytes).
        b.write_at(&[7u8; 8192], 1 << 20).unwrap();
        assert_eq!(resident_bytes(&path), 8192);
        // Bulk reads of the whole file, and of an odd range, read every
        // byte as it is now, and bring nothing into the cache to stay.
        let mut all = vec![0u8; 4 << 20];
        b.read_uncached(&mut all, 0).unwrap();
        let mut want = pattern.clone();
        want[1 << 20..(1 << 20) + 8192].fill(7);
        assert!(all == want, "a bulk read returns the file's bytes");
        let mut odd = vec![0u8; 70_001];
        b.read_uncached(&mut odd, (2 << 20) + 333).unwrap();
        assert!(odd[..] == want[(2 << 20) + 333..(2 << 20) + 333 + 70_001]);
        assert!(
            b.dontcache_works.load(Ordering::Relaxed),
            "this kernel and filesystem take RWF_DONTCACHE reads"
        );
        wait_until_cached_at_most(&path, 8192, "bulk reads");
        // The guest's cached pages stayed.
        assert_eq!(resident_bytes(&path), 8192);
        // Reading past the end is an error, not a short read.
        let mut past = vec![0u8; 4096];
        assert!(b.read_uncached(&mut past, (4 << 20) - 2048).is_err());
    }

    /// A small deterministic generator for test offsets and lengths.
    fn next(state: &mut u64) -> u64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    }

    /// A number in `0..n` from the generator.
    fn below(state: &mut u64, n: usize) -> usize {
        usize::try_from(next(state) % n as u64).unwrap()
    }

    #[test]
    fn direct_io_reads_and_writes_any_range_without_the_page_cache() {
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let path = dir.path().join("img");
        const SIZE: usize = 2 << 20;
        let b = FileBackend::create(&path, SIZE as u64, CacheMode::Direct).unwrap();
        assert!(b.is_direct() && !b.is_local());
        assert!(b.block_size() >= 512);
        let mut model = vec![0u8; SIZE];
        let mut rng = 0x9e37_79b9_7f4a_7c15_u64;
        let mut buf = vec![0u8; 600_000];
        for round in 0..300_u32 {
            // Odd offsets and lengths, some longer than one bounce piece,
            // from buffers at odd addresses; now and then an aligned one.
            let aligned = round % 10 == 0;
            let len = if aligned {
                64 << 10
            } else {
                1 + below(&mut rng, 400_000)
            };
            let mut off = below(&mut rng, SIZE - len);
            if aligned {
                off &= !0xffff;
            }
            let skew = (round % 7) as usize;
            let data = &mut buf[skew..skew + len];
            for (k, x) in data.iter_mut().enumerate() {
                *x = round.to_le_bytes()[0].wrapping_mul(31) ^ k.to_le_bytes()[0];
            }
            if round % 13 == 5 {
                b.write_zeroes(off as u64, len as u64, round % 2 == 0)
                    .unwrap();
                model[off..off + len].fill(0);
            } else {
                b.write_at(data, off as u64).unwrap();
                model[off..off + len].copy_from_slice(data);
            }
            let roff = below(&mut rng, SIZE - 70_000);
            let rlen = 1 + below(&mut rng, 70_000);
            let mut back = vec![0u8; rlen + 3];
            b.read_at(&mut back[3..], roff as u64).unwrap();
            assert!(
                back[3..] == model[roff..roff + rlen],
                "round {round}: read {roff}+{rlen}"
            );
        }
        // Nothing went through the page cache.
        assert_eq!(resident_bytes(&path), 0);
        b.flush().unwrap();
        // What a plain buffered reader sees is what was written.
        assert!(std::fs::read(&path).unwrap() == model, "file content");
    }

    #[test]
    fn direct_io_partial_writes_to_one_block_from_many_threads_all_land() {
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let path = dir.path().join("img");
        let b = FileBackend::create(&path, 64 << 10, CacheMode::Direct).unwrap();
        // Each thread owns 200 bytes of the first block(s) and rewrites
        // them again and again; a read-modify-write by a neighbour that
        // overlapped one of its writes would put back stale bytes.
        const THREADS: u8 = 16;
        const SLICE: usize = 200;
        std::thread::scope(|s| {
            for t in 0..THREADS {
                let b = &b;
                s.spawn(move || {
                    for round in 0..=100_u8 {
                        let v = t.wrapping_mul(16).wrapping_add(round);
                        b.write_at(&[v; SLICE], u64::from(t) * SLICE as u64 + 7)
                            .unwrap();
                    }
                });
            }
        });
        let mut back = vec![0u8; usize::from(THREADS) * SLICE];
        b.read_at(&mut back, 7).unwrap();
        for t in 0..THREADS {
            let want = t.wrapping_mul(16).wrapping_add(100);
            let got = &back[usize::from(t) * SLICE..][..SLICE];
            assert!(got.iter().all(|&x| x == want), "thread {t}: {got:?}");
        }
    }

    #[test]
    fn direct_io_refuses_a_size_off_its_block() {
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let path = dir.path().join("img");
        std::fs::write(&path, vec![1u8; 4096 + 100]).unwrap();
        let e = FileBackend::open(&path, CacheMode::Direct).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert!(e.to_string().contains("not a multiple"), "{e}");
        let e = FileBackend::create(&dir.path().join("new"), 1000, CacheMode::Direct).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert!(
            !dir.path().join("new").exists(),
            "a refused file is removed"
        );
    }
}

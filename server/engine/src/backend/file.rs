//! A raw file or block device as a backend.

use super::{Allocation, BlockBackend};
use crate::aligned::is_direct_aligned;
use nix::fcntl::{FallocateFlags, fallocate};
use nix::unistd::{Whence, lseek};
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

/// Zero buffer size used when the filesystem cannot zero a range itself.
const ZERO_FILL_CHUNK_BYTES: usize = 1 << 20;

/// A raw image file or a block device.
#[derive(Debug)]
pub struct FileBackend {
    file: File,
    /// The same file opened with `O_DIRECT`, for bulk writes that should
    /// not go through the page cache ([`BlockBackend::write_uncached`]);
    /// `None` where the filesystem refuses it (tmpfs on older kernels).
    direct: Option<File>,
    /// Cleared when a direct write fails with `EINVAL` (a device whose
    /// alignment is stricter than ours): bulk writes are buffered from then.
    direct_works: AtomicBool,
    path: String,
    size: u64,
    is_block_device: bool,
}

/// Opens `path` again with `O_DIRECT`, if the filesystem allows it and the
/// path still names the file `file` has open.
fn open_direct(path: &Path, file: &File) -> Option<File> {
    let direct = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .ok()?;
    let (a, b) = (file.metadata().ok()?, direct.metadata().ok()?);
    (a.dev() == b.dev() && a.ino() == b.ino()).then_some(direct)
}

impl FileBackend {
    /// Opens an existing file or block device for reading and writing.
    ///
    /// # Errors
    /// The OS error of `open`, or of finding the size.
    pub fn open(path: &Path) -> io::Result<Self> {
        let mut file = OpenOptions::new().read(true).write(true).open(path)?;
        let meta = file.metadata()?;
        let is_block_device = meta.file_type().is_block_device();
        if !is_block_device && !meta.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file or block device",
            ));
        }
        let size = file.seek(SeekFrom::End(0))?;
        Ok(Self {
            direct: open_direct(path, &file),
            direct_works: AtomicBool::new(true),
            file,
            path: path.display().to_string(),
            size,
            is_block_device,
        })
    }

    /// Creates a new sparse file of `size` bytes; fails if it exists.
    ///
    /// # Errors
    /// The OS error of creating or sizing the file.
    pub fn create(path: &Path, size: u64) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)?;
        file.set_len(size)?;
        Ok(Self {
            direct: open_direct(path, &file),
            direct_works: AtomicBool::new(true),
            file,
            path: path.display().to_string(),
            size,
            is_block_device: false,
        })
    }

    fn zero_fill(&self, mut offset: u64, len: u64) -> io::Result<()> {
        let end = offset + len;
        let zeroes = vec![0u8; ZERO_FILL_CHUNK_BYTES];
        while offset < end {
            let n = usize::try_from(end - offset)
                .unwrap_or(usize::MAX)
                .min(zeroes.len());
            self.file.write_all_at(&zeroes[..n], offset)?;
            offset += n as u64;
        }
        Ok(())
    }
}

/// One `preadv2(RWF_NOWAIT)`: reads what the page cache holds without
/// waiting for storage. `None` on any error (EAGAIN: not cached).
/// (No safe wrapper in nix or std takes the `RWF_NOWAIT` flag.)
#[allow(unsafe_code)]
fn read_nowait(file: &File, buf: &mut [u8], offset: u64) -> Option<usize> {
    use std::os::fd::AsRawFd;
    let offset = off_t(offset).ok()?;
    let iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: `iov` describes `buf`, a live, exclusively borrowed slice of
    // `iov_len` bytes that outlives the call; the kernel writes at most that
    // many bytes into it. The descriptor is owned by `file` and open.
    let n = unsafe {
        libc::preadv2(
            file.as_raw_fd(),
            &raw const iov,
            1,
            offset,
            libc::RWF_NOWAIT,
        )
    };
    usize::try_from(n).ok()
}

fn off_t(v: u64) -> io::Result<i64> {
    i64::try_from(v).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))
}

impl BlockBackend for FileBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn read_cached(&self, buf: &mut [u8], offset: u64) -> usize {
        let mut done = 0;
        while done < buf.len() {
            match read_nowait(&self.file, &mut buf[done..], offset + done as u64) {
                Some(n) if n > 0 => done += n,
                // Not cached (EAGAIN), not supported, end of file, or an
                // error the blocking read will report properly.
                _ => break,
            }
        }
        done
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn write_uncached(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if let Some(direct) = &self.direct
            && is_direct_aligned(buf, offset)
            && self.direct_works.load(Ordering::Relaxed)
        {
            // The kernel writes back and drops any cached pages of the
            // range first, so buffered and direct writes stay coherent as
            // long as they do not overlap in time (the mirror's range locks
            // see to that).
            match direct.write_all_at(buf, offset) {
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    self.direct_works.store(false, Ordering::Relaxed);
                    tracing::warn!(
                        path = %self.path,
                        "direct I/O refused (EINVAL); bulk writes to this file go through the page cache"
                    );
                }
                done => return done,
            }
        }
        self.file.write_all_at(buf, offset)
    }

    fn write_zeroes(&self, offset: u64, len: u64, punch: bool) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        if !self.is_block_device {
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
        true
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
        let b = FileBackend::create(&path, 8 << 20).unwrap();
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

    #[test]
    fn bulk_writes_bypass_the_page_cache_and_stay_coherent_with_buffered_ones() {
        use crate::aligned::AlignedBuf;
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let path = dir.path().join("img");
        let b = FileBackend::create(&path, 4 << 20).unwrap();
        assert!(b.direct.is_some(), "ext4 and xfs take O_DIRECT");
        // A buffered guest write leaves cached (dirty) pages in the range...
        b.write_at(&[1u8; 8192], 1 << 20).unwrap();
        assert_eq!(resident_bytes(&path), 8192);
        // ...which a direct bulk write over it writes back and drops first.
        let mut bulk = AlignedBuf::new(64 << 10);
        bulk.as_mut_slice().fill(2);
        b.write_uncached(bulk.as_slice(), 1 << 20).unwrap();
        b.write_uncached(bulk.as_slice(), 3 << 20).unwrap();
        assert!(b.direct_works.load(Ordering::Relaxed));
        assert_eq!(
            resident_bytes(&path),
            0,
            "direct writes leave nothing in the page cache"
        );
        let mut back = vec![0u8; 64 << 10];
        b.read_at(&mut back, 1 << 20).unwrap();
        assert!(back.iter().all(|&x| x == 2), "the bulk write won");
        // A later buffered write over part of it reads back as written.
        b.write_at(&[3u8; 1024], (1 << 20) + 1024).unwrap();
        b.read_at(&mut back, 1 << 20).unwrap();
        assert!(back[..1024].iter().all(|&x| x == 2));
        assert!(back[1024..2048].iter().all(|&x| x == 3));
        assert!(back[2048..].iter().all(|&x| x == 2));
        // Unaligned bulk writes (a device's odd-sized tail) take the
        // buffered path and land all the same.
        b.write_uncached(&[4u8; 1000], (2 << 20) + 100).unwrap();
        let mut tail = vec![0u8; 1000];
        b.read_at(&mut tail, (2 << 20) + 100).unwrap();
        assert!(tail.iter().all(|&x| x == 4));
        // On storage, not only in the cache: drop the cache and read again.
        b.flush().unwrap();
        nix::fcntl::posix_fadvise(
            &b.file,
            0,
            0,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        )
        .unwrap();
        b.read_at(&mut back, 3 << 20).unwrap();
        assert!(back.iter().all(|&x| x == 2));
        b.read_at(&mut back, 1 << 20).unwrap();
        assert!(back[1024..2048].iter().all(|&x| x == 3));
        assert!(back[2048..].iter().all(|&x| x == 2));
    }
}

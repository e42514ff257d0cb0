//! A raw file or block device as a backend.

use super::{Allocation, BlockBackend};
use nix::fcntl::{FallocateFlags, fallocate};
use nix::unistd::{Whence, lseek};
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

/// Zero buffer size used when the filesystem cannot zero a range itself.
const ZERO_FILL_CHUNK_BYTES: usize = 1 << 20;

/// A raw image file or a block device.
#[derive(Debug)]
pub struct FileBackend {
    file: File,
    /// Cleared when the kernel refuses `RWF_DONTCACHE` (before Linux
    /// 6.14, or a filesystem without it): bulk writes are plain from then.
    dontcache_works: AtomicBool,
    path: String,
    size: u64,
    is_block_device: bool,
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
            dontcache_works: AtomicBool::new(true),
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
            dontcache_works: AtomicBool::new(true),
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
        let mut done = 0;
        while done < buf.len() && self.dontcache_works.load(Ordering::Relaxed) {
            match write_dontcache(&self.file, &buf[done..], offset + done as u64) {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EINVAL)) => {
                    self.dontcache_works.store(false, Ordering::Relaxed);
                    tracing::info!(
                        path = %self.path,
                        error = %e,
                        "RWF_DONTCACHE not supported; bulk writes to this file stay in the page cache"
                    );
                }
                Err(e) => return Err(e),
            }
        }
        self.file.write_all_at(&buf[done..], offset + done as u64)
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
    fn bulk_writes_leave_the_page_cache_and_stay_coherent_with_buffered_ones() {
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let path = dir.path().join("img");
        let b = FileBackend::create(&path, 4 << 20).unwrap();
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
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while resident_bytes(&path) > 8192 {
            assert!(
                std::time::Instant::now() < deadline,
                "bulk writes stay in the page cache: {} bytes",
                resident_bytes(&path)
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
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
}

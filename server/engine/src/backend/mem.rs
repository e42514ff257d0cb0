//! An in-memory backend for unit tests and scratch devices.

use super::BlockBackend;
use std::io;
use std::sync::Mutex;

/// A byte vector behind a mutex.
#[derive(Debug)]
pub struct MemBackend {
    data: Mutex<Vec<u8>>,
    size: u64,
}

impl MemBackend {
    /// A zero-filled device of `size` bytes.
    ///
    /// # Panics
    /// If `size` does not fit in memory's address space.
    pub fn new(size: usize) -> Self {
        Self {
            data: Mutex::new(vec![0; size]),
            size: size as u64,
        }
    }

    /// A copy of the whole contents.
    pub fn contents(&self) -> Vec<u8> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        // A poisoned lock only means a test panicked mid-copy; the bytes are still bytes.
        self.data
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn span(offset: u64, len: usize, size: u64) -> io::Result<std::ops::Range<usize>> {
    let start =
        usize::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let end = start
        .checked_add(len)
        .filter(|&e| e as u64 <= size)
        .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
    Ok(start..end)
}

impl BlockBackend for MemBackend {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let r = span(offset, buf.len(), self.size)?;
        buf.copy_from_slice(&self.lock()[r]);
        Ok(())
    }
    fn read_cached(&self, buf: &mut [u8], offset: u64) -> usize {
        // Memory never waits on storage.
        self.read_at(buf, offset).map_or(0, |()| buf.len())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let r = span(offset, buf.len(), self.size)?;
        self.lock()[r].copy_from_slice(buf);
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64, _punch: bool) -> io::Result<()> {
        let len = usize::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let r = span(offset, len, self.size)?;
        self.lock()[r].fill(0);
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn is_local(&self) -> bool {
        true
    }
    fn path(&self) -> &str {
        "memory"
    }
}

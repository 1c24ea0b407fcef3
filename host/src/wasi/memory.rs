//! Bounds-checked access to a guest's linear memory for the WASI layer.
//!
//! Every WASI function reads and writes guest memory through
//! [`GuestMemory`], so the one place that knows how memory is reached is
//! here. It copies in and copies out and never lends a reference into the
//! memory: a program's memory is a wasmtime `SharedMemory`, which other
//! threads of the program may write while a call runs (wasi-threads), so a
//! `&mut [u8]` over it would promise an exclusivity nobody can keep.

use std::cell::UnsafeCell;
use std::marker::PhantomData;

use super::abi::Errno;

/// A view of guest linear memory for the duration of one WASI call.
pub struct GuestMemory<'a> {
    base: *mut u8,
    len: usize,
    _memory: PhantomData<&'a [UnsafeCell<u8>]>,
}

/// Result alias for WASI calls that only fail with an errno.
pub type Result<T> = std::result::Result<T, Errno>;

impl<'a> GuestMemory<'a> {
    /// Over the bytes of a memory this call has to itself (a module's own,
    /// not shared).
    pub fn exclusive(bytes: &'a mut [u8]) -> Self {
        GuestMemory { base: bytes.as_mut_ptr(), len: bytes.len(), _memory: PhantomData }
    }

    /// Over a shared memory (`SharedMemory::data`), which other threads
    /// may access meanwhile.
    pub fn shared(bytes: &'a [UnsafeCell<u8>]) -> Self {
        GuestMemory { base: UnsafeCell::raw_get(bytes.as_ptr()), len: bytes.len(), _memory: PhantomData }
    }

    fn range(&self, ptr: u32, len: u32) -> Result<std::ops::Range<usize>> {
        let start = ptr as usize;
        let end = start.checked_add(len as usize).ok_or(Errno::FAULT)?;
        if end > self.len {
            return Err(Errno::FAULT);
        }
        Ok(start..end)
    }

    /// Whether `len` bytes at `ptr` lie inside the memory (`EFAULT` if not).
    pub fn check(&self, ptr: u32, len: u32) -> Result<()> {
        self.range(ptr, len).map(|_| ())
    }

    /// Copies `out.len()` bytes at `ptr` into `out`.
    pub fn read_into(&self, ptr: u32, out: &mut [u8]) -> Result<()> {
        let len = u32::try_from(out.len()).map_err(|_| Errno::FAULT)?;
        let r = self.range(ptr, len)?;
        // SAFETY: `r` lies inside the memory, which outlives `'a`; `out` is
        // host memory, so the two cannot overlap. A byte another thread
        // writes meanwhile may be read old or new, as the guest's own
        // unsynchronised reads could.
        unsafe { std::ptr::copy_nonoverlapping(self.base.add(r.start), out.as_mut_ptr(), out.len()) };
        Ok(())
    }

    /// Copies `len` bytes at `ptr`.
    pub fn read(&self, ptr: u32, len: u32) -> Result<Vec<u8>> {
        self.range(ptr, len)?;
        let mut out = vec![0; len as usize];
        self.read_into(ptr, &mut out)?;
        Ok(out)
    }

    /// Copies `data` to `ptr`.
    pub fn write(&mut self, ptr: u32, data: &[u8]) -> Result<()> {
        let len = u32::try_from(data.len()).map_err(|_| Errno::FAULT)?;
        let r = self.range(ptr, len)?;
        // SAFETY: as for `read_into`, the other way.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.base.add(r.start), data.len()) };
        Ok(())
    }

    /// Reads one byte.
    pub fn read_u8(&self, ptr: u32) -> Result<u8> {
        let mut b = [0u8; 1];
        self.read_into(ptr, &mut b)?;
        Ok(b[0])
    }

    /// Reads a little-endian u32.
    pub fn read_u32(&self, ptr: u32) -> Result<u32> {
        let mut b = [0u8; 4];
        self.read_into(ptr, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    /// Reads a little-endian u64.
    pub fn read_u64(&self, ptr: u32) -> Result<u64> {
        let mut b = [0u8; 8];
        self.read_into(ptr, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Reads a little-endian u16.
    pub fn read_u16(&self, ptr: u32) -> Result<u16> {
        let mut b = [0u8; 2];
        self.read_into(ptr, &mut b)?;
        Ok(u16::from_le_bytes(b))
    }

    /// Writes a little-endian u32.
    pub fn write_u32(&mut self, ptr: u32, v: u32) -> Result<()> {
        self.write(ptr, &v.to_le_bytes())
    }

    /// Writes a little-endian u64.
    pub fn write_u64(&mut self, ptr: u32, v: u64) -> Result<()> {
        self.write(ptr, &v.to_le_bytes())
    }

    /// Reads a UTF-8 string (paths, names).
    pub fn read_str(&self, ptr: u32, len: u32) -> Result<String> {
        String::from_utf8(self.read(ptr, len)?).map_err(|_| Errno::INVAL)
    }

    /// Reads an array of `(buf, len)` iovecs.
    pub fn iovecs(&self, ptr: u32, count: u32) -> Result<Vec<(u32, u32)>> {
        let size = super::abi::layout::IOVEC_SIZE;
        (0..count)
            .map(|i| {
                let at = ptr
                    .checked_add(i.checked_mul(size).ok_or(Errno::FAULT)?)
                    .ok_or(Errno::FAULT)?;
                let buf = self.read_u32(at)?;
                let len = self.read_u32(at + 4)?;
                self.range(buf, len)?;
                Ok((buf, len))
            })
            .collect()
    }

    /// Concatenates the bytes of `ciovec`s (what the guest asks to write).
    pub fn gather(&self, iovs: &[(u32, u32)]) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        for &(buf, len) in iovs {
            out.extend_from_slice(&self.read(buf, len)?);
        }
        Ok(out)
    }

    /// Spreads `data` over `iovec`s (what the guest asked to read into).
    pub fn scatter(&mut self, iovs: &[(u32, u32)], mut data: &[u8]) -> Result<()> {
        for &(buf, len) in iovs {
            if data.is_empty() {
                break;
            }
            let n = (len as usize).min(data.len());
            self.write(buf, &data[..n])?;
            data = &data[n..];
        }
        Ok(())
    }
}

/// Total capacity of a set of iovecs.
pub fn iovecs_len(iovs: &[(u32, u32)]) -> usize {
    iovs.iter().map(|&(_, len)| len as usize).sum()
}

//! Bounds-checked access to a guest's linear memory for the WASI layer.
//!
//! Every WASI function reads and writes guest memory through
//! [`GuestMemory`], so the one place that knows how memory is reached is here.
//! Today it wraps the byte slice of a wasmtime `Memory`; a `SharedMemory`
//! (wasi-threads) plugs in behind the same methods.

use super::abi::Errno;

/// A view of guest linear memory for the duration of one WASI call.
pub struct GuestMemory<'a> {
    bytes: &'a mut [u8],
}

/// Result alias for WASI calls that only fail with an errno.
pub type Result<T> = std::result::Result<T, Errno>;

impl<'a> GuestMemory<'a> {
    /// Wraps the bytes of a guest memory.
    pub fn new(bytes: &'a mut [u8]) -> Self {
        GuestMemory { bytes }
    }

    fn range(&self, ptr: u32, len: u32) -> Result<std::ops::Range<usize>> {
        let start = ptr as usize;
        let end = start.checked_add(len as usize).ok_or(Errno::FAULT)?;
        if end > self.bytes.len() {
            return Err(Errno::FAULT);
        }
        Ok(start..end)
    }

    /// Borrows `len` bytes at `ptr`.
    pub fn slice(&self, ptr: u32, len: u32) -> Result<&[u8]> {
        let r = self.range(ptr, len)?;
        Ok(&self.bytes[r])
    }

    /// Mutably borrows `len` bytes at `ptr`.
    pub fn slice_mut(&mut self, ptr: u32, len: u32) -> Result<&mut [u8]> {
        let r = self.range(ptr, len)?;
        Ok(&mut self.bytes[r])
    }

    /// Copies `data` to `ptr`.
    pub fn write(&mut self, ptr: u32, data: &[u8]) -> Result<()> {
        let len = u32::try_from(data.len()).map_err(|_| Errno::FAULT)?;
        self.slice_mut(ptr, len)?.copy_from_slice(data);
        Ok(())
    }

    /// Reads a little-endian u32.
    pub fn read_u32(&self, ptr: u32) -> Result<u32> {
        let b = self.slice(ptr, 4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// Reads a little-endian u64.
    pub fn read_u64(&self, ptr: u32) -> Result<u64> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.slice(ptr, 8)?);
        Ok(u64::from_le_bytes(a))
    }

    /// Reads a little-endian u16.
    pub fn read_u16(&self, ptr: u32) -> Result<u16> {
        let b = self.slice(ptr, 2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
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
    pub fn read_str(&self, ptr: u32, len: u32) -> Result<&str> {
        std::str::from_utf8(self.slice(ptr, len)?).map_err(|_| Errno::INVAL)
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
            out.extend_from_slice(self.slice(buf, len)?);
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

//! The program's linear memory, which the host creates and owns.
//!
//! It is a wasmtime `SharedMemory` even for single-threaded programs: a
//! shared memory belongs to the engine rather than to a store, so each
//! version of a program runs in a fresh store (a store frees no instance
//! until it is dropped) while importing the very same memory. An update
//! therefore copies nothing, however large the heap.
//!
//! Everything the host does to guest memory goes through here: the WASI
//! layer's view during a call, snapshots, and the update's writes.

use std::sync::Arc;

use wasmtime::{Engine, MemoryType, SharedMemory};

use upstare_instrument::abi::MemoryMeta;

use crate::fork_memory::{ForkMemory, MemoryFile};

/// Size of a wasm page.
pub const PAGE: u64 = 64 << 10;

/// A handle to a program memory; clones refer to the same memory.
#[derive(Clone)]
pub struct ProgramMemory {
    memory: SharedMemory,
    /// The memory file it is laid over, for a program that forks with
    /// copy-on-write ([`crate::fork_memory`]).
    file: Option<Arc<MemoryFile>>,
}

impl std::fmt::Debug for ProgramMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProgramMemory").field("bytes", &self.size()).finish()
    }
}

impl ProgramMemory {
    /// A fresh, zeroed memory of the type the instrumented module imports.
    pub fn new(engine: &Engine, meta: &MemoryMeta) -> anyhow::Result<Self> {
        let ty = MemoryType::shared(meta.min, meta.import_max());
        let memory = ProgramMemory { memory: SharedMemory::new(engine, ty)?, file: None };
        memory.prefer_huge_pages(meta);
        Ok(memory)
    }

    /// A fresh memory for a process of a program that forks, laid over a
    /// memory file when `fork` says copy-on-write and the kernel has memory
    /// files (else as [`ProgramMemory::new`]).
    pub(crate) fn for_forking_program(engine: &Engine, meta: &MemoryMeta, fork: ForkMemory) -> anyhow::Result<Self> {
        let mut memory = Self::new(engine, meta)?;
        if fork == ForkMemory::CopyOnWrite {
            let (base, size) = (memory.memory.data().as_ptr() as *mut u8, memory.size() as usize);
            match MemoryFile::lay_over(base, reserved_bytes(meta), size) {
                Ok(Some(file)) => memory.file = Some(Arc::new(file)),
                Ok(None) => tracing::debug!("no memory files here: forks copy the memory"),
                Err(e) => anyhow::bail!("cannot map a memory file over the program memory: {e}"),
            }
        }
        Ok(memory)
    }

    /// A fresh memory holding the bytes of `parent` (a process stopped to
    /// fork, which no thread runs): copy-on-write if `parent` is laid over
    /// a memory file, else a copy.
    pub(crate) fn fork_of(engine: &Engine, meta: &MemoryMeta, parent: &ProgramMemory) -> anyhow::Result<Self> {
        let mut child = Self::new(engine, meta)?;
        let Some(file) = &parent.file else {
            child.copy_from(parent)?;
            tracing::debug!("fork: {} bytes of memory copied", parent.size());
            return Ok(child);
        };
        let want = parent.size();
        child.grow_to(want)?;
        let base = child.memory.data().as_ptr() as *mut u8;
        let (forked, copied) = file.fork(base, want as usize).map_err(|e| anyhow::anyhow!("cannot map the parent's memory file: {e}"))?;
        tracing::debug!("fork: copy-on-write of {want} bytes of memory, {copied} bytes of the parent's own pages copied");
        child.file = Some(Arc::new(forked));
        Ok(child)
    }

    /// Asks the kernel to back the memory with transparent huge pages
    /// where it can (Linux's `madvise` mode): a heap trace reads a large
    /// heap in no order, and with 4 KiB pages nearly every read of a 1 GiB
    /// heap misses the TLB. Memory below 2 MiB, or not yet touched, costs
    /// nothing more. Failure only loses the hint.
    fn prefer_huge_pages(&self, meta: &MemoryMeta) {
        advise_huge_pages(self.memory.data().as_ptr().cast(), reserved_bytes(meta), "the program memory");
    }

    /// Wraps a memory the host created earlier (found again through an
    /// instance's exports).
    pub fn from_shared(memory: SharedMemory) -> Self {
        ProgramMemory { memory, file: None }
    }

    /// The memory, to be imported as `upstare.memory`.
    pub fn shared(&self) -> &SharedMemory {
        &self.memory
    }

    /// Current size in bytes.
    pub fn size(&self) -> u64 {
        self.memory.data().len() as u64
    }

    /// The program memory of the instance calling a host import: an
    /// instrumented module exports its imported memory again as `memory`.
    pub(crate) fn exported_by<T>(caller: &mut wasmtime::Caller<'_, T>) -> Option<ProgramMemory> {
        match caller.get_export("memory") {
            Some(wasmtime::Extern::SharedMemory(m)) => Some(ProgramMemory::from_shared(m)),
            _ => None,
        }
    }

    /// Grows the memory by `pages`; returns the old size in bytes, which is
    /// where the new pages start.
    pub fn grow(&self, pages: u64) -> anyhow::Result<u64> {
        Ok(self.memory.grow(pages)? * PAGE)
    }

    /// The memory as a mutable byte slice.
    ///
    /// # Safety
    ///
    /// No other thread may access the memory for as long as the slice lives:
    /// call it while no thread of the program runs (paused, or not started),
    /// never while another thread could write. While threads run, use
    /// [`ProgramMemory::load_u32`].
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn bytes_mut(&self) -> &mut [u8] {
        let data = self.memory.data();
        // SAFETY: `UnsafeCell<u8>` has the layout of `u8`; the memory never
        // moves (shared memories are reserved at their maximum) and lives as
        // long as `self.memory`; exclusivity is the caller's promise.
        unsafe { std::slice::from_raw_parts_mut(data.as_ptr() as *mut u8, data.len()) }
    }

    /// Grows the memory to `bytes` (a whole number of wasm pages) if it is
    /// smaller.
    fn grow_to(&self, bytes: u64) -> anyhow::Result<()> {
        let have = self.size();
        if bytes > have {
            self.grow((bytes - have) / PAGE)?;
        }
        Ok(())
    }

    /// Makes this memory a copy of `source`, grown to its size first: a
    /// forked process's. Call only while no thread of either program runs.
    fn copy_from(&self, source: &ProgramMemory) -> anyhow::Result<()> {
        self.grow_to(source.size())?;
        // SAFETY: neither program runs (the caller's promise), and the two
        // memories are distinct reservations.
        let (to, from) = unsafe { (self.bytes_mut(), source.bytes_mut()) };
        to[..from.len()].copy_from_slice(from);
        Ok(())
    }

    /// The 32-bit word at `addr` (4-aligned), loaded atomically: sound while
    /// the program's threads run and write the memory. `None` if out of
    /// bounds or misaligned.
    pub fn load_u32(&self, addr: u64) -> Option<u32> {
        let data = self.memory.data();
        let at = usize::try_from(addr).ok().filter(|a| a % 4 == 0 && a.checked_add(4).is_some_and(|end| end <= data.len()))?;
        // SAFETY: in bounds and 4-aligned (the memory's base is page
        // aligned); the cell lives as long as `self.memory`, and every
        // access through the atomic is one the guest's own atomics may race
        // with, as wasm threads allow.
        let word = unsafe { std::sync::atomic::AtomicU32::from_ptr(data[at].get().cast()) };
        Some(word.load(std::sync::atomic::Ordering::SeqCst))
    }

    /// [`ProgramMemory::load_u32`] for the 64-bit word at `addr` (8-aligned).
    pub fn load_u64(&self, addr: u64) -> Option<u64> {
        let data = self.memory.data();
        let at = usize::try_from(addr).ok().filter(|a| a % 8 == 0 && a.checked_add(8).is_some_and(|end| end <= data.len()))?;
        // SAFETY: as in `load_u32`, 8-aligned.
        let word = unsafe { std::sync::atomic::AtomicU64::from_ptr(data[at].get().cast()) };
        Some(word.load(std::sync::atomic::Ordering::SeqCst))
    }

    /// Copies `len` bytes at `addr`; `None` if the range is out of bounds.
    pub fn read(&self, addr: u64, len: u64) -> Option<Vec<u8>> {
        // SAFETY: only called while the guest is not running (snapshots,
        // updates), per the rule of `bytes_mut`.
        let bytes = unsafe { self.bytes_mut() };
        let range = range(addr, len, bytes.len())?;
        Some(bytes[range].to_vec())
    }

    /// Fills `out` from `addr`; `false` if the range is out of bounds. Like
    /// [`ProgramMemory::read`], without allocating.
    pub fn read_into(&self, addr: u64, out: &mut [u8]) -> bool {
        // SAFETY: as for `read`.
        unsafe { self.bytes() }.read_into(addr, out)
    }

    /// Sets `len` bytes at `addr` to `byte`; `false` if the range is out of
    /// bounds.
    pub fn fill(&self, addr: u64, len: u64, byte: u8) -> bool {
        // SAFETY: as for `read`.
        unsafe { self.bytes() }.fill(addr, len, byte)
    }

    /// Writes `data` at `addr`; `false` if the range is out of bounds.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        // SAFETY: as for `read`.
        unsafe { self.bytes() }.write(addr, data)
    }

    /// Copies `len` bytes from `from` to `to` within the memory (the ranges
    /// may overlap); `false` if either is out of bounds.
    pub fn copy_within(&self, from: u64, to: u64, len: u64) -> bool {
        // SAFETY: as for `read`.
        unsafe { self.bytes() }.copy_within(from, to, len)
    }

    /// The memory's bytes, looked up once for many writes in a row: each
    /// of the methods above asks wasmtime for the memory's length, under a
    /// lock, and converting a heap makes millions of writes.
    ///
    /// # Safety
    ///
    /// As for [`ProgramMemory::bytes_mut`]; and the memory must not grow
    /// (no guest code may run) while the result lives.
    pub unsafe fn bytes(&self) -> Bytes<'_> {
        // SAFETY: the caller's promise.
        Bytes(unsafe { self.bytes_mut() })
    }
}

/// A program memory's bytes, with bounds-checked writes: see
/// [`ProgramMemory::bytes`].
pub struct Bytes<'a>(&'a mut [u8]);

impl Bytes<'_> {
    /// The bytes themselves.
    pub fn as_slice(&self) -> &[u8] {
        self.0
    }

    /// As [`ProgramMemory::read_into`].
    pub fn read_into(&self, addr: u64, out: &mut [u8]) -> bool {
        match range(addr, out.len() as u64, self.0.len()) {
            Some(r) => {
                out.copy_from_slice(&self.0[r]);
                true
            }
            None => false,
        }
    }

    /// As [`ProgramMemory::fill`].
    pub fn fill(&mut self, addr: u64, len: u64, byte: u8) -> bool {
        match range(addr, len, self.0.len()) {
            Some(r) => {
                self.0[r].fill(byte);
                true
            }
            None => false,
        }
    }

    /// As [`ProgramMemory::write`].
    pub fn write(&mut self, addr: u64, data: &[u8]) -> bool {
        match range(addr, data.len() as u64, self.0.len()) {
            Some(r) => {
                self.0[r].copy_from_slice(data);
                true
            }
            None => false,
        }
    }

    /// As [`ProgramMemory::copy_within`].
    pub fn copy_within(&mut self, from: u64, to: u64, len: u64) -> bool {
        match (range(from, len, self.0.len()), range(to, len, self.0.len())) {
            (Some(src), Some(dst)) => {
                self.0.copy_within(src, dst.start);
                true
            }
            _ => false,
        }
    }
}

/// Asks the kernel to back the `len` bytes at `base` with transparent huge
/// pages (Linux's `madvise` mode): a large buffer then faults in a 2 MiB
/// page at a time rather than 4 KiB, about 1 us per fault on a VM. The
/// range must lie inside one mapping that lives at least as long as the
/// advice matters (it changes how memory is backed, never its contents);
/// failure only loses the hint. `what` names the memory for the log.
pub(crate) fn advise_huge_pages(base: *const u8, len: usize, what: &str) {
    // SAFETY: per the rule above; `madvise` reads and writes no memory.
    if let Err(e) = unsafe { rustix::mm::madvise(base as *mut std::ffi::c_void, len, rustix::mm::Advice::LinuxHugepage) } {
        tracing::debug!("no huge pages for {what}: {e}");
    }
}

/// A transparent huge page.
pub(crate) const HUGE_PAGE: usize = 2 << 20;

/// The whole, aligned huge pages among the `len` bytes at address `start`,
/// as offsets from `start`; `None` if there is none.
pub(crate) fn whole_huge_pages(start: usize, len: usize) -> Option<std::ops::Range<usize>> {
    let first = start.next_multiple_of(HUGE_PAGE);
    let last = start.saturating_add(len) / HUGE_PAGE * HUGE_PAGE;
    (first < last).then(|| first - start..last - start)
}

/// The bytes a program memory reserves: shared memories are reserved at
/// their maximum, in one mapping.
fn reserved_bytes(meta: &MemoryMeta) -> usize {
    (u64::from(meta.import_max()) * PAGE) as usize
}

fn range(addr: u64, len: u64, size: usize) -> Option<std::ops::Range<usize>> {
    let end = addr.checked_add(len)?;
    (end <= size as u64).then_some(addr as usize..end as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_huge_pages_are_the_aligned_ones_inside() {
        assert_eq!(whole_huge_pages(HUGE_PAGE, 2 * HUGE_PAGE), Some(0..2 * HUGE_PAGE));
        assert_eq!(whole_huge_pages(HUGE_PAGE - 4096, 2 * HUGE_PAGE), Some(4096..4096 + HUGE_PAGE));
        assert_eq!(whole_huge_pages(HUGE_PAGE + 1, 2 * HUGE_PAGE), Some(HUGE_PAGE - 1..2 * HUGE_PAGE - 1));
        assert_eq!(whole_huge_pages(HUGE_PAGE + 1, 2 * HUGE_PAGE - 2), None);
        assert_eq!(whole_huge_pages(0, HUGE_PAGE - 1), None);
    }
}

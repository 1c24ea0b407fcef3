//! How a forked process's program memory comes to hold its parent's bytes:
//! copy-on-write through a memory file, or a plain copy.
//!
//! Copy-on-write needs pages two mappings can share, and wasmtime maps a
//! shared memory as anonymous memory of its own, which no second mapping
//! can reach. So the memory of each process of a program that forks is a
//! memory file (`memfd`) mapped over the reservation wasmtime made, at the
//! same addresses with the same protections: wasmtime's view of it (its
//! size, `memory.grow` by `mprotect`) does not change.
//!
//! A process that has not forked maps its file shared: it is the file's
//! only writer, and the file holds its bytes. At its first fork it maps
//! the same file privately instead, which freezes the file: from then on no
//! mapping writes it, and the child maps it privately too. Each gets a copy
//! of a page when it first writes it, as after a native `fork`. A process
//! that forks with pages of its own (written since it froze its file, or
//! since it was forked) gives the child the frozen file and a copy of those
//! pages only, found in `/proc/self/pagemap`.
//!
//! The price, measured in `docs/PERFORMANCE.md`: each page written after a
//! fork faults once, in the parent and in the child; and a memory file has
//! transparent huge pages only where the kernel's `shmem_enabled` allows
//! them. [`ForkMemory::Copy`] keeps anonymous memory and copies it whole.

use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex, PoisonError};

use rustix::mm::{MapFlags, ProtFlags};

use crate::program_memory::{advise_huge_pages, whole_huge_pages};

/// How a program's forks give the child its memory
/// ([`crate::GuestConfig::fork_memory`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ForkMemory {
    /// Share the parent's pages until either writes one (Linux memory
    /// files); where the kernel refuses, copy.
    #[default]
    CopyOnWrite,
    /// Copy the whole memory at each fork, keeping anonymous memory (and
    /// its huge pages) for every process.
    Copy,
}

/// Host page size the page map counts in.
const HOST_PAGE: usize = 4096;

/// A program memory laid over a memory file.
#[derive(Debug)]
pub(crate) struct MemoryFile {
    /// The file, shared with the processes forked from this one.
    file: Arc<OwnedFd>,
    /// Where the memory starts, and its whole reservation (the memory's
    /// maximum): the span mapped from the file.
    base: usize,
    reserved: usize,
    /// Whether this process maps the file privately: it forked, or it was
    /// forked. Only a shared mapping writes the file.
    private: Mutex<bool>,
}

impl MemoryFile {
    /// Lays a fresh, zeroed memory file over the `reserved` bytes at
    /// `base`, the first `accessible` of them readable and writable, as
    /// wasmtime left them. The memory must be untouched (all zero) and no
    /// thread may use it yet. `Ok(None)`: the kernel gives no memory file,
    /// and the memory is as wasmtime made it. `Err`: a mapping over the
    /// memory failed, which may have left part of it unmapped; drop it.
    pub(crate) fn lay_over(base: *mut u8, reserved: usize, accessible: usize) -> rustix::io::Result<Option<MemoryFile>> {
        let file = match rustix::fs::memfd_create("upstare-program-memory", rustix::fs::MemfdFlags::CLOEXEC) {
            Ok(file) => file,
            Err(e) => {
                tracing::debug!("no memory file: {e}");
                return Ok(None);
            }
        };
        if let Err(e) = rustix::fs::ftruncate(&file, reserved as u64) {
            tracing::debug!("cannot size a memory file: {e}");
            return Ok(None);
        }
        let memory = MemoryFile { file: Arc::new(file), base: base as usize, reserved, private: Mutex::new(false) };
        // SAFETY: the span is the memory's own reservation, untouched, and
        // the file holds the same (zero) bytes.
        unsafe { memory.map(accessible, MapFlags::SHARED)? };
        Ok(Some(memory))
    }

    /// Makes `child`, a fresh memory of the same type already grown to
    /// `accessible` bytes (the parent's size), a copy-on-write copy of this
    /// one, whose process is unwound for the fork: no thread may use either
    /// memory meanwhile. `child_base` is where the child's reservation
    /// starts. Also returns how many bytes were copied: the parent's own
    /// pages.
    pub(crate) fn fork(&self, child_base: *mut u8, accessible: usize) -> rustix::io::Result<(MemoryFile, usize)> {
        let mut private = self.private.lock().unwrap_or_else(PoisonError::into_inner);
        let first_fork = !*private;
        if first_fork {
            // SAFETY: the parent is stopped, and the file holds every byte
            // of its memory (its only mapping was shared): mapping it
            // privately changes no byte.
            unsafe { self.map(accessible, MapFlags::PRIVATE)? };
            *private = true;
        }
        let child =
            MemoryFile { file: self.file.clone(), base: child_base as usize, reserved: self.reserved, private: Mutex::new(true) };
        // SAFETY: the child's reservation is its own, unused yet.
        unsafe { child.map(accessible, MapFlags::PRIVATE)? };
        // At its first fork the parent has no page of its own yet. Without
        // a page map (no `/proc`), every page counts as its own: the child
        // gets a whole copy.
        let own = match first_fork {
            true => Vec::new(),
            false => self.own_pages(accessible).unwrap_or_else(|e| {
                tracing::debug!("no page map ({e}): the fork copies the whole memory");
                vec![0..accessible]
            }),
        };
        let mut copied = 0;
        for run in own {
            // Only whole huge pages get a mapping of their own, so that a
            // process's mappings stay few (the kernel limits them per host
            // process, and all of a program's processes live in one).
            if let Some(huge) = whole_huge_pages(child.base + run.start, run.len()) {
                let at = run.start + huge.start;
                // SAFETY: inside the child's accessible bytes, unused yet.
                unsafe { child.map_anonymous(at..at + huge.len())? };
            }
            // SAFETY: both spans lie in the first `accessible` bytes of
            // distinct reservations, and neither process runs.
            unsafe { std::ptr::copy_nonoverlapping((self.base + run.start) as *const u8, (child.base + run.start) as *mut u8, run.len()) };
            copied += run.len();
        }
        Ok((child, copied))
    }

    /// Maps the file over the whole reservation with `sharing`: readable
    /// and writable up to `accessible`, inaccessible above (where
    /// `memory.grow` opens it up). The inaccessible part goes first, so
    /// that a failure leaves the accessible bytes where they were, or
    /// leaves them unmapped (the process then faults; it cannot run on
    /// wrong bytes).
    ///
    /// # Safety
    ///
    /// The reservation must be this memory's; no thread may use the memory
    /// meanwhile, and the bytes the new mapping shows must be the memory's
    /// (the file's, for a file whose content the memory holds).
    unsafe fn map(&self, accessible: usize, sharing: MapFlags) -> rustix::io::Result<()> {
        let base = self.base as *mut std::ffi::c_void;
        let flags = sharing | MapFlags::FIXED;
        if accessible < self.reserved {
            // SAFETY: inside the reservation (the caller's promise).
            let above = unsafe { base.byte_add(accessible) };
            unsafe { rustix::mm::mmap(above, self.reserved - accessible, ProtFlags::empty(), flags, &*self.file, accessible as u64)? };
        }
        if accessible > 0 {
            let rw = ProtFlags::READ | ProtFlags::WRITE;
            // SAFETY: as above.
            unsafe { rustix::mm::mmap(base, accessible, rw, flags, &*self.file, 0)? };
        }
        Ok(())
    }

    /// Maps anonymous memory over `span` (offsets into the memory,
    /// accessible), with a hint for huge pages: the bytes copied there
    /// fault in 2 MiB at a time, where through the file each 4 KiB page
    /// would fault and be copied from the file first (three times slower
    /// for a 100 MiB parent that wrote all its memory, measured). Those
    /// pages stay the process's own, as a page map counts them.
    ///
    /// # Safety
    ///
    /// No thread may use the span, and its bytes are to be overwritten.
    unsafe fn map_anonymous(&self, span: std::ops::Range<usize>) -> rustix::io::Result<()> {
        let at = (self.base + span.start) as *mut std::ffi::c_void;
        let (rw, flags) = (ProtFlags::READ | ProtFlags::WRITE, MapFlags::PRIVATE | MapFlags::FIXED);
        // SAFETY: the caller's promise.
        unsafe { rustix::mm::mmap_anonymous(at, span.len(), rw, flags)? };
        advise_huge_pages(at as *const u8, span.len(), "a forked process's copied pages");
        Ok(())
    }

    /// The byte ranges of the first `accessible` bytes whose pages this
    /// process holds privately (written since it mapped the file
    /// privately), in address order, adjacent pages merged. A page the
    /// kernel swapped out counts as private.
    fn own_pages(&self, accessible: usize) -> rustix::io::Result<Vec<std::ops::Range<usize>>> {
        use std::os::unix::fs::FileExt;
        const PRESENT: u64 = 1 << 63;
        const SWAPPED: u64 = 1 << 62;
        const FILE_OR_SHARED: u64 = 1 << 61;
        let map = std::fs::File::open("/proc/self/pagemap").map_err(io_errno)?;
        let mut runs: Vec<std::ops::Range<usize>> = Vec::new();
        let mut entries = vec![0u8; 8 * 8192];
        let pages = accessible / HOST_PAGE;
        let mut page = 0;
        while page < pages {
            let n = (pages - page).min(entries.len() / 8);
            let at = ((self.base / HOST_PAGE + page) * 8) as u64;
            map.read_exact_at(&mut entries[..8 * n], at).map_err(io_errno)?;
            for (i, e) in entries[..8 * n].chunks_exact(8).enumerate() {
                let e = u64::from_le_bytes(e.try_into().expect("8 bytes"));
                if e & SWAPPED != 0 || (e & PRESENT != 0 && e & FILE_OR_SHARED == 0) {
                    let start = (page + i) * HOST_PAGE;
                    match runs.last_mut() {
                        Some(last) if last.end == start => last.end += HOST_PAGE,
                        _ => runs.push(start..start + HOST_PAGE),
                    }
                }
            }
            page += n;
        }
        Ok(runs)
    }
}

fn io_errno(e: std::io::Error) -> rustix::io::Errno {
    e.raw_os_error().map_or(rustix::io::Errno::IO, rustix::io::Errno::from_raw_os_error)
}

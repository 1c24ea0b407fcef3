//! Heap objects of changed types during an update, the host's half:
//! patchgen's tracer ([`upstare_patchgen::heap`]) decides which allocations
//! to convert and which pointers to rewrite; this module moves the bytes,
//! allocating and freeing through the new version's own `malloc` and `free`
//! (which the instrumenter exports), so the allocator's state stays its own.
//!
//! Everything here runs inside the update's transaction: memory is backed
//! up before [`convert`] and restored on any failure, and the old objects
//! are freed ([`free_old`]) only once the new code has accepted the frames.

use upstare_instrument::abi::exports::{FREE_BATCH, MALLOC_BATCH};
use upstare_instrument::abi::{State, TypedFrame, Value};
use upstare_patchgen::heap::{self, Landing, MemoryView};
use wasmtime::{Instance, Store, TypedFunc};

use crate::module::one_line;
use crate::pause::ControlMemory;
use crate::process::{ProcessState, Unwinder};
use crate::program_memory::{advise_huge_pages, whole_huge_pages, Bytes, ProgramMemory};

impl MemoryView for ProgramMemory {
    fn read(&self, address: u32, out: &mut [u8]) -> bool {
        self.read_into(u64::from(address), out)
    }
}

/// The paused memory as patchgen's heap trace reads it: through one slice,
/// taken once.
impl MemoryView for Bytes<'_> {
    fn read(&self, address: u32, out: &mut [u8]) -> bool {
        self.read_into(u64::from(address), out)
    }

    fn read_u32(&self, address: u32) -> Option<u32> {
        let mut word = [0; 4];
        self.read_into(u64::from(address), &mut word).then(|| u32::from_le_bytes(word))
    }

    fn prefetch(&self, address: u32) {
        #[cfg(target_arch = "x86_64")]
        if let Some(byte) = self.as_slice().get(address as usize) {
            // SAFETY: a prefetch of an address inside the slice reads
            // nothing the program sees and cannot fault; SSE is part of
            // x86_64.
            unsafe { std::arch::x86_64::_mm_prefetch((byte as *const u8).cast::<i8>(), std::arch::x86_64::_MM_HINT_T0) }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = address;
    }
}

/// Why converting the heap failed, or freeing the old copies did.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HeapError {
    /// The new version exports no `malloc`.
    #[error("the new version has no function named `malloc` to convert heap objects with")]
    NoMalloc,
    /// `malloc` trapped.
    #[error("converting the heap: `malloc` failed: {}", one_line(.0))]
    Malloc(#[source] wasmtime::Error),
    /// `malloc` returned null.
    #[error("converting the heap: `malloc({size})` failed while converting {type_name} ({path})")]
    OutOfMemory {
        /// The bytes asked for.
        size: u32,
        /// The object's type.
        type_name: String,
        /// How the trace reached it.
        path: String,
    },
    /// `malloc` returned an address out of bounds.
    #[error("converting the heap: `malloc` returned {0:#x}, out of bounds")]
    MallocOutOfBounds(u32),
    /// A pointer to rewrite lies out of bounds.
    #[error("a pointer at {0:#x} lies out of bounds")]
    SlotOutOfBounds(u32),
    /// A pointer to rewrite points into a member the new layout drops
    /// (the tracer refuses these before the pause ends).
    #[error("the pointer at {0:#x} points into a dropped member")]
    DroppedMember(u32),
    /// Copying an object to its new copy ran out of bounds.
    #[error("converting {type_name} ({path}) ran out of bounds")]
    CopyOutOfBounds {
        /// The object's type.
        type_name: String,
        /// How the trace reached it.
        path: String,
    },
    /// A C converter does not have the converter's signature.
    #[error("converter `{name}` must be `void {name}(const void *old, void *new)`: {}", one_line(source))]
    ConverterSignature {
        /// Its export name.
        name: String,
        /// What wasmtime said of its type.
        #[source]
        source: wasmtime::Error,
    },
    /// A C converter trapped.
    #[error("converter `{name}` failed: {}", one_line(source))]
    Converter {
        /// Its export name.
        name: String,
        /// Why.
        #[source]
        source: wasmtime::Error,
    },
    /// The new version exports no `free`.
    #[error("the new version has no function named `free`")]
    NoFree,
    /// `free` trapped.
    #[error("`free` failed: {}", one_line(.0))]
    Free(#[source] wasmtime::Error),
    /// A batch of calls into the guest stopped at an update point.
    #[error("{0}: it stopped at an update point instead of returning")]
    Stopped(Calls),
    /// The control memory has no room for a batch of allocator calls.
    #[error("converting the heap: {0}")]
    NoScratch(String),
    /// The allocator's own bytes lie out of bounds.
    #[error("the allocator's bytes at {0:#x} lie out of bounds")]
    AllocatorOutOfBounds(u32),
}

/// A batch of calls into the guest, for messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Calls {
    /// The `malloc`s of the new copies.
    Malloc,
    /// A C converter's calls.
    Converter(String),
    /// The `free`s of the old copies.
    Free,
}

impl std::fmt::Display for Calls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Calls::Malloc => f.write_str("converting the heap"),
            Calls::Converter(name) => write!(f, "converter `{name}` failed"),
            Calls::Free => f.write_str("`free` failed"),
        }
    }
}

/// What [`convert`] did, for the update's report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HeapCounts {
    /// Allocations reallocated at their new type.
    pub converted: usize,
    /// Pointers rewritten to follow them (or a moved global), in memory
    /// and in frames.
    pub rewritten: usize,
}

/// Allocates a new copy of every converted object, rewrites every recorded
/// pointer in place, then copies each object through its map (new members
/// zeroed). Returns the counts and the new copies' addresses, in the
/// plan's order.
pub(crate) fn convert(
    plan: &heap::Plan,
    instance: &Instance,
    store: &mut Store<ProcessState>,
    unwinder: &Unwinder,
) -> Result<(HeapCounts, Vec<u32>), HeapError> {
    let memory = &unwinder.memory;
    let mut new_starts = Vec::with_capacity(plan.objects.len());
    if !plan.objects.is_empty() {
        let malloc = instance
            .get_typed_func::<(i32, i32), i32>(&mut *store, MALLOC_BATCH)
            .map_err(|_| HeapError::NoMalloc)?;
        let mut words: Vec<u32> = plan.objects.iter().map(|o| plan.new_bytes(o)).collect();
        with_pause_off(&unwinder.control, unwinder, store, Calls::Malloc, |store| {
            let done = call_in_batches(&unwinder.control, store, &malloc, &mut words, HeapError::Malloc)?;
            let normal = unwinder.state.is(&mut *store, State::Normal);
            if let (Some(o), true) = (plan.objects.get(done), normal) {
                return Err(HeapError::OutOfMemory { size: plan.new_bytes(o), type_name: plan.kind(o).type_name.clone(), path: plan.path_of(o) });
            }
            // SAFETY: paused, and `malloc` has returned: nothing runs or
            // grows the memory while `bytes` lives.
            let mut bytes = unsafe { memory.bytes() };
            for (o, &at) in plan.objects.iter().zip(&words[..done]) {
                if !bytes.fill(u64::from(at), u64::from(plan.new_bytes(o)), 0) {
                    return Err(HeapError::MallocOutOfBounds(at));
                }
                new_starts.push(at);
            }
            Ok(())
        })?;
    }
    let rewritten = rewrite_and_copy(plan, &new_starts, memory)?;
    for (o, &to) in plan.objects.iter().zip(&new_starts) {
        let Some(name) = &plan.kind(o).converter else { continue };
        let convert = instance
            .get_typed_func::<(i32, i32), ()>(&mut *store, name)
            .map_err(|source| HeapError::ConverterSignature { name: name.clone(), source })?;
        let k = plan.kind(o);
        with_pause_off(&unwinder.control, unwinder, store, Calls::Converter(name.clone()), |store| {
            for i in 0..o.count {
                let (from, to) = ((o.start + i * k.old_size) as i32, (to + i * k.new_size) as i32);
                convert.call(&mut *store, (from, to)).map_err(|source| HeapError::Converter { name: name.clone(), source })?;
            }
            Ok(())
        })?;
    }
    Ok((HeapCounts { converted: new_starts.len(), rewritten }, new_starts))
}

/// Rewrites every pointer the plan found to where it lands now that the
/// converted objects have their new copies at `new_starts`, and copies each
/// object's members into its new copy. Returns how many pointers changed.
fn rewrite_and_copy(plan: &heap::Plan, new_starts: &[u32], memory: &ProgramMemory) -> Result<usize, HeapError> {
    // SAFETY: paused, and no guest code runs while `bytes` lives (the
    // converters run after).
    let mut bytes = unsafe { memory.bytes() };
    let mut rewritten = 0;
    for (i, &(slot, _)) in plan.slots.iter().enumerate() {
        match plan.slot_landing(i, new_starts) {
            Landing::Unmoved => {}
            Landing::At(to) => {
                rewritten += 1;
                if !bytes.write(u64::from(slot), &to.to_le_bytes()) {
                    return Err(HeapError::SlotOutOfBounds(slot));
                }
            }
            // The tracer refuses these before the pause ends.
            Landing::Dropped => return Err(HeapError::DroppedMember(slot)),
        }
    }
    for (o, &to) in plan.objects.iter().zip(new_starts) {
        let k = plan.kind(o);
        for i in 0..o.count {
            let (from, to) = (u64::from(o.start + i * k.old_size), u64::from(to + i * k.new_size));
            for c in &k.map.copies {
                if !bytes.copy_within(from + c.from, to + c.to, c.len) {
                    return Err(HeapError::CopyOutOfBounds { type_name: k.type_name.clone(), path: plan.path_of(o) });
                }
            }
        }
    }
    Ok(rewritten)
}

/// Rewrites the frame locals [`heap::frame_pointers`] found to the new
/// copies of what they point to.
/// Returns how many it rewrote.
pub(crate) fn rewrite_frames(plan: &heap::Plan, new_starts: &[u32], locals: &[(usize, usize)], frames: &mut [TypedFrame]) -> usize {
    let mut rewritten = 0;
    for &(f, i) in locals {
        if let Some(Value::I32(v)) = &mut frames[f].locals[i] {
            if let Landing::At(to) = plan.translate(*v as u32, new_starts) {
                *v = to as i32;
                rewritten += 1;
            }
        }
    }
    rewritten
}

/// What converting the heap overwrites, copied before: the allocator's own
/// bytes and the old value of every rewritten pointer. The new copies land
/// in memory the allocator kept free (or grew), so with these written back
/// the old version's memory, allocator included, is as it was.
pub(crate) struct Undo<'a> {
    /// The allocator's regions, as (address, size), and their bytes one
    /// after the other: a heap of a million objects has a million headers.
    regions: &'a [(u32, u32)],
    bytes: Vec<u8>,
    /// The rewritten pointers, with their old values.
    slots: &'a [(u32, u32)],
}

impl<'a> Undo<'a> {
    pub(crate) fn take(plan: &'a heap::Plan, memory: &ProgramMemory) -> Result<Undo<'a>, HeapError> {
        let total = plan.allocator.iter().map(|&(_, len)| len as usize).sum();
        let mut bytes: Vec<u8> = Vec::with_capacity(total);
        // Tens of megabytes once earlier conversions left free chunks
        // behind, faulted in as they are written: in 2 MiB pages, the
        // whole ones inside the buffer.
        if let Some(whole) = whole_huge_pages(bytes.as_ptr() as usize, total) {
            advise_huge_pages(bytes.as_ptr().wrapping_add(whole.start), whole.len(), "the heap conversion's undo copy");
        }
        // SAFETY: paused; nothing runs while the copy is taken.
        let view = unsafe { memory.bytes() };
        for &(address, len) in &plan.allocator {
            let start = address as usize;
            let Some(region) = view.as_slice().get(start..start + len as usize) else {
                return Err(HeapError::AllocatorOutOfBounds(address));
            };
            bytes.extend_from_slice(region);
        }
        Ok(Undo { regions: &plan.allocator, bytes, slots: &plan.slots })
    }

    pub(crate) fn restore(&self, memory: &ProgramMemory) -> bool {
        // SAFETY: paused; nothing runs while the copy is put back.
        let mut bytes = unsafe { memory.bytes() };
        let mut regions = true;
        for (address, range) in laid_out(self.regions) {
            regions &= bytes.write(u64::from(address), &self.bytes[range]);
        }
        let slots = self.slots.iter().all(|(at, value)| bytes.write(u64::from(*at), &value.to_le_bytes()));
        regions && slots
    }
}

/// Each region's address and where its bytes lie in [`Undo::bytes`], one
/// after the other.
fn laid_out(regions: &[(u32, u32)]) -> impl Iterator<Item = (u32, std::ops::Range<usize>)> + '_ {
    regions.iter().scan(0, |at: &mut usize, &(address, len)| {
        let range = *at..*at + len as usize;
        *at = range.end;
        Some((address, range))
    })
}

/// Frees the old copy of every converted object, once nothing refers to it.
pub(crate) fn free_old(
    plan: &heap::Plan,
    instance: &Instance,
    store: &mut Store<ProcessState>,
    unwinder: &Unwinder,
) -> Result<(), HeapError> {
    if plan.objects.is_empty() {
        return Ok(());
    }
    let free = instance
        .get_typed_func::<(i32, i32), i32>(&mut *store, FREE_BATCH)
        .map_err(|_| HeapError::NoFree)?;
    let mut words: Vec<u32> = plan.objects.iter().map(|o| o.start).collect();
    with_pause_off(&unwinder.control, unwinder, store, Calls::Free, |store| {
        call_in_batches(&unwinder.control, store, &free, &mut words, HeapError::Free).map(|_| ())
    })
}

/// Entries per call of an allocator batch: its scratch array in the
/// control memory (256 KiB) stays small next to the frames.
const BATCH: usize = 1 << 16;

/// Calls the allocator batch `batch` ([`MALLOC_BATCH`] or [`FREE_BATCH`])
/// over `words` (sizes, or addresses), a chunk of at most [`BATCH`] at a
/// time through a scratch array above the frame stack; `words` get what the
/// batch wrote back (the addresses `malloc` returned). Returns how many
/// calls completed: all of them, or fewer where one stopped the batch (a
/// null from `malloc`, or a call that left the normal state). A call from
/// the host costs about as much as a `malloc`; a million objects make 16.
fn call_in_batches(
    control: &ControlMemory,
    store: &mut Store<ProcessState>,
    batch: &TypedFunc<(i32, i32), i32>,
    words: &mut [u32],
    trapped: fn(wasmtime::Error) -> HeapError,
) -> Result<usize, HeapError> {
    let at = control.scratch(BATCH.min(words.len())).map_err(HeapError::NoScratch)?;
    let mut done = 0;
    for chunk in words.chunks_mut(BATCH) {
        control.write_words(at, chunk);
        let n = batch.call(&mut *store, (at as i32, chunk.len() as i32)).map_err(trapped)?;
        control.read_words(at, chunk);
        let n = (n as u32 as usize).min(chunk.len());
        done += n;
        if n < chunk.len() {
            break;
        }
    }
    Ok(done)
}

/// Makes `calls` into the guest (its allocator, a converter) with no pause
/// requested (its loops would otherwise unwind at once), and checks they
/// returned normally. One toggle for a whole batch: a million `malloc`s
/// cost the calls alone.
fn with_pause_off<T>(
    control: &ControlMemory,
    unwinder: &Unwinder,
    store: &mut Store<ProcessState>,
    what: Calls,
    calls: impl FnOnce(&mut Store<ProcessState>) -> Result<T, HeapError>,
) -> Result<T, HeapError> {
    let paused = control.pause_requested();
    control.set_pause(false);
    let result = calls(&mut *store);
    control.set_pause(paused);
    let value = result?;
    if unwinder.state.is(&mut *store, State::Normal) {
        Ok(value)
    } else {
        Err(HeapError::Stopped(what))
    }
}

//! Heap objects of changed types during an update, the host's half:
//! patchgen's tracer ([`upstare_patchgen::heap`]) decides which allocations
//! to convert and which pointers to rewrite; this module moves the bytes,
//! allocating and freeing through the new version's own `malloc` and `free`
//! (which the instrumenter exports), so the allocator's state stays its own.
//!
//! Everything here runs inside the update's transaction: memory is backed
//! up before [`convert`] and restored on any failure, and the old objects
//! are freed ([`free_old`]) only once the new code has accepted the frames.

use upstare_instrument::abi::exports::{FREE, MALLOC};
use upstare_instrument::abi::{TypedFrame, Value};
use upstare_patchgen::heap::{self, Landing, MemoryView};
use wasmtime::{Instance, Store};

use crate::module::one_line;
use crate::pause::ControlMemory;
use crate::process::{ProcessState, Unwinder};
use crate::program_memory::ProgramMemory;

impl MemoryView for ProgramMemory {
    fn read(&self, address: u32, out: &mut [u8]) -> bool {
        self.read_into(u64::from(address), out)
    }

    fn prefetch(&self, address: u32) {
        self.prefetch(u64::from(address));
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
) -> Result<(HeapCounts, Vec<u32>), String> {
    let memory = &unwinder.memory;
    let mut new_starts = Vec::with_capacity(plan.objects.len());
    if !plan.objects.is_empty() {
        let malloc = instance
            .get_typed_func::<i32, i32>(&mut *store, MALLOC)
            .map_err(|_| "the new version has no function named `malloc` to convert heap objects with".to_string())?;
        with_pause_off(&unwinder.control, unwinder, store, |store| {
            for o in &plan.objects {
                let at = malloc.call(&mut *store, o.new_bytes() as i32).map_err(|e| format!("`malloc` failed: {}", one_line(&e)))?;
                if at == 0 {
                    return Err(format!("`malloc({})` failed while converting {} ({})", o.new_bytes(), o.kind.type_name, plan.path_of(o)));
                }
                let at = at as u32;
                if !memory.fill(u64::from(at), u64::from(o.new_bytes()), 0) {
                    return Err(format!("`malloc` returned {at:#x}, out of bounds"));
                }
                new_starts.push(at);
            }
            Ok(())
        })
        .map_err(|e| format!("converting the heap: {e}"))?;
    }
    let mut rewritten = 0;
    for (i, &(slot, _)) in plan.slots.iter().enumerate() {
        match plan.slot_landing(i, &new_starts) {
            Landing::Unmoved => {}
            Landing::At(to) => {
                rewritten += 1;
                if !memory.write(u64::from(slot), &to.to_le_bytes()) {
                    return Err(format!("a pointer at {slot:#x} lies out of bounds"));
                }
            }
            // The tracer refuses these before the pause ends.
            Landing::Dropped => return Err(format!("the pointer at {slot:#x} points into a dropped member")),
        }
    }
    for (o, &to) in plan.objects.iter().zip(&new_starts) {
        let k = &o.kind;
        for i in 0..o.count {
            let (from, to) = (u64::from(o.start + i * k.old_size), u64::from(to + i * k.new_size));
            for c in &k.map.copies {
                if !memory.copy_within(from + c.from, to + c.to, c.len) {
                    return Err(format!("converting {} ({}) ran out of bounds", k.type_name, plan.path_of(o)));
                }
            }
        }
    }
    for (o, &to) in plan.objects.iter().zip(&new_starts) {
        let Some(name) = &o.kind.converter else { continue };
        let convert = instance
            .get_typed_func::<(i32, i32), ()>(&mut *store, name)
            .map_err(|e| format!("converter `{name}` must be `void {name}(const void *old, void *new)`: {}", one_line(&e)))?;
        with_pause_off(&unwinder.control, unwinder, store, |store| {
            for i in 0..o.count {
                let (from, to) = ((o.start + i * o.kind.old_size) as i32, (to + i * o.kind.new_size) as i32);
                convert.call(&mut *store, (from, to)).map_err(|e| one_line(&e))?;
            }
            Ok(())
        })
        .map_err(|e| format!("converter `{name}` failed: {e}"))?;
    }
    Ok((HeapCounts { converted: new_starts.len(), rewritten }, new_starts))
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
    pub(crate) fn take(plan: &'a heap::Plan, memory: &ProgramMemory) -> Result<Undo<'a>, String> {
        let total = plan.allocator.iter().map(|&(_, len)| len as usize).sum();
        let mut bytes = vec![0; total];
        for (address, range) in laid_out(&plan.allocator) {
            if !memory.read_into(u64::from(address), &mut bytes[range]) {
                return Err(format!("the allocator's bytes at {address:#x} lie out of bounds"));
            }
        }
        Ok(Undo { regions: &plan.allocator, bytes, slots: &plan.slots })
    }

    pub(crate) fn restore(&self, memory: &ProgramMemory) -> bool {
        let mut regions = true;
        for (address, range) in laid_out(self.regions) {
            regions &= memory.write(u64::from(address), &self.bytes[range]);
        }
        let slots = self.slots.iter().all(|(at, value)| memory.write(u64::from(*at), &value.to_le_bytes()));
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
) -> Result<(), String> {
    if plan.objects.is_empty() {
        return Ok(());
    }
    let free = instance
        .get_typed_func::<i32, ()>(&mut *store, FREE)
        .map_err(|_| "the new version has no function named `free`".to_string())?;
    with_pause_off(&unwinder.control, unwinder, store, |store| {
        plan.objects.iter().try_for_each(|o| free.call(&mut *store, o.start as i32).map_err(|e| one_line(&e)))
    })
    .map_err(|e| format!("`free` failed: {e}"))
}

/// Makes `calls` into the guest (its allocator, a converter) with no pause
/// requested (its loops would otherwise unwind at once), and checks they
/// returned normally. One toggle for a whole batch: a million `malloc`s
/// cost the calls alone.
fn with_pause_off<T>(
    control: &ControlMemory,
    unwinder: &Unwinder,
    store: &mut Store<ProcessState>,
    calls: impl FnOnce(&mut Store<ProcessState>) -> Result<T, String>,
) -> Result<T, String> {
    let paused = control.pause_requested();
    control.set_pause(false);
    let result = calls(&mut *store);
    control.set_pause(paused);
    let value = result?;
    match unwinder.state.get(&mut *store).i32() {
        Some(0) => Ok(value),
        _ => Err("it stopped at an update point instead of returning".into()),
    }
}

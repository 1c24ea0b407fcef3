//! The functions the instrumenter appends after the original ones: frame
//! stack push and pop, the pause decision, the end of a rewind, memory
//! initialisation, the state-changing exports, the reference side tables,
//! and the allocator's batches.
//!
//! They are small and written once here, so that the code inserted into
//! every instrumented function stays a call instead of a copy.

use wasm_encoder::{BlockType, Encode, HeapType, Instruction as I, ValType};

use super::{ctrl, frames, Code, Helpers, Packs, RewindHelpers, Types};
use crate::abi::{control, frame, State, ValType as Ty};
use crate::analysis::ModuleInfo;

/// A helper ready to append: its type index and its body (locals and code).
pub(crate) struct HelperFunc {
    pub type_index: u32,
    pub body: Vec<u8>,
}

fn body(locals: &[ValType], code: Code) -> Vec<u8> {
    let mut out = Vec::new();
    (locals.len() as u32).encode(&mut out);
    for t in locals {
        1u32.encode(&mut out);
        t.encode(&mut out);
    }
    out.extend_from_slice(&code.0);
    out.push(0x0b);
    out
}

fn load32(code: &mut Code, at: u32) {
    code.i32(0);
    code.op(I::I32Load(ctrl(at, 2)));
}

fn store32_from_local(code: &mut Code, at: u32, local: u32) {
    code.i32(0);
    code.op(I::LocalGet(local));
    code.op(I::I32Store(ctrl(at, 2)));
}

fn store8_const(code: &mut Code, at: u32, v: i32) {
    code.i32(0);
    code.i32(v);
    code.op(I::I32Store8(ctrl(at, 0)));
}

/// Consumes the result of a `memory.grow` or `table.grow` and traps if it
/// failed (-1): a frame that does not fit cannot be saved.
fn trap_if_grow_failed(c: &mut Code) {
    c.i32(-1);
    c.op(I::I32Eq);
    c.op(I::If(BlockType::Empty));
    c.op(I::Unreachable);
    c.op(I::End);
}

/// Grows the control memory by the pages `pages` pushes when the address
/// `end` pushes lies past its end; traps when it cannot grow.
pub(crate) fn grow_control_past(c: &mut Code, end: impl FnOnce(&mut Code), pages: impl FnOnce(&mut Code)) {
    end(c);
    c.op(I::MemorySize(control::MEMORY_INDEX));
    c.i32(16);
    c.op(I::I32Shl);
    c.op(I::I32GtU);
    c.op(I::If(BlockType::Empty));
    pages(c);
    c.op(I::MemoryGrow(control::MEMORY_INDEX));
    trap_if_grow_failed(c);
    c.op(I::End);
}

fn set_state(code: &mut Code, state_global: u32, s: State) {
    code.i32(s as i32);
    code.op(I::GlobalSet(state_global));
}

/// Builds every helper in the order [`Helpers::new`] numbers them.
pub(crate) fn build(info: &ModuleInfo<'_>, types: &mut Types, h: &Helpers, state: u32) -> Vec<HelperFunc> {
    let mut out = Vec::new();
    let mut add = |types: &mut Types, params: &[Ty], results: &[Ty], locals: &[ValType], code: Code| {
        out.push(HelperFunc { type_index: types.func(params, results), body: body(locals, code) });
    };
    use Ty::I32;

    add(types, &[I32, I32, I32], &[I32], &[ValType::I32; 3], frame_push());
    add(types, &[], &[I32], &[ValType::I32], should_pause());
    add(types, &[], &[], &[], init_memory(info));
    add(types, &[], &[], &[], drop_data(info));
    if let Some(r) = h.rewind {
        add(types, &[I32], &[I32], &[ValType::I32], frame_pop());
        add(types, &[], &[I32], &[], pre_call(h, r, state));
        add(types, &[], &[], &[], rewind_done(h, state));
    }
    for (t, side) in h.sides() {
        add(types, &[t], &[I32], &[ValType::I32], spill_ref(t, side.table));
        add(types, &[I32], &[t], &[], load_ref(side.table));
    }
    if let Some(b) = h.malloc_batch {
        add(types, &[I32, I32], &[I32], &[ValType::I32; 2], allocator_batch(b.target, true, state));
    }
    if let Some(b) = h.free_batch {
        add(types, &[I32, I32], &[I32], &[ValType::I32; 2], allocator_batch(b.target, false, state));
    }
    out
}

/// `batch(at, n) -> done`: calls the allocator function `target` once for
/// each of the `n` words at `at` in the control memory, in order: `malloc`
/// replaces each size with the address it returns, `free` takes each
/// address. Stops early, returning how many calls succeeded, at a `malloc`
/// that returns null or at a call that leaves the normal state. A host
/// converting a million heap objects makes two calls instead of two
/// million. Locals: 2 = index, 3 = address of the entry.
fn allocator_batch(target: u32, malloc: bool, state: u32) -> Code {
    let mut c = Code::default();
    c.op(I::Block(BlockType::Empty));
    c.op(I::Loop(BlockType::Empty));
    c.op(I::LocalGet(2));
    c.op(I::LocalGet(1));
    c.op(I::I32GeU);
    c.op(I::BrIf(1));
    c.op(I::LocalGet(0));
    c.op(I::LocalGet(2));
    c.i32(2);
    c.op(I::I32Shl);
    c.op(I::I32Add);
    c.op(I::LocalSet(3));
    if malloc {
        c.op(I::LocalGet(3));
        c.op(I::LocalGet(3));
        c.op(I::I32Load(ctrl(0, 2)));
        c.op(I::Call(target));
        c.op(I::I32Store(ctrl(0, 2)));
        c.op(I::LocalGet(3));
        c.op(I::I32Load(ctrl(0, 2)));
        c.op(I::I32Eqz);
        c.op(I::BrIf(1));
    } else {
        c.op(I::LocalGet(3));
        c.op(I::I32Load(ctrl(0, 2)));
        c.op(I::Call(target));
    }
    c.op(I::GlobalGet(state));
    c.op(I::BrIf(1));
    c.op(I::LocalGet(2));
    c.i32(1);
    c.op(I::I32Add);
    c.op(I::LocalSet(2));
    c.op(I::Br(0));
    c.op(I::End);
    c.op(I::End);
    c.op(I::LocalGet(2));
    c
}

/// The pack helpers ([`Packs`]), in the order they are numbered: the
/// loads, then the saves.
pub(crate) fn build_packs(types: &mut Types, h: &Helpers, packs: &Packs) -> crate::error::Result<Vec<HelperFunc>> {
    let mut out = Vec::new();
    for &key in packs.map.keys() {
        let values = frames::pack_types(key);
        let mut c = Code::default();
        load32(&mut c, control::FRAME_SP);
        c.op(I::LocalSet(0));
        for (slot, t) in values.iter().enumerate() {
            c.op(I::LocalGet(0));
            frames::push(&mut c, h, *t, slot as u32)?;
        }
        out.push(HelperFunc { type_index: types.func(&[], &values), body: body(&[ValType::I32], c) });
    }
    for slots in packs.saves.keys() {
        let fb = 2 + slots.len() as u32;
        let mut c = Code::default();
        c.op(I::LocalGet(0));
        c.op(I::LocalGet(1));
        c.i32(slots.len() as i32);
        c.op(I::Call(h.frame_push));
        c.op(I::LocalSet(fb));
        for (slot, &t) in slots.iter().enumerate() {
            frames::store(&mut c, h, fb, 2 + slot as u32, t, slot as u32)?;
        }
        let params: Vec<Ty> = [Ty::I32, Ty::I32].into_iter().chain(slots.iter().copied()).collect();
        out.push(HelperFunc { type_index: types.func(&params, &[]), body: body(&[ValType::I32], c) });
    }
    Ok(out)
}

/// `frame_push(rp, func, slots) -> frame`: pushes the frame at the frame
/// stack pointer, whose slots the caller stores (a save helper after the
/// call, a class that stores inline before it): writes its header and
/// trailer, moves the pointer past it, and grows the control memory when
/// less than [`control::FRAME_HEADROOM`] bytes would remain past the
/// pointer, so that the next class can store its slots before calling.
/// Locals: 3 = frame address, 4 = frame size, 5 = frame end. The resume
/// point comes first because a save class finds it on the stack.
fn frame_push() -> Code {
    let (rp, func, slots, fb, size, end) = (0, 1, 2, 3, 4, 5);
    let mut c = Code::default();
    load32(&mut c, control::FRAME_SP);
    c.op(I::LocalSet(fb));
    c.op(I::LocalGet(slots));
    c.i32(frame::SLOT_SIZE as i32);
    c.op(I::I32Mul);
    c.i32(frame::frame_size(0) as i32);
    c.op(I::I32Add);
    c.op(I::LocalSet(size));
    // Grow when the headroom past the frame would end past the memory.
    grow_control_past(
        &mut c,
        |c| {
            c.op(I::LocalGet(fb));
            c.op(I::LocalGet(size));
            c.op(I::I32Add);
            c.i32(control::FRAME_HEADROOM as i32);
            c.op(I::I32Add);
        },
        |c| {
            c.op(I::LocalGet(size));
            c.i32(control::FRAME_HEADROOM as i32);
            c.op(I::I32Add);
            c.i32(16);
            c.op(I::I32ShrU);
            c.i32(1);
            c.op(I::I32Add);
        },
    );
    for (at, local) in [(frame::FUNC, func), (frame::RESUME_POINT, rp), (frame::SIZE, size)] {
        c.op(I::LocalGet(fb));
        c.op(I::LocalGet(local));
        c.op(I::I32Store(ctrl(at, 2)));
    }
    // The reserved word must read as zero, and the memory under a new frame
    // still holds whatever older frames left there.
    c.op(I::LocalGet(fb));
    c.i32(0);
    c.op(I::I32Store(ctrl(frame::RESERVED, 2)));
    // Trailer: size, then the magic word, so frames can be walked from the top.
    c.op(I::LocalGet(fb));
    c.op(I::LocalGet(size));
    c.op(I::I32Add);
    c.op(I::LocalTee(end));
    c.i32(frame::TRAILER_SIZE as i32);
    c.op(I::I32Sub);
    c.op(I::LocalGet(size));
    c.op(I::I32Store(ctrl(0, 2)));
    c.op(I::LocalGet(end));
    c.i32(4);
    c.op(I::I32Sub);
    c.i32(frame::TRAILER_MAGIC as i32);
    c.op(I::I32Store(ctrl(0, 2)));
    store32_from_local(&mut c, control::FRAME_SP, end);
    c.op(I::LocalGet(fb));
    c
}

/// `frame_pop(func) -> frame`: takes the top frame, which must belong to
/// `func`; a mismatch means the frame stack is corrupt, and traps.
fn frame_pop() -> Code {
    let (func, fb) = (0, 1);
    let mut c = Code::default();
    load32(&mut c, control::FRAME_SP);
    c.op(I::LocalTee(fb));
    c.i32(control::FRAMES_BASE as i32);
    c.op(I::I32LeU);
    c.op(I::If(BlockType::Empty));
    c.op(I::Unreachable);
    c.op(I::End);
    c.op(I::LocalGet(fb));
    c.op(I::LocalGet(fb));
    c.i32(frame::TRAILER_SIZE as i32);
    c.op(I::I32Sub);
    c.op(I::I32Load(ctrl(0, 2)));
    c.op(I::I32Sub);
    c.op(I::LocalTee(fb));
    c.op(I::I32Load(ctrl(frame::FUNC, 2)));
    c.op(I::LocalGet(func));
    c.op(I::I32Ne);
    c.op(I::If(BlockType::Empty));
    c.op(I::Unreachable);
    c.op(I::End);
    store32_from_local(&mut c, control::FRAME_SP, fb);
    c.op(I::LocalGet(fb));
    c
}

/// `should_pause() -> i32`: 1 when the host asked for a pause, or when the
/// stress countdown runs out (reloading it). Called only when the flag word
/// is nonzero, so its cost is off the hot path.
fn should_pause() -> Code {
    let count = 0;
    let mut c = Code::default();
    c.i32(0);
    c.op(I::I32Load8U(ctrl(control::PAUSE_BYTE, 0)));
    c.op(I::If(BlockType::Empty));
    c.i32(1);
    c.op(I::Return);
    c.op(I::End);
    c.i32(0);
    c.op(I::I32Load8U(ctrl(control::STRESS_BYTE, 0)));
    c.op(I::I32Eqz);
    c.op(I::If(BlockType::Empty));
    c.i32(0);
    c.op(I::Return);
    c.op(I::End);
    load32(&mut c, control::STRESS_COUNTDOWN);
    c.i32(1);
    c.op(I::I32Sub);
    c.op(I::LocalTee(count));
    c.op(I::I32Eqz);
    c.op(I::If(BlockType::Empty));
    c.i32(0);
    load32(&mut c, control::STRESS_PERIOD);
    c.op(I::I32Store(ctrl(control::STRESS_COUNTDOWN, 2)));
    c.i32(1);
    c.op(I::Return);
    c.op(I::End);
    store32_from_local(&mut c, control::STRESS_COUNTDOWN, count);
    c.i32(0);
    c
}

/// `pre_call() -> i32`, before a blocking import when the flag word is
/// nonzero: while rewinding, this is the resume target, so the rewind ends
/// and the call goes ahead (0); otherwise the pause decision.
fn pre_call(h: &Helpers, r: RewindHelpers, state: u32) -> Code {
    let mut c = Code::default();
    c.op(I::GlobalGet(state));
    c.i32(State::Rewinding as i32);
    c.op(I::I32Eq);
    c.op(I::If(BlockType::Empty));
    c.op(I::Call(r.rewind_done));
    c.i32(0);
    c.op(I::Return);
    c.op(I::End);
    c.op(I::Call(h.should_pause));
    c
}

/// Back to normal running once the rewind reached its resume point: the
/// `rewind_done` helper's body, which instrumented code also inlines.
pub(crate) fn rewind_done(h: &Helpers, state: u32) -> Code {
    let mut c = Code::default();
    set_state(&mut c, state, State::Normal);
    store8_const(&mut c, control::REWIND_BYTE, 0);
    release_refs(&mut c, h);
    c
}

/// Drops the references held for saved frames.
fn release_refs(c: &mut Code, h: &Helpers) {
    for (t, side) in h.sides() {
        let heap = if t == Ty::FuncRef { HeapType::FUNC } else { HeapType::EXTERN };
        c.i32(0);
        c.op(I::RefNull(heap));
        c.op(I::TableSize(side.table));
        c.op(I::TableFill(side.table));
    }
    if h.sides().next().is_some() {
        c.i32(0);
        c.i32(0);
        c.op(I::I32Store(ctrl(control::REF_TOP, 2)));
    }
}

/// Applies the data segments that were active, in order, then drops them.
fn init_memory(info: &ModuleInfo<'_>) -> Code {
    let mut c = Code::default();
    for (index, seg) in info.data.iter().enumerate() {
        let Some(range) = &seg.active_offset else { continue };
        c.raw(&info.wasm[range.clone()]);
        c.i32(0);
        c.i32(seg.len as i32);
        c.op(I::MemoryInit { mem: 0, data_index: index as u32 });
        c.op(I::DataDrop(index as u32));
    }
    c
}

/// Drops the data segments that were active, for an instance over memory
/// that already holds them.
fn drop_data(info: &ModuleInfo<'_>) -> Code {
    let mut c = Code::default();
    for (index, seg) in info.data.iter().enumerate() {
        if seg.active_offset.is_some() {
            c.op(I::DataDrop(index as u32));
        }
    }
    c
}

/// `spill(ref) -> i32`: stores a reference in the next side-table slot,
/// growing the table by 16 when full, and returns the slot.
fn spill_ref(t: Ty, table: u32) -> Code {
    let (value, slot) = (0, 1);
    let heap = if t == Ty::FuncRef { HeapType::FUNC } else { HeapType::EXTERN };
    let mut c = Code::default();
    load32(&mut c, control::REF_TOP);
    c.op(I::LocalTee(slot));
    c.op(I::TableSize(table));
    c.op(I::I32GeU);
    c.op(I::If(BlockType::Empty));
    c.op(I::RefNull(heap));
    c.i32(16);
    c.op(I::TableGrow(table));
    trap_if_grow_failed(&mut c);
    c.op(I::End);
    c.op(I::LocalGet(slot));
    c.op(I::LocalGet(value));
    c.op(I::TableSet(table));
    c.i32(0);
    c.op(I::LocalGet(slot));
    c.i32(1);
    c.op(I::I32Add);
    c.op(I::I32Store(ctrl(control::REF_TOP, 2)));
    c.op(I::LocalGet(slot));
    c
}

/// `load(slot) -> ref`: the reference a frame slot names.
fn load_ref(table: u32) -> Code {
    let mut c = Code::default();
    c.op(I::LocalGet(0));
    c.op(I::TableGet(table));
    c
}


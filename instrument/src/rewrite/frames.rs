//! Code that moves one value between a local and a frame slot in the control
//! memory, following the slot encoding of [`crate::abi::frame`]: integers and
//! float bits zero-extended to 8 bytes, references replaced by their index in
//! a side table.

use wasm_encoder::Instruction as I;

use super::{ctrl, Code, Helpers};
use crate::abi::{frame, ValType as Ty};
use crate::error::{internal, Result};

/// Stores local `src` (of type `t`) into slot `slot` of the frame at `fb`.
pub(crate) fn store(code: &mut Code, h: &Helpers, fb: u32, src: u32, t: Ty, slot: u32) -> Result<()> {
    let at = frame::slot_offset(slot);
    code.op(I::LocalGet(fb));
    code.op(I::LocalGet(src));
    match t {
        Ty::I32 => {
            code.op(I::I64ExtendI32U);
            code.op(I::I64Store(ctrl(at, 3)));
        }
        Ty::I64 => code.op(I::I64Store(ctrl(at, 3))),
        Ty::F32 => {
            code.op(I::I32ReinterpretF32);
            code.op(I::I64ExtendI32U);
            code.op(I::I64Store(ctrl(at, 3)));
        }
        Ty::F64 => code.op(I::F64Store(ctrl(at, 3))),
        Ty::FuncRef | Ty::ExternRef => {
            let r = h.side(t).ok_or_else(|| internal("reference slot without a side table"))?;
            code.op(I::Call(r.spill));
            code.op(I::I64ExtendI32U);
            code.op(I::I64Store(ctrl(at, 3)));
        }
    }
    Ok(())
}

/// Loads slot `slot` of the frame at `fb` into local `dst` (of type `t`).
pub(crate) fn load(code: &mut Code, h: &Helpers, fb: u32, dst: u32, t: Ty, slot: u32) -> Result<()> {
    code.op(I::LocalGet(fb));
    push(code, h, t, slot)?;
    code.op(I::LocalSet(dst));
    Ok(())
}

/// Replaces the frame address on top of the stack by the value (of type
/// `t`) in its slot `slot`.
pub(crate) fn push(code: &mut Code, h: &Helpers, t: Ty, slot: u32) -> Result<()> {
    let at = frame::slot_offset(slot);
    match t {
        Ty::I32 => code.op(I::I32Load(ctrl(at, 2))),
        Ty::I64 => code.op(I::I64Load(ctrl(at, 3))),
        Ty::F32 => code.op(I::F32Load(ctrl(at, 2))),
        Ty::F64 => code.op(I::F64Load(ctrl(at, 3))),
        Ty::FuncRef | Ty::ExternRef => {
            let r = h.side(t).ok_or_else(|| internal("reference slot without a side table"))?;
            code.op(I::I32Load(ctrl(at, 2)));
            code.op(I::Call(r.load));
        }
    }
    Ok(())
}

/// How many locals of each numeric type (i32, i64, f32, f64) a frame
/// holds before its references: the key of the pack helper that loads
/// them ([`super::Packs`]).
pub(crate) type PackKey = [u32; 4];

/// The rank of a type in a frame's local slots: numbers grouped by type,
/// then references (which go through side tables, one at a time).
pub(crate) fn rank(t: Ty) -> u8 {
    match t {
        Ty::I32 => 0,
        Ty::I64 => 1,
        Ty::F32 => 2,
        Ty::F64 => 3,
        Ty::FuncRef => 4,
        Ty::ExternRef => 5,
    }
}

/// The pack key of a slot-ordered list of local types, and how many of
/// them the pack covers (the numeric ones, which come first).
pub(crate) fn pack_key(types: impl IntoIterator<Item = Ty>) -> (PackKey, usize) {
    let mut key = [0u32; 4];
    let mut n = 0;
    for t in types {
        match rank(t) {
            r @ 0..=3 => key[r as usize] += 1,
            _ => break,
        }
        n += 1;
    }
    (key, n)
}

/// The types of a pack, in slot order.
pub(crate) fn pack_types(key: PackKey) -> Vec<Ty> {
    [Ty::I32, Ty::I64, Ty::F32, Ty::F64]
        .iter()
        .zip(key)
        .flat_map(|(t, n)| std::iter::repeat_n(*t, n as usize))
        .collect()
}

/// How the save classes with one list of slot types store their slots
/// ([`super::Packs`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SavePlan {
    /// One `save` helper for the whole frame.
    Whole,
    /// `frame_push`, then one `put` helper per chunk: (type, count).
    Chunks(Vec<(Ty, u32)>),
}

/// Picks the smaller code for `uses` save classes with slot types `slots`.
/// A class calling a whole-frame helper spends 3 + 2 * chunks bytes less
/// than one calling `frame_push` and the chunks (its `i32.const` of the
/// slot count, the `frame_push` call and a `drop`; two bytes per call,
/// the function indices of large modules taking two), against the
/// helper's own body, which stores every slot (about 8 bytes each). The
/// chunk helpers are shared by every class and few, so they are not
/// counted.
pub(crate) fn save_plan(slots: &[Ty], uses: usize) -> SavePlan {
    let chunks = chunks(slots);
    let helper = 16 + slots.iter().enumerate().map(|(i, &t)| store_len(t, i as u32)).sum::<usize>();
    if helper < uses * (3 + 2 * chunks.len()) {
        SavePlan::Whole
    } else {
        SavePlan::Chunks(chunks)
    }
}

/// Splits slot types into runs of one type, and each run into
/// power-of-two counts, largest first.
fn chunks(slots: &[Ty]) -> Vec<(Ty, u32)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < slots.len() {
        let t = slots[i];
        let run = slots[i..].iter().take_while(|&&u| u == t).count() as u32;
        let mut left = run;
        while left > 0 {
            let n = 1 << left.ilog2();
            out.push((t, n));
            left -= n;
        }
        i += run as usize;
    }
    out
}

/// Bytes of [`store`] of a value of type `t` into slot `slot`, about.
fn store_len(t: Ty, slot: u32) -> usize {
    let convert = match t {
        Ty::I32 => 1,
        Ty::I64 | Ty::F64 => 0,
        Ty::F32 => 2,
        Ty::FuncRef | Ty::ExternRef => 4,
    };
    let offset = if slot_offset(slot) < 128 { 1 } else { 2 };
    4 + convert + 2 + offset
}

/// Slot offsets relative to a frame address.
fn slot_offset(slot: u32) -> u32 {
    frame::slot_offset(slot)
}

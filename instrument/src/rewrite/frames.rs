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

/// Sorts `locals` (indices into `types`) into slot order: by [`rank`],
/// then by index.
pub(crate) fn sort_into_slot_order(locals: &mut [u32], types: &[Ty]) {
    locals.sort_by_key(|&l| (rank(types[l as usize]), l));
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


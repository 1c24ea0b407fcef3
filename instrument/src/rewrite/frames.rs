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
    let at = frame::slot_offset(slot);
    code.op(I::LocalGet(fb));
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
    code.op(I::LocalSet(dst));
    Ok(())
}

//! Layout of one saved frame in the control memory, and reading and writing
//! the frame stack.
//!
//! ```text
//! offset        size  field
//!  0            4     function index (in the module that saved the frame)
//!  4            4     resume point: index into that function's list in the metadata
//!  8            4     frame size in bytes, header and trailer included: 24 + 8 * slots
//! 12            4     reserved, zero
//! 16            8*n   slots: the locals of [`super::ResumePoint::slots`], in
//!                     that order, then the saved operands from the bottom of
//!                     the stack up
//! 16+8n         4     frame size again, so a frame can be found from the top
//! 20+8n         4     TRAILER_MAGIC
//! ```
//!
//! Frames are pushed innermost first during an unwind and popped outermost
//! first during a rewind, so the stack from [`super::control::FRAMES_BASE`] up
//! to the frame stack pointer lists them innermost first. All integers are
//! little-endian. A slot holds: `i32` zero-extended; `i64`; `f32` bits
//! zero-extended; `f64` bits; `funcref`/`externref` the zero-extended index of
//! the reference in the matching side table. Which locals the slots hold, and
//! their types, are not in the frame: they are in the metadata of the
//! resume point ([`super::ResumePoint::slots`], [`super::FunctionMeta::locals`]
//! and [`super::ResumePoint::operands`]). A local that is not live at the
//! point has no value in the frame (no slot, or a slot holding zero): nothing
//! may read or invent a value for it.

use super::{metadata::Metadata, ValType};
use crate::error::{Error, ErrorKind, Result};

/// Offset of the function index.
pub const FUNC: u32 = 0;
/// Offset of the resume-point index.
pub const RESUME_POINT: u32 = 4;
/// Offset of the frame size.
pub const SIZE: u32 = 8;
/// Offset of the reserved word, always zero.
pub const RESERVED: u32 = 12;
/// Offset of the first slot.
pub const SLOTS: u32 = 16;
/// Size of one slot.
pub const SLOT_SIZE: u32 = 8;
/// Size of the trailer (size copy and magic).
pub const TRAILER_SIZE: u32 = 8;
/// The last word of every frame: "UPSF" read as little-endian bytes.
pub const TRAILER_MAGIC: u32 = u32::from_le_bytes(*b"UPSF");

/// Size in bytes of a frame with `slots` slots.
pub const fn frame_size(slots: u32) -> u32 {
    SLOTS + SLOT_SIZE * slots + TRAILER_SIZE
}

/// Offset of slot `index` in a frame.
pub const fn slot_offset(index: u32) -> u32 {
    SLOTS + SLOT_SIZE * index
}

/// One frame as stored, before typing with metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawFrame {
    /// Function index.
    pub func: u32,
    /// Index of the resume point in the function's metadata.
    pub resume_point: u32,
    /// Raw slot contents: locals, then operands.
    pub slots: Vec<u64>,
}

impl RawFrame {
    /// The frame's bytes as the guest would store them.
    pub fn encode(&self) -> Vec<u8> {
        let size = frame_size(self.slots.len() as u32);
        let mut out = Vec::with_capacity(size as usize);
        out.extend_from_slice(&self.func.to_le_bytes());
        out.extend_from_slice(&self.resume_point.to_le_bytes());
        out.extend_from_slice(&size.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        for slot in &self.slots {
            out.extend_from_slice(&slot.to_le_bytes());
        }
        out.extend_from_slice(&size.to_le_bytes());
        out.extend_from_slice(&TRAILER_MAGIC.to_le_bytes());
        out
    }
}

fn word(bytes: &[u8], at: usize) -> Result<u32> {
    bytes
        .get(at..at + 4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or_else(|| frame_error(at, "frame runs past the end of the control memory"))
}

fn frame_error(at: usize, message: &str) -> Error {
    Error::new(ErrorKind::Metadata, Some(at), message)
}

/// Reads the frame stack from a copy of the control memory (at least up to
/// the frame stack pointer), innermost frame first.
pub fn read_frames(control: &[u8]) -> Result<Vec<RawFrame>> {
    let sp = word(control, super::control::FRAME_SP as usize)? as usize;
    let mut at = super::control::FRAMES_BASE as usize;
    if sp < at {
        return Err(frame_error(sp, "frame stack pointer below the frame stack"));
    }
    let mut frames = Vec::new();
    while at < sp {
        let size = word(control, at + SIZE as usize)? as usize;
        if size < frame_size(0) as usize || !size.is_multiple_of(8) || at + size > sp {
            return Err(frame_error(at, "frame size out of range"));
        }
        let end = at + size;
        if word(control, end - 8)? as usize != size || word(control, end - 4)? != TRAILER_MAGIC {
            return Err(frame_error(end - 8, "frame trailer does not match its header"));
        }
        let slots = (size - frame_size(0) as usize) / SLOT_SIZE as usize;
        let mut values = Vec::with_capacity(slots);
        for i in 0..slots {
            let s = at + slot_offset(i as u32) as usize;
            let lo = word(control, s)? as u64;
            let hi = word(control, s + 4)? as u64;
            values.push(lo | (hi << 32));
        }
        frames.push(RawFrame {
            func: word(control, at + FUNC as usize)?,
            resume_point: word(control, at + RESUME_POINT as usize)?,
            slots: values,
        });
        at = end;
    }
    Ok(frames)
}

/// Encodes frames (innermost first) as the bytes to place at
/// [`super::control::FRAMES_BASE`]; the frame stack pointer must then be set
/// to `FRAMES_BASE + bytes.len()`.
pub fn write_frames(frames: &[RawFrame]) -> Vec<u8> {
    frames.iter().flat_map(RawFrame::encode).collect()
}

/// A value held in a frame slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Value {
    /// `i32`
    I32(i32),
    /// `i64`
    I64(i64),
    /// `f32`, as its bits.
    F32(u32),
    /// `f64`, as its bits.
    F64(u64),
    /// `funcref`: index in the funcref side table.
    FuncRef(u32),
    /// `externref`: index in the externref side table.
    ExternRef(u32),
}

impl Value {
    /// Interprets a raw slot as a value of type `ty`.
    pub fn from_slot(ty: ValType, slot: u64) -> Value {
        match ty {
            ValType::I32 => Value::I32(slot as u32 as i32),
            ValType::I64 => Value::I64(slot as i64),
            ValType::F32 => Value::F32(slot as u32),
            ValType::F64 => Value::F64(slot),
            ValType::FuncRef => Value::FuncRef(slot as u32),
            ValType::ExternRef => Value::ExternRef(slot as u32),
        }
    }

    /// The raw slot for this value.
    pub fn to_slot(self) -> u64 {
        match self {
            Value::I32(v) => v as u32 as u64,
            Value::I64(v) => v as u64,
            Value::F32(v) => v as u64,
            Value::F64(v) => v,
            Value::FuncRef(v) | Value::ExternRef(v) => v as u64,
        }
    }

    /// The value's type.
    pub fn ty(self) -> ValType {
        match self {
            Value::I32(_) => ValType::I32,
            Value::I64(_) => ValType::I64,
            Value::F32(_) => ValType::F32,
            Value::F64(_) => ValType::F64,
            Value::FuncRef(_) => ValType::FuncRef,
            Value::ExternRef(_) => ValType::ExternRef,
        }
    }
}

/// A frame typed with the metadata of the module that saved it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypedFrame {
    /// Function index.
    pub func: u32,
    /// Index of the resume point in the function's metadata.
    pub resume_point: u32,
    /// The function's locals, params first: `None` for a local the frame
    /// does not save (it is not live at the resume point).
    pub locals: Vec<Option<Value>>,
    /// The locals with a slot, in slot order ([`super::ResumePoint::slots`]);
    /// those without a value are stored as zero.
    pub slots: Vec<u32>,
    /// The saved operands, bottom of the stack first.
    pub operands: Vec<Value>,
}

impl TypedFrame {
    /// Types a raw frame; fails if the frame does not match the metadata.
    pub fn new(raw: &RawFrame, metadata: &Metadata) -> Result<TypedFrame> {
        let bad = |m: String| Error::new(ErrorKind::Metadata, None, m);
        let func = metadata
            .function(raw.func)
            .ok_or_else(|| bad(format!("frame of function {} which has no resume points", raw.func)))?;
        let rp = func.resume_points.get(raw.resume_point as usize).ok_or_else(|| {
            bad(format!("frame of function {} names unknown resume point {}", raw.func, raw.resume_point))
        })?;
        if raw.slots.len() != rp.slots.len() + rp.operands.len() {
            return Err(bad(format!(
                "frame of function {} at resume point {} has {} slots, metadata says {}",
                raw.func,
                raw.resume_point,
                raw.slots.len(),
                rp.slots.len() + rp.operands.len()
            )));
        }
        let (l, o) = raw.slots.split_at(rp.slots.len());
        let mut locals = vec![None; func.locals.len()];
        for (&local, slot) in rp.slots.iter().zip(l) {
            let ty = func.locals.get(local as usize).ok_or_else(|| {
                bad(format!("resume point {} of function {} saves local {local}, which it does not have", raw.resume_point, raw.func))
            })?;
            if rp.locals.contains(&local) {
                locals[local as usize] = Some(Value::from_slot(*ty, *slot));
            }
        }
        Ok(TypedFrame {
            func: raw.func,
            resume_point: raw.resume_point,
            locals,
            slots: rp.slots.clone(),
            operands: rp.operands.iter().zip(o).map(|(t, s)| Value::from_slot(*t, *s)).collect(),
        })
    }

    /// Back to the raw slots: the saved locals in slot order, then the
    /// operands. A local named in [`TypedFrame::slots`] without a value
    /// (a frame built wrongly) becomes a zero slot, which typing the frame
    /// again with its metadata does not hide: it reads back as a value.
    pub fn to_raw(&self) -> RawFrame {
        let saved = self.slots.iter().map(|&l| self.locals.get(l as usize).copied().flatten().map_or(0, Value::to_slot));
        RawFrame {
            func: self.func,
            resume_point: self.resume_point,
            slots: saved.chain(self.operands.iter().map(|v| v.to_slot())).collect(),
        }
    }
}

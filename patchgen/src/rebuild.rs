//! Rebuilding a frame whose shadow-stack area changed between versions,
//! where it stands.
//!
//! A C function keeps its arrays and address-taken variables in its own area
//! of the shadow stack: on entry it lowers `__stack_pointer` by the area's
//! size and keeps the lowered value in a local (its DWARF frame base); each
//! variable sits at a fixed offset from that base. A new version that adds
//! a local array, grows a buffer or lays the area out anew cannot run on the
//! old area. A frame of such a function that stands at a resume point (a
//! call, a blocking call, a loop header) is rebuilt there:
//!
//! ```text
//!   old stack (grows down)                 new stack
//!   entry ──────────────┐                  entry ──────────────┐
//!     line[256] @ -256  │ F's old area       out[128]  @ -128  │ F's new area
//!     out[64]   @ -320  │                    line[256] @ -384  │
//!   point ──────────────┤                  point ──────────────┤
//!     recv's frame      │ frames above F     recv's frame      │ the same bytes,
//!   sp ─────────────────┘                    (shifted by -64)  │ 64 bytes lower
//!                                          sp ─────────────────┘
//! ```
//!
//! - F's entry stack pointer is where its caller left it, so nothing below
//!   F moves. F's new area is laid out by the new DWARF: each variable in
//!   scope at the point moves from its old offset to its new one (same
//!   scope path, name and type; [`Relayout::moves`]). A variable in scope
//!   there with no old counterpart has no known value: the frame is not
//!   rebuilt. Bytes no such variable covers are dead at the point (other
//!   scopes' variables, whose values C leaves indeterminate on entry to
//!   their scope) and keep whatever they held.
//! - The frames above F (its callees, down to the stack pointer) move as
//!   one block by the difference, and `__stack_pointer` with them. They
//!   must be frames of functions whose code is unchanged.
//! - Every address into the moving stack must follow: F's frame base and
//!   the addresses the new code computes from the stack pointer are
//!   recomputed ([`crate::frames::Source::Stack`]); any other value is
//!   rewritten only where the analysis proves it is an address: a local
//!   every definition of which computes an address in the function's own
//!   frame, a local DWARF gives a pointer type at the point, a saved
//!   operand that is one of those, a pointer-typed variable or member in
//!   memory ([`pointer_offsets`]). An address into F's old area must lie in
//!   a variable that moves, and goes where the variable goes; one into the
//!   frames above moves with them. A value that lies in the moving stack
//!   and is not proven an address refuses the rebuild, naming it: it may be
//!   an integer that only looks like one, or a pointer the analysis cannot
//!   see. Bytes of the frames above that no variable in scope covers move
//!   as they are, unread.
//!
//! Patchgen decides all of this ([`crate::frames::FramePlan::map_stack`]),
//! reading the paused program's memory through [`StackMemory`]; the host
//! only moves the bytes and writes the rewritten words, keeping what they
//! overwrite for a rollback.

use std::collections::HashSet;

use upstare_instrument::abi::{ResumeKind, ResumePoint, TypedFrame, ValType, Value};

use crate::dwarf::{DebugInfo, Location, Type, TypeId};
use crate::frames::Move;
use crate::retreat::EntryStackPointer;
use crate::symbolic::{Body, Origin, Sym};
use crate::version::Version;

/// Reads the paused program's linear memory.
pub trait StackMemory {
    /// The 4 bytes at `address`, little-endian, or `None` out of bounds.
    fn read_u32(&self, address: u32) -> Option<u32>;
}

/// How a changed function's frame is rebuilt where it stands when its
/// shadow-stack area changed size or layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relayout {
    /// How to find the old frame's entry stack pointer.
    pub entry: EntryStackPointer,
    /// The stack pointer at the point, relative to the entry one: in the
    /// old code and in the new.
    pub stack_at_point: (i64, i64),
    /// The variables in scope at the point, relative to the entry stack
    /// pointer, with their names.
    pub moves: Vec<(Move, String)>,
    /// Old locals proven to hold addresses.
    pub old_pointers: HashSet<u32>,
    /// Pointers in the new area, relative to the entry stack pointer, and
    /// what holds each, for messages.
    pub new_pointer_slots: Vec<(i64, String)>,
}

/// Which values of a frame saved at one resume point of a function whose
/// code did not change are addresses, for shifting it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AboveFacts {
    /// How to find the frame's entry stack pointer.
    pub entry: EntryStackPointer,
    /// Whether each local is read from the point on.
    pub live: Vec<bool>,
    /// Locals proven to hold addresses.
    pub pointers: HashSet<u32>,
    /// Whether each saved operand (bottom first) is proven an address.
    pub pointer_operands: Vec<bool>,
    /// The local holding the DWARF frame base, if the frame has an area.
    pub frame_base: Option<u32>,
    /// Pointers in the frame's area, relative to the frame base, named.
    pub pointer_slots: Vec<(i64, String)>,
}

/// Byte offsets within a value of type `ty` where a pointer lives: pointer
/// members of structs, elements of arrays, recursively (unions are left
/// out: which member holds is unknown). At most `limit` offsets.
pub fn pointer_offsets(debug: &DebugInfo, ty: TypeId, limit: usize) -> Vec<u64> {
    fn walk(debug: &DebugInfo, ty: TypeId, at: u64, out: &mut Vec<u64>, limit: usize, depth: u32) {
        if out.len() >= limit || depth > 16 {
            return;
        }
        match debug.ty(ty) {
            Type::Pointer { .. } => out.push(at),
            Type::Struct { members, .. } => {
                for m in members.iter().filter(|m| m.bit_field.is_none()) {
                    walk(debug, m.ty, at + m.offset, out, limit, depth + 1);
                }
            }
            Type::Array { element, count: Some(n) } => {
                let Some(size) = debug.size_of(*element).filter(|s| *s > 0) else { return };
                let mut inner = Vec::new();
                walk(debug, *element, 0, &mut inner, limit, depth + 1);
                if inner.is_empty() {
                    return;
                }
                for i in 0..*n {
                    for o in &inner {
                        if out.len() >= limit {
                            return;
                        }
                        out.push(at + i * size + o);
                    }
                }
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(debug, ty, 0, &mut out, limit, 0);
    out
}

/// The most pointer slots one variable may contribute: beyond that, its
/// frame is not rebuilt (see [`too_many`]).
pub(crate) const SLOT_LIMIT: usize = 4096;

/// Whether a variable has more pointer slots than are followed.
pub(crate) fn too_many(slots: &[u64]) -> bool {
    slots.len() >= SLOT_LIMIT
}

/// Locals of `body` every definition of which is an address in the
/// function's own frame (parameters aside: their value comes from the
/// caller).
pub(crate) fn frame_address_locals(body: &Body) -> HashSet<u32> {
    let mut all: HashSet<u32> = HashSet::new();
    let mut other: HashSet<u32> = HashSet::new();
    for i in &body.instrs {
        if let Some((l, sym)) = i.def {
            match sym {
                Sym::Sp(_) | Sym::Frame => all.insert(l),
                _ => other.insert(l),
            };
        }
    }
    all.retain(|l| !other.contains(l) && *l >= body.params);
    all
}

/// Locals DWARF places a pointer-typed variable in at code offset `pc`.
pub(crate) fn dwarf_pointer_locals(version: &Version, pc: u32) -> HashSet<u32> {
    version
        .debug
        .variables_at(pc)
        .into_iter()
        .filter_map(|v| match (v.location, version.debug.ty(v.ty)) {
            (Location::Local(l), Type::Pointer { .. }) => Some(l),
            _ => None,
        })
        .collect()
}

/// The frame base's offset from the entry stack pointer at instruction
/// `at` (code offset `pc`), where `stack` is the stack pointer there
/// relative to the entry one.
pub(crate) fn frame_base_offset(version: &Version, body: &Body, pc: u32, at: usize, stack: i64) -> Option<i64> {
    match version.debug.function_at(pc).and_then(|f| f.frame_base) {
        Some(Location::Local(l)) => match body.value_at(l, at) {
            Some(Sym::Sp(k)) => Some(k),
            _ => None,
        },
        Some(Location::Global(_)) => Some(stack),
        _ => None,
    }
}

/// What a frame of an unchanged function saved at resume point `rp` (code
/// offset `pc`, instruction `at` of `body`) holds that is an address;
/// `live` says which locals are read from the point on.
pub(crate) fn above_facts(version: &Version, body: &Body, rp: &ResumePoint, pc: u32, live: Vec<bool>) -> Result<AboveFacts, String> {
    let at = body.index_of(pc).ok_or("its point is not an instruction")?;
    let entry = crate::retreat::entry_stack_pointer(body, at)?;
    let mut pointers = frame_address_locals(body);
    pointers.extend(dwarf_pointer_locals(version, pc));
    // The operands a call takes are the top of what the frame saves.
    let taken = match rp.kind {
        ResumeKind::BlockingCall | ResumeKind::CallIndirect => body.instrs[at].operands.len(),
        _ => 0,
    };
    let below = rp.operands.len().saturating_sub(taken);
    let pointer_operands = (0..rp.operands.len())
        .map(|i| match i.checked_sub(below).and_then(|j| body.instrs[at].operands.get(j)) {
            Some(Origin::Instr(x)) => matches!(body.instrs[*x].value, Sym::Sp(_) | Sym::Frame),
            Some(Origin::Local(l)) => pointers.contains(l),
            _ => false,
        })
        .collect();
    let frame_base = match version.debug.function_at(pc).and_then(|f| f.frame_base) {
        Some(Location::Local(l)) => Some(l),
        _ => None,
    };
    let mut pointer_slots = Vec::new();
    for v in version.debug.variables_at(pc) {
        let Location::FrameOffset(offset) = v.location else { continue };
        let slots = pointer_offsets(&version.debug, v.ty, SLOT_LIMIT);
        if too_many(&slots) {
            return Err(format!("variable `{}` holds too many pointers to follow", v.key.name));
        }
        pointer_slots.extend(slots.into_iter().map(|s| (offset + s as i64, format!("`{}`", v.key.name))));
    }
    if !pointer_slots.is_empty() && frame_base.is_none() {
        return Err("DWARF gives its frame base in no local".into());
    }
    Ok(AboveFacts { entry, live, pointers, pointer_operands, frame_base, pointer_slots })
}

/// Where addresses in the moving stack go: the frames above the rebuilt
/// one shift by `delta`, its variables move by `moves` (absolute).
pub(crate) struct Translation {
    /// The stack pointer before the update.
    pub(crate) sp: u32,
    /// The rebuilt frame's stack pointer at its point, before the update.
    pub(crate) point: u32,
    /// Its entry stack pointer.
    pub(crate) entry: u32,
    /// How far the frames above move.
    pub(crate) delta: i64,
    /// (from, to, len) of each variable of the rebuilt frame.
    pub(crate) moves: Vec<(u32, u32, u64)>,
}

impl Translation {
    /// Whether `v` lies in the stack that changes place.
    pub(crate) fn moving(&self, v: u32) -> bool {
        self.translate(v) != Some(v)
    }

    /// Where address `v` goes; `None` for an address in the rebuilt
    /// frame's old area that no moving variable covers.
    pub(crate) fn translate(&self, v: u32) -> Option<u32> {
        if v >= self.sp && v < self.point {
            return Some((i64::from(v) + self.delta) as u32);
        }
        if v >= self.point && v < self.entry {
            return self
                .moves
                .iter()
                .find(|(from, _, len)| v >= *from && u64::from(v - from) < *len)
                .map(|(from, to, _)| to + (v - from));
        }
        Some(v)
    }

    /// The new value of `value`, held by `what`: translated if `proven` an
    /// address, kept if it does not lie in the moving stack, else why not.
    pub(crate) fn value(&self, value: Value, proven: bool, what: &dyn Fn() -> String) -> Result<Value, String> {
        let Value::I32(v) = value else { return Ok(value) };
        let v = v as u32;
        if !self.moving(v) {
            return Ok(value);
        }
        match (proven, self.translate(v)) {
            (true, Some(t)) => Ok(Value::I32(t as i32)),
            (true, None) => Err(format!(
                "{} points at {v:#x}, in the rebuilt frame's old area but in no variable that moves",
                what()
            )),
            (false, _) => Err(format!(
                "{} holds {v:#x}, an address in the stack that moves, and the analysis cannot prove it is a pointer to rewrite",
                what()
            )),
        }
    }
}

/// Checks a frame's values against the locals' types and translates them.
pub(crate) fn translate_frame(
    frame: &TypedFrame,
    tr: &Translation,
    local_proven: &dyn Fn(u32) -> Option<bool>,
    operand_proven: &dyn Fn(usize) -> bool,
    name: &str,
) -> Result<TypedFrame, String> {
    let mut out = frame.clone();
    for (l, value) in out.locals.iter_mut().enumerate() {
        // A dead local is never read again: what it holds does not matter.
        let (Some(proven), Some(value)) = (local_proven(l as u32), value.as_mut()) else { continue };
        if value.ty() == ValType::I32 {
            *value = tr.value(*value, proven, &|| format!("local {l} of `{name}`"))?;
        }
    }
    for (i, value) in out.operands.iter_mut().enumerate() {
        *value = tr.value(*value, operand_proven(i), &|| format!("saved operand {i} of `{name}`"))?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tr() -> Translation {
        // Frames above from 0x1000 to 0x1100; the rebuilt frame's old area
        // 0x1100..0x1200, growing by 0x40: its variable at 0x1140 (0x100
        // bytes) goes to 0x1100.
        Translation { sp: 0x1000, point: 0x1100, entry: 0x1200, delta: -0x40, moves: vec![(0x1140, 0x1100, 0x100)] }
    }

    #[test]
    fn addresses_above_the_rebuilt_frame_shift_with_it() {
        assert_eq!(tr().translate(0x1000), Some(0xfc0));
        assert_eq!(tr().translate(0x10ff), Some(0x10bf));
    }

    #[test]
    fn addresses_in_a_moving_variable_follow_it() {
        assert_eq!(tr().translate(0x1140), Some(0x1100));
        assert_eq!(tr().translate(0x1150), Some(0x1110));
        assert_eq!(tr().translate(0x11ff), Some(0x11bf));
    }

    #[test]
    fn addresses_in_the_old_area_outside_any_variable_have_no_place() {
        assert_eq!(tr().translate(0x1100), None);
        assert_eq!(tr().translate(0x113f), None);
    }

    #[test]
    fn addresses_outside_the_moving_stack_stay() {
        for v in [0, 0xfff, 0x1200, 0x5000] {
            assert_eq!(tr().translate(v), Some(v));
            assert!(!tr().moving(v));
        }
    }

    #[test]
    fn an_unproven_value_in_the_moving_stack_is_refused_by_name() {
        let err = tr().value(Value::I32(0x1150), false, &|| "local 3 of `f`".into()).unwrap_err();
        assert!(err.starts_with("local 3 of `f` holds 0x1150"), "{err}");
        assert_eq!(tr().value(Value::I32(7), false, &|| unreachable!()), Ok(Value::I32(7)));
        assert_eq!(tr().value(Value::I32(0x1150), true, &|| unreachable!()), Ok(Value::I32(0x1110)));
        assert!(tr().value(Value::I32(0x1110), true, &|| "x".into()).unwrap_err().contains("in no variable that moves"));
    }

    #[test]
    fn dead_locals_are_left_and_live_ones_translated() {
        let frame = TypedFrame {
            func: 1,
            resume_point: 0,
            locals: vec![Some(Value::I32(0x1150)), Some(Value::I32(0x1010)), Some(Value::I64(0x1010))],
            slots: vec![0, 1, 2],
            operands: vec![Value::I32(0x1020)],
        };
        let out = translate_frame(&frame, &tr(), &|l| (l != 0).then_some(true), &|_| true, "f").unwrap();
        assert_eq!(out.locals, vec![Some(Value::I32(0x1150)), Some(Value::I32(0xfd0)), Some(Value::I64(0x1010))]);
        assert_eq!(out.operands, vec![Value::I32(0xfe0)]);
        let refused = translate_frame(&frame, &tr(), &|_| Some(false), &|_| true, "f").unwrap_err();
        assert!(refused.starts_with("local 0 of `f`"), "{refused}");
    }
}

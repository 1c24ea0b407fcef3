//! The paused frames' part in a heap conversion: the pointers they hold are
//! roots of the trace ([`frame_roots`]), so that a list whose only head is
//! a local is converted like one a global holds, and once the frames are
//! mapped to the new version, the locals that must follow a converted
//! object are found ([`frame_pointers`]).
//!
//! Frames are typed by DWARF at their resume point, in both versions: a
//! variable's new type is that of the variable with the same identity
//! (scopes and name) at the mapped frame's point.

use upstare_instrument::abi::{Metadata, TypedFrame, Value};

use super::{Landing, Object, Plan, Root, Suspicion};
use crate::dwarf::{Location, Type, TypeId, same_type, value_map_through_pointers};
use crate::symbolic::Sym;
use crate::version::Version;

/// A pointer a frame holds in a wasm local.
#[derive(Debug, Clone)]
pub struct FrameValue {
    /// The variable, for messages.
    pub name: String,
    /// The address it holds.
    pub value: u32,
    /// What it points to in the old version.
    pub pointee: TypeId,
    /// What it points to in the new version, when that differs.
    pub new_pointee: Option<TypeId>,
}

/// The typed roots the paused frames give the trace.
#[derive(Debug, Clone, Default)]
pub struct FrameRoots {
    /// Variables in a frame's own memory (the shadow stack) that stays
    /// where it is through the update: their pointers are rewritten in
    /// place like a global's, and their other bytes are not pointers.
    pub memory: Vec<Root>,
    /// Pointer variables in wasm locals.
    pub values: Vec<FrameValue>,
    /// Bytes of those frames' memory, as (address, size), that only
    /// variables out of scope at the frame's point cover: dead, whatever
    /// they still hold (a `struct stat` an inlined call filled).
    pub dead: Vec<(u32, u32)>,
    /// Where the live shadow stacks of the program's other threads start.
    /// Their stacks are heap allocations (wasi-libc's `pthread_create`
    /// allocates them), growing down: the words below one of these in its
    /// allocation are dead frames, whatever they still hold.
    pub thread_stacks_from: Vec<u32>,
}

impl FrameRoots {
    /// Whether some frame variable reaches a type that changed.
    pub fn any_changed(&self) -> bool {
        self.memory.iter().any(|r| r.new_ty.is_some()) || self.values.iter().any(|v| v.new_pointee.is_some())
    }
}

/// Code offset of the resume point `frame` stands at.
fn point_pc(meta: &Metadata, frame: &TypedFrame) -> Option<u32> {
    let rp = meta.function(frame.func)?.resume_points.get(frame.resume_point as usize)?;
    Some(rp.offset.wrapping_sub(meta.code_section))
}

/// The frame base of each of `frames` (innermost first) of `version`,
/// paused with the stack pointer at `stack_pointer`, the shadow stack
/// starting at `stack_top`, as far as it can be told. A frame's code tells
/// its stack pointer at its point relative to its entry one (unless it
/// moves it inside a loop, as an inlined callee with a frame of its own
/// does), and where its frame base lies relative to the entry; a frame's
/// entry stack pointer is the stack pointer its caller stood at. So the
/// chain runs from both ends: inward from the top of the stack, outward
/// from the stack pointer, each as far as the points' stack pointers are
/// known.
fn frame_bases(version: &Version, meta: &Metadata, frames: &[TypedFrame], stack_pointer: u32, stack_top: Option<u32>) -> Vec<Option<u32>> {
    let facts: Vec<Option<(crate::symbolic::Body, u32, usize)>> = frames
        .iter()
        .map(|frame| {
            let pc = point_pc(meta, frame)?;
            let body = crate::symbolic::Body::analyse(version, frame.func)?;
            let at = body.index_of(pc)?;
            Some((body, pc, at))
        })
        .collect();
    let stack_at = |i: usize| match &facts[i] {
        Some((body, _, at)) => match body.instrs[*at].sp {
            Sym::Sp(k) => Some(k),
            _ => None,
        },
        None => None,
    };
    // Where the frame base lies from the entry stack pointer: a local's
    // value is known without the point's stack pointer.
    let base_offset = |i: usize| {
        let (body, pc, at) = facts[i].as_ref()?;
        let stack = match (version.debug.function_at(*pc).and_then(|f| f.frame_base), stack_at(i)) {
            (Some(Location::Global(_)), None) => return None,
            (_, stack) => stack.unwrap_or(0),
        };
        crate::rebuild::frame_base_offset(version, body, *pc, *at, stack)
    };
    let at = |entry: u32, k: i64| (i64::from(entry) + k) as u32;
    let mut bases = vec![None; frames.len()];
    // Outward from the stack pointer: each point's stack pointer gives the
    // frame's entry one.
    let mut at_point = stack_pointer;
    for i in 0..frames.len() {
        let Some(stack) = stack_at(i) else { break };
        let entry = at(at_point, -stack);
        bases[i] = base_offset(i).map(|k| at(entry, k));
        at_point = entry;
    }
    // Inward from the top: each frame's entry gives its point's stack
    // pointer, its callee's entry.
    let mut entry = stack_top;
    for i in (0..frames.len()).rev() {
        let Some(e) = entry else { break };
        if bases[i].is_none() {
            bases[i] = base_offset(i).map(|k| at(e, k));
        }
        entry = stack_at(i).map(|k| at(e, k));
    }
    bases
}

/// The roots of the frames of `old` paused as `old_frames` (innermost
/// first, with the stack pointer at `stack_pointer`), mapped to
/// `new_frames` of `new`. The two stacks pair from their outermost frame;
/// old frames beyond the pairs were dropped by the mapping and hold
/// nothing that lives on. `in_place` is how many of the outermost old
/// frames keep their shadow-stack area where it is: the variables in
/// memory of the others are moved by the frame mapping, which the trace
/// does not follow (the host scans what moves untyped).
#[allow(clippy::too_many_arguments)]
pub fn frame_roots(
    old: &Version,
    old_meta: &Metadata,
    old_frames: &[TypedFrame],
    stack_pointer: Option<u32>,
    stack_top: Option<u32>,
    new: &Version,
    new_meta: &Metadata,
    new_frames: &[TypedFrame],
    in_place: usize,
) -> FrameRoots {
    let mut roots = FrameRoots::default();
    let bases = match stack_pointer {
        Some(sp) => frame_bases(old, old_meta, old_frames, sp, stack_top),
        None => vec![None; old_frames.len()],
    };
    for (depth, (of, nf)) in old_frames.iter().rev().zip(new_frames.iter().rev()).enumerate() {
        let (Some(old_pc), Some(new_pc)) = (point_pc(old_meta, of), point_pc(new_meta, nf)) else { continue };
        let base = bases[old_frames.len() - 1 - depth].filter(|_| depth < in_place);
        let vars = old.debug.variables_at(old_pc);
        if let Some(base) = base {
            roots.dead.extend(dead_bytes(old, old_pc, &vars, base));
        }
        if vars.is_empty() {
            continue;
        }
        let new_vars = new.debug.variables_at(new_pc);
        let function = old.info.function_name(of.func);
        for v in vars {
            let new_ty = new_vars.iter().find(|n| n.key == v.key).map(|n| n.ty);
            let name = format!("{}:{}", function, v.key.name);
            match v.location {
                Location::Local(i) => {
                    let Type::Pointer { to: Some(pointee) } = *old.debug.ty(v.ty) else { continue };
                    let value = match of.locals.get(i as usize) {
                        Some(Some(Value::I32(v))) if *v != 0 => *v as u32,
                        _ => continue,
                    };
                    let new_pointee = match new_ty.map(|t| new.debug.ty(t)) {
                        Some(Type::Pointer { to: Some(p) }) if !same_type(&old.debug, pointee, &new.debug, *p) => Some(*p),
                        _ => None,
                    };
                    roots.values.push(FrameValue { name, value, pointee, new_pointee });
                }
                Location::FrameOffset(offset) => {
                    let Some(base) = base else { continue };
                    let Some(size) = old.debug.size_of(v.ty).and_then(|s| u32::try_from(s).ok()).filter(|s| *s > 0) else { continue };
                    let new_ty = new_ty.filter(|&t| !same_type(&old.debug, v.ty, &new.debug, t));
                    // A variable whose own bytes change layout is the frame
                    // mapping's to move; only its pointees are the trace's.
                    if let Some(t) = new_ty {
                        let new_size = new.debug.size_of(t).unwrap_or(0) as u32;
                        match value_map_through_pointers(&old.debug, v.ty, &new.debug, t, "") {
                            Ok(map) if map.is_whole_copy(size, new_size) => {}
                            _ => continue,
                        }
                    }
                    let address = (i64::from(base) + offset) as u32;
                    roots.memory.push(Root { name, address, size, old_ty: v.ty, new_ty });
                }
                _ => {}
            }
        }
    }
    roots
}

/// The bytes of the frame based at `base` (function at `pc`, with `vars`
/// in scope there) that only variables out of scope cover.
fn dead_bytes(version: &Version, pc: u32, vars: &[crate::dwarf::VarAt], base: u32) -> Vec<(u32, u32)> {
    let span = |offset: i64, ty: TypeId| {
        let size = version.debug.size_of(ty)? as i64;
        Some((offset, offset + size))
    };
    let live: Vec<(i64, i64)> = vars
        .iter()
        .filter_map(|v| match v.location {
            Location::FrameOffset(o) => span(o, v.ty),
            _ => None,
        })
        .collect();
    let mut dead = Vec::new();
    for (offset, ty) in version.debug.frame_variables(pc) {
        let Some((mut from, to)) = span(offset, ty) else { continue };
        // What an in-scope variable shares (a slot reused) stays live.
        while from < to {
            match live.iter().find(|&&(a, b)| a <= from && from < b) {
                Some(&(_, b)) => from = b,
                None => {
                    let end = live.iter().filter(|&&(a, _)| a > from).map(|&(a, _)| a).min().unwrap_or(to).min(to);
                    dead.push(((i64::from(base) + from) as u32, (end - from) as u32));
                    from = end;
                }
            }
        }
    }
    dead
}

/// The first value of `frames` (mapped to the new version) that holds the
/// start of an allocation no typed pointer reached and that may hold
/// objects of a changed struct ([`Plan::suspect_at`]): a temporary, an
/// operand, a variable outside its location list, an integer or a
/// `void *`. The trace saw no type for the allocation, so its objects
/// would not be converted. (A local with a pointer type at its point was a
/// root of the trace: had it held the start, the allocation would have
/// been reached.) Returns the frame's index.
pub fn untyped_frame_holder(plan: &Plan, frames: &[TypedFrame]) -> Option<(usize, Suspicion)> {
    frames.iter().enumerate().find_map(|(f, frame)| {
        let values = frame.locals.iter().flatten().chain(&frame.operands);
        values
            .filter_map(|v| match v {
                Value::I32(v) if *v != 0 => plan.suspect_at(*v as u32),
                _ => None,
            })
            .next()
            .map(|s| (f, s))
    })
}

/// The locals of `frames` (already mapped to the new version, which `meta`
/// describes) that hold the address of an object `plan` converts, as
/// (frame, local): each one is a pointer variable by the new version's
/// DWARF at its frame's resume point, and is rewritten like a pointer in
/// memory. Any other frame value holding such an address (a temporary, an
/// operand saved under a call, an integer) refuses the update, naming the
/// function: frames carry no other types.
pub fn frame_pointers(plan: &Plan, frames: &[TypedFrame], new: &Version, meta: &Metadata) -> Result<Vec<(usize, usize)>, String> {
    let mut found = Vec::new();
    for (f, frame) in frames.iter().enumerate() {
        let held = |v: &Value| match v {
            Value::I32(v) => plan.object_at(*v as u32),
            _ => None,
        };
        let refuse = |o: &Object| {
            format!(
                "a frame of `{}` holds the address of a heap object whose type changed ({} reached as {}) where it has no pointer type: it would go on pointing at the old copy",
                new.info.function_name(frame.func),
                plan.kind(o).type_name,
                plan.path_of(o)
            )
        };
        if let Some(o) = frame.operands.iter().find_map(held) {
            return Err(refuse(o));
        }
        let pointers: Vec<u32> = point_pc(meta, frame)
            .map(|pc| new.debug.variables_at(pc))
            .unwrap_or_default()
            .into_iter()
            .filter(|v| matches!(new.debug.ty(v.ty), Type::Pointer { to: Some(_) }))
            .filter_map(|v| match v.location {
                Location::Local(i) => Some(i),
                _ => None,
            })
            .collect();
        for (i, value) in frame.locals.iter().enumerate() {
            let Some(value) = value else { continue };
            let Some(o) = held(value) else { continue };
            if !pointers.contains(&(i as u32)) {
                return Err(refuse(o));
            }
            if let Value::I32(v) = value {
                if plan.translate(*v as u32, &vec![0; plan.objects.len()]) == Landing::Dropped {
                    return Err(format!(
                        "a frame of `{}` points into a member of {} ({}) that the new version drops",
                        new.info.function_name(frame.func),
                        plan.kind(o).type_name,
                        plan.path_of(o)
                    ));
                }
            }
            found.push((f, i));
        }
    }
    Ok(found)
}

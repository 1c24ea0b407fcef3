//! Moving the frames of active functions to the new version.
//!
//! A frame is saved at a resume point, which the instrumenter describes by
//! kind, callee and ordinal ("the 2nd call to `poll` in `main`"). The frame
//! moves to the resume point of the new version of its function at the
//! same place in the paired code of the two versions
//! (the `equivalence` module), if the pairing gives it one of the same kind
//! and callee; else to the one with the same description (callees compared
//! by name, `call_indirect` by signature). Then its values:
//!
//! - the function is unchanged: locals and saved operands are copied as
//!   they are;
//! - it changed: every local the new code can still read from that point
//!   ([`crate::liveness`]) needs a source in the old frame, and only the
//!   dead rest is zero ([`Source`]): a live local without a source makes the
//!   frame [`Unmappable`], never a silent zero. A source is, in order of
//!   preference:
//!   - the local where the old DWARF places the variable (same scope path,
//!     name and type) that the new DWARF places in this local;
//!   - the old frame base, for the new frame base;
//!   - the same local, when the code of both versions is identical from
//!     the function's first instruction through the resume point (local
//!     declarations may differ; the local keeps its type) and no loop
//!     around the point that reaches changed code writes the local after
//!     the point: its value was computed by the same code in both.
//!     At -O2 most values live in compiler temporaries DWARF does not name,
//!     so this is what moves most frames of changed functions;
//!   - the old local the paired code computes the same way: the two bodies'
//!     instructions paired by a diff, the locals renamed by the pairs, and
//!     a walk of each version following what the unpaired instructions
//!     compute ([`crate::symbolic`]); a local nothing differing reaches at
//!     the point holds the same value in both. A value a changed callee
//!     returned before the update counts as the same: it is state, as
//!     globals are;
//!   - the same parameter, when neither version ever assigns it: it still
//!     holds the caller's argument.
//!
//!   Saved operands copy only when the two points save the same types and,
//!   unless the code up to the point is identical, when the paired code
//!   computes each the same way (the arguments of a call in progress
//!   aside: the call was made with the old values, and is made again with
//!   them if it must be). A function whose frame in linear memory changed
//!   size, or whose variables moved within it, is rebuilt where it stands
//!   with the frames above it shifted ([`crate::rebuild`], by
//!   [`FramePlan::map_stack`], which reads the paused stack).
//!
//! Anything else is [`Unmappable`]: the updater waits for that frame to leave
//! the stack, or refuses. All of this is decided before the pause, for
//! every resume point at once ([`FrameMapper::plan`]); the pause only copies
//! slots ([`FramePlan::map`]).

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use upstare_instrument::abi::{FunctionMeta, Metadata, ResumeKind, ResumePoint, TypedFrame, ValType, Value};

use crate::body::shadow_frame_size;
use crate::diff::FunctionMatch;
use crate::dwarf::{same_type, Location, VarAt, VarKey};
use crate::equivalence::{align, Side};
use crate::heap::MemoryView;
use crate::liveness::live_at_many;
use crate::rebuild::{
    dwarf_pointer_locals, frame_address_locals, frame_base_offset, pointer_offsets, translate_frame, AboveFacts, Relayout, StackMemory,
    Translation,
};
use crate::retreat::{Analyser, Discard, EntryStackPointer, RetreatPath};
use crate::symbolic::{Origin, Sym};
use crate::version::Version;

/// A frame that cannot be moved to the new version, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{function}` at {point}: {reason}")]
pub struct Unmappable {
    /// The function's name.
    pub function: String,
    /// The resume point, described for people ("call to poll #0").
    pub point: String,
    /// Why.
    pub reason: String,
}

/// Maps frames of one version to the next.
#[derive(Debug)]
pub struct FrameMapper<'a> {
    /// The running version and its instrumenter metadata.
    pub old: (&'a Version, &'a Metadata),
    /// The new version (placed) and the metadata of its instrumented module.
    pub new: (&'a Version, &'a Metadata),
    /// How their functions correspond.
    pub functions: &'a FunctionMatch,
    /// Whether a local keeps its value because the code of both versions is
    /// identical up to the point. Off, frames of changed functions move only
    /// by what their values mean (`--stress-update`, where the code is the
    /// same everywhere and this rule alone would move every frame).
    pub identical_code_rule: bool,
}

/// Where one local of the new frame gets its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The old frame's local with this index.
    Old(u32),
    /// Zero, because the new code writes the local before any read from
    /// the resume point on.
    Dead,
    /// Zero, because the function starts over (an entry point) and zero is
    /// what a fresh call's declared local holds.
    Fresh,
    /// The frame's entry stack pointer plus this offset: the new code
    /// computed the local from the stack pointer alone (a frame base, the
    /// address of a variable in the frame). Only in retreats.
    Stack(i64),
    /// This constant, the new code's only value for the local there, on
    /// every path that reaches the point.
    Const(i64),
}

/// How to build the new version's frame from an old frame saved at one
/// resume point: decided before the pause, applied during it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recipe {
    /// The function in the new version.
    pub func: u32,
    /// The resume point in the new version's metadata.
    pub resume_point: u32,
    /// For each new local, where its value comes from.
    pub locals: Vec<Source>,
    /// The new locals' types (for the zeros).
    pub types: Vec<ValType>,
    /// When the function's frame in linear memory changed size or layout:
    /// how the frame is rebuilt where it stands ([`crate::rebuild`]).
    pub relayout: Option<Box<Relayout>>,
    /// The locals the new frame saves ([`ResumePoint::locals`]): only these
    /// get a value.
    pub saved: Vec<u32>,
    /// The locals the new frame has slots for ([`ResumePoint::slots`]):
    /// `saved`, and any dead at the point, which hold zero.
    pub slots: Vec<u32>,
}

impl Recipe {
    /// Refuses a recipe that would fill a saved local of the new frame
    /// from a local the old frame, saved at `old_rp`, does not hold: a
    /// local dead at the old point has no value to carry.
    fn check_saved(&self, old_rp: &ResumePoint) -> Result<(), String> {
        for &local in &self.saved {
            if let Some(Source::Old(j)) = self.locals.get(local as usize) {
                if !old_rp.locals.contains(j) {
                    return Err(format!(
                        "local {local} needs the value of old local {j}, which the old frame does not hold (it is dead at the old point)"
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Recipes for every resume point of the running version, by (function,
/// resume point index), each one a recipe or the reason there is none.
#[derive(Debug, Clone, Default)]
pub struct FramePlan {
    recipes: HashMap<(u32, u32), Result<Recipe, Unmappable>>,
    /// Frames that may be dropped when a frame below them retreats, by
    /// (function, resume point).
    discards: HashMap<(u32, u32), Result<Discard, String>>,
    /// Frames of changed functions that may go back to their loop header.
    retreats: HashMap<(u32, u32), Result<Retreat, String>>,
    /// Names of the running version's instrumented functions, for messages.
    names: HashMap<u32, String>,
    /// The loop headers among the keys of `retreats`: a frame paused there
    /// is rebuilt in place rather than sent back.
    headers: std::collections::HashSet<(u32, u32)>,
    /// Which values of frames that may stand above a rebuilt frame are
    /// addresses, by (function, resume point).
    above: HashMap<(u32, u32), Result<AboveFacts, String>>,
    /// The lowest address the shadow stack may reach, if the module says.
    stack_low: Option<u32>,
}

/// How a frame goes back to its loop header in the new version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retreat {
    /// The new frame, at the new version's loop header.
    pub recipe: Recipe,
    /// The old path from the header to the point.
    pub path: RetreatPath,
    /// The new code's stack pointer at its header, relative to the entry one.
    pub new_stack_at_header: i64,
    /// The frame's variables in linear memory that change place, relative
    /// to the entry stack pointer.
    pub moves: Vec<Move>,
}

/// Bytes of a frame's memory that move, relative to its entry stack pointer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Move {
    /// Where they are in the old frame.
    pub from: i64,
    /// Where they go in the new one.
    pub to: i64,
    /// How many.
    pub len: u64,
}

/// A whole stack of the old version, as a stack of the new one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MappedStack {
    /// The new frames, innermost first.
    pub frames: Vec<TypedFrame>,
    /// The value to give the new version's stack pointer, when a frame
    /// retreated and the frames above it were dropped.
    pub stack_pointer: Option<u32>,
    /// Bytes of linear memory to move (from, to, length), all read before
    /// any is written.
    pub moves: Vec<(u32, u32, u64)>,
    /// The frame that retreated, described for people.
    pub retreated: Option<String>,
    /// Where the retreating frame's memory starts in the old layout: the
    /// shadow stack below it belonged to the dropped frames.
    pub kept_stack_from: Option<u32>,
    /// 32-bit words to write after the moves (address, value): pointers
    /// into the moving stack, rewritten.
    pub patches: Vec<(u32, u32)>,
    /// The frame rebuilt where it stands, if one was.
    pub rebuilt: Option<Rebuilt>,
}

impl MappedStack {
    /// The old frames (`frames`, innermost first, paused with the stack
    /// pointer at `stack_pointer`) whose values still matter once this
    /// stack is in place, and where the live shadow stack then starts.
    /// Dropped frames and the retreating frame's old values are gone once
    /// the update is done, and a rebuilt frame's stack had its addresses
    /// rewritten by the plan.
    ///
    /// `frames` are the ones this stack was mapped from; given others, it
    /// keeps them all, which checks more, never less.
    pub fn kept<'f>(&self, frames: &'f [TypedFrame], stack_pointer: Option<u32>) -> (&'f [TypedFrame], Option<u32>) {
        match (&self.rebuilt, self.kept_stack_from) {
            (Some(r), _) => (frames.get(r.frames..).unwrap_or(frames), Some(r.stack_from)),
            (None, Some(from)) => {
                let first = (frames.len() + 1).checked_sub(self.frames.len());
                (first.and_then(|i| frames.get(i..)).unwrap_or(frames), Some(from))
            }
            (None, None) => (frames, stack_pointer),
        }
    }
}

/// The paused program's memory as [`FramePlan::map_stack`] reads it.
struct Words<'m>(&'m dyn MemoryView);

impl StackMemory for Words<'_> {
    fn read_u32(&self, address: u32) -> Option<u32> {
        self.0.read_u32(address)
    }
}

/// A frame rebuilt where it stands, with the frames above it shifted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rebuilt {
    /// The frame, described for people.
    pub frame: String,
    /// How many of the innermost frames (the rebuilt one included) had
    /// their addresses into the moving stack rewritten by the plan.
    pub frames: usize,
    /// The rebuilt frame's entry stack pointer: the stack above it (higher
    /// addresses) did not move, and its frames' values are as they were.
    pub stack_from: u32,
}

impl FramePlan {
    /// The frame `frame` of the old version, as a frame of the new one.
    pub fn map(&self, frame: &TypedFrame) -> Result<TypedFrame, Unmappable> {
        let recipe = match self.recipes.get(&(frame.func, frame.resume_point)) {
            Some(Ok(r)) => r,
            Some(Err(e)) => return Err(e.clone()),
            None => return Err(unknown_point(frame)),
        };
        if recipe.relayout.is_some() {
            return Err(Unmappable {
                function: self.name(frame.func),
                point: format!("#{}", frame.resume_point),
                reason: "its frame in linear memory changed: it is rebuilt only with the stack it stands in".into(),
            });
        }
        build(recipe, frame, None)
    }

    /// A paused thread's stack `frames` (innermost first) as a stack of the
    /// new version: with its stack pointer, as [`FramePlan::map_stack`]
    /// does; without one (a module with no `__stack_pointer`), each frame
    /// moves to its point or the stack cannot move.
    pub fn map_paused(&self, frames: &[TypedFrame], stack_pointer: Option<u32>, memory: &dyn MemoryView) -> Result<MappedStack, Unmappable> {
        match stack_pointer {
            Some(sp) => self.map_stack(frames, sp, &Words(memory)),
            None => frames
                .iter()
                .map(|f| self.map(f))
                .collect::<Result<_, _>>()
                .map(|frames| MappedStack { frames, ..MappedStack::default() }),
        }
    }

    /// The stack `frames` (innermost first) of the old version, whose stack
    /// pointer global holds `stack_pointer`, as a stack of the new one.
    ///
    /// Each frame moves to its point in the new version when it can. When
    /// one cannot, the outermost such frame may retreat to its loop header
    /// ([`crate::retreat`]): the frames above it are dropped, the stack
    /// pointer goes back to where it was at the header, and the frame's
    /// memory is rearranged for the new code.
    pub fn map_stack(&self, frames: &[TypedFrame], stack_pointer: u32, memory: &dyn StackMemory) -> Result<MappedStack, Unmappable> {
        let mapped: Vec<Result<TypedFrame, Unmappable>> = frames.iter().map(|f| self.map(f)).collect();
        let Some(k) = mapped.iter().rposition(Result::is_err) else {
            return Ok(MappedStack { frames: mapped.into_iter().map(Result::unwrap).collect(), ..MappedStack::default() });
        };
        let mut stuck = mapped[k].clone().unwrap_err();
        if let Some(Ok(recipe @ Recipe { relayout: Some(r), .. })) = self.recipes.get(&(frames[k].func, frames[k].resume_point)) {
            match self.rebuild(frames, k, (recipe, r), stack_pointer, memory, &mapped) {
                Ok(stack) => return Ok(stack),
                Err(why) => stuck.reason = format!("its frame in linear memory changed and cannot be rebuilt where it stands: {why}"),
            }
        }
        let frame = &frames[k];
        let how = match self.headers.contains(&(frame.func, frame.resume_point)) {
            true => "nor can it be rebuilt at its loop header",
            false => "it cannot go back to its loop header",
        };
        let cannot = |why: String| Unmappable { reason: format!("{}; {how}: {why}", stuck.reason), ..stuck.clone() };
        let retreat = match self.retreats.get(&(frame.func, frame.resume_point)) {
            Some(Ok(r)) => r,
            Some(Err(why)) => return Err(cannot(why.clone())),
            None => return Err(stuck),
        };
        // The entry stack pointer of each dropped frame, innermost first:
        // what the stack pointer was when its caller called it.
        let mut sp = stack_pointer;
        for (i, inner) in frames[..k].iter().enumerate() {
            let discard = match self.discards.get(&(inner.func, inner.resume_point)) {
                Some(Ok(d)) => d,
                Some(Err(why)) => {
                    return Err(cannot(format!("the frame of `{}` above it would be dropped, but {why}", self.name(inner.func))))
                }
                None => {
                    return Err(cannot(format!(
                        "the frame of `{}` above it does not lead to a blocking call",
                        self.name(inner.func)
                    )))
                }
            };
            if i == 0 && !discard.blocking {
                return Err(cannot("the innermost frame does not wait in a blocking call".into()));
            }
            sp = entry_stack_pointer(discard.entry, inner, sp).map_err(&cannot)?;
        }
        let at_header = retreat.path.at_header;
        if at_header && k != 0 {
            return Err(cannot("frames above a loop header cannot be".into()));
        }
        if k == 0 && !at_header && self.discards.get(&(frame.func, frame.resume_point)).is_none_or(|d| !d.as_ref().is_ok_and(|d| d.blocking)) {
            return Err(cannot("it does not wait in a blocking call".into()));
        }
        let entry = entry_stack_pointer(retreat.path.entry, frame, sp).map_err(&cannot)?;
        // No code between the header and the call moved the stack pointer,
        // so at the call it is where the code puts it at the header.
        if i64::from(entry) + retreat.path.stack_at_header != i64::from(sp) {
            return Err(cannot(format!(
                "its stack pointer is {sp:#x} at the call, not {:#x} as its code sets it",
                i64::from(entry) + retreat.path.stack_at_header
            )));
        }
        let at = |offset: i64| (i64::from(entry) + offset) as u32;
        let new = build(&retreat.recipe, frame, Some(entry))?;
        let old_frame = at(retreat.path.stack_at_header)..entry;
        let moves: Vec<(u32, u32, u64)> =
            retreat.moves.iter().filter(|m| m.from != m.to).map(|m| (at(m.from), at(m.to), m.len)).collect();
        if !moves.is_empty() {
            for (source, value) in retreat.recipe.locals.iter().zip(&new.locals) {
                if let (Source::Old(j), Some(Value::I32(v))) = (source, value) {
                    if old_frame.contains(&(*v as u32)) {
                        return Err(cannot(format!(
                            "local {j} holds an address in its frame in linear memory, whose variables move"
                        )));
                    }
                }
            }
        }
        let mut out = vec![new];
        for m in mapped.into_iter().skip(k + 1) {
            out.push(m?);
        }
        Ok(MappedStack {
            frames: out,
            stack_pointer: Some(at(retreat.new_stack_at_header)),
            moves,
            retreated: (!at_header).then(|| format!("{} (from {})", stuck.function, stuck.point)),
            kept_stack_from: Some(old_frame.start),
            ..MappedStack::default()
        })
    }

    /// The stack `frames` with frame `k` rebuilt where it stands and the
    /// frames above it shifted ([`crate::rebuild`]), or why not.
    fn rebuild(
        &self,
        frames: &[TypedFrame],
        k: usize,
        (recipe, r): (&Recipe, &Relayout),
        sp: u32,
        memory: &dyn StackMemory,
        mapped: &[Result<TypedFrame, Unmappable>],
    ) -> Result<MappedStack, String> {
        // The frames above: unchanged code, entry stack pointers innermost
        // first, as a retreat finds them.
        let mut facts = Vec::with_capacity(k);
        let mut point = sp;
        for (inner, m) in frames[..k].iter().zip(mapped) {
            let name = self.name(inner.func);
            let fact = match self.above.get(&(inner.func, inner.resume_point)) {
                Some(Ok(f)) => f,
                Some(Err(why)) => return Err(format!("the frame of `{name}` above it cannot be shifted: {why}")),
                None => return Err(format!("the frame of `{name}` above it is not one the analysis followed")),
            };
            let unchanged = matches!(self.recipes.get(&(inner.func, inner.resume_point)), Some(Ok(ri))
                if ri.relayout.is_none() && ri.locals.iter().enumerate().all(|(i, s)| *s == Source::Old(i as u32)));
            if m.is_err() || !unchanged {
                return Err(format!("the frame of `{name}` above it changed too"));
            }
            facts.push(fact);
            point = entry_stack_pointer(fact.entry, inner, point).map_err(|why| format!("the frame of `{name}` above it: {why}"))?;
        }
        let frame = &frames[k];
        let entry = entry_stack_pointer(r.entry, frame, point)?;
        let (old_stack, new_stack) = r.stack_at_point;
        if i64::from(entry) + old_stack != i64::from(point) {
            return Err(format!("its stack pointer is {point:#x} at the point, not {:#x} as its code sets it", i64::from(entry) + old_stack));
        }
        let at = |offset: i64| (i64::from(entry) + offset) as u32;
        let delta = new_stack - old_stack;
        let new_sp = i64::from(sp) + delta;
        if new_sp < i64::from(self.stack_low.unwrap_or(0)) || new_sp < 0 {
            return Err(format!("the shadow stack has no room for its frame to grow by {} bytes", -delta));
        }
        let variables: Vec<(u32, u32, u64)> = r.moves.iter().map(|(m, _)| (at(m.from), at(m.to), m.len)).collect();
        let tr = Translation { sp, point, entry, delta, moves: variables.clone() };

        // The rebuilt frame: its locals by the recipe, addresses among
        // them recomputed or translated.
        let mut new = build(recipe, frame, Some(entry)).map_err(|e| e.reason)?;
        for (source, value) in recipe.locals.iter().zip(new.locals.iter_mut()) {
            if let (Source::Old(j), Some(v)) = (*source, value.as_mut()) {
                *v = tr.value(*v, r.old_pointers.contains(&j), &|| format!("local {j} of its old frame"))?;
            }
        }
        new.operands = frame
            .operands
            .iter()
            .enumerate()
            .map(|(i, v)| tr.value(*v, false, &|| format!("its saved operand {i}")))
            .collect::<Result<_, _>>()?;

        // The frames above, shifted, and their pointers in memory.
        let mut out = Vec::with_capacity(frames.len());
        let mut patches = Vec::new();
        for ((inner, m), fact) in frames[..k].iter().zip(mapped).zip(&facts) {
            let name = self.name(inner.func);
            let Ok(m) = m else { unreachable!("checked above") };
            let live = |l: u32| fact.live.get(l as usize).copied().unwrap_or(true).then(|| fact.pointers.contains(&l));
            let operand = |i: usize| fact.pointer_operands.get(i).copied().unwrap_or(false);
            out.push(translate_frame(m, &tr, &live, &operand, &name)?);
            let Some(base) = fact.frame_base.filter(|_| !fact.pointer_slots.is_empty()) else { continue };
            let Some(Some(Value::I32(base))) = inner.locals.get(base as usize) else {
                return Err(format!("the frame of `{name}` above it lacks its frame base"));
            };
            for (offset, what) in &fact.pointer_slots {
                let address = i64::from(*base as u32) + offset;
                if address < i64::from(sp) || address + 4 > i64::from(point) {
                    continue;
                }
                let address = address as u32;
                let v = memory.read_u32(address).ok_or_else(|| format!("the frame of `{name}` lies out of bounds"))?;
                if let Value::I32(t) = tr.value(Value::I32(v as i32), true, &|| format!("{what} in the frame of `{name}`"))? {
                    if t as u32 != v {
                        patches.push(((i64::from(address) + delta) as u32, t as u32));
                    }
                }
            }
        }
        for (slot, what) in &r.new_pointer_slots {
            let to = at(*slot);
            let Some((from, place, _)) = variables.iter().find(|(_, place, len)| to >= *place && u64::from(to - place) + 4 <= *len) else {
                continue;
            };
            let v = memory.read_u32(from + (to - place)).ok_or("its frame lies out of bounds")?;
            if let Value::I32(t) = tr.value(Value::I32(v as i32), true, &|| format!("{what} in its frame"))? {
                if t as u32 != v {
                    patches.push((to, t as u32));
                }
            }
        }
        out.push(new);
        for m in &mapped[k + 1..] {
            out.push(m.clone().map_err(|e| e.to_string())?);
        }
        let mut moves = Vec::new();
        if delta != 0 && point > sp {
            moves.push((sp, new_sp as u32, u64::from(point - sp)));
        }
        moves.extend(variables.into_iter().filter(|(from, to, _)| from != to));
        Ok(MappedStack {
            frames: out,
            stack_pointer: Some(new_sp as u32),
            moves,
            patches,
            rebuilt: Some(Rebuilt { frame: self.name(frame.func), frames: k + 1, stack_from: entry }),
            ..MappedStack::default()
        })
    }

    /// The recipe for frames of old function `func` saved at its resume
    /// point `resume_point`, or why there is none; `None` if the running
    /// version has no such point.
    pub fn recipe(&self, func: u32, resume_point: u32) -> Option<&Result<Recipe, Unmappable>> {
        self.recipes.get(&(func, resume_point))
    }

    fn name(&self, func: u32) -> String {
        self.names.get(&func).cloned().unwrap_or_else(|| format!("func[{func}]"))
    }

    /// Whether a frame saved at this resume point may go back to its loop
    /// header, and if not, why; `None` if the question does not arise (the
    /// frame moves as it is, or is not in a changed function).
    pub fn retreat(&self, func: u32, resume_point: u32) -> Option<&Result<Retreat, String>> {
        self.retreats.get(&(func, resume_point))
    }

    /// Whether a frame saved at this resume point may be dropped when a
    /// frame below it retreats, and if not, why; `None` if the point does
    /// not lead to a blocking call.
    pub fn discard(&self, func: u32, resume_point: u32) -> Option<&Result<Discard, String>> {
        self.discards.get(&(func, resume_point))
    }

    /// How many resume points have a recipe, and how many cannot move.
    pub fn counts(&self) -> (usize, usize) {
        let ok = self.recipes.values().filter(|r| r.is_ok()).count();
        (ok, self.recipes.len() - ok)
    }
}

impl FrameMapper<'_> {
    /// Recipes for every resume point of every function of the old
    /// version's metadata: the expensive part (DWARF, liveness, code
    /// comparison) done once, before the program pauses.
    pub fn plan(&self) -> FramePlan {
        let (old, old_meta) = self.old;
        let (new, _) = self.new;
        let codes = Codes { old: Analyser::new(old), new: Analyser::new(new), paired: Default::default() };
        let mut recipes = HashMap::new();
        for f in &old_meta.functions {
            // What every resume point of a changed function needs is
            // analysed once for the function, not once per point.
            let pair = self.changed_pair(f.index);
            for rp in 0..f.resume_points.len() as u32 {
                recipes.insert((f.index, rp), self.recipe(f.index, rp, pair.as_ref(), &codes));
            }
        }
        let names = old_meta.functions.iter().map(|f| (f.index, old.info.function_name(f.index))).collect();
        let mut plan = FramePlan { recipes, names, stack_low: stack_low(old), ..FramePlan::default() };
        self.plan_above(&mut plan, &codes);
        self.plan_retreats(&mut plan, &codes);
        plan
    }

    /// What the frames that may stand above a rebuilt frame hold that is an
    /// address: every resume point of the functions a rebuilt frame's call
    /// reaches through direct calls (at most [`ABOVE_LIMIT`] functions).
    fn plan_above(&self, plan: &mut FramePlan, codes: &Codes<'_>) {
        const ABOVE_LIMIT: usize = 256;
        let (old, old_meta) = self.old;
        let mut todo: Vec<u32> = Vec::new();
        for ((func, rp), recipe) in &plan.recipes {
            let Ok(Recipe { relayout: Some(_), .. }) = recipe else { continue };
            let Some(point) = old_meta.function(*func).and_then(|f| f.resume_points.get(*rp as usize)) else { continue };
            if matches!(point.kind, ResumeKind::Call | ResumeKind::BlockingCall) {
                todo.push(point.callee);
            }
        }
        let mut seen: std::collections::HashSet<u32> = todo.iter().copied().collect();
        while let Some(f) = todo.pop() {
            if seen.len() > ABOVE_LIMIT {
                break;
            }
            let Some(code) = codes.old.code(f) else { continue };
            for instr in &code.body.instrs {
                if let crate::symbolic::Access::Call(g) = instr.access {
                    if seen.insert(g) {
                        todo.push(g);
                    }
                }
            }
            let Some(meta) = old_meta.function(f) else { continue };
            let points: Vec<(usize, &ResumePoint)> =
                meta.resume_points.iter().enumerate().filter(|(_, rp)| rp.kind != ResumeKind::Entry).collect();
            let offsets: Vec<u32> = points.iter().map(|(_, rp)| rp.offset.wrapping_sub(old_meta.code_section)).collect();
            let live = live_at_many(&old.wasm, f, &offsets).map_err(|e| format!("its code cannot be analysed: {e}"));
            for (n, (i, rp)) in points.iter().enumerate() {
                let facts = match &live {
                    Ok(sets) => crate::rebuild::above_facts(old, &code.body, rp, offsets[n], sets[n].clone()),
                    Err(e) => Err(e.clone()),
                };
                plan.above.insert((f, *i as u32), facts);
            }
        }
    }

    /// Which frames may be dropped, and which frames of changed functions
    /// that cannot move where they stand may retreat to their loop header.
    fn plan_retreats(&self, plan: &mut FramePlan, codes: &Codes<'_>) {
        let (_, old_meta) = self.old;
        let old_code = &codes.old;
        let pc = |rp: &ResumePoint| rp.offset.wrapping_sub(old_meta.code_section);
        // A frame can be dropped only above a blocking call: start from the
        // blocking calls and go up the calls to functions already found
        // droppable, which keeps the analysis to the chains that matter.
        let mut droppable: std::collections::HashSet<u32> = std::collections::HashSet::new();
        loop {
            let mut grew = false;
            for f in &old_meta.functions {
                for (i, rp) in f.resume_points.iter().enumerate() {
                    let key = (f.index, i as u32);
                    let blocking = rp.kind == ResumeKind::BlockingCall;
                    let leads_on = rp.kind == ResumeKind::Call && droppable.contains(&rp.callee);
                    if plan.discards.contains_key(&key) || !(blocking || leads_on) {
                        continue;
                    }
                    let discard = old_code.discard(f.index, pc(rp), blocking);
                    if discard.is_ok() {
                        grew |= droppable.insert(f.index);
                    }
                    plan.discards.insert(key, discard);
                }
            }
            if !grew {
                break;
            }
        }
        for f in &old_meta.functions {
            let pair = match self.functions.is_unchanged(f.index) {
                true => continue,
                false => self.changed_pair(f.index),
            };
            for (i, rp) in f.resume_points.iter().enumerate() {
                let key = (f.index, i as u32);
                let stuck = plan.recipes.get(&key).is_some_and(|r| r.as_ref().map_or(true, |r| r.relayout.is_some()));
                let waits = rp.kind == ResumeKind::BlockingCall
                    || rp.kind == ResumeKind::Call && droppable.contains(&rp.callee);
                // A frame paused at a loop header of a changed loop is
                // rebuilt there by the same rules, with no path to undo.
                let at_header = rp.kind == ResumeKind::Loop;
                if stuck && (waits || at_header) {
                    let retreat = self.retreat(f, rp, pair.as_ref(), codes);
                    plan.retreats.insert(key, retreat);
                    if at_header {
                        plan.headers.insert(key);
                    }
                }
            }
        }
    }

    /// The two versions of changed function `old_func` paired and walked,
    /// once for all of its points; `None` if either cannot be analysed.
    fn paired(&self, codes: &Codes<'_>, old_func: u32) -> Option<Rc<PairedCode>> {
        if let Some(known) = codes.paired.borrow().get(&old_func) {
            return known.clone();
        }
        let paired = self.functions.old_to_new.get(&old_func).and_then(|&new_func| {
            let old_body = &codes.old.code(old_func)?.body;
            let new_body = &codes.new.code(new_func)?.body;
            self.paired_code(old_func, old_body, new_func, new_body).map(Rc::new)
        });
        codes.paired.borrow_mut().insert(old_func, paired.clone());
        paired
    }

    fn paired_code(
        &self,
        old_func: u32,
        old_body: &crate::symbolic::Body,
        new_func: u32,
        new_body: &crate::symbolic::Body,
    ) -> Option<PairedCode> {
        let (old, _) = self.old;
        let (new, _) = self.new;
        // A call to a function that changed pairs with its counterpart like
        // any instruction: the value the old version's callee returned is
        // state the program computed before the update, kept as globals
        // and the heap are, not a value the new code must compute again.
        let mut pairs = align(&Side::new(old, old_func, old_body)?, &Side::new(new, new_func, new_body)?);
        let walks = match walk_paired((old, old_func, old_body), (new, new_func, new_body), &mut pairs) {
            (Some(o), Some(n)) => Some((o, n)),
            _ => None,
        };
        Some(PairedCode { pairs, walks })
    }

    /// How a frame of changed function `old_fn` saved at `old_rp` retreats
    /// to its loop header in the new version, or why it cannot.
    fn retreat(
        &self,
        old_fn: &FunctionMeta,
        old_rp: &ResumePoint,
        pair: Option<&ChangedPair>,
        codes: &Codes<'_>,
    ) -> Result<Retreat, String> {
        let (old_code, new_code) = (&codes.old, &codes.new);
        let (old, old_meta) = self.old;
        let (new, new_meta) = self.new;
        let pair = pair.ok_or("the new version has no such function with update points")?;
        let pc = old_rp.offset.wrapping_sub(old_meta.code_section);
        let path = match old_rp.kind {
            ResumeKind::Loop => old_code.at_header(old_fn.index, pc)?,
            _ => old_code.retreat_path(old_fn.index, pc)?,
        };
        let header = old_fn
            .resume_points
            .iter()
            .find(|rp| rp.kind == ResumeKind::Loop && rp.offset.wrapping_sub(old_meta.code_section) == path.header)
            .ok_or("its loop header is not an update point")?;
        let new_func = *self.functions.old_to_new.get(&old_fn.index).ok_or("the new version has no function of that name")?;
        let new_fn = new_meta.function(new_func).ok_or("the new version of the function has no update points")?;
        let old_body = &old_code.code(old_fn.index).ok_or("its code cannot be analysed")?.body;
        let new_body = &new_code.code(new_func).ok_or("its new code cannot be analysed")?.body;
        let old_at = old_body.index_of(path.header).ok_or("its loop header is not an instruction")?;
        let paired = self.paired(codes, old_fn.index);
        let paired = paired.as_deref();
        let pairs = paired.map(|p| &p.pairs);
        // The new header is the old one's partner in the code, whatever
        // loops the new version added or removed before it; by ordinal
        // only when the code does not pair them.
        let partner = pairs.as_ref().and_then(|p| p.partner.get(&old_at)).map(|&j| new_body.instrs[j].offset + new_meta.code_section);
        let (new_index, new_header) = match partner
            .and_then(|offset| new_fn.resume_points.iter().enumerate().find(|(_, rp)| rp.kind == ResumeKind::Loop && rp.offset == offset))
        {
            Some((i, rp)) => (i as u32, rp),
            None => self.find_point(old_fn, header, new_fn)?,
        };
        if !header.operands.is_empty() || !new_header.operands.is_empty() {
            return Err("values wait on the operand stack at its loop header".into());
        }
        let new_pc = new_header.offset.wrapping_sub(new_meta.code_section);
        let new_at = new_body.index_of(new_pc).ok_or("the new loop header is not an instruction")?;
        let new_stack_at_header = match new_body.instrs[new_at].sp {
            Sym::Sp(k) => k,
            _ => return Err("the new code's stack pointer at the loop header is not known".into()),
        };

        // Locals of the new frame.
        let live = pair.live.as_ref().map_err(Clone::clone)?.get(&new_pc).ok_or("the new code has no instruction at the loop header")?;
        if live.len() != new_fn.locals.len() {
            return Err(format!("liveness covers {} locals but the new function has {}", live.len(), new_fn.locals.len()));
        }
        let old_vars: HashMap<VarKey, VarAt> = vars_at_header(old, old_body, old_at).into_iter().map(|v| (v.key.clone(), v)).collect();
        let new_vars = vars_at_header(new, new_body, new_at);
        // A local that nothing differing between the versions reaches holds
        // the same value at both headers (frame addresses aside: those
        // moved, and come from the stack pointer instead).
        // New local -> old local computed the same way.
        let same: HashMap<u32, u32> = match paired {
            Some(PairedCode { pairs, walks: Some((o, n)) }) if pairs.partner.get(&old_at) == Some(&new_at) => {
                match (o.differs_at_header(old_at), n.differs_at_header(new_at)) {
                    (Some(x), Some(y)) => pairs
                        .locals
                        .iter()
                        .filter(|(a, b)| x.get(**a as usize) == Some(&false) && y.get(**b as usize) == Some(&false))
                        .map(|(a, b)| (*b, *a))
                        .collect(),
                    _ => HashMap::new(),
                }
            }
            _ => HashMap::new(),
        };
        let addresses = |body: &crate::symbolic::Body| -> std::collections::HashSet<u32> {
            body.instrs.iter().filter_map(|i| i.def.filter(|(_, v)| matches!(v, Sym::Sp(_) | Sym::Frame)).map(|(l, _)| l)).collect()
        };
        let (old_addresses, new_addresses) = (addresses(old_body), addresses(new_body));
        let equivalent = |local: u32| same.get(&local).copied().filter(|old| !old_addresses.contains(old) && !new_addresses.contains(&local));
        let shared_params = param_count(old, old_fn.index).min(param_count(new, new_func));
        let mut locals = Vec::with_capacity(new_fn.locals.len());
        for (local, is_live) in live.iter().enumerate() {
            let local = local as u32;
            let ty = new_fn.locals[local as usize];
            let kept = |j: u32| !path.redefined.contains(&j) && old_fn.locals.get(j as usize) == Some(&ty);
            let source = match (new_body.value_at(local, new_at), new_body.constant_at(local, new_at)) {
                (Some(Sym::Sp(k)), _) if ty == ValType::I32 => Some(Source::Stack(k)),
                (_, Some(c)) => Some(Source::Const(c)),
                _ => None,
            }
            .or_else(|| dwarf_source((old, &old_vars), (new, &new_vars), local).filter(|&j| kept(j)).map(Source::Old))
            .or_else(|| equivalent(local).filter(|&j| kept(j)).map(Source::Old))
            .or_else(|| ((local as usize) < shared_params && kept(local) && !pair.assigned(local)).then_some(Source::Old(local)));
            match source {
                Some(s) => locals.push(s),
                None if !is_live => locals.push(Source::Dead),
                None => {
                    let what = describe_local(&new_vars, local);
                    let why = self.why_unpaired(codes, old_fn.index, (old_at, new_at), true, local);
                    return Err(format!("local {local} ({what}) is live at the new loop header and has no counterpart in the old frame{why}"));
                }
            }
        }

        // Variables in linear memory, where the frame base puts them.
        let old_base = frame_base_offset(old, old_body, path.header, old_at, path.stack_at_header);
        let new_base = frame_base_offset(new, new_body, new_pc, new_at, new_stack_at_header);
        let mut moves = Vec::new();
        for v in &new_vars {
            let Location::FrameOffset(to) = v.location else { continue };
            let found = old_vars.get(&v.key).and_then(|o| match o.location {
                Location::FrameOffset(from) if same_type(&old.debug, o.ty, &new.debug, v.ty) => Some(from),
                _ => None,
            });
            let (Some(from), Some(old_base), Some(new_base), Some(len)) = (found, old_base, new_base, new.debug.size_of(v.ty)) else {
                return Err(format!("variable `{}` in its frame in linear memory has no counterpart in the old frame", v.key));
            };
            moves.push(Move { from: old_base + from, to: new_base + to, len });
        }
        let recipe = Recipe {
            func: new_func,
            resume_point: new_index,
            locals,
            types: new_fn.locals.clone(),
            relayout: None,
            saved: new_header.locals.clone(),
            slots: new_header.slots.clone(),
        };
        recipe.check_saved(old_rp)?;
        Ok(Retreat { recipe, path, new_stack_at_header, moves })
    }

    /// The analysis of old function `func` and its new version, if it has
    /// changed and has a new version with update points.
    fn changed_pair(&self, func: u32) -> Option<ChangedPair> {
        let (old, _) = self.old;
        let (new, new_meta) = self.new;
        if self.functions.is_unchanged(func) {
            return None;
        }
        let new_func = *self.functions.old_to_new.get(&func)?;
        let new_fn = new_meta.function(new_func)?;
        // An entry point's offset is the body's local declarations, not an
        // instruction, and its frame needs no liveness: leave it out, or the
        // analysis rejects the whole function.
        let offsets: Vec<u32> = new_fn
            .resume_points
            .iter()
            .filter(|rp| rp.kind != ResumeKind::Entry)
            .map(|rp| rp.offset.wrapping_sub(new_meta.code_section))
            .collect();
        let live = live_at_many(&new.wasm, new_func, &offsets)
            .map(|sets| offsets.iter().copied().zip(sets).collect())
            .map_err(|e| format!("cannot analyse the new code: {e}"));
        Some(ChangedPair {
            old: FunctionCode::read(old, func),
            new: FunctionCode::read(new, new_func),
            common: common_code_len(old, func, new, new_func),
            frame_sizes: (shadow_frame_size(&old.info, &old.wasm, func), shadow_frame_size(&new.info, &new.wasm, new_func)),
            live,
        })
    }

    /// The recipe for frames of old function `func` saved at its resume
    /// point `resume_point`; `pair` is the function's analysis if it changed.
    fn recipe(&self, func: u32, resume_point: u32, pair: Option<&ChangedPair>, codes: &Codes<'_>) -> Result<Recipe, Unmappable> {
        let (old, old_meta) = self.old;
        let (_, new_meta) = self.new;
        let function = old.info.function_name(func);
        let old_fn = old_meta.function(func).ok_or_else(|| Unmappable {
            function: function.clone(),
            point: "?".into(),
            reason: "the frame names a function the metadata does not describe".into(),
        })?;
        let old_rp = old_fn.resume_points.get(resume_point as usize).ok_or_else(|| Unmappable {
            function: function.clone(),
            point: "?".into(),
            reason: "the frame names an unknown resume point".into(),
        })?;
        let point = describe(old, old_rp);
        let fail = |reason: String| Unmappable { function: function.clone(), point: point.clone(), reason };

        if old_fn.locals.iter().chain(&old_rp.operands).any(|t| t.is_ref()) {
            return Err(fail("it holds a reference value, which cannot cross instances".into()));
        }
        let new_func = *self
            .functions
            .old_to_new
            .get(&func)
            .ok_or_else(|| fail("the new version has no function of that name".into()))?;
        let new_fn = new_meta
            .function(new_func)
            .ok_or_else(|| fail("the new version of the function has no update point there".into()))?;
        let found = match pair {
            Some(_) => self.paired_point(codes, old_fn, old_rp, new_fn),
            None => None,
        };
        let (rp_index, new_rp) = match found {
            Some(found) => found,
            None => self.find_point(old_fn, old_rp, new_fn).map_err(fail)?,
        };
        if old_rp.operands != new_rp.operands {
            return Err(fail("the values on the operand stack there differ between the versions".into()));
        }
        let (locals, relayout) = match pair {
            None => {
                if new_fn.locals != old_fn.locals {
                    return Err(fail("its locals changed although its body did not".into()));
                }
                ((0..old_fn.locals.len() as u32).map(Source::Old).collect(), None)
            }
            Some(pair) => self.changed_locals(pair, old_rp, old_fn, new_rp, new_fn, codes).map_err(fail)?,
        };
        let recipe = Recipe {
            func: new_func,
            resume_point: rp_index,
            locals,
            types: new_fn.locals.clone(),
            relayout: relayout.map(Box::new),
            saved: new_rp.locals.clone(),
            slots: new_rp.slots.clone(),
        };
        recipe.check_saved(old_rp).map_err(fail)?;
        Ok(recipe)
    }

    /// The new resume point matching `old_rp`: same kind, same callee (by
    /// name, or signature for indirect calls), same ordinal, and as many
    /// points of that kind and callee in both versions (so the ordinal
    /// means the same place).
    fn find_point<'m>(
        &self,
        old_fn: &FunctionMeta,
        old_rp: &ResumePoint,
        new_fn: &'m FunctionMeta,
    ) -> Result<(u32, &'m ResumePoint), String> {
        let same_kind = |rp: &ResumePoint| rp.kind == old_rp.kind && self.same_callee(old_rp, rp);
        let old_count = old_fn.resume_points.iter().filter(|rp| rp.kind == old_rp.kind && rp.callee == old_rp.callee).count();
        let candidates: Vec<(usize, &ResumePoint)> =
            new_fn.resume_points.iter().enumerate().filter(|(_, rp)| same_kind(rp)).collect();
        if candidates.len() != old_count {
            return Err(format!(
                "the function has {} such points in the old version and {} in the new one",
                old_count,
                candidates.len()
            ));
        }
        candidates
            .into_iter()
            .find(|(_, rp)| rp.ordinal == old_rp.ordinal)
            .map(|(i, rp)| (i as u32, rp))
            .ok_or_else(|| "the new version has no such point".to_string())
    }

    /// The new resume point at the old point's partner in the paired code
    /// of a changed function, if it is one of the same kind and callee:
    /// found by where it is in the code, so a call or a loop added earlier
    /// in the function does not shift it.
    fn paired_point<'m>(
        &self,
        codes: &Codes<'_>,
        old_fn: &FunctionMeta,
        old_rp: &ResumePoint,
        new_fn: &'m FunctionMeta,
    ) -> Option<(u32, &'m ResumePoint)> {
        let (_, old_meta) = self.old;
        let (_, new_meta) = self.new;
        if old_rp.kind == ResumeKind::Entry {
            return None;
        }
        let paired = self.paired(codes, old_fn.index)?;
        let new_func = *self.functions.old_to_new.get(&old_fn.index)?;
        let old_at = codes.old.code(old_fn.index)?.body.index_of(old_rp.offset.wrapping_sub(old_meta.code_section))?;
        let new_at = *paired.pairs.partner.get(&old_at)?;
        let offset = codes.new.code(new_func)?.body.instrs.get(new_at)?.offset + new_meta.code_section;
        new_fn
            .resume_points
            .iter()
            .enumerate()
            .find(|(_, rp)| rp.offset == offset && rp.kind == old_rp.kind && self.same_callee(old_rp, rp))
            .map(|(i, rp)| (i as u32, rp))
    }

    fn same_callee(&self, old_rp: &ResumePoint, new_rp: &ResumePoint) -> bool {
        let (old, _) = self.old;
        let (new, _) = self.new;
        match old_rp.kind {
            ResumeKind::Call | ResumeKind::BlockingCall => self.functions.old_to_new.get(&old_rp.callee) == Some(&new_rp.callee),
            ResumeKind::CallIndirect => old.info.types.get(old_rp.callee as usize) == new.info.types.get(new_rp.callee as usize),
            ResumeKind::Loop => match (old_rp.callee, new_rp.callee) {
                (u32::MAX, u32::MAX) => true,
                (a, b) => old.info.types.get(a as usize).is_some() && old.info.types.get(a as usize) == new.info.types.get(b as usize),
            },
            ResumeKind::Entry => true,
            ResumeKind::AtomicWait => old_rp.callee == new_rp.callee,
        }
    }

    /// Builds the locals of a changed function's frame from DWARF.
    fn changed_locals(
        &self,
        pair: &ChangedPair,
        old_rp: &ResumePoint,
        old_fn: &FunctionMeta,
        new_rp: &ResumePoint,
        new_fn: &FunctionMeta,
        codes: &Codes<'_>,
    ) -> Result<(Vec<Source>, Option<Relayout>), String> {
        let (old, old_meta) = self.old;
        let (new, new_meta) = self.new;
        let mut locals: Vec<Source> = vec![Source::Fresh; new_fn.locals.len()];
        let (old_params, new_params) = (param_count(old, old_fn.index), param_count(new, new_fn.index));

        if old_rp.kind == ResumeKind::Entry {
            // The function starts over: only its parameters matter.
            if old_params != new_params || old_fn.locals[..old_params] != new_fn.locals[..new_params] {
                return Err("its parameters changed".into());
            }
            for (i, slot) in locals.iter_mut().enumerate().take(new_params) {
                *slot = Source::Old(i as u32);
            }
            return Ok((locals, None));
        }

        let old_pc = old_rp.offset.wrapping_sub(old_meta.code_section);
        let new_pc = new_rp.offset.wrapping_sub(new_meta.code_section);
        let old_vars: HashMap<VarKey, VarAt> = old.debug.variables_at(old_pc).into_iter().map(|v| (v.key.clone(), v)).collect();
        let new_vars = new.debug.variables_at(new_pc);
        let moved = new_vars.iter().any(|v| match (v.location, old_vars.get(&v.key).map(|o| o.location)) {
            (Location::FrameOffset(a), Some(Location::FrameOffset(b))) => a != b,
            _ => false,
        });
        // A frame whose area in linear memory changed is rebuilt where it
        // stands; its locals that the new code computes from the stack
        // pointer are computed again from the entry one.
        let (relayout, stack_sources) = match pair.frame_sizes.0 != pair.frame_sizes.1 || moved {
            true => {
                let (r, s) = self.relayout(codes, (old_fn.index, old_pc, &old_vars), (new_fn, new_pc, &new_vars)).map_err(|why| {
                    format!(
                        "its frame in linear memory changed ({} to {} bytes) and cannot be rebuilt: {why}",
                        pair.frame_sizes.0.unwrap_or(0),
                        pair.frame_sizes.1.unwrap_or(0)
                    )
                })?;
                (Some(r), s)
            }
            false => (None, HashMap::new()),
        };

        let live = pair
            .live
            .as_ref()
            .map_err(Clone::clone)?
            .get(&new_pc)
            .ok_or("the new code has no instruction at the resume point")?;
        // Every local needs a verdict: one the analysis did not cover would
        // otherwise be zeroed without anyone knowing whether it is read.
        if live.len() != new_fn.locals.len() {
            return Err(format!(
                "liveness covers {} locals but the new function has {}",
                live.len(),
                new_fn.locals.len()
            ));
        }
        let frame_base = |v: &Version, pc: u32| match v.debug.function_at(pc).and_then(|f| f.frame_base) {
            Some(Location::Local(l)) => Some(l),
            _ => None,
        };
        let (old_base, new_base) = (frame_base(old, old_pc), frame_base(new, new_pc));

        let prefix = pair.common_prefix(old_pc, new_pc).filter(|_| self.identical_code_rule);
        let new_code = codes.new.code(new_fn.index);
        let new_constant = |local: u32| {
            let body = &new_code.as_ref()?.body;
            body.constant_at(local, body.index_of(new_pc)?)
        };
        // Computed only for the frames the rules above leave a local of.
        let same = std::cell::OnceCell::new();
        let same = || same.get_or_init(|| self.same_values(codes, old_fn.index, (old_rp, old_pc), (new_rp, new_pc)));
        if prefix.is_none() && !old_rp.operands.is_empty() {
            same().as_ref().map_err(Clone::clone)?;
        }
        for (local, is_live) in live.iter().enumerate() {
            let local = local as u32;
            if let Some(&k) = stack_sources.get(&local) {
                locals[local as usize] = Source::Stack(k);
                continue;
            }
            let source = dwarf_source((old, &old_vars), (new, &new_vars), local)
                .or_else(|| (new_base == Some(local)).then_some(old_base).flatten())
                .or_else(|| {
                    let same_type = old_fn.locals.get(local as usize) == new_fn.locals.get(local as usize);
                    prefix.as_ref().filter(|p| same_type && p.keeps(local)).map(|_| local)
                })
                .or_else(|| is_live.then(|| same().as_ref().ok().and_then(|m| m.get(&local).copied())).flatten())
                .or_else(|| {
                    // A parameter neither version ever assigns still holds
                    // the argument the caller passed.
                    let param = (local as usize) < new_params && (local as usize) < old_params;
                    let same_type = old_fn.locals.get(local as usize) == new_fn.locals.get(local as usize);
                    (param && same_type && !pair.assigned(local)).then_some(local)
                });
            let typed = source.filter(|j| old_fn.locals.get(*j as usize) == Some(&new_fn.locals[local as usize]));
            // A live local the new code holds the same constant in on every
            // path to the point is given that constant: exactly what the
            // new code would hold there.
            let constant = || is_live.then(|| new_constant(local)).flatten();
            match typed {
                Some(j) => locals[local as usize] = Source::Old(j),
                _ if !is_live => locals[local as usize] = Source::Dead,
                None if constant().is_some() => locals[local as usize] = Source::Const(constant().unwrap_or_default()),
                _ => {
                    let what = describe_local(&new_vars, local);
                    let at = |body: Option<Rc<crate::retreat::Code>>, pc: u32| body.and_then(|c| c.body.index_of(pc));
                    let why = match (at(codes.old.code(old_fn.index), old_pc), at(codes.new.code(new_fn.index), new_pc)) {
                        (Some(old_at), Some(new_at)) => {
                            self.why_unpaired(codes, old_fn.index, (old_at, new_at), old_rp.kind == ResumeKind::Loop, local)
                        }
                        _ => String::new(),
                    };
                    return Err(format!("local {local} ({what}) is live there and has no counterpart in the old frame{why}"));
                }
            }
        }
        Ok((locals, relayout))
    }

    /// How the frame of changed function `old_func` at code offset
    /// `old_pc` is rebuilt at the new version's point `new_pc` when its area
    /// in linear memory changed ([`crate::rebuild`]), and the new locals the
    /// new code computes from the stack pointer there (entry-relative).
    fn relayout(
        &self,
        codes: &Codes<'_>,
        (old_func, old_pc, old_vars): (u32, u32, &HashMap<VarKey, VarAt>),
        (new_fn, new_pc, new_vars): (&FunctionMeta, u32, &[VarAt]),
    ) -> Result<(Relayout, HashMap<u32, i64>), String> {
        let (old, _) = self.old;
        let (new, _) = self.new;
        let old_body = &codes.old.code(old_func).ok_or("its code cannot be analysed")?.body;
        let new_body = &codes.new.code(new_fn.index).ok_or("its new code cannot be analysed")?.body;
        let old_at = old_body.index_of(old_pc).ok_or("its point is not an instruction")?;
        let new_at = new_body.index_of(new_pc).ok_or("the new point is not an instruction")?;
        let stack = |body: &crate::symbolic::Body, at: usize| match body.instrs[at].sp {
            Sym::Sp(k) => Ok(k),
            _ => Err("the stack pointer at the point is not known"),
        };
        let stack_at_point = (stack(old_body, old_at)?, stack(new_body, new_at)?);
        let entry = crate::retreat::entry_stack_pointer(old_body, old_at)?;
        let old_base = frame_base_offset(old, old_body, old_pc, old_at, stack_at_point.0).ok_or("its old frame base is not known")?;
        let new_base = frame_base_offset(new, new_body, new_pc, new_at, stack_at_point.1).ok_or("its new frame base is not known")?;
        let mut moves = Vec::new();
        let mut new_pointer_slots = Vec::new();
        for v in new_vars {
            let Location::FrameOffset(to) = v.location else { continue };
            let from = old_vars.get(&v.key).and_then(|o| match o.location {
                Location::FrameOffset(from) if same_type(&old.debug, o.ty, &new.debug, v.ty) => Some(from),
                _ => None,
            });
            let Some(from) = from else {
                return Err(format!(
                    "variable `{}` is in scope at the point and the old frame has no counterpart for it: its value there is unknown",
                    v.key
                ));
            };
            let len = new.debug.size_of(v.ty).ok_or_else(|| format!("the size of variable `{}` is unknown", v.key))?;
            let slots = pointer_offsets(&new.debug, v.ty, crate::rebuild::SLOT_LIMIT);
            if crate::rebuild::too_many(&slots) {
                return Err(format!("variable `{}` holds too many pointers to follow", v.key));
            }
            let to = new_base + to;
            new_pointer_slots.extend(slots.into_iter().map(|s| (to + s as i64, format!("`{}`", v.key.name))));
            moves.push((Move { from: old_base + from, to, len }, v.key.name.clone()));
        }
        let mut old_pointers = frame_address_locals(old_body);
        old_pointers.extend(dwarf_pointer_locals(old, old_pc));
        let stack_sources = (0..new_fn.locals.len() as u32)
            .filter(|&l| new_fn.locals[l as usize] == ValType::I32)
            .filter_map(|l| match new_body.value_at(l, new_at) {
                Some(Sym::Sp(k)) => Some((l, k)),
                _ => None,
            })
            .collect();
        Ok((Relayout { entry, stack_at_point, moves, old_pointers, new_pointer_slots }, stack_sources))
    }
}

impl FrameMapper<'_> {
    /// At a resume point of changed function `old_func` and its partner in
    /// the new version: new local -> old local holding a value computed the
    /// same way ([`crate::equivalence`] pairs the instructions, the walks
    /// follow what differs), or why the point has no such correspondence.
    /// The point's saved operands must correspond too, one by one: they are
    /// copied as they are.
    fn same_values(
        &self,
        codes: &Codes<'_>,
        old_func: u32,
        (old_rp, old_pc): (&ResumePoint, u32),
        (new_rp, new_pc): (&ResumePoint, u32),
    ) -> Result<HashMap<u32, u32>, String> {
        let paired = self.paired(codes, old_func).ok_or("its code cannot be compared with the new version's")?;
        let PairedCode { pairs, walks: Some((o, n)) } = &*paired else {
            return Err("the two versions' code does not settle into a correspondence".into());
        };
        let (old_at, new_at) = (o.index_of(old_pc), n.index_of(new_pc));
        let (Some(old_at), Some(new_at)) = (old_at, new_at) else {
            return Err("the resume point is not an instruction of the analysed code".into());
        };
        if pairs.partner.get(&old_at) != Some(&new_at) {
            return Err("the new code's point is not the old one's counterpart".into());
        }
        let corresponds = |(a_differs, a): (bool, Origin), (b_differs, b): (bool, Origin)| {
            !a_differs
                && !b_differs
                && match (a, b) {
                    (Origin::Instr(x), Origin::Instr(y)) => pairs.partner.get(&x) == Some(&y),
                    (Origin::Local(x), Origin::Local(y)) => pairs.locals.get(&x) == Some(&y),
                    _ => false,
                }
        };
        let (old_differs, new_differs) = match old_rp.kind {
            ResumeKind::Loop => {
                if !old_rp.operands.is_empty() {
                    return Err("values wait on the operand stack at the loop header".into());
                }
                (o.differs_at_header(old_at), n.differs_at_header(new_at))
            }
            _ => {
                let (Some(a), Some(b)) = (o.at_call(old_at), n.at_call(new_at)) else {
                    return Err("the walk does not reach the call".into());
                };
                // Only the values below the call's arguments wait for the
                // frame: the arguments (and an indirect call's table
                // index) belong to the call in progress, made with the old
                // code's values, and made again with them if it must be.
                let waiting = |v: &Version, stack: &[(bool, Origin)], rp: &ResumePoint| {
                    let taken = match rp.kind {
                        ResumeKind::CallIndirect => v.info.types.get(rp.callee as usize)?.params.len() + 1,
                        ResumeKind::BlockingCall => {
                            let f = v.info.functions.get(rp.callee as usize)?;
                            v.info.types.get(f.ty as usize)?.params.len()
                        }
                        // The address, the expected value and the timeout.
                        ResumeKind::AtomicWait => 3,
                        _ => 0,
                    };
                    stack.get(..rp.operands.len().checked_sub(taken)?).map(<[_]>::to_vec)
                };
                let (old, _) = self.old;
                let (new, _) = self.new;
                match (waiting(old, &a.stack, old_rp), waiting(new, &b.stack, new_rp)) {
                    (Some(x), Some(y)) if x.iter().zip(&y).all(|(p, q)| corresponds(*p, *q)) => {}
                    _ => return Err("the values waiting on the operand stack there may differ between the versions".into()),
                }
                (Some(a.locals.as_slice()), Some(b.locals.as_slice()))
            }
        };
        let (Some(x), Some(y)) = (old_differs, new_differs) else {
            return Err("the walk does not reach the point".into());
        };
        Ok(pairs
            .locals
            .iter()
            .filter(|(a, b)| x.get(**a as usize) == Some(&false) && y.get(**b as usize) == Some(&false))
            .map(|(a, b)| (*b, *a))
            .collect())
    }
}

impl FrameMapper<'_> {
    /// Why new local `local` of changed function `old_func` holds no value
    /// the old frame holds too, at a point (a loop header, or a call) at
    /// instructions `old_at` and `new_at` of the two versions: said as the
    /// end of a refusal, empty if the comparison tells nothing.
    fn why_unpaired(&self, codes: &Codes<'_>, old_func: u32, (old_at, new_at): (usize, usize), header: bool, local: u32) -> String {
        let Some(paired) = self.paired(codes, old_func) else { return String::new() };
        let PairedCode { pairs, walks: Some((o, n)) } = &*paired else { return String::new() };
        let differs = |body: &crate::symbolic::Body, at: usize| match header {
            true => body.differs_at_header(at).map(<[bool]>::to_vec),
            false => body.at_call(at).map(|c| c.locals.clone()),
        };
        let (old_differs, new_differs) = (differs(o, old_at), differs(n, new_at));
        let Some((&old_local, _)) = pairs.locals.iter().find(|(_, b)| **b == local) else {
            return ": no local of the old version is written by the same code".into();
        };
        if new_differs.is_some_and(|d| d.get(local as usize) == Some(&true)) {
            format!(
                ": the new version computes it otherwise than the old one computed local {old_local} (code only the new version has writes it, or writes it from other values)"
            )
        } else if old_differs.is_some_and(|d| d.get(old_local as usize) == Some(&true)) {
            format!(": the old version computed its counterpart, local {old_local}, with code the new version does not have")
        } else {
            String::new()
        }
    }
}

/// Two versions of a function whose code is identical up to a resume point.
struct CommonPrefix {
    /// Locals written after the prefix in either version.
    written_after: std::collections::HashSet<u32>,
}

impl CommonPrefix {
    /// Whether `local`'s value at the resume point means the same in both.
    fn keeps(&self, local: u32) -> bool {
        !self.written_after.contains(&local)
    }
}

/// A changed function and its new version, analysed once for all of its
/// resume points.
struct ChangedPair {
    /// The old version's instructions, `None` if they cannot be read.
    old: Option<FunctionCode>,
    /// The new version's.
    new: Option<FunctionCode>,
    /// How many bytes of instructions the two have in common from the start.
    common: Option<u32>,
    /// Shadow-stack frame sizes, old and new.
    frame_sizes: (Option<u32>, Option<u32>),
    /// Live locals of the new version at each of its resume points, by code
    /// offset.
    live: Result<HashMap<u32, Vec<bool>>, String>,
}

impl ChangedPair {
    /// Whether either version ever writes `local` (unknown counts as yes).
    fn assigned(&self, local: u32) -> bool {
        [&self.old, &self.new]
            .iter()
            .any(|code| code.as_ref().is_none_or(|c| c.writes.iter().any(|(l, _)| *l == local)))
    }

    /// The common prefix of the two bodies at a resume point (code offsets
    /// in each version), if their instructions up to and including it are
    /// identical (references compared by name).
    fn common_prefix(&self, old_pc: u32, new_pc: u32) -> Option<CommonPrefix> {
        let (old, new) = (self.old.as_ref()?, self.new.as_ref()?);
        let len = old_pc.checked_sub(old.start)?;
        if new_pc.checked_sub(new.start)? != len {
            return None;
        }
        let common = self.common?;
        // Through the resume point's instruction itself: up to 6 bytes (an
        // opcode and a padded index) covers every kind of point.
        if len + 6 > common {
            return None;
        }
        // Values reach the point from the identical code before it, or
        // around a loop that contains it. A loop that stays within the
        // identical code computes the same in both; one that reaches changed
        // code may carry changed values back: every local it writes after
        // the point is suspect.
        let mut written_after = std::collections::HashSet::new();
        for code in [old, new] {
            let escaping: Vec<_> = code.loops.iter().filter(|l| l.start <= len && len < l.end && l.end >= common).collect();
            for &(local, offset) in &code.writes {
                if offset > len && escaping.iter().any(|l| l.contains(&offset)) {
                    written_after.insert(local);
                }
            }
        }
        Some(CommonPrefix { written_after })
    }
}

/// How many bytes of the two functions' instructions are identical, with
/// every relocated field read as what it names.
fn common_code_len(old: &Version, old_func: u32, new: &Version, new_func: u32) -> Option<u32> {
    let a = crate::body::code_fields(&old.info, &old.wasm, old_func).ok()?;
    let b = crate::body::code_fields(&new.info, &new.wasm, new_func).ok()?;
    let common = a.bytes.iter().zip(&b.bytes).take_while(|(x, y)| x == y).count() as u32;
    // The relocated fields are blank in the bytes: the first one whose
    // target differs, or that only one version has, ends the common code.
    let first_difference = (0..a.fields.len().max(b.fields.len())).find_map(|i| match (a.fields.get(i), b.fields.get(i)) {
        (Some((x, rx)), Some((y, ry))) if rx != ry || x != y => Some(*x.min(y)),
        (Some((at, _)), None) | (None, Some((at, _))) => Some(*at),
        _ => None,
    });
    Some(first_difference.map_or(common, |at| common.min(at)))
}

/// Where a function's instructions start, where it writes its locals and
/// where its loops are; offsets relative to its first instruction.
struct FunctionCode {
    /// Code offset of the first instruction.
    start: u32,
    /// Every `local.set` and `local.tee`: (local, offset).
    writes: Vec<(u32, u32)>,
    /// The extent of every loop.
    loops: Vec<std::ops::Range<u32>>,
}

impl FunctionCode {
    fn read(version: &Version, func: u32) -> Option<FunctionCode> {
        let body = version.info.functions.get(func as usize)?.body.clone()?;
        let base = version.info.code_section as usize;
        let bytes = version.wasm.get(base + body.start as usize..base + body.end as usize)?;
        let reader = wasmparser::FunctionBody::new(wasmparser::BinaryReader::new(bytes, 0));
        let mut ops = reader.get_operators_reader().ok()?;
        let skip = ops.original_position() as u32;
        let mut writes = Vec::new();
        let mut loops = Vec::new();
        // Open blocks: the start of each, and whether it is a loop.
        let mut open: Vec<(u32, bool)> = Vec::new();
        while !ops.eof() {
            let (op, offset) = ops.read_with_offset().ok()?;
            let offset = offset as u32 - skip;
            match op {
                wasmparser::Operator::LocalSet { local_index } | wasmparser::Operator::LocalTee { local_index } => {
                    writes.push((local_index, offset))
                }
                wasmparser::Operator::Block { .. } | wasmparser::Operator::If { .. } => open.push((offset, false)),
                wasmparser::Operator::Loop { .. } => open.push((offset, true)),
                wasmparser::Operator::End => {
                    if let Some((start, true)) = open.pop() {
                        loops.push(start..offset);
                    }
                }
                _ => {}
            }
        }
        Some(FunctionCode { start: body.start + skip, writes, loops })
    }
}

/// The code of both versions, analysed on demand and kept for every point
/// that asks again.
struct Codes<'v> {
    old: Analyser<'v>,
    new: Analyser<'v>,
    /// Changed functions paired and walked, by old function index.
    paired: RefCell<HashMap<u32, Option<Rc<PairedCode>>>>,
}

/// A changed function's two versions, their instructions paired
/// ([`crate::equivalence`]) and walked for what differs.
struct PairedCode {
    pairs: crate::equivalence::Alignment,
    walks: Option<(crate::symbolic::Body, crate::symbolic::Body)>,
}

/// Walks both versions of a function following where their values differ
/// ([`crate::symbolic`]), until every paired instruction that is not marked
/// as differing works on corresponding values: operands produced by paired
/// instructions, or held by locals the renaming pairs where definitions
/// meet. An instruction whose operands do not correspond (the new code adds
/// `b` where the old one added `a`) differs, and the walks run again.
fn walk_paired(
    (old, old_func, old_body): (&Version, u32, &crate::symbolic::Body),
    (new, new_func, new_body): (&Version, u32, &crate::symbolic::Body),
    pairs: &mut crate::equivalence::Alignment,
) -> (Option<crate::symbolic::Body>, Option<crate::symbolic::Body>) {
    use crate::symbolic::{Body, Origin};
    const ROUNDS: usize = 8;
    // Locals the renaming leaves out and each version writes once.
    let transparent = |body: &Body, renamed: &dyn Fn(u32) -> bool| -> std::collections::HashSet<u32> {
        let mut defs: HashMap<u32, usize> = HashMap::new();
        for instr in &body.instrs {
            if let Some((l, _)) = instr.def {
                *defs.entry(l).or_default() += 1;
            }
        }
        defs.into_iter().filter(|(l, n)| *n == 1 && !renamed(*l) && *l >= body.params).map(|(l, _)| l).collect()
    };
    let old_moves = transparent(old_body, &|l| pairs.locals.contains_key(&l));
    let new_moves = transparent(new_body, &|l| pairs.locals.values().any(|v| *v == l));
    for _ in 0..ROUNDS {
        let (Some(o), Some(n)) = (
            Body::compare(old, old_func, &pairs.old_differs, &old_moves, !pairs.same_frame_layout),
            Body::compare(new, new_func, &pairs.new_differs, &new_moves, !pairs.same_frame_layout),
        ) else {
            return (None, None);
        };
        let corresponds = |a: &Origin, b: &Origin| match (a, b) {
            (Origin::Instr(x), Origin::Instr(y)) => pairs.partner.get(x) == Some(y),
            (Origin::Local(x), Origin::Local(y)) => pairs.locals.get(x) == Some(y),
            (Origin::Unknown, Origin::Unknown) => true,
            _ => false,
        };
        let mismatched: Vec<(usize, usize)> = pairs
            .partner
            .iter()
            .filter(|(i, _)| !pairs.old_differs[**i])
            .filter(|(i, j)| {
                let (a, b) = (&o.instrs[**i].operands, &n.instrs[**j].operands);
                a.len() != b.len() || !a.iter().zip(b).all(|(x, y)| corresponds(x, y))
            })
            .map(|(i, j)| (*i, *j))
            .collect();
        if mismatched.is_empty() {
            return (Some(o), Some(n));
        }
        for (i, j) in mismatched {
            pairs.old_differs[i] = true;
            pairs.new_differs[j] = true;
        }
    }
    (None, None)
}

/// The old local where DWARF places the variable that the new DWARF places
/// in new local `local` (same scope path, name and type, or pointers to a
/// struct or union of the same tag whose layout changed).
fn dwarf_source(
    (old, old_vars): (&Version, &HashMap<VarKey, VarAt>),
    (new, new_vars): (&Version, &[VarAt]),
    local: u32,
) -> Option<u32> {
    new_vars.iter().filter(|v| v.location == Location::Local(local)).find_map(|v| {
        let o = old_vars.get(&v.key)?;
        let carried = same_type(&old.debug, o.ty, &new.debug, v.ty) || pointers_to_a_changed_aggregate((old, o.ty), (new, v.ty));
        match o.location {
            Location::Local(j) if carried => Some(j),
            _ => None,
        }
    })
}

/// Whether `old` and `new` are pointers to a struct (or union) of the same
/// tag, defined in both: the pointer's value carries over as it is, and if
/// it points at an object the update converts, the heap conversion
/// rewrites it to the new copy ([`crate::heap::frame_pointers`], which
/// refuses what it cannot rewrite). A function that allocates such an
/// object changes code with its size, so without this rule the frame that
/// holds it could not move.
fn pointers_to_a_changed_aggregate((old, ot): (&Version, crate::dwarf::TypeId), (new, nt): (&Version, crate::dwarf::TypeId)) -> bool {
    use crate::dwarf::Type;
    let (Type::Pointer { to: Some(op) }, Type::Pointer { to: Some(np) }) = (old.debug.ty(ot), new.debug.ty(nt)) else { return false };
    match (old.debug.ty(*op), new.debug.ty(*np)) {
        (Type::Struct { name: Some(a), size: s1, .. }, Type::Struct { name: Some(b), size: s2, .. })
        | (Type::Union { name: Some(a), size: s1, .. }, Type::Union { name: Some(b), size: s2, .. }) => a == b && *s1 > 0 && *s2 > 0,
        _ => false,
    }
}

/// A local for people: the variables DWARF places in it, or "a compiler
/// temporary".
fn describe_local(vars: &[VarAt], local: u32) -> String {
    let named: Vec<String> =
        vars.iter().filter(|v| v.location == Location::Local(local)).map(|v| format!("`{}`", v.key.name)).collect();
    if named.is_empty() {
        "a compiler temporary".to_string()
    } else {
        named.join(", ")
    }
}

/// How many parameters function `func` of `version` takes.
fn param_count(version: &Version, func: u32) -> usize {
    version.info.types[version.info.functions[func as usize].ty as usize].params.len()
}

/// The variables DWARF places at the loop header at instruction `at`.
/// clang's location ranges often start just after the `loop` instruction,
/// which itself does nothing: a variable placed in a local a few
/// instructions on, before anything writes that local or branches, is in
/// that local at the header too.
fn vars_at_header(version: &Version, body: &crate::symbolic::Body, at: usize) -> Vec<VarAt> {
    const LOOKAHEAD: usize = 8;
    let mut found: Vec<VarAt> = version.debug.variables_at(body.instrs[at].offset);
    let mut written = std::collections::HashSet::new();
    for instr in body.instrs.iter().skip(at + 1).take(LOOKAHEAD) {
        for v in version.debug.variables_at(instr.offset) {
            let fresh = !found.iter().any(|f| f.key == v.key);
            let valid = match v.location {
                Location::Local(l) => !written.contains(&l),
                Location::FrameOffset(_) => true,
                _ => false,
            };
            if fresh && valid {
                found.push(v);
            }
        }
        if let Some((l, _)) = instr.def {
            written.insert(l);
        }
        if !matches!(instr.access, crate::symbolic::Access::None | crate::symbolic::Access::FrameLoad(_)) || instr.is_control {
            break;
        }
    }
    found
}

/// The new frame from `recipe` and the old `frame`; `entry` is the old
/// frame's entry stack pointer, which retreat recipes need.
fn build(recipe: &Recipe, frame: &TypedFrame, entry: Option<u32>) -> Result<TypedFrame, Unmappable> {
    let fail = |reason: String| Unmappable { function: format!("func[{}]", frame.func), point: format!("#{}", frame.resume_point), reason };
    let mut locals = vec![None; recipe.types.len()];
    for &local in &recipe.saved {
        let (Some(source), Some(ty)) = (recipe.locals.get(local as usize), recipe.types.get(local as usize)) else {
            return Err(fail(format!("the recipe has no source for local {local}, which the new frame saves")));
        };
        let value = match source {
            // A frame that does not match its metadata, or lacks a local
            // it did not save, must not be patched up with zeros the new
            // code would read.
            Source::Old(j) => frame
                .locals
                .get(*j as usize)
                .copied()
                .flatten()
                .filter(|v| v.ty() == *ty)
                .ok_or_else(|| fail(format!("the saved frame has no {ty:?} local {j}, which the recipe reads"))),
            Source::Dead | Source::Fresh => Ok(Value::from_slot(*ty, 0)),
            Source::Stack(k) => match (entry, ty) {
                (Some(sp), ValType::I32) => Ok(Value::I32((i64::from(sp) + k) as i32)),
                _ => Err(fail("the recipe needs the frame's entry stack pointer".into())),
            },
            Source::Const(c) => Ok(Value::from_slot(*ty, *c as u64)),
        }?;
        locals[local as usize] = Some(value);
    }
    let operands = if entry.is_some() { Vec::new() } else { frame.operands.clone() };
    Ok(TypedFrame { func: recipe.func, resume_point: recipe.resume_point, locals, slots: recipe.slots.clone(), operands })
}

fn unknown_point(frame: &TypedFrame) -> Unmappable {
    Unmappable {
        function: format!("func[{}]", frame.func),
        point: format!("#{}", frame.resume_point),
        reason: "the frame names a resume point the running version's metadata does not have".into(),
    }
}

/// The entry stack pointer of `frame`, by `rule`; `at_point` is the stack
/// pointer at the frame's point (its callee's entry one).
pub(crate) fn entry_stack_pointer(rule: EntryStackPointer, frame: &TypedFrame, at_point: u32) -> Result<u32, String> {
    match rule {
        EntryStackPointer::AtPoint => Ok(at_point),
        EntryStackPointer::Local { local, offset } => match frame.locals.get(local as usize) {
            Some(Some(Value::I32(v))) => Ok((i64::from(*v as u32) - offset) as u32),
            _ => Err(format!("its frame lacks local {local}, which holds its stack pointer")),
        },
    }
}

/// The lowest address the shadow stack may reach in `version`'s layout:
/// wasm-ld's `__stack_low`, else the end of the data (`__data_end`).
fn stack_low(version: &Version) -> Option<u32> {
    ["__stack_low", "__data_end"].iter().find_map(|name| {
        let i = version.info.symbols.iter().position(|s| s.name.as_deref() == Some(*name))?;
        version.layout.data.get(&(i as u32)).copied().or(version.info.symbols[i].data().map(|d| d.address))
    })
}

/// A resume point described for people: "call to poll #0", "loop #2".
pub fn describe(version: &Version, rp: &ResumePoint) -> String {
    match rp.kind {
        ResumeKind::Loop => format!("loop #{}", rp.ordinal),
        ResumeKind::Call | ResumeKind::BlockingCall => {
            format!("call to {} #{}", version.info.function_name(rp.callee), rp.ordinal)
        }
        ResumeKind::CallIndirect => format!("indirect call #{}", rp.ordinal),
        ResumeKind::Entry => "entry".into(),
        ResumeKind::AtomicWait => format!("wait{} #{}", rp.callee, rp.ordinal),
    }
}

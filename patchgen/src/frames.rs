//! Moving the frames of active functions to the new version.
//!
//! A frame is saved at a resume point, which the instrumenter describes by
//! kind, callee and ordinal ("the 2nd call to `poll` in `main`"). The frame
//! moves to the resume point with the same description in the new version
//! of its function (callees compared by name, `call_indirect` by
//! signature). Then its values:
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
//!   - the same parameter, when neither version ever assigns it: it still
//!     holds the caller's argument.
//!
//!   Saved operands copy only when the two points save the same types. A
//!   function whose frame in linear memory changed size, or whose variables
//!   moved within it, cannot be moved while it is active.
//!
//! Anything else is [`Unmappable`]: the updater waits for that frame to leave
//! the stack, or refuses. All of this is decided before the pause, for
//! every resume point at once ([`FrameMapper::plan`]); the pause only copies
//! slots ([`FramePlan::map`]).

use std::collections::HashMap;

use upstare_instrument::abi::{FunctionMeta, Metadata, ResumeKind, ResumePoint, TypedFrame, ValType, Value};

use crate::body::shadow_frame_size;
use crate::diff::FunctionMatch;
use crate::dwarf::{same_type, Location, VarAt, VarKey};
use crate::liveness::live_at_many;
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
}

/// Recipes for every resume point of the running version, by (function,
/// resume point index), each one a recipe or the reason there is none.
#[derive(Debug, Clone, Default)]
pub struct FramePlan {
    recipes: HashMap<(u32, u32), Result<Recipe, Unmappable>>,
}

impl FramePlan {
    /// The frame `frame` of the old version, as a frame of the new one.
    pub fn map(&self, frame: &TypedFrame) -> Result<TypedFrame, Unmappable> {
        let recipe = match self.recipes.get(&(frame.func, frame.resume_point)) {
            Some(Ok(r)) => r,
            Some(Err(e)) => return Err(e.clone()),
            None => {
                return Err(Unmappable {
                    function: format!("func[{}]", frame.func),
                    point: format!("#{}", frame.resume_point),
                    reason: "the frame names a resume point the running version's metadata does not have".into(),
                })
            }
        };
        let locals = recipe
            .locals
            .iter()
            .zip(&recipe.types)
            .map(|(source, ty)| match source {
                // A frame that does not match its metadata must not be
                // patched up with zeros the new code would read.
                Source::Old(j) => frame.locals.get(*j as usize).copied().filter(|v| v.ty() == *ty).ok_or_else(|| {
                    Unmappable {
                        function: format!("func[{}]", frame.func),
                        point: format!("#{}", frame.resume_point),
                        reason: format!("the saved frame has no {ty:?} local {j}, which the recipe reads"),
                    }
                }),
                Source::Dead | Source::Fresh => Ok(Value::from_slot(*ty, 0)),
            })
            .collect::<Result<_, _>>()?;
        Ok(TypedFrame { func: recipe.func, resume_point: recipe.resume_point, locals, operands: frame.operands.clone() })
    }

    /// The recipe for frames of old function `func` saved at its resume
    /// point `resume_point`, or why there is none; `None` if the running
    /// version has no such point.
    pub fn recipe(&self, func: u32, resume_point: u32) -> Option<&Result<Recipe, Unmappable>> {
        self.recipes.get(&(func, resume_point))
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
        let (_, old_meta) = self.old;
        let mut recipes = HashMap::new();
        for f in &old_meta.functions {
            // What every resume point of a changed function needs is
            // analysed once for the function, not once per point.
            let pair = self.changed_pair(f.index);
            for rp in 0..f.resume_points.len() as u32 {
                recipes.insert((f.index, rp), self.recipe(f.index, rp, pair.as_ref()));
            }
        }
        FramePlan { recipes }
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
    fn recipe(&self, func: u32, resume_point: u32, pair: Option<&ChangedPair>) -> Result<Recipe, Unmappable> {
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
        let (rp_index, new_rp) = self.find_point(old_fn, old_rp, new_fn).map_err(fail)?;
        if old_rp.operands != new_rp.operands {
            return Err(fail("the values on the operand stack there differ between the versions".into()));
        }
        let locals = match pair {
            None => {
                if new_fn.locals != old_fn.locals {
                    return Err(fail("its locals changed although its body did not".into()));
                }
                (0..old_fn.locals.len() as u32).map(Source::Old).collect()
            }
            Some(pair) => self.changed_locals(pair, old_rp, old_fn, new_rp, new_fn).map_err(fail)?,
        };
        Ok(Recipe { func: new_func, resume_point: rp_index, locals, types: new_fn.locals.clone() })
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
    ) -> Result<Vec<Source>, String> {
        let (old, old_meta) = self.old;
        let (new, new_meta) = self.new;
        let mut locals: Vec<Source> = vec![Source::Fresh; new_fn.locals.len()];
        let params = |v: &Version, f: u32| v.info.types[v.info.functions[f as usize].ty as usize].params.len();
        let (old_params, new_params) = (params(old, old_fn.index), params(new, new_fn.index));

        if old_rp.kind == ResumeKind::Entry {
            // The function starts over: only its parameters matter.
            if old_params != new_params || old_fn.locals[..old_params] != new_fn.locals[..new_params] {
                return Err("its parameters changed".into());
            }
            for (i, slot) in locals.iter_mut().enumerate().take(new_params) {
                *slot = Source::Old(i as u32);
            }
            return Ok(locals);
        }

        let (old_frame_size, new_frame_size) = pair.frame_sizes;
        if old_frame_size != new_frame_size {
            return Err(format!(
                "its frame in linear memory changed from {} to {} bytes while it is active",
                old_frame_size.unwrap_or(0),
                new_frame_size.unwrap_or(0)
            ));
        }
        let old_pc = old_rp.offset.wrapping_sub(old_meta.code_section);
        let new_pc = new_rp.offset.wrapping_sub(new_meta.code_section);
        let old_vars: HashMap<VarKey, VarAt> = old.debug.variables_at(old_pc).into_iter().map(|v| (v.key.clone(), v)).collect();
        let new_vars = new.debug.variables_at(new_pc);
        for v in &new_vars {
            if let (Location::FrameOffset(a), Some(Location::FrameOffset(b))) = (v.location, old_vars.get(&v.key).map(|o| o.location)) {
                if a != b {
                    return Err(format!("variable `{}` moved within its frame in linear memory", v.key));
                }
            }
        }

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

        let prefix = pair.common_prefix(old_pc, new_pc);
        for (local, is_live) in live.iter().enumerate() {
            let local = local as u32;
            let source = new_vars
                .iter()
                .filter(|v| v.location == Location::Local(local))
                .find_map(|v| {
                    let o = old_vars.get(&v.key)?;
                    match o.location {
                        Location::Local(j) if same_type(&old.debug, o.ty, &new.debug, v.ty) => Some(j),
                        _ => None,
                    }
                })
                .or_else(|| (new_base == Some(local)).then_some(old_base).flatten())
                .or_else(|| {
                    let same_type = old_fn.locals.get(local as usize) == new_fn.locals.get(local as usize);
                    prefix.as_ref().filter(|p| same_type && p.keeps(local)).map(|_| local)
                })
                .or_else(|| {
                    // A parameter neither version ever assigns still holds
                    // the argument the caller passed.
                    let param = (local as usize) < new_params && (local as usize) < old_params;
                    let same_type = old_fn.locals.get(local as usize) == new_fn.locals.get(local as usize);
                    (param && same_type && !pair.assigned(local)).then_some(local)
                });
            let typed = source.filter(|j| old_fn.locals.get(*j as usize) == Some(&new_fn.locals[local as usize]));
            match typed {
                Some(j) => locals[local as usize] = Source::Old(j),
                _ if !is_live => locals[local as usize] = Source::Dead,
                _ => {
                    let named: Vec<String> = new_vars
                        .iter()
                        .filter(|v| v.location == Location::Local(local))
                        .map(|v| format!("`{}`", v.key.name))
                        .collect();
                    let what = if named.is_empty() { "a compiler temporary".to_string() } else { named.join(", ") };
                    return Err(format!(
                        "local {local} ({what}) is live there and has no counterpart in the old frame"
                    ));
                }
            }
        }
        Ok(locals)
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

/// A resume point described for people: "call to poll #0", "loop #2".
pub fn describe(version: &Version, rp: &ResumePoint) -> String {
    match rp.kind {
        ResumeKind::Loop => format!("loop #{}", rp.ordinal),
        ResumeKind::Call | ResumeKind::BlockingCall => {
            format!("call to {} #{}", version.info.function_name(rp.callee), rp.ordinal)
        }
        ResumeKind::CallIndirect => format!("indirect call #{}", rp.ordinal),
        ResumeKind::Entry => "entry".into(),
    }
}

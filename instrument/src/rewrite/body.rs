//! Instruments one function body, following its [`Plan`].
//!
//! The original operators are copied byte for byte, except branches whose
//! label depth changes because of the blocks inserted around them; those are
//! re-encoded with the new depth. Insertions happen only at level starts, at
//! anchors and at the function's start and end (see the crate docs for the
//! shape of the result).
//!
//! Every operand that must survive an anchor lives in a *shadow local* while
//! the anchor runs: one local per (stack position, type). At any resume point
//! the whole operand stack below it is therefore in shadow locals, which is
//! what the unwind tail saves and the rewind prologue restores.

use std::collections::{HashMap, HashSet};

use wasm_encoder::{BlockType, Instruction as I};
use wasmparser::{BinaryReader, Operator, OperatorsReader};

use super::{ctrl, frames, Code, Cx};
use crate::abi::{control, frame, ResumeKind, State, ValType as Ty};
use crate::analysis::{Body, ModuleInfo};
use crate::error::{internal, Error, ErrorKind, Result};
use crate::plan::{AnchorKind, Plan, SaveClass};

/// More integer locals than this, or float locals than
/// [`CROWDED_FLOATS`], live at a loop header and a point inside it make
/// the loop *crowded* (see [`Emitter::reload_temporaries`]). Chosen by
/// instruction counts and samples (`docs/PERFORMANCE.md`): with a limit
/// of 10, Lua's interpreter function took 35% more samples than with 8.
const CROWDED_INTS: usize = 8;

/// The float counterpart of [`CROWDED_INTS`] (x86-64 has 16 registers
/// for floats).
const CROWDED_FLOATS: usize = 14;

/// Runs of copied original code: (offset in the output body, original
/// offset), see [`crate::abi::offsets`].
type Runs = Vec<(u32, u32)>;

/// An instrumented body: its bytes (local declarations and operators),
/// and where its copied original code sits ([`crate::abi::offsets`]).
pub(crate) struct Output {
    pub body: Vec<u8>,
    pub runs: Runs,
}

/// One open block of the output.
struct Frame {
    /// It is a block of the original code (else inserted by the rewrite).
    original: bool,
    id: u32,
    /// For an anchor construct: the anchor whose operands to restore after
    /// its `end`.
    restore: Option<usize>,
}

/// What the rewind dispatch of a level can jump to.
enum Case {
    /// The loop header itself: the rewind ends here. `resume` runs on into
    /// the loop; `check` falls into the header's pause check.
    LoopHeader { resume: u32, check: u32 },
    /// An anchor; for an `if`, which arm holds the points.
    Anchor { anchor: usize, then_arm: Option<bool> },
    /// The header of the loop that is this anchor: the rewind ends right
    /// before the `loop`, which then starts as on any other entry.
    LoopEntry { anchor: usize },
}

struct Emitter<'a> {
    cx: &'a mut Cx,
    plan: &'a Plan,
    body: &'a Body,
    func: u32,
    code: Code,
    frames: Vec<Frame>,
    next_id: u32,
    n_locals: u32,
    extra: Vec<Ty>,
    shadow: HashMap<(u32, Ty), u32>,
    fb: u32,
    /// The block the unwind tail's common end follows.
    done: u32,
    /// The save classes ([`crate::plan::SaveClass`]), the block each one's
    /// unwind code follows, and the class of each resume point.
    classes: Vec<SaveClass>,
    class_block: Vec<u32>,
    class_of_rp: Vec<u32>,
    /// Synthetic block closed right before each anchor.
    anchor_block: HashMap<usize, u32>,
    /// First anchors of deferring levels: they start where their level does,
    /// so they get no block.
    no_block: HashSet<usize>,
    /// Levels whose rewind dispatch waits for the next level to open,
    /// outermost first (see [`crate::plan::Level::defer`]).
    deferred: Vec<usize>,
    originals_open: u32,
    /// Where copied original code sits: (offset in `code`, original offset),
    /// one entry per contiguous run.
    runs: Vec<(u32, u32)>,
    /// Emitting the *normal copy* of the body ([`copies_body`]): no rewind
    /// reaches it, so it has no rewind tests, anchor blocks or dispatch.
    normal: bool,
}

/// Whether the body is emitted twice: `if rewinding { body with its rewind
/// dispatch } else { body without it }`. An activation entered in the
/// normal state never sees a rewind in its own body (only the host starts
/// one, with the stack empty, and every frame of a rewind is entered
/// rewinding), so the second copy needs no rewind test at the start of each
/// level that holds a resume point, nor the dispatch at each loop check,
/// nor the cold edges from those into loop bodies: about a quarter of the
/// instructions instrumentation adds, and in large interpreter loops the
/// joins that make the register allocator shuffle values between stack
/// slots (`docs/PERFORMANCE.md`). Both copies share the resume points and
/// the save classes, so a frame is the same whichever copy unwound it. The
/// price is the original code twice (a third more code, and compile time),
/// and a frame rewound into the first copy runs there until it returns. A
/// body whose only level is its top one has no level tests to drop.
fn copies_body(plan: &Plan) -> bool {
    plan.levels.len() > 1
}

/// Instruments one body.
pub(crate) fn instrument(cx: &mut Cx, info: &ModuleInfo<'_>, body: &Body, plan: &Plan) -> Result<Output> {
    let n_locals = body.locals.len() as u32;
    // Frames name the function by its index in the original module.
    let func = cx.shift.back(body.func);
    let (classes, class_of_rp) = plan.save_classes();
    let mut e = Emitter {
        cx,
        plan,
        body,
        func,
        code: Code::default(),
        frames: Vec::new(),
        next_id: 0,
        n_locals,
        extra: vec![Ty::I32],
        shadow: HashMap::new(),
        fb: n_locals,
        done: 0,
        classes,
        class_block: Vec::new(),
        class_of_rp,
        anchor_block: HashMap::new(),
        no_block: HashSet::new(),
        deferred: Vec::new(),
        originals_open: 0,
        runs: Vec::new(),
        normal: false,
    };
    // The unwind-only variant is the normal copy alone: no rewind enters it.
    e.normal = e.cx.unwind_only;
    let copy = copies_body(plan) && !e.cx.unwind_only;
    e.open_function(copy)?;
    e.emit_ops(info.wasm)?;
    if copy {
        e.code.op(I::Else);
        e.normal = true;
        e.open_level(plan.top)?;
        e.emit_ops(info.wasm)?;
        e.end()?;
    }
    e.close_function()?;
    Ok(e.finish(body))
}

impl Emitter<'_> {
    /// Emits the body's operators up to its final `end` (not included).
    fn emit_ops(&mut self, wasm: &[u8]) -> Result<()> {
        let (plan, body) = (self.plan, self.body);
        let reader = BinaryReader::new(&wasm[body.ops_start..body.range.end], body.ops_start);
        let mut ops = OperatorsReader::new(reader);
        let mut index = 0u32;
        while !ops.eof() {
            let start = ops.original_position();
            let op = ops.read().map_err(|e| Error::from_reader(ErrorKind::Invalid, e))?;
            let bytes = &wasm[start..ops.original_position()];
            if !self.deferred.is_empty() && !matches!(op, Operator::Block { .. }) {
                return Err(internal("a deferred rewind dispatch is not followed by its block"));
            }
            let anchor = plan.anchor_at.get(&index).copied();
            if let Some(a) = anchor {
                self.anchor_prelude(a)?;
            }
            match op {
                Operator::Call { .. } | Operator::CallIndirect { .. } if anchor.is_some() => {
                    self.call_anchor(anchor.unwrap_or_default(), bytes, start)?;
                }
                Operator::Block { .. } | Operator::Loop { .. } | Operator::If { .. } => {
                    self.copy(bytes, start);
                    self.push(true, anchor);
                    self.originals_open += 1;
                    if let Some(&l) = plan.level_after.get(&index) {
                        self.open_level(l)?;
                    }
                }
                Operator::Else => {
                    self.copy(bytes, start);
                    if let Some(&l) = plan.level_after.get(&index) {
                        self.open_level(l)?;
                    }
                }
                Operator::End if self.originals_open == 1 => return Ok(()),
                Operator::End => {
                    self.copy(bytes, start);
                    let f = self.pop()?;
                    if !f.original {
                        return Err(internal("original end closes an inserted block"));
                    }
                    self.originals_open -= 1;
                    if let Some(a) = f.restore {
                        self.restore_after(a);
                    }
                }
                Operator::Br { relative_depth } => {
                    let d = self.remap(relative_depth)?;
                    if d == relative_depth { self.copy(bytes, start) } else { self.mark(start); self.code.op(I::Br(d)) }
                }
                Operator::BrIf { relative_depth } => {
                    let d = self.remap(relative_depth)?;
                    if d == relative_depth { self.copy(bytes, start) } else { self.mark(start); self.code.op(I::BrIf(d)) }
                }
                Operator::BrTable { targets } => {
                    let mut all = Vec::with_capacity(targets.len() as usize);
                    let mut same = true;
                    for t in targets.targets() {
                        let t = t.map_err(|e| Error::from_reader(ErrorKind::Invalid, e))?;
                        let d = self.remap(t)?;
                        same &= d == t;
                        all.push(d);
                    }
                    let default = self.remap(targets.default())?;
                    same &= default == targets.default();
                    if same {
                        self.copy(bytes, start)
                    } else {
                        self.mark(start);
                        self.code.op(I::BrTable(all.into(), default))
                    }
                }
                _ => self.copy(bytes, start),
            }
            index += 1;
        }
        Err(internal("the body has no final end"))
    }

    /// Notes that the original instruction at `orig` starts here, unless it
    /// continues the current run of copied code.
    fn mark(&mut self, orig: usize) {
        let here = self.code.0.len() as u32;
        let orig = orig as u32;
        if let Some(&(out, from)) = self.runs.last() {
            // (A body emitted twice starts its second copy back at the
            // first original offset.)
            if orig >= from && out + (orig - from) == here {
                return;
            }
        }
        self.runs.push((here, orig));
    }

    /// Copies an original instruction byte for byte.
    fn copy(&mut self, bytes: &[u8], orig: usize) {
        self.mark(orig);
        self.code.raw(bytes);
    }

    fn push(&mut self, original: bool, restore: Option<usize>) -> u32 {
        let id = self.next_id;
        self.next_id += 1;
        self.frames.push(Frame { original, id, restore });
        id
    }

    fn pop(&mut self) -> Result<Frame> {
        self.frames.pop().ok_or_else(|| internal("block stack underflow"))
    }

    /// Opens an inserted block.
    fn block(&mut self, bt: BlockType) -> u32 {
        self.code.op(I::Block(bt));
        self.push(false, None)
    }

    /// Opens an inserted `if`.
    fn if_(&mut self, bt: BlockType) -> u32 {
        self.code.op(I::If(bt));
        self.push(false, None)
    }

    /// Closes the innermost inserted block.
    fn end(&mut self) -> Result<()> {
        let f = self.pop()?;
        if f.original {
            return Err(internal("inserted end closes an original block"));
        }
        self.code.op(I::End);
        Ok(())
    }

    /// Label depth of the inserted block `id` from here.
    fn depth_of(&self, id: u32) -> Result<u32> {
        self.frames
            .iter()
            .rev()
            .position(|f| f.id == id)
            .map(|d| d as u32)
            .ok_or_else(|| internal("branch to a closed block"))
    }

    /// Output depth of the original label `depth`.
    fn remap(&self, depth: u32) -> Result<u32> {
        let mut seen = 0;
        for (d, f) in self.frames.iter().rev().enumerate() {
            if f.original {
                if seen == depth {
                    return Ok(d as u32);
                }
                seen += 1;
            }
        }
        Err(internal("branch depth beyond the function"))
    }

    fn br_to(&mut self, id: u32) -> Result<()> {
        let d = self.depth_of(id)?;
        self.code.op(I::Br(d));
        Ok(())
    }

    fn shadow(&mut self, pos: u32, t: Ty) -> u32 {
        let next = self.n_locals + self.extra.len() as u32;
        *self.shadow.entry((pos, t)).or_insert_with(|| {
            self.extra.push(t);
            next
        })
    }

    /// `i32.const rp; br $class`: straight to the unwind code of the
    /// point's save class, which receives the point as its block's result,
    /// so the edge carries only the locals that class saves (a tail shared
    /// by all points would make every local live at every point).
    fn unwind_at(&mut self, rp: u32) -> Result<()> {
        self.zero_dead_slots(rp);
        self.code.i32(rp as i32);
        let class = self.class_of_rp[rp as usize] as usize;
        self.br_to(self.class_block[class])
    }

    /// Sets to zero the locals that have a slot in the frame of `rp` but are
    /// dead there ([`crate::slots`]): the frame then holds zero for them,
    /// and their values need not live up to the point.
    fn zero_dead_slots(&mut self, rp: u32) {
        let p = &self.plan.rps[rp as usize];
        let dead: Vec<u32> = p.slots.iter().copied().filter(|l| !p.locals.contains(l)).collect();
        for t in [Ty::I32, Ty::I64, Ty::F32, Ty::F64] {
            let of_type: Vec<u32> = dead.iter().copied().filter(|&l| self.body.locals[l as usize] == t).collect();
            if let Some((&last, rest)) = of_type.split_last() {
                self.code.zero(t);
                for &l in rest {
                    self.code.op(I::LocalTee(l));
                }
                self.code.op(I::LocalSet(last));
            }
        }
    }

    /// Restores the numeric locals the frame of resume point `rp` saved,
    /// from this function's popped frame, which starts at the frame stack
    /// pointer, in one call to the pack helper of their type counts (which
    /// finds the frame itself).
    fn load_numbers(&mut self, rp: u32) -> Result<()> {
        let locals = self.plan.rps[rp as usize].slots.clone();
        let (key, n) = frames::pack_key(locals.iter().map(|&l| self.body.locals[l as usize]));
        if n == 0 {
            return Ok(());
        }
        match self.cx.packs.load(key) {
            Some(load) => {
                self.code.op(I::Call(load));
                for &l in locals[..n].iter().rev() {
                    self.code.op(I::LocalSet(l));
                }
            }
            None => {
                self.fb_at_frame_sp();
                for (slot, &l) in locals[..n].iter().enumerate() {
                    frames::load(&mut self.code, &self.cx.helpers, self.fb, l, self.body.locals[l as usize], slot as u32)?;
                }
            }
        }
        Ok(())
    }

    /// Loads again, inline, the numeric locals of `rp` that a loop around
    /// it does not have live at its header, in the innermost dispatch case
    /// (the top level's loaded them all, see [`Self::load_numbers_of`]).
    /// Defined here, such a temporary need not reach the point through the
    /// loop's header, where the original code does not keep it: loaded
    /// only at the top level, it would be carried around the loop on the
    /// hot path.
    fn reload_temporaries(&mut self, rp: u32) -> Result<()> {
        let headers: Vec<u32> = (self.plan.levels.iter())
            .filter_map(|lv| lv.loop_rp.filter(|&h| h != rp && lv.rps.contains(&rp)))
            .collect();
        let locals = &self.plan.rps[rp as usize].locals;
        // Where the loop already holds more values than registers, its
        // values are in stack slots anyway, and a join of many of them
        // costs moves between slots on the hot path: carrying the
        // temporaries around the loop is cheaper there.
        let crowded = headers.iter().any(|&h| {
            let at_header = &self.plan.rps[h as usize].locals;
            let both = at_header.iter().chain(locals.iter().filter(|l| !at_header.contains(l)));
            let floats = both.clone().filter(|&&l| matches!(self.body.locals[l as usize], Ty::F32 | Ty::F64)).count();
            let ints = both.count() - floats;
            ints > CROWDED_INTS || floats > CROWDED_FLOATS
        });
        if crowded {
            return Ok(());
        }
        let slots = &self.plan.rps[rp as usize].slots;
        let temporaries: Vec<(u32, u32, Ty)> = (slots.iter().enumerate())
            .map(|(slot, &l)| (slot as u32, l, self.body.locals[l as usize]))
            .filter(|&(_, l, t)| {
                !matches!(t, Ty::FuncRef | Ty::ExternRef)
                    && locals.contains(&l)
                    && headers.iter().any(|&h| !self.plan.rps[h as usize].locals.contains(&l))
            })
            .collect();
        if temporaries.is_empty() {
            return Ok(());
        }
        let h = self.cx.helpers;
        self.fb_at_frame_sp();
        for (slot, l, t) in temporaries {
            frames::load(&mut self.code, &h, self.fb, l, t, slot)?;
        }
        Ok(())
    }

    /// Restores the reference-typed locals the frame of `rp` saved,
    /// through the side tables, which the end of the rewind releases: in
    /// the dispatch case that reaches the point, right before its branch.
    fn load_refs(&mut self, rp: u32) -> Result<()> {
        // A class adds only numeric slots: every reference slot is live.
        let locals = self.plan.rps[rp as usize].slots.clone();
        let h = self.cx.helpers;
        let (_, n) = frames::pack_key(locals.iter().map(|&l| self.body.locals[l as usize]));
        if n < locals.len() {
            self.fb_at_frame_sp();
            for (slot, &l) in locals.iter().enumerate().skip(n) {
                frames::load(&mut self.code, &h, self.fb, l, self.body.locals[l as usize], slot as u32)?;
            }
        }
        Ok(())
    }

    /// Pushes the saved resume point of this function's frame, which the
    /// rewind prologue put in the `rp` global: a global, rather than a
    /// local, keeps it from being live across the loops between the
    /// prologue and the dispatch that reads it, and no callee rewinds
    /// before the last dispatch of this function has run.
    fn saved_rp(&mut self) {
        self.code.op(I::GlobalGet(self.cx.rp_global));
    }

    /// Pushes the values anchor `anchor` consumes from their shadow locals;
    /// for an `if`, `then_arm` picks the arm instead of the condition.
    fn push_consumed(&mut self, anchor: usize, then_arm: Option<bool>) {
        let a = &self.plan.anchors[anchor];
        let (h, c) = (a.height(), a.consumed);
        let stack = a.stack.clone();
        for p in h - c..h {
            match then_arm {
                Some(then) if p == h - 1 => self.code.i32(then as i32),
                _ => {
                    let s = self.shadow(p, stack[p as usize]);
                    self.code.op(I::LocalGet(s));
                }
            }
        }
    }

    /// Ends the rewind with the `rewind_done` helper's code inline (two
    /// stores without reference locals): a call on a rewind path inside a
    /// loop would make every value live across it take a callee-saved
    /// register or a stack slot, on the loop's hot path too.
    fn end_rewind(&mut self) {
        let code = super::helpers::rewind_done(&self.cx.helpers, self.cx.state_global);
        self.code.raw(&code.0);
    }

    fn is_rewinding(&mut self) {
        self.code.op(I::GlobalGet(self.cx.state_global));
        self.code.i32(State::Rewinding as i32);
        self.code.op(I::I32Eq);
    }

    fn load_flags(&mut self) {
        self.code.i32(0);
        self.code.op(I::I32Load(ctrl(control::FLAGS, 2)));
    }

    /// Opens the unwind code's blocks and the body's; with `copy`, the
    /// `if` whose first arm is the copy of the body a rewind enters
    /// ([`copies_body`]).
    fn open_function(&mut self, copy: bool) -> Result<()> {
        self.done = self.block(BlockType::Empty);
        for _ in 0..self.classes.len() {
            let id = self.block(BlockType::Result(wasm_encoder::ValType::I32));
            self.class_block.push(id);
        }
        let results = self.plan.results.clone();
        let bt = self.cx.types.block(&[], &results);
        self.code.op(I::Block(bt));
        self.push(true, None);
        self.originals_open = 1;
        if copy {
            self.is_rewinding();
            self.if_(bt);
        }
        self.open_level(self.plan.top)
    }

    /// Emits the start of a level: one block per anchor, each ending right
    /// before its anchor, then the rewind dispatch (or, for a loop body, the
    /// pause check that also dispatches). A deferring level stops after its
    /// blocks and leaves its dispatch to the level its first instruction
    /// opens, whose test then covers both.
    fn open_level(&mut self, l: usize) -> Result<()> {
        let level = &self.plan.levels[l];
        if self.normal {
            return match level.loop_rp {
                Some(loop_rp) => self.loop_header(l, loop_rp),
                None => Ok(()),
            };
        }
        let params = level.params.clone();
        for (i, &a) in level.anchors.iter().enumerate().rev() {
            if level.defer && i == 0 {
                self.no_block.insert(a);
                continue;
            }
            let consumed = self.plan.anchors[a].consumed_types().to_vec();
            let bt = self.cx.types.block(&params, &consumed);
            let id = self.block(bt);
            self.anchor_block.insert(a, id);
        }
        if level.defer {
            self.deferred.push(l);
            return Ok(());
        }
        let deferred = std::mem::take(&mut self.deferred);
        if let Some(loop_rp) = level.loop_rp {
            if !deferred.is_empty() {
                return Err(internal("a loop body cannot take a deferred dispatch"));
            }
            self.loop_header(l, loop_rp)
        } else {
            self.is_rewinding();
            self.if_(BlockType::Empty);
            if deferred.first().copied().unwrap_or(l) == self.plan.top {
                self.prologue()?;
            }
            self.dispatch(&deferred, l, None)?;
            self.end()
        }
    }

    /// The check at a loop header: one load and a branch on the hot path.
    /// Its cold path only leaves the loop: it unwinds, or, while rewinding
    /// to a point inside the loop, dispatches to it. It calls nothing and
    /// never branches back to the header, so values live across the loop
    /// need not survive a call or meet a rewind's values at the header.
    /// A rewind to the header itself ends before the `loop`
    /// ([`Case::LoopEntry`]). The load covers the pause and rewind bytes
    /// only: a stress countdown needs a call at every header, which only
    /// the stress variant pays ([`Self::loop_header_stress`]).
    fn loop_header(&mut self, l: usize, loop_rp: u32) -> Result<()> {
        if self.cx.stress || l == self.plan.top {
            return self.loop_header_stress(l, loop_rp);
        }
        let level = &self.plan.levels[l];
        let (params, base, inner) = (level.params.clone(), level.base, !level.anchors.is_empty() && !self.normal);
        self.code.i32(0);
        self.code.op(I::I32Load16U(ctrl(control::FLAGS, 1)));
        let bt = self.cx.types.block(&params, &params);
        self.if_(bt);
        for (i, t) in params.iter().enumerate().rev() {
            let s = self.shadow(base + i as u32, *t);
            self.code.op(I::LocalSet(s));
        }
        if inner {
            self.is_rewinding();
            self.if_(BlockType::Empty);
            self.dispatch(&[], l, None)?;
            self.end()?;
        }
        self.unwind_at(loop_rp)?;
        self.end()
    }

    /// The entry of a recursive function that is no update point: nothing
    /// runs on a call that is not a rewind (the normal copy of the body has
    /// nothing at all), but a frame unwound at this entry, by a version that
    /// checked it, can still rewind here and start the function over with
    /// its params. A checked rewind stops again here, as at any entry.
    fn entry_rewind_only(&mut self, entry_rp: u32) -> Result<()> {
        if self.normal {
            return Ok(());
        }
        let top = self.plan.top;
        let resume = self.block(BlockType::Empty);
        self.is_rewinding();
        self.code.op(I::I32Eqz);
        self.code.op(I::BrIf(0));
        let check = self.block(BlockType::Empty);
        self.prologue()?;
        self.dispatch(&[], top, Some((resume, check)))?;
        self.end()?;
        self.unwind_if_paused(resume, entry_rp)?;
        self.end()
    }

    /// The pause decision of an entry or a stress check: on no pause,
    /// branches to `resume` (the end of the check); on one, unwinds at
    /// `rp`. The stress variant decides by a call to `should_pause`, which
    /// counts down its period; the others read the pause byte.
    fn unwind_if_paused(&mut self, resume: u32, rp: u32) -> Result<()> {
        if self.cx.stress {
            self.code.op(I::Call(self.cx.helpers.should_pause));
        } else {
            self.code.i32(0);
            self.code.op(I::I32Load8U(ctrl(control::PAUSE_BYTE, 0)));
        }
        self.code.op(I::I32Eqz);
        let d = self.depth_of(resume)?;
        self.code.op(I::BrIf(d));
        self.unwind_at(rp)
    }

    /// The check of the stress variant, and of a checked function entry
    /// (which is in no loop): a rewind to the header ends here and runs on
    /// into the body, so that a guest paused again at once still makes
    /// progress. The pause decision is a call in the stress variant; otherwise, as
    /// at a loop header, it is the pause byte: a call on the cold path
    /// would make every value live across the check (the params) take a
    /// callee-saved register, saved and restored on every call of the
    /// function.
    fn loop_header_stress(&mut self, l: usize, loop_rp: u32) -> Result<()> {
        if l == self.plan.top && !self.cx.stress && !self.plan.entry_checked {
            return self.entry_rewind_only(loop_rp);
        }
        let params = self.plan.levels[l].params.clone();
        let base = self.plan.levels[l].base;
        if self.cx.stress {
            self.load_flags();
        } else {
            self.code.i32(0);
            self.code.op(I::I32Load16U(ctrl(control::FLAGS, 1)));
        }
        let bt = self.cx.types.block(&params, &params);
        self.if_(bt);
        for (i, t) in params.iter().enumerate().rev() {
            let s = self.shadow(base + i as u32, *t);
            self.code.op(I::LocalSet(s));
        }
        let resume = self.block(BlockType::Empty);
        if !self.normal {
            self.is_rewinding();
            let check = self.if_(BlockType::Empty);
            // The function's own level has a "loop header" when its entry
            // is an update point; rewinding must pop the frame there first.
            if l == self.plan.top {
                self.prologue()?;
            }
            self.dispatch(&[], l, Some((resume, check)))?;
            self.end()?;
        }
        self.unwind_if_paused(resume, loop_rp)?;
        self.end()?;
        for (i, t) in params.iter().enumerate() {
            let s = self.shadow(base + i as u32, *t);
            self.code.op(I::LocalGet(s));
        }
        self.end()
    }

    /// The rewind dispatch of a level: a `br_table` on the saved resume point
    /// to code that pushes the operands of the anchor on the path and jumps
    /// to the block that ends right before it. With `deferred` levels (the
    /// chain of levels around this one that left their dispatch to it,
    /// outermost first), the table spans the outermost one's resume points;
    /// their anchors' blocks are still open around this code, so a case for
    /// one of them branches outward to it.
    fn dispatch(&mut self, deferred: &[usize], l: usize, header: Option<(u32, u32)>) -> Result<()> {
        let level = &self.plan.levels[l];
        let level_loop_rp = level.loop_rp;
        // Only the top level's dispatch loads numbers (see
        // [`Self::load_numbers_of`]); the levels inside find them set.
        let top = deferred.first().copied().unwrap_or(l) == self.plan.top;
        let span = deferred.first().map_or(level.rps.clone(), |&d| self.plan.levels[d].rps.clone());
        let mut cases = Vec::new();
        let mut case_of_rp = vec![u32::MAX; (span.end - span.start) as usize];
        let mut assign = |cases: &mut Vec<Case>, rps: std::ops::Range<u32>, case: Case| {
            for rp in rps {
                case_of_rp[(rp - span.start) as usize] = cases.len() as u32;
            }
            cases.push(case);
        };
        if let (Some(rp), Some((resume, check))) = (level.loop_rp, header) {
            assign(&mut cases, rp..rp + 1, Case::LoopHeader { resume, check });
        }
        // A deferred level's first anchor is the next level's construct,
        // whose resume points the next level's cases cover.
        let outer = deferred.iter().flat_map(|&d| self.plan.levels[d].anchors.iter().skip(1));
        for &a in outer.chain(&level.anchors) {
            match &self.plan.anchors[a].kind {
                AnchorKind::Call { rp } => {
                    let rps = *rp..*rp + 1;
                    assign(&mut cases, rps, Case::Anchor { anchor: a, then_arm: None })
                }
                AnchorKind::Construct { rps, is_if: false, header_rp: Some(h), .. } if !self.cx.stress => {
                    assign(&mut cases, *h..*h + 1, Case::LoopEntry { anchor: a });
                    if h + 1 < rps.end {
                        let rps = h + 1..rps.end;
                        assign(&mut cases, rps, Case::Anchor { anchor: a, then_arm: None })
                    }
                }
                AnchorKind::Construct { rps, is_if: false, .. } => {
                    assign(&mut cases, rps.clone(), Case::Anchor { anchor: a, then_arm: None })
                }
                AnchorKind::Construct { rps, is_if: true, else_from, .. } => {
                    if rps.start < *else_from {
                        let rps = rps.start..*else_from;
                        assign(&mut cases, rps, Case::Anchor { anchor: a, then_arm: Some(true) });
                    }
                    if *else_from < rps.end {
                        let rps = *else_from..rps.end;
                        assign(&mut cases, rps, Case::Anchor { anchor: a, then_arm: Some(false) });
                    }
                }
            }
        }
        let first = span.start;
        let k = cases.len() as u32;
        for c in &mut case_of_rp {
            if *c == u32::MAX {
                *c = k;
            }
        }
        // The top level restores the numbers first, one case per list of
        // slots whichever anchor leads to the point ([`Self::load_numbers_of`]).
        if top {
            self.load_numbers_of(span.clone())?;
        }
        for _ in 0..=k {
            self.block(BlockType::Empty);
        }
        self.saved_rp();
        if first > 0 {
            self.code.i32(first as i32);
            self.code.op(I::I32Sub);
        }
        self.code.op(I::BrTable(case_of_rp.into(), k));
        for case in cases {
            self.end()?;
            match case {
                Case::LoopHeader { resume, check } => {
                    let rp = level_loop_rp.ok_or_else(|| internal("a loop header case without its point"))?;
                    // References before the end of the rewind releases
                    // their side tables. Numbers come from the top level's
                    // dispatch, temporaries again here.
                    self.load_refs(rp)?;
                    self.end_rewind();
                    self.reload_temporaries(rp)?;
                    // In a checked rewind the guest stops again right here,
                    // before the loop runs, so the new code of an update
                    // runs nothing before it is committed. An ordinary
                    // resume runs on into the loop, so a guest paused again
                    // at once still makes progress.
                    self.code.i32(0);
                    self.code.op(I::I32Load8U(ctrl(control::VERIFY_BYTE, 0)));
                    self.code.op(I::I32Eqz);
                    let d = self.depth_of(resume)?;
                    self.code.op(I::BrIf(d));
                    self.br_to(check)?;
                }
                Case::LoopEntry { anchor } => {
                    let AnchorKind::Construct { header_rp: Some(rp), .. } = self.plan.anchors[anchor].kind else {
                        return Err(internal("a loop entry case without its header point"));
                    };
                    // As in the loop header case.
                    self.load_refs(rp)?;
                    self.end_rewind();
                    self.reload_temporaries(rp)?;
                    self.push_consumed(anchor, None);
                    let id = *self.anchor_block.get(&anchor).ok_or_else(|| internal("anchor block missing"))?;
                    self.br_to(id)?;
                }
                Case::Anchor { anchor, then_arm } => {
                    if let AnchorKind::Call { rp } = self.plan.anchors[anchor].kind {
                        self.load_refs(rp)?;
                        self.reload_temporaries(rp)?;
                    }
                    self.push_consumed(anchor, then_arm);
                    let id = *self.anchor_block.get(&anchor).ok_or_else(|| internal("anchor block missing"))?;
                    self.br_to(id)?;
                }
            }
        }
        self.end()?;
        self.code.op(I::Unreachable);
        Ok(())
    }

    /// Before an anchor: move the level's operands below the anchor's own
    /// into shadow locals (the anchor's operands too, where the frame must
    /// save them), then close the anchor's block.
    fn anchor_prelude(&mut self, a: usize) -> Result<()> {
        let anchor = &self.plan.anchors[a];
        let (h, c, base, kept) = (anchor.height(), anchor.consumed, anchor.base, anchor.kept());
        let stash = match anchor.kind {
            AnchorKind::Call { rp } => self.plan.rps[rp as usize].kind != ResumeKind::Call,
            AnchorKind::Construct { .. } => false,
        };
        if self.no_block.contains(&a) {
            // Deferring requires an anchor with nothing to stash.
            return if kept > 0 || stash { Err(internal("a deferred anchor keeps operands")) } else { Ok(()) };
        }
        let stack = anchor.stack.clone();
        if kept > 0 || stash {
            let lo = if kept > 0 { base } else { h - c };
            for p in (lo..h).rev() {
                let s = self.shadow(p, stack[p as usize]);
                self.code.op(I::LocalSet(s));
            }
            for p in h - c..h {
                let s = self.shadow(p, stack[p as usize]);
                self.code.op(I::LocalGet(s));
            }
        }
        if self.normal {
            return Ok(());
        }
        let id = *self.anchor_block.get(&a).ok_or_else(|| internal("anchor block missing"))?;
        if self.frames.last().map(|f| f.id) != Some(id) {
            return Err(internal("anchor block is not the innermost block"));
        }
        self.end()
    }

    /// A call resume point: optional pause check before a blocking import,
    /// the call itself, the unwind check after it.
    fn call_anchor(&mut self, a: usize, bytes: &[u8], start: usize) -> Result<()> {
        let AnchorKind::Call { rp } = self.plan.anchors[a].kind else {
            return Err(internal("call anchor expected"));
        };
        if self.plan.rps[rp as usize].kind == ResumeKind::BlockingCall {
            // The unwind-only variant never rewinds: only the pause decision.
            let decide = match self.cx.helpers.rewind {
                Some(r) => r.pre_call,
                None => self.cx.helpers.should_pause,
            };
            self.load_flags();
            self.if_(BlockType::Empty);
            self.code.op(I::Call(decide));
            self.if_(BlockType::Empty);
            self.unwind_at(rp)?;
            self.end()?;
            self.end()?;
        }
        if self.plan.rps[rp as usize].kind == ResumeKind::CallIndirect && !self.normal {
            self.indirect_rewind_end()?;
        }
        self.copy(bytes, start);
        self.code.op(I::GlobalGet(self.cx.state_global));
        self.if_(BlockType::Empty);
        self.unwind_at(rp)?;
        self.end()?;
        self.restore_after(a);
        Ok(())
    }

    /// Before a `call_indirect` resume point: a rewind that reaches it with
    /// the frame stack empty has restored every frame, so the callee is a
    /// blocking import that was interrupted (an instrumented callee would
    /// still have its frame to pop). The rewind ends here and the import runs
    /// again in the normal state, as a direct blocking call does after
    /// `pre_call`. The flag word is nonzero while rewinding, so the normal
    /// path pays one load and a branch.
    fn indirect_rewind_end(&mut self) -> Result<()> {
        self.load_flags();
        self.if_(BlockType::Empty);
        self.is_rewinding();
        self.code.i32(0);
        self.code.op(I::I32Load(ctrl(control::FRAME_SP, 2)));
        self.code.i32(control::FRAMES_BASE as i32);
        self.code.op(I::I32LeU);
        self.code.op(I::I32And);
        self.if_(BlockType::Empty);
        self.end_rewind();
        self.end()?;
        self.end()
    }

    /// After an anchor: put the kept operands back under its results.
    fn restore_after(&mut self, a: usize) {
        let anchor = &self.plan.anchors[a];
        let (base, kept) = (anchor.base, anchor.kept());
        if kept == 0 {
            return;
        }
        let stack = anchor.stack.clone();
        let results = anchor.results.clone();
        let top = base + kept;
        for (i, t) in results.iter().enumerate().rev() {
            let s = self.shadow(top + i as u32, *t);
            self.code.op(I::LocalSet(s));
        }
        for p in base..top {
            let s = self.shadow(p, stack[p as usize]);
            self.code.op(I::LocalGet(s));
        }
        for (i, t) in results.iter().enumerate() {
            let s = self.shadow(top + i as u32, *t);
            self.code.op(I::LocalGet(s));
        }
    }

    /// `br_table` on the saved resume point (counted from `first`) to one
    /// of `n` cases by `case_of_rp` (`u32::MAX`: none), running `each` for
    /// the selected case, then continuing after the switch.
    fn switch(
        &mut self,
        first: u32,
        case_of_rp: &[u32],
        n: u32,
        mut each: impl FnMut(&mut Self, u32) -> Result<()>,
    ) -> Result<()> {
        let after = self.block(BlockType::Empty);
        for _ in 0..=n {
            self.block(BlockType::Empty);
        }
        self.saved_rp();
        if first > 0 {
            self.code.i32(first as i32);
            self.code.op(I::I32Sub);
        }
        let table: Vec<u32> = case_of_rp.iter().map(|&c| c.min(n)).collect();
        self.code.op(I::BrTable(table.into(), n));
        for case in 0..n {
            self.end()?;
            each(self, case)?;
            self.br_to(after)?;
        }
        self.end()?;
        self.end()
    }

    /// Rewind prologue: pop this function's frame and restore the shadow
    /// locals of the operands its resume point saved. The locals wait for
    /// the dispatch cases ([`Self::load_numbers_of`], [`Self::load_refs`]).
    fn prologue(&mut self) -> Result<()> {
        let h = self.cx.helpers;
        self.code.i32(self.func as i32);
        self.code.op(I::Call(h.rewind()?.frame_pop));
        self.code.op(I::LocalTee(self.fb));
        self.code.op(I::I32Load(ctrl(crate::abi::frame::RESUME_POINT, 2)));
        self.code.op(I::GlobalSet(self.cx.rp_global));
        // One case per distinct (first operand slot, operand types).
        let mut cases: Vec<(u32, Vec<Ty>)> = Vec::new();
        let case_of_rp: Vec<u32> = self
            .plan
            .rps
            .iter()
            .map(|rp| {
                if rp.saved.is_empty() {
                    return u32::MAX;
                }
                let key = (rp.slots.len() as u32, rp.saved.clone());
                match cases.iter().position(|c| *c == key) {
                    Some(i) => i as u32,
                    None => {
                        cases.push(key);
                        cases.len() as u32 - 1
                    }
                }
            })
            .collect();
        if cases.is_empty() {
            return Ok(());
        }
        self.switch(0, &case_of_rp, cases.len() as u32, |e, case| {
            let (first, saved) = cases[case as usize].clone();
            for (p, t) in saved.iter().enumerate() {
                let s = e.shadow(p as u32, *t);
                frames::load(&mut e.code, &h, e.fb, s, *t, first + p as u32)?;
            }
            Ok(())
        })
    }

    /// Restores the numeric locals of whichever point in `rps` (all of the
    /// function's) the rewind goes to, one case per list of slots, right
    /// before the top level's dispatch. On the rewind's way from there to
    /// the point no original code runs, so the values reach it unchanged,
    /// and they meet the normal path once per call, at the top level,
    /// before the construct that holds the point. One case per list rather
    /// than per anchor: in straight-line code every call is an anchor of
    /// the top level, and points of one save class share a list. Loaded in
    /// the innermost case instead,
    /// right before the branch to the point, every live local would get a
    /// second definition at a join inside a loop body, and Cranelift's
    /// allocator then shuffles values between stack slots on the hot path
    /// (Lua's `printf_core` spent three quarters of its time in such moves;
    /// `docs/PERFORMANCE.md`).
    fn load_numbers_of(&mut self, rps: std::ops::Range<u32>) -> Result<()> {
        let mut cases: Vec<Vec<u32>> = Vec::new();
        let mut first = Vec::new();
        let mut case_of_rp = Vec::new();
        for rp in rps.clone() {
            let locals = &self.plan.rps[rp as usize].slots;
            let numbers = frames::pack_key(locals.iter().map(|&l| self.body.locals[l as usize])).1;
            case_of_rp.push(if numbers == 0 {
                u32::MAX
            } else if let Some(i) = cases.iter().position(|c| c == locals) {
                i as u32
            } else {
                cases.push(locals.clone());
                first.push(rp);
                cases.len() as u32 - 1
            });
        }
        match cases.len() {
            0 => Ok(()),
            // The frame holds only its own point's slots: a point without
            // numbers must load nothing.
            1 if !case_of_rp.contains(&u32::MAX) => self.load_numbers(first[0]),
            n => self.switch(rps.start, &case_of_rp, n as u32, |e, case| e.load_numbers(first[case as usize])),
        }
    }

    /// Closes the body block, then emits the unwind code: per save class,
    /// push a frame sized for it and save its locals and operands; then,
    /// shared, set the state and return zeros.
    fn close_function(&mut self) -> Result<()> {
        let f = self.pop()?;
        if !f.original {
            return Err(internal("function end closes an inserted block"));
        }
        self.code.op(I::End);
        self.code.op(I::Return);
        for class in (0..self.classes.len()).rev() {
            self.end()?;
            self.save_class(class)?;
            if class > 0 {
                self.br_to(self.done)?;
            }
        }
        self.end()?;
        self.code.i32(State::Unwinding as i32);
        self.code.op(I::GlobalSet(self.cx.state_global));
        for t in self.plan.results.clone() {
            self.code.zero(t);
        }
        self.code.op(I::End);
        if !self.frames.is_empty() {
            return Err(internal("blocks left open at the end of the function"));
        }
        Ok(())
    }

    /// The unwind code of one save class, with the resume point on the
    /// stack (its block's result): the class's locals and the operands'
    /// shadow locals, in slot order, passed to the save helper of their
    /// types ([`super::Packs`]), which pushes the frame and stores them;
    /// or, for slot types no other class has, stored inline. Passing the
    /// values to a shared call rather than storing them makes the code
    /// smaller, and the guests run no more instructions for it
    /// (`docs/PERFORMANCE.md`).
    fn save_class(&mut self, class: usize) -> Result<()> {
        let SaveClass { locals, operands } = self.classes[class].clone();
        let mut values: Vec<(u32, Ty)> = locals.iter().map(|&l| (l, self.body.locals[l as usize])).collect();
        for (p, &t) in operands.iter().enumerate() {
            values.push((self.shadow(p as u32, t), t));
        }
        let types: Vec<Ty> = values.iter().map(|&(_, t)| t).collect();
        match self.cx.packs.save(&types) {
            Some(save) => {
                self.code.i32(self.func as i32);
                for &(local, _) in &values {
                    self.code.op(I::LocalGet(local));
                }
                self.code.op(I::Call(save));
            }
            None => self.store_frame(&values)?,
        }
        Ok(())
    }

    /// Sets `fb` to the frame stack pointer: the frame the rewind prologue
    /// popped, or where a class stores the frame it pushes.
    fn fb_at_frame_sp(&mut self) {
        self.code.i32(0);
        self.code.op(I::I32Load(ctrl(control::FRAME_SP, 2)));
        self.code.op(I::LocalSet(self.fb));
    }

    /// Stores `values` (locals and their types, in slot order) above the
    /// frame stack pointer, then calls `frame_push` with the resume point on
    /// the stack, which makes them a frame. The stores come first so that
    /// no saved value is live across a call; the control memory keeps room
    /// past the pointer for them ([`control::FRAME_HEADROOM`]), or, for a
    /// frame larger than that, this code grows it first.
    fn store_frame(&mut self, values: &[(u32, Ty)]) -> Result<()> {
        self.fb_at_frame_sp();
        let size = frame::frame_size(values.len() as u32);
        if size > control::FRAME_HEADROOM {
            self.grow_control_for(size);
        }
        for (slot, &(local, t)) in values.iter().enumerate() {
            frames::store(&mut self.code, &self.cx.helpers, self.fb, local, t, slot as u32)?;
        }
        self.code.i32(self.func as i32);
        self.code.i32(values.len() as i32);
        self.code.op(I::Call(self.cx.helpers.frame_push));
        self.code.op(I::Drop);
        Ok(())
    }

    /// Grows the control memory, if needed, to hold a frame of `size` bytes
    /// at the frame stack pointer (in `fb`): only frames larger than the
    /// headroom the memory always keeps need this.
    fn grow_control_for(&mut self, size: u32) {
        let fb = self.fb;
        super::helpers::grow_control_past(
            &mut self.code,
            |c| {
                c.op(I::LocalGet(fb));
                c.i32(size as i32);
                c.op(I::I32Add);
            },
            |c| c.i32(((size >> 16) + 1) as i32),
        );
    }

    /// Local declarations (original groups, then the added locals) and code,
    /// with the offsets into the code shifted past the declarations.
    fn finish(self, body: &Body) -> Output {
        use wasm_encoder::Encode;
        let mut groups: Vec<(u32, wasm_encoder::ValType)> = Vec::new();
        for &(n, t) in &body.local_groups {
            groups.push((n, orig_val(t)));
        }
        let original_groups = groups.len();
        for &t in &self.extra {
            let v = super::val(t);
            let added = groups.len() > original_groups;
            match groups.last_mut() {
                Some((n, last)) if added && *last == v => *n += 1,
                _ => groups.push((1, v)),
            }
        }
        let mut out = Vec::new();
        (groups.len() as u32).encode(&mut out);
        for (n, t) in groups {
            n.encode(&mut out);
            t.encode(&mut out);
        }
        let prefix = out.len() as u32;
        out.extend_from_slice(&self.code.0);
        let runs = self.runs.iter().map(|&(at, orig)| (at + prefix, orig)).collect();
        Output { body: out, runs }
    }
}

fn orig_val(t: wasmparser::ValType) -> wasm_encoder::ValType {
    use wasm_encoder::reencode::{Reencode, RoundtripReencoder};
    // Only value types the analysis accepted reach here, and those always
    // convert.
    RoundtripReencoder.val_type(t).unwrap_or(wasm_encoder::ValType::I32)
}

//! Which locals of a function may still be read from a given instruction
//! on: the one liveness analysis of the project. The instrumenter saves
//! exactly these locals in a frame at each resume point (and the metadata
//! says which), and patchgen asks the same question of a new version to know
//! which locals of a moved frame need a value.
//!
//! The analysis is classic backward liveness. One pass over the operators
//! splits the body into basic blocks, using the structured control stack to
//! resolve branch labels: `block` and `if` labels lead to their `end`, `loop`
//! labels to the `loop` instruction, and the function's own label to the exit.
//! A block ends after `if`, `else`, `br`, `br_if`, `br_table`, `br_on_*`,
//! `return`, `return_call*`, `unreachable` and `throw*`, and before `loop`
//! and `end`. Each block summarises the locals it reads before writing (use)
//! and the locals it writes (def); `live_in = use ∪ (live_out − def)` is
//! iterated to a fixed point because loops feed their headers back. A query
//! then walks backward inside its block from the block's `live_out` down to
//! the queried instruction.
//!
//! `local.get` reads; `local.set` and `local.tee` write (`local.tee` reads
//! the operand stack, not the local). Calls touch no locals of the caller.
//!
//! Conservatism: wrong answers in the "dead" direction corrupt a running
//! program (a frame would lose a value the code reads), so the analysis
//! only ever errs towards "live". Code after an unconditional branch is
//! analysed as if reachable. A function that uses exception handling
//! (`try`, `try_table`, `catch`, `delegate`) or stack switching (`resume`,
//! `switch`), whose control edges leave from any call, is not analysed at
//! all: every local is reported live at every instruction.

use std::ops::Range;

use wasmparser::{BinaryReaderError, FunctionBody, Operator};

/// Why a body could not be analysed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The body could not be parsed.
    #[error("{0}")]
    Parse(#[from] BinaryReaderError),
    /// The function declares more locals than wasm allows.
    #[error("{count} locals, more than the {limit} wasm allows")]
    TooManyLocals {
        /// Parameters plus declared locals.
        count: u64,
        /// The limit.
        limit: u32,
    },
    /// The body's structure is broken (a branch past the outermost label, an
    /// unmatched `else` or `end`, an unknown local, ...).
    #[error("malformed at offset {offset:#x}: {reason}")]
    Malformed {
        /// Where, in the offsets of [`Liveness::new`].
        offset: u32,
        /// What is wrong.
        reason: &'static str,
    },
}

/// Wasm's limit on the locals of one function (parameters included).
const MAX_LOCALS: u32 = 50_000;

/// Exception handling and stack switching, whose control edges leave from
/// any call: the analysis does not model them (nor does patchgen's walk of
/// a body).
pub fn leaves_from_calls(op: &Operator<'_>) -> bool {
    matches!(
        op,
        Operator::Try { .. }
            | Operator::TryTable { .. }
            | Operator::Catch { .. }
            | Operator::CatchAll
            | Operator::Delegate { .. }
            | Operator::Rethrow { .. }
            | Operator::Resume { .. }
            | Operator::ResumeThrow { .. }
            | Operator::ResumeThrowRef { .. }
            | Operator::Switch { .. }
    )
}

/// The basic blocks of one function body, for questions about paths:
/// instruction `i` (in code order) is at code offset `offsets[i]` and in
/// block `block_of[i]`. Block 0 is the exit, block 1 the entry.
pub struct FlowGraph {
    /// Code offset of each instruction.
    pub offsets: Vec<u32>,
    /// Each block's instructions and successors.
    pub blocks: Vec<(Range<usize>, Vec<usize>)>,
    /// The block of each instruction.
    pub block_of: Vec<usize>,
}

/// What one instruction does to locals.
#[derive(Clone, Copy)]
enum Effect {
    None,
    Read(u32),
    Write(u32),
}

/// A basic block: instructions `range` of the body, and where control goes
/// when it falls off the end.
struct Block {
    range: Range<usize>,
    succs: Vec<usize>,
}

/// An open `block`, `loop`, `if` or the function itself.
struct Frame {
    /// Where a branch to this frame's label goes.
    label: usize,
    /// The block that starts at this frame's `end`.
    after: usize,
    /// For an `if`: the block its false edge leads to, until an `else` or
    /// the `end` places it.
    pending_else: Option<usize>,
    is_function: bool,
}

/// The basic blocks of one body under construction.
struct Cfg {
    blocks: Vec<Block>,
    frames: Vec<Frame>,
    current: usize,
}

/// Block 0 is the function's exit: no instructions, nothing live.
const EXIT: usize = 0;

impl Cfg {
    fn new() -> Self {
        let mut cfg = Cfg { blocks: Vec::new(), frames: Vec::new(), current: 0 };
        cfg.fresh(); // EXIT
        cfg.current = cfg.fresh();
        cfg.frames.push(Frame { label: EXIT, after: EXIT, pending_else: None, is_function: true });
        cfg
    }

    /// A new block whose start is fixed when control reaches it.
    fn fresh(&mut self) -> usize {
        self.blocks.push(Block { range: 0..0, succs: Vec::new() });
        self.blocks.len() - 1
    }

    /// Ends the current block before instruction `at` with `succs`, and
    /// continues in `next`, which starts at `at`.
    fn split(&mut self, at: usize, succs: Vec<usize>, next: usize) {
        let cur = &mut self.blocks[self.current];
        cur.range.end = at;
        cur.succs = succs;
        self.blocks[next].range = at..at;
        self.current = next;
    }

    /// Ends the current block after instruction `i` with `succs`; what
    /// follows starts a new block.
    fn branch(&mut self, i: usize, succs: Vec<usize>) {
        let next = self.fresh();
        self.split(i + 1, succs, next);
    }

    fn malformed(&self, offset: u32, reason: &'static str) -> Error {
        Error::Malformed { offset, reason }
    }

    /// The block a branch to `depth` leads to.
    fn target(&self, depth: u32, offset: u32) -> Result<usize, Error> {
        let index = self.frames.len().checked_sub(1 + depth as usize);
        index
            .map(|i| self.frames[i].label)
            .ok_or_else(|| self.malformed(offset, "a branch targets a label outside the function"))
    }

    /// Records the control effect of instruction `i`. Returns `false` for
    /// instructions whose edges the analysis does not model.
    fn control(&mut self, i: usize, op: &Operator, offset: u32) -> Result<bool, Error> {
        match op {
            Operator::Block { .. } => {
                let after = self.fresh();
                self.frames.push(Frame { label: after, after, pending_else: None, is_function: false });
            }
            Operator::Loop { .. } => {
                let header = self.fresh();
                self.split(i, vec![header], header);
                let after = self.fresh();
                self.frames.push(Frame { label: header, after, pending_else: None, is_function: false });
            }
            Operator::If { .. } => {
                let (then, otherwise, after) = (self.fresh(), self.fresh(), self.fresh());
                self.split(i + 1, vec![then, otherwise], then);
                self.frames.push(Frame { label: after, after, pending_else: Some(otherwise), is_function: false });
            }
            Operator::Else => {
                let frame = self.frames.last_mut().filter(|f| f.pending_else.is_some());
                let Some(frame) = frame else {
                    return Err(self.malformed(offset, "`else` without an open `if`"));
                };
                let (otherwise, after) = (frame.pending_else.take().unwrap_or(EXIT), frame.after);
                self.split(i + 1, vec![after], otherwise);
            }
            Operator::End => {
                let Some(frame) = self.frames.pop() else {
                    return Err(self.malformed(offset, "instructions after the function's final `end`"));
                };
                if frame.is_function {
                    self.branch(i, vec![EXIT]);
                } else {
                    if let Some(otherwise) = frame.pending_else {
                        // An `if` without `else`: its false edge reaches the `end`.
                        self.blocks[otherwise] = Block { range: i..i, succs: vec![frame.after] };
                    }
                    self.split(i, vec![frame.after], frame.after);
                }
            }
            Operator::Br { relative_depth } => {
                let target = self.target(*relative_depth, offset)?;
                self.branch(i, vec![target]);
            }
            Operator::BrIf { relative_depth }
            | Operator::BrOnNull { relative_depth }
            | Operator::BrOnNonNull { relative_depth }
            | Operator::BrOnCast { relative_depth, .. }
            | Operator::BrOnCastFail { relative_depth, .. }
            | Operator::BrOnCastDescEq { relative_depth, .. }
            | Operator::BrOnCastDescEqFail { relative_depth, .. } => {
                let target = self.target(*relative_depth, offset)?;
                let next = self.fresh();
                self.split(i + 1, vec![target, next], next);
            }
            Operator::BrTable { targets } => {
                let mut succs = Vec::with_capacity(targets.len() as usize + 1);
                for depth in targets.targets().chain(std::iter::once(Ok(targets.default()))) {
                    succs.push(self.target(depth?, offset)?);
                }
                succs.sort_unstable();
                succs.dedup();
                self.branch(i, succs);
            }
            Operator::Return
            | Operator::Unreachable
            | Operator::ReturnCall { .. }
            | Operator::ReturnCallIndirect { .. }
            | Operator::ReturnCallRef { .. }
            | Operator::Throw { .. }
            | Operator::ThrowRef => self.branch(i, Vec::new()),
            op if leaves_from_calls(op) => return Ok(false),
            _ => {}
        }
        Ok(true)
    }
}

/// The liveness of one function body: per-instruction offsets and effects,
/// the blocks, and the fixed point.
pub struct Liveness {
    num_locals: usize,
    /// Code offset (relative to the base the caller chose) of each instruction.
    offsets: Vec<u32>,
    effects: Vec<Effect>,
    /// The body's span, for error messages.
    span: Range<u32>,
    /// Set when the body uses control the analysis does not model.
    all_live: bool,
    block_of: Vec<usize>,
    blocks: Vec<Block>,
    live_in: Vec<Bits>,
}

impl Liveness {
    /// Analyses `body`, a function with `params` parameters. Offsets, in
    /// questions and answers, are the module's byte offsets minus `base`
    /// (0 for offsets in the module file, the code section payload's start
    /// for the offsets DWARF uses).
    pub fn new(body: &FunctionBody<'_>, params: u32, base: usize) -> Result<Self, Error> {
        let rel = |abs: usize| (abs - base) as u32;
        let range = body.range();
        let span = rel(range.start)..rel(range.end);

        let mut count = u64::from(params);
        let mut locals = body.get_locals_reader()?;
        for _ in 0..locals.get_count() {
            count += u64::from(locals.read()?.0);
            if count > u64::from(MAX_LOCALS) {
                return Err(Error::TooManyLocals { count, limit: MAX_LOCALS });
            }
        }
        let num_locals = count as usize;

        let mut cfg = Cfg::new();
        let mut offsets = Vec::new();
        let mut effects = Vec::new();
        let mut all_live = false;
        let mut reader = body.get_operators_reader()?;
        while !reader.eof() {
            let (op, abs) = reader.read_with_offset()?;
            let (i, offset) = (offsets.len(), rel(abs));
            if cfg.frames.is_empty() {
                return Err(cfg.malformed(offset, "instructions after the function's final `end`"));
            }
            offsets.push(offset);
            let effect = match op {
                Operator::LocalGet { local_index } => Effect::Read(local_index),
                Operator::LocalSet { local_index } | Operator::LocalTee { local_index } => Effect::Write(local_index),
                _ => Effect::None,
            };
            if let Effect::Read(l) | Effect::Write(l) = effect {
                if l as usize >= num_locals {
                    return Err(cfg.malformed(offset, "an instruction names a local the function does not have"));
                }
            }
            effects.push(effect);
            // Past an unmodelled instruction the blocks no longer matter.
            if !all_live {
                all_live = !cfg.control(i, &op, offset)?;
            }
        }
        if !all_live && !cfg.frames.is_empty() {
            return Err(cfg.malformed(span.end, "the body ends before its final `end`"));
        }

        let mut block_of = vec![EXIT; offsets.len()];
        for (b, block) in cfg.blocks.iter().enumerate() {
            block_of[block.range.clone()].fill(b);
        }
        let mut analysis = Liveness {
            num_locals,
            offsets,
            effects,
            span,
            all_live,
            block_of,
            blocks: cfg.blocks,
            live_in: Vec::new(),
        };
        if !all_live {
            analysis.solve();
        }
        Ok(analysis)
    }

    /// Iterates `live_in = use ∪ (live_out − def)` to a fixed point.
    fn solve(&mut self) {
        let n = self.num_locals;
        // (use, def) of each block, from a forward walk.
        let summaries: Vec<(Bits, Bits)> = self
            .blocks
            .iter()
            .map(|block| {
                let (mut uses, mut defs) = (Bits::new(n), Bits::new(n));
                for effect in &self.effects[block.range.clone()] {
                    match *effect {
                        Effect::Read(l) if !defs.get(l) => uses.set(l, true),
                        Effect::Write(l) => defs.set(l, true),
                        _ => {}
                    }
                }
                (uses, defs)
            })
            .collect();
        // Later blocks first: most successors are then already final.
        let mut order: Vec<usize> = (0..self.blocks.len()).collect();
        order.sort_by_key(|&b| std::cmp::Reverse(self.blocks[b].range.start));
        self.live_in = vec![Bits::new(n); self.blocks.len()];
        let mut changed = true;
        while changed {
            changed = false;
            for &b in &order {
                let mut live = self.live_out(b);
                let (uses, defs) = &summaries[b];
                live.minus_union(defs, uses);
                if live != self.live_in[b] {
                    self.live_in[b] = live;
                    changed = true;
                }
            }
        }
    }

    fn live_out(&self, b: usize) -> Bits {
        let mut out = Bits::new(self.num_locals);
        for &s in &self.blocks[b].succs {
            out.union(&self.live_in[s]);
        }
        out
    }

    /// The locals (parameters first) that may be read before being written
    /// on some path that starts by executing the instruction at `offset`;
    /// `None` if no instruction of the body starts there.
    pub fn live_at(&self, offset: u32) -> Option<Vec<bool>> {
        let i = self.offsets.binary_search(&offset).ok()?;
        if self.all_live {
            return Some(vec![true; self.num_locals]);
        }
        let b = self.block_of[i];
        let mut live = self.live_out(b);
        for effect in self.effects[i..self.blocks[b].range.end].iter().rev() {
            match *effect {
                Effect::Read(l) => live.set(l, true),
                Effect::Write(l) => live.set(l, false),
                Effect::None => {}
            }
        }
        Some((0..self.num_locals as u32).map(|l| live.get(l)).collect())
    }

    /// The body's span, in the offsets of [`Liveness::new`].
    pub fn span(&self) -> Range<u32> {
        self.span.clone()
    }

    /// The offset of the body's first instruction.
    pub fn first_instruction(&self) -> Option<u32> {
        self.offsets.first().copied()
    }

    /// The basic blocks; `None` if the body uses control flow the analysis
    /// does not model (then every local is live everywhere).
    pub fn into_flow_graph(self) -> Option<FlowGraph> {
        if self.all_live {
            return None;
        }
        Some(FlowGraph {
            offsets: self.offsets,
            blocks: self.blocks.into_iter().map(|b| (b.range, b.succs)).collect(),
            block_of: self.block_of,
        })
    }
}

/// A fixed-size set of local indices.
#[derive(Clone, PartialEq, Eq)]
struct Bits(Vec<u64>);

impl Bits {
    fn new(n: usize) -> Self {
        Bits(vec![0; n.div_ceil(64)])
    }

    fn get(&self, l: u32) -> bool {
        self.0[l as usize / 64] & (1 << (l % 64)) != 0
    }

    fn set(&mut self, l: u32, on: bool) {
        let (word, bit) = (&mut self.0[l as usize / 64], 1u64 << (l % 64));
        *word = if on { *word | bit } else { *word & !bit };
    }

    fn union(&mut self, other: &Bits) {
        self.0.iter_mut().zip(&other.0).for_each(|(a, b)| *a |= b);
    }

    /// `self = (self − remove) ∪ add`.
    fn minus_union(&mut self, remove: &Bits, add: &Bits) {
        for ((a, r), u) in self.0.iter_mut().zip(&remove.0).zip(&add.0) {
            *a = (*a & !r) | u;
        }
    }
}

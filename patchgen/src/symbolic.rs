//! What each instruction of a function does to state outside its locals,
//! and what some locals hold in terms of the function's entry stack
//! pointer: the facts a frame retreat ([`crate::retreat`]) is decided on.
//!
//! One forward walk over the body keeps a symbolic operand stack. A value
//! is a constant, the stack pointer at the function's entry plus a known
//! offset (`Sp`), some address inside the function's own shadow-stack frame
//! (`Frame`: the stack pointer plus an index the walk does not know), or
//! unknown. clang addresses a frame only from the stack pointer it lowered
//! on entry, so a store whose address is `Sp` or `Frame` writes the
//! function's own frame; a pointer the function was given (a parameter, a
//! loaded value) is unknown, and a store through it is an effect outside
//! the frame. Indexing outside an object is undefined in C: an index added
//! to a frame address is assumed to stay in the frame.
//!
//! Locals are followed along the control flow: a branch carries the state
//! of the locals to its label, the states meeting at a construct's end or a
//! loop header are joined, and what loops carry back to their headers is
//! iterated to a fixed point. That gives the provenance of addresses (a
//! local may hold a frame address in one place and a caller's pointer in
//! another). The exact value of a local at one point is taken only from a
//! single definition that dominates it ([`Body::value_at`]). In structured
//! wasm a definition dominates a later instruction when every construct arm
//! around the definition also holds the later instruction (an `if`'s two
//! arms being distinct arms).
//!
//! Comparing two versions of a function (`Body::compare`), the walk also
//! follows which values may be computed differently from the other
//! version's (see `Taint`), and where each operand came from
//! ([`Instr::operands`]), so that a paired instruction can be checked to
//! work on the corresponding values.
//!
//! Anything the walk does not model (exception handling, stack switching,
//! an operator whose arity it cannot tell) makes the whole body unknown:
//! [`Body::analyse`] returns `None` and nothing retreats through it.

use std::collections::HashMap;

use wasmparser::{BlockType, FrameKind, MemArg, ModuleArity, Operator, SubType};

use crate::version::Version;

/// What the walk knows about one value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sym {
    /// Nothing yet (a local no definition has reached).
    Bottom,
    /// This constant (integers sign-extended to 64 bits).
    Const(i64),
    /// The stack pointer at the function's entry plus this offset.
    Sp(i64),
    /// Somewhere in the function's own shadow-stack frame.
    Frame,
    /// Anything.
    Unknown,
}

impl Sym {
    fn join(self, other: Sym) -> Sym {
        match (self, other) {
            (Sym::Bottom, x) | (x, Sym::Bottom) => x,
            (a, b) if a == b => a,
            (Sym::Sp(_) | Sym::Frame, Sym::Sp(_) | Sym::Frame) => Sym::Frame,
            _ => Sym::Unknown,
        }
    }

    fn is_frame(self) -> bool {
        matches!(self, Sym::Sp(_) | Sym::Frame)
    }
}

/// Where a memory access lands, for accesses into the function's frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameRange {
    /// Bytes `start..end` relative to the entry stack pointer.
    Static(i64, i64),
    /// Somewhere in the frame.
    Dynamic,
}

impl FrameRange {
    /// Whether the two may share a byte.
    pub fn overlaps(self, other: FrameRange) -> bool {
        match (self, other) {
            (FrameRange::Static(a, b), FrameRange::Static(c, d)) => a < d && c < b,
            _ => true,
        }
    }
}

/// What one instruction does beyond the operand stack and locals.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// Nothing.
    None,
    /// Reads the function's own frame.
    FrameLoad(FrameRange),
    /// Writes the function's own frame.
    FrameStore(FrameRange),
    /// Writes the stack pointer global.
    SetStackPointer,
    /// Calls this function directly.
    Call(u32),
    /// Has an effect outside the frame, described for people.
    Outside(String),
}

/// One instruction.
#[derive(Debug, Clone)]
pub struct Instr {
    /// Code offset (relative to the code section payload).
    pub offset: u32,
    /// What it does to memory, globals and other functions.
    pub access: Access,
    /// The local it writes and the value written.
    pub def: Option<(u32, Sym)>,
    /// The stack pointer global before it runs.
    pub sp: Sym,
    /// Whether it branches or opens or closes a construct.
    pub is_control: bool,
    /// Whether the value it leaves (or writes to a local) may differ from
    /// the compared version's.
    pub differs: bool,
    /// Where its operands came from, bottom of the stack first (control
    /// instructions' conditions left out).
    pub operands: Vec<Origin>,
    /// What it leaves on top of the operand stack, where the walk follows
    /// it (constants, arithmetic, locals, the stack pointer); else unknown.
    pub value: Sym,
    /// The innermost construct arm holding it.
    arm: u32,
}

/// The walk's result for one function body.
#[derive(Debug, Clone)]
pub struct Body {
    /// Every instruction in code order.
    pub instrs: Vec<Instr>,
    /// Parent of each construct arm; arm 0 is the function body.
    arm_parent: Vec<u32>,
    /// For each arm that is a loop's body, the index of its `loop`.
    arm_loop: Vec<Option<usize>>,
    /// Every loop: the indices of its `loop` and of its `end`.
    pub loops: Vec<(usize, usize)>,
    /// How many parameters the function has.
    pub params: u32,
    /// Whether the function ever writes the stack pointer global.
    pub writes_stack_pointer: bool,
    /// At each loop header (by the index of its `loop`), which locals may
    /// differ from the compared version's.
    headers: HashMap<usize, Vec<bool>>,
    /// Right before each call and futex wait (by its index), when
    /// comparing: the same, and the values on the operand stack, bottom
    /// first, arguments included.
    calls: HashMap<usize, AtCall>,
    /// At each loop header and right before each call (by index), the
    /// locals that hold the same constant on every path there.
    constants: HashMap<usize, Vec<(u32, i64)>>,
}

/// What the walk knows right before a call: the resume point a frame
/// waiting in the callee is saved at.
#[derive(Debug, Clone)]
pub(crate) struct AtCall {
    /// Which locals may differ from the compared version's.
    pub(crate) locals: Vec<bool>,
    /// Each operand on the stack: whether it may differ, and where it came
    /// from.
    pub(crate) stack: Vec<(bool, Origin)>,
}

/// Index of `__stack_pointer` among the module's globals.
pub fn stack_pointer_global(version: &Version) -> Option<u32> {
    version.info.globals.iter().position(|g| g.name.as_deref() == Some("__stack_pointer")).map(|i| i as u32)
}

impl Body {
    /// Walks defined function `func` of `version`; `None` if its body
    /// cannot be read or uses what the walk does not model.
    pub fn analyse(version: &Version, func: u32) -> Option<Body> {
        Body::compare(version, func, &[], &Default::default(), true)
    }

    /// [`Body::analyse`], following where values may differ from another
    /// version's given the instructions that differ (by index; indices past
    /// the end differ too). [`Body::differs_at_header`] then answers.
    pub(crate) fn compare(
        version: &Version,
        func: u32,
        differs: &[bool],
        transparent: &std::collections::HashSet<u32>,
        frame_layout_differs: bool,
    ) -> Option<Body> {
        let info = &version.info;
        let f = info.functions.get(func as usize)?;
        let range = f.body.clone()?;
        let base = info.code_section as usize;
        let bytes = version.wasm.get(base + range.start as usize..base + range.end as usize)?;
        let body = wasmparser::FunctionBody::new(wasmparser::BinaryReader::new(bytes, 0));
        let params = info.types.get(f.ty as usize)?.params.len() as u32;
        let num_locals = params as usize + f.locals.iter().map(|(n, _)| *n as usize).sum::<usize>();
        let mut ops = Vec::new();
        let mut reader = body.get_operators_reader().ok()?;
        while !reader.eof() {
            let (op, at) = reader.read_with_offset().ok()?;
            ops.push((op, range.start + at as u32));
        }
        let mut walk = Walk {
            version,
            sp_global: stack_pointer_global(version),
            entry: (0..num_locals)
                .map(|l| V(if (l as u32) < params { Sym::Unknown } else { Sym::Const(0) }, false, Origin::Local(l as u32)))
                .collect(),
            back_edges: HashMap::new(),
            sp_set_in_loop: false,
            taint: Taint {
                differs: differs.to_vec(),
                tracking: !differs.is_empty(),
                transparent: transparent.clone(),
                frame_layout_differs,
            },
        };
        // What loops carry back to their headers feeds the next pass:
        // iterate to a fixed point (the lattice is shallow; a body that does
        // not settle is given up on).
        for _ in 0..16 {
            let before = (walk.back_edges.clone(), walk.sp_set_in_loop);
            let body = walk.run(&ops, params)?;
            if (walk.back_edges.clone(), walk.sp_set_in_loop) == before {
                return Some(body);
            }
        }
        None
    }

    /// For the loop whose `loop` is instruction `at`, which locals may hold
    /// a value there that differs from the other version's (all of them if
    /// the walk did not compare).
    pub(crate) fn differs_at_header(&self, at: usize) -> Option<&[bool]> {
        self.headers.get(&at).map(Vec::as_slice)
    }

    /// For the call at instruction `at`, what may differ from the other
    /// version's right before it; `None` where the walk does not reach,
    /// or did not compare.
    pub(crate) fn at_call(&self, at: usize) -> Option<&AtCall> {
        self.calls.get(&at)
    }

    /// The instruction at code offset `offset`.
    pub fn index_of(&self, offset: u32) -> Option<usize> {
        self.instrs.binary_search_by_key(&offset, |i| i.offset).ok()
    }

    /// What `local` holds right before instruction `at`, if one definition
    /// that dominates `at` is the only one the function has.
    pub fn value_at(&self, local: u32, at: usize) -> Option<Sym> {
        if local < self.params {
            return None;
        }
        let mut defs = self.instrs.iter().enumerate().filter(|(_, i)| matches!(i.def, Some((l, _)) if l == local));
        let (d, def) = defs.next()?;
        if defs.next().is_some() || d >= at || !self.encloses(def.arm, self.instrs[at].arm) {
            return None;
        }
        def.def.map(|(_, sym)| sym).filter(|s| matches!(s, Sym::Const(_) | Sym::Sp(_)))
    }

    /// The constant `local` holds right before instruction `at` (a loop
    /// header or a call) on every path that reaches it: from one
    /// definition that dominates `at`, or from definitions that all write
    /// the same constant (a local the compiler keeps a global's address in
    /// and sets on each branch that leads there).
    pub fn constant_at(&self, local: u32, at: usize) -> Option<i64> {
        if let Some(Sym::Const(c)) = self.value_at(local, at) {
            return Some(c);
        }
        self.constants.get(&at)?.iter().find(|(l, _)| *l == local).map(|(_, c)| *c)
    }

    /// The `loop` instruction of the innermost loop holding instruction
    /// `at`, if any.
    pub fn innermost_loop(&self, at: usize) -> Option<usize> {
        let mut arm = self.instrs.get(at)?.arm;
        loop {
            if let Some(header) = self.arm_loop[arm as usize] {
                return Some(header);
            }
            if arm == 0 {
                return None;
            }
            arm = self.arm_parent[arm as usize];
        }
    }

    /// Whether arm `outer` is `inner` or one of its ancestors.
    fn encloses(&self, outer: u32, mut inner: u32) -> bool {
        loop {
            if inner == outer {
                return true;
            }
            if inner == 0 {
                return false;
            }
            inner = self.arm_parent[inner as usize];
        }
    }
}

/// The walk's state that outlives one pass.
struct Walk<'a> {
    version: &'a Version,
    sp_global: Option<u32>,
    /// Locals at the function's entry: parameters unknown, the rest zero.
    entry: Vec<V>,
    /// For each loop (by the index of its `loop`), the join of the local
    /// states its back edges carried in the last pass.
    back_edges: HashMap<usize, Vec<V>>,
    sp_set_in_loop: bool,
    taint: Taint,
}

/// An open construct during a pass.
struct Open {
    height: usize,
    results: usize,
    arm: u32,
    /// The `loop` instruction's index, for a loop.
    loop_at: Option<usize>,
    /// The join of the local states branching to the construct's end.
    at_end: State,
    /// For an `if`: the state its false edge starts from, until `else`.
    if_false: State,
}

/// A value during the walk: what it is, and whether it may differ from
/// the other version's value at the same instruction ([`Taint`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct V(Sym, bool, Origin);

/// Where a value came from, to tell whether a paired instruction of the
/// other version works on the corresponding values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Not followed.
    Unknown,
    /// The value this instruction (by index) produced, however it then
    /// moved through locals.
    Instr(usize),
    /// What the local holds where several definitions meet (or at entry).
    Local(u32),
}

/// Locals state: `None` where control cannot reach.
type State = Option<Vec<V>>;

fn join_states(a: State, b: &State) -> State {
    match (a, b) {
        (None, b) => b.clone(),
        (a, None) => a,
        (Some(mut a), Some(b)) => {
            for (l, (x, y)) in a.iter_mut().zip(b).enumerate() {
                let origin = if x.2 == y.2 { x.2 } else { Origin::Local(l as u32) };
                *x = V(x.0.join(y.0), x.1 || y.1, origin);
            }
            Some(a)
        }
    }
}

/// Where values may be computed differently from another version of the
/// function: from the instructions that have no partner in it, or call a
/// function that changed ([`crate::equivalence`]), through the operand
/// stack and locals. Memory is not followed: both versions read the same
/// memory (the new one runs on the old one's state), so a value loaded by
/// paired instructions from a paired address is what the new code would
/// have loaded. Nor is control: a value computed the same way means the
/// same whatever path led there (a `continue` the new version adds does
/// not change what the counter it skips counts). A frame address passed to
/// a callee points at the same object in both; an address the callee
/// returns into a frame that moves is caught when the frame is rebuilt.
#[derive(Debug, Clone, Default)]
struct Taint {
    /// Per instruction, whether it differs; empty when not comparing.
    differs: Vec<bool>,
    /// Whether instructions past the end of `differs` differ.
    tracking: bool,
    /// Locals only one version has, each written once: a compiler
    /// temporary between a value and its use. Moving a value through one
    /// changes nothing; its use is checked against the other version's
    /// ([`Instr::operands`]).
    transparent: std::collections::HashSet<u32>,
    /// Whether the frames in linear memory are laid out differently, so
    /// that a number computed from frame addresses may differ.
    frame_layout_differs: bool,
}

impl Walk<'_> {
    fn run(&mut self, ops: &[(Operator<'_>, u32)], params: u32) -> Option<Body> {
        let info = &self.version.info;
        let mut stack: Vec<V> = Vec::new();
        let mut unreachable = false;
        let mut arm_parent = vec![0u32];
        let mut arm_loop: Vec<Option<usize>> = vec![None];
        let mut loops = Vec::new();
        let mut open: Vec<Open> = vec![Open { height: 0, results: 0, arm: 0, loop_at: None, at_end: None, if_false: None }];
        let mut instrs = Vec::with_capacity(ops.len());
        let mut sp = Sym::Sp(0);
        let mut writes_sp = false;
        let mut loops_open = 0usize;
        let mut cur: State = Some(self.entry.clone());
        let mut back_edges: HashMap<usize, Vec<V>> = HashMap::new();
        let mut headers: HashMap<usize, Vec<bool>> = HashMap::new();
        let mut calls: HashMap<usize, AtCall> = HashMap::new();
        let mut constants: HashMap<usize, Vec<(u32, i64)>> = HashMap::new();
        let known = |locals: &[V]| -> Vec<(u32, i64)> {
            locals.iter().enumerate().filter_map(|(l, v)| if let Sym::Const(c) = v.0 { Some((l as u32, c)) } else { None }).collect()
        };
        // Sends the current state along a branch to label `depth`.
        let send = |open: &mut Vec<Open>, back_edges: &mut HashMap<usize, Vec<V>>, state: &State, depth: u32| -> Option<()> {
            let target = open.len().checked_sub(1 + depth as usize)?;
            let o = &mut open[target];
            match o.loop_at {
                Some(at) => {
                    if let Some(s) = join_states(back_edges.get(&at).cloned(), state) {
                        back_edges.insert(at, s);
                    }
                }
                None => o.at_end = join_states(o.at_end.take(), state),
            }
            Some(())
        };

        for (op, offset) in ops {
            let index = instrs.len();
            // Taint starts where the code differs from the other version.
            let differs = self.taint.differs.get(index).copied().unwrap_or(self.taint.tracking);
            let arm = open.last().map_or(0, |o| o.arm);
            let sp_before = if loops_open > 0 && self.sp_set_in_loop { Sym::Frame } else { sp };
            let mut access = Access::None;
            let mut def = None;
            let mut def_differs = false;
            let mut operands = Vec::new();
            let pop = |stack: &mut Vec<V>, unreachable: bool, height: usize| -> V {
                if stack.len() > height {
                    stack.pop().unwrap_or(V(Sym::Unknown, false, Origin::Unknown))
                } else {
                    debug_assert!(unreachable || stack.len() == height);
                    V(Sym::Unknown, false, Origin::Unknown)
                }
            };
            let height = open.last().map_or(0, |o| o.height);
            // A futex wait is an update point as a call is (the
            // instrumenter lowers it to a call of the host's wait), where a
            // thread stands blocked: a frame stopped there moves by the
            // same comparison. Only a comparison has anything to record: a
            // plain walk differs nowhere.
            let point = matches!(
                op,
                Operator::Call { .. }
                    | Operator::CallIndirect { .. }
                    | Operator::MemoryAtomicWait32 { .. }
                    | Operator::MemoryAtomicWait64 { .. }
            );
            if let (true, Some(locals), true) = (point, &cur, self.taint.tracking) {
                let stack = stack.iter().map(|v| (v.1, v.2)).collect();
                calls.insert(index, AtCall { locals: locals.iter().map(|v| v.1).collect(), stack });
            }
            if let (true, Some(locals)) = (point, &cur) {
                constants.insert(index, known(locals));
            }
            macro_rules! pop {
                () => {
                    pop(&mut stack, unreachable, height)
                };
            }
            match op {
                Operator::Block { blockty } | Operator::Loop { blockty } | Operator::If { blockty } => {
                    if matches!(op, Operator::If { .. }) {
                        pop!();
                    }
                    let (p, r) = self.block_arity(*blockty)?;
                    for _ in 0..p {
                        pop!();
                    }
                    let is_loop = matches!(op, Operator::Loop { .. });
                    let loop_at = is_loop.then_some(index);
                    arm_parent.push(arm);
                    arm_loop.push(loop_at);
                    let new_arm = arm_parent.len() as u32 - 1;
                    let if_false = matches!(op, Operator::If { .. }).then(|| cur.clone()).flatten();
                    if let Some(at) = loop_at {
                        cur = join_states(cur, &self.back_edges.get(&at).cloned());
                        if let Some(locals) = &cur {
                            headers.insert(at, locals.iter().map(|v| v.1).collect());
                            constants.insert(at, known(locals));
                        }
                    }
                    open.push(Open { height: stack.len(), results: r, arm: new_arm, loop_at, at_end: None, if_false });
                    stack.extend(std::iter::repeat_n(V(Sym::Unknown, differs, Origin::Unknown), p));
                    loops_open += usize::from(is_loop);
                }
                Operator::Else => {
                    let o = open.last_mut()?;
                    stack.truncate(o.height);
                    let parent = arm_parent[o.arm as usize];
                    arm_parent.push(parent);
                    arm_loop.push(None);
                    o.arm = arm_parent.len() as u32 - 1;
                    o.at_end = join_states(o.at_end.take(), &cur);
                    cur = o.if_false.take();
                    unreachable = false;
                }
                Operator::End => {
                    let o = open.pop()?;
                    // The construct's results: tainted if any value left
                    // for them is (branches carrying values are rare in C).
                    let tainted = differs || stack[o.height.min(stack.len())..].iter().any(|v| v.1);
                    stack.truncate(o.height);
                    stack.extend(std::iter::repeat_n(V(Sym::Unknown, tainted, Origin::Unknown), o.results));
                    loops_open -= usize::from(o.loop_at.is_some());
                    if let Some(at) = o.loop_at {
                        loops.push((at, index));
                    }
                    // An `if` without `else` also ends along its false edge.
                    cur = join_states(join_states(cur, &o.at_end), &o.if_false);
                    unreachable = cur.is_none();
                }
                Operator::Br { relative_depth } => {
                    send(&mut open, &mut back_edges, &cur, *relative_depth)?;
                    stack.truncate(height);
                    unreachable = true;
                    cur = None;
                }
                Operator::Return | Operator::Unreachable => {
                    stack.truncate(height);
                    unreachable = true;
                    cur = None;
                }
                Operator::BrTable { targets } => {
                    pop!();
                    for depth in targets.targets().chain(std::iter::once(Ok(targets.default()))) {
                        send(&mut open, &mut back_edges, &cur, depth.ok()?)?;
                    }
                    stack.truncate(height);
                    unreachable = true;
                    cur = None;
                }
                Operator::BrIf { relative_depth } => {
                    pop!();
                    send(&mut open, &mut back_edges, &cur, *relative_depth)?;
                }
                Operator::LocalGet { local_index } => {
                    let v = match &cur {
                        Some(locals) => *locals.get(*local_index as usize)?,
                        None => V(Sym::Unknown, false, Origin::Unknown),
                    };
                    // Reading a local computes nothing: whether the value
                    // read is the other version's is told by where it came
                    // from (its origin, checked where it is used) and by
                    // the definitions that reached the local, not by
                    // whether this read pairs with one of the other
                    // version's. Code that moved is paired piecemeal by the
                    // diff, and an unpaired read of a paired variable is
                    // no new value.
                    stack.push(v);
                }
                Operator::LocalSet { local_index } | Operator::LocalTee { local_index } => {
                    let moves = self.taint.transparent.contains(local_index);
                    let differs = differs && !moves;
                    let v = pop!();
                    operands.push(v.2);
                    // A literal stored in a local is its initial value: a
                    // local whose initialiser changed is still the same
                    // variable, as a global keeps its value when its
                    // initialiser changes.
                    let literal = matches!(v.0, Sym::Const(_));
                    let v = V(v.0, (v.1 || differs) && !literal, v.2);
                    if let Some(locals) = &mut cur {
                        *locals.get_mut(*local_index as usize)? = v;
                    }
                    def = Some((*local_index, v.0));
                    def_differs = v.1;
                    if matches!(op, Operator::LocalTee { .. }) {
                        stack.push(v);
                    }
                }
                Operator::GlobalGet { global_index } => {
                    let v = if Some(*global_index) == self.sp_global {
                        if loops_open > 0 && self.sp_set_in_loop {
                            Sym::Frame
                        } else {
                            sp
                        }
                    } else {
                        Sym::Unknown
                    };
                    stack.push(V(v, differs, Origin::Instr(index)));
                }
                Operator::GlobalSet { global_index } => {
                    let v = pop!();
                    if Some(*global_index) == self.sp_global {
                        writes_sp = true;
                        access = Access::SetStackPointer;
                        sp = if arm == 0 && v.0.is_frame() { v.0 } else { Sym::Frame };
                        if loops_open > 0 {
                            self.sp_set_in_loop = true;
                        }
                    } else {
                        let name = info.globals.get(*global_index as usize).and_then(|g| g.name.clone());
                        access = Access::Outside(match name {
                            Some(n) => format!("writes the wasm global `{n}`"),
                            None => format!("writes wasm global {global_index}"),
                        });
                    }
                }
                Operator::I32Const { value } => stack.push(V(Sym::Const(i64::from(*value)), differs, Origin::Instr(index))),
                Operator::I64Const { value } => stack.push(V(Sym::Const(*value), differs, Origin::Instr(index))),
                Operator::I32Add | Operator::I32Sub | Operator::I32Or | Operator::I32And | Operator::I32Mul => {
                    let b = pop!();
                    let a = pop!();
                    operands.extend([a.2, b.2]);
                    let value = arith(op, a.0, b.0);
                    // A frame address turned into a number depends on the
                    // frame's layout, which may differ.
                    let layout = self.taint.frame_layout_differs && (a.0.is_frame() || b.0.is_frame()) && !value.is_frame();
                    stack.push(V(value, a.1 || b.1 || differs || layout, Origin::Instr(index)));
                }
                Operator::Call { function_index } => {
                    let ty = info.types.get(info.functions.get(*function_index as usize)?.ty as usize)?;
                    let args: Vec<V> = (0..ty.params.len()).map(|_| pop!()).collect();
                    operands.extend(args.iter().rev().map(|a| a.2));
                    let taint = differs || args.iter().any(|a| a.1);
                    stack.extend(std::iter::repeat_n(V(Sym::Unknown, taint, Origin::Instr(index)), ty.results.len()));
                    access = Access::Call(*function_index);
                }
                Operator::CallIndirect { type_index, .. } => {
                    let ty = info.types.get(*type_index as usize)?;
                    let args: Vec<V> = (0..=ty.params.len()).map(|_| pop!()).collect();
                    operands.extend(args.iter().rev().map(|a| a.2));
                    let taint = differs || args.iter().any(|a| a.1);
                    stack.extend(std::iter::repeat_n(V(Sym::Unknown, taint, Origin::Instr(index)), ty.results.len()));
                    access = Access::Outside("makes an indirect call".into());
                }
                op if crate::liveness::leaves_from_calls(op) => return None,
                Operator::Throw { .. }
                | Operator::ThrowRef
                | Operator::ReturnCall { .. }
                | Operator::ReturnCallIndirect { .. }
                | Operator::ReturnCallRef { .. }
                | Operator::CallRef { .. }
                | Operator::BrOnNull { .. }
                | Operator::BrOnNonNull { .. }
                | Operator::BrOnCast { .. }
                | Operator::BrOnCastFail { .. } => return None,
                _ => {
                    let (p, r) = op.operator_arity(&NoModule)?;
                    let mut args: Vec<V> = (0..p).map(|_| pop!()).collect();
                    args.reverse();
                    operands.extend(args.iter().map(|a| a.2));
                    let syms: Vec<Sym> = args.iter().map(|v| v.0).collect();
                    let debug = &self.version.debug;
                    let global = |at: u64| u32::try_from(at).ok().and_then(|a| debug.global_at(a)).map(|g| g.name.clone());
                    access = memory_access(op, &syms, &global);
                    let inputs = args.iter().any(|v| v.1) || differs;
                    let result = match &access {
                        // A load's address picks the same object in both.
                        Access::FrameLoad(_) => inputs,
                        _ if touches_memory(op) => inputs,
                        // Comparing or converting frame addresses depends
                        // on the layout.
                        _ => inputs || (self.taint.frame_layout_differs && syms.iter().any(|s| s.is_frame())),
                    };
                    stack.extend(std::iter::repeat_n(V(Sym::Unknown, result, Origin::Instr(index)), r as usize));
                }
            }
            let pushed = if stack.len() > height_after(&open) { stack.last().map_or(Sym::Unknown, |v| v.0) } else { Sym::Unknown };
            let is_control = matches!(
                op,
                Operator::Block { .. }
                    | Operator::Loop { .. }
                    | Operator::If { .. }
                    | Operator::Else
                    | Operator::End
                    | Operator::Br { .. }
                    | Operator::BrIf { .. }
                    | Operator::BrTable { .. }
                    | Operator::Return
                    | Operator::Unreachable
            );
            let differs = def_differs || (stack.len() > height_after(&open) && stack.last().is_some_and(|v| v.1));
            instrs.push(Instr { offset: *offset, access, def, sp: sp_before, value: pushed, is_control, differs, operands, arm });
        }
        self.back_edges = back_edges;
        Some(Body { instrs, arm_parent, arm_loop, loops, params, writes_stack_pointer: writes_sp, headers, calls, constants })
    }

    fn block_arity(&self, ty: BlockType) -> Option<(usize, usize)> {
        match ty {
            BlockType::Empty => Some((0, 0)),
            BlockType::Type(_) => Some((0, 1)),
            BlockType::FuncType(i) => {
                let t = self.version.info.types.get(i as usize)?;
                Some((t.params.len(), t.results.len()))
            }
        }
    }
}

/// The operand stack height below which the innermost construct's values
/// do not reach.
fn height_after(open: &[Open]) -> usize {
    open.last().map_or(0, |o| o.height)
}

/// The value of a 32-bit arithmetic instruction on symbolic operands.
fn arith(op: &Operator<'_>, a: Sym, b: Sym) -> Sym {
    let wrap = |v: i64| i64::from(v as i32);
    match (op, a, b) {
        (Operator::I32Add, Sym::Const(x), Sym::Const(y)) => Sym::Const(wrap(x.wrapping_add(y))),
        (Operator::I32Sub, Sym::Const(x), Sym::Const(y)) => Sym::Const(wrap(x.wrapping_sub(y))),
        (Operator::I32Mul, Sym::Const(x), Sym::Const(y)) => Sym::Const(wrap(x.wrapping_mul(y))),
        (Operator::I32Or, Sym::Const(x), Sym::Const(y)) => Sym::Const(wrap(x | y)),
        (Operator::I32And, Sym::Const(x), Sym::Const(y)) => Sym::Const(wrap(x & y)),
        (Operator::I32Add, Sym::Sp(k), Sym::Const(c)) | (Operator::I32Add, Sym::Const(c), Sym::Sp(k)) => Sym::Sp(k + c),
        (Operator::I32Sub, Sym::Sp(k), Sym::Const(c)) => Sym::Sp(k - c),
        // The stack pointer is 16-byte aligned (the wasm32 C ABI), so an
        // `or` of small bits into an address whose low bits are known to
        // be clear is an add: clang emits it for fields of aligned objects.
        (Operator::I32Or, Sym::Sp(k), Sym::Const(c)) | (Operator::I32Or, Sym::Const(c), Sym::Sp(k))
            if (0..16).contains(&c) && (k & 15 & c) == 0 =>
        {
            Sym::Sp(k + c)
        }
        (Operator::I32Sub, a, b) if a.is_frame() && b.is_frame() => Sym::Unknown,
        (Operator::I32Add | Operator::I32Sub | Operator::I32And, f, _) if f.is_frame() => Sym::Frame,
        (Operator::I32Add, _, f) if f.is_frame() => Sym::Frame,
        _ => Sym::Unknown,
    }
}

/// The memory access of an instruction the walk did not handle itself,
/// given its operands (bottom first).
fn memory_access(op: &Operator<'_>, args: &[Sym], global: &dyn Fn(u64) -> Option<String>) -> Access {
    let at = |memarg: &MemArg, width: u32, addr: Sym| -> Option<FrameRange> {
        match addr {
            Sym::Sp(k) => {
                let start = k + memarg.offset as i64;
                let end = start + i64::from(width);
                // At or above the entry stack pointer lies the caller's frame.
                (end <= 0).then_some(FrameRange::Static(start, end))
            }
            Sym::Frame => Some(FrameRange::Dynamic),
            _ => None,
        }
    };
    let load = |memarg: &MemArg, width: u32| match at(memarg, width, args[0]) {
        Some(r) => Access::FrameLoad(r),
        None => Access::None,
    };
    let store = |memarg: &MemArg, width: u32| match at(memarg, width, args[0]) {
        Some(r) => Access::FrameStore(r),
        None => Access::Outside(describe_store(args[0], memarg.offset, global)),
    };
    use Operator as O;
    match op {
        O::I32Load { memarg } | O::F32Load { memarg } | O::I64Load32S { memarg } | O::I64Load32U { memarg } => load(memarg, 4),
        O::I64Load { memarg } | O::F64Load { memarg } => load(memarg, 8),
        O::I32Load8S { memarg } | O::I32Load8U { memarg } | O::I64Load8S { memarg } | O::I64Load8U { memarg } => load(memarg, 1),
        O::I32Load16S { memarg } | O::I32Load16U { memarg } | O::I64Load16S { memarg } | O::I64Load16U { memarg } => {
            load(memarg, 2)
        }
        O::V128Load { memarg } => load(memarg, 16),
        O::I32Store { memarg } | O::F32Store { memarg } | O::I64Store32 { memarg } => store(memarg, 4),
        O::I64Store { memarg } | O::F64Store { memarg } => store(memarg, 8),
        O::I32Store8 { memarg } | O::I64Store8 { memarg } => store(memarg, 1),
        O::I32Store16 { memarg } | O::I64Store16 { memarg } => store(memarg, 2),
        O::V128Store { memarg } => store(memarg, 16),
        O::MemoryFill { .. } | O::MemoryCopy { .. } | O::MemoryInit { .. } => match args[0] {
            Sym::Sp(_) | Sym::Frame => Access::FrameStore(FrameRange::Dynamic),
            other => Access::Outside(format!("fills or copies {}", describe_target(other, 0, global))),
        },
        O::MemoryGrow { .. } => Access::Outside("grows memory".into()),
        O::DataDrop { .. } | O::ElemDrop { .. } => Access::Outside("drops a segment".into()),
        O::TableSet { .. } | O::TableGrow { .. } | O::TableFill { .. } | O::TableCopy { .. } | O::TableInit { .. } => {
            Access::Outside("writes a table".into())
        }
        // Every other operator that touches memory (atomics, lane stores)
        // counts as writing it: a retreat needs proof, not likelihood.
        other if touches_memory(other) => Access::Outside("accesses memory atomically or by lanes".into()),
        _ => Access::None,
    }
}

fn touches_memory(op: &Operator<'_>) -> bool {
    let name = format!("{op:?}");
    name.contains("Atomic") || name.contains("Store") || name.contains("Load") && name.contains("Lane")
}

fn describe_store(addr: Sym, offset: u64, global: &dyn Fn(u64) -> Option<String>) -> String {
    format!("stores to {}", describe_target(addr, offset, global))
}

fn describe_target(addr: Sym, offset: u64, global: &dyn Fn(u64) -> Option<String>) -> String {
    match addr {
        Sym::Const(c) => {
            let at = (c as u64).wrapping_add(offset);
            match global(at) {
                Some(name) => format!("the global variable `{name}`"),
                None => format!("memory at address {at:#x}"),
            }
        }
        Sym::Sp(_) | Sym::Frame => "its caller's frame".into(),
        _ => "memory outside its frame (through a pointer)".into(),
    }
}

/// Arity of everything but control flow, calls and references: the walk
/// handles those itself, so they need no module.
struct NoModule;

impl ModuleArity for NoModule {
    fn sub_type_at(&self, _: u32) -> Option<&SubType> {
        None
    }
    fn tag_type_arity(&self, _: u32) -> Option<(u32, u32)> {
        None
    }
    fn type_index_of_function(&self, _: u32) -> Option<u32> {
        None
    }
    fn func_type_of_cont_type(&self, _: &wasmparser::ContType) -> Option<&wasmparser::FuncType> {
        None
    }
    fn sub_type_of_ref_type(&self, _: &wasmparser::RefType) -> Option<&SubType> {
        None
    }
    fn control_stack_height(&self) -> u32 {
        0
    }
    fn label_block(&self, _: u32) -> Option<(BlockType, FrameKind)> {
        None
    }
}

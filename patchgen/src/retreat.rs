//! When a frame may go back to the header of its innermost loop.
//!
//! A server's main loop never leaves the stack, so a release that changes
//! its body must be applied where it stands: usually inside a blocking call
//! (`poll`, `accept`, `recv`) reached from the loop. If nothing done since
//! the loop header can be seen outside the frame, the frame can be moved
//! back to the header and the new version can run the iteration from there,
//! making the blocking call itself. Two questions decide it, both asked of
//! the old version's code ([`crate::symbolic`] says what each instruction
//! does):
//!
//! - **Discard**: a frame above the retreating one (the blocking call's
//!   wrapper, `poll` in libc) is dropped whole. Every instruction on a path
//!   from its entry to its point may touch only its own locals and its own
//!   shadow-stack frame (which lies below the stack pointer the retreat
//!   restores), and call only functions that do nothing else either
//!   ([`Analyser::call_effect`]). The innermost such frame waits in a
//!   blocking import, which the host interrupted before it did anything:
//!   the call is restartable. A point the function can pass twice (a call
//!   inside a loop) is refused: an earlier call may have had its effect.
//! - **Retreat**: the frame itself. Every instruction on a path from the
//!   loop header to the point (within one iteration) obeys the same rule,
//!   may not move the stack pointer, and may write its own frame's memory
//!   only where that path does not also read it (a read-modify-write of a
//!   frame variable would happen twice). Locals the path writes no longer
//!   hold their header values: [`RetreatPath::redefined`].
//!
//! Writes through pointers the function was given, to globals, to wasm
//! globals other than the stack pointer, calls to imports or through
//! tables: all refuse. The analysis errs towards refusing; a refused
//! retreat only means the update waits for the frame to move by the other
//! rules, or is refused at its timeout with the reason.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::rc::Rc;

use crate::liveness::{flow_graph, FlowGraph};
use crate::symbolic::{Access, Body, Sym};
use crate::version::Version;

/// How to find the stack pointer a frame's function had at its entry, from
/// the saved frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryStackPointer {
    /// Local `local` holds the entry stack pointer plus `offset`.
    Local {
        /// The local.
        local: u32,
        /// What the function added to the entry stack pointer.
        offset: i64,
    },
    /// The function never moves the stack pointer: it is the same at its
    /// entry as at its point.
    AtPoint,
}

/// A frame that may be dropped when a frame below it retreats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Discard {
    /// How to recover its entry stack pointer.
    pub entry: EntryStackPointer,
    /// Whether it waits in a blocking import (the innermost frame must).
    pub blocking: bool,
}

/// The path of a frame from its loop header to its point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetreatPath {
    /// Code offset of the `loop` instruction.
    pub header: u32,
    /// Locals written between the header and the point.
    pub redefined: HashSet<u32>,
    /// The stack pointer at the header, relative to the entry one.
    pub stack_at_header: i64,
    /// How to recover the entry stack pointer.
    pub entry: EntryStackPointer,
    /// Whether the frame stands at the header already (paused there): no
    /// path, nothing dropped.
    pub at_header: bool,
}

/// One function's code, as the retreat questions need it.
pub(crate) struct Code {
    pub(crate) body: Body,
    graph: FlowGraph,
}

/// Answers retreat questions about one version, caching per function.
pub struct Analyser<'a> {
    version: &'a Version,
    code: RefCell<HashMap<u32, Option<Rc<Code>>>>,
    effects: RefCell<HashMap<u32, Option<String>>>,
}

impl<'a> Analyser<'a> {
    /// An analyser of `version`'s code.
    pub fn new(version: &'a Version) -> Self {
        Analyser { version, code: RefCell::default(), effects: RefCell::default() }
    }

    /// The analysed code of defined function `func`; `None` if it is
    /// imported or uses what the analyses do not model.
    pub(crate) fn code(&self, func: u32) -> Option<Rc<Code>> {
        if let Some(c) = self.code.borrow().get(&func) {
            return c.clone();
        }
        let code = (|| {
            let body = Body::analyse(self.version, func)?;
            let graph = flow_graph(&self.version.wasm, func).ok()??;
            // Both walk the same operators; anything else is a bug that
            // must not turn into a wrong answer.
            let same = graph.offsets.len() == body.instrs.len()
                && graph.offsets.iter().zip(&body.instrs).all(|(o, i)| *o == i.offset);
            same.then(|| Rc::new(Code { body, graph }))
        })();
        self.code.borrow_mut().insert(func, code.clone());
        code
    }

    fn name(&self, func: u32) -> String {
        self.version.info.function_name(func)
    }

    /// Why calling `func` may change state outside the caller's frame, or
    /// `None` if it cannot: nothing it reaches through direct calls stores
    /// outside its own frame, writes a global, grows memory, calls an
    /// import or calls through a table.
    pub fn call_effect(&self, func: u32) -> Option<String> {
        if let Some(e) = self.effects.borrow().get(&func) {
            return e.clone();
        }
        let mut seen = HashSet::from([func]);
        let mut todo = vec![func];
        let mut effect = None;
        'search: while let Some(f) = todo.pop() {
            if f < self.version.info.imported_functions {
                effect = Some(format!("calls the import `{}`", self.name(f)));
                break;
            }
            let Some(code) = self.code(f) else {
                effect = Some(format!("calls `{}`, whose code cannot be analysed", self.name(f)));
                break;
            };
            for instr in &code.body.instrs {
                match &instr.access {
                    Access::Outside(what) => {
                        effect = Some(match f == func {
                            true => what.clone(),
                            false => format!("calls `{}`, which {what}", self.name(f)),
                        });
                        break 'search;
                    }
                    Access::Call(g) => {
                        if seen.insert(*g) {
                            todo.push(*g);
                        }
                    }
                    _ => {}
                }
            }
        }
        self.effects.borrow_mut().insert(func, effect.clone());
        effect
    }

    /// Whether a frame of `func` saved at the call at `offset` (a code
    /// offset) may be dropped, and how to find its entry stack pointer.
    pub fn discard(&self, func: u32, offset: u32, blocking: bool) -> Result<Discard, String> {
        let code = self.code(func).ok_or("its code cannot be analysed")?;
        let point = code.body.index_of(offset).ok_or("its point is not an instruction")?;
        let blocks = &code.graph;
        let target = blocks.block_of[point];
        if reachable_from_successors(blocks, target, None).contains(&target) {
            return Err("the call is inside a loop: an earlier call may already have had its effect".into());
        }
        let path = path_instructions(blocks, 1, None, point);
        for &i in &path {
            match &code.body.instrs[i].access {
                Access::None | Access::FrameLoad(_) | Access::FrameStore(_) | Access::SetStackPointer => {}
                Access::Call(g) => {
                    if let Some(why) = self.call_effect(*g) {
                        return Err(format!("before the call it calls `{}`, which {why}", self.name(*g)));
                    }
                }
                Access::Outside(what) => return Err(format!("before the call it {what}")),
            }
        }
        Ok(Discard { entry: entry_stack_pointer(&code.body, point)?, blocking })
    }

    /// The path of a frame of `func` saved at the call at `offset` back to
    /// the header of its innermost loop, if it can retreat there.
    pub fn retreat_path(&self, func: u32, offset: u32) -> Result<RetreatPath, String> {
        let code = self.code(func).ok_or("its code cannot be analysed")?;
        let body = &code.body;
        let point = body.index_of(offset).ok_or("its point is not an instruction")?;
        let header = body.innermost_loop(point).ok_or("it is in no loop")?;
        let stack_at_header = match body.instrs[header].sp {
            Sym::Sp(k) => k,
            _ => return Err("its stack pointer at the loop header is not known".into()),
        };
        let mut redefined = HashSet::new();
        let (mut stores, mut loads) = (Vec::new(), Vec::new());
        for i in path_instructions(&code.graph, code.graph.block_of[header], Some(header), point) {
            let instr = &body.instrs[i];
            if let Some((local, _)) = instr.def {
                redefined.insert(local);
            }
            match &instr.access {
                Access::None => {}
                Access::FrameLoad(r) => loads.push(*r),
                Access::FrameStore(r) => stores.push(*r),
                Access::SetStackPointer => return Err("between its loop header and the call it moves the stack pointer".into()),
                Access::Call(g) => {
                    if let Some(why) = self.call_effect(*g) {
                        return Err(format!(
                            "between its loop header and the call it calls `{}`, which {why}",
                            self.name(*g)
                        ));
                    }
                }
                Access::Outside(what) => return Err(format!("between its loop header and the call it {what}")),
            }
        }
        if stores.iter().any(|s| loads.iter().any(|l| s.overlaps(*l))) {
            return Err(
                "between its loop header and the call it reads and writes the same memory of its frame: running that part again would not do the same"
                    .into(),
            );
        }
        Ok(RetreatPath {
            header: body.instrs[header].offset,
            redefined,
            stack_at_header,
            entry: entry_stack_pointer(body, point)?,
            at_header: false,
        })
    }

    /// The trivial path of a frame of `func` paused at the loop header at
    /// `offset`, for rebuilding it there by the rules of a retreat.
    pub fn at_header(&self, func: u32, offset: u32) -> Result<RetreatPath, String> {
        let code = self.code(func).ok_or("its code cannot be analysed")?;
        let at = code.body.index_of(offset).ok_or("its point is not an instruction")?;
        let stack_at_header = match code.body.instrs[at].sp {
            Sym::Sp(k) => k,
            _ => return Err("its stack pointer at the loop header is not known".into()),
        };
        Ok(RetreatPath {
            header: offset,
            redefined: HashSet::new(),
            stack_at_header,
            entry: entry_stack_pointer(&code.body, at)?,
            at_header: true,
        })
    }
}

/// How a frame saved at instruction `point` tells its entry stack pointer.
pub(crate) fn entry_stack_pointer(body: &Body, point: usize) -> Result<EntryStackPointer, String> {
    let locals = body.instrs.iter().filter_map(|i| i.def.map(|(l, _)| l)).collect::<HashSet<_>>();
    let mut candidates: Vec<u32> = locals.into_iter().collect();
    candidates.sort_unstable();
    for local in candidates {
        if let Some(Sym::Sp(offset)) = body.value_at(local, point) {
            return Ok(EntryStackPointer::Local { local, offset });
        }
    }
    if !body.writes_stack_pointer {
        return Ok(EntryStackPointer::AtPoint);
    }
    Err("it moves the stack pointer and keeps no copy of it that the analysis can read".into())
}

/// The blocks reachable from `from`'s successors, never entering `avoid`.
fn reachable_from_successors(graph: &FlowGraph, from: usize, avoid: Option<usize>) -> HashSet<usize> {
    let mut seen = HashSet::new();
    let mut todo: Vec<usize> = graph.blocks[from].1.clone();
    while let Some(b) = todo.pop() {
        if Some(b) == avoid || !seen.insert(b) {
            continue;
        }
        todo.extend(graph.blocks[b].1.iter().copied());
    }
    seen
}

/// The instructions on some path from the start of block `start` (from
/// instruction `first` if given) to instruction `point`, excluding the
/// point, and never passing through `start` again when `first` is given (a
/// loop header: one iteration).
fn path_instructions(graph: &FlowGraph, start: usize, first: Option<usize>, point: usize) -> Vec<usize> {
    let avoid = first.map(|_| start);
    let mut forward = reachable_from_successors(graph, start, avoid);
    forward.insert(start);
    // Predecessors, for the backward half.
    let mut preds: HashMap<usize, Vec<usize>> = HashMap::new();
    for (b, (_, succs)) in graph.blocks.iter().enumerate() {
        for &s in succs {
            if Some(s) != avoid {
                preds.entry(s).or_default().push(b);
            }
        }
    }
    let target = graph.block_of[point];
    let mut backward = HashSet::from([target]);
    let mut todo = vec![target];
    while let Some(b) = todo.pop() {
        if Some(b) == avoid {
            continue;
        }
        for &p in preds.get(&b).into_iter().flatten() {
            if backward.insert(p) {
                todo.push(p);
            }
        }
    }
    let mut out = Vec::new();
    for b in forward.intersection(&backward) {
        let range = graph.blocks[*b].0.clone();
        let lo = if *b == start { first.unwrap_or(range.start).max(range.start) } else { range.start };
        let hi = if *b == target { point } else { range.end };
        out.extend(lo..hi.max(lo));
    }
    out.sort_unstable();
    out
}

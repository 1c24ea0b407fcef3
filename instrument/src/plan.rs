//! The shape of one instrumented function: its resume points, and for every
//! block level on the way to one of them, the "anchors" the rewind dispatch
//! must be able to jump to.
//!
//! A *level* is the instruction sequence of the function body, of a block or
//! loop, or of one arm of an `if`. An *anchor* of a level is an instruction
//! directly in it that is a resume point (a call) or a construct containing
//! one. Rewinding enters each level at its start and jumps straight to the
//! anchor on the path to the saved resume point; see the crate docs. A
//! level that starts with a plain block anchor *defers*: its jump is taken
//! by the dispatch of that block's level, so a chain of such levels (a
//! `switch` nest) tests the state once.

use std::collections::HashMap;
use std::ops::Range;

use crate::abi::{ResumeKind, ValType as Ty};
use crate::analysis::{Body, ModuleInfo, SiteKind};
use crate::callgraph::CallGraph;
use crate::error::{internal, Result};
use crate::liveness::Liveness;

/// A resume point.
pub(crate) struct Rp {
    pub kind: ResumeKind,
    pub offset: usize,
    pub callee: u32,
    pub ordinal: u32,
    /// Types of the saved operands: the flat stack positions `0..len`.
    pub saved: Vec<Ty>,
    /// The locals live at the point ([`crate::liveness`]), in slot order
    /// (by type, then index): the only ones whose values its frame saves
    /// and its rewind restores.
    pub locals: Vec<u32>,
    /// The locals its frame has slots for, in slot order: `locals`, and
    /// any others its save class has ([`crate::slots`]), which hold zero.
    pub slots: Vec<u32>,
}

/// A *save class*: the resume points whose frames hold the same slots (the
/// same locals, then operands of the same types) share one piece of
/// unwind code, so the class count, not the point count, sets its size.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct SaveClass {
    /// Locals with a slot, in slot order.
    pub locals: Vec<u32>,
    /// Types of the operands saved after them.
    pub operands: Vec<Ty>,
}

/// What an anchor is.
pub(crate) enum AnchorKind {
    /// A call resume point.
    Call { rp: u32 },
    /// A block, loop or if containing resume points `rps`; for an `if`,
    /// `else_from` is the first resume point of the else arm; for a loop
    /// whose header is an update point, `header_rp` is that point (the
    /// first of `rps`).
    Construct { rps: Range<u32>, is_if: bool, is_loop: bool, else_from: u32, header_rp: Option<u32> },
}

/// An anchor: where it sits and what the stack looks like there.
pub(crate) struct Anchor {
    pub kind: AnchorKind,
    /// The whole operand stack before the instruction.
    pub stack: Vec<Ty>,
    /// Height of the enclosing level's frame.
    pub base: u32,
    /// How many values the instruction consumes from the top of the stack.
    pub consumed: u32,
    /// Types the instruction leaves in place of the consumed values.
    pub results: Vec<Ty>,
}

impl Anchor {
    /// Stack height before the instruction.
    pub fn height(&self) -> u32 {
        self.stack.len() as u32
    }
    /// Types of the consumed values.
    pub fn consumed_types(&self) -> &[Ty] {
        &self.stack[(self.height() - self.consumed) as usize..]
    }
    /// Number of values of the level that must survive the instruction
    /// (the level's part of the stack below the consumed values).
    pub fn kept(&self) -> u32 {
        self.height() - self.consumed - self.base
    }
}

/// A level with at least one anchor or a loop header resume point.
pub(crate) struct Level {
    /// The level's params (block params), on the stack at its start.
    pub params: Vec<Ty>,
    /// Height of the level's frame (params excluded).
    pub base: u32,
    /// Its anchors in code order (indices into [`Plan::anchors`]).
    pub anchors: Vec<usize>,
    /// The loop header resume point, for the body of a reachable loop.
    pub loop_rp: Option<u32>,
    /// Resume points inside the level.
    pub rps: Range<u32>,
    /// Operator index of the level's first instruction.
    pub first_op: u32,
    /// The level hands its rewind dispatch to the level of its first anchor
    /// (see [`Level::defers`]).
    pub defer: bool,
}

impl Level {
    /// Whether the level can leave its rewind test to the level of its first
    /// anchor: that anchor is its first instruction, a plain `block` that
    /// neither takes nor leaves operands below it, and the level is not a
    /// loop body (whose header check runs on every iteration and is also its
    /// dispatch). Nothing then runs between the two level starts, so one test
    /// at the inner start sees the same state as a test at the outer one.
    fn defers(&self, anchors: &[Anchor], anchor_at: &HashMap<u32, usize>) -> bool {
        let Some(&first) = self.anchors.first() else { return false };
        let a = &anchors[first];
        self.loop_rp.is_none()
            && anchor_at.get(&self.first_op) == Some(&first)
            && matches!(a.kind, AnchorKind::Construct { is_if: false, is_loop: false, .. })
            && a.consumed == 0
            && a.kept() == 0
    }
}

/// Where levels start, by operator index: the top level starts at "before
/// operator 0", the others right after their `block`/`loop`/`if`/`else`.
pub(crate) struct Plan {
    pub rps: Vec<Rp>,
    pub anchors: Vec<Anchor>,
    /// Anchor index by operator index.
    pub anchor_at: HashMap<u32, usize>,
    pub levels: Vec<Level>,
    /// The level starting after the operator with this index.
    pub level_after: HashMap<u32, usize>,
    /// The function body's level.
    pub top: usize,
    /// The function's result types.
    pub results: Vec<Ty>,
    /// Its entry is an update point ([`CallGraph::entry_checked`]), not only
    /// a resume point.
    pub entry_checked: bool,
}

struct Open {
    /// Operator index that starts the level (None for the top level).
    start: Option<u32>,
    params: Vec<Ty>,
    base: u32,
    anchors: Vec<usize>,
    loop_rp: Option<u32>,
    first_rp: u32,
    /// Operator index of the level's first instruction.
    first_op: u32,
    /// The construct this level belongs to: (site index, first rp of the construct).
    construct: Option<(usize, u32)>,
    else_from: Option<u32>,
}

/// Builds the plan of an instrumented function.
/// `shapes` are the save helpers' slot types so far ([`crate::slots`]).
pub(crate) fn plan(info: &ModuleInfo<'_>, graph: &CallGraph, body: &Body, shapes: &mut crate::slots::Shapes) -> Result<Plan> {
    let fty = info.func_type(body.func);
    let results = crate::analysis::tys(fty.results(), body.range.start)?;
    let mut rps: Vec<Rp> = Vec::new();
    let mut anchors: Vec<Anchor> = Vec::new();
    let mut anchor_at = HashMap::new();
    let mut levels: Vec<Level> = Vec::new();
    let mut level_after = HashMap::new();
    let mut ordinals: HashMap<(u8, u32), u32> = HashMap::new();
    // A function on a call cycle gets a resume point at its entry, which
    // the rewrite treats like a loop header around the whole body (checked
    // on each call only in the feedback set, `CallGraph::entry_checked`).
    let mut entry_rp = None;
    if graph.recursive[body.func as usize] {
        rps.push(Rp {
            kind: ResumeKind::Entry,
            offset: body.range.start,
            callee: u32::MAX,
            ordinal: 0,
            saved: vec![],
            locals: vec![],
            slots: vec![],
        });
        entry_rp = Some(0);
    }
    let mut open = vec![Open {
        start: None,
        params: vec![],
        base: 0,
        anchors: vec![],
        loop_rp: entry_rp,
        first_rp: 0,
        first_op: 0,
        construct: None,
        else_from: None,
    }];
    let mut top = None;

    let close_level = |o: &mut Open, next_rp: u32, levels: &mut Vec<Level>| -> Option<usize> {
        if o.anchors.is_empty() && o.loop_rp.is_none() {
            return None;
        }
        levels.push(Level {
            params: std::mem::take(&mut o.params),
            base: o.base,
            anchors: std::mem::take(&mut o.anchors),
            loop_rp: o.loop_rp,
            rps: o.first_rp..next_rp,
            first_op: o.first_op,
            defer: false,
        });
        Some(levels.len() - 1)
    };

    for (si, site) in body.sites.iter().enumerate() {
        let key = match site.kind {
            SiteKind::Loop { .. } => (0u8, 0),
            SiteKind::Call { func } => (1, func),
            SiteKind::CallIndirect { ty } => (2, ty),
            _ => (3, 0),
        };
        let ordinal = if key.0 < 3 {
            let o = ordinals.entry(key).or_insert(0);
            *o += 1;
            *o - 1
        } else {
            0
        };
        let kind = graph.resume_kind(body.func, site);
        let next_rp = rps.len() as u32;
        match &site.kind {
            SiteKind::Call { .. } | SiteKind::CallIndirect { .. } => {
                let Some(kind) = kind else { continue };
                let (callee, fparams, fresults, extra) = match site.kind {
                    SiteKind::Call { func } => {
                        let t = info.func_type(func);
                        (func, t.params(), t.results(), 0)
                    }
                    SiteKind::CallIndirect { ty } => {
                        let t = &info.types[ty as usize];
                        (ty, t.params(), t.results(), 1)
                    }
                    _ => unreachable!(),
                };
                let consumed = fparams.len() as u32 + extra;
                let h = site.stack.len() as u32;
                let saved_len = match kind {
                    ResumeKind::Call => h - consumed,
                    _ => h,
                };
                rps.push(Rp {
                    kind,
                    offset: site.offset,
                    callee,
                    ordinal,
                    saved: site.stack[..saved_len as usize].to_vec(),
                    locals: vec![],
                    slots: vec![],
                });
                anchors.push(Anchor {
                    kind: AnchorKind::Call { rp: next_rp },
                    stack: site.stack.clone(),
                    base: site.frame_height,
                    consumed,
                    results: crate::analysis::tys(fresults, site.offset)?,
                });
                anchor_at.insert(site.op_index, anchors.len() - 1);
                open.last_mut().ok_or_else(|| internal("no open level"))?.anchors.push(anchors.len() - 1);
            }
            SiteKind::Block { params, .. } | SiteKind::Loop { params, .. } | SiteKind::If { params, .. } => {
                let is_if = matches!(site.kind, SiteKind::If { .. });
                let consumed = params.len() as u32 + is_if as u32;
                let base = (site.stack.len() as u32).saturating_sub(consumed);
                let mut loop_rp = None;
                if let Some(ResumeKind::Loop) = kind {
                    let callee = match site.kind {
                        SiteKind::Loop { type_index, .. } => type_index.unwrap_or(u32::MAX),
                        _ => u32::MAX,
                    };
                    rps.push(Rp {
                        kind: ResumeKind::Loop,
                        offset: site.offset,
                        callee,
                        ordinal,
                        saved: site.stack.clone(),
                        locals: vec![],
                        slots: vec![],
                    });
                    loop_rp = Some(next_rp);
                }
                open.push(Open {
                    start: Some(site.op_index),
                    params: params.clone(),
                    base,
                    anchors: vec![],
                    loop_rp,
                    first_rp: next_rp,
                    first_op: site.op_index + 1,
                    construct: Some((si, next_rp)),
                    else_from: None,
                });
            }
            SiteKind::Else => {
                let mut o = open.pop().ok_or_else(|| internal("else without if"))?;
                if let Some(l) = close_level(&mut o, next_rp, &mut levels) {
                    level_after.insert(o.start.unwrap_or(0), l);
                }
                let (csite, _) = o.construct.ok_or_else(|| internal("else outside a construct"))?;
                let params = match &body.sites[csite].kind {
                    SiteKind::If { params, .. } => params.clone(),
                    _ => return Err(internal("else of a non-if")),
                };
                open.push(Open {
                    start: Some(site.op_index),
                    params,
                    base: o.base,
                    anchors: vec![],
                    loop_rp: None,
                    first_rp: next_rp,
                    first_op: site.op_index + 1,
                    construct: o.construct,
                    else_from: Some(next_rp),
                });
            }
            SiteKind::End => {
                let mut o = open.pop().ok_or_else(|| internal("unbalanced end"))?;
                let l = close_level(&mut o, next_rp, &mut levels);
                match o.start {
                    None => {
                        top = l;
                        break;
                    }
                    Some(start) => {
                        if let Some(l) = l {
                            level_after.insert(start, l);
                        }
                    }
                }
                let (csite, first) = o.construct.ok_or_else(|| internal("end outside a construct"))?;
                if first == next_rp {
                    continue;
                }
                let cs = &body.sites[csite];
                let (params, res, is_if, is_loop) = match &cs.kind {
                    SiteKind::Block { params, results } => (params, results, false, false),
                    SiteKind::Loop { params, results, .. } => (params, results, false, true),
                    SiteKind::If { params, results } => (params, results, true, false),
                    _ => return Err(internal("construct site is not a block")),
                };
                anchors.push(Anchor {
                    kind: AnchorKind::Construct {
                        rps: first..next_rp,
                        is_if,
                        is_loop,
                        else_from: o.else_from.unwrap_or(next_rp),
                        header_rp: if is_loop { o.loop_rp } else { None },
                    },
                    stack: cs.stack.clone(),
                    base: cs.frame_height,
                    consumed: params.len() as u32 + is_if as u32,
                    results: res.clone(),
                });
                anchor_at.insert(cs.op_index, anchors.len() - 1);
                open.last_mut().ok_or_else(|| internal("no parent level"))?.anchors.push(anchors.len() - 1);
            }
        }
    }
    let top = top.ok_or_else(|| internal("instrumented function without resume points"))?;
    for level in &mut levels {
        level.defer = level.defers(&anchors, &anchor_at);
    }
    live_locals(info, body, fty.params().len() as u32, &mut rps)?;
    crate::slots::assign(&body.locals, &mut rps, shapes);
    let entry_checked = graph.entry_checked[body.func as usize];
    Ok(Plan { rps, anchors, anchor_at, levels, level_after, top, results, entry_checked })
}

/// Fills in the locals live at each resume point. Where the frame resumes
/// decides what "at" means: a loop header's frame resumes at the `loop`; a
/// call's after the call returns, and calls touch no caller locals, so at
/// the call; an entry's at the first instruction (a declared local read
/// there before any write holds zero in the new activation too).
fn live_locals(info: &ModuleInfo<'_>, body: &Body, params: u32, rps: &mut [Rp]) -> Result<()> {
    let reader = wasmparser::BinaryReader::new(&info.wasm[body.range.clone()], body.range.start);
    let live = Liveness::new(&wasmparser::FunctionBody::new(reader), params, 0)
        .map_err(|e| internal(format!("liveness of function {}: {e}", body.func)))?;
    for rp in rps {
        let at = match rp.kind {
            ResumeKind::Entry => live.first_instruction(),
            _ => Some(rp.offset as u32),
        };
        let set = at.and_then(|at| live.live_at(at)).ok_or_else(|| internal("a resume point is not an instruction"))?;
        rp.locals = set.iter().enumerate().filter(|(_, l)| **l).map(|(i, _)| i as u32).collect();
        // Slot order: numbers grouped by type, so that one pack helper per
        // type count loads them (`rewrite::Packs`).
        crate::rewrite::frames::sort_into_slot_order(&mut rp.locals, &body.locals);
    }
    Ok(())
}

impl SaveClass {
    /// The types of its slots, given the function's local types.
    pub fn types(&self, local_types: &[Ty]) -> Vec<Ty> {
        self.locals.iter().map(|&l| local_types[l as usize]).chain(self.operands.iter().copied()).collect()
    }
}

impl Plan {
    /// The distinct save classes of the resume points, in order of first
    /// appearance, and the class of each point.
    pub fn save_classes(&self) -> (Vec<SaveClass>, Vec<u32>) {
        let mut classes: Vec<SaveClass> = Vec::new();
        let mut index: HashMap<SaveClass, u32> = HashMap::new();
        let class_of = self
            .rps
            .iter()
            .map(|rp| {
                let class = SaveClass { locals: rp.slots.clone(), operands: rp.saved.clone() };
                *index.entry(class.clone()).or_insert_with(|| {
                    classes.push(class);
                    classes.len() as u32 - 1
                })
            })
            .collect();
        (classes, class_of)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plans of a module's instrumented functions, by function index.
    fn plans(wat: &str) -> HashMap<u32, Plan> {
        let wasm = wat::parse_str(wat).expect("wat");
        let info = crate::analysis::analyze(&wasm).expect("analysis");
        let graph = CallGraph::new(&info, &Default::default()).expect("call graph");
        info.bodies
            .iter()
            .filter(|b| graph.can_unwind[b.func as usize])
            .map(|b| (b.func, plan(&info, &graph, b, &mut Default::default()).expect("plan")))
            .collect()
    }

    /// Each point saves the locals live after it, numbers grouped by type;
    /// points that save the same operand types share a class when the
    /// slots one adds for the other are cheap.
    #[test]
    fn save_classes_group_points_by_live_locals_and_operand_types() {
        let plans = plans(
            r#"(module
              (func $spin (param $n i32) (result i32)
                (loop $l
                  local.get $n i32.const 1 i32.sub local.tee $n
                  br_if $l)
                local.get $n)
              (func $main (param $a i32) (param $b i32) (result i32) (local $t i32)
                local.get $a
                call $spin      ;; $b is read later, $a never, $t written first
                local.set $t
                local.get $b
                call $spin      ;; $t and $b are read later
                local.get $t
                i32.add
                local.get $b
                call $spin      ;; nothing is read later; one i32 waits below
                i32.add
                i32.const 5
                call $spin      ;; the same again: the same class
                i32.add)
              (func $mix (param $x f64) (param $n i32) (result f64)
                local.get $n
                call $spin      ;; both read later: the i32 slot first
                drop
                local.get $x
                local.get $n
                f64.convert_i32_s
                f64.add))"#,
        );
        let spin = &plans[&0];
        assert_eq!(spin.rps[0].kind, ResumeKind::Loop);
        assert_eq!(spin.rps[0].locals, [0], "the counter is live at the header");

        let main = &plans[&1];
        let locals: Vec<&[u32]> = main.rps.iter().map(|rp| rp.locals.as_slice()).collect();
        assert_eq!(locals, [&[1][..], &[1, 2], &[], &[]]);
        // The first point shares the second's class: a slot for $t, which
        // is dead there, costs less than unwind code of its own.
        let slots: Vec<&[u32]> = main.rps.iter().map(|rp| rp.slots.as_slice()).collect();
        assert_eq!(slots, [&[1, 2][..], &[1, 2], &[], &[]]);
        let (classes, class_of) = main.save_classes();
        assert_eq!(
            classes,
            [SaveClass { locals: vec![1, 2], operands: vec![] }, SaveClass { locals: vec![], operands: vec![Ty::I32] }]
        );
        assert_eq!(class_of, [0, 0, 1, 1]);

        let mix = &plans[&2];
        assert_eq!(mix.rps[0].locals, [1, 0], "the i32 before the f64, whatever their indices");
    }
}

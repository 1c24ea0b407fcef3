//! Which loops need no update point, and so which functions need no
//! instrumentation: the exemptions the pause bound allows.
//!
//! Every loop header is an update point unless the loop is *bounded*, and
//! every function with a loop can unwind unless all its loops are bounded
//! and it is *short*. The rules, and why the delay from a pause request to
//! the pause stays bounded with them, are in the crate docs ("The pause
//! bound"); this module checks them.
//!
//! A loop is bounded when all of these hold:
//!
//! - it is a *counted loop*: one local `x` (i32 or i64) is written in the
//!   loop exactly once, as `x = x + S` or `x = x - S` with a constant `S`,
//!   directly in the loop's body (not inside a nested block), and the only
//!   branch back to the header is a `br_if` directly in the body, after that
//!   write, whose condition compares `x` with a constant (`x <op> N`,
//!   `x != 0` or `x == 0`); the last write of `x` before the `loop`
//!   instruction is `x = C` for a constant `C`, in the `loop`'s own level or
//!   one enclosing it, with no enclosing loop between the two. Every path
//!   from entering the loop to its back edge then runs the write once, so
//!   running the arithmetic on the constants says how often the back edge
//!   can be taken: at most [`MAX_TRIPS`] times, or the loop is not bounded;
//!   or it is a *shrinking loop* (`shrinking`): its body up to that `br_if`
//!   has no control flow or call, leaves the counter shifted right (unsigned) or
//!   divided (unsigned) by a constant that makes it smaller, and tests the
//!   counter, before or after that step, by a test that fails at zero; from
//!   the largest start, the counter is zero within its width in bits of
//!   steps (again at most [`MAX_TRIPS`] runs, or not bounded);
//! - its body calls only functions that need no instrumentation themselves
//!   and imports that do not block (no `call_indirect`), and every loop
//!   nested in it is bounded;
//! - its *cost*, the trip count times the cost of its body, is at most
//!   [`LOOP_BUDGET`]. The cost of code is its number of instructions, where a
//!   bounded loop counts its own cost, a call to a function that needs no
//!   instrumentation counts that function's cost, and a call to an import
//!   that does not block counts one.
//!
//! A function with at least one loop needs no instrumentation when it is
//! not on a call cycle, calls no blocking import and nothing that can
//! unwind (as before), all its loops are bounded, and its cost is at most
//! [`FUNC_BUDGET`]; otherwise all its loops get their checks back. Calls to
//! such a function are then no resume points.
//!
//! The rules feed each other (a loop's cost depends on whether its callees
//! are instrumented, which depends on their loops), so they are applied
//! from the most hopeful start, every counted loop bounded, and loops only
//! ever lose the exemption until nothing changes. The result depends only
//! on the module, so two versions of a program get the same rules, which
//! is what lets patchgen match resume points by kind and ordinal.

use std::collections::HashSet;

use wasmparser::{BinaryReader, BlockType, Operator, OperatorsReader};

use crate::abi::ValType as Ty;
use crate::analysis::{Body, ModuleInfo};
use crate::error::{Error, ErrorKind, Result};

mod shrinking;

/// The most iterations a loop without a check may run.
pub const MAX_TRIPS: u64 = 64;
/// The most instructions one run of a loop without a check may cost.
pub const LOOP_BUDGET: u64 = 4096;
/// The most instructions one call of a function with loops but without
/// instrumentation may cost.
pub const FUNC_BUDGET: u64 = 4096;

const INF: u64 = u64::MAX;

/// A function body or one loop in it.
struct Region {
    /// Operator index of the `loop` (`None` for the function body).
    loop_op: Option<u32>,
    /// Trip-count bound of a counted loop.
    trips: Option<u64>,
    /// Instructions directly in the region (nested loops' bodies excluded).
    ops: u64,
    /// Direct callees, once per call instruction.
    calls: Vec<u32>,
    /// The region holds a `call_indirect`.
    indirect: bool,
    /// Nested loops (region indices, always greater than this one's).
    children: Vec<usize>,
}

/// The regions of every body, by body position.
pub(crate) struct Loops {
    bodies: Vec<Vec<Region>>,
    /// Every body's direct callees, all regions together.
    callees: Vec<Vec<u32>>,
}

impl Loops {
    /// Reads every body's loops and recognises the counted ones.
    pub fn scan(info: &ModuleInfo<'_>) -> Result<Loops> {
        let bodies: Vec<Vec<Region>> = info
            .bodies
            .iter()
            .map(|b| scan_body(info, b))
            .collect::<Result<_>>()?;
        let callees = bodies
            .iter()
            .map(|rs| rs.iter().flat_map(|r| r.calls.iter().copied()).collect())
            .collect();
        Ok(Loops { bodies, callees })
    }

    /// Every counted loop, as (function, operator index of its `loop`): the
    /// hopeful start of [`Loops::shrink`].
    pub fn counted(&self, info: &ModuleInfo<'_>) -> HashSet<(u32, u32)> {
        let mut out = HashSet::new();
        for (b, regions) in info.bodies.iter().zip(&self.bodies) {
            for r in regions {
                if let (Some(op), Some(_)) = (r.loop_op, r.trips) {
                    out.insert((b.func, op));
                }
            }
        }
        out
    }

    /// Takes the exemption from the loops of `bounded` that break a rule,
    /// given which functions can unwind under the current exemptions.
    /// Returns whether anything changed.
    pub fn shrink(
        &self,
        info: &ModuleInfo<'_>,
        can_unwind: &[bool],
        blocking: &[bool],
        bounded: &mut HashSet<(u32, u32)>,
    ) -> bool {
        let costs = self.function_costs(info, can_unwind, blocking, bounded);
        let mut changed = false;
        for (b, regions) in info.bodies.iter().zip(&self.bodies) {
            let rc = region_costs(b.func, regions, &costs, bounded);
            let mut any = false;
            for (r, cost) in regions.iter().zip(&rc) {
                if let Some(op) = r.loop_op {
                    if bounded.contains(&(b.func, op)) {
                        if *cost > LOOP_BUDGET {
                            bounded.remove(&(b.func, op));
                            changed = true;
                        } else {
                            any = true;
                        }
                    }
                }
            }
            let f = b.func as usize;
            if any && !can_unwind[f] && costs[f] > FUNC_BUDGET {
                for r in regions {
                    if let Some(op) = r.loop_op {
                        changed |= bounded.remove(&(b.func, op));
                    }
                }
            }
        }
        changed
    }

    /// The cost of one call of every function ([`INF`] for those that can
    /// unwind or call indirectly), callees before callers. Functions that
    /// cannot unwind are on no call cycle, so their calls form a DAG.
    fn function_costs(
        &self,
        info: &ModuleInfo<'_>,
        can_unwind: &[bool],
        blocking: &[bool],
        bounded: &HashSet<(u32, u32)>,
    ) -> Vec<u64> {
        let n = info.func_types.len();
        let imported = info.num_imported_funcs as usize;
        let mut cost = vec![INF; n];
        for (f, c) in cost.iter_mut().enumerate().take(imported) {
            *c = if blocking[f] { INF } else { 1 };
        }
        // 0 unvisited, 1 on the walk, 2 done
        let mut state = vec![0u8; n];
        for root in imported..n {
            if can_unwind[root] || state[root] != 0 {
                continue;
            }
            let mut work: Vec<(usize, usize)> = vec![(root, 0)];
            state[root] = 1;
            while let Some(&mut (f, ref mut next)) = work.last_mut() {
                let regions = &self.bodies[f - imported];
                let callee = self.callees[f - imported].get(*next).map(|&c| c as usize);
                *next += 1;
                match callee {
                    Some(c) if c >= imported && !can_unwind[c] && state[c] == 0 => {
                        state[c] = 1;
                        work.push((c, 0));
                    }
                    Some(_) => {}
                    None => {
                        work.pop();
                        state[f] = 2;
                        cost[f] = region_costs(f as u32, regions, &cost, bounded)[0];
                    }
                }
            }
        }
        cost
    }
}

/// The cost of every region of one body: a loop's is its trip count times
/// its body ([`INF`] if it has a check), the body's is that of one call.
fn region_costs(
    func: u32,
    regions: &[Region],
    fcost: &[u64],
    bounded: &HashSet<(u32, u32)>,
) -> Vec<u64> {
    let mut out = vec![INF; regions.len()];
    for i in (0..regions.len()).rev() {
        let r = &regions[i];
        if r.loop_op.is_some_and(|op| !bounded.contains(&(func, op))) {
            continue;
        }
        let mut c = if r.indirect { INF } else { r.ops };
        for &callee in &r.calls {
            c = c.saturating_add(fcost[callee as usize]);
        }
        for &child in &r.children {
            c = c.saturating_add(out[child]);
        }
        out[i] = match r.trips {
            Some(t) if r.loop_op.is_some() => c.saturating_mul(t),
            _ => c,
        };
    }
    out
}

fn invalid(e: wasmparser::BinaryReaderError) -> Error {
    Error::from_reader(ErrorKind::Invalid, e)
}

fn scan_body(info: &ModuleInfo<'_>, body: &Body) -> Result<Vec<Region>> {
    let wasm = info.wasm;
    let reader = BinaryReader::new(&wasm[body.ops_start..body.range.end], body.ops_start);
    let mut reader = OperatorsReader::new(reader);
    let mut ops = Vec::new();
    while !reader.eof() {
        ops.push(reader.read().map_err(invalid)?);
    }
    // The matching `end` of every block, loop and if.
    let mut end_of = vec![0usize; ops.len()];
    let mut open = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        match op {
            Operator::Block { .. } | Operator::Loop { .. } | Operator::If { .. } => open.push(i),
            Operator::End => {
                if let Some(o) = open.pop() {
                    end_of[o] = i;
                }
            }
            _ => {}
        }
    }
    let mut regions = vec![Region {
        loop_op: None,
        trips: None,
        ops: 0,
        calls: vec![],
        indirect: false,
        children: vec![],
    }];
    // The region each open construct belongs to; a loop opens its own.
    let mut stack: Vec<usize> = Vec::new();
    let mut cur = 0usize;
    for (i, op) in ops.iter().enumerate() {
        regions[cur].ops += 1;
        match op {
            Operator::Call { function_index } => regions[cur].calls.push(*function_index),
            Operator::CallIndirect { .. } => regions[cur].indirect = true,
            Operator::Block { .. } | Operator::If { .. } => stack.push(cur),
            Operator::Loop { .. } => {
                stack.push(cur);
                let r = regions.len();
                regions.push(Region {
                    loop_op: Some(i as u32),
                    trips: trip_bound(&ops, i, end_of[i], &body.locals),
                    ops: 0,
                    calls: vec![],
                    indirect: false,
                    children: vec![],
                });
                regions[cur].children.push(r);
                cur = r;
            }
            Operator::End => {
                if let Some(parent) = stack.pop() {
                    cur = parent;
                }
            }
            _ => {}
        }
    }
    Ok(regions)
}

/// A comparison of the counter with a constant, or with zero.
#[derive(Clone, Copy)]
enum Cond<'a> {
    Cmp(&'a Operator<'a>, i64),
    NonZero,
    Zero,
}

fn get_or_tee(op: &Operator<'_>) -> Option<u32> {
    match *op {
        Operator::LocalGet { local_index } | Operator::LocalTee { local_index } => {
            Some(local_index)
        }
        _ => None,
    }
}

fn writes(op: &Operator<'_>) -> Option<u32> {
    match *op {
        Operator::LocalSet { local_index } | Operator::LocalTee { local_index } => {
            Some(local_index)
        }
        _ => None,
    }
}

fn constant(op: &Operator<'_>) -> Option<i64> {
    match *op {
        Operator::I32Const { value } => Some(value as i64),
        Operator::I64Const { value } => Some(value),
        _ => None,
    }
}

fn is_cmp(op: &Operator<'_>) -> bool {
    use Operator as O;
    matches!(
        op,
        O::I32Eq
            | O::I32Ne
            | O::I32LtS
            | O::I32LtU
            | O::I32GtS
            | O::I32GtU
            | O::I32LeS
            | O::I32LeU
            | O::I32GeS
            | O::I32GeU
            | O::I64Eq
            | O::I64Ne
            | O::I64LtS
            | O::I64LtU
            | O::I64GtS
            | O::I64GtU
            | O::I64LeS
            | O::I64LeU
            | O::I64GeS
            | O::I64GeU
    )
}

/// How often the body of the loop at `l` (whose `end` is at `e`) can run,
/// if the loop is counted or shrinking and that is at most [`MAX_TRIPS`].
fn trip_bound(ops: &[Operator<'_>], l: usize, e: usize, locals: &[Ty]) -> Option<u64> {
    if !matches!(
        ops[l],
        Operator::Loop {
            blockty: BlockType::Empty
        }
    ) {
        return None;
    }
    // The branches back to the header: exactly one, a br_if directly in the body.
    let mut back = None;
    let mut depth = 0u32;
    for (i, op) in ops.iter().enumerate().take(e).skip(l + 1) {
        match op {
            Operator::Block { .. } | Operator::Loop { .. } | Operator::If { .. } => depth += 1,
            Operator::End => depth = depth.checked_sub(1)?,
            Operator::Br { relative_depth } if *relative_depth == depth => return None,
            Operator::BrIf { relative_depth } if *relative_depth == depth => {
                if depth != 0 || back.is_some() {
                    return None;
                }
                back = Some(i);
            }
            Operator::BrTable { targets } => {
                if targets.default() == depth || targets.targets().any(|t| t.ok() == Some(depth)) {
                    return None;
                }
            }
            _ => {}
        }
    }
    let b = back?;
    counted_trips(ops, l, b, e, locals).or_else(|| shrinking::trips(ops, l, b, locals, MAX_TRIPS))
}

/// The trip count of a counted loop (the module docs), whose one back edge
/// is the `br_if` at `b`.
fn counted_trips(ops: &[Operator<'_>], l: usize, b: usize, e: usize, locals: &[Ty]) -> Option<u64> {
    // The condition right before the br_if.
    let at = |k: usize| {
        if b >= l + 1 + k {
            Some(&ops[b - k])
        } else {
            None
        }
    };
    let (x, cond) = if let (Some(c), Some(n), Some(g)) = (at(1), at(2), at(3)) {
        match (is_cmp(c), constant(n), get_or_tee(g)) {
            (true, Some(n), Some(x)) => (x, Cond::Cmp(c, n)),
            _ => match (c, get_or_tee(n)) {
                (Operator::I32Eqz | Operator::I64Eqz, Some(x)) => (x, Cond::Zero),
                _ => (get_or_tee(c)?, Cond::NonZero),
            },
        }
    } else {
        match (at(1)?, at(2).and_then(get_or_tee)) {
            (Operator::I32Eqz | Operator::I64Eqz, Some(x)) => (x, Cond::Zero),
            (c, _) => (get_or_tee(c)?, Cond::NonZero),
        }
    };
    let wide = match locals.get(x as usize)? {
        Ty::I32 => false,
        Ty::I64 => true,
        _ => return None,
    };
    // The one write of the counter in the loop: `x = x ± S` directly in the body, before the br_if.
    let mut write = None;
    let mut depth = 0u32;
    for (i, op) in ops.iter().enumerate().take(e).skip(l + 1) {
        match op {
            Operator::Block { .. } | Operator::Loop { .. } | Operator::If { .. } => depth += 1,
            Operator::End => depth = depth.saturating_sub(1),
            _ => {}
        }
        if writes(op) == Some(x) {
            if depth != 0 || write.is_some() || i > b || i < l + 4 {
                return None;
            }
            write = Some(i);
        }
    }
    let w = write?;
    let step = constant(&ops[w - 2])?;
    let step = match (&ops[w - 3], &ops[w - 1]) {
        (Operator::LocalGet { local_index }, Operator::I32Add | Operator::I64Add)
            if *local_index == x =>
        {
            step
        }
        (Operator::LocalGet { local_index }, Operator::I32Sub | Operator::I64Sub)
            if *local_index == x =>
        {
            step.wrapping_neg()
        }
        _ => return None,
    };
    let start = initial_value(ops, l, x)?;
    // Run the counter on the constants.
    let mask: u64 = if wide { u64::MAX } else { u32::MAX as u64 };
    let mut v = (start as u64) & mask;
    for taken in 0..MAX_TRIPS {
        v = v.wrapping_add(step as u64) & mask;
        if !continues(cond, v, wide) {
            return Some(taken + 1);
        }
    }
    None
}

/// Whether the back edge is taken with the counter at `v` (masked to its width).
fn continues(cond: Cond<'_>, v: u64, wide: bool) -> bool {
    use Operator as O;
    let signed = |u: u64| {
        if wide {
            u as i64
        } else {
            u as u32 as i32 as i64
        }
    };
    match cond {
        Cond::NonZero => v != 0,
        Cond::Zero => v == 0,
        Cond::Cmp(op, n) => {
            let (s, t) = (signed(v), n);
            let (a, c) = (v, if wide { n as u64 } else { n as u32 as u64 });
            match op {
                O::I32Eq | O::I64Eq => a == c,
                O::I32Ne | O::I64Ne => a != c,
                O::I32LtS | O::I64LtS => s < t,
                O::I32LtU | O::I64LtU => a < c,
                O::I32GtS | O::I64GtS => s > t,
                O::I32GtU | O::I64GtU => a > c,
                O::I32LeS | O::I64LeS => s <= t,
                O::I32LeU | O::I64LeU => a <= c,
                O::I32GeS | O::I64GeS => s >= t,
                _ => a >= c,
            }
        }
    }
}

/// The counter's value when the loop at `l` is entered: the constant of the
/// last write before it, if that write is in the loop's level or one
/// enclosing it, with no enclosing loop in between (whose next iteration
/// would enter with the value the counted loop left).
fn initial_value(ops: &[Operator<'_>], l: usize, x: u32) -> Option<i64> {
    // Walking back, `depth` counts the constructs entered through their `end`.
    let mut depth = 0u32;
    for j in (0..l).rev() {
        match &ops[j] {
            Operator::End => depth += 1,
            Operator::Block { .. } | Operator::If { .. } => depth = depth.saturating_sub(1),
            Operator::Loop { .. } => {
                if depth == 0 {
                    return None;
                }
                depth -= 1;
            }
            // The then arm of an enclosing if is not on the path: skip it.
            Operator::Else if depth == 0 => depth = 1,
            op if writes(op) == Some(x) => {
                return if depth == 0 && j > 0 {
                    constant(&ops[j - 1])
                } else {
                    None
                };
            }
            _ => {}
        }
    }
    None
}

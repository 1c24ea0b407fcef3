//! Shrinking loops: a loop whose counter is shifted right or divided by a
//! constant on every iteration, and which goes on only while a test that
//! is false at zero holds for the counter. Whatever the counter starts at,
//! it reaches zero and stays there after at most its width in bits of
//! steps, so the loop ends: this is how C converts a number to digits
//! (`for (; x; x >>= 4)`, `while (y >= 10) { ...; y /= 10; }`), and the
//! counted-loop rule cannot see it because the start is not a constant.
//!
//! The body up to the back edge is evaluated symbolically, which sees
//! through the temporaries clang keeps the new counter and the test in
//! (the test usually reads the counter before the step). Only a body
//! without control flow, calls or floating point up to its back edge is
//! read; anything else is simply not a shrinking loop.

use wasmparser::Operator;

use super::{continues, Cond};
use crate::abi::ValType as Ty;

/// A value of the body, in terms of the locals at the top of the iteration.
#[derive(Clone, PartialEq, Eq)]
enum Sym<'a> {
    /// The local's value when the iteration started.
    Entry(u32),
    Const(i64),
    /// `Entry(local)` shifted right (unsigned) or divided (unsigned) by a
    /// constant that makes it smaller whenever it is not zero.
    Shrunk { local: u32, step: Step },
    /// `value <op> constant`.
    Compare { op: &'a Operator<'a>, value: Box<Sym<'a>>, constant: i64 },
    Other,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Step {
    ShrU(u32),
    DivU(u64),
}

impl Step {
    /// Applies the step to `v` (masked to its width `mask`).
    fn apply(self, v: u64, mask: u64) -> u64 {
        match self {
            Step::ShrU(s) => v >> s,
            Step::DivU(d) => (v & mask) / d,
        }
    }
}

/// How often the body of the loop at `l`, whose one back edge is the `br_if`
/// at `b`, can run if it is a shrinking loop, and if that is at most
/// `max_trips`.
pub(super) fn trips(ops: &[Operator<'_>], l: usize, b: usize, locals: &[Ty], max_trips: u64) -> Option<u64> {
    let (stack, written) = evaluate(&ops[l + 1..b], locals)?;
    let cond = stack.last()?;
    let (tested, cond) = match cond {
        Sym::Compare { op, value, constant } => (value.as_ref(), Cond::Cmp(op, *constant)),
        value => (value, Cond::NonZero),
    };
    let counter = match tested {
        Sym::Entry(x) | Sym::Shrunk { local: x, .. } => *x,
        _ => return None,
    };
    // The counter must end the iteration shrunk from where it began, and the
    // test must read it before or after that step.
    let step = match written.iter().find(|(local, _)| *local == counter) {
        Some((_, Sym::Shrunk { local, step })) if *local == counter => *step,
        _ => return None,
    };
    if let Sym::Shrunk { step: tested_step, .. } = tested {
        if *tested_step != step {
            return None;
        }
    }
    let wide = match locals.get(counter as usize)? {
        Ty::I32 => false,
        Ty::I64 => true,
        _ => return None,
    };
    if continues(cond, 0, wide) {
        return None;
    }
    // From the largest start: the steps until zero, then the one run that
    // may still test the value before its last step.
    let mask: u64 = if wide { u64::MAX } else { u32::MAX as u64 };
    let mut v = mask;
    let mut runs = 1;
    while v != 0 {
        v = step.apply(v, mask);
        runs += 1;
        if runs > max_trips {
            return None;
        }
    }
    Some(runs)
}

/// The last value a body wrote to each local it writes.
type Written<'a> = Vec<(u32, Sym<'a>)>;

/// Runs the straight-line `body` on symbolic values: the stack left at its
/// end, and what it wrote.
fn evaluate<'a>(body: &'a [Operator<'a>], locals: &[Ty]) -> Option<(Vec<Sym<'a>>, Written<'a>)> {
    use Operator as O;
    let mut stack: Vec<Sym<'a>> = Vec::new();
    let mut written: Written<'a> = Vec::new();
    let read = |written: &[(u32, Sym<'a>)], l: u32| {
        (written.iter().find(|(w, _)| *w == l)).map_or(Sym::Entry(l), |(_, v)| v.clone())
    };
    let write = |written: &mut Written<'a>, l: u32, v: Sym<'a>| match written.iter_mut().find(|(w, _)| *w == l) {
        Some(slot) => slot.1 = v,
        None => written.push((l, v)),
    };
    for op in body {
        match *op {
            O::LocalGet { local_index } => {
                locals.get(local_index as usize)?;
                stack.push(read(&written, local_index));
            }
            O::LocalSet { local_index } => {
                let v = stack.pop()?;
                write(&mut written, local_index, v);
            }
            O::LocalTee { local_index } => {
                let v = stack.last()?.clone();
                write(&mut written, local_index, v);
            }
            O::I32Const { value } => stack.push(Sym::Const(value as i64)),
            O::I64Const { value } => stack.push(Sym::Const(value)),
            O::I32ShrU | O::I64ShrU | O::I32DivU | O::I64DivU => {
                let (rhs, lhs) = (stack.pop()?, stack.pop()?);
                let bits = if matches!(op, O::I32ShrU | O::I32DivU) { 32 } else { 64 };
                let step = match (op, rhs) {
                    // The shift count is taken modulo the width.
                    (O::I32ShrU | O::I64ShrU, Sym::Const(s)) if s.rem_euclid(bits) != 0 => Some(Step::ShrU(s.rem_euclid(bits) as u32)),
                    (O::I32DivU | O::I64DivU, Sym::Const(d)) => {
                        let d = if bits == 32 { d as u32 as u64 } else { d as u64 };
                        (d >= 2).then_some(Step::DivU(d))
                    }
                    _ => None,
                };
                stack.push(match (lhs, step) {
                    (Sym::Entry(local), Some(step)) => Sym::Shrunk { local, step },
                    _ => Sym::Other,
                });
            }
            _ if super::is_cmp(op) => {
                let (rhs, lhs) = (stack.pop()?, stack.pop()?);
                stack.push(match rhs {
                    Sym::Const(constant) => Sym::Compare { op, value: Box::new(lhs), constant },
                    _ => Sym::Other,
                });
            }
            _ => {
                let (pops, pushes) = int_arity(op)?;
                for _ in 0..pops {
                    stack.pop()?;
                }
                for _ in 0..pushes {
                    stack.push(Sym::Other);
                }
            }
        }
    }
    Some((stack, written))
}

/// Operands taken and results left by the other integer and memory
/// operators a digit loop uses; `None` for anything else.
fn int_arity(op: &Operator<'_>) -> Option<(usize, usize)> {
    use Operator as O;
    Some(match op {
        O::Nop => (0, 0),
        O::Drop | O::GlobalSet { .. } => (1, 0),
        O::GlobalGet { .. } => (0, 1),
        O::Select | O::TypedSelect { .. } => (3, 1),
        O::I32Eqz | O::I64Eqz | O::I32Clz | O::I32Ctz | O::I32Popcnt | O::I64Clz | O::I64Ctz | O::I64Popcnt => (1, 1),
        O::I32WrapI64 | O::I64ExtendI32S | O::I64ExtendI32U => (1, 1),
        O::I32Extend8S | O::I32Extend16S | O::I64Extend8S | O::I64Extend16S | O::I64Extend32S => (1, 1),
        O::I32Add | O::I32Sub | O::I32Mul | O::I32DivS | O::I32RemS | O::I32RemU => (2, 1),
        O::I32And | O::I32Or | O::I32Xor | O::I32Shl | O::I32ShrS | O::I32Rotl | O::I32Rotr => (2, 1),
        O::I64Add | O::I64Sub | O::I64Mul | O::I64DivS | O::I64RemS | O::I64RemU => (2, 1),
        O::I64And | O::I64Or | O::I64Xor | O::I64Shl | O::I64ShrS | O::I64Rotl | O::I64Rotr => (2, 1),
        O::I32Load { .. } | O::I64Load { .. } | O::I32Load8S { .. } | O::I32Load8U { .. } => (1, 1),
        O::I32Load16S { .. } | O::I32Load16U { .. } | O::I64Load8S { .. } | O::I64Load8U { .. } => (1, 1),
        O::I64Load16S { .. } | O::I64Load16U { .. } | O::I64Load32S { .. } | O::I64Load32U { .. } => (1, 1),
        O::I32Store { .. } | O::I64Store { .. } | O::I32Store8 { .. } | O::I32Store16 { .. } => (2, 0),
        O::I64Store8 { .. } | O::I64Store16 { .. } | O::I64Store32 { .. } => (2, 0),
        _ => return None,
    })
}

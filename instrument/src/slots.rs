//! Which slots the frame of each resume point has, and so which save class
//! (one piece of unwind code, `rewrite::body`) the point shares with
//! others.
//!
//! A frame holds the locals live at its point, so points with different
//! live sets would each need unwind code of their own: a block that passes
//! every slot to a save helper, and a save helper per distinct list of
//! slot types, each with a function type of its own (wasmtime compiles a
//! trampoline for every function type of a module, about 0.1 ms each here).
//! wasi-libc's `printf_core` has 133 points with 70 distinct live sets of 1
//! to 40 `i32`s, most of them one or two locals apart.
//!
//! So a point may take a class whose slots are a superset of its live
//! locals. The slots it does not need hold zero: its unwind path sets those
//! locals to zero right before it branches to the class's code, so that no
//! value of a dead local is kept alive on the hot path up to the point,
//! and the metadata lists which slots hold a value
//! ([`crate::abi::ResumePoint::locals`] within
//! [`crate::abi::ResumePoint::slots`]). The grouping is greedy on a byte
//! estimate (`Cost`), function by function in index order: larger live sets
//! first, each joins the class whose cost it raises least, or opens its
//! own. Only locals of numeric types are ever added: a reference slot goes
//! through a side table.

use std::collections::{HashMap, HashSet};

use crate::abi::ValType as Ty;
use crate::plan::Rp;
use crate::rewrite::frames::rank;

/// The slot types (locals, then operands) of the save helpers the module
/// has so far: a class of one of these shapes costs no new helper.
pub(crate) type Shapes = HashSet<Vec<Ty>>;

/// Estimated bytes of code a class costs: its block (a constant, the
/// slots passed, a call and a branch) and, unless a class of another
/// function already has one of its shape, its save helper (a store per
/// slot). Fewer helpers also mean fewer function types, each of which
/// wasmtime compiles a trampoline for.
struct Cost;

impl Cost {
    const BLOCK: usize = 8;
    const PER_SLOT_PASSED: usize = 2;
    const HELPER: usize = 25;
    const PER_SLOT_STORED: usize = 9;

    fn class(shape: &[Ty], known: &Shapes) -> usize {
        let helper = if known.contains(shape) { 0 } else { Self::HELPER + Self::PER_SLOT_STORED * shape.len() };
        Self::BLOCK + Self::PER_SLOT_PASSED * shape.len() + helper
    }

    /// The zeroing of `dead` locals on one point's unwind path: a constant
    /// per type, then a `local.tee` or `local.set` per local.
    fn zeroing(dead: &[Ty]) -> usize {
        let constants: usize = [(Ty::I32, 2), (Ty::I64, 2), (Ty::F32, 5), (Ty::F64, 9)]
            .iter()
            .filter(|(t, _)| dead.contains(t))
            .map(|(_, bytes)| bytes)
            .sum();
        constants + 2 * dead.len()
    }
}

/// A class being grown: its slots (in slot order) and its members (a live
/// set and how many points have it).
struct Class {
    slots: Vec<u32>,
    members: Vec<(Vec<u32>, usize)>,
}

/// What a class's choices are costed against: the function's local types,
/// the operand types every member saves, and the helpers known so far.
struct Costing<'a> {
    types: &'a [Ty],
    operands: &'a [Ty],
    known: &'a Shapes,
}

impl Costing<'_> {
    fn shape(&self, slots: &[u32]) -> Vec<Ty> {
        slots.iter().map(|&l| self.types[l as usize]).chain(self.operands.iter().copied()).collect()
    }

    fn cost(&self, slots: &[u32], members: &[(Vec<u32>, usize)]) -> usize {
        let zeroing: usize = members
            .iter()
            .map(|(live, n)| {
                let dead: Vec<Ty> = slots.iter().filter(|l| !live.contains(l)).map(|&l| self.types[l as usize]).collect();
                n * Cost::zeroing(&dead)
            })
            .sum();
        Cost::class(&self.shape(slots), self.known) + zeroing
    }
}

/// Sets every point's `slots` from its live `locals` (both in slot order),
/// grouping points that save the same operand types and reference locals,
/// and adds the shapes of the classes chosen to `shapes`.
pub(crate) fn assign(types: &[Ty], rps: &mut [Rp], shapes: &mut Shapes) {
    let is_ref = |l: u32| matches!(types[l as usize], Ty::FuncRef | Ty::ExternRef);
    // Distinct live sets per group, with how many points have each.
    let mut groups: Vec<((Vec<Ty>, Vec<u32>), Vec<(Vec<u32>, usize)>)> = Vec::new();
    for rp in rps.iter() {
        let key = (rp.saved.clone(), rp.locals.iter().copied().filter(|&l| is_ref(l)).collect());
        let sets = match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, sets)) => sets,
            None => {
                groups.push((key, Vec::new()));
                &mut groups.last_mut().expect("just pushed").1
            }
        };
        match sets.iter_mut().find(|(s, _)| *s == rp.locals) {
            Some((_, n)) => *n += 1,
            None => sets.push((rp.locals.clone(), 1)),
        }
    }
    let order = |l: &u32| (rank(types[*l as usize]), *l);
    let mut slots_of: HashMap<(Vec<Ty>, Vec<u32>), Vec<u32>> = HashMap::new();
    for ((operands, _), mut sets) in groups {
        sets.sort_by_key(|(s, _)| std::cmp::Reverse(s.len()));
        let costing = Costing { types, operands: &operands, known: shapes };
        let mut classes: Vec<Class> = Vec::new();
        for (live, n) in sets {
            let alone = costing.cost(&live, &[(live.clone(), n)]);
            let best = classes
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    let mut slots = c.slots.clone();
                    slots.extend(live.iter().filter(|l| !c.slots.contains(l)));
                    slots.sort_by_key(order);
                    let mut members = c.members.clone();
                    members.push((live.clone(), n));
                    // Signed: a grown class may reach a shape another function has.
                    let grown = costing.cost(&slots, &members) as i64 - costing.cost(&c.slots, &c.members) as i64;
                    (grown, i, slots)
                })
                .min_by_key(|(grown, i, _)| (*grown, *i));
            match best {
                Some((grown, i, slots)) if grown < alone as i64 => {
                    classes[i].slots = slots;
                    classes[i].members.push((live, n));
                }
                _ => classes.push(Class { slots: live.clone(), members: vec![(live, n)] }),
            }
        }
        let new_shapes: Vec<Vec<Ty>> = classes.iter().map(|c| costing.shape(&c.slots)).collect();
        for c in classes {
            for (live, _) in c.members {
                slots_of.insert((operands.clone(), live), c.slots.clone());
            }
        }
        shapes.extend(new_shapes);
    }
    for rp in rps.iter_mut() {
        // Every point's live set was grouped above.
        rp.slots = slots_of.get(&(rp.saved.clone(), rp.locals.clone())).cloned().unwrap_or_else(|| rp.locals.clone());
    }
}

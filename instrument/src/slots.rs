//! Which slots the frame of each resume point has, and so which save class
//! (one piece of unwind code, `rewrite::body`) the point shares with
//! others.
//!
//! A frame holds the locals live at its point, so points with different
//! live sets would each need unwind code of their own: a block that passes
//! every slot to a save helper (one per list of slot types, each with a
//! function type of its own: wasmtime compiles a trampoline for every
//! function type of a module) or, for a long list no other class has,
//! stores them inline (`rewrite::Packs`).
//! wasi-libc's `printf_core` has over 120 points with about 70 distinct
//! live sets of 1 to 40 `i32`s, most of them one or two locals apart.
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
use crate::rewrite::frames::sort_into_slot_order;

/// The slot types (locals, then operands) of the save helpers the module
/// has so far: a class of one of these shapes costs no new helper.
pub(crate) type Shapes = HashSet<Vec<Ty>>;

/// Estimated bytes of code a class costs: its block (a constant, the
/// slots passed, a call and a branch) and, unless a class of another
/// function already has one of its shape, its save helper (a store per
/// slot), which is also about what a long list costs stored inline when
/// no other class takes its shape later. Fewer helpers also mean fewer
/// function types, each of which wasmtime compiles a trampoline for.
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

    /// The zeroing of `dead` locals of the types in `types` (a [`type_bit`]
    /// mask) on one point's unwind path: a constant per type, then a
    /// `local.tee` or `local.set` per local.
    fn zeroing(dead: usize, types: u8) -> usize {
        let constants: usize = [(Ty::I32, 2), (Ty::I64, 2), (Ty::F32, 5), (Ty::F64, 9)]
            .iter()
            .filter(|(t, _)| types & type_bit(*t) != 0)
            .map(|(_, bytes)| bytes)
            .sum();
        constants + 2 * dead
    }
}

/// A numeric type as one bit of a mask (references are never dead slots).
fn type_bit(t: Ty) -> u8 {
    match t {
        Ty::I32 => 1,
        Ty::I64 => 2,
        Ty::F32 => 4,
        Ty::F64 => 8,
        Ty::FuncRef | Ty::ExternRef => 0,
    }
}

/// Points of one live set in a class: how many, and the locals the class
/// has slots for that are dead at them (their count and types), which
/// their unwind edges set to zero.
struct Member {
    live: Vec<u32>,
    points: usize,
    dead: usize,
    dead_types: u8,
}

/// A class being grown: its slots (in slot order, and as a mask by local
/// index), its members, and the estimated cost of its block and helper.
struct Class {
    slots: Vec<u32>,
    has_slot: Vec<bool>,
    members: Vec<Member>,
    code: usize,
}

impl Class {
    /// A class of its own for `points` points live at `live`.
    fn new(costing: &Costing<'_>, live: &[u32], points: usize) -> Class {
        let mut has_slot = vec![false; costing.types.len()];
        for &l in live {
            has_slot[l as usize] = true;
        }
        let member = Member { live: live.to_vec(), points, dead: 0, dead_types: 0 };
        Class { slots: live.to_vec(), has_slot, members: vec![member], code: costing.code(live) }
    }

    /// Takes in `points` points live at `live` (also given as a mask by
    /// local index), which makes its slots `slots` ([`Costing::growth`]).
    fn join(&mut self, costing: &Costing<'_>, live: &[u32], is_live: &[bool], points: usize, slots: Vec<u32>) {
        let added: Vec<u32> = live.iter().copied().filter(|&l| !self.has_slot[l as usize]).collect();
        let added_types = costing.mask(added.iter().copied());
        for m in &mut self.members {
            m.dead += added.len();
            m.dead_types |= added_types;
        }
        let dead = self.slots.iter().copied().filter(|&l| !is_live[l as usize]);
        let member = Member { live: live.to_vec(), points, dead: dead.clone().count(), dead_types: costing.mask(dead) };
        self.members.push(member);
        for &l in &added {
            self.has_slot[l as usize] = true;
        }
        self.code = costing.code(&slots);
        self.slots = slots;
    }
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

    fn code(&self, slots: &[u32]) -> usize {
        Cost::class(&self.shape(slots), self.known)
    }

    fn mask(&self, locals: impl Iterator<Item = u32>) -> u8 {
        locals.fold(0, |m, l| m | type_bit(self.types[l as usize]))
    }

    /// How much the cost of class `c` grows if `points` points live at
    /// `live` (also given as a mask by local index) join it, and its slots
    /// then. Computed from what changes: the block and helper, the locals
    /// every member now zeroes too, and the new member's zeroing.
    fn growth(&self, c: &Class, live: &[u32], is_live: &[bool], points: usize) -> (i64, Vec<u32>) {
        let added: Vec<u32> = live.iter().copied().filter(|&l| !c.has_slot[l as usize]).collect();
        let added_types = self.mask(added.iter().copied());
        let mut slots = c.slots.clone();
        slots.extend_from_slice(&added);
        sort_into_slot_order(&mut slots, self.types);
        let code = self.code(&slots) as i64 - c.code as i64;
        let members: usize = (c.members.iter())
            .map(|m| m.points * (Cost::zeroing(m.dead + added.len(), m.dead_types | added_types) - Cost::zeroing(m.dead, m.dead_types)))
            .sum();
        let dead = c.slots.iter().copied().filter(|&l| !is_live[l as usize]);
        let new = points * Cost::zeroing(dead.clone().count(), self.mask(dead));
        (code + members as i64 + new as i64, slots)
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
    let mut slots_of: HashMap<(Vec<Ty>, Vec<u32>), Vec<u32>> = HashMap::new();
    let mut is_live = vec![false; types.len()];
    for ((operands, _), mut sets) in groups {
        sets.sort_by_key(|(s, _)| std::cmp::Reverse(s.len()));
        let costing = Costing { types, operands: &operands, known: shapes };
        let mut classes: Vec<Class> = Vec::new();
        for (live, points) in sets {
            for &l in &live {
                is_live[l as usize] = true;
            }
            let alone = costing.code(&live) as i64;
            let best = (classes.iter().enumerate())
                .map(|(i, c)| {
                    let (grown, slots) = costing.growth(c, &live, &is_live, points);
                    (grown, i, slots)
                })
                .min_by_key(|(grown, i, _)| (*grown, *i));
            match best {
                Some((grown, i, slots)) if grown < alone => classes[i].join(&costing, &live, &is_live, points, slots),
                _ => classes.push(Class::new(&costing, &live, points)),
            }
            for &l in &live {
                is_live[l as usize] = false;
            }
        }
        let new_shapes: Vec<Vec<Ty>> = classes.iter().map(|c| costing.shape(&c.slots)).collect();
        for c in classes {
            for m in c.members {
                slots_of.insert((operands.clone(), m.live), c.slots.clone());
            }
        }
        shapes.extend(new_shapes);
    }
    for rp in rps.iter_mut() {
        // Every point's live set was grouped above.
        rp.slots = slots_of.get(&(rp.saved.clone(), rp.locals.clone())).cloned().unwrap_or_else(|| rp.locals.clone());
    }
}

//! Whether two versions of a function compute the same values up to some
//! instruction, although their shadow-stack frames are laid out
//! differently.
//!
//! A release that adds a local array, or that the compiler inlines
//! differently, changes the size of a function's frame in linear memory,
//! and with it the constant of the prologue (`stack pointer - size`) and the
//! offset of every frame access after it. The code is otherwise the same
//! and computes the same values, except addresses in the frame, which a
//! retreat recomputes from the stack pointer anyway ([`crate::symbolic`]).
//! So two instructions are equivalent when their bytes are equal with every
//! relocated field read as what it names (as [`crate::body`] compares
//! them), or when both are frame-layout constants: an `i32.const` that the
//! next instruction adds to a frame address, or the offset of a load or
//! store whose address is in the frame.
//!
//! Instructions are paired by a diff of the two sequences, so code inserted
//! or removed in one place leaves the rest paired. From the unpaired
//! instructions [`crate::symbolic`] follows what they compute, through the
//! operand stack and locals: a local whose every value comes from paired
//! instructions over such values is computed the same way in both versions
//! ("value numbering" of the two bodies, with loops).

use crate::body::{code_fields, code_start, CodeFields, Ref};
use crate::symbolic::{Access, Body, Sym};
use crate::version::Version;

/// One version of a function, ready for comparison.
pub(crate) struct Side<'a> {
    body: &'a Body,
    fields: CodeFields,
    /// Code offset of the first instruction.
    start: u32,
}

impl<'a> Side<'a> {
    /// Function `func` of `version`, walked as `body`.
    pub(crate) fn new(version: &Version, func: u32, body: &'a Body) -> Option<Side<'a>> {
        let fields = code_fields(&version.info, &version.wasm, func).ok()?;
        let skip = code_start(&version.info, &version.wasm, func).ok()?;
        let start = version.info.functions.get(func as usize)?.body.as_ref()?.start + skip;
        Some(Side { body, fields, start })
    }

    /// The bytes of instruction `i`, relative to the first instruction.
    fn range(&self, i: usize) -> std::ops::Range<usize> {
        let at = |j: usize| match self.body.instrs.get(j) {
            Some(instr) => (instr.offset - self.start) as usize,
            None => self.fields.bytes.len(),
        };
        at(i)..at(i + 1)
    }

    fn refs(&self, i: usize) -> Vec<&Ref> {
        let r = self.range(i);
        self.fields.fields.iter().filter(|(at, _)| r.contains(&(*at as usize))).map(|(_, f)| f).collect()
    }

    /// Whether instruction `i`'s immediate is a frame-layout constant.
    fn is_layout(&self, i: usize) -> bool {
        let opcode = |j: usize| self.fields.bytes.get(self.range(j).start).copied();
        const I32_CONST: u8 = 0x41;
        const ADD_SUB_AND_OR: [u8; 4] = [0x6a, 0x6b, 0x71, 0x72];
        let feeds_frame_address = opcode(i) == Some(I32_CONST)
            && opcode(i + 1).is_some_and(|op| ADD_SUB_AND_OR.contains(&op))
            && matches!(self.body.instrs.get(i + 1).map(|n| n.value), Some(Sym::Sp(_) | Sym::Frame));
        feeds_frame_address || matches!(self.body.instrs[i].access, Access::FrameLoad(_) | Access::FrameStore(_))
    }
}

/// How the instructions of two versions pair up: the longest common
/// subsequence of equivalent instructions (a Myers diff, then a second one
/// over what the first left, for code that moved), and for each version,
/// which instructions have no partner.
pub(crate) struct Alignment {
    /// Unpaired instructions of the old version.
    pub(crate) old_differs: Vec<bool>,
    /// Unpaired instructions of the new version.
    pub(crate) new_differs: Vec<bool>,
    /// The new partner of each paired old instruction.
    pub(crate) partner: std::collections::HashMap<usize, usize>,
    /// Which new local each old local became, where the paired accesses
    /// agree on one.
    pub(crate) locals: std::collections::HashMap<u32, u32>,
    /// Whether every paired frame-layout constant is the same number in
    /// both: the frame in linear memory is laid out alike, so numbers
    /// computed from frame addresses (a length between two of them) are
    /// the same too.
    pub(crate) same_frame_layout: bool,
}

/// What must be equal for two instructions to pair: their bytes with
/// relocated fields blanked and what those fields name, or only the opcode
/// for a frame-layout constant.
#[derive(PartialEq, Eq, Hash)]
enum Key<'a> {
    Exact(&'a [u8], Vec<&'a Ref>),
    /// A local access: its opcode and the variable it names.
    Local(u8, u32),
    /// A frame-layout constant, a branch (whose depth changes when code
    /// moves into another construct) or a local access (whose index the
    /// compiler may renumber): the opcode alone.
    Opcode(u8),
}

/// Opcodes of control instructions that compute nothing.
const CONTROL: [u8; 8] = [0x02, 0x03, 0x04, 0x05, 0x0b, 0x0c, 0x0d, 0x0e];
/// `local.get`, `local.set`, `local.tee`.
const LOCAL: [u8; 3] = [0x20, 0x21, 0x22];

impl Side<'_> {
    fn key(&self, i: usize) -> Key<'_> {
        let bytes = &self.fields.bytes[self.range(i)];
        let opcode = bytes.first().copied().unwrap_or(0);
        match self.is_layout(i) || CONTROL.contains(&opcode) || LOCAL.contains(&opcode) {
            true => Key::Opcode(opcode),
            false => Key::Exact(bytes, self.refs(i)),
        }
    }

    fn opcode(&self, i: usize) -> u8 {
        self.fields.bytes.get(self.range(i).start).copied().unwrap_or(0)
    }

    /// The local an instruction reads or writes.
    fn local(&self, i: usize) -> Option<u32> {
        let bytes = &self.fields.bytes[self.range(i)];
        if !LOCAL.contains(bytes.first()?) {
            return None;
        }
        let mut reader = wasmparser::BinaryReader::new(&bytes[1..], 0);
        reader.read_var_u32().ok()
    }
}

/// Pairs the instructions of the two versions.
pub(crate) fn align<'s>(old: &'s Side<'_>, new: &'s Side<'_>) -> Alignment {
    // First with local accesses compared by opcode alone, to learn how the
    // compiler renumbered the locals; then again with each new local read
    // as the old one it became, so that accesses pair only where they name
    // the same variable.
    let loose = pair_up(old, new, &|_, _| None);
    let renamed: std::collections::HashMap<u32, u32> = loose.locals.iter().map(|(a, b)| (*b, *a)).collect();
    let mut out = pair_up(old, new, &|side, local| match side {
        Which::Old => Some(local),
        Which::New => Some(renamed.get(&local).copied().unwrap_or(u32::MAX - local)),
    });
    out.locals = loose.locals;
    out.rename_check(old, new);
    out.same_frame_layout =
        out.partner.iter().all(|(&i, &j)| !(old.is_layout(i) || new.is_layout(j)) || old.fields.bytes[old.range(i)] == new.fields.bytes[new.range(j)]);
    // Control computes nothing: whatever it pairs with, it differs in no
    // value.
    for (i, d) in out.old_differs.iter_mut().enumerate() {
        *d &= !CONTROL.contains(&old.opcode(i));
    }
    for (j, d) in out.new_differs.iter_mut().enumerate() {
        *d &= !CONTROL.contains(&new.opcode(j));
    }
    out
}

/// Which version an instruction belongs to.
#[derive(Clone, Copy)]
enum Which {
    Old,
    New,
}

/// One alignment: a diff, then a second one over what the first left (code
/// that moved is left over on both sides, now in the same order). `local`
/// gives the identity under which a local access is compared, or `None` to
/// compare it by opcode alone.
fn pair_up<'s>(old: &'s Side<'_>, new: &'s Side<'_>, local: &dyn Fn(Which, u32) -> Option<u32>) -> Alignment {
    // The diff wants ordered items: number the distinct keys.
    let mut ids: std::collections::HashMap<Key<'s>, u32> = Default::default();
    let mut id = |k: Key<'s>| {
        let next = ids.len() as u32;
        *ids.entry(k).or_insert(next)
    };
    let key = |side: &'s Side<'_>, which: Which, i: usize| match side.local(i).and_then(|l| local(which, l)) {
        Some(l) => Key::Local(side.opcode(i), l),
        None => side.key(i),
    };
    let a: Vec<u32> = (0..old.body.instrs.len()).map(|i| id(key(old, Which::Old, i))).collect();
    let b: Vec<u32> = (0..new.body.instrs.len()).map(|i| id(key(new, Which::New, i))).collect();
    let mut out = Alignment {
        old_differs: vec![true; a.len()],
        new_differs: vec![true; b.len()],
        partner: Default::default(),
        locals: Default::default(),
        same_frame_layout: false,
    };
    let all_old: Vec<usize> = (0..a.len()).collect();
    let all_new: Vec<usize> = (0..b.len()).collect();
    out.pair(&a, &b, &all_old, &all_new);
    let rest_old: Vec<usize> = (0..a.len()).filter(|&i| out.old_differs[i]).collect();
    let rest_new: Vec<usize> = (0..b.len()).filter(|&j| out.new_differs[j]).collect();
    out.pair(&a, &b, &rest_old, &rest_new);
    out.rename_locals(old, new);
    out
}

impl Alignment {
    /// Reads the locals each paired local access names on both sides: an
    /// old local and a new one that the pairs tie only to each other are
    /// the same variable; a paired access that names any other pairing
    /// differs after all.
    fn rename_locals(&mut self, old: &Side<'_>, new: &Side<'_>) {
        self.locals.clear();
        let mut votes: std::collections::HashMap<(u32, u32), usize> = Default::default();
        for (&i, &j) in &self.partner {
            if let (Some(a), Some(b)) = (old.local(i), new.local(j)) {
                *votes.entry((a, b)).or_default() += 1;
            }
        }
        let best = |key: &dyn Fn(&(u32, u32)) -> u32, who: u32| {
            let mut candidates: Vec<(&(u32, u32), &usize)> = votes.iter().filter(|(pair, _)| key(pair) == who).collect();
            candidates.sort_by_key(|(pair, n)| (std::cmp::Reverse(**n), **pair));
            candidates.first().map(|(pair, _)| **pair)
        };
        for &(a, b) in votes.keys() {
            if best(&|p| p.0, a) == Some((a, b)) && best(&|p| p.1, b) == Some((a, b)) {
                self.locals.insert(a, b);
            }
        }
    }

    /// Marks paired local accesses that disagree with the renaming.
    fn rename_check(&mut self, old: &Side<'_>, new: &Side<'_>) {
        for (&i, &j) in &self.partner {
            if let (Some(a), Some(b)) = (old.local(i), new.local(j)) {
                if self.locals.get(&a) != Some(&b) {
                    self.old_differs[i] = true;
                    self.new_differs[j] = true;
                }
            }
        }
        // A local of a parameter keeps its index: the caller fills it.
    }

    /// Pairs what a diff of the instructions `old` and `new` (indices into
    /// the keys `a` and `b`) finds equal.
    fn pair(&mut self, a: &[u32], b: &[u32], old: &[usize], new: &[usize]) {
        let xs: Vec<u32> = old.iter().map(|&i| a[i]).collect();
        let ys: Vec<u32> = new.iter().map(|&j| b[j]).collect();
        for op in similar::capture_diff_slices(similar::Algorithm::Myers, &xs, &ys) {
            if let similar::DiffOp::Equal { old_index, new_index, len } = op {
                for k in 0..len {
                    let (i, j) = (old[old_index + k], new[new_index + k]);
                    self.old_differs[i] = false;
                    self.new_differs[j] = false;
                    self.partner.insert(i, j);
                }
            }
        }
    }
}

//! Types across two versions: whether they are the same, where they first
//! differ (for a refusal a user can act on), and how a value of the old
//! type becomes a value of the new one as byte copies.
//!
//! Sameness is structural and coinductive: a pair of types being compared
//! is assumed equal while its parts are compared, so a self-referencing
//! struct (`struct node { struct node *next; }`) ends the recursion instead
//! of looping.

use std::collections::{HashSet, VecDeque};

use super::{DebugInfo, Member, Type, TypeId};

/// Whether two types are the same: same sizes, same member names, offsets
/// and types, recursively. Base types compare by size and encoding (`int`
/// and `long` are the same four bytes on wasm32).
pub fn same_type(a: &DebugInfo, ta: TypeId, b: &DebugInfo, tb: TypeId) -> bool {
    Same { a, b, assumed: HashSet::new() }.eq(ta, tb)
}

struct Same<'x> {
    a: &'x DebugInfo,
    b: &'x DebugInfo,
    assumed: HashSet<(TypeId, TypeId)>,
}

impl Same<'_> {
    fn eq(&mut self, ta: TypeId, tb: TypeId) -> bool {
        if !self.assumed.insert((ta, tb)) {
            return true;
        }
        let ok = match (self.a.ty(ta), self.b.ty(tb)) {
            (Type::Base { size: s1, encoding: e1, .. }, Type::Base { size: s2, encoding: e2, .. }) => s1 == s2 && e1 == e2,
            (Type::Pointer { to: None }, Type::Pointer { to: None }) => true,
            (Type::Pointer { to: Some(x) }, Type::Pointer { to: Some(y) }) => self.eq(*x, *y),
            (
                Type::Struct { name: n1, size: s1, members: m1 },
                Type::Struct { name: n2, size: s2, members: m2 },
            )
            | (Type::Union { name: n1, size: s1, members: m1 }, Type::Union { name: n2, size: s2, members: m2 }) => {
                n1 == n2 && s1 == s2 && m1.len() == m2.len() && m1.iter().zip(m2).all(|(x, y)| self.member(x, y))
            }
            (Type::Enum { name: n1, size: s1 }, Type::Enum { name: n2, size: s2 }) => n1 == n2 && s1 == s2,
            (Type::Array { element: x, count: c1 }, Type::Array { element: y, count: c2 }) => c1 == c2 && self.eq(*x, *y),
            (Type::Function, Type::Function) => true,
            _ => false,
        };
        if !ok {
            self.assumed.remove(&(ta, tb));
        }
        ok
    }

    fn member(&mut self, x: &Member, y: &Member) -> bool {
        x.name == y.name && x.offset == y.offset && x.bit_field == y.bit_field && self.eq(x.ty, y.ty)
    }
}

/// Where two types that are not the same first differ, for a message: the
/// type whose own layout changed nearest to the types compared, what
/// changed in it, and how it is reached from them (`struct Parse, reached as
/// BtShared.db->pParse, gained member szOpAlloc`). `None` when they are the
/// same. A release that changes a type deep inside a graph of structs makes
/// every pointer into that graph change type; the user needs the change
/// itself, not the first pointer that leads to it.
pub fn first_difference(a: &DebugInfo, ta: TypeId, b: &DebugInfo, tb: TypeId) -> Option<String> {
    // Breadth first: the nearest change, reached by the shortest path.
    let mut seen = HashSet::new();
    let mut queue = VecDeque::from([(ta, tb, String::new())]);
    while let Some((x, y, path)) = queue.pop_front() {
        if !seen.insert((x, y)) {
            continue;
        }
        let name = a.type_name(x);
        let at = |what: String| match path.trim_end_matches("->") {
            "" => Some(format!("{name} {what}")),
            reached => Some(format!("{name}, reached as {reached}, {what}")),
        };
        // `s.m` for a member, `s.m->n` for a member of what `s.m` points to.
        let step = |member: &str| match path.as_str() {
            "" => format!("{}.{member}", name.trim_start_matches("struct ").trim_start_matches("union ")),
            through if through.ends_with("->") => format!("{through}{member}"),
            within => format!("{within}.{member}"),
        };
        match (a.ty(x), b.ty(y)) {
            (Type::Base { size: s1, encoding: e1, .. }, Type::Base { size: s2, encoding: e2, .. }) => {
                if (s1, e1) != (s2, e2) {
                    return at(format!("became {}", b.type_name(y)));
                }
            }
            (Type::Pointer { to: None }, Type::Pointer { to: None }) | (Type::Function, Type::Function) => {}
            (Type::Pointer { to: Some(p) }, Type::Pointer { to: Some(q) }) => {
                // A path starts at a struct: from a pointer, at its pointee.
                let path = if path.is_empty() { path } else { format!("{path}->") };
                queue.push_back((*p, *q, path));
            }
            (
                Type::Struct { name: n1, size: s1, members: m1 },
                Type::Struct { name: n2, size: s2, members: m2 },
            )
            | (Type::Union { name: n1, size: s1, members: m1 }, Type::Union { name: n2, size: s2, members: m2 }) => {
                if n1 != n2 {
                    return at(format!("became {}", b.type_name(y)));
                }
                if let Some(change) = member_changes(a, b, m1, m2, *s1, *s2) {
                    return at(change);
                }
                for (u, v) in m1.iter().zip(m2) {
                    queue.push_back((u.ty, v.ty, step(u.name.as_deref().unwrap_or("<anonymous>"))));
                }
            }
            (Type::Enum { name: n1, size: s1 }, Type::Enum { name: n2, size: s2 }) => {
                if (n1, s1) != (n2, s2) {
                    return at(format!("became {}", b.type_name(y)));
                }
            }
            (Type::Array { element: e1, count: c1 }, Type::Array { element: e2, count: c2 }) => {
                if c1 != c2 {
                    return at(format!("became {}", b.type_name(y)));
                }
                queue.push_back((*e1, *e2, format!("{path}[]")));
            }
            _ => return at(format!("became {}", b.type_name(y))),
        }
    }
    None
}

/// What changed in a struct's or union's own members (names, sizes,
/// places, bit-fields, the whole's size), if anything.
fn member_changes(a: &DebugInfo, b: &DebugInfo, m1: &[Member], m2: &[Member], s1: u64, s2: u64) -> Option<String> {
    let label = |m: &Member| m.name.clone().unwrap_or_else(|| "<anonymous>".into());
    let counterpart = |m: &Member, ms: &[Member]| ms.iter().position(|o| o.name == m.name);
    let mut changes = Vec::new();
    let gained: Vec<String> = m2.iter().filter(|m| counterpart(m, m1).is_none()).map(label).collect();
    let lost: Vec<String> = m1.iter().filter(|m| counterpart(m, m2).is_none()).map(label).collect();
    if !gained.is_empty() {
        changes.push(format!("gained {}", names("member", &gained)));
    }
    if !lost.is_empty() {
        changes.push(format!("lost {}", names("member", &lost)));
    }
    // A member whose own size changed moves every member after it: name
    // the cause, not the members it moved. A struct member of the same
    // type that grew is explained from inside (the caller goes on there).
    let mut inside = false;
    for u in m1 {
        let Some(v) = counterpart(u, m2).map(|j| &m2[j]) else { continue };
        if a.size_of(u.ty) == b.size_of(v.ty) {
            continue;
        }
        let aggregate = |d: &DebugInfo, t: TypeId| matches!(d.ty(t), Type::Struct { .. } | Type::Union { .. });
        if aggregate(a, u.ty) && aggregate(b, v.ty) && a.type_name(u.ty) == b.type_name(v.ty) {
            inside = true;
        } else {
            changes.push(format!("member {} became {} (was {})", label(u), b.type_name(v.ty), a.type_name(u.ty)));
        }
    }
    if inside && changes.is_empty() {
        return None;
    }
    if changes.is_empty() {
        let moved: Vec<String> = m1
            .iter()
            .zip(m2)
            .filter(|(u, v)| u.name != v.name || u.offset != v.offset || u.bit_field != v.bit_field)
            .map(|(u, _)| label(u))
            .collect();
        if !moved.is_empty() {
            changes.push(format!("moved {}", names("member", &moved)));
        }
    }
    if changes.is_empty() && s1 != s2 {
        changes.push(format!("grew from {s1} to {s2} bytes"));
    }
    (!changes.is_empty()).then(|| changes.join(" and "))
}

/// `member a`, `members a, b`, or `members a, b, c, d and 6 more`.
fn names(what: &str, list: &[String]) -> String {
    const SHOWN: usize = 4;
    let s = if list.len() == 1 { "" } else { "s" };
    match list.len() > SHOWN {
        true => format!("{what}{s} {} and {} more", list[..SHOWN].join(", "), list.len() - SHOWN),
        false => format!("{what}{s} {}", list.join(", ")),
    }
}

/// One copy from the old value's bytes to the new value's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteCopy {
    /// Offset in the old value.
    pub from: u64,
    /// Offset in the new value.
    pub to: u64,
    /// Number of bytes.
    pub len: u64,
}

/// How to build a new-version value from an old one: these copies, every
/// other byte zero.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ValueMap {
    /// Copies in order of the new value's offsets, adjacent ones merged.
    pub copies: Vec<ByteCopy>,
    /// Paths of old members (or array tails, `a[4..8]`) with no place in
    /// the new type: their values are lost.
    pub dropped: Vec<String>,
    /// Paths of new members (or array tails) with no old counterpart: they
    /// start zeroed.
    pub zeroed: Vec<String>,
    /// Pointers whose pointee type changed, copied as they are: the objects
    /// they point to are converted by the heap tracer, which rewrites them.
    /// Only [`value_map_through_pointers`] fills this in.
    pub pointers: Vec<PointerField>,
}

impl ValueMap {
    /// Whether this carries a value of `old_size` bytes whole, to the same
    /// offsets of a value of `new_size` bytes: the bytes need not move.
    pub fn is_whole_copy(&self, old_size: u32, new_size: u32) -> bool {
        old_size == new_size
            && self.zeroed.is_empty()
            && self.dropped.is_empty()
            && matches!(self.copies.as_slice(), [c] if c.from == 0 && c.to == 0 && c.len == u64::from(old_size))
    }
}

/// A pointer inside a mapped value whose pointee type differs between the
/// versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PointerField {
    /// Its offset in the old value.
    pub from: u64,
    /// Its offset in the new value.
    pub to: u64,
    /// The old pointee type.
    pub old: TypeId,
    /// The new pointee type.
    pub new: TypeId,
}

/// Why a value cannot be carried over.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MapReason {
    /// The type changed kind or representation.
    #[error("{from} became {to}")]
    Changed {
        /// The old type, spelled as C.
        from: String,
        /// The new type, spelled as C.
        to: String,
    },
    /// A pointer whose pointee type changed: the objects it points to
    /// would need transforming too.
    #[error("the type {pointee} it points to changed layout ({change})")]
    Pointee {
        /// The pointee type, spelled as C.
        pointee: String,
        /// Where the pointee's layout changed ([`first_difference`]).
        change: String,
    },
    /// A union changed: which member is live is unknown.
    #[error("union {name} changed layout ({change})")]
    Union {
        /// Its tag, or `<anonymous>`.
        name: String,
        /// Where its layout changed ([`first_difference`]).
        change: String,
    },
    /// Bit-fields moved, changed width or appeared.
    #[error("its bit-fields changed")]
    BitFields,
    /// An array without a known length.
    #[error("array length unknown")]
    UnknownLength,
    /// A type this reader does not model.
    #[error("type {0} cannot be transferred")]
    Opaque(String),
}

impl MapReason {
    /// What a user can do about it.
    pub fn advice(&self) -> &'static str {
        match self {
            // The value itself would map; what it points to needs
            // converting too, which only a mapping through pointers plans.
            MapReason::Pointee { .. } => {
                "the objects it points to must be converted too: map it with value_map_through_pointers and trace them"
            }
            _ => "keep the old type, or transform this value by hand",
        }
    }
}

/// A value that cannot be mapped, and the member path where it fails.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {reason} ({})", if path.is_empty() { "value" } else { path }, reason.advice())]
pub struct MapError {
    /// Member path from the value, like `stats.last.when`; empty for the
    /// value itself.
    pub path: String,
    /// What is wrong there.
    pub reason: MapReason,
}

/// How to turn a value of type `from` (old version) into one of type `to`
/// (new version): byte copies, everything not copied being zero. Structs
/// map member by member by name, recursively; members only in `to` stay
/// zero and are listed in `zeroed`; members only in `from` are listed in
/// `dropped`; arrays copy min(count) elements (element by element when the
/// element type changed); base types must keep size and encoding; pointers
/// copy when their pointee types are the same. Anything else is an error
/// naming the member path.
pub fn value_map(a: &DebugInfo, from: TypeId, b: &DebugInfo, to: TypeId) -> Result<ValueMap, MapError> {
    value_map_named(a, from, b, to, "")
}

/// [`value_map`] with paths starting at `root` (the variable's name), so a
/// message reads `stats.last.when: int became char*`.
pub fn value_map_named(a: &DebugInfo, from: TypeId, b: &DebugInfo, to: TypeId, root: &str) -> Result<ValueMap, MapError> {
    map_value(Mapper { a, b, out: ValueMap::default(), through_pointers: false }, from, to, root)
}

/// [`value_map_named`] for a program whose heap is converted too: a pointer
/// whose pointee type changed is copied and listed in
/// [`ValueMap::pointers`] instead of refusing the value.
pub fn value_map_through_pointers(
    a: &DebugInfo,
    from: TypeId,
    b: &DebugInfo,
    to: TypeId,
    root: &str,
) -> Result<ValueMap, MapError> {
    map_value(Mapper { a, b, out: ValueMap::default(), through_pointers: true }, from, to, root)
}

fn map_value(mut m: Mapper<'_>, from: TypeId, to: TypeId, root: &str) -> Result<ValueMap, MapError> {
    m.map(from, to, 0, 0, root)?;
    m.out.pointers.sort_by_key(|p| p.from);
    m.out.copies.sort_by_key(|c| c.to);
    let mut merged: Vec<ByteCopy> = Vec::with_capacity(m.out.copies.len());
    for c in m.out.copies {
        match merged.last_mut() {
            Some(last) if last.from + last.len == c.from && last.to + last.len == c.to => last.len += c.len,
            Some(last) if last.from == c.from && last.to == c.to => last.len = last.len.max(c.len),
            _ => merged.push(c),
        }
    }
    m.out.copies = merged;
    Ok(m.out)
}

struct Mapper<'x> {
    a: &'x DebugInfo,
    b: &'x DebugInfo,
    out: ValueMap,
    through_pointers: bool,
}

/// A data pointer's size on wasm32.
const POINTER_SIZE: u64 = 4;

fn join(path: &str, member: &str) -> String {
    if path.is_empty() { member.to_string() } else { format!("{path}.{member}") }
}

impl Mapper<'_> {
    fn fail(&self, path: &str, reason: MapReason) -> MapError {
        MapError { path: path.to_string(), reason }
    }

    fn changed(&self, path: &str, from: TypeId, to: TypeId) -> MapError {
        self.fail(path, MapReason::Changed { from: self.a.type_name(from), to: self.b.type_name(to) })
    }

    fn difference(&self, from: TypeId, to: TypeId) -> String {
        first_difference(self.a, from, self.b, to).unwrap_or_else(|| "a change this reader does not describe".into())
    }

    fn copy(&mut self, from: u64, to: u64, len: u64) {
        if len > 0 {
            self.out.copies.push(ByteCopy { from, to, len });
        }
    }

    fn map(&mut self, from: TypeId, to: TypeId, at_from: u64, at_to: u64, path: &str) -> Result<(), MapError> {
        let (a, b) = (self.a, self.b);
        if same_type(a, from, b, to) {
            let Some(size) = a.size_of(from) else {
                return Err(self.fail(path, MapReason::Opaque(a.type_name(from))));
            };
            self.copy(at_from, at_to, size);
            return Ok(());
        }
        match (a.ty(from), b.ty(to)) {
            (Type::Struct { members: m1, .. }, Type::Struct { members: m2, .. }) => {
                self.members(m1, m2, at_from, at_to, path)
            }
            (Type::Union { name, .. }, Type::Union { .. }) => {
                let name = name.clone().unwrap_or_else(|| "<anonymous>".into());
                Err(self.fail(path, MapReason::Union { name, change: self.difference(from, to) }))
            }
            (Type::Pointer { to: Some(p) }, Type::Pointer { to: Some(q) })
                if self.through_pointers && a.type_name(from) == b.type_name(to) =>
            {
                self.copy(at_from, at_to, POINTER_SIZE);
                self.out.pointers.push(PointerField { from: at_from, to: at_to, old: *p, new: *q });
                Ok(())
            }
            (Type::Pointer { to: Some(p) }, Type::Pointer { to: Some(q) }) if a.type_name(from) == b.type_name(to) => {
                Err(self.fail(path, MapReason::Pointee { pointee: a.type_name(*p), change: self.difference(*p, *q) }))
            }
            (Type::Enum { size: s1, .. }, Type::Enum { size: s2, .. }) if s1 == s2 => {
                self.copy(at_from, at_to, *s1);
                Ok(())
            }
            (Type::Array { element: e1, count: c1 }, Type::Array { element: e2, count: c2 }) => {
                let (Some(c1), Some(c2)) = (*c1, *c2) else { return Err(self.fail(path, MapReason::UnknownLength)) };
                let (Some(s1), Some(s2)) = (a.size_of(*e1), b.size_of(*e2)) else {
                    return Err(self.fail(path, MapReason::Opaque(a.type_name(*e1))));
                };
                let n = c1.min(c2);
                if same_type(a, *e1, b, *e2) {
                    self.copy(at_from, at_to, n * s1);
                } else {
                    for i in 0..n {
                        let (dropped, zeroed) = (self.out.dropped.len(), self.out.zeroed.len());
                        self.map(*e1, *e2, at_from + i * s1, at_to + i * s2, &format!("{path}[]"))?;
                        // Every element loses or gains the same members: report them once.
                        if i > 0 {
                            self.out.dropped.truncate(dropped);
                            self.out.zeroed.truncate(zeroed);
                        }
                    }
                }
                if c1 > c2 {
                    self.out.dropped.push(format!("{path}[{c2}..{c1}]"));
                } else if c2 > c1 {
                    self.out.zeroed.push(format!("{path}[{c1}..{c2}]"));
                }
                Ok(())
            }
            _ => Err(self.changed(path, from, to)),
        }
    }

    fn members(&mut self, m1: &[Member], m2: &[Member], at_from: u64, at_to: u64, path: &str) -> Result<(), MapError> {
        // Bit-fields share bytes with their neighbours: carry them only when
        // every one of them stays where it was.
        let bits = |ms: &[Member]| -> Vec<(Option<String>, u64, u64)> {
            ms.iter().filter_map(|m| m.bit_field.map(|(o, w)| (m.name.clone(), o, w))).collect()
        };
        if bits(m1) != bits(m2) {
            return Err(self.fail(path, MapReason::BitFields));
        }
        // Anonymous members pair up by their rank among anonymous members.
        let label = |ms: &[Member], i: usize| -> String {
            match &ms[i].name {
                Some(n) => n.clone(),
                None => format!("<anonymous {}>", ms[..i].iter().filter(|m| m.name.is_none()).count()),
            }
        };
        let old: Vec<String> = (0..m1.len()).map(|i| label(m1, i)).collect();
        let new: Vec<String> = (0..m2.len()).map(|i| label(m2, i)).collect();
        for (j, target) in m2.iter().enumerate() {
            let sub = join(path, &new[j]);
            match old.iter().position(|n| *n == new[j]) {
                Some(i) => {
                    let source = &m1[i];
                    match (source.bit_field, target.bit_field) {
                        (Some((o1, w1)), Some(_)) => {
                            if !same_type(self.a, source.ty, self.b, target.ty) {
                                return Err(self.changed(&sub, source.ty, target.ty));
                            }
                            let (first, last) = (o1 / 8, (o1 + w1).div_ceil(8));
                            self.copy(at_from + first, at_to + first, last - first);
                        }
                        _ => self.map(source.ty, target.ty, at_from + source.offset, at_to + target.offset, &sub)?,
                    }
                }
                None => self.out.zeroed.push(sub),
            }
        }
        for name in &old {
            if !new.contains(name) {
                self.out.dropped.push(join(path, name));
            }
        }
        Ok(())
    }
}

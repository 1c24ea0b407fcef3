//! Types across two versions: whether they are the same, and how a value of
//! the old type becomes a value of the new one as byte copies.
//!
//! Sameness is structural and coinductive: a pair of types being compared
//! is assumed equal while its parts are compared, so a self-referencing
//! struct (`struct node { struct node *next; }`) ends the recursion instead
//! of looping.

use std::collections::HashSet;

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
    #[error("the type {pointee} it points to changed layout")]
    Pointee {
        /// The pointee type, spelled as C.
        pointee: String,
    },
    /// A union changed: which member is live is unknown.
    #[error("union {0} changed layout")]
    Union(String),
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

/// A value that cannot be mapped, and the member path where it fails.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {reason} (keep the old type, or transform this value by hand)", if path.is_empty() { "value" } else { path })]
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
    let mut m = Mapper { a, b, out: ValueMap::default() };
    m.map(from, to, 0, 0, root)?;
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
}

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
                Err(self.fail(path, MapReason::Union(name.clone().unwrap_or_else(|| "<anonymous>".into()))))
            }
            (Type::Pointer { to: Some(p) }, Type::Pointer { to: Some(_) }) if a.type_name(from) == b.type_name(to) => {
                Err(self.fail(path, MapReason::Pointee { pointee: a.type_name(*p) }))
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

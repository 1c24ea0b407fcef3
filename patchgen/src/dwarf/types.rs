//! C types decoded from DWARF type DIEs into one table per module.
//!
//! Typedefs and qualifiers (const, volatile, restrict, atomic) are looked
//! through: they do not change a value's bytes, which is all an update
//! cares about. A struct gets its id before its members are read, so a
//! struct that points to itself refers to its own id instead of recursing.

use std::collections::HashMap;

use gimli::AttributeValue;

use super::{DieRef, Error, Reader};

/// Index of a type in its [`super::DebugInfo`]; meaningless in another one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TypeId(pub u32);

/// The id of [`Type::Unknown`], shared by every DIE without a usable type.
pub(super) const UNKNOWN: TypeId = TypeId(0);
/// The id of [`Type::Function`].
const FUNCTION: TypeId = TypeId(1);

/// A C type, as far as its bytes go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Type {
    /// A scalar: `DW_ATE_*` encoding and size in bytes.
    Base {
        /// Its C name (`unsigned int`).
        name: String,
        /// Size in bytes.
        size: u64,
        /// `DW_ATE_*` value (signed, unsigned, float, boolean...).
        encoding: u8,
    },
    /// A data or function pointer.
    Pointer {
        /// The pointee; `None` for `void*`.
        to: Option<TypeId>,
    },
    /// A struct; a declaration without definition has no members and size 0.
    Struct {
        /// Its tag, if any.
        name: Option<String>,
        /// Size in bytes.
        size: u64,
        /// Members in declaration order.
        members: Vec<Member>,
    },
    /// A union.
    Union {
        /// Its tag, if any.
        name: Option<String>,
        /// Size in bytes.
        size: u64,
        /// Alternatives in declaration order.
        members: Vec<Member>,
    },
    /// An enumeration.
    Enum {
        /// Its tag, if any.
        name: Option<String>,
        /// Size in bytes.
        size: u64,
    },
    /// An array; `T[a][b]` is an array of `a` arrays of `b` `T`.
    Array {
        /// The element type.
        element: TypeId,
        /// Number of elements; `None` when unknown (`int x[]`).
        count: Option<u64>,
    },
    /// The pointee of a function pointer.
    Function,
    /// Something this reader does not model.
    Unknown,
}

/// A member of a struct or union.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Its name; `None` for an anonymous struct or union member.
    pub name: Option<String>,
    /// Byte offset from the start of the aggregate; for a bit-field, the
    /// byte holding its first bit.
    pub offset: u64,
    /// Its type.
    pub ty: TypeId,
    /// For a bit-field: (offset of its first bit from the start of the
    /// aggregate, width in bits), little-endian bit numbering.
    pub bit_field: Option<(u64, u64)>,
}

/// The type table of one module.
#[derive(Debug, Clone)]
pub(super) struct Types {
    table: Vec<Type>,
    /// `.debug_info` offset of a type DIE to its id; typedefs and qualifiers
    /// map to the id of what they name, `None` to void.
    by_offset: HashMap<usize, Option<TypeId>>,
    pointer_size: u64,
    /// Types being resolved right now, one inside the other.
    nesting: usize,
    /// A struct or union only declared where it is used (`struct sqlite3;`
    /// in a library's header) to its definition in another unit of the
    /// module, where exactly one layout is defined under its name.
    definitions: HashMap<TypeId, TypeId>,
}

impl Default for Types {
    fn default() -> Types {
        Types::new()
    }
}

/// How many typedefs and qualifiers may stack before the chain is deemed a
/// cycle.
const MAX_DEPTH: usize = 64;
/// How deeply types may contain or point to other types being resolved.
const MAX_NESTING: usize = 256;

impl Types {
    pub(super) fn new() -> Types {
        Types {
            table: vec![Type::Unknown, Type::Function],
            by_offset: HashMap::new(),
            pointer_size: 4,
            nesting: 0,
            definitions: HashMap::new(),
        }
    }

    pub(super) fn get(&self, id: TypeId) -> &Type {
        let id = self.definitions.get(&id).unwrap_or(&id);
        self.table.get(id.0 as usize).unwrap_or(&Type::Unknown)
    }

    /// Points every declaration-only struct or union at its definition in
    /// another unit, once all units are read. A program that keeps a
    /// library's objects through pointers to types the library's header
    /// only declares (`sqlite3 *db`) then has those objects' layout checked
    /// like any other. Where units define different layouts under one name,
    /// the declaration stays opaque: which one it means is unknown. Only
    /// the definitions read so far count: those the types of some unit's
    /// variables reach (a library's own globals reach its main structs).
    pub(super) fn link_declarations(&mut self) {
        // (is a union, name) -> the shallow layout of its definitions
        type Shape = (u64, Vec<(Option<String>, u64, Option<u64>, Option<(u64, u64)>)>);
        let mut defined: HashMap<(bool, &str), Option<(TypeId, Shape)>> = HashMap::new();
        let mut declared = Vec::new();
        for (i, ty) in self.table.iter().enumerate() {
            let (union, name, size, members) = match ty {
                Type::Struct { name: Some(n), size, members } => (false, n.as_str(), *size, members),
                Type::Union { name: Some(n), size, members } => (true, n.as_str(), *size, members),
                _ => continue,
            };
            let id = TypeId(i as u32);
            if size == 0 && members.is_empty() {
                declared.push((id, (union, name)));
                continue;
            }
            let shape: Shape =
                (size, members.iter().map(|m| (m.name.clone(), m.offset, self.size_of(m.ty), m.bit_field)).collect());
            defined
                .entry((union, name))
                .and_modify(|known| {
                    if known.as_ref().is_some_and(|(_, s)| *s != shape) {
                        *known = None;
                    }
                })
                .or_insert(Some((id, shape)));
        }
        let links: Vec<(TypeId, TypeId)> = declared
            .into_iter()
            .filter_map(|(id, key)| defined.get(&key).and_then(|d| d.as_ref()).map(|(def, _)| (id, *def)))
            .collect();
        self.definitions.extend(links);
    }

    /// Every struct defined with a tag (not only declared), with its tag.
    pub(super) fn defined_structs(&self) -> impl Iterator<Item = (TypeId, &str)> {
        self.table.iter().enumerate().filter_map(|(i, ty)| match ty {
            Type::Struct { name: Some(n), size, members } if *size > 0 || !members.is_empty() => {
                Some((TypeId(i as u32), n.as_str()))
            }
            _ => None,
        })
    }

    fn push(&mut self, ty: Type) -> TypeId {
        self.table.push(ty);
        TypeId(self.table.len() as u32 - 1)
    }

    pub(super) fn size_of(&self, id: TypeId) -> Option<u64> {
        let mut id = id;
        let mut factor: u64 = 1;
        // Arrays nest; walk them iteratively so a malformed self-containing
        // array cannot recurse without end.
        for _ in 0..MAX_DEPTH {
            match self.get(id) {
                Type::Base { size, .. } | Type::Struct { size, .. } | Type::Union { size, .. } | Type::Enum { size, .. } => {
                    return factor.checked_mul(*size);
                }
                Type::Pointer { .. } => return factor.checked_mul(self.pointer_size),
                Type::Array { element, count } => {
                    factor = factor.checked_mul((*count)?)?;
                    id = *element;
                }
                Type::Function | Type::Unknown => return None,
            }
        }
        None
    }

    pub(super) fn name(&self, id: TypeId) -> String {
        self.name_depth(id, 0)
    }

    fn name_depth(&self, id: TypeId, depth: usize) -> String {
        if depth > MAX_DEPTH {
            return "...".to_string();
        }
        let tagged = |kw: &str, name: &Option<String>| match name {
            Some(n) => format!("{kw} {n}"),
            None => format!("{kw} <anonymous>"),
        };
        match self.get(id) {
            Type::Base { name, .. } => name.clone(),
            Type::Pointer { to: None } => "void*".to_string(),
            Type::Pointer { to: Some(t) } => format!("{}*", self.name_depth(*t, depth + 1)),
            Type::Struct { name, .. } => tagged("struct", name),
            Type::Union { name, .. } => tagged("union", name),
            Type::Enum { name, .. } => tagged("enum", name),
            Type::Array { .. } => {
                // C writes the outermost dimension first: `int[4][2]`.
                let mut dims = String::new();
                let mut at = id;
                while let Type::Array { element, count } = self.get(at) {
                    dims.push_str(&format!("[{}]", count.map(|c| c.to_string()).unwrap_or_default()));
                    at = *element;
                    if dims.len() > 16 * MAX_DEPTH {
                        break;
                    }
                }
                format!("{}{dims}", self.name_depth(at, depth + 1))
            }
            Type::Function => "function".to_string(),
            Type::Unknown => "<unknown type>".to_string(),
        }
    }
}

/// The type a type DIE describes; `None` for void.
pub(super) fn resolve(r: &mut Reader<'_, '_>, die: DieRef) -> Result<Option<TypeId>, Error> {
    // Members and pointees recurse through here; bound the nesting so a
    // hostile chain of distinct types cannot exhaust the stack.
    if r.types.nesting > MAX_NESTING {
        return Err(Error::Malformed(format!("type at {:#x} nests too deeply", r.global_offset(die))));
    }
    r.types.nesting += 1;
    let id = resolve_depth(r, die, 0);
    r.types.nesting -= 1;
    id
}

fn resolve_depth<'a>(r: &mut Reader<'a, '_>, die: DieRef, depth: usize) -> Result<Option<TypeId>, Error> {
    let key = r.global_offset(die);
    if let Some(known) = r.types.by_offset.get(&key) {
        return Ok(*known);
    }
    if depth > MAX_DEPTH {
        return Err(Error::Malformed(format!("type at {key:#x}: typedefs or qualifiers form a cycle")));
    }
    let entry = r.entry(die)?;
    let units = r.units;
    let unit = &units[die.unit];
    let referenced = |r: &Reader<'a, '_>| match entry.attr_value(gimli::DW_AT_type) {
        Some(v) => r.reference(die.unit, v),
        None => Ok(None),
    };
    let size = entry.attr_value(gimli::DW_AT_byte_size).and_then(|v| v.udata_value()).unwrap_or(0);
    let name = match entry.attr_value(gimli::DW_AT_name) {
        Some(v) => Some(r.string(die.unit, v)?),
        None => None,
    };
    let id = match entry.tag() {
        gimli::DW_TAG_typedef
        | gimli::DW_TAG_const_type
        | gimli::DW_TAG_volatile_type
        | gimli::DW_TAG_restrict_type
        | gimli::DW_TAG_atomic_type => match referenced(r)? {
            Some(target) => resolve_depth(r, target, depth + 1)?,
            None => None,
        },
        gimli::DW_TAG_base_type => {
            let encoding = match entry.attr_value(gimli::DW_AT_encoding) {
                Some(AttributeValue::Encoding(e)) => e.0,
                _ => 0,
            };
            Some(r.types.push(Type::Base { name: name.unwrap_or_default(), size, encoding }))
        }
        gimli::DW_TAG_pointer_type | gimli::DW_TAG_reference_type | gimli::DW_TAG_rvalue_reference_type => {
            r.types.pointer_size = u64::from(unit.encoding().address_size);
            // Reserved first: a pointer chain back to itself ends here.
            let id = r.types.push(Type::Pointer { to: None });
            r.types.by_offset.insert(key, Some(id));
            let to = match referenced(r)? {
                Some(target) => resolve(r, target)?,
                None => None,
            };
            r.types.table[id.0 as usize] = Type::Pointer { to };
            Some(id)
        }
        gimli::DW_TAG_structure_type | gimli::DW_TAG_class_type | gimli::DW_TAG_union_type => {
            let is_union = entry.tag() == gimli::DW_TAG_union_type;
            let placeholder = if is_union {
                Type::Union { name: name.clone(), size, members: Vec::new() }
            } else {
                Type::Struct { name: name.clone(), size, members: Vec::new() }
            };
            let id = r.types.push(placeholder);
            r.types.by_offset.insert(key, Some(id));
            let members = members(r, die)?;
            r.types.table[id.0 as usize] =
                if is_union { Type::Union { name, size, members } } else { Type::Struct { name, size, members } };
            Some(id)
        }
        gimli::DW_TAG_enumeration_type => Some(r.types.push(Type::Enum { name, size })),
        gimli::DW_TAG_array_type => {
            let counts = subranges(r, die)?;
            let mut element = match referenced(r)? {
                Some(target) => resolve(r, target)?.unwrap_or(UNKNOWN),
                None => UNKNOWN,
            };
            for count in counts.iter().rev() {
                element = r.types.push(Type::Array { element, count: *count });
            }
            Some(element)
        }
        gimli::DW_TAG_subroutine_type => Some(FUNCTION),
        _ => Some(UNKNOWN),
    };
    r.types.by_offset.insert(key, id);
    Ok(id)
}

/// The members of a struct or union DIE.
fn members(r: &mut Reader<'_, '_>, die: DieRef) -> Result<Vec<Member>, Error> {
    let mut raw = Vec::new();
    {
        let unit = r.unit(die.unit);
        let mut tree = unit.entries_tree(Some(die.offset)).map_err(|e| super::dwarf_err("reading a struct", e))?;
        let root = tree.root().map_err(|e| super::dwarf_err("reading a struct", e))?;
        let mut children = root.children();
        while let Some(child) = children.next().map_err(|e| super::dwarf_err("reading struct members", e))? {
            let e = child.entry();
            if e.tag() != gimli::DW_TAG_member {
                continue;
            }
            let offset = match e.attr_value(gimli::DW_AT_data_member_location) {
                Some(AttributeValue::Exprloc(expr)) => {
                    // DWARF 2 style: DW_OP_plus_uconst n.
                    match expr.operations(unit.encoding()).next() {
                        Ok(Some(gimli::Operation::PlusConstant { value })) => value,
                        _ => 0,
                    }
                }
                Some(v) => v.udata_value().unwrap_or(0),
                None => 0,
            };
            let udata = |at| e.attr_value(at).and_then(|v: AttributeValue<_>| v.udata_value());
            let bit_field = match udata(gimli::DW_AT_bit_size) {
                Some(bits) => match (udata(gimli::DW_AT_data_bit_offset), udata(gimli::DW_AT_bit_offset)) {
                    (Some(first), _) => Some((first, bits)),
                    (None, Some(from_msb)) => {
                        // DWARF 2/3 counts from the most significant bit of a
                        // storage unit of DW_AT_byte_size bytes.
                        let storage = udata(gimli::DW_AT_byte_size).unwrap_or(4) * 8;
                        Some((offset * 8 + storage.saturating_sub(from_msb + bits), bits))
                    }
                    (None, None) => Some((offset * 8, bits)),
                },
                None => None,
            };
            let offset = bit_field.map(|(first, _)| first / 8).unwrap_or(offset);
            raw.push((e.offset(), offset, bit_field));
        }
    }
    let mut out = Vec::with_capacity(raw.len());
    for (offset, byte, bit_field) in raw {
        let member = DieRef { unit: die.unit, offset };
        let name = r.name(member)?;
        let ty = r.type_of(member)?;
        out.push(Member { name, offset: byte, ty, bit_field });
    }
    Ok(out)
}

/// Element counts of an array DIE's dimensions, outermost first.
fn subranges(r: &Reader<'_, '_>, die: DieRef) -> Result<Vec<Option<u64>>, Error> {
    let unit = r.unit(die.unit);
    let mut tree = unit.entries_tree(Some(die.offset)).map_err(|e| super::dwarf_err("reading an array", e))?;
    let root = tree.root().map_err(|e| super::dwarf_err("reading an array", e))?;
    let mut children = root.children();
    let mut counts = Vec::new();
    while let Some(child) = children.next().map_err(|e| super::dwarf_err("reading array bounds", e))? {
        let e = child.entry();
        if e.tag() != gimli::DW_TAG_subrange_type {
            continue;
        }
        let udata = |at| e.attr_value(at).and_then(|v: AttributeValue<_>| v.udata_value());
        let lower = udata(gimli::DW_AT_lower_bound).unwrap_or(0);
        let count = udata(gimli::DW_AT_count)
            .or_else(|| udata(gimli::DW_AT_upper_bound)?.checked_add(1)?.checked_sub(lower));
        counts.push(count);
    }
    if counts.is_empty() {
        counts.push(None);
    }
    Ok(counts)
}

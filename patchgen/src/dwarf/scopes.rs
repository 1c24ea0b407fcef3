//! Functions and their scope trees: which variables exist at a code offset,
//! where each one lives there, and a key naming it across versions.
//!
//! A variable's key is the path of scopes from its out-of-line function
//! down through inlined callees and lexical blocks, then its name. Inlined
//! callees are told apart by their name and their rank among same-named
//! siblings, lexical blocks by their rank among sibling blocks: the same
//! source compiled again gives the same path.

use gimli::AttributeValue;

use super::{DieRef, Error, R, Reader, TypeId, dwarf_err};

/// Where a variable's value is at some code offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Location {
    /// In this wasm local of the function.
    Local(u32),
    /// In this wasm global.
    Global(u32),
    /// On the wasm operand stack, this deep.
    Stack(u32),
    /// In memory at this offset from the function's frame base.
    FrameOffset(i64),
    /// In memory at this fixed address.
    Address(u32),
    /// Known to DWARF but not as one of the above (a constant, a
    /// computation, pieces).
    Other,
}

/// A concrete, out-of-line function.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subprogram {
    /// Its name in the source.
    pub name: String,
    /// `DW_AT_name` of its compile unit.
    pub cu: String,
    /// First code offset of the function.
    pub low_pc: u32,
    /// First code offset past it.
    pub high_pc: u32,
    /// Its `DW_AT_frame_base` (usually the local holding the shadow-stack
    /// frame pointer); `None` when DWARF gives none.
    pub frame_base: Option<Location>,
}

/// One step of a variable's scope path.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ScopeKey {
    /// The out-of-line function (always the first step).
    Function(String),
    /// An inlined call of `name`, the `ordinal`-th such call in its parent
    /// scope.
    Inlined {
        /// The callee.
        name: String,
        /// Rank among the parent's inlined calls of the same callee.
        ordinal: u32,
    },
    /// The `n`-th lexical block of its parent scope.
    Block(u32),
}

/// What identifies "the same variable" in two versions of a program.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VarKey {
    /// Enclosing scopes, outermost first.
    pub scopes: Vec<ScopeKey>,
    /// The variable's name.
    pub name: String,
}

impl std::fmt::Display for VarKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for s in &self.scopes {
            match s {
                ScopeKey::Function(n) => write!(f, "{n}/")?,
                ScopeKey::Inlined { name, ordinal } => write!(f, "{name}#{ordinal}/")?,
                ScopeKey::Block(n) => write!(f, "{{{n}}}/")?,
            }
        }
        f.write_str(&self.name)
    }
}

/// A variable in scope at a code offset, and where it is there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VarAt {
    /// Its identity across versions.
    pub key: VarKey,
    /// Where its value is at that offset.
    pub location: Location,
    /// Its type.
    pub ty: TypeId,
    /// Whether it is a formal parameter.
    pub parameter: bool,
}

/// A function, inlined call or lexical block with its variables.
#[derive(Debug, Clone, Default)]
pub(super) struct Scope {
    key: Option<ScopeKey>,
    ranges: Vec<(u32, u32)>,
    vars: Vec<Var>,
    children: Vec<Scope>,
}

#[derive(Debug, Clone)]
struct Var {
    name: String,
    ty: TypeId,
    parameter: bool,
    /// `None`: one location through the whole scope.
    ranges: Option<Vec<(u32, u32)>>,
    locations: Vec<Location>,
}

impl Var {
    fn at(&self, offset: u32) -> Option<Location> {
        match &self.ranges {
            None => self.locations.first().copied(),
            Some(ranges) => ranges.iter().position(|&(b, e)| b <= offset && offset < e).map(|i| self.locations[i]),
        }
    }
}

impl Scope {
    fn contains(&self, offset: u32) -> bool {
        self.ranges.iter().any(|&(b, e)| b <= offset && offset < e)
    }
}

/// Decodes a location expression of the shapes clang emits for wasm.
fn decode(expr: gimli::Expression<R<'_>>, encoding: gimli::Encoding) -> Location {
    use gimli::Operation as Op;
    let mut ops = expr.operations(encoding);
    let (Ok(Some(first)), second, third) = (ops.next(), ops.next(), ops.next()) else { return Location::Other };
    let plain = match (second, third) {
        (Ok(None), _) => true,
        // The value is the content of the place itself.
        (Ok(Some(Op::StackValue)), Ok(None)) => true,
        _ => false,
    };
    if !plain {
        return Location::Other;
    }
    match first {
        Op::WasmLocal { index } => Location::Local(index),
        Op::WasmGlobal { index } => Location::Global(index),
        Op::WasmStack { index } => Location::Stack(index),
        Op::FrameOffset { offset } => Location::FrameOffset(offset),
        Op::Address { address } => u32::try_from(address).map(Location::Address).unwrap_or(Location::Other),
        _ => Location::Other,
    }
}

/// Keeps a code range if it lies inside the code section.
fn code_range(r: &Reader<'_, '_>, begin: u64, end: u64) -> Option<(u32, u32)> {
    // 0 and all ones are wasm-ld's tombstones for discarded code.
    (begin > 0 && begin < end && end <= r.code_len).then_some((begin as u32, end as u32))
}

fn die_ranges<'a>(r: &Reader<'a, '_>, u: usize, e: &gimli::DebuggingInformationEntry<R<'a>>) -> Result<Vec<(u32, u32)>, Error> {
    let mut out = Vec::new();
    let mut it = r.dwarf.die_ranges(r.unit(u), e).map_err(|err| dwarf_err("reading code ranges", err))?;
    while let Some(range) = it.next().map_err(|err| dwarf_err("reading code ranges", err))? {
        out.extend(code_range(r, range.begin, range.end));
    }
    Ok(out)
}

/// Every out-of-line function of unit `u` with code, and its scope tree.
pub(super) fn collect_functions(
    r: &mut Reader<'_, '_>,
    u: usize,
    cu: &str,
    functions: &mut Vec<Subprogram>,
    trees: &mut Vec<Scope>,
) -> Result<(), Error> {
    let units = r.units;
    let unit = &units[u];
    let mut tree = unit.entries_tree(None).map_err(|e| dwarf_err(&format!("walking the unit {cu}"), e))?;
    let root = tree.root().map_err(|e| dwarf_err(&format!("walking the unit {cu}"), e))?;
    let mut children = root.children();
    // C has no nested functions: subprograms are children of the unit, or
    // of a namespace-like wrapper we do not expect; only the first level is read.
    while let Some(child) = children.next().map_err(|e| dwarf_err(&format!("walking the unit {cu}"), e))? {
        let e = child.entry();
        if e.tag() != gimli::DW_TAG_subprogram {
            continue;
        }
        let ranges = die_ranges(r, u, e)?;
        let (Some(low), Some(high)) = (ranges.iter().map(|r| r.0).min(), ranges.iter().map(|r| r.1).max()) else {
            continue;
        };
        let die = DieRef { unit: u, offset: e.offset() };
        let frame_base = match e.attr_value(gimli::DW_AT_frame_base) {
            Some(AttributeValue::Exprloc(expr)) => Some(decode(expr, unit.encoding())),
            _ => None,
        };
        let name = r.name(die)?.unwrap_or_default();
        functions.push(Subprogram { name: name.clone(), cu: cu.to_string(), low_pc: low, high_pc: high, frame_base });
        let mut scope = Scope { key: Some(ScopeKey::Function(name)), ranges, ..Scope::default() };
        fill(r, u, child, &mut scope)?;
        trees.push(scope);
    }
    Ok(())
}

/// Reads the variables and nested scopes under `node` into `scope`.
fn fill<'a>(
    r: &mut Reader<'a, '_>,
    u: usize,
    node: gimli::EntriesTreeNode<'_, '_, R<'a>>,
    scope: &mut Scope,
) -> Result<(), Error> {
    let encoding = r.unit(u).encoding();
    let mut blocks = 0u32;
    let mut inlined: Vec<String> = Vec::new();
    let mut children = node.children();
    while let Some(child) = children.next().map_err(|e| dwarf_err("walking a function", e))? {
        let e = child.entry();
        let die = DieRef { unit: u, offset: e.offset() };
        match e.tag() {
            gimli::DW_TAG_variable | gimli::DW_TAG_formal_parameter => {
                let Some(value) = e.attr_value(gimli::DW_AT_location) else { continue };
                let parameter = e.tag() == gimli::DW_TAG_formal_parameter;
                let (ranges, locations) = match value {
                    AttributeValue::Exprloc(expr) => (None, vec![decode(expr, encoding)]),
                    other => {
                        let mut list = r
                            .dwarf
                            .attr_locations(r.unit(u), other)
                            .map_err(|err| dwarf_err("reading a location list", err))?;
                        let (mut ranges, mut locations) = (Vec::new(), Vec::new());
                        while let Some(entry) = match list.as_mut() {
                            Some(l) => l.next().map_err(|err| dwarf_err("reading a location list", err))?,
                            None => None,
                        } {
                            if let Some(range) = code_range(r, entry.range.begin, entry.range.end) {
                                ranges.push(range);
                                locations.push(decode(entry.data, encoding));
                            }
                        }
                        (Some(ranges), locations)
                    }
                };
                let Some(name) = r.name(die)? else { continue };
                let ty = r.type_of(die)?;
                scope.vars.push(Var { name, ty, parameter, ranges, locations });
            }
            gimli::DW_TAG_lexical_block => {
                let ranges = die_ranges(r, u, e)?;
                let mut inner = Scope { key: Some(ScopeKey::Block(blocks)), ranges, ..Scope::default() };
                blocks += 1;
                fill(r, u, child, &mut inner)?;
                scope.children.push(inner);
            }
            gimli::DW_TAG_inlined_subroutine => {
                let ranges = die_ranges(r, u, e)?;
                let name = r.name(die)?.unwrap_or_default();
                let ordinal = inlined.iter().filter(|n| **n == name).count() as u32;
                inlined.push(name.clone());
                let mut inner = Scope { key: Some(ScopeKey::Inlined { name, ordinal }), ranges, ..Scope::default() };
                fill(r, u, child, &mut inner)?;
                scope.children.push(inner);
            }
            _ => {}
        }
    }
    Ok(())
}

/// Every variable of `tree` placed in the frame's memory somewhere in it,
/// in scope or not, as (offset from the frame base, type).
pub(super) fn frame_variables(tree: &Scope, out: &mut Vec<(i64, TypeId)>) {
    for v in &tree.vars {
        for l in &v.locations {
            if let Location::FrameOffset(offset) = l {
                out.push((*offset, v.ty));
            }
        }
    }
    for child in &tree.children {
        frame_variables(child, out);
    }
}

/// The variables of `tree` live at `offset`, outermost scope first.
pub(super) fn variables_at(tree: &Scope, offset: u32) -> Vec<VarAt> {
    let mut out = Vec::new();
    let mut path = Vec::new();
    walk(tree, offset, &mut path, &mut out);
    out
}

fn walk(scope: &Scope, offset: u32, path: &mut Vec<ScopeKey>, out: &mut Vec<VarAt>) {
    path.extend(scope.key.clone());
    for v in &scope.vars {
        if let Some(location) = v.at(offset) {
            let key = VarKey { scopes: path.clone(), name: v.name.clone() };
            out.push(VarAt { key, location, ty: v.ty, parameter: v.parameter });
        }
    }
    for child in scope.children.iter().filter(|c| c.contains(offset)) {
        walk(child, offset, path, out);
    }
    if scope.key.is_some() {
        path.pop();
    }
}

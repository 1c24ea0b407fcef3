//! The DWARF of a wasm module, read once with gimli into plain tables: the
//! global and static variables with their addresses, the C types they have,
//! and for every out-of-line function its scope tree (inlined callees,
//! lexical blocks, variables with their locations). The update planner asks
//! it which variables are live at a code offset and how a value of an old
//! type becomes a value of the new one ([`same_type`], [`value_map`]).
//!
//! Addresses follow wasm DWARF: code addresses (`DW_AT_low_pc`, location
//! list ranges) are offsets from the start of the code section's payload;
//! data addresses are linear-memory addresses. Everything is decoded when
//! the module is parsed, so a malformed DWARF tree is an error of
//! [`DebugInfo::parse`] and queries never fail. Location expressions are the
//! exception: one that gimli cannot decode reads as [`Location::Other`],
//! because it only makes that variable unusable, not the module.
//!
//! wasm-ld marks debug entries of code and data it discarded with a
//! tombstone address (0 or all ones); those are skipped.

mod compare;
mod scopes;
mod types;

use std::collections::HashMap;

use gimli::{AttributeValue, DebugInfoOffset, UnitOffset};

pub use compare::{
    ByteCopy, MapError, MapReason, PointerField, ValueMap, first_difference, same_type, value_map, value_map_named,
    value_map_through_pointers,
};
pub use scopes::{Location, ScopeKey, Subprogram, VarAt, VarKey};
pub use types::{Member, Type, TypeId};

type R<'a> = gimli::EndianSlice<'a, gimli::LittleEndian>;

/// A DWARF error, with where it happened.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The wasm module itself could not be read.
    #[error("cannot read the wasm module: {0} (is it a valid wasm file?)")]
    Wasm(#[from] wasmparser::BinaryReaderError),
    /// gimli rejected part of the DWARF.
    #[error("malformed DWARF {context}: {source} (rebuild the module with -g, or strip its .debug_* sections)")]
    Dwarf {
        /// What was being read.
        context: String,
        /// gimli's reason.
        source: gimli::Error,
    },
    /// The DWARF decodes but makes no sense (a reference out of range, a
    /// cycle of typedefs).
    #[error("malformed DWARF: {0} (rebuild the module with -g, or strip its .debug_* sections)")]
    Malformed(String),
}

/// A global or static variable with a fixed address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GlobalVar {
    /// Its name in the source.
    pub name: String,
    /// `DW_AT_name` of its compile unit (the source file as given to clang).
    pub cu: String,
    /// Linear-memory address.
    pub address: u32,
    /// Its type.
    pub ty: TypeId,
    /// For a static declared inside a function: that function's name. Two
    /// functions of one file may each have a `static int n`.
    pub function: Option<String>,
    /// Whether the symbol is visible to other compile units (`DW_AT_external`).
    pub external: bool,
}

/// The DWARF of one module, decoded.
#[derive(Debug, Clone, Default)]
pub struct DebugInfo {
    globals: Vec<GlobalVar>,
    types: types::Types,
    functions: Vec<Subprogram>,
    trees: Vec<scopes::Scope>,
}

impl DebugInfo {
    /// Reads the DWARF sections of a wasm module; a module without DWARF
    /// gives an empty DebugInfo (not an error); malformed DWARF is an error.
    pub fn parse(wasm: &[u8]) -> Result<DebugInfo, Error> {
        let mut sections: HashMap<&str, &[u8]> = HashMap::new();
        let mut code_len = None;
        for payload in wasmparser::Parser::new(0).parse_all(wasm) {
            match payload? {
                wasmparser::Payload::CustomSection(c) if c.name().starts_with(".debug_") => {
                    sections.insert(c.name(), c.data());
                }
                wasmparser::Payload::CodeSectionStart { range, .. } => code_len = Some(range.len() as u64),
                _ => {}
            }
        }
        let mut info = DebugInfo { types: types::Types::new(), ..DebugInfo::default() };
        if !sections.contains_key(".debug_info") {
            return Ok(info);
        }
        let load = |id: gimli::SectionId| -> Result<R<'_>, Error> {
            let data = sections.get(id.name()).copied().unwrap_or(&[]);
            Ok(gimli::EndianSlice::new(data, gimli::LittleEndian))
        };
        let dwarf = gimli::Dwarf::load(load)?;
        let mut units = Vec::new();
        let mut headers = dwarf.units();
        while let Some(header) = headers.next().map_err(|e| dwarf_err("listing compile units", e))? {
            let at = header.debug_info_offset().map(|o| o.0).unwrap_or(0);
            let unit = dwarf.unit(header).map_err(|e| dwarf_err(&format!("in the unit at {at:#x}"), e))?;
            units.push(unit);
        }
        let mut reader = Reader { dwarf: &dwarf, units: &units, code_len: code_len.unwrap_or(0), types: &mut info.types };
        for u in 0..units.len() {
            let cu = reader.cu_name(u)?;
            reader.collect_globals(u, &cu, &mut info.globals)?;
            scopes::collect_functions(&mut reader, u, &cu, &mut info.functions, &mut info.trees)?;
        }
        info.types.link_declarations();
        info.globals.sort_by_key(|g| g.address);
        let mut order: Vec<usize> = (0..info.functions.len()).collect();
        order.sort_by_key(|&i| info.functions[i].low_pc);
        let mut functions = Vec::with_capacity(order.len());
        let mut trees = Vec::with_capacity(order.len());
        let mut old_trees: Vec<Option<scopes::Scope>> = info.trees.into_iter().map(Some).collect();
        for i in order {
            functions.push(info.functions[i].clone());
            trees.push(old_trees[i].take().unwrap_or_default());
        }
        info.functions = functions;
        info.trees = trees;
        Ok(info)
    }

    /// Whether the module carried any DWARF.
    pub fn is_empty(&self) -> bool {
        self.globals.is_empty() && self.functions.is_empty()
    }

    /// Global and static variables with a fixed address (`DW_OP_addr`),
    /// including function-level statics, sorted by address.
    pub fn globals(&self) -> &[GlobalVar] {
        &self.globals
    }

    /// The global whose bytes contain `addr` (its start, or inside it when
    /// its size is known).
    pub fn global_at(&self, addr: u32) -> Option<&GlobalVar> {
        let after = self.globals.partition_point(|g| g.address <= addr);
        self.globals[..after].iter().rev().find(|g| {
            let size = self.size_of(g.ty).unwrap_or(0).max(1);
            u64::from(addr) < u64::from(g.address) + size
        })
    }

    /// The concrete, out-of-line function whose code contains `code_offset`.
    pub fn function_at(&self, code_offset: u32) -> Option<&Subprogram> {
        self.function_index(code_offset).map(|i| &self.functions[i])
    }

    /// Every concrete function with code, sorted by `low_pc`.
    pub fn functions(&self) -> &[Subprogram] {
        &self.functions
    }

    fn function_index(&self, code_offset: u32) -> Option<usize> {
        let after = self.functions.partition_point(|f| f.low_pc <= code_offset);
        let i = after.checked_sub(1)?;
        (code_offset < self.functions[i].high_pc).then_some(i)
    }

    /// Every variable and parameter in scope at `code_offset` (including
    /// those of inlined subroutines and lexical blocks containing it) whose
    /// location at that offset is known, outermost scope first.
    pub fn variables_at(&self, code_offset: u32) -> Vec<VarAt> {
        match self.function_index(code_offset) {
            Some(i) => scopes::variables_at(&self.trees[i], code_offset),
            None => Vec::new(),
        }
    }

    /// Every struct the module defines with a tag, as (type, tag): those
    /// the types of its variables reach.
    pub fn defined_structs(&self) -> impl Iterator<Item = (TypeId, &str)> {
        self.types.defined_structs()
    }

    /// Every variable of the function containing `code_offset` that lives
    /// in its frame's memory at some point, in scope there or not, as
    /// (offset from the frame base, type).
    pub fn frame_variables(&self, code_offset: u32) -> Vec<(i64, TypeId)> {
        let mut out = Vec::new();
        if let Some(i) = self.function_index(code_offset) {
            scopes::frame_variables(&self.trees[i], &mut out);
        }
        out
    }

    /// The type behind an id handed out by this DebugInfo.
    pub fn ty(&self, id: TypeId) -> &Type {
        self.types.get(id)
    }

    /// The size in bytes of a value of this type; `None` for functions,
    /// unknown types and arrays of unknown length.
    pub fn size_of(&self, id: TypeId) -> Option<u64> {
        self.types.size_of(id)
    }

    /// A C-like spelling of the type for messages: `int`, `struct node*`,
    /// `char[16]`.
    pub fn type_name(&self, id: TypeId) -> String {
        self.types.name(id)
    }
}

fn dwarf_err(context: &str, source: gimli::Error) -> Error {
    Error::Dwarf { context: context.to_string(), source }
}

impl From<gimli::Error> for Error {
    fn from(source: gimli::Error) -> Error {
        Error::Dwarf { context: "while loading sections".to_string(), source }
    }
}

/// Where a DIE is: its unit's index and its offset in that unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DieRef {
    unit: usize,
    offset: UnitOffset,
}

/// The state of one parse: the gimli view and the type table being filled.
struct Reader<'a, 'd> {
    dwarf: &'d gimli::Dwarf<R<'a>>,
    units: &'d [gimli::Unit<R<'a>>],
    /// Length of the code section's payload; code addresses past it are
    /// tombstones of discarded functions.
    code_len: u64,
    types: &'d mut types::Types,
}

/// How many abstract-origin or specification links a name lookup follows.
const MAX_LINKS: usize = 8;

impl<'a> Reader<'a, '_> {
    fn unit(&self, u: usize) -> &gimli::Unit<R<'a>> {
        &self.units[u]
    }

    fn entry(&self, die: DieRef) -> Result<gimli::DebuggingInformationEntry<R<'a>>, Error> {
        self.unit(die.unit)
            .entry(die.offset)
            .map_err(|e| dwarf_err(&format!("at DIE {:#x}", self.global_offset(die)), e))
    }

    fn global_offset(&self, die: DieRef) -> usize {
        die.offset.to_debug_info_offset(&self.unit(die.unit).header).map(|o| o.0).unwrap_or(die.offset.0)
    }

    /// Resolves a reference attribute to the DIE it names.
    fn reference(&self, from: usize, value: AttributeValue<R<'a>>) -> Result<Option<DieRef>, Error> {
        match value {
            AttributeValue::UnitRef(offset) => Ok(Some(DieRef { unit: from, offset })),
            AttributeValue::DebugInfoRef(DebugInfoOffset(off)) => {
                let unit = self.units.partition_point(|u| {
                    u.header.debug_info_offset().is_some_and(|o| o.0 <= off)
                });
                let found = unit.checked_sub(1).and_then(|u| {
                    let offset = DebugInfoOffset(off).to_unit_offset(&self.units[u].header)?;
                    Some(DieRef { unit: u, offset })
                });
                found
                    .map(Some)
                    .ok_or_else(|| Error::Malformed(format!("reference to {off:#x} lies in no compile unit")))
            }
            _ => Ok(None),
        }
    }

    fn string(&self, u: usize, value: AttributeValue<R<'a>>) -> Result<String, Error> {
        let s = self.dwarf.attr_string(self.unit(u), value).map_err(|e| dwarf_err("reading a name", e))?;
        Ok(s.to_string_lossy().into_owned())
    }

    /// An attribute of the DIE, or of the DIE its `DW_AT_abstract_origin` or
    /// `DW_AT_specification` names (inlined and out-of-line instances carry
    /// their name and type only there).
    fn inherited(&self, die: DieRef, name: gimli::DwAt) -> Result<Option<(usize, AttributeValue<R<'a>>)>, Error> {
        let mut at = die;
        for _ in 0..MAX_LINKS {
            let entry = self.entry(at)?;
            if let Some(v) = entry.attr_value(name) {
                return Ok(Some((at.unit, v)));
            }
            let link = entry
                .attr_value(gimli::DW_AT_abstract_origin)
                .or_else(|| entry.attr_value(gimli::DW_AT_specification));
            match link {
                Some(v) => match self.reference(at.unit, v)? {
                    Some(next) => at = next,
                    None => return Ok(None),
                },
                None => return Ok(None),
            }
        }
        Err(Error::Malformed(format!("DIE {:#x}: chain of abstract origins too long", self.global_offset(die))))
    }

    fn name(&self, die: DieRef) -> Result<Option<String>, Error> {
        match self.inherited(die, gimli::DW_AT_name)? {
            Some((u, v)) => self.string(u, v).map(Some),
            None => Ok(None),
        }
    }

    /// The DIE's type (through its abstract origin); `Unknown` if it has none.
    fn type_of(&mut self, die: DieRef) -> Result<TypeId, Error> {
        match self.inherited(die, gimli::DW_AT_type)? {
            Some((u, v)) => match self.reference(u, v)? {
                Some(t) => Ok(types::resolve(self, t)?.unwrap_or(types::UNKNOWN)),
                None => Ok(types::UNKNOWN),
            },
            None => Ok(types::UNKNOWN),
        }
    }

    fn cu_name(&self, u: usize) -> Result<String, Error> {
        let mut cursor = self.unit(u).entries();
        let root = cursor.next_dfs().map_err(|e| dwarf_err("reading a compile unit", e))?;
        match root.and_then(|r| r.attr_value(gimli::DW_AT_name)) {
            Some(v) => self.string(u, v),
            None => Ok(String::new()),
        }
    }

    /// Every variable of unit `u` whose location is a fixed address.
    fn collect_globals(&mut self, u: usize, cu: &str, out: &mut Vec<GlobalVar>) -> Result<(), Error> {
        let mut found = Vec::new();
        {
            let unit = self.unit(u);
            let mut cursor = unit.entries();
            // Names of the enclosing subprograms, by depth.
            let mut enclosing: Vec<(isize, Option<UnitOffset>)> = Vec::new();
            while let Some(entry) = cursor.next_dfs().map_err(|e| dwarf_err(&format!("walking the unit {cu}"), e))? {
                let depth = entry.depth();
                while enclosing.last().is_some_and(|(d, _)| *d >= depth) {
                    enclosing.pop();
                }
                if entry.tag() == gimli::DW_TAG_subprogram {
                    enclosing.push((depth, Some(entry.offset())));
                }
                if entry.tag() != gimli::DW_TAG_variable {
                    continue;
                }
                let Some(AttributeValue::Exprloc(expr)) = entry.attr_value(gimli::DW_AT_location) else { continue };
                let mut ops = expr.operations(unit.encoding());
                let (Ok(Some(gimli::Operation::Address { address })), Ok(None)) = (ops.next(), ops.next()) else {
                    continue;
                };
                if address == 0 || address >= u64::from(u32::MAX - 1) {
                    continue;
                }
                let external = matches!(entry.attr_value(gimli::DW_AT_external), Some(AttributeValue::Flag(true)));
                let function = enclosing.iter().rev().find_map(|(_, o)| *o);
                found.push((entry.offset(), address as u32, external, function));
            }
        }
        for (offset, address, external, function) in found {
            let die = DieRef { unit: u, offset };
            // String literals have an address but no name: nothing to match.
            let Some(name) = self.name(die)? else { continue };
            let ty = self.type_of(die)?;
            let function = match function {
                Some(offset) => self.name(DieRef { unit: u, offset })?,
                None => None,
            };
            out.push(GlobalVar { name, cu: cu.to_string(), address, ty, function, external });
        }
        Ok(())
    }
}

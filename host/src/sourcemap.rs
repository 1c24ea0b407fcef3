//! Source locations for instructions of an instrumented module.
//!
//! The instrumented module carries no DWARF: its code moved, so the original
//! DWARF would point at the wrong lines. Instead the host keeps the
//! original module and maps an output offset back to it through the
//! instrumenter's offset map, which lists every function of the original.
//! The original DWARF then gives the file and line. Used for trap
//! backtraces.

use std::collections::HashMap;
use std::sync::Arc;

use upstare_instrument::abi::offsets::OffsetMap;

type Reader = gimli::EndianArcSlice<gimli::LittleEndian>;

/// Maps offsets of an instrumented module to the original's source lines.
pub struct SourceMap {
    /// Start of each defined function's body, output module.
    out_bodies: Vec<usize>,
    /// Function imports of the output module.
    num_imported: u32,
    /// Payload start of the original code section, DWARF's address zero.
    code_section: usize,
    offsets: OffsetMap,
    /// The original's DWARF sections by name; parsed only when a location
    /// is asked for (a parsed context cannot be shared between threads).
    dwarf: HashMap<String, Arc<[u8]>>,
}

/// A parsed view of the DWARF, for a batch of lookups.
pub struct Locator<'a> {
    map: &'a SourceMap,
    context: addr2line::Context<Reader>,
}

impl std::fmt::Debug for SourceMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceMap").field("has_dwarf", &!self.dwarf.is_empty()).finish_non_exhaustive()
    }
}

/// What a module offers for the mapping.
struct Layout {
    bodies: Vec<usize>,
    num_imported: u32,
    code_section: usize,
    customs: HashMap<String, Arc<[u8]>>,
}

fn layout(wasm: &[u8]) -> Option<Layout> {
    let mut l = Layout { bodies: Vec::new(), num_imported: 0, code_section: 0, customs: HashMap::new() };
    for payload in wasmparser::Parser::new(0).parse_all(wasm) {
        match payload.ok()? {
            wasmparser::Payload::ImportSection(r) => {
                for group in r {
                    let count = match group.ok()? {
                        wasmparser::Imports::Single(_, i) => matches!(i.ty, wasmparser::TypeRef::Func(_)) as u32,
                        wasmparser::Imports::Compact1 { items, .. } => items
                            .into_iter()
                            .filter(|i| i.as_ref().is_ok_and(|i| matches!(i.ty, wasmparser::TypeRef::Func(_))))
                            .count() as u32,
                        wasmparser::Imports::Compact2 { ty, names, .. } => {
                            if matches!(ty, wasmparser::TypeRef::Func(_)) {
                                names.count()
                            } else {
                                0
                            }
                        }
                    };
                    l.num_imported += count;
                }
            }
            wasmparser::Payload::CodeSectionStart { range, .. } => l.code_section = range.start,
            wasmparser::Payload::CodeSectionEntry(body) => l.bodies.push(body.range().start),
            wasmparser::Payload::CustomSection(c) if c.name().starts_with(".debug_") => {
                l.customs.insert(c.name().to_string(), Arc::from(c.data()));
            }
            _ => {}
        }
    }
    Some(l)
}

impl SourceMap {
    /// Builds the map from the original module and its instrumented form;
    /// `None` if either cannot be read (then backtraces have no lines).
    pub fn new(original: &[u8], instrumented: &[u8]) -> Option<SourceMap> {
        let orig = layout(original)?;
        let out = layout(instrumented)?;
        let offsets = OffsetMap::from_module(instrumented).ok()?;
        let dwarf = orig.customs;
        Some(SourceMap {
            out_bodies: out.bodies,
            num_imported: out.num_imported,
            code_section: orig.code_section,
            offsets,
            dwarf,
        })
    }

    /// The original module offset of the instruction at `offset` of function
    /// `func` in the instrumented module.
    pub fn original_offset(&self, func: u32, offset: usize) -> Option<usize> {
        let defined = func.checked_sub(self.num_imported)? as usize;
        let rel = offset.checked_sub(*self.out_bodies.get(defined)?)?;
        self.offsets.original(func, rel as u32).map(|orig| orig as usize)
    }

    /// Parses the original's DWARF for lookups; `None` without DWARF.
    pub fn locator(&self) -> Option<Locator<'_>> {
        if !self.dwarf.contains_key(".debug_info") {
            return None;
        }
        let dwarf = gimli::Dwarf::load(|id| -> Result<Reader, gimli::Error> {
            let data = self.dwarf.get(id.name()).cloned().unwrap_or_else(|| Arc::from(&[][..]));
            Ok(gimli::EndianArcSlice::new(data, gimli::LittleEndian))
        })
        .ok()?;
        let context = addr2line::Context::from_dwarf(dwarf).ok()?;
        Some(Locator { map: self, context })
    }
}

impl Locator<'_> {
    /// `file:line` of the instruction at `offset` of function `func` in the
    /// instrumented module.
    pub fn location(&self, func: u32, offset: usize) -> Option<String> {
        let orig = self.map.original_offset(func, offset)?;
        let addr = orig.checked_sub(self.map.code_section)? as u64;
        let loc = self.context.find_location(addr).ok()??;
        Some(format!("{}:{}", loc.file?, loc.line?))
    }
}

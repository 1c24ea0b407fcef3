//! Reads a final wasm32 module linked with `--emit-relocs` into a
//! [`ModuleInfo`]: functions and their bodies' code offsets, types, globals,
//! the function table, data segments with their addresses, and the `linking`
//! symbol table with every code and data relocation. Everything else in
//! patchgen (relinking, body comparison, the planner) reads modules through
//! this description, never through raw indices alone.
//!
//! Positions in code are "code offsets": relative to the first byte of the
//! code section's payload (where the function count starts), the convention
//! of DWARF, `reloc.CODE` and the instrumenter's metadata.

mod error;
mod linking;
mod passive;

use std::ops::Range;

use wasmparser::{
    ConstExpr, DataKind, ElementItems, ElementKind, KnownCustom, Name, Operator, Parser, Payload,
    TypeRef, ValType,
};

pub use error::Error;
pub use linking::{DataDef, Reloc, RelocType, Symbol, SymbolKind, SymbolTarget};

/// Symbol flag: the symbol is local to its compile unit (`static`, `.L.str`).
pub const FLAG_LOCAL: u32 = 0x2;
/// Symbol flag: the symbol is hidden.
pub const FLAG_HIDDEN: u32 = 0x4;
/// Symbol flag: the symbol is undefined (an import).
pub const FLAG_UNDEFINED: u32 = 0x10;
/// Symbol flag: the symbol carries its own name even when undefined.
pub const FLAG_EXPLICIT_NAME: u32 = 0x40;
/// Symbol flag: a data symbol with an absolute address (`__heap_base`).
pub const FLAG_ABSOLUTE: u32 = 0x200;
/// `WASM_SYM_TLS`: a thread-local variable; its address is an offset in
/// each thread's block.
pub const FLAG_TLS: u32 = 0x400;

/// A function signature.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FuncType {
    /// Parameter types.
    pub params: Vec<ValType>,
    /// Result types.
    pub results: Vec<ValType>,
}

/// One function of the module's index space (imports first).
#[derive(Debug, Clone)]
pub struct Function {
    /// Index into [`ModuleInfo::types`].
    pub ty: u32,
    /// Name from the name section, else from its FUNCTION symbol, else the
    /// import's field name.
    pub name: Option<String>,
    /// For defined functions, the body from its local declarations to its
    /// end, in code offsets; `None` for imports.
    pub body: Option<Range<u32>>,
    /// Local declarations (count, type), in order; empty for imports.
    pub locals: Vec<(u32, ValType)>,
}

/// A wasm global (imports first).
#[derive(Debug, Clone)]
pub struct Global {
    /// Name from the name section, else from its GLOBAL symbol.
    pub name: Option<String>,
    /// Value type.
    pub ty: ValType,
    /// Whether it is mutable.
    pub mutable: bool,
    /// Constant initial value: integers sign-extended, floats as their bits;
    /// `None` for imports and non-constant initialisers.
    pub init: Option<i64>,
}

/// The function table (table 0) and its initial contents.
#[derive(Debug, Clone, Default)]
pub struct Table {
    /// Minimum size.
    pub min: u64,
    /// Maximum size, if any.
    pub max: Option<u64>,
    /// Slot -> function index, from active element segments.
    pub slots: std::collections::BTreeMap<u32, u32>,
}

/// One output data segment (`.rodata`, `.data`, `.bss`...), in segment-info
/// order, which is the index DATA symbols use.
#[derive(Debug, Clone)]
pub struct Segment {
    /// Name from the segment info.
    pub name: String,
    /// Start address in linear memory.
    pub address: u32,
    /// Size in bytes (for a zero-filled segment without a data segment,
    /// the extent of its symbols).
    pub size: u32,
    /// Alignment as a power of two.
    pub align: u32,
    /// Whether the program may write it (everything except `.rodata`).
    pub writable: bool,
    /// Initial bytes: empty for a zero-filled segment.
    pub init: Vec<u8>,
    /// File offsets of the initial bytes, when the data section has them.
    pub file_range: Option<Range<u32>>,
}

impl Segment {
    /// Addresses the segment covers.
    pub fn addresses(&self) -> Range<u32> {
        self.address..self.address.saturating_add(self.size)
    }
}

/// Everything patchgen needs to know about one module.
#[derive(Debug, Clone, Default)]
pub struct ModuleInfo {
    /// File offset of the code section's payload: code offsets start here.
    pub code_section: u32,
    /// Length of the code section's payload.
    pub code_len: u32,
    /// File offset of the data section's payload, if there is one; data
    /// relocation offsets are relative to it.
    pub data_section: Option<u32>,
    /// Length of the data section's payload.
    pub data_len: u32,
    /// Function types, by type index.
    pub types: Vec<FuncType>,
    /// Number of imported functions (they come first in `functions`).
    pub imported_functions: u32,
    /// Every function by function index.
    pub functions: Vec<Function>,
    /// Number of imported globals (they come first in `globals`).
    pub imported_globals: u32,
    /// Every global by global index.
    pub globals: Vec<Global>,
    /// Table 0, if the module has one.
    pub table: Option<Table>,
    /// Output data segments in segment-info order.
    pub segments: Vec<Segment>,
    /// The `linking` symbol table, in order.
    pub symbols: Vec<Symbol>,
    /// `reloc.CODE` entries sorted by offset (offsets are code offsets).
    pub code_relocs: Vec<Reloc>,
    /// `reloc.DATA` entries sorted by offset (offsets relative to the data
    /// section payload).
    pub data_relocs: Vec<Reloc>,
    /// Address of the absolute symbol `__heap_base`.
    pub heap_base: Option<u32>,
    /// Address of `__data_end`, if the module names it.
    pub data_end: Option<u32>,
}

impl ModuleInfo {
    /// Reads `wasm` in one pass. Fails on invalid bytes, on a module linked
    /// without `--emit-relocs`, and on anything the relocations cannot
    /// describe (unknown relocation types, symbols outside their segment).
    pub fn parse(wasm: &[u8]) -> Result<ModuleInfo, Error> {
        let mut info = ModuleInfo::default();
        let mut raw = linking::Raw::default();
        let mut func_names: Vec<(u32, String)> = Vec::new();
        let mut global_names: Vec<(u32, String)> = Vec::new();
        let mut data_segments: Vec<(Option<u32>, Vec<u8>, Range<u32>)> = Vec::new();
        let mut defined_types: Vec<u32> = Vec::new();
        let mut bodies = 0usize;
        let mut saw_code = false;
        let mut start: Option<u32> = None;
        let mut placements = passive::Placements::default();
        for payload in Parser::new(0).parse_all(wasm) {
            let payload = payload?;
            if let Some((_, range)) = payload.as_section() {
                raw.section_ranges
                    .push(range.start as u32..range.end as u32);
            }
            match payload {
                Payload::TypeSection(reader) => {
                    for ty in reader.into_iter_err_on_gc_types() {
                        let ty = ty?;
                        info.types.push(FuncType {
                            params: ty.params().to_vec(),
                            results: ty.results().to_vec(),
                        });
                    }
                }
                Payload::ImportSection(reader) => {
                    for import in reader.into_imports() {
                        let import = import?;
                        match import.ty {
                            TypeRef::Func(ty) => {
                                info.imported_functions += 1;
                                info.functions.push(Function {
                                    ty,
                                    name: Some(import.name.to_string()),
                                    body: None,
                                    locals: Vec::new(),
                                });
                            }
                            TypeRef::Global(g) => {
                                info.imported_globals += 1;
                                info.globals.push(Global {
                                    name: Some(import.name.to_string()),
                                    ty: g.content_type,
                                    mutable: g.mutable,
                                    init: None,
                                });
                            }
                            TypeRef::Memory(m) if m.memory64 => {
                                return Err(Error::Unsupported("a 64-bit memory"))
                            }
                            TypeRef::Table(t) if info.table.is_none() => {
                                info.table = Some(Table {
                                    min: t.initial,
                                    max: t.maximum,
                                    ..Table::default()
                                });
                            }
                            _ => {}
                        }
                    }
                }
                Payload::FunctionSection(reader) => {
                    for ty in reader {
                        defined_types.push(ty?);
                    }
                }
                Payload::TableSection(reader) => {
                    for table in reader {
                        let table = table?;
                        if info.table.is_none() {
                            info.table = Some(Table {
                                min: table.ty.initial,
                                max: table.ty.maximum,
                                ..Table::default()
                            });
                        }
                    }
                }
                Payload::MemorySection(reader) => {
                    for memory in reader {
                        if memory?.memory64 {
                            return Err(Error::Unsupported("a 64-bit memory"));
                        }
                    }
                }
                Payload::GlobalSection(reader) => {
                    for global in reader {
                        let global = global?;
                        info.globals.push(Global {
                            name: None,
                            ty: global.ty.content_type,
                            mutable: global.ty.mutable,
                            init: const_value(&global.init_expr),
                        });
                    }
                }
                Payload::StartSection { func, .. } => start = Some(func),
                Payload::ElementSection(reader) => {
                    for element in reader {
                        let element = element?;
                        read_element(&mut info, element)?;
                    }
                }
                Payload::DataSection(reader) => {
                    info.data_section = Some(reader.range().start as u32);
                    info.data_len = reader.range().len() as u32;
                    for data in reader {
                        let data = data?;
                        let address = match data.kind {
                            DataKind::Active {
                                memory_index: 0,
                                offset_expr,
                            } => const_value(&offset_expr).map(|v| v as u32),
                            _ => None,
                        };
                        let start = (data.range.end - data.data.len()) as u32;
                        let file = start..data.range.end as u32;
                        data_segments.push((address, data.data.to_vec(), file));
                    }
                }
                Payload::CodeSectionStart { range, .. } => {
                    saw_code = true;
                    info.code_section = range.start as u32;
                    info.code_len = range.len() as u32;
                    let imported = info.functions.len();
                    info.functions
                        .extend(defined_types.iter().map(|&ty| Function {
                            ty,
                            name: None,
                            body: None,
                            locals: Vec::new(),
                        }));
                    bodies = imported;
                }
                Payload::CodeSectionEntry(body) => {
                    let range = body.range();
                    let base = info.code_section as usize;
                    let mut locals = Vec::new();
                    for local in body.get_locals_reader()? {
                        locals.push(local?);
                    }
                    let Some(func) = info.functions.get_mut(bodies) else {
                        return Err(Error::Unsupported("more bodies than function declarations"));
                    };
                    func.body = Some((range.start - base) as u32..(range.end - base) as u32);
                    func.locals = locals;
                    if start == Some(bodies as u32) {
                        placements = passive::Placements::read(&body)?;
                    }
                    bodies += 1;
                }
                Payload::CustomSection(reader) => match reader.as_known() {
                    KnownCustom::Name(names) => {
                        for name in names {
                            match name? {
                                Name::Function(map) => {
                                    for n in map {
                                        let n = n?;
                                        func_names.push((n.index, n.name.to_string()));
                                    }
                                }
                                Name::Global(map) => {
                                    for n in map {
                                        let n = n?;
                                        global_names.push((n.index, n.name.to_string()));
                                    }
                                }
                                _ => {}
                            }
                        }
                    }
                    KnownCustom::Linking(_) => {
                        raw.linking = Some((reader.data().to_vec(), reader.data_offset()));
                    }
                    _ if reader.name().starts_with("reloc.") => {
                        raw.relocs.push((
                            reader.name().to_string(),
                            reader.data().to_vec(),
                            reader.data_offset(),
                        ));
                    }
                    _ => {}
                },
                _ => {}
            }
        }
        if !saw_code && !defined_types.is_empty() {
            return Err(Error::Unsupported("functions without a code section"));
        }
        raw.code_section_index = raw
            .section_ranges
            .iter()
            .position(|r| r.start == info.code_section && saw_code)
            .map(|i| i as u32);
        raw.data_section_index = info
            .data_section
            .and_then(|d| raw.section_ranges.iter().position(|r| r.start == d))
            .map(|i| i as u32);
        placements.place(&mut data_segments);
        raw.data_segments = data_segments;
        linking::read(&mut info, raw)?;
        for (index, name) in func_names {
            if let Some(f) = info.functions.get_mut(index as usize) {
                f.name = Some(name);
            }
        }
        for (index, name) in global_names {
            if let Some(g) = info.globals.get_mut(index as usize) {
                g.name = Some(name);
            }
        }
        Ok(info)
    }

    /// The defined DATA symbol whose bytes contain `addr` (the smallest one
    /// when symbols nest; a zero-sized symbol contains only its address).
    pub fn data_symbol_at(&self, addr: u32) -> Option<usize> {
        self.symbols
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.data().map(|d| (i, d)))
            .filter(|(_, d)| d.address == addr || (d.address < addr && addr - d.address < d.size))
            .min_by_key(|(_, d)| d.size)
            .map(|(i, _)| i)
    }

    /// Index of the segment (in [`ModuleInfo::segments`]) containing `addr`.
    pub fn segment_at(&self, addr: u32) -> Option<usize> {
        self.segments
            .iter()
            .position(|s| s.addresses().contains(&addr))
    }

    /// The first defined symbol named `name` (names of local symbols repeat
    /// across compile units: prefer DWARF to tell them apart).
    pub fn symbol_named(&self, name: &str) -> Option<usize> {
        self.symbols
            .iter()
            .position(|s| s.is_defined() && s.name.as_deref() == Some(name))
    }

    /// Address of a field a data relocation patches, in the module's own
    /// memory layout; `None` if it lies in no segment with initial bytes.
    pub fn data_reloc_address(&self, reloc: &Reloc) -> Option<u32> {
        let file = self.data_section? + reloc.offset;
        self.segments.iter().find_map(|s| {
            let range = s.file_range.as_ref()?;
            range
                .contains(&file)
                .then(|| s.address + (file - range.start))
        })
    }

    /// The function's name, or `func[<index>]` when it has none.
    pub fn function_name(&self, func: u32) -> String {
        self.functions
            .get(func as usize)
            .and_then(|f| f.name.clone())
            .unwrap_or_else(|| format!("func[{func}]"))
    }
}

/// Value of a constant expression made of one `*.const` (or `global.get` of
/// nothing we can know: `None`).
fn const_value(expr: &ConstExpr<'_>) -> Option<i64> {
    let mut ops = expr.get_operators_reader();
    let value = match ops.read().ok()? {
        Operator::I32Const { value } => value as i64,
        Operator::I64Const { value } => value,
        Operator::F32Const { value } => value.bits() as i64,
        Operator::F64Const { value } => value.bits() as i64,
        _ => return None,
    };
    matches!(ops.read().ok()?, Operator::End).then_some(value)
}

/// Records the slots an active element segment of table 0 fills.
fn read_element(info: &mut ModuleInfo, element: wasmparser::Element<'_>) -> Result<(), Error> {
    let ElementKind::Active {
        table_index,
        offset_expr,
    } = element.kind
    else {
        return Ok(());
    };
    if table_index.unwrap_or(0) != 0 {
        return Ok(());
    }
    let Some(start) = const_value(&offset_expr) else {
        return Err(Error::Unsupported(
            "an element segment at a non-constant offset",
        ));
    };
    let table = info.table.get_or_insert_with(Table::default);
    match element.items {
        ElementItems::Functions(funcs) => {
            for (i, f) in funcs.into_iter().enumerate() {
                table.slots.insert(start as u32 + i as u32, f?);
            }
        }
        ElementItems::Expressions(_, exprs) => {
            for (i, e) in exprs.into_iter().enumerate() {
                let e = e?;
                if let Ok(Operator::RefFunc { function_index }) = e.get_operators_reader().read() {
                    table.slots.insert(start as u32 + i as u32, function_index);
                }
            }
        }
    }
    Ok(())
}

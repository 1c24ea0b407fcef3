//! Assembles the output module: the original sections passed through or
//! extended, the instrumented bodies, the appended helpers, and the metadata.
//!
//! Indices of everything the original defines stay where they were, except
//! its defined functions: the instrumenter appends (types, functions,
//! tables, two globals, exports) and moves the program memory from a
//! definition (or its own import) to the `upstare.memory` import, which
//! keeps memory index 0; then [`order`] moves the appended functions ahead
//! of the program's.

use std::collections::HashSet;

use wasm_encoder::reencode::{Reencode, RoundtripReencoder};
use wasm_encoder::{
    CodeSection, ConstExpr, CustomSection, DataCountSection, DataSection,
    EntityType, ExportKind, ExportSection, FunctionSection, GlobalSection, GlobalType,
    ImportSection, MemoryType, Module, RawSection, RefType, Section, TableSection,
    TableType, TypeSection,
};
use wasmparser::{Parser, Payload};

use super::{
    atomics, body, frames, helpers, order, val, Cx, Helpers, Packs, Types, MAX_FUNCTION_VALUES, MAX_UNSHARED_FLOAT_SAVE_SLOTS,
};
use crate::abi::{
    self, control, exports, BlockingImport, DataSegmentMeta, FunctionMeta, GlobalMeta,
    MemoryMeta, Metadata, ResumePoint,
};
use crate::abi::ValType as Ty;
use crate::analysis::{self, ModuleInfo};
use crate::callgraph::CallGraph;
use crate::error::{Error, ErrorKind, Result};
use crate::plan::{self, Plan};

/// Custom sections that describe the original code by offset or index and
/// would mislead a reader of the output; the metadata points to the original
/// module instead.
fn describes_original_code(name: &str) -> bool {
    name.starts_with(".debug_") || name == "linking" || name.starts_with("reloc.")
}

/// Instruments `wasm`, returning the output module and its metadata.
pub(crate) fn rewrite(wasm: &[u8], blocking: &HashSet<(String, String)>, stress: bool, unwind_only: bool) -> Result<(Vec<u8>, Metadata)> {
    check_names(wasm)?;
    // Futex waits become calls of blocking imports first; the rest works
    // on the lowered module.
    let lowered = atomics::lower(wasm)?;
    let (wasm, blocking) = match &lowered {
        Some(l) => {
            let mut all = blocking.clone();
            all.extend(l.blocking());
            (&l.wasm[..], std::borrow::Cow::Owned(all))
        }
        None => (wasm, std::borrow::Cow::Borrowed(blocking)),
    };
    let shift = lowered.as_ref().map_or(atomics::Shift::NONE, |l| l.shift);
    let info = analysis::analyze(wasm)?;
    let graph = CallGraph::new(&info, &blocking)?;

    let mut plans: Vec<Option<Plan>> = Vec::with_capacity(info.bodies.len());
    let mut shapes = Default::default();
    for b in &info.bodies {
        plans.push(if graph.can_unwind[b.func as usize] { Some(plan::plan(&info, &graph, b, &mut shapes)?) } else { None });
    }
    let in_frames = |want: Ty| {
        info.bodies.iter().zip(&plans).any(|(b, p)| {
            p.as_ref().is_some_and(|p| {
                b.locals.iter().chain(p.rps.iter().flat_map(|r| &r.saved)).any(|t| *t == want)
            })
        })
    };
    // A batch helper calls the allocator with C's wasm32 signatures; a
    // function of the same name and another type is exported as it is,
    // without one.
    let allocator = |name: &str, results: &[wasmparser::ValType]| {
        let (_, func) = *info.allocator.iter().find(|(export, _)| *export == name)?;
        let ty = info.func_type(func);
        (ty.params() == [wasmparser::ValType::I32] && ty.results() == results).then_some(func)
    };
    let helpers = Helpers::new(
        info.func_types.len() as u32,
        info.num_tables,
        in_frames(Ty::FuncRef),
        in_frames(Ty::ExternRef),
        allocator(exports::MALLOC, &[wasmparser::ValType::I32]),
        allocator(exports::FREE, &[]),
        unwind_only,
    );
    let state_global = info.globals.len() as u32;
    let keys = info
        .bodies
        .iter()
        .zip(&plans)
        .filter_map(|(b, p)| Some((b, p.as_ref()?)))
        .flat_map(|(b, p)| p.rps.iter().map(move |rp| frames::pack_key(rp.slots.iter().map(|&l| b.locals[l as usize])).0))
        .filter(|k| k.iter().any(|&n| n > 0) && k.iter().sum::<u32>() as usize <= MAX_FUNCTION_VALUES)
        .collect();
    // Slot types that one class alone has are stored inline, except short
    // lists with floats (`Packs`).
    let mut classes_of: std::collections::HashMap<Vec<Ty>, usize> = Default::default();
    for (b, p) in info.bodies.iter().zip(&plans) {
        for class in p.iter().flat_map(|p| p.save_classes().0) {
            *classes_of.entry(class.types(&b.locals)).or_default() += 1;
        }
    }
    let keeps_helper = |slots: &[Ty]| {
        slots.len() <= MAX_UNSHARED_FLOAT_SAVE_SLOTS && slots.iter().any(|t| matches!(t, Ty::F32 | Ty::F64))
    };
    let saves = (classes_of.into_iter())
        .filter(|(slots, n)| (*n > 1 || keeps_helper(slots)) && 2 + slots.len() <= MAX_FUNCTION_VALUES)
        .map(|(slots, _)| slots)
        .collect();
    // The unwind-only variant restores nothing: it needs no load helpers.
    let keys = if unwind_only { Default::default() } else { keys };
    let packs = Packs::new(helpers.next, keys, saves);
    let rp_global = state_global + 1;
    let mut cx = Cx { types: Types::new(&info.types), helpers, state_global, rp_global, stress, unwind_only, packs, shift };

    let mut bodies = Vec::with_capacity(info.bodies.len());
    let mut functions = Vec::new();
    let mut offsets = abi::offsets::OffsetMap::default();
    for (b, p) in info.bodies.iter().zip(&plans) {
        match p {
            Some(p) => {
                let out = body::instrument(&mut cx, &info, b, p)?;
                bodies.push(out.body);
                offsets.functions.push((b.func, out.runs));
                functions.push(FunctionMeta {
                    index: b.func,
                    type_index: info.func_types[b.func as usize],
                    locals: b.locals.clone(),
                    resume_points: p
                        .rps
                        .iter()
                        .map(|r| ResumePoint {
                            kind: r.kind,
                            offset: r.offset as u32,
                            callee: r.callee,
                            ordinal: r.ordinal,
                            locals: r.locals.clone(),
                            slots: r.slots.clone(),
                            operands: r.saved.clone(),
                        })
                        .collect(),
                });
            }
            None => {
                bodies.push(wasm[b.range.clone()].to_vec());
                offsets.functions.push((b.func, vec![(0, b.range.start as u32)]));
            }
        }
    }
    let mut appended = helpers::build(&info, &mut cx.types, &helpers, state_global);
    appended.extend(helpers::build_packs(&mut cx.types, &helpers, &cx.packs)?);
    let mut metadata = metadata(&info, &graph, &helpers, state_global, functions);
    if let Some(l) = &lowered {
        l.translate(&mut metadata, &mut offsets, &bodies)?;
    }
    let out = assemble(&info, &cx.types, &helpers, &bodies, &appended, &metadata)?;
    let (imported, program) = (info.num_imported_funcs, info.bodies.len() as u32);
    let (mut out, offsets) = order::helpers_first(&out, offsets, imported, program, appended.len() as u32)?;
    for (name, data) in [(abi::METADATA_SECTION, metadata.encode()), (abi::offsets::SECTION, offsets.encode())] {
        CustomSection { name: name.into(), data: data.as_slice().into() }.append_to(&mut out);
    }

    let mut validator = wasmparser::Validator::new_with_features(analysis::output_features());
    validator.validate_all(&out).map_err(|e| {
        Error::new(ErrorKind::Internal, Some(e.offset()), format!("output does not validate: {}", e.message()))
    })?;
    Ok((out, metadata))
}

/// Refuses modules that already use the names the instrumenter adds, which
/// would make the output ambiguous (or a second instrumentation of the same
/// module). This runs before validation: an instrumented module has two
/// memories, which validation would report as merely unsupported.
/// Unreadable input passes here and is reported by the analysis.
fn check_names(wasm: &[u8]) -> Result<()> {
    let conflict = |offset: usize, message: String| Err(Error::new(ErrorKind::Conflict, Some(offset), message));
    for payload in Parser::new(0).parse_all(wasm) {
        let Ok(payload) = payload else { return Ok(()) };
        match payload {
            Payload::CustomSection(c) if c.name() == abi::METADATA_SECTION => {
                return conflict(
                    c.range().start,
                    format!("the module has an `{}` section: it was instrumented already", abi::METADATA_SECTION),
                );
            }
            Payload::ImportSection(r) => {
                for import in r.into_imports_with_offsets() {
                    let Ok((offset, i)) = import else { return Ok(()) };
                    if i.module == abi::IMPORT_MODULE && !abi::process::ALL.contains(&i.name) {
                        return conflict(
                            offset,
                            format!("the module already imports `{}.{}` (was it instrumented already?)", i.module, i.name),
                        );
                    }
                }
            }
            Payload::ExportSection(r) => {
                let at = r.range().start;
                for export in r {
                    let Ok(e) = export else { return Ok(()) };
                    if crate::abi::exports::is_reserved(e.name) {
                        return conflict(
                            at,
                            format!("the module already exports `{}`, a name reserved for instrumentation", e.name),
                        );
                    }
                }
            }
            _ => {}
        }
    }
    Ok(())
}

fn metadata(
    info: &ModuleInfo<'_>,
    graph: &CallGraph,
    helpers: &Helpers,
    state_global: u32,
    functions: Vec<FunctionMeta>,
) -> Metadata {
    let memory = match &info.memory {
        Some(m) => MemoryMeta {
            original_import: m.import.map(|i| (info.imports[i].module.to_string(), info.imports[i].name.to_string())),
            min: m.ty.initial as u32,
            max: m.ty.maximum.map(|x| x as u32),
            shared: m.ty.shared,
        },
        None => MemoryMeta { original_import: None, min: 0, max: Some(0), shared: false },
    };
    let mut blocking = Vec::new();
    let mut func = 0u32;
    for imp in &info.imports {
        if matches!(imp.ty, wasmparser::TypeRef::Func(_) | wasmparser::TypeRef::FuncExact(_)) {
            if graph.blocking[func as usize] {
                blocking.push(BlockingImport { func, module: imp.module.into(), name: imp.name.into() });
            }
            func += 1;
        }
    }
    let globals = info
        .globals
        .iter()
        .enumerate()
        .filter(|(_, g)| g.mutable)
        .filter_map(|(i, g)| {
            let ty = analysis::ty(g.content_type, 0).ok()?;
            Some(GlobalMeta { index: i as u32, ty, export: exports::global(i as u32) })
        })
        .collect();
    let data = info
        .data
        .iter()
        .enumerate()
        .filter(|(_, d)| d.active_offset.is_some())
        .map(|(i, _)| DataSegmentMeta { index: i as u32 })
        .collect();
    Metadata {
        code_section: info.code_section_start as u32,
        memory,
        state_global,
        funcref_table: helpers.funcrefs.map(|r| r.table),
        externref_table: helpers.externrefs.map(|r| r.table),
        start: info.start,
        blocking,
        globals,
        data,
        functions,
    }
}

fn program_memory_type(meta: &MemoryMeta) -> MemoryType {
    MemoryType {
        minimum: meta.min as u64,
        maximum: Some(u64::from(meta.import_max())),
        memory64: false,
        shared: true,
        page_size_log2: None,
    }
}

fn control_memory_type() -> MemoryType {
    MemoryType {
        minimum: control::MIN_PAGES,
        maximum: Some(control::MAX_PAGES),
        memory64: false,
        shared: true,
        page_size_log2: None,
    }
}

fn reencode_err(e: wasm_encoder::reencode::Error) -> Error {
    Error::new(ErrorKind::Internal, None, format!("cannot re-encode the input: {e}"))
}

fn reader_err(e: wasmparser::BinaryReaderError) -> Error {
    Error::from_reader(ErrorKind::Invalid, e)
}

/// Writes the output module. Sections the rewrite does not touch are copied
/// raw; the others are re-encoded item by item with their indices kept.
fn assemble(
    info: &ModuleInfo<'_>,
    types: &Types,
    helpers: &Helpers,
    bodies: &[Vec<u8>],
    appended: &[helpers::HelperFunc],
    meta: &Metadata,
) -> Result<Vec<u8>> {
    let mut re = RoundtripReencoder;
    let mut out = Out { info, types, helpers, appended, meta, module: Module::new(), next: Stage::Types };
    let mut customs: Vec<(String, Vec<u8>)> = Vec::new();

    for payload in Parser::new(0).parse_all(info.wasm) {
        let payload = payload.map_err(reader_err)?;
        match payload {
            Payload::TypeSection(r) => {
                out.fill_to(Stage::Types);
                let mut s = TypeSection::new();
                re.parse_type_section(&mut s, r).map_err(reencode_err)?;
                add_types(&mut s, types);
                out.emit(Stage::Types, &s);
            }
            Payload::ImportSection(r) => {
                out.fill_to(Stage::Imports);
                let mut s = ImportSection::new();
                for group in r {
                    let imports = match group.map_err(reader_err)? {
                        wasmparser::Imports::Single(_, i) => vec![(i.module, i.name, i.ty)],
                        wasmparser::Imports::Compact1 { module, items } => items
                            .into_iter()
                            .map(|x| x.map(|x| (module, x.name, x.ty)))
                            .collect::<std::result::Result<_, _>>()
                            .map_err(reader_err)?,
                        wasmparser::Imports::Compact2 { module, ty, names } => names
                            .into_iter()
                            .map(|n| n.map(|n| (module, n, ty)))
                            .collect::<std::result::Result<_, _>>()
                            .map_err(reader_err)?,
                    };
                    for (m, n, ty) in imports {
                        if matches!(ty, wasmparser::TypeRef::Memory(_)) {
                            continue;
                        }
                        s.import(m, n, re.entity_type(ty).map_err(reencode_err)?);
                    }
                }
                add_memory_imports(&mut s, meta);
                out.emit(Stage::Imports, &s);
            }
            Payload::FunctionSection(r) => {
                out.fill_to(Stage::Functions);
                let mut s = FunctionSection::new();
                re.parse_function_section(&mut s, r).map_err(reencode_err)?;
                add_functions(&mut s, appended);
                out.emit(Stage::Functions, &s);
            }
            Payload::TableSection(r) => {
                out.fill_to(Stage::Tables);
                let mut s = TableSection::new();
                re.parse_table_section(&mut s, r).map_err(reencode_err)?;
                add_side_tables(&mut s, helpers);
                out.emit(Stage::Tables, &s);
            }
            // The program memory is imported now.
            Payload::MemorySection(_) => {}
            Payload::GlobalSection(r) => {
                out.fill_to(Stage::Globals);
                let mut s = GlobalSection::new();
                re.parse_global_section(&mut s, r).map_err(reencode_err)?;
                add_state_global(&mut s);
                out.emit(Stage::Globals, &s);
            }
            Payload::ExportSection(r) => {
                out.fill_to(Stage::Exports);
                let mut s = ExportSection::new();
                re.parse_export_section(&mut s, r).map_err(reencode_err)?;
                add_exports(&mut s, info, helpers, meta);
                out.emit(Stage::Exports, &s);
            }
            // The host calls the start function after initialising memory.
            Payload::StartSection { .. } => {}
            Payload::ElementSection(r) => {
                // Elements sit between the exports and the code.
                out.fill_to(Stage::Code);
                let range = r.range();
                out.module.section(&RawSection { id: 9, data: &info.wasm[range.start..range.end] });
            }
            Payload::DataCountSection { .. } => {}
            Payload::CodeSectionStart { .. } => {
                out.fill_to(Stage::Code);
                out.data_count();
                let mut s = CodeSection::new();
                for b in bodies {
                    s.raw(b);
                }
                add_bodies(&mut s, appended);
                out.emit(Stage::Code, &s);
            }
            Payload::CodeSectionEntry(_) => {}
            Payload::DataSection(r) => {
                out.fill_to(Stage::Data);
                let mut s = DataSection::new();
                for d in r {
                    let d = d.map_err(reader_err)?;
                    s.passive(d.data.iter().copied());
                }
                out.module.section(&s);
            }
            Payload::CustomSection(c) => {
                if !describes_original_code(c.name()) {
                    customs.push((c.name().to_string(), c.data().to_vec()));
                }
            }
            Payload::End(_) => {}
            Payload::Version { .. } => {}
            other => {
                // The validator with the input features lets nothing else
                // through (tags, components, ...).
                let offset = other.as_section().map(|(_, r)| r.start);
                return Err(Error::new(ErrorKind::Unsupported, offset, "unsupported section"));
            }
        }
    }
    out.fill_to(Stage::Data);
    let mut module = out.module;
    for (name, data) in &customs {
        module.section(&CustomSection { name: name.into(), data: data.into() });
    }
    Ok(module.finish())
}

/// The sections the rewrite adds to, in the order the binary format
/// requires them.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Stage {
    Types,
    Imports,
    Functions,
    Tables,
    Globals,
    Exports,
    Code,
    /// Past the code: nothing more to add.
    Data,
}

impl Stage {
    fn after(self) -> Stage {
        match self {
            Stage::Types => Stage::Imports,
            Stage::Imports => Stage::Functions,
            Stage::Functions => Stage::Tables,
            Stage::Tables => Stage::Globals,
            Stage::Globals => Stage::Exports,
            Stage::Exports => Stage::Code,
            Stage::Code | Stage::Data => Stage::Data,
        }
    }
}

/// The output being written, and the first section it has not reached. An
/// input may lack a section the rewrite adds to; [`Out::fill_to`] writes
/// such a section with only the additions, in its place in the order.
struct Out<'a> {
    info: &'a ModuleInfo<'a>,
    types: &'a Types,
    helpers: &'a Helpers,
    appended: &'a [helpers::HelperFunc],
    meta: &'a Metadata,
    module: Module,
    next: Stage,
}

impl Out<'_> {
    /// Writes the input's section `stage`, extended.
    fn emit(&mut self, stage: Stage, section: &impl wasm_encoder::Section) {
        self.module.section(section);
        self.next = stage.after();
    }

    /// Writes every missing section before `stage`.
    fn fill_to(&mut self, stage: Stage) {
        while self.next < stage {
            let missing = self.next;
            match missing {
                Stage::Types => {
                    let mut s = TypeSection::new();
                    add_types(&mut s, self.types);
                    self.module.section(&s);
                }
                Stage::Imports => {
                    let mut s = ImportSection::new();
                    add_memory_imports(&mut s, self.meta);
                    self.module.section(&s);
                }
                Stage::Functions => {
                    let mut s = FunctionSection::new();
                    add_functions(&mut s, self.appended);
                    self.module.section(&s);
                }
                Stage::Tables => {
                    if self.helpers.sides().next().is_some() {
                        let mut s = TableSection::new();
                        add_side_tables(&mut s, self.helpers);
                        self.module.section(&s);
                    }
                }
                Stage::Globals => {
                    let mut s = GlobalSection::new();
                    add_state_global(&mut s);
                    self.module.section(&s);
                }
                Stage::Exports => {
                    let mut s = ExportSection::new();
                    add_exports(&mut s, self.info, self.helpers, self.meta);
                    self.module.section(&s);
                }
                Stage::Code => {
                    self.data_count();
                    let mut s = CodeSection::new();
                    add_bodies(&mut s, self.appended);
                    self.module.section(&s);
                }
                Stage::Data => {}
            }
            self.next = missing.after();
        }
    }

    /// The data count section, which `memory.init` and `data.drop` in the
    /// helpers need; it comes right before the code.
    fn data_count(&mut self) {
        if !self.info.data.is_empty() {
            self.module.section(&DataCountSection { count: self.info.data.len() as u32 });
        }
    }
}

fn add_functions(s: &mut FunctionSection, appended: &[helpers::HelperFunc]) {
    for h in appended {
        s.function(h.type_index);
    }
}

fn add_bodies(s: &mut CodeSection, appended: &[helpers::HelperFunc]) {
    for h in appended {
        s.raw(&h.body);
    }
}

fn add_types(s: &mut TypeSection, types: &Types) {
    for (params, results) in &types.added {
        s.ty().function(params.iter().map(|t| val(*t)), results.iter().map(|t| val(*t)));
    }
}

fn add_memory_imports(s: &mut ImportSection, meta: &Metadata) {
    s.import(abi::IMPORT_MODULE, abi::MEMORY_IMPORT, EntityType::Memory(program_memory_type(&meta.memory)));
    s.import(abi::IMPORT_MODULE, abi::CONTROL_IMPORT, EntityType::Memory(control_memory_type()));
}

fn add_side_tables(s: &mut TableSection, helpers: &Helpers) {
    for (t, _) in helpers.sides() {
        let element_type = if t == Ty::FuncRef { RefType::FUNCREF } else { RefType::EXTERNREF };
        s.table(TableType { element_type, minimum: 0, maximum: None, table64: false, shared: false });
    }
}

/// The state global, then the one the rewind prologue keeps its frame's
/// resume point in (not exported: only the function's own dispatch reads
/// it).
fn add_state_global(s: &mut GlobalSection) {
    for _ in 0..2 {
        s.global(
            GlobalType { val_type: wasm_encoder::ValType::I32, mutable: true, shared: false },
            &ConstExpr::i32_const(0),
        );
    }
}

fn add_exports(s: &mut ExportSection, info: &ModuleInfo<'_>, h: &Helpers, meta: &Metadata) {
    s.export(exports::STATE, ExportKind::Global, meta.state_global);
    s.export(exports::INIT_MEMORY, ExportKind::Func, h.init_memory);
    s.export(exports::DROP_DATA, ExportKind::Func, h.drop_data);
    if let Some(start) = info.start {
        s.export(exports::START, ExportKind::Func, start);
    }
    if let Some(r) = h.funcrefs {
        s.export(exports::FUNCREF_TABLE, ExportKind::Table, r.table);
    }
    if let Some(r) = h.externrefs {
        s.export(exports::EXTERNREF_TABLE, ExportKind::Table, r.table);
    }
    for g in &meta.globals {
        s.export(&g.export, ExportKind::Global, g.index);
    }
    // The allocator serves an update's heap conversion, which runs in the
    // new version's instance: the full variant's.
    if h.rewind.is_some() {
        for &(name, func) in &info.allocator {
            s.export(name, ExportKind::Func, func);
        }
    }
    if let Some(b) = h.malloc_batch {
        s.export(exports::MALLOC_BATCH, ExportKind::Func, b.helper);
    }
    if let Some(b) = h.free_batch {
        s.export(exports::FREE_BATCH, ExportKind::Func, b.helper);
    }
}

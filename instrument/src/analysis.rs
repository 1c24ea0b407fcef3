//! Parsing and validating the input, and collecting what the rewrite needs:
//! module-level facts (types, imports, memory, globals, exports, data
//! segments, functions that can escape into a table) and, per function body,
//! the typed operand stack at every call and block instruction.
//!
//! The stack types come from wasmparser's `FuncValidator`, driven one operator
//! at a time, so validation and analysis are one pass and the rewrite never
//! needs an IR.

use std::collections::HashSet;
use std::ops::Range;

use wasmparser::{
    BlockType, DataKind, ElementItems, ExternalKind, FuncToValidate, FuncType, FunctionBody,
    GlobalType, MemoryType, Operator, Parser, Payload, TypeRef, ValidPayload, Validator,
    ValidatorResources, WasmFeatures,
};

use crate::abi::ValType as Ty;
use crate::error::{unsupported, Error, ErrorKind, Result};

/// Features the instrumenter accepts in its input.
pub(crate) fn input_features() -> WasmFeatures {
    WasmFeatures::MUTABLE_GLOBAL
        | WasmFeatures::SATURATING_FLOAT_TO_INT
        | WasmFeatures::SIGN_EXTENSION
        | WasmFeatures::REFERENCE_TYPES
        | WasmFeatures::MULTI_VALUE
        | WasmFeatures::BULK_MEMORY
        | WasmFeatures::THREADS
        | WasmFeatures::FLOATS
        | WasmFeatures::GC_TYPES
}

/// Features its output uses: the input's plus a second (control) memory.
pub(crate) fn output_features() -> WasmFeatures {
    input_features() | WasmFeatures::MULTI_MEMORY
}

/// A flattened import.
pub(crate) struct Import<'a> {
    pub module: &'a str,
    pub name: &'a str,
    pub ty: TypeRef,
}

/// The program memory (memory 0).
pub(crate) struct Memory {
    pub ty: MemoryType,
    /// Position in [`ModuleInfo::imports`] if the original imported it.
    pub import: Option<usize>,
}

/// A data segment and, if it was active, its offset expression.
pub(crate) struct DataSegment {
    /// Bytes of the offset expression's instructions, without the final `end`.
    pub active_offset: Option<Range<usize>>,
    pub len: u32,
}

/// What a [`Site`] is.
#[derive(Debug, Clone)]
pub(crate) enum SiteKind {
    Call { func: u32 },
    CallIndirect { ty: u32 },
    Block { params: Vec<Ty>, results: Vec<Ty> },
    Loop { params: Vec<Ty>, results: Vec<Ty>, type_index: Option<u32> },
    If { params: Vec<Ty>, results: Vec<Ty> },
    Else,
    End,
}

/// A call or control instruction of a function body, as the validator saw it
/// right before the instruction.
#[derive(Debug, Clone)]
pub(crate) struct Site {
    /// Position of the operator in the body (0 = first operator).
    pub op_index: u32,
    /// Offset of the operator in the module.
    pub offset: usize,
    pub kind: SiteKind,
    /// Whether the instruction can execute: no enclosing frame is unreachable.
    pub live: bool,
    /// The whole operand stack (all frames), bottom first; empty if not live.
    pub stack: Vec<Ty>,
    /// Height of the innermost frame's part of the stack.
    pub frame_height: u32,
}

/// A function body and what the analysis found in it.
pub(crate) struct Body {
    pub func: u32,
    /// The body's bytes in the module (local declarations and operators).
    pub range: Range<usize>,
    /// Types of all original locals, params first.
    pub locals: Vec<Ty>,
    /// Local declarations as (count, type) groups, to re-emit them.
    pub local_groups: Vec<(u32, wasmparser::ValType)>,
    /// Offset of the first operator.
    pub ops_start: usize,
    pub sites: Vec<Site>,
}

/// Everything the rewrite needs to know about the input module.
pub(crate) struct ModuleInfo<'a> {
    pub wasm: &'a [u8],
    pub types: Vec<FuncType>,
    /// Type index of every function, imports first.
    pub func_types: Vec<u32>,
    pub num_imported_funcs: u32,
    pub imports: Vec<Import<'a>>,
    pub memory: Option<Memory>,
    pub num_tables: u32,
    pub globals: Vec<GlobalType>,
    pub exports: Vec<(&'a str, ExternalKind, u32)>,
    pub start: Option<u32>,
    /// Functions a funcref can point to: in an element segment, named by
    /// `ref.func`, or exported.
    pub escaping: Vec<bool>,
    pub data: Vec<DataSegment>,
    pub has_data_count: bool,
    pub code_section_start: usize,
    pub bodies: Vec<Body>,
    /// The program's own `malloc` and `free` (or `dlmalloc`, `dlfree`), by
    /// the name section: the host converts heap objects through them (see
    /// [`crate::abi::exports::MALLOC`]).
    pub allocator: Vec<(&'static str, u32)>,
}

impl ModuleInfo<'_> {
    pub fn func_type(&self, func: u32) -> &FuncType {
        &self.types[self.func_types[func as usize] as usize]
    }
}

/// Converts a value type, refusing those a frame cannot hold.
pub(crate) fn ty(t: wasmparser::ValType, offset: usize) -> Result<Ty> {
    use wasmparser::{RefType, ValType as V};
    Ok(match t {
        V::I32 => Ty::I32,
        V::I64 => Ty::I64,
        V::F32 => Ty::F32,
        V::F64 => Ty::F64,
        V::Ref(r) if r == RefType::FUNCREF => Ty::FuncRef,
        V::Ref(r) if r == RefType::EXTERNREF => Ty::ExternRef,
        other => return Err(unsupported(Some(offset), format!("value type {other} is not supported"))),
    })
}

/// Converts the type of a value on the operand stack. The validator tracks
/// operands more precisely than locals and block types can be declared:
/// `ref.func` pushes a non-null reference to its function's type. Any
/// function reference fits in a `funcref` local and any extern reference in
/// an `externref` one, and nothing in the accepted features can consume
/// them in a way that depends on the more precise type.
fn stack_ty(t: wasmparser::ValType, offset: usize) -> Result<Ty> {
    use wasmparser::{AbstractHeapType as A, HeapType as H, ValType as V};
    if let V::Ref(r) = t {
        match r.heap_type() {
            // The input has no GC types, so every concrete type is a
            // function type.
            H::Concrete(_) | H::Exact(_) | H::Abstract { shared: false, ty: A::Func | A::NoFunc } => {
                return Ok(Ty::FuncRef)
            }
            H::Abstract { shared: false, ty: A::Extern | A::NoExtern } => return Ok(Ty::ExternRef),
            _ => {}
        }
    }
    ty(t, offset)
}

pub(crate) fn tys(ts: &[wasmparser::ValType], offset: usize) -> Result<Vec<Ty>> {
    ts.iter().map(|t| ty(*t, offset)).collect()
}

/// Parses and validates `wasm`, collecting the facts the rewrite needs.
pub(crate) fn analyze(wasm: &[u8]) -> Result<ModuleInfo<'_>> {
    analyze_inner(wasm).map_err(|e| classify(wasm, e))
}

/// A validation failure is "unsupported" when the module would validate with
/// every feature on, "invalid" otherwise.
fn classify(wasm: &[u8], err: Error) -> Error {
    if err.kind() != ErrorKind::Invalid {
        return err;
    }
    let mut all = Validator::new_with_features(WasmFeatures::all());
    if all.validate_all(wasm).is_ok() {
        Error::new(
            ErrorKind::Unsupported,
            err.offset(),
            format!("{} (upstare-instrument supports MVP wasm with bulk-memory, sign-ext, mutable-globals, multi-value, nontrapping-fptoint, reference-types and threads, one memory)", err.message()),
        )
    } else {
        err
    }
}

fn invalid(e: wasmparser::BinaryReaderError) -> Error {
    Error::from_reader(ErrorKind::Invalid, e)
}

fn analyze_inner(wasm: &[u8]) -> Result<ModuleInfo<'_>> {
    let mut validator = Validator::new_with_features(input_features());
    let mut info = ModuleInfo {
        wasm,
        types: Vec::new(),
        func_types: Vec::new(),
        num_imported_funcs: 0,
        imports: Vec::new(),
        memory: None,
        num_tables: 0,
        globals: Vec::new(),
        exports: Vec::new(),
        start: None,
        escaping: Vec::new(),
        data: Vec::new(),
        has_data_count: false,
        code_section_start: 0,
        bodies: Vec::new(),
        allocator: Vec::new(),
    };
    let mut ref_funcs: HashSet<u32> = HashSet::new();
    let mut pending: Vec<(FuncToValidate<ValidatorResources>, FunctionBody<'_>)> = Vec::new();
    for payload in Parser::new(0).parse_all(wasm) {
        let payload = payload.map_err(invalid)?;
        if let ValidPayload::Func(f, body) = validator.payload(&payload).map_err(invalid)? {
            pending.push((f, body));
        }
        collect(&mut info, &mut ref_funcs, &payload)?;
    }
    info.escaping = vec![false; info.func_types.len()];
    for f in ref_funcs {
        info.escaping[f as usize] = true;
    }
    for &(_, kind, index) in &info.exports {
        if kind == ExternalKind::Func {
            info.escaping[index as usize] = true;
        }
    }
    // Bodies can name functions with `ref.func` too; scanning them finishes
    // the escape set.
    let mut escaping = std::mem::take(&mut info.escaping);
    let mut bodies = Vec::with_capacity(pending.len());
    for (i, (f, body)) in pending.into_iter().enumerate() {
        let func = info.num_imported_funcs + i as u32;
        bodies.push(scan_body(&info, &mut escaping, func, f, body)?);
    }
    info.escaping = escaping;
    info.bodies = bodies;
    Ok(info)
}

fn const_expr_funcs(expr: &wasmparser::ConstExpr<'_>, out: &mut HashSet<u32>) -> Result<()> {
    let mut ops = expr.get_operators_reader();
    while !ops.eof() {
        if let Operator::RefFunc { function_index } = ops.read().map_err(invalid)? {
            out.insert(function_index);
        }
    }
    Ok(())
}

fn collect<'a>(info: &mut ModuleInfo<'a>, ref_funcs: &mut HashSet<u32>, payload: &Payload<'a>) -> Result<()> {
    match payload {
        Payload::TypeSection(r) => {
            for t in r.clone().into_iter_err_on_gc_types() {
                info.types.push(t.map_err(invalid)?);
            }
        }
        Payload::ImportSection(r) => {
            for group in r.clone() {
                let mut add = |module, name, ty: TypeRef| {
                    match ty {
                        TypeRef::Func(t) | TypeRef::FuncExact(t) => {
                            info.func_types.push(t);
                            info.num_imported_funcs += 1;
                        }
                        TypeRef::Memory(m) => {
                            info.memory = Some(Memory { ty: m, import: Some(info.imports.len()) })
                        }
                        TypeRef::Table(_) => info.num_tables += 1,
                        TypeRef::Global(g) => info.globals.push(g),
                        TypeRef::Tag(_) => {}
                    }
                    info.imports.push(Import { module, name, ty });
                };
                match group.map_err(invalid)? {
                    wasmparser::Imports::Single(_, i) => add(i.module, i.name, i.ty),
                    wasmparser::Imports::Compact1 { module, items } => {
                        for item in items {
                            let item = item.map_err(invalid)?;
                            add(module, item.name, item.ty);
                        }
                    }
                    wasmparser::Imports::Compact2 { module, ty, names } => {
                        for name in names {
                            add(module, name.map_err(invalid)?, ty);
                        }
                    }
                }
            }
        }
        Payload::FunctionSection(r) => {
            for t in r.clone() {
                info.func_types.push(t.map_err(invalid)?);
            }
        }
        Payload::TableSection(r) => {
            for t in r.clone() {
                if let wasmparser::TableInit::Expr(e) = t.map_err(invalid)?.init {
                    const_expr_funcs(&e, ref_funcs)?;
                }
                info.num_tables += 1;
            }
        }
        Payload::MemorySection(r) => {
            for m in r.clone() {
                info.memory = Some(Memory { ty: m.map_err(invalid)?, import: None });
            }
        }
        Payload::GlobalSection(r) => {
            for g in r.clone() {
                let g = g.map_err(invalid)?;
                const_expr_funcs(&g.init_expr, ref_funcs)?;
                info.globals.push(g.ty);
            }
        }
        Payload::ExportSection(r) => {
            for e in r.clone() {
                let e = e.map_err(invalid)?;
                info.exports.push((e.name, e.kind, e.index));
            }
        }
        Payload::StartSection { func, .. } => info.start = Some(*func),
        Payload::ElementSection(r) => {
            for e in r.clone() {
                let e = e.map_err(invalid)?;
                if let wasmparser::ElementKind::Active { offset_expr, .. } = &e.kind {
                    const_expr_funcs(offset_expr, ref_funcs)?;
                }
                match e.items {
                    ElementItems::Functions(fs) => {
                        for f in fs {
                            ref_funcs.insert(f.map_err(invalid)?);
                        }
                    }
                    ElementItems::Expressions(_, es) => {
                        for x in es {
                            const_expr_funcs(&x.map_err(invalid)?, ref_funcs)?;
                        }
                    }
                }
            }
        }
        Payload::DataCountSection { .. } => info.has_data_count = true,
        Payload::DataSection(r) => {
            for d in r.clone() {
                let d = d.map_err(invalid)?;
                let active_offset = match &d.kind {
                    DataKind::Passive => None,
                    DataKind::Active { offset_expr, .. } => {
                        let mut br = offset_expr.get_binary_reader();
                        let start = br.original_position();
                        let len = br.bytes_remaining();
                        let bytes = br.read_bytes(len).map_err(invalid)?;
                        // The expression's bytes end with `end`, which an
                        // inlined copy must not carry.
                        let len = if bytes.last() == Some(&0x0b) { len - 1 } else { len };
                        Some(start..start + len)
                    }
                };
                info.data.push(DataSegment { active_offset, len: d.data.len() as u32 });
            }
        }
        Payload::CodeSectionStart { range, .. } => info.code_section_start = range.start,
        Payload::CustomSection(c) => {
            if let wasmparser::KnownCustom::Name(names) = c.as_known() {
                collect_allocator(info, names);
            }
        }
        _ => {}
    }
    Ok(())
}

/// Finds the defined functions named `malloc` and `free`, or dlmalloc's
/// own `dlmalloc` and `dlfree` (wasi-libc's `free` is linked only if the
/// program calls it; `realloc` calls `dlfree`). A malformed name section
/// only means no allocator: names are not semantics.
fn collect_allocator(info: &mut ModuleInfo<'_>, names: wasmparser::NameSectionReader<'_>) {
    use crate::abi::exports::{FREE, MALLOC};
    // (export, preferred name, fallback name)
    const WANTED: [(&str, &str, &str); 2] = [(MALLOC, "malloc", "dlmalloc"), (FREE, "free", "dlfree")];
    let mut found: [(Option<u32>, Option<u32>); 2] = [(None, None); 2];
    for name in names.into_iter().flatten() {
        let wasmparser::Name::Function(map) = name else { continue };
        for naming in map.into_iter().flatten().filter(|n| n.index >= info.num_imported_funcs) {
            for (slot, (_, preferred, fallback)) in found.iter_mut().zip(WANTED) {
                if naming.name == preferred {
                    slot.0 = Some(naming.index);
                } else if naming.name == fallback {
                    slot.1 = Some(naming.index);
                }
            }
        }
    }
    for ((preferred, fallback), (export, _, _)) in found.into_iter().zip(WANTED) {
        if let Some(func) = preferred.or(fallback) {
            info.allocator.push((export, func));
        }
    }
}

fn block_sig(info: &ModuleInfo<'_>, bt: BlockType, offset: usize) -> Result<(Vec<Ty>, Vec<Ty>, Option<u32>)> {
    Ok(match bt {
        BlockType::Empty => (vec![], vec![], None),
        BlockType::Type(t) => (vec![], vec![ty(t, offset)?], None),
        BlockType::FuncType(i) => {
            let f = &info.types[i as usize];
            (tys(f.params(), offset)?, tys(f.results(), offset)?, Some(i))
        }
    })
}

/// Validates one body operator by operator, recording a [`Site`] for every
/// call and control instruction.
fn scan_body(
    info: &ModuleInfo<'_>,
    escaping: &mut [bool],
    func: u32,
    f: FuncToValidate<ValidatorResources>,
    body: FunctionBody<'_>,
) -> Result<Body> {
    let mut fv = f.into_validator(Default::default());
    let fty = info.func_type(func);
    let mut locals = tys(fty.params(), body.range().start)?;
    let mut local_groups = Vec::new();
    let mut lr = body.get_locals_reader().map_err(invalid)?;
    for _ in 0..lr.get_count() {
        let offset = lr.original_position();
        let (count, t) = lr.read().map_err(invalid)?;
        fv.define_locals(offset, count, t).map_err(invalid)?;
        let t2 = ty(t, offset)?;
        locals.extend(std::iter::repeat_n(t2, count as usize));
        local_groups.push((count, t));
    }
    let mut ops = wasmparser::OperatorsReader::new(lr.get_binary_reader());
    let ops_start = ops.original_position();
    let mut sites = Vec::new();
    let mut op_index = 0u32;
    while !ops.eof() {
        let offset = ops.original_position();
        let op = ops.read().map_err(invalid)?;
        let is_site = matches!(
            op,
            Operator::Call { .. }
                | Operator::CallIndirect { .. }
                | Operator::Block { .. }
                | Operator::Loop { .. }
                | Operator::If { .. }
                | Operator::Else
                | Operator::End
        );
        if let Operator::RefFunc { function_index } = op {
            if let Some(e) = escaping.get_mut(function_index as usize) {
                *e = true;
            }
        }
        // The stack is read before the operator, but the operator is
        // validated before its immediates (type indices) are trusted.
        let before = if is_site {
            let depth = fv.control_stack_height() as usize;
            let live = (0..depth).all(|d| fv.get_control_frame(d).is_some_and(|f| !f.unreachable));
            let frame_height = fv.get_control_frame(0).map_or(0, |f| f.height as u32);
            let mut stack = Vec::new();
            let interesting = !matches!(op, Operator::Else | Operator::End);
            if live && interesting {
                let h = fv.operand_stack_height() as usize;
                for d in (0..h).rev() {
                    match fv.get_operand_type(d) {
                        Some(Some(t)) => stack.push(stack_ty(t, offset)?),
                        _ => {
                            return Err(Error::new(
                                ErrorKind::Internal,
                                Some(offset),
                                "operand of unknown type in reachable code",
                            ))
                        }
                    }
                }
            }
            Some((live, frame_height, stack))
        } else {
            None
        };
        fv.op(offset, &op).map_err(invalid)?;
        if let Some((live, frame_height, stack)) = before {
            let kind = match op {
                Operator::Call { function_index } => SiteKind::Call { func: function_index },
                Operator::CallIndirect { type_index, .. } => SiteKind::CallIndirect { ty: type_index },
                Operator::Block { blockty } => {
                    let (params, results, _) = block_sig(info, blockty, offset)?;
                    SiteKind::Block { params, results }
                }
                Operator::Loop { blockty } => {
                    let (params, results, type_index) = block_sig(info, blockty, offset)?;
                    SiteKind::Loop { params, results, type_index }
                }
                Operator::If { blockty } => {
                    let (params, results, _) = block_sig(info, blockty, offset)?;
                    SiteKind::If { params, results }
                }
                Operator::Else => SiteKind::Else,
                _ => SiteKind::End,
            };
            sites.push(Site { op_index, offset, kind, live, stack, frame_height });
        }
        op_index += 1;
    }
    ops.finish().map_err(invalid)?;
    Ok(Body {
        func,
        range: body.range(),
        locals,
        local_groups,
        ops_start,
        sites,
    })
}

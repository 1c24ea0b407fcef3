//! Futex instructions as host calls: `memory.atomic.wait32`,
//! `memory.atomic.wait64` and `memory.atomic.notify` become calls to the
//! `upstare` imports of [`crate::abi::futex`], so that a thread blocked in a
//! wait sits in a call the host can interrupt, an update point like a
//! blocking WASI call.
//!
//! This runs before the rest of the rewrite, as a module-to-module lowering,
//! and only on modules that use one of the three instructions (any other
//! module is not touched, so its output stays what it was). The new
//! function imports come after the original function imports, which moves
//! every defined function up by their number: calls, `ref.func`, element
//! segments, exports, the start function and the name section are
//! renumbered here. The rest of the rewrite then works on the lowered
//! module as on any other, and [`Lowered::translate`] turns what it
//! reports back into the terms of the original module, which is what the
//! metadata describes ([`crate::abi::metadata`]): function indices and
//! instruction offsets of the original, the new imports and the lowering's
//! scratch locals left out.
//!
//! Each instruction becomes a fixed sequence (so that the offsets of the
//! two modules can be matched instruction by instruction): its operands go
//! to scratch locals, the address is zero-extended and the memarg offset
//! added to it in i64 (so the host sees the effective address and traps
//! exactly where the instruction would), and the import is called.

use std::collections::HashMap;

use wasm_encoder::reencode::{self, Reencode};
use wasm_encoder::{EntityType, ImportSection, Instruction as I, Module, SectionId, ValType};
use wasmparser::{Operator, Parser, Payload};

use crate::abi::{self, futex, metadata::ResumeKind, offsets::OffsetMap, Metadata};
use crate::error::{internal, Error, ErrorKind, Result};

/// One of the three lowered instructions.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Op {
    Wait32,
    Wait64,
    Notify,
}

impl Op {
    const ALL: [Op; 3] = [Op::Wait32, Op::Wait64, Op::Notify];

    fn of(op: &Operator<'_>) -> Option<(Op, u64)> {
        match op {
            Operator::MemoryAtomicWait32 { memarg } => Some((Op::Wait32, memarg.offset)),
            Operator::MemoryAtomicWait64 { memarg } => Some((Op::Wait64, memarg.offset)),
            Operator::MemoryAtomicNotify { memarg } => Some((Op::Notify, memarg.offset)),
            _ => None,
        }
    }

    fn import(self) -> &'static str {
        match self {
            Op::Wait32 => futex::WAIT32,
            Op::Wait64 => futex::WAIT64,
            Op::Notify => futex::NOTIFY,
        }
    }

    fn params(self) -> &'static [ValType] {
        match self {
            Op::Wait32 => &[ValType::I64, ValType::I32, ValType::I64],
            Op::Wait64 => &[ValType::I64, ValType::I64, ValType::I64],
            Op::Notify => &[ValType::I64, ValType::I32],
        }
    }

    /// Instructions in the sequence that replaces it.
    fn len(self) -> usize {
        match self {
            Op::Wait32 | Op::Wait64 => 8,
            Op::Notify => 6,
        }
    }
}

/// Scratch locals a function with lowered instructions gets, after its own:
/// one i32 (a wait32's expected value, a notify's count), then two i64 (a
/// timeout, a wait64's expected value).
const SCRATCH: u32 = 3;

/// How function indices of the lowered module relate to the original's.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Shift {
    /// The first defined function (the number of original function imports).
    pub first: u32,
    /// How many imports were added before it.
    pub by: u32,
}

impl Shift {
    /// No lowering: indices are the original's.
    pub const NONE: Shift = Shift { first: u32::MAX, by: 0 };

    fn forward(self, f: u32) -> u32 {
        if f >= self.first { f + self.by } else { f }
    }

    /// The original index of function `f` of the lowered module (an added
    /// import has none; it is never asked for).
    pub fn back(self, f: u32) -> u32 {
        if f >= self.first + self.by { f - self.by } else { f }
    }
}

/// A lowered module and how to map it back to the original.
pub(crate) struct Lowered {
    pub wasm: Vec<u8>,
    pub shift: Shift,
    /// The imports added, with their function index in the lowered module.
    pub imports: Vec<(Op, u32)>,
    /// Per defined function (by position): the lowered module's offset of
    /// its body and of every instruction, each with the original offset,
    /// in order. An instruction of a replacing sequence maps to the
    /// replaced instruction.
    map: Vec<Vec<(u32, u32)>>,
    /// Per defined function: scratch locals added (0 or [`SCRATCH`]).
    scratch: Vec<u32>,
    /// End of each defined function's body in the lowered module.
    ends: Vec<u32>,
    original_code_section: u32,
}

/// What the first pass over the original finds.
struct Scan {
    imported_funcs: u32,
    types: u32,
    /// Params of every type.
    params: Vec<u32>,
    /// Type of every defined function.
    defined: Vec<u32>,
    used: [bool; 3],
}

fn invalid(e: wasmparser::BinaryReaderError) -> Error {
    Error::from_reader(ErrorKind::Invalid, e)
}

fn scan(wasm: &[u8]) -> Result<Scan> {
    let mut s = Scan { imported_funcs: 0, types: 0, params: Vec::new(), defined: Vec::new(), used: [false; 3] };
    for payload in Parser::new(0).parse_all(wasm) {
        match payload.map_err(invalid)? {
            Payload::TypeSection(r) => {
                for t in r.into_iter_err_on_gc_types() {
                    s.params.push(t.map_err(invalid)?.params().len() as u32);
                    s.types += 1;
                }
            }
            Payload::ImportSection(r) => {
                for i in r.into_imports() {
                    if matches!(i.map_err(invalid)?.ty, wasmparser::TypeRef::Func(_) | wasmparser::TypeRef::FuncExact(_)) {
                        s.imported_funcs += 1;
                    }
                }
            }
            Payload::FunctionSection(r) => {
                for t in r {
                    s.defined.push(t.map_err(invalid)?);
                }
            }
            Payload::CodeSectionEntry(body) => {
                let mut ops = body.get_operators_reader().map_err(invalid)?;
                while !ops.eof() {
                    if let Some((op, _)) = Op::of(&ops.read().map_err(invalid)?) {
                        s.used[Op::ALL.iter().position(|&o| o == op).unwrap_or_default()] = true;
                    }
                }
            }
            _ => {}
        }
    }
    Ok(s)
}

/// Lowers the futex instructions of `wasm`; `None` if it has none. The
/// input is assumed valid (the rewrite validates the lowered module, and
/// reports unreadable input as such).
pub(crate) fn lower(wasm: &[u8]) -> Result<Option<Lowered>> {
    let Ok(s) = scan(wasm) else { return Ok(None) };
    if !s.used.iter().any(|&u| u) {
        return Ok(None);
    }
    let mut imports = Vec::new();
    let mut types = Vec::new();
    for op in Op::ALL.into_iter().zip(s.used).filter_map(|(op, used)| used.then_some(op)) {
        imports.push((op, s.imported_funcs + imports.len() as u32));
        types.push((op, s.types + types.len() as u32));
    }
    let shift = Shift { first: s.imported_funcs, by: imports.len() as u32 };
    let mut r = Lowerer { shift, scan: &s, types: &types, imports: &imports, imports_done: false, body: 0, scratch: Vec::new() };
    let mut module = Module::new();
    r.parse_core_module(&mut module, Parser::new(0), wasm)
        .map_err(|e| Error::new(ErrorKind::Invalid, None, format!("cannot lower the atomic waits: {e}")))?;
    let scratch = std::mem::take(&mut r.scratch);
    let out = module.finish();
    let (map, ends, original_code_section) = match_offsets(wasm, &out)?;
    Ok(Some(Lowered { wasm: out, shift, imports, map, scratch, ends, original_code_section }))
}

struct Lowerer<'a> {
    shift: Shift,
    scan: &'a Scan,
    types: &'a [(Op, u32)],
    imports: &'a [(Op, u32)],
    imports_done: bool,
    /// Position of the next defined function body.
    body: usize,
    scratch: Vec<u32>,
}

impl Lowerer<'_> {
    fn add_imports(&mut self, s: &mut ImportSection) {
        for (&(op, _), &(_, ty)) in self.imports.iter().zip(self.types) {
            s.import(abi::IMPORT_MODULE, op.import(), EntityType::Function(ty));
        }
        self.imports_done = true;
    }
}

type ReError = reencode::Error<std::convert::Infallible>;

impl Reencode for Lowerer<'_> {
    type Error = std::convert::Infallible;

    fn function_index(&mut self, func: u32) -> std::result::Result<u32, ReError> {
        Ok(self.shift.forward(func))
    }

    fn parse_type_section(
        &mut self,
        types: &mut wasm_encoder::TypeSection,
        section: wasmparser::TypeSectionReader<'_>,
    ) -> std::result::Result<(), ReError> {
        reencode::utils::parse_type_section(self, types, section)?;
        for &(op, _) in self.types {
            types.ty().function(op.params().iter().copied(), [ValType::I32]);
        }
        Ok(())
    }

    fn parse_import_section(
        &mut self,
        imports: &mut ImportSection,
        section: wasmparser::ImportSectionReader<'_>,
    ) -> std::result::Result<(), ReError> {
        reencode::utils::parse_import_section(self, imports, section)?;
        self.add_imports(imports);
        Ok(())
    }

    /// A module without imports gets an import section for the new ones.
    fn intersperse_section_hook(
        &mut self,
        module: &mut Module,
        _after: Option<SectionId>,
        before: Option<SectionId>,
    ) -> std::result::Result<(), ReError> {
        if !self.imports_done && !matches!(before, Some(SectionId::Type | SectionId::Import | SectionId::Custom)) {
            let mut s = ImportSection::new();
            self.add_imports(&mut s);
            module.section(&s);
        }
        Ok(())
    }

    fn parse_function_body(
        &mut self,
        code: &mut wasm_encoder::CodeSection,
        func: wasmparser::FunctionBody<'_>,
    ) -> std::result::Result<(), ReError> {
        let mut ops = func.get_operators_reader()?;
        let mut has = false;
        while !ops.eof() {
            has |= Op::of(&ops.read()?).is_some();
        }
        let ty = self.scan.defined.get(self.body).copied().unwrap_or_default();
        let mut locals = self.scan.params.get(ty as usize).copied().unwrap_or_default();
        for l in func.get_locals_reader()? {
            locals += l?.0;
        }
        self.body += 1;
        self.scratch.push(if has { SCRATCH } else { 0 });
        let mut decls = Vec::new();
        for l in func.get_locals_reader()? {
            let (n, t) = l?;
            decls.push((n, self.val_type(t)?));
        }
        if has {
            // The scratch locals, after the function's own.
            decls.push((1, ValType::I32));
            decls.push((2, ValType::I64));
        }
        let mut f = wasm_encoder::Function::new(decls);
        let (small, time, wide) = (locals, locals + 1, locals + 2);
        let mut ops = func.get_operators_reader()?;
        while !ops.eof() {
            let op = ops.read()?;
            let Some((kind, offset)) = Op::of(&op) else {
                f.instruction(&self.instruction(op)?);
                continue;
            };
            let import = self.imports.iter().find(|(o, _)| *o == kind).map(|&(_, i)| i).unwrap_or_default();
            let value = if kind == Op::Wait64 { wide } else { small };
            let seq: Vec<I<'_>> = match kind {
                Op::Wait32 | Op::Wait64 => vec![
                    I::LocalSet(time),
                    I::LocalSet(value),
                    I::I64ExtendI32U,
                    I::I64Const(offset as i64),
                    I::I64Add,
                    I::LocalGet(value),
                    I::LocalGet(time),
                    I::Call(import),
                ],
                Op::Notify => vec![
                    I::LocalSet(small),
                    I::I64ExtendI32U,
                    I::I64Const(offset as i64),
                    I::I64Add,
                    I::LocalGet(small),
                    I::Call(import),
                ],
            };
            debug_assert_eq!(seq.len(), kind.len());
            for i in &seq {
                f.instruction(i);
            }
        }
        code.function(&f);
        Ok(())
    }
}

/// Walks the bodies of the original and the lowered module side by side,
/// pairing the offset of every body and instruction of the lowered one
/// with the original's. Also returns the lowered bodies' ends and the
/// original code section's offset.
fn bodies(wasm: &[u8]) -> Result<(Vec<wasmparser::FunctionBody<'_>>, u32)> {
    let mut out = Vec::new();
    let mut code = 0;
    for payload in Parser::new(0).parse_all(wasm) {
        match payload.map_err(invalid)? {
            Payload::CodeSectionStart { range, .. } => code = range.start as u32,
            Payload::CodeSectionEntry(b) => out.push(b),
            _ => {}
        }
    }
    Ok((out, code))
}

#[allow(clippy::type_complexity)]
fn match_offsets(original: &[u8], lowered: &[u8]) -> Result<(Vec<Vec<(u32, u32)>>, Vec<u32>, u32)> {
    let (orig, code) = bodies(original)?;
    let (low, _) = bodies(lowered)?;
    if orig.len() != low.len() {
        return Err(internal("the lowered module has another number of functions"));
    }
    let mut maps = Vec::with_capacity(orig.len());
    let mut ends = Vec::with_capacity(orig.len());
    for (o, l) in orig.iter().zip(&low) {
        let mut map = vec![(l.range().start as u32, o.range().start as u32)];
        let mut ro = o.get_operators_reader().map_err(invalid)?;
        let mut rl = l.get_operators_reader().map_err(invalid)?;
        while !ro.eof() {
            let at = ro.original_position() as u32;
            let n = Op::of(&ro.read().map_err(invalid)?).map_or(1, |(k, _)| k.len());
            for _ in 0..n {
                if rl.eof() {
                    return Err(internal("a lowered body ends early"));
                }
                map.push((rl.original_position() as u32, at));
                rl.read().map_err(invalid)?;
            }
        }
        if !rl.eof() {
            return Err(internal("a lowered body runs on"));
        }
        maps.push(map);
        ends.push(l.range().end as u32);
    }
    Ok((maps, ends, code))
}

impl Lowered {
    /// The lowering's import calls that are update points.
    pub fn blocking(&self) -> impl Iterator<Item = (String, String)> + '_ {
        self.imports
            .iter()
            .filter(|(op, _)| *op != Op::Notify)
            .map(|(op, _)| (abi::IMPORT_MODULE.to_string(), op.import().to_string()))
    }

    fn original(&self, defined: usize, at: u32) -> Result<u32> {
        let map = self.map.get(defined).ok_or_else(|| internal("no offsets of a lowered function"))?;
        map.binary_search_by_key(&at, |&(l, _)| l)
            .map(|i| map[i].1)
            .map_err(|_| internal("a resume point is at no instruction of the lowered module"))
    }

    /// Turns the metadata, which the rewrite wrote in terms of the lowered
    /// module, into the original's terms, and the runs of the offset map
    /// (whose functions are those of the output module) into runs back to
    /// the original.
    /// `bodies` are the output's function bodies, defined functions in
    /// order.
    pub fn translate(&self, meta: &mut Metadata, offsets: &mut OffsetMap, bodies: &[Vec<u8>]) -> Result<()> {
        let first = self.shift.first + self.shift.by;
        meta.code_section = self.original_code_section;
        meta.start = meta.start.map(|s| self.shift.back(s));
        meta.blocking.retain(|b| !self.imports.iter().any(|&(_, i)| i == b.func));
        for f in &mut meta.functions {
            let defined = (f.index - first) as usize;
            f.index = self.shift.back(f.index);
            let keep = f.locals.len() - self.scratch.get(defined).copied().unwrap_or_default() as usize;
            f.locals.truncate(keep);
            for rp in &mut f.resume_points {
                if rp.locals.iter().any(|&l| l as usize >= keep) {
                    return Err(internal("a frame saves a scratch local of the lowering"));
                }
                rp.offset = self.original(defined, rp.offset)?;
                match rp.kind {
                    ResumeKind::Call => rp.callee = self.shift.back(rp.callee),
                    ResumeKind::BlockingCall => {
                        if let Some(&(op, _)) = self.imports.iter().find(|&&(_, i)| i == rp.callee) {
                            rp.kind = ResumeKind::AtomicWait;
                            rp.callee = if op == Op::Wait64 { 64 } else { 32 };
                        }
                    }
                    _ => {}
                }
            }
        }
        let listed: HashMap<u32, Vec<(u32, u32)>> = std::mem::take(&mut offsets.functions).into_iter().collect();
        for (defined, map) in self.map.iter().enumerate() {
            let func = first + defined as u32;
            let end = self.ends[defined];
            // Runs of the rewrite into the lowered module; an uninstrumented
            // body is one run, a copy.
            let runs = listed.get(&func).ok_or_else(|| internal("a function without runs"))?;
            let body = bodies.get(defined).ok_or_else(|| internal("an output body is missing"))?;
            let mut out: Vec<(u32, u32)> = Vec::new();
            for (i, &(o, low)) in runs.iter().enumerate() {
                let limit = runs.get(i + 1).map_or(body.len(), |r| r.0 as usize);
                // The run's copy ends where inserted code starts: the
                // first byte that differs from the lowered module.
                let copied = body[o as usize..limit]
                    .iter()
                    .zip(&self.wasm[low as usize..end as usize])
                    .take_while(|(a, b)| a == b)
                    .count() as u32;
                let from = map.partition_point(|&(l, _)| l < low);
                for &(l, orig) in map[from..].iter().take_while(|&&(l, _)| l < low + copied.max(1)) {
                    let here = o + (l - low);
                    if let Some(&(po, porig)) = out.last() {
                        if here >= po && orig >= porig && here - po == orig - porig {
                            continue;
                        }
                    }
                    out.push((here, orig));
                }
            }
            offsets.functions.push((func, out));
        }
        Ok(())
    }
}

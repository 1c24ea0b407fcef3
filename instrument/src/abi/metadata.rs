//! The resume-point metadata: what it says, and its binary format in the
//! [`super::METADATA_SECTION`] custom section.
//!
//! Format, version [`super::METADATA_VERSION`]. `u32` is unsigned LEB128,
//! `str` is a `u32` length and UTF-8 bytes, `ty` is one byte (the wasm code
//! of a [`ValType`]), `opt<X>` is a byte 0 (absent) or 1 followed by `X`,
//! `vec<X>` is a `u32` count followed by the items.
//!
//! ```text
//! metadata   := version:u32                 ; must equal METADATA_VERSION, read first
//!               code_section:u32            ; offset of the original code section's payload
//!               memory                      ; the program memory, now imported
//!               state_global:u32            ; index of upstare_state
//!               funcref_table:opt<u32>      ; side table of funcref slots
//!               externref_table:opt<u32>    ; side table of externref slots
//!               start:opt<u32>              ; original start function
//!               blocking:vec<u32 str str>   ; blocking imports: function index, module, name
//!               globals:vec<u32 ty str>     ; mutable globals: index, type, export name
//!               data:vec<u32>               ; data segments that were active
//!               functions:vec<function>
//! memory     := original_import:opt<str str> min:u32 max:opt<u32> shared:u8
//! function   := index:u32 type:u32 locals:vec<ty> saved:vec<vec<u32>> resume_points:vec<rp>
//! rp         := kind:u8 offset:u32 callee:u32 ordinal:u32 slots:u32 live:u32 operands:vec<ty>
//! ```
//!
//! `saved` lists the distinct lists of locals the function's frames have
//! slots for or save values of (each in slot order, by local index); a
//! resume point names two of them by position: `slots`, the locals its
//! frame has a slot for, and `live`, those of them whose slot holds a
//! value (the others hold zero). Parsing expands them into
//! [`ResumePoint::slots`] and [`ResumePoint::locals`], and rejects a `live`
//! list that is not a subsequence of `slots`.
//!
//! Offsets are byte offsets in the ORIGINAL module file (subtract
//! `code_section` for the code-section-relative offsets DWARF uses).

use super::{ValType, METADATA_VERSION};
use crate::error::{Error, ErrorKind, Result};

/// What kind of instruction a resume point is, which also says which operands
/// its frame saves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResumeKind {
    /// A loop header. Operands: the whole stack at the header, the loop's
    /// params included. Rewinding completes here.
    Loop = 0,
    /// A direct call to a defined function. Operands: the stack below the
    /// call's arguments (the callee restores its own locals on rewind).
    Call = 1,
    /// A `call_indirect`. Operands: the whole stack, arguments and table index
    /// included, because the index picks the callee again on rewind and the
    /// callee may be a blocking import that runs again.
    CallIndirect = 2,
    /// A direct call to a blocking import. Operands: the whole stack,
    /// arguments included: rewinding calls the import again with them.
    /// Rewinding completes here, right before the call.
    BlockingCall = 3,
    /// The entry of a function that can call itself (directly or through
    /// others). Recursion without loops would otherwise never reach an
    /// update point. Operands: none. Rewinding completes here: the function
    /// starts over with its saved locals (its params).
    Entry = 4,
    /// A `memory.atomic.wait32` or `memory.atomic.wait64`, lowered to a call
    /// of the host's wait ([`super::futex`]). `callee` is the width of the
    /// value waited on, 32 or 64. Operands: the whole stack at the call,
    /// the import's arguments included (the effective address as an i64,
    /// the expected value, the timeout): rewinding waits again with them.
    /// Rewinding completes here, right before the call.
    AtomicWait = 5,
}

impl ResumeKind {
    fn from_u8(v: u8) -> Option<ResumeKind> {
        Some(match v {
            0 => ResumeKind::Loop,
            1 => ResumeKind::Call,
            2 => ResumeKind::CallIndirect,
            3 => ResumeKind::BlockingCall,
            4 => ResumeKind::Entry,
            5 => ResumeKind::AtomicWait,
            _ => return None,
        })
    }
}

/// One place where a frame of a function can be saved and resumed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResumePoint {
    /// Instruction kind.
    pub kind: ResumeKind,
    /// Offset of the instruction (`loop`, `call`, `call_indirect`, a wait) in the
    /// original module file; for [`ResumeKind::Entry`], of the function
    /// body (its local declarations).
    pub offset: u32,
    /// Callee function index, or type index for `call_indirect`; for a loop,
    /// the loop's block type index or `u32::MAX` if it has none.
    pub callee: u32,
    /// Position among the function's instructions of the same kind and callee
    /// (0-based, in code order, counting unreachable ones too): "the 2nd call
    /// to `f` in `g`", "the 3rd loop in `g`".
    pub ordinal: u32,
    /// The locals whose values its frame saves, in the order of their
    /// slots: those live at the point, which the rewind restores. Any other
    /// local needs no value there (the code writes it before reading it).
    pub locals: Vec<u32>,
    /// The locals its frame has a slot for, in slot order: [`Self::locals`]
    /// and, where the point shares its unwind code with points that save
    /// more, locals dead at this point, whose slots hold zero and mean
    /// nothing. A local in neither list has no slot.
    pub slots: Vec<u32>,
    /// Types of the saved operands, bottom of the stack first.
    pub operands: Vec<ValType>,
}

/// An instrumented function.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FunctionMeta {
    /// Function index (unchanged from the original module).
    pub index: u32,
    /// Its type index.
    pub type_index: u32,
    /// Types of all its original locals, params first.
    pub locals: Vec<ValType>,
    /// Its resume points in code order; frames refer to them by position.
    pub resume_points: Vec<ResumePoint>,
}

/// A mutable global exported for the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GlobalMeta {
    /// Global index (unchanged).
    pub index: u32,
    /// Its type.
    pub ty: ValType,
    /// The export name the instrumenter gave it.
    pub export: String,
}

/// A blocking import recognised in the module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockingImport {
    /// Function index of the import.
    pub func: u32,
    /// Import module name.
    pub module: String,
    /// Import field name.
    pub name: String,
}

/// A data segment that was active and is now applied by the init export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataSegmentMeta {
    /// Segment index (unchanged).
    pub index: u32,
}

/// The program memory, which the instrumented module imports.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MemoryMeta {
    /// The import it replaced, if the original imported its memory.
    pub original_import: Option<(String, String)>,
    /// Minimum pages.
    pub min: u32,
    /// Maximum pages.
    pub max: Option<u32>,
    /// Whether the original memory was shared (a threaded program); the
    /// import is shared either way.
    pub shared: bool,
}

impl MemoryMeta {
    /// The maximum the program memory import declares (see
    /// [`super::MEMORY_IMPORT`]).
    pub fn import_max(&self) -> u32 {
        self.max.unwrap_or(super::PROGRAM_MEMORY_MAX_PAGES)
    }
}

/// Everything the host needs to know about an instrumented module.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Metadata {
    /// Offset of the original code section's payload.
    pub code_section: u32,
    /// The program memory.
    pub memory: MemoryMeta,
    /// Index of the `upstare_state` global.
    pub state_global: u32,
    /// Index of the funcref side table, if any frame can hold a funcref.
    pub funcref_table: Option<u32>,
    /// Index of the externref side table, if any frame can hold an
    /// externref.
    pub externref_table: Option<u32>,
    /// The original start function, now exported as [`super::exports::START`].
    pub start: Option<u32>,
    /// Blocking imports found in the module.
    pub blocking: Vec<BlockingImport>,
    /// Mutable globals and their export names.
    pub globals: Vec<GlobalMeta>,
    /// Data segments applied by [`super::exports::INIT_MEMORY`].
    pub data: Vec<DataSegmentMeta>,
    /// Instrumented functions, by increasing index.
    pub functions: Vec<FunctionMeta>,
}

impl Metadata {
    /// The instrumented function with this index, if it is one.
    pub fn function(&self, index: u32) -> Option<&FunctionMeta> {
        self.functions
            .binary_search_by_key(&index, |f| f.index)
            .ok()
            .map(|i| &self.functions[i])
    }

    /// Serialises to the custom section payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer(Vec::new());
        w.u32(METADATA_VERSION);
        w.u32(self.code_section);
        match &self.memory.original_import {
            Some((m, n)) => {
                w.byte(1);
                w.str(m);
                w.str(n);
            }
            None => w.byte(0),
        }
        w.u32(self.memory.min);
        w.opt(self.memory.max, |w, v| w.u32(v));
        w.byte(self.memory.shared as u8);
        w.u32(self.state_global);
        w.opt(self.funcref_table, |w, v| w.u32(v));
        w.opt(self.externref_table, |w, v| w.u32(v));
        w.opt(self.start, |w, v| w.u32(v));
        w.vec(&self.blocking, |w, b| {
            w.u32(b.func);
            w.str(&b.module);
            w.str(&b.name);
        });
        w.vec(&self.globals, |w, g| {
            w.u32(g.index);
            w.byte(g.ty.code());
            w.str(&g.export);
        });
        w.vec(&self.data, |w, d| w.u32(d.index));
        w.vec(&self.functions, |w, f| {
            w.u32(f.index);
            w.u32(f.type_index);
            w.vec(&f.locals, |w, t| w.byte(t.code()));
            let mut sets: Vec<&[u32]> = Vec::new();
            let set_of: Vec<u32> = f
                .resume_points
                .iter()
                .flat_map(|rp| [rp.slots.as_slice(), rp.locals.as_slice()])
                .map(|list| match sets.iter().position(|s| *s == list) {
                    Some(i) => i as u32,
                    None => {
                        sets.push(list);
                        sets.len() as u32 - 1
                    }
                })
                .collect();
            w.vec(&sets, |w, s| w.vec(s, |w, l| w.u32(*l)));
            w.vec(&f.resume_points.iter().zip(set_of.chunks(2)).collect::<Vec<_>>(), |w, (rp, lists)| {
                w.byte(rp.kind as u8);
                w.u32(rp.offset);
                w.u32(rp.callee);
                w.u32(rp.ordinal);
                w.u32(lists[0]);
                w.u32(lists[1]);
                w.vec(&rp.operands, |w, t| w.byte(t.code()));
            });
        });
        w.0
    }

    /// Parses a custom section payload. Rejects any version other than
    /// [`METADATA_VERSION`] before reading anything else.
    pub fn parse(bytes: &[u8]) -> Result<Metadata> {
        let mut r = Reader { bytes, at: 0 };
        let version = r.u32()?;
        if version != METADATA_VERSION {
            return Err(Error::new(
                ErrorKind::Metadata,
                Some(0),
                format!(
                    "metadata version {version} is not the supported version {METADATA_VERSION}; \
                     instrument the module again with this version"
                ),
            ));
        }
        let code_section = r.u32()?;
        let original_import = match r.byte()? {
            0 => None,
            _ => Some((r.str()?, r.str()?)),
        };
        let memory = MemoryMeta {
            original_import,
            min: r.u32()?,
            max: r.opt(|r| r.u32())?,
            shared: r.byte()? != 0,
        };
        let state_global = r.u32()?;
        let funcref_table = r.opt(|r| r.u32())?;
        let externref_table = r.opt(|r| r.u32())?;
        let start = r.opt(|r| r.u32())?;
        let blocking = r.vec(|r| {
            Ok(BlockingImport {
                func: r.u32()?,
                module: r.str()?,
                name: r.str()?,
            })
        })?;
        let globals = r.vec(|r| {
            Ok(GlobalMeta {
                index: r.u32()?,
                ty: r.ty()?,
                export: r.str()?,
            })
        })?;
        let data = r.vec(|r| Ok(DataSegmentMeta { index: r.u32()? }))?;
        let functions = r.vec(|r| {
            let index = r.u32()?;
            let type_index = r.u32()?;
            let locals = r.vec(|r| r.ty())?;
            let sets = r.vec(|r| {
                let at = r.at;
                let set = r.vec(|r| r.u32())?;
                // Distinct locals of the function, or a frame would be read
                // with slots that mean other locals.
                let mut seen = vec![false; locals.len()];
                for &l in &set {
                    match seen.get_mut(l as usize) {
                        Some(s) if !*s => *s = true,
                        _ => return Err(r.error(at, "a list of saved locals repeats a local or names one the function does not have")),
                    }
                }
                Ok(set)
            })?;
            let resume_points = r.vec(|r| {
                let at = r.at;
                let kind = ResumeKind::from_u8(r.byte()?).ok_or_else(|| r.error(at, "unknown resume point kind"))?;
                let (offset, callee, ordinal) = (r.u32()?, r.u32()?, r.u32()?);
                let list = |r: &mut Reader| {
                    let at = r.at;
                    sets.get(r.u32()? as usize).ok_or_else(|| r.error(at, "unknown list of saved locals"))
                };
                let slots = list(r)?;
                let at = r.at;
                let locals = list(r)?;
                let mut rest = slots.iter();
                if !locals.iter().all(|l| rest.any(|s| s == l)) {
                    return Err(r.error(at, "a resume point saves the value of a local it has no slot for"));
                }
                let (slots, locals) = (slots.clone(), locals.clone());
                Ok(ResumePoint { kind, offset, callee, ordinal, locals, slots, operands: r.vec(|r| r.ty())? })
            })?;
            Ok(FunctionMeta { index, type_index, locals, resume_points })
        })?;
        if r.at != bytes.len() {
            return Err(r.error(r.at, "trailing bytes after the metadata"));
        }
        Ok(Metadata {
            code_section,
            memory,
            state_global,
            funcref_table,
            externref_table,
            start,
            blocking,
            globals,
            data,
            functions,
        })
    }

    /// Finds and parses the metadata section of an instrumented module.
    pub fn from_module(wasm: &[u8]) -> Result<Metadata> {
        for payload in wasmparser::Parser::new(0).parse_all(wasm) {
            let payload = payload.map_err(|e| Error::from_reader(ErrorKind::Invalid, e))?;
            if let wasmparser::Payload::CustomSection(c) = payload {
                if c.name() == super::METADATA_SECTION {
                    return Metadata::parse(c.data());
                }
            }
        }
        Err(Error::new(
            ErrorKind::Metadata,
            None,
            format!(
                "no `{}` custom section: the module was not instrumented by upstare-instrument",
                super::METADATA_SECTION
            ),
        ))
    }
}

/// Writes the LEB128 encodings the abi's custom sections are made of.
pub(crate) struct Writer(pub(crate) Vec<u8>);

impl Writer {
    fn byte(&mut self, b: u8) {
        self.0.push(b);
    }
    pub(crate) fn u32(&mut self, mut v: u32) {
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                self.0.push(b);
                return;
            }
            self.0.push(b | 0x80);
        }
    }
    fn str(&mut self, s: &str) {
        self.u32(s.len() as u32);
        self.0.extend_from_slice(s.as_bytes());
    }
    fn opt<T>(&mut self, v: Option<T>, f: impl FnOnce(&mut Self, T)) {
        match v {
            Some(v) => {
                self.byte(1);
                f(self, v);
            }
            None => self.byte(0),
        }
    }
    fn vec<T>(&mut self, items: &[T], mut f: impl FnMut(&mut Self, &T)) {
        self.u32(items.len() as u32);
        for item in items {
            f(self, item);
        }
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn error(&self, at: usize, message: &str) -> Error {
        Error::new(ErrorKind::Metadata, Some(at), message)
    }
    fn byte(&mut self) -> Result<u8> {
        let b = *self
            .bytes
            .get(self.at)
            .ok_or_else(|| self.error(self.at, "metadata ends early"))?;
        self.at += 1;
        Ok(b)
    }
    fn u32(&mut self) -> Result<u32> {
        let start = self.at;
        let mut v: u64 = 0;
        for shift in (0..35).step_by(7) {
            let b = self.byte()?;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return u32::try_from(v).map_err(|_| self.error(start, "integer too large"));
            }
        }
        Err(self.error(start, "integer too long"))
    }
    fn str(&mut self) -> Result<String> {
        let len = self.u32()? as usize;
        let start = self.at;
        let bytes = self
            .bytes
            .get(start..start + len)
            .ok_or_else(|| self.error(start, "metadata ends early"))?;
        self.at += len;
        String::from_utf8(bytes.to_vec()).map_err(|_| self.error(start, "name is not UTF-8"))
    }
    fn ty(&mut self) -> Result<ValType> {
        let at = self.at;
        ValType::from_code(self.byte()?).ok_or_else(|| self.error(at, "unknown value type"))
    }
    fn opt<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<Option<T>> {
        match self.byte()? {
            0 => Ok(None),
            _ => f(self).map(Some),
        }
    }
    fn vec<T>(&mut self, mut f: impl FnMut(&mut Self) -> Result<T>) -> Result<Vec<T>> {
        let n = self.u32()? as usize;
        // A count larger than the remaining bytes cannot be honest.
        if n > self.bytes.len() - self.at {
            return Err(self.error(self.at, "count larger than the metadata"));
        }
        (0..n).map(|_| f(self)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_point(locals: Vec<u32>, slots: Vec<u32>) -> Metadata {
        let rp = ResumePoint { kind: ResumeKind::Call, offset: 40, callee: 1, ordinal: 0, locals, slots, operands: vec![ValType::F64] };
        let f = FunctionMeta { index: 2, type_index: 0, locals: vec![ValType::I32; 4], resume_points: vec![rp] };
        Metadata { functions: vec![f], ..Metadata::default() }
    }

    #[test]
    fn a_frame_may_have_slots_for_locals_whose_values_it_does_not_save() {
        let meta = with_point(vec![1, 3], vec![0, 1, 3]);
        assert_eq!(Metadata::parse(&meta.encode()).expect("parses"), meta);
    }

    #[test]
    fn a_saved_value_without_a_slot_is_refused() {
        for (locals, slots) in [(vec![2], vec![0, 1]), (vec![3, 1], vec![1, 3])] {
            let err = Metadata::parse(&with_point(locals, slots).encode()).expect_err("refused");
            assert!(err.to_string().contains("no slot for"), "{err}");
        }
    }
}

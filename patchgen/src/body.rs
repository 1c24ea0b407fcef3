//! Decides whether a function is unchanged between two versions of a
//! program, whatever moved around it.
//!
//! A [`Fingerprint`] is the function's body bytes with every relocated field
//! blanked, plus what each field referred to, by name rather than by index
//! or address: adding a function or a global in front of others renumbers
//! and moves everything, but leaves the fingerprints of untouched functions
//! equal. String literals (`.L.str`, `.L.str.1`... whose numbers shift when a
//! literal is added earlier in the file) are identified by their bytes.
//!
//! [`shadow_frame_size`] reads the size of the frame a C function keeps in
//! linear memory, which the planner compares between versions.

use thiserror::Error;
use wasmparser::{BinaryReader, FunctionBody, Operator};

use crate::module::{FuncType, ModuleInfo, RelocType, SymbolTarget};

/// Why a function could not be fingerprinted.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum Error {
    /// The index names no function with a body.
    #[error("function {func} has no body in this module (an import or out of range: it has {count} functions)")]
    NoBody {
        /// The function index asked for.
        func: u32,
        /// Functions in the module.
        count: usize,
    },
    /// The body lies outside the bytes given.
    #[error("function {func}'s body lies beyond the module's {len} bytes: pass the bytes the ModuleInfo was read from")]
    Truncated {
        /// The function index.
        func: u32,
        /// Length of the bytes given.
        len: usize,
    },
    /// A relocation in the body names something the module does not have.
    #[error("relocation at code offset {offset} in function {func} names {what} {index}, which the module does not have")]
    Dangling {
        /// The function index.
        func: u32,
        /// Code offset of the field.
        offset: u32,
        /// What kind of thing it names.
        what: &'static str,
        /// The index it names.
        index: u32,
    },
}

/// What one relocated field of a body refers to, independent of layout.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Ref {
    /// A function called or named, by name.
    Function(String),
    /// A signature (`call_indirect`).
    Type(FuncType),
    /// A wasm global, by name.
    Global(String),
    /// A data object by name, whether it is local to its compile unit, and
    /// the addend (offset into the object).
    Data {
        /// Symbol name.
        name: String,
        /// Local (`static`) symbol.
        local: bool,
        /// Offset into the object.
        addend: i64,
    },
    /// A compiler-named read-only object (string literal), by content.
    Literal {
        /// The object's bytes.
        bytes: Vec<u8>,
        /// Offset into the object.
        addend: i64,
    },
    /// A table slot holding the named function (taking its address).
    TableSlot(String),
    /// A relocation naming a symbol of another kind, by type and name.
    Other(RelocType, String),
}

/// A function's identity across versions: equal fingerprints mean the same
/// code referring to the same things.
#[derive(PartialEq, Eq, Debug, Clone, Hash)]
pub struct Fingerprint {
    /// The function's signature.
    pub signature: FuncType,
    /// Body bytes (locals and code) with relocated fields zeroed.
    pub bytes: Vec<u8>,
    /// What each relocated field referred to, in code order.
    pub refs: Vec<Ref>,
}

/// Fingerprints function `func` of the module `wasm` described by `info`.
pub fn fingerprint(info: &ModuleInfo, wasm: &[u8], func: u32) -> Result<Fingerprint, Error> {
    let CodeFields { bytes, fields } = blank_fields(info, wasm, func, 0)?;
    let refs = fields.into_iter().map(|(_, r)| r).collect();
    let ty = info.functions[func as usize].ty;
    let signature = info
        .types
        .get(ty as usize)
        .cloned()
        .ok_or(Error::Dangling {
            func,
            offset: body_range(info, func)?.start,
            what: "type",
            index: ty,
        })?;
    Ok(Fingerprint {
        signature,
        bytes,
        refs,
    })
}

/// Offset of a function's first instruction from the start of its body
/// (the size of its local declarations).
pub fn code_start(info: &ModuleInfo, wasm: &[u8], func: u32) -> Result<u32, Error> {
    let body = body_range(info, func)?;
    let base = info.code_section as usize;
    let bytes = wasm
        .get(base + body.start as usize..base + body.end as usize)
        .ok_or(Error::Truncated { func, len: wasm.len() })?;
    let reader = wasmparser::FunctionBody::new(wasmparser::BinaryReader::new(bytes, 0));
    let ops = reader.get_operators_reader().map_err(|_| Error::Truncated { func, len: wasm.len() })?;
    Ok(ops.original_position() as u32)
}

/// A function's instructions with every relocated field blanked, and what
/// each field refers to.
pub struct CodeFields {
    /// The instruction bytes, relocated fields zeroed.
    pub bytes: Vec<u8>,
    /// Each relocated field, in code order: its offset in `bytes`, and what
    /// it names.
    pub fields: Vec<(u32, Ref)>,
}

/// The instructions of function `func` (after its local declarations),
/// relocated fields blanked and listed.
pub fn code_fields(info: &ModuleInfo, wasm: &[u8], func: u32) -> Result<CodeFields, Error> {
    let skip = code_start(info, wasm, func)?;
    blank_fields(info, wasm, func, skip)
}

/// The body of `func` from `skip` bytes in, fields blanked.
fn blank_fields(info: &ModuleInfo, wasm: &[u8], func: u32, skip: u32) -> Result<CodeFields, Error> {
    let mut body = body_range(info, func)?;
    body.start = body.start.saturating_add(skip).min(body.end);
    let start = info.code_section as usize + body.start as usize;
    let end = info.code_section as usize + body.end as usize;
    let mut bytes = wasm
        .get(start..end)
        .ok_or(Error::Truncated {
            func,
            len: wasm.len(),
        })?
        .to_vec();
    let first = info.code_relocs.partition_point(|r| r.offset < body.start);
    let mut fields = Vec::new();
    for r in info.code_relocs[first..]
        .iter()
        .take_while(|r| r.offset < body.end)
    {
        let field = r.field();
        let local = (field.start - body.start) as usize..(field.end - body.start) as usize;
        if let Some(b) = bytes.get_mut(local) {
            b.fill(0);
        }
        fields.push((field.start - body.start, reference(info, func, r)?));
    }
    Ok(CodeFields { bytes, fields })
}

fn body_range(info: &ModuleInfo, func: u32) -> Result<std::ops::Range<u32>, Error> {
    info.functions
        .get(func as usize)
        .and_then(|f| f.body.clone())
        .ok_or(Error::NoBody {
            func,
            count: info.functions.len(),
        })
}

fn reference(info: &ModuleInfo, func: u32, r: &crate::module::Reloc) -> Result<Ref, Error> {
    let dangling = |what, index| Error::Dangling {
        func,
        offset: r.offset,
        what,
        index,
    };
    if r.ty == RelocType::TypeIndexLeb {
        let ty = info
            .types
            .get(r.symbol as usize)
            .ok_or(dangling("type", r.symbol))?;
        return Ok(Ref::Type(ty.clone()));
    }
    let symbol = info
        .symbols
        .get(r.symbol as usize)
        .ok_or(dangling("symbol", r.symbol))?;
    let name = symbol.name.clone().unwrap_or_default();
    Ok(match (r.ty, symbol.target) {
        (RelocType::FunctionIndexLeb, SymbolTarget::Function(f)) => {
            Ref::Function(info.function_name(f))
        }
        (RelocType::TableIndexSleb, SymbolTarget::Function(f)) => {
            Ref::TableSlot(info.function_name(f))
        }
        (RelocType::GlobalIndexLeb, SymbolTarget::Global(g)) => {
            let global = info.globals.get(g as usize).ok_or(dangling("global", g))?;
            Ref::Global(global.name.clone().unwrap_or(name))
        }
        (RelocType::MemoryAddrLeb | RelocType::MemoryAddrSleb, SymbolTarget::Data(def)) => {
            let literal = def
                .filter(|_| symbol.is_local() && name.starts_with(".L"))
                .and_then(|d| {
                    let seg = info.segments.get(d.segment? as usize)?;
                    let at = d.offset as usize;
                    (!seg.writable)
                        .then(|| seg.init.get(at..at + d.size as usize))
                        .flatten()
                });
            match literal {
                Some(bytes) => Ref::Literal {
                    bytes: bytes.to_vec(),
                    addend: r.addend,
                },
                None => Ref::Data {
                    name,
                    local: symbol.is_local(),
                    addend: r.addend,
                },
            }
        }
        (ty, _) => Ref::Other(ty, name),
    })
}

/// The size N of the frame function `func` keeps in linear memory, when its
/// body begins `global.get $__stack_pointer; i32.const N; i32.sub;
/// local.tee|local.set`; `None` otherwise (or when the body cannot be read).
pub fn shadow_frame_size(info: &ModuleInfo, wasm: &[u8], func: u32) -> Option<u32> {
    let body = body_range(info, func).ok()?;
    let start = info.code_section as usize + body.start as usize;
    let end = info.code_section as usize + body.end as usize;
    let reader = FunctionBody::new(BinaryReader::new(wasm.get(start..end)?, start));
    let mut ops = reader.get_operators_reader().ok()?;
    let Operator::GlobalGet { global_index } = ops.read().ok()? else {
        return None;
    };
    let global = info.globals.get(global_index as usize)?;
    if global.name.as_deref() != Some("__stack_pointer") {
        return None;
    }
    let Operator::I32Const { value } = ops.read().ok()? else {
        return None;
    };
    let Operator::I32Sub = ops.read().ok()? else {
        return None;
    };
    match ops.read().ok()? {
        Operator::LocalTee { .. } | Operator::LocalSet { .. } => u32::try_from(value).ok(),
        _ => None,
    }
}

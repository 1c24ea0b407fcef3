//! Which wasm locals of a function may still be read from a given
//! instruction on: the locals an update must fill when it builds the new
//! version's frame at a resume point. A local that every path from the
//! resume point writes before reading needs no value.
//!
//! The analysis is the instrumenter's ([`upstare_instrument::liveness`]),
//! the one that decides which locals a frame saves, so the two never
//! disagree; this module finds a function's body in a module by index and
//! names the function in errors. On which side it errs: towards "live",
//! see there.

use upstare_instrument::liveness::{self as shared, Liveness};
use wasmparser::{BinaryReaderError, CompositeInnerType, Encoding, FunctionBody, Parser, Payload};

pub use upstare_instrument::liveness::{leaves_from_calls, FlowGraph};

/// Why liveness could not be computed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The module could not be parsed.
    #[error("malformed wasm module: {0} (is the input a core wasm module?)")]
    Parse(#[from] BinaryReaderError),
    /// The input is a component, not a core module.
    #[error("the input is a wasm component; liveness needs a core module")]
    Component,
    /// The function index names an imported function, which has no body.
    #[error("function {func} is imported (the module imports {imported} functions); pass a defined function's index")]
    Imported {
        /// The requested function index.
        func: u32,
        /// How many functions the module imports.
        imported: u32,
    },
    /// The function index is past the last defined function.
    #[error("function {func} does not exist: the module has {total} functions, imports included")]
    NoSuchFunction {
        /// The requested function index.
        func: u32,
        /// Imported plus defined functions.
        total: u32,
    },
    /// A code offset does not start an instruction of the function's body.
    #[error("code offset {offset:#x} is not the start of an instruction of function {func} (its body spans code offsets {start:#x}..{end:#x})")]
    NotAnInstruction {
        /// The requested function index.
        func: u32,
        /// The offending offset, relative to the code section payload.
        offset: u32,
        /// First byte of the function body, relative to the code section payload.
        start: u32,
        /// One past the last byte of the body.
        end: u32,
    },
    /// The function declares more locals than wasm allows.
    #[error("function {func} declares {count} locals, more than the {limit} wasm allows")]
    TooManyLocals {
        /// The requested function index.
        func: u32,
        /// Parameters plus declared locals.
        count: u64,
        /// The limit.
        limit: u32,
    },
    /// The body's structure is broken (a branch past the outermost label, an
    /// unmatched `else` or `end`, an unknown local, ...).
    #[error("function {func} is malformed at code offset {offset:#x}: {reason} (does the module validate?)")]
    Malformed {
        /// The requested function index.
        func: u32,
        /// Where, relative to the code section payload.
        offset: u32,
        /// What is wrong.
        reason: &'static str,
    },
}

/// Locals of defined function `func` (function index space, imports
/// included) that may be read before being written on some path that starts
/// by executing the instruction at `code_offset` (relative to the code
/// section payload, pointing at the first byte of an instruction of that
/// function's body). Parameters are locals `0..n`. Returns one bool per local
/// (parameters, then declared locals).
pub fn live_at(wasm: &[u8], func: u32, code_offset: u32) -> Result<Vec<bool>, Error> {
    let mut all = live_at_many(wasm, func, &[code_offset])?;
    Ok(all.pop().unwrap_or_default())
}

/// [`live_at`] for many offsets of one function, analysing the body once.
/// The result has one entry per offset, in the same order.
pub fn live_at_many(wasm: &[u8], func: u32, code_offsets: &[u32]) -> Result<Vec<Vec<bool>>, Error> {
    let analysis = analyse(wasm, func)?;
    let span = analysis.span();
    code_offsets
        .iter()
        .map(|&offset| {
            analysis.live_at(offset).ok_or(Error::NotAnInstruction { func, offset, start: span.start, end: span.end })
        })
        .collect()
}

/// The basic blocks of defined function `func`; `None` if the body uses
/// control flow the analysis does not model.
pub(crate) fn flow_graph(wasm: &[u8], func: u32) -> Result<Option<FlowGraph>, Error> {
    Ok(analyse(wasm, func)?.into_flow_graph())
}

/// The liveness of defined function `func`, offsets relative to the code
/// section payload.
fn analyse(wasm: &[u8], func: u32) -> Result<Liveness, Error> {
    let located = locate(wasm, func)?;
    Liveness::new(&located.body, located.params, located.code_start).map_err(|e| match e {
        shared::Error::Parse(e) => Error::Parse(e),
        shared::Error::TooManyLocals { count, limit } => Error::TooManyLocals { func, count, limit },
        shared::Error::Malformed { offset, reason } => Error::Malformed { func, offset, reason },
    })
}

/// The body of the requested function and what is needed to read it.
struct Located<'a> {
    body: FunctionBody<'a>,
    params: u32,
    /// Absolute offset of the code section payload in the module.
    code_start: usize,
}

/// Finds the body and parameter count of defined function `func`.
fn locate(wasm: &[u8], func: u32) -> Result<Located<'_>, Error> {
    // Parameter count of each type index; `None` for non-function types.
    let mut type_params: Vec<Option<u32>> = Vec::new();
    let mut imported = 0u32;
    let mut func_types: Vec<u32> = Vec::new();
    let mut code_start = 0usize;
    let mut defined_seen = 0u32;
    for payload in Parser::new(0).parse_all(wasm) {
        match payload? {
            Payload::Version { encoding: Encoding::Component, .. } => return Err(Error::Component),
            Payload::TypeSection(reader) => {
                for group in reader {
                    for sub in group?.into_types() {
                        type_params.push(match &sub.composite_type.inner {
                            CompositeInnerType::Func(f) => Some(f.params().len() as u32),
                            _ => None,
                        });
                    }
                }
            }
            Payload::ImportSection(reader) => {
                for import in reader.into_imports() {
                    if let wasmparser::TypeRef::Func(_) | wasmparser::TypeRef::FuncExact(_) = import?.ty {
                        imported += 1;
                    }
                }
            }
            Payload::FunctionSection(reader) => {
                for ty in reader {
                    func_types.push(ty?);
                }
            }
            Payload::CodeSectionStart { range, .. } => {
                code_start = range.start;
                if func < imported {
                    return Err(Error::Imported { func, imported });
                }
            }
            Payload::CodeSectionEntry(body) => {
                if imported + defined_seen == func {
                    let params = func_types
                        .get(defined_seen as usize)
                        .and_then(|&ty| type_params.get(ty as usize).copied().flatten())
                        .ok_or(Error::Malformed {
                            func,
                            offset: (body.range().start - code_start) as u32,
                            reason: "the function's type is missing or not a function type",
                        })?;
                    return Ok(Located { body, params, code_start });
                }
                defined_seen += 1;
            }
            _ => {}
        }
    }
    if func < imported {
        return Err(Error::Imported { func, imported });
    }
    Err(Error::NoSuchFunction { func, total: imported + defined_seen })
}


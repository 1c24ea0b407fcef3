//! Where the original code sits in an instrumented module, so the host can
//! map an instruction of the output (a trap, a profile sample) back to the
//! original module, whose DWARF describes it.
//!
//! Custom section [`SECTION`], format (LEB128 `u32`s, as in
//! [`super::metadata`]):
//!
//! ```text
//! offsets  := version:u32 functions:vec<function>
//! function := index:u32 runs:vec<out:u32 orig:u32>
//! ```
//!
//! Functions are named by their index in the output module, which is not
//! their index in the original: the instrumenter's own functions come
//! first (and imports for atomic waits may come before them). Every
//! function of the original is listed, the instrumenter's are not. A run
//! says that from byte `out` of the function's output body (counted from
//! the start of its local declarations) the original instruction at module
//! offset `orig` was copied, followed by the next ones as long as no other
//! run starts. Inserted code belongs to the run before it.

use super::METADATA_VERSION;
use crate::error::{Error, ErrorKind, Result};

/// Name of the custom section.
pub const SECTION: &str = "upstare.offsets";

/// The runs of copied code of every function of the original.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OffsetMap {
    /// (function index, runs in increasing output order).
    pub functions: Vec<(u32, Vec<(u32, u32)>)>,
}

impl OffsetMap {
    /// The original module offset of byte `out` of the output body of
    /// function `func`; `None` if the function is not listed (the
    /// instrumenter added it) or `out` lies before its first run.
    pub fn original(&self, func: u32, out: u32) -> Option<u32> {
        let i = self.functions.binary_search_by_key(&func, |(f, _)| *f).ok()?;
        let runs = &self.functions[i].1;
        let k = runs.partition_point(|&(o, _)| o <= out).checked_sub(1)?;
        let (o, orig) = runs[k];
        Some(orig + (out - o))
    }

    /// Serialises to the custom section payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = super::metadata::Writer(Vec::new());
        out.u32(METADATA_VERSION);
        out.u32(self.functions.len() as u32);
        for (func, runs) in &self.functions {
            out.u32(*func);
            out.u32(runs.len() as u32);
            for &(o, orig) in runs {
                out.u32(o);
                out.u32(orig);
            }
        }
        out.0
    }

    /// Parses the custom section payload.
    pub fn parse(bytes: &[u8]) -> Result<OffsetMap> {
        let mut r = wasmparser::BinaryReader::new(bytes, 0);
        let bad = |e: wasmparser::BinaryReaderError| Error::from_reader(ErrorKind::Metadata, e);
        let version = r.read_var_u32().map_err(bad)?;
        if version != METADATA_VERSION {
            return Err(Error::new(
                ErrorKind::Metadata,
                Some(0),
                format!("offset map version {version}, this host reads version {METADATA_VERSION}"),
            ));
        }
        let mut functions = Vec::new();
        for _ in 0..r.read_var_u32().map_err(bad)? {
            let func = r.read_var_u32().map_err(bad)?;
            let n = r.read_var_u32().map_err(bad)?;
            if n as usize > r.bytes_remaining() {
                return Err(Error::new(ErrorKind::Metadata, Some(r.original_position()), "count larger than the section"));
            }
            let mut runs = Vec::with_capacity(n as usize);
            for _ in 0..n {
                runs.push((r.read_var_u32().map_err(bad)?, r.read_var_u32().map_err(bad)?));
            }
            functions.push((func, runs));
        }
        Ok(OffsetMap { functions })
    }

    /// Finds and parses the section in an instrumented module.
    pub fn from_module(wasm: &[u8]) -> Result<OffsetMap> {
        for payload in wasmparser::Parser::new(0).parse_all(wasm) {
            let payload = payload.map_err(|e| Error::from_reader(ErrorKind::Invalid, e))?;
            if let wasmparser::Payload::CustomSection(c) = payload {
                if c.name() == SECTION {
                    return OffsetMap::parse(c.data());
                }
            }
        }
        Err(Error::new(ErrorKind::Metadata, None, format!("no `{SECTION}` custom section")))
    }
}

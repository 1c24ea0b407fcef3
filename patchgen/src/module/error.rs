//! Errors of the module reader: what in the input module is missing or
//! malformed, and how to rebuild it so that it can be read.

use thiserror::Error;

/// Why a module could not be described.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum Error {
    /// wasmparser refused the bytes.
    #[error("the module is not valid wasm: {0}")]
    Invalid(#[from] wasmparser::BinaryReaderError),
    /// The module was linked without `--emit-relocs`.
    #[error("the module has no `linking` section: build it with bin/upstare-cc, which links with -Wl,--emit-relocs")]
    NoLinking,
    /// The `linking` section has a version this reader does not know.
    #[error("the module's `linking` section has version {0}, expected 2: rebuild it with clang-19 (bin/upstare-cc)")]
    LinkingVersion(u32),
    /// The module has code but no code relocations.
    #[error("the module has no `reloc.CODE` section: build it with bin/upstare-cc, which links with -Wl,--emit-relocs")]
    NoCodeRelocs,
    /// A relocation entry has a type number this reader does not know.
    #[error("section `{section}` has a relocation of unknown type {ty}: rebuild with clang-19 (bin/upstare-cc)")]
    UnknownRelocType {
        /// Name of the custom section holding the entry.
        section: String,
        /// The type byte read.
        ty: u8,
    },
    /// A relocation section names a section that does not exist.
    #[error("section `{section}` relocates section {target}, which the module does not have")]
    RelocTarget {
        /// Name of the custom section.
        section: String,
        /// The section index it names.
        target: u32,
    },
    /// A relocation names a symbol beyond the symbol table.
    #[error("section `{section}` names symbol {symbol}, but the `linking` section has only {count} symbols")]
    RelocSymbol {
        /// Name of the custom section.
        section: String,
        /// The symbol index it names.
        symbol: u32,
        /// Symbols in the table.
        count: usize,
    },
    /// A relocated field lies outside the section it patches.
    #[error("section `{section}` relocates bytes {offset}..{end} beyond its target's {len} bytes")]
    RelocOutside {
        /// Name of the custom section.
        section: String,
        /// Field start, relative to the target section's payload.
        offset: u32,
        /// Field end.
        end: u64,
        /// Payload length of the target.
        len: u32,
    },
    /// A data symbol points at a segment that does not exist or past its end.
    #[error("data symbol `{name}` lies at {offset}+{size} in segment {segment}, outside the module's data segments")]
    SymbolOutside {
        /// The symbol's name.
        name: String,
        /// Its segment index.
        segment: u32,
        /// Its offset in the segment.
        offset: u32,
        /// Its size.
        size: u32,
    },
    /// Segment info and the data section disagree.
    #[error("data segment {index} (`{name}`) has no address: its data segment is not an active i32.const segment of memory 0")]
    SegmentAddress {
        /// Output segment index.
        index: u32,
        /// Its name from the segment info.
        name: String,
    },
    /// A feature this reader does not handle (memory64, multiple memories...).
    #[error("the module uses {0}, which patchgen does not handle (wasm32 with one memory only)")]
    Unsupported(&'static str),
}

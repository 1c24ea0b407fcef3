//! The `linking` custom section (symbol table, segment info) and the
//! `reloc.CODE` / `reloc.DATA` sections of a module linked with
//! `--emit-relocs`, and the data segment addresses they resolve to.

use std::ops::Range;

use wasmparser::{BinaryReader, Linking, LinkingSectionReader, SymbolInfo};

use super::{Error, ModuleInfo, Segment, FLAG_ABSOLUTE, FLAG_LOCAL, FLAG_TLS, FLAG_UNDEFINED};

/// The symbol index wasm-ld gives a relocation whose symbol is not in the
/// output's symbol table.
const UNRESOLVED_SYMBOL: u32 = u32::MAX;

/// Relocation types, as numbered by the tool conventions (`R_WASM_*`).
pub type RelocType = wasmparser::RelocationType;

/// One relocation entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reloc {
    /// What the field holds and how it is encoded.
    pub ty: RelocType,
    /// Field position, relative to the target section's payload.
    pub offset: u32,
    /// Index into [`ModuleInfo::symbols`].
    pub symbol: u32,
    /// Added to a memory address (0 for types without an addend).
    pub addend: i64,
}

impl Reloc {
    /// Bytes the relocated field spans.
    pub fn field(&self) -> Range<u32> {
        self.offset..self.offset + self.ty.extent() as u32
    }
}

/// Kind of a symbol, as numbered in the symbol table subsection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SymbolKind {
    /// A function (0).
    Function,
    /// A data object (1).
    Data,
    /// A wasm global (2).
    Global,
    /// A section, for debug-info relocations (3).
    Section,
    /// An exception tag (4).
    Tag,
    /// A table (5).
    Table,
}

/// Where a defined data symbol lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataDef {
    /// Output segment index; `None` for an absolute symbol.
    pub segment: Option<u32>,
    /// Offset in the segment (for an absolute symbol, its address).
    pub offset: u32,
    /// Size in bytes.
    pub size: u32,
    /// Address in linear memory.
    pub address: u32,
}

/// What a symbol refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SymbolTarget {
    /// A function index.
    Function(u32),
    /// A global index.
    Global(u32),
    /// A section index.
    Section(u32),
    /// A tag index.
    Tag(u32),
    /// A table index.
    Table(u32),
    /// A data object; `None` when undefined.
    Data(Option<DataDef>),
}

/// One entry of the symbol table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Symbol {
    /// The symbol's kind.
    pub kind: SymbolKind,
    /// `WASM_SYM_*` flags (see the `FLAG_*` constants).
    pub flags: u32,
    /// The symbol's name, when the table carries one.
    pub name: Option<String>,
    /// What it refers to.
    pub target: SymbolTarget,
}

impl Symbol {
    /// Local to its compile unit (`static`, string literals).
    pub fn is_local(&self) -> bool {
        self.flags & FLAG_LOCAL != 0
    }

    /// Defined in this module (not an import).
    pub fn is_defined(&self) -> bool {
        self.flags & FLAG_UNDEFINED == 0
    }

    /// An absolute data symbol (`__heap_base`).
    pub fn is_absolute(&self) -> bool {
        self.flags & FLAG_ABSOLUTE != 0
    }

    /// A thread-local variable (`_Thread_local`, `errno` in a threads
    /// build): every thread has its own copy at this offset of its block.
    pub fn is_thread_local(&self) -> bool {
        self.flags & FLAG_TLS != 0
    }

    /// The function, global, tag, table or section index it names.
    pub fn index(&self) -> Option<u32> {
        match self.target {
            SymbolTarget::Function(i)
            | SymbolTarget::Global(i)
            | SymbolTarget::Section(i)
            | SymbolTarget::Tag(i)
            | SymbolTarget::Table(i) => Some(i),
            SymbolTarget::Data(_) => None,
        }
    }

    /// Where a defined data symbol lives.
    pub fn data(&self) -> Option<&DataDef> {
        match &self.target {
            SymbolTarget::Data(d) => d.as_ref(),
            _ => None,
        }
    }
}

/// Sections gathered during the pass, resolved once it is over.
#[derive(Default)]
pub(super) struct Raw {
    pub section_ranges: Vec<Range<u32>>,
    pub code_section_index: Option<u32>,
    pub data_section_index: Option<u32>,
    pub linking: Option<(Vec<u8>, usize)>,
    pub relocs: Vec<(String, Vec<u8>, usize)>,
    /// (address of an active segment, initial bytes, file range).
    pub data_segments: Vec<(Option<u32>, Vec<u8>, Range<u32>)>,
}

struct SegmentInfo {
    name: String,
    align: u32,
}

/// Fills symbols, segments and relocations of `info` from `raw`.
pub(super) fn read(info: &mut ModuleInfo, raw: Raw) -> Result<(), Error> {
    let (bytes, offset) = raw.linking.as_ref().ok_or(Error::NoLinking)?;
    let reader = LinkingSectionReader::new(BinaryReader::new(bytes, *offset))?;
    if reader.version() != 2 {
        return Err(Error::LinkingVersion(reader.version()));
    }
    let mut seg_info = Vec::new();
    let mut symbols = Vec::new();
    for sub in reader.subsections() {
        match sub? {
            Linking::SegmentInfo(map) => {
                for s in map {
                    let s = s?;
                    seg_info.push(SegmentInfo {
                        name: s.name.to_string(),
                        align: s.alignment,
                    });
                }
            }
            Linking::SymbolTable(map) => {
                for s in map {
                    symbols.push(symbol(s?));
                }
            }
            _ => {}
        }
    }
    info.segments = segments(&seg_info, &raw.data_segments, &symbols)?;
    for s in &mut symbols {
        resolve_address(s, &info.segments)?;
        let address = s.data().map(|d| d.address);
        match s.name.as_deref() {
            Some("__heap_base") => info.heap_base = address,
            Some("__data_end") => info.data_end = address,
            _ => {}
        }
    }
    for (i, g) in info.globals.iter_mut().enumerate() {
        if g.name.is_none() {
            g.name = symbols.iter().find_map(|s| match s.target {
                SymbolTarget::Global(idx) if idx as usize == i => s.name.clone(),
                _ => None,
            });
        }
    }
    for s in &symbols {
        if let (SymbolTarget::Function(idx), Some(name)) = (s.target, &s.name) {
            if let Some(f) = info.functions.get_mut(idx as usize) {
                if f.body.is_some() || f.name.is_none() {
                    f.name.get_or_insert_with(|| name.clone());
                }
            }
        }
    }
    info.symbols = symbols;
    // Only code and data relocations are read: debug sections' entries may
    // name discarded symbols (index -1) and nothing here patches DWARF.
    for (name, bytes, offset) in &raw.relocs {
        let target = BinaryReader::new(bytes, *offset).read_var_u32()?;
        if Some(target) != raw.code_section_index && Some(target) != raw.data_section_index {
            continue;
        }
        let (target, relocs) = relocations(name, bytes, *offset, info.symbols.len())?;
        let len = raw
            .section_ranges
            .get(target as usize)
            .ok_or_else(|| Error::RelocTarget {
                section: name.clone(),
                target,
            })?
            .len() as u32;
        if let Some(r) = relocs
            .iter()
            .find(|r| r.offset as u64 + r.ty.extent() as u64 > len as u64)
        {
            return Err(Error::RelocOutside {
                section: name.clone(),
                offset: r.offset,
                end: r.offset as u64 + r.ty.extent() as u64,
                len,
            });
        }
        let mut relocs = relocs;
        relocs.sort_by_key(|r| r.offset);
        if Some(target) == raw.code_section_index {
            info.code_relocs = relocs;
        } else if Some(target) == raw.data_section_index {
            info.data_relocs = relocs;
        }
    }
    if raw.code_section_index.is_some()
        && !raw.relocs.iter().any(|r| r.0 == "reloc.CODE")
        && info.code_relocs.is_empty()
    {
        return Err(Error::NoCodeRelocs);
    }
    Ok(())
}

fn symbol(s: SymbolInfo<'_>) -> Symbol {
    let named = |kind, flags: wasmparser::SymbolFlags, name: Option<&str>, target| Symbol {
        kind,
        flags: flags.bits(),
        name: name.map(str::to_string),
        target,
    };
    match s {
        SymbolInfo::Func { flags, index, name } => named(
            SymbolKind::Function,
            flags,
            name,
            SymbolTarget::Function(index),
        ),
        SymbolInfo::Global { flags, index, name } => {
            named(SymbolKind::Global, flags, name, SymbolTarget::Global(index))
        }
        SymbolInfo::Event { flags, index, name } => {
            named(SymbolKind::Tag, flags, name, SymbolTarget::Tag(index))
        }
        SymbolInfo::Table { flags, index, name } => {
            named(SymbolKind::Table, flags, name, SymbolTarget::Table(index))
        }
        SymbolInfo::Section { flags, section } => named(
            SymbolKind::Section,
            flags,
            None,
            SymbolTarget::Section(section),
        ),
        SymbolInfo::Data {
            flags,
            name,
            symbol,
        } => {
            let def = symbol.map(|d| DataDef {
                segment: Some(d.index),
                offset: d.offset,
                size: d.size,
                address: 0,
            });
            named(SymbolKind::Data, flags, Some(name), SymbolTarget::Data(def))
        }
    }
}

/// Output segments with addresses. wasm-ld writes one data segment per
/// output segment in segment-info order, except that zero-filled segments at
/// the end (`.bss`) get none when memory is not imported: those start where
/// the previous segment ends, aligned, and extend over their symbols.
fn segments(
    seg_info: &[SegmentInfo],
    data: &[(Option<u32>, Vec<u8>, Range<u32>)],
    symbols: &[Symbol],
) -> Result<Vec<Segment>, Error> {
    if data.len() > seg_info.len() {
        return Err(Error::Unsupported(
            "more data segments than the segment info names",
        ));
    }
    let mut out: Vec<Segment> = Vec::with_capacity(seg_info.len());
    for (index, s) in seg_info.iter().enumerate() {
        let writable = !s.name.starts_with(".rodata");
        let align = s.align.min(31);
        let segment = match data.get(index) {
            Some((address, bytes, file)) => Segment {
                name: s.name.clone(),
                address: address.ok_or_else(|| Error::SegmentAddress {
                    index: index as u32,
                    name: s.name.clone(),
                })?,
                size: bytes.len() as u32,
                align,
                writable,
                init: bytes.clone(),
                file_range: Some(file.clone()),
            },
            None => {
                let end = out.last().map_or(0, |p| p.address.saturating_add(p.size));
                let mask = (1u32 << align) - 1;
                let size = symbols
                    .iter()
                    .filter_map(|sym| sym.data())
                    .filter(|d| d.segment == Some(index as u32))
                    .map(|d| d.offset.saturating_add(d.size))
                    .max()
                    .unwrap_or(0);
                Segment {
                    name: s.name.clone(),
                    address: end.saturating_add(mask) & !mask,
                    size,
                    align,
                    writable,
                    init: Vec::new(),
                    file_range: None,
                }
            }
        };
        out.push(segment);
    }
    Ok(out)
}

fn resolve_address(s: &mut Symbol, segments: &[Segment]) -> Result<(), Error> {
    let absolute = s.is_absolute();
    let name = s.name.clone().unwrap_or_default();
    let SymbolTarget::Data(Some(d)) = &mut s.target else {
        return Ok(());
    };
    if absolute {
        d.segment = None;
        d.address = d.offset;
        return Ok(());
    }
    let segment = d.segment.unwrap_or(u32::MAX);
    let outside = || Error::SymbolOutside {
        name: name.clone(),
        segment,
        offset: d.offset,
        size: d.size,
    };
    let seg = segments.get(segment as usize).ok_or_else(outside)?;
    if d.offset as u64 + d.size as u64 > seg.size as u64 {
        return Err(outside());
    }
    d.address = seg.address + d.offset;
    Ok(())
}

/// Reads one `reloc.*` section: its target section index and entries.
fn relocations(
    name: &str,
    bytes: &[u8],
    offset: usize,
    symbols: usize,
) -> Result<(u32, Vec<Reloc>), Error> {
    let mut r = BinaryReader::new(bytes, offset);
    let target = r.read_var_u32()?;
    let count = r.read_var_u32()?;
    let mut out = Vec::with_capacity(count.min(1 << 20) as usize);
    for _ in 0..count {
        let byte = r.read_u8()?;
        let ty = RelocType::try_from(byte).map_err(|()| Error::UnknownRelocType {
            section: name.to_string(),
            ty: byte,
        })?;
        let offset = r.read_var_u32()?;
        let symbol = r.read_var_u32()?;
        let addend = match ty.addend_kind() {
            wasmparser::RelocAddendKind::None => 0,
            wasmparser::RelocAddendKind::Addend32 => r.read_var_i32()? as i64,
            wasmparser::RelocAddendKind::Addend64 => r.read_var_i64()?,
        };
        // wasm-ld writes index -1 for a symbol it left out of the output's
        // symbol table: an undefined weak one, whose address it resolved to
        // null (plus the addend) for good. Nothing moves it, so nothing
        // relinks it.
        if symbol == UNRESOLVED_SYMBOL && !matches!(ty, RelocType::TypeIndexLeb) {
            continue;
        }
        if symbol as usize >= symbols && !matches!(ty, RelocType::TypeIndexLeb) {
            return Err(Error::RelocSymbol {
                section: name.to_string(),
                symbol,
                count: symbols,
            });
        }
        out.push(Reloc {
            ty,
            offset,
            symbol,
            addend,
        });
    }
    Ok((target, out))
}

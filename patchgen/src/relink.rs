//! Relinks a module against a layout chosen by the update planner: data
//! symbols at the addresses the running program already uses, functions in
//! the table slots its function pointers already hold.
//!
//! Nothing moves in the code: with `--emit-relocs` every relocated operand is
//! a 5-byte padded LEB (or a 4-byte word in data), so relinking rewrites
//! those fields in place at the same width and code offsets stay valid for
//! DWARF and the instrumenter's metadata. Only the table's limits and the
//! element section are re-encoded. Function, type and global indices are
//! left alone: the new module keeps its own index spaces.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;

use thiserror::Error;
use wasm_encoder::{
    ConstExpr, ElementSection, Elements, HeapType, RefType, TableSection, TableType,
};
use wasmparser::{ElementKind, Parser, Payload, TableInit};

use crate::module::{ModuleInfo, Reloc, RelocType, SymbolTarget};

/// Where the new version's data and functions go.
#[derive(Debug, Clone, Default)]
pub struct Placement {
    /// Final address of every defined DATA symbol (by symbol index in the new
    /// module); symbols absent from the map keep their own address.
    pub data: HashMap<u32, u32>,
    /// Final table: slot -> function index (in the new module). Slots not
    /// listed are empty (ref.null).
    pub table: BTreeMap<u32, u32>,
    /// Function exports to point at another function: export name ->
    /// function index. Exports not listed stay as they are.
    pub exports: HashMap<String, u32>,
    /// Function exports to add: (name, function index).
    pub added_exports: Vec<(String, u32)>,
}

/// Why a module could not be relinked.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum Error {
    /// wasmparser refused the module.
    #[error("the module to relink is not valid wasm: {0}")]
    Invalid(#[from] wasmparser::BinaryReaderError),
    /// A relocation names a function that the placement gives no slot.
    #[error("function `{name}` (index {func}) is referenced as a pointer but the placement gives it no table slot")]
    NoSlot {
        /// The function's name.
        name: String,
        /// Its index.
        func: u32,
    },
    /// A relocation of a kind that needs a symbol of another kind.
    #[error("relocation at {offset} ({ty:?}) names symbol {symbol}, which is not a {expected}")]
    WrongSymbol {
        /// Field offset in its section.
        offset: u32,
        /// Relocation type.
        ty: RelocType,
        /// Symbol index.
        symbol: u32,
        /// What the relocation needs.
        expected: &'static str,
    },
    /// 64-bit, PIC or TLS relocations: not produced for wasm32 executables.
    #[error("relocation at {offset} has type {ty:?}, which relinking does not handle (wasm32 executables only)")]
    UnsupportedReloc {
        /// Field offset in its section.
        offset: u32,
        /// Relocation type.
        ty: RelocType,
    },
    /// The field at a LEB relocation is not a 5-byte padded LEB.
    #[error("relocated field at {offset} is not a 5-byte padded LEB: was the module linked with --emit-relocs and not optimised after linking?")]
    NotPadded {
        /// Field offset in its section.
        offset: u32,
    },
    /// A final value does not fit the field.
    #[error("value {value} does not fit the relocated field at {offset} ({ty:?})")]
    Overflow {
        /// Field offset in its section.
        offset: u32,
        /// Relocation type.
        ty: RelocType,
        /// The value.
        value: i64,
    },
    /// The placement needs table slots but the module defines no table or
    /// has no element section to rewrite.
    #[error("the placement fills {0} table slots but the module has no defined table and element section to hold them")]
    NoTable(usize),
    /// An address range outside the module's data segments.
    #[error("address range {start:#x}..{end:#x} is not inside one data segment of the module")]
    AddressOutside {
        /// Range start.
        start: u32,
        /// Range end.
        end: u32,
    },
    /// A module with several tables or a table with an initialiser.
    #[error("the module's tables are not the single funcref table wasm-ld emits")]
    UnusualTable,
}

/// Rewrites `wasm` (described by `info`) so every memory address and table
/// slot in its code and data follows `placement`, the table is large enough
/// and holds exactly `placement.table`. Other sections are copied unchanged.
pub fn relink(wasm: &[u8], info: &ModuleInfo, placement: &Placement) -> Result<Vec<u8>, Error> {
    let slots = slot_of(placement);
    let mut module = wasm_encoder::Module::new();
    let mut saw_elements = false;
    let mut saw_table = false;
    for payload in Parser::new(0).parse_all(wasm) {
        let payload = payload?;
        let Some((id, range)) = payload.as_section() else {
            continue;
        };
        let raw = &wasm[range.clone()];
        match payload {
            Payload::TableSection(reader) => {
                saw_table = true;
                let mut tables = TableSection::new();
                for (i, table) in reader.into_iter().enumerate() {
                    let table = table?;
                    if i > 0 || !matches!(table.init, TableInit::RefNull) || table.ty.table64 {
                        return Err(Error::UnusualTable);
                    }
                    let needed = placement
                        .table
                        .keys()
                        .next_back()
                        .map_or(0, |&s| s as u64 + 1);
                    let minimum = table.ty.initial.max(needed);
                    tables.table(TableType {
                        element_type: RefType::FUNCREF,
                        table64: false,
                        minimum,
                        maximum: table.ty.maximum.map(|m| m.max(minimum)),
                        shared: false,
                    });
                }
                module.section(&tables);
            }
            Payload::ElementSection(reader) => {
                saw_elements = true;
                let mut elements = ElementSection::new();
                if !placement.table.is_empty() {
                    table_segment(&mut elements, &placement.table);
                }
                for element in reader {
                    let element = element?;
                    let table_zero = matches!(
                        element.kind,
                        ElementKind::Active { table_index, .. } if table_index.unwrap_or(0) == 0
                    );
                    if !table_zero {
                        elements.raw(&wasm[element.range.clone()]);
                    }
                }
                module.section(&elements);
            }
            Payload::CodeSectionStart { .. } => {
                let mut code = raw.to_vec();
                patch(&mut code, &info.code_relocs, info, placement, &slots)?;
                module.section(&wasm_encoder::RawSection { id, data: &code });
            }
            Payload::ExportSection(reader) if !placement.exports.is_empty() || !placement.added_exports.is_empty() => {
                let mut exports = wasm_encoder::ExportSection::new();
                for export in reader {
                    let export = export?;
                    let kind = wasm_encoder::ExportKind::from(export.kind);
                    let index = match (export.kind, placement.exports.get(export.name)) {
                        (wasmparser::ExternalKind::Func, Some(&func)) => func,
                        _ => export.index,
                    };
                    exports.export(export.name, kind, index);
                }
                for (name, func) in &placement.added_exports {
                    exports.export(name, wasm_encoder::ExportKind::Func, *func);
                }
                module.section(&exports);
            }
            Payload::DataSection(_) => {
                let mut data = raw.to_vec();
                patch(&mut data, &info.data_relocs, info, placement, &slots)?;
                module.section(&wasm_encoder::RawSection { id, data: &data });
            }
            _ => {
                module.section(&wasm_encoder::RawSection { id, data: raw });
            }
        }
    }
    let can_hold_slots = saw_table && saw_elements;
    if !placement.table.is_empty() && !can_hold_slots {
        return Err(Error::NoTable(placement.table.len()));
    }
    Ok(module.finish())
}

/// The initial bytes of the module's own address range `addr` (inside one
/// data segment; zeros where the segment has no initial bytes) with the data
/// relocations inside it applied under `placement`: what the new version's
/// object should hold once it lives at its placed address.
pub fn relocated_bytes(
    info: &ModuleInfo,
    placement: &Placement,
    addr: Range<u32>,
) -> Result<Vec<u8>, Error> {
    let outside = || Error::AddressOutside {
        start: addr.start,
        end: addr.end,
    };
    let seg = info
        .segments
        .iter()
        .find(|s| {
            s.address <= addr.start && addr.end <= s.address + s.size && addr.start <= addr.end
        })
        .ok_or_else(outside)?;
    let lo = addr.start.saturating_sub(3).max(seg.address);
    let hi = addr.end.saturating_add(3).min(seg.address + seg.size);
    let mut buf: Vec<u8> = (lo..hi)
        .map(|a| {
            seg.init
                .get((a - seg.address) as usize)
                .copied()
                .unwrap_or(0)
        })
        .collect();
    let slots = slot_of(placement);
    let mut inside = Vec::new();
    for r in &info.data_relocs {
        let Some(at) = info.data_reloc_address(r) else {
            continue;
        };
        let end = at + r.ty.extent() as u32;
        if at < addr.end && end > addr.start && at >= lo && end <= hi {
            inside.push(Reloc {
                offset: at - lo,
                ..*r
            });
        }
    }
    patch(&mut buf, &inside, info, placement, &slots)?;
    Ok(buf[(addr.start - lo) as usize..(addr.end - lo) as usize].to_vec())
}

/// The lowest slot holding each function.
fn slot_of(placement: &Placement) -> HashMap<u32, u32> {
    let mut slots = HashMap::new();
    for (&slot, &func) in placement.table.iter().rev() {
        slots.insert(func, slot);
    }
    slots
}

/// One active segment for table 0 from the lowest to the highest slot:
/// function indices when there is no hole, else expressions with
/// `ref.null func` in the holes.
fn table_segment(elements: &mut ElementSection, table: &BTreeMap<u32, u32>) {
    let (&lo, &hi) = (
        table.keys().next().unwrap_or(&0),
        table.keys().next_back().unwrap_or(&0),
    );
    let offset = ConstExpr::i32_const(lo as i32);
    if table.len() as u64 == hi as u64 - lo as u64 + 1 {
        let funcs: Vec<u32> = table.values().copied().collect();
        elements.active(None, &offset, Elements::Functions(funcs.into()));
    } else {
        let exprs: Vec<ConstExpr> = (lo..=hi)
            .map(|slot| match table.get(&slot) {
                Some(&f) => ConstExpr::ref_func(f),
                None => ConstExpr::ref_null(HeapType::FUNC),
            })
            .collect();
        elements.active(
            None,
            &offset,
            Elements::Expressions(RefType::FUNCREF, exprs.into()),
        );
    }
}

/// Rewrites the fields of `relocs` in `bytes` (offsets relative to it).
fn patch(
    bytes: &mut [u8],
    relocs: &[Reloc],
    info: &ModuleInfo,
    placement: &Placement,
    slots: &HashMap<u32, u32>,
) -> Result<(), Error> {
    for r in relocs {
        let value = match final_value(r, info, placement, slots) {
            Ok(Some(value)) => value,
            Ok(None) => continue,
            Err(Error::NoSlot { name, func }) => {
                let own = read_field(bytes, r);
                match own.and_then(|own| own_slot_function(info, own)).and_then(|f| slots.get(&f)) {
                    // The symbol names one function and wasm-ld wrote
                    // another's slot (a weak reference it resolved after
                    // naming a stub for it): the slot it wrote says which
                    // function the program gets, so that function's place
                    // in the new table is the value.
                    Some(&slot) => i64::from(slot),
                    // The address of a weak function nothing defines:
                    // wasm-ld gave it no slot and wrote null (its stub only
                    // serves direct calls), and null it stays.
                    None if own == Some(0) => continue,
                    None if name.starts_with(UNDEFINED_WEAK) => 0,
                    None => return Err(Error::NoSlot { name, func }),
                }
            }
            Err(e) => return Err(e),
        };
        write_field(bytes, r, value)?;
    }
    Ok(())
}

/// Name prefix wasm-ld gives the stub of a weak function nothing defines.
const UNDEFINED_WEAK: &str = "undefined_weak:";

/// The function the module's own table holds at `slot`.
fn own_slot_function(info: &ModuleInfo, slot: i64) -> Option<u32> {
    let slot = u32::try_from(slot).ok()?;
    info.table.as_ref()?.slots.get(&slot).copied()
}

/// The value a table-index or memory-address field holds now, if it is one
/// and well formed.
fn read_field(bytes: &[u8], r: &Reloc) -> Option<i64> {
    let field = bytes.get(r.offset as usize..r.offset as usize + r.ty.extent())?;
    match r.ty {
        RelocType::MemoryAddrI32 | RelocType::TableIndexI32 => Some(i64::from(u32::from_le_bytes(field.try_into().ok()?))),
        RelocType::MemoryAddrLeb | RelocType::MemoryAddrSleb | RelocType::MemoryAddrRelSleb | RelocType::TableIndexSleb => {
            let mut reader = wasmparser::BinaryReader::new(field, 0);
            match r.ty {
                RelocType::MemoryAddrLeb => reader.read_var_u32().ok().map(i64::from),
                _ => reader.read_var_i32().ok().map(i64::from),
            }
        }
        _ => None,
    }
}

/// The value a memory-address or table-index field must hold; `None` for
/// relocations relinking leaves alone (indices, offsets).
fn final_value(
    r: &Reloc,
    info: &ModuleInfo,
    placement: &Placement,
    slots: &HashMap<u32, u32>,
) -> Result<Option<i64>, Error> {
    use wasmparser::RelocationType::*;
    let wrong = |expected| Error::WrongSymbol {
        offset: r.offset,
        ty: r.ty,
        symbol: r.symbol,
        expected,
    };
    let symbol = info.symbols.get(r.symbol as usize);
    match r.ty {
        // An executable's `__memory_base` is 0, so an address relative to
        // it (position-independent code, as wasi-libc's threads build has)
        // is the address itself.
        MemoryAddrLeb | MemoryAddrSleb | MemoryAddrI32 | MemoryAddrRelSleb => {
            let target = symbol
                .map(|s| s.target)
                .ok_or_else(|| wrong("data symbol"))?;
            let SymbolTarget::Data(def) = target else {
                return Err(wrong("data symbol"));
            };
            // An undefined (weak) data symbol resolves to address 0.
            let own = def.map_or(0, |d| d.address);
            let address = placement.data.get(&r.symbol).copied().unwrap_or(own);
            Ok(Some(address as i64 + r.addend))
        }
        TableIndexSleb | TableIndexI32 => {
            let Some(SymbolTarget::Function(func)) = symbol.map(|s| s.target) else {
                return Err(wrong("function symbol"));
            };
            let slot = slots.get(&func).ok_or_else(|| Error::NoSlot {
                name: info.function_name(func),
                func,
            })?;
            Ok(Some(*slot as i64))
        }
        // A thread-local variable's offset in every thread's block: the
        // plan keeps the thread-local layout as it is, or refuses.
        FunctionIndexLeb | TypeIndexLeb | GlobalIndexLeb | FunctionOffsetI32 | SectionOffsetI32
        | EventIndexLeb | GlobalIndexI32 | TableNumberLeb | FunctionIndexI32 | MemoryAddrTlsSleb => Ok(None),
        ty => Err(Error::UnsupportedReloc {
            offset: r.offset,
            ty,
        }),
    }
}

/// Writes `value` into the field of `r`, at the field's own width.
fn write_field(bytes: &mut [u8], r: &Reloc, value: i64) -> Result<(), Error> {
    let at = r.offset as usize;
    let overflow = || Error::Overflow {
        offset: r.offset,
        ty: r.ty,
        value,
    };
    let field = bytes
        .get_mut(at..at + r.ty.extent())
        .ok_or(Error::NotPadded { offset: r.offset })?;
    match r.ty {
        RelocType::MemoryAddrI32 | RelocType::TableIndexI32 => {
            let v = u32::try_from(value).map_err(|_| overflow())?;
            field.copy_from_slice(&v.to_le_bytes());
        }
        RelocType::MemoryAddrLeb | RelocType::MemoryAddrSleb | RelocType::MemoryAddrRelSleb | RelocType::TableIndexSleb => {
            if field[..4].iter().any(|b| b & 0x80 == 0) || field[4] & 0x80 != 0 {
                return Err(Error::NotPadded { offset: r.offset });
            }
            let v = u32::try_from(value).map_err(|_| overflow())?;
            // An i32.const operand holds the address as a signed i32: an
            // address above 2 GiB is written as its negative twin.
            let v = if r.ty == RelocType::MemoryAddrLeb {
                v as i64
            } else {
                v as i32 as i64
            };
            for (i, b) in field.iter_mut().enumerate() {
                let chunk = ((v >> (7 * i)) & 0x7f) as u8;
                *b = if i < 4 { chunk | 0x80 } else { chunk };
            }
        }
        _ => {
            return Err(Error::UnsupportedReloc {
                offset: r.offset,
                ty: r.ty,
            })
        }
    }
    Ok(())
}

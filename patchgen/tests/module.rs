//! The module reader against real C guests: every fact checked here is
//! derived from the C source or from the wasm bytes themselves.

mod support;

use upstare_patchgen::module::{Error, ModuleInfo, RelocType, SymbolKind};

const FACTS: &str = r#"
int answer = 42;
const char *greeting = "hi";
static int counter;
long long big[4] = {1, 2, 3, 0x1122334455667788LL};
int zeros[100];
int twice(int x) { return 2 * x; }
int (*op)(int) = twice;
int main(void) {
    counter += op(answer) + greeting[0] + (int)big[3] + zeros[counter & 7];
    return counter;
}
"#;

fn facts() -> (Vec<u8>, ModuleInfo) {
    let wasm = support::build_c("module_facts", FACTS, &[]);
    let info = ModuleInfo::parse(&wasm).unwrap();
    (wasm, info)
}

/// The initial bytes at `addr..addr+len`, read through the segments.
fn bytes_at(info: &ModuleInfo, addr: u32, len: u32) -> Vec<u8> {
    let seg = &info.segments[info.segment_at(addr).expect("address in a segment")];
    let start = (addr - seg.address) as usize;
    (start..start + len as usize)
        .map(|i| seg.init.get(i).copied().unwrap_or(0))
        .collect()
}

fn data_symbol<'a>(info: &'a ModuleInfo, name: &str) -> &'a upstare_patchgen::module::DataDef {
    let s = &info.symbols[info
        .symbol_named(name)
        .unwrap_or_else(|| panic!("no symbol {name}"))];
    assert_eq!(s.kind, SymbolKind::Data, "{name}");
    s.data().unwrap()
}

#[test]
fn initialised_globals_read_back_through_symbols_and_segments() {
    let (_, info) = facts();
    let answer = data_symbol(&info, "answer");
    assert_eq!(answer.size, 4);
    assert_eq!(bytes_at(&info, answer.address, 4), 42i32.to_le_bytes());
    let big = data_symbol(&info, "big");
    assert_eq!(big.size, 4 * 8);
    let expected: Vec<u8> = [1i64, 2, 3, 0x1122334455667788]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    assert_eq!(bytes_at(&info, big.address, big.size), expected);
    let zeros = data_symbol(&info, "zeros");
    assert_eq!(zeros.size, 100 * 4);
    assert!(bytes_at(&info, zeros.address, zeros.size)
        .iter()
        .all(|&b| b == 0));
    let seg = &info.segments[info.segment_at(zeros.address).unwrap()];
    assert!(seg.writable, "{} holds a writable array", seg.name);
}

#[test]
fn pointer_in_data_leads_to_the_string_literal_and_has_a_relocation() {
    let (_, info) = facts();
    let greeting = data_symbol(&info, "greeting");
    let target = u32::from_le_bytes(bytes_at(&info, greeting.address, 4).try_into().unwrap());
    assert_eq!(bytes_at(&info, target, 3), b"hi\0");
    let literal = &info.symbols[info.data_symbol_at(target).unwrap()];
    assert!(literal.is_local() && literal.is_defined(), "{literal:?}");
    assert!(literal.name.as_deref().unwrap().starts_with(".L.str"));
    assert!(!info.segments[info.segment_at(target).unwrap()].writable);
    let reloc = info
        .data_relocs
        .iter()
        .find(|r| info.data_reloc_address(r) == Some(greeting.address))
        .expect("a relocation for greeting's initialiser");
    assert_eq!(reloc.ty, RelocType::MemoryAddrI32);
    assert_eq!(
        info.symbols[reloc.symbol as usize].data().unwrap().address as i64 + reloc.addend,
        target as i64
    );
}

#[test]
fn function_pointer_in_data_is_a_table_slot_of_that_function() {
    let (_, info) = facts();
    let op = data_symbol(&info, "op");
    let slot = u32::from_le_bytes(bytes_at(&info, op.address, 4).try_into().unwrap());
    let table = info.table.as_ref().unwrap();
    let func = table.slots[&slot];
    assert_eq!(info.function_name(func), "twice");
    assert!(table.min > slot as u64);
    let f = &info.functions[func as usize];
    let ty = &info.types[f.ty as usize];
    assert_eq!(ty.params, [wasmparser::ValType::I32]);
    assert_eq!(ty.results, [wasmparser::ValType::I32]);
    let reloc = info
        .data_relocs
        .iter()
        .find(|r| info.data_reloc_address(r) == Some(op.address));
    assert_eq!(reloc.unwrap().ty, RelocType::TableIndexI32);
}

#[test]
fn static_and_zero_filled_variables_are_local_or_in_writable_segments() {
    let (_, info) = facts();
    let counter = &info.symbols[info.symbol_named("counter").unwrap()];
    assert!(counter.is_local());
    let d = counter.data().unwrap();
    assert_eq!(d.size, 4);
    assert!(info.segments[info.segment_at(d.address).unwrap()].writable);
    assert_eq!(
        info.data_symbol_at(d.address + 3),
        info.symbol_named("counter")
    );
}

/// Every function body range parses as a body and the ranges tile the code
/// section in order; every relocated code field decodes to what its symbol
/// names.
#[test]
fn kv_server_bodies_and_code_relocations_agree_with_the_bytes() {
    let wasm = support::build_example("kv-server", "kv", &[]);
    let info = ModuleInfo::parse(&wasm).unwrap();
    let code = &wasm[info.code_section as usize..(info.code_section + info.code_len) as usize];
    let mut last_end = 0;
    for f in &info.functions[info.imported_functions as usize..] {
        let body = f.body.clone().unwrap();
        assert!(body.start > last_end && body.end <= info.code_len);
        let reader = wasmparser::FunctionBody::new(wasmparser::BinaryReader::new(
            &code[body.start as usize..body.end as usize],
            0,
        ));
        let locals: Vec<_> = reader
            .get_locals_reader()
            .unwrap()
            .into_iter()
            .map(|l| l.unwrap())
            .collect();
        assert_eq!(locals, f.locals);
        last_end = body.end;
    }
    assert!(!info.code_relocs.is_empty());
    for r in &info.code_relocs {
        let signed = matches!(r.ty, RelocType::MemoryAddrSleb | RelocType::TableIndexSleb);
        let (value, width) = support::decode_field(code, r.offset as usize, signed, true);
        assert_eq!(width, 5, "{r:?} is a padded LEB");
        let sym = info.symbols.get(r.symbol as usize);
        let expected = match r.ty {
            RelocType::FunctionIndexLeb | RelocType::GlobalIndexLeb => {
                sym.unwrap().index().unwrap() as i64
            }
            // The "symbol" of a type relocation is the type index itself.
            RelocType::TypeIndexLeb => r.symbol as i64,
            RelocType::MemoryAddrLeb | RelocType::MemoryAddrSleb => {
                sym.unwrap().data().unwrap().address as i64 + r.addend
            }
            RelocType::TableIndexSleb => {
                let func = sym.unwrap().index().unwrap();
                let slots = &info.table.as_ref().unwrap().slots;
                *slots.iter().find(|(_, &f)| f == func).unwrap().0 as i64
            }
            other => panic!("unexpected code relocation {other:?}"),
        };
        assert_eq!(value, expected, "{r:?}");
    }
    let heap = info.heap_base.unwrap();
    assert!(info.segments.iter().all(|s| s.address + s.size <= heap));
    assert_eq!(info.globals[0].name.as_deref(), Some("__stack_pointer"));
}

#[test]
fn module_without_linking_section_is_refused_with_a_hint() {
    let (wasm, _) = facts();
    let stripped = support::edit_sections(&wasm, |_, name, data| {
        (name != "linking").then(|| data.to_vec())
    });
    let err = ModuleInfo::parse(&stripped).unwrap_err();
    assert!(matches!(err, Error::NoLinking), "{err}");
    assert!(err.to_string().contains("--emit-relocs"));
}

#[test]
fn unknown_relocation_type_is_reported_by_number() {
    let (wasm, _) = facts();
    let edited = support::edit_sections(&wasm, |_, name, data| {
        let mut data = data.to_vec();
        if name == "reloc.CODE" {
            // Payload: target section (LEB), count (LEB), then the first
            // entry's type byte; both LEBs are small here.
            assert!(data[0] < 0x80 && data[1] < 0x80);
            data[2] = 99;
        }
        Some(data)
    });
    match ModuleInfo::parse(&edited) {
        Err(Error::UnknownRelocType { ty: 99, section }) => assert_eq!(section, "reloc.CODE"),
        other => panic!("expected an unknown relocation type, got {other:?}"),
    }
}

#[test]
fn garbage_and_truncated_modules_are_errors_not_panics() {
    let (wasm, _) = facts();
    assert!(ModuleInfo::parse(b"not wasm at all").is_err());
    // A cut right after a section leaves a shorter module that may be
    // whole; where sections end depends on the build path in the DWARF,
    // so those cuts are skipped rather than left to chance.
    let section_ends: Vec<usize> = wasmparser::Parser::new(0)
        .parse_all(&wasm)
        .filter_map(|payload| payload.ok()?.as_section().map(|(_, range)| range.end))
        .collect();
    for cut in (0..wasm.len()).step_by(97).filter(|cut| !section_ends.contains(cut)) {
        assert!(
            ModuleInfo::parse(&wasm[..cut]).is_err(),
            "truncated at {cut}"
        );
    }
}

//! Relinking a real C guest: a global moved to another address and a
//! function moved to another table slot. The relinked module must validate,
//! every relocated field must decode to the placed address or slot, and no
//! other byte of the code section may change.

mod support;

use upstare_patchgen::module::{ModuleInfo, RelocType};
use upstare_patchgen::relink::{relink, relocated_bytes, Error, Placement};

const PROGRAM: &str = r#"
int a = 1;
int moved = 7;
int b = 3;
const char *msg = "hello";
__attribute__((noinline)) static int sq(int x) { return x * x; }
__attribute__((noinline)) static int cube(int x) { return x * x * x; }
int (*ops[2])(int) = {sq, cube};
__attribute__((noinline)) int pick(int i) { return ops[i](moved) + a + b; }
__attribute__((noinline)) int (*get(int i))(int) { return i ? cube : sq; }
int main(void) {
    int (*f)(int) = get(a);
    moved += pick(b & 1) + f(moved) + msg[0];
    return moved;
}
"#;

struct Fixture {
    wasm: Vec<u8>,
    info: ModuleInfo,
    moved: u32,
    cube: u32,
    placement: Placement,
    new_address: u32,
    new_slot: u32,
}

/// Moves `moved` one page beyond the heap base and `cube` three slots past
/// the end of the table, leaving holes.
fn fixture() -> Fixture {
    let wasm = support::build_c("relink_program", PROGRAM, &[]);
    let info = ModuleInfo::parse(&wasm).unwrap();
    let moved = info.symbol_named("moved").unwrap() as u32;
    let cube = info
        .functions
        .iter()
        .position(|f| f.name.as_deref() == Some("cube"))
        .unwrap() as u32;
    let mut table = info.table.as_ref().unwrap().slots.clone();
    let old_slot = *table.iter().find(|(_, &f)| f == cube).unwrap().0;
    table.remove(&old_slot);
    let new_slot = info.table.as_ref().unwrap().min as u32 + 3;
    table.insert(new_slot, cube);
    let new_address = info.heap_base.unwrap_or(1 << 20) + 65536;
    let mut placement = Placement {
        table,
        ..Placement::default()
    };
    placement.data.insert(moved, new_address);
    Fixture {
        wasm,
        info,
        moved,
        cube,
        placement,
        new_address,
        new_slot,
    }
}

fn payload(wasm: &[u8], info: &ModuleInfo) -> Vec<u8> {
    wasm[info.code_section as usize..(info.code_section + info.code_len) as usize].to_vec()
}

fn decode(bytes: &[u8], ty: RelocType, at: u32) -> i64 {
    let signed = matches!(ty, RelocType::MemoryAddrSleb | RelocType::TableIndexSleb);
    let leb = !matches!(ty, RelocType::MemoryAddrI32 | RelocType::TableIndexI32);
    let (value, width) = support::decode_field(bytes, at as usize, signed, leb);
    assert_eq!(width, ty.extent(), "{ty:?} at {at} keeps its width");
    value
}

#[test]
fn relinked_code_points_at_the_placed_global_and_slot_and_nothing_else_changes() {
    let f = fixture();
    let out = relink(&f.wasm, &f.info, &f.placement).unwrap();
    wasmparser::Validator::new().validate_all(&out).unwrap();
    let out_info = ModuleInfo::parse(&out).unwrap();
    let (before, after) = (payload(&f.wasm, &f.info), payload(&out, &out_info));
    assert_eq!(before.len(), after.len());
    let mut patched = vec![false; before.len()];
    let (mut saw_moved, mut saw_cube) = (false, false);
    for r in &f.info.code_relocs {
        let expected = match r.ty {
            RelocType::MemoryAddrLeb | RelocType::MemoryAddrSleb => {
                let own = f.info.symbols[r.symbol as usize].data().unwrap().address;
                saw_moved |= r.symbol == f.moved;
                let address = if r.symbol == f.moved {
                    f.new_address
                } else {
                    own
                };
                address as i64 + r.addend
            }
            RelocType::TableIndexSleb => {
                let func = f.info.symbols[r.symbol as usize].index().unwrap();
                saw_cube |= func == f.cube;
                *f.placement
                    .table
                    .iter()
                    .find(|(_, &g)| g == func)
                    .unwrap()
                    .0 as i64
            }
            _ => continue,
        };
        assert_eq!(decode(&after, r.ty, r.offset), expected, "{r:?}");
        patched[r.field().start as usize..r.field().end as usize].fill(true);
    }
    assert!(
        saw_moved && saw_cube,
        "the program references both from code"
    );
    for (i, (a, b)) in before.iter().zip(&after).enumerate() {
        assert!(
            patched[i] || a == b,
            "code byte {i} changed outside a relocated field"
        );
    }
    // Code offsets of bodies are unchanged.
    for (old, new) in f.info.functions.iter().zip(&out_info.functions) {
        assert_eq!(old.body, new.body);
    }
}

#[test]
fn relinked_table_holds_exactly_the_placement() {
    let f = fixture();
    let out = relink(&f.wasm, &f.info, &f.placement).unwrap();
    let out_info = ModuleInfo::parse(&out).unwrap();
    let table = out_info.table.unwrap();
    assert_eq!(table.slots, f.placement.table);
    assert!(table.min > f.new_slot as u64);
    assert!(table.max.is_none_or(|m| m >= table.min));
}

#[test]
fn relinked_data_pointers_follow_the_placement() {
    let f = fixture();
    let out = relink(&f.wasm, &f.info, &f.placement).unwrap();
    let out_info = ModuleInfo::parse(&out).unwrap();
    let ops = f.info.symbols[f.info.symbol_named("ops").unwrap()]
        .data()
        .copied()
        .unwrap();
    let bytes =
        relocated_bytes(&f.info, &f.placement, ops.address..ops.address + ops.size).unwrap();
    let slots: Vec<u32> = bytes
        .chunks(4)
        .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let names: Vec<String> = slots
        .iter()
        .map(|s| f.info.function_name(f.placement.table[s]))
        .collect();
    assert_eq!(names, ["sq", "cube"]);
    assert_eq!(slots[1], f.new_slot);
    // The relinked module's own data section carries the same fields.
    let data_start = out_info.data_section.unwrap() as usize;
    for r in out_info
        .data_relocs
        .iter()
        .filter(|r| r.ty == RelocType::TableIndexI32)
    {
        let func = out_info.symbols[r.symbol as usize].index().unwrap();
        let value = decode(&out[data_start..], r.ty, r.offset) as u32;
        assert_eq!(f.placement.table[&value], func);
    }
}

#[test]
fn moving_a_string_literal_rewrites_the_pointer_to_it() {
    let f = fixture();
    let msg = f.info.symbols[f.info.symbol_named("msg").unwrap()]
        .data()
        .copied()
        .unwrap();
    let own =
        relocated_bytes(&f.info, &Placement::default(), msg.address..msg.address + 4).unwrap();
    let literal = f
        .info
        .data_symbol_at(u32::from_le_bytes(own.clone().try_into().unwrap()))
        .unwrap();
    let mut placement = Placement::default();
    placement.data.insert(literal as u32, 0x30000);
    let moved = relocated_bytes(&f.info, &placement, msg.address..msg.address + 4).unwrap();
    assert_eq!(u32::from_le_bytes(moved.try_into().unwrap()), 0x30000);
    // A range covering only part of the pointer gets that part.
    let part = relocated_bytes(&f.info, &placement, msg.address + 1..msg.address + 3).unwrap();
    assert_eq!(part, 0x30000u32.to_le_bytes()[1..3]);
}

#[test]
fn a_pointer_to_a_function_without_a_slot_is_an_error() {
    let f = fixture();
    let mut placement = f.placement.clone();
    placement.table.retain(|_, &mut func| func != f.cube);
    match relink(&f.wasm, &f.info, &placement) {
        Err(e @ Error::NoSlot { .. }) => assert_eq!(
            e.to_string(),
            format!("function `cube` (index {}) is referenced as a pointer but the placement gives it no table slot", f.cube)
        ),
        other => panic!("expected a missing slot, got {:?}", other.map(|_| ())),
    }
}

/// A module rewritten after linking (wasm-opt shrinks the padded LEBs)
/// no longer has the fields its relocations describe: refused, saying why.
#[test]
fn a_field_that_is_not_a_padded_leb_is_refused_with_the_likely_cause() {
    let f = fixture();
    let r = f.info.code_relocs.iter().find(|r| r.ty == RelocType::MemoryAddrSleb).unwrap();
    let mut wasm = f.wasm.clone();
    // The same value, ending one byte early: still five bytes, no longer
    // one padded LEB.
    wasm[(f.info.code_section + r.offset + 3) as usize] &= 0x7f;
    let e = relink(&wasm, &f.info, &f.placement).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("relocated field at {} is not a 5-byte padded LEB: was the module linked with --emit-relocs and not optimised after linking?", r.offset)
    );
}

/// Thread-local relocations come only from builds with shared memory
/// (threads), which relinking does not handle: refused, naming the type.
#[test]
fn a_relocation_type_relinking_does_not_handle_is_refused_by_name() {
    let f = fixture();
    let mut info = f.info.clone();
    let r = info.code_relocs.iter_mut().find(|r| r.ty == RelocType::MemoryAddrSleb).unwrap();
    r.ty = RelocType::MemoryAddrSleb64;
    let offset = r.offset;
    let e = relink(&f.wasm, &info, &f.placement).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("relocation at {offset} has type MemoryAddrSleb64, which relinking does not handle (wasm32 executables only)")
    );
}

#[test]
fn the_identity_placement_reproduces_the_module_byte_for_byte() {
    let f = fixture();
    let placement = Placement {
        table: f.info.table.as_ref().unwrap().slots.clone(),
        ..Placement::default()
    };
    let out = relink(&f.wasm, &f.info, &placement).unwrap();
    assert!(out == f.wasm, "relinking in place changed the module");
}

#[test]
fn a_range_outside_the_data_segments_is_refused() {
    let f = fixture();
    let err = relocated_bytes(&f.info, &f.placement, 0..4).unwrap_err();
    assert!(
        matches!(err, Error::AddressOutside { start: 0, end: 4 }),
        "{err}"
    );
}

/// wasm-ld resolves the address of a weak function nothing defines to
/// null and gives it no slot (wasi-libc's `open` takes one such address):
/// in data with no symbol at all, in code against the stub it makes for
/// direct calls. Relinking keeps both null.
#[test]
fn the_address_of_an_undefined_weak_function_stays_null() {
    const WEAK: &str = r#"
extern int maybe(int) __attribute__((weak));
int (*volatile hook)(int) = maybe;
__attribute__((noinline)) int (*get(void))(int) { return maybe; }
int main(void) { if (get()) return maybe(1); return hook ? hook(1) : 42; }
"#;
    let wasm = support::build_c("relink_weak", WEAK, &[]);
    let info = ModuleInfo::parse(&wasm).unwrap();
    let stub = info
        .functions
        .iter()
        .position(|f| f.name.as_deref() == Some("undefined_weak:maybe"));
    let table = info.table.as_ref().map(|t| t.slots.clone()).unwrap_or_default();
    assert!(stub.is_none_or(|s| !table.values().any(|&f| f as usize == s)), "the stub has no slot");
    let placement = Placement { table, ..Placement::default() };
    let out = relink(&wasm, &info, &placement).expect("a null function address relinks");
    assert!(out == wasm, "relinking in place changed the module");
}

/// A relocation whose symbol names a function without a slot, over a field
/// holding another function's slot (as wasm-ld leaves a weak reference it
/// named after a stub and then resolved to a definition): the field follows
/// the function whose slot wasm-ld wrote.
#[test]
fn a_pointer_field_follows_the_function_whose_slot_wasm_ld_wrote() {
    let f = fixture();
    let mut info = f.info.clone();
    let pick = info.functions.iter().position(|g| g.name.as_deref() == Some("pick")).unwrap() as u32;
    let pick_symbol =
        info.symbols.iter().position(|s| s.index() == Some(pick) && s.kind == upstare_patchgen::module::SymbolKind::Function).unwrap() as u32;
    assert!(!f.placement.table.values().any(|&g| g == pick), "pick has no slot");
    let cube_sites: Vec<u32> = info
        .code_relocs
        .iter_mut()
        .filter(|r| r.ty == RelocType::TableIndexSleb && f.info.symbols[r.symbol as usize].index() == Some(f.cube))
        .map(|r| {
            r.symbol = pick_symbol;
            r.offset
        })
        .collect();
    assert!(!cube_sites.is_empty());
    let out = relink(&f.wasm, &info, &f.placement).unwrap();
    let out_info = ModuleInfo::parse(&out).unwrap();
    for at in cube_sites {
        assert_eq!(decode(&payload(&out, &out_info), RelocType::TableIndexSleb, at), f.new_slot as i64);
    }
}

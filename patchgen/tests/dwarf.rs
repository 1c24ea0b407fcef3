//! The DWARF reader on real guests: globals and their types, variables at a
//! call site, and value maps between two versions of a struct. Expected
//! layouts come from the guests themselves (`offsetof` tables in their data).

mod support;

use std::collections::HashMap;
use std::process::Command;

use upstare_patchgen::dwarf::{
    self, DebugInfo, GlobalVar, Location, ScopeKey, Type, TypeId, same_type, value_map, value_map_named,
};

/// Compiles several C files into one module (one compile unit each).
fn build_many(name: &str, sources: &[(&str, &str)]) -> Vec<u8> {
    let dir = support::root().join("target/patchgen-tests").join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("out.wasm");
    let mut cmd = Command::new(support::root().join("bin/upstare-cc"));
    for (file, text) in sources {
        let path = dir.join(file);
        std::fs::write(&path, text).unwrap();
        cmd.arg(path);
    }
    let status = cmd.arg("-o").arg(&out).status().expect("cannot run bin/upstare-cc");
    assert!(status.success(), "bin/upstare-cc failed on {name}");
    std::fs::read(&out).unwrap()
}

/// What a module's own sections say: initial data and memory size.
struct Image {
    data: HashMap<u32, u8>,
    memory_bytes: u64,
    /// Code section payload start and every body's range, in file offsets.
    code_start: usize,
    bodies: Vec<std::ops::Range<usize>>,
    imported_funcs: u32,
}

fn image(wasm: &[u8]) -> Image {
    let mut img = Image { data: HashMap::new(), memory_bytes: 0, code_start: 0, bodies: Vec::new(), imported_funcs: 0 };
    for payload in wasmparser::Parser::new(0).parse_all(wasm) {
        match payload.unwrap() {
            wasmparser::Payload::MemorySection(r) => {
                for m in r {
                    img.memory_bytes = m.unwrap().initial * 65536;
                }
            }
            wasmparser::Payload::ImportSection(r) => {
                for imp in r.into_imports() {
                    if matches!(imp.unwrap().ty, wasmparser::TypeRef::Func(_)) {
                        img.imported_funcs += 1;
                    }
                }
            }
            wasmparser::Payload::DataSection(r) => {
                for seg in r {
                    let seg = seg.unwrap();
                    if let wasmparser::DataKind::Active { offset_expr, .. } = seg.kind {
                        let Ok(wasmparser::Operator::I32Const { value }) = offset_expr.get_operators_reader().read() else {
                            continue;
                        };
                        for (i, b) in seg.data.iter().enumerate() {
                            img.data.insert(value as u32 + i as u32, *b);
                        }
                    }
                }
            }
            wasmparser::Payload::CodeSectionStart { range, .. } => img.code_start = range.start,
            wasmparser::Payload::CodeSectionEntry(body) => img.bodies.push(body.range()),
            _ => {}
        }
    }
    img
}

impl Image {
    fn u32_at(&self, addr: u32) -> u32 {
        let byte = |i: u32| u32::from(*self.data.get(&(addr + i)).unwrap_or(&0));
        byte(0) | byte(1) << 8 | byte(2) << 16 | byte(3) << 24
    }
}

fn global<'a>(d: &'a DebugInfo, name: &str) -> &'a GlobalVar {
    d.globals().iter().find(|g| g.name == name).unwrap_or_else(|| panic!("no global {name}"))
}

/// The values of an `unsigned name[]` table in the module's data.
fn table(d: &DebugInfo, img: &Image, name: &str) -> Vec<u64> {
    let g = global(d, name);
    let Type::Array { count: Some(n), .. } = d.ty(g.ty) else { panic!("{name} is not a sized array") };
    (0..*n as u32).map(|i| u64::from(img.u32_at(g.address + 4 * i))).collect()
}

fn member<'a>(d: &'a DebugInfo, ty: TypeId, name: &str) -> &'a dwarf::Member {
    let (Type::Struct { members, .. } | Type::Union { members, .. }) = d.ty(ty) else { panic!("not an aggregate") };
    members.iter().find(|m| m.name.as_deref() == Some(name)).unwrap_or_else(|| panic!("no member {name}"))
}

const GLOBALS_A: &str = r#"
#include <stdio.h>
#include <stddef.h>
struct inner { short a; char tag[3]; };
struct outer { int id; struct inner in; int grid[4][2]; struct outer *next; unsigned flags : 3; unsigned mode : 5; };
int plain = 5;
struct outer table[3];
char *name_ptr = "hello";
static int counter;
unsigned layout[] = { offsetof(struct outer, in), offsetof(struct outer, grid), offsetof(struct outer, next),
                      sizeof(struct outer), offsetof(struct inner, tag), sizeof(struct inner) };
int bump_a(void) { static int calls; calls += 2; return ++counter + calls; }
int bump_b(void);
int main(void) {
  table[1].flags = 5; table[2].mode = 9; table[0].next = &table[1];
  printf("%d %d %d %s %p %u\n", bump_a(), bump_b(), plain, name_ptr, (void *)&table, layout[0]);
  return 0;
}
"#;

const GLOBALS_B: &str = "static int counter;\nint bump_b(void) { return ++counter; }\n";

#[test]
fn globals_have_names_units_addresses_and_types() {
    let wasm = build_many("dwarf-globals", &[("ga.c", GLOBALS_A), ("gb.c", GLOBALS_B)]);
    let d = DebugInfo::parse(&wasm).unwrap();
    let img = image(&wasm);

    // Two `static int counter`, one per unit.
    let counters: Vec<&GlobalVar> = d.globals().iter().filter(|g| g.name == "counter").collect();
    assert_eq!(counters.len(), 2, "{counters:?}");
    assert!(counters.iter().any(|g| g.cu.ends_with("ga.c")) && counters.iter().any(|g| g.cu.ends_with("gb.c")));
    assert_ne!(counters[0].address, counters[1].address);
    assert!(counters.iter().all(|g| !g.external && g.function.is_none()));
    let calls = global(&d, "calls");
    assert_eq!(calls.function.as_deref(), Some("bump_a"));
    assert!(calls.cu.ends_with("ga.c"));
    assert!(global(&d, "plain").external);

    // Distinct, non-overlapping, inside the initial memory, found by address.
    let gs = d.globals();
    for pair in gs.windows(2) {
        let end = u64::from(pair[0].address) + d.size_of(pair[0].ty).unwrap_or(0);
        assert!(end <= u64::from(pair[1].address), "{:?} overlaps {:?}", pair[0], pair[1]);
    }
    for g in gs {
        assert!(u64::from(g.address) + d.size_of(g.ty).unwrap_or(0) <= img.memory_bytes, "{g:?}");
        assert_eq!(d.global_at(g.address).map(|x| &x.name), Some(&g.name));
    }
    // `plain` is initialised data: its address holds 5.
    assert_eq!(img.u32_at(global(&d, "plain").address), 5);
    let t = global(&d, "table");
    assert_eq!(d.global_at(t.address + 7).unwrap().name, "table");
    assert_eq!(DebugInfo::parse(&wasm).unwrap().globals(), gs, "two parses disagree");

    // Types.
    let plain = d.ty(global(&d, "plain").ty);
    assert_eq!(plain, &Type::Base { name: "int".into(), size: 4, encoding: gimli::DW_ATE_signed.0 });
    let Type::Pointer { to: Some(ch) } = d.ty(global(&d, "name_ptr").ty) else { panic!("name_ptr") };
    assert!(matches!(d.ty(*ch), Type::Base { size: 1, .. }));
    let layout = table(&d, &img, "layout");
    let Type::Array { element: outer, count: Some(3) } = *d.ty(t.ty) else { panic!("table: {}", d.type_name(t.ty)) };
    assert_eq!(d.type_name(outer), "struct outer");
    assert_eq!(d.size_of(outer), Some(layout[3]));
    assert_eq!(d.size_of(t.ty), Some(3 * layout[3]));
    assert_eq!(member(&d, outer, "id").offset, 0);
    let inner = member(&d, outer, "in");
    assert_eq!(inner.offset, layout[0]);
    assert_eq!(member(&d, inner.ty, "tag").offset, layout[4]);
    assert_eq!(d.size_of(inner.ty), Some(layout[5]));
    let grid = member(&d, outer, "grid");
    assert_eq!(grid.offset, layout[1]);
    assert_eq!(d.type_name(grid.ty), "int[4][2]");
    let Type::Array { element: row, count: Some(4) } = *d.ty(grid.ty) else { panic!("grid") };
    assert!(matches!(d.ty(row), Type::Array { count: Some(2), .. }));
    let next = member(&d, outer, "next");
    assert_eq!(next.offset, layout[2]);
    assert_eq!(d.ty(next.ty), &Type::Pointer { to: Some(outer) }, "self reference");
    let (flags, mode) = (member(&d, outer, "flags"), member(&d, outer, "mode"));
    let (fb, fw) = flags.bit_field.unwrap();
    let (mb, mw) = mode.bit_field.unwrap();
    assert_eq!((fw, mw), (3, 5));
    assert_eq!(mb, fb + fw);
    assert!(fb >= 8 * (layout[2] + 4) && mb + mw <= 8 * layout[3]);
}

#[test]
fn a_module_without_dwarf_is_empty_and_garbage_is_an_error() {
    let d = DebugInfo::parse(b"\0asm\x01\0\0\0").unwrap();
    assert!(d.is_empty() && d.globals().is_empty() && d.function_at(10).is_none());
    assert!(DebugInfo::parse(b"\0asm\x01\0\0\0\x0a\x05").is_err());
    let mut custom = b"\0asm\x01\0\0\0".to_vec();
    // A .debug_info section holding a unit header cut short.
    let body = [&[11u8][..], b".debug_info", &[0x20, 0, 0, 0, 4, 0]].concat();
    custom.push(0);
    custom.push(body.len() as u8);
    custom.extend(body);
    let err = DebugInfo::parse(&custom).unwrap_err();
    assert!(matches!(err, dwarf::Error::Dwarf { .. }), "{err}");
}

const VARS: &str = r#"
extern int ext(int);
extern void sink(int);
static inline int twice(int v) { int doubled = v * 2 + ext(v); sink(doubled); return doubled + v; }
__attribute__((noinline)) int f1(int n) {
  int i = n * 7 + 1;
  int r = ext(i);
  return r + i;
}
__attribute__((noinline)) int f2(int n) {
  int acc = n * 3;
  int got = twice(acc);
  return got * acc;
}
int main(int argc, char **argv) { return f1(argc) + f2(argc); }
"#;

const VARS_EXT: &str = "int ext(int x) { return x * 3; }\nvolatile int s;\nvoid sink(int x) { s = x; }\n";

/// Code offsets of the calls from function `caller` to function `callee`
/// (both named by DWARF, found in the code section by their code range).
fn calls(wasm: &[u8], d: &DebugInfo, caller: &str, callee: &str) -> Vec<u32> {
    let img = image(wasm);
    let low = |name: &str| d.functions().iter().find(|f| f.name == name).unwrap_or_else(|| panic!("{name}")).low_pc;
    let body_of = |name: &str| {
        let at = img.code_start + low(name) as usize;
        img.bodies.iter().position(|r| r.contains(&at)).unwrap_or_else(|| panic!("no body holds {name}"))
    };
    let (from, to) = (body_of(caller), body_of(callee) as u32 + img.imported_funcs);
    let mut out = Vec::new();
    let mut n = 0;
    for payload in wasmparser::Parser::new(0).parse_all(wasm) {
        if let wasmparser::Payload::CodeSectionEntry(body) = payload.unwrap() {
            if n == from {
                let mut ops = body.get_operators_reader().unwrap();
                while !ops.eof() {
                    let (op, offset) = ops.read_with_offset().unwrap();
                    if matches!(op, wasmparser::Operator::Call { function_index } if function_index == to) {
                        out.push((offset - img.code_start) as u32);
                    }
                }
            }
            n += 1;
        }
    }
    assert!(!out.is_empty(), "no call from {caller} to {callee}");
    out
}

#[test]
fn variables_at_a_call_live_in_locals_including_inlined_ones() {
    let wasm = build_many("dwarf-vars", &[("va.c", VARS), ("vb.c", VARS_EXT)]);
    let d = DebugInfo::parse(&wasm).unwrap();
    let img = image(&wasm);
    for f in d.functions() {
        let start = img.code_start + f.low_pc as usize;
        let end = img.code_start + f.high_pc as usize;
        assert!(img.bodies.iter().any(|b| b.start <= start && end <= b.end), "{f:?} is not inside one body");
    }

    let call = calls(&wasm, &d, "f1", "ext")[0];
    let f1 = d.function_at(call).unwrap();
    assert_eq!((f1.name.as_str(), f1.frame_base.is_some()), ("f1", true));
    assert!(f1.cu.ends_with("va.c"));
    let vars = d.variables_at(call);
    let find = |vars: &[dwarf::VarAt], scopes: &[ScopeKey], name: &str| {
        vars.iter().find(|v| v.key.scopes == scopes && v.key.name == name).cloned()
    };
    let top = [ScopeKey::Function("f1".into())];
    let i = find(&vars, &top, "i").unwrap_or_else(|| panic!("no i at {call}: {vars:?}"));
    assert!(matches!(i.location, Location::Local(_)), "{i:?}");
    assert!(!i.parameter);
    assert_eq!(d.type_name(i.ty), "int");
    assert_eq!(i.key.to_string(), "f1/i");
    let n = find(&vars, &top, "n").unwrap();
    assert!(n.parameter);
    // Nothing of f1 is in scope outside its code.
    assert!(d.variables_at(f1.high_pc).iter().all(|v| v.key.scopes[0] != top[0]));

    // Inside f2, `twice` is inlined; at its call to sink, its `doubled` lives
    // in a local.
    let call = calls(&wasm, &d, "f2", "sink")[0];
    assert_eq!(d.function_at(call).unwrap().name, "f2");
    let vars = d.variables_at(call);
    let inlined = [ScopeKey::Function("f2".into()), ScopeKey::Inlined { name: "twice".into(), ordinal: 0 }];
    let doubled = find(&vars, &inlined, "doubled").unwrap_or_else(|| panic!("no doubled at {call}: {vars:?}"));
    assert!(matches!(doubled.location, Location::Local(_)), "{doubled:?}");
    assert_eq!(doubled.key.to_string(), "f2/twice#0/doubled");
    // The same source built again gives the same keys at the same call.
    let again = build_many("dwarf-vars-again", &[("va.c", VARS), ("vb.c", VARS_EXT)]);
    let d2 = DebugInfo::parse(&again).unwrap();
    let call2 = calls(&again, &d2, "f2", "sink")[0];
    let keys = |vs: Vec<dwarf::VarAt>| vs.into_iter().map(|v| v.key).collect::<Vec<_>>();
    assert_eq!(keys(d2.variables_at(call2)), keys(vars));
}

/// One version of the program whose types change; `layout` lists
/// (offset, length) of what survives to v2: hits, misses, last.when,
/// last.zone, the first four hist entries.
fn version(structs: &str) -> String {
    format!(
        r#"
#include <stdio.h>
#include <stddef.h>
{structs}
struct stats stats;
struct node head;
union u un;
struct holder holder;
struct bits bits;
unsigned layout[] = {{
  offsetof(struct stats, hits), sizeof(int), offsetof(struct stats, misses), sizeof(long),
  offsetof(struct stats, last) + offsetof(struct when, when), sizeof(stats.last.when),
  offsetof(struct stats, last) + offsetof(struct when, zone), sizeof(short),
  offsetof(struct stats, hist), 4 * sizeof(int) }};
int main(void) {{
  printf("%p %p %p %p %p %u\n", (void *)&stats, (void *)&head, (void *)&un, (void *)&holder, (void *)&bits, layout[0]);
  return 0;
}}
"#
    )
}

const V1: &str = "struct when { int when; short zone; };
struct node { int v; struct node *next; };
union u { int i; float f; };
struct holder { struct node *p; };
struct bits { unsigned a : 3; unsigned b : 5; };
struct stats { int hits; long misses; struct when last; int hist[4]; char gone; };";

const V2: &str = "struct when { short zone; int when; int extra; };
struct node { int v; struct node *next; };
union u { int i; float f; };
struct holder { struct node *p; };
struct bits { unsigned a : 3; unsigned b : 5; };
struct stats { int hits; double added; long misses; struct when last; int hist[6]; };";

const V3: &str = "struct when { char *when; short zone; };
struct node { long long v; struct node *next; };
union u { int i; double f; };
struct holder { struct node *p; };
struct bits { unsigned a : 3; unsigned c : 2; unsigned b : 5; };
struct stats { int hits; long misses; struct when last; int hist[4]; char gone; };";

/// For each byte of the new value, the old byte it comes from.
fn byte_map(copies: &[dwarf::ByteCopy]) -> HashMap<u64, u64> {
    let mut out = HashMap::new();
    for c in copies {
        for i in 0..c.len {
            assert!(out.insert(c.to + i, c.from + i).is_none(), "byte {} written twice", c.to + i);
        }
    }
    out
}

#[test]
fn value_maps_follow_members_by_name() {
    let w1 = support::build_c("dwarf-v1", &version(V1), &[]);
    let w2 = support::build_c("dwarf-v2", &version(V2), &[]);
    let (d1, d2) = (DebugInfo::parse(&w1).unwrap(), DebugInfo::parse(&w2).unwrap());
    let (l1, l2) = (table(&d1, &image(&w1), "layout"), table(&d2, &image(&w2), "layout"));
    let ty = |d: &DebugInfo, name: &str| global(d, name).ty;

    assert!(same_type(&d1, ty(&d1, "head"), &d2, ty(&d2, "head")), "self-referencing struct");
    assert!(same_type(&d1, ty(&d1, "un"), &d2, ty(&d2, "un")));
    assert!(same_type(&d1, ty(&d1, "holder"), &d2, ty(&d2, "holder")));
    assert!(!same_type(&d1, ty(&d1, "stats"), &d2, ty(&d2, "stats")));
    assert!(!same_type(&d1, ty(&d1, "head"), &d2, ty(&d2, "stats")));

    let map = value_map(&d1, ty(&d1, "stats"), &d2, ty(&d2, "stats")).unwrap();
    let mut expected = HashMap::new();
    for k in (0..l1.len()).step_by(2) {
        assert_eq!(l1[k + 1], l2[k + 1], "length {k} differs between versions");
        for b in 0..l1[k + 1] {
            expected.insert(l2[k] + b, l1[k] + b);
        }
    }
    assert_eq!(byte_map(&map.copies), expected, "{map:?}");
    let (size1, size2) = (d1.size_of(ty(&d1, "stats")).unwrap(), d2.size_of(ty(&d2, "stats")).unwrap());
    assert!(map.copies.iter().all(|c| c.from + c.len <= size1 && c.to + c.len <= size2));
    let mut zeroed = map.zeroed.clone();
    zeroed.sort();
    assert_eq!(zeroed, ["added", "hist[4..6]", "last.extra"]);
    assert_eq!(map.dropped, ["gone"]);

    // Unchanged types copy whole.
    let whole = value_map(&d1, ty(&d1, "holder"), &d2, ty(&d2, "holder")).unwrap();
    let size = d1.size_of(ty(&d1, "holder")).unwrap();
    assert_eq!(whole.copies, [dwarf::ByteCopy { from: 0, to: 0, len: size }]);
    assert!(whole.dropped.is_empty() && whole.zeroed.is_empty());
    let bits = value_map(&d1, ty(&d1, "bits"), &d2, ty(&d2, "bits")).unwrap();
    assert_eq!(bits.copies.iter().map(|c| c.len).sum::<u64>(), d1.size_of(ty(&d1, "bits")).unwrap());
}

#[test]
fn value_maps_refuse_what_cannot_carry_over() {
    // Its own name: tests run in parallel and must not share output files.
    let w1 = support::build_c("dwarf-v1-again", &version(V1), &[]);
    let w3 = support::build_c("dwarf-v3", &version(V3), &[]);
    let (d1, d3) = (DebugInfo::parse(&w1).unwrap(), DebugInfo::parse(&w3).unwrap());
    let ty = |d: &DebugInfo, name: &str| global(d, name).ty;
    let err = |name: &str| value_map_named(&d1, ty(&d1, name), &d3, ty(&d3, name), name).unwrap_err();

    let e = err("stats");
    assert_eq!(e.path, "stats.last.when");
    assert!(e.to_string().starts_with("stats.last.when: int became char*"), "{e}");
    assert_eq!(err("head").path, "head.v");
    assert!(matches!(err("un").reason, dwarf::MapReason::Union { .. }));
    assert_eq!(err("holder").path, "holder.p");
    assert!(matches!(err("holder").reason, dwarf::MapReason::Pointee { .. }), "{}", err("holder"));
    assert!(matches!(err("bits").reason, dwarf::MapReason::BitFields));
    assert!(!same_type(&d1, ty(&d1, "head"), &d3, ty(&d3, "head")));
    assert!(value_map(&d1, ty(&d1, "stats"), &d3, ty(&d3, "stats")).unwrap_err().path == "last.when");
    // Through pointers, for a heap that is traced: `holder.p` is copied as
    // it is and listed with its two pointee types, for the tracer to follow.
    let through = dwarf::value_map_through_pointers(&d1, ty(&d1, "holder"), &d3, ty(&d3, "holder"), "holder").unwrap();
    let p = member(&d1, ty(&d1, "holder"), "p");
    assert_eq!(through.pointers.len(), 1, "{through:?}");
    assert_eq!((through.pointers[0].from, through.pointers[0].to), (p.offset, member(&d3, ty(&d3, "holder"), "p").offset));
    assert!(through.copies.iter().any(|c| c.from <= p.offset && p.offset + 4 <= c.from + c.len), "the pointer is copied: {through:?}");
    // Unions and members that changed kind are refused all the same.
    assert!(dwarf::value_map_through_pointers(&d1, ty(&d1, "un"), &d3, ty(&d3, "un"), "un").is_err());
    assert!(dwarf::value_map_through_pointers(&d1, ty(&d1, "stats"), &d3, ty(&d3, "stats"), "stats").is_err());
}

/// A release that changes a struct deep inside a graph of structs (as
/// SQLite 3.54.1 adds a member to `struct Parse`, reached from every
/// connection) changes the type of every pointer into the graph. The
/// refusal must name the struct that changed, what changed in it and how
/// it is reached, not only the pointer it was found through.
#[test]
fn a_refusal_names_the_struct_that_changed_deep_in_a_graph_and_how_it_is_reached() {
    let program = |parse: &str, limits: usize, state: &str| {
        format!(
            r#"
#include <stdio.h>
struct parse {{ {parse} }};
struct conn {{ int limits[{limits}]; struct {{ {state} }} state; int flags; struct parse *parse; }};
struct shared {{ struct conn *db; struct shared *next; }};
union arg {{ int i; struct conn *db; }};
struct shared *shared_list;
union arg args;
int main(void) {{
  printf("%p %p\n", (void *)&shared_list, (void *)&args);
  return 0;
}}
"#
        )
    };
    let old = support::build_c("dwarf-deep-v1", &program("int n; char *sql;", 4, "int a;"), &[]);
    let gained = support::build_c("dwarf-deep-v2", &program("int n; int alloc; char *sql;", 4, "int a;"), &[]);
    let resized = support::build_c("dwarf-deep-v3", &program("int n; char *sql;", 5, "int a;"), &[]);
    let nested = support::build_c("dwarf-deep-v4", &program("int n; char *sql;", 4, "int a; int b;"), &[]);
    let d1 = DebugInfo::parse(&old).unwrap();
    let ty = |d: &DebugInfo, name: &str| global(d, name).ty;
    let err = |d2: &DebugInfo, name: &str| value_map_named(&d1, ty(&d1, name), d2, ty(d2, name), name).unwrap_err().to_string();

    let d2 = DebugInfo::parse(&gained).unwrap();
    assert_eq!(
        err(&d2, "shared_list"),
        "shared_list: the type struct shared it points to changed layout (struct parse, reached as shared.db->parse, gained member alloc) (the objects it points to must be converted too: map it with value_map_through_pointers and trace them)"
    );
    assert_eq!(
        err(&d2, "args"),
        "args: union arg changed layout (struct parse, reached as arg.db->parse, gained member alloc) (keep the old type, or transform this value by hand)"
    );
    assert_eq!(
        dwarf::first_difference(&d1, ty(&d1, "shared_list"), &d2, ty(&d2, "shared_list")).as_deref(),
        Some("struct parse, reached as shared.db->parse, gained member alloc"),
        "a pointer's path starts at its pointee"
    );

    // A member that grows moves every member after it: the message names
    // the one that grew.
    let d3 = DebugInfo::parse(&resized).unwrap();
    assert_eq!(
        err(&d3, "shared_list"),
        "shared_list: the type struct shared it points to changed layout (struct conn, reached as shared.db, member limits became int[5] (was int[4])) (the objects it points to must be converted too: map it with value_map_through_pointers and trace them)"
    );
    // A member struct that grows is explained from inside.
    let d4 = DebugInfo::parse(&nested).unwrap();
    assert_eq!(
        dwarf::first_difference(&d1, ty(&d1, "shared_list"), &d4, ty(&d4, "shared_list")).as_deref(),
        Some("struct <anonymous>, reached as shared.db->state, gained member b")
    );
    assert_eq!(dwarf::first_difference(&d1, ty(&d1, "shared_list"), &d1, ty(&d1, "shared_list")), None);
}

/// A program keeps a library's objects through pointers to a type the
/// library's header only declares (`sqlite3 *db`, `struct sqlite3;`): in
/// the program's unit the type has no layout. Its layout is the library
/// unit's definition, so a release of the library that changes it refuses
/// the pointer; two units that define different layouts under one name
/// leave the declaration opaque.
#[test]
fn a_pointer_to_a_type_only_declared_in_its_unit_is_checked_against_the_definition() {
    let program = r#"
#include <stdio.h>
struct lib;
struct other;
struct lib *lib_open(void);
struct lib *handle;
struct other *ambiguous;
int main(void) {
  handle = lib_open();
  printf("%p %p\n", (void *)handle, (void *)&ambiguous);
  return 0;
}
"#;
    let library = |members: &str| {
        format!(
            r#"
#include <stdlib.h>
struct lib {{ {members} }};
struct other {{ int a; }};
struct other one_other;
struct lib *last_opened;
struct lib *lib_open(void) {{ return last_opened = calloc(1, sizeof(struct lib)); }}
"#
        )
    };
    // A third unit defines `struct other` differently: which one the
    // program's declaration means is unknown.
    let elsewhere = "struct other { double d; long long e; };\nstruct other another_other;\n";
    let old = build_many("dwarf-declared-v1", &[("main.c", program), ("lib.c", &library("int n; char *name;")), ("else.c", elsewhere)]);
    let new = build_many("dwarf-declared-v2", &[("main.c", program), ("lib.c", &library("int n; int flags; char *name;")), ("else.c", elsewhere)]);
    let (d1, d2) = (DebugInfo::parse(&old).unwrap(), DebugInfo::parse(&new).unwrap());
    let ty = |d: &DebugInfo, name: &str| global(d, name).ty;

    let Type::Pointer { to: Some(lib) } = d1.ty(ty(&d1, "handle")) else { panic!("handle is a pointer") };
    assert!(matches!(d1.ty(*lib), Type::Struct { members, .. } if members.len() == 2), "{:?}", d1.ty(*lib));
    assert_eq!(d1.size_of(*lib), Some(8));
    let err = value_map_named(&d1, ty(&d1, "handle"), &d2, ty(&d2, "handle"), "handle").unwrap_err();
    assert_eq!(
        err.to_string(),
        "handle: the type struct lib it points to changed layout (struct lib gained member flags) (the objects it points to must be converted too: map it with value_map_through_pointers and trace them)"
    );

    let Type::Pointer { to: Some(other) } = d1.ty(ty(&d1, "ambiguous")) else { panic!("ambiguous is a pointer") };
    assert!(matches!(d1.ty(*other), Type::Struct { members, .. } if members.is_empty()), "{:?}", d1.ty(*other));
    assert!(same_type(&d1, ty(&d1, "ambiguous"), &d2, ty(&d2, "ambiguous")));
}

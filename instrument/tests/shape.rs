//! The shape of the output, as the crate docs promise it: original indices
//! kept but for defined functions, which move up behind the instrumenter's
//! own, functions that cannot unwind copied but for the indices they call,
//! memory moved to imports, data made passive, only appended types,
//! globals and exports, and metadata that points at the original
//! instructions.

use std::collections::HashMap;

use upstare_instrument::abi::{self, exports, ResumeKind};
use upstare_instrument::{instrument, Options};
use wasmparser::{ExternalKind, Parser, Payload, TypeRef};

const SUBJECT: &str = r#"(module
  (import "env" "log" (func $log (param i32)))
  (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
  (type $t (func (param i32) (result i32)))
  (memory (export "memory") 2 10)
  (table 2 funcref)
  (global $counter (mut i32) (i32.const 0))
  (global $const i64 (i64.const 5))
  (elem (i32.const 0) func $leaf $spin)
  (data (i32.const 100) "abc")
  (data $passive "xyz")
  (func $leaf (param i32) (result i32)
    local.get 0
    i32.const 1
    i32.add)
  (func $spin (param $n i32) (result i32)
    (loop $l
      local.get $n
      i32.const 1
      i32.sub
      local.tee $n
      br_if $l)
    local.get $n)
  (func $caller (export "caller") (param i32) (result i32)
    local.get 0
    call $leaf
    call $spin
    i32.const 1
    i32.const 0
    call_indirect (type $t)
    i32.add)
  (func $waits (export "waits")
    i32.const 0 i32.const 0 i32.const 0 i32.const 0
    call $poll
    call $log)
  (func $start
    i32.const 1
    global.set $counter)
  (start $start)
)"#;

/// The sections of a module, as far as this test looks at them.
#[derive(Default)]
struct Shape {
    imports: Vec<(String, String, String)>,
    funcs: Vec<u32>,
    tables: usize,
    memories: usize,
    globals: usize,
    exports: HashMap<String, (ExternalKind, u32)>,
    start: Option<u32>,
    /// The functions of the element segments, in order.
    elements: Vec<u32>,
    bodies: Vec<Vec<u8>>,
    data_active: Vec<bool>,
    data_count: Option<u32>,
    types: usize,
    code_start: usize,
}

fn shape(wasm: &[u8]) -> Shape {
    let mut s = Shape::default();
    for p in Parser::new(0).parse_all(wasm) {
        match p.expect("output parses") {
            Payload::TypeSection(r) => s.types = r.count() as usize,
            Payload::ImportSection(r) => {
                for i in r.into_imports() {
                    let i = i.expect("import");
                    let kind = match i.ty {
                        TypeRef::Func(t) => {
                            s.funcs.push(t);
                            "func"
                        }
                        TypeRef::Memory(_) => {
                            s.memories += 1;
                            "memory"
                        }
                        TypeRef::Table(_) => "table",
                        TypeRef::Global(_) => "global",
                        _ => "other",
                    };
                    s.imports.push((i.module.into(), i.name.into(), kind.into()));
                }
            }
            Payload::FunctionSection(r) => s.funcs.extend(r.into_iter().map(|t| t.expect("func"))),
            Payload::TableSection(r) => s.tables += r.count() as usize,
            Payload::MemorySection(r) => s.memories += r.count() as usize,
            Payload::GlobalSection(r) => s.globals += r.count() as usize,
            Payload::ExportSection(r) => {
                for e in r {
                    let e = e.expect("export");
                    s.exports.insert(e.name.into(), (e.kind, e.index));
                }
            }
            Payload::StartSection { func, .. } => s.start = Some(func),
            Payload::ElementSection(r) => {
                for e in r {
                    if let wasmparser::ElementItems::Functions(f) = e.expect("element").items {
                        s.elements.extend(f.into_iter().map(|f| f.expect("element function")));
                    }
                }
            }
            Payload::CodeSectionStart { range, .. } => s.code_start = range.start,
            Payload::CodeSectionEntry(b) => s.bodies.push(wasm[b.range()].to_vec()),
            Payload::DataCountSection { count, .. } => s.data_count = Some(count),
            Payload::DataSection(r) => {
                for d in r {
                    let d = d.expect("data");
                    s.data_active.push(matches!(d.kind, wasmparser::DataKind::Active { .. }));
                }
            }
            _ => {}
        }
    }
    s
}

/// The operators of `body`, printed, with calls of and references to
/// defined functions (from `imported` on) moved up by `by`.
fn moved_calls(body: &[u8], imported: u32, by: u32) -> Vec<String> {
    use wasmparser::Operator as O;
    let moved = |f: u32| if f >= imported { f + by } else { f };
    let body = wasmparser::FunctionBody::new(wasmparser::BinaryReader::new(body, 0));
    let ops = body.get_operators_reader().expect("operators");
    ops.into_iter()
        .map(|op| match op.expect("operator") {
            O::Call { function_index } => format!("{:?}", O::Call { function_index: moved(function_index) }),
            O::RefFunc { function_index } => format!("{:?}", O::RefFunc { function_index: moved(function_index) }),
            op => format!("{op:?}"),
        })
        .collect()
}

#[test]
fn output_keeps_the_original_and_puts_its_own_functions_first() {
    let wasm = wat::parse_str(SUBJECT).expect("wat");
    let out = instrument(&wasm, &Options::default()).expect("instrument");
    let (before, after) = (shape(&wasm), shape(&out.wasm));
    let meta = &out.metadata;

    // Function imports first and unchanged, then the two memories.
    assert_eq!(after.imports[..2], before.imports[..2]);
    assert_eq!(
        after.imports[2..],
        [
            (abi::IMPORT_MODULE.into(), abi::MEMORY_IMPORT.into(), "memory".into()),
            (abi::IMPORT_MODULE.into(), abi::CONTROL_IMPORT.into(), "memory".into()),
        ]
    );
    assert_eq!(after.memories, 2, "no memory is defined any more");
    assert_eq!(meta.memory.min, 2);
    assert_eq!(meta.memory.max, Some(10));

    // Imported functions keep their index, the instrumenter's own come
    // next, then the defined ones, in their order and with their types.
    let imported = 2;
    let own = (after.funcs.len() - before.funcs.len()) as u32;
    assert!(own >= 4, "frame_push, should_pause, init_memory, drop_data at least");
    assert_eq!(after.funcs[..imported], before.funcs[..imported]);
    assert_eq!(after.funcs[imported + own as usize..], before.funcs[imported..]);
    for name in ["leaf", "spin", "caller", "waits", "start"] {
        assert_eq!(function_named(&out.wasm, name), function_named(&wasm, name) + own, "{name} in the name section");
    }
    assert_eq!(after.elements, before.elements.iter().map(|f| f + own).collect::<Vec<_>>(), "the table");
    assert!(after.types >= before.types);
    assert_eq!(after.tables, before.tables, "no reference slot, so no side table");
    assert_eq!(after.globals, before.globals + 2, "the state, and the resume point of a rewind");
    assert_eq!(meta.state_global as usize, before.globals);

    // Functions: 0 log, 1 poll, 2 leaf, 3 spin, 4 caller, 5 waits, 6 start.
    let instrumented: Vec<u32> = meta.functions.iter().map(|f| f.index).collect();
    assert_eq!(instrumented, [3, 4, 5], "leaf and start cannot unwind");
    for (i, body) in before.bodies.iter().enumerate() {
        let index = imported as u32 + i as u32;
        let copy = moved_calls(body, imported as u32, own);
        let output = moved_calls(&after.bodies[own as usize + i], 0, 0);
        if meta.function(index).is_none() {
            assert_eq!(output, copy, "function {index} is copied, its calls renumbered");
        } else {
            assert_ne!(output, copy, "function {index} is not instrumented");
        }
    }

    // Exports: the original ones of the renumbered functions, the reserved
    // ones added.
    for (name, &(kind, index)) in &before.exports {
        let index = if kind == ExternalKind::Func { index + own } else { index };
        assert_eq!(after.exports.get(name), Some(&(kind, index)), "export {name}");
    }
    for name in [
        exports::STATE,
        exports::INIT_MEMORY,
        exports::DROP_DATA,
        exports::START,
    ] {
        assert!(after.exports.contains_key(name), "missing export {name}");
    }
    assert_eq!(after.exports[exports::START], (ExternalKind::Func, 6 + own));
    assert_eq!(after.exports[&exports::global(0)], (ExternalKind::Global, 0));
    assert!(!after.exports.contains_key(&exports::global(1)), "immutable globals are not exported");
    assert_eq!(after.start, None, "the host calls the start function");
    assert_eq!(meta.start, Some(6), "the metadata counts functions as the original does");

    // Data: all passive now; the active one is applied by the init export.
    assert_eq!(before.data_active, [true, false]);
    assert_eq!(after.data_active, [false, false]);
    assert_eq!(after.data_count, Some(2));
    assert_eq!(meta.data.iter().map(|d| d.index).collect::<Vec<_>>(), [0]);

    // Metadata: offsets into the original, blocking imports, kinds.
    assert_eq!(meta.code_section as usize, before.code_start);
    assert_eq!(meta.blocking.len(), 1);
    assert_eq!((meta.blocking[0].func, meta.blocking[0].name.as_str()), (1, "poll_oneoff"));
    let kinds = |f: u32| meta.function(f).unwrap().resume_points.iter().map(|r| r.kind).collect::<Vec<_>>();
    assert_eq!(kinds(3), [ResumeKind::Loop]);
    // Function 4 is exported, so it could be in a table, and its type is
    // the call_indirect's: it may call itself, so its entry is one too.
    assert_eq!(kinds(4), [ResumeKind::Entry, ResumeKind::Call, ResumeKind::CallIndirect]);
    assert_eq!(kinds(5), [ResumeKind::BlockingCall]);
    let caller = meta.function(4).unwrap();
    assert_eq!(caller.resume_points[1].callee, 3);
    assert_eq!(caller.resume_points[1].operands, [], "a call saves the stack below its arguments");
    let indirect = &caller.resume_points[2];
    assert_eq!(indirect.operands.len(), 3, "call_indirect saves the whole stack: {:?}", indirect.operands);
    let blocking = &meta.function(5).unwrap().resume_points[0];
    assert_eq!(blocking.operands.len(), 4, "a blocking call saves its arguments");
    for f in &meta.functions {
        for rp in f.resume_points.iter().filter(|r| r.kind != ResumeKind::Entry) {
            let opcode = wasm[rp.offset as usize];
            let want = if rp.kind == ResumeKind::Loop { 0x03 } else if rp.kind == ResumeKind::CallIndirect { 0x11 } else { 0x10 };
            assert_eq!(opcode, want, "function {} {:?} at {:#x}", f.index, rp.kind, rp.offset);
        }
    }
    assert_eq!(abi::Metadata::from_module(&out.wasm).expect("metadata section"), *meta);
}

#[test]
fn a_module_without_memory_imports_an_empty_one() {
    let wasm = wat::parse_str(r#"(module (func (export "f") (loop)))"#).expect("wat");
    let out = instrument(&wasm, &Options::default()).expect("instrument");
    let s = shape(&out.wasm);
    assert_eq!(s.memories, 2);
    assert_eq!((out.metadata.memory.min, out.metadata.memory.max), (0, Some(0)));
}

#[test]
fn a_module_that_cannot_unwind_keeps_every_body() {
    let wasm = wat::parse_str(
        r#"(module
          (import "env" "f" (func $f (param i32)))
          (func (export "g") (param i32) local.get 0 call $f)
          (func (export "h") (result i32) i32.const 7))"#,
    )
    .expect("wat");
    let out = instrument(&wasm, &Options::default()).expect("instrument");
    assert!(out.metadata.functions.is_empty());
    // They call no defined function: even their indices stay.
    let (before, after) = (shape(&wasm), shape(&out.wasm));
    let own = after.bodies.len() - before.bodies.len();
    assert_eq!(after.bodies[own..], before.bodies[..]);
}

/// The allocator is exported for the host, with a batch helper around it
/// where it has C's wasm32 signature; a function merely named `malloc`
/// with another type is exported as it is, and the module still
/// instruments.
#[test]
fn the_allocator_gets_batch_helpers_only_with_its_c_signature() {
    let module = |malloc: &str, free: &str| {
        wat::parse_str(format!(
            r#"(module (memory 1)
              (func $malloc {malloc} unreachable)
              (func $free {free} unreachable)
              (func (export "f") (loop)))"#
        ))
        .expect("wat")
    };
    let exported = |wasm: &[u8], unwind_only: bool| {
        let out = instrument(wasm, &Options { unwind_only, ..Options::default() }).expect("instrument");
        let e = shape(&out.wasm).exports;
        [exports::MALLOC, exports::MALLOC_BATCH, exports::FREE, exports::FREE_BATCH].map(|n| e.contains_key(n))
    };
    assert_eq!(exported(&module("(param i32) (result i32)", "(param i32)"), false), [true; 4]);
    assert_eq!(exported(&module("(param i64) (result i64)", "(param i32) (result i32)"), false), [true, false, true, false]);
    // An update converts the heap in the new version's instance, which
    // rewinds: the unwind-only variant needs none of it.
    assert_eq!(exported(&module("(param i32) (result i32)", "(param i32)"), true), [false; 4]);
}

#[test]
fn blocking_option_adds_update_points() {
    let wasm = wat::parse_str(
        r#"(module
          (import "env" "wait" (func $w (result i32)))
          (func (export "g") (result i32) call $w))"#,
    )
    .expect("wat");
    let plain = instrument(&wasm, &Options::default()).expect("instrument");
    assert!(plain.metadata.functions.is_empty());
    let mut options = Options::default();
    options.blocking.insert(("env".into(), "wait".into()));
    let out = instrument(&wasm, &options).expect("instrument");
    assert_eq!(out.metadata.functions.len(), 1);
    assert_eq!(out.metadata.functions[0].resume_points[0].kind, ResumeKind::BlockingCall);
}

/// Builds a C guest of the workspace with `bin/upstare-cc`.
fn build_guest(name: &str) -> Vec<u8> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let out = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}.wasm"));
    let status = std::process::Command::new(root.join("bin/upstare-cc"))
        .arg(root.join("tests/guests").join(format!("{name}.c")))
        .arg("-o")
        .arg(&out)
        .status()
        .expect("cannot run bin/upstare-cc");
    assert!(status.success(), "bin/upstare-cc failed on {name}");
    std::fs::read(&out).unwrap()
}

/// The index of the function the name section calls `name`.
fn function_named(wasm: &[u8], name: &str) -> u32 {
    for p in Parser::new(0).parse_all(wasm) {
        if let Payload::CustomSection(c) = p.expect("parses") {
            if let wasmparser::KnownCustom::Name(names) = c.as_known() {
                for n in names {
                    if let wasmparser::Name::Function(map) = n.expect("name subsection") {
                        for f in map {
                            let f = f.expect("name");
                            if f.name == name {
                                return f.index;
                            }
                        }
                    }
                }
            }
        }
    }
    panic!("no function named {name}")
}

/// How many times a body tests `upstare_state == REWINDING`, and how many
/// `block`s of the original code it opens.
fn rewind_tests_and_blocks(body: &[u8], state_global: u32) -> (usize, usize) {
    use wasmparser::Operator as O;
    let body = wasmparser::FunctionBody::new(wasmparser::BinaryReader::new(body, 0));
    let ops: Vec<O> = body
        .get_operators_reader()
        .expect("operators")
        .into_iter()
        .collect::<Result<_, _>>()
        .expect("operators");
    let rewinding = abi::State::Rewinding as i32;
    let tests = ops
        .windows(3)
        .filter(|w| {
            matches!(w, [O::GlobalGet { global_index }, O::I32Const { value }, O::I32Eq]
                if *global_index == state_global && *value == rewinding)
        })
        .count();
    let blocks = ops.iter().filter(|o| matches!(o, O::Block { .. })).count();
    (tests, blocks)
}

/// clang lowers a `switch` to one `block` per case opened back to back
/// before its `br_table`. When every case calls a function that can unwind,
/// each of those blocks holds resume points; the rewind dispatch of the
/// whole nest is one test at its innermost level, not one per block.
#[test]
fn a_switch_nest_tests_for_a_rewind_once() {
    let wasm = build_guest("switchvm");
    let run = function_named(&wasm, "run");
    let out = instrument(&wasm, &Options::default()).expect("instrument");
    let meta = &out.metadata;
    let calls = meta.function(run).expect("run is instrumented").resume_points.iter();
    let calls = calls.filter(|r| r.kind == ResumeKind::Call).count();
    assert!(calls >= 10, "each case calls a helper: {calls} call resume points");

    let imported = shape(&wasm).imports.iter().filter(|i| i.2 == "func").count() as u32;
    let (before, after) = (shape(&wasm), shape(&out.wasm));
    let (_, original_blocks) = rewind_tests_and_blocks(&before.bodies[(run - imported) as usize], u32::MAX);
    assert!(original_blocks >= 10, "the switch is a nest of blocks: {original_blocks}");
    let at = (function_named(&out.wasm, "run") - imported) as usize;
    let (tests, _) = rewind_tests_and_blocks(&after.bodies[at], meta.state_global);
    // `run` has levels below its top one, so its body comes twice, behind
    // one test that picks the copy a rewind enters; the other copy has
    // none. In the rewind's copy: one at the function's start (which stores
    // to memory before its first block, so it keeps its own), one in the
    // block around the loop (whose first instruction is the loop), one at
    // the loop header, and one for the whole switch nest inside the loop,
    // where a test per block would make one per case.
    assert_eq!(tests, 1 + 4, "rewind tests in `run`, whose switch has {calls} cases");
}

/// The calls a body makes inside its first `loop`.
fn calls_in_first_loop(body: &[u8]) -> usize {
    use wasmparser::Operator as O;
    let body = wasmparser::FunctionBody::new(wasmparser::BinaryReader::new(body, 0));
    let (mut depth, mut calls) = (None::<usize>, 0);
    let mut nesting = 0usize;
    for op in body.get_operators_reader().expect("operators") {
        match op.expect("operator") {
            O::Loop { .. } if depth.is_none() => {
                depth = Some(nesting);
                nesting += 1;
            }
            O::Block { .. } | O::Loop { .. } | O::If { .. } => nesting += 1,
            O::End => {
                nesting = nesting.saturating_sub(1);
                if depth == Some(nesting) {
                    return calls;
                }
            }
            O::Call { .. } | O::CallIndirect { .. } if depth.is_some() => calls += 1,
            _ => {}
        }
    }
    panic!("no loop in the body")
}

/// A loop header's check calls nothing: a call on its path, even a cold
/// one, would make Cranelift keep every value live across the loop in a
/// stack slot. Only the stress variant, whose countdown needs it, calls
/// the pause decision there.
#[test]
fn a_loop_check_calls_nothing_but_in_the_stress_variant() {
    let wasm = wat::parse_str(SUBJECT).expect("wat");
    let imported = shape(&wasm).imports.iter().filter(|i| i.2 == "func").count() as u32;
    let spin = |wasm: &[u8]| shape(wasm).bodies[(function_named(wasm, "spin") - imported) as usize].clone();
    let plain = instrument(&wasm, &Options::default()).expect("instrument");
    let stress = instrument(&wasm, &Options { stress: true, ..Options::default() }).expect("instrument");
    assert_eq!(plain.metadata, stress.metadata, "the variants differ in code only");
    assert_eq!(calls_in_first_loop(&spin(&wasm)), 0, "spin's loop calls nothing");
    assert_eq!(calls_in_first_loop(&spin(&plain.wasm)), 0);
    let stressed = calls_in_first_loop(&spin(&stress.wasm));
    assert!(stressed >= 1, "the stress variant calls should_pause at the header: {stressed} calls");
}

/// The unwind-only variant is the full one without the code that rewinds:
/// the same metadata (a stack it unwinds rewinds into an instance of the
/// full one), less code, and none of the helpers only that code calls
/// (`frame_pop`, the blocking calls' `pre_call` and the `rewind_done` it
/// calls).
#[test]
fn the_unwind_only_variant_shares_the_metadata_and_carries_no_code_that_rewinds() {
    let wasm = wat::parse_str(SUBJECT).expect("wat");
    let full = instrument(&wasm, &Options::default()).expect("instrument");
    let lean = instrument(&wasm, &Options { unwind_only: true, ..Options::default() }).expect("instrument");
    assert_eq!(full.metadata, lean.metadata, "the variants share their frames");
    let (f, l) = (shape(&full.wasm), shape(&lean.wasm));
    let code = |s: &Shape| s.bodies.iter().map(Vec::len).sum::<usize>();
    assert!(code(&l) < code(&f), "unwind-only {} bytes of code, full {}", code(&l), code(&f));
    // The full variant also has the helpers that load a frame's slots.
    assert!(l.bodies.len() + 3 <= f.bodies.len(), "the rewind helpers are the full variant's alone: {} functions, full {}", l.bodies.len(), f.bodies.len());
}

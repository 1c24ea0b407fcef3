//! Futex instructions become host calls: `memory.atomic.wait32`,
//! `memory.atomic.wait64` and `memory.atomic.notify` are lowered to calls of
//! the `upstare` futex imports, with the effective address as an i64; the
//! waits are update points; indices shifted by the new imports are mapped
//! back in the metadata; and a module without them gets no new import.

use upstare_instrument::abi::{self, futex, ResumeKind};
use upstare_instrument::{instrument, Options};
use wasmparser::{Operator, Parser, Payload, TypeRef};
use wasmtime::{Caller, Config, Engine, Linker, Module, SharedMemory, Store};

const SUBJECT: &str = r#"(module
  (import "wasi_snapshot_preview1" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
  (import "env" "memory" (memory 1 1 shared))
  (table 2 funcref)
  (elem (i32.const 0) func $wait $notify)
  (func $wait (export "wait") (param $p i32) (param $t i64) (result i32)
    (local $r i32)
    (loop $l
      local.get $p
      i32.const 7
      local.get $t
      memory.atomic.wait32 offset=16
      local.get $r
      i32.add
      local.set $r
      local.get $p
      i64.const 9
      local.get $t
      memory.atomic.wait64 offset=24
      local.get $r
      i32.add
      local.tee $r
      i32.const 100
      i32.lt_u
      br_if $l)
    local.get $r)
  (func $notify (export "notify") (param $p i32) (result i32)
    local.get $p
    i32.const 3
    memory.atomic.notify offset=32)
  (func $both (export "both") (param i32) (result i32)
    local.get 0
    call $notify
    local.get 0
    i64.const 0
    call $wait
    i32.add
    i32.const 1
    call_indirect (param i32) (result i32))
  (func $outer (export "outer") (param i32) (result i32)
    local.get 0
    call $both))
"#;

/// The function imports of a module, as (module, name).
fn func_imports(wasm: &[u8]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for payload in Parser::new(0).parse_all(wasm) {
        if let Payload::ImportSection(r) = payload.unwrap() {
            for i in r.into_imports() {
                let i = i.unwrap();
                if matches!(i.ty, TypeRef::Func(_)) {
                    out.push((i.module.to_string(), i.name.to_string()));
                }
            }
        }
    }
    out
}

/// How many futex instructions the module's code holds.
fn futex_ops(wasm: &[u8]) -> usize {
    let mut n = 0;
    for payload in Parser::new(0).parse_all(wasm) {
        if let Payload::CodeSectionEntry(body) = payload.unwrap() {
            let mut ops = body.get_operators_reader().unwrap();
            while !ops.eof() {
                n += matches!(
                    ops.read().unwrap(),
                    Operator::MemoryAtomicWait32 { .. } | Operator::MemoryAtomicWait64 { .. } | Operator::MemoryAtomicNotify { .. }
                ) as usize;
            }
        }
    }
    n
}

/// The index of the function the name section calls `name`.
fn named(wasm: &[u8], name: &str) -> u32 {
    for payload in Parser::new(0).parse_all(wasm) {
        let Payload::CustomSection(c) = payload.unwrap() else { continue };
        let wasmparser::KnownCustom::Name(names) = c.as_known() else { continue };
        for n in names {
            let wasmparser::Name::Function(map) = n.unwrap() else { continue };
            if let Some(n) = map.into_iter().map(Result::unwrap).find(|n| n.name == name) {
                return n.index;
            }
        }
    }
    panic!("no function is named {name}")
}

/// In the body of function `func` of `wasm`: the first instruction `which`
/// picks and the body's final `end`, each as (offset from the body's start,
/// offset in the module).
fn op_offsets(wasm: &[u8], func: u32, which: impl Fn(&Operator<'_>) -> bool) -> ((u32, u32), (u32, u32)) {
    let defined = (func as usize) - func_imports(wasm).len();
    let body = Parser::new(0)
        .parse_all(wasm)
        .filter_map(|p| match p.unwrap() {
            Payload::CodeSectionEntry(b) => Some(b),
            _ => None,
        })
        .nth(defined)
        .unwrap();
    let start = body.range().start;
    let mut ops = body.get_operators_reader().unwrap();
    let (mut found, mut end) = (None, 0);
    while !ops.eof() {
        let at = ops.original_position();
        let op = ops.read().unwrap();
        if found.is_none() && which(&op) {
            found = Some(at);
        }
        end = at;
    }
    let found = found.expect("the instruction is there");
    (((found - start) as u32, found as u32), ((end - start) as u32, end as u32))
}

#[test]
fn futex_instructions_become_imports_and_the_waits_update_points() {
    let wasm = wat::parse_str(SUBJECT).unwrap();
    assert_eq!(futex_ops(&wasm), 3);
    let out = instrument(&wasm, &Options::default()).unwrap();
    assert_eq!(futex_ops(&out.wasm), 0);
    let mut features = wasmparser::WasmFeatures::default();
    features |= wasmparser::WasmFeatures::THREADS | wasmparser::WasmFeatures::MULTI_MEMORY;
    wasmparser::Validator::new_with_features(features).validate_all(&out.wasm).unwrap();
    let imports = func_imports(&out.wasm);
    let upstare = |name: &str| (abi::IMPORT_MODULE.to_string(), name.to_string());
    assert_eq!(
        imports,
        vec![
            ("wasi_snapshot_preview1".to_string(), "fd_write".to_string()),
            upstare(futex::WAIT32),
            upstare(futex::WAIT64),
            upstare(futex::NOTIFY),
        ]
    );

    // The metadata speaks of the original: its function indices, and the
    // offsets of the wait instructions themselves.
    let meta = &out.metadata;
    let waits: Vec<_> = meta.functions.iter().flat_map(|f| f.resume_points.iter().map(move |rp| (f.index, rp))).collect();
    let at = |kind: ResumeKind| waits.iter().filter(|(_, rp)| rp.kind == kind).collect::<Vec<_>>();
    let atomic = at(ResumeKind::AtomicWait);
    assert_eq!(atomic.len(), 2, "{waits:#?}");
    for (func, rp) in &atomic {
        assert_eq!(*func, 1, "the waits are in $wait, function 1 of the original");
        let reader = wasmparser::BinaryReader::new(&wasm[rp.offset as usize..], rp.offset as usize);
        let op = wasmparser::OperatorsReader::new(reader).read().unwrap();
        let width = match op {
            Operator::MemoryAtomicWait32 { memarg } if memarg.offset == 16 => 32,
            Operator::MemoryAtomicWait64 { memarg } if memarg.offset == 24 => 64,
            other => panic!("resume point at {other:?}"),
        };
        assert_eq!(rp.callee, width);
        // The whole stack at the call: the import's three arguments, the
        // address as an i64.
        assert_eq!(rp.operands.first(), Some(&abi::ValType::I64));
        assert_eq!(rp.operands.len(), 3);
    }
    let calls = at(ResumeKind::Call);
    assert!(calls.iter().any(|(f, rp)| *f == 3 && rp.callee == 1), "$both calls $wait: {calls:#?}");
    assert!(calls.iter().any(|(f, rp)| *f == 4 && rp.callee == 3), "$outer calls $both: {calls:#?}");
    assert!(meta.functions.iter().all(|f| f.index >= 1 && f.index <= 4));
    assert!(meta.blocking.iter().all(|b| b.module != abi::IMPORT_MODULE));
    // Traps map back to the original: in $notify (function 2), the call of
    // the import is where the notify was. The output names its functions
    // by other indices: the three imports and the instrumenter's own
    // functions come before them.
    let offsets = abi::offsets::OffsetMap::from_module(&out.wasm).unwrap();
    let notify = named(&out.wasm, "notify");
    assert!(notify > 5, "the output's $notify is function {notify}");
    let (notify_at, notify_end) = op_offsets(&wasm, 2, |op| matches!(op, Operator::MemoryAtomicNotify { .. }));
    let (call_at, call_end) = op_offsets(&out.wasm, notify, |op| matches!(op, Operator::Call { function_index: 3 }));
    assert_eq!(offsets.original(notify, call_at.0), Some(notify_at.1));
    assert_eq!(offsets.original(notify, call_end.0), Some(notify_end.1));
    // And in the instrumented $wait (function 1).
    let wait = named(&out.wasm, "wait");
    let (wait_at, _) = op_offsets(&wasm, 1, |op| matches!(op, Operator::MemoryAtomicWait32 { .. }));
    let (call_at, _) = op_offsets(&out.wasm, wait, |op| matches!(op, Operator::Call { function_index: 1 }));
    assert_eq!(offsets.original(wait, call_at.0), Some(wait_at.1));

    // The scratch locals of the lowering are not the original's.
    let wait = meta.functions.iter().find(|f| f.index == 1).unwrap();
    assert_eq!(wait.locals, vec![abi::ValType::I32, abi::ValType::I64, abi::ValType::I32]);
}

/// What the program memory and the calls of the futex imports look like
/// to the host, in a real run of the instrumented module.
#[derive(Default)]
struct Seen {
    calls: Vec<(&'static str, i64, i64, i64)>,
}

#[test]
fn the_host_gets_the_effective_address_and_the_exports_and_table_still_reach_their_functions() {
    let wasm = wat::parse_str(SUBJECT).unwrap();
    let out = instrument(&wasm, &Options::default()).unwrap();
    let mut config = Config::new();
    config.wasm_threads(true).shared_memory(true).wasm_multi_memory(true);
    let engine = Engine::new(&config).unwrap();
    let module = Module::new(&engine, &out.wasm).unwrap();
    let mut store = Store::new(&engine, Seen::default());
    let mut linker: Linker<Seen> = Linker::new(&engine);
    let memory = SharedMemory::new(&engine, wasmtime::MemoryType::shared(1, 1)).unwrap();
    let control = SharedMemory::new(&engine, wasmtime::MemoryType::shared(1, 1)).unwrap();
    linker.define(&store, abi::IMPORT_MODULE, abi::MEMORY_IMPORT, memory).unwrap();
    linker.define(&store, abi::IMPORT_MODULE, abi::CONTROL_IMPORT, control.clone()).unwrap();
    let header = abi::control::Header::default().encode();
    for (cell, byte) in control.data().iter().zip(header) {
        // SAFETY: no instance runs yet; nothing else touches the memory.
        unsafe { *cell.get() = byte };
    }
    linker.func_wrap("wasi_snapshot_preview1", "fd_write", |_: i32, _: i32, _: i32, _: i32| 0i32).unwrap();
    // Waits report "not equal" (1), then "woken" (0) for wait64; notify
    // reports 5 woken: the results flow back to the program.
    linker
        .func_wrap(abi::IMPORT_MODULE, futex::WAIT32, |mut c: Caller<'_, Seen>, a: i64, e: i32, t: i64| {
            c.data_mut().calls.push((futex::WAIT32, a, e as i64, t));
            1i32
        })
        .unwrap();
    linker
        .func_wrap(abi::IMPORT_MODULE, futex::WAIT64, |mut c: Caller<'_, Seen>, a: i64, e: i64, t: i64| {
            c.data_mut().calls.push((futex::WAIT64, a, e, t));
            0i32
        })
        .unwrap();
    linker
        .func_wrap(abi::IMPORT_MODULE, futex::NOTIFY, |mut c: Caller<'_, Seen>, a: i64, n: i32| {
            c.data_mut().calls.push((futex::NOTIFY, a, n as i64, 0));
            5i32
        })
        .unwrap();
    let instance = linker.instantiate(&mut store, &module).unwrap();
    instance.get_typed_func::<(), ()>(&mut store, abi::exports::INIT_MEMORY).unwrap().call(&mut store, ()).unwrap();

    // The address is zero-extended: 0xffff_fff0 is not negative.
    let wait = instance.get_typed_func::<(i32, i64), i32>(&mut store, "wait").unwrap();
    assert_eq!(wait.call(&mut store, (0xffff_fff0u32 as i32, -1)).unwrap(), 100);
    let seen = std::mem::take(&mut store.data_mut().calls);
    assert_eq!(seen.len(), 200);
    assert_eq!(seen[0], (futex::WAIT32, 0xffff_fff0 + 16, 7, -1));
    assert_eq!(seen[1], (futex::WAIT64, 0xffff_fff0 + 24, 9, -1));

    // Through an export, a direct call and the (shifted) table: $both
    // calls $notify (5), $wait (1 per round, so 100), then the table's
    // entry 1, $notify again, with that sum.
    let outer = instance.get_typed_func::<i32, i32>(&mut store, "outer").unwrap();
    assert_eq!(outer.call(&mut store, 8).unwrap(), 5);
    let seen = std::mem::take(&mut store.data_mut().calls);
    assert_eq!(seen.first(), Some(&(futex::NOTIFY, 8 + 32, 3, 0)));
    assert_eq!(seen.last(), Some(&(futex::NOTIFY, 105 + 32, 3, 0)));
}

#[test]
fn a_module_without_futex_instructions_gets_no_new_import() {
    let wat = r#"(module
      (import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32)))
      (memory 1 1 shared)
      (func (export "f") (param i32) (result i32)
        local.get 0
        i32.const 0
        i32.const 1
        i32.atomic.rmw.add offset=4
        i32.add))"#;
    let wasm = wat::parse_str(wat).unwrap();
    let out = instrument(&wasm, &Options::default()).unwrap();
    assert_eq!(func_imports(&out.wasm), vec![("wasi_snapshot_preview1".to_string(), "fd_write".to_string())]);
    assert!(out.metadata.functions.iter().flat_map(|f| &f.resume_points).all(|rp| rp.kind != ResumeKind::AtomicWait));
}

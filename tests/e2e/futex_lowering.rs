//! A threaded guest's futex instructions, lowered by the instrumenter: the
//! pthread mutex, condition variable and join of `counter` end in
//! `memory.atomic.wait32` and `memory.atomic.notify`, and the instrumented
//! module holds none of them any more, only calls of the host's futex
//! imports, each wait an update point.

use upstare_instrument::abi::{self, futex, ResumeKind};
use upstare_instrument::{instrument, Options};
use upstare_tests::guest;
use wasmparser::{Operator, Parser, Payload, TypeRef, WasmFeatures};

/// The futex instructions of a module's code, as (wait32, wait64, notify).
fn futex_ops(wasm: &[u8]) -> (usize, usize, usize) {
    let mut n = (0, 0, 0);
    for payload in Parser::new(0).parse_all(wasm) {
        if let Payload::CodeSectionEntry(body) = payload.unwrap() {
            let mut ops = body.get_operators_reader().unwrap();
            while !ops.eof() {
                match ops.read().unwrap() {
                    Operator::MemoryAtomicWait32 { .. } => n.0 += 1,
                    Operator::MemoryAtomicWait64 { .. } => n.1 += 1,
                    Operator::MemoryAtomicNotify { .. } => n.2 += 1,
                    _ => {}
                }
            }
        }
    }
    n
}

#[test]
fn a_threads_guest_instruments_with_its_futex_waits_as_host_calls() {
    let original = std::fs::read(guest("counter")).unwrap();
    let (wait32, wait64, notify) = futex_ops(&original);
    assert!(wait32 > 0 && notify > 0, "counter waits and notifies: {:?}", (wait32, wait64, notify));

    let out = instrument(&original, &Options::default()).unwrap();
    assert_eq!(futex_ops(&out.wasm), (0, 0, 0), "no futex instruction is left");
    let features = WasmFeatures::default() | WasmFeatures::THREADS | WasmFeatures::MULTI_MEMORY;
    wasmparser::Validator::new_with_features(features).validate_all(&out.wasm).unwrap();
    let mut config = wasmtime::Config::new();
    config.wasm_threads(true).shared_memory(true).wasm_multi_memory(true);
    wasmtime::Module::new(&wasmtime::Engine::new(&config).unwrap(), &out.wasm).unwrap();

    let mut imports = Vec::new();
    for payload in Parser::new(0).parse_all(&out.wasm) {
        if let Payload::ImportSection(r) = payload.unwrap() {
            for i in r.into_imports() {
                let i = i.unwrap();
                if i.module == abi::IMPORT_MODULE && matches!(i.ty, TypeRef::Func(_)) {
                    imports.push(i.name.to_string());
                }
            }
        }
    }
    let mut expected = Vec::new();
    for (count, name) in [(wait32, futex::WAIT32), (wait64, futex::WAIT64), (notify, futex::NOTIFY)] {
        if count > 0 {
            expected.push(name.to_string());
        }
    }
    assert_eq!(imports, expected);

    // Every reachable wait is an update point, named by its offset in the
    // original module, where a wait instruction is.
    let waits: Vec<_> = out.metadata.functions.iter().flat_map(|f| &f.resume_points).filter(|rp| rp.kind == ResumeKind::AtomicWait).collect();
    assert!(!waits.is_empty());
    assert!(waits.len() <= wait32 + wait64);
    for rp in waits {
        let at = rp.offset as usize;
        let op = wasmparser::OperatorsReader::new(wasmparser::BinaryReader::new(&original[at..], at)).read().unwrap();
        assert!(matches!(op, Operator::MemoryAtomicWait32 { .. } | Operator::MemoryAtomicWait64 { .. }), "{op:?} at {at}");
    }
}

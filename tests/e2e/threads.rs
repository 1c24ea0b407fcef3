//! Threaded programs: what `upstare-cc --threads` builds, and what the host
//! does with one today (it runs one thread per program, so it says so).

use std::path::Path;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};

use upstare_tests::{expect_error, guest, run_host};
use wasmtime::{Config, Engine, Extern, Instance, Linker, Module, SharedMemory, Store};
use wasmtime_wasi::WasiCtxBuilder;
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;

/// What every thread of a reference run shares.
struct Program {
    engine: Engine,
    module: Module,
    memory: SharedMemory,
    stdout: MemoryOutputPipe,
    next_tid: AtomicI32,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

/// A new instance of the program in its own store, as every thread gets
/// one: the shared memory imported, and `wasi::thread-spawn` starting
/// another thread that calls `wasi_thread_start(tid, arg)` in an instance
/// of its own.
fn instantiate(program: &Arc<Program>) -> (Store<WasiP1Ctx>, Instance) {
    let ctx = WasiCtxBuilder::new().stdout(program.stdout.clone()).build_p1();
    let mut store = Store::new(&program.engine, ctx);
    let mut linker: Linker<WasiP1Ctx> = Linker::new(&program.engine);
    wasmtime_wasi::p1::add_to_linker_sync(&mut linker, |t| t).unwrap();
    linker.define(&store, "env", "memory", Extern::SharedMemory(program.memory.clone())).unwrap();
    let spawner = program.clone();
    linker
        .func_wrap("wasi", "thread-spawn", move |arg: i32| -> i32 {
            let tid = spawner.next_tid.fetch_add(1, Ordering::SeqCst);
            let program = spawner.clone();
            let thread = std::thread::spawn(move || {
                let (mut store, instance) = instantiate(&program);
                let start = instance.get_typed_func::<(i32, i32), ()>(&mut store, "wasi_thread_start").unwrap();
                start.call(&mut store, (tid, arg)).unwrap();
            });
            spawner.threads.lock().unwrap().push(thread);
            tid
        })
        .unwrap();
    let instance = linker.instantiate(&mut store, &program.module).unwrap();
    (store, instance)
}

/// Runs a wasi-threads module as the wasi-threads proposal says, in this
/// process, with wasmtime: one shared memory, a store and an instance per
/// thread on an OS thread of its own. The reference for what a threaded
/// guest prints. Returns main's exit status and what the program printed.
fn run_reference(path: &Path) -> (i32, String) {
    let mut config = Config::new();
    config.wasm_threads(true).shared_memory(true);
    let engine = Engine::new(&config).unwrap();
    let module = Module::from_file(&engine, path).unwrap();
    let memory = module.imports().find_map(|i| i.ty().memory().filter(|m| m.is_shared()).cloned()).expect("a shared memory import");
    let memory = SharedMemory::new(&engine, memory).unwrap();
    let program = Arc::new(Program {
        engine,
        module,
        memory,
        stdout: MemoryOutputPipe::new(1 << 20),
        next_tid: AtomicI32::new(1),
        threads: Mutex::new(Vec::new()),
    });
    let (mut store, instance) = instantiate(&program);
    let start = instance.get_typed_func::<(), ()>(&mut store, "_start").unwrap();
    let status = match start.call(&mut store, ()) {
        Ok(()) => 0,
        Err(e) => e.downcast_ref::<wasmtime_wasi::I32Exit>().map(|exit| exit.0).unwrap_or_else(|| panic!("{path:?} trapped: {e:?}")),
    };
    for thread in std::mem::take(&mut *program.threads.lock().unwrap()) {
        thread.join().unwrap();
    }
    (status, String::from_utf8_lossy(&program.stdout.contents()).into_owned())
}

/// `upstare-cc --threads` builds a wasi-threads module from POSIX threads
/// code: it imports a shared memory and `wasi::thread-spawn` and exports
/// `wasi_thread_start` (the entry of every thread but the first), and it
/// computes what it should when run as wasi-threads says (four threads
/// adding under one mutex). The host refuses it, instrumented or not, with
/// one line that says why, before it would fail on an import it does not
/// provide.
#[test]
fn a_threads_guest_builds_for_wasi_threads_and_the_host_says_it_does_not_run_it() {
    let counter = guest("counter");
    let mut config = wasmtime::Config::new();
    config.wasm_threads(true).shared_memory(true);
    let engine = wasmtime::Engine::new(&config).unwrap();
    let module = wasmtime::Module::from_file(&engine, &counter).unwrap();
    let memory = module.imports().find(|i| i.module() == "env" && i.name() == "memory").expect("imports env::memory");
    assert!(memory.ty().memory().is_some_and(|m| m.is_shared()), "a shared memory");
    assert!(module.imports().any(|i| i.module() == "wasi" && i.name() == "thread-spawn"), "imports wasi::thread-spawn");
    assert!(module.get_export("wasi_thread_start").is_some(), "exports wasi_thread_start");
    assert_eq!(run_reference(&counter), (0, "count=400000\n".to_string()), "the threads' increments, none lost");

    let path = counter.to_str().unwrap();
    for flags in [&[][..], &["--no-instrument"]] {
        let out = run_host(&[flags, &[path]].concat());
        assert_eq!(
            expect_error(&out, 2),
            format!("{path}: the module uses threads (wasi-threads, a shared memory), which upstare-host does not run yet"),
            "{flags:?}"
        );
    }
}

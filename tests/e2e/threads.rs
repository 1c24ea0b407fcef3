//! Threaded programs: what `upstare-cc --threads` builds, and what the host
//! does with one today (it runs one thread per program, so it says so).

use upstare_tests::{expect_error, guest, run_host};

/// `upstare-cc --threads` builds a wasi-threads module from POSIX threads
/// code: it imports a shared memory and `wasi::thread-spawn` and exports
/// `wasi_thread_start` (the entry of every thread but the first). The host
/// refuses it, instrumented or not, with one line that says why, before it
/// would fail on an import it does not provide.
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

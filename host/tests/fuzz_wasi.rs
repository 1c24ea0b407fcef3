//! A short fuzz run of the WASI layer's argument decoding (see
//! docs/FUZZING.md): every preview1 function the host provides is called
//! from a guest with random arguments (small numbers, pointers near and past
//! the end of memory, huge lengths) over a memory of random bytes. Each call
//! returns an errno or ends the guest with a trap; none panics the host, and
//! none blocks past the interrupter's reach.

use std::time::Duration;

use upstare_host::wasi::fd_table::Stdio;
use upstare_host::wasi::{add_to_linker, WasiCtx, WasiView};
use wasmtime::{Engine, Linker, Module, Store, ValType};

struct Fuzz(WasiCtx);

impl WasiView for Fuzz {
    fn wasi(&mut self) -> &mut WasiCtx {
        &mut self.0
    }
}

fn null() -> Stdio {
    Stdio::Fd(std::fs::File::options().read(true).write(true).open("/dev/null").unwrap().into())
}

fn context() -> WasiCtx {
    let mut ctx = WasiCtx::new(null(), null(), null()).unwrap();
    ctx.set_args(vec!["fuzz".into(), "an argument".into()]);
    ctx.set_env(vec![("A".into(), "b".into())]);
    ctx
}

/// An argument of type `ty` that exercises bounds: mostly small numbers and
/// pointers into the page, sometimes the edges of memory and of the type.
fn argument(rng: &mut fastrand::Rng, ty: &ValType) -> String {
    match ty {
        ValType::I32 => {
            let v: u32 = match rng.u8(..8) {
                0..=2 => rng.u32(0..16),
                3..=4 => rng.u32(0..65536),
                5 => 65536 - rng.u32(1..64),
                6 => u32::MAX - rng.u32(0..64),
                _ => rng.u32(..),
            };
            format!("i32.const {}", v as i32)
        }
        ValType::I64 => format!("i64.const {}", if rng.bool() { rng.i64(0..1 << 20) } else { rng.i64(..) }),
        other => panic!("preview1 has no {other} parameter"),
    }
}

/// A guest that calls `name` (of type `params -> results`) `calls` times
/// with random arguments over one page of random bytes.
fn guest(rng: &mut fastrand::Rng, name: &str, params: &[ValType], results: usize, calls: usize) -> String {
    let types: Vec<String> = params.iter().map(|t| t.to_string()).collect();
    let result = if results == 1 { "(result i32)" } else { "" };
    let mut body = String::new();
    for _ in 0..calls {
        for p in params {
            body.push_str(&argument(rng, p));
            body.push('\n');
        }
        body.push_str("call $f\n");
        if results == 1 {
            body.push_str("drop\n");
        }
    }
    let data: String = (0..65536).map(|_| format!("\\{:02x}", rng.u8(..))).collect();
    format!(
        r#"(module
  (import "wasi_snapshot_preview1" "{name}" (func $f (param {}) {result}))
  (memory (export "memory") 1)
  (data (i32.const 0) "{data}")
  (func (export "_start") {body}))"#,
        types.join(" ")
    )
}

#[test]
fn random_arguments_to_every_wasi_function_get_an_errno_or_a_trap() {
    let var = |name: &str| std::env::var(name).ok().map(|v| v.parse().unwrap_or_else(|_| panic!("{name} is not a number")));
    let rounds: u64 = var("UPSTARE_FUZZ_ITERS").unwrap_or(3);
    let seed: u64 = var("UPSTARE_FUZZ_SEED").unwrap_or_else(|| fastrand::u64(..));
    let mut rng = fastrand::Rng::with_seed(seed);
    let engine = Engine::default();
    let mut linker: Linker<Fuzz> = Linker::new(&engine);
    add_to_linker(&mut linker).unwrap();
    let mut functions = Vec::new();
    {
        let mut store = Store::new(&engine, Fuzz(context()));
        let items: Vec<_> = linker.iter(&mut store).map(|(m, n, item)| (m.to_string(), n.to_string(), item)).collect();
        for (module, name, item) in items {
            let ty = item.into_func().expect("WASI provides functions").ty(&store);
            functions.push((module, name, ty.params().collect::<Vec<_>>(), ty.results().len()));
        }
    }
    assert!(functions.len() >= 40, "preview1 has 46 functions; the host provides {}", functions.len());
    let (mut errnos, mut traps) = (0u64, 0u64);
    for round in 0..rounds {
        for (module, name, params, results) in &functions {
            // proc_exit ends the guest by design; poll_oneoff and sleeps may
            // wait for as long as their random timeout says, which the
            // interrupter below cuts short.
            let wat = guest(&mut rng, name, params, *results, 16);
            let wasm = wat::parse_str(&wat).unwrap();
            let compiled = Module::new(&engine, &wasm).unwrap();
            let mut store = Store::new(&engine, Fuzz(context()));
            let interrupt = store.data_mut().0.interrupter().handle();
            let (done, finished) = std::sync::mpsc::channel::<()>();
            let watchdog = std::thread::spawn(move || {
                if finished.recv_timeout(Duration::from_millis(200)).is_err() {
                    interrupt.interrupt();
                }
            });
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let instance = linker.instantiate(&mut store, &compiled)?;
                instance.get_typed_func::<(), ()>(&mut store, "_start")?.call(&mut store, ())
            }));
            let _ = done.send(());
            watchdog.join().unwrap();
            match outcome {
                Ok(Ok(())) => errnos += 1,
                Ok(Err(_)) => traps += 1,
                Err(_) => panic!("{module}.{name} panicked the host in round {round}; replay with UPSTARE_FUZZ_SEED={seed}"),
            }
        }
    }
    eprintln!("wasi fuzz: seed {seed}, {rounds} rounds of {} functions x 16 calls: {errnos} guests returned, {traps} trapped", functions.len());
    assert!(errnos > traps, "most random calls get an errno, not a trap: {errnos} returned, {traps} trapped");
}

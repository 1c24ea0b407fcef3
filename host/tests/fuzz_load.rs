//! A short fuzz run of the module loader (see docs/FUZZING.md): random
//! modules from wasm-smith, with every feature it knows on, go through what
//! `upstare-host` does to a module it is given (check, instrument, compile).
//! Each is loaded or refused with a one-line reason; none panics.

use std::path::Path;

use arbitrary::Unstructured;
use upstare_host::{new_engine, GuestModule, LoadOptions};

fn budget(default_iters: u64) -> (u64, u64) {
    let var = |name: &str| std::env::var(name).ok().map(|v| v.parse().unwrap_or_else(|_| panic!("{name} is not a number")));
    (var("UPSTARE_FUZZ_ITERS").unwrap_or(default_iters), var("UPSTARE_FUZZ_SEED").unwrap_or_else(|| fastrand::u64(..)))
}

/// A configuration for modules a C toolchain could have emitted.
fn command_shaped() -> wasm_smith::Config {
    let exports = wat::parse_str(r#"(module (func (export "_start")) (memory (export "memory") 1))"#).unwrap();
    wasm_smith::Config {
        exports: Some(exports),
        simd_enabled: false,
        relaxed_simd_enabled: false,
        exceptions_enabled: false,
        tail_call_enabled: false,
        gc_enabled: false,
        memory64_enabled: false,
        threads_enabled: false,
        reference_types_enabled: false,
        custom_page_sizes_enabled: false,
        wide_arithmetic_enabled: false,
        max_memories: 1,
        max_tables: 1,
        max_funcs: 20,
        max_instructions: 200,
        max_imports: 0,
        ..wasm_smith::Config::default()
    }
}

#[test]
fn random_modules_load_or_are_refused_in_one_line() {
    let (iters, seed) = budget(400);
    let mut rng = fastrand::Rng::with_seed(seed);
    let engine = new_engine().unwrap();
    let cache = std::env::temp_dir().join(format!("upstare-fuzz-load-{}", std::process::id()));
    let options = LoadOptions { cache_dir: Some(cache.clone()), ..LoadOptions::default() };
    let (mut loaded, mut refused, mut unbuilt) = (0u64, 0u64, 0u64);
    for i in 0..iters {
        let data: Vec<u8> = (0..rng.usize(64..16384)).map(|_| rng.u8(..)).collect();
        // Half the modules have every feature wasm-smith knows, to be
        // refused; the other half are shaped like a WASI command the
        // instrumenter supports (a `_start`, one memory, MVP features and
        // the few extensions C compilers emit), to go all the way through.
        let config = if i % 2 == 0 {
            match Unstructured::new(&data).arbitrary::<wasm_smith::Config>() {
                Ok(mut c) => {
                    c.max_funcs = c.max_funcs.min(20);
                    c.max_instructions = c.max_instructions.min(200);
                    c
                }
                Err(_) => {
                    unbuilt += 1;
                    continue;
                }
            }
        } else {
            command_shaped()
        };
        let Ok(module) = wasm_smith::Module::new(config, &mut Unstructured::new(&data)) else {
            unbuilt += 1;
            continue;
        };
        let wasm = module.to_bytes();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            GuestModule::from_bytes_with(&engine, Path::new("random.wasm"), &wasm, &options)
        }));
        match outcome {
            Ok(Ok(_)) => loaded += 1,
            Ok(Err(e)) => {
                let text = e.to_string();
                assert!(!text.is_empty() && !text.contains('\n'), "module {i}: not one line: {text:?} (seed {seed})");
                refused += 1;
            }
            Err(_) => {
                let dump = std::env::temp_dir().join(format!("upstare-fuzz-load-{seed}-{i}.wasm"));
                std::fs::write(&dump, &wasm).ok();
                panic!("module {i} panicked the loader; replay with UPSTARE_FUZZ_SEED={seed} (module in {})", dump.display());
            }
        }
    }
    let _ = std::fs::remove_dir_all(&cache);
    eprintln!("load fuzz: seed {seed}, {iters} tries, {loaded} loaded, {refused} refused, {unbuilt} not built by wasm-smith");
    assert!(loaded + refused >= iters / 2, "wasm-smith built too few modules: {loaded} + {refused} of {iters}");
    assert!(loaded > 0 && refused > 0, "both outcomes occur: {loaded} loaded, {refused} refused");
}

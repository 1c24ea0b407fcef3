//! Steady-state cost of instrumentation: the original module, the module
//! as `upstare-host` instruments it, and the module after Binaryen's
//! `wasm-opt --asyncify -O2` (the known alternative), all run by the same
//! host library and engine, interleaved, in one process.
//!
//! Batch guests (the CPU-bound examples, a Lua workload, and an SQLite workload in a
//! preopened directory): per guest, the median run time of each variant,
//! its ratio to the original, and code-section sizes. Only `Guest::run` is
//! timed: instrumentation, compilation and instantiation happen before.
//! After the rounds, per batch guest, the compile times of the original
//! and the instrumented module, and the pause bound as one run of the
//! instrumented module meets it ([`pauses`]). Then the KV server under a loopback load ([`server`]): requests per
//! second and p99 latency of each variant, and their ratios.
//!
//! `cargo bench -p upstare-benches --bench overhead [-- ROUNDS] [-- --only NAME]`
//! (default 7 rounds; `--only` runs one guest, `kv` for the server). Needs
//! the guest toolchain and Binaryen's `wasm-opt` (`scripts/install-toolchain`
//! installs both); builds are cached under `target/bench-guests`.

#[path = "../common/mod.rs"]
mod common;
mod pauses;
mod server;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{asyncify, code_size, geomean, median, ms, CGuest};
use upstare_host::{new_engine, Engine, Exit, Guest, GuestConfig, GuestModule, LoadOptions, PreopenDir, Stdio};

/// Rows the SQLite workload inserts (then indexes, queries, updates).
const SQLITE_ROWS: &str = "30000";

/// Rounds of the Lua workload's script.
const LUA_ROUNDS: &str = "60";

/// A batch guest: how to build it and its arguments; `dir` is the name a
/// preopened scratch directory is given, if it needs one.
struct Batch {
    guest: CGuest,
    args: Vec<String>,
    dir: Option<&'static str>,
}

fn batches(only: Option<&str>) -> Vec<Batch> {
    let cpu = |name: &str, src: &str| Batch { guest: CGuest::single(name, src), args: Vec::new(), dir: None };
    let wanted = |name: &str| only.is_none_or(|o| o == name);
    let mut all = Vec::new();
    for (name, src) in [
        ("compute", "guest-examples/compute/compute.c"),
        ("nbody", "benches/guests/nbody.c"),
        ("interp", "benches/guests/interp.c"),
        ("kernels", "benches/guests/kernels.c"),
    ] {
        if wanted(name) {
            all.push(cpu(name, src));
        }
    }
    // Last: locating Lua's sources and SQLite's amalgamation runs `cargo metadata`.
    if wanted("lua") {
        all.push(Batch { guest: common::lua_guest(), args: vec![LUA_ROUNDS.into()], dir: None });
    }
    if wanted("sqlite") {
        all.push(Batch {
            guest: common::sqlite_guest(),
            args: vec!["/db".into(), SQLITE_ROWS.into()],
            dir: Some("/db"),
        });
    }
    all
}

fn time_run(engine: &Engine, module: &GuestModule, batch: &Batch, scratch: &Path) -> Duration {
    run(engine, module, batch, scratch, Path::new("/dev/null"))
}

/// What a variant prints, from a run before any timing: the three variants
/// must compute the same thing, or their times compare nothing.
fn output(engine: &Engine, module: &GuestModule, batch: &Batch, scratch: &Path) -> Vec<u8> {
    let out = scratch.with_extension("stdout");
    run(engine, module, batch, scratch, &out);
    let printed = std::fs::read(&out).unwrap();
    let _ = std::fs::remove_file(&out);
    assert!(!printed.is_empty(), "{} printed nothing to compare", batch.guest.name);
    printed
}

/// How `batch` runs: its arguments, its scratch directory, and its
/// standard output into `stdout`.
fn config(batch: &Batch, scratch: &Path, stdout: &Path) -> GuestConfig {
    let mut argv = vec![batch.guest.name.clone()];
    argv.extend(batch.args.iter().cloned());
    let mut config = GuestConfig::new(argv);
    config.stdout = Stdio::Fd(std::fs::File::create(stdout).unwrap().into());
    if let Some(guest) = batch.dir {
        config.dirs.push(PreopenDir { host: scratch.to_path_buf(), guest: guest.into() });
    }
    config
}

fn run(engine: &Engine, module: &GuestModule, batch: &Batch, scratch: &Path, stdout: &Path) -> Duration {
    let mut guest = Guest::new(engine, module, config(batch, scratch, stdout)).unwrap();
    let start = Instant::now();
    let exit = guest.run();
    let took = start.elapsed();
    assert!(matches!(exit, Exit::Status(0)), "{} failed: {exit:?}", batch.guest.name);
    took
}

/// The three variants of one guest, loaded and ready to run.
struct Variants {
    original: GuestModule,
    upstare: GuestModule,
    asyncify: GuestModule,
    /// Code-section sizes: original, instrumented, Asyncify.
    code: [usize; 3],
    /// Compile times, original, instrumented and Asyncify: medians of
    /// [`COMPILES`] interleaved compilations by the bench's engine, which
    /// caches nothing.
    compile: [Duration; 3],
}

/// Compilations of each module whose median is its compile time.
const COMPILES: usize = 3;

fn load(engine: &Engine, guest: &CGuest) -> Variants {
    let original_path = guest.build();
    let async_path = asyncify(&original_path);
    let original_bytes = std::fs::read(&original_path).unwrap();
    let async_bytes = std::fs::read(&async_path).unwrap();
    let as_is = LoadOptions { instrument: false, stress: false, cache_dir: None };
    let instrumented = upstare_instrument::instrument(&original_bytes, &Default::default()).unwrap().wasm;
    let mut compile: [Vec<Duration>; 3] = Default::default();
    for _ in 0..COMPILES {
        for (bytes, times) in [&original_bytes, &instrumented, &async_bytes].into_iter().zip(&mut compile) {
            let start = Instant::now();
            wasmtime::Module::new(engine, bytes).unwrap();
            times.push(start.elapsed());
        }
    }
    Variants {
        original: GuestModule::from_bytes_with(engine, &original_path, &original_bytes, &as_is).unwrap(),
        upstare: GuestModule::from_bytes(engine, &original_path, &original_bytes).unwrap(),
        asyncify: GuestModule::from_bytes_with(engine, &async_path, &async_bytes, &as_is).unwrap(),
        code: [code_size(&original_bytes), code_size(&instrumented), code_size(&async_bytes)],
        compile: compile.map(median),
    }
}

/// A fresh scratch directory per variant, so that no run sees another's
/// files.
fn scratch(name: &str, variant: &str) -> PathBuf {
    let dir = common::out_dir().join(format!("scratch-{name}-{variant}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn main() {
    // `cargo bench` passes `--bench`; a bare number is the round count.
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rounds: usize = args.iter().find_map(|a| a.parse().ok()).unwrap_or(7);
    let only = args.iter().position(|a| a == "--only").and_then(|i| args.get(i + 1)).map(String::as_str);
    let engine = new_engine().unwrap();

    let batches = batches(only);
    if !batches.is_empty() {
        println!("{rounds} interleaved rounds per guest; median run time; code = code section bytes");
        println!(
            "{:<9} {:>10} {:>10} {:>7} {:>10} {:>7} | {:>8} {:>8} {:>6} {:>8} {:>6}",
            "guest", "original", "upstare", "ratio", "asyncify", "ratio", "code", "upstare", "ratio", "asyncify", "ratio"
        );
    }
    let mut ratios: [Vec<f64>; 4] = Default::default();
    let mut compile_ratios: [Vec<f64>; 2] = Default::default();
    let mut bounds = Vec::new();
    for batch in batches {
        let v = load(&engine, &batch.guest);
        let name = &batch.guest.name;
        let dirs = [scratch(name, "original"), scratch(name, "upstare"), scratch(name, "asyncify")];
        let (mut o, mut u, mut a) = (Vec::new(), Vec::new(), Vec::new());
        // Also the warm-up.
        let expected = output(&engine, &v.original, &batch, &dirs[0]);
        for (variant, module, dir) in [("upstare", &v.upstare, &dirs[1]), ("asyncify", &v.asyncify, &dirs[2])] {
            let printed = output(&engine, module, &batch, dir);
            assert!(
                printed == expected,
                "{name}: the {variant} variant prints something else than the original:\n{}\n---\n{}",
                String::from_utf8_lossy(&printed),
                String::from_utf8_lossy(&expected)
            );
        }
        for _ in 0..rounds {
            o.push(time_run(&engine, &v.original, &batch, &dirs[0]));
            u.push(time_run(&engine, &v.upstare, &batch, &dirs[1]));
            a.push(time_run(&engine, &v.asyncify, &batch, &dirs[2]));
        }
        let (o, u, a) = (median(o), median(u), median(a));
        let ru = u.as_secs_f64() / o.as_secs_f64();
        let ra = a.as_secs_f64() / o.as_secs_f64();
        let [co, cu, ca] = v.code;
        let (su, sa) = (cu as f64 / co as f64, ca as f64 / co as f64);
        println!(
            "{name:<9} {:>8.1}ms {:>8.1}ms {ru:>6.3}x {:>8.1}ms {ra:>6.3}x | {co:>8} {cu:>8} {su:>5.2}x {ca:>8} {sa:>5.2}x",
            ms(o),
            ms(u),
            ms(a),
        );
        for (list, r) in ratios.iter_mut().zip([ru, ra, su, sa]) {
            list.push(r);
        }
        let [compile_o, compile_u, compile_a] = v.compile;
        compile_ratios[0].push(compile_u.as_secs_f64() / compile_o.as_secs_f64());
        compile_ratios[1].push(compile_a.as_secs_f64() / compile_o.as_secs_f64());
        bounds.push((name.clone(), v.compile, pauses::measure(&engine, &v.upstare, &batch, &dirs[1], &expected)));
        for dir in dirs {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
    if !ratios[0].is_empty() {
        println!(
            "geomean: runtime upstare {:.3}x, asyncify {:.3}x; code upstare {:.2}x, asyncify {:.2}x",
            geomean(&ratios[0]),
            geomean(&ratios[1]),
            geomean(&ratios[2]),
            geomean(&ratios[3])
        );
        println!();
        println!("compile: median of {COMPILES}; pauses: the instrumented variant run once under random pause requests, request to paused");
        println!(
            "{:<9} {:>10} {:>10} {:>7} {:>10} {:>7} | {:>7} {:>9} {:>9} {:>9}",
            "guest", "compile", "upstare", "ratio", "asyncify", "ratio", "pauses", "median", "p99", "worst"
        );
        for (name, [o, u, a], p) in &bounds {
            println!(
                "{name:<9} {:>8.1}ms {:>8.1}ms {:>6.3}x {:>8.1}ms {:>6.3}x | {:>7} {:>7.0}us {:>7.0}us {:>7.0}us",
                ms(*o),
                ms(*u),
                u.as_secs_f64() / o.as_secs_f64(),
                ms(*a),
                a.as_secs_f64() / o.as_secs_f64(),
                p.count,
                p.median.as_secs_f64() * 1e6,
                p.p99.as_secs_f64() * 1e6,
                p.worst.as_secs_f64() * 1e6
            );
        }
        println!("geomean: compile upstare {:.3}x, asyncify {:.3}x", geomean(&compile_ratios[0]), geomean(&compile_ratios[1]));
    }
    if only.is_none_or(|o| o == "kv") {
        println!();
        server::compare(&engine, &load(&engine, &common::kv_guest()), rounds);
    }
}

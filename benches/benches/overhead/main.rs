//! Steady-state cost of instrumentation: the original module, the module
//! as `upstare-host` instruments it (the unwind-only variant a program
//! starts on, and the full variant it runs on from its first resume), and
//! the module after Binaryen's `wasm-opt --asyncify -O2` (the known
//! alternative), all run by the same host library and engine, interleaved,
//! in one process.
//!
//! Batch guests (the CPU-bound examples, a Lua workload, and an SQLite workload in a
//! preopened directory): per guest, the median run time of each variant,
//! its ratio to the original, and code-section sizes. Only `Guest::run` is
//! timed: instrumentation, compilation and instantiation happen before.
//! After the rounds, per batch guest, the compile times of each module
//! (wall and CPU time: wasmtime compiles functions in parallel), and the
//! pause bound as one run of the instrumented module meets it ([`pauses`]). Then the KV server under a loopback load ([`server`]): requests per
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

use common::{asyncify, code_size, geomean, median, ms, process_cpu_time, CGuest};
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
    for (name, src) in common::CPU_GUESTS {
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

/// The variants of one guest, loaded and ready to run: the original, the
/// instrumented module as a program starts on it (the unwind-only
/// variant), the full variant it runs on from its first resume, and
/// Asyncify's.
struct Variants {
    original: GuestModule,
    upstare: GuestModule,
    full: GuestModule,
    asyncify: GuestModule,
    /// Code-section sizes, in that order.
    code: [usize; 4],
    /// Compile times, in that order: medians of [`COMPILES`] interleaved
    /// compilations by the bench's engine, which caches nothing.
    compile: [Duration; 4],
    /// The CPU time of the same compilations (medians), on all threads.
    compile_cpu: [Duration; 4],
}

/// Compilations of each module whose median is its compile time.
const COMPILES: usize = 5;

fn load(engine: &Engine, guest: &CGuest) -> Variants {
    let original_path = guest.build();
    let async_path = asyncify(&original_path);
    let original_bytes = std::fs::read(&original_path).unwrap();
    let async_bytes = std::fs::read(&async_path).unwrap();
    let as_is = LoadOptions { instrument: false, ..LoadOptions::default() };
    let instrumented = common::unwind_only(&original_bytes);
    let full = upstare_instrument::instrument(&original_bytes, &Default::default()).unwrap().wasm;
    let mut compile: [Vec<Duration>; 4] = Default::default();
    let mut compile_cpu: [Vec<Duration>; 4] = Default::default();
    for _ in 0..COMPILES {
        let modules = [&original_bytes, &instrumented, &full, &async_bytes];
        for ((bytes, times), cpu) in modules.into_iter().zip(&mut compile).zip(&mut compile_cpu) {
            let (start, start_cpu) = (Instant::now(), process_cpu_time());
            wasmtime::Module::new(engine, bytes).unwrap();
            times.push(start.elapsed());
            cpu.push(process_cpu_time() - start_cpu);
        }
    }
    let eager = LoadOptions { lazy_rewind: false, ..LoadOptions::default() };
    Variants {
        original: GuestModule::from_bytes_with(engine, &original_path, &original_bytes, &as_is).unwrap(),
        upstare: GuestModule::from_bytes(engine, &original_path, &original_bytes).unwrap(),
        full: GuestModule::from_bytes_with(engine, &original_path, &original_bytes, &eager).unwrap(),
        asyncify: GuestModule::from_bytes_with(engine, &async_path, &async_bytes, &as_is).unwrap(),
        code: [code_size(&original_bytes), code_size(&instrumented), code_size(&full), code_size(&async_bytes)],
        compile: compile.map(median),
        compile_cpu: compile_cpu.map(median),
    }
}

/// The compile times of the four variants and the ratios of the last
/// three to the original's, as table columns.
fn compile_columns(c: &[Duration; 4]) -> String {
    let r = [1, 2, 3].map(|i| c[i].as_secs_f64() / c[0].as_secs_f64());
    format!(
        "{:>8.1}ms {:>8.1}ms {:>6.3}x {:>8.1}ms {:>6.3}x {:>8.1}ms {:>6.3}x",
        ms(c[0]),
        ms(c[1]),
        r[0],
        ms(c[2]),
        r[1],
        ms(c[3]),
        r[2]
    )
}

/// The geomeans over guests of the last three variants' compile times
/// against the original's.
fn compile_geomeans<'a>(times: impl Iterator<Item = &'a [Duration; 4]> + Clone) -> [f64; 3] {
    [1, 2, 3].map(|i| geomean(&times.clone().map(|c| c[i].as_secs_f64() / c[0].as_secs_f64()).collect::<Vec<_>>()))
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
        println!("upstare: the unwind-only variant a program starts on; full: the variant it runs on from its first resume");
        println!(
            "{:<9} {:>10} {:>10} {:>7} {:>10} {:>7} {:>10} {:>7} | {:>8} {:>8} {:>6} {:>8} {:>6} {:>8} {:>6}",
            "guest", "original", "upstare", "ratio", "full", "ratio", "asyncify", "ratio", "code", "upstare", "ratio", "full", "ratio", "asyncify", "ratio"
        );
    }
    // Runtime, then code, of upstare, full and asyncify against the original.
    let mut ratios: [Vec<f64>; 6] = Default::default();
    let mut bounds = Vec::new();
    for batch in batches {
        let v = load(&engine, &batch.guest);
        let name = &batch.guest.name;
        let modules = [&v.original, &v.upstare, &v.full, &v.asyncify];
        let dirs = ["original", "upstare", "full", "asyncify"].map(|variant| scratch(name, variant));
        // Also the warm-up.
        let expected = output(&engine, &v.original, &batch, &dirs[0]);
        for (i, variant) in ["upstare", "full", "asyncify"].into_iter().enumerate() {
            let printed = output(&engine, modules[i + 1], &batch, &dirs[i + 1]);
            assert!(
                printed == expected,
                "{name}: the {variant} variant prints something else than the original:\n{}\n---\n{}",
                String::from_utf8_lossy(&printed),
                String::from_utf8_lossy(&expected)
            );
        }
        let mut times: [Vec<Duration>; 4] = Default::default();
        for _ in 0..rounds {
            for ((list, module), dir) in times.iter_mut().zip(modules).zip(&dirs) {
                list.push(time_run(&engine, module, &batch, dir));
            }
        }
        let t = times.map(median);
        let run = [1, 2, 3].map(|i| t[i].as_secs_f64() / t[0].as_secs_f64());
        let code = [1, 2, 3].map(|i| v.code[i] as f64 / v.code[0] as f64);
        println!(
            "{name:<9} {:>8.1}ms {:>8.1}ms {:>6.3}x {:>8.1}ms {:>6.3}x {:>8.1}ms {:>6.3}x | {:>8} {:>8} {:>5.2}x {:>8} {:>5.2}x {:>8} {:>5.2}x",
            ms(t[0]),
            ms(t[1]),
            run[0],
            ms(t[2]),
            run[1],
            ms(t[3]),
            run[2],
            v.code[0],
            v.code[1],
            code[0],
            v.code[2],
            code[1],
            v.code[3],
            code[2],
        );
        for (list, r) in ratios.iter_mut().zip(run.into_iter().chain(code)) {
            list.push(r);
        }
        bounds.push((name.clone(), v.compile, v.compile_cpu, pauses::measure(&engine, &v.upstare, &batch, &dirs[1], &expected)));
        for dir in dirs {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
    if !ratios[0].is_empty() {
        let g = ratios.each_ref().map(|r| geomean(r));
        println!(
            "geomean: runtime upstare {:.3}x, full {:.3}x, asyncify {:.3}x; code upstare {:.2}x, full {:.2}x, asyncify {:.2}x",
            g[0], g[1], g[2], g[3], g[4], g[5]
        );
        println!();
        println!("compile: wall time, median of {COMPILES}; pauses: the instrumented module run once under random pause requests, request to paused");
        println!(
            "{:<9} {:>10} {:>10} {:>7} {:>10} {:>7} {:>10} {:>7} | {:>7} {:>9} {:>9} {:>9}",
            "guest", "compile", "upstare", "ratio", "full", "ratio", "asyncify", "ratio", "pauses", "median", "p99", "worst"
        );
        for (name, c, _, p) in &bounds {
            println!(
                "{name:<9} {} | {:>7} {:>7.0}us {:>7.0}us {:>7.0}us",
                compile_columns(c),
                p.count,
                p.median.as_secs_f64() * 1e6,
                p.p99.as_secs_f64() * 1e6,
                p.worst.as_secs_f64() * 1e6
            );
        }
        let g = compile_geomeans(bounds.iter().map(|b| &b.1));
        println!("geomean: compile upstare {:.3}x, full {:.3}x, asyncify {:.3}x", g[0], g[1], g[2]);
        println!();
        println!("compile CPU time (all of the process's threads), median of {COMPILES}");
        println!(
            "{:<9} {:>10} {:>10} {:>7} {:>10} {:>7} {:>10} {:>7}",
            "guest", "compile", "upstare", "ratio", "full", "ratio", "asyncify", "ratio"
        );
        for (name, _, c, _) in &bounds {
            println!("{name:<9} {}", compile_columns(c));
        }
        let g = compile_geomeans(bounds.iter().map(|b| &b.2));
        println!("geomean: compile CPU upstare {:.3}x, full {:.3}x, asyncify {:.3}x", g[0], g[1], g[2]);
    }
    if only.is_none_or(|o| o == "kv") {
        println!();
        server::compare(&engine, &load(&engine, &common::kv_guest()), rounds);
    }
}

//! Instructions the guest's compiled code executes, original against
//! instrumented against Asyncify: the deterministic companion of the
//! `overhead` bench's times, for machines without hardware counters (and
//! for telling a 3% change from this machine's noise).
//!
//! Each variant runs once in the release `upstare-host` to fill a private
//! compiled-code cache, then once under `valgrind --tool=cachegrind`; the
//! count is cachegrind's unsymbolised `???` bucket, where the code wasmtime
//! compiled falls (the host's own code, the instrumenter and the compiler
//! all have symbols). The guests are the overhead bench's, built the same
//! way, with smaller arguments, since valgrind runs them about 50 times
//! slower.
//!
//! A second table counts compiling (SQLite too): the instructions of one
//! `wasmtime::Module::new` of the original, the instrumented (unwind-only,
//! as the host loads it) and the Asyncify module, on the host's engine,
//! all threads. This bench runs itself under cachegrind for it
//! (`--compile-once FILE N`), compiling a module once and not at all, and
//! the difference is the compile. Wall and CPU times of compiles (the
//! `overhead` bench) follow how wasmtime's threads get scheduled and the
//! machine's load; these counts do not.
//!
//! `cargo build --release -p upstare-host && cargo bench -p upstare-benches
//! --bench instructions [-- --only NAME]`. Needs valgrind
//! (`apt-get install valgrind`).

#[path = "common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{asyncify, geomean, root, CGuest};

/// A guest and the arguments it is counted with.
struct Counted {
    guest: CGuest,
    args: Vec<&'static str>,
}

fn guests(only: Option<&str>) -> Vec<Counted> {
    let mut all = vec![
        Counted { guest: CGuest::single("compute", "guest-examples/compute/compute.c"), args: vec![] },
        Counted { guest: CGuest::single("nbody", "benches/guests/nbody.c"), args: vec!["500000"] },
        Counted { guest: CGuest::single("interp", "benches/guests/interp.c"), args: vec!["3000"] },
        Counted { guest: CGuest::single("kernels", "benches/guests/kernels.c"), args: vec!["1"] },
        Counted { guest: CGuest::single("switchvm", "tests/guests/switchvm.c"), args: vec!["1000"] },
    ];
    all.retain(|c| only.is_none_or(|o| o == c.guest.name));
    // Locating Lua's sources runs `cargo metadata`: only when wanted.
    if only.is_none_or(|o| o == "lua") {
        all.push(Counted { guest: common::lua_guest(), args: vec!["20"] });
    }
    all
}

/// The guest code's instructions in one run of `wasm` (instrumented by
/// the host unless `as_is`), in millions.
fn count(host: &Path, cache: &Path, wasm: &Path, as_is: bool, args: &[&str]) -> f64 {
    let host_args = |cmd: &mut Command| {
        cmd.env("UPSTARE_CACHE_DIR", cache).arg("run");
        if as_is {
            cmd.arg("--no-instrument");
        }
        cmd.arg(wasm).args(args).stdout(std::process::Stdio::null());
    };
    let mut warm = Command::new(host);
    host_args(&mut warm);
    common::run(&mut warm);
    let out = cache.join("cachegrind.out");
    let mut counted = Command::new("valgrind");
    counted.args(["--tool=cachegrind", "--cache-sim=no"]).arg(format!("--cachegrind-out-file={}", out.display())).arg(host);
    host_args(&mut counted);
    counted.stderr(std::process::Stdio::null());
    common::run(&mut counted);
    let guest_code = unsymbolised(&out);
    let _ = std::fs::remove_file(&out);
    guest_code as f64 / 1e6
}

/// The instructions cachegrind's output file gives the `???` function of
/// the `???` file: code without symbols.
fn unsymbolised(out: &Path) -> u64 {
    let text = std::fs::read_to_string(out).unwrap_or_else(|e| panic!("cannot read {}: {e}", out.display()));
    let (mut in_unknown_file, mut in_unknown_fn, mut total) = (false, false, 0);
    for line in text.lines() {
        if let Some(file) = line.strip_prefix("fl=") {
            in_unknown_file = file == "???";
        } else if let Some(function) = line.strip_prefix("fn=") {
            in_unknown_fn = function == "???";
        } else if in_unknown_file && in_unknown_fn && line.starts_with(|c: char| c.is_ascii_digit()) {
            // `line count`, one per source line (all 0 for code without
            // debug info).
            total += line.split_whitespace().nth(1).and_then(|n| n.parse::<u64>().ok()).unwrap_or(0);
        }
    }
    assert!(total > 0, "no instructions in unsymbolised code in {}: did the guest run?", out.display());
    total
}

/// The instructions of compiling `wasm` once on the host's engine, in
/// millions: this bench under cachegrind compiling it once, less compiling
/// it zero times (the engine's creation and the file's reading).
fn compile_count(wasm: &Path, scratch: &Path) -> f64 {
    let me = std::env::current_exe().expect("the bench's own path");
    let run = |times: &str| {
        let out = scratch.join("cachegrind.compile");
        let mut counted = Command::new("valgrind");
        counted.args(["--tool=cachegrind", "--cache-sim=no"]).arg(format!("--cachegrind-out-file={}", out.display()));
        counted.arg(&me).arg("--compile-once").arg(wasm).arg(times);
        counted.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
        common::run(&mut counted);
        let total = summary(&out);
        let _ = std::fs::remove_file(&out);
        total
    };
    run("1").saturating_sub(run("0")) as f64 / 1e6
}

/// The `summary:` line of a cachegrind output file: every instruction counted.
fn summary(out: &Path) -> u64 {
    let text = std::fs::read_to_string(out).unwrap_or_else(|e| panic!("cannot read {}: {e}", out.display()));
    let line = text.lines().find_map(|l| l.strip_prefix("summary:"));
    line.and_then(|n| n.trim().parse().ok()).unwrap_or_else(|| panic!("no summary in {}", out.display()))
}

/// `--compile-once FILE N`: what [`compile_count`] runs under cachegrind.
fn compile_once(file: &str, times: &str) {
    let engine = upstare_host::new_engine().expect("engine");
    let wasm = std::fs::read(file).unwrap_or_else(|e| panic!("cannot read {file}: {e}"));
    for _ in 0..times.parse::<usize>().expect("a count") {
        wasmtime::Module::new(&engine, &wasm).expect("the module compiles");
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [mode, file, times, ..] = &args[..] {
        if mode == "--compile-once" {
            return compile_once(file, times);
        }
    }
    let only = args.iter().position(|a| a == "--only").and_then(|i| args.get(i + 1)).map(String::as_str);
    let host = root().join("target/release/upstare-host");
    assert!(host.exists(), "build the host first: cargo build --release -p upstare-host");
    common::require_valgrind();
    let cache: PathBuf = common::out_dir().join("instructions-cache");
    let _ = std::fs::remove_dir_all(&cache);
    std::fs::create_dir_all(&cache).unwrap();

    println!("guest code instructions (cachegrind), millions");
    println!("{:<9} {:>10} {:>10} {:>7} {:>10} {:>7}", "guest", "original", "upstare", "ratio", "asyncify", "ratio");
    let (mut upstare_ratios, mut asyncify_ratios) = (Vec::new(), Vec::new());
    let mut compiles = Vec::new();
    for counted in guests(only) {
        let original = counted.guest.build();
        let asyncified = asyncify(&original);
        let o = count(&host, &cache, &original, true, &counted.args);
        let u = count(&host, &cache, &original, false, &counted.args);
        let a = count(&host, &cache, &asyncified, true, &counted.args);
        let (ru, ra) = (u / o, a / o);
        println!("{:<9} {o:>10.1} {u:>10.1} {ru:>6.3}x {a:>10.1} {ra:>6.3}x", counted.guest.name);
        upstare_ratios.push(ru);
        asyncify_ratios.push(ra);
        compiles.push((counted.guest.name.clone(), original, asyncified));
    }
    println!("geomean: upstare {:.3}x, asyncify {:.3}x", geomean(&upstare_ratios), geomean(&asyncify_ratios));
    // SQLite runs too long under valgrind to count its run, but compiles in
    // a few minutes there.
    if only.is_none_or(|o| o == "sqlite") {
        let original = common::sqlite_guest().build();
        let asyncified = asyncify(&original);
        compiles.push(("sqlite".to_string(), original, asyncified));
    }

    println!();
    println!("compile instructions (cachegrind, one Module::new, all threads), millions");
    println!("{:<9} {:>10} {:>10} {:>7} {:>10} {:>7}", "guest", "original", "upstare", "ratio", "asyncify", "ratio");
    let (mut upstare_ratios, mut asyncify_ratios) = (Vec::new(), Vec::new());
    for (name, original, asyncified) in compiles {
        let instrumented = cache.join(format!("{name}.upstare.wasm"));
        std::fs::write(&instrumented, common::unwind_only(&std::fs::read(&original).unwrap())).unwrap();
        let o = compile_count(&original, &cache);
        let u = compile_count(&instrumented, &cache);
        let a = compile_count(&asyncified, &cache);
        let (ru, ra) = (u / o, a / o);
        println!("{name:<9} {o:>10.1} {u:>10.1} {ru:>6.3}x {a:>10.1} {ra:>6.3}x");
        upstare_ratios.push(ru);
        asyncify_ratios.push(ra);
    }
    println!("geomean: upstare {:.3}x, asyncify {:.3}x", geomean(&upstare_ratios), geomean(&asyncify_ratios));
    let _ = std::fs::remove_dir_all(&cache);
}

//! Steady-state cost of instrumentation on CPU-bound guests: the original
//! module, the module as `upstare-host` instruments it, and the module
//! after Binaryen's `wasm-opt --asyncify -O2` (the known alternative), all
//! run by the same host library and engine, interleaved, in one process.
//!
//! Prints, per guest, the median of the runs of each variant, its ratio to
//! the original, and code-section sizes. Only `Guest::run` is timed:
//! instrumentation, compilation and instantiation happen before.
//!
//! `cargo bench -p upstare-benches --bench overhead [-- ROUNDS]`
//! (default 7 rounds). Needs the guest toolchain and Binaryen's `wasm-opt`
//! (`scripts/install-toolchain` installs both).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use upstare_host::{new_engine, Exit, Guest, GuestConfig, GuestModule, LoadOptions, Stdio};

/// The guests: name, source (relative to the repository root), arguments.
const GUESTS: &[(&str, &str, &[&str])] = &[
    ("compute", "guest-examples/compute/compute.c", &[]),
    ("nbody", "benches/guests/nbody.c", &[]),
    ("interp", "benches/guests/interp.c", &[]),
    ("kernels", "benches/guests/kernels.c", &[]),
];

/// The imports the instrumenter treats as blocking, which Asyncify must
/// treat as possible unwind points too for the comparison to be fair.
fn asyncify_imports() -> String {
    upstare_instrument::WASI_BLOCKING
        .iter()
        .map(|n| format!("wasi_snapshot_preview1.{n}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn run(cmd: &mut Command) {
    let status = cmd.status().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(status.success(), "{cmd:?} failed: {status}");
}

/// Builds the original with the documented recipe, and the Asyncify variant.
fn build(name: &str, src: &str, out: &Path) -> (PathBuf, PathBuf) {
    let original = out.join(format!("{name}.wasm"));
    let cc = root().join("bin/upstare-cc");
    // compute's own build flags (guest-examples/compute/build.flags): a
    // 1 MiB shadow stack; harmless for the others.
    run(Command::new(cc).arg(root().join(src)).arg("-Wl,-z,stack-size=1048576").arg("-o").arg(&original));
    let asyncified = out.join(format!("{name}.asyncify.wasm"));
    run(Command::new("wasm-opt")
        .arg("--asyncify")
        .arg(format!("--pass-arg=asyncify-imports@{}", asyncify_imports()))
        .arg("-O2")
        .arg(&original)
        .arg("-o")
        .arg(&asyncified)
        .stderr(std::process::Stdio::null()));
    (original, asyncified)
}

/// Size of the code section's payload.
fn code_size(wasm: &[u8]) -> usize {
    for payload in wasmparser::Parser::new(0).parse_all(wasm) {
        if let Ok(wasmparser::Payload::CodeSectionStart { size, .. }) = payload {
            return size as usize;
        }
    }
    0
}

fn time_run(engine: &wasmtime::Engine, module: &GuestModule, args: &[&str]) -> Duration {
    let mut argv = vec!["guest".to_string()];
    argv.extend(args.iter().map(|a| a.to_string()));
    let mut config = GuestConfig::new(argv);
    config.stdout = Stdio::Fd(std::fs::File::create("/dev/null").unwrap().into());
    let mut guest = Guest::new(engine, module, config).unwrap();
    let start = Instant::now();
    let exit = guest.run();
    let took = start.elapsed();
    assert!(matches!(exit, Exit::Status(0)), "guest failed: {exit:?}");
    took
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    // `cargo bench` passes `--bench`; a bare number is the round count.
    let rounds: usize = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(7);
    let out = root().join("target/bench-guests");
    std::fs::create_dir_all(&out).unwrap();
    let engine = new_engine().unwrap();
    let as_is = LoadOptions { instrument: false };

    println!("{rounds} interleaved rounds per guest; median run time; code = code section bytes");
    println!(
        "{:<9} {:>10} {:>10} {:>7} {:>10} {:>7} | {:>8} {:>8} {:>6} {:>8} {:>6}",
        "guest", "original", "upstare", "ratio", "asyncify", "ratio", "code", "upstare", "ratio", "asyncify", "ratio"
    );
    let mut logs = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (name, src, args) in GUESTS {
        let (original_path, async_path) = build(name, src, &out);
        let original_bytes = std::fs::read(&original_path).unwrap();
        let async_bytes = std::fs::read(&async_path).unwrap();
        let original = GuestModule::from_bytes_with(&engine, &original_path, &original_bytes, &as_is).unwrap();
        let upstare = GuestModule::from_bytes(&engine, &original_path, &original_bytes).unwrap();
        let asyncify = GuestModule::from_bytes_with(&engine, &async_path, &async_bytes, &as_is).unwrap();
        let instrumented = upstare_instrument::instrument(&original_bytes, &Default::default()).unwrap().wasm;

        let (mut o, mut u, mut a) = (Vec::new(), Vec::new(), Vec::new());
        time_run(&engine, &original, args); // warm-up
        for _ in 0..rounds {
            o.push(time_run(&engine, &original, args));
            u.push(time_run(&engine, &upstare, args));
            a.push(time_run(&engine, &asyncify, args));
        }
        let (o, u, a) = (median(o), median(u), median(a));
        let ru = u.as_secs_f64() / o.as_secs_f64();
        let ra = a.as_secs_f64() / o.as_secs_f64();
        let (co, cu, ca) = (code_size(&original_bytes), code_size(&instrumented), code_size(&async_bytes));
        let (su, sa) = (cu as f64 / co as f64, ca as f64 / co as f64);
        println!(
            "{name:<9} {:>8.1}ms {:>8.1}ms {ru:>6.3}x {:>8.1}ms {ra:>6.3}x | {co:>8} {cu:>8} {su:>5.2}x {ca:>8} {sa:>5.2}x",
            o.as_secs_f64() * 1e3,
            u.as_secs_f64() * 1e3,
            a.as_secs_f64() * 1e3,
        );
        logs.0.push(ru.ln());
        logs.1.push(ra.ln());
        logs.2.push(su.ln());
        logs.3.push(sa.ln());
    }
    let geo = |v: &Vec<f64>| (v.iter().sum::<f64>() / v.len() as f64).exp();
    println!(
        "geomean: runtime upstare {:.3}x, asyncify {:.3}x; code upstare {:.2}x, asyncify {:.2}x",
        geo(&logs.0),
        geo(&logs.1),
        geo(&logs.2),
        geo(&logs.3)
    );
}

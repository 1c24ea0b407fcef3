//! The overhead bench's batch guests (`benches/guests/`: a bytecode
//! interpreter, floating-point loops, integer kernels) print what they print
//! as they are when unwound and rewound at every first and every seventh
//! update point (`--stress-pause 1` and `7`), on workloads small enough for
//! that. Their loops are where the instrumenter leaves bounded loops without
//! a check, so these runs also check that the remaining update points keep
//! them pausing.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::stress::unwinds;
use upstare_tests::{run_host, TempDir};

/// Builds `benches/guests/<name>.c` with `bin/upstare-cc` into `dir`.
fn bench_guest(dir: &TempDir, name: &str) -> PathBuf {
    let root = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
    let out = dir.0.join(format!("{name}.wasm"));
    let status = Command::new(root.join("bin/upstare-cc"))
        .arg(root.join("benches/guests").join(format!("{name}.c")))
        .arg("-lm")
        .arg("-o")
        .arg(&out)
        .status()
        .expect("run bin/upstare-cc");
    assert!(status.success(), "bin/upstare-cc failed on {name}");
    out
}

fn same_under_stress(name: &str, args: &[&str], periods: &[&str]) {
    let dir = TempDir::new(name);
    let wasm = bench_guest(&dir, name);
    let wasm = wasm.to_str().unwrap();
    let plain = run_host(&[&["--no-instrument", wasm], args].concat());
    assert!(
        plain.status.success(),
        "{name}: {}",
        String::from_utf8_lossy(&plain.stderr)
    );
    assert!(!plain.stdout.is_empty(), "{name} printed nothing");
    for &n in periods {
        let stressed = run_host(&[&["--stress-pause", n, wasm], args].concat());
        let stderr = String::from_utf8_lossy(&stressed.stderr);
        assert!(stressed.status.success(), "{name} N={n}: {stderr}");
        assert_eq!(
            String::from_utf8_lossy(&stressed.stdout),
            String::from_utf8_lossy(&plain.stdout),
            "{name} N={n}: output differs"
        );
        assert!(
            unwinds(&stderr) > 100,
            "{name} N={n}: too few unwinds: {stderr}"
        );
    }
}

#[test]
fn the_bench_interpreter_under_stress_prints_what_a_plain_run_prints() {
    same_under_stress("interp", &["3"], &["1", "7"]);
}

#[test]
fn the_bench_nbody_under_stress_prints_what_a_plain_run_prints() {
    same_under_stress("nbody", &["300"], &["1", "7"]);
}

/// Its smallest workload (a sieve of 2,000,000, 300,000 keys sorted, a
/// CRC over 1 MiB) unwinds 3.5 million times at N = 7, 25 s in a debug
/// build; N = 1 takes about three minutes, so it runs by hand.
#[test]
fn the_bench_kernels_under_stress_print_what_a_plain_run_prints() {
    same_under_stress("kernels", &["1"], &["7"]);
}

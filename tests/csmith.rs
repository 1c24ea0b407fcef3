//! Random C programs from Debian's `csmith`, built with `bin/upstare-cc`:
//! programs nobody here wrote, each printing a checksum of its globals.
//!
//! `csmith` and `libcsmith-dev` (its runtime headers) are installed by
//! `scripts/install-csmith` when missing; otherwise the test fails, saying
//! what to install. Programs are generated from fixed seeds with at most
//! 12 functions (more than an `-O2` build inlines into `main`); most run
//! in well under a second and reach a few hundred update points.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Once;

/// Where `libcsmith-dev` puts `csmith.h`.
const HEADERS: &str = "/usr/include/csmith";

/// Makes sure `csmith` and its headers are here (`scripts/install-csmith`
/// installs them, or fails saying what is missing).
fn install() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/install-csmith");
        let status = Command::new(&script).status().unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
        assert!(status.success(), "csmith is missing and scripts/install-csmith could not install it");
    });
}

/// The source of the random program with `seed`, in `dir`: at most 12
/// functions, no packed structs.
pub fn source(seed: u32, dir: &Path) -> PathBuf {
    generate(seed, dir, &["--max-funcs", "12", "--no-packed-struct"])
}

/// The source of the random program csmith makes from `seed` with
/// `options`, in `dir`.
pub fn generate(seed: u32, dir: &Path, options: &[&str]) -> PathBuf {
    install();
    let path = dir.join(format!("csmith-{seed}.c"));
    // csmith writes `platform.info` where it runs.
    let out = Command::new("csmith")
        .current_dir(dir)
        .args(["--seed", &seed.to_string()])
        .args(options)
        .arg("-o")
        .arg(&path)
        .output()
        .expect("csmith runs");
    assert!(out.status.success(), "csmith --seed {seed} failed: {}", String::from_utf8_lossy(&out.stderr));
    path
}

/// `source` built with `bin/upstare-cc` at optimisation level `opt`
/// (`-O2` is the documented default), next to it.
pub fn build(source: &Path, opt: &str) -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let wasm = source.with_extension(format!("{}.wasm", opt.trim_start_matches('-')));
    let out = Command::new(root.join("bin/upstare-cc"))
        .env("UPSTARE_OPT", opt)
        .arg(format!("-I{HEADERS}"))
        .arg("-w")
        .arg(source)
        .arg("-o")
        .arg(&wasm)
        .output()
        .expect("bin/upstare-cc runs");
    assert!(out.status.success(), "building {} at {opt} failed: {}", source.display(), String::from_utf8_lossy(&out.stderr));
    wasm
}

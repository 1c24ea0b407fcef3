//! Random C programs from Debian's `csmith`, built with `bin/upstare-cc`:
//! programs nobody here wrote, each printing a checksum of its globals.
//!
//! `csmith` and `libcsmith-dev` (its runtime headers) are installed with
//! apt-get when missing and this process may; otherwise the test fails,
//! saying what to install. Programs are generated from fixed seeds with
//! few functions, so each runs in well under a second and reaches a few
//! hundred update points.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Once;

/// Where `libcsmith-dev` puts `csmith.h`.
const HEADERS: &str = "/usr/include/csmith";

/// Makes sure `csmith` and its headers are here.
fn install() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let present = || {
            Command::new("csmith").arg("--version").output().is_ok_and(|o| o.status.success())
                && Path::new(HEADERS).join("csmith.h").exists()
        };
        if present() {
            return;
        }
        let root = Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0\n"));
        let apt = |args: &[&str]| {
            let mut command = match root {
                true => Command::new("apt-get"),
                false => {
                    let mut c = Command::new("sudo");
                    c.args(["-n", "apt-get"]);
                    c
                }
            };
            let _ = command.args(args).env("DEBIAN_FRONTEND", "noninteractive").output();
        };
        apt(&["update", "-qq"]);
        apt(&["install", "-y", "-qq", "csmith", "libcsmith-dev"]);
        assert!(present(), "these tests need Debian's csmith and libcsmith-dev (apt-get install csmith libcsmith-dev), and could not install them");
    });
}

/// The source of the random program with `seed`, in `dir`.
pub fn source(seed: u32, dir: &Path) -> PathBuf {
    install();
    let path = dir.join(format!("csmith-{seed}.c"));
    // csmith writes `platform.info` where it runs.
    let out = Command::new("csmith")
        .current_dir(dir)
        .args(["--seed", &seed.to_string(), "--max-funcs", "12", "--no-packed-struct", "-o"])
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

//! Builds real C guests for patchgen's tests with the project's own driver
//! (`bin/upstare-cc`), so every test reads what clang and wasm-ld emit.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// The repository root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// Compiles `source` (C) with `bin/upstare-cc` plus `flags` and returns the
/// module's bytes. `name` must be unique per test source: the output and the
/// source live under `target/patchgen-tests/`. Fails loudly if the toolchain
/// is missing (run `scripts/install-toolchain`).
pub fn build_c(name: &str, source: &str, flags: &[&str]) -> Vec<u8> {
    let dir = root().join("target/patchgen-tests");
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join(format!("{name}.c"));
    let out = dir.join(format!("{name}.wasm"));
    std::fs::write(&src, source).unwrap();
    let status = Command::new(root().join("bin/upstare-cc"))
        .args(flags)
        .arg(&src)
        .arg("-o")
        .arg(&out)
        .status()
        .expect("cannot run bin/upstare-cc (run scripts/install-toolchain)");
    assert!(status.success(), "bin/upstare-cc failed on {name}.c");
    std::fs::read(&out).unwrap()
}

/// Builds an example guest from `guest-examples/<dir>` with extra flags
/// (for instance `-DKV_VERSION=2`), as `guest-examples/build.sh` would.
pub fn build_example(dir: &str, name: &str, extra: &[&str]) -> Vec<u8> {
    let folder = root().join("guest-examples").join(dir);
    let mut flags: Vec<String> = vec!["-Wall".into()];
    if let Ok(text) = std::fs::read_to_string(folder.join("build.flags")) {
        for line in text.lines().filter(|l| !l.trim_start().starts_with('#')) {
            flags.extend(line.split_whitespace().map(String::from));
        }
    }
    flags.extend(extra.iter().map(|s| s.to_string()));
    let out_dir = root().join("target/patchgen-tests");
    std::fs::create_dir_all(&out_dir).unwrap();
    let out = out_dir.join(format!("{name}.wasm"));
    let mut cmd = Command::new(root().join("bin/upstare-cc"));
    cmd.args(&flags);
    for entry in std::fs::read_dir(&folder).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().is_some_and(|e| e == "c") {
            cmd.arg(p);
        }
    }
    let status = cmd.arg("-o").arg(&out).status().expect("cannot run bin/upstare-cc");
    assert!(status.success(), "bin/upstare-cc failed on guest-examples/{dir}");
    std::fs::read(&out).unwrap()
}

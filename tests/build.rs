//! Builds every guest the tests run, with the documented toolchain: the
//! examples through `guest-examples/build.sh`, the test-only guests in
//! `tests/guests/` through `bin/upstare-cc`, and the test-only version
//! chains in `tests/guests/chains/` (one folder each, laid out like an
//! example's) through `guest-examples/build.sh` again, and the threaded
//! guests in `tests/guests/threads/` through `bin/upstare-cc --threads`. A missing toolchain is
//! installed by the scripts or fails the build loudly; tests never skip.

use std::path::{Path, PathBuf};
use std::process::Command;

fn run(cmd: &mut Command) {
    let status = cmd.status().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(status.success(), "{cmd:?} failed with {status}");
}

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest.parent().unwrap().to_path_buf();
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("guests");
    std::fs::create_dir_all(&out).unwrap();

    run(Command::new(root.join("guest-examples/build.sh")).arg(&out));
    run(Command::new(root.join("guest-examples/build.sh")).arg(&out).arg(manifest.join("guests/chains")));
    for entry in std::fs::read_dir(manifest.join("guests")).unwrap() {
        let src = entry.unwrap().path();
        if src.extension().and_then(|e| e.to_str()) != Some("c") {
            continue;
        }
        let name = src.file_stem().unwrap().to_str().unwrap();
        run(Command::new(root.join("bin/upstare-cc"))
            .args(["-Wall", "-Wextra"])
            .arg(&src)
            .arg("-o")
            .arg(out.join(format!("{name}.wasm"))));
    }

    // Threaded guests, built for wasi-threads.
    for entry in std::fs::read_dir(manifest.join("guests/threads")).unwrap() {
        let src = entry.unwrap().path();
        let name = src.file_stem().unwrap().to_str().unwrap().to_string();
        run(Command::new(root.join("bin/upstare-cc"))
            .args(["--threads", "-Wall", "-Wextra"])
            .arg(&src)
            .arg("-o")
            .arg(out.join(format!("{name}.wasm"))));
    }

    for entry in std::fs::read_dir(manifest.join("guests/processes")).unwrap() {
        let src = entry.unwrap().path();
        let name = src.file_stem().unwrap().to_str().unwrap().to_string();
        run(Command::new(root.join("bin/upstare-cc")).args(["-Wall", "-Wextra"]).arg(&src).arg("-o").arg(out.join(format!("{name}.wasm"))));
    }

    println!("cargo:rustc-env=UPSTARE_GUESTS={}", out.display());
    for p in ["guest-examples", "bin/upstare-cc", "scripts/install-toolchain", "scripts/install-threads-sysroot"] {
        println!("cargo:rerun-if-changed={}", root.join(p).display());
    }
    println!("cargo:rerun-if-changed={}", Path::new(&manifest).join("guests").display());
}

//! Fingerprints the instrumenter's sources, so caches of instrumented
//! modules (the host keeps one on disk) are invalidated by any change to the
//! rewrite, not only by a version bump.

use std::path::Path;

fn visit(dir: &Path, files: &mut Vec<std::path::PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            visit(&path, files);
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
}

fn main() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    visit(&src, &mut files);
    files.sort();
    // FNV-1a over names and contents: stable, and enough to tell builds apart.
    let mut hash: u64 = 0xcbf29ce484222325;
    for file in &files {
        let name = file.strip_prefix(&src).unwrap_or(file).to_string_lossy().into_owned();
        for b in name.bytes().chain(std::fs::read(file).unwrap_or_default()) {
            hash ^= u64::from(b);
            hash = hash.wrapping_mul(0x100000001b3);
        }
    }
    println!("cargo:rustc-env=UPSTARE_INSTRUMENT_FINGERPRINT={hash:016x}");
    println!("cargo:rerun-if-changed=src");
}

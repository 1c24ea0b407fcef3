//! Builds real C guests for patchgen's tests with the project's own driver
//! (`bin/upstare-cc`), so every test reads what clang and wasm-ld emit.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// The repository root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// A directory of its own under `target/patchgen-tests/` for one build:
/// tests run in parallel and several build the same source, so no two
/// builds may share an output path. Removed when dropped.
struct BuildDir(PathBuf);

impl BuildDir {
    fn new(name: &str) -> Self {
        static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = root().join("target/patchgen-tests").join(format!("{name}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        BuildDir(dir)
    }
}

impl Drop for BuildDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Compiles `source` (C) with `bin/upstare-cc` plus `flags` and returns the
/// module's bytes; `name` names the files in errors. Fails loudly if the
/// toolchain is missing (run `scripts/install-toolchain`).
pub fn build_c(name: &str, source: &str, flags: &[&str]) -> Vec<u8> {
    reused(&[source, &flags.join(" ")], || build_c_now(name, source, flags))
}

fn build_c_now(name: &str, source: &str, flags: &[&str]) -> Vec<u8> {
    let build = BuildDir::new(name);
    let dir = &build.0;
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
    let mut sources: Vec<PathBuf> = std::fs::read_dir(&folder)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "c"))
        .collect();
    sources.sort();
    let mut key: Vec<String> = sources.iter().map(|p| std::fs::read_to_string(p).unwrap()).collect();
    key.push(flags.join(" "));
    let key: Vec<&str> = key.iter().map(String::as_str).collect();
    reused(&key, || {
        let build = BuildDir::new(name);
    let out = build.0.join(format!("{name}.wasm"));
        let status = Command::new(root().join("bin/upstare-cc"))
            .args(&flags)
            .args(&sources)
            .arg("-o")
            .arg(&out)
            .status()
            .expect("cannot run bin/upstare-cc");
        assert!(status.success(), "bin/upstare-cc failed on guest-examples/{dir}");
        std::fs::read(&out).unwrap()
    })
}

/// Runs `build`, or, when `UPSTARE_TEST_GUEST_CACHE` names a directory,
/// reuses what an earlier build of the same `key` (sources and flags, plus
/// the compiler driver itself) left there. Only mutation runs set it: they
/// rerun these tests hundreds of times against an unchanged toolchain, and
/// clang's time would otherwise be most of theirs. Ordinary runs always
/// build, so a toolchain change can never hide behind a stale module.
fn reused(key: &[&str], build: impl FnOnce() -> Vec<u8>) -> Vec<u8> {
    use std::hash::{Hash, Hasher};
    let Some(dir) = std::env::var_os("UPSTARE_TEST_GUEST_CACHE") else {
        return build();
    };
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut hasher);
    std::fs::read(root().join("bin/upstare-cc")).unwrap().hash(&mut hasher);
    std::env::var("UPSTARE_OPT").ok().hash(&mut hasher);
    std::env::var("UPSTARE_CC").ok().hash(&mut hasher);
    let path = PathBuf::from(dir).join(format!("{:016x}.wasm", hasher.finish()));
    if let Ok(wasm) = std::fs::read(&path) {
        return wasm;
    }
    let wasm = build();
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    // Written aside and renamed, so a parallel test never reads half a module.
    static WRITES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let partial = path.with_extension(format!("{}-{n}.partial", std::process::id()));
    std::fs::write(&partial, &wasm).unwrap();
    std::fs::rename(&partial, &path).unwrap();
    wasm
}

/// Decodes the relocated field at `at` in `bytes` the way a wasm reader
/// would: a 5-byte padded LEB (signed for the `*_SLEB` types) or a
/// little-endian u32. Returns the value and the field's width.
pub fn decode_field(bytes: &[u8], at: usize, signed: bool, leb: bool) -> (i64, usize) {
    if !leb {
        let word: [u8; 4] = bytes[at..at + 4].try_into().unwrap();
        return (u32::from_le_bytes(word) as i64, 4);
    }
    let (mut value, mut shift, mut len) = (0i64, 0u32, 0usize);
    loop {
        let byte = bytes[at + len];
        value |= ((byte & 0x7f) as i64) << shift;
        shift += 7;
        len += 1;
        if byte & 0x80 == 0 {
            break;
        }
    }
    if signed && shift < 64 && bytes[at + len - 1] & 0x40 != 0 {
        value |= -1i64 << shift;
    }
    (value, len)
}

/// Rebuilds `wasm` section by section, letting `edit` drop a section
/// (return `None`) or replace its payload. `edit` gets the section id, the
/// custom section's name (empty for others) and the payload.
pub fn edit_sections(
    wasm: &[u8],
    mut edit: impl FnMut(u8, &str, &[u8]) -> Option<Vec<u8>>,
) -> Vec<u8> {
    let mut module = wasm_encoder::Module::new();
    for payload in wasmparser::Parser::new(0).parse_all(wasm) {
        let payload = payload.unwrap();
        let Some((id, range)) = payload.as_section() else {
            continue;
        };
        let name = match &payload {
            wasmparser::Payload::CustomSection(c) => c.name().to_string(),
            _ => String::new(),
        };
        let data = if id == 0 {
            let c = match &payload {
                wasmparser::Payload::CustomSection(c) => c,
                _ => unreachable!(),
            };
            &wasm[c.data_offset()..range.end]
        } else {
            &wasm[range.clone()]
        };
        if let Some(new) = edit(id, &name, data) {
            if id == 0 {
                module.section(&wasm_encoder::CustomSection {
                    name: name.as_str().into(),
                    data: new.as_slice().into(),
                });
            } else {
                module.section(&wasm_encoder::RawSection { id, data: &new });
            }
        }
    }
    module.finish()
}

//! Fingerprints what decides the instrumenter's output: its own sources and
//! the exact versions of every crate it depends on (from the workspace's
//! Cargo.lock), so caches of instrumented modules (the host keeps one on
//! disk) are invalidated by any change to the rewrite or to the encoder and
//! parser under it, not only by a version bump.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

fn visit(dir: &Path, files: &mut Vec<PathBuf>) {
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

/// FNV-1a: stable across builds and platforms, and enough to tell builds
/// apart.
struct Fnv(u64);

impl Fnv {
    fn add(&mut self, bytes: impl IntoIterator<Item = u8>) {
        for b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x100000001b3);
        }
    }
}

/// `name version source` of every package `root` depends on, directly or
/// not, as the lockfile pins them (dev-dependencies included: the lockfile
/// does not tell them apart, and a needless cache miss is harmless).
fn locked_closure(lock: &str, root: &str) -> Result<BTreeSet<String>, String> {
    let lock: toml::Table = lock.parse().map_err(|e| format!("Cargo.lock: {e}"))?;
    let packages = lock.get("package").and_then(|p| p.as_array()).ok_or("Cargo.lock has no packages")?;
    let field = |p: &toml::Value, k: &str| p.get(k).and_then(|v| v.as_str()).unwrap_or("").to_string();
    // A dependency is named `name`, or `name version` when several
    // versions are locked.
    let mut by_name: HashMap<String, Vec<&toml::Value>> = HashMap::new();
    for p in packages {
        by_name.entry(field(p, "name")).or_default().push(p);
    }
    let find = |spec: &str| -> Option<&toml::Value> {
        let mut words = spec.split(' ');
        let candidates = by_name.get(words.next()?)?;
        match words.next() {
            Some(version) => candidates.iter().copied().find(|p| field(p, "version") == version),
            None => candidates.first().copied(),
        }
    };
    let mut seen = BTreeSet::new();
    let mut todo = vec![find(root).ok_or_else(|| format!("{root} is not in Cargo.lock"))?];
    while let Some(p) = todo.pop() {
        let id = format!("{} {} {}", field(p, "name"), field(p, "version"), field(p, "source"));
        if !seen.insert(id) {
            continue;
        }
        for dep in p.get("dependencies").and_then(|d| d.as_array()).into_iter().flatten() {
            if let Some(d) = dep.as_str().and_then(find) {
                todo.push(d);
            }
        }
    }
    Ok(seen)
}

fn main() {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let src = manifest.join("src");
    let mut files = Vec::new();
    visit(&src, &mut files);
    files.sort();
    let mut hash = Fnv(0xcbf29ce484222325);
    for file in &files {
        let name = file.strip_prefix(&src).unwrap_or(file).to_string_lossy().into_owned();
        hash.add(name.bytes().chain(std::fs::read(file).unwrap_or_default()));
    }
    // Built inside the workspace, the lockfile pins every dependency; built
    // as a published crate there is none, and the sources alone decide.
    let lock = manifest.join("../Cargo.lock");
    let mut dependencies = BTreeSet::new();
    if let Ok(text) = std::fs::read_to_string(&lock) {
        match locked_closure(&text, env!("CARGO_PKG_NAME")) {
            Ok(closure) => dependencies = closure,
            Err(e) => println!("cargo:warning=instrumenter fingerprint without dependencies: {e}"),
        }
        println!("cargo:rerun-if-changed={}", lock.display());
    }
    let dependencies: Vec<String> = dependencies.into_iter().collect();
    hash.add(dependencies.join("\n").into_bytes());
    println!("cargo:rustc-env=UPSTARE_INSTRUMENT_FINGERPRINTED_CRATES={}", dependencies.join(";"));
    println!("cargo:rustc-env=UPSTARE_INSTRUMENT_FINGERPRINT={:016x}", hash.0);
    println!("cargo:rerun-if-changed=src");
}

//! The on-disk cache of instrumented modules, keyed by the SHA-256 of the
//! input, the fingerprint of the instrumenter that rewrote it and the
//! variant (unwind-only, full or stress, [`crate::LoadOptions`]), so a
//! server restarted on the same build skips the rewrite; and, in its
//! `compiled/` directory, wasmtime's cache of the machine code compiled
//! from them, so it skips compiling too.
//!
//! The cache lives in `$UPSTARE_CACHE_DIR`, else `$XDG_CACHE_HOME/upstare`,
//! else `$HOME/.cache/upstare`. It is an optimisation only: an entry that
//! cannot be read, written or parsed is ignored and the module is
//! instrumented again, so a damaged cache never stops a guest.

use std::path::PathBuf;

use sha2::{Digest, Sha256};
use upstare_instrument::{abi, Instrumented, Metadata, Options};

use crate::module::Variant;

fn cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("UPSTARE_CACHE_DIR") {
        return Some(PathBuf::from(d));
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return Some(PathBuf::from(d).join("upstare"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache").join("upstare"))
}

/// How much compiled code the cache keeps before wasmtime's cache worker
/// removes the least recently used (every update compiles a relinked
/// module of its own, so entries accumulate).
const COMPILED_SIZE_LIMIT: u64 = 1 << 30;

/// wasmtime's cache of compiled code, in `compiled/` under `dir` (else the
/// default place). `None`, with a debug message, where it cannot be set
/// up: like the rest of this cache it only saves time.
pub(crate) fn compiled_code(dir: Option<&std::path::Path>) -> Option<wasmtime::Cache> {
    let dir = dir.map(PathBuf::from).or_else(cache_dir)?.join("compiled");
    // wasmtime requires an absolute directory.
    let dir = std::path::absolute(&dir).ok()?;
    let mut config = wasmtime::CacheConfig::new();
    config.with_directory(&dir).with_files_total_size_soft_limit(COMPILED_SIZE_LIMIT);
    wasmtime::Cache::new(config)
        .inspect_err(|e| tracing::debug!("not caching compiled code in {}: {e}", dir.display()))
        .ok()
}

/// The SHA-256 of `bytes`, which names a module in the cache and in
/// snapshots.
pub fn content_hash(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// A hash as lowercase hex.
pub fn hex(hash: &[u8]) -> String {
    hash.iter().map(|b| format!("{b:02x}")).collect()
}

/// Instruments `wasm`, whose [`content_hash`] is `hash`, with the default
/// options as `variant`, through the cache in `dir` (else the default
/// place). The variant is part of the entry's name: the variants of one
/// module differ in code, not in metadata.
pub(crate) fn instrumented(
    wasm: &[u8],
    hash: &[u8; 32],
    variant: Variant,
    dir: Option<&std::path::Path>,
) -> Result<Instrumented, upstare_instrument::Error> {
    let suffix = match variant {
        Variant::UnwindOnly => "-unwind",
        Variant::Full => "",
        Variant::Stress => "-stress",
    };
    let name = format!("{}-m{}-{}{suffix}.wasm", hex(hash), abi::METADATA_VERSION, upstare_instrument::FINGERPRINT);
    let entry = dir.map(PathBuf::from).or_else(cache_dir).map(|d| d.join(name));
    if let Some(hit) = entry.as_deref().and_then(load) {
        return Ok(hit);
    }
    let options = Options { stress: variant == Variant::Stress, unwind_only: variant == Variant::UnwindOnly, ..Options::default() };
    let out = upstare_instrument::instrument(wasm, &options)?;
    if let Some(path) = &entry {
        if let Err(e) = store(path, &out.wasm) {
            tracing::debug!("cannot cache {}: {e}", path.display());
        }
    }
    Ok(out)
}

/// An entry is the instrumented module followed by its own SHA-256, so a
/// damaged file is detected instead of run.
fn load(path: &std::path::Path) -> Option<Instrumented> {
    let mut bytes = std::fs::read(path).ok()?;
    let split = bytes.len().checked_sub(32)?;
    if Sha256::digest(&bytes[..split]).as_slice() != &bytes[split..] {
        tracing::debug!("ignoring damaged cache entry {}", path.display());
        return None;
    }
    bytes.truncate(split);
    let metadata = Metadata::from_module(&bytes).ok()?;
    Some(Instrumented { wasm: bytes, metadata })
}

/// Writes through a temporary file and a rename, so a reader never sees a
/// half-written entry.
fn store(path: &std::path::Path, module: &[u8]) -> std::io::Result<()> {
    let mut bytes = module.to_vec();
    bytes.extend_from_slice(&Sha256::digest(module));
    let dir = path.parent().ok_or_else(|| std::io::Error::other("cache path has no parent"))?;
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".tmp-{}-{}", std::process::id(), path.file_name().and_then(|n| n.to_str()).unwrap_or("entry")));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

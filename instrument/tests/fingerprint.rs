//! The cache fingerprint covers the crates that decide the instrumenter's
//! output, at the versions Cargo.lock pins: a new wasm-encoder must not
//! serve modules a previous one rewrote.

use upstare_instrument::{FINGERPRINT, FINGERPRINTED_CRATES};

/// The version Cargo.lock pins for `name` (the first, if several).
fn locked_version(name: &str) -> String {
    let lock = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.lock")).expect("Cargo.lock");
    let entry = format!("name = \"{name}\"\nversion = \"");
    let at = lock.find(&entry).unwrap_or_else(|| panic!("{name} is not in Cargo.lock")) + entry.len();
    lock[at..].split('"').next().unwrap().to_string()
}

#[test]
fn the_fingerprint_covers_the_parser_and_encoder_as_locked() {
    let crates: Vec<&str> = FINGERPRINTED_CRATES.split(';').collect();
    for name in ["wasmparser", "wasm-encoder", "thiserror"] {
        let version = locked_version(name);
        let id = format!("{name} {version} registry+https://github.com/rust-lang/crates.io-index");
        assert!(crates.contains(&id.as_str()), "{id} is not fingerprinted: {crates:?}");
    }
    assert!(crates.iter().any(|c| c.starts_with("upstare-instrument ")), "{crates:?}");
    assert_eq!(FINGERPRINT.len(), 16, "{FINGERPRINT}");
}

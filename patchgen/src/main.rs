//! `upstare-patchgen OLD.wasm NEW.wasm`: prints the update plan and its verdict.
fn main() {}

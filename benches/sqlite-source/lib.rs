//! Empty: this package exists only so that cargo fetches SQLite's sources
//! (see its Cargo.toml).

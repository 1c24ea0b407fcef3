//! Empty: this package exists only so that cargo fetches Lua's sources
//! (see its Cargo.toml).

//! Empty: this package exists only so that cargo fetches bzip2's and LZ4's
//! sources (see its Cargo.toml).

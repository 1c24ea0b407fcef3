//! Empty: this package exists only so that cargo fetches the sources of zstd-sys 2.0.14+zstd.1.5.7.

//! Empty: this package exists only so that cargo fetches the sources of libsqlite3-sys 0.40.0.

//! Loading a guest module: reading, checking and compiling it, with one
//! clear error per kind of bad input.

use std::path::{Path, PathBuf};

use wasmtime::{Engine, Module};

/// Why a module could not be loaded. Each message is one line naming the
/// file and the problem.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The module path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not a WebAssembly binary at all.
    #[error("{path} is not a WebAssembly module (it does not start with the `\\0asm` magic number)")]
    NotWasm {
        /// The module path.
        path: PathBuf,
    },
    /// The binary is malformed or does not validate.
    #[error("{path} is not a valid WebAssembly module: {reason}")]
    Invalid {
        /// The module path.
        path: PathBuf,
        /// What the validator reported, with the byte offset.
        reason: String,
    },
    /// The module is a component, or some other kind the host cannot run.
    #[error("{path}: {reason}")]
    Unsupported {
        /// The module path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The module imports something the host does not provide.
    #[error("{path} imports `{module}::{name}`, which upstare-host does not provide (it provides wasi_snapshot_preview1)")]
    UnknownImport {
        /// The module path.
        path: PathBuf,
        /// Import module name.
        module: String,
        /// Import field name.
        name: String,
    },
    /// The module has no `_start` export: it is not a WASI command.
    #[error("{path} has no `_start` export; upstare-host runs WASI commands (a C program with a main function)")]
    NoStart {
        /// The module path.
        path: PathBuf,
    },
    /// The module's imports exist but have the wrong types, or
    /// instantiation failed for another reason.
    #[error("{path} cannot be instantiated: {reason}")]
    Instantiate {
        /// The module path.
        path: PathBuf,
        /// wasmtime's reason.
        reason: String,
    },
}

/// A compiled guest module and where it came from.
#[derive(Clone)]
pub struct GuestModule {
    pub(crate) module: Module,
    pub(crate) path: PathBuf,
}

impl std::fmt::Debug for GuestModule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestModule").field("path", &self.path).finish()
    }
}

impl GuestModule {
    /// Reads, validates and compiles the module at `path`.
    pub fn load(engine: &Engine, path: &Path) -> Result<Self, LoadError> {
        let bytes = std::fs::read(path).map_err(|source| LoadError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_bytes(engine, path, &bytes)
    }

    /// Validates and compiles `bytes`; `path` names them in errors.
    pub fn from_bytes(engine: &Engine, path: &Path, bytes: &[u8]) -> Result<Self, LoadError> {
        let path = path.to_path_buf();
        if !bytes.starts_with(b"\0asm") {
            return Err(LoadError::NotWasm { path });
        }
        if wasmparser::Parser::is_component(bytes) {
            return Err(LoadError::Unsupported {
                path,
                reason: "this is a WebAssembly component; upstare-host runs core modules built for wasm32-wasi (preview1)".into(),
            });
        }
        // wasmparser gives a one-line reason with the byte offset; wasmtime's
        // own compile errors are multi-line.
        let mut validator = wasmparser::Validator::new_with_features(engine_features());
        if let Err(e) = validator.validate_all(bytes) {
            return Err(LoadError::Invalid {
                path,
                reason: format!("{} (at byte offset {:#x})", e.message(), e.offset()),
            });
        }
        let module = Module::new(engine, bytes).map_err(|e| LoadError::Invalid {
            path: path.clone(),
            reason: one_line(&e),
        })?;
        if module.get_export("_start").is_none() {
            return Err(LoadError::NoStart { path });
        }
        Ok(GuestModule { module, path })
    }

    /// The path the module was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The compiled module.
    pub fn module(&self) -> &Module {
        &self.module
    }
}

/// The wasm features the engine accepts, mirrored for the validator so both
/// agree on what is valid.
fn engine_features() -> wasmparser::WasmFeatures {
    wasmparser::WasmFeatures::default()
}

/// Flattens an error chain onto one line.
pub(crate) fn one_line(e: &wasmtime::Error) -> String {
    e.chain()
        .map(|c| c.to_string().replace('\n', " "))
        .collect::<Vec<_>>()
        .join(": ")
}

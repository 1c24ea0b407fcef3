//! Loading a guest module: reading, checking, instrumenting and compiling
//! it, with one clear error per kind of bad input.
//!
//! Every module is instrumented by `upstare-instrument` unless the caller
//! asks for it as it is ([`LoadOptions::instrument`]); the original bytes are
//! kept beside the compiled module, because its DWARF and relocations
//! describe the running code for later updates. Instrumented output is
//! cached on disk by the content hash of the input ([`crate::cache`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use upstare_instrument::Metadata;

use crate::sourcemap::SourceMap;
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
    /// The instrumenter cannot rewrite the module.
    #[error("{path} cannot be instrumented for live update: {reason} (run it with --no-instrument to run it without update support)")]
    Instrument {
        /// The module path.
        path: PathBuf,
        /// The instrumenter's reason, with the byte offset.
        reason: String,
    },
    /// The full variant of a module loaded unwind-only could not be made.
    #[error("{path}: cannot compile the code that resumes it: {reason}")]
    Rewinding {
        /// The module path.
        path: PathBuf,
        /// Why.
        reason: String,
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

/// How to load a module.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Instrument the module so it can be paused, snapshotted and updated
    /// (the default). Without it the module runs as it is: the baseline for
    /// measurements, and a blocking call the host interrupts ends the run
    /// with [`crate::Exit::Interrupted`].
    pub instrument: bool,
    /// Instrument the stress variant, whose loop headers count down to the
    /// next forced unwind ([`upstare_instrument::Options::stress`]): what
    /// [`crate::GuestConfig::stress_pause`] and
    /// [`crate::GuestConfig::stress_stop`] need. Its loop checks call out,
    /// so it runs slower than the default.
    pub stress: bool,
    /// Where instrumented modules are cached; `None` for the default place
    /// (see [`crate::cache`]).
    pub cache_dir: Option<PathBuf>,
    /// Compile only the unwind-only variant now, and the code that rewinds
    /// when the first rewind needs it ([`GuestModule::rewinding`]): about
    /// half the code and compile time of the full variant, for a program
    /// that may never be paused (the default). Without it, or with
    /// [`LoadOptions::stress`], the full variant is compiled at once.
    pub lazy_rewind: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions { instrument: true, stress: false, cache_dir: None, lazy_rewind: true }
    }
}

/// Which of the instrumenter's variants of a module is compiled: the
/// unwind-only one ([`upstare_instrument::Options::unwind_only`]), the full
/// one, or the full one's stress variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Variant {
    UnwindOnly,
    Full,
    Stress,
}

/// How a module loaded as the unwind-only variant gets its full variant:
/// instrumented and compiled once, by whichever clone of the module asks
/// first, and shared by all of them.
struct FullVariant {
    engine: Engine,
    cache_dir: Option<PathBuf>,
    compiled: std::sync::OnceLock<Result<(Module, Option<Arc<SourceMap>>), String>>,
}

/// A compiled guest module and where it came from.
#[derive(Clone)]
pub struct GuestModule {
    pub(crate) module: Module,
    pub(crate) path: PathBuf,
    /// The module as the user built it.
    pub(crate) original: Arc<Vec<u8>>,
    /// Its SHA-256, which names it in the cache and in snapshots.
    pub(crate) hash: [u8; 32],
    /// The instrumenter's metadata, for an instrumented module.
    pub(crate) metadata: Option<Arc<Metadata>>,
    /// Its [`crate::snapshot::frames_layout`], hashed once here, off any pause.
    pub(crate) frames_layout: Option<[u8; 32]>,
    /// Source lines for the instrumented code, from the original's DWARF.
    pub(crate) source_map: Option<Arc<SourceMap>>,
    /// Instrumented as the stress variant ([`LoadOptions::stress`]).
    pub(crate) stress: bool,
    /// For the unwind-only variant, its full variant, compiled on demand.
    full: Option<Arc<FullVariant>>,
    /// Its functions' names (from the name section), by index.
    names: Arc<HashMap<u32, String>>,
}

impl std::fmt::Debug for GuestModule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestModule").field("path", &self.path).finish()
    }
}

impl GuestModule {
    /// The name of function `index`, or `function <index>` for a module
    /// built without names.
    pub fn function_name(&self, index: u32) -> String {
        self.names.get(&index).cloned().unwrap_or_else(|| format!("function {index}"))
    }

    /// Whether the module starts threads (imports wasi-threads' spawn).
    pub fn spawns_threads(&self) -> bool {
        self.module
            .imports()
            .any(|i| i.module() == crate::threads::SPAWN_MODULE && i.name() == crate::threads::SPAWN_NAME)
    }

    /// Whether the module forks (imports `upstare.fork`, see `upstare.h`).
    pub fn forks(&self) -> bool {
        self.module.imports().any(|i| i.module() == upstare_instrument::abi::IMPORT_MODULE && i.name() == upstare_instrument::abi::process::FORK)
    }

    /// Reads, validates, instruments and compiles the module at `path`.
    pub fn load(engine: &Engine, path: &Path) -> Result<Self, LoadError> {
        Self::load_with(engine, path, &LoadOptions::default())
    }

    /// Reads and loads the module at `path` as `options` say.
    pub fn load_with(engine: &Engine, path: &Path, options: &LoadOptions) -> Result<Self, LoadError> {
        let bytes = std::fs::read(path).map_err(|source| LoadError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_bytes_with(engine, path, &bytes, options)
    }

    /// Validates, instruments and compiles `bytes`; `path` names them in
    /// errors.
    pub fn from_bytes(engine: &Engine, path: &Path, bytes: &[u8]) -> Result<Self, LoadError> {
        Self::from_bytes_with(engine, path, bytes, &LoadOptions::default())
    }

    /// Loads `bytes` as `options` say; `path` names them in errors.
    pub fn from_bytes_with(
        engine: &Engine,
        path: &Path,
        bytes: &[u8],
        options: &LoadOptions,
    ) -> Result<Self, LoadError> {
        Self::check_bytes(path, bytes)?;
        let path = path.to_path_buf();
        let hash = crate::cache::content_hash(bytes);
        let variant = match (options.stress, options.lazy_rewind) {
            (true, _) => Variant::Stress,
            (false, true) => Variant::UnwindOnly,
            (false, false) => Variant::Full,
        };
        let (code, metadata, source_map) = if options.instrument {
            let out = instrument(bytes, &hash, variant, options.cache_dir.as_deref(), &path)?;
            let source_map = SourceMap::new(bytes, &out.wasm).map(Arc::new);
            (out.wasm, Some(Arc::new(out.metadata)), source_map)
        } else {
            (bytes.to_vec(), None, None)
        };
        let frames_layout = metadata.is_some().then(|| crate::snapshot::frames_layout(&code)).flatten();
        let module = Module::new(engine, &code).map_err(|e| LoadError::Invalid {
            path: path.clone(),
            reason: one_line(&e),
        })?;
        if module.get_export("_start").is_none() {
            return Err(LoadError::NoStart { path });
        }
        let stress = options.instrument && options.stress;
        // Named once here, off any pause: `status` says which function each
        // paused thread stopped in. From the module as built: frames count
        // functions as it does, and the instrumented module may import
        // more functions ahead of them.
        let names = Arc::new(function_names(bytes));
        let full = (options.instrument && variant == Variant::UnwindOnly).then(|| {
            Arc::new(FullVariant { engine: engine.clone(), cache_dir: options.cache_dir.clone(), compiled: Default::default() })
        });
        Ok(GuestModule { module, path, original: Arc::new(bytes.to_vec()), hash, metadata, frames_layout, source_map, stress, full, names })
    }

    /// The module whose instances a rewind can enter: this one, or for the
    /// unwind-only variant ([`LoadOptions::lazy_rewind`]) its full variant,
    /// instrumented and compiled the first time any clone of this module
    /// asks (from the instrumentation cache, and wasmtime's cache of
    /// compiled code, when they hold it). The two share their metadata, so
    /// a stack one unwound rewinds into the other. A host calls this before
    /// it pauses the program, so that the pause does not wait for a compile.
    pub fn rewinding(&self) -> Result<GuestModule, LoadError> {
        let Some(full) = &self.full else {
            return Ok(self.clone());
        };
        let compiled = full.compiled.get_or_init(|| {
            let out = instrument(&self.original, &self.hash, Variant::Full, full.cache_dir.as_deref(), &self.path).map_err(|e| e.to_string())?;
            // Frames one variant saved are read by the other's metadata.
            if self.metadata.as_deref() != Some(&out.metadata) {
                return Err("its two instrumented variants describe different frames (a bug in UpStare, please report it)".into());
            }
            let module = Module::new(&full.engine, &out.wasm).map_err(|e| format!("{} cannot be compiled: {}", self.path.display(), one_line(&e)))?;
            Ok((module, SourceMap::new(&self.original, &out.wasm).map(Arc::new)))
        });
        let (module, source_map) = compiled.clone().map_err(|reason| LoadError::Rewinding { path: self.path.clone(), reason })?;
        Ok(GuestModule { module, source_map, full: None, ..self.clone() })
    }

    /// Whether this is the unwind-only variant: an instance of it must be
    /// replaced by one of [`GuestModule::rewinding`] before it rewinds.
    pub fn is_unwind_only(&self) -> bool {
        self.full.is_some()
    }

    /// Checks that `bytes` are a valid core module the engine accepts,
    /// without instrumenting or compiling them.
    pub fn check_bytes(path: &Path, bytes: &[u8]) -> Result<(), LoadError> {
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
        validator.validate_all(bytes).map(|_| ()).map_err(|e| LoadError::Invalid {
            path,
            reason: format!("{} (at byte offset {:#x})", e.message(), e.offset()),
        })
    }

    /// Whether the module was instrumented (it can be paused).
    pub fn is_instrumented(&self) -> bool {
        self.metadata.is_some()
    }

    /// The instrumenter's metadata, for an instrumented module.
    pub fn metadata(&self) -> Option<&Metadata> {
        self.metadata.as_deref()
    }

    /// The SHA-256 of the module as it was given, in hex.
    pub fn hash_hex(&self) -> String {
        crate::cache::hex(&self.hash)
    }

    /// The module as it was given, before instrumentation.
    pub fn original_bytes(&self) -> &[u8] {
        &self.original
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

/// Instruments `bytes` (hashed `hash`) as `variant`, through the cache.
fn instrument(bytes: &[u8], hash: &[u8; 32], variant: Variant, cache_dir: Option<&Path>, path: &Path) -> Result<upstare_instrument::Instrumented, LoadError> {
    crate::cache::instrumented(bytes, hash, variant, cache_dir).map_err(|e| LoadError::Instrument { path: path.to_path_buf(), reason: e.to_string() })
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

/// The function names in `bytes`' name section, by index: none for a
/// module built without one, and those before any part that does not read.
fn function_names(bytes: &[u8]) -> HashMap<u32, String> {
    use wasmparser::{KnownCustom, Name, Payload};
    let mut names = HashMap::new();
    for payload in wasmparser::Parser::new(0).parse_all(bytes) {
        let Ok(Payload::CustomSection(section)) = payload else { continue };
        let KnownCustom::Name(reader) = section.as_known() else { continue };
        for map in reader.into_iter().map_while(Result::ok).filter_map(|n| match n {
            Name::Function(map) => Some(map),
            _ => None,
        }) {
            names.extend(map.into_iter().map_while(Result::ok).map(|n| (n.index, n.name.to_string())));
        }
    }
    names
}

//! A guest process: one store, one instance, one WASI context, and how to
//! run it to an exit status.
//!
//! The process is the host's unit of execution: later, several of them (a
//! forking server's workers) share open objects through their fd tables and
//! are paused together.

use std::net::TcpListener;
use std::path::PathBuf;

use wasmtime::{Engine, Instance, Linker, Store};

use crate::interrupt::InterruptHandle;
use crate::module::{one_line, GuestModule, LoadError};
use crate::trap::TrapReport;
use crate::wasi::fd_table::Stdio;
use crate::wasi::{self, GuestExit, Interrupted, WasiCtx, WasiView};

/// Everything a guest is given at start: arguments, environment,
/// preopened directories and listeners, standard streams.
#[derive(Debug)]
pub struct GuestConfig {
    /// `argv`, the program name first.
    pub args: Vec<String>,
    /// Environment variables, in order.
    pub env: Vec<(String, String)>,
    /// Host directories the guest may use, with the names it sees them by.
    pub dirs: Vec<PreopenDir>,
    /// Listening sockets, installed from fd 3 in this order, before the
    /// directories (as the wasmtime CLI numbers `--tcplisten`).
    pub listeners: Vec<TcpListener>,
    /// The guest's stdin.
    pub stdin: Stdio,
    /// The guest's stdout.
    pub stdout: Stdio,
    /// The guest's stderr.
    pub stderr: Stdio,
}

/// A host directory made visible to the guest.
#[derive(Debug, Clone)]
pub struct PreopenDir {
    /// Directory on the host.
    pub host: PathBuf,
    /// The name the guest opens it by (`/data`, `.`).
    pub guest: String,
}

impl GuestConfig {
    /// A configuration with the given `argv` and the host's standard streams.
    pub fn new(args: Vec<String>) -> Self {
        GuestConfig {
            args,
            env: Vec::new(),
            dirs: Vec::new(),
            listeners: Vec::new(),
            stdin: Stdio::Inherit,
            stdout: Stdio::Inherit,
            stderr: Stdio::Inherit,
        }
    }
}

/// Why a guest process could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SetupError {
    /// The module cannot run here.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// A `--dir` could not be opened.
    #[error("cannot open directory {path} for --dir: {source}")]
    Dir {
        /// The host path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The host could not create the process's resources.
    #[error("cannot set up the guest process: {0}")]
    Host(String),
}

/// How a guest run ended.
#[derive(Debug)]
pub enum Exit {
    /// `_start` returned (status 0) or the guest called `proc_exit`.
    Status(i32),
    /// The guest trapped.
    Trap(TrapReport),
    /// The host interrupted a blocking call in a module that cannot pause.
    Interrupted {
        /// The WASI function that was blocked.
        call: &'static str,
    },
    /// The host failed while serving the guest.
    HostError(String),
}

/// The store data of a guest process.
#[derive(Debug)]
pub struct ProcessState {
    wasi: WasiCtx,
}

impl WasiView for ProcessState {
    fn wasi(&mut self) -> &mut WasiCtx {
        &mut self.wasi
    }
}

/// A guest process, instantiated and ready to run.
pub struct Guest {
    store: Store<ProcessState>,
    instance: Instance,
    interrupt: InterruptHandle,
}

impl std::fmt::Debug for Guest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guest").finish_non_exhaustive()
    }
}

impl Guest {
    /// Sets up the process's WASI state and instantiates `module`.
    pub fn new(engine: &Engine, module: &GuestModule, config: GuestConfig) -> Result<Self, SetupError> {
        let mut wasi = WasiCtx::new(config.stdin, config.stdout, config.stderr)
            .map_err(|e| SetupError::Host(e.to_string()))?;
        wasi.set_args(config.args);
        wasi.set_env(config.env);
        for listener in config.listeners {
            wasi.push_listener(listener)
                .map_err(|e| SetupError::Host(format!("cannot install a listener: {e}")))?;
        }
        for dir in &config.dirs {
            let handle = cap_std::fs::Dir::open_ambient_dir(&dir.host, cap_std::ambient_authority())
                .map_err(|source| SetupError::Dir { path: dir.host.clone(), source })?;
            wasi.push_preopen_dir(handle, &dir.guest)
                .map_err(|_| SetupError::Host("fd table full".into()))?;
        }
        let interrupt = wasi.interrupter().handle();

        let mut linker = Linker::new(engine);
        wasi::add_to_linker(&mut linker).map_err(|e| SetupError::Host(one_line(&e)))?;
        let mut store = Store::new(engine, ProcessState { wasi });
        for import in module.module.imports() {
            if linker.get(&mut store, import.module(), import.name()).is_err() {
                return Err(LoadError::UnknownImport {
                    path: module.path.clone(),
                    module: import.module().to_string(),
                    name: import.name().to_string(),
                }
                .into());
            }
        }
        let instance = linker.instantiate(&mut store, &module.module).map_err(|e| LoadError::Instantiate {
            path: module.path.clone(),
            reason: one_line(&e),
        })?;
        Ok(Guest { store, instance, interrupt })
    }

    /// A handle that interrupts the guest's blocking calls from any thread.
    pub fn interrupt_handle(&self) -> InterruptHandle {
        self.interrupt.clone()
    }

    /// The process's WASI state.
    pub fn wasi(&mut self) -> &mut WasiCtx {
        self.store.data_mut().wasi()
    }

    /// Runs `_start` to completion.
    pub fn run(&mut self) -> Exit {
        let start = match self.instance.get_typed_func::<(), ()>(&mut self.store, "_start") {
            Ok(f) => f,
            Err(e) => return Exit::HostError(format!("`_start` has the wrong type: {}", one_line(&e))),
        };
        match start.call(&mut self.store, ()) {
            Ok(()) => Exit::Status(0),
            Err(err) => classify(err),
        }
    }
}

/// Sorts the error a guest call ended with into an exit.
fn classify(err: wasmtime::Error) -> Exit {
    if let Some(GuestExit(code)) = err.downcast_ref::<GuestExit>() {
        return Exit::Status(*code);
    }
    if let Some(Interrupted { call }) = err.downcast_ref::<Interrupted>() {
        return Exit::Interrupted { call };
    }
    if err.downcast_ref::<wasmtime::Trap>().is_some() {
        return Exit::Trap(TrapReport::from_error(&err));
    }
    Exit::HostError(one_line(&err))
}

//! A guest process: one store, one instance, one WASI context, and how to
//! run it to an exit status; for an instrumented module, its control
//! memory, and pausing and resuming it at update points.
//!
//! The process is the host's unit of execution: later, several of them (a
//! forking server's workers) share open objects through their fd tables and
//! are paused together.

use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::Arc;

use upstare_instrument::abi::{control, exports, State, TypedFrame};
use upstare_instrument::Metadata;
use wasmtime::{Engine, Global, Instance, Linker, Store, TypedFunc};

use crate::interrupt::InterruptHandle;
use crate::module::{one_line, GuestModule, LoadError};
use crate::pause::{ControlMemory, PauseHandle};
use crate::program_memory::ProgramMemory;
use crate::sourcemap::SourceMap;
use crate::trap::TrapReport;
use crate::wasi::fd_table::Stdio;
use crate::wasi::{self, GuestExit, Interrupted, UnwindHooks, WasiCtx, WasiView};

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
    /// Diagnostic: unwind and immediately rewind the guest at every Nth
    /// update point it reaches (instrumented modules only).
    pub stress_pause: Option<u32>,
    /// Diagnostic: stop the guest at every Nth update point it reaches, as
    /// at a pause: [`Guest::run`] returns [`Exit::Paused`] there and
    /// [`Guest::at_stress_point`] tells it from a requested pause. What
    /// `--stress-update` and `--update-at` update the guest at.
    pub stress_stop: Option<u32>,
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
            stress_pause: None,
            stress_stop: None,
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
    /// The guest paused at an update point on the host's request
    /// ([`PauseHandle::request`]); [`Guest::frames`] lists its stack, and
    /// [`Guest::run`] resumes it.
    Paused,
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
    pub(crate) wasi: WasiCtx,
    pub(crate) hooks: Option<UnwindHooks>,
}

impl WasiView for ProcessState {
    fn wasi(&mut self) -> &mut WasiCtx {
        &mut self.wasi
    }

    fn unwind_hooks(&self) -> Option<UnwindHooks> {
        self.hooks.clone()
    }
}

/// What the host holds to unwind and rewind an instrumented instance.
pub(crate) struct Unwinder {
    pub(crate) control: ControlMemory,
    /// The program memory, which the host created.
    pub(crate) memory: ProgramMemory,
    pub(crate) metadata: Arc<Metadata>,
    pub(crate) state: Global,
    init_memory: TypedFunc<(), ()>,
    start: Option<TypedFunc<(), ()>>,
    pub(crate) stop_unwind: TypedFunc<(), ()>,
    pub(crate) start_rewind: TypedFunc<(), ()>,
    /// The frames of a paused guest, innermost first.
    pub(crate) paused: Option<Vec<TypedFrame>>,
    /// Unwinds so far (pauses and stress unwinds), for diagnostics.
    pub(crate) unwinds: u64,
    /// Whether a stress unwind stops the guest instead of rewinding it.
    pub(crate) stress_stops: bool,
    /// Whether the guest is stopped by a stress unwind, not by a request.
    pub(crate) at_stress_point: bool,
}

/// A guest process, instantiated and ready to run.
pub struct Guest {
    pub(crate) store: Store<ProcessState>,
    pub(crate) instance: Instance,
    pub(crate) interrupt: InterruptHandle,
    pub(crate) unwinder: Option<Unwinder>,
    pub(crate) started: bool,
    pub(crate) source_map: Option<Arc<SourceMap>>,
    /// The module that runs now (the next version's, after an update); its
    /// bytes and hash name the guest in snapshots.
    pub(crate) module: GuestModule,
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
            wasi.push_preopen_dir(handle, &dir.host, &dir.guest)
                .map_err(|_| SetupError::Host("fd table full".into()))?;
        }
        let interrupt = wasi.interrupter().handle();

        let mut linker = Linker::new(engine);
        wasi::add_to_linker(&mut linker).map_err(|e| SetupError::Host(one_line(&e)))?;
        let mut store = Store::new(engine, ProcessState { wasi, hooks: None });
        if (config.stress_pause.is_some() || config.stress_stop.is_some()) && module.metadata.is_some() && !module.stress {
            return Err(SetupError::Host(
                "stress mode needs the module instrumented for it (LoadOptions::stress); its loop headers would not count".into(),
            ));
        }
        let control = match &module.metadata {
            Some(meta) => Some(define_memories(&mut store, &mut linker, meta, config.stress_pause.or(config.stress_stop))?),
            None => None,
        };
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
        let unwinder = match (control, &module.metadata) {
            (Some((memory, control)), Some(metadata)) => {
                let mut unwinder = Unwinder::new(&mut store, &instance, memory, control, metadata.clone())
                    .map_err(|e| SetupError::Host(format!("instrumented module is missing a host export: {e}")))?;
                unwinder.stress_stops = config.stress_stop.is_some();
                let stop_rewind = instance
                    .get_typed_func::<(), ()>(&mut store, exports::STOP_REWIND)
                    .map_err(|e| SetupError::Host(one_line(&e)))?;
                store.data_mut().hooks = Some(UnwindHooks { state: unwinder.state, stop_rewind });
                Some(unwinder)
            }
            _ => None,
        };
        Ok(Guest {
            store,
            instance,
            interrupt,
            unwinder,
            started: false,
            source_map: module.source_map.clone(),
            module: module.clone(),
        })
    }

    /// A handle that pauses the guest from any thread; `None` for a module
    /// loaded without instrumentation.
    pub fn pause_handle(&self) -> Option<PauseHandle> {
        self.unwinder.as_ref().map(|u| PauseHandle::new(u.control.clone(), self.interrupt.clone()))
    }

    /// The stack of a paused guest, innermost frame first.
    pub fn frames(&self) -> Option<&[TypedFrame]> {
        self.unwinder.as_ref().and_then(|u| u.paused.as_deref())
    }

    /// The module the guest runs now.
    pub fn module(&self) -> &GuestModule {
        &self.module
    }

    /// The engine the guest runs on.
    pub fn engine(&self) -> &Engine {
        self.store.engine()
    }

    /// Whether the guest is paused at a stress point
    /// ([`GuestConfig::stress_stop`]) rather than at a requested pause.
    pub fn at_stress_point(&self) -> bool {
        self.unwinder.as_ref().is_some_and(|u| u.paused.is_some() && u.at_stress_point)
    }

    /// Stops counting update points for [`GuestConfig::stress_stop`]: the
    /// guest runs on without stopping again.
    pub fn end_stress(&self) {
        if let Some(u) = &self.unwinder {
            u.control.stop_stress();
        }
    }

    /// How many times the guest has unwound (pauses and stress unwinds).
    pub fn unwinds(&self) -> u64 {
        self.unwinder.as_ref().map_or(0, |u| u.unwinds)
    }

    /// A handle that interrupts the guest's blocking calls from any thread.
    pub fn interrupt_handle(&self) -> InterruptHandle {
        self.interrupt.clone()
    }

    /// The process's WASI state.
    pub fn wasi(&mut self) -> &mut WasiCtx {
        self.store.data_mut().wasi()
    }

    fn classify(&self, err: wasmtime::Error) -> Exit {
        classify(err, self.source_map.as_deref())
    }

    /// Runs `_start` until the guest exits, traps or pauses; after a pause,
    /// resumes it where it stopped.
    pub fn run(&mut self) -> Exit {
        let entry = match self.instance.get_typed_func::<(), ()>(&mut self.store, "_start") {
            Ok(f) => f,
            Err(e) => return Exit::HostError(format!("`_start` has the wrong type: {}", one_line(&e))),
        };
        if !self.started {
            self.started = true;
            if let Some(u) = &self.unwinder {
                // A fresh memory: apply the data segments, then the start
                // function that instantiation no longer runs.
                let (init, start) = (u.init_memory.clone(), u.start.clone());
                if let Err(e) = init.call(&mut self.store, ()) {
                    return self.classify(e);
                }
                if let Some(start) = start {
                    if let Err(e) = start.call(&mut self.store, ()) {
                        return self.classify(e);
                    }
                }
            }
        } else if let Some(u) = &mut self.unwinder {
            if u.paused.take().is_some() {
                if let Err(e) = u.prepare_rewind(&mut self.store) {
                    return self.classify(e);
                }
            }
        }
        loop {
            if let Err(err) = entry.call(&mut self.store, ()) {
                return self.classify(err);
            }
            let Some(u) = &mut self.unwinder else { return Exit::Status(0) };
            match u.after_return(&mut self.store) {
                Ok(AfterReturn::Finished) => return Exit::Status(0),
                Ok(AfterReturn::Paused) => return Exit::Paused,
                Ok(AfterReturn::Rewind) => {
                    // A stress unwind, or a stale wake-up of a blocking call
                    // with no pause behind it: continue at once.
                    if let Err(e) = u.prepare_rewind(&mut self.store) {
                        return self.classify(e);
                    }
                }
                Err(e) => return Exit::HostError(e),
            }
        }
    }
}

/// What the entry call's return meant.
pub(crate) enum AfterReturn {
    Finished,
    Paused,
    Rewind,
}

impl Unwinder {
    pub(crate) fn new(
        store: &mut Store<ProcessState>,
        instance: &Instance,
        memory: ProgramMemory,
        control: ControlMemory,
        metadata: Arc<Metadata>,
    ) -> wasmtime::Result<Self> {
        let func = |store: &mut Store<ProcessState>, name: &str| instance.get_typed_func::<(), ()>(&mut *store, name);
        let state = instance
            .get_global(&mut *store, exports::STATE)
            .ok_or_else(|| wasmtime::format_err!("no `{}` global", exports::STATE))?;
        let start = match metadata.start {
            Some(_) => Some(func(store, exports::START)?),
            None => None,
        };
        Ok(Unwinder {
            init_memory: func(store, exports::INIT_MEMORY)?,
            start,
            stop_unwind: func(store, exports::STOP_UNWIND)?,
            start_rewind: func(store, exports::START_REWIND)?,
            control,
            memory,
            metadata,
            state,
            paused: None,
            unwinds: 0,
            stress_stops: false,
            at_stress_point: false,
        })
    }

    /// After the entry call returned normally: finished, or unwound.
    pub(crate) fn after_return(&mut self, store: &mut Store<ProcessState>) -> Result<AfterReturn, String> {
        if self.state.get(&mut *store).i32() != Some(State::Unwinding as i32) {
            return Ok(AfterReturn::Finished);
        }
        self.unwinds += 1;
        self.stop_unwind.call(&mut *store, ()).map_err(|e| one_line(&e))?;
        let raw = self.control.frames().map_err(|e| format!("the guest saved an unreadable stack: {e}"))?;
        let frames = raw
            .iter()
            .map(|f| TypedFrame::new(f, &self.metadata))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("the guest saved a stack its metadata does not describe: {e}"))?;
        let requested = self.control.pause_requested();
        if requested || self.stress_stops {
            self.at_stress_point = !requested;
            self.paused = Some(frames);
            return Ok(AfterReturn::Paused);
        }
        Ok(AfterReturn::Rewind)
    }

    /// Clears the request and any stale wake-up, and starts the rewind; the
    /// caller then calls the entry point again.
    fn prepare_rewind(&mut self, store: &mut Store<ProcessState>) -> wasmtime::Result<()> {
        self.control.set_pause(false);
        store.data_mut().wasi.interrupter().take_pending();
        self.start_rewind.call(&mut *store, ())
    }
}

/// Creates the program memory and the control memory of an instrumented
/// module and defines them as its `upstare` imports.
fn define_memories(
    store: &mut Store<ProcessState>,
    linker: &mut Linker<ProcessState>,
    meta: &Metadata,
    stress: Option<u32>,
) -> Result<(ProgramMemory, ControlMemory), SetupError> {
    let host = |e: wasmtime::Error| SetupError::Host(one_line(&e));
    let memory = ProgramMemory::new(store.engine(), &meta.memory).map_err(|e| SetupError::Host(e.to_string()))?;
    let header = match stress {
        Some(n) => control::Header::stress(n.max(1)),
        None => control::Header::default(),
    };
    let control = ControlMemory::new(store.engine(), header).map_err(|e| SetupError::Host(e.to_string()))?;
    link_memories(store, linker, &memory, &control).map_err(host)?;
    Ok((memory, control))
}

/// Defines existing memories as the `upstare` imports: a new instance of a
/// program (its next version) over the memories of the running one.
pub(crate) fn link_memories(
    store: &mut Store<ProcessState>,
    linker: &mut Linker<ProcessState>,
    memory: &ProgramMemory,
    control: &ControlMemory,
) -> wasmtime::Result<()> {
    let m = upstare_instrument::abi::IMPORT_MODULE;
    linker.define(&mut *store, m, upstare_instrument::abi::MEMORY_IMPORT, memory.shared().clone())?;
    linker.define(&mut *store, m, upstare_instrument::abi::CONTROL_IMPORT, control.memory().clone())?;
    Ok(())
}

/// Sorts the error a guest call ended with into an exit.
pub(crate) fn classify(err: wasmtime::Error, source_map: Option<&SourceMap>) -> Exit {
    if let Some(GuestExit(code)) = err.downcast_ref::<GuestExit>() {
        return Exit::Status(*code);
    }
    if let Some(Interrupted { call }) = err.downcast_ref::<Interrupted>() {
        return Exit::Interrupted { call };
    }
    if err.downcast_ref::<wasmtime::Trap>().is_some() {
        return Exit::Trap(TrapReport::from_error(&err, source_map));
    }
    Exit::HostError(one_line(&err))
}

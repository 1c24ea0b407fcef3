//! A guest process: one store, one instance, one WASI context, and how to
//! run it to an exit status; for an instrumented module, its control
//! memory, and pausing and resuming it at update points.
//!
//! A program is one process with its threads ([`crate::threads`]), or, if
//! it forks, several processes, each a `Guest` of its own, sharing open
//! objects through their fd tables ([`crate::processes`]).

use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::Arc;

use upstare_instrument::abi::{control, exports, ResumeKind, State, TypedFrame};
use upstare_instrument::Metadata;
use wasmtime::{Engine, Instance, Linker, Store, TypedFunc};

use crate::fork_memory::ForkMemory;
use crate::interrupt::InterruptHandle;
use crate::module::{one_line, GuestModule, LoadError};
use crate::pause::{ControlMemory, PauseHandle};
use crate::program_memory::ProgramMemory;
use crate::sourcemap::SourceMap;
use crate::trap::TrapReport;
use crate::unwind_state::UnwindState;
use crate::wasi::fd_table::Stdio;
use crate::processes::{Membership, Processes};
use crate::threads::{SharedMemories, Threads};
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
    /// Threads a multi-threaded (wasi-threads) program may run besides its
    /// main one; a `pthread_create` past it fails with `EAGAIN`.
    pub max_threads: usize,
    /// Processes a program that forks may have at once, zombies included;
    /// a `fork` past it fails with `EAGAIN`.
    pub max_processes: usize,
    /// How a fork gives the child its memory, for a program that forks.
    pub fork_memory: ForkMemory,
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
            max_threads: crate::threads::DEFAULT_MAX_THREADS,
            max_processes: crate::processes::DEFAULT_MAX_PROCESSES,
            fork_memory: ForkMemory::default(),
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

/// The store data of one thread of a guest process.
#[derive(Debug)]
pub struct ProcessState {
    pub(crate) wasi: WasiCtx,
    pub(crate) hooks: Option<UnwindHooks>,
    /// The program's threads, for a module that spawns them.
    pub(crate) threads: Option<Arc<Threads>>,
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
    pub(crate) state: UnwindState,
    init_memory: TypedFunc<(), ()>,
    start: Option<TypedFunc<(), ()>>,
    /// The frames of a paused guest, innermost first.
    pub(crate) paused: Option<Vec<TypedFrame>>,
    /// Unwinds so far (pauses and stress unwinds), for diagnostics.
    pub(crate) unwinds: u64,
    /// Whether a stress unwind stops the guest instead of rewinding it.
    pub(crate) stress_stops: bool,
    /// Whether the guest is stopped by a stress unwind, not by a request.
    pub(crate) at_stress_point: bool,
}

/// Where a guest thread starts.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Entry {
    /// The program's main thread: `_start`.
    Main,
    /// A spawned thread: `wasi_thread_start(tid, arg)`, its shadow stack
    /// ending at `stack_top` (what `arg` points at, by wasi-libc's ABI).
    Thread { tid: u32, arg: i32, stack_top: Option<u32> },
}

/// A guest process (its main thread), instantiated and ready to run; or,
/// inside [`crate::threads`], one of its other threads.
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
    pub(crate) entry: Entry,
    /// The program's other threads, for a module that spawns them.
    pub(crate) threads: Option<Arc<Threads>>,
    /// Whether the entry function returned (rather than the guest calling
    /// `proc_exit`): a spawned thread's normal end.
    pub(crate) returned: bool,
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
        if (config.stress_pause.is_some() || config.stress_stop.is_some()) && module.metadata.is_some() && !module.stress {
            return Err(SetupError::Host(
                "stress mode needs the module instrumented for it (LoadOptions::stress); its loop headers would not count".into(),
            ));
        }
        // A program that forks rewinds at every fork, from the first one on.
        let full;
        let module = match module.forks() {
            true => {
                full = module.rewinding()?;
                &full
            }
            false => module,
        };
        let host = |e: String| SetupError::Host(e);
        let stress = config.stress_pause.or(config.stress_stop);
        let (memories, control) = match &module.metadata {
            Some(meta) => {
                let memory = match module.forks() {
                    true => ProgramMemory::for_forking_program(engine, &meta.memory, config.fork_memory),
                    false => ProgramMemory::new(engine, &meta.memory),
                };
                let memory = memory.map_err(|e| host(e.to_string()))?;
                let control = new_control(engine, stress)?;
                (Some(SharedMemories::Instrumented(memory)), Some(control))
            }
            None => (plain_shared_memory(engine, module)?, None),
        };
        let threads = match (&memories, module.spawns_threads()) {
            (Some(memories), true) => Some(Arc::new(
                Threads::new(engine, module, memories.clone(), config.max_threads, stress).map_err(|e| SetupError::Host(one_line(&e)))?,
            )),
            _ => None,
        };
        let mut guest = Guest::assemble(engine, module, wasi, memories.as_ref(), control, threads, None, Entry::Main)?;
        if let Some(u) = &mut guest.unwinder {
            u.stress_stops = config.stress_stop.is_some();
        }
        if let Some(threads) = &guest.threads {
            threads.set_main(guest.stopper());
        }
        // A program that forks: this is its first process. Only an
        // instrumented module can fork (at an unwind).
        if module.forks() && guest.unwinder.is_some() {
            let waker = guest.store.data().wasi.interrupter.clone();
            let imports = host_linker(engine, false).map_err(|e| SetupError::Host(one_line(&e)))?;
            let program = Processes::new(config.max_processes, config.fork_memory, guest.stopper(), waker, imports);
            guest.store.data_mut().wasi.process = Some(Membership { program, pid: 1, fork_requested: false, fork_result: None });
        }
        Ok(guest)
    }

    /// The other processes of the program, if it forks.
    pub fn processes(&self) -> Option<Arc<Processes>> {
        self.store.data().wasi.process.as_ref().map(|m| m.program.clone())
    }

    /// The program's processes if this is its first, which pauses, updates
    /// and resumes them with itself.
    pub(crate) fn first_process_of(&self) -> Option<Arc<Processes>> {
        self.store.data().wasi.process.as_ref().filter(|m| m.pid == 1).map(|m| m.program.clone())
    }

    /// A copy of this process, stopped where it unwound to fork: its
    /// memory, mutable globals and saved frames, in memories and a store of
    /// its own, with a copy of its fd table. Run, it rewinds from there.
    pub(crate) fn forked(&mut self) -> Result<Guest, String> {
        let (globals, frames) = self.unwound_state().map_err(|e| e.to_string())?;
        let source = self.unwinder.as_ref().map(|u| u.memory.clone()).ok_or("a module that cannot unwind cannot fork")?;
        let wasi = self.store.data().wasi.for_process().map_err(|e| format!("cannot set up the child's WASI state: {e}"))?;
        let meta = self.module.metadata.as_ref().ok_or("a module that cannot unwind cannot fork")?;
        let memory = ProgramMemory::fork_of(self.store.engine(), &meta.memory, &source).map_err(|e| format!("cannot copy the memory: {e}"))?;
        self.another_process(wasi, memory, &globals, &frames)
    }

    /// A fresh memory for another process of the program `program` runs.
    pub(crate) fn process_memory(&self, program: &Processes) -> Result<ProgramMemory, String> {
        let meta = self.module.metadata.as_ref().ok_or("a module that cannot unwind has no processes")?;
        ProgramMemory::for_forking_program(self.store.engine(), &meta.memory, program.fork_memory())
            .map_err(|e| format!("cannot create the process's memory: {e}"))
    }

    /// A new process of this guest's program (its module, not yet its
    /// process table) with `wasi`, over `memory` (already holding its
    /// bytes), with a control memory and a store of its own: run, it
    /// rewinds into `frames` with `globals`.
    pub(crate) fn another_process(
        &self,
        wasi: WasiCtx,
        memory: ProgramMemory,
        globals: &[(u32, upstare_instrument::abi::ValType, u64)],
        frames: &[u8],
    ) -> Result<Guest, String> {
        let engine = self.store.engine().clone();
        let module = self.module.rewinding().map_err(|e| e.to_string())?;
        let control = new_control(&engine, None).map_err(|e| e.to_string())?;
        let imports = self.processes().map(|p| p.imports());
        let memories = SharedMemories::Instrumented(memory);
        let mut child = Guest::assemble(&engine, &module, wasi, Some(&memories), Some(control), None, imports, Entry::Main).map_err(|e| e.to_string())?;
        child.resume_thread(globals, frames).map_err(|e| e.to_string())?;
        // Its memory is initialised already: the data segments go unused.
        let drop_data = child.instance.get_typed_func::<(), ()>(&mut child.store, exports::DROP_DATA).map_err(|e| one_line(&e))?;
        drop_data.call(&mut child.store, ()).map_err(|e| one_line(&e))?;
        Ok(child)
    }

    /// A spawned thread of the program `threads` belongs to, which will
    /// start at `wasi_thread_start(tid, arg)`.
    pub(crate) fn thread(engine: &Engine, module: &GuestModule, threads: &Arc<Threads>, wasi: WasiCtx, tid: u32, arg: i32) -> Result<Self, SetupError> {
        let (control, stack_top) = match threads.memories() {
            SharedMemories::Instrumented(memory) => {
                // The spawning thread runs on, and others too.
                let top = memory.load_u32(u64::from(upstare_patchgen::paused::thread_stack_top_address(arg as u32)));
                (Some(new_control(engine, threads.stress())?), top)
            }
            SharedMemories::Plain { .. } => (None, None),
        };
        let entry = Entry::Thread { tid, arg, stack_top };
        let mut guest = Guest::assemble(engine, module, wasi, Some(threads.memories()), control, Some(threads.clone()), None, entry)?;
        // The program's memory is already initialised and its start
        // function has run, in the main thread.
        guest.started = true;
        Ok(guest)
    }

    /// Links and instantiates one thread of a program over its memories.
    /// `imports` are the host's imports already defined (a program that
    /// forks keeps them for its processes); else they are defined here.
    #[allow(clippy::too_many_arguments)]
    fn assemble(
        engine: &Engine,
        module: &GuestModule,
        wasi: WasiCtx,
        memories: Option<&SharedMemories>,
        control: Option<ControlMemory>,
        threads: Option<Arc<Threads>>,
        imports: Option<Linker<ProcessState>>,
        entry: Entry,
    ) -> Result<Self, SetupError> {
        let host = |e: wasmtime::Error| SetupError::Host(one_line(&e));
        let interrupt = wasi.interrupter().handle();
        let mut store = Store::new(engine, ProcessState { wasi, hooks: None, threads: threads.clone() });
        let linker = match (&threads, memories, &control) {
            (Some(threads), ..) => threads.linker(&store, control.as_ref()).map_err(host)?,
            (None, Some(SharedMemories::Instrumented(memory)), Some(control)) => {
                let mut linker = match imports {
                    Some(linker) => linker,
                    None => host_linker(engine, false).map_err(host)?,
                };
                link_memories(&mut store, &mut linker, memory, control).map_err(host)?;
                linker
            }
            (None, Some(SharedMemories::Plain { module, name, memory }), _) => {
                let mut linker = host_linker(engine, false).map_err(host)?;
                linker.define(&mut store, module, name, memory.clone()).map_err(host)?;
                linker
            }
            (None, ..) => host_linker(engine, false).map_err(host)?,
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
        let unwinder = match (memories, control, &module.metadata) {
            (Some(SharedMemories::Instrumented(memory)), Some(control), Some(metadata)) => {
                let unwinder = Unwinder::new(&mut store, &instance, memory.clone(), control, metadata.clone(), !module.is_unwind_only())
                    .map_err(|e| SetupError::Host(format!("instrumented module is missing a host export: {e}")))?;
                store.data_mut().hooks = Some(UnwindHooks { state: unwinder.state.clone() });
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
            entry,
            threads,
            returned: false,
        })
    }

    /// A handle that pauses the guest from any thread; `None` for a module
    /// loaded without instrumentation.
    pub fn pause_handle(&self) -> Option<PauseHandle> {
        let processes = self.first_process_of();
        self.unwinder.as_ref().map(|u| PauseHandle::new(u.control.clone(), self.interrupt.clone(), self.threads.clone(), processes))
    }

    /// How to stop this thread at its next update point.
    pub(crate) fn stopper(&self) -> crate::threads::Stopper {
        crate::threads::Stopper { control: self.unwinder.as_ref().map(|u| u.control.clone()), interrupt: self.interrupt.clone() }
    }

    /// The program's other threads (a wasi-threads program's): their ids,
    /// states and where each is. Empty for a program that has none running.
    pub fn threads(&self) -> Vec<crate::threads::ThreadStatus> {
        self.threads.as_ref().map(|t| t.list()).unwrap_or_default()
    }

    /// Where a spawned thread's shadow stack ends; `None` for the main
    /// thread (its stack's end is in the module's layout).
    pub(crate) fn thread_stack_top(&self) -> Option<u32> {
        match self.entry {
            Entry::Thread { stack_top, .. } => stack_top,
            Entry::Main => None,
        }
    }

    /// The stack of a paused guest, innermost frame first.
    pub fn frames(&self) -> Option<&[TypedFrame]> {
        self.unwinder.as_ref().and_then(|u| u.paused.as_deref())
    }

    /// The function a paused guest stopped in (its innermost frame's).
    pub fn paused_in(&self) -> Option<String> {
        self.frames()?.first().map(|f| self.module.function_name(f.func))
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
    /// resumes it where it stopped. For a multi-threaded program, the
    /// program is paused once every thread is (this returns when they all
    /// are), a resume resumes them all, and a thread's `proc_exit` or trap
    /// is the program's exit. For the first process of a program that
    /// forks, a `kill` ends it as killed (status 128 + the signal), and its
    /// end ends the others.
    pub fn run(&mut self) -> Exit {
        let exit = self.run_program();
        let Some(m) = self.store.data().wasi.process.clone().filter(|m| m.pid == 1) else { return exit };
        let killed = m.program.killed(1);
        let exit = match (exit, killed) {
            (Exit::Paused, Some(signal)) => Exit::Status(128 + signal),
            (exit, _) => exit,
        };
        if !matches!(exit, Exit::Paused) {
            m.program.ended(1, crate::processes::wait_status(&exit, killed));
        }
        exit
    }

    /// [`Guest::run`] for the threads of this process, and for the first
    /// process of a program that forks, its other processes: the program
    /// is paused once every one of them is parked.
    fn run_program(&mut self) -> Exit {
        if let Some(processes) = self.first_process_of() {
            let exit = self.run_thread();
            if matches!(exit, Exit::Paused) {
                processes.request_pause();
                processes.wait_parked();
            }
            return exit;
        }
        let Some(threads) = self.threads.clone().filter(|_| matches!(self.entry, Entry::Main)) else {
            return self.run_thread();
        };
        let exit = self.run_thread();
        if let Some(end) = threads.take_end() {
            return end;
        }
        if matches!(exit, Exit::Paused) {
            // The main thread paused: the program pauses with it, whether
            // the request reached the others first or not (a stress stop
            // reaches none), and stays paused until a withdrawn request says
            // otherwise.
            threads.request_pause();
            threads.wait_parked();
            if let Some(end) = threads.take_end() {
                return end;
            }
        }
        exit
    }

    /// Calls the thread's entry function.
    pub(crate) fn call_entry(&mut self) -> wasmtime::Result<()> {
        match self.entry {
            Entry::Main => self.instance.get_typed_func::<(), ()>(&mut self.store, "_start")?.call(&mut self.store, ()),
            Entry::Thread { tid, arg, .. } => self
                .instance
                .get_typed_func::<(i32, i32), ()>(&mut self.store, crate::threads::START_EXPORT)?
                .call(&mut self.store, (tid as i32, arg)),
        }
    }

    /// Rewinds this thread's saved frames when it next calls its entry: on
    /// an instance of the full variant, which takes the place of an
    /// unwind-only one first ([`Guest::make_rewindable`]).
    fn start_rewind(&mut self) -> Result<(), Exit> {
        if let Err(e) = self.make_rewindable() {
            return Err(Exit::HostError(format!("cannot resume the guest: {e}")));
        }
        let Some(u) = &mut self.unwinder else { return Ok(()) };
        u.paused = None;
        let started = u.prepare_rewind(&mut self.store);
        started.map_err(|e| self.classify(e))
    }

    /// [`Guest::run`] for this thread alone.
    pub(crate) fn run_thread(&mut self) -> Exit {
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
        } else if self.unwinder.as_ref().is_some_and(|u| u.paused.is_some()) {
            if let (Some(threads), Entry::Main) = (&self.threads, self.entry) {
                threads.resume();
            }
            let membership = self.store.data().wasi.process.as_ref();
            if let Some(m) = membership.filter(|m| m.pid == 1) {
                m.program.resume();
            }
            if let Err(exit) = self.start_rewind() {
                return exit;
            }
        }
        loop {
            if let Err(err) = self.call_entry() {
                return self.classify(err);
            }
            let Some(u) = &mut self.unwinder else {
                self.returned = true;
                return Exit::Status(0);
            };
            match u.after_return(&mut self.store) {
                Ok(AfterReturn::Fork) => {
                    let result = crate::processes::fork(self);
                    if let Some(m) = self.store.data_mut().wasi.process.as_mut() {
                        m.fork_result = Some(result);
                    }
                    if let Err(exit) = self.start_rewind() {
                        return exit;
                    }
                }
                Ok(AfterReturn::Finished) => {
                    self.returned = true;
                    return Exit::Status(0);
                }
                Ok(AfterReturn::Paused) => return Exit::Paused,
                Ok(AfterReturn::Rewind) => {
                    // A stress unwind, or a stale wake-up of a blocking call
                    // with no pause behind it: continue at once.
                    if let Err(exit) = self.start_rewind() {
                        return exit;
                    }
                }
                Err(e) => return Exit::HostError(e.to_string()),
            }
        }
    }
}

/// Why the frames an unwound guest saved cannot be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AfterReturnError {
    /// Ending the unwind failed.
    #[error("{}", one_line(.0))]
    StopUnwind(#[source] wasmtime::Error),
    /// The saved stack cannot be decoded.
    #[error("the guest saved an unreadable stack: {0}")]
    Unreadable(#[source] upstare_instrument::Error),
    /// A saved frame does not match the module's metadata.
    #[error("the guest saved a stack its metadata does not describe: {0}")]
    Undescribed(#[source] upstare_instrument::Error),
}

/// What the entry call's return meant.
pub(crate) enum AfterReturn {
    Finished,
    Paused,
    Rewind,
    /// The guest unwound at its `fork`: the host forks, then rewinds it.
    Fork,
}

impl Unwinder {
    /// The unwinder of `instance`; `rewinds` is false for the unwind-only
    /// variant, which a thread leaves before it rewinds.
    pub(crate) fn new(
        store: &mut Store<ProcessState>,
        instance: &Instance,
        memory: ProgramMemory,
        control: ControlMemory,
        metadata: Arc<Metadata>,
        rewinds: bool,
    ) -> wasmtime::Result<Self> {
        let func = |store: &mut Store<ProcessState>, name: &str| instance.get_typed_func::<(), ()>(&mut *store, name);
        let state = UnwindState::of(&mut *store, instance, control.clone(), rewinds)?;
        let start = match metadata.start {
            Some(_) => Some(func(store, exports::START)?),
            None => None,
        };
        Ok(Unwinder {
            init_memory: func(store, exports::INIT_MEMORY)?,
            start,
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
    pub(crate) fn after_return(&mut self, store: &mut Store<ProcessState>) -> Result<AfterReturn, AfterReturnError> {
        if !self.state.is(&mut *store, State::Unwinding) {
            return Ok(AfterReturn::Finished);
        }
        self.unwinds += 1;
        self.state.stop_unwind(&mut *store).map_err(AfterReturnError::StopUnwind)?;
        let raw = self.control.frames().map_err(AfterReturnError::Unreadable)?;
        let frames = raw
            .iter()
            .map(|f| TypedFrame::new(f, &self.metadata))
            .collect::<Result<Vec<_>, _>>()
            .map_err(AfterReturnError::Undescribed)?;
        // An unwind the guest's `fork` asked for; a pause request stays
        // for after the fork.
        if store.data_mut().wasi.process.as_mut().is_some_and(|m| std::mem::take(&mut m.fork_requested)) {
            return Ok(AfterReturn::Fork);
        }
        // The request is served: one posted from now on is another, which
        // the next run honours. A request to pause at a blocking call only
        // is served where the guest unwound from one (its innermost frame
        // stands at the call); an unwind elsewhere leaves it for the next.
        let at_blocking_call = self.control.blocking_pause_requested() && frames.first().is_some_and(|f| self.blocks_at(f));
        let requested = self.control.take_pause() | at_blocking_call;
        if requested {
            self.control.set_blocking_pause(false);
        }
        if requested || self.stress_stops {
            self.at_stress_point = !requested;
            self.paused = Some(frames);
            return Ok(AfterReturn::Paused);
        }
        Ok(AfterReturn::Rewind)
    }

    /// Whether `innermost`, a paused guest's innermost frame, stands at a
    /// call that blocks: a blocking import, a futex wait, or a
    /// `call_indirect` (whose callee, having no frame of its own, was an
    /// import that unwound).
    fn blocks_at(&self, innermost: &TypedFrame) -> bool {
        let point = self.metadata.function(innermost.func).and_then(|f| f.resume_points.get(innermost.resume_point as usize));
        point.is_some_and(|p| matches!(p.kind, ResumeKind::BlockingCall | ResumeKind::AtomicWait | ResumeKind::CallIndirect))
    }

    /// Clears any stale wake-up and starts the rewind; the caller then calls
    /// the entry point again. A pause requested since the last one was
    /// served stays requested, its wake-up posted again, so the guest stops
    /// at its next update point whether that is a loop or a blocking call
    /// (or at its next blocking call, for a request of that).
    fn prepare_rewind(&mut self, store: &mut Store<ProcessState>) -> wasmtime::Result<()> {
        let interrupter = store.data_mut().wasi.interrupter();
        interrupter.take_pending();
        if self.control.pause_requested() || self.control.blocking_pause_requested() {
            interrupter.handle().interrupt();
        }
        self.state.start_rewind(&mut *store)
    }
}

/// A control memory for one thread of an instrumented program.
fn new_control(engine: &Engine, stress: Option<u32>) -> Result<ControlMemory, SetupError> {
    let header = match stress {
        Some(n) => control::Header::stress(n.max(1)),
        None => control::Header::default(),
    };
    ControlMemory::new(engine, header).map_err(|e| SetupError::Host(e.to_string()))
}

/// The shared memory a module run as it is imports (a wasi-threads
/// program's), created here so that every thread's instance imports the
/// same one; `None` for a module that imports no shared memory.
fn plain_shared_memory(engine: &Engine, module: &GuestModule) -> Result<Option<SharedMemories>, SetupError> {
    for import in module.module.imports() {
        if let wasmtime::ExternType::Memory(ty) = import.ty() {
            if ty.is_shared() {
                let memory = wasmtime::SharedMemory::new(engine, ty)
                    .map_err(|e| SetupError::Host(format!("cannot create the program's shared memory: {}", one_line(&e))))?;
                return Ok(Some(SharedMemories::Plain {
                    module: import.module().to_string(),
                    name: import.name().to_string(),
                    memory,
                }));
            }
        }
    }
    Ok(None)
}

/// Defines existing memories as the `upstare` imports: a new instance of a
/// program (its next version) over the memories of the running one.
/// A linker with the host's functions: WASI, the futex waits the
/// instrumenter lowers atomic waits to, the process imports, and, for a
/// program that spawns threads, `wasi.thread-spawn`. Memories are the
/// caller's to add.
pub(crate) fn host_linker(engine: &Engine, threads: bool) -> wasmtime::Result<Linker<ProcessState>> {
    let mut linker = Linker::new(engine);
    wasi::add_to_linker(&mut linker)?;
    crate::futex::add_to_linker(&mut linker)?;
    if threads {
        crate::threads::add_to_linker(&mut linker)?;
    }
    crate::processes::add_to_linker(&mut linker)?;
    Ok(linker)
}

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

//! The threads of a program (wasi-threads): spawning one when the guest
//! calls `wasi.thread-spawn`, each as its own store and instance over the
//! program's shared memory on its own OS thread; pausing and resuming them
//! with the main thread; ending the whole program when any thread exits or
//! traps.
//!
//! The main thread is the [`Guest`] the embedder runs; the others are
//! workers this module owns. A pause of the program asks every thread to
//! pause; a worker that unwinds parks until the program resumes, and the
//! main thread reports the program paused only once every worker is parked
//! (or has finished). A `proc_exit` or a trap in a worker is the program's
//! end: it is recorded here, and every thread is asked to stop.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use wasmtime::{Caller, Engine, Linker, SharedMemory, Store};

use crate::interrupt::InterruptHandle;
use crate::pause::ControlMemory;
use crate::pause_group::{lock, PauseGroup};
pub use crate::pause_group::RunState as ThreadState;
use crate::process::{host_linker, Exit, Guest, ProcessState};
use crate::program_memory::ProgramMemory;
use crate::GuestModule;

/// The import module and name of wasi-threads' spawn.
pub const SPAWN_MODULE: &str = "wasi";
/// See [`SPAWN_MODULE`].
pub const SPAWN_NAME: &str = "thread-spawn";
/// The export a new thread starts at: `wasi_thread_start(tid, arg)`.
pub const START_EXPORT: &str = "wasi_thread_start";

/// Threads a program may have running besides its main thread, unless the
/// embedder says otherwise ([`crate::GuestConfig::max_threads`]).
pub const DEFAULT_MAX_THREADS: usize = 256;

/// The most threads besides the main one any program may be allowed: each
/// holds a 64 MiB native stack reservation and an instance.
pub const MAX_THREADS: usize = 4096;

/// wasi-threads asks for a negative result on failure; wasi-libc's
/// `pthread_create` turns any into `EAGAIN`.
const SPAWN_FAILED: i32 = -6;

/// What a worker is given to reach the program's memory.
#[derive(Clone)]
pub(crate) enum SharedMemories {
    /// An instrumented module: the host's program memory (each thread gets
    /// its own control memory).
    Instrumented(ProgramMemory),
    /// A module run as it is, importing its shared memory from `module.name`.
    Plain { module: String, name: String, memory: SharedMemory },
}

/// How to ask one thread to stop at its next update point.
#[derive(Clone)]
pub(crate) struct Stopper {
    /// Its control memory; `None` for a module that cannot pause, whose
    /// blocking calls an interrupt still ends.
    pub(crate) control: Option<ControlMemory>,
    pub(crate) interrupt: InterruptHandle,
}

impl Stopper {
    /// Posts a pause request and wakes the thread's blocking call.
    pub(crate) fn ask(&self) {
        if let Some(control) = &self.control {
            control.set_pause(true);
        }
        self.interrupt.interrupt();
    }

    /// Posts a pause request, leaving the wake-up of a blocked call to the
    /// program's [`crate::interrupt::Broadcast`].
    pub(crate) fn post(&self) {
        if let Some(control) = &self.control {
            control.set_pause(true);
        }
        self.interrupt.post();
    }

    /// Withdraws a request the thread has not acted on.
    pub(crate) fn withdraw(&self) {
        if let Some(control) = &self.control {
            control.set_pause(false);
        }
        self.interrupt.withdraw();
    }
}

/// Where one thread is, as `status` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThreadStatus {
    /// Its wasi-threads id.
    pub tid: u32,
    /// Running or parked.
    pub state: ThreadState,
    /// The function it stopped in, while parked.
    pub paused_in: Option<String>,
    /// The call that may block it, while it runs and is in one.
    pub in_call: Option<&'static str>,
}

/// What the program's threads share besides the pause: thread ids and
/// the program's end.
#[derive(Default)]
struct Registry {
    next_tid: u32,
    /// The program's end, once a worker has ended it, until the main thread
    /// takes it to report.
    ended: Option<Exit>,
    /// Whether the program has ended (stays set once `ended` is taken).
    over: bool,
    /// How to stop the main thread when a worker ends the program.
    main: Option<Stopper>,
}

/// The threads of one program.
pub struct Threads {
    engine: Engine,
    /// The version new threads instantiate: the running one.
    module: Mutex<GuestModule>,
    memories: SharedMemories,
    /// The host's imports and the program's memory, defined once: a thread's
    /// link clones it and adds only its own control memory. Defining every
    /// host function again cost about 50 us, which each spawn paid and each
    /// worker added to an update's pause.
    linker: Linker<ProcessState>,
    max: usize,
    /// Header of the control memories of new threads (stress counting).
    stress: Option<u32>,
    registry: Mutex<Registry>,
    /// The workers, which pause with the main thread.
    workers: Arc<PauseGroup>,
    /// Called once when a thread other than main ends the program.
    on_end: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl std::fmt::Debug for Threads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Threads").field("max", &self.max).finish_non_exhaustive()
    }
}

impl Threads {
    pub(crate) fn new(engine: &Engine, module: &GuestModule, memories: SharedMemories, max: usize, stress: Option<u32>) -> wasmtime::Result<Self> {
        let mut linker = host_linker(engine, true)?;
        // `define` wants a store only to check types; shared memories
        // belong to the engine, so the linker is not tied to this one.
        let scratch = Store::new(engine, ProcessState { wasi: crate::wasi::WasiCtx::detached()?, hooks: None, threads: None });
        match &memories {
            SharedMemories::Instrumented(memory) => {
                linker.define(&scratch, upstare_instrument::abi::IMPORT_MODULE, upstare_instrument::abi::MEMORY_IMPORT, memory.shared().clone())?;
            }
            SharedMemories::Plain { module, name, memory } => {
                linker.define(&scratch, module, name, memory.clone())?;
            }
        }
        Ok(Threads {
            engine: engine.clone(),
            module: Mutex::new(module.clone()),
            memories,
            linker,
            max,
            stress,
            registry: Mutex::new(Registry { next_tid: 1, ..Registry::default() }),
            workers: Arc::default(),
            on_end: Mutex::new(None),
        })
    }

    fn registry(&self) -> MutexGuard<'_, Registry> {
        // Every change to the registry is a few assignments made without
        // calling out; a panic elsewhere cannot leave it half changed.
        self.registry.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records how to stop the main thread.
    pub(crate) fn set_main(&self, main: Stopper) {
        self.registry().main = Some(main);
    }

    /// What a thread of the program links against: the program's imports
    /// and, for an instrumented module, `control`, the thread's own control
    /// memory (`store` is any store of the engine; it only checks types).
    pub(crate) fn linker(&self, store: &Store<ProcessState>, control: Option<&ControlMemory>) -> wasmtime::Result<Linker<ProcessState>> {
        let mut linker = self.linker.clone();
        if let Some(control) = control {
            linker.define(store, upstare_instrument::abi::IMPORT_MODULE, upstare_instrument::abi::CONTROL_IMPORT, control.memory().clone())?;
        }
        Ok(linker)
    }

    pub(crate) fn memories(&self) -> &SharedMemories {
        &self.memories
    }

    pub(crate) fn stress(&self) -> Option<u32> {
        self.stress
    }

    /// Makes `module` the version new threads start in (after an update).
    pub(crate) fn set_module(&self, module: &GuestModule) {
        *self.module.lock().unwrap_or_else(PoisonError::into_inner) = module.clone();
    }

    /// How many workers are alive (parked or running).
    pub fn count(&self) -> usize {
        self.workers.count()
    }

    /// Where each worker is, in id order.
    pub fn list(&self) -> Vec<ThreadStatus> {
        self.workers
            .list()
            .into_iter()
            .map(|w| ThreadStatus { tid: w.id, state: w.state, paused_in: w.paused_in, in_call: w.in_call })
            .collect()
    }

    /// The guest's `wasi.thread-spawn(arg)`: starts a worker at
    /// `wasi_thread_start(tid, arg)` and returns its id, or a negative
    /// value the guest's `pthread_create` reports as `EAGAIN`.
    fn spawn(self: &Arc<Self>, parent: &ProcessState, arg: i32) -> i32 {
        let tid = {
            let mut r = self.registry();
            if r.over {
                return SPAWN_FAILED;
            }
            if self.workers.count() >= self.max {
                drop(r);
                eprintln!("upstare-host: thread-spawn refused: the program already runs {} threads besides its main one (--max-threads)", self.max);
                return SPAWN_FAILED;
            }
            // Ids are positive and below 2^29, as wasi-threads asks, and not
            // one a live thread has (after a wrap).
            let mut tid = r.next_tid;
            while self.workers.contains(tid) {
                tid = if tid >= (1 << 29) - 1 { 1 } else { tid + 1 };
            }
            r.next_tid = if tid >= (1 << 29) - 1 { 1 } else { tid + 1 };
            tid
        };
        let module = self.module.lock().unwrap_or_else(PoisonError::into_inner).clone();
        let guest = match parent.wasi.for_thread().map_err(|e| e.to_string()).and_then(|wasi| {
            Guest::thread(&self.engine, &module, self, wasi, tid, arg).map_err(|e| e.to_string())
        }) {
            Ok(g) => g,
            Err(e) => {
                eprintln!("upstare-host: thread-spawn failed: {e}");
                return SPAWN_FAILED;
            }
        };
        if let Err(e) = self.start(tid, guest, ThreadState::Running) {
            eprintln!("upstare-host: thread-spawn failed: {e}");
            return SPAWN_FAILED;
        }
        tid as i32
    }

    /// Takes in a thread of a restored program, paused in its frames; it
    /// runs once the program resumes.
    pub(crate) fn adopt(self: &Arc<Self>, tid: u32, guest: Guest) -> Result<(), String> {
        {
            let mut r = self.registry();
            r.next_tid = r.next_tid.max(tid.saturating_add(1));
        }
        self.start(tid, guest, ThreadState::Parked).map_err(|e| format!("thread {e}"))
    }

    /// Registers a worker and starts its OS thread, running or parked.
    fn start(self: &Arc<Self>, tid: u32, guest: Guest, state: ThreadState) -> Result<(), String> {
        let threads = self.clone();
        self.workers.start(tid, format!("guest-{tid}"), guest, state, move |guest| threads.drive(tid, &guest))
    }

    /// Runs a worker until it returns, parks it at each pause, and ends the
    /// program if it exits or traps.
    fn drive(&self, tid: u32, guest: &Mutex<Guest>) {
        loop {
            let (exit, returned, paused_in) = {
                let mut guest = lock(guest);
                let exit = guest.run();
                (exit, guest.returned, guest.paused_in())
            };
            match exit {
                Exit::Paused => {
                    if !self.workers.park(tid, paused_in) {
                        break;
                    }
                }
                Exit::Status(0) if returned => break,
                other => {
                    self.end(other);
                    break;
                }
            }
        }
        self.workers.leave(tid);
    }

    /// Sets what to call when a thread other than main ends the program: a
    /// main thread blocked where no request reaches it would otherwise keep
    /// its runner waiting.
    pub fn on_end(&self, call: Box<dyn FnOnce() + Send>) {
        *self.on_end.lock().unwrap_or_else(PoisonError::into_inner) = Some(call);
    }

    /// Ends the program with `exit` (the first end wins) and asks every
    /// thread to stop.
    pub(crate) fn end(&self, exit: Exit) {
        self.stop_all(exit);
        if let Some(call) = self.on_end.lock().unwrap_or_else(PoisonError::into_inner).take() {
            call();
        }
    }

    fn stop_all(&self, exit: Exit) {
        let main = {
            let mut r = self.registry();
            if r.over {
                return;
            }
            r.over = true;
            r.ended = Some(exit);
            r.main.clone()
        };
        self.workers.end();
        if let Some(main) = main {
            main.ask();
        }
    }

    /// How a worker ended the program, if one did; taken once.
    pub fn take_end(&self) -> Option<Exit> {
        self.registry().ended.take()
    }

    /// Asks every worker that is not parked already to pause (the main
    /// thread is asked by the caller); see [`PauseGroup::request_pause`].
    pub(crate) fn request_pause(&self) {
        self.workers.request_pause();
    }

    /// Withdraws a pause request; see [`PauseGroup::cancel_pause`].
    pub(crate) fn cancel_pause(&self) {
        self.workers.cancel_pause();
    }

    /// Waits until every worker is parked, the program ends, or the pause
    /// is withdrawn. Returns whether all are parked.
    pub(crate) fn wait_parked(&self) -> bool {
        self.workers.wait_parked()
    }

    /// The parked workers' guests, in id order, for an update or a
    /// snapshot of the paused program. Lock each only while the program
    /// stays paused.
    pub(crate) fn parked(&self) -> Vec<(u32, Arc<Mutex<Guest>>)> {
        self.workers.parked()
    }

    /// Lets every parked worker run again.
    pub(crate) fn resume(&self) {
        self.workers.resume();
    }
}

/// Defines `wasi.thread-spawn` for a program's stores.
pub(crate) fn add_to_linker(linker: &mut Linker<ProcessState>) -> wasmtime::Result<()> {
    linker.func_wrap(SPAWN_MODULE, SPAWN_NAME, |caller: Caller<'_, ProcessState>, arg: i32| -> i32 {
        let state = caller.data();
        match &state.threads {
            Some(threads) => threads.clone().spawn(state, arg),
            None => SPAWN_FAILED,
        }
    })?;
    Ok(())
}

//! `upstare-host` runs C programs compiled to wasm32-wasi on wasmtime, with
//! its own WASI preview1 layer, pauses them at update points, snapshots and
//! restores them, and (in a later stage) updates them while they run.
//!
//! The crate is a library first; the `upstare-host` binary is a thin CLI
//! over it. To run a guest from Rust:
//!
//! ```no_run
//! use upstare_host::{new_engine, Exit, Guest, GuestConfig, GuestModule};
//!
//! let engine = new_engine()?;
//! let module = GuestModule::load(&engine, "app.wasm".as_ref())?;
//! let mut config = GuestConfig::new(vec!["app.wasm".into()]);
//! config.env.push(("GREETING".into(), "hello".into()));
//! let mut guest = Guest::new(&engine, &module, config)?;
//! match guest.run() {
//!     Exit::Status(code) => println!("exited with {code}"),
//!     other => eprintln!("{other:?}"),
//! }
//! # Ok::<(), anyhow::Error>(())
//! ```
//!
//! Run guests on a thread with a large stack ([`GUEST_THREAD_STACK`]):
//! wasm frames live on the native stack, and C programs recurse deeply.
//!
//! Modules:
//! - [`module`]: reading, validating, instrumenting and compiling a guest;
//! - [`cache`]: the on-disk cache of instrumented modules;
//! - [`process`]: a guest process, running it, pausing and resuming it;
//! - [`pause`]: the control memory shared with an instrumented guest;
//! - [`threads`]: the threads of a wasi-threads program;
//! - [`program_memory`]: the program's linear memory, owned by the host;
//! - [`snapshot`]: a paused guest's state, its file format, restoring it;
//! - [`control`]: the control socket and its protocol;
//! - [`update`]: live update to the next version, as a transaction;
//! - [`supervise`]: a guest on its thread, control requests served beside it;
//! - [`sourcemap`]: source lines for instrumented code, from the original's DWARF;
//! - [`wasi`]: the WASI preview1 layer;
//! - [`interrupt`]: waking a blocked guest from another thread;
//! - [`futex`]: futex waits and wakes of a threads program, done by the host;
//! - [`trap`]: trap reports with backtraces;
//! - `cli`: the command line (binary only).

#![deny(missing_docs)]

pub mod cache;
pub mod control;
pub mod fork_memory;
pub mod fresh;
pub mod futex;
mod heap_conversion;
pub mod interrupt;
pub mod module;
pub mod pause;
pub mod process;
pub mod pause_group;
pub mod processes;
pub mod program_memory;
mod unwind_state;
mod rewinding;
pub mod snapshot;
pub mod sourcemap;
pub mod stress_update;
pub mod supervise;
pub mod threads;
pub mod trap;
pub mod update;
pub mod wasi;

#[doc(hidden)]
pub mod cli;

pub use interrupt::InterruptHandle;
pub use module::{GuestModule, LoadError, LoadOptions};
pub use pause::PauseHandle;
pub use snapshot::{Snapshot, SnapshotError};
pub use process::{Exit, Guest, GuestConfig, PreopenDir, SetupError};
pub use wasi::fd_table::Stdio;
/// The engine type guests are compiled with ([`new_engine`]).
pub use wasmtime::Engine;

/// Native stack size for threads that run guests.
pub const GUEST_THREAD_STACK: usize = 64 << 20;

/// How deep wasm may recurse on that stack before trapping with a stack
/// overflow; the rest is headroom for the host's own frames.
const MAX_WASM_STACK: usize = 48 << 20;

/// An engine configured the way UpStare runs guests.
pub fn new_engine() -> anyhow::Result<wasmtime::Engine> {
    Ok(wasmtime::Engine::new(&engine_config())?)
}

/// An engine as [`new_engine`] makes, which also keeps the machine code it
/// compiles on disk (wasmtime's cache, in `compiled/` under `cache_dir` or
/// the instrumentation cache's default place), so a restarted guest, or a
/// version it was updated to before, loads without compiling again.
/// Without a usable directory it is a plain [`new_engine`].
pub fn new_cached_engine(cache_dir: Option<&std::path::Path>) -> anyhow::Result<wasmtime::Engine> {
    let mut config = engine_config();
    config.cache(cache::compiled_code(cache_dir));
    Ok(wasmtime::Engine::new(&config)?)
}

fn engine_config() -> wasmtime::Config {
    let mut config = wasmtime::Config::new();
    config.wasm_backtrace_details(wasmtime::WasmBacktraceDetails::Enable);
    // The control memory of instrumented guests is a shared memory, so the
    // host can post a pause request while the guest runs.
    config.shared_memory(true);
    config.wasm_threads(true);
    // wasmtime checks the limit against the async stack even when guests
    // run synchronously.
    config.async_stack_size(MAX_WASM_STACK);
    config.max_wasm_stack(MAX_WASM_STACK);
    // `UPSTARE_PERF_MAP=1` writes /tmp/perf-PID.map, so `perf report`
    // names the guest's functions (a diagnostic of the overhead's sources).
    if std::env::var_os("UPSTARE_PERF_MAP").is_some_and(|v| v == "1") {
        config.profiler(wasmtime::ProfilingStrategy::PerfMap);
    }
    config
}

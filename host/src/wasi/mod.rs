//! The host's own `wasi_snapshot_preview1` layer.
//!
//! wasmtime-wasi's preview1 layer has no sockets and cannot be interrupted
//! from another thread, and a live-update host must be able to describe and
//! rebuild its fd table, so UpStare implements preview1 itself:
//!
//! - [`abi`]: errno values, flags and struct layouts;
//! - [`memory`]: bounds-checked access to guest memory;
//! - [`fd_table`]: what each guest fd refers to;
//! - [`fs`]: files and directories, sandboxed by cap-std preopens;
//! - [`net`]: preopened TCP listeners and accepted connections;
//! - [`pipe`]: named pipes and devices, opened and used without waiting in
//!   the kernel;
//! - [`io`]: reads and writes that dispatch on the fd's kind;
//! - [`poll`]: `poll_oneoff` over clocks, files, stdio and sockets;
//! - [`proc`]: args, environment, clocks, randomness, exit.
//!
//! Each implementation is a plain function over `(&mut WasiCtx, &mut
//! GuestMemory)` returning `Result<_, CallError>`; [`add_to_linker`] is the
//! only place that knows about wasmtime.
//!
//! Calls that can block wait through the process's
//! [`crate::interrupt::Interrupter`] and end with
//! [`CallError::Interrupted`] when the host asks; at the wasm boundary that
//! becomes an unwind of an instrumented guest ([`UnwindHooks`]), or an
//! [`Interrupted`] trap that the runner reports for one that cannot unwind.

// Each implementation takes the parameters of its preview1 import, as they
// come from the guest; some imports have more than clippy's limit.
#![allow(clippy::too_many_arguments)]

pub mod abi;
pub mod fd_table;
pub mod fs;
pub mod io;
pub mod memory;
pub mod net;
pub mod persist;
pub mod pipe;
pub mod poll;
pub mod proc;
mod linker;

pub use linker::add_to_linker;

use std::sync::Arc;

use crate::interrupt::Interrupter;
use abi::Errno;
use fd_table::{Object, SharedFdTable, StdStream, Stdio};

/// How a WASI call ended without a value for the guest.
#[derive(Debug)]
pub enum CallError {
    /// An error the guest sees as its errno.
    Errno(Errno),
    /// The host interrupted a blocking call; the guest sees nothing.
    Interrupted,
    /// The guest called `proc_exit`.
    Exit(i32),
}

impl From<Errno> for CallError {
    fn from(e: Errno) -> Self {
        CallError::Errno(e)
    }
}

impl From<std::io::Error> for CallError {
    fn from(e: std::io::Error) -> Self {
        CallError::Errno(e.into())
    }
}

/// Result of a WASI implementation function.
pub type CallResult<T = ()> = Result<T, CallError>;

/// The trap a blocking call raises when the host interrupts it in a module
/// that cannot unwind. Embedders recognise it with `downcast_ref`.
#[derive(Debug, Clone, thiserror::Error)]
#[error("guest interrupted by the host while blocked in `{call}`")]
pub struct Interrupted {
    /// The WASI function that was blocked.
    pub call: &'static str,
}

/// The trap `proc_exit` raises to stop the guest with a status.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("guest exited with status {0}")]
pub struct GuestExit(pub i32);

/// The WASI state of one thread of a process: what the process's threads
/// share (the fd table; the arguments and environment, which never change
/// once it runs) and what is the thread's own (the interrupter its blocking
/// calls wait through, the poll a pause interrupted).
#[derive(Debug)]
pub struct WasiCtx {
    pub(crate) args: Vec<String>,
    pub(crate) env: Vec<(String, String)>,
    pub(crate) fds: SharedFdTable,
    /// The futex waits of the process's threads.
    pub(crate) futexes: Arc<crate::futex::Futexes>,
    pub(crate) interrupter: Interrupter,
    /// The subscriptions of a `poll_oneoff` a pause interrupted, and the
    /// deadline it had: the same call made again on resume keeps it.
    pub(crate) interrupted_poll: Option<(Vec<u8>, Option<std::time::Instant>)>,
    /// Its place among the program's processes, for a program that forks.
    pub(crate) process: Option<crate::processes::Membership>,
}

/// What the WASI layer needs of an instrumented instance: when a blocking
/// call is interrupted, it sets the state global to UNWINDING and returns,
/// so the guest unwinds from that call (which the rewind makes again); and a
/// call entered while the state is still REWINDING (through `call_indirect`,
/// the only way a rewind reaches an import with the flag still up) ends the
/// rewind first.
#[derive(Clone)]
pub struct UnwindHooks {
    /// The instance's unwind state.
    pub(crate) state: crate::unwind_state::UnwindState,
}

impl UnwindHooks {
    /// Ends a rewind that reached a host import (its re-call after an
    /// unwind there); the hooks of the caller's instance, if it can unwind.
    pub(crate) fn end_rewind<T: WasiView>(caller: &mut wasmtime::Caller<'_, T>) -> wasmtime::Result<Option<UnwindHooks>> {
        let hooks = caller.data().unwind_hooks();
        if let Some(h) = &hooks {
            if h.state.is(&mut *caller, upstare_instrument::abi::State::Rewinding) {
                h.state.stop_rewind(&mut *caller)?;
            }
        }
        Ok(hooks)
    }

    /// Has the guest unwind from the host import it is in, which it makes
    /// again when it is rewound.
    pub(crate) fn unwind<T>(&self, caller: &mut wasmtime::Caller<'_, T>) -> wasmtime::Result<()> {
        self.state.unwind(&mut *caller)
    }
}

impl std::fmt::Debug for UnwindHooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UnwindHooks").finish_non_exhaustive()
    }
}

/// Gives the WASI layer its context inside a store's data.
pub trait WasiView {
    /// The process's WASI context.
    fn wasi(&mut self) -> &mut WasiCtx;

    /// The guest memory, for modules that import their memory instead of
    /// exporting it as `memory`.
    fn memory(&self) -> Option<wasmtime::Memory> {
        None
    }

    /// The unwind hooks of an instrumented instance; `None` for a module
    /// that cannot unwind, whose interrupted calls trap with [`Interrupted`].
    fn unwind_hooks(&self) -> Option<UnwindHooks> {
        None
    }
}

impl WasiCtx {
    /// A context with the standard streams installed at fds 0-2.
    pub fn new(stdin: Stdio, stdout: Stdio, stderr: Stdio) -> std::io::Result<Self> {
        let fds = SharedFdTable::default();
        for (index, target) in [stdin, stdout, stderr].into_iter().enumerate() {
            let stream = StdStream {
                index: index as u8,
                target,
            };
            fds.insert(Object::Std(Arc::new(stream)), 0)
                .map_err(|_| std::io::Error::other("fd table full"))?;
        }
        Ok(WasiCtx {
            args: Vec::new(),
            env: Vec::new(),
            fds,
            futexes: Arc::default(),
            interrupter: Interrupter::new()?,
            interrupted_poll: None,
            process: None,
        })
    }

    /// A context holding nothing, for a store that only checks types.
    pub(crate) fn detached() -> std::io::Result<Self> {
        Ok(WasiCtx {
            args: Vec::new(),
            env: Vec::new(),
            fds: SharedFdTable::default(),
            futexes: Arc::default(),
            interrupter: Interrupter::new()?,
            interrupted_poll: None,
            process: None,
        })
    }

    /// A context holding nothing but this one's interrupter: what a store
    /// keeps once its process has moved to another store (the next version
    /// of the program). Made at every update's pause, for every thread and
    /// process, so it makes no system call.
    pub(crate) fn stand_in(&self) -> Self {
        WasiCtx {
            args: Vec::new(),
            env: Vec::new(),
            fds: SharedFdTable::default(),
            futexes: Arc::default(),
            interrupter: self.interrupter.clone(),
            interrupted_poll: None,
            process: None,
        }
    }

    /// The context of a new thread of this process: the same fd table,
    /// arguments and environment, its own interrupter.
    pub(crate) fn for_thread(&self) -> std::io::Result<Self> {
        Ok(WasiCtx {
            args: self.args.clone(),
            env: self.env.clone(),
            fds: self.fds.clone(),
            futexes: self.futexes.clone(),
            interrupter: Interrupter::new()?,
            interrupted_poll: None,
            process: self.process.clone(),
        })
    }

    /// The context of a process forked from this one: a copy of its fd
    /// table sharing the open objects, its arguments and environment, and
    /// waits of its own. Its place among the processes is the caller's to
    /// set.
    pub(crate) fn for_process(&self) -> std::io::Result<Self> {
        Ok(WasiCtx {
            args: self.args.clone(),
            env: self.env.clone(),
            fds: self.fds.fork(),
            futexes: Arc::default(),
            interrupter: Interrupter::new()?,
            interrupted_poll: None,
            process: None,
        })
    }

    /// The guest's `argv`, program name first.
    pub fn set_args(&mut self, args: Vec<String>) {
        self.args = args;
    }

    /// The guest's environment.
    pub fn set_env(&mut self, env: Vec<(String, String)>) {
        self.env = env;
    }

    /// Installs a preopened directory (`host`, opened as `dir`) under
    /// `guest_name`, returning its fd.
    pub fn push_preopen_dir(
        &mut self,
        dir: cap_std::fs::Dir,
        host: &std::path::Path,
        guest_name: &str,
    ) -> Result<u32, Errno> {
        let open = fd_table::OpenDir {
            dir,
            preopen_name: Some(guest_name.to_string()),
            host_path: Some(host.to_path_buf()),
            guest_path: String::new(),
            listing: Default::default(),
        };
        self.fds.insert(Object::Dir(Arc::new(open)), 0)
    }

    /// Installs a preopened listener, returning its fd.
    pub fn push_listener(&mut self, socket: std::net::TcpListener) -> std::io::Result<u32> {
        socket.set_nonblocking(true)?;
        let addr = socket.local_addr()?;
        let listener = fd_table::Listener { socket, addr };
        self.fds
            .insert(Object::Listener(Arc::new(listener)), 0)
            .map_err(|_| std::io::Error::other("fd table full"))
    }

    /// The interrupter blocking calls wait through.
    pub fn interrupter(&self) -> &Interrupter {
        &self.interrupter
    }

    /// The futex table, shared with the process's other threads.
    pub fn futexes(&self) -> Arc<crate::futex::Futexes> {
        self.futexes.clone()
    }

    /// The fd table, shared with the process's other threads.
    pub fn fd_table(&self) -> &SharedFdTable {
        &self.fds
    }
}

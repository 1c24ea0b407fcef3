//! Binds the preview1 implementations into a wasmtime `Linker`.
//!
//! Every function goes through [`dispatch`], which finds the guest memory,
//! runs the implementation and turns its outcome into what wasm sees: an
//! errno result, or a trap for exit and interruption.

use wasmtime::{bail, Result};
use wasmtime::{Caller, Extern, Linker};

use super::memory::GuestMemory;
use crate::program_memory::ProgramMemory;
use super::{fs, io, net, poll, proc};
use super::{CallError, CallResult, GuestExit, Interrupted, UnwindHooks, WasiCtx, WasiView};

/// The import module name of WASI preview1.
pub const MODULE: &str = "wasi_snapshot_preview1";

/// Runs one WASI implementation against the caller's memory and context.
fn dispatch<T: WasiView>(
    caller: &mut Caller<'_, T>,
    name: &'static str,
    f: impl FnOnce(&mut WasiCtx, &mut GuestMemory<'_>) -> CallResult,
) -> Result<i32> {
    let hooks = UnwindHooks::end_rewind(caller)?;
    let blocking = upstare_instrument::WASI_BLOCKING.contains(&name);
    if let Some(h) = &hooks {
        // A pause asked for before a blocking call runs stops the guest
        // here, before it runs: the call is made again once the guest
        // resumes. Calls that wait check for the request themselves; this
        // covers those that do not (a write to a file), which would
        // otherwise happen twice. An update's checked rewind, which ends
        // at the call with a pause always asked for, relies on it.
        if blocking && caller.data_mut().wasi().interrupter().take_pending() {
            h.unwind(caller)?;
            return Ok(0);
        }
    }
    // An instrumented module imports a shared program memory (and exports it
    // again as `memory`); a module run as it is exports its own.
    let export = caller.get_export("memory");
    let shared = match &export {
        Some(Extern::SharedMemory(m)) => Some(ProgramMemory::from_shared(m.clone())),
        _ => None,
    };
    let (mut mem, state): (GuestMemory<'_>, &mut T) = match (&shared, export) {
        (Some(memory), _) => (GuestMemory::shared(memory.shared().data()), caller.data_mut()),
        (None, Some(Extern::Memory(m))) => {
            let (bytes, state) = m.data_and_store_mut(&mut *caller);
            (GuestMemory::exclusive(bytes), state)
        }
        (None, _) => match caller.data().memory() {
            Some(m) => {
                let (bytes, state) = m.data_and_store_mut(&mut *caller);
                (GuestMemory::exclusive(bytes), state)
            }
            None => bail!("`{name}` needs the guest's linear memory, but the module exports none named `memory`"),
        },
    };
    let in_call = blocking.then(|| state.wasi().interrupter().enter(name));
    let outcome = f(state.wasi(), &mut mem);
    drop(in_call);
    match outcome {
        Ok(()) => Ok(0),
        Err(CallError::Errno(e)) => Ok(i32::from(e.0)),
        Err(CallError::Interrupted) => match hooks {
            // The guest ignores the result: it unwinds, and the rewind makes
            // the call again.
            Some(h) => {
                h.unwind(caller)?;
                Ok(0)
            }
            None => Err(Interrupted { call: name }.into()),
        },
        Err(CallError::Exit(code)) => Err(GuestExit(code).into()),
    }
}

/// Declares each import with its wasm parameter types and implementation.
macro_rules! register {
    ($linker:ident; $( $name:ident ( $($arg:ident : $ty:ty),* ) => $imp:path; )*) => {
        $(
            $linker.func_wrap(
                MODULE,
                stringify!($name),
                |mut caller: Caller<'_, T>, $($arg: $ty),*| -> Result<i32> {
                    dispatch(&mut caller, stringify!($name), |ctx, mem| $imp(ctx, mem, $($arg),*))
                },
            )?;
        )*
    };
}

/// Adds every `wasi_snapshot_preview1` function to `linker`.
pub fn add_to_linker<T: WasiView + 'static>(linker: &mut Linker<T>) -> Result<()> {
    register! { linker;
        args_get(argv: u32, buf: u32) => proc::args_get;
        args_sizes_get(count: u32, size: u32) => proc::args_sizes_get;
        environ_get(environ: u32, buf: u32) => proc::environ_get;
        environ_sizes_get(count: u32, size: u32) => proc::environ_sizes_get;
        clock_res_get(id: u32, out: u32) => proc::clock_res_get;
        clock_time_get(id: u32, precision: u64, out: u32) => proc::clock_time_get;
        random_get(buf: u32, len: u32) => proc::random_get;
        sched_yield() => proc::sched_yield;
        proc_raise(sig: u32) => proc::proc_raise;

        fd_advise(fd: u32, offset: u64, len: u64, advice: u32) => fs::fd_advise;
        fd_allocate(fd: u32, offset: u64, len: u64) => fs::fd_allocate;
        fd_close(fd: u32) => io::fd_close;
        fd_datasync(fd: u32) => fs::fd_datasync;
        fd_fdstat_get(fd: u32, out: u32) => io::fd_fdstat_get;
        fd_fdstat_set_flags(fd: u32, flags: u32) => io::fd_fdstat_set_flags;
        fd_fdstat_set_rights(fd: u32, base: u64, inheriting: u64) => io::fd_fdstat_set_rights;
        fd_filestat_get(fd: u32, out: u32) => fs::fd_filestat_get;
        fd_filestat_set_size(fd: u32, size: u64) => fs::fd_filestat_set_size;
        fd_filestat_set_times(fd: u32, atim: u64, mtim: u64, flags: u32) => fs::fd_filestat_set_times;
        fd_pread(fd: u32, iovs: u32, iovs_len: u32, offset: u64, out: u32) => fs::fd_pread;
        fd_pwrite(fd: u32, iovs: u32, iovs_len: u32, offset: u64, out: u32) => fs::fd_pwrite;
        fd_prestat_get(fd: u32, out: u32) => fs::fd_prestat_get;
        fd_prestat_dir_name(fd: u32, path: u32, len: u32) => fs::fd_prestat_dir_name;
        fd_read(fd: u32, iovs: u32, iovs_len: u32, out: u32) => io::fd_read;
        fd_readdir(fd: u32, buf: u32, len: u32, cookie: u64, out: u32) => fs::fd_readdir;
        fd_renumber(fd: u32, to: u32) => io::fd_renumber;
        fd_seek(fd: u32, offset: i64, whence: u32, out: u32) => fs::fd_seek;
        fd_sync(fd: u32) => fs::fd_sync;
        fd_tell(fd: u32, out: u32) => fs::fd_tell;
        fd_write(fd: u32, iovs: u32, iovs_len: u32, out: u32) => io::fd_write;

        path_create_directory(fd: u32, path: u32, len: u32) => fs::path_create_directory;
        path_filestat_get(fd: u32, flags: u32, path: u32, len: u32, out: u32) => fs::path_filestat_get;
        path_filestat_set_times(fd: u32, flags: u32, path: u32, len: u32, atim: u64, mtim: u64, fst: u32) => fs::path_filestat_set_times;
        path_link(old_fd: u32, old_flags: u32, old_path: u32, old_len: u32, new_fd: u32, new_path: u32, new_len: u32) => fs::path_link;
        path_open(fd: u32, dirflags: u32, path: u32, len: u32, oflags: u32, base: u64, inheriting: u64, fdflags: u32, out: u32) => fs::path_open;
        path_readlink(fd: u32, path: u32, len: u32, buf: u32, buf_len: u32, out: u32) => fs::path_readlink;
        path_remove_directory(fd: u32, path: u32, len: u32) => fs::path_remove_directory;
        path_rename(fd: u32, old_path: u32, old_len: u32, new_fd: u32, new_path: u32, new_len: u32) => fs::path_rename;
        path_symlink(old_path: u32, old_len: u32, fd: u32, new_path: u32, new_len: u32) => fs::path_symlink;
        path_unlink_file(fd: u32, path: u32, len: u32) => fs::path_unlink_file;

        poll_oneoff(subs: u32, events: u32, count: u32, out: u32) => poll::poll_oneoff;

        sock_accept(fd: u32, flags: u32, out: u32) => net::sock_accept;
        sock_recv(fd: u32, iovs: u32, iovs_len: u32, flags: u32, out_len: u32, out_flags: u32) => net::sock_recv;
        sock_send(fd: u32, iovs: u32, iovs_len: u32, flags: u32, out_len: u32) => net::sock_send;
        sock_shutdown(fd: u32, how: u32) => net::sock_shutdown;
    }
    linker.func_wrap(MODULE, "proc_exit", |_: Caller<'_, T>, code: u32| -> Result<()> {
        Err(GuestExit(code as i32).into())
    })?;
    Ok(())
}

//! Calls that work on any kind of fd: read, write, close, flags, renumber.
//!
//! Reads and writes dispatch on what the fd refers to; sockets, pipes and
//! stdin go through [`blocking_io`], the one loop that turns "would block"
//! into an interruptible wait or, on a non-blocking fd, into EAGAIN.

use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd};

use super::abi::{fdflags, filetype, layout, rights, Errno};
use super::fd_table::{Descriptor, Object, StdStream};
use super::memory::{iovecs_len, GuestMemory};
use super::{net, pipe, CallError, CallResult, WasiCtx};
use crate::interrupt::{Interest, Wait};

/// Largest single read or write the host performs for one call, so a guest
/// asking for gigabytes does not make the host allocate them.
pub const MAX_IO_CHUNK: usize = 1 << 20;

/// Runs `op` until it stops returning `WouldBlock`, waiting on `fd` in
/// between through the interrupter. On a non-blocking guest fd, "would block"
/// is EAGAIN instead.
pub fn blocking_io<R>(
    ctx: &WasiCtx,
    fd: BorrowedFd<'_>,
    interest: Interest,
    nonblocking: bool,
    mut op: impl FnMut() -> std::io::Result<R>,
) -> CallResult<R> {
    loop {
        match op() {
            Ok(r) => return Ok(r),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if nonblocking {
                    return Err(Errno::AGAIN.into());
                }
                if ctx.interrupter.wait(&[(fd, interest)], None)? == Wait::Interrupted {
                    return Err(CallError::Interrupted);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Reads from a host descriptor that may be in blocking mode (an inherited
/// stdin): only read once poll says it is ready, so the read cannot block
/// where the interrupter cannot reach it.
fn read_when_ready(fd: BorrowedFd<'_>, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut set = [rustix::event::PollFd::new(&fd, rustix::event::PollFlags::IN)];
    let zero = rustix::time::Timespec { tv_sec: 0, tv_nsec: 0 };
    if rustix::event::poll(&mut set, Some(&zero))? == 0 {
        return Err(std::io::ErrorKind::WouldBlock.into());
    }
    Ok(rustix::io::read(fd, buf)?)
}

fn read_std(ctx: &WasiCtx, desc: &Descriptor, stream: &StdStream, len: usize) -> CallResult<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let fd = stream.host_fd();
    let n = blocking_io(ctx, fd, Interest::Read, desc.nonblocking(), || read_when_ready(fd, &mut buf))?;
    buf.truncate(n);
    Ok(buf)
}

/// Writes to a standard stream, which may be a blocking pipe or terminal
/// the host shares with its parent (so it cannot be made non-blocking):
/// wait until it is writable through the interrupter, then write no more
/// than a pipe takes without blocking. An interruption after some bytes
/// went out is a short write, as POSIX allows, and the request stays
/// pending; before any, it is an interruption the guest does not see.
fn write_std(ctx: &WasiCtx, stream: &StdStream, data: &[u8]) -> CallResult<usize> {
    /// What a writable pipe is guaranteed to take at once (PIPE_BUF).
    const ATOMIC_PIPE_WRITE: usize = 4096;
    let fd = stream.host_fd();
    let regular = rustix::fs::fstat(fd).is_ok_and(|st| {
        rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::RegularFile
    });
    let chunk = if regular { data.len().max(1) } else { ATOMIC_PIPE_WRITE };
    let mut done = 0;
    while done < data.len() {
        if !regular && ctx.interrupter.wait(&[(fd, Interest::Write)], None)? == Wait::Interrupted {
            if done == 0 {
                return Err(CallError::Interrupted);
            }
            // The request is the next blocking call's to serve.
            ctx.interrupter.repost();
            return Ok(done);
        }
        let end = (done + chunk).min(data.len());
        match rustix::io::write(fd, &data[done..end]) {
            Ok(n) => done += n,
            Err(rustix::io::Errno::INTR) | Err(rustix::io::Errno::AGAIN) => continue,
            Err(e) => return Err(std::io::Error::from(e).into()),
        }
    }
    Ok(done)
}

/// `fd_read`
pub fn fd_read(ctx: &mut WasiCtx, mem: &mut GuestMemory<'_>, fd: u32, iovs: u32, iovs_len: u32, out: u32) -> CallResult {
    let iovs = mem.iovecs(iovs, iovs_len)?;
    let len = iovecs_len(&iovs).min(MAX_IO_CHUNK);
    let desc = ctx.fds.get(fd)?;
    let data = match &desc.object {
        Object::Std(s) => read_std(ctx, &desc, s, len)?,
        Object::File(f) => {
            if !f.readable {
                return Err(Errno::BADF.into());
            }
            let mut buf = vec![0u8; len];
            let n = (&f.file).read(&mut buf)?;
            buf.truncate(n);
            buf
        }
        Object::Pipe(p) => pipe::read(ctx, &desc, p, len)?,
        Object::Stream(s) => net::recv(ctx, &desc, s, len, false)?,
        Object::Dir(_) => return Err(Errno::ISDIR.into()),
        Object::Listener(_) => return Err(Errno::NOTCONN.into()),
    };
    mem.scatter(&iovs, &data)?;
    mem.write_u32(out, data.len() as u32)?;
    Ok(())
}

/// `fd_write`
pub fn fd_write(ctx: &mut WasiCtx, mem: &mut GuestMemory<'_>, fd: u32, iovs: u32, iovs_len: u32, out: u32) -> CallResult {
    let iovs = mem.iovecs(iovs, iovs_len)?;
    let data = mem.gather(&iovs)?;
    let desc = ctx.fds.get(fd)?;
    let n = match &desc.object {
        Object::Std(s) => write_std(ctx, s, &data)?,
        Object::File(f) => {
            if !f.writable {
                return Err(Errno::BADF.into());
            }
            (&f.file).write_all(&data)?;
            data.len()
        }
        Object::Pipe(p) => pipe::write(ctx, &desc, p, &data)?,
        Object::Stream(s) => net::send(ctx, &desc, s, &data)?,
        Object::Dir(_) => return Err(Errno::ISDIR.into()),
        Object::Listener(_) => return Err(Errno::NOTCONN.into()),
    };
    mem.write_u32(out, n as u32)?;
    Ok(())
}

/// `fd_close`
pub fn fd_close(ctx: &mut WasiCtx, _: &mut GuestMemory<'_>, fd: u32) -> CallResult {
    ctx.fds.remove(fd)?;
    Ok(())
}

/// `fd_renumber`
pub fn fd_renumber(ctx: &mut WasiCtx, _: &mut GuestMemory<'_>, fd: u32, to: u32) -> CallResult {
    ctx.fds.renumber(fd, to)?;
    Ok(())
}

/// `fd_fdstat_get`
pub fn fd_fdstat_get(ctx: &mut WasiCtx, mem: &mut GuestMemory<'_>, fd: u32, out: u32) -> CallResult {
    let desc = ctx.fds.get(fd)?;
    let kind = desc.object.filetype();
    // Rights describe what each kind of fd can do; the host does not narrow
    // them further (see fd_fdstat_set_rights).
    let seek = rights::FD_SEEK | rights::FD_TELL;
    let (base, inheriting) = match &desc.object {
        Object::Dir(_) => (rights::DIRECTORY, rights::ALL),
        Object::File(f) => {
            let read = if f.readable { rights::FD_READ } else { 0 };
            let write = if f.writable { rights::FILE_WRITE } else { 0 };
            (rights::FILE | read | write, 0)
        }
        // A FIFO or a terminal cannot seek; other devices (`/dev/null`)
        // can, and so are not taken for terminals by isatty().
        Object::Pipe(p) => {
            let read = if p.readable { rights::FD_READ } else { 0 };
            let write = if p.writable { rights::FD_WRITE } else { 0 };
            let seekable = if p.fifo || rustix::termios::isatty(p.described()) { 0 } else { seek };
            ((rights::FILE & !seek) | seekable | rights::POLL_FD_READWRITE | read | write, 0)
        }
        // wasi-libc's isatty() wants a character device that cannot seek.
        Object::Listener(_) | Object::Stream(_) => (rights::ALL & !seek, rights::ALL),
        _ if kind == filetype::CHARACTER_DEVICE => (rights::ALL & !seek, rights::ALL),
        _ => (rights::ALL, rights::ALL),
    };
    let mut buf = [0u8; layout::FDSTAT_SIZE];
    buf[0] = kind;
    buf[2..4].copy_from_slice(&desc.flags.to_le_bytes());
    buf[8..16].copy_from_slice(&base.to_le_bytes());
    buf[16..24].copy_from_slice(&inheriting.to_le_bytes());
    mem.write(out, &buf)?;
    Ok(())
}

/// `fd_fdstat_set_flags`: NONBLOCK is honoured on every kind of fd, APPEND
/// on files; the sync flags are accepted and have no further effect.
pub fn fd_fdstat_set_flags(ctx: &mut WasiCtx, _: &mut GuestMemory<'_>, fd: u32, flags: u32) -> CallResult {
    let flags = u16::try_from(flags).map_err(|_| Errno::INVAL)?;
    let desc = ctx.fds.get(fd)?;
    if let Object::File(f) = &desc.object {
        let mut host = rustix::fs::fcntl_getfl(f.file.as_fd()).map_err(std::io::Error::from)?;
        host.set(rustix::fs::OFlags::APPEND, flags & fdflags::APPEND != 0);
        rustix::fs::fcntl_setfl(f.file.as_fd(), host).map_err(std::io::Error::from)?;
    }
    ctx.fds.set_flags(fd, flags)?;
    Ok(())
}

/// `fd_fdstat_set_rights`: ENOTSUP, the answer preview1 programs take to
/// mean "this host does not narrow rights". What an fd can do follows from
/// its kind and how it was opened; the sandbox is the preopen. (Rights are
/// gone from later WASI versions.)
pub fn fd_fdstat_set_rights(ctx: &mut WasiCtx, _: &mut GuestMemory<'_>, fd: u32, _base: u64, _inheriting: u64) -> CallResult {
    ctx.fds.get(fd)?;
    Err(Errno::NOTSUP.into())
}

//! Sockets: accept on preopened listeners, and receive, send and shut down
//! on the connections accepted from them.
//!
//! Host sockets are always in non-blocking mode; a guest fd in blocking mode
//! waits in [`blocking_io`], where the host can interrupt it.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::fd::AsFd;
use std::sync::Arc;

use super::abi::{fdflags, Errno, RECV_PEEK, RECV_WAITALL, SHUT_RD, SHUT_WR};
use super::fd_table::{Descriptor, Object, Stream};
use super::io::{blocking_io, MAX_IO_CHUNK};
use super::memory::{iovecs_len, GuestMemory};
use super::{CallResult, WasiCtx};
use crate::interrupt::Interest;

/// Receives up to `len` bytes; an empty result is end of stream.
pub fn recv(ctx: &WasiCtx, desc: &Descriptor, stream: &Stream, len: usize, peek: bool) -> CallResult<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let n = blocking_io(ctx, stream.socket.as_fd(), Interest::Read, desc.nonblocking(), || {
        if peek {
            stream.socket.peek(&mut buf)
        } else {
            (&stream.socket).read(&mut buf)
        }
    })?;
    buf.truncate(n);
    Ok(buf)
}

/// Sends `data`, returning how much the socket took. A blocking fd waits
/// until at least some of it is taken, as POSIX `send` does.
pub fn send(ctx: &WasiCtx, desc: &Descriptor, stream: &Stream, data: &[u8]) -> CallResult<usize> {
    if data.is_empty() {
        return Ok(0);
    }
    let n = blocking_io(ctx, stream.socket.as_fd(), Interest::Write, desc.nonblocking(), || {
        (&stream.socket).write(data)
    })?;
    Ok(n)
}

fn stream_of(ctx: &WasiCtx, fd: u32) -> CallResult<(Descriptor, Arc<Stream>)> {
    let desc = ctx.fds.get(fd)?;
    match &desc.object {
        Object::Stream(s) => {
            let s = s.clone();
            Ok((desc, s))
        }
        _ => Err(Errno::NOTSOCK.into()),
    }
}

/// `sock_accept`: the new fd is non-blocking when `flags` says so.
pub fn sock_accept(ctx: &mut WasiCtx, mem: &mut GuestMemory<'_>, fd: u32, flags: u32, out: u32) -> CallResult {
    let flags = u16::try_from(flags).map_err(|_| Errno::INVAL)?;
    if flags & !fdflags::NONBLOCK != 0 {
        return Err(Errno::INVAL.into());
    }
    let desc = ctx.fds.get(fd)?;
    let Object::Listener(listener) = &desc.object else {
        return Err(Errno::NOTSOCK.into());
    };
    let (socket, _) = blocking_io(ctx, listener.socket.as_fd(), Interest::Read, desc.nonblocking(), || {
        listener.socket.accept()
    })?;
    socket.set_nonblocking(true)?;
    // Request/response protocols on loopback stall on Nagle's delay otherwise.
    let _ = socket.set_nodelay(true);
    let new_fd = ctx.fds.insert(Object::Stream(Arc::new(Stream { socket })), flags)?;
    mem.write_u32(out, new_fd)?;
    Ok(())
}

/// `sock_recv`
pub fn sock_recv(
    ctx: &mut WasiCtx,
    mem: &mut GuestMemory<'_>,
    fd: u32,
    iovs: u32,
    iovs_len: u32,
    flags: u32,
    out_len: u32,
    out_flags: u32,
) -> CallResult {
    let flags = u16::try_from(flags).map_err(|_| Errno::INVAL)?;
    let (desc, stream) = stream_of(ctx, fd)?;
    let iovs = mem.iovecs(iovs, iovs_len)?;
    let want = iovecs_len(&iovs).min(MAX_IO_CHUNK);
    let peek = flags & RECV_PEEK != 0;
    let mut data = recv(ctx, &desc, &stream, want, peek)?;
    if flags & RECV_WAITALL != 0 && !peek {
        while data.len() < want {
            let more = recv(ctx, &desc, &stream, want - data.len(), false)?;
            if more.is_empty() {
                break;
            }
            data.extend_from_slice(&more);
        }
    }
    mem.scatter(&iovs, &data)?;
    mem.write_u32(out_len, data.len() as u32)?;
    mem.write(out_flags, &0u16.to_le_bytes())?;
    Ok(())
}

/// `sock_send`
pub fn sock_send(
    ctx: &mut WasiCtx,
    mem: &mut GuestMemory<'_>,
    fd: u32,
    iovs: u32,
    iovs_len: u32,
    _flags: u32,
    out_len: u32,
) -> CallResult {
    let (desc, stream) = stream_of(ctx, fd)?;
    let iovs = mem.iovecs(iovs, iovs_len)?;
    let data = mem.gather(&iovs)?;
    let n = send(ctx, &desc, &stream, &data)?;
    mem.write_u32(out_len, n as u32)?;
    Ok(())
}

/// `sock_shutdown`
pub fn sock_shutdown(ctx: &mut WasiCtx, _: &mut GuestMemory<'_>, fd: u32, how: u32) -> CallResult {
    let (_, stream) = stream_of(ctx, fd)?;
    let how = match how as u8 {
        SHUT_RD => Shutdown::Read,
        SHUT_WR => Shutdown::Write,
        x if x == SHUT_RD | SHUT_WR => Shutdown::Both,
        _ => return Err(Errno::INVAL.into()),
    };
    stream.socket.shutdown(how)?;
    Ok(())
}

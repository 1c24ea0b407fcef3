//! Named pipes (FIFOs) and character devices reached by path: opening them
//! without waiting in the kernel, and reading and writing them so that a
//! guest in blocking mode waits through the interrupter.
//!
//! `open(2)` of a FIFO waits for the other end, and reads and writes of a
//! FIFO or a terminal wait for data or room: all in the kernel, where no
//! pause request can reach the guest. So every path is opened with
//! `O_NONBLOCK`. Regular files go back to blocking mode at once (for them
//! it changes nothing); pipes and devices stay non-blocking on the host,
//! and the blocking the guest asked for is done here:
//!
//! - a FIFO opened for reading before any writer returns at once, and its
//!   first read waits for a writer (a non-blocking read would see an end of
//!   stream there, which a blocking open can never see);
//! - a FIFO opened for writing before any reader (`ENXIO` when
//!   non-blocking) returns at once as a pending writer, and its first write
//!   or poll waits for a reader, trying the open again every
//!   [`CONNECT_RETRY`] (the kernel has nothing to wait on for "a reader
//!   came");
//! - reads and writes that would block wait in the interrupter.
//!
//! The guest sees every call return as it would in blocking mode, except
//! that an open returns before the other end has come. A guest that asked
//! for `FDFLAGS_NONBLOCK` sees what non-blocking POSIX calls give: `ENXIO`
//! for a writer with no reader, end of stream for a reader with no writer
//! yet, `EAGAIN` for a read or write that would wait.

use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::time::Duration;

use cap_fs_ext::{FollowSymlinks, OpenOptionsFollowExt};
use cap_std::fs::{FileTypeExt, OpenOptionsExt};

use super::abi::Errno;
use super::fd_table::{Descriptor, OpenPipe, PendingWriter};
use super::io::blocking_io;
use super::{CallError, CallResult, WasiCtx};
use crate::interrupt::{Interest, Wait};

/// How often a writer waiting for its first reader tries to open the FIFO
/// again: the longest a reader waits for the guest to notice it.
pub const CONNECT_RETRY: Duration = Duration::from_millis(10);

/// What opening a path without waiting gave.
#[derive(Debug)]
pub enum Opened {
    /// A regular file, directory or block device, its host descriptor back
    /// in blocking mode.
    File(cap_std::fs::File),
    /// A FIFO or character device: see [`OpenPipe`] for the fields.
    Pipe {
        /// The host descriptor, or a pending writer's `O_PATH` one.
        file: std::fs::File,
        /// How a writer with no reader yet connects later.
        pending: Option<PendingWriter>,
        /// A FIFO rather than a character device.
        fifo: bool,
    },
}

fn nonblocking(opts: &cap_std::fs::OpenOptions) -> cap_std::fs::OpenOptions {
    let mut opts = opts.clone();
    opts.custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32);
    opts
}

fn is_fifo(dir: &cap_std::fs::Dir, path: &str, follow: FollowSymlinks) -> bool {
    super::fs::metadata_at(dir, path, follow).is_ok_and(|m| m.file_type().is_fifo())
}

/// Opens `path` below `dir` as `opts` says, without waiting in the kernel
/// for the other end of a FIFO. `write_only` is the access asked for;
/// `guest_blocking` whether the guest's fd will be in blocking mode, where
/// a FIFO with no reader gives a pending writer instead of `ENXIO`.
pub fn open(
    dir: &cap_std::fs::Dir,
    path: &str,
    opts: &cap_std::fs::OpenOptions,
    follow: FollowSymlinks,
    write_only: bool,
    guest_blocking: bool,
) -> std::io::Result<Opened> {
    let file = match dir.open_with(path, &nonblocking(opts)) {
        Ok(file) => file,
        Err(e)
            if e.raw_os_error() == Some(rustix::io::Errno::NXIO.raw_os_error())
                && write_only
                && guest_blocking
                && is_fifo(dir, path, follow) =>
        {
            let mut anchor = cap_std::fs::OpenOptions::new();
            anchor
                .read(true)
                .follow(follow)
                .custom_flags(rustix::fs::OFlags::PATH.bits() as i32);
            let file = dir.open_with(path, &anchor)?.into_std();
            let pending = PendingWriter {
                dir: dir.try_clone()?,
                path: path.to_string(),
                follow,
                connected: Default::default(),
            };
            return Ok(Opened::Pipe {
                file,
                pending: Some(pending),
                fifo: true,
            });
        }
        // Another process holds a lease on the file and has been asked to
        // give it up: a blocking open waits for that in the kernel, as it
        // always did (bounded by the kernel's lease-break-time).
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && guest_blocking => {
            dir.open_with(path, opts)?
        }
        Err(e) => return Err(e),
    };
    let kind = file.metadata()?.file_type();
    if kind.is_fifo() || kind.is_char_device() {
        return Ok(Opened::Pipe {
            file: file.into_std(),
            pending: None,
            fifo: kind.is_fifo(),
        });
    }
    let flags = rustix::fs::fcntl_getfl(&file)?;
    rustix::fs::fcntl_setfl(&file, flags - rustix::fs::OFlags::NONBLOCK)?;
    Ok(Opened::File(file))
}

/// The descriptor reads and writes of `pipe` use, opening a pending
/// writer's FIFO if a reader has come; `None` while there is still none.
pub fn try_connect(pipe: &OpenPipe) -> std::io::Result<Option<&std::fs::File>> {
    let Some(pending) = &pipe.pending else {
        return Ok(Some(&pipe.file));
    };
    if let Some(file) = pending.connected.get() {
        return Ok(Some(file));
    }
    let mut opts = cap_std::fs::OpenOptions::new();
    opts.write(true).follow(pending.follow);
    match pending.dir.open_with(&pending.path, &nonblocking(&opts)) {
        Ok(file) => Ok(Some(pending.connected.get_or_init(|| file.into_std()))),
        Err(e) if e.raw_os_error() == Some(rustix::io::Errno::NXIO.raw_os_error()) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The host descriptor of `pipe`, waiting for a pending writer's first
/// reader unless the guest's fd is non-blocking.
fn connected<'a>(
    ctx: &WasiCtx,
    desc: &Descriptor,
    pipe: &'a OpenPipe,
) -> CallResult<&'a std::fs::File> {
    loop {
        if let Some(file) = try_connect(pipe)? {
            return Ok(file);
        }
        if desc.nonblocking() {
            return Err(Errno::AGAIN.into());
        }
        if ctx.interrupter.sleep(CONNECT_RETRY)? == Wait::Interrupted {
            return Err(CallError::Interrupted);
        }
    }
}

/// Whether a FIFO reader that just read an end of stream has in fact seen
/// no writer yet: Linux reports a hang-up to a reader only once a writer
/// has come and gone since it opened, and data as readable, so neither
/// means "keep waiting". Data that came after the read is `Interrupted`,
/// which makes the caller read again.
fn awaiting_writer(fd: BorrowedFd<'_>) -> std::io::Result<bool> {
    use rustix::event::{PollFd, PollFlags};
    let mut set = [PollFd::new(&fd, PollFlags::IN)];
    let zero = rustix::time::Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    rustix::event::poll(&mut set, Some(&zero))?;
    let seen = set[0].revents();
    if seen.contains(PollFlags::IN) {
        return Err(std::io::ErrorKind::Interrupted.into());
    }
    Ok(seen.is_empty())
}

/// Reads up to `len` bytes; an empty result is end of stream.
pub fn read(ctx: &WasiCtx, desc: &Descriptor, pipe: &OpenPipe, len: usize) -> CallResult<Vec<u8>> {
    if !pipe.readable {
        return Err(Errno::BADF.into());
    }
    let file = connected(ctx, desc, pipe)?;
    let mut buf = vec![0u8; len];
    let blocking = !desc.nonblocking();
    let n = blocking_io(
        ctx,
        file.as_fd(),
        Interest::Read,
        desc.nonblocking(),
        || {
            let n = (&*file).read(&mut buf)?;
            if n == 0
                && len > 0
                && pipe.fifo
                && pipe.opened_blocking
                && blocking
                && awaiting_writer(file.as_fd())?
            {
                return Err(std::io::ErrorKind::WouldBlock.into());
            }
            Ok(n)
        },
    )?;
    buf.truncate(n);
    Ok(buf)
}

/// Writes `data`. A blocking fd waits for room until all of it is written,
/// as a blocking `write(2)` to a pipe does; an interruption after some
/// bytes went out is a short write, before any an interruption the guest
/// does not see. A non-blocking fd takes what fits, or fails with EAGAIN.
pub fn write(ctx: &WasiCtx, desc: &Descriptor, pipe: &OpenPipe, data: &[u8]) -> CallResult<usize> {
    if !pipe.writable {
        return Err(Errno::BADF.into());
    }
    if data.is_empty() {
        return Ok(0);
    }
    let file = connected(ctx, desc, pipe)?;
    let mut done = 0;
    while done < data.len() {
        match (&*file).write(&data[done..]) {
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let stop = if desc.nonblocking() {
                    Some(CallError::Errno(Errno::AGAIN))
                } else if ctx
                    .interrupter
                    .wait(&[(file.as_fd(), Interest::Write)], None)?
                    == Wait::Interrupted
                {
                    Some(CallError::Interrupted)
                } else {
                    None
                };
                match stop {
                    Some(stop) if done == 0 => return Err(stop),
                    Some(stop) => {
                        // A short write; an interruption stays pending for
                        // the next blocking call to serve.
                        if matches!(stop, CallError::Interrupted) {
                            ctx.interrupter.repost();
                        }
                        return Ok(done);
                    }
                    None => {}
                }
            }
            Err(e) => return if done > 0 { Ok(done) } else { Err(e.into()) },
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use rustix::fs::{Mode, OFlags};

    use super::awaiting_writer;

    /// What the blocking read of a FIFO rests on: a reader that has seen
    /// no writer reads an end of stream but polls as not ready; once a
    /// writer has come and gone, it polls as hung up; data polls readable.
    #[test]
    fn a_fifo_reader_tells_no_writer_yet_from_a_writer_gone() {
        let dir = std::env::temp_dir().join(format!("upstare-pipe-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("fifo");
        let _ = std::fs::remove_file(&path);
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &path,
            rustix::fs::FileType::Fifo,
            Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        let reader =
            rustix::fs::open(&path, OFlags::RDONLY | OFlags::NONBLOCK, Mode::empty()).unwrap();
        let mut buf = [0u8; 8];

        assert_eq!(rustix::io::read(&reader, &mut buf), Ok(0));
        assert!(awaiting_writer(reader.as_fd()).unwrap(), "no writer yet");

        let writer =
            rustix::fs::open(&path, OFlags::WRONLY | OFlags::NONBLOCK, Mode::empty()).unwrap();
        rustix::io::write(&writer, b"x").unwrap();
        let again = awaiting_writer(reader.as_fd()).unwrap_err();
        assert_eq!(
            again.kind(),
            std::io::ErrorKind::Interrupted,
            "data: read again"
        );
        assert_eq!(rustix::io::read(&reader, &mut buf), Ok(1));

        drop(writer);
        assert_eq!(rustix::io::read(&reader, &mut buf), Ok(0));
        assert!(
            !awaiting_writer(reader.as_fd()).unwrap(),
            "the writer came and went: end of stream"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

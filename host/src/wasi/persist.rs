//! The fd table as data, for snapshots: what each fd refers to, described
//! so that another process can open the same things again at the same fd
//! numbers.
//!
//! Files and directories are described by their path as the guest sees it
//! (under a preopen) and reopened through that preopen, never by host path
//! alone, so a restore stays inside the sandbox. Files keep their offset and
//! access mode; they are never created or truncated again. Named pipes and
//! devices are opened again by path, as the guest opened them, without
//! waiting for the other end of a FIFO (see [`super::pipe`]). Listeners are
//! bound again (to the same address, or to one the restoring user gives).
//! A connected socket cannot move between processes: it is restored as a
//! connection whose peer has closed it, which the program sees as an
//! ordinary hang-up (end of stream on read, an error on write).
//!
//! The processes of a program that forks share open objects (a prefork
//! server's workers share its listener): an fd whose object a process
//! described before is recorded as [`FdKind::Shared`], and a restore gives
//! it that same object again.

use std::io::{Seek, SeekFrom};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;

use cap_fs_ext::{FollowSymlinks, OpenOptionsSyncExt};

use super::abi::fdflags;
use super::fd_table::{Listener, Object, OpenDir, OpenFile, OpenPipe, Stream};
use super::pipe::{self, Opened};
use super::WasiCtx;

/// What one fd refers to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FdKind {
    /// Standard stream `index` (0-2), possibly renumbered.
    Std {
        /// 0, 1 or 2.
        index: u8,
    },
    /// A preopened directory.
    Preopen {
        /// The name the guest sees.
        name: String,
        /// The host directory.
        host: PathBuf,
    },
    /// A directory the guest opened below a preopen.
    Dir {
        /// Its path as the guest sees it.
        path: String,
    },
    /// A regular file.
    File {
        /// Its path as the guest sees it.
        path: String,
        /// The current offset.
        offset: u64,
        /// Opened for reading.
        readable: bool,
        /// Opened for writing.
        writable: bool,
    },
    /// A listening socket.
    Listener {
        /// The address it was bound to.
        addr: SocketAddr,
    },
    /// A connected socket.
    Stream,
    /// The object of another process's fd, described with that process
    /// (one recorded before this one).
    Shared {
        /// That process's pid.
        pid: u32,
        /// Its fd.
        fd: u32,
    },
}

/// The open objects already described, by identity: which process's fd
/// holds each first.
pub type Described = std::collections::HashMap<usize, (u32, u32)>;

/// One fd of the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FdRecord {
    /// The fd number.
    pub fd: u32,
    /// Its `fdflags`.
    pub flags: u16,
    /// What it refers to.
    pub kind: FdKind,
}

/// Describes every fd of `ctx`.
pub fn describe(ctx: &WasiCtx) -> std::io::Result<Vec<FdRecord>> {
    describe_process(ctx, 1, &mut Described::new())
}

/// Describes every fd of process `pid`'s `ctx`, as shared where `seen`
/// holds its object already; records the others in `seen`.
pub fn describe_process(ctx: &WasiCtx, pid: u32, seen: &mut Described) -> std::io::Result<Vec<FdRecord>> {
    let mut out = Vec::new();
    for (fd, desc) in ctx.fds.entries() {
        // Standard streams are the host's own, in every process.
        let identity = desc.object.identity();
        if !matches!(desc.object, Object::Std(_)) {
            if let Some(&(first, at)) = seen.get(&identity) {
                out.push(FdRecord { fd, flags: desc.flags, kind: FdKind::Shared { pid: first, fd: at } });
                continue;
            }
            seen.insert(identity, (pid, fd));
        }
        let kind = match &desc.object {
            Object::Std(s) => FdKind::Std { index: s.index },
            Object::Dir(d) => match (&d.preopen_name, &d.host_path) {
                (Some(name), Some(host)) => FdKind::Preopen { name: name.clone(), host: host.clone() },
                _ => FdKind::Dir { path: d.guest_path.clone() },
            },
            Object::File(f) => FdKind::File {
                path: f.guest_path.clone(),
                offset: (&f.file).stream_position()?,
                readable: f.readable,
                writable: f.writable,
            },
            // A pipe has no offset; it is opened again by its path.
            Object::Pipe(p) => FdKind::File {
                path: p.guest_path.clone(),
                offset: 0,
                readable: p.readable,
                writable: p.writable,
            },
            Object::Listener(l) => FdKind::Listener { addr: l.addr },
            Object::Stream(_) => FdKind::Stream,
        };
        out.push(FdRecord { fd, flags: desc.flags, kind });
    }
    Ok(out)
}

/// Rebuilds the fds of `records` in `ctx`, whose standard streams are
/// already installed. `listeners` replace the recorded listeners in order;
/// recorded listeners beyond them are bound to their old addresses.
/// `shared` gives the object of a process restored before, for the fds
/// recorded as [`FdKind::Shared`].
pub fn rebuild(
    ctx: &mut WasiCtx,
    records: &[FdRecord],
    listeners: Vec<TcpListener>,
    shared: &dyn Fn(u32, u32) -> Option<Object>,
) -> Result<(), String> {
    let mut listeners = listeners.into_iter();
    let preopens: Vec<(String, FdRecord)> = records
        .iter()
        .filter_map(|r| match &r.kind {
            FdKind::Preopen { name, .. } => Some((name.clone(), r.clone())),
            _ => None,
        })
        .collect();
    // Preopens first: files and directories are reopened through them.
    let mut ordered: Vec<&FdRecord> = records.iter().filter(|r| matches!(r.kind, FdKind::Preopen { .. })).collect();
    ordered.extend(records.iter().filter(|r| !matches!(r.kind, FdKind::Preopen { .. })));
    for r in ordered {
        let fail = |what: String| format!("cannot restore fd {}: {what}", r.fd);
        let object = match &r.kind {
            FdKind::Std { index } => match ctx.fds.get(u32::from(*index)) {
                Ok(d) if r.fd != u32::from(*index) => d.object.clone(),
                Ok(_) => continue,
                Err(_) => return Err(fail(format!("standard stream {index} is gone"))),
            },
            FdKind::Preopen { name, host } => {
                let dir = cap_std::fs::Dir::open_ambient_dir(host, cap_std::ambient_authority())
                    .map_err(|e| fail(format!("cannot open directory {} (preopened as {name}): {e}", host.display())))?;
                Object::Dir(Arc::new(OpenDir {
                    dir,
                    preopen_name: Some(name.clone()),
                    host_path: Some(host.clone()),
                    guest_path: String::new(),
                    listing: Default::default(),
                }))
            }
            FdKind::Dir { path } => {
                let (base, rel) = through_preopen(ctx, &preopens, path).map_err(fail)?;
                let dir = base.open_dir(&rel).map_err(|e| fail(format!("cannot reopen directory {path}: {e}")))?;
                Object::Dir(Arc::new(OpenDir {
                    dir,
                    preopen_name: None,
                    host_path: None,
                    guest_path: path.clone(),
                    listing: Default::default(),
                }))
            }
            FdKind::File { path, offset, readable, writable } => {
                let (base, rel) = through_preopen(ctx, &preopens, path).map_err(fail)?;
                let append = r.flags & fdflags::APPEND != 0;
                let mut opts = cap_std::fs::OpenOptions::new();
                opts.read(*readable).write(*writable && !append).append(append);
                // The synchronous-write flags can only be given at open.
                let sync = |flag| r.flags & flag != 0;
                opts.sync(sync(fdflags::SYNC)).dsync(sync(fdflags::DSYNC)).rsync(sync(fdflags::RSYNC));
                let blocking = r.flags & fdflags::NONBLOCK == 0;
                let opened = pipe::open(&base, &rel, &opts, FollowSymlinks::Yes, !*readable, blocking)
                    .map_err(|e| fail(format!("cannot reopen file {path}: {e}")))?;
                match opened {
                    Opened::File(file) => {
                        let mut file = file.into_std();
                        file.seek(SeekFrom::Start(*offset)).map_err(|e| fail(format!("cannot seek {path}: {e}")))?;
                        Object::File(Arc::new(OpenFile { file, guest_path: path.clone(), readable: *readable, writable: *writable }))
                    }
                    Opened::Pipe { file, pending, fifo } => Object::Pipe(Arc::new(OpenPipe {
                        file,
                        pending,
                        guest_path: path.clone(),
                        readable: *readable,
                        writable: *writable,
                        fifo,
                        opened_blocking: blocking,
                    })),
                }
            }
            FdKind::Listener { addr } => {
                let socket = match listeners.next() {
                    Some(l) => l,
                    None => TcpListener::bind(addr)
                        .map_err(|e| fail(format!("cannot listen on {addr} again: {e} (give --tcplisten ADDR)")))?,
                };
                socket.set_nonblocking(true).map_err(|e| fail(e.to_string()))?;
                let addr = socket.local_addr().map_err(|e| fail(e.to_string()))?;
                Object::Listener(Arc::new(Listener { socket, addr }))
            }
            FdKind::Stream => Object::Stream(Arc::new(Stream { socket: hung_up().map_err(|e| fail(e.to_string()))? })),
            FdKind::Shared { pid, fd } => {
                shared(*pid, *fd).ok_or_else(|| fail(format!("it shares fd {fd} of process {pid}, which the snapshot does not hold")))?
            }
        };
        ctx.fds.place(r.fd, object, r.flags).map_err(|e| fail(format!("fd table: {e:?}")))?;
    }
    Ok(())
}

/// The preopen a guest path lies under (longest name first), opened, and the
/// rest of the path relative to it.
fn through_preopen(
    ctx: &WasiCtx,
    preopens: &[(String, FdRecord)],
    path: &str,
) -> Result<(cap_std::fs::Dir, String), String> {
    let mut best: Option<(&str, u32, String)> = None;
    for (name, rec) in preopens {
        let rel = if name == "." {
            Some(path.to_string())
        } else {
            path.strip_prefix(name.trim_end_matches('/')).and_then(|r| {
                if r.is_empty() {
                    Some(".".to_string())
                } else {
                    r.strip_prefix('/').map(str::to_string)
                }
            })
        };
        if let Some(rel) = rel {
            if best.as_ref().is_none_or(|(b, ..)| name.len() > b.len()) {
                best = Some((name, rec.fd, rel));
            }
        }
    }
    let (_, fd, rel) = best.ok_or_else(|| format!("{path} is under no preopened directory"))?;
    match ctx.fds.get(fd).map(|d| d.object) {
        Ok(Object::Dir(d)) => d.dir.try_clone().map(|dir| (dir, rel)).map_err(|e| e.to_string()),
        _ => Err(format!("the preopen for {path} is missing")),
    }
}

/// A connected socket whose peer has already closed: what a restored
/// process has in place of a connection that could not move with it.
fn hung_up() -> std::io::Result<TcpStream> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let stream = TcpStream::connect(listener.local_addr()?)?;
    drop(listener.accept()?);
    stream.set_nonblocking(true)?;
    Ok(stream)
}

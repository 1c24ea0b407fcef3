//! The control socket: how `upstare-host status` and `upstare-host
//! checkpoint` reach a running host.
//!
//! A Unix stream socket created with mode 0600; connections from another
//! user are refused (checked with `SO_PEERCRED`, not only by the file mode).
//! Each connection carries one request and its reply ([`protocol`]). Every
//! connection is served on a thread of its own and must send its request
//! line within [`REQUEST_DEADLINE`], so a client that connects and says
//! nothing holds up no one; requests that change the program are
//! serialized by the caller's handler, not by the socket.
//!
//! Without `--control`, a host creates [`default_path`] (one per process),
//! and a client uses the only live socket there ([`find_default`]).

pub mod protocol;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub use protocol::{ProtocolError, Request, Response, MAX_REQUEST_LINE};

/// How long a client has, once connected, to send its request line.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(5);

/// How many connections a host serves at once; more are told to retry.
pub const MAX_CONNECTIONS: usize = 32;

/// How long a host waits for a client to take its reply.
const REPLY_DEADLINE: Duration = Duration::from_secs(5);

/// Where hosts put their control sockets when none is given:
/// `$XDG_RUNTIME_DIR/upstare-host`, else `/tmp/upstare-host-<uid>`.
pub fn runtime_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR") {
        return PathBuf::from(dir).join("upstare-host");
    }
    let uid = rustix::process::getuid().as_raw();
    std::env::temp_dir().join(format!("upstare-host-{uid}"))
}

/// The control socket a host creates when none is given:
/// `<runtime dir>/<pid>.sock`, so any number of hosts can run at once.
pub fn default_path() -> PathBuf {
    runtime_dir().join(format!("{}.sock", std::process::id()))
}

/// The control socket a client uses when none is given: the only live one
/// in the runtime directory. None, or several, is an error that says what
/// to do.
pub fn find_default() -> Result<PathBuf, String> {
    let dir = runtime_dir();
    let mut live = Vec::new();
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "sock") && UnixStream::connect(&path).is_ok() {
                live.push(path);
            }
        }
    }
    live.sort();
    match live.len() {
        1 => Ok(live.remove(0)),
        0 => Err(format!("no running upstare-host found in {} (give --control PATH)", dir.display())),
        _ => Err(format!(
            "several upstare-hosts are running; choose one with --control: {}",
            live.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
        )),
    }
}

/// A bound control socket; the file is removed when it is dropped.
#[derive(Debug)]
pub struct ControlSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl ControlSocket {
    /// Binds `path`, replacing a stale socket file but never a live one.
    pub fn bind(path: &Path) -> Result<ControlSocket, String> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if !dir.exists() {
                std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
                let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
            }
        }
        if path.exists() {
            if UnixStream::connect(path).is_ok() {
                return Err(format!(
                    "control socket {} is in use by another upstare-host (give this one --control PATH)",
                    path.display()
                ));
            }
            std::fs::remove_file(path).map_err(|e| format!("cannot remove stale {}: {e}", path.display()))?;
        }
        // Bound under a staging name and moved into place once it listens:
        // a client that sees the path can connect (between bind and listen
        // it would be refused). Created 0600 from the start: no window in
        // which another user could connect.
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let staging = path.with_file_name(format!(".{name}.{}", std::process::id()));
        let _ = std::fs::remove_file(&staging);
        let old = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o177));
        let bound = UnixListener::bind(&staging);
        rustix::process::umask(old);
        let listener = bound.map_err(|e| format!("cannot create control socket {}: {e}", path.display()))?;
        // No replacing: a host that bound the same path meanwhile keeps it.
        let moved = rustix::fs::renameat_with(rustix::fs::CWD, &staging, rustix::fs::CWD, path, rustix::fs::RenameFlags::NOREPLACE);
        if let Err(e) = moved {
            let _ = std::fs::remove_file(&staging);
            return Err(match e {
                rustix::io::Errno::EXIST => format!(
                    "control socket {} is in use by another upstare-host (give this one --control PATH)",
                    path.display()
                ),
                e => format!("cannot create control socket {}: {}", path.display(), std::io::Error::from(e)),
            });
        }
        Ok(ControlSocket { listener, path: path.to_path_buf() })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves requests forever: the calling thread accepts, and each
    /// connection gets a thread that reads its one request and writes
    /// `handle`'s reply. `handle` runs on many threads at once.
    pub fn serve(&self, handle: impl Fn(Request) -> Response + Send + Sync + 'static) {
        let handle = Arc::new(handle);
        let open = Arc::new(AtomicUsize::new(0));
        let me = rustix::process::getuid();
        for conn in self.listener.incoming() {
            let Ok(conn) = conn else { continue };
            let _ = conn.set_write_timeout(Some(REPLY_DEADLINE));
            match rustix::net::sockopt::socket_peercred(&conn) {
                Ok(cred) if cred.uid == me => {}
                _ => {
                    answer(&conn, &Response::refused("permission denied: the control socket serves only its owner"));
                    continue;
                }
            }
            if open.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
                open.fetch_sub(1, Ordering::SeqCst);
                let busy = format!("the host serves {MAX_CONNECTIONS} control connections at once; try again");
                answer(&conn, &Response::refused(busy));
                continue;
            }
            let (handle, served) = (handle.clone(), open.clone());
            let spawned = std::thread::Builder::new().name("control-client".into()).spawn(move || {
                let reply = match read_request(&conn) {
                    Ok(request) => handle(request),
                    Err(e) => Response::refused(e),
                };
                answer(&conn, &reply);
                served.fetch_sub(1, Ordering::SeqCst);
            });
            if spawned.is_err() {
                // The connection went with the closure; the client sees it
                // close without a reply.
                open.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }
}

/// Writes `reply` and closes the connection. What the client sent and the
/// host did not read is drained first (briefly, and only so much): closing
/// a Unix socket with unread input resets it, and the client would lose the
/// reply.
fn answer(mut conn: &UnixStream, reply: &Response) {
    let _ = conn.write_all(reply.encode().as_bytes());
    let _ = conn.shutdown(std::net::Shutdown::Write);
    let _ = conn.set_read_timeout(Some(Duration::from_millis(100)));
    let _ = std::io::copy(&mut conn.take(MAX_REQUEST_LINE as u64 * 4), &mut std::io::sink());
}

/// Reads one request line within [`REQUEST_DEADLINE`].
fn read_request(conn: &UnixStream) -> Result<Request, String> {
    conn.set_read_timeout(Some(REQUEST_DEADLINE)).map_err(|e| format!("cannot read the request: {e}"))?;
    let mut line = Vec::new();
    // One byte over the limit tells a long line from one that fits exactly.
    let limit = MAX_REQUEST_LINE as u64 + 1;
    match BufReader::new(conn).take(limit).read_until(b'\n', &mut line) {
        Ok(_) if line.len() > MAX_REQUEST_LINE => return Err(ProtocolError::TooLong.to_string()),
        Ok(_) => {}
        Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
            return Err(format!("no request line within {} s; closing", REQUEST_DEADLINE.as_secs()))
        }
        Err(e) => return Err(format!("cannot read the request: {e}")),
    }
    let line = String::from_utf8(line).map_err(|_| ProtocolError::NotUtf8.to_string())?;
    Request::parse(&line).map_err(|e| e.to_string())
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Sends one request to the host behind `path` and returns its reply.
pub fn request(path: &Path, req: &Request) -> Result<Response, String> {
    let line = req.encode().map_err(|e| e.to_string())?;
    let mut conn = UnixStream::connect(path).map_err(|e| {
        format!("cannot reach upstare-host at {} ({e}); is it running, with this --control path?", path.display())
    })?;
    conn.write_all(line.as_bytes()).map_err(|e| format!("cannot send the request: {e}"))?;
    let mut reply = String::new();
    conn.read_to_string(&mut reply).map_err(|e| format!("cannot read the reply: {e}"))?;
    // The host closes the socket without a word when the program ends
    // while the request waits (an update waiting for a frame to move).
    if reply.is_empty() {
        return Err(format!("upstare-host at {} stopped before it answered: the program has probably exited", path.display()));
    }
    Response::decode(&reply).map_err(|e| e.to_string())
}

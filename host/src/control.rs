//! The control socket: how `upstare-host status` and `upstare-host
//! checkpoint` reach a running host.
//!
//! A Unix stream socket created with mode 0600; connections from another
//! user are refused (checked with `SO_PEERCRED`, not only by the file mode).
//! The protocol is one request line and a reply of one or more lines, the
//! last of which is `OK` or starts with `OK ` or `ERR `:
//!
//! ```text
//! STATUS              ->  key: value lines, then OK
//! CHECKPOINT <path>   ->  OK <path> <bytes> bytes, paused <us> us
//!                         or ERR <reason>
//! UPDATE <ms> <path>   ->  report lines, then OK; or ERR <reason> (refused,
//!                         the old version runs on) or BAD <reason> (the
//!                         module cannot be used at all)
//! ROLLBACK <ms>        ->  the same, back to the previous version
//! ```
//!
//! Without `--control`, a host creates [`default_path`] (one per process),
//! and a client uses the only live socket there ([`find_default`]).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

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

/// A request from a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Describe the running program.
    Status,
    /// Write a snapshot to this path (on the host's file system).
    Checkpoint(PathBuf),
    /// Update the program to the module at this path, waiting at most this
    /// many milliseconds for frames that cannot move yet to leave the stack.
    Update(PathBuf, u64),
    /// Return to the previous version.
    Rollback(u64),
}

impl Request {
    /// Parses a request line.
    pub fn parse(line: &str) -> Result<Request, String> {
        let line = line.trim_end_matches(['\r', '\n']);
        let (verb, rest) = line.split_once(' ').unwrap_or((line, ""));
        match verb {
            "STATUS" if rest.is_empty() => Ok(Request::Status),
            "CHECKPOINT" if !rest.is_empty() => Ok(Request::Checkpoint(PathBuf::from(rest))),
            "CHECKPOINT" => Err("CHECKPOINT needs a file path".into()),
            "UPDATE" => {
                let (ms, path) = rest.split_once(' ').ok_or("UPDATE needs a timeout and a module path")?;
                let ms = ms.parse().map_err(|_| "UPDATE needs a timeout in milliseconds first")?;
                Ok(Request::Update(PathBuf::from(path), ms))
            }
            "ROLLBACK" => Ok(Request::Rollback(rest.parse().map_err(|_| "ROLLBACK needs a timeout in milliseconds")?)),
            _ => Err(format!(
                "unknown request `{}` (expected STATUS, CHECKPOINT <path>, UPDATE <ms> <path> or ROLLBACK <ms>)",
                verb.escape_debug()
            )),
        }
    }

    /// The request line, newline included.
    pub fn line(&self) -> String {
        match self {
            Request::Status => "STATUS\n".into(),
            Request::Checkpoint(p) => format!("CHECKPOINT {}\n", p.display()),
            Request::Update(p, ms) => format!("UPDATE {ms} {}\n", p.display()),
            Request::Rollback(ms) => format!("ROLLBACK {ms}\n"),
        }
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
        // Created 0600 from the start: no window in which another user
        // could connect.
        let old = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o177));
        let bound = UnixListener::bind(path);
        rustix::process::umask(old);
        let listener = bound.map_err(|e| format!("cannot create control socket {}: {e}", path.display()))?;
        Ok(ControlSocket { listener, path: path.to_path_buf() })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves requests on the calling thread, forever: each connection
    /// gets one request and `handle`'s reply.
    pub fn serve(&self, mut handle: impl FnMut(Request) -> String) {
        let me = rustix::process::getuid();
        for conn in self.listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            match rustix::net::sockopt::socket_peercred(&conn) {
                Ok(cred) if cred.uid == me => {}
                _ => {
                    let _ = conn.write_all(b"ERR permission denied: the control socket serves only its owner\n");
                    continue;
                }
            }
            let mut line = String::new();
            let reply = match BufReader::new(&conn).take(64 << 10).read_line(&mut line) {
                Ok(_) => match Request::parse(&line) {
                    Ok(req) => handle(req),
                    Err(e) => format!("ERR {e}"),
                },
                Err(e) => format!("ERR cannot read the request: {e}"),
            };
            let _ = conn.write_all(format!("{}\n", reply.trim_end()).as_bytes());
        }
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Sends one request to the host behind `path` and returns its reply.
pub fn request(path: &Path, req: &Request) -> Result<String, String> {
    let mut conn = UnixStream::connect(path).map_err(|e| {
        format!("cannot reach upstare-host at {} ({e}); is it running, with this --control path?", path.display())
    })?;
    conn.write_all(req.line().as_bytes()).map_err(|e| format!("cannot send the request: {e}"))?;
    let mut reply = String::new();
    std::io::Read::read_to_string(&mut conn, &mut reply).map_err(|e| format!("cannot read the reply: {e}"))?;
    Ok(reply)
}

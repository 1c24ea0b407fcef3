//! Running a guest under supervision: the guest on its own thread, and the
//! control socket's requests served against it from another. A checkpoint
//! pauses the guest, takes its snapshot, and resumes it before the file is
//! written, so the program stops only for the capture.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::control::{ControlSocket, Request};
use crate::{Exit, Guest, Snapshot, GUEST_THREAD_STACK};

/// How long a checkpoint waits, by default, for the guest to reach an update
/// point before it gives up and lets the guest run on.
pub const DEFAULT_PAUSE_LIMIT: Duration = Duration::from_secs(2);

/// What `status` reports besides the live state.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The module's path as given.
    pub module: String,
    /// SHA-256 of the module, hex.
    pub hash: String,
}

#[derive(Debug, Default)]
struct Live {
    state: &'static str,
    pauses: u64,
    last_pause: Option<Duration>,
}

/// A request the guest thread serves while the guest is paused.
enum Command {
    Checkpoint {
        reply: Sender<Result<(Snapshot, Instant), String>>,
        cancelled: Arc<AtomicBool>,
    },
}

/// Runs the guest `make` builds until it exits, serving `control` (if any)
/// meanwhile. Returns how it ended and how many times it unwound, or why
/// `make` could not build it (the inner error); the outer error is the
/// host's own failure.
pub fn run(
    make: impl FnOnce() -> Result<Guest, String> + Send + 'static,
    identity: Identity,
    control: Option<ControlSocket>,
    pause_limit: Duration,
) -> Result<Result<(Exit, u64), String>, String> {
    let live = Arc::new(Mutex::new(Live { state: "starting", ..Live::default() }));
    let (commands_tx, commands) = channel::<Command>();
    let (handle_tx, handle_rx) = channel();
    let guest_live = live.clone();
    let runner = std::thread::Builder::new()
        .name("guest".into())
        .stack_size(GUEST_THREAD_STACK)
        .spawn(move || -> Result<(Exit, u64), String> {
            let mut guest = match make() {
                Ok(g) => g,
                Err(e) => {
                    drop(handle_tx);
                    return Err(e);
                }
            };
            let _ = handle_tx.send(guest.pause_handle());
            let exit = drive(&mut guest, &commands, &guest_live);
            guest_live.lock().map(|mut l| l.state = "exited").ok();
            Ok((exit, guest.unwinds()))
        })
        .map_err(|e| format!("cannot start the guest thread: {e}"))?;
    let socket_path = control.as_ref().map(|c| c.path().to_path_buf());
    if let (Some(control), Ok(pause)) = (control, handle_rx.recv()) {
        let started = Instant::now();
        let serve_live = live.clone();
        std::thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                control.serve(|req| match req {
                    Request::Status => status(&identity, started, &serve_live, pause.is_some()),
                    Request::Checkpoint(path) => match &pause {
                        None => "ERR the module runs without instrumentation (--no-instrument): it cannot be paused".into(),
                        Some(p) => {
                            let (reply, latency) = checkpoint(p, &commands_tx, &path, pause_limit);
                            if let (Some(d), Ok(mut l)) = (latency, serve_live.lock()) {
                                l.pauses += 1;
                                l.last_pause = Some(d);
                            }
                            reply
                        }
                    },
                })
            })
            .map_err(|e| format!("cannot start the control thread: {e}"))?;
    }
    let outcome = runner.join().map_err(|_| "the guest thread failed".to_string());
    if let Some(path) = socket_path {
        let _ = std::fs::remove_file(path);
    }
    outcome
}

/// Runs the guest, serving commands at each pause, until it ends.
fn drive(guest: &mut Guest, commands: &Receiver<Command>, live: &Mutex<Live>) -> Exit {
    loop {
        live.lock().map(|mut l| l.state = "running").ok();
        let exit = guest.run();
        if !matches!(exit, Exit::Paused) {
            return exit;
        }
        let paused_at = Instant::now();
        live.lock().map(|mut l| l.state = "paused").ok();
        while let Ok(Command::Checkpoint { reply, cancelled }) = commands.try_recv() {
            if cancelled.load(Ordering::SeqCst) {
                continue;
            }
            let snapshot = guest.snapshot().map_err(|e| e.to_string());
            let _ = reply.send(snapshot.map(|s| (s, paused_at)));
        }
    }
}

fn status(identity: &Identity, started: Instant, live: &Mutex<Live>, pausable: bool) -> String {
    let live = match live.lock() {
        Ok(l) => l,
        Err(_) => return "ERR status unavailable".into(),
    };
    let last = live.last_pause.map_or("none yet".to_string(), |d| format!("{} us", d.as_micros()));
    format!(
        "module: {}\nversion: sha256:{}\nuptime: {:.1} s\ninstances: 1\ninstance 0: {}{}\npauses: {}\nlast pause (request to paused): {last}\nOK",
        identity.module,
        identity.hash,
        started.elapsed().as_secs_f64(),
        live.state,
        if pausable { "" } else { " (not instrumented: cannot pause)" },
        live.pauses,
    )
}

/// Pauses the guest for a snapshot and writes it to `path`, through a
/// temporary file, after the guest runs again. Returns the reply and, if
/// the guest paused, how long that took from the request.
fn checkpoint(
    pause: &crate::PauseHandle,
    commands: &Sender<Command>,
    path: &std::path::Path,
    limit: Duration,
) -> (String, Option<Duration>) {
    let cancelled = Arc::new(AtomicBool::new(false));
    let (reply, answer) = channel();
    if commands.send(Command::Checkpoint { reply, cancelled: cancelled.clone() }).is_err() {
        return ("ERR the guest has exited".into(), None);
    }
    let asked = pause.request();
    let (snapshot, paused_at) = match answer.recv_timeout(limit) {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return (format!("ERR cannot snapshot the guest: {e}"), None),
        Err(RecvTimeoutError::Timeout) => {
            cancelled.store(true, Ordering::SeqCst);
            pause.cancel();
            let reply = format!(
                "ERR the guest did not reach an update point within {} ms (--pause-limit); it keeps running, no snapshot written",
                limit.as_millis()
            );
            return (reply, None);
        }
        Err(RecvTimeoutError::Disconnected) => return ("ERR the guest has exited".into(), None),
    };
    let latency = paused_at.saturating_duration_since(asked);
    let bytes = snapshot.encode();
    let tmp = path.with_extension("partial");
    if let Err(e) = std::fs::write(&tmp, &bytes).and_then(|_| std::fs::rename(&tmp, path)) {
        let _ = std::fs::remove_file(&tmp);
        return (format!("ERR cannot write {}: {e}", path.display()), Some(latency));
    }
    (format!("OK {} {} bytes, paused {} us", path.display(), bytes.len(), latency.as_micros()), Some(latency))
}

//! Running a guest under supervision: the guest on its own thread, and the
//! control socket's requests served against it from another. A checkpoint
//! pauses the guest, takes its snapshot, and resumes it before the file is
//! written, so the program stops only for the capture. An update is
//! prepared on the control thread while the guest runs, and applied by the
//! guest thread at a pause ([`crate::update`]); the control thread keeps the
//! history of versions for rollback.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::control::{ControlSocket, Request};
use crate::pause::ControlMemory;
use crate::program_memory::ProgramMemory;
use crate::update::{self, Prepared, Report, RunningVersion, UpdateError};
use crate::{Exit, Guest, GuestModule, PauseHandle, Snapshot, GUEST_THREAD_STACK};

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
    /// The version running after updates: module path and hash.
    version: Option<(String, String)>,
    updates: u64,
}

/// A request the guest thread serves while the guest is paused.
enum Command {
    Checkpoint {
        reply: Sender<Result<(Snapshot, Instant), String>>,
        cancelled: Arc<AtomicBool>,
    },
    Update {
        current: RunningVersion,
        prepared: Arc<Prepared>,
        reply: Sender<Result<Report, UpdateError>>,
        /// PENDING until one side claims it: the guest thread (APPLYING)
        /// or the control thread giving up (CANCELLED). Whoever claims it
        /// decides; an update is never both refused and applied.
        claim: Arc<AtomicU8>,
    },
}

/// What the control thread needs to prepare updates while the guest runs.
struct Updater {
    engine: wasmtime::Engine,
    memory: ProgramMemory,
    control: ControlMemory,
    /// The module the guest started with; its version is built at the
    /// first update.
    first: GuestModule,
    /// Versions run so far, the running one last.
    history: Vec<RunningVersion>,
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
            let seed = guest
                .unwinder
                .as_ref()
                .map(|u| (guest.engine().clone(), u.memory.clone(), u.control.clone(), guest.module().clone()));
            let _ = handle_tx.send((guest.pause_handle(), seed));
            let exit = drive(&mut guest, &commands, &guest_live);
            guest_live.lock().map(|mut l| l.state = "exited").ok();
            Ok((exit, guest.unwinds()))
        })
        .map_err(|e| format!("cannot start the guest thread: {e}"))?;
    let socket_path = control.as_ref().map(|c| c.path().to_path_buf());
    if let (Some(control), Ok((pause, seed))) = (control, handle_rx.recv()) {
        let started = Instant::now();
        let serve_live = live.clone();
        let mut updater =
            seed.map(|(engine, memory, control, first)| Updater { engine, memory, control, first, history: Vec::new() });
        std::thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                control.serve(|req| match req {
                    Request::Status => status(&identity, started, &serve_live, pause.is_some()),
                    Request::Update(path, timeout) => {
                        let target = Target::Module(path);
                        serve_update(&mut updater, &pause, &commands_tx, &serve_live, target, timeout, pause_limit)
                    }
                    Request::Rollback(timeout) => {
                        serve_update(&mut updater, &pause, &commands_tx, &serve_live, Target::Previous, timeout, pause_limit)
                    }
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
        while let Ok(command) = commands.try_recv() {
            match command {
                Command::Checkpoint { reply, cancelled } => {
                    if cancelled.load(Ordering::SeqCst) {
                        continue;
                    }
                    let snapshot = guest.snapshot().map_err(|e| e.to_string());
                    let _ = reply.send(snapshot.map(|s| (s, paused_at)));
                }
                Command::Update { current, prepared, reply, claim } => {
                    if claim.compare_exchange(PENDING, APPLYING, Ordering::SeqCst, Ordering::SeqCst).is_err() {
                        continue;
                    }
                    let _ = reply.send(guest.apply_update(&current, &prepared, paused_at));
                }
            }
        }
    }
}

fn status(identity: &Identity, started: Instant, live: &Mutex<Live>, pausable: bool) -> String {
    let live = match live.lock() {
        Ok(l) => l,
        Err(_) => return "ERR status unavailable".into(),
    };
    let last = live.last_pause.map_or("none yet".to_string(), |d| format!("{} us", d.as_micros()));
    let (module, hash) = live.version.clone().unwrap_or_else(|| (identity.module.clone(), identity.hash.clone()));
    format!(
        "module: {module}\nversion: sha256:{hash}\nuptime: {:.1} s\nupdates: {}\ninstances: 1\ninstance 0: {}{}\npauses: {}\nlast pause (request to paused): {last}\nOK",
        started.elapsed().as_secs_f64(),
        live.updates,
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

/// Versions kept for rollback, the running one included.
const MAX_HISTORY: usize = 8;

const PENDING: u8 = 0;
const APPLYING: u8 = 1;
const CANCELLED: u8 = 2;

/// What an update goes to.
enum Target {
    /// The module at this path.
    Module(std::path::PathBuf),
    /// The version before the running one.
    Previous,
}

/// Serves an update or rollback request: the reply, and the live state
/// updated if it committed.
fn serve_update(
    updater: &mut Option<Updater>,
    pause: &Option<PauseHandle>,
    commands: &Sender<Command>,
    live: &Mutex<Live>,
    target: Target,
    timeout_ms: u64,
    pause_limit: Duration,
) -> String {
    let (Some(pause), Some(updater)) = (pause, updater) else {
        return "ERR the module runs without instrumentation (--no-instrument): it cannot be updated".into();
    };
    let reply = live_update(updater, pause, commands, target, Duration::from_millis(timeout_ms), pause_limit);
    record_update(live, updater, &reply);
    reply
}

/// Prepares an update while the guest runs, then applies it at a pause;
/// while a frame cannot move yet, lets the guest run on a little and tries
/// again, until `timeout`. Returns the control reply.
fn live_update(
    updater: &mut Updater,
    pause: &PauseHandle,
    commands: &Sender<Command>,
    target: Target,
    timeout: Duration,
    pause_limit: Duration,
) -> String {
    if updater.history.is_empty() {
        match RunningVersion::initial(&updater.first) {
            Ok(v) => updater.history.push(v),
            Err(e) => return format!("ERR {e}"),
        }
    }
    let current = updater.history.last().expect("a version runs").clone();
    let (path, bytes) = match &target {
        Target::Module(path) => match std::fs::read(path) {
            Ok(b) => (path.clone(), b),
            Err(e) => return format!("BAD cannot read {}: {e}", path.display()),
        },
        Target::Previous => match updater.history.len() {
            n if n >= 2 => {
                let previous = &updater.history[n - 2];
                (previous.path.clone(), previous.version.wasm.to_vec())
            }
            _ => return "ERR no previous version to return to: the program has not been updated".into(),
        },
    };
    let prepared = match update::prepare(&updater.engine, &current, &updater.memory, &updater.control, &path, bytes) {
        Ok(p) => p,
        Err(UpdateError::BadInput(e)) => return format!("BAD {e}"),
        Err(e) => return format!("ERR {e}"),
    };
    if matches!(target, Target::Previous) {
        if let Some(lost) = lossy_conversions(&prepared) {
            return format!("ERR cannot roll back: the update changed the type of {lost}, and going back would lose it");
        }
    }
    let prepared = Arc::new(prepared);
    let deadline = Instant::now() + timeout;
    // Between attempts the program runs on, for longer each time, so a
    // function that blocks the update can finish and leave the stack.
    let mut backoff = Duration::from_millis(2);
    loop {
        let claim = Arc::new(AtomicU8::new(PENDING));
        let (reply, answer) = channel();
        let command = Command::Update { current: current.clone(), prepared: prepared.clone(), reply, claim: claim.clone() };
        if commands.send(command).is_err() {
            return "ERR the guest has exited".into();
        }
        pause.request();
        let outcome = match answer.recv_timeout(pause_limit) {
            Ok(outcome) => outcome,
            Err(RecvTimeoutError::Timeout)
                if claim.compare_exchange(PENDING, CANCELLED, Ordering::SeqCst, Ordering::SeqCst).is_err() =>
            {
                // The guest thread is applying it: its answer decides.
                match answer.recv() {
                    Ok(outcome) => outcome,
                    Err(_) => return "ERR the guest has exited".into(),
                }
            }
            Err(RecvTimeoutError::Timeout) => {
                pause.cancel();
                return format!(
                    "ERR update refused: the guest did not reach an update point within {} ms (--pause-limit); the old version runs on",
                    pause_limit.as_millis()
                );
            }
            Err(RecvTimeoutError::Disconnected) => return "ERR the guest has exited".into(),
        };
        match outcome {
            Ok(report) => {
                if matches!(target, Target::Previous) {
                    updater.history.truncate(updater.history.len() - 2);
                }
                updater.history.push(prepared.next.clone());
                // Each version holds its compiled code: keep what rollbacks
                // can reach in a few steps, not every version ever run.
                if updater.history.len() > MAX_HISTORY {
                    updater.history.remove(0);
                }
                return format!("{report}\nOK");
            }
            Err(UpdateError::Frame(frame)) if Instant::now() < deadline => {
                // Let the program run on, so that frame can leave the stack.
                tracing::debug!("update waits: {frame}");
                std::thread::sleep(backoff.min(deadline.saturating_duration_since(Instant::now())));
                backoff = (backoff * 2).min(Duration::from_millis(100));
            }
            Err(UpdateError::Frame(frame)) => {
                return format!(
                    "ERR update refused: {} was still on the stack after {} ms and cannot move to the new version: {}; the old version runs on",
                    frame.function,
                    timeout.as_millis(),
                    frame
                )
            }
            Err(UpdateError::BadInput(e)) => return format!("BAD {e}"),
            Err(e) => return format!("ERR {e}; the old version runs on"),
        }
    }
}

/// The converted globals whose conversion loses fields, if any.
fn lossy_conversions(prepared: &Prepared) -> Option<String> {
    let lost: Vec<String> = prepared
        .linked
        .conversions
        .iter()
        .flat_map(|c| c.map.dropped.iter().cloned())
        .collect();
    (!lost.is_empty()).then(|| lost.join(", "))
}

fn record_update(live: &Mutex<Live>, updater: &Updater, reply: &str) {
    if !reply.ends_with("OK") {
        return;
    }
    if let (Ok(mut l), Some(v)) = (live.lock(), updater.history.last()) {
        l.version = Some((v.path.display().to_string(), v.hash.clone()));
        l.updates += 1;
    }
}

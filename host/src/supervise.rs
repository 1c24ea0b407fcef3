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

use upstare_patchgen::paused::Stale;

use crate::control::{ControlSocket, Request, Response};
use crate::fresh::{FreshAreas, FreshFigures};
use crate::pause::ControlMemory;
use crate::program_memory::ProgramMemory;
use crate::stress_update::{StressUpdates, Tally};
use crate::threads::{ThreadState, ThreadStatus};
use crate::update::{self, Prepared, Report, RunningVersion, UpdateError};
use crate::{Exit, Guest, GuestModule, InterruptHandle, PauseHandle, Snapshot, GUEST_THREAD_STACK};

/// How long a checkpoint waits, by default, for the guest to reach an update
/// point before it gives up and lets the guest run on.
pub const DEFAULT_PAUSE_LIMIT: Duration = Duration::from_secs(2);

/// How long `update` and `rollback` keep retrying, by default, while frames
/// that cannot move yet, pointers to a converted global's old copy, or
/// untyped values holding an allocation that may hold a changed struct,
/// hold the update back.
pub const DEFAULT_UPDATE_TIMEOUT: Duration = Duration::from_secs(2);

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
    /// The function the main thread stopped in, while paused.
    paused_in: Option<String>,
    pauses: u64,
    last_pause: Option<Duration>,
    /// The version running after updates: module path and hash.
    version: Option<(String, String)>,
    updates: u64,
    fresh: FreshFigures,
    /// The counts of `--stress-update` or `--update-at` so far, for a
    /// server that never exits.
    stress: Option<String>,
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

/// How long the main thread has to return by itself once another thread
/// has ended the program, before the program is reported ended without it.
const MAIN_GRACE: Duration = Duration::from_millis(500);

/// What ends a supervised run.
enum Finish {
    /// The main thread's run returned (or the guest could not be built).
    Main(Result<Ended, String>),
    /// Another thread ended the program (`proc_exit`, a trap).
    Worker,
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
    /// The memory updates reserved, for reuse by later ones.
    fresh: FreshAreas,
    /// The program's processes, if it forks: every one is updated.
    processes: Option<Arc<crate::processes::Processes>>,
}

impl Updater {
    /// Compiles the code that resumes the running version, if it was
    /// loaded without it ([`GuestModule::rewinding`]), before a pause that
    /// may resume it: so that the pause does not wait for a compile.
    fn ready_to_resume(&self) -> Result<(), String> {
        let running = self.history.last().map_or(&self.first, |v| &v.module);
        running.rewinding().map(drop).map_err(|e| e.to_string())
    }
}

/// How a supervised guest ended.
#[derive(Debug)]
pub struct Ended {
    /// Its exit.
    pub exit: Exit,
    /// How many times it unwound (pauses and stress unwinds).
    pub unwinds: u64,
    /// The updates made at stress points, if any were asked for.
    pub stress: Option<Tally>,
}

/// Runs the guest `make` builds until it exits, serving `control` (if any)
/// meanwhile, and updating it at its stress points with `stress` (if
/// given). Returns how it ended, or why `make` could not build it (the
/// inner error); the outer error is the host's own failure.
pub fn run(
    make: impl FnOnce() -> Result<Guest, String> + Send + 'static,
    identity: Identity,
    control: Option<ControlSocket>,
    pause_limit: Duration,
    mut stress: Option<StressUpdates>,
) -> Result<Result<Ended, String>, String> {
    let live = Arc::new(Mutex::new(Live { state: "starting", ..Live::default() }));
    let stressed = stress.is_some();
    let (commands_tx, commands) = channel::<Command>();
    let (handle_tx, handle_rx) = channel();
    let (finish_tx, finish) = channel::<Finish>();
    let runner_finish = finish_tx.clone();
    let guest_live = live.clone();
    let runner = std::thread::Builder::new()
        .name("guest".into())
        .stack_size(GUEST_THREAD_STACK)
        .spawn(move || {
            let mut guest = match make() {
                Ok(g) => g,
                Err(e) => {
                    drop(handle_tx);
                    let _ = runner_finish.send(Finish::Main(Err(e)));
                    return;
                }
            };
            if let Some(threads) = &guest.threads {
                let finish = runner_finish.clone();
                threads.on_end(Box::new(move || {
                    let _ = finish.send(Finish::Worker);
                }));
            }
            let seed = guest
                .unwinder
                .as_ref()
                .map(|u| (guest.engine().clone(), u.memory.clone(), u.control.clone(), guest.module().clone()));
            let _ = handle_tx.send(Started {
                pause: guest.pause_handle(),
                seed,
                threads: guest.threads.clone(),
                processes: guest.processes(),
                main_interrupt: guest.interrupt_handle(),
            });
            let exit = drive(&mut guest, &commands, &guest_live, stress.as_mut());
            guest_live.lock().map(|mut l| l.state = "exited").ok();
            let ended = Ended { exit, unwinds: guest.unwinds(), stress: stress.map(|s| s.tally().clone()) };
            let _ = runner_finish.send(Finish::Main(Ok(ended)));
        })
        .map_err(|e| format!("cannot start the guest thread: {e}"))?;
    let socket_path = control.as_ref().map(|c| c.path().to_path_buf());
    let started = handle_rx.recv().ok();
    let threads = started.as_ref().and_then(|s| s.threads.clone());
    if let (Some(control), Some(Started { pause, seed, processes, main_interrupt, .. })) = (control, started) {
        let updater =
            seed.map(|(engine, memory, control, first)| Updater {
                engine,
                memory,
                control,
                first,
                history: Vec::new(),
                fresh: FreshAreas::default(),
                processes: processes.clone(),
            });
        let memory = updater.as_ref().map(|u| u.memory.clone());
        let server = Server {
            threads: threads.clone(),
            processes,
            main_interrupt,
            identity,
            started: Instant::now(),
            live: live.clone(),
            pause,
            commands: commands_tx,
            pause_limit,
            changes: Mutex::new(updater),
            memory,
            stressed,
        };
        std::thread::Builder::new()
            .name("control".into())
            .spawn(move || control.serve(move |req| server.handle(req)))
            .map_err(|e| format!("cannot start the control thread: {e}"))?;
    }
    drop(finish_tx);
    let outcome = match finish.recv() {
        Ok(Finish::Main(ended)) => Ok(ended),
        Ok(Finish::Worker) => match finish.recv_timeout(MAIN_GRACE) {
            Ok(Finish::Main(ended)) => Ok(ended),
            // The main thread is blocked where no request reaches it (a
            // futex wait of a module run as it is): the program has ended
            // all the same, and its thread is left behind.
            _ => match threads.as_ref().and_then(|t| t.take_end()) {
                Some(exit) => Ok(Ok(Ended { exit, unwinds: 0, stress: None })),
                None => runner.join().map_err(|_| "the guest thread failed".to_string()).and_then(|()| Err("the guest thread ended without a word".into())),
            },
        },
        Err(_) => Err("the guest thread failed".to_string()),
    };
    if let Some(path) = socket_path {
        let _ = std::fs::remove_file(path);
    }
    outcome
}

/// What the guest thread hands the control server once the guest is set up.
struct Started {
    pause: Option<PauseHandle>,
    /// The engine, memories and module an updater starts from, for an
    /// instrumented guest.
    seed: Option<(wasmtime::Engine, ProgramMemory, ControlMemory, GuestModule)>,
    threads: Option<Arc<crate::threads::Threads>>,
    processes: Option<Arc<crate::processes::Processes>>,
    main_interrupt: InterruptHandle,
}

/// What the control socket's requests are served against. Requests arrive
/// on many threads at once: `status` reads only the live state and never
/// waits; checkpoints, updates and rollbacks take `changes` in turn, so one
/// runs at a time and each sees the version the previous one left.
struct Server {
    /// The program's other threads, for `status`.
    threads: Option<Arc<crate::threads::Threads>>,
    /// The program's other processes, for `status`.
    processes: Option<Arc<crate::processes::Processes>>,
    /// The main thread's interrupter, for the call `status` finds it in.
    main_interrupt: InterruptHandle,
    identity: Identity,
    started: Instant,
    live: Arc<Mutex<Live>>,
    pause: Option<PauseHandle>,
    commands: Sender<Command>,
    pause_limit: Duration,
    changes: Mutex<Option<Updater>>,
    /// The program memory, for its size (none without instrumentation).
    memory: Option<ProgramMemory>,
    /// Whether the guest thread makes updates of its own (`--stress-update`,
    /// `--update-at`), which the updater here would not know of.
    stressed: bool,
}

impl Server {
    fn handle(&self, req: Request) -> Response {
        match req {
            Request::Status => {
                let threads = self.threads.as_ref().map(|t| t.list()).unwrap_or_default();
                let instances = Instances {
                    main_call: self.main_interrupt.current_call(),
                    threads,
                    processes: self.processes.as_ref().map(|p| p.list()).unwrap_or_default(),
                };
                status(&self.identity, self.started, &self.live, self.pause.is_some(), self.memory.as_ref(), &instances)
            }
            Request::Update(path, timeout) => self.update(Target::Module(path), timeout),
            Request::Rollback(timeout) => self.update(Target::Previous, timeout),
            Request::Checkpoint(path) => self.checkpoint(&path),
        }
    }

    /// Waits for the requests that change or capture the program before
    /// this one. A request that panicked while holding the lock left no
    /// half-done change behind (updates commit on the guest thread), so the
    /// state behind it is still good to use.
    fn changes(&self) -> std::sync::MutexGuard<'_, Option<Updater>> {
        self.changes.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn update(&self, target: Target, timeout_ms: u64) -> Response {
        if self.stressed {
            return refused_update("the program runs with --stress-update or --update-at, which make updates of their own");
        }
        let mut updater = self.changes();
        serve_update(&mut updater, &self.pause, &self.commands, &self.live, target, timeout_ms, self.pause_limit)
    }

    fn checkpoint(&self, path: &std::path::Path) -> Response {
        let Some(pause) = &self.pause else {
            return Response::refused("the module runs without instrumentation (--no-instrument): it cannot be paused");
        };
        let turn = self.changes();
        if let Some(Err(e)) = turn.as_ref().map(Updater::ready_to_resume) {
            return Response::Internal(format!("cannot checkpoint the guest: {e}"));
        }
        let (reply, latency) = checkpoint(pause, &self.commands, path, self.pause_limit);
        if let (Some(d), Ok(mut l)) = (latency, self.live.lock()) {
            l.pauses += 1;
            l.last_pause = Some(d);
        }
        reply
    }
}

/// Runs the guest, serving commands at each pause and updating it at each
/// stress point, until it ends.
fn drive(guest: &mut Guest, commands: &Receiver<Command>, live: &Mutex<Live>, mut stress: Option<&mut StressUpdates>) -> Exit {
    loop {
        live.lock()
            .map(|mut l| {
                l.state = "running";
                l.paused_in = None;
            })
            .ok();
        let exit = guest.run();
        if !matches!(exit, Exit::Paused) {
            return exit;
        }
        let paused_at = Instant::now();
        let paused_in = guest.paused_in();
        live.lock()
            .map(|mut l| {
                l.state = "paused";
                l.paused_in = paused_in;
            })
            .ok();
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
        if let Some(stress) = stress.as_deref_mut().filter(|_| guest.at_stress_point()) {
            if let Err(e) = stress.at_stop(guest, paused_at) {
                return Exit::HostError(format!("a stress update failed at update point {}: {e}", stress.tally().points));
            }
            live.lock().map(|mut l| l.stress = Some(stress.tally().counts())).ok();
        }
    }
}

/// Where the program's instances are, for `status`: the main thread's
/// blocking call, the other threads, and the processes of one that forks.
struct Instances {
    main_call: Option<&'static str>,
    threads: Vec<ThreadStatus>,
    processes: Vec<crate::processes::ProcessStatus>,
}

fn status(
    identity: &Identity,
    started: Instant,
    live: &Mutex<Live>,
    pausable: bool,
    memory: Option<&ProgramMemory>,
    instances: &Instances,
) -> Response {
    let Instances { main_call, threads, processes } = instances;
    let live = match live.lock() {
        Ok(l) => l,
        Err(_) => return Response::refused("status unavailable: the guest thread failed"),
    };
    let last = live.last_pause.map_or("none yet".to_string(), |d| format!("{} us", d.as_micros()));
    let (module, hash) = live.version.clone().unwrap_or_else(|| (identity.module.clone(), identity.hash.clone()));
    let mut body = vec![
        format!("module: {module}"),
        format!("version: sha256:{hash}"),
        format!("uptime: {:.1} s", started.elapsed().as_secs_f64()),
        format!("updates: {}", live.updates),
        format!("instances: {}", 1 + threads.len()),
        format!(
            "instance 0: {}{}",
            whereabouts(live.state, live.paused_in.as_deref(), main_call.filter(|_| live.state == "running")),
            if pausable { "" } else { " (not instrumented: cannot pause)" }
        ),
    ];
    // The other threads by their wasi-threads ids: a thread is paused from
    // its unwind until the program resumes.
    body.extend(threads.iter().map(|t| {
        let state = match t.state {
            ThreadState::Running => "running",
            ThreadState::Parked => "paused",
        };
        format!("instance {}: thread, {}", t.tid, whereabouts(state, t.paused_in.as_deref(), t.in_call))
    }));
    // A program that forks: its processes by pid, the first being the
    // instance above.
    if !processes.is_empty() {
        body.push(format!("processes: {}", processes.len()));
        body.extend(processes.iter().map(|p| match p.ended {
            // Process 1 is instance 0.
            None if p.pid == 1 => format!("process 1: {}", whereabouts(live.state, live.paused_in.as_deref(), *main_call)),
            None => {
                let state = if p.parked { "paused" } else { "running" };
                format!("process {}: parent {}, {}", p.pid, p.parent, whereabouts(state, p.paused_in.as_deref(), p.in_call))
            }
            Some(status) => format!("process {}: parent {}, ended (wait status {status:#x}), not waited for", p.pid, p.parent),
        }));
    }
    body.extend([
        format!("pauses: {}", live.pauses),
        format!("last pause (request to paused): {last}"),
    ]);
    if let Some(figures) = &live.stress {
        body.push(format!("stress updates: {figures}"));
    }
    if let Some(memory) = memory {
        body.push(format!("memory: {} bytes", memory.size()));
        body.push(format!("fresh memory: {} bytes in use, {} bytes free for reuse", live.fresh.used, live.fresh.free));
    }
    Response::Done { body, summary: None }
}

/// A thread's state and where it is: the function it paused in, or the
/// call it may be blocked in (`running, in `sock_accept``).
fn whereabouts(state: &str, paused_in: Option<&str>, in_call: Option<&str>) -> String {
    match (paused_in, in_call) {
        (Some(function), _) => format!("{state} in `{function}`"),
        (None, Some(call)) => format!("{state}, in `{call}`"),
        (None, None) => state.to_string(),
    }
}

/// Pauses the guest for a snapshot and writes it to `path`, through a
/// temporary file, after the guest runs again. Returns the reply and, if
/// the guest paused, how long that took from the request.
fn checkpoint(
    pause: &crate::PauseHandle,
    commands: &Sender<Command>,
    path: &std::path::Path,
    limit: Duration,
) -> (Response, Option<Duration>) {
    let cancelled = Arc::new(AtomicBool::new(false));
    let (reply, answer) = channel();
    if commands.send(Command::Checkpoint { reply, cancelled: cancelled.clone() }).is_err() {
        return (Response::refused("the guest has exited"), None);
    }
    let asked = pause.request();
    let (snapshot, paused_at) = match answer.recv_timeout(limit) {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return (Response::refused(format!("cannot snapshot the guest: {e}")), None),
        Err(RecvTimeoutError::Timeout) => {
            cancelled.store(true, Ordering::SeqCst);
            pause.cancel();
            let reply = Response::refused(format!(
                "the guest did not reach an update point within {} ms (--pause-limit); it keeps running, no snapshot written",
                limit.as_millis()
            ));
            return (reply, None);
        }
        Err(RecvTimeoutError::Disconnected) => return (Response::refused("the guest has exited"), None),
    };
    let latency = paused_at.saturating_duration_since(asked);
    let bytes = snapshot.encode();
    let tmp = path.with_extension("partial");
    if let Err(e) = std::fs::write(&tmp, &bytes).and_then(|_| std::fs::rename(&tmp, path)) {
        let _ = std::fs::remove_file(&tmp);
        return (Response::refused(format!("cannot write {}: {e}", path.display())), Some(latency));
    }
    let summary = format!("{} {} bytes, paused {} us", path.display(), bytes.len(), latency.as_micros());
    (Response::Done { body: Vec::new(), summary: Some(summary) }, Some(latency))
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
) -> Response {
    let (Some(pause), Some(updater)) = (pause, updater) else {
        return refused_update("the module runs without instrumentation (--no-instrument): it cannot be updated");
    };
    // A rollback's refusals keep their own words ("no previous version",
    // "cannot roll back").
    let rollback = matches!(target, Target::Previous);
    let reply = match live_update(updater, pause, commands, target, Duration::from_millis(timeout_ms), pause_limit) {
        Response::Refused(reason) if !rollback => refused_update(reason),
        reply => reply,
    };
    record_update(live, updater, &reply);
    reply
}

/// Every refused update says so in the same words, whichever step refused
/// it: `update refused: <reason>`.
fn refused_update(reason: impl std::fmt::Display) -> Response {
    let reason = reason.to_string();
    match reason.starts_with("update refused: ") {
        true => Response::Refused(reason),
        false => Response::Refused(format!("update refused: {reason}")),
    }
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
) -> Response {
    if updater.history.is_empty() {
        match RunningVersion::initial(&updater.first) {
            Ok(v) => updater.history.push(v),
            Err(e) => return Response::refused(e),
        }
    }
    let Some(current) = updater.history.last().cloned() else {
        return Response::refused("the running version is unknown to the updater");
    };
    let (path, bytes) = match &target {
        Target::Module(path) => match std::fs::read(path) {
            Ok(b) => (path.clone(), b),
            Err(e) => return Response::Unusable(format!("cannot read {}: {e}", path.display())),
        },
        Target::Previous => match updater.history.len() {
            n if n >= 2 => {
                let previous = &updater.history[n - 2];
                (previous.path.clone(), previous.version.wasm.to_vec())
            }
            _ => return Response::refused("no previous version to return to: the program has not been updated"),
        },
    };
    // Preparing reads the new module with a great deal of code, none of
    // which touches the running program: a panic in it is a bug to report,
    // and the program runs on.
    let prepared = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // For the end-to-end test of this path, in debug builds only: no
        // input makes a correct host panic here.
        #[cfg(debug_assertions)]
        if std::env::var_os("UPSTARE_TEST_PANIC_IN_PREPARE").is_some() {
            panic!("UPSTARE_TEST_PANIC_IN_PREPARE is set");
        }
        update::prepare(&updater.engine, &current, &updater.memory, &mut updater.fresh, &updater.control, updater.processes.as_deref(), &path, bytes)
    }))
    .unwrap_or_else(|panic| Err(UpdateError::Internal(format!("preparing the update panicked: {}", panic_message(&*panic)))));
    let prepared = match prepared {
        Ok(p) => p,
        Err(UpdateError::BadInput(e)) => return Response::Unusable(e.to_string()),
        Err(e @ UpdateError::Internal(_)) => return Response::Internal(format!("{e}; the old version runs on")),
        Err(e) => return Response::refused(e),
    };
    let area = prepared.fresh;
    // A refused update resumes the running version.
    if let Err(e) = updater.ready_to_resume() {
        if let Some(area) = area {
            updater.fresh.release(area);
        }
        return Response::Internal(format!("{e}; the old version runs on"));
    }
    let outcome = match (&target, lossy_conversions(&prepared)) {
        (Target::Previous, Some(lost)) => Err(Response::refused(format!(
            "cannot roll back: the update changed the type of {lost}, and going back would lose it"
        ))),
        _ => apply(pause, commands, &current, Arc::new(prepared), timeout, pause_limit),
    };
    let (report, next) = match outcome {
        Ok(done) => done,
        Err(reply) => {
            // Nothing of the new version was left running: its area is free.
            if let Some(area) = area {
                updater.fresh.release(area);
            }
            return reply;
        }
    };
    if matches!(target, Target::Previous) {
        updater.history.truncate(updater.history.len() - 2);
    }
    updater.history.push(next);
    // Each version holds its compiled code: keep what rollbacks can reach
    // in a few steps, not every version ever run.
    if updater.history.len() > MAX_HISTORY {
        updater.history.remove(0);
    }
    updater.fresh.free(&report.freed);
    Response::Done { body: report.to_string().lines().map(str::to_string).collect(), summary: None }
}

/// Sends a prepared update to the guest thread until it applies, refuses
/// for good, or `timeout` ends its retries; the report and the version now
/// running, or the control reply saying why not.
fn apply(
    pause: &PauseHandle,
    commands: &Sender<Command>,
    current: &RunningVersion,
    prepared: Arc<Prepared>,
    timeout: Duration,
    pause_limit: Duration,
) -> Result<(Report, RunningVersion), Response> {
    let deadline = Instant::now() + timeout;
    // Between attempts the program runs on, for longer each time, so a
    // function that blocks the update can finish and leave the stack.
    let mut backoff = Duration::from_millis(2);
    // After a frame could not move where the program paused, the next
    // attempt pauses in a blocking call instead: there a server's loop
    // stands between requests, and a frame of a changed loop can go back
    // to its header; a busy server rarely pauses there on its own. Such an
    // attempt waits briefly: a program that makes no blocking call
    // meanwhile is paused at its next update point by the attempt after.
    let mut at_blocking_call = false;
    loop {
        let claim = Arc::new(AtomicU8::new(PENDING));
        let (reply, answer) = channel();
        let command = Command::Update { current: current.clone(), prepared: prepared.clone(), reply, claim: claim.clone() };
        if commands.send(command).is_err() {
            return Err(Response::refused("the guest has exited"));
        }
        let (asked, wait) = match at_blocking_call {
            true => (pause.request_at_blocking_call(), pause_limit.min(BLOCKING_CALL_WAIT)),
            false => (pause.request(), pause_limit),
        };
        let outcome = match answer.recv_timeout(wait) {
            Ok(outcome) => outcome,
            Err(RecvTimeoutError::Timeout)
                if claim.compare_exchange(PENDING, CANCELLED, Ordering::SeqCst, Ordering::SeqCst).is_err() =>
            {
                // The guest thread is applying it: its answer decides.
                match answer.recv() {
                    Ok(outcome) => outcome,
                    Err(_) => return Err(Response::refused("the guest has exited")),
                }
            }
            Err(RecvTimeoutError::Timeout) if at_blocking_call => {
                pause.cancel();
                at_blocking_call = false;
                continue;
            }
            Err(RecvTimeoutError::Timeout) => {
                pause.cancel();
                return Err(Response::refused(format!(
                    "update refused: the guest did not reach an update point within {} ms (--pause-limit); the old version runs on",
                    pause_limit.as_millis()
                )));
            }
            Err(RecvTimeoutError::Disconnected) => return Err(Response::refused("the guest has exited")),
        };
        match outcome {
            Ok(mut report) => {
                report.request_to_paused = Some(report.paused_at.saturating_duration_since(asked));
                return Ok((report, prepared.next.clone()));
            }
            // A value that looks like a stale pointer may change as the
            // program runs on (a counter passing through an address range,
            // a pointer dropped): try again, as for a frame.
            Err(UpdateError::Stale(Stale::Held(reason))) if Instant::now() < deadline => {
                tracing::debug!("update waits: {reason}");
                std::thread::sleep(backoff.min(deadline.saturating_duration_since(Instant::now())));
                backoff = (backoff * 2).min(Duration::from_millis(100));
            }
            Err(UpdateError::Frame(frame)) if Instant::now() < deadline => {
                // Let the program run on, so that frame can leave the stack.
                tracing::debug!("update waits: {frame}");
                at_blocking_call = !at_blocking_call;
                if !at_blocking_call {
                    std::thread::sleep(backoff.min(deadline.saturating_duration_since(Instant::now())));
                    backoff = (backoff * 2).min(Duration::from_millis(100));
                }
            }
            Err(UpdateError::Frame(frame)) => {
                return Err(Response::refused(format!(
                    "update refused: {} was still on the stack after {} ms and cannot move to the new version: {}; the old version runs on",
                    frame.function,
                    timeout.as_millis(),
                    frame
                )))
            }
            Err(UpdateError::BadInput(e)) => return Err(Response::Unusable(e.to_string())),
            Err(e @ UpdateError::Internal(_)) => return Err(Response::Internal(format!("{e}; the old version runs on"))),
            Err(e) => return Err(Response::refused(format!("{e}; the old version runs on"))),
        }
    }
}

/// How long an attempt that pauses only in a blocking call waits for one.
const BLOCKING_CALL_WAIT: Duration = Duration::from_millis(200);

/// What a panic said, for the report of an internal error.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    match (panic.downcast_ref::<&str>(), panic.downcast_ref::<String>()) {
        (Some(s), _) => s.to_string(),
        (_, Some(s)) => s.clone(),
        _ => "no message".into(),
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

fn record_update(live: &Mutex<Live>, updater: &Updater, reply: &Response) {
    if let Ok(mut l) = live.lock() {
        l.fresh = updater.fresh.figures();
    }
    if !reply.is_done() {
        return;
    }
    if let (Ok(mut l), Some(v)) = (live.lock(), updater.history.last()) {
        l.version = Some((v.path.display().to_string(), v.hash.clone()));
        l.updates += 1;
    }
}

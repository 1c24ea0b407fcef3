//! `upstare-host run`: run a module to completion, its exit status becoming
//! the host's.

use std::ffi::OsString;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use super::bad_input;
use crate::control::{self, ControlSocket};
use crate::stress_update::{StressUpdates, Target};
use crate::supervise::{self, Ended, Identity};
use crate::fork_memory::ForkMemory;
use crate::{new_cached_engine, Exit, Guest, GuestConfig, GuestModule, LoadOptions, PreopenDir};

/// Exit status when the guest traps (as a C program that aborts).
const EXIT_TRAP: u8 = 134;
/// Exit status when the host itself fails.
const EXIT_HOST_ERROR: u8 = 1;

/// Run a WebAssembly module (a C program built for wasm32-wasi).
///
/// Options come before the module; everything after the module is passed
/// to the guest as its arguments. Listeners from --tcplisten get guest fds
/// 3, 4, ... in order, then each --dir gets the next fd.
///
/// The program starts on code that can pause but not resume; the code that
/// resumes it is compiled before its first pause (by `update` or
/// `checkpoint`, before they pause it). The instrumented module and the
/// machine code compiled from it are cached in $UPSTARE_CACHE_DIR (else
/// $XDG_CACHE_HOME/upstare, else ~/.cache/upstare), so a restart neither
/// instruments nor compiles again.
#[derive(Args, Debug)]
pub struct RunArgs {
    /// Give the guest a host directory, as GUEST (default: the HOST path
    /// as written). Paths outside it are refused.
    #[arg(long = "dir", value_name = "HOST[::GUEST]")]
    dirs: Vec<String>,

    /// Set an environment variable for the guest; `--env NAME` passes the
    /// host's value of NAME.
    #[arg(long = "env", value_name = "NAME[=VALUE]")]
    env: Vec<String>,

    /// Listen on a TCP address and hand the listener to the guest. Port 0
    /// picks a free port; the host prints `upstare-host: listening on
    /// ADDR (guest fd N)` on stderr for each listener.
    #[arg(long = "tcplisten", value_name = "ADDR")]
    tcplisten: Vec<String>,

    /// Run the module as it is, without instrumentation: no pausing, no
    /// snapshots, no live update. The baseline for measurements.
    #[arg(long = "no-instrument", conflicts_with = "stress_pause")]
    no_instrument: bool,

    /// Diagnostic: unwind the guest's whole stack and rewind it at every
    /// Nth update point it reaches (loop headers, blocking calls). The
    /// program's behaviour must not change.
    #[arg(long = "stress-pause", value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    stress_pause: Option<u32>,

    /// Diagnostic: at every Nth update point, update the guest to its own
    /// module with every function treated as changed, so each frame moves
    /// by what its values mean, not as it is. The program's behaviour must
    /// not change; a summary of the points where the update applied,
    /// retreated to a loop header or waited (a frame could not move yet)
    /// is printed at the end. Live updates are refused meanwhile.
    #[arg(long = "stress-update", value_name = "N", value_parser = clap::value_parser!(u32).range(1..), conflicts_with_all = ["stress_pause", "no_instrument", "update_at"])]
    stress_update: Option<u32>,

    /// Diagnostic: when the guest reaches its Kth update point, update it
    /// to MODULE (another build of the same program), once; if a frame
    /// cannot move there, the old version runs on. The program's behaviour
    /// must not change; what happened is printed at the end.
    #[arg(long = "update-at", value_name = "K:MODULE", value_parser = parse_update_at, conflicts_with_all = ["stress_pause", "no_instrument"])]
    update_at: Option<(u32, PathBuf)>,

    /// The control socket for `upstare-host status` and `checkpoint`
    /// [default: PID.sock in $XDG_RUNTIME_DIR/upstare-host, else in
    /// /tmp/upstare-host-UID].
    #[arg(long = "control", value_name = "PATH")]
    control: Option<PathBuf>,

    /// How long a checkpoint may wait for the guest to reach an update point
    /// before it is refused (the guest runs on), in milliseconds.
    #[arg(long = "pause-limit", value_name = "MS", default_value_t = supervise::DEFAULT_PAUSE_LIMIT.as_millis() as u64, value_parser = clap::value_parser!(u64).range(1..))]
    pause_limit: u64,

    /// How many threads a multi-threaded (wasi-threads) program may run
    /// besides its main one; `pthread_create` past that fails with EAGAIN
    /// and the host says so on stderr.
    #[arg(long = "max-threads", value_name = "N", default_value_t = crate::threads::DEFAULT_MAX_THREADS, value_parser = parse_max_threads)]
    max_threads: usize,

    /// How many processes a program that forks (upstare.h's fork) may have
    /// at once, ended ones not yet waited for included; `fork` past that
    /// fails with EAGAIN and the host says so on stderr.
    #[arg(long = "max-processes", value_name = "N", default_value_t = crate::processes::DEFAULT_MAX_PROCESSES, value_parser = parse_max_processes)]
    max_processes: usize,

    /// How a fork gives the child its memory: `cow` shares the parent's
    /// pages until either writes one (each page written after a fork then
    /// faults once; memory files, which Linux may back without huge
    /// pages); `copy` copies the whole memory at each fork.
    #[arg(long = "fork-memory", value_name = "HOW", default_value = "cow", value_parser = parse_fork_memory)]
    fork_memory: ForkMemory,

    /// The module, then the guest's arguments.
    #[arg(required = true, value_name = "WASM", trailing_var_arg = true, allow_hyphen_values = true)]
    module_and_args: Vec<OsString>,
}

fn parse_update_at(spec: &str) -> Result<(u32, PathBuf), String> {
    let (k, module) = spec.split_once(':').ok_or("expected K:MODULE, e.g. 100:app-v2.wasm")?;
    let k: u32 = k.parse().map_err(|_| format!("`{k}` is not an update point number (1, 2, ...)"))?;
    if k == 0 || module.is_empty() {
        return Err("expected K:MODULE with K at least 1, e.g. 100:app-v2.wasm".into());
    }
    Ok((k, PathBuf::from(module)))
}

fn parse_max_threads(spec: &str) -> Result<usize, String> {
    match spec.parse::<usize>() {
        Ok(n) if (1..=crate::threads::MAX_THREADS).contains(&n) => Ok(n),
        _ => Err(format!("expected a number of threads from 1 to {}", crate::threads::MAX_THREADS)),
    }
}

fn parse_max_processes(spec: &str) -> Result<usize, String> {
    match spec.parse::<usize>() {
        Ok(n) if (1..=crate::processes::MAX_PROCESSES).contains(&n) => Ok(n),
        _ => Err(format!("expected a number of processes from 1 to {}", crate::processes::MAX_PROCESSES)),
    }
}

fn parse_fork_memory(spec: &str) -> Result<ForkMemory, String> {
    match spec {
        "cow" => Ok(ForkMemory::CopyOnWrite),
        "copy" => Ok(ForkMemory::Copy),
        _ => Err("expected `cow` or `copy`".into()),
    }
}

fn parse_dir(spec: &str) -> PreopenDir {
    match spec.split_once("::") {
        Some((host, guest)) => PreopenDir { host: host.into(), guest: guest.into() },
        None => PreopenDir { host: spec.into(), guest: spec.into() },
    }
}

fn parse_env(spec: &str) -> Option<(String, String)> {
    match spec.split_once('=') {
        Some((k, v)) => Some((k.into(), v.into())),
        None => std::env::var(spec).ok().map(|v| (spec.into(), v)),
    }
}

/// Binds every `--tcplisten` address, in order.
pub(super) fn bind_all(specs: &[String]) -> Result<Vec<TcpListener>, String> {
    specs.iter().map(|s| bind(s)).collect()
}

/// The guest fd of the first --tcplisten listener: the first after stdin,
/// stdout and stderr (see [`RunArgs`]).
const FIRST_LISTENER_FD: u32 = 3;

/// Prints where each listener listens, as the guest's fd: with port 0 the
/// system picks the port, and this line is how a user (or a test) learns it.
pub(super) fn announce(listeners: &[TcpListener], fds: impl IntoIterator<Item = u32>) {
    for (listener, fd) in listeners.iter().zip(fds) {
        if let Ok(addr) = listener.local_addr() {
            eprintln!("upstare-host: listening on {addr} (guest fd {fd})");
        }
    }
}

fn bind(spec: &str) -> Result<TcpListener, String> {
    let addr: SocketAddr = spec
        .parse()
        .map_err(|_| format!("invalid --tcplisten address `{spec}` (expected IP:PORT, e.g. 127.0.0.1:8080)"))?;
    TcpListener::bind(addr).map_err(|e| format!("cannot listen on {addr} for --tcplisten: {e}"))
}

/// Runs the command.
pub fn execute(args: RunArgs) -> ExitCode {
    let mut words = args.module_and_args.into_iter();
    let Some(module_path) = words.next().map(PathBuf::from) else {
        return bad_input("no module given");
    };
    let mut guest_args = vec![module_path.to_string_lossy().into_owned()];
    for w in words {
        match w.into_string() {
            Ok(s) => guest_args.push(s),
            Err(w) => return bad_input(format!("guest argument {w:?} is not valid UTF-8")),
        }
    }

    let engine = match new_cached_engine(None) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("error: cannot create the engine: {e}");
            return ExitCode::from(EXIT_HOST_ERROR);
        }
    };
    let stress = args.stress_pause.is_some() || args.stress_update.is_some() || args.update_at.is_some();
    let options = LoadOptions { instrument: !args.no_instrument, stress, ..LoadOptions::default() };
    let module = match GuestModule::load_with(&engine, &module_path, &options) {
        Ok(m) => m,
        Err(e) => return bad_input(e),
    };
    let mut config = GuestConfig::new(guest_args);
    config.stress_pause = args.stress_pause;
    let stress = match (&args.stress_update, &args.update_at) {
        (Some(n), _) => Some((*n, Target::Itself)),
        (None, Some((k, path))) => {
            // Found out now, not at the Kth point of a long run.
            let checked = std::fs::read(path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))
                .and_then(|bytes| GuestModule::check_bytes(path, &bytes).map_err(|e| e.to_string()));
            if let Err(e) = checked {
                return bad_input(format!("--update-at: {e}"));
            }
            Some((*k, Target::Module(path.clone())))
        }
        (None, None) => None,
    };
    config.stress_stop = stress.as_ref().map(|(n, _)| *n);
    config.max_threads = args.max_threads;
    config.max_processes = args.max_processes;
    config.fork_memory = args.fork_memory;
    let stress = stress.map(|(_, target)| StressUpdates::new(target));
    config.env = args.env.iter().filter_map(|s| parse_env(s)).collect();
    config.dirs = args.dirs.iter().map(|s| parse_dir(s)).collect();
    config.listeners = match bind_all(&args.tcplisten) {
        Ok(l) => l,
        Err(msg) => return bad_input(msg),
    };
    let control = match control_socket(args.control.as_deref()) {
        Ok(c) => c,
        Err(msg) => return bad_input(msg),
    };
    announce(&config.listeners, FIRST_LISTENER_FD..);
    let identity = Identity {
        module: module_path.display().to_string(),
        hash: module.hash_hex(),
    };
    // The guest runs on its own thread (deep C recursion needs a big native
    // stack); this one waits, and another serves the control socket.
    let make = move || Guest::new(&engine, &module, config).map_err(|e| e.to_string());
    let limit = std::time::Duration::from_millis(args.pause_limit);
    let stress_summary = match (args.stress_update, &args.update_at) {
        (Some(n), _) => Some(format!("--stress-update {n}")),
        (None, Some((k, path))) => Some(format!("--update-at {k}:{}", path.display())),
        (None, None) => None,
    };
    finish(supervise::run(make, identity, control, limit, stress), args.stress_pause, stress_summary)
}

/// Turns how a supervised guest ended into the host's exit status, printing
/// what the user should see.
pub(super) fn finish(outcome: Result<Result<Ended, String>, String>, stress_pause: Option<u32>, stress_update: Option<String>) -> ExitCode {
    let outcome = match outcome {
        Ok(outcome) => outcome,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_HOST_ERROR);
        }
    };
    let outcome = outcome.map(|ended| {
        if let Some(n) = stress_pause {
            eprintln!("upstare-host: --stress-pause {n}: the stack was unwound and rewound {} times", ended.unwinds);
        }
        if let (Some(option), Some(tally)) = (stress_update, &ended.stress) {
            eprintln!("upstare-host: {option}: {tally}");
        }
        ended.exit
    });
    match outcome {
        Err(e) => bad_input(e),
        Ok(Exit::Status(code)) => exit_status(code),
        Ok(Exit::Trap(report)) => {
            eprintln!("error: {report}");
            ExitCode::from(EXIT_TRAP)
        }
        Ok(Exit::Paused) => {
            eprintln!("error: the guest paused, but nothing asked it to");
            ExitCode::from(EXIT_HOST_ERROR)
        }
        Ok(Exit::Interrupted { call }) => {
            eprintln!("error: guest interrupted while blocked in `{call}`");
            ExitCode::from(EXIT_HOST_ERROR)
        }
        Ok(Exit::HostError(msg)) => {
            eprintln!("error: {msg}");
            ExitCode::from(EXIT_HOST_ERROR)
        }
    }
}

/// Binds the control socket, at `path` or at the default place.
pub(super) fn control_socket(path: Option<&std::path::Path>) -> Result<Option<ControlSocket>, String> {
    let path = path.map_or_else(control::default_path, std::path::Path::to_path_buf);
    ControlSocket::bind(&path).map(Some).map_err(|e| format!("--control: {e}"))
}

/// The guest's status as the host's: statuses outside 0..=255 cannot be
/// represented by a process and become 1.
fn exit_status(code: i32) -> ExitCode {
    match u8::try_from(code) {
        Ok(c) => ExitCode::from(c),
        Err(_) => ExitCode::from(1),
    }
}

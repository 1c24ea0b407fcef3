//! `upstare-host run`: run a module to completion, its exit status becoming
//! the host's.

use std::ffi::OsString;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use super::bad_input;
use crate::control::{self, ControlSocket};
use crate::supervise::{self, Identity};
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
/// The instrumented module and the machine code compiled from it are cached
/// in $UPSTARE_CACHE_DIR (else $XDG_CACHE_HOME/upstare, else
/// ~/.cache/upstare), so a restart neither instruments nor compiles again.
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

    /// The control socket for `upstare-host status` and `checkpoint`
    /// [default: PID.sock in $XDG_RUNTIME_DIR/upstare-host, else in
    /// /tmp/upstare-host-UID].
    #[arg(long = "control", value_name = "PATH")]
    control: Option<PathBuf>,

    /// How long a checkpoint may wait for the guest to reach an update point
    /// before it is refused (the guest runs on), in milliseconds.
    #[arg(long = "pause-limit", value_name = "MS", default_value_t = 2000, value_parser = clap::value_parser!(u64).range(1..))]
    pause_limit: u64,

    /// The module, then the guest's arguments.
    #[arg(required = true, value_name = "WASM", trailing_var_arg = true, allow_hyphen_values = true)]
    module_and_args: Vec<OsString>,
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
    let options = LoadOptions { instrument: !args.no_instrument, cache_dir: None };
    let module = match GuestModule::load_with(&engine, &module_path, &options) {
        Ok(m) => m,
        Err(e) => return bad_input(e),
    };
    let mut config = GuestConfig::new(guest_args);
    config.stress_pause = args.stress_pause;
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
    finish(supervise::run(make, identity, control, limit), args.stress_pause)
}

/// Turns how a supervised guest ended into the host's exit status, printing
/// what the user should see.
pub(super) fn finish(outcome: Result<Result<(Exit, u64), String>, String>, stress_pause: Option<u32>) -> ExitCode {
    let outcome = match outcome {
        Ok(outcome) => outcome,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_HOST_ERROR);
        }
    };
    let outcome = outcome.map(|(exit, unwinds)| {
        if let Some(n) = stress_pause {
            eprintln!("upstare-host: --stress-pause {n}: the stack was unwound and rewound {unwinds} times");
        }
        exit
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

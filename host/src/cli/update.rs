//! `upstare-host update NEW.wasm`: the running program becomes NEW, without
//! stopping.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use crate::control::{self, Request};

/// Update the running program to NEW.wasm, live.
///
/// NEW.wasm is the next version of the program, built with bin/upstare-cc
/// like the first. The host plans the update (functions, globals, table
/// slots), compiles the new version while the program runs, then pauses it
/// at its next update point, moves its state and stack to the new code and
/// resumes it. It prints what changed and how long the program was paused.
/// A program starts without the code that resumes it; the first update or
/// checkpoint compiles that too, before the pause, so it takes longer.
///
/// Exit status: 0 updated; 1 refused (`error: update refused: REASON`),
/// the old version runs on untouched; 2 bad input, nothing tried (the
/// module is missing, not wasm or not built with bin/upstare-cc, or no host
/// answers); 3 an internal error, a bug to report, the old version runs on.
/// `upstare-patchgen OLD NEW` gives the same verdict, and the same status,
/// without a running program (except for what only the running program can
/// tell: frames that cannot move yet, pointers to a global whose type
/// changed, a C transformer that fails).
#[derive(Args, Debug)]
pub struct UpdateArgs {
    /// The host's control socket [default: the only running host's, in
    /// $XDG_RUNTIME_DIR/upstare-host or /tmp/upstare-host-UID].
    #[arg(long = "control", value_name = "PATH")]
    control: Option<PathBuf>,

    /// How long to wait, in milliseconds, for functions whose frames cannot
    /// move to the new version to leave the stack, and for values that
    /// would point at a converted global's old copy (or integers that look
    /// like such an address), or at a heap allocation that may hold a
    /// struct whose type changed where no typed pointer says so, to change,
    /// before refusing.
    #[arg(long, value_name = "MS", default_value_t = crate::supervise::DEFAULT_UPDATE_TIMEOUT.as_millis() as u64)]
    timeout: u64,

    /// The new version of the program.
    #[arg(value_name = "NEW.wasm")]
    module: PathBuf,
}

/// Runs the command.
pub fn execute(args: UpdateArgs) -> ExitCode {
    // No host is the first thing to report, as for every client command.
    let control = match args.control.map_or_else(control::find_default, Ok) {
        Ok(path) => path,
        Err(e) => return super::bad_input(e),
    };
    // Checked here too, so a typo gets its answer without a round trip.
    if let Err(e) = std::fs::metadata(&args.module) {
        return super::bad_input(format!("cannot read {}: {e}", args.module.display()));
    }
    // The host reads the file: give it an absolute path.
    let module = std::path::absolute(&args.module).unwrap_or(args.module);
    super::ask(Some(control), &Request::Update(module, args.timeout))
}

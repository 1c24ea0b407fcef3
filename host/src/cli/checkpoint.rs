//! `upstare-host checkpoint FILE`: a snapshot of a running program, which
//! goes on running.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use crate::control::Request;

/// Write a snapshot of the running program to FILE.
///
/// The snapshot is versioned and checksummed; resume it with
/// `upstare-host restore FILE`. The program pauses at its next update point
/// for the capture only, then goes on. A program starts without the code
/// that resumes it; the first checkpoint or update compiles that, before
/// the pause, so it takes longer.
#[derive(Args, Debug)]
pub struct CheckpointArgs {
    /// The host's control socket [default: the only running host's, in
    /// $XDG_RUNTIME_DIR/upstare-host or /tmp/upstare-host-UID].
    #[arg(long = "control", value_name = "PATH")]
    control: Option<PathBuf>,

    /// Where to write the snapshot.
    #[arg(value_name = "FILE")]
    file: PathBuf,
}

/// Runs the command.
pub fn execute(args: CheckpointArgs) -> ExitCode {
    // The host writes the file: give it an absolute path.
    let file = std::path::absolute(&args.file).unwrap_or(args.file);
    super::ask(args.control, &Request::Checkpoint(file))
}

//! `upstare-host status`: what a running host is running, and how.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use crate::control::Request;

/// Show what a running upstare-host runs: module, version, uptime, state, memory.
#[derive(Args, Debug)]
pub struct StatusArgs {
    /// The host's control socket [default: the only running host's, in
    /// $XDG_RUNTIME_DIR/upstare-host or /tmp/upstare-host-UID].
    #[arg(long = "control", value_name = "PATH")]
    control: Option<PathBuf>,
}

/// Runs the command.
pub fn execute(args: StatusArgs) -> ExitCode {
    super::ask(args.control, &Request::Status)
}

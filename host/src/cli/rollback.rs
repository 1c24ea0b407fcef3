//! `upstare-host rollback`: back to the version that ran before the last
//! update, live.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use crate::control::Request;

/// Return the running program to its previous version, live.
///
/// This is an update to the previous version, planned against the running
/// one. It is refused, and the running version goes on, when it cannot be
/// inverted: the last update changed a global's type and going back would
/// lose fields, or a frame cannot move back.
#[derive(Args, Debug)]
pub struct RollbackArgs {
    /// The host's control socket [default: the only running host's, in
    /// $XDG_RUNTIME_DIR/upstare-host or /tmp/upstare-host-UID].
    #[arg(long = "control", value_name = "PATH")]
    control: Option<PathBuf>,

    /// How long to wait, in milliseconds, for frames that cannot move to
    /// leave the stack before refusing.
    #[arg(long, value_name = "MS", default_value_t = crate::supervise::DEFAULT_UPDATE_TIMEOUT.as_millis() as u64)]
    timeout: u64,
}

/// Runs the command.
pub fn execute(args: RollbackArgs) -> ExitCode {
    super::ask(args.control, &Request::Rollback(args.timeout))
}

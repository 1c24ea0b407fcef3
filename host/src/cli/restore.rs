//! `upstare-host restore FILE`: resume a snapshot in this process.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use super::bad_input;
use super::run::{announce, bind_all, control_socket, finish};
use crate::wasi::persist::FdKind;
use crate::supervise::{self, Identity};
use crate::{new_cached_engine, Guest, GuestConfig, GuestModule, Snapshot};

/// Resume a program from a snapshot written by `upstare-host checkpoint`.
///
/// The snapshot carries the module, its arguments, environment and open
/// files. Preopened directories are opened again at their recorded host
/// paths, files reopened at their offsets, listeners bound again (to the
/// addresses given with --tcplisten, in order, else to their old ones);
/// connections cannot move between processes and reach the program closed
/// by their peer. A damaged or foreign file is refused (status 2), and so
/// is one whose frames another version of UpStare laid out otherwise, or
/// that does not record the layout (format 3 and before): resume it with
/// the version that took it.
#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// Listen on this address in place of the snapshot's next listener
    /// (port 0 picks a free port; each is printed on stderr as for `run`).
    #[arg(long = "tcplisten", value_name = "ADDR")]
    tcplisten: Vec<String>,

    /// The control socket of the resumed program [default: as for `run`].
    #[arg(long = "control", value_name = "PATH")]
    control: Option<PathBuf>,

    /// How long a checkpoint may wait for the guest to reach an update point
    /// before it is refused, in milliseconds.
    #[arg(long = "pause-limit", value_name = "MS", default_value_t = supervise::DEFAULT_PAUSE_LIMIT.as_millis() as u64, value_parser = clap::value_parser!(u64).range(1..))]
    pause_limit: u64,

    /// The snapshot file.
    #[arg(value_name = "FILE")]
    file: PathBuf,
}

/// Runs the command.
pub fn execute(args: RestoreArgs) -> ExitCode {
    let bytes = match std::fs::read(&args.file) {
        Ok(b) => b,
        Err(e) => return bad_input(format!("cannot read {}: {e}", args.file.display())),
    };
    let snapshot = match Snapshot::decode(&bytes) {
        Ok(s) => s,
        Err(e) => return bad_input(format!("{}: {e}", args.file.display())),
    };
    let engine = match new_cached_engine(None) {
        Ok(e) => e,
        Err(e) => return bad_input(format!("cannot create the engine: {e}")),
    };
    let module = match GuestModule::from_bytes(&engine, &args.file, &snapshot.module) {
        Ok(m) => m,
        Err(e) => return bad_input(e),
    };
    let mut config = GuestConfig::new(snapshot.args.clone());
    config.listeners = match bind_all(&args.tcplisten) {
        Ok(l) => l,
        Err(msg) => return bad_input(msg),
    };
    let control = match control_socket(args.control.as_deref()) {
        Ok(c) => c,
        Err(msg) => return bad_input(msg),
    };
    let recorded = snapshot.fds.iter().filter(|r| matches!(r.kind, FdKind::Listener { .. })).map(|r| r.fd);
    announce(&config.listeners, recorded);
    let identity = Identity { module: args.file.display().to_string(), hash: snapshot.module_hash_hex() };
    let make = move || Guest::restore(&engine, &module, config, &snapshot).map_err(|e| e.to_string());
    let limit = std::time::Duration::from_millis(args.pause_limit);
    finish(supervise::run(make, identity, control, limit, None), None, None)
}

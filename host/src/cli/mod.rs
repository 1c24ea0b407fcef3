//! The `upstare-host` command line: parsing, and dispatch to one module per
//! subcommand. `upstare-host app.wasm` means `upstare-host run app.wasm`.

mod checkpoint;
mod restore;
mod rollback;
mod run;
mod status;
mod update;

use std::ffi::OsString;
use std::process::ExitCode;

use std::io::Write;

use clap::{Parser, Subcommand};

/// Exit status for a request the host refused: nothing changed, the
/// program runs on as it was (an update refused, or rolled back).
pub const EXIT_REFUSED: u8 = 1;

/// Exit status for bad input: a missing or invalid module, a bad flag.
pub const EXIT_BAD_INPUT: u8 = 2;

/// Exit status for an internal error of the host: a bug, reported instead
/// of a crash; the program runs on as it was.
pub const EXIT_INTERNAL: u8 = 3;

/// Runs C programs compiled to wasm32-wasi, ready to be updated live.
///
/// `upstare-host [OPTIONS] app.wasm [ARGS...]` is short for
/// `upstare-host run [OPTIONS] app.wasm [ARGS...]`.
#[derive(Parser, Debug)]
#[command(name = "upstare-host", version, about, long_about = None)]
#[command(after_help = "Without a subcommand, `run` is assumed: `upstare-host app.wasm` runs app.wasm.")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    Run(run::RunArgs),
    Status(status::StatusArgs),
    Checkpoint(checkpoint::CheckpointArgs),
    Restore(restore::RestoreArgs),
    Update(update::UpdateArgs),
    Rollback(rollback::RollbackArgs),
}

/// The subcommand names; anything else in first position is a module path
/// or a `run` option.
const SUBCOMMANDS: &[&str] = &["run", "status", "checkpoint", "restore", "update", "rollback", "help"];

/// Puts `run` in front of the arguments unless a subcommand or a top-level
/// flag is already there.
fn with_default_subcommand(mut args: Vec<OsString>) -> Vec<OsString> {
    let first = args.get(1).and_then(|a| a.to_str());
    let explicit = match first {
        None => true,
        Some(a) => SUBCOMMANDS.contains(&a) || matches!(a, "-h" | "--help" | "-V" | "--version"),
    };
    if !explicit {
        args.insert(1, "run".into());
    }
    args
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    init_logging();
    let args = with_default_subcommand(std::env::args_os().collect());
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { ExitCode::from(EXIT_BAD_INPUT) } else { ExitCode::SUCCESS };
        }
    };
    match cli.command {
        Command::Run(args) => run::execute(args),
        Command::Status(args) => status::execute(args),
        Command::Checkpoint(args) => checkpoint::execute(args),
        Command::Restore(args) => restore::execute(args),
        Command::Update(args) => update::execute(args),
        Command::Rollback(args) => rollback::execute(args),
    }
}

/// Host diagnostics go to stderr, filtered by `UPSTARE_LOG` (e.g.
/// `UPSTARE_LOG=debug`); nothing is printed by default.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("UPSTARE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("off"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Prints a one-line error and returns the bad-input exit status.
fn bad_input(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::from(EXIT_BAD_INPUT)
}

/// Sends `request` to the host behind `control` (else the only running
/// host's socket) and prints its reply.
fn ask(control: Option<std::path::PathBuf>, request: &crate::control::Request) -> ExitCode {
    match control.map_or_else(crate::control::find_default, Ok) {
        Ok(path) => print_reply(crate::control::request(&path, request)),
        Err(e) => bad_input(e),
    }
}

/// Prints a control reply: a carried-out request's lines to stdout with
/// status 0, a refusal to stderr as `error: ...` with status 1; a module the
/// host could not use, or an unreachable host, is bad input (status 2); an
/// internal error is status 3.
fn print_reply(reply: Result<crate::control::Response, String>) -> ExitCode {
    use crate::control::Response;
    match reply {
        Err(e) => bad_input(e),
        Ok(Response::Unusable(reason)) => bad_input(reason),
        Ok(Response::Refused(reason)) => {
            eprintln!("error: {reason}");
            ExitCode::from(EXIT_REFUSED)
        }
        Ok(Response::Internal(reason)) => {
            eprintln!("error: {reason}");
            ExitCode::from(EXIT_INTERNAL)
        }
        Ok(Response::Done { body, summary }) => {
            let mut out = body.join("\n");
            if let Some(summary) = summary {
                if !out.is_empty() {
                    out.push('\n');
                }
                out.push_str(&summary);
            }
            // A closed pipe (`| head`) is the reader's choice, not an error.
            let _ = writeln!(std::io::stdout(), "{out}");
            ExitCode::SUCCESS
        }
    }
}

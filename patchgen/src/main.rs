//! `upstare-patchgen OLD.wasm NEW.wasm`: prints the plan for updating a
//! program running OLD to NEW, and its verdict.
//!
//! Exit status, as for `upstare-host update`: 0 when the update is safe, 1
//! when it would be refused (the reasons are printed), 2 for a module that
//! cannot be used at all, 3 for an internal error (a bug).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use upstare_patchgen::plan::{plan, DataFate, Plan};
use upstare_patchgen::version::Version;

/// Plan a live update from OLD to NEW (both built with bin/upstare-cc).
///
/// OLD is taken as running at the addresses it was linked for (a program
/// started from it and not yet updated). What depends on the running
/// program's state is checked by the host at update time, not here: the
/// frames of active functions, and pointers to globals whose type changed.
///
/// The verdict includes relinking NEW against OLD's layout: what cannot be
/// relinked is refused here as it would be by `upstare-host update`.
///
/// Exit status: 0 safe, 1 refused (the reasons are printed), 2 a module
/// that cannot be used at all (missing, not wasm, not built with
/// bin/upstare-cc), 3 an internal error (a bug in upstare-patchgen).
#[derive(Parser)]
#[command(name = "upstare-patchgen", version)]
struct Args {
    /// The running version.
    old: PathBuf,
    /// The next version.
    new: PathBuf,
    /// Also list every data object and its fate.
    #[arg(long)]
    verbose: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match std::panic::catch_unwind(|| run(&args)) {
        Ok(Ok(true)) => ExitCode::SUCCESS,
        Ok(Ok(false)) => ExitCode::from(1),
        Ok(Err(e)) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
        Err(_) => {
            // The panic message is already on stderr.
            eprintln!("error: internal error (a bug in upstare-patchgen, please report it)");
            ExitCode::from(3)
        }
    }
}

fn read(path: &PathBuf) -> anyhow::Result<Arc<Vec<u8>>> {
    use anyhow::Context;
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    // Said in the host's words, before a parser says it in its own.
    if !bytes.starts_with(b"\0asm") {
        anyhow::bail!("{} is not a WebAssembly module (it does not start with the `\\0asm` magic number)", path.display());
    }
    Ok(Arc::new(bytes))
}

fn run(args: &Args) -> anyhow::Result<bool> {
    use anyhow::Context;
    // For the end-to-end test of the internal-error path, in debug builds
    // only: no input makes a correct planner panic.
    #[cfg(debug_assertions)]
    if std::env::var_os("UPSTARE_TEST_PANIC_IN_PLAN").is_some() {
        panic!("UPSTARE_TEST_PANIC_IN_PLAN is set");
    }
    let old = Version::initial(read(&args.old)?).with_context(|| format!("{}", args.old.display()))?;
    let plan = plan(Arc::new(old), read(&args.new)?).with_context(|| format!("{}", args.new.display()))?;
    let mut text = summary(&plan, args.verbose);
    if let Some(note) = constructors_note(&plan) {
        text += &note;
    }
    for reason in &plan.refusals {
        text += &format!("refused: {reason}\n");
    }
    text += if plan.is_safe() { "verdict: safe\n" } else { "verdict: refused\n" };
    // A closed pipe (`| head`) is the reader's choice, not an error.
    let _ = std::io::Write::write_all(&mut std::io::stdout(), text.as_bytes());
    Ok(plan.is_safe())
}

fn summary(plan: &Plan, verbose: bool) -> String {
    let f = &plan.functions;
    let (kept, moved, transformed, added, removed) = plan.data_counts();
    let mut out = format!(
        "functions: {} changed, {} added, {} removed, {} unchanged\n",
        f.changed.len(),
        f.added.len(),
        f.removed.len(),
        f.unchanged.len()
    );
    for (label, names) in [("changed", &f.changed), ("added", &f.added), ("removed", &f.removed)] {
        if !names.is_empty() {
            out += &format!("  {label}: {}\n", names.join(", "));
        }
    }
    out += &format!("globals: {kept} kept, {moved} moved, {transformed} transformed, {added} added, {removed} removed\n");
    for d in &plan.data {
        let line = match &d.fate {
            DataFate::Kept { address } if verbose => format!("  kept {} at {address:#x}", d.key),
            DataFate::Kept { .. } => continue,
            DataFate::Added { .. } => format!("  added {} ({} bytes)", d.key, d.size),
            DataFate::Converted { map, transformer, .. } => {
                let mut s = format!("  {} {}", if transformer.is_some() { "transformed" } else { "moved" }, d.key);
                if !map.zeroed.is_empty() {
                    s += &format!("; new, zeroed: {}", map.zeroed.join(", "));
                }
                if !map.dropped.is_empty() {
                    s += &format!("; dropped: {}", map.dropped.join(", "));
                }
                s
            }
        };
        out += &line;
        out.push('\n');
    }
    for key in &plan.removed {
        out += &format!("  removed {key}\n");
    }
    out += &format!("fresh memory: {} bytes\n", plan.fresh_size);
    out
}

/// What runs of the constructors (see `upstare_patchgen::constructors`):
/// only those the new version adds, once.
fn constructors_note(plan: &Plan) -> Option<String> {
    let names: Vec<String> = plan.constructors.iter().map(|&f| plan.new.info.function_name(f)).collect();
    (!names.is_empty()).then(|| {
        format!("constructors: the new version adds {}, run once at the update; the others do not run again\n", names.join(", "))
    })
}

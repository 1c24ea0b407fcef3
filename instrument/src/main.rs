//! `upstare-instrument IN.wasm -o OUT.wasm`: the instrumenter as a command.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// Rewrites a wasm module so upstare-host can pause it at update points
/// (loop headers and blocking WASI calls) and unwind and rewind its stack.
#[derive(Parser, Debug)]
#[command(name = "upstare-instrument", version)]
struct Args {
    /// The module to instrument.
    input: PathBuf,
    /// Where to write the instrumented module.
    #[arg(short, long)]
    output: PathBuf,
    /// Also treat this import as blocking (an update point), as MODULE.NAME.
    /// The blocking calls of WASI preview1 are always included.
    #[arg(long = "blocking", value_name = "MODULE.NAME")]
    blocking: Vec<String>,
    /// Write the unwind-only variant: it can pause, but a stack it unwound
    /// rewinds only into the full variant (what upstare-host starts a
    /// program on, to compile the code that resumes it when first needed).
    #[arg(long)]
    unwind_only: bool,
    /// Print the resume points of every instrumented function.
    #[arg(long)]
    verbose: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

fn run(args: &Args) -> Result<(), String> {
    let input = std::fs::read(&args.input).map_err(|e| format!("cannot read {}: {e}", args.input.display()))?;
    let mut options = upstare_instrument::Options { unwind_only: args.unwind_only, ..Default::default() };
    for b in &args.blocking {
        let (m, n) = b
            .split_once('.')
            .ok_or_else(|| format!("--blocking {b}: expected MODULE.NAME, for example env.wait_event"))?;
        options.blocking.insert((m.to_string(), n.to_string()));
    }
    let out = upstare_instrument::instrument(&input, &options).map_err(|e| format!("{}: {e}", args.input.display()))?;
    std::fs::write(&args.output, &out.wasm).map_err(|e| format!("cannot write {}: {e}", args.output.display()))?;
    let rps: usize = out.metadata.functions.iter().map(|f| f.resume_points.len()).sum();
    eprintln!(
        "{}: {} bytes -> {} bytes, {} functions instrumented, {} resume points",
        args.output.display(),
        input.len(),
        out.wasm.len(),
        out.metadata.functions.len(),
        rps
    );
    if args.verbose {
        for f in &out.metadata.functions {
            for (i, rp) in f.resume_points.iter().enumerate() {
                eprintln!(
                    "  func {} rp {i}: {:?} at {:#x} callee {} ordinal {} operands {:?}",
                    f.index, rp.kind, rp.offset, rp.callee, rp.ordinal, rp.operands
                );
            }
        }
    }
    Ok(())
}

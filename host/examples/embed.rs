//! Embedding `upstare-host` in a Rust program: load a guest, give it
//! arguments, an environment variable and a directory, run it on its own
//! thread, pause it from this thread, look at its stack, and resume it.
//!
//! ```text
//! cargo run -p upstare-host --example embed -- app.wasm [ARGS...]
//! ```
//!
//! The guest sees the current directory as `.` and `EMBEDDED=1`. If it is
//! still running after half a second, the example pauses it wherever it is
//! (computing or blocked in a host call), prints how deep its stack is, and
//! resumes it; if it still runs after five more seconds, it is paused again
//! and left there.

use std::sync::mpsc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use upstare_host::{new_engine, Exit, Guest, GuestConfig, GuestModule, PreopenDir, GUEST_THREAD_STACK};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(path) = args.first() else {
        bail!("usage: embed app.wasm [ARGS...]");
    };
    let engine = new_engine()?;
    let module = GuestModule::load(&engine, path.as_ref())?;

    let mut config = GuestConfig::new(args.clone());
    config.env.push(("EMBEDDED".into(), "1".into()));
    config.dirs.push(PreopenDir { host: ".".into(), guest: ".".into() });
    let mut guest = Guest::new(&engine, &module, config)?;
    let pause = guest.pause_handle().context("the module was loaded without instrumentation")?;

    // The guest thread reports every stop; `resume` tells it to go on.
    let (stopped, stops) = mpsc::channel();
    let (resume, resumes) = mpsc::channel::<bool>();
    let runner = std::thread::Builder::new()
        .stack_size(GUEST_THREAD_STACK)
        .spawn(move || loop {
            let exit = guest.run();
            let depth = guest.frames().map_or(0, <[_]>::len);
            let paused = matches!(exit, Exit::Paused);
            stopped.send((exit, depth)).ok();
            if !paused || !resumes.recv().unwrap_or(false) {
                return;
            }
        })
        .context("cannot start the guest thread")?;

    for (round, wait) in [Duration::from_millis(500), Duration::from_secs(5)].into_iter().enumerate() {
        let (exit, depth) = match stops.recv_timeout(wait) {
            Ok(stop) => stop,
            Err(_) => {
                let asked = pause.request();
                let stop = stops.recv().context("the guest thread ended")?;
                println!("paused {:?} after the request", asked.elapsed());
                stop
            }
        };
        match exit {
            Exit::Paused => {
                println!("guest paused with {depth} frames on its stack");
                let last = round == 1;
                resume.send(!last).ok();
                if last {
                    println!("leaving it paused");
                    break;
                }
            }
            Exit::Status(code) => {
                println!("guest exited with status {code}");
                break;
            }
            Exit::Trap(report) => {
                println!("{report}");
                break;
            }
            Exit::Interrupted { call } => {
                println!("guest interrupted while blocked in {call}");
                break;
            }
            Exit::HostError(msg) => bail!("host error: {msg}"),
        }
    }
    runner.join().map_err(|_| anyhow::anyhow!("the guest thread panicked"))?;
    Ok(())
}

//! Embedding `upstare-host` in a Rust program: load a guest, give it
//! arguments, an environment variable and a directory, run it on its own
//! thread, and interrupt it if it is still blocked after a deadline.
//!
//! ```text
//! cargo run -p upstare-host --example embed -- app.wasm [ARGS...]
//! ```
//!
//! The guest sees the current directory as `.` and `EMBEDDED=1`. If it is
//! still blocked in a host call (waiting for input, a connection, a timer)
//! after five seconds, the example interrupts it.

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
    let interrupt = guest.interrupt_handle();

    let runner = std::thread::Builder::new()
        .stack_size(GUEST_THREAD_STACK)
        .spawn(move || guest.run())
        .context("cannot start the guest thread")?;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !runner.is_finished() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    if !runner.is_finished() {
        interrupt.interrupt();
    }
    match runner.join().map_err(|_| anyhow::anyhow!("the guest thread panicked"))? {
        Exit::Status(code) => println!("guest exited with status {code}"),
        Exit::Trap(report) => println!("{report}"),
        Exit::Interrupted { call } => println!("guest interrupted while blocked in {call}"),
        Exit::HostError(msg) => bail!("host error: {msg}"),
    }
    Ok(())
}
